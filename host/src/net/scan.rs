//! What CNI gave a pod: its interface in the pod's network namespace, read
//! over netlink — name, MAC, MTU, IPv4 addresses and the routes through it.

use std::net::{IpAddr, Ipv4Addr};

use zygote_netlink::Netlink;
use zygote_netlink::route::AddressFamily;
use zygote_netlink::route::RouteNetlinkMessage;
use zygote_netlink::route::address::{AddressAttribute, AddressMessage, AddressScope};
use zygote_netlink::route::link::{LinkAttribute, LinkFlags, LinkMessage};
use zygote_netlink::route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol,
};

use super::NetError;

/// An IPv4 address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// Prefix length (0..=32).
    pub prefix: u8,
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A route through the pod's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Route {
    /// Destination (`0.0.0.0/0`: the default route).
    pub destination: Ipv4Cidr,
    /// Next hop (none: on-link).
    pub gateway: Option<Ipv4Addr>,
}

/// The pod's interface as CNI set it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    /// Its name in the pod's namespace (e.g. `eth0`); the guest's NIC gets it too.
    pub name: String,
    /// Its index there.
    pub index: u32,
    /// Its MAC: the guest's NIC takes it, as Kata's does.
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
    /// Its IPv4 addresses.
    pub addresses: Vec<Ipv4Cidr>,
    /// IPv4 routes through it (the kernel's own subnet routes left out: the
    /// guest makes them when the addresses are added).
    pub routes: Vec<Ipv4Route>,
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> NetError {
    move |source| NetError::Netlink { what, source }
}

/// The pod's link: every link but loopback and `skip` is a candidate;
/// `eth0` if there is one, else the only one.
pub struct PodLink {
    /// Its name.
    pub name: String,
    /// Its index.
    pub index: u32,
    /// Its MAC, if it has one.
    pub mac: Option<[u8; 6]>,
    /// Its MTU.
    pub mtu: u32,
}

/// Finds the pod's link (see [`PodLink`]).
pub fn pod_link(nl: &mut Netlink, skip: &str) -> Result<PodLink, NetError> {
    let links: Vec<LinkMessage> = nl
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
        .map_err(io("listing links"))?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(l),
            _ => None,
        })
        .filter(|l| !l.header.flags.contains(LinkFlags::Loopback))
        .filter(|l| link_name(l).is_some_and(|n| n != skip))
        .collect();
    let names: Vec<String> = links
        .iter()
        .filter_map(link_name)
        .map(String::from)
        .collect();
    let link = match links.iter().position(|l| link_name(l) == Some("eth0")) {
        Some(i) => &links[i],
        None if links.len() == 1 => &links[0],
        None if links.is_empty() => return Err(NetError::NoInterface),
        None => return Err(NetError::Ambiguous(names)),
    };
    let mut found = PodLink {
        name: link_name(link).unwrap_or_default().to_string(),
        index: link.header.index,
        mac: None,
        mtu: 1500,
    };
    for a in &link.attributes {
        match a {
            LinkAttribute::Address(bytes) => found.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            LinkAttribute::Mtu(m) => found.mtu = *m,
            _ => {}
        }
    }
    Ok(found)
}

/// Reads the pod's interface: its link, IPv4 addresses and routes. An
/// interface without a MAC or an IPv4 address, or with a global IPv6
/// address, is refused.
pub fn pod_interface(nl: &mut Netlink, skip: &str) -> Result<PodInterface, NetError> {
    let PodLink {
        name,
        index,
        mac,
        mtu,
    } = pod_link(nl, skip)?;
    let mac = mac.ok_or_else(|| NetError::NotEthernet(name.clone()))?;

    let mut addresses = Vec::new();
    for m in nl
        .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
        .map_err(io("listing addresses"))?
    {
        let RouteNetlinkMessage::NewAddress(a) = m else {
            continue;
        };
        if a.header.index != index {
            continue;
        }
        let addr = a.attributes.iter().find_map(|at| match at {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        match addr {
            Some(IpAddr::V4(v4)) => addresses.push(Ipv4Cidr {
                addr: v4,
                prefix: a.header.prefix_len,
            }),
            // Link-local IPv6 addresses appear by themselves; a global one
            // came from CNI and the guest (no IPv6) cannot take it.
            Some(IpAddr::V6(v6)) if a.header.scope == AddressScope::Universe => {
                return Err(NetError::Family {
                    interface: name,
                    address: format!("{v6}/{}", a.header.prefix_len),
                });
            }
            _ => {}
        }
    }
    if addresses.is_empty() {
        return Err(NetError::NoAddress(name));
    }

    let mut query = RouteMessage::default();
    query.header.address_family = AddressFamily::Inet;
    let mut routes = Vec::new();
    for m in nl
        .dump(RouteNetlinkMessage::GetRoute(query))
        .map_err(io("listing routes"))?
    {
        let RouteNetlinkMessage::NewRoute(r) = m else {
            continue;
        };
        if r.header.address_family != AddressFamily::Inet
            || r.header.protocol == RouteProtocol::Kernel
        {
            continue;
        }
        let mut table = u32::from(r.header.table);
        let (mut oif, mut dst, mut gw) = (None, Ipv4Addr::UNSPECIFIED, None);
        for a in &r.attributes {
            match a {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                _ => {}
            }
        }
        if table != u32::from(RouteHeader::RT_TABLE_MAIN) || oif != Some(index) {
            continue;
        }
        routes.push(Ipv4Route {
            destination: Ipv4Cidr {
                addr: dst,
                prefix: r.header.destination_prefix_length,
            },
            gateway: gw,
        });
    }
    Ok(PodInterface {
        name,
        index,
        mac,
        mtu,
        addresses,
        routes,
    })
}

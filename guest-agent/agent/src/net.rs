//! The guest's NIC made the pod's interface: the reconcile's network step.
//!
//! A template's NIC is down, without an address, its MAC the template's. A
//! fork is told the pod's interface (the host read it from CNI's, in the
//! pod's namespace) and makes its NIC that: name, MAC (Linux reads a virtio
//! NIC's MAC only at probe, so it is set here over netlink), MTU, addresses,
//! no neighbour entries from before, link up — with `arp_notify` on, the
//! kernel announces the addresses by gratuitous ARP as the link comes up —
//! then the routes.

use std::net::Ipv4Addr;

use zygote_agent_api::{Interface, Route};
use zygote_netlink::route::AddressFamily;
use zygote_netlink::route::RouteNetlinkMessage;
use zygote_netlink::route::address::{AddressAttribute, AddressMessage};
use zygote_netlink::route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use zygote_netlink::route::neighbour::NeighbourMessage;
use zygote_netlink::route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use zygote_netlink::{CREATE_EXCL, Netlink};

/// Most addresses and routes accepted for one interface.
pub const MAX_ADDRESSES: usize = 16;
/// Most routes accepted.
pub const MAX_ROUTES: usize = 64;

/// Invalid network identity in a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidNetwork {
    /// More than one interface (the VM has one NIC).
    #[error("{0} interfaces given; the VM has one NIC")]
    Interfaces(usize),
    /// Not an interface name.
    #[error("invalid interface name {0:?}")]
    Name(String),
    /// Not a unicast MAC.
    #[error("invalid MAC {0:?}")]
    Mac(String),
    /// MTU out of range.
    #[error("MTU {0} out of range (68..=65535)")]
    Mtu(u32),
    /// Not an IPv4 address with a prefix.
    #[error("invalid IPv4 address {0:?} (a.b.c.d/len)")]
    Address(String),
    /// Not a route.
    #[error("invalid route {destination:?} via {gateway:?}")]
    Route {
        /// Its destination.
        destination: String,
        /// Its gateway.
        gateway: String,
    },
    /// Too many addresses or routes.
    #[error("too many addresses or routes")]
    TooMany,
}

/// An IPv4 address and prefix length from `a.b.c.d/len`.
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let len: u8 = len.parse().ok()?;
    (len <= 32).then_some(())?;
    Some((addr.parse().ok()?, len))
}

/// A MAC from `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        (p.len() == 2).then_some(())?;
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Checks the network part of a reconcile before anything is applied.
pub fn validate(interfaces: &[Interface], routes: &[Route]) -> Result<(), InvalidNetwork> {
    if interfaces.len() > 1 {
        return Err(InvalidNetwork::Interfaces(interfaces.len()));
    }
    if routes.len() > MAX_ROUTES {
        return Err(InvalidNetwork::TooMany);
    }
    for i in interfaces {
        if i.name.is_empty()
            || i.name.len() >= 16
            || !i
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(InvalidNetwork::Name(i.name.clone()));
        }
        match parse_mac(&i.mac) {
            // Multicast (low bit of the first byte) or all-zero: not a NIC's.
            Some(m) if m[0] & 1 == 0 && m != [0; 6] => {}
            _ => return Err(InvalidNetwork::Mac(i.mac.clone())),
        }
        if !(68..=65535).contains(&i.mtu) {
            return Err(InvalidNetwork::Mtu(i.mtu));
        }
        if i.addresses.len() > MAX_ADDRESSES {
            return Err(InvalidNetwork::TooMany);
        }
        if let Some(bad) = i.addresses.iter().find(|a| parse_cidr(a).is_none()) {
            return Err(InvalidNetwork::Address(bad.clone()));
        }
    }
    for r in routes {
        let gateway_ok = r.gateway.is_empty() || r.gateway.parse::<Ipv4Addr>().is_ok();
        if parse_cidr(&r.destination).is_none() || !gateway_ok {
            return Err(InvalidNetwork::Route {
                destination: r.destination.clone(),
                gateway: r.gateway.clone(),
            });
        }
    }
    Ok(())
}

fn step(what: &'static str) -> impl FnOnce(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// The guest's Ethernet NIC: its index and name.
fn nic(nl: &mut Netlink) -> Result<(u32, String), String> {
    let links = nl
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
        .map_err(step("listing links"))?;
    links
        .into_iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l)
                if l.header.link_layer_type == LinkLayerType::Ether
                    && !l.header.flags.contains(LinkFlags::Loopback) =>
            {
                let name = l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })?;
                Some((l.header.index, name))
            }
            _ => None,
        })
        .ok_or_else(|| "the VM has no network device (a template built before NICs?)".into())
}

/// Brings the loopback interface up (at boot: every template, and so every
/// fork, has localhost; a pod's containers reach each other there).
pub fn loopback_up() -> Result<(), String> {
    let mut nl = Netlink::open().map_err(step("netlink"))?;
    let links = nl
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
        .map_err(step("listing links"))?;
    for m in links {
        if let RouteNetlinkMessage::NewLink(l) = m {
            if l.header.flags.contains(LinkFlags::Loopback) {
                let mut up = LinkMessage::default();
                up.header.index = l.header.index;
                up.header.flags = LinkFlags::Up;
                up.header.change_mask = LinkFlags::Up;
                return nl
                    .request(RouteNetlinkMessage::SetLink(up), 0)
                    .map_err(step("bringing lo up"));
            }
        }
    }
    Err("no loopback interface".into())
}

/// Makes the NIC `iface` and adds `routes` (validated). Returns what was done.
pub fn configure(iface: &Interface, routes: &[Route]) -> Result<String, String> {
    let mut nl = Netlink::open().map_err(step("netlink"))?;
    let (index, name) = nic(&mut nl)?;
    let mac = parse_mac(&iface.mac).ok_or("invalid MAC")?;

    // Down (the template's is; a renamed link must be), renamed, MAC, MTU.
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.header.change_mask = LinkFlags::Up;
    link.attributes.push(LinkAttribute::Address(mac.to_vec()));
    link.attributes.push(LinkAttribute::Mtu(iface.mtu));
    if iface.name != name {
        link.attributes
            .push(LinkAttribute::IfName(iface.name.clone()));
    }
    nl.request(RouteNetlinkMessage::SetLink(link), 0)
        .map_err(step("setting MAC and MTU"))?;

    // Nothing of before: addresses and neighbours on this link go.
    let mut flushed = 0;
    for m in nl
        .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
        .map_err(step("listing addresses"))?
    {
        if let RouteNetlinkMessage::NewAddress(a) = m {
            if a.header.index == index {
                nl.request(RouteNetlinkMessage::DelAddress(a), 0)
                    .map_err(step("removing an old address"))?;
            }
        }
    }
    for m in nl
        .dump(RouteNetlinkMessage::GetNeighbour(
            NeighbourMessage::default(),
        ))
        .map_err(step("listing neighbours"))?
    {
        if let RouteNetlinkMessage::NewNeighbour(n) = m {
            if n.header.ifindex == index {
                nl.request(RouteNetlinkMessage::DelNeighbour(n), 0)
                    .map_err(step("removing a neighbour"))?;
                flushed += 1;
            }
        }
    }

    // Announce on link up (a gratuitous ARP per address).
    let sysctl = format!("/proc/sys/net/ipv4/conf/{}/arp_notify", iface.name);
    std::fs::write(&sysctl, "1").map_err(|e| format!("{sysctl}: {e}"))?;

    for a in &iface.addresses {
        let (addr, prefix) = parse_cidr(a).ok_or("invalid address")?;
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(addr.into()));
        msg.attributes.push(AddressAttribute::Address(addr.into()));
        if prefix < 31 {
            let host_bits = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
            let broadcast = Ipv4Addr::from(u32::from(addr) | host_bits);
            msg.attributes.push(AddressAttribute::Broadcast(broadcast));
        }
        nl.request(RouteNetlinkMessage::NewAddress(msg), CREATE_EXCL)
            .map_err(|e| format!("adding {a}: {e}"))?;
    }

    let mut up = LinkMessage::default();
    up.header.index = index;
    up.header.flags = LinkFlags::Up;
    up.header.change_mask = LinkFlags::Up;
    nl.request(RouteNetlinkMessage::SetLink(up), 0)
        .map_err(step("bringing the link up"))?;

    for r in routes {
        let (dst, prefix) = parse_cidr(&r.destination).ok_or("invalid route")?;
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = prefix;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.kind = RouteType::Unicast;
        msg.header.scope = if r.gateway.is_empty() {
            RouteScope::Link
        } else {
            RouteScope::Universe
        };
        if prefix > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
        }
        if let Ok(gw) = r.gateway.parse::<Ipv4Addr>() {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
        }
        msg.attributes.push(RouteAttribute::Oif(index));
        nl.request(RouteNetlinkMessage::NewRoute(msg), CREATE_EXCL)
            .map_err(|e| format!("adding route {} via {:?}: {e}", r.destination, r.gateway))?;
    }
    Ok(format!(
        "{} is {} (MAC {}, MTU {}), {} routes, {flushed} neighbours flushed, link up",
        iface.name,
        iface.addresses.join(" "),
        iface.mac,
        iface.mtu,
        routes.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface() -> Interface {
        Interface {
            name: "eth0".into(),
            mac: "02:42:c6:12:00:05".into(),
            addresses: vec!["198.18.0.5/16".into()],
            mtu: 1500,
        }
    }

    #[test]
    fn parses_and_refuses() {
        assert_eq!(
            parse_cidr("198.18.0.5/16"),
            Some(([198, 18, 0, 5].into(), 16))
        );
        for bad in [
            "198.18.0.5",
            "198.18.0.5/33",
            "fd00::1/64",
            "x/1",
            "1.2.3.4/-1",
        ] {
            assert_eq!(parse_cidr(bad), None, "{bad}");
        }
        assert_eq!(
            parse_mac("02:42:c6:12:00:05"),
            Some([2, 0x42, 0xc6, 0x12, 0, 5])
        );
        for bad in [
            "02:42:c6:12:00",
            "02:42:c6:12:00:05:06",
            "2:42:c6:12:00:05",
            "zz:42:c6:12:00:05",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        assert_eq!(validate(&[iface()], &[]), Ok(()));
        let route = |d: &str, g: &str| Route {
            destination: d.into(),
            gateway: g.into(),
        };
        assert_eq!(
            validate(&[iface()], &[route("0.0.0.0/0", "198.18.0.1")]),
            Ok(())
        );
        assert!(matches!(
            validate(&[iface()], &[route("0.0.0.0/0", "fe80::1")]),
            Err(InvalidNetwork::Route { .. })
        ));
        let mut i = iface();
        i.mac = "01:00:5e:00:00:01".into();
        assert!(matches!(validate(&[i], &[]), Err(InvalidNetwork::Mac(_))));
        let mut i = iface();
        i.addresses = vec!["2001:db8::5/64".into()];
        assert!(matches!(
            validate(&[i], &[]),
            Err(InvalidNetwork::Address(_))
        ));
        let mut i = iface();
        i.name = "../eth0".into();
        assert!(matches!(validate(&[i], &[]), Err(InvalidNetwork::Name(_))));
        let mut i = iface();
        i.mtu = 9;
        assert!(matches!(validate(&[i], &[]), Err(InvalidNetwork::Mtu(9))));
        assert!(matches!(
            validate(&[iface(), iface()], &[]),
            Err(InvalidNetwork::Interfaces(2))
        ));
    }
}

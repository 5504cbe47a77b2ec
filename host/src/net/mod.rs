//! A pod's network, host side: in the pod's network namespace (made by the
//! CRI, addressed by CNI) a tap is created beside CNI's interface and the two
//! are joined by traffic control, so the VM's NIC becomes the pod's
//! interface: Kata's "tcfilter" model.
//!
//! ```text
//!  node ── bridge ── veth ═╪═ eth0 (pod netns) ⇄ tc mirred ⇄ zygote-tap0 ── virtio-net ── guest eth0
//! ```
//!
//! [`attach`] reads what CNI configured (`scan.rs`), creates the tap with
//! the interface's MTU, adds an ingress qdisc to both and a match-all u32
//! filter on each that redirects every frame to the other (`tc.rs`). The
//! guest then takes the interface's MAC, addresses and routes (the
//! reconcile's network step). [`detach`] undoes it and may run any number of
//! times, also when the namespace is already gone. Everything runs on a
//! thread inside the namespace (`netns.rs`); nothing shells out.

mod netns;
mod scan;
mod tc;

use std::path::{Path, PathBuf};

use zygote_netlink::Netlink;
use zygote_vmm::devices::virtio::net::{Tap, TapError};

pub use netns::{NetnsError, run_in};
pub use scan::{Ipv4Cidr, Ipv4Route, PodInterface};

/// The tap's name in every pod's namespace (one VM per namespace).
pub const TAP_NAME: &str = "zygote-tap0";

/// Errors wiring a pod's network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A netlink exchange failed.
    #[error("netlink: {what}")]
    Netlink {
        /// What was being done.
        what: &'static str,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// The namespace has only loopback: CNI configured nothing.
    #[error("the pod's network namespace has no interface besides loopback (did CNI run?)")]
    NoInterface,
    /// Several interfaces and none called `eth0`.
    #[error("the pod's network namespace has several interfaces and no eth0: {0:?}")]
    Ambiguous(Vec<String>),
    /// The interface has no Ethernet MAC.
    #[error("interface {0} has no Ethernet address")]
    NotEthernet(String),
    /// The interface has no IPv4 address.
    #[error("interface {0} has no IPv4 address")]
    NoAddress(String),
    /// An address the guest cannot take.
    #[error("interface {interface} has {address}: zygote guests take IPv4 only")]
    Family {
        /// The interface.
        interface: String,
        /// The address.
        address: String,
    },
    /// The tap could not be created.
    #[error("cannot create the pod's tap")]
    Tap(#[source] TapError),
}

fn netlink(what: &'static str) -> impl FnOnce(std::io::Error) -> NetError {
    move |source| NetError::Netlink { what, source }
}

/// A pod's network as attached: the tap (the VM's NIC takes it) and what the
/// guest must be told.
#[derive(Debug)]
pub struct PodNetwork {
    /// The pod's namespace.
    pub netns: PathBuf,
    /// CNI's interface.
    pub interface: PodInterface,
    /// The tap, in the pod's namespace.
    pub tap: Tap,
}

/// Wires a tap to the pod's interface in `netns` (see the module docs).
/// Leftovers of an earlier attach are removed first; on error nothing of
/// this one is left.
pub fn attach(netns: &Path) -> Result<PodNetwork, NetError> {
    let (interface, tap) = run_in(netns, || {
        let mut nl = Netlink::open().map_err(netlink("opening a socket"))?;
        clean(&mut nl)?;
        let wired = wire(&mut nl);
        if wired.is_err() {
            let _ = clean(&mut nl);
        }
        wired
    })??;
    tracing::debug!(
        netns = %netns.display(),
        interface = %interface.name,
        "pod network attached"
    );
    Ok(PodNetwork {
        netns: netns.into(),
        interface,
        tap,
    })
}

fn wire(nl: &mut Netlink) -> Result<(PodInterface, Tap), NetError> {
    let interface = scan::pod_interface(nl, TAP_NAME)?;
    let tap = Tap::create(TAP_NAME).map_err(NetError::Tap)?;
    let tap_index = tap.index().map_err(netlink("finding the tap"))?;
    tc::set_up_with_mtu(nl, tap_index, interface.mtu).map_err(netlink("bringing the tap up"))?;
    tc::add_ingress(nl, interface.index)
        .map_err(netlink("adding the interface's ingress qdisc"))?;
    tc::add_ingress(nl, tap_index).map_err(netlink("adding the tap's ingress qdisc"))?;
    tc::redirect(nl, interface.index, tap_index)
        .map_err(netlink("redirecting the interface to the tap"))?;
    tc::redirect(nl, tap_index, interface.index)
        .map_err(netlink("redirecting the tap to the interface"))?;
    Ok((interface, tap))
}

/// Removes the tap and the interface's ingress qdisc (with its filter). A
/// link with the tap's name that is not a tap is not ours and stays.
fn clean(nl: &mut Netlink) -> Result<(), NetError> {
    if let Some((tap, true)) = tc::find_link(nl, TAP_NAME).map_err(netlink("finding the tap"))? {
        match tc::delete_link(nl, tap) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
            Err(e) => return Err(netlink("deleting the tap")(e)),
        }
    }
    // No interface (or several without eth0): the attach made no qdisc.
    if let Ok(link) = scan::pod_link(nl, TAP_NAME) {
        tc::delete_ingress(nl, link.index).map_err(netlink("deleting the ingress qdisc"))?;
    }
    Ok(())
}

/// Whether `path` is this process's own network namespace (the host's, for
/// a shim): a pod given it has host networking, and it must never be wired.
pub fn is_own_namespace(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::metadata(path),
        std::fs::metadata("/proc/self/ns/net"),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Undoes [`attach`] in `netns`: the tap (if its VM still holds it) and
/// the filters. Harmless to repeat; a namespace that is gone has nothing
/// left to undo.
pub fn detach(netns: &Path) -> Result<(), NetError> {
    match run_in(netns, || {
        let mut nl = Netlink::open().map_err(netlink("opening a socket"))?;
        clean(&mut nl)
    }) {
        Err(NetnsError::Open { .. }) => Ok(()),
        Err(e) => Err(e.into()),
        Ok(cleaned) => cleaned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn ip(args: &str) -> String {
        let out = Command::new("ip")
            .args(args.split_whitespace())
            .output()
            .expect("ip");
        assert!(
            out.status.success(),
            "ip {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn tc(ns: &str, args: &str) -> String {
        ip(&format!("netns exec {ns} tc {args}"))
    }

    /// A namespace as CNI leaves it: a veth end `eth0` with an address from
    /// 198.18.0.0/15 and a default route. Removed on drop.
    struct ScratchNs(String);

    impl ScratchNs {
        fn new(tag: &str) -> Self {
            let name = format!("zt-{tag}-{}", std::process::id());
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(std::process::Stdio::null())
                .status();
            ip(&format!("netns add {name}"));
            ScratchNs(name)
        }
        fn path(&self) -> PathBuf {
            PathBuf::from(format!("/var/run/netns/{}", self.0))
        }
        fn with_cni_interface(self, mtu: u32) -> Self {
            let peer = format!("zh{}{}", &self.0[3..6], std::process::id() % 100_000);
            ip(&format!(
                "link add {peer} type veth peer name eth0 netns {}",
                self.0
            ));
            let n = &self.0;
            ip(&format!("-n {n} link set eth0 mtu {mtu} up"));
            ip(&format!("-n {n} addr add 198.18.7.2/24 dev eth0"));
            ip(&format!("-n {n} route add default via 198.18.7.1 dev eth0"));
            self
        }
    }

    impl Drop for ScratchNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    #[test]
    fn attach_wires_a_tap_and_detach_removes_everything() {
        let ns = ScratchNs::new("attach").with_cni_interface(1450);
        let net = attach(&ns.path()).expect("attach");
        assert_eq!(net.interface.name, "eth0");
        assert_eq!(net.interface.mtu, 1450);
        assert_eq!(net.interface.addresses[0].to_string(), "198.18.7.2/24");
        assert_eq!(
            net.interface.routes,
            vec![Ipv4Route {
                destination: Ipv4Cidr {
                    addr: std::net::Ipv4Addr::UNSPECIFIED,
                    prefix: 0
                },
                gateway: Some("198.18.7.1".parse().unwrap()),
            }]
        );
        let links = ip(&format!("-n {} -o link show", ns.0));
        assert!(
            links.contains("zygote-tap0") && links.contains("mtu 1450"),
            "{links}"
        );
        for dev in ["eth0", TAP_NAME] {
            let filters = tc(&ns.0, &format!("filter show dev {dev} parent ffff:"));
            assert!(
                filters.contains("mirred") && filters.contains("Redirect"),
                "{dev}: {filters}"
            );
        }
        // Attaching again while the first is held: the tap name is taken by
        // a live tap; the old wiring is replaced, not doubled.
        drop(net);
        detach(&ns.path()).expect("detach");
        detach(&ns.path()).expect("detach again");
        let links = ip(&format!("-n {} -o link show", ns.0));
        assert!(!links.contains("zygote-tap0"), "{links}");
        let qdiscs = tc(&ns.0, "qdisc show dev eth0");
        assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    }

    #[test]
    fn a_tap_still_held_is_removed_by_detach() {
        let ns = ScratchNs::new("held").with_cni_interface(1500);
        let net = attach(&ns.path()).expect("attach");
        detach(&ns.path()).expect("detach with the tap open");
        let links = ip(&format!("-n {} -o link show", ns.0));
        assert!(!links.contains("zygote-tap0"), "{links}");
        drop(net);
        // And a second attach after the first was undone works.
        let again = attach(&ns.path()).expect("attach again");
        drop(again);
        detach(&ns.path()).unwrap();
    }

    #[test]
    fn the_own_namespace_is_recognised() {
        assert!(is_own_namespace(Path::new("/proc/self/ns/net")));
        assert!(is_own_namespace(Path::new(&format!(
            "/proc/{}/ns/net",
            std::process::id()
        ))));
        let ns = ScratchNs::new("own");
        assert!(!is_own_namespace(&ns.path()));
        assert!(!is_own_namespace(Path::new("/nonexistent")));
    }

    #[test]
    fn bad_namespaces_are_refused_with_nothing_left() {
        let missing = Path::new("/var/run/netns/zygote-no-such-ns");
        let e = attach(missing).unwrap_err();
        assert!(matches!(e, NetError::Netns(NetnsError::Open { .. })), "{e}");
        detach(missing).expect("nothing to undo");

        let empty = ScratchNs::new("empty");
        let e = attach(&empty.path()).unwrap_err();
        assert!(matches!(e, NetError::NoInterface), "{e}");

        let v6 = ScratchNs::new("v6").with_cni_interface(1500);
        ip(&format!(
            "-n {} addr add 2001:db8::2/64 dev eth0 nodad",
            v6.0
        ));
        let e = attach(&v6.path()).unwrap_err();
        assert!(e.to_string().contains("IPv4 only"), "{e}");

        // The tap's name is taken by a link that is not a tap.
        let taken = ScratchNs::new("taken").with_cni_interface(1500);
        ip(&format!(
            "-n {} link add {TAP_NAME} type veth peer name zt-peer",
            taken.0
        ));
        let e = attach(&taken.path()).unwrap_err();
        assert!(matches!(e, NetError::Tap(_)), "{e}");
        let links = ip(&format!("-n {} -o link show", taken.0));
        assert!(
            links.contains("zygote-tap0@zt-peer"),
            "not ours, kept: {links}"
        );
        for ns in [&v6, &taken] {
            let links = ip(&format!("-n {} -o link show type tun", ns.0));
            assert!(!links.contains("zygote-tap0"), "{links}");
            let qdiscs = tc(&ns.0, "qdisc show dev eth0");
            assert!(!qdiscs.contains("ingress"), "{qdiscs}");
        }
    }
}

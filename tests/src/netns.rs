//! Network namespaces made by a test (`ip netns add`), shaped as CNI leaves a
//! pod's: a veth whose pod end is `eth0` with an address, its host end
//! addressed in the same subnet. Subnets come from 198.19.0.0/16 (half of the
//! benchmarking range 198.18.0.0/15; hack/containerd's CNI bridge has the
//! other half). Removed on drop.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// `ip ARGS` (split on whitespace), which must succeed; its stdout.
pub fn ip(args: &str) -> String {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test's network namespace.
#[derive(Debug)]
pub struct ScratchNs {
    /// Its name under /var/run/netns.
    pub name: String,
    host_end: Option<String>,
}

impl ScratchNs {
    /// An empty namespace (loopback only) named after `tag` and this process.
    pub fn new(tag: &str) -> Self {
        let name = format!("zt-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&format!("netns add {name}"));
        ScratchNs {
            name,
            host_end: None,
        }
    }

    /// Its path, as a container spec names it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    /// Adds `eth0` (198.19.`subnet`.2/24, up) whose host end is
    /// 198.19.`subnet`.1/24.
    pub fn with_interface(mut self, subnet: u8) -> Self {
        let host = format!("zth{subnet}-{}", std::process::id() % 10_000);
        let _ = Command::new("ip")
            .args(["link", "del", &host])
            .stderr(Stdio::null())
            .status();
        ip(&format!(
            "link add {host} type veth peer name eth0 netns {}",
            self.name
        ));
        ip(&format!("addr add 198.19.{subnet}.1/24 dev {host}"));
        ip(&format!("link set {host} up"));
        let n = &self.name;
        ip(&format!("-n {n} addr add 198.19.{subnet}.2/24 dev eth0"));
        ip(&format!("-n {n} link set eth0 up"));
        self.host_end = Some(host);
        self
    }

    /// `tc ARGS` inside the namespace; its stdout.
    pub fn tc(&self, args: &str) -> String {
        ip(&format!("netns exec {} tc {args}", self.name))
    }

    /// `ip -o link show` inside the namespace.
    pub fn links(&self) -> String {
        ip(&format!("-n {} -o link show", self.name))
    }

    /// Whether the namespace holds a tap or an ingress qdisc on `eth0`
    /// (what a pod VM's wiring adds); a description of what it holds.
    pub fn wiring_left(&self) -> Option<String> {
        let taps = ip(&format!("-n {} -o link show type tun", self.name));
        let qdiscs = if self.host_end.is_some() {
            self.tc("qdisc show dev eth0")
        } else {
            String::new()
        };
        (!taps.trim().is_empty() || qdiscs.contains("ingress"))
            .then(|| format!("taps: {taps}; eth0 qdiscs: {qdiscs}"))
    }
}

impl Drop for ScratchNs {
    fn drop(&mut self) {
        if let Some(host) = &self.host_end {
            let _ = Command::new("ip").args(["link", "del", host]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// ARP frames seen on a host link from the moment it is opened (a packet
/// socket bound to the link): how a test observes a guest's gratuitous ARP.
#[derive(Debug)]
pub struct ArpCapture {
    fd: std::os::fd::OwnedFd,
}

/// A gratuitous ARP: the sender announces its own address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The sender's MAC, lower-case `aa:bb:..`.
    pub mac: String,
    /// The announced IPv4 address.
    pub ip: std::net::Ipv4Addr,
}

impl ArpCapture {
    /// Starts capturing ARP on the host link `link`.
    pub fn open(link: &str) -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        let name = std::ffi::CString::new(link).map_err(std::io::Error::other)?;
        // SAFETY: plain FFI calls with checked results; the fd is owned at once.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let proto = (libc::ETH_P_ARP as u16).to_be();
        // SAFETY: as above.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed sockaddr_ll is valid; we fill the fields we need.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a valid sockaddr_ll of the size given.
        let rc = unsafe {
            use std::os::fd::AsRawFd;
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ArpCapture { fd })
    }

    /// The gratuitous ARPs (requests or replies whose sender and target
    /// address are the same) received so far.
    pub fn announcements(&self) -> Vec<Announcement> {
        use std::os::fd::AsRawFd;
        let mut seen = Vec::new();
        let mut frame = [0u8; 2048];
        loop {
            // SAFETY: reads into a buffer of the length given.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    frame.as_mut_ptr().cast(),
                    frame.len(),
                    0,
                )
            };
            let Ok(n) = usize::try_from(n) else { break };
            if let Some(a) = parse_announcement(&frame[..n]) {
                seen.push(a);
            }
        }
        seen
    }
}

/// An Ethernet frame carrying an IPv4-over-Ethernet ARP in which the sender
/// announces its own address.
fn parse_announcement(frame: &[u8]) -> Option<Announcement> {
    let arp = frame.get(14..42)?;
    let ipv4_over_ethernet =
        arp[0..2] == [0, 1] && arp[2..4] == [8, 0] && arp[4] == 6 && arp[5] == 4;
    let sender_ip = std::net::Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
    let target_ip = std::net::Ipv4Addr::new(arp[24], arp[25], arp[26], arp[27]);
    (ipv4_over_ethernet && sender_ip == target_ip).then(|| Announcement {
        mac: arp[8..14]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
        ip: sender_ip,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gratuitous_arp_is_recognised_and_an_ordinary_request_is_not() {
        let mut frame = vec![0xff; 6];
        frame.extend([0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
        frame.extend([0, 1, 8, 0, 6, 4, 0, 1]);
        frame.extend([0x02, 0, 0, 0, 0, 1, 198, 18, 0, 7]);
        frame.extend([0, 0, 0, 0, 0, 0, 198, 18, 0, 7]);
        assert_eq!(
            parse_announcement(&frame),
            Some(Announcement {
                mac: "02:00:00:00:00:01".into(),
                ip: "198.18.0.7".parse().unwrap()
            })
        );
        frame[41] = 1;
        assert_eq!(parse_announcement(&frame), None, "asks for another address");
        assert_eq!(parse_announcement(&frame[..30]), None, "short");
    }
}

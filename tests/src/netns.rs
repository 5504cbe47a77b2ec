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

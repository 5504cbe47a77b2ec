//! A pod's network on the VM's side: the tap wired to CNI's interface
//! (`crate::net`), held until the VM takes it and detached when dropped, and
//! what the guest is told of it.

use std::path::{Path, PathBuf};

use super::PodError;

/// The pod's network while it is attached: detached when dropped (with the
/// pod VM, or when its create fails after the attach).
#[derive(Debug)]
pub(super) struct Attached(pub(super) Option<PathBuf>);

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(netns) = self.0.take() {
            if let Err(e) = crate::net::detach(&netns) {
                tracing::warn!("detach the pod network in {}: {e}", netns.display());
            }
        }
    }
}

/// A pod's network wired to a tap, waiting for its VM (the CRI attaches it
/// when the pod's sandbox is created, so that a network the VM cannot take
/// fails `RunPodSandbox`). Detached when dropped, unless a VM took it.
#[derive(Debug)]
pub struct WiredNetwork {
    pub(super) guard: Attached,
    pub(super) tap: zygote_vmm::devices::virtio::net::Tap,
    pub(super) interface: crate::net::PodInterface,
}

impl WiredNetwork {
    /// Wires a tap to the pod's interface in `netns` (on error nothing is left).
    pub fn attach(netns: &Path) -> Result<Self, PodError> {
        let attached = crate::net::attach(netns)?;
        Ok(WiredNetwork {
            guard: Attached(Some(attached.netns)),
            tap: attached.tap,
            interface: attached.interface,
        })
    }

    /// The pod's network namespace.
    pub fn netns(&self) -> Option<&Path> {
        self.guard.0.as_deref()
    }
}

/// What the guest is told of the pod's interface.
pub(super) fn guest_network(
    iface: &crate::net::PodInterface,
) -> (
    Vec<zygote_agent_api::Interface>,
    Vec<zygote_agent_api::Route>,
) {
    let m = iface.mac;
    let interface = zygote_agent_api::Interface {
        name: iface.name.clone(),
        mac: format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        ),
        addresses: iface.addresses.iter().map(ToString::to_string).collect(),
        mtu: iface.mtu,
    };
    let routes = iface
        .routes
        .iter()
        .map(|r| zygote_agent_api::Route {
            destination: r.destination.to_string(),
            gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
        })
        .collect();
    (vec![interface], routes)
}

//! zygote: the host side that people and containerd use.
//!
//! - [`paths`]: where the kernel, the guest image and VM run directories live.
//! - [`sandbox`]: a VM booted for zygote with its agent reachable: boot, wait
//!   for the agent's Ping (with a timeline), shut down, clean up.
//! - [`template`]: building templates (boot, warm, snapshot) and their metadata.
//! - [`image`]: container images made into read-only erofs disks, cached.
//! - [`doctor`]: checks of a node (KVM kind, kernel and image present).
//!
//! The binaries are `zygote` (operator CLI) and `containerd-shim-zygote-v2`.

pub mod containerd;
pub mod doctor;
pub mod image;
pub mod paths;
pub mod procmem;
pub mod reconcile;
pub mod sandbox;
pub mod template;

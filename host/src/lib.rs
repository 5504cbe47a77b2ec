//! zygote's host runtime library: what the containerd shim and the `zygote`
//! CLI share, and nothing of containerd.
//!
//! - [`paths`]: where the kernel, the guest image and VM run directories live.
//! - [`sandbox`]: a VM booted or forked for zygote with its agent reachable:
//!   boot, fork, wait for the agent's Ping (with a timeline), shut down,
//!   clean up (also what dead processes left).
//! - [`template`]: building templates (boot, warm, snapshot) and their metadata.
//! - [`image`]: container images made into read-only erofs disks, cached.
//! - [`reconcile`]: driving a fork's reconcile (clock offset, entropy, identity, policy).
//! - [`procmem`]: a process's memory figures (PSS) for benchmarks.
//! - [`doctor`]: checks of a node (KVM kind, kernel and image present).

pub mod doctor;
pub mod image;
pub mod net;
pub mod node;
pub mod paths;
pub mod procmem;
pub mod reconcile;
pub mod sandbox;
pub mod template;

/// An error's message with its whole chain of causes, on one line (a
/// transparent variant that repeats its source's message is said once).
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

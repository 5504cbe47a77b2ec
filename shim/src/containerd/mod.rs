//! The containerd shim v2 (`io.containerd.zygote.v2`): one shim process per
//! pod (per container without the CRI), the pod's VM inside it.
//!
//! Layering, each module using only those below it:
//!
//! - `shim.rs`: the shim process (start/delete/serve).
//! - `task/`: the Task service (handlers, process table, watchers, events).
//! - `pod/`: the pod VM — template by image (built on the spot if missing),
//!   fork, reconcile, and its typed agent calls.
//! - `io.rs`: containerd's FIFOs and log URIs bridged to the agent's vsock
//!   streams; `logger.rs`: `binary://` logging programs, as containerd's
//!   shims run them.
//! - `volumes/`: how bind mounts reach the VM (copied, shared, kept current).
//! - `cgroup.rs`: the pod's host cgroup, which the shim (and its VM) joins.
//! - `bundle.rs`: what zygote keeps in a container's bundle directory.
//! - `config.rs`: the TOML file the runtime options name; `spec.rs`: pod
//!   grouping, the image key, the spec the guest gets.

pub mod bundle;
pub mod cgroup;
pub mod config;
pub mod content;
pub mod io;
pub mod logger;
pub mod pod;
pub mod privileges;
pub mod shim;
pub mod spec;
pub mod task;
pub mod volumes;

//! The containerd shim v2 (`io.containerd.zygote.v2`): one shim process per
//! pod (per container without the CRI), the pod's VM inside it.
//!
//! - `config.rs`: the TOML file the runtime options name.
//! - `spec.rs`: pod grouping, the image key, the spec the guest gets.
//! - `pod.rs`: the pod VM — template by image (built on the spot if missing),
//!   fork, reconcile, agent calls.
//! - `io.rs`: containerd's FIFOs and log URIs bridged to the agent's vsock streams.
//! - `logger.rs`: `binary://` logging programs, as containerd's shims run them.
//! - `shim.rs`: the shim process (start/delete/serve).
//! - `service.rs`: the Task service.

pub mod config;
pub mod io;
pub mod logger;
pub mod pod;
pub mod service;
pub mod shim;
pub mod spec;

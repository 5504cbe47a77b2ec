//! zygote-agent: PID 1 of every zygote guest.
//!
//! As PID 1 it mounts the pseudo-filesystems, listens on vsock port
//! [`zygote_agent_api::AGENT_PORT`] and serves the agent API, one thread per
//! connection, never exiting on a client's error. The same static binary also
//! serves as the self-test's children (`zygote-agent stress-echo`,
//! `zygote-agent stress-threads`), so the initramfs holds nothing else.
//!
//! Run outside a VM (not PID 1) with `serve`, it serves on vsock without
//! mounting anything; the host tests drive its handlers directly.

pub mod container;
pub mod cpus;
pub mod detect;
pub mod exec;
pub mod flood;
pub mod image;
pub mod init;
pub mod memory;
pub mod net;
pub mod procs;
pub mod reconcile;
pub mod selftest;
pub mod server;
pub mod sockets;
pub mod sys;
pub mod vsock;
pub mod workload;

//! The zygote guest agent's API, shared by the agent and the host (shim, CLI).
//!
//! Wire format: each message is a protobuf ([`Request`] from the host,
//! [`Response`] from the agent) preceded by its length as a big-endian u32,
//! at most [`MAX_FRAME`] bytes, on a vsock stream to [`AGENT_PORT`]. Messages are
//! declared with `prost` derives, so no `protoc` is needed to build.
//!
//! [`client::AgentClient`] reaches the agent through a VM's hybrid-vsock Unix
//! socket (`CONNECT <port>\n` → `OK <port>\n`).

pub mod client;
pub mod frame;
pub mod messages;
pub mod reconcile;
pub mod volumes;

pub use client::{AgentClient, ClientError, attach_stdio};
pub use messages::*;
pub use reconcile::*;
pub use volumes::{EntryKind, ReadVolume, UpdateVolume, Volume, VolumeData, VolumeEntry};

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// The host port the agent connects to once it listens, to say it is ready (the
/// host listens on `<vsock socket>_<port>`), so the host need not poll a booting guest.
pub const READY_PORT: u32 = 1024;
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 4 << 20;
/// The agent's version, as reported in [`Pong`].
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

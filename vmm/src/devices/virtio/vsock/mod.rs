//! virtio-vsock with a Unix-socket host side (Firecracker's "hybrid vsock").
//!
//! The host reaches a guest port by connecting to the VM's Unix socket and
//! writing `CONNECT <port>\n`; the device answers `OK <host port>\n` once the
//! guest accepted, then bytes flow both ways. A guest connecting to the host's
//! port P reaches the Unix socket `<path>_<P>` if one listens there.
//!
//! `packet.rs` is the wire header, `backend.rs` the connection state machine
//! over the queues and host sockets, `event_handler.rs` its thread, `device.rs`
//! the virtio device.

mod backend;
mod device;
mod event_handler;
pub mod packet;
mod persist;

pub use backend::VsockBackend;
pub use device::{Vsock, VsockError};
pub use persist::{VsockArgs, VsockState};

/// virtio device id of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// Size of every queue.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indices.
pub const RXQ: usize = 0;
/// Transmit queue index.
pub const TXQ: usize = 1;
/// Event queue index.
pub const EVQ: usize = 2;
/// Receive buffer the device advertises per connection (guest → host bytes in flight).
pub const CONN_BUF_ALLOC: u32 = 256 << 10;
/// Largest payload of one packet the device accepts or sends.
pub const MAX_PAYLOAD: usize = 64 << 10;
/// Host ports handed out to host-initiated connections start here.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// At most this many connections per VM.
pub const MAX_CONNECTIONS: usize = 1024;
/// Event id of a transport reset (`struct virtio_vsock_event`).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

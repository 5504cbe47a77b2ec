//! virtio-net on a host tap device, in userspace (no vhost: a vhost worker's
//! kernel state would not fork).
//!
//! One receive and one transmit queue. Frames carry the 12-byte
//! `virtio_net_hdr_v1` in front, which the tap takes and gives as they are
//! (`IFF_VNET_HDR`, header size 12), so checksum and segmentation offloads
//! pass through: the offloads the driver accepts for receiving are set on
//! the tap (`TUNSETOFFLOAD`). Received frames are spread over several guest
//! buffers when the driver accepted mergeable receive buffers.
//!
//! A template's NIC has no tap and reports its link down; a fork is given its
//! own tap and reports the link up (a configuration-change interrupt tells the
//! guest). Nothing of one VM's network reaches another.
//!
//! `tap.rs` is the host tap, `device.rs` the virtio device, `event_handler.rs`
//! its thread (the queues ↔ the tap), `persist.rs` its saved state.

mod device;
mod event_handler;
mod persist;
pub mod tap;

pub use device::{Net, NetConfig};
pub use persist::{NetArgs, NetState};
pub use tap::{Tap, TapError};

/// virtio device id of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Receive queue index.
pub const RXQ: usize = 0;
/// Transmit queue index.
pub const TXQ: usize = 1;
/// Size of `virtio_net_hdr_v1` (virtio 1.x: `num_buffers` always present).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame with its header: a 64 KiB GSO packet, its Ethernet and VLAN
/// headers, and the virtio header.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65535 + 14 + 4;
/// Default MTU when none is given.
pub const DEFAULT_MTU: u16 = 1500;

/// Feature bits (virtio 1.2, 5.1.3).
pub mod features {
    /// The device handles packets with a partial checksum.
    pub const CSUM: u64 = 1 << 0;
    /// The driver handles packets with a partial checksum.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// The device reports its MTU.
    pub const MTU: u64 = 1 << 3;
    /// The device has a MAC address.
    pub const MAC: u64 = 1 << 5;
    /// The driver takes TSO (IPv4).
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// The driver takes TSO (IPv6).
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// The driver takes TSO with ECN.
    pub const GUEST_ECN: u64 = 1 << 9;
    /// The driver takes UFO.
    pub const GUEST_UFO: u64 = 1 << 10;
    /// The device takes TSO (IPv4).
    pub const HOST_TSO4: u64 = 1 << 11;
    /// The device takes TSO (IPv6).
    pub const HOST_TSO6: u64 = 1 << 12;
    /// The device takes TSO with ECN.
    pub const HOST_ECN: u64 = 1 << 13;
    /// The device takes UFO.
    pub const HOST_UFO: u64 = 1 << 14;
    /// Received frames may span several buffers.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// The configuration space has a link status.
    pub const STATUS: u64 = 1 << 16;
}

/// Link status bit in the configuration space.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Fuzzing entry (feature `fuzzing`): the guest's transmit queue (no tap:
/// frames are read and dropped), then `frame` delivered into its receive
/// buffers, with or without mergeable buffers.
#[cfg(feature = "fuzzing")]
pub fn fuzz_queues(
    mem: &crate::vstate::memory::GuestMemoryMmap,
    queues: Vec<virtio_queue::Queue>,
    frame: &[u8],
    mergeable: bool,
) {
    event_handler::fuzz(mem, queues, frame, mergeable)
}

//! virtio-rng: entropy for the guest kernel, from the host's `getrandom`.

mod device;
mod persist;

pub use device::{Rng, getrandom};
pub use persist::RngState;

/// virtio device id of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Queue size.
pub const QUEUE_SIZE: u16 = 64;
/// Most bytes handed out per request: a guest cannot make the host fill huge buffers.
pub const MAX_REQUEST: usize = 64 << 10;

/// Fuzzing entry (feature `fuzzing`): the device's request handling.
#[cfg(feature = "fuzzing")]
pub fn fuzz_requests(
    mem: &crate::vstate::memory::GuestMemoryMmap,
    queue: &mut virtio_queue::Queue,
) -> bool {
    device::fill_requests(mem, queue)
}

//! virtio-fs: a host directory shared with the guest over FUSE. The device
//! (`device`) carries the guest's FUSE requests over two queues (high
//! priority, and requests) to the server (`server`), which answers from
//! the shared directory. A device starts with no share attached (what a
//! template carries: FUSE state must not outlive a fork); the VMM attaches
//! one after the fork, then the guest mounts it by its tag.

mod device;
mod persist;
pub mod server;

pub use device::{Fs, FsError};
pub use persist::FsState;
pub use server::ServerError;

/// The tag of the shared file system zygote's VMs carry.
pub const SHARE_TAG: &str = "zygote-share";
/// virtio device id of a file system device.
pub const VIRTIO_ID_FS: u32 = 26;
/// Queue size (each queue).
pub const QUEUE_SIZE: u16 = 128;
/// The longest tag the guest mounts it by (the config space's field).
pub const TAG_LEN: usize = 36;

/// Fuzzing entry (feature `fuzzing`): the device's request handling, with
/// `server` attached.
#[cfg(feature = "fuzzing")]
pub fn fuzz_requests(
    mem: &crate::vstate::memory::GuestMemoryMmap,
    queue: &mut virtio_queue::Queue,
    server: &std::sync::Arc<std::sync::Mutex<Option<server::FsServer>>>,
) -> bool {
    device::serve_requests(mem, queue, server)
}

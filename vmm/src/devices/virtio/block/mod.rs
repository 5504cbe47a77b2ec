//! virtio-blk, read-only: an image (e.g. a container image's erofs or ext4
//! rootfs) given to the guest as a disk. Reads are served from the image file
//! with `pread`; writes are refused; the guest sees a read-only disk. A disk
//! may be an empty slot (capacity 0) that an image is put in while the guest
//! runs (virtio-mmio has no hotplug; the guest sees the capacity change).
//!
//! `device.rs` is the model and its request handling, `persist.rs` its saved
//! state. It shares the one-queue I/O loop of [`super::single_queue_loop`].

mod device;
mod persist;

pub use device::{Block, BlockError, IMAGE_SERIAL, slot_serial};
pub use persist::{BlockArgs, BlockState};

/// virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Feature bit: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Largest data transfer of one request the device serves.
pub const MAX_REQUEST: u64 = 4 << 20;

/// Fuzzing entry (feature `fuzzing`): the device's request handling over
/// `image` (`sectors` long, opened read-only as a VM's image is).
#[cfg(feature = "fuzzing")]
pub fn fuzz_requests(
    mem: &crate::vstate::memory::GuestMemoryMmap,
    queue: &mut virtio_queue::Queue,
    image: &std::fs::File,
    sectors: u64,
) -> bool {
    let backing = device::Backing {
        path: "fuzz".into(),
        file: image.try_clone().ok(),
        capacity: sectors,
    };
    device::process_requests(mem, queue, &backing, "fuzz-serial", &mut Vec::new())
}

//! virtio devices over the virtio-mmio transport.
//!
//! Each device is a folder: `device.rs` (the model and its [`VirtioDevice`]
//! impl), `event_handler.rs` (its I/O thread), `mod.rs` (errors and constants).
//! Devices are userspace only (no vhost): their state is guest memory plus small
//! structs, which is what lets a VM be snapshotted and forked.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vsock;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemoryMmap;

pub use mmio::MmioTransport;
pub use persist::{DeviceState, MmioState};
pub use worker::{QueueWorker, Worker};

/// Feature bit: the device conforms to virtio 1.x.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Interrupt status bit: a used buffer was added to a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// Interrupt status bit: the configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("expected {expected} queues, driver set up {got}")]
    QueueCount {
        /// The device's queue count.
        expected: usize,
        /// What the driver configured.
        got: usize,
    },
    /// The device's I/O thread or its fds could not be created.
    #[error("cannot start the device's I/O thread")]
    Worker(#[source] std::io::Error),
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct ActivateArgs {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, as the driver configured them.
    pub queues: Vec<Queue>,
    /// One eventfd per queue, written when the driver notifies it.
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// The virtio device id (e.g. 4 for entropy, 19 for vsock).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver.
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted.
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving the queues.
    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError>;
    /// Stops serving the queues; the device can be activated again.
    fn reset(&mut self);
    /// Stops serving the queues and gives them back as they are now (`None` if
    /// the device was not active), so that they can be saved. The device is then
    /// only saved or dropped.
    fn quiesce(&mut self) -> Option<Vec<Queue>>;
    /// The device's own state, for a snapshot.
    fn state(&self) -> DeviceState;
    /// The device as a disk, if it is one (to put an image in a slot).
    fn as_block(&mut self) -> Option<&mut block::Block> {
        None
    }
    /// The device as a shared file system, if it is one (to add a share).
    fn as_fs(&mut self) -> Option<&mut fs::Fs> {
        None
    }
}

/// Reads `data.len()` bytes of a configuration space `config` at `offset`;
/// bytes past its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    if let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

impl ActivateArgs {
    /// The parts of a one-queue device's activation: memory, its queue, the
    /// queue's eventfd and the interrupt.
    pub fn single_queue(
        self,
    ) -> Result<(GuestMemoryMmap, Queue, EventFd, Arc<Interrupt>), ActivateError> {
        let ActivateArgs {
            mem,
            mut queues,
            mut queue_evts,
            interrupt,
        } = self;
        if queues.len() != 1 || queue_evts.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        Ok((mem, queues.remove(0), queue_evts.remove(0), interrupt))
    }
}

/// Whether the driver wants an interrupt for buffers just used on `queue`:
/// not while it has suppressed them (`VRING_AVAIL_F_NO_INTERRUPT`, e.g.
/// while it polls). An interrupt is a guest kernel entry, costly on every
/// KVM and the most where the guest kernel is emulated.
pub fn driver_wants_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    virtio_queue::QueueT::needs_notification(queue, mem).unwrap_or(true)
}

/// A device's interrupt: the status register the driver reads and an irqfd.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Tells the driver a queue has used buffers.
    pub fn signal_used_queue(&self) {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        // An irqfd write fails only if its counter would overflow: the interrupt is pending anyway.
        let _ = self.irqfd.write(1);
    }

    /// Tells the driver the configuration space changed (e.g. the link status).
    pub fn signal_config(&self) {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_CONFIG, Ordering::SeqCst);
        let _ = self.irqfd.write(1);
    }

    /// Raises the interrupt line again if status bits are pending (after a
    /// restore: an edge may have been in flight when the snapshot was taken; a
    /// spurious interrupt is harmless, the driver reads the status first).
    pub fn resignal_pending(&self) {
        if self.status() != 0 {
            let _ = self.irqfd.write(1);
        }
    }

    /// Sets the status bits (restore).
    pub(crate) fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// The current status bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

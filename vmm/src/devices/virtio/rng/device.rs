//! The entropy device model.

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::{MAX_REQUEST, QUEUE_SIZE, VIRTIO_ID_RNG};
use crate::devices::virtio::{ActivateArgs, ActivateError, QueueWorker, VirtioDevice};
use crate::vstate::memory::GuestMemoryMmap;

/// A virtio-rng device.
#[derive(Debug, Default)]
pub struct Rng {
    pub(super) acked_features: u64,
    worker: QueueWorker,
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> Self {
        Rng::default()
    }
}

/// Fills every available buffer of `queue` with random bytes. Returns whether any
/// buffer was used (so the caller raises the interrupt).
pub(super) fn fill_requests(mem: &GuestMemoryMmap, queue: &mut Queue) -> bool {
    let mut used = false;
    while let Some(chain) = queue.iter(mem).ok().and_then(|mut it| it.next()) {
        let head = chain.head_index();
        let written = match chain.writer(mem) {
            Ok(mut writer) => {
                let len = writer.available_bytes().min(MAX_REQUEST);
                let mut buf = vec![0u8; len];
                match getrandom(&mut buf) {
                    Ok(()) => std::io::Write::write(&mut writer, &buf).unwrap_or(0),
                    Err(e) => {
                        tracing::warn!(error = %e, "getrandom failed");
                        0
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "malformed rng request");
                0
            }
        };
        if queue.add_used(mem, head, written as u32).is_err() {
            break;
        }
        used = true;
    }
    used
}

/// Fills `buf` from the host's CSPRNG (`getrandom(2)`, retried on EINTR).
pub fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled part of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        0
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
        self.worker.start("rng", args, fill_requests)
    }

    fn reset(&mut self) {
        self.worker.stop();
    }

    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        self.worker.quiesce()
    }

    fn state(&self) -> crate::devices::virtio::DeviceState {
        crate::devices::virtio::DeviceState::Rng(crate::persist::Persist::save(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{NEXT, TestQueue, WRITE, test_memory};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn fills_writable_buffers() {
        let mem = test_memory();
        let mut tq = TestQueue::new(0x10000, 16);
        tq.desc(&mem, 0, 0x40000, 32, WRITE | NEXT, 1);
        tq.desc(&mem, 1, 0x50000, 32, WRITE, 0);
        tq.publish(&mem, 0);
        let mut q = tq.queue();
        assert!(fill_requests(&mem, &mut q));
        assert_eq!(tq.used_idx(&mem), 1);
        assert_eq!(tq.used_elem(&mem, 0), (0, 64));
        let mut a = [0u8; 32];
        mem.read_slice(&mut a, GuestAddress(0x40000)).unwrap();
        assert_ne!(a, [0u8; 32]);
    }

    #[test]
    fn malformed_requests_are_returned_empty() {
        let mem = test_memory();
        let mut tq = TestQueue::new(0x10000, 16);
        // Out of guest memory.
        tq.desc(&mem, 0, 0xffff_0000, 4096, WRITE, 0);
        tq.publish(&mem, 0);
        // A loop: 1 -> 2 -> 1.
        tq.desc(&mem, 1, 0x40000, 8, WRITE | NEXT, 2);
        tq.desc(&mem, 2, 0x40008, 8, WRITE | NEXT, 1);
        tq.publish(&mem, 1);
        // Read-only buffer: nothing to fill.
        tq.desc(&mem, 3, 0x40000, 8, 0, 0);
        tq.publish(&mem, 3);
        // Head index beyond the table.
        tq.publish(&mem, 200);
        let mut q = tq.queue();
        fill_requests(&mem, &mut q);
        assert_eq!(tq.used_elem(&mem, 0), (0, 0));
        assert_eq!(tq.used_elem(&mem, 2), (3, 0));
        assert!(tq.used_idx(&mem) >= 3);
    }
}

//! The virtio-fs device model: two queues (0: high priority, FORGET and
//! INTERRUPT; 1: requests), one request queue announced in its config.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::server::{FsServer, MAX_MESSAGE, ServerError};
use super::{QUEUE_SIZE, TAG_LEN, VIRTIO_ID_FS};
use crate::devices::virtio::{
    ActivateArgs, ActivateError, QueueWorker, VirtioDevice, read_config_bytes,
};
use crate::vstate::memory::GuestMemoryMmap;

/// The share a device serves (none until attached).
type Share = Arc<Mutex<Option<FsServer>>>;

/// A device that cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty or too long.
    #[error("a virtio-fs tag has 1 to {TAG_LEN} bytes, not {0}")]
    Tag(usize),
}

/// A virtio-fs device.
#[derive(Debug)]
pub struct Fs {
    pub(super) tag: String,
    pub(super) acked_features: u64,
    share: Share,
    hiprio: QueueWorker,
    requests: QueueWorker,
}

impl Fs {
    /// A new device with no share, mounted by `tag` (at most 36 bytes).
    pub fn new(tag: &str) -> Result<Fs, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag(tag.len()));
        }
        Ok(Fs {
            tag: tag.into(),
            acked_features: 0,
            share: Share::default(),
            hiprio: QueueWorker::default(),
            requests: QueueWorker::default(),
        })
    }

    /// Serves `server`'s directory from now on (replacing any before).
    pub fn attach(&self, server: FsServer) {
        *self.share.lock().expect("share lock") = Some(server);
    }

    /// Serves nothing from now on (requests get ENODEV).
    pub fn detach(&self) {
        self.share.lock().expect("share lock").take();
    }

    /// Serves `dir` as share `name` from now on, attaching a server with no
    /// other share first if there is none (a fork's first share).
    pub fn add_share(&self, name: &str, dir: &Path, read_only: bool) -> Result<(), ServerError> {
        let mut share = self.share.lock().expect("share lock");
        let server = match share.as_mut() {
            Some(server) => server,
            None => share.insert(FsServer::new()?),
        };
        server.add(name, dir, read_only)
    }
}

/// Answers every available request of `queue` from `share`. Returns whether
/// any buffer was used.
pub(super) fn serve_requests(mem: &GuestMemoryMmap, queue: &mut Queue, share: &Share) -> bool {
    let mut used = false;
    while let Some(chain) = queue.iter(mem).ok().and_then(|mut it| it.next()) {
        let head = chain.head_index();
        let written = answer(mem, chain, share);
        if queue.add_used(mem, head, written as u32).is_err() {
            break;
        }
        used = true;
    }
    used
}

/// One request: its readable part is the FUSE request, its writable part
/// takes the reply. Returns the bytes written (0 for a malformed chain or a
/// request without a reply).
fn answer<M>(mem: &GuestMemoryMmap, chain: virtio_queue::DescriptorChain<M>, share: &Share) -> usize
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    let (Ok(reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem)) else {
        return 0;
    };
    let mut request = Vec::new();
    if reader
        .take(MAX_MESSAGE as u64)
        .read_to_end(&mut request)
        .is_err()
    {
        return 0;
    }
    let reply = match share.lock().expect("share lock").as_mut() {
        Some(server) => server.handle(&mut request),
        None => super::server::refuse(&request, libc::ENODEV),
    };
    if reply.len() > writer.available_bytes() {
        // The driver's buffer is too small for the reply: say so instead.
        let refused = super::server::refuse(&request, libc::EIO);
        return writer.write(&refused).unwrap_or(0);
    }
    writer.write(&reply).unwrap_or(0)
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        0
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config: tag[36], num_request_queues (le32).
        let mut config = [0u8; TAG_LEN + 4];
        config[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
        let ActivateArgs {
            mem,
            mut queues,
            mut queue_evts,
            interrupt,
        } = args;
        if queues.len() != 2 || queue_evts.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        let one = |queue: Queue, evt| ActivateArgs {
            mem: mem.clone(),
            queues: vec![queue],
            queue_evts: vec![evt],
            interrupt: interrupt.clone(),
        };
        let (requests, requests_evt) = (queues.remove(1), queue_evts.remove(1));
        let (hiprio, hiprio_evt) = (queues.remove(0), queue_evts.remove(0));
        let share = self.share.clone();
        self.hiprio
            .start("fs-hiprio", one(hiprio, hiprio_evt), move |m, q| {
                serve_requests(m, q, &share)
            })?;
        let share = self.share.clone();
        self.requests
            .start("fs", one(requests, requests_evt), move |m, q| {
                serve_requests(m, q, &share)
            })
    }

    fn reset(&mut self) {
        self.hiprio.stop();
        self.requests.stop();
    }

    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        let mut queues = self.hiprio.quiesce()?;
        queues.extend(self.requests.quiesce()?);
        Some(queues)
    }

    fn state(&self) -> crate::devices::virtio::DeviceState {
        crate::devices::virtio::DeviceState::Fs(crate::persist::Persist::save(self))
    }

    fn as_fs(&mut self) -> Option<&mut Fs> {
        Some(self)
    }
}

#[cfg(test)]
mod tests;

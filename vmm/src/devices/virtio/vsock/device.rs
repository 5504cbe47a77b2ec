//! The vsock device model: configuration space (the guest's CID) and the host listener.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use super::{QUEUE_SIZE, VIRTIO_ID_VSOCK, VsockBackend};
use crate::devices::virtio::{ActivateArgs, ActivateError, VirtioDevice, Worker};

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved (0, 1, 2 and u32::MAX are not guest CIDs).
    #[error("invalid guest CID {0}")]
    InvalidCid(u64),
    /// Something already exists at the socket path.
    #[error("vsock socket {0} already exists")]
    PathExists(PathBuf),
    /// The socket could not be bound.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A virtio-vsock device whose host side is a Unix socket.
#[derive(Debug)]
pub struct Vsock {
    pub(super) cid: u64,
    pub(super) uds_path: PathBuf,
    listener: Option<UnixListener>,
    worker: Option<Worker<Option<VsockBackend>>>,
    pub(super) acked_features: u64,
    /// Send the guest a transport reset when activated (set on restore).
    pub(super) reset_on_activate: bool,
}

impl Vsock {
    /// Creates the device and starts listening at `uds_path` (removed again on drop).
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if cid <= 2 || cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(cid));
        }
        if uds_path.symlink_metadata().is_ok() {
            return Err(VsockError::PathExists(uds_path.into()));
        }
        // Whoever reaches this socket talks to the guest's agent: the
        // owner's alone, whatever the umask made of it.
        let listener = UnixListener::bind(uds_path)
            .and_then(|l| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(uds_path, std::fs::Permissions::from_mode(0o600))
                    .map(|()| l)
            })
            .map_err(|source| VsockError::Bind {
                path: uds_path.into(),
                source,
            })?;
        Ok(Vsock {
            cid,
            uds_path: uds_path.into(),
            listener: Some(listener),
            worker: None,
            acked_features: 0,
            reset_on_activate: false,
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Where host clients connect.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.reset();
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn avail_features(&self) -> u64 {
        0
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Configuration space: le64 guest_cid.
        crate::devices::virtio::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
        if args.queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: args.queues.len(),
            });
        }
        let Some(listener) = self.listener.take() else {
            return Err(ActivateError::Worker(std::io::Error::other(
                "vsock listener already in use",
            )));
        };
        let backend = VsockBackend::new(
            self.cid,
            self.uds_path.clone(),
            listener,
            args.mem,
            args.queues,
            args.interrupt,
        )
        .map_err(ActivateError::Worker)?;
        let reset = std::mem::take(&mut self.reset_on_activate);
        let worker = Worker::spawn("zygote-vsock", move |kill| {
            super::event_handler::run(backend, args.queue_evts, kill, reset)
        })
        .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            // Connections end with the backend; the listener is kept for the next activation.
            self.listener = worker.stop().flatten().map(VsockBackend::into_listener);
        }
    }

    fn quiesce(&mut self) -> Option<Vec<virtio_queue::Queue>> {
        let (listener, queues) = self.worker.take()?.stop().flatten()?.into_parts();
        self.listener = Some(listener);
        Some(queues)
    }

    fn state(&self) -> crate::devices::virtio::DeviceState {
        crate::devices::virtio::DeviceState::Vsock(crate::persist::Persist::save(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_holds_the_cid() {
        let dir = std::env::temp_dir().join(format!("zygote-vsock-dev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let dev = Vsock::new(0x1234_5678, &path).unwrap();
        let mut lo = [0u8; 4];
        dev.read_config(0, &mut lo);
        assert_eq!(u32::from_le_bytes(lo), 0x1234_5678);
        let mut past = [0xffu8; 4];
        dev.read_config(8, &mut past);
        assert_eq!(past, [0; 4]);
        assert!(matches!(
            Vsock::new(5, &path),
            Err(VsockError::PathExists(_))
        ));
        drop(dev);
        assert!(!path.exists(), "the socket is removed with the device");
        assert!(matches!(
            Vsock::new(2, &path),
            Err(VsockError::InvalidCid(2))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

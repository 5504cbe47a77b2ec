//! Saved state of the virtio-mmio transport and of the device behind it.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::block::{Block, BlockArgs, BlockError, BlockState};
use super::fs::{Fs, FsError, FsState};
use super::mmio::MmioTransport;
use super::net::{Net, NetArgs, NetState, Tap};
use super::rng::{Rng, RngState};
use super::vsock::{Vsock, VsockArgs, VsockError, VsockState};
use super::{Interrupt, VirtioDevice};
use crate::persist::Persist;
use crate::vstate::memory::GuestMemoryMmap;

/// One virtqueue as the driver configured it and the device left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver finished setting it up.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device reads.
    pub next_avail: u16,
    /// Next used-ring entry the device writes.
    pub next_used: u16,
    /// `VIRTIO_F_EVENT_IDX` negotiated.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

/// The state of whichever device sits behind a transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// virtio-rng.
    Rng(RngState),
    /// virtio-vsock.
    Vsock(VsockState),
    /// virtio-blk (read-only image).
    Block(BlockState),
    /// virtio-net.
    Net(NetState),
    /// virtio-fs (no share: one is attached after a restore).
    Fs(FsState),
    /// A test device (unit tests only).
    #[cfg(test)]
    Test,
}

/// What a restored device needs from the new VM.
#[derive(Debug, Default)]
pub struct DeviceArgs {
    /// Where the vsock device listens for host clients.
    pub vsock_path: Option<PathBuf>,
    /// The disk images, in the order of the snapshot's block devices.
    pub disks: Vec<PathBuf>,
    /// The NIC's tap (none: its link is down).
    pub tap: Option<Tap>,
}

impl DeviceArgs {
    /// The arguments for one device: the paths, and for a NIC the tap
    /// (moved: a machine has one NIC).
    pub fn for_device(&mut self, device: &DeviceState) -> DeviceArgs {
        DeviceArgs {
            vsock_path: self.vsock_path.clone(),
            disks: self.disks.clone(),
            tap: match device {
                DeviceState::Net(_) => self.tap.take(),
                _ => None,
            },
        }
    }
}

/// Errors restoring a transport and its device.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The saved queue is not one the device can serve.
    #[error("saved virtqueue {index} is invalid")]
    InvalidQueue {
        /// Queue index.
        index: usize,
    },
    /// The device has a different number of queues than saved.
    #[error("saved device has {saved} queues, the device {actual}")]
    QueueCount {
        /// In the snapshot.
        saved: usize,
        /// The device's.
        actual: usize,
    },
    /// The vsock device could not be created.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// A disk image could not be attached.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A file system device could not be made.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The snapshot has more block devices than images were given.
    #[error("the snapshot has a disk #{0} but no image was given for it")]
    NoDisk(usize),
    /// The snapshot has a vsock device but no socket path was given.
    #[error("the snapshot has a vsock device: a socket path is needed")]
    NoVsockPath,
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    Eventfd(#[source] std::io::Error),
    /// The device could not be started again.
    #[error("cannot reactivate the device")]
    Activate(#[source] super::ActivateError),
    /// A test device cannot be restored.
    #[cfg(test)]
    #[error("test device")]
    Test,
}

impl DeviceState {
    /// Rebuilds the device; `disk` is the index of this device among the block devices.
    pub fn restore(
        &self,
        args: DeviceArgs,
        disk: usize,
    ) -> Result<Box<dyn VirtioDevice>, RestoreError> {
        Ok(match self {
            DeviceState::Rng(state) => Box::new(Rng::restore((), state).expect("infallible")),
            DeviceState::Vsock(state) => {
                let uds_path = args.vsock_path.ok_or(RestoreError::NoVsockPath)?;
                Box::new(Vsock::restore(VsockArgs { uds_path }, state)?)
            }
            DeviceState::Block(state) if state.is_slot() => Box::new(Block::restore_slot(state)?),
            DeviceState::Block(state) => {
                let path = args.disks.get(disk).ok_or(RestoreError::NoDisk(disk))?;
                Box::new(Block::restore(BlockArgs { path: path.clone() }, state)?)
            }
            DeviceState::Net(state) => {
                Box::new(Net::restore(NetArgs { tap: args.tap }, state).expect("infallible"))
            }
            DeviceState::Fs(state) => Box::new(Fs::restore((), state)?),
            #[cfg(test)]
            DeviceState::Test => return Err(RestoreError::Test),
        })
    }
}

/// The transport's registers, its queues and its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// The device.
    pub device: DeviceState,
    /// Its queues.
    pub queues: Vec<QueueSnapshot>,
    /// QueueSel.
    pub queue_select: u32,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Device status.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Interrupt status bits.
    pub interrupt_status: u32,
    /// The device was serving its queues.
    pub activated: bool,
}

/// What a restored transport needs.
#[derive(Debug)]
pub struct MmioArgs {
    /// The device's own arguments.
    pub device: DeviceArgs,
    /// Index of this device among the block devices (which image it gets).
    pub disk: usize,
    /// Guest memory of the new VM.
    pub mem: GuestMemoryMmap,
    /// The interrupt line.
    pub irqfd: EventFd,
}

impl Persist for MmioTransport {
    type State = MmioState;
    type ConstructorArgs = MmioArgs;
    type Error = RestoreError;

    fn save(&self) -> MmioState {
        MmioState {
            device: self.device.state(),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
        }
    }

    fn restore(args: MmioArgs, state: &MmioState) -> Result<Self, RestoreError> {
        let device = state.device.restore(args.device, args.disk)?;
        let actual = device.queue_max_sizes().len();
        if actual != state.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: state.queues.len(),
                actual,
            });
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                Queue::try_from(QueueState::from(*q))
                    .map_err(|_| RestoreError::InvalidQueue { index })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(RestoreError::Eventfd)?;
        let interrupt = Arc::new(Interrupt::new(args.irqfd));
        interrupt.set_status(state.interrupt_status);
        let mut transport = MmioTransport {
            device,
            mem: args.mem,
            interrupt,
            queues,
            queue_evts,
            queue_select: state.queue_select,
            device_features_select: state.device_features_select,
            driver_features_select: state.driver_features_select,
            driver_features: state.driver_features,
            status: state.status,
            config_generation: state.config_generation,
            activated: false,
            warnings: Default::default(),
        };
        if state.activated {
            if let Some(index) = transport
                .queues
                .iter()
                .position(|q| !q.is_valid(&transport.mem))
            {
                return Err(RestoreError::InvalidQueue { index });
            }
            transport.try_activate().map_err(RestoreError::Activate)?;
        }
        transport.interrupt.resignal_pending();
        Ok(transport)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::tests::{Probe, bring_up};
    use crate::vstate::memory::GuestRam;

    #[test]
    fn transport_round_trip_keeps_registers_and_queues() {
        let ram = GuestRam::new(16, false).unwrap();
        let mem = ram.memory.clone();
        let dir = std::env::temp_dir().join(format!("zygote-mmio-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // An active rng device: the transport is driven as a guest driver would.
        let mut t = MmioTransport::new(
            Box::new(Rng::new()),
            mem.clone(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        )
        .unwrap();
        bring_up(&mut t, 1);
        assert!(t.activated);
        t.pause();
        let saved = t.save();
        let bytes = postcard::to_stdvec(&saved).unwrap();
        let decoded: MmioState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, saved);
        let args = MmioArgs {
            device: DeviceArgs::default(),
            disk: 0,
            mem: mem.clone(),
            irqfd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        let mut restored = MmioTransport::restore(args, &decoded).unwrap();
        assert!(restored.activated, "an active device is active again");
        restored.pause();
        assert_eq!(restored.save(), saved);

        // A vsock device needs its socket path, and gets it.
        let vsock = Vsock::new(7, &dir.join("a.sock")).unwrap();
        let t = MmioTransport::new(
            Box::new(vsock),
            mem.clone(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        )
        .unwrap();
        let saved = t.save();
        let args = |path: Option<PathBuf>| MmioArgs {
            device: DeviceArgs {
                vsock_path: path,
                ..Default::default()
            },
            disk: 0,
            mem: mem.clone(),
            irqfd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        assert!(matches!(
            MmioTransport::restore(args(None), &saved),
            Err(RestoreError::NoVsockPath)
        ));
        let restored = MmioTransport::restore(args(Some(dir.join("b.sock"))), &saved).unwrap();
        assert_eq!(restored.save(), saved);
        assert!(dir.join("b.sock").exists());
        drop((t, restored));
        std::fs::remove_dir_all(&dir).unwrap();

        // A test device's state cannot be restored, and says so.
        let t = MmioTransport::new(
            Box::new(Probe::default()),
            mem,
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        )
        .unwrap();
        let state = t.save();
        assert!(matches!(
            MmioTransport::restore(
                MmioArgs {
                    device: DeviceArgs::default(),
                    disk: 0,
                    mem: ram.memory.clone(),
                    irqfd: EventFd::new(libc::EFD_NONBLOCK).unwrap()
                },
                &state
            ),
            Err(RestoreError::Test)
        ));
    }
}

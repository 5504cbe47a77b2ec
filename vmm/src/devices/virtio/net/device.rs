//! The virtio-net device model: features, configuration space (MAC, link
//! status, MTU) and the tap it is attached to, if any.

use virtio_queue::Queue;

use super::event_handler::NetIo;
use super::{DEFAULT_MTU, QUEUE_SIZE, Tap, VIRTIO_ID_NET, VIRTIO_NET_S_LINK_UP, features};
use crate::devices::virtio::{ActivateArgs, ActivateError, VirtioDevice, Worker};

/// What the guest sees of the NIC at probe: its MAC and MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// The MAC address the guest driver reads at probe (the guest agent sets
    /// each fork's own afterwards).
    pub mac: [u8; 6],
    /// The largest MTU the guest may use.
    pub mtu: u16,
}

impl Default for NetConfig {
    /// A locally administered MAC (every template has the same; forks get their own).
    fn default() -> Self {
        NetConfig {
            mac: [0x02, 0x5a, 0x79, 0x00, 0x00, 0x01],
            mtu: DEFAULT_MTU,
        }
    }
}

/// A virtio-net device, with a tap (link up) or without (link down).
#[derive(Debug)]
pub struct Net {
    pub(super) config: NetConfig,
    pub(super) acked_features: u64,
    tap: Option<Tap>,
    worker: Option<Worker<Option<Vec<Queue>>>>,
    /// Tell the guest its link status changed once activated (a fork given a
    /// tap where its template had none).
    pub(super) announce_link: bool,
}

impl Net {
    /// A NIC on `tap`, or one whose link is down.
    pub fn new(config: NetConfig, tap: Option<Tap>) -> Self {
        Net {
            config,
            acked_features: 0,
            tap,
            worker: None,
            announce_link: false,
        }
    }

    /// Whether the link is up (a tap is attached).
    pub fn link_up(&self) -> bool {
        self.tap.is_some()
    }

    fn config_space(&self) -> [u8; 12] {
        let status = if self.link_up() {
            VIRTIO_NET_S_LINK_UP
        } else {
            0
        };
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.config.mac);
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.config.mtu.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn avail_features(&self) -> u64 {
        use features::*;
        CSUM | GUEST_CSUM
            | MTU
            | MAC
            | GUEST_TSO4
            | GUEST_TSO6
            | GUEST_ECN
            | GUEST_UFO
            | HOST_TSO4
            | HOST_TSO6
            | HOST_ECN
            | HOST_UFO
            | MRG_RXBUF
            | STATUS
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & (self.avail_features() | super::super::VIRTIO_F_VERSION_1);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&self.config_space(), offset, data);
    }

    /// The configuration space is read-only for a virtio 1.x driver.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
        if args.queues.len() != 2 || args.queue_evts.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: args.queues.len(),
            });
        }
        let tap = match &self.tap {
            Some(tap) => {
                tap.set_offloads(self.acked_features)
                    .map_err(|e| ActivateError::Worker(std::io::Error::other(e)))?;
                Some(tap.try_clone().map_err(ActivateError::Worker)?)
            }
            None => None,
        };
        let interrupt = args.interrupt.clone();
        let io = NetIo::new(
            args.mem,
            args.queues,
            args.interrupt,
            tap,
            self.acked_features,
        );
        let evts = args.queue_evts;
        let worker = Worker::spawn("zygote-net", move |kill| io.run(evts, kill))
            .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        if std::mem::take(&mut self.announce_link) {
            interrupt.signal_config();
        }
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }

    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        self.worker.take()?.stop().flatten()
    }

    fn state(&self) -> crate::devices::virtio::DeviceState {
        crate::devices::virtio::DeviceState::Net(crate::persist::Persist::save(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_has_mac_status_and_mtu() {
        let dev = Net::new(
            NetConfig {
                mac: [2, 1, 2, 3, 4, 5],
                mtu: 1450,
            },
            None,
        );
        let mut c = [0u8; 12];
        dev.read_config(0, &mut c);
        assert_eq!(&c[..6], &[2, 1, 2, 3, 4, 5]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 0, "no tap: link down");
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1, "one queue pair");
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1450);
        let mut status = [0u8; 2];
        dev.read_config(6, &mut status);
        assert_eq!(status, [0, 0]);
        let mut past = [0xffu8; 4];
        dev.read_config(12, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn only_offered_features_are_kept() {
        let mut dev = Net::new(NetConfig::default(), None);
        dev.set_acked_features(u64::MAX);
        assert_eq!(
            dev.acked_features,
            dev.avail_features() | crate::devices::virtio::VIRTIO_F_VERSION_1
        );
    }
}

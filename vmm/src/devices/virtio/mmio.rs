//! The virtio-mmio transport (virtio 1.x, "version 2" register layout).

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateArgs, Interrupt, VirtioDevice};
use crate::devices::bus::BusDevice;
use crate::vstate::memory::GuestMemoryMmap;

const MMIO_MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5a59_474f; // "ZYGO"

const DEVICE_STATUS_ACKNOWLEDGE: u32 = 0x1;
const DEVICE_STATUS_DRIVER: u32 = 0x2;
const DEVICE_STATUS_DRIVER_OK: u32 = 0x4;
const DEVICE_STATUS_FEATURES_OK: u32 = 0x8;
const DEVICE_STATUS_FAILED: u32 = 0x80;
const DEVICE_STATUS_NEEDS_RESET: u32 = 0x40;

/// Offset of the device-specific configuration space.
const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// virtio-mmio registers of one device, and the queues the driver configures.
#[derive(Debug)]
pub struct MmioTransport {
    pub(super) device: Box<dyn VirtioDevice>,
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) queues: Vec<Queue>,
    pub(super) queue_evts: Vec<EventFd>,
    pub(super) queue_select: u32,
    pub(super) device_features_select: u32,
    pub(super) driver_features_select: u32,
    pub(super) driver_features: u64,
    pub(super) status: u32,
    pub(super) config_generation: u32,
    pub(super) activated: bool,
    /// The warnings the guest's driver causes, rate-limited.
    pub(super) warnings: GuestWarnings,
}

/// Warnings a guest can cause over and over (a driver that resets and
/// activates a device in a loop): at most one per 10 s per device, the
/// ones held back counted in the next.
#[derive(Debug, Default)]
pub(super) struct GuestWarnings {
    last: Option<std::time::Instant>,
    held: u64,
}

impl GuestWarnings {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    /// `Some(held back since the last)` when a warning may be logged now.
    pub(super) fn admit(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::EVERY)
        {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

impl MmioTransport {
    /// Wraps `device`; its interrupt is raised through `irqfd`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irqfd: EventFd,
    ) -> std::io::Result<Self> {
        let queues = Self::fresh_queues(device.as_ref());
        let queue_evts = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queues,
            queue_evts,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            warnings: GuestWarnings::default(),
        })
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue sizes are powers of two"))
            .collect()
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device behind the transport, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device changed its configuration space: a new generation, and
    /// the driver is told.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config();
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn update_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        // The driver may only change a queue's set-up before DRIVER_OK.
        if self.status & DEVICE_STATUS_DRIVER_OK == 0 {
            if let Some(q) = self.selected_queue() {
                f(q);
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, status: u32) {
        if status == 0 {
            self.reset();
            return;
        }
        // Bits may only be added, in the order the spec gives.
        let new = status & !self.status;
        let ok = match new {
            DEVICE_STATUS_ACKNOWLEDGE => self.status == 0,
            DEVICE_STATUS_DRIVER => self.status == DEVICE_STATUS_ACKNOWLEDGE,
            DEVICE_STATUS_FEATURES_OK => {
                self.status == DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER
            }
            DEVICE_STATUS_DRIVER_OK => {
                self.status
                    == DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER | DEVICE_STATUS_FEATURES_OK
            }
            DEVICE_STATUS_FAILED => true,
            _ => false,
        };
        if !ok {
            tracing::debug!(status, current = self.status, "ignored virtio status write");
            return;
        }
        self.status = status;
        if new == DEVICE_STATUS_FEATURES_OK {
            self.device.set_acked_features(self.driver_features);
        }
        if new == DEVICE_STATUS_DRIVER_OK {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if !self.queues.iter().all(|q| q.is_valid(&self.mem)) {
            if let Some(held) = self.warnings.admit() {
                tracing::warn!(
                    device = self.device.device_type(),
                    held,
                    "driver set up an invalid queue"
                );
            }
            self.status |= DEVICE_STATUS_NEEDS_RESET;
            return;
        }
        if let Err(e) = self.try_activate() {
            if let Some(held) = self.warnings.admit() {
                tracing::error!(device = self.device.device_type(), error = %e, held, "device activation failed");
            }
            self.status |= DEVICE_STATUS_NEEDS_RESET;
        }
    }

    /// Hands the (valid) queues to the device.
    pub(super) fn try_activate(&mut self) -> Result<(), super::ActivateError> {
        let queue_evts = self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(super::ActivateError::Worker)?;
        let queues = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()).expect("a valid queue's state converts back"))
            .collect();
        self.device.activate(ActivateArgs {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            interrupt: self.interrupt.clone(),
        })?;
        self.activated = true;
        Ok(())
    }

    /// Stops the device and takes its queues back as they are now, for a
    /// snapshot. Afterwards the transport is only saved or dropped.
    pub fn pause(&mut self) {
        if self.activated {
            if let Some(queues) = self.device.quiesce() {
                self.queues = queues;
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MMIO_MAGIC_VALUE,
            0x04 => MMIO_VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let features = self.device.avail_features() | super::VIRTIO_F_VERSION_1;
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => {
                tracing::debug!(offset, "read of an unknown virtio-mmio register");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let lo = |q: &mut Queue, f: fn(&mut Queue, Option<u32>, Option<u32>)| f(q, Some(v), None);
        let hi = |q: &mut Queue, f: fn(&mut Queue, Option<u32>, Option<u32>)| f(q, None, Some(v));
        match offset {
            0x14 => self.device_features_select = v,
            0x20 => {
                if self.status & DEVICE_STATUS_FEATURES_OK == 0 {
                    match self.driver_features_select {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                }
            }
            0x24 => self.driver_features_select = v,
            0x30 => self.queue_select = v,
            0x38 => self.update_queue(|q| q.set_size(v as u16)),
            0x44 => self.update_queue(|q| q.set_ready(v == 1)),
            0x50 => {
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            0x64 => self.interrupt.ack(v),
            0x70 => self.set_status(v),
            0x80 => self.update_queue(|q| lo(q, Queue::set_desc_table_address)),
            0x84 => self.update_queue(|q| hi(q, Queue::set_desc_table_address)),
            0x90 => self.update_queue(|q| lo(q, Queue::set_avail_ring_address)),
            0x94 => self.update_queue(|q| hi(q, Queue::set_avail_ring_address)),
            0xa0 => self.update_queue(|q| lo(q, Queue::set_used_ring_address)),
            0xa4 => self.update_queue(|q| hi(q, Queue::set_used_ring_address)),
            _ => tracing::debug!(offset, v, "write of an unknown virtio-mmio register"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            let v = self.read_reg(offset);
            data.copy_from_slice(&v.to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    #[test]
    fn a_guests_repeated_warnings_are_held_back_and_counted() {
        let mut w = GuestWarnings::default();
        assert_eq!(w.admit(), Some(0));
        for _ in 0..1000 {
            assert_eq!(w.admit(), None);
        }
        // Ten seconds later: one line, with the count held back.
        w.last = w
            .last
            .map(|t| t - GuestWarnings::EVERY - std::time::Duration::from_millis(1));
        assert_eq!(w.admit(), Some(1000));
        assert_eq!(w.admit(), None);
    }

    /// A device that records what the transport tells it.
    #[derive(Debug, Default)]
    pub struct Probe {
        pub acked: u64,
        pub activations: Arc<Mutex<Vec<usize>>>,
        pub resets: usize,
        pub config: [u8; 8],
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            1 << 3
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let start = (offset as usize).min(8);
            let end = (start + data.len()).min(8);
            data[..end - start].copy_from_slice(&self.config[start..end]);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, args: ActivateArgs) -> Result<(), super::super::ActivateError> {
            self.activations.lock().unwrap().push(args.queues.len());
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
        fn quiesce(&mut self) -> Option<Vec<Queue>> {
            None
        }
        fn state(&self) -> crate::devices::virtio::DeviceState {
            crate::devices::virtio::DeviceState::Test
        }
    }

    fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    pub fn transport_with(device: Box<dyn VirtioDevice>) -> (MmioTransport, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        (
            MmioTransport::new(device, mem.clone(), EventFd::new(0).unwrap()).unwrap(),
            mem,
        )
    }

    /// Drives the driver side of the handshake with queues at fixed addresses.
    pub fn bring_up(t: &mut MmioTransport, queues: u32) {
        write32(t, 0x70, DEVICE_STATUS_ACKNOWLEDGE);
        write32(t, 0x70, DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER);
        write32(t, 0x24, 1);
        write32(t, 0x20, 1); // VERSION_1
        write32(
            t,
            0x70,
            DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER | DEVICE_STATUS_FEATURES_OK,
        );
        for q in 0..queues {
            let base = 0x10000 * (q as u64 + 1);
            write32(t, 0x30, q);
            write32(t, 0x38, 16);
            write32(t, 0x80, base as u32);
            write32(t, 0x90, (base + 0x1000) as u32);
            write32(t, 0xa0, (base + 0x2000) as u32);
            write32(t, 0x44, 1);
        }
        write32(
            t,
            0x70,
            DEVICE_STATUS_ACKNOWLEDGE
                | DEVICE_STATUS_DRIVER
                | DEVICE_STATUS_FEATURES_OK
                | DEVICE_STATUS_DRIVER_OK,
        );
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport_with(Box::new(Probe::default()));
        assert_eq!(read32(&mut t, 0x0), MMIO_MAGIC_VALUE);
        assert_eq!(read32(&mut t, 0x4), 2);
        assert_eq!(read32(&mut t, 0x8), 42);
        write32(&mut t, 0x14, 1);
        assert_eq!(read32(&mut t, 0x10), 1, "VERSION_1 is offered");
        write32(&mut t, 0x30, 1);
        assert_eq!(read32(&mut t, 0x34), 16);
        write32(&mut t, 0x30, 7);
        assert_eq!(
            read32(&mut t, 0x34),
            0,
            "a queue that does not exist has size 0"
        );
        let mut odd = [0xffu8; 2];
        t.read(0x1, &mut odd);
        assert_eq!(odd, [0, 0], "unaligned register reads give zeros");
    }

    #[test]
    fn handshake_activates_and_reset_resets() {
        let activations = Arc::new(Mutex::new(Vec::new()));
        let probe = Probe {
            activations: activations.clone(),
            ..Default::default()
        };
        let (mut t, _) = transport_with(Box::new(probe));
        bring_up(&mut t, 2);
        assert_eq!(*activations.lock().unwrap(), vec![2]);
        assert_eq!(
            read32(&mut t, 0x70) & DEVICE_STATUS_DRIVER_OK,
            DEVICE_STATUS_DRIVER_OK
        );
        // Queue set-up is frozen after DRIVER_OK.
        write32(&mut t, 0x30, 0);
        write32(&mut t, 0x44, 0);
        assert_eq!(read32(&mut t, 0x44), 1);
        write32(&mut t, 0x70, 0);
        assert_eq!(read32(&mut t, 0x70), 0);
        assert_eq!(read32(&mut t, 0x44), 0);
    }

    #[test]
    fn out_of_order_status_and_bad_queues_do_not_activate() {
        let activations = Arc::new(Mutex::new(Vec::new()));
        let probe = Probe {
            activations: activations.clone(),
            ..Default::default()
        };
        let (mut t, _) = transport_with(Box::new(probe));
        write32(&mut t, 0x70, DEVICE_STATUS_DRIVER_OK);
        assert_eq!(read32(&mut t, 0x70), 0);
        // Queues never set up: DRIVER_OK must not activate the device.
        write32(&mut t, 0x70, DEVICE_STATUS_ACKNOWLEDGE);
        write32(
            &mut t,
            0x70,
            DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER,
        );
        write32(
            &mut t,
            0x70,
            DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER | DEVICE_STATUS_FEATURES_OK,
        );
        write32(&mut t, 0x30, 0);
        write32(&mut t, 0x80, 0xffff_f000); // outside guest memory
        write32(&mut t, 0x44, 1);
        write32(
            &mut t,
            0x70,
            DEVICE_STATUS_ACKNOWLEDGE
                | DEVICE_STATUS_DRIVER
                | DEVICE_STATUS_FEATURES_OK
                | DEVICE_STATUS_DRIVER_OK,
        );
        assert!(activations.lock().unwrap().is_empty());
        assert_ne!(read32(&mut t, 0x70) & DEVICE_STATUS_NEEDS_RESET, 0);
    }
}

//! Emulated devices: the I/O bus, legacy PC devices and virtio-mmio devices.

pub mod bus;
pub mod legacy;
pub mod virtio;

//! Devices: the I/O and MMIO buses, legacy devices (serial, power) and virtio devices.

pub mod bus;
pub mod legacy;
pub mod virtio;

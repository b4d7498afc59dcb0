//! The screen: carrel-gpu's virtio-gpu 2D device model behind Carrel's virtio transport.
//! The device model (commands, zero-copy scanout view, frame clock, encoders) lives in the
//! `carrel-gpu` crate so it can also run out of process; `device` only hands it its queues
//! and raises its interrupt, `persist` holds what a snapshot keeps.

mod device;
mod persist;

pub use device::GpuDevice;
pub use persist::GpuDeviceState;

//! Virtio 1.x devices and their MMIO transport.
//!
//! A device implements [`VirtioDevice`]; the [`mmio::MmioTransport`] owns the register
//! file, feature negotiation and queue set-up, and activates the device when the driver
//! sets DRIVER_OK. Queue notifications arrive as ioeventfds on the event loop thread and
//! interrupts leave as irqfds: no exit to the VMM on the hot path.

pub mod block;
pub mod gpu;
pub mod input;
pub mod mmio;
pub mod persist;
pub mod rng;
pub mod vhost_user_gpu;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use crate::memory::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// VIRTIO_F_VERSION_1: every Carrel device is a modern device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: a used ring was updated.
pub const INTERRUPT_USED_RING: u32 = 1 << 0;
/// Interrupt status bit: the configuration changed.
pub const INTERRUPT_CONFIG: u32 = 1 << 1;

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {got} queues, the device needs {needed}")]
    QueueCount { needed: usize, got: usize },
    #[error("queue {index} is not valid in guest memory")]
    InvalidQueue { index: usize },
    #[error("the device's backend process refused to start: {0}")]
    Backend(String),
}

/// A device's interrupt line: the status register the driver reads plus the irqfd.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl VirtioInterrupt {
    pub fn new(irqfd: EventFd) -> VirtioInterrupt {
        VirtioInterrupt { status: AtomicU32::new(0), irqfd }
    }

    /// Sets `bits` in the interrupt status and raises the line.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        // A failed eventfd write means the counter is saturated: an interrupt is pending
        // already, which is all the driver needs.
        let _ = self.irqfd.write(1);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Whether a device runs: a type state instead of a cluster of `Option`s.
#[derive(Debug)]
pub enum DeviceState {
    Inactive,
    Active(ActiveState),
}

/// What an active device works with.
#[derive(Debug)]
pub struct ActiveState {
    pub memory: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: std::sync::Arc<VirtioInterrupt>,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// The virtio device id.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn device_features(&self) -> u64;
    /// Reads device configuration space at `offset`; out of range reads as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; ignored where read-only.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues and negotiated features.
    fn activate(&mut self, state: ActiveState, acked_features: u64) -> Result<(), ActivateError>;
    /// Returns the device to its power-on state.
    fn reset(&mut self);
    /// Handles a notification of queue `index`.
    fn process_queue(&mut self, index: usize);
    /// An fd (usually the device's own epoll) the event loop watches for the device's
    /// other event sources, such as host sockets.
    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Handles whatever made [`VirtioDevice::event_fd`] readable.
    fn process_events(&mut self) {}
    /// The queues the active device works on (their ring positions go into a snapshot);
    /// `None` while inactive.
    fn active_queues(&self) -> Option<&[Queue]>;
    /// The device's own state for a snapshot, as plain data.
    fn save(&self) -> Result<persist::VirtioDeviceState, persist::VirtioPersistError>;
    /// Loads saved state into this freshly built device, before the transport activates
    /// it again; the state is untrusted and checked.
    fn restore(&mut self, state: &persist::VirtioDeviceState) -> Result<(), persist::VirtioPersistError>;
    /// Called with the vCPUs paused, before [`VirtioDevice::save`]: finish the work in
    /// flight and put what the snapshot names into a state that stays (a disk freezes).
    fn prepare_snapshot(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Called once a restored device runs again: the place to tell the guest what did not
    /// survive the snapshot (vsock connections, for one).
    fn restored(&mut self) {}
}

impl DeviceState {
    /// The active queues, for [`VirtioDevice::active_queues`].
    pub fn queues(&self) -> Option<&[Queue]> {
        match self {
            DeviceState::Inactive => None,
            DeviceState::Active(active) => Some(&active.queues),
        }
    }
}

/// Copies the bytes of `config` at `offset` into `data`, zero past the end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = offset as usize;
    if let Some(available) = config.get(start..) {
        let count = available.len().min(data.len());
        data[..count].copy_from_slice(&available[..count]);
    }
}

//! The vsock device: config space (guest CID), three queues (rx, tx, event), and the
//! muxer's epoll as the device's own event source.

use std::os::fd::RawFd;
use std::path::PathBuf;

use carrel_firmware::virtio_id;

use super::handler::{post_transport_reset, process_rx_queue, process_tx_queue};
use super::muxer::Muxer;
use super::persist::VsockState;
use crate::devices::virtio::persist::{VirtioDeviceState, VirtioPersistError};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, ActiveState, DeviceState, VirtioDevice, INTERRUPT_USED_RING,
};

const QUEUE_SIZES: &[u16] = &[256, 256, 16];
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;

/// Where the device lives.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// The guest's CID (3 and up).
    pub guest_cid: u64,
    /// Host Unix socket for host-initiated connections; guest-initiated ones go to
    /// `<path>_<port>`.
    pub socket: PathBuf,
}

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved; use 3 or more")]
    ReservedCid(u64),
    #[error("cannot listen on vsock socket {path}: {source}")]
    Listen { path: String, source: std::io::Error },
}

/// The virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    config: VsockConfig,
    muxer: Muxer,
    state: DeviceState,
    /// A transport reset the guest has not been told of yet (no event buffer was posted).
    reset_pending: bool,
}

impl Vsock {
    pub fn new(config: VsockConfig) -> Result<Vsock, VsockError> {
        if config.guest_cid < 3 {
            return Err(VsockError::ReservedCid(config.guest_cid));
        }
        let muxer = Muxer::new(config.guest_cid, &config.socket)
            .map_err(|source| VsockError::Listen { path: config.socket.display().to_string(), source })?;
        Ok(Vsock { config, muxer, state: DeviceState::Inactive, reset_pending: false })
    }

    pub fn metrics(&self) -> std::sync::Arc<super::VsockMetrics> {
        self.muxer.metrics.clone()
    }

    /// Delivers what the muxer has for the guest, if the device runs.
    fn fill_rx(&mut self) {
        let DeviceState::Active(active) = &mut self.state else { return };
        let Some(queue) = active.queues.get_mut(RX_QUEUE) else { return };
        if process_rx_queue(queue, &active.memory, &mut self.muxer) {
            active.interrupt.signal(INTERRUPT_USED_RING);
        }
    }

    /// Tells the guest its connections are gone, once it has an event buffer for it.
    fn post_pending_reset(&mut self) {
        let DeviceState::Active(active) = &mut self.state else { return };
        if !self.reset_pending {
            return;
        }
        let Some(queue) = active.queues.get_mut(EVENT_QUEUE) else { return };
        if let Some(needs_interrupt) = post_transport_reset(queue, &active.memory) {
            self.reset_pending = false;
            if needs_interrupt {
                active.interrupt.signal(INTERRUPT_USED_RING);
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        virtio_id::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, state: ActiveState, _acked_features: u64) -> Result<(), ActivateError> {
        if state.queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount { needed: QUEUE_SIZES.len(), got: state.queues.len() });
        }
        self.state = DeviceState::Active(state);
        self.fill_rx();
        Ok(())
    }

    fn reset(&mut self) {
        self.state = DeviceState::Inactive;
        self.reset_pending = false;
    }

    fn process_queue(&mut self, index: usize) {
        if index == EVENT_QUEUE {
            return self.post_pending_reset();
        }
        if index == TX_QUEUE {
            let DeviceState::Active(active) = &mut self.state else { return };
            let Some(queue) = active.queues.get_mut(TX_QUEUE) else { return };
            if process_tx_queue(queue, &active.memory, &mut self.muxer) {
                active.interrupt.signal(INTERRUPT_USED_RING);
            }
        }
        // New RX buffers, or TX that produced replies: deliver what waits.
        self.fill_rx();
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_events(&mut self) {
        if self.muxer.process_host_events() {
            self.fill_rx();
        }
    }

    fn active_queues(&self) -> Option<&[virtio_queue::Queue]> {
        self.state.queues()
    }

    fn save(&self) -> Result<VirtioDeviceState, VirtioPersistError> {
        Ok(VirtioDeviceState::Vsock(VsockState { guest_cid: self.config.guest_cid }))
    }

    /// Connections do not survive a snapshot (their host ends are sockets of the old
    /// process); the guest CID may differ too: each restored VM has its own identity.
    fn restore(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioPersistError> {
        match state {
            VirtioDeviceState::Vsock(_) => Ok(()),
            other => Err(VirtioPersistError::WrongDevice { saved: other.kind().into(), built: "vsock" }),
        }
    }

    fn restored(&mut self) {
        self.reset_pending = true;
        self.post_pending_reset();
    }
}

//! The entropy device: one request queue, no configuration space, no features.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use carrel_firmware::virtio_id;

use super::handler::{process_request_queue, RequestOutcome};
use crate::devices::virtio::persist::{VirtioDeviceState, VirtioPersistError};
use crate::devices::virtio::{ActivateError, ActiveState, DeviceState, VirtioDevice, INTERRUPT_USED_RING};

const QUEUE_SIZES: &[u16] = &[256];

/// Counters a developer can read to see what the device did.
#[derive(Debug, Default)]
pub struct RngMetrics {
    pub bytes_served: AtomicU64,
    pub requests: AtomicU64,
    pub malformed_requests: AtomicU64,
}

/// The virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    state: DeviceState,
    pub metrics: Arc<RngMetrics>,
}

impl Rng {
    pub fn new() -> Rng {
        Rng { state: DeviceState::Inactive, metrics: Arc::new(RngMetrics::default()) }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

/// Fills `buffer` from the kernel's CSPRNG.
pub fn host_entropy(buffer: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buffer.len() {
        let rest = &mut buffer[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable slice.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if got < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += got as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        virtio_id::ENTROPY
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, state: ActiveState, _acked_features: u64) -> Result<(), ActivateError> {
        if state.queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount { needed: QUEUE_SIZES.len(), got: state.queues.len() });
        }
        self.state = DeviceState::Active(state);
        Ok(())
    }

    fn reset(&mut self) {
        self.state = DeviceState::Inactive;
    }

    fn process_queue(&mut self, index: usize) {
        let DeviceState::Active(active) = &mut self.state else {
            return;
        };
        let Some(queue) = active.queues.get_mut(index) else {
            return;
        };
        let RequestOutcome { completed, malformed, bytes, needs_interrupt } =
            process_request_queue(queue, &active.memory, &mut host_entropy);
        self.metrics.requests.fetch_add(completed, Ordering::Relaxed);
        self.metrics.malformed_requests.fetch_add(malformed, Ordering::Relaxed);
        self.metrics.bytes_served.fetch_add(bytes, Ordering::Relaxed);
        if needs_interrupt {
            active.interrupt.signal(INTERRUPT_USED_RING);
        }
    }

    fn active_queues(&self) -> Option<&[virtio_queue::Queue]> {
        self.state.queues()
    }

    /// The entropy device keeps nothing beyond its queues (the metrics start again).
    fn save(&self) -> Result<VirtioDeviceState, VirtioPersistError> {
        Ok(VirtioDeviceState::Rng)
    }

    fn restore(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioPersistError> {
        match state {
            VirtioDeviceState::Rng => Ok(()),
            other => Err(VirtioPersistError::WrongDevice { saved: other.kind().into(), built: "rng" }),
        }
    }
}

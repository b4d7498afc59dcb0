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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::{driver, MmioTransport};
    use crate::devices::virtio::persist::MmioState;
    use crate::devices::virtio::vsock::VsockState;
    use crate::memory::GuestMemoryMmap;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const QUEUE_SIZE: u16 = 16;
    const BUFFERS: u64 = 0x10_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn request(index: u16) -> RawDescriptor {
        let flags = VRING_DESC_F_WRITE as u16;
        RawDescriptor::from(SplitDescriptor::new(BUFFERS + u64::from(index) * 0x100, 32, flags, 0))
    }

    use crate::devices::virtio::mmio::driver::interrupt;

    #[test]
    fn snapshot_round_trips_into_a_fresh_rng_that_serves_only_new_requests() {
        let memory = memory();
        let mock = MockSplitQueue::create(&memory, GuestAddress(0), QUEUE_SIZE);
        let mut original = MmioTransport::new(Box::new(Rng::new()), memory.clone(), interrupt());
        driver::start(&mut original, std::slice::from_ref(&mock), QUEUE_SIZE);
        mock.add_desc_chains(&[request(0)], 0).unwrap();
        original.notify_queue(0);
        assert_eq!(mock.used().idx().load(), 1);

        let saved = original.save().unwrap();
        assert_eq!(saved.device, VirtioDeviceState::Rng);
        assert_eq!((saved.active_queues[0].next_avail, saved.active_queues[0].next_used), (1, 1));
        let loaded: MmioState = postcard::from_bytes(&postcard::to_allocvec(&saved).unwrap()).unwrap();
        let mut restored = MmioTransport::restore(Box::new(Rng::new()), memory.clone(), interrupt(), &loaded).unwrap();
        assert_eq!(restored.save().unwrap(), saved, "save, restore, save again: the same state");

        mock.add_desc_chains(&[request(1)], 1).unwrap();
        restored.notify_queue(0);
        assert_eq!(mock.used().idx().load(), 2, "the restored rng went on from the saved ring position");
        let used = mock.used().ring().ref_at(1).unwrap().load();
        assert_eq!((used.id(), used.len()), (1, 32));
    }

    #[test]
    fn restore_of_another_device_kind_is_refused() {
        let mut rng = Rng::new();
        let vsock = VirtioDeviceState::Vsock(VsockState { guest_cid: 3 });
        assert!(matches!(
            rng.restore(&vsock),
            Err(VirtioPersistError::WrongDevice { ref saved, built: "rng" }) if saved == "vsock"
        ));
        assert!(rng.restore(&VirtioDeviceState::Rng).is_ok());

        // The transport checks the virtio type id; a tampered file can still pair the
        // rng's id with another kind's state, and the device refuses that.
        let mut saved = MmioTransport::new(Box::new(Rng::new()), memory(), interrupt()).save().unwrap();
        saved.device = vsock;
        assert!(matches!(
            MmioTransport::restore(Box::new(Rng::new()), memory(), interrupt(), &saved),
            Err(VirtioPersistError::WrongDevice { built: "rng", .. })
        ));
    }
}

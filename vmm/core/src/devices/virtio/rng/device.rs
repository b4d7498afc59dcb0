//! The entropy device: one request queue, no configuration space, no features.
//!
//! It never blocks the thread that serves it: the host's pool is read with GRND_NONBLOCK.
//! On a freshly booted host whose pool is not ready yet (a nested or emulated machine
//! without RDRAND can take seconds), the guest's requests stay in the ring and a waiter
//! thread, started only then, blocks in getrandom in their place and rings the device's
//! event fd once the pool is ready; the event loop then serves the queue again.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use carrel_firmware::virtio_id;
use vmm_sys_util::eventfd::EventFd;

use super::handler::{process_request_queue, RequestOutcome};
use crate::devices::virtio::persist::{VirtioDeviceState, VirtioPersistError};
use crate::devices::virtio::{ActivateError, ActiveState, DeviceState, VirtioDevice, INTERRUPT_USED_RING};

const QUEUE_SIZES: &[u16] = &[256];

/// Errors creating the entropy device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot create the entropy device's event fd: {0}")]
    CreateEventFd(#[source] std::io::Error),
    #[error("cannot start the thread that waits for the host's entropy pool: {0}")]
    SpawnWaiter(#[source] std::io::Error),
}

/// Counters a developer can read to see what the device did.
#[derive(Debug, Default)]
pub struct RngMetrics {
    pub bytes_served: AtomicU64,
    pub requests: AtomicU64,
    pub malformed_requests: AtomicU64,
    /// Passes over the queue that found the host's pool not ready.
    pub waits_for_entropy: AtomicU64,
}

/// The virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    state: DeviceState,
    pub metrics: Arc<RngMetrics>,
    /// Written once the host's pool is ready, when it was not at creation.
    pool_ready: Arc<EventFd>,
}

impl Rng {
    /// The device; when the host's pool is not ready yet, also the thread that waits for it.
    pub fn new() -> Result<Rng, RngError> {
        let pool_ready = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(RngError::CreateEventFd)?);
        if !host_pool_ready() {
            let ready = pool_ready.clone();
            std::thread::Builder::new()
                .name("rng-pool-wait".into())
                .spawn(move || {
                    // It needs getrandom, write and exit, and, alive while a jailed VMM
                    // leaves root, the id changes the C library makes every thread do:
                    // the loader's filter has those.
                    crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Loader);
                    wait_for_host_pool();
                    let _ = ready.write(1);
                })
                .map_err(RngError::SpawnWaiter)?;
        }
        Ok(Rng { state: DeviceState::Inactive, metrics: Arc::new(RngMetrics::default()), pool_ready })
    }

    fn serve_queue(&mut self) {
        let DeviceState::Active(active) = &mut self.state else {
            return;
        };
        let Some(queue) = active.queues.get_mut(0) else {
            return;
        };
        let RequestOutcome { completed, malformed, bytes, needs_interrupt, waiting_for_entropy } =
            process_request_queue(queue, &active.memory, &mut host_entropy_nonblocking);
        self.metrics.requests.fetch_add(completed, Ordering::Relaxed);
        self.metrics.malformed_requests.fetch_add(malformed, Ordering::Relaxed);
        self.metrics.bytes_served.fetch_add(bytes, Ordering::Relaxed);
        self.metrics.waits_for_entropy.fetch_add(u64::from(waiting_for_entropy), Ordering::Relaxed);
        if needs_interrupt {
            active.interrupt.signal(INTERRUPT_USED_RING);
        }
    }
}

/// Fills `buffer` from the kernel's CSPRNG, waiting for its pool if it is not ready: for
/// callers that may block (a disk layer's id), never for the device.
pub fn host_entropy(buffer: &mut [u8]) -> std::io::Result<()> {
    getrandom_into(buffer, 0)
}

/// Fills `buffer` from the kernel's CSPRNG, or fails with `WouldBlock` at once while its
/// pool is not ready.
pub fn host_entropy_nonblocking(buffer: &mut [u8]) -> std::io::Result<()> {
    getrandom_into(buffer, libc::GRND_NONBLOCK)
}

fn getrandom_into(buffer: &mut [u8], flags: libc::c_uint) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buffer.len() {
        let rest = &mut buffer[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable slice.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), flags) };
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

fn host_pool_ready() -> bool {
    // Any answer but "not ready" counts as ready: a getrandom that fails otherwise fails
    // for the requests too, which then complete empty as malformed.
    !matches!(host_entropy_nonblocking(&mut [0u8; 1]), Err(err) if err.kind() == std::io::ErrorKind::WouldBlock)
}

fn wait_for_host_pool() {
    let _ = host_entropy(&mut [0u8; 1]);
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
        if index == 0 {
            self.serve_queue();
        }
    }

    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.pool_ready.as_raw_fd())
    }

    /// The host's pool became ready: serve what waited for it.
    fn process_events(&mut self) {
        if self.pool_ready.read().is_ok() {
            self.serve_queue();
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
        let mut original = MmioTransport::new(Box::new(Rng::new().unwrap()), memory.clone(), interrupt());
        driver::start(&mut original, std::slice::from_ref(&mock), QUEUE_SIZE);
        mock.add_desc_chains(&[request(0)], 0).unwrap();
        original.notify_queue(0);
        assert_eq!(mock.used().idx().load(), 1);

        let saved = original.save().unwrap();
        assert_eq!(saved.device, VirtioDeviceState::Rng);
        assert_eq!((saved.active_queues[0].next_avail, saved.active_queues[0].next_used), (1, 1));
        let loaded: MmioState = postcard::from_bytes(&postcard::to_allocvec(&saved).unwrap()).unwrap();
        let mut restored =
            MmioTransport::restore(Box::new(Rng::new().unwrap()), memory.clone(), interrupt(), &loaded).unwrap();
        assert_eq!(restored.save().unwrap(), saved, "save, restore, save again: the same state");

        mock.add_desc_chains(&[request(1)], 1).unwrap();
        restored.notify_queue(0);
        assert_eq!(mock.used().idx().load(), 2, "the restored rng went on from the saved ring position");
        let used = mock.used().ring().ref_at(1).unwrap().load();
        assert_eq!((used.id(), used.len()), (1, 32));
    }

    #[test]
    fn pool_ready_event_serves_requests_and_a_spurious_wake_does_nothing() {
        let memory = memory();
        let mock = MockSplitQueue::create(&memory, GuestAddress(0), QUEUE_SIZE);
        let mut transport = MmioTransport::new(Box::new(Rng::new().unwrap()), memory.clone(), interrupt());
        driver::start(&mut transport, std::slice::from_ref(&mock), QUEUE_SIZE);
        mock.add_desc_chains(&[request(0)], 0).unwrap();
        transport.process_device_events();
        assert_eq!(mock.used().idx().load(), 0, "no event, no pass over the queue");
        let fd = transport.device_event_fd().expect("the rng has an event fd");
        // SAFETY: `fd` is the device's eventfd, alive for this call; 8 bytes are written.
        let wrote = unsafe { libc::write(fd, 1u64.to_le_bytes().as_ptr().cast(), 8) };
        assert_eq!(wrote, 8);
        transport.process_device_events();
        assert_eq!(mock.used().idx().load(), 1, "the request that waited for the pool is served");
    }

    #[test]
    fn restore_of_another_device_kind_is_refused() {
        let mut rng = Rng::new().unwrap();
        let vsock = VirtioDeviceState::Vsock(VsockState { guest_cid: 3 });
        assert!(matches!(
            rng.restore(&vsock),
            Err(VirtioPersistError::WrongDevice { ref saved, built: "rng" }) if saved == "vsock"
        ));
        assert!(rng.restore(&VirtioDeviceState::Rng).is_ok());

        // The transport checks the virtio type id; a tampered file can still pair the
        // rng's id with another kind's state, and the device refuses that.
        let mut saved = MmioTransport::new(Box::new(Rng::new().unwrap()), memory(), interrupt()).save().unwrap();
        saved.device = vsock;
        assert!(matches!(
            MmioTransport::restore(Box::new(Rng::new().unwrap()), memory(), interrupt(), &saved),
            Err(VirtioPersistError::WrongDevice { built: "rng", .. })
        ));
    }
}

//! The block device: one request queue, a configuration space with the disk's size and
//! limits, and the features flush, discard, write-zeroes, event idx (and read-only).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use carrel_firmware::virtio_id;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
};

use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;

use super::handler::{BlockBackend, Served, MAX_SEGMENTS, SECTOR_SIZE};
use super::io::Engine;
use super::persist::BlockState;
use crate::devices::virtio::persist::{VirtioDeviceState, VirtioPersistError};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, ActiveState, DeviceState, VirtioDevice, INTERRUPT_USED_RING,
};
use crate::disk::{layer::BLOCK_SIZE, Disk, DiskError, DiskSpec, DiskState};

const QUEUE_SIZES: &[u16] = &[256];
/// How long the device watches the ring for more requests after serving some.
const POLL_WINDOW: std::time::Duration = std::time::Duration::from_micros(30);
/// Data segments per request: the queue's size less the header and the status.
const SEG_MAX: u32 = 254;

/// Errors making a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Disk(#[from] DiskError),
}

/// Counters a developer can read to see what the device did.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    pub requests: AtomicU64,
    pub malformed_requests: AtomicU64,
    pub io_errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub flushes: AtomicU64,
}

impl BlockMetrics {
    fn add(&self, served: &Served) {
        self.requests.fetch_add(served.completed, Ordering::Relaxed);
        self.malformed_requests.fetch_add(served.malformed, Ordering::Relaxed);
        self.io_errors.fetch_add(served.errors, Ordering::Relaxed);
        self.bytes_read.fetch_add(served.bytes_read, Ordering::Relaxed);
        self.bytes_written.fetch_add(served.bytes_written, Ordering::Relaxed);
        self.flushes.fetch_add(served.flushes, Ordering::Relaxed);
    }
}

/// Where the device's disk stands.
#[derive(Debug)]
enum DiskSlot {
    Open(Box<BlockBackend>),
    /// Built for a restore: the saved chain is opened by [`VirtioDevice::restore`].
    AwaitingRestore,
}

/// The virtio-blk device.
#[derive(Debug)]
pub struct Block {
    spec: DiskSpec,
    disk: DiskSlot,
    state: DeviceState,
    /// The chain frozen by the last `prepare_snapshot`, which `save` names.
    frozen: Option<DiskState>,
    pub metrics: Arc<BlockMetrics>,
}

impl Block {
    /// Opens (or makes) the disk `spec` names.
    pub fn new(spec: DiskSpec) -> Result<Block, BlockError> {
        let disk = Disk::open(&spec)?;
        Ok(Block::with_disk(spec, disk, Engine::new()))
    }

    pub fn with_disk(spec: DiskSpec, disk: Disk, engine: Engine) -> Block {
        Block {
            spec,
            disk: DiskSlot::Open(Box::new(BlockBackend::new(disk, engine))),
            state: DeviceState::Inactive,
            frozen: None,
            metrics: Arc::new(BlockMetrics::default()),
        }
    }

    /// A device whose disk comes from the snapshot it is restored from.
    pub fn awaiting_restore(spec: DiskSpec) -> Block {
        Block {
            spec,
            disk: DiskSlot::AwaitingRestore,
            state: DeviceState::Inactive,
            frozen: None,
            metrics: Arc::new(BlockMetrics::default()),
        }
    }

    pub fn disk(&self) -> Option<&Disk> {
        match &self.disk {
            DiskSlot::Open(backend) => Some(&backend.disk),
            DiskSlot::AwaitingRestore => None,
        }
    }

    pub fn engine_name(&self) -> &'static str {
        match &self.disk {
            DiskSlot::Open(backend) => backend.engine.name(),
            DiskSlot::AwaitingRestore => "none",
        }
    }

    fn config(&self) -> [u8; 60] {
        let mut config = [0u8; 60];
        let capacity = self.disk().map_or(0, |disk| disk.capacity() / SECTOR_SIZE);
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        let max_sectors = u32::MAX / SECTOR_SIZE as u32;
        // Discard: any length, MAX_SEGMENTS segments, aligned to the block.
        config[36..40].copy_from_slice(&max_sectors.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        config[44..48].copy_from_slice(&((BLOCK_SIZE / SECTOR_SIZE) as u32).to_le_bytes());
        config[48..52].copy_from_slice(&max_sectors.to_le_bytes());
        config[52..56].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        // Write-zeroes may unmap: zeroed blocks take no space.
        config[56] = 1;
        config
    }

    fn serve(
        &mut self,
        work: impl FnOnce(&mut BlockBackend, &mut virtio_queue::Queue, &crate::memory::GuestMemoryMmap) -> Served,
    ) {
        let (DeviceState::Active(active), DiskSlot::Open(backend)) = (&mut self.state, &mut self.disk) else {
            return;
        };
        let Some(queue) = active.queues.get_mut(0) else { return };
        let served = work(backend, queue, &active.memory);
        self.metrics.add(&served);
        if served.needs_interrupt {
            active.interrupt.signal(INTERRUPT_USED_RING);
        }
    }
}

impl Block {
    /// Serves the ring and the finished transfers, then, when nothing is in flight,
    /// watches the ring a little longer before sleeping.
    fn work_through_queue(&mut self) {
        loop {
            self.serve(|backend, queue, memory| backend.process_request_queue(queue, memory));
            // Completions are signalled above, before this thread looks for more work.
            let (DeviceState::Active(active), DiskSlot::Open(backend)) = (&mut self.state, &mut self.disk) else {
                return;
            };
            let Some(queue) = active.queues.get_mut(0) else { return };
            // With transfers on the kernel's workers (writes that block), this thread
            // leaves the core to them instead of spinning; their completions wake it.
            if backend.in_flight() > 0 || !backend.poll_for_requests(queue, &active.memory, POLL_WINDOW) {
                return;
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        virtio_id::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        let mut features = [
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            // Doorbells and interrupts only when the other side asks for the next one.
            VIRTIO_RING_F_EVENT_IDX,
        ]
        .iter()
        .fold(0u64, |features, bit| features | 1 << bit);
        if self.disk().is_some_and(Disk::is_readonly) || self.spec.readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, mut state: ActiveState, acked_features: u64) -> Result<(), ActivateError> {
        if state.queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount { needed: QUEUE_SIZES.len(), got: state.queues.len() });
        }
        let event_idx = acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for queue in &mut state.queues {
            queue.set_event_idx(event_idx);
        }
        if matches!(self.disk, DiskSlot::AwaitingRestore) {
            return Err(ActivateError::Backend("the disk was not restored".into()));
        }
        self.state = DeviceState::Active(state);
        Ok(())
    }

    fn reset(&mut self) {
        // Transfers in flight write into guest memory: they end before the queues go.
        if let DiskSlot::Open(backend) = &mut self.disk {
            backend.abandon();
        }
        self.state = DeviceState::Inactive;
    }

    fn process_queue(&mut self, _index: usize) {
        self.work_through_queue();
    }

    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        match &self.disk {
            DiskSlot::Open(backend) => backend.engine.event_fd(),
            DiskSlot::AwaitingRestore => None,
        }
    }

    /// Transfers finished: their requests complete, and the ring is served too, since
    /// doorbells were off while the transfers were in flight.
    fn process_events(&mut self) {
        self.work_through_queue();
    }

    fn active_queues(&self) -> Option<&[virtio_queue::Queue]> {
        self.state.queues()
    }

    /// Completes every request in flight, then freezes the disk: the saved memory and
    /// the frozen layers are the same instant.
    fn prepare_snapshot(&mut self) -> Result<(), String> {
        self.serve(|backend, queue, memory| backend.drain(queue, memory));
        let DiskSlot::Open(backend) = &mut self.disk else {
            return Err("the disk is not open".into());
        };
        self.frozen = Some(backend.disk.freeze().map_err(|err| err.to_string())?);
        Ok(())
    }

    fn save(&self) -> Result<VirtioDeviceState, VirtioPersistError> {
        let disk = self.frozen.clone().ok_or_else(|| VirtioPersistError::Save {
            device: "block",
            reason: "the disk was not frozen for this snapshot".into(),
        })?;
        Ok(VirtioDeviceState::Block(BlockState { disk }))
    }

    fn restore(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioPersistError> {
        let VirtioDeviceState::Block(saved) = state else {
            return Err(VirtioPersistError::WrongDevice { saved: state.kind().into(), built: "block" });
        };
        let disk = Disk::restore(&self.spec, &saved.disk)
            .map_err(|err| VirtioPersistError::BadState { device: "block", reason: err.to_string() })?;
        self.disk = DiskSlot::Open(Box::new(BlockBackend::new(disk, Engine::new())));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::driver::{self, interrupt};
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::persist::MmioState;
    use crate::memory::GuestMemoryMmap;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const QUEUE_SIZE: u16 = 16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// Writes one 4 KiB block of `fill` at `sector` through the queue, chain at `first`.
    fn write_request(
        memory: &GuestMemoryMmap,
        mock: &MockSplitQueue<GuestMemoryMmap>,
        first: u16,
        sector: u64,
        fill: u8,
    ) {
        let base = 0x20_0000 + u64::from(first) * 0x2000;
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&1u32.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        memory.write_slice(&header, GuestAddress(base)).unwrap();
        memory.write_slice(&[fill; 4096], GuestAddress(base + 0x100)).unwrap();
        let next = VRING_DESC_F_NEXT as u16;
        let chain = [
            descriptor(base, 16, next, first + 1),
            descriptor(base + 0x100, 4096, next, first + 2),
            descriptor(base + 0x1800, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        mock.add_desc_chains(&chain, first).unwrap();
    }

    #[test]
    fn snapshot_freezes_the_disk_and_a_restore_starts_a_new_top_over_the_frozen_chain() {
        let dir = tempfile::tempdir().unwrap();
        let spec: DiskSpec = format!("{},size=1M", dir.path().join("vda.layer").display()).parse().unwrap();
        let memory = memory();
        let mock = MockSplitQueue::create(&memory, GuestAddress(0), QUEUE_SIZE);
        let block = Block::with_disk(spec.clone(), Disk::open(&spec).unwrap(), Engine::new());
        let mut original = MmioTransport::new(Box::new(block), memory.clone(), interrupt());
        driver::start(&mut original, std::slice::from_ref(&mock), QUEUE_SIZE);
        write_request(&memory, &mock, 0, 8, 0xaa);
        original.notify_queue(0);
        original.prepare_snapshot().unwrap();
        assert_eq!(mock.used().idx().load(), 1, "the write in flight completed before the freeze");
        let saved = original.save().unwrap();
        let VirtioDeviceState::Block(BlockState { disk }) = &saved.device else { panic!("{saved:?}") };
        assert_eq!(disk.layers.len(), 1, "{disk:?}");
        let frozen = disk.layers[0].0.clone();
        let frozen_digest = blake3::hash(&std::fs::read(&frozen).unwrap());

        // The VM writes on into its new top; the frozen layer does not change.
        write_request(&memory, &mock, 3, 8, 0xbb);
        original.notify_queue(0);
        original.prepare_snapshot().unwrap();
        assert_eq!(blake3::hash(&std::fs::read(&frozen).unwrap()), frozen_digest, "a frozen layer is never written");
        drop(original);

        let loaded: MmioState = postcard::from_bytes(&postcard::to_allocvec(&saved).unwrap()).unwrap();
        let restored =
            MmioTransport::restore(Box::new(Block::awaiting_restore(spec)), memory.clone(), interrupt(), &loaded)
                .unwrap();
        assert!(restored.is_active(), "the restored device runs again");
        drop(restored);
        let mut block_bytes = vec![0u8; 4096];
        // The restored top lies over the first frozen layer: sector 8 holds 0xaa, not 0xbb.
        let disk = Disk::open(&DiskSpec { path: dir.path().join("vda.layer"), readonly: true, base: None, size: None })
            .unwrap();
        disk.read_at(&mut block_bytes, 8 * 512).unwrap();
        assert!(block_bytes.iter().all(|byte| *byte == 0xaa));
    }

    #[test]
    fn restore_of_another_device_kind_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spec: DiskSpec = format!("{},size=1M", dir.path().join("d").display()).parse().unwrap();
        let mut block = Block::awaiting_restore(spec);
        assert!(matches!(
            block.restore(&VirtioDeviceState::Rng),
            Err(VirtioPersistError::WrongDevice { built: "block", .. })
        ));
    }

    #[test]
    fn read_only_disk_offers_the_ro_feature_and_config_says_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw.img");
        std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
        let block = Block::new(format!("{},readonly", raw.display()).parse().unwrap()).unwrap();
        assert_ne!(block.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
        let mut capacity = [0u8; 8];
        block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), (1 << 20) / 512);
        let mut blk_size = [0u8; 4];
        block.read_config(20, &mut blk_size);
        assert_eq!(u32::from_le_bytes(blk_size), 4096);
    }
}

//! The virtio-mmio transport (virtio 1.x, register layout version 2).
//!
//! Register accesses come from vCPU threads as MMIO exits; queue notifications bypass it
//! (ioeventfd). The transport enforces the status state machine: features are negotiated
//! before FEATURES_OK, queues are set up before DRIVER_OK, and writing 0 resets.

use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};

use super::{ActiveState, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;

/// "virt" as a little-endian u32.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
pub const MMIO_VERSION: u32 = 2;
/// "CRRL" as a little-endian u32: the vendor id Carrel devices report.
pub const VENDOR_ID: u32 = 0x4c52_5243;

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// One virtio device on the MMIO bus.
#[derive(Debug)]
pub struct MmioTransport {
    // The fields are the transport's register file; `persist` saves and restores them.
    pub(super) device: Box<dyn VirtioDevice>,
    pub(super) memory: GuestMemoryMmap,
    pub(super) interrupt: Arc<VirtioInterrupt>,
    pub(super) queues: Vec<Queue>,
    pub(super) queue_select: u32,
    pub(super) device_features_select: u32,
    pub(super) driver_features_select: u32,
    pub(super) driver_features: u64,
    pub(super) status: u32,
    pub(super) config_generation: u32,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
    ) -> MmioTransport {
        let queues = queues_for(device.as_ref());
        MmioTransport {
            device,
            memory,
            interrupt,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
        }
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_active(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::DEVICE_NEEDS_RESET == 0
    }

    /// Tells a restored device that runs that the guest runs again (see
    /// [`VirtioDevice::restored`]).
    pub fn restored(&mut self) {
        if self.is_active() {
            self.device.restored();
        }
    }

    /// A notification of queue `index` (from its ioeventfd).
    pub fn notify_queue(&mut self, index: usize) {
        if self.is_active() && index < self.queues.len() {
            self.device.process_queue(index);
        }
    }

    /// Readies the device for a snapshot (see [`VirtioDevice::prepare_snapshot`]); a
    /// device the driver never started has nothing to prepare unless it holds a disk.
    pub fn prepare_snapshot(&mut self) -> Result<(), String> {
        self.device.prepare_snapshot()
    }

    /// The device's own event fd, if it has one (see [`VirtioDevice::event_fd`]).
    pub fn device_event_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.event_fd()
    }

    /// Lets the device handle its own event sources.
    pub fn process_device_events(&mut self) {
        self.device.process_events();
    }

    fn offered_features(&self) -> u64 {
        self.device.device_features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = queues_for(self.device.as_ref());
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt.acknowledge(u32::MAX);
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            return self.reset();
        }
        // Bits only accumulate; a driver clearing a bit is a driver bug: refuse it.
        if value & self.status != self.status {
            return;
        }
        let added = value & !self.status;
        if added & status::FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.offered_features();
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                // Not accepting FEATURES_OK tells the driver the negotiation failed.
                self.status = value & !status::FEATURES_OK;
                return;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if value & status::FEATURES_OK == 0 {
                return;
            }
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    fn activate(&mut self) {
        // The device gets its own copies of the ready queues; the transport keeps the
        // register view for the driver to read back.
        let ready: Vec<Queue> = self
            .queues
            .iter()
            .filter(|queue| queue.ready())
            .filter_map(|queue| Queue::try_from(queue.state()).ok())
            .collect();
        let ready_count = self.queues.iter().filter(|queue| queue.ready()).count();
        let all_valid = ready.len() == ready_count && ready.iter().all(|queue| queue.is_valid(&self.memory));
        let state = ActiveState { memory: self.memory.clone(), queues: ready, interrupt: self.interrupt.clone() };
        if !all_valid || self.device.activate(state, self.driver_features).is_err() {
            self.status |= status::DEVICE_NEEDS_RESET;
            self.interrupt.signal(super::INTERRUPT_CONFIG);
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_select as usize);
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            // No Carrel device has a shared-memory region: whatever SHMSel names does not
            // exist, which the spec (4.2.2) says reads as a length (and base) of -1. A
            // driver that sees 0 instead takes it for a zero-sized region at 0 (Linux's
            // virtio-gpu then fails its probe reserving it).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let setup = self.queue_setup_allowed();
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES => {
                let negotiating = self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0;
                if negotiating {
                    match self.driver_features_select {
                        0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                        1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
                        _ => {}
                    }
                }
            }
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM if setup => {
                if let Some(queue) = self.selected_queue() {
                    // The queue keeps its old size when the value is not a power of two
                    // within max: `is_valid` then catches it at activation.
                    queue.set_size(value as u16);
                }
            }
            reg::QUEUE_READY if setup => {
                if let Some(queue) = self.selected_queue() {
                    queue.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW if setup => {
                self.set_queue_address(|q, v| q.set_desc_table_address(Some(v), None), value)
            }
            reg::QUEUE_DESC_HIGH if setup => {
                self.set_queue_address(|q, v| q.set_desc_table_address(None, Some(v)), value)
            }
            reg::QUEUE_AVAIL_LOW if setup => {
                self.set_queue_address(|q, v| q.set_avail_ring_address(Some(v), None), value)
            }
            reg::QUEUE_AVAIL_HIGH if setup => {
                self.set_queue_address(|q, v| q.set_avail_ring_address(None, Some(v)), value)
            }
            reg::QUEUE_USED_LOW if setup => {
                self.set_queue_address(|q, v| q.set_used_ring_address(Some(v), None), value)
            }
            reg::QUEUE_USED_HIGH if setup => {
                self.set_queue_address(|q, v| q.set_used_ring_address(None, Some(v)), value)
            }
            // A notification that missed the ioeventfd (unknown queue index): nothing to do
            // for a bad index; a good one is processed as if it came through the eventfd.
            reg::QUEUE_NOTIFY => self.notify_queue(value as usize),
            reg::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::STATUS => self.write_status(value),
            _ => {}
        }
    }

    fn set_queue_address(&mut self, set: impl FnOnce(&mut Queue, u32), value: u32) {
        if let Some(queue) = self.selected_queue() {
            set(queue, value);
        }
    }
}

fn queues_for(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        // Queue::new only fails for a max size that is zero or not a power of two: a
        // device bug caught by the device's own tests, so such a queue is left out.
        .filter_map(|max| Queue::new(*max).ok())
        .collect()
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            return self.device.read_config(offset - reg::CONFIG, data);
        }
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            return;
        }
        self.write_register(offset, u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
    }
}

/// A driver's side of the transport, for the devices' tests.
#[cfg(test)]
pub(crate) mod driver {
    use super::{reg, status, MmioTransport};
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::VirtioInterrupt;
    use crate::memory::GuestMemoryMmap;
    use std::sync::Arc;
    use virtio_queue::mock::MockSplitQueue;

    pub fn interrupt() -> Arc<VirtioInterrupt> {
        Arc::new(VirtioInterrupt::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap()))
    }

    /// Drives `transport` as a driver does, up to DRIVER_OK, queue `n` on `mocks[n]`, each
    /// of `queue_size` entries.
    pub fn start(transport: &mut MmioTransport, mocks: &[MockSplitQueue<GuestMemoryMmap>], queue_size: u16) {
        let mut write = |offset: u64, value: u32| transport.write(offset, &value.to_le_bytes());
        let negotiated = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        write(reg::STATUS, status::ACKNOWLEDGE);
        write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write(reg::DRIVER_FEATURES_SEL, 1);
        write(reg::DRIVER_FEATURES, 1);
        write(reg::STATUS, negotiated);
        for (index, mock) in mocks.iter().enumerate() {
            write(reg::QUEUE_SEL, index as u32);
            write(reg::QUEUE_NUM, u32::from(queue_size));
            write(reg::QUEUE_DESC_LOW, mock.desc_table_addr().0 as u32);
            write(reg::QUEUE_AVAIL_LOW, mock.avail_addr().0 as u32);
            write(reg::QUEUE_USED_LOW, mock.used_addr().0 as u32);
            write(reg::QUEUE_READY, 1);
        }
        write(reg::STATUS, negotiated | status::DRIVER_OK);
        assert!(transport.is_active());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{read_config_bytes, ActivateError, DeviceState};
    use std::sync::Mutex;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    /// A device that records what the transport does to it.
    #[derive(Debug)]
    struct TestDevice {
        state: DeviceState,
        resets: usize,
        processed: Arc<Mutex<Vec<usize>>>,
        config: [u8; 8],
    }

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn device_features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(slot) = self.config.get_mut(offset as usize) {
                *slot = data[0];
            }
        }
        fn activate(&mut self, state: ActiveState, _acked: u64) -> Result<(), ActivateError> {
            if state.queues.len() != 2 {
                return Err(ActivateError::QueueCount { needed: 2, got: state.queues.len() });
            }
            self.state = DeviceState::Active(state);
            Ok(())
        }
        fn reset(&mut self) {
            self.state = DeviceState::Inactive;
            self.resets += 1;
        }
        fn process_queue(&mut self, index: usize) {
            self.processed.lock().unwrap().push(index);
        }
        fn active_queues(&self) -> Option<&[Queue]> {
            self.state.queues()
        }
        fn save(
            &self,
        ) -> Result<
            crate::devices::virtio::persist::VirtioDeviceState,
            crate::devices::virtio::persist::VirtioPersistError,
        > {
            Ok(crate::devices::virtio::persist::VirtioDeviceState::Rng)
        }
        fn restore(
            &mut self,
            _state: &crate::devices::virtio::persist::VirtioDeviceState,
        ) -> Result<(), crate::devices::virtio::persist::VirtioPersistError> {
            Ok(())
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Vec<usize>>>) {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let processed = Arc::new(Mutex::new(Vec::new()));
        let device = TestDevice {
            state: DeviceState::Inactive,
            resets: 0,
            processed: processed.clone(),
            config: [1, 2, 3, 4, 5, 6, 7, 8],
        };
        let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        (MmioTransport::new(Box::new(device), memory, interrupt), processed)
    }

    fn read32(transport: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(transport: &mut MmioTransport, offset: u64, value: u32) {
        transport.write(offset, &value.to_le_bytes());
    }

    fn negotiate(transport: &mut MmioTransport, features_high: u32) {
        write32(transport, reg::STATUS, status::ACKNOWLEDGE);
        write32(transport, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write32(transport, reg::DRIVER_FEATURES_SEL, 1);
        write32(transport, reg::DRIVER_FEATURES, features_high);
        write32(transport, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    }

    fn setup_queue(transport: &mut MmioTransport, index: u32, base: u64) {
        write32(transport, reg::QUEUE_SEL, index);
        write32(transport, reg::QUEUE_NUM, 8);
        write32(transport, reg::QUEUE_DESC_LOW, base as u32);
        write32(transport, reg::QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
        write32(transport, reg::QUEUE_USED_LOW, (base + 0x2000) as u32);
        write32(transport, reg::QUEUE_READY, 1);
    }

    const ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identification_registers_read_magic_version_and_ids() {
        let (mut transport, _) = transport();
        assert_eq!(read32(&mut transport, reg::MAGIC), MMIO_MAGIC);
        assert_eq!(read32(&mut transport, reg::VERSION), 2);
        assert_eq!(read32(&mut transport, reg::DEVICE_ID), 4);
        assert_eq!(read32(&mut transport, reg::VENDOR_ID), VENDOR_ID);
    }

    #[test]
    fn device_features_are_paged_by_select_and_include_version_1() {
        let (mut transport, _) = transport();
        assert_eq!(read32(&mut transport, reg::DEVICE_FEATURES), 1 << 3);
        write32(&mut transport, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(read32(&mut transport, reg::DEVICE_FEATURES), 1);
        write32(&mut transport, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(read32(&mut transport, reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn features_ok_is_refused_without_version_1() {
        let (mut transport, _) = transport();
        negotiate(&mut transport, 0);
        assert_eq!(transport.status() & status::FEATURES_OK, 0);
    }

    #[test]
    fn features_ok_is_refused_for_unoffered_feature() {
        let (mut transport, _) = transport();
        write32(&mut transport, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write32(&mut transport, reg::DRIVER_FEATURES, 1 << 5);
        write32(&mut transport, reg::DRIVER_FEATURES_SEL, 1);
        write32(&mut transport, reg::DRIVER_FEATURES, 1);
        write32(&mut transport, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(transport.status() & status::FEATURES_OK, 0);
    }

    #[test]
    fn queue_registers_before_features_ok_are_ignored() {
        let (mut transport, _) = transport();
        write32(&mut transport, reg::QUEUE_SEL, 0);
        write32(&mut transport, reg::QUEUE_READY, 1);
        assert_eq!(read32(&mut transport, reg::QUEUE_READY), 0);
    }

    #[test]
    fn queue_num_max_follows_queue_select_and_is_zero_past_the_end() {
        let (mut transport, _) = transport();
        assert_eq!(read32(&mut transport, reg::QUEUE_NUM_MAX), 16);
        write32(&mut transport, reg::QUEUE_SEL, 1);
        assert_eq!(read32(&mut transport, reg::QUEUE_NUM_MAX), 8);
        write32(&mut transport, reg::QUEUE_SEL, 7);
        assert_eq!(read32(&mut transport, reg::QUEUE_NUM_MAX), 0);
        write32(&mut transport, reg::QUEUE_READY, 1);
    }

    #[test]
    fn driver_ok_with_valid_queues_activates_and_notifications_reach_device() {
        let (mut transport, processed) = transport();
        negotiate(&mut transport, 1);
        setup_queue(&mut transport, 0, 0x10000);
        setup_queue(&mut transport, 1, 0x20000);
        write32(&mut transport, reg::STATUS, ALL);
        assert_eq!(transport.status(), ALL);
        assert!(transport.is_active());
        transport.notify_queue(1);
        write32(&mut transport, reg::QUEUE_NOTIFY, 0);
        write32(&mut transport, reg::QUEUE_NOTIFY, 9);
        assert_eq!(*processed.lock().unwrap(), vec![1, 0]);
    }

    #[test]
    fn transport_state_round_trips_into_a_fresh_device_and_it_runs_again() {
        let (mut original, _) = transport();
        negotiate(&mut original, 1);
        setup_queue(&mut original, 0, 0x10000);
        setup_queue(&mut original, 1, 0x20000);
        write32(&mut original, reg::STATUS, ALL);
        let saved = original.save().unwrap();
        let bytes = postcard::to_allocvec(&saved).unwrap();
        let loaded: super::super::persist::MmioState = postcard::from_bytes(&bytes).unwrap();
        let (fresh, processed) = transport();
        let MmioTransport { device, memory, interrupt, .. } = fresh;
        let mut restored = MmioTransport::restore(device, memory, interrupt, &loaded).unwrap();
        assert_eq!(restored.save().unwrap(), saved, "save, restore, save again: the same state");
        assert!(restored.is_active());
        restored.notify_queue(0);
        assert_eq!(*processed.lock().unwrap(), vec![0], "the restored device serves its queues");
    }

    #[test]
    fn restore_refuses_saved_queues_outside_memory_or_of_another_device() {
        let (mut original, _) = transport();
        negotiate(&mut original, 1);
        setup_queue(&mut original, 0, 0x10000);
        setup_queue(&mut original, 1, 0x20000);
        write32(&mut original, reg::STATUS, ALL);
        let mut saved = original.save().unwrap();
        saved.active_queues[1].used_ring = 0x4000_0000;
        let (fresh, _) = transport();
        let MmioTransport { device, memory, interrupt, .. } = fresh;
        assert!(MmioTransport::restore(device, memory, interrupt, &saved).is_err());
        let mut other = original.save().unwrap();
        other.device_type = 19;
        let (fresh, _) = transport();
        let MmioTransport { device, memory, interrupt, .. } = fresh;
        assert!(MmioTransport::restore(device, memory, interrupt, &other).is_err());
    }

    #[test]
    fn driver_ok_with_queue_outside_memory_sets_needs_reset() {
        let (mut transport, processed) = transport();
        negotiate(&mut transport, 1);
        setup_queue(&mut transport, 0, 0x10000);
        setup_queue(&mut transport, 1, 0x4000_0000);
        write32(&mut transport, reg::STATUS, ALL);
        assert_ne!(transport.status() & status::DEVICE_NEEDS_RESET, 0);
        assert!(!transport.is_active());
        transport.notify_queue(0);
        assert!(processed.lock().unwrap().is_empty());
        assert_ne!(read32(&mut transport, reg::INTERRUPT_STATUS) & crate::devices::virtio::INTERRUPT_CONFIG, 0);
    }

    #[test]
    fn status_bits_cannot_be_cleared_except_by_reset() {
        let (mut transport, _) = transport();
        negotiate(&mut transport, 1);
        write32(&mut transport, reg::STATUS, status::ACKNOWLEDGE);
        assert_ne!(transport.status() & status::FEATURES_OK, 0);
    }

    #[test]
    fn writing_zero_status_resets_device_and_queues() {
        let (mut transport, _) = transport();
        negotiate(&mut transport, 1);
        setup_queue(&mut transport, 0, 0x10000);
        write32(&mut transport, reg::STATUS, 0);
        assert_eq!(transport.status(), 0);
        write32(&mut transport, reg::QUEUE_SEL, 0);
        assert_eq!(read32(&mut transport, reg::QUEUE_READY), 0);
        assert_eq!(read32(&mut transport, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn interrupt_ack_clears_status_bits() {
        let (mut transport, _) = transport();
        transport.interrupt.signal(crate::devices::virtio::INTERRUPT_USED_RING);
        assert_eq!(read32(&mut transport, reg::INTERRUPT_STATUS), 1);
        write32(&mut transport, reg::INTERRUPT_ACK, 1);
        assert_eq!(read32(&mut transport, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn config_space_reads_through_and_bumps_generation_on_write() {
        let (mut transport, _) = transport();
        let mut data = [0u8; 2];
        transport.read(reg::CONFIG + 2, &mut data);
        assert_eq!(data, [3, 4]);
        transport.read(reg::CONFIG + 7, &mut data);
        assert_eq!(data, [8, 0]);
        let generation = read32(&mut transport, reg::CONFIG_GENERATION);
        transport.write(reg::CONFIG, &[9]);
        assert_eq!(read32(&mut transport, reg::CONFIG_GENERATION), generation + 1);
    }

    #[test]
    fn shared_memory_registers_report_no_region_for_any_selector() {
        let (mut transport, _) = transport();
        for selector in [0, 1, 7] {
            write32(&mut transport, reg::SHM_SEL, selector);
            for offset in [reg::SHM_LEN_LOW, reg::SHM_LEN_HIGH, reg::SHM_BASE_LOW, reg::SHM_BASE_HIGH] {
                assert_eq!(read32(&mut transport, offset), u32::MAX, "register {offset:#x}, SHMSel {selector}");
            }
        }
    }

    #[test]
    fn unaligned_or_narrow_register_access_is_ignored() {
        let (mut transport, _) = transport();
        let mut data = [0xaau8; 2];
        transport.read(reg::MAGIC, &mut data);
        assert_eq!(data, [0, 0]);
        transport.write(reg::STATUS + 1, &[1, 0, 0, 0]);
        assert_eq!(transport.status(), 0);
    }
}

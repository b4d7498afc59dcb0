//! A minimal virtio-mmio driver (virtio 1.x) and the entropy device on top of it.
//!
//! One split queue per device, in a page-aligned static; requests are polled on the used
//! ring (the device answers through an ioeventfd-driven host thread, no exit involved).

use core::sync::atomic::{fence, Ordering};

use crate::GuestCell;

const MAGIC: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DESC_HIGH: usize = 0x084;
const QUEUE_AVAIL_LOW: usize = 0x090;
const QUEUE_AVAIL_HIGH: usize = 0x094;
const QUEUE_USED_LOW: usize = 0x0a0;
const QUEUE_USED_HIGH: usize = 0x0a4;

const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const VERSION_1_HIGH: u32 = 1; // bit 32

const DESC_F_WRITE: u16 = 2;
pub const QUEUE_SIZE: u16 = 8;

/// Why a device could not be used.
#[allow(dead_code)] // fields are read through Debug in the error line
#[derive(Debug, Clone, Copy)]
pub enum VirtioError {
    NotVirtio,
    WrongDevice { found: u32 },
    FeaturesRefused,
    QueueUnavailable,
    Timeout,
}

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C, align(4096))]
struct SplitQueue {
    descriptors: [Descriptor; QUEUE_SIZE as usize],
    avail_flags: u16,
    avail_idx: u16,
    avail_ring: [u16; QUEUE_SIZE as usize],
    _avail_pad: [u8; 4096 - 16 * QUEUE_SIZE as usize - 4 - 2 * QUEUE_SIZE as usize],
    used_flags: u16,
    used_idx: u16,
    used_ring: [[u32; 2]; QUEUE_SIZE as usize],
}

static RNG_QUEUE: GuestCell<SplitQueue> = GuestCell::new(SplitQueue {
    descriptors: [Descriptor { addr: 0, len: 0, flags: 0, next: 0 }; QUEUE_SIZE as usize],
    avail_flags: 0,
    avail_idx: 0,
    avail_ring: [0; QUEUE_SIZE as usize],
    _avail_pad: [0; 4096 - 16 * QUEUE_SIZE as usize - 4 - 2 * QUEUE_SIZE as usize],
    used_flags: 0,
    used_idx: 0,
    used_ring: [[0; 2]; QUEUE_SIZE as usize],
});

/// A virtio-mmio device window.
pub struct MmioDevice {
    base: usize,
}

impl MmioDevice {
    fn read(&self, offset: usize) -> u32 {
        // SAFETY: base is a device window from BootInfo, identity mapped; offsets are the
        // aligned 32-bit registers of the virtio-mmio layout.
        unsafe { ((self.base + offset) as *const u32).read_volatile() }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as in read.
        unsafe { ((self.base + offset) as *mut u32).write_volatile(value) }
    }

    /// Resets and negotiates VERSION_1 only, then sets up queue 0 at `queue`.
    fn initialise(base: u64, device_id: u32, queue: *const SplitQueue) -> Result<MmioDevice, VirtioError> {
        let device = MmioDevice { base: base as usize };
        if device.read(MAGIC) != 0x7472_6976 || device.read(VERSION) != 2 {
            return Err(VirtioError::NotVirtio);
        }
        let found = device.read(DEVICE_ID);
        if found != device_id {
            return Err(VirtioError::WrongDevice { found });
        }
        device.write(STATUS, 0);
        device.write(STATUS, ACKNOWLEDGE);
        device.write(STATUS, ACKNOWLEDGE | DRIVER);
        device.write(DEVICE_FEATURES_SEL, 1);
        if device.read(DEVICE_FEATURES) & VERSION_1_HIGH == 0 {
            return Err(VirtioError::FeaturesRefused);
        }
        device.write(DRIVER_FEATURES_SEL, 0);
        device.write(DRIVER_FEATURES, 0);
        device.write(DRIVER_FEATURES_SEL, 1);
        device.write(DRIVER_FEATURES, VERSION_1_HIGH);
        device.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if device.read(STATUS) & FEATURES_OK == 0 {
            return Err(VirtioError::FeaturesRefused);
        }
        device.write(QUEUE_SEL, 0);
        if device.read(QUEUE_NUM_MAX) < u32::from(QUEUE_SIZE) {
            return Err(VirtioError::QueueUnavailable);
        }
        let address = queue as u64;
        let avail = address + core::mem::offset_of!(SplitQueue, avail_flags) as u64;
        let used = address + core::mem::offset_of!(SplitQueue, used_flags) as u64;
        device.write(QUEUE_NUM, u32::from(QUEUE_SIZE));
        device.write(QUEUE_DESC_LOW, address as u32);
        device.write(QUEUE_DESC_HIGH, (address >> 32) as u32);
        device.write(QUEUE_AVAIL_LOW, avail as u32);
        device.write(QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        device.write(QUEUE_USED_LOW, used as u32);
        device.write(QUEUE_USED_HIGH, (used >> 32) as u32);
        device.write(QUEUE_READY, 1);
        device.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        Ok(device)
    }
}

/// The entropy device.
pub struct Rng {
    device: MmioDevice,
}

impl Rng {
    pub fn new(base: u64) -> Result<Rng, VirtioError> {
        let device = MmioDevice::initialise(base, carrel_firmware::virtio_id::ENTROPY, RNG_QUEUE.get() as *const _)?;
        Ok(Rng { device })
    }

    /// Fills `buffer` with entropy from the host, waiting up to `timeout_cycles` TSC cycles.
    pub fn fill(&mut self, buffer: &mut [u8], timeout_cycles: u64) -> Result<usize, VirtioError> {
        let queue = RNG_QUEUE.get();
        let slot = queue.avail_idx % QUEUE_SIZE;
        queue.descriptors[slot as usize] =
            Descriptor { addr: buffer.as_mut_ptr() as u64, len: buffer.len() as u32, flags: DESC_F_WRITE, next: 0 };
        queue.avail_ring[slot as usize] = slot;
        let expected = queue.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        // SAFETY: avail_idx is read by the device; a volatile store publishes it.
        unsafe { core::ptr::addr_of_mut!(queue.avail_idx).write_volatile(expected) };
        fence(Ordering::SeqCst);
        self.device.write(QUEUE_NOTIFY, 0);
        let start = crate::rdtsc();
        loop {
            // SAFETY: used_idx is written by the device; read it volatile.
            let used = unsafe { core::ptr::addr_of!(queue.used_idx).read_volatile() };
            if used == expected {
                fence(Ordering::SeqCst);
                let entry = queue.used_ring[(used.wrapping_sub(1) % QUEUE_SIZE) as usize];
                return Ok(entry[1] as usize);
            }
            if crate::rdtsc().wrapping_sub(start) > timeout_cycles {
                return Err(VirtioError::Timeout);
            }
            core::hint::spin_loop();
        }
    }
}

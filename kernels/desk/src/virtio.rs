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

const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
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
    Empty,
}

#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

#[repr(C, align(4096))]
pub struct SplitQueue {
    pub descriptors: [Descriptor; QUEUE_SIZE as usize],
    pub avail_flags: u16,
    pub avail_idx: u16,
    pub avail_ring: [u16; QUEUE_SIZE as usize],
    _avail_pad: [u8; 4096 - 16 * QUEUE_SIZE as usize - 4 - 2 * QUEUE_SIZE as usize],
    pub used_flags: u16,
    pub used_idx: u16,
    pub used_ring: [[u32; 2]; QUEUE_SIZE as usize],
}

/// A split queue's memory: descriptors, available ring and used ring on one page.
pub const fn empty_queue() -> SplitQueue {
    SplitQueue {
        descriptors: [Descriptor { addr: 0, len: 0, flags: 0, next: 0 }; QUEUE_SIZE as usize],
        avail_flags: 0,
        avail_idx: 0,
        avail_ring: [0; QUEUE_SIZE as usize],
        _avail_pad: [0; 4096 - 16 * QUEUE_SIZE as usize - 4 - 2 * QUEUE_SIZE as usize],
        used_flags: 0,
        used_idx: 0,
        used_ring: [[0; 2]; QUEUE_SIZE as usize],
    }
}

static RNG_QUEUE: GuestCell<SplitQueue> = GuestCell::new(empty_queue());

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

    /// Checks the window, resets the device and negotiates VERSION_1 plus `features`
    /// (low 32 bits) where the device offers them.
    pub fn negotiate(base: u64, device_id: u32, features: u32) -> Result<MmioDevice, VirtioError> {
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
        device.write(DEVICE_FEATURES_SEL, 0);
        let offered = device.read(DEVICE_FEATURES);
        device.write(DRIVER_FEATURES_SEL, 0);
        device.write(DRIVER_FEATURES, offered & features);
        device.write(DRIVER_FEATURES_SEL, 1);
        device.write(DRIVER_FEATURES, VERSION_1_HIGH);
        device.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if device.read(STATUS) & FEATURES_OK == 0 {
            return Err(VirtioError::FeaturesRefused);
        }
        Ok(device)
    }

    /// Sets up queue `index` on `ring`.
    pub fn setup_queue(&self, index: u32, ring: &'static GuestCell<SplitQueue>) -> Result<Virtqueue, VirtioError> {
        self.write(QUEUE_SEL, index);
        if self.read(QUEUE_NUM_MAX) < u32::from(QUEUE_SIZE) {
            return Err(VirtioError::QueueUnavailable);
        }
        let address = ring.get() as *const SplitQueue as u64;
        let avail = address + core::mem::offset_of!(SplitQueue, avail_flags) as u64;
        let used = address + core::mem::offset_of!(SplitQueue, used_flags) as u64;
        self.write(QUEUE_NUM, u32::from(QUEUE_SIZE));
        self.write(QUEUE_DESC_LOW, address as u32);
        self.write(QUEUE_DESC_HIGH, (address >> 32) as u32);
        self.write(QUEUE_AVAIL_LOW, avail as u32);
        self.write(QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        self.write(QUEUE_USED_LOW, used as u32);
        self.write(QUEUE_USED_HIGH, (used >> 32) as u32);
        self.write(QUEUE_READY, 1);
        Ok(Virtqueue { ring, index })
    }

    /// Tells the device the driver is ready.
    /// Reads a 32-bit word of device configuration space.
    pub fn read_config(&self, offset: usize) -> u32 {
        self.read(0x100 + offset)
    }

    pub fn activate(&self) {
        self.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    pub fn notify(&self, queue: u16) {
        self.write(QUEUE_NOTIFY, u32::from(queue));
    }
}

/// Drains the used ring of a queue whose descriptor `i` permanently holds buffer `i`
/// (receive queues): calls `handle(buffer index, bytes written)` for each returned buffer
/// and posts it again. Returns whether any buffer was re-posted (the caller rings the
/// doorbell once for the batch).
pub fn drain_used(ring: &GuestCell<SplitQueue>, seen: &mut u16, mut handle: impl FnMut(usize, usize)) -> bool {
    let queue = ring.get();
    let mut reposted = false;
    loop {
        // SAFETY: used_idx is written by the device; read it volatile.
        let used = unsafe { core::ptr::addr_of!(queue.used_idx).read_volatile() };
        if used == *seen {
            return reposted;
        }
        fence(Ordering::SeqCst);
        let [id, len] = queue.used_ring[(*seen % QUEUE_SIZE) as usize];
        *seen = seen.wrapping_add(1);
        let slot = id as usize % QUEUE_SIZE as usize;
        handle(slot, len as usize);
        queue.avail_ring[(queue.avail_idx % QUEUE_SIZE) as usize] = slot as u16;
        fence(Ordering::SeqCst);
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        reposted = true;
    }
}

/// One buffer of a request: guest-physical address, length, device-writable or not.
#[derive(Clone, Copy)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Buffer {
    pub fn readable<T>(value: &T) -> Buffer {
        Buffer { addr: value as *const T as u64, len: core::mem::size_of::<T>() as u32, writable: false }
    }

    pub fn writable<T>(value: &mut T) -> Buffer {
        Buffer { addr: value as *mut T as u64, len: core::mem::size_of::<T>() as u32, writable: true }
    }
}

/// A queue used one batch at a time: submit chains, poll until they all come back.
pub struct Virtqueue {
    ring: &'static GuestCell<SplitQueue>,
    index: u32,
}

impl Virtqueue {
    /// Submits `buffers` as one chain and waits up to `timeout_cycles` for the device to
    /// return it; returns the length the device wrote.
    pub fn submit_and_wait(
        &mut self,
        device: &MmioDevice,
        buffers: &[Buffer],
        timeout_cycles: u64,
    ) -> Result<u32, VirtioError> {
        self.submit_batch_and_wait(device, &[buffers], timeout_cycles)
    }

    /// Submits several chains with one doorbell and waits for all of them; returns the
    /// length the device wrote into the last one. All chains together hold at most
    /// [`QUEUE_SIZE`] buffers.
    pub fn submit_batch_and_wait(
        &mut self,
        device: &MmioDevice,
        chains: &[&[Buffer]],
        timeout_cycles: u64,
    ) -> Result<u32, VirtioError> {
        let total: usize = chains.iter().map(|chain| chain.len()).sum();
        if chains.is_empty() || chains.iter().any(|chain| chain.is_empty()) || total > QUEUE_SIZE as usize {
            return Err(VirtioError::QueueUnavailable);
        }
        let queue = self.ring.get();
        let mut index = 0usize;
        let mut avail = queue.avail_idx;
        for chain in chains {
            let head = index;
            for (position, buffer) in chain.iter().enumerate() {
                let last = position + 1 == chain.len();
                queue.descriptors[index] = Descriptor {
                    addr: buffer.addr,
                    len: buffer.len,
                    flags: if buffer.writable { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT },
                    next: if last { 0 } else { index as u16 + 1 },
                };
                index += 1;
            }
            queue.avail_ring[(avail % QUEUE_SIZE) as usize] = head as u16;
            avail = avail.wrapping_add(1);
        }
        let expected = avail;
        fence(Ordering::SeqCst);
        // SAFETY: avail_idx is read by the device; a volatile store publishes it.
        unsafe { core::ptr::addr_of_mut!(queue.avail_idx).write_volatile(expected) };
        fence(Ordering::SeqCst);
        device.notify(self.index as u16);
        let start = crate::rdtsc();
        loop {
            // SAFETY: used_idx is written by the device; read it volatile.
            let used = unsafe { core::ptr::addr_of!(queue.used_idx).read_volatile() };
            if used == expected {
                fence(Ordering::SeqCst);
                let entry = queue.used_ring[(used.wrapping_sub(1) % QUEUE_SIZE) as usize];
                return Ok(entry[1]);
            }
            if crate::rdtsc().wrapping_sub(start) > timeout_cycles {
                return Err(VirtioError::Timeout);
            }
            core::hint::spin_loop();
        }
    }
}

/// The entropy device.
pub struct Rng {
    device: MmioDevice,
    queue: Virtqueue,
}

impl Rng {
    pub fn new(base: u64) -> Result<Rng, VirtioError> {
        let device = MmioDevice::negotiate(base, carrel_firmware::virtio_id::ENTROPY, 0)?;
        let queue = device.setup_queue(0, &RNG_QUEUE)?;
        device.activate();
        Ok(Rng { device, queue })
    }

    /// Fills `buffer` with entropy from the host, waiting up to `timeout_cycles` TSC cycles.
    pub fn fill(&mut self, buffer: &mut [u8], timeout_cycles: u64) -> Result<usize, VirtioError> {
        let request = Buffer { addr: buffer.as_mut_ptr() as u64, len: buffer.len() as u32, writable: true };
        self.queue.submit_and_wait(&self.device, &[request], timeout_cycles).map(|len| len as usize)
    }

    /// 32 bytes of entropy, asking again while the device returns fewer than asked;
    /// [`VirtioError::Empty`] when it returns a request with nothing written.
    pub fn draw(&mut self, timeout_cycles: u64) -> Result<[u8; 32], VirtioError> {
        let mut bytes = [0u8; 32];
        let mut filled = 0;
        while filled < bytes.len() {
            // The device reports the length it wrote; a length past the buffer is not
            // believed.
            let count = self.fill(&mut bytes[filled..], timeout_cycles)?.min(bytes.len() - filled);
            if count == 0 {
                return Err(VirtioError::Empty);
            }
            filled += count;
        }
        Ok(bytes)
    }
}

//! A minimal virtio-mmio driver (virtio 1.x) and the entropy device on top of it.
//!
//! Split queues live in page-aligned statics, sized per device by a const parameter
//! (8 descriptors for the small devices, more for the block device). Requests are polled
//! on the used ring (the device answers through an ioeventfd-driven host thread, no exit
//! involved); several chains may be in flight and come back in any order.

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
/// Set by a device that will see new chains without a doorbell.
const USED_F_NO_NOTIFY: u16 = 1;
/// Available-ring flag: the driver polls, so the device need not interrupt it.
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Feature VIRTIO_RING_F_EVENT_IDX: doorbells and interrupts are asked for by index
/// (`avail_event`, `used_event`) instead of by flag.
pub const F_EVENT_IDX: u32 = 29;
/// Queue size of the small devices (rng, gpu, input, vsock); the block device's queue is
/// larger so that many requests are in flight at once.
pub const QUEUE_SIZE: u16 = 8;

/// Why a device could not be used.
#[allow(dead_code)] // fields are read through Debug in the error line
#[derive(Debug, Clone, Copy)]
pub enum VirtioError {
    NotVirtio,
    WrongDevice {
        found: u32,
    },
    FeaturesRefused,
    QueueUnavailable,
    /// More buffers than the queue has free descriptors.
    QueueFull,
    Timeout,
    Empty,
    /// The device returned a descriptor that heads no chain in flight.
    BadUsedEntry {
        id: u32,
    },
}

#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// The used ring (written by the device; 4-byte aligned as virtio 1.x requires).
#[repr(C, align(4))]
pub struct UsedRing<const N: usize> {
    pub flags: u16,
    pub idx: u16,
    pub ring: [[u32; 2]; N],
    /// With VIRTIO_RING_F_EVENT_IDX: the device wants a doorbell once the available index
    /// passes this.
    pub avail_event: u16,
}

/// A split queue of `N` descriptors: descriptor table, available ring and used ring, one
/// after the other (virtio 1.x lets each part sit anywhere at its own alignment).
#[repr(C, align(4096))]
pub struct SplitQueue<const N: usize = { QUEUE_SIZE as usize }> {
    pub descriptors: [Descriptor; N],
    pub avail_flags: u16,
    pub avail_idx: u16,
    pub avail_ring: [u16; N],
    /// With VIRTIO_RING_F_EVENT_IDX: the driver wants an interrupt once the used index
    /// passes this.
    pub used_event: u16,
    pub used: UsedRing<N>,
}

/// A split queue's memory, all zero.
pub const fn empty_queue<const N: usize>() -> SplitQueue<N> {
    SplitQueue {
        descriptors: [Descriptor { addr: 0, len: 0, flags: 0, next: 0 }; N],
        avail_flags: 0,
        avail_idx: 0,
        avail_ring: [0; N],
        used_event: 0,
        used: UsedRing { flags: 0, idx: 0, ring: [[0; 2]; N], avail_event: 0 },
    }
}

impl<const N: usize> SplitQueue<N> {
    /// The device's used index, read volatile: the device writes it behind our back.
    fn used_idx(&self) -> u16 {
        // SAFETY: a plain u16 inside this live queue.
        unsafe { core::ptr::addr_of!(self.used.idx).read_volatile() }
    }

    /// The used-ring entry at `position` (taken modulo N), as (id, len).
    fn used_entry(&self, position: u16) -> (u32, u32) {
        let slot = usize::from(position) % N;
        // SAFETY: slot < N, inside this live queue; the device wrote it before it
        // published the used index the caller read (the caller fences in between).
        let [id, len] = unsafe { core::ptr::addr_of!(self.used.ring[slot]).read_volatile() };
        (id, len)
    }
}

static RNG_QUEUE: GuestCell<SplitQueue> = GuestCell::new(empty_queue());

/// A virtio-mmio device window.
pub struct MmioDevice {
    base: usize,
    /// The feature bits 0..31 both sides agreed on.
    features: u32,
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
        let mut device = MmioDevice { base: base as usize, features: 0 };
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
        device.features = device.read(DEVICE_FEATURES) & features;
        device.write(DRIVER_FEATURES_SEL, 0);
        device.write(DRIVER_FEATURES, device.features);
        device.write(DRIVER_FEATURES_SEL, 1);
        device.write(DRIVER_FEATURES, VERSION_1_HIGH);
        device.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if device.read(STATUS) & FEATURES_OK == 0 {
            return Err(VirtioError::FeaturesRefused);
        }
        Ok(device)
    }

    /// Whether feature `bit` (below 32) was negotiated.
    pub fn has_feature(&self, bit: u32) -> bool {
        self.features & (1 << bit) != 0
    }

    /// Sets up queue `index` on `ring`.
    pub fn setup_queue<const N: usize>(
        &self,
        index: u32,
        ring: &'static GuestCell<SplitQueue<N>>,
    ) -> Result<Virtqueue<N>, VirtioError> {
        const { assert!(N.is_power_of_two() && N <= 32768, "a split queue's size is a power of two up to 32768") };
        self.write(QUEUE_SEL, index);
        if (self.read(QUEUE_NUM_MAX) as usize) < N {
            return Err(VirtioError::QueueUnavailable);
        }
        let address = ring.get() as *const SplitQueue<N> as u64;
        let avail = address + core::mem::offset_of!(SplitQueue<N>, avail_flags) as u64;
        let used = address + core::mem::offset_of!(SplitQueue<N>, used) as u64;
        self.write(QUEUE_NUM, N as u32);
        self.write(QUEUE_DESC_LOW, address as u32);
        self.write(QUEUE_DESC_HIGH, (address >> 32) as u32);
        self.write(QUEUE_AVAIL_LOW, avail as u32);
        self.write(QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        self.write(QUEUE_USED_LOW, used as u32);
        self.write(QUEUE_USED_HIGH, (used >> 32) as u32);
        self.write(QUEUE_READY, 1);
        Ok(Virtqueue::new(ring, index))
    }

    /// Reads a 32-bit word of device configuration space.
    pub fn read_config(&self, offset: usize) -> u32 {
        self.read(0x100 + offset)
    }

    /// Tells the device the driver is ready.
    pub fn activate(&self) {
        self.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    /// Resets the device: it stops using every queue and every buffer it was given.
    pub fn reset(&self) {
        self.write(STATUS, 0);
    }

    pub fn notify(&self, queue: u16) {
        self.write(QUEUE_NOTIFY, u32::from(queue));
    }
}

/// Drains the used ring of a queue whose descriptor `i` permanently holds buffer `i`
/// (receive queues): calls `handle(buffer index, bytes written)` for each returned buffer
/// and posts it again. Returns whether any buffer was re-posted (the caller rings the
/// doorbell once for the batch).
pub fn drain_used<const N: usize>(
    ring: &GuestCell<SplitQueue<N>>,
    seen: &mut u16,
    mut handle: impl FnMut(usize, usize),
) -> bool {
    let queue = ring.get();
    let mut reposted = false;
    loop {
        if queue.used_idx() == *seen {
            return reposted;
        }
        fence(Ordering::SeqCst);
        let (id, len) = queue.used_entry(*seen);
        *seen = seen.wrapping_add(1);
        let slot = id as usize % N;
        handle(slot, len as usize);
        queue.avail_ring[usize::from(queue.avail_idx) % N] = slot as u16;
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

/// A queue of chains in flight: [`push`](Virtqueue::push) chains, [`kick`](Virtqueue::kick)
/// once, [`pop_used`](Virtqueue::pop_used) completions in whatever order the device
/// returns them. Free descriptors are kept on a list of our own, so what the device
/// writes into the shared table can never misdirect it.
pub struct Virtqueue<const N: usize = { QUEUE_SIZE as usize }> {
    ring: &'static GuestCell<SplitQueue<N>>,
    index: u32,
    /// First free descriptor; `next` links the free list and each chain in flight.
    free_head: u16,
    free_count: usize,
    next: [u16; N],
    /// Length of the chain each descriptor heads while it is in flight, else 0.
    chain_len: [u16; N],
    /// The next used-ring position to read.
    last_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    event_idx: bool,
    /// The driver polls: no interrupts wanted.
    polled: bool,
    /// The available index the device saw at the last kick.
    kicked_at: u16,
}

impl<const N: usize> Virtqueue<N> {
    fn new(ring: &'static GuestCell<SplitQueue<N>>, index: u32) -> Virtqueue<N> {
        Virtqueue {
            ring,
            index,
            free_head: 0,
            free_count: N,
            next: core::array::from_fn(|slot| ((slot + 1) % N) as u16),
            chain_len: [0; N],
            last_used: ring.get().used_idx(),
            event_idx: false,
            polled: false,
            kicked_at: ring.get().avail_idx,
        }
    }

    /// Uses `avail_event` and `used_event` (the device offered and the driver
    /// negotiated VIRTIO_RING_F_EVENT_IDX): a doorbell only when the device asked for
    /// one, which it does only before it sleeps.
    pub fn use_event_idx(&mut self) {
        self.event_idx = true;
        self.ask_no_interrupt();
    }

    /// With event idx, a polling driver keeps `used_event` half the index space ahead of
    /// the entries it has read. The device's used index stays within N of them, so no
    /// batch reaches it. (Just behind them is not enough: the driver reads entries while
    /// the device is still adding the batch they belong to, which would then cross it.)
    fn ask_no_interrupt(&mut self) {
        if self.event_idx && self.polled {
            let queue = self.ring.get();
            let far = self.last_used.wrapping_add(0x8000);
            // SAFETY: used_event is read by the device; a volatile store publishes it.
            unsafe { core::ptr::addr_of_mut!(queue.used_event).write_volatile(far) };
        }
    }

    /// Asks the device not to interrupt for this queue: the driver polls it.
    pub fn suppress_interrupts(&mut self) {
        self.ring.get().avail_flags = AVAIL_F_NO_INTERRUPT;
        self.polled = true;
        self.ask_no_interrupt();
    }

    /// Places `chain` on the available ring (not yet visible to the device: see
    /// [`kick`](Virtqueue::kick)); returns its head, the id its completion will carry.
    pub fn push(&mut self, chain: &[Buffer]) -> Result<u16, VirtioError> {
        if chain.is_empty() || chain.len() > self.free_count {
            return Err(VirtioError::QueueFull);
        }
        let queue = self.ring.get();
        let head = self.free_head;
        let mut index = head;
        for (position, buffer) in chain.iter().enumerate() {
            let last = position + 1 == chain.len();
            let next = self.next[usize::from(index)];
            queue.descriptors[usize::from(index)] = Descriptor {
                addr: buffer.addr,
                len: buffer.len,
                flags: if buffer.writable { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT },
                next: if last { 0 } else { next },
            };
            if last {
                self.free_head = next;
            }
            index = next;
        }
        self.free_count -= chain.len();
        self.chain_len[usize::from(head)] = chain.len() as u16;
        queue.avail_ring[usize::from(queue.avail_idx) % N] = head;
        // The index itself is published by kick, after a fence.
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        Ok(head)
    }

    /// Publishes every pushed chain and rings the doorbell, unless the device said it
    /// is working through the ring anyway (VRING_USED_F_NO_NOTIFY, or with event idx an
    /// `avail_event` these chains do not pass): a doorbell is a VM exit.
    pub fn kick(&mut self, device: &MmioDevice) {
        let queue = self.ring.get();
        fence(Ordering::SeqCst);
        // SAFETY: avail_idx is read by the device; a volatile store publishes it.
        unsafe { core::ptr::addr_of_mut!(queue.avail_idx).write_volatile(queue.avail_idx) };
        fence(Ordering::SeqCst);
        let (new, old) = (queue.avail_idx, self.kicked_at);
        self.kicked_at = new;
        let wanted = if self.event_idx {
            // SAFETY: avail_event is written by the device; read it volatile.
            let event = unsafe { core::ptr::addr_of!(queue.used.avail_event).read_volatile() };
            // The device asked for a doorbell once the index passes `event`: did this
            // batch (old..new) pass it?
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            // SAFETY: used_flags is written by the device; read it volatile.
            let used_flags = unsafe { core::ptr::addr_of!(queue.used.flags).read_volatile() };
            used_flags & USED_F_NO_NOTIFY == 0
        };
        if wanted {
            device.notify(self.index as u16);
        }
    }

    /// The next completion, as (head, length the device wrote), or `None` when the
    /// device has returned nothing new. Its descriptors are free again.
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, VirtioError> {
        let queue = self.ring.get();
        if queue.used_idx() == self.last_used {
            return Ok(None);
        }
        fence(Ordering::SeqCst);
        let (id, len) = queue.used_entry(self.last_used);
        self.last_used = self.last_used.wrapping_add(1);
        let length = match self.chain_len.get(id as usize) {
            Some(&length) if length > 0 => length,
            _ => return Err(VirtioError::BadUsedEntry { id }),
        };
        let head = id as u16;
        let mut tail = head;
        for _ in 1..length {
            tail = self.next[usize::from(tail)];
        }
        self.next[usize::from(tail)] = self.free_head;
        self.free_head = head;
        self.free_count += usize::from(length);
        self.chain_len[usize::from(head)] = 0;
        self.ask_no_interrupt();
        Ok(Some((head, len)))
    }

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
    /// length the device wrote into the last one. All chains together hold at most `N`
    /// buffers.
    pub fn submit_batch_and_wait(
        &mut self,
        device: &MmioDevice,
        chains: &[&[Buffer]],
        timeout_cycles: u64,
    ) -> Result<u32, VirtioError> {
        self.submit_batch_and_wait_with(device, chains, timeout_cycles, &mut || core::hint::spin_loop())
    }

    /// As [`submit_batch_and_wait`](Self::submit_batch_and_wait), calling `idle` each time
    /// the device has not answered yet: a spin, or a sleep until an interrupt.
    pub fn submit_batch_and_wait_with(
        &mut self,
        device: &MmioDevice,
        chains: &[&[Buffer]],
        timeout_cycles: u64,
        idle: &mut dyn FnMut(),
    ) -> Result<u32, VirtioError> {
        let total: usize = chains.iter().map(|chain| chain.len()).sum();
        if chains.is_empty() || chains.iter().any(|chain| chain.is_empty()) || total > N {
            return Err(VirtioError::QueueUnavailable);
        }
        // Chains an earlier call gave up waiting for may have come back since.
        while self.free_count < total && self.pop_used()?.is_some() {}
        let mut waiting = [false; N];
        let mut last_head = 0;
        for chain in chains {
            last_head = self.push(chain)?;
            waiting[usize::from(last_head)] = true;
        }
        self.kick(device);
        let mut left = chains.len();
        let mut last_len = 0;
        let start = crate::rdtsc();
        while left > 0 {
            match self.pop_used()? {
                Some((head, len)) if waiting[usize::from(head)] => {
                    waiting[usize::from(head)] = false;
                    left -= 1;
                    if head == last_head {
                        last_len = len;
                    }
                }
                // A chain an earlier call timed out on: its descriptors are free now.
                Some(_) => {}
                None if crate::rdtsc().wrapping_sub(start) > timeout_cycles => return Err(VirtioError::Timeout),
                None => idle(),
            }
        }
        Ok(last_len)
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

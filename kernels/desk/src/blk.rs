//! virtio-blk driver: one request queue of 128 descriptors, polled (with event idx when
//! the device offers it, so doorbells go only where the device asks for one), with up to
//! [`MAX_IN_FLIGHT`] requests in flight (header, data, status: three descriptors each),
//! completed in whatever order the device returns them.
//!
//! Requests are checked before they go out (range, read-only, negotiated features), the
//! status byte of each is checked when it comes back, and every device error is returned,
//! never a panic. A device that stops answering or returns a descriptor we never gave it
//! is reset (so it lets go of every buffer) and given up: later requests fail at once.
//!
//! [`Block`] implements deskfs's `BlockDevice`, so the file store runs on it directly.

use core::fmt;

use carrel_deskfs::{BlockDevice, DeviceError, BLOCK_SIZE};

use crate::virtio::{self, empty_queue, Buffer, MmioDevice, SplitQueue, VirtioError, Virtqueue};
use crate::{println, GuestCell};

/// Most block devices Desk drives.
pub const MAX_DISKS: usize = 4;
const QUEUE_SIZE: usize = 128;
/// Requests in flight at once, at most.
pub const MAX_IN_FLIGHT: usize = 32;
pub const SECTOR_SIZE: usize = 512;
/// Largest data buffer of one request.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// What the file store's reads and writes are cut into: 16 MiB go out as 64 requests,
/// 32 in flight.
const STORE_REQUEST_BYTES: usize = 256 << 10;
const SECTORS_PER_BLOCK: u64 = (BLOCK_SIZE / SECTOR_SIZE) as u64;

mod feature {
    pub const SEG_MAX: u32 = 2;
    pub const RO: u32 = 5;
    pub const BLK_SIZE: u32 = 6;
    pub const FLUSH: u32 = 9;
    pub const DISCARD: u32 = 13;
    pub const WRITE_ZEROES: u32 = 14;
}

mod kind {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

const STATUS_OK: u8 = 0;
const STATUS_IOERR: u8 = 1;
const STATUS_UNSUPP: u8 = 2;
/// What a status byte holds until the device writes it.
const STATUS_PENDING: u8 = 0xff;
/// Bytes of the device's id string.
pub const ID_BYTES: usize = 20;

fn kind_name(kind: u32) -> &'static str {
    match kind {
        kind::IN => "read",
        kind::OUT => "write",
        kind::FLUSH => "flush",
        kind::GET_ID => "get-id",
        kind::DISCARD => "discard",
        kind::WRITE_ZEROES => "write-zeroes",
        _ => "request",
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RequestHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

/// `struct virtio_blk_discard_write_zeroes`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Segment {
    sector: u64,
    sectors: u32,
    flags: u32,
}

/// The memory the device reads (header, segment) and writes (status) for each request
/// slot in flight.
struct Slots {
    headers: [RequestHeader; MAX_IN_FLIGHT],
    segments: [Segment; MAX_IN_FLIGHT],
    statuses: [u8; MAX_IN_FLIGHT],
}

static QUEUES: [GuestCell<SplitQueue<QUEUE_SIZE>>; MAX_DISKS] = [const { GuestCell::new(empty_queue()) }; MAX_DISKS];
static SLOTS: [GuestCell<Slots>; MAX_DISKS] = [const {
    GuestCell::new(Slots {
        headers: [RequestHeader { kind: 0, reserved: 0, sector: 0 }; MAX_IN_FLIGHT],
        segments: [Segment { sector: 0, sectors: 0, flags: 0 }; MAX_IN_FLIGHT],
        statuses: [0; MAX_IN_FLIGHT],
    })
}; MAX_DISKS];

/// One request with its own buffer.
pub enum Request<'a> {
    Read { sector: u64, buffer: &'a mut [u8] },
    Write { sector: u64, data: &'a [u8] },
    Flush,
    GetId { buffer: &'a mut [u8; ID_BYTES] },
    Discard { sector: u64, sectors: u32 },
    WriteZeroes { sector: u64, sectors: u32 },
}

/// A read or a write whose buffer is the request's slot in a pool (see
/// [`Block::run_pooled`]).
#[derive(Clone, Copy)]
pub enum PooledRequest {
    Read { sector: u64 },
    Write { sector: u64 },
}

#[derive(Debug, Clone, Copy)]
pub enum BlockError {
    Virtio(VirtioError),
    /// Feature negotiation or queue setup failed.
    Setup(VirtioError),
    TooManyDisks,
    /// The device answered VIRTIO_BLK_S_IOERR.
    Io {
        request: &'static str,
        sector: u64,
    },
    /// The device answered VIRTIO_BLK_S_UNSUPP.
    Unsupported {
        request: &'static str,
    },
    /// The device wrote a status byte virtio-blk does not define (or none).
    BadStatus {
        request: &'static str,
        status: u8,
    },
    ReadOnly,
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    NotOffered {
        feature: &'static str,
    },
    BadLength {
        len: usize,
    },
    /// The device stopped answering or returned garbage; it was reset and given up.
    GivenUp,
}

impl From<VirtioError> for BlockError {
    fn from(err: VirtioError) -> Self {
        BlockError::Virtio(err)
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockError::Virtio(err) => write!(f, "virtio error {err:?}"),
            BlockError::Setup(err) => write!(f, "device setup failed: {err:?}"),
            BlockError::TooManyDisks => write!(f, "Desk drives at most {MAX_DISKS} disks"),
            BlockError::Io { request, sector } => write!(f, "the device failed a {request} at sector {sector}"),
            BlockError::Unsupported { request } => write!(f, "the device does not support {request}"),
            BlockError::BadStatus { request, status } => {
                write!(f, "the device answered a {request} with status {status:#x}")
            }
            BlockError::ReadOnly => write!(f, "the disk is read-only"),
            BlockError::OutOfRange { sector, sectors, capacity } => {
                write!(f, "sectors {sector}..{} are past the end of the disk ({capacity} sectors)", sector + sectors)
            }
            BlockError::NotOffered { feature } => write!(f, "the device does not offer {feature}"),
            BlockError::BadLength { len } => write!(f, "{len} bytes is not a whole number of sectors"),
            BlockError::GivenUp => write!(f, "the device stopped answering and was given up"),
        }
    }
}

/// A request as the queue sees it.
struct Raw {
    kind: u32,
    sector: u64,
    data: Option<Buffer>,
    segment: Option<Segment>,
}

/// What a request is checked against before it goes out.
#[derive(Clone, Copy)]
struct Limits {
    capacity: u64,
    read_only: bool,
    flush: bool,
    discard: bool,
    write_zeroes: bool,
}

impl Limits {
    fn check_range(&self, sector: u64, sectors: u64) -> Result<(), BlockError> {
        match sector.checked_add(sectors) {
            Some(end) if end <= self.capacity => Ok(()),
            _ => Err(BlockError::OutOfRange { sector, sectors, capacity: self.capacity }),
        }
    }

    /// A read or write of `len` bytes at `addr`.
    fn data(&self, kind: u32, sector: u64, addr: u64, len: usize) -> Result<Raw, BlockError> {
        if len == 0 || !len.is_multiple_of(SECTOR_SIZE) || len > MAX_REQUEST_BYTES {
            return Err(BlockError::BadLength { len });
        }
        // Checked above: the length fits a descriptor.
        let buffer = Buffer { addr, len: len as u32, writable: kind == kind::IN };
        if kind == kind::OUT && self.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.check_range(sector, (len / SECTOR_SIZE) as u64)?;
        Ok(Raw { kind, sector, data: Some(buffer), segment: None })
    }

    fn ranged(&self, kind: u32, sector: u64, sectors: u32, offered: bool) -> Result<Raw, BlockError> {
        if !offered {
            return Err(BlockError::NotOffered { feature: kind_name(kind) });
        }
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.check_range(sector, u64::from(sectors))?;
        Ok(Raw { kind, sector: 0, data: None, segment: Some(Segment { sector, sectors, flags: 0 }) })
    }

    /// The request as the queue will carry it; `None` for one with nothing to do (a
    /// flush on a device without a write cache to flush).
    fn prepare(&self, request: Request<'_>) -> Result<Option<Raw>, BlockError> {
        Ok(Some(match request {
            Request::Read { sector, buffer } => {
                self.data(kind::IN, sector, buffer.as_mut_ptr() as u64, buffer.len())?
            }
            Request::Write { sector, data } => self.data(kind::OUT, sector, data.as_ptr() as u64, data.len())?,
            Request::Flush if !self.flush => return Ok(None),
            Request::Flush => Raw { kind: kind::FLUSH, sector: 0, data: None, segment: None },
            Request::GetId { buffer } => {
                Raw { kind: kind::GET_ID, sector: 0, data: Some(Buffer::writable(buffer)), segment: None }
            }
            Request::Discard { sector, sectors } => self.ranged(kind::DISCARD, sector, sectors, self.discard)?,
            Request::WriteZeroes { sector, sectors } => {
                self.ranged(kind::WRITE_ZEROES, sector, sectors, self.write_zeroes)?
            }
        }))
    }
}

pub struct Block {
    /// Position among the block devices of BootInfo (disk 0 holds the store).
    pub index: usize,
    device: MmioDevice,
    queue: Virtqueue<QUEUE_SIZE>,
    slots: &'static GuestCell<Slots>,
    limits: Limits,
    /// The device's preferred block size (VIRTIO_BLK_F_BLK_SIZE), else 512.
    pub block_size: u32,
    /// Most data segments per request the device takes (VIRTIO_BLK_F_SEG_MAX), else 0.
    pub seg_max: u32,
    timeout_cycles: u64,
    given_up: bool,
    /// The slot of the request each descriptor heads, while it is in flight.
    slot_of: [u8; QUEUE_SIZE],
    /// Bit `s` set while slot `s` is in flight.
    busy: u32,
}

impl Block {
    /// Drives the `index`th block device at `base`; requests wait up to
    /// `timeout_cycles` for the device.
    pub fn new(base: u64, index: usize, timeout_cycles: u64) -> Result<Block, BlockError> {
        if index >= MAX_DISKS {
            return Err(BlockError::TooManyDisks);
        }
        let wanted = [
            feature::SEG_MAX,
            feature::RO,
            feature::BLK_SIZE,
            feature::FLUSH,
            feature::DISCARD,
            feature::WRITE_ZEROES,
            virtio::F_EVENT_IDX,
        ]
        .iter()
        .fold(0, |bits, bit| bits | (1 << bit));
        let device =
            MmioDevice::negotiate(base, carrel_firmware::virtio_id::BLOCK, wanted).map_err(BlockError::Setup)?;
        let capacity = u64::from(device.read_config(0)) | (u64::from(device.read_config(4)) << 32);
        let seg_max = if device.has_feature(feature::SEG_MAX) { device.read_config(12) } else { 0 };
        let block_size = if device.has_feature(feature::BLK_SIZE) { device.read_config(20) } else { 512 };
        let mut queue = device.setup_queue(0, &QUEUES[index]).map_err(BlockError::Setup)?;
        queue.suppress_interrupts();
        if device.has_feature(virtio::F_EVENT_IDX) {
            queue.use_event_idx();
        }
        device.activate();
        Ok(Block {
            index,
            limits: Limits {
                capacity,
                read_only: device.has_feature(feature::RO),
                flush: device.has_feature(feature::FLUSH),
                discard: device.has_feature(feature::DISCARD),
                write_zeroes: device.has_feature(feature::WRITE_ZEROES),
            },
            device,
            queue,
            slots: &SLOTS[index],
            block_size,
            seg_max,
            timeout_cycles,
            given_up: false,
            slot_of: [0; QUEUE_SIZE],
            busy: 0,
        })
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.limits.capacity * SECTOR_SIZE as u64
    }

    pub fn is_read_only(&self) -> bool {
        self.limits.read_only
    }

    /// The optional features the device offers, by name.
    pub fn feature_names(&self) -> impl Iterator<Item = &'static str> {
        let limits = self.limits;
        [(limits.flush, "flush"), (limits.discard, "discard"), (limits.write_zeroes, "write-zeroes")]
            .into_iter()
            .filter_map(|(offered, name)| offered.then_some(name))
    }

    /// Runs `requests` with up to `depth` in flight (1 to [`MAX_IN_FLIGHT`]). On the
    /// first error no more requests go out; those in flight are waited for, and the
    /// error is returned.
    pub fn run<'a>(&mut self, requests: impl IntoIterator<Item = Request<'a>>, depth: usize) -> Result<(), BlockError> {
        let limits = self.limits;
        let mut requests = requests.into_iter();
        self.execute(depth, |_| loop {
            match requests.next() {
                None => return None,
                Some(request) => match limits.prepare(request) {
                    Ok(None) => continue,
                    Ok(Some(raw)) => return Some(Ok(raw)),
                    Err(err) => return Some(Err(err)),
                },
            }
        })
    }

    /// Runs reads and writes of `request_bytes` each, up to `depth` in flight, whose
    /// buffers are slots of `pool`: a request in slot `s` reads into (or writes from)
    /// `pool[s * request_bytes..][..request_bytes]`, and no two requests in flight share
    /// a slot. For benchmarks: what reads bring in is overwritten by later reads.
    pub fn run_pooled(
        &mut self,
        pool: &mut [u8],
        request_bytes: usize,
        requests: impl IntoIterator<Item = PooledRequest>,
        depth: usize,
    ) -> Result<(), BlockError> {
        let depth = depth.clamp(1, MAX_IN_FLIGHT);
        if pool.len() < depth * request_bytes {
            return Err(BlockError::BadLength { len: pool.len() });
        }
        let limits = self.limits;
        let base = pool.as_mut_ptr() as u64;
        let mut requests = requests.into_iter();
        // `pool` stays borrowed for the whole call: nothing else touches it while the
        // device reads and writes it.
        self.execute(depth, |slot| {
            let (kind, sector) = match requests.next()? {
                PooledRequest::Read { sector } => (kind::IN, sector),
                PooledRequest::Write { sector } => (kind::OUT, sector),
            };
            Some(limits.data(kind, sector, base + (slot * request_bytes) as u64, request_bytes))
        })
    }

    /// The request loop: `next(slot)` gives the request to place in free `slot` (always
    /// below `depth`), `None` when there are no more.
    fn execute(
        &mut self,
        depth: usize,
        mut next: impl FnMut(usize) -> Option<Result<Raw, BlockError>>,
    ) -> Result<(), BlockError> {
        if self.given_up {
            return Err(BlockError::GivenUp);
        }
        let depth = depth.clamp(1, MAX_IN_FLIGHT);
        let mut first_error = None;
        let mut more = true;
        let mut in_flight = 0;
        loop {
            let mut pushed = false;
            while more && first_error.is_none() && in_flight < depth {
                // With fewer than `depth` in flight a slot below `depth` is free.
                let slot = (!self.busy).trailing_zeros() as usize;
                match next(slot) {
                    None => more = false,
                    Some(Err(err)) => first_error = Some(err),
                    Some(Ok(raw)) => match self.push(slot, raw) {
                        Ok(()) => {
                            in_flight += 1;
                            pushed = true;
                        }
                        Err(err) => first_error = Some(err),
                    },
                }
            }
            if pushed {
                self.queue.kick(&self.device);
            }
            if in_flight == 0 {
                return first_error.map_or(Ok(()), Err);
            }
            // Wait for one, then take every other that is done too: the slots they free
            // are refilled under one doorbell, not one each (a doorbell is a VM exit).
            let mut head = Some(self.wait_for_completion()?);
            while let Some(done) = head {
                in_flight -= 1;
                if let Err(err) = self.complete(done) {
                    first_error.get_or_insert(err);
                }
                head = match self.queue.pop_used() {
                    Ok(next) => next.map(|(head, _)| head),
                    Err(_) => return Err(self.give_up("returned a descriptor that was not in flight")),
                };
            }
        }
    }

    fn push(&mut self, slot: usize, raw: Raw) -> Result<(), BlockError> {
        let slots = self.slots.get();
        slots.headers[slot] = RequestHeader { kind: raw.kind, reserved: 0, sector: raw.sector };
        slots.statuses[slot] = STATUS_PENDING;
        let mut chain = [Buffer::readable(&slots.headers[slot]); 3];
        let mut count = 1;
        if let Some(segment) = raw.segment {
            slots.segments[slot] = segment;
            chain[count] = Buffer::readable(&slots.segments[slot]);
            count += 1;
        }
        if let Some(data) = raw.data {
            chain[count] = data;
            count += 1;
        }
        chain[count] = Buffer::writable(&mut slots.statuses[slot]);
        count += 1;
        let head = self.queue.push(&chain[..count])?;
        self.slot_of[usize::from(head)] = slot as u8;
        self.busy |= 1 << slot;
        Ok(())
    }

    /// Polls until the device returns a request; gives the device up when it takes
    /// longer than the timeout or returns a descriptor that is not in flight.
    fn wait_for_completion(&mut self) -> Result<u16, BlockError> {
        let start = crate::rdtsc();
        loop {
            match self.queue.pop_used() {
                Ok(Some((head, _))) => return Ok(head),
                Ok(None) if crate::rdtsc().wrapping_sub(start) > self.timeout_cycles => {
                    return Err(self.give_up("did not answer in time"));
                }
                Ok(None) => core::hint::spin_loop(),
                Err(err) => {
                    return Err(self.give_up(if matches!(err, VirtioError::BadUsedEntry { .. }) {
                        "returned a descriptor that was not in flight"
                    } else {
                        "broke its queue"
                    }))
                }
            }
        }
    }

    /// Resets the device, so it uses none of the buffers in flight any longer.
    fn give_up(&mut self, why: &str) -> BlockError {
        self.device.reset();
        self.given_up = true;
        println!("desk: disk {}: the device {why}; it is reset and given up", self.index);
        BlockError::GivenUp
    }

    /// Frees the slot of the request `head` began and reads its status.
    fn complete(&mut self, head: u16) -> Result<(), BlockError> {
        let slot = usize::from(self.slot_of[usize::from(head)]);
        self.busy &= !(1 << slot);
        let slots = self.slots.get();
        // SAFETY: a byte of our static slot memory the device wrote before returning the
        // request; read volatile because the device wrote it, not the program.
        let status = unsafe { core::ptr::addr_of!(slots.statuses[slot]).read_volatile() };
        let header = slots.headers[slot];
        let request = kind_name(header.kind);
        match status {
            STATUS_OK => Ok(()),
            STATUS_IOERR => Err(BlockError::Io { request, sector: header.sector }),
            STATUS_UNSUPP => Err(BlockError::Unsupported { request }),
            status => Err(BlockError::BadStatus { request, status }),
        }
    }

    /// Reads `buffer.len()` bytes (whole sectors) from `sector` on, in requests of
    /// `request_bytes`, up to `depth` in flight.
    pub fn read(
        &mut self,
        sector: u64,
        buffer: &mut [u8],
        request_bytes: usize,
        depth: usize,
    ) -> Result<(), BlockError> {
        let step = (request_bytes / SECTOR_SIZE) as u64;
        let requests = buffer
            .chunks_mut(request_bytes)
            .enumerate()
            .map(|(index, buffer)| Request::Read { sector: sector + index as u64 * step, buffer });
        self.run(requests, depth)
    }

    /// Writes `data` (whole sectors) from `sector` on, like [`Block::read`].
    pub fn write(&mut self, sector: u64, data: &[u8], request_bytes: usize, depth: usize) -> Result<(), BlockError> {
        let step = (request_bytes / SECTOR_SIZE) as u64;
        let requests = data
            .chunks(request_bytes)
            .enumerate()
            .map(|(index, data)| Request::Write { sector: sector + index as u64 * step, data });
        self.run(requests, depth)
    }

    /// Makes every write completed so far durable.
    pub fn flush(&mut self) -> Result<(), BlockError> {
        self.run([Request::Flush], 1)
    }

    /// The device's id string (`None` when it has none).
    pub fn id(&mut self) -> Result<Option<alloc::string::String>, BlockError> {
        let mut buffer = [0u8; ID_BYTES];
        match self.run([Request::GetId { buffer: &mut buffer }], 1) {
            Ok(()) => {}
            Err(BlockError::Unsupported { .. }) => return Ok(None),
            Err(err) => return Err(err),
        }
        let len = buffer.iter().position(|&byte| byte == 0).unwrap_or(ID_BYTES);
        let text: alloc::string::String = buffer[..len]
            .iter()
            .map(|&byte| if byte.is_ascii_graphic() || byte == b' ' { byte as char } else { '?' })
            .collect();
        Ok((!text.is_empty()).then_some(text))
    }

    /// Tells the device `sectors` sectors from `sector` on hold nothing worth keeping.
    pub fn discard(&mut self, sector: u64, sectors: u32) -> Result<(), BlockError> {
        self.run([Request::Discard { sector, sectors }], 1)
    }

    /// Makes `sectors` sectors from `sector` on read as zeros.
    pub fn write_zeroes(&mut self, sector: u64, sectors: u32) -> Result<(), BlockError> {
        self.run([Request::WriteZeroes { sector, sectors }], 1)
    }
}

fn device_error(err: BlockError) -> DeviceError {
    DeviceError(alloc::format!("{err}"))
}

impl BlockDevice for Block {
    fn block_count(&self) -> u64 {
        self.limits.capacity / SECTORS_PER_BLOCK
    }

    fn read(&mut self, block: u64, buffer: &mut [u8]) -> Result<(), DeviceError> {
        Block::read(self, block * SECTORS_PER_BLOCK, buffer, STORE_REQUEST_BYTES, MAX_IN_FLIGHT).map_err(device_error)
    }

    fn write(&mut self, block: u64, data: &[u8]) -> Result<(), DeviceError> {
        Block::write(self, block * SECTORS_PER_BLOCK, data, STORE_REQUEST_BYTES, MAX_IN_FLIGHT).map_err(device_error)
    }

    fn flush(&mut self) -> Result<(), DeviceError> {
        Block::flush(self).map_err(device_error)
    }

    fn read_only(&self) -> bool {
        self.limits.read_only
    }
}

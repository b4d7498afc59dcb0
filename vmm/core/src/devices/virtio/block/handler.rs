//! Request queue processing: no epoll, no KVM, testable with a mock queue.
//!
//! Each descriptor chain is parsed and checked ([`parse_request`]) before anything
//! touches the disk: the header is device-readable, the status byte device-writable,
//! data buffers point the way the request type needs, lengths are whole sectors and the
//! range lies on the disk. A request that fails a check completes at once with IOERR (or
//! UNSUPP for an unknown type); a chain without a status byte is returned unused. Reads
//! and writes go to the [`Engine`] straight from and into guest memory; flush, get-id,
//! discard and write-zeroes complete synchronously.

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

use super::io::{Completion, Engine, Transfer};
use crate::disk::{Disk, Extent};
use crate::memory::GuestMemoryMmap;

pub const SECTOR_SIZE: u64 = 512;
/// Most data one request may carry.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;
/// Most discard or write-zeroes segments one request may carry.
pub const MAX_SEGMENTS: u32 = 16;
const HEADER_BYTES: u32 = 16;
const SEGMENT_BYTES: u64 = 16;

/// What a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

/// A checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub head: u16,
    pub kind: RequestKind,
    pub sector: u64,
    /// Data buffers in order: guest address and length.
    pub data: Vec<(GuestAddress, u32)>,
    pub data_len: u64,
    pub status: GuestAddress,
}

/// Why a chain is not a request the disk can serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the chain has no device-writable status byte at its end")]
    NoStatus,
    #[error("the header is missing, device-writable or shorter than 16 bytes")]
    BadHeader,
    #[error("the header is not in guest memory")]
    UnreadableHeader,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("a data buffer points the wrong way for the request")]
    WrongDirection,
    #[error("the data is not a whole number of sectors (or of discard segments)")]
    BadLength,
    #[error("the request carries more than the device takes")]
    TooLarge,
    #[error("sectors {sector}+{sectors} are past the disk's end")]
    OutOfRange { sector: u64, sectors: u64 },
    #[error("a discard or write-zeroes segment is malformed")]
    BadSegment,
    #[error("the disk is read-only")]
    ReadOnly,
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// Parses and checks one chain against a disk of `capacity` bytes. On error, the status
/// byte's address comes back too when the chain has one.
pub fn parse_request<M>(
    chain: DescriptorChain<M>,
    memory: &GuestMemoryMmap,
    capacity: u64,
    readonly: bool,
) -> Result<Request, (Option<GuestAddress>, RequestError)>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut data = Vec::new();
    let parsed = parse_into(chain, memory, capacity, readonly, &mut data)?;
    Ok(Request {
        head: parsed.head,
        kind: parsed.kind,
        sector: parsed.sector,
        data,
        data_len: parsed.data_len,
        status: parsed.status,
    })
}

/// A checked request whose data buffers are in a scratch list the caller owns.
#[derive(Debug, Clone, Copy)]
struct Parsed {
    head: u16,
    kind: RequestKind,
    sector: u64,
    data_len: u64,
    status: GuestAddress,
}

/// [`parse_request`] with the data buffers put in `data` (cleared first), so that the
/// request path reuses one list instead of allocating per request.
fn parse_into<M>(
    chain: DescriptorChain<M>,
    memory: &GuestMemoryMmap,
    capacity: u64,
    readonly: bool,
    data: &mut Vec<(GuestAddress, u32)>,
) -> Result<Parsed, (Option<GuestAddress>, RequestError)>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    data.clear();
    // Every descriptor after the header goes into `data` with its direction; the last
    // one must end in the status byte and is split off once the chain has ended.
    let mut header = None;
    let mut count = 0usize;
    // Device-writable descriptors after the header (the status one among them).
    let mut writable_data = 0usize;
    let mut last_writable = false;
    for descriptor in chain {
        count += 1;
        if count == 1 {
            header = Some((descriptor.addr(), descriptor.len(), descriptor.is_write_only()));
            continue;
        }
        if descriptor.is_write_only() {
            writable_data += 1;
        }
        last_writable = descriptor.is_write_only();
        data.push((descriptor.addr(), descriptor.len()));
    }
    // The status byte: the end of the last descriptor (the header itself in a one-long chain).
    let (last_addr, last_len) = match data.last() {
        Some(&(addr, len)) => (addr, len),
        None => match header {
            Some((addr, len, writable)) => {
                last_writable = writable;
                (addr, len)
            }
            None => return Err((None, RequestError::NoStatus)),
        },
    };
    if !last_writable || last_len < 1 {
        return Err((None, RequestError::NoStatus));
    }
    let status = GuestAddress(last_addr.0.wrapping_add(u64::from(last_len) - 1));
    let fail = |err| Err((Some(status), err));
    let Some((header_addr, header_len, header_writable)) = header.filter(|_| count >= 2) else {
        return fail(RequestError::BadHeader);
    };
    if header_writable || header_len < HEADER_BYTES {
        return fail(RequestError::BadHeader);
    }
    let mut bytes = [0u8; HEADER_BYTES as usize];
    if memory.read_slice(&mut bytes, header_addr).is_err() {
        return fail(RequestError::UnreadableHeader);
    }
    let request_type = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let kind = match request_type {
        VIRTIO_BLK_T_IN => RequestKind::Read,
        VIRTIO_BLK_T_OUT => RequestKind::Write,
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
        VIRTIO_BLK_T_DISCARD => RequestKind::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => RequestKind::WriteZeroes,
        other => return fail(RequestError::Unsupported(other)),
    };
    // The data: every descriptor between the header and the status, plus whatever of the
    // last descriptor precedes the status byte.
    if let Some(last) = data.last_mut() {
        last.1 -= 1;
        if last.1 == 0 {
            data.pop();
        }
    }
    // Directions of the descriptors between the header and the status one, and whether
    // the status descriptor carries (device-writable) data before the status byte.
    let middle_writable = writable_data - 1;
    let middle_readable = count - 2 - middle_writable;
    let writable_tail = last_len > 1;
    let device_writes = matches!(kind, RequestKind::Read | RequestKind::GetId);
    let one_way = if device_writes { middle_readable == 0 } else { middle_writable == 0 && !writable_tail };
    if kind != RequestKind::Flush && !one_way {
        return fail(RequestError::WrongDirection);
    }
    let data_len: u64 = data.iter().map(|(_, len)| u64::from(*len)).sum();
    if data_len > MAX_REQUEST_BYTES {
        return fail(RequestError::TooLarge);
    }
    if readonly && matches!(kind, RequestKind::Write | RequestKind::Discard | RequestKind::WriteZeroes) {
        return fail(RequestError::ReadOnly);
    }
    if matches!(kind, RequestKind::Read | RequestKind::Write) {
        if data_len % SECTOR_SIZE != 0 {
            return fail(RequestError::BadLength);
        }
        let sectors = data_len / SECTOR_SIZE;
        let end = sector.checked_add(sectors).and_then(|end| end.checked_mul(SECTOR_SIZE));
        if end.is_none_or(|end| end > capacity) {
            return fail(RequestError::OutOfRange { sector, sectors });
        }
    }
    if matches!(kind, RequestKind::Discard | RequestKind::WriteZeroes) {
        if data_len == 0 || data_len % SEGMENT_BYTES != 0 {
            return fail(RequestError::BadLength);
        }
        if data_len / SEGMENT_BYTES > u64::from(MAX_SEGMENTS) {
            return fail(RequestError::TooLarge);
        }
    }
    Ok(Parsed { head, kind, sector, data_len, status })
}

/// One discard or write-zeroes segment: a byte range on the disk.
fn parse_segments(
    data: &[(GuestAddress, u32)],
    data_len: u64,
    memory: &GuestMemoryMmap,
    capacity: u64,
) -> Result<Vec<(u64, u64)>, RequestError> {
    let mut bytes = Vec::with_capacity(data_len as usize);
    for (addr, len) in data {
        let mut part = vec![0u8; *len as usize];
        memory.read_slice(&mut part, *addr).map_err(|_| RequestError::BadSegment)?;
        bytes.extend_from_slice(&part);
    }
    let mut segments = Vec::new();
    for segment in bytes.chunks_exact(SEGMENT_BYTES as usize) {
        let sector = u64::from_le_bytes(segment[0..8].try_into().unwrap());
        let sectors = u64::from(u32::from_le_bytes(segment[8..12].try_into().unwrap()));
        let flags = u32::from_le_bytes(segment[12..16].try_into().unwrap());
        // Only the unmap flag is defined.
        if flags & !1 != 0 {
            return Err(RequestError::BadSegment);
        }
        let start = sector.checked_mul(SECTOR_SIZE).ok_or(RequestError::OutOfRange { sector, sectors })?;
        let end = sector.checked_add(sectors).and_then(|end| end.checked_mul(SECTOR_SIZE));
        if end.is_none_or(|end| end > capacity) {
            return Err(RequestError::OutOfRange { sector, sectors });
        }
        segments.push((start, sectors * SECTOR_SIZE));
    }
    Ok(segments)
}

/// Whether the driver wants an interrupt for the used entries added since the last
/// call. With event idx, when they pass its `used_event`; without, unless it set
/// VRING_AVAIL_F_NO_INTERRUPT, which virtio-queue does not read (a driver that polls,
/// like Desk's, sets it, and an irqfd write costs this thread a switch to a kernel worker).
pub fn wants_interrupt(queue: &mut Queue, memory: &GuestMemoryMmap) -> bool {
    if queue.event_idx_enabled() {
        return queue.needs_notification(memory).unwrap_or(true);
    }
    // The used entries are written before the driver's flags are read.
    fence(Ordering::SeqCst);
    match memory.load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Acquire) {
        Ok(flags) => flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
        Err(_) => true,
    }
}

/// Asks the driver not to ring. Without event idx, the used ring's NO_NOTIFY flag; with
/// it, virtio-queue leaves `avail_event` where it was (one more doorbell once the driver
/// passes it), so `avail_event` is set behind what the device has taken: the driver's
/// next chains never pass it, and no doorbell interrupts a device that is watching.
fn disable_doorbells(queue: &mut Queue, memory: &GuestMemoryMmap) {
    if !queue.event_idx_enabled() {
        let _ = queue.disable_notification(memory);
        return;
    }
    let avail_event = GuestAddress(queue.used_ring() + 4 + 8 * u64::from(queue.size()));
    let _ = memory.store(queue.next_avail().wrapping_sub(1), avail_event, Ordering::Relaxed);
}

/// Counters a developer can read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub completed: u64,
    pub malformed: u64,
    pub errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    pub needs_interrupt: bool,
}

/// A request waiting for its transfers.
#[derive(Debug)]
struct InFlight {
    head: u16,
    status: GuestAddress,
    kind: RequestKind,
    /// Virtual range of a write, recorded in the disk's index on success.
    range: (u64, u64),
    /// Transfers not yet completed.
    remaining: usize,
    failed: bool,
    /// Bytes the device wrote into guest buffers (the used length, status byte aside).
    written_to_guest: u32,
}

/// Lists the request path fills and empties for every request, kept so that serving a
/// request allocates nothing once they have grown.
#[derive(Debug, Default)]
struct Scratch {
    data: Vec<(GuestAddress, u32)>,
    buffers: Vec<libc::iovec>,
    iovecs: Vec<libc::iovec>,
    extents: Vec<Extent>,
    done: Vec<Completion>,
}

// SAFETY: the iovecs name guest RAM, mapped for the device's lifetime; the lists are
// emptied before the request that filled them ends and used only under the device's lock.
unsafe impl Send for Scratch {}

/// The disk, its I/O engine and the requests in flight.
#[derive(Debug)]
pub struct BlockBackend {
    pub disk: Disk,
    pub engine: Engine,
    /// Requests waiting for transfers, by token (their index here).
    in_flight: Vec<Option<InFlight>>,
    free_tokens: Vec<u64>,
    in_flight_count: usize,
    scratch: Scratch,
}

impl BlockBackend {
    pub fn new(disk: Disk, engine: Engine) -> BlockBackend {
        BlockBackend {
            disk,
            engine,
            in_flight: Vec::new(),
            free_tokens: Vec::new(),
            in_flight_count: 0,
            scratch: Scratch::default(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight_count
    }

    fn insert(&mut self, entry: InFlight) -> u64 {
        self.in_flight_count += 1;
        match self.free_tokens.pop() {
            Some(token) => {
                self.in_flight[token as usize] = Some(entry);
                token
            }
            None => {
                self.in_flight.push(Some(entry));
                (self.in_flight.len() - 1) as u64
            }
        }
    }

    fn remove(&mut self, token: u64) -> Option<InFlight> {
        let entry = self.in_flight.get_mut(token as usize)?.take()?;
        self.in_flight_count -= 1;
        self.free_tokens.push(token);
        Some(entry)
    }

    /// Serves every available request and every finished transfer until there is
    /// neither: quick requests complete now, transfers are submitted.
    pub fn process_request_queue(&mut self, queue: &mut Queue, memory: &GuestMemoryMmap) -> Served {
        let mut served = Served::default();
        let capacity = self.disk.capacity();
        let readonly = self.disk.is_readonly();
        loop {
            // The driver need not ring while the device works through the ring: doorbells
            // are VM exits.
            disable_doorbells(queue, memory);
            while let Some(chain) = queue.pop_descriptor_chain(memory) {
                self.serve_chain(chain, queue, memory, capacity, readonly, &mut served);
            }
            self.engine.submit();
            self.complete_finished(queue, memory, &mut served);
            // With transfers in flight, each completion wakes the device, which then looks
            // at the ring again: doorbells stay off until nothing is in flight.
            if self.in_flight_count > 0 || !queue.enable_notification(memory).unwrap_or(false) {
                break;
            }
        }
        if served.completed > 0 {
            served.needs_interrupt = wants_interrupt(queue, memory);
        }
        served
    }

    fn serve_chain(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        capacity: u64,
        readonly: bool,
        served: &mut Served,
    ) {
        let head = chain.head_index();
        let mut data = std::mem::take(&mut self.scratch.data);
        match parse_into(chain, memory, capacity, readonly, &mut data) {
            Ok(request) => self.start(request, &data, queue, memory, served),
            Err((status, err)) => {
                served.malformed += 1;
                match status {
                    Some(status) => complete(queue, memory, head, status, err.status(), 0, served),
                    None => {
                        // Nowhere to say why: the chain goes back unused.
                        if queue.add_used(memory, head, 0).is_ok() {
                            served.completed += 1;
                        }
                    }
                }
            }
        }
        self.scratch.data = data;
    }

    /// Watches the available ring for up to `window` with doorbells off: a guest with
    /// requests in flight usually sends the next ones within microseconds, and a
    /// doorbell costs a VM exit plus a wake-up of this thread. Returns whether new
    /// requests arrived (doorbells are on again either way).
    pub fn poll_for_requests(&mut self, queue: &mut Queue, memory: &GuestMemoryMmap, window: Duration) -> bool {
        let deadline = Instant::now() + window;
        disable_doorbells(queue, memory);
        loop {
            let available = queue.avail_idx(memory, Ordering::Acquire);
            if available.is_ok_and(|index| index.0 != queue.next_avail()) {
                return true;
            }
            if Instant::now() >= deadline {
                return queue.enable_notification(memory).unwrap_or(false);
            }
            std::hint::spin_loop();
        }
    }

    /// Completes every request whose transfers are done.
    pub fn process_completions(&mut self, queue: &mut Queue, memory: &GuestMemoryMmap, served: &mut Served) {
        self.complete_finished(queue, memory, served);
        if served.completed > 0 {
            served.needs_interrupt = wants_interrupt(queue, memory);
        }
    }

    fn complete_finished(&mut self, queue: &mut Queue, memory: &GuestMemoryMmap, served: &mut Served) {
        let mut done = std::mem::take(&mut self.scratch.done);
        self.engine.completions(&mut done);
        for Completion { token, result } in done.drain(..) {
            let Some(Some(entry)) = self.in_flight.get_mut(token as usize) else { continue };
            if result.is_err() {
                entry.failed = true;
            }
            entry.remaining -= 1;
            if entry.remaining > 0 {
                continue;
            }
            let entry = self.remove(token).expect("the entry was just found");
            let status = if entry.failed {
                served.errors += 1;
                if entry.kind == RequestKind::Flush {
                    self.disk.flush_failed();
                }
                VIRTIO_BLK_S_IOERR as u8
            } else {
                if entry.kind == RequestKind::Write {
                    self.disk.written(entry.range.0, entry.range.1);
                    served.bytes_written += entry.range.1;
                } else {
                    served.bytes_read += entry.range.1;
                }
                VIRTIO_BLK_S_OK as u8
            };
            let written = if entry.failed { 0 } else { entry.written_to_guest };
            complete(queue, memory, entry.head, entry.status, status, written, served);
        }
        self.scratch.done = done;
    }

    /// Waits for every transfer in flight and completes its request, and serves what
    /// the driver added meanwhile, until nothing is in flight and doorbells are on
    /// again (they were off while transfers were in flight; a snapshot keeps them so).
    pub fn drain(&mut self, queue: &mut Queue, memory: &GuestMemoryMmap) -> Served {
        let mut served = Served::default();
        loop {
            while self.in_flight_count > 0 {
                self.engine.wait();
                self.process_completions(queue, memory, &mut served);
            }
            if !queue.enable_notification(memory).unwrap_or(false) {
                return served;
            }
            let more = self.process_request_queue(queue, memory);
            served.completed += more.completed;
            served.malformed += more.malformed;
            served.errors += more.errors;
            served.bytes_read += more.bytes_read;
            served.bytes_written += more.bytes_written;
            served.flushes += more.flushes;
            served.needs_interrupt |= more.needs_interrupt;
        }
    }

    /// Waits for the transfers in flight and forgets their requests (a device reset).
    pub fn abandon(&mut self) {
        let mut done = Vec::new();
        while self.in_flight_count > 0 {
            self.engine.wait();
            self.engine.completions(&mut done);
            for Completion { token, .. } in done.drain(..) {
                if let Some(Some(entry)) = self.in_flight.get_mut(token as usize) {
                    entry.remaining -= 1;
                    if entry.remaining == 0 {
                        self.remove(token);
                    }
                }
            }
        }
    }

    fn start(
        &mut self,
        request: Parsed,
        data: &[(GuestAddress, u32)],
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        served: &mut Served,
    ) {
        let Parsed { head, kind, status, data_len, .. } = request;
        let answer = match kind {
            RequestKind::Read | RequestKind::Write => match self.start_transfer(&request, data, memory) {
                Ok(true) => return,
                Ok(false) => {
                    if kind == RequestKind::Read {
                        served.bytes_read += data_len;
                    }
                    Ok(if kind == RequestKind::Read { data_len as u32 } else { 0 })
                }
                Err(()) => Err(()),
            },
            RequestKind::Flush => {
                served.flushes += 1;
                // Durable before the guest hears "done": the engine syncs after every
                // transfer submitted before this request, then the layer's index.
                let Some(plan) = self.disk.prepare_flush() else {
                    return complete(queue, memory, head, status, VIRTIO_BLK_S_OK as u8, 0, served);
                };
                let entry =
                    InFlight { head, status, kind, range: (0, 0), remaining: 0, failed: false, written_to_guest: 0 };
                let token = self.insert(entry);
                let steps = self.engine.push_flush(token, plan);
                if let Some(Some(entry)) = self.in_flight.get_mut(token as usize) {
                    entry.remaining = steps;
                }
                return;
            }
            RequestKind::GetId => {
                let serial = self.disk.serial();
                write_to_guest(memory, data, &serial).map_err(|_| ())
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                parse_segments(data, data_len, memory, self.disk.capacity())
                    .map_err(|_| served.malformed += 1)
                    .and_then(|segments| {
                        segments
                            .into_iter()
                            .try_for_each(|(start, len)| self.disk.write_zeroes(start, len))
                            .map(|()| 0)
                            .map_err(|_| ())
                    })
            }
        };
        match answer {
            Ok(written) => complete(queue, memory, head, status, VIRTIO_BLK_S_OK as u8, written, served),
            Err(()) => {
                served.errors += 1;
                complete(queue, memory, head, status, VIRTIO_BLK_S_IOERR as u8, 0, served)
            }
        }
    }

    /// Submits a read's or a write's transfers; `Ok(false)` when it needed none (a read
    /// of unwritten blocks or an empty transfer), so it is complete already.
    fn start_transfer(
        &mut self,
        request: &Parsed,
        data: &[(GuestAddress, u32)],
        memory: &GuestMemoryMmap,
    ) -> Result<bool, ()> {
        let offset = request.sector * SECTOR_SIZE;
        let len = request.data_len;
        if len == 0 {
            return Ok(false);
        }
        let write = request.kind == RequestKind::Write;
        let mut buffers = std::mem::take(&mut self.scratch.buffers);
        let mut iovecs = std::mem::take(&mut self.scratch.iovecs);
        let mut extents = std::mem::take(&mut self.scratch.extents);
        let started =
            self.submit_transfers(request, data, memory, offset, len, write, &mut buffers, &mut iovecs, &mut extents);
        buffers.clear();
        iovecs.clear();
        extents.clear();
        self.scratch.buffers = buffers;
        self.scratch.iovecs = iovecs;
        self.scratch.extents = extents;
        started
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_transfers(
        &mut self,
        request: &Parsed,
        data: &[(GuestAddress, u32)],
        memory: &GuestMemoryMmap,
        offset: u64,
        len: u64,
        write: bool,
        buffers: &mut Vec<libc::iovec>,
        iovecs: &mut Vec<libc::iovec>,
        extents: &mut Vec<Extent>,
    ) -> Result<bool, ()> {
        host_buffers(memory, data, !write, buffers)?;
        let entry = InFlight {
            head: request.head,
            status: request.status,
            kind: request.kind,
            range: (offset, len),
            remaining: 0,
            failed: false,
            written_to_guest: if write { 0 } else { len as u32 },
        };
        if write {
            let (file, at) = self.disk.prepare_write(offset, len).map_err(|_| ())?;
            let fd = file.as_raw_fd();
            slice_iovecs(buffers, 0, len, iovecs);
            let token = self.insert(InFlight { remaining: 1, ..entry });
            self.engine.push(token, Transfer { fd, offset: at, iovecs, write: true });
            return Ok(true);
        }
        self.disk.plan_read_into(offset, len, extents);
        let targets = extents.iter().filter(|extent| self.disk.read_target(extent).is_some()).count();
        let token = (targets > 0).then(|| self.insert(InFlight { remaining: targets, ..entry }));
        let mut at = 0u64;
        for extent in extents.iter() {
            slice_iovecs(buffers, at, extent.len, iovecs);
            match (self.disk.read_target(extent), token) {
                (Some((file, file_offset)), Some(token)) => {
                    let transfer = Transfer { fd: file.as_raw_fd(), offset: file_offset, iovecs, write: false };
                    self.engine.push(token, transfer);
                }
                _ => {
                    for iovec in iovecs.iter() {
                        // SAFETY: the iovec lies inside a guest memory slice checked by
                        // host_buffers; guest RAM stays mapped while the device runs.
                        unsafe { std::ptr::write_bytes(iovec.iov_base.cast::<u8>(), 0, iovec.iov_len) };
                    }
                }
            }
            at += extent.len;
        }
        Ok(token.is_some())
    }
}

/// Host addresses of the guest buffers, into `buffers`; for buffers the device writes,
/// their pages are marked dirty for the next diff snapshot.
fn host_buffers(
    memory: &GuestMemoryMmap,
    data: &[(GuestAddress, u32)],
    device_writes: bool,
    buffers: &mut Vec<libc::iovec>,
) -> Result<(), ()> {
    buffers.clear();
    for (addr, len) in data {
        for slice in GuestMemoryBackend::get_slices(memory, *addr, *len as usize) {
            let slice = slice.map_err(|_| ())?;
            if device_writes {
                slice.bitmap().mark_dirty(0, slice.len());
            }
            buffers.push(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: slice.len() });
        }
    }
    Ok(())
}

/// The iovecs covering bytes `start..start + len` of `buffers` laid end to end, into `out`.
fn slice_iovecs(buffers: &[libc::iovec], start: u64, len: u64, out: &mut Vec<libc::iovec>) {
    out.clear();
    let mut skip = start as usize;
    let mut left = len as usize;
    for buffer in buffers {
        if left == 0 {
            break;
        }
        if skip >= buffer.iov_len {
            skip -= buffer.iov_len;
            continue;
        }
        let count = (buffer.iov_len - skip).min(left);
        // SAFETY: `skip` is within the buffer, so the pointer stays inside it.
        let base = unsafe { buffer.iov_base.cast::<u8>().add(skip) };
        out.push(libc::iovec { iov_base: base.cast(), iov_len: count });
        left -= count;
        skip = 0;
    }
}

fn write_to_guest(
    memory: &GuestMemoryMmap,
    data: &[(GuestAddress, u32)],
    bytes: &[u8],
) -> Result<u32, vm_memory::GuestMemoryError> {
    let mut done = 0usize;
    for (addr, len) in data {
        let count = (*len as usize).min(bytes.len() - done);
        memory.write_slice(&bytes[done..done + count], *addr)?;
        done += count;
    }
    Ok(done as u32)
}

/// Writes the status byte and returns the chain with `written` data bytes plus it.
fn complete(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    head: u16,
    status: GuestAddress,
    value: u8,
    written: u32,
    served: &mut Served,
) {
    let written = if memory.write_obj(value, status).is_ok() { written + 1 } else { 0 };
    if queue.add_used(memory, head, written).is_ok() {
        served.completed += 1;
    }
}

#[cfg(test)]
mod tests;

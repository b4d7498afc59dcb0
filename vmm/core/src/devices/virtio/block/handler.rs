//! Request queue processing: no epoll, no KVM, testable with a mock queue.
//!
//! Each descriptor chain is parsed and checked ([`parse_request`]) before anything
//! touches the disk: the header is device-readable, the status byte device-writable,
//! data buffers point the way the request type needs, lengths are whole sectors and the
//! range lies on the disk. A request that fails a check completes at once with IOERR (or
//! UNSUPP for an unknown type); a chain without a status byte is returned unused. Reads
//! and writes go to the [`Engine`] straight from and into guest memory; flush, get-id,
//! discard and write-zeroes complete synchronously.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

use super::io::{Completion, Engine, Transfer};
use crate::disk::{Disk, Source};
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
    let head = chain.head_index();
    let descriptors: Vec<_> = chain.collect();
    let Some(last) = descriptors.last().filter(|last| last.is_write_only() && last.len() >= 1) else {
        return Err((None, RequestError::NoStatus));
    };
    let status = GuestAddress(last.addr().0.wrapping_add(u64::from(last.len()) - 1));
    let fail = |err| Err((Some(status), err));
    let Some(header) = descriptors.first().filter(|_| descriptors.len() >= 2) else {
        return fail(RequestError::BadHeader);
    };
    if header.is_write_only() || header.len() < HEADER_BYTES {
        return fail(RequestError::BadHeader);
    }
    let mut bytes = [0u8; HEADER_BYTES as usize];
    if memory.read_slice(&mut bytes, header.addr()).is_err() {
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
    let mut data = Vec::with_capacity(descriptors.len());
    for descriptor in &descriptors[1..descriptors.len() - 1] {
        data.push((descriptor.addr(), descriptor.len(), descriptor.is_write_only()));
    }
    if last.len() > 1 {
        data.push((last.addr(), last.len() - 1, true));
    }
    let device_writes = matches!(kind, RequestKind::Read | RequestKind::GetId);
    if kind != RequestKind::Flush && data.iter().any(|(_, _, writable)| *writable != device_writes) {
        return fail(RequestError::WrongDirection);
    }
    let data_len: u64 = data.iter().map(|(_, len, _)| u64::from(*len)).sum();
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
    let data = data.into_iter().map(|(addr, len, _)| (addr, len)).collect();
    Ok(Request { head, kind, sector, data, data_len, status })
}

/// One discard or write-zeroes segment: a byte range on the disk.
fn parse_segments(request: &Request, memory: &GuestMemoryMmap, capacity: u64) -> Result<Vec<(u64, u64)>, RequestError> {
    let mut bytes = Vec::with_capacity(request.data_len as usize);
    for (addr, len) in &request.data {
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

/// The disk, its I/O engine and the requests in flight.
#[derive(Debug)]
pub struct BlockBackend {
    pub disk: Disk,
    pub engine: Engine,
    in_flight: HashMap<u64, InFlight>,
    next_token: u64,
}

impl BlockBackend {
    pub fn new(disk: Disk, engine: Engine) -> BlockBackend {
        BlockBackend { disk, engine, in_flight: HashMap::new(), next_token: 1 }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Serves every available request: quick ones complete now, transfers are submitted.
    pub fn process_request_queue(&mut self, queue: &mut Queue, memory: &GuestMemoryMmap) -> Served {
        let mut served = Served::default();
        let capacity = self.disk.capacity();
        let readonly = self.disk.is_readonly();
        // The driver need not ring while the device works through the ring: doorbells
        // are VM exits. Notifications come back on before the device stops looking.
        loop {
            let _ = queue.disable_notification(memory);
            while let Some(chain) = queue.pop_descriptor_chain(memory) {
                self.serve_chain(chain, queue, memory, capacity, readonly, &mut served);
            }
            if !queue.enable_notification(memory).unwrap_or(false) {
                break;
            }
        }
        self.engine.submit();
        self.process_completions(queue, memory, &mut served);
        if served.completed > 0 {
            served.needs_interrupt = queue.needs_notification(memory).unwrap_or(true);
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
        match parse_request(chain, memory, capacity, readonly) {
            Ok(request) => self.start(request, queue, memory, served),
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
    }

    /// Watches the available ring for up to `window` with doorbells off: a guest with
    /// requests in flight usually sends the next ones within microseconds, and a
    /// doorbell costs a VM exit plus a wake-up of this thread. Returns whether new
    /// requests arrived (doorbells are on again either way).
    pub fn poll_for_requests(&mut self, queue: &mut Queue, memory: &GuestMemoryMmap, window: Duration) -> bool {
        let deadline = Instant::now() + window;
        let _ = queue.disable_notification(memory);
        loop {
            let available = queue.avail_idx(memory, std::sync::atomic::Ordering::Acquire);
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
        for Completion { token, result } in self.engine.completions() {
            let Some(entry) = self.in_flight.get_mut(&token) else { continue };
            if result.is_err() {
                entry.failed = true;
            }
            entry.remaining -= 1;
            if entry.remaining > 0 {
                continue;
            }
            let entry = self.in_flight.remove(&token).expect("the entry was just found");
            let status = if entry.failed {
                served.errors += 1;
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
        if served.completed > 0 {
            served.needs_interrupt = queue.needs_notification(memory).unwrap_or(true);
        }
    }

    /// Waits for every transfer in flight and completes its request.
    pub fn drain(&mut self, queue: &mut Queue, memory: &GuestMemoryMmap) -> Served {
        let mut served = Served::default();
        while !self.in_flight.is_empty() {
            self.engine.wait();
            self.process_completions(queue, memory, &mut served);
        }
        served
    }

    /// Waits for the transfers in flight and forgets their requests (a device reset).
    pub fn abandon(&mut self) {
        while !self.in_flight.is_empty() {
            self.engine.wait();
            for Completion { token, .. } in self.engine.completions() {
                if let Some(entry) = self.in_flight.get_mut(&token) {
                    entry.remaining -= 1;
                    if entry.remaining == 0 {
                        self.in_flight.remove(&token);
                    }
                }
            }
        }
    }

    fn start(&mut self, request: Request, queue: &mut Queue, memory: &GuestMemoryMmap, served: &mut Served) {
        let Request { head, kind, status, data_len, .. } = request;
        let answer = match kind {
            RequestKind::Read | RequestKind::Write => match self.start_transfer(&request, memory) {
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
                self.disk.flush().map(|()| 0).map_err(|_| ())
            }
            RequestKind::GetId => {
                let serial = self.disk.serial();
                write_to_guest(memory, &request.data, &serial).map_err(|_| ())
            }
            RequestKind::Discard | RequestKind::WriteZeroes => parse_segments(&request, memory, self.disk.capacity())
                .map_err(|_| served.malformed += 1)
                .and_then(|segments| {
                    segments
                        .into_iter()
                        .try_for_each(|(start, len)| self.disk.write_zeroes(start, len))
                        .map(|()| 0)
                        .map_err(|_| ())
                }),
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
    fn start_transfer(&mut self, request: &Request, memory: &GuestMemoryMmap) -> Result<bool, ()> {
        let offset = request.sector * SECTOR_SIZE;
        let len = request.data_len;
        if len == 0 {
            return Ok(false);
        }
        let buffers = host_buffers(memory, &request.data, request.kind == RequestKind::Read)?;
        let token = self.next_token;
        self.next_token += 1;
        let mut transfers = Vec::new();
        if request.kind == RequestKind::Write {
            let (file, at) = self.disk.prepare_write(offset, len).map_err(|_| ())?;
            transfers.push(Transfer {
                fd: file.as_raw_fd(),
                offset: at,
                iovecs: slice_iovecs(&buffers, 0, len),
                write: true,
            });
        } else {
            let mut at = 0u64;
            for extent in self.disk.plan_read(offset, len) {
                match self.disk.read_target(&extent) {
                    Some((file, file_offset)) => transfers.push(Transfer {
                        fd: file.as_raw_fd(),
                        offset: file_offset,
                        iovecs: slice_iovecs(&buffers, at, extent.len),
                        write: false,
                    }),
                    None => {
                        debug_assert_eq!(extent.source, Source::Zero);
                        for iovec in slice_iovecs(&buffers, at, extent.len) {
                            // SAFETY: the iovec lies inside a guest memory slice checked by
                            // host_buffers; guest RAM stays mapped while the device runs.
                            unsafe { std::ptr::write_bytes(iovec.iov_base.cast::<u8>(), 0, iovec.iov_len) };
                        }
                    }
                }
                at += extent.len;
            }
        }
        if transfers.is_empty() {
            return Ok(false);
        }
        let entry = InFlight {
            head: request.head,
            status: request.status,
            kind: request.kind,
            range: (offset, len),
            remaining: transfers.len(),
            failed: false,
            written_to_guest: if request.kind == RequestKind::Read { len as u32 } else { 0 },
        };
        self.in_flight.insert(token, entry);
        for transfer in transfers {
            self.engine.push(token, transfer);
        }
        Ok(true)
    }
}

/// Host addresses of the guest buffers; for buffers the device writes, their pages are
/// marked dirty for the next diff snapshot.
fn host_buffers(
    memory: &GuestMemoryMmap,
    data: &[(GuestAddress, u32)],
    device_writes: bool,
) -> Result<Vec<libc::iovec>, ()> {
    let mut buffers = Vec::with_capacity(data.len());
    for (addr, len) in data {
        for slice in GuestMemoryBackend::get_slices(memory, *addr, *len as usize) {
            let slice = slice.map_err(|_| ())?;
            if device_writes {
                slice.bitmap().mark_dirty(0, slice.len());
            }
            buffers.push(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: slice.len() });
        }
    }
    Ok(buffers)
}

/// The iovecs covering bytes `start..start + len` of `buffers` laid end to end.
fn slice_iovecs(buffers: &[libc::iovec], start: u64, len: u64) -> Vec<libc::iovec> {
    let mut out = Vec::new();
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
    out
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

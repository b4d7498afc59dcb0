//! `memory.bin`: guest RAM as a sparse file laid out like the RAM memfd (file offset =
//! memfd offset), written and read with io_uring.
//!
//! Only the memfd's data extents are written (pages the guest never touched are holes in
//! the memfd and stay holes in the file), cut into chunks; a chunk that is all zeros is
//! left a hole too. Every written chunk's blake3 goes into `state.bin`, so a restore
//! checks each byte it loads. Chunks are written from the guest mapping itself (no copy),
//! several in flight, with O_DIRECT where the filesystem allows.
//!
//! A diff image holds only the pages written since its parent was taken (KVM's dirty log
//! and the devices' bitmaps, [`crate::vstate::vm::Vm::take_dirty_pages`]): the written
//! chunks with data, and the written ranges that became all zeros. Loading a chain loads
//! the full image at its root, then each diff over it in order.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use io_uring::{opcode, types};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestRam;

/// Bytes per chunk: the unit of I/O, of the digest and of hole detection.
pub const CHUNK_BYTES: u64 = 256 << 10;
/// Chunks in flight at once.
const QUEUE_DEPTH: u32 = 16;
/// Chunks hashed ahead of the write, per pipeline stage (16 MiB).
const PIPELINE_CHUNKS: usize = 64;

/// Errors writing or reading the memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot create {path}: {source}")]
    Create { path: String, source: io::Error },
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("cannot find the guest RAM's data extents: {0}")]
    Extents(#[source] io::Error),
    #[error("io_uring set-up failed: {0}")]
    Ring(#[source] io::Error),
    #[error("writing {path} failed at offset {offset:#x}: {source}")]
    Write { path: String, offset: u64, source: io::Error },
    #[error("reading {path} failed at offset {offset:#x}: {source}")]
    Read { path: String, offset: u64, source: io::Error },
    #[error("{path} is {found} bytes, the VM's RAM is {expected}: the memory file is truncated or not this VM's")]
    WrongSize { path: String, found: u64, expected: u64 },
    #[error("{path} is corrupt: the chunk at offset {offset:#x} does not match its digest")]
    Corrupt { path: String, offset: u64 },
    #[error("the saved memory map is invalid: chunk at {offset:#x} of {len} bytes lies outside {size} bytes of RAM")]
    BadChunk { offset: u64, len: u64, size: u64 },
    #[error(
        "the saved memory map is invalid: chunk at {offset:#x} of {len} bytes crosses a {CHUNK_BYTES}-byte boundary"
    )]
    CrossesBlock { offset: u64, len: u64 },
    #[error("cannot clear guest RAM at {offset:#x}: {source}")]
    Clear { offset: u64, source: io::Error },
}

/// Pages written since the parent snapshot: one bitmap per RAM region, in region order
/// (bit `n` of word `n / 64` is the region's page `n`).
pub type DirtyPages = [Vec<u64>];

/// Bytes per page of the dirty bitmaps.
pub const PAGE_BYTES: u64 = 4096;

/// One written chunk of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub offset: u64,
    pub len: u64,
    pub digest: [u8; 32],
}

/// The snapshot a diff applies to: its directory and its `state.bin` digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parent {
    pub dir: PathBuf,
    pub digest: [u8; 32],
}

impl Parent {
    /// The snapshot in `dir` whose state.bin has `digest`, named by its absolute path so
    /// a diff finds it from wherever it is restored.
    pub fn new(dir: &Path, digest: [u8; 32]) -> Parent {
        Parent { dir: std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()), digest }
    }
}

/// What `memory.bin` holds. A full image: the chunks with data (the rest is zeros). A
/// diff: what changed over `parent`, as chunks with data and ranges now all zeros.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryImage {
    pub size: u64,
    pub chunks: Vec<Chunk>,
    /// (offset, length) ranges a diff clears; empty in a full image.
    pub zeroed: Vec<(u64, u64)>,
    pub parent: Option<Parent>,
}

impl MemoryImage {
    /// An image of `size` bytes of RAM that holds nothing yet.
    pub fn empty(size: u64) -> MemoryImage {
        MemoryImage { size, chunks: Vec::new(), zeroed: Vec::new(), parent: None }
    }

    pub fn data_bytes(&self) -> u64 {
        self.chunks.iter().map(|chunk| chunk.len).sum()
    }

    /// Checks the chunk list and the cleared ranges fit the RAM, each in order without
    /// overlaps, and no chunk crosses a chunk boundary (as none written does: the lazy
    /// loader builds RAM block by block from them).
    pub fn validate(&self, ram_size: u64) -> Result<(), MemoryFileError> {
        check_ranges(self.chunks.iter().map(|chunk| (chunk.offset, chunk.len)), ram_size, CHUNK_BYTES)?;
        if let Some(chunk) = self.chunks.iter().find(|chunk| chunk.offset % CHUNK_BYTES + chunk.len > CHUNK_BYTES) {
            return Err(MemoryFileError::CrossesBlock { offset: chunk.offset, len: chunk.len });
        }
        check_ranges(self.zeroed.iter().copied(), ram_size, u64::MAX)?;
        if self.size != ram_size {
            return Err(MemoryFileError::BadChunk { offset: 0, len: self.size, size: ram_size });
        }
        Ok(())
    }
}

/// Checks (offset, length) ranges are non-empty, at most `max_len`, in order without
/// overlaps, and inside `ram_size` bytes.
fn check_ranges(ranges: impl Iterator<Item = (u64, u64)>, ram_size: u64, max_len: u64) -> Result<(), MemoryFileError> {
    let mut end = 0;
    for (offset, len) in ranges {
        let bad = || MemoryFileError::BadChunk { offset, len, size: ram_size };
        let range_end = offset.checked_add(len).ok_or_else(bad)?;
        if offset < end || range_end > ram_size || len == 0 || len > max_len {
            return Err(bad());
        }
        end = range_end;
    }
    Ok(())
}

/// Appends `offset..offset + len` to `runs`, joining it to the last run when they touch.
fn push_run(runs: &mut Vec<(u64, u64)>, offset: u64, len: u64) {
    match runs.last_mut() {
        Some((start, run)) if *start + *run == offset => *run += len,
        _ => runs.push((offset, len)),
    }
}

/// The indices of the set bits of `bitmap` (bit `n` of word `n / 64`), in order.
pub fn set_bits(bitmap: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(index, &word)| {
        let mut bits = word;
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let bit = index as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                bit
            })
        })
    })
}

/// Opens a memory file and checks it is exactly `size` bytes, as RAM is.
pub fn open_image(path: &Path, size: u64) -> Result<File, MemoryFileError> {
    let name = || path.display().to_string();
    let file = File::open(path).map_err(|source| MemoryFileError::Open { path: name(), source })?;
    let found = file.metadata().map_err(|source| MemoryFileError::Open { path: name(), source })?.len();
    if found != size {
        return Err(MemoryFileError::WrongSize { path: name(), found, expected: size });
    }
    Ok(file)
}

/// The (offset, length) ranges of `file` that hold data, by SEEK_DATA/SEEK_HOLE.
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    data_extents_between(file, 0, size)
}

/// The (offset, length) ranges of `file` in `start..end` that hold data. Moves the file's
/// position, which nothing reading or writing RAM's file uses (all of it is positioned).
pub fn data_extents_between(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut position = start as i64;
    while (position as u64) < end {
        // SAFETY: lseek on an fd this function borrows; no memory is touched.
        let data = unsafe { libc::lseek(fd, position, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no data past `position`
            }
            return Err(err);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let stop = (hole as u64).min(end);
        if stop > data as u64 {
            extents.push((data as u64, stop - data as u64));
        }
        position = hole;
    }
    Ok(extents)
}

/// The (memfd offset, length) runs of pages `dirty` marks, for RAM laid out as `regions`.
fn dirty_extents(dirty: &DirtyPages, regions: &[(u64, *mut u8, u64)]) -> Vec<(u64, u64)> {
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for (bitmap, &(region_offset, _, region_len)) in dirty.iter().zip(regions) {
        for page in set_bits(bitmap).take_while(|&page| page < region_len.div_ceil(PAGE_BYTES)) {
            let len = PAGE_BYTES.min(region_len - page * PAGE_BYTES);
            push_run(&mut extents, region_offset + page * PAGE_BYTES, len);
        }
    }
    extents
}

/// Guest RAM as (memfd offset, host address, length) regions.
pub(super) fn ram_regions(ram: &GuestRam) -> Vec<(u64, *mut u8, u64)> {
    let mut offset = 0;
    ram.memory
        .iter()
        .map(|region| {
            let entry = (offset, region.as_ptr(), region.len());
            offset += region.len();
            entry
        })
        .collect()
}

/// The host address of RAM bytes `offset..offset + len`, if they lie in one region.
fn host_address(regions: &[(u64, *mut u8, u64)], offset: u64, len: u64) -> Option<*mut u8> {
    regions.iter().find_map(|&(start, host, size)| {
        let inside = offset >= start && offset.checked_add(len)? <= start + size;
        inside.then(|| {
            // SAFETY: `offset - start` is inside the region's mapping of `size` bytes,
            // checked just above, so the pointer stays within that one allocation.
            unsafe { host.add((offset - start) as usize) }
        })
    })
}

/// Cuts extents into chunks that never cross a RAM region or a chunk boundary.
fn chunk_ranges(extents: &[(u64, u64)], regions: &[(u64, *mut u8, u64)]) -> Vec<(u64, u64)> {
    let mut chunks = Vec::new();
    for &(start, len) in extents {
        let mut offset = start;
        let end = start + len;
        while offset < end {
            let next_chunk = (offset / CHUNK_BYTES + 1) * CHUNK_BYTES;
            let region_end =
                regions.iter().find(|(s, _, l)| offset >= *s && offset < s + l).map_or(end, |(s, _, l)| s + l);
            let stop = end.min(next_chunk).min(region_end);
            chunks.push((offset, stop - offset));
            offset = stop;
        }
    }
    chunks
}

/// A slice of guest RAM.
///
/// # Safety
/// `host` must point at `len` mapped bytes of guest RAM that stay mapped while the slice
/// lives; the guest must not be running (its vCPUs paused or not started).
unsafe fn ram_slice<'a>(host: *mut u8, len: u64) -> &'a [u8] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(host, len as usize) }
}

/// (host address as an integer, length) of each range, 0 for a range outside RAM, so
/// hashing threads can share them.
fn hash_jobs(regions: &[(u64, *mut u8, u64)], ranges: &[(u64, u64)]) -> Vec<(usize, u64)> {
    ranges
        .iter()
        .map(|&(offset, len)| (host_address(regions, offset, len).map_or(0, |host| host as usize), len))
        .collect()
}

/// blake3 of each job's bytes (zeros for a job outside RAM).
fn hash(jobs: &[(usize, u64)]) -> Vec<[u8; 32]> {
    jobs.iter()
        .map(|&(host, len)| match host {
            0 => [0; 32],
            // SAFETY: `hash_jobs` found `len` mapped bytes of guest RAM, which the caller
            // keeps mapped and the paused guest does not change.
            host => *blake3::hash(unsafe { ram_slice(host as *mut u8, len) }).as_bytes(),
        })
        .collect()
}

/// blake3 of every chunk, on two threads.
fn digest_chunks(regions: &[(u64, *mut u8, u64)], ranges: &[(u64, u64)]) -> Vec<[u8; 32]> {
    let jobs = hash_jobs(regions, ranges);
    let half = jobs.len() / 2;
    std::thread::scope(|scope| {
        let first = scope.spawn(|| hash(&jobs[..half]));
        let mut second = hash(&jobs[half..]);
        let mut digests = first.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        digests.append(&mut second);
        digests
    })
}

/// The blake3 of a chunk of zeros, to spot all-zero chunks by their digest.
fn zero_digest() -> [u8; 32] {
    *blake3::hash(&vec![0u8; CHUNK_BYTES as usize]).as_bytes()
}

/// Runs every (host address, length, file offset) transfer through one io_uring, up to
/// [`QUEUE_DEPTH`] at once; short transfers are continued. Returns the failing offset.
fn transfer(file: &File, ops: &[(*mut u8, u64, u64)], write: bool) -> Result<(), (u64, io::Error)> {
    let mut ring = crate::seccomp::restricted_ring(QUEUE_DEPTH, &[opcode::Write::CODE, opcode::Read::CODE], |_| Ok(()))
        .map_err(|err| (0, err))?;
    let fd = types::Fd(file.as_raw_fd());
    // What is left of each op: (host, remaining, file offset).
    let mut pending: Vec<(*mut u8, u64, u64)> = ops.to_vec();
    let mut next = 0usize;
    let mut in_flight = 0u32;
    let mut retry: Vec<usize> = Vec::new();
    loop {
        while in_flight < QUEUE_DEPTH && (next < pending.len() || !retry.is_empty()) {
            let index = retry.pop().unwrap_or_else(|| {
                next += 1;
                next - 1
            });
            let (host, len, offset) = pending[index];
            let entry = if write {
                opcode::Write::new(fd, host, len as u32).offset(offset).build()
            } else {
                opcode::Read::new(fd, host, len as u32).offset(offset).build()
            };
            // SAFETY: the buffer is guest RAM that stays mapped until this function
            // returns, which is only after every submitted entry completed.
            unsafe { ring.submission().push(&entry.user_data(index as u64)) }
                .map_err(|_| (offset, io::Error::other("io_uring submission queue full")))?;
            in_flight += 1;
        }
        if in_flight == 0 {
            return Ok(());
        }
        ring.submit_and_wait(1).map_err(|err| (0, err))?;
        let completed: Vec<(u64, i32)> = ring.completion().map(|cqe| (cqe.user_data(), cqe.result())).collect();
        for (index, result) in completed {
            in_flight -= 1;
            let index = index as usize;
            let (host, len, offset) = pending[index];
            if result < 0 {
                return Err((offset, io::Error::from_raw_os_error(-result)));
            }
            let done = result as u64;
            if done == 0 {
                return Err((offset, io::Error::new(io::ErrorKind::UnexpectedEof, "the file ended early")));
            }
            if done < len {
                // SAFETY: `done < len`, so the new start is still inside the buffer.
                pending[index] = (unsafe { host.add(done as usize) }, len - done, offset + done);
                retry.push(index);
            }
        }
    }
}

/// Bytes a diff of `dirty` pages writes at most.
pub fn dirty_bytes(ram: &GuestRam, dirty: &DirtyPages) -> u64 {
    dirty_extents(dirty, &ram_regions(ram)).iter().map(|(_, len)| len).sum()
}

/// [`write_image_with_progress`] without progress reports.
pub fn write_image(
    ram: &GuestRam,
    path: &Path,
    diff: Option<(&DirtyPages, Parent)>,
) -> Result<MemoryImage, MemoryFileError> {
    write_image_with_progress(ram, path, diff, &mut |_, _| {})
}

/// Writes guest RAM to `path` (created; O_DIRECT when allowed), fsyncs it, and returns
/// what it holds: all of RAM, or with `diff` only the pages it marks, over its parent.
/// `progress` hears (bytes looked at, bytes to look at) after every 16 MiB. The guest
/// must be paused.
pub fn write_image_with_progress(
    ram: &GuestRam,
    path: &Path,
    diff: Option<(&DirtyPages, Parent)>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MemoryImage, MemoryFileError> {
    let name = path.display().to_string();
    let regions = ram_regions(ram);
    let extents = match &diff {
        None => data_extents(&ram.memfd, ram.size).map_err(MemoryFileError::Extents)?,
        Some((dirty, _)) => dirty_extents(dirty, &regions),
    };
    let ranges = chunk_ranges(&extents, &regions);
    let create = |direct: bool| {
        OpenOptions::new().write(true).create_new(true).custom_flags(if direct { libc::O_DIRECT } else { 0 }).open(path)
    };
    // tmpfs and some others refuse O_DIRECT; the page cache then does the job.
    let file = match create(true) {
        Ok(file) => file,
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            create(false).map_err(|source| MemoryFileError::Create { path: name.clone(), source })?
        }
        Err(source) => return Err(MemoryFileError::Create { path: name, source }),
    };
    file.set_len(ram.size).map_err(|source| MemoryFileError::Write { path: name.clone(), offset: 0, source })?;

    // Batches in a pipeline: the next batch is hashed on a second thread while this one
    // is written, so the write runs at the disk's speed rather than after the hashing.
    let zero_full = zero_digest();
    let mut chunks = Vec::with_capacity(ranges.len());
    let mut zeroed: Vec<(u64, u64)> = Vec::new();
    let jobs = hash_jobs(&regions, &ranges);
    std::thread::scope(|scope| {
        let mut batches = ranges.chunks(PIPELINE_CHUNKS).zip(jobs.chunks(PIPELINE_CHUNKS));
        let total: u64 = ranges.iter().map(|(_, len)| len).sum();
        let mut done = 0;
        let mut next = batches.next().map(|(ranges, jobs)| (ranges, scope.spawn(move || hash(jobs))));
        while let Some((batch, hashing)) = next.take() {
            let digests = hashing.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            next = batches.next().map(|(ranges, jobs)| (ranges, scope.spawn(move || hash(jobs))));
            let mut ops = Vec::with_capacity(batch.len());
            for (&(offset, len), digest) in batch.iter().zip(digests) {
                let host = host_address(&regions, offset, len);
                // A whole chunk of zeros is known by its digest; a shorter one (a diff's
                // run of pages, an extent's edge) by its bytes, with no digest to make.
                let zeros = match host {
                    _ if len == CHUNK_BYTES => digest == zero_full,
                    // SAFETY: `host_address` found `len` mapped bytes of the paused guest's RAM.
                    Some(host) => unsafe { ram_slice(host, len) }.iter().all(|&byte| byte == 0),
                    None => true,
                };
                if !zeros {
                    chunks.push(Chunk { offset, len, digest });
                    if let Some(host) = host {
                        ops.push((host, len, offset));
                    }
                } else if diff.is_some() {
                    push_run(&mut zeroed, offset, len);
                }
            }
            transfer(&file, &ops, true).map_err(|(offset, source)| MemoryFileError::Write {
                path: name.clone(),
                offset,
                source,
            })?;
            done += batch.iter().map(|(_, len)| len).sum::<u64>();
            progress(done, total);
        }
        Ok::<(), MemoryFileError>(())
    })?;
    file.sync_all().map_err(|source| MemoryFileError::Write { path: name, offset: ram.size, source })?;
    Ok(MemoryImage { size: ram.size, chunks, zeroed, parent: diff.map(|(_, parent)| parent) })
}

/// Makes RAM bytes `offset..offset + len` read as zeros again (a hole in the memfd).
fn clear(ram: &GuestRam, offset: u64, len: u64) -> Result<(), MemoryFileError> {
    // SAFETY: fallocate on the RAM memfd this function borrows; punching a hole keeps the
    // size and the mappings, which then read zeros there.
    let done = unsafe {
        libc::fallocate(
            ram.memfd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if done != 0 {
        return Err(MemoryFileError::Clear { offset, source: io::Error::last_os_error() });
    }
    Ok(())
}

/// Loads `image` from `path` into guest RAM and checks every chunk against its digest.
/// A full image goes into fresh RAM (which reads as zeros elsewhere); a diff over RAM
/// that holds its parent. The guest must not run yet.
pub fn read_image(ram: &GuestRam, path: &Path, image: &MemoryImage) -> Result<(), MemoryFileError> {
    read_image_within(ram, path, image, None, &[])
}

/// [`read_image`], of only the chunks that touch one of the (offset, length) ranges in
/// `within` when given, and none that lies whole inside one of the `hidden` ranges (what
/// later layers of a chain overwrite anyway): what a screenshot of a diff needs of each
/// layer.
pub fn read_image_within(
    ram: &GuestRam,
    path: &Path,
    image: &MemoryImage,
    within: Option<&[(u64, u64)]>,
    hidden: &[(u64, u64)],
) -> Result<(), MemoryFileError> {
    let name = path.display().to_string();
    image.validate(ram.size)?;
    for &(offset, len) in &image.zeroed {
        clear(ram, offset, len)?;
    }
    let file = open_image(path, ram.size)?;
    let regions = ram_regions(ram);
    let wanted = |chunk: &&Chunk| {
        let touched = within.is_none_or(|ranges| {
            ranges.iter().any(|&(start, len)| chunk.offset < start + len && start < chunk.offset + chunk.len)
        });
        let overwritten =
            hidden.iter().any(|&(start, len)| start <= chunk.offset && chunk.offset + chunk.len <= start + len);
        touched && !overwritten
    };
    let chunks: Vec<&Chunk> = image.chunks.iter().filter(wanted).collect();
    let mut ops = Vec::with_capacity(chunks.len());
    let mut ranges = Vec::with_capacity(chunks.len());
    for chunk in &chunks {
        let host = host_address(&regions, chunk.offset, chunk.len).ok_or(MemoryFileError::BadChunk {
            offset: chunk.offset,
            len: chunk.len,
            size: ram.size,
        })?;
        ops.push((host, chunk.len, chunk.offset));
        ranges.push((chunk.offset, chunk.len));
    }
    transfer(&file, &ops, false).map_err(|(offset, source)| MemoryFileError::Read {
        path: name.clone(),
        offset,
        source,
    })?;
    let digests = digest_chunks(&regions, &ranges);
    for (chunk, digest) in chunks.iter().zip(digests) {
        if chunk.digest != digest {
            return Err(MemoryFileError::Corrupt { path: name, offset: chunk.offset });
        }
    }
    Ok(())
}

/// Helpers for the snapshot tests.
#[cfg(test)]
pub(crate) mod testing {
    use crate::memory::GuestRam;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    /// The pages device-side writes marked in the regions' bitmaps, cleared.
    pub fn device_dirty_pages(ram: &GuestRam) -> Vec<Vec<u64>> {
        ram.memory
            .iter()
            .map(|region| {
                let mapping: &crate::memory::MmapRegion = region;
                mapping.bitmap().get_and_reset()
            })
            .collect()
    }

    /// All of guest RAM, copied out.
    pub fn ram_bytes(ram: &GuestRam) -> Vec<u8> {
        let mut bytes = vec![0u8; ram.size as usize];
        ram.memory.read_slice(&mut bytes, GuestAddress(0)).unwrap();
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{device_dirty_pages, ram_bytes};
    use super::*;
    use crate::memory::create_guest_ram;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn untouched_ram_has_no_extents_and_writes_no_chunks() {
        let ram = create_guest_ram(16).unwrap();
        assert!(data_extents(&ram.memfd, ram.size).unwrap().is_empty());
        let dir = tempfile::tempdir().unwrap();
        let image = write_image(&ram, &dir.path().join("memory.bin"), None).unwrap();
        assert!(image.chunks.is_empty());
        assert_eq!(std::fs::metadata(dir.path().join("memory.bin")).unwrap().len(), 16 << 20);
    }

    #[test]
    fn memory_round_trips_and_zero_chunks_stay_holes() {
        let ram = create_guest_ram(16).unwrap();
        ram.memory.write_slice(&[0xab; 5000], GuestAddress(0x10_0000)).unwrap();
        ram.memory.write_obj(0x1234_5678_u32, GuestAddress(0xff_fffc)).unwrap();
        // Touched but zero: a data extent in the memfd, a hole in the file.
        ram.memory.write_slice(&[0u8; 8192], GuestAddress(0x80_0000)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let image = write_image(&ram, &path, None).unwrap();
        assert_eq!(image.chunks.len(), 2, "{:?}", image.chunks);
        let restored = create_guest_ram(16).unwrap();
        read_image(&restored, &path, &image).unwrap();
        let mut bytes = vec![0u8; 5000];
        restored.memory.read_slice(&mut bytes, GuestAddress(0x10_0000)).unwrap();
        assert!(bytes.iter().all(|&b| b == 0xab));
        assert_eq!(restored.memory.read_obj::<u32>(GuestAddress(0xff_fffc)).unwrap(), 0x1234_5678);
    }

    #[test]
    fn a_diff_holds_only_written_pages_and_its_chain_restores_ram() {
        let ram = create_guest_ram(16).unwrap();
        ram.memory.write_slice(&[0xab; 5000], GuestAddress(0x10_0000)).unwrap();
        ram.memory.write_slice(&[0xcd; 8192], GuestAddress(0x80_0000)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let full = write_image(&ram, &dir.path().join("full.bin"), None).unwrap();
        device_dirty_pages(&ram);

        // One page changes, one page becomes zeros, one new page gets data.
        ram.memory.write_obj(0x55aa_u16, GuestAddress(0x10_0010)).unwrap();
        ram.memory.write_slice(&[0u8; 4096], GuestAddress(0x80_0000)).unwrap();
        ram.memory.write_slice(&[0x11; 100], GuestAddress(0xf0_0000)).unwrap();
        let dirty = device_dirty_pages(&ram);
        assert_eq!(dirty_bytes(&ram, &dirty), 3 * PAGE_BYTES);
        let parent = Parent { dir: dir.path().into(), digest: [7; 32] };
        let diff = write_image(&ram, &dir.path().join("diff.bin"), Some((&dirty, parent.clone()))).unwrap();
        let offsets: Vec<(u64, u64)> = diff.chunks.iter().map(|chunk| (chunk.offset, chunk.len)).collect();
        assert_eq!(offsets, vec![(0x10_0000, PAGE_BYTES), (0xf0_0000, PAGE_BYTES)]);
        assert_eq!(diff.zeroed, vec![(0x80_0000, PAGE_BYTES)]);
        assert_eq!(diff.parent, Some(parent));

        let restored = create_guest_ram(16).unwrap();
        read_image(&restored, &dir.path().join("full.bin"), &full).unwrap();
        read_image(&restored, &dir.path().join("diff.bin"), &diff).unwrap();
        assert!(ram_bytes(&restored) == ram_bytes(&ram), "base + diff is the RAM as it was at the diff");
        let extents = data_extents(&restored.memfd, restored.size).unwrap();
        assert!(
            !extents.iter().any(|&(offset, _)| offset == 0x80_0000),
            "the zeroed page is a hole again: {extents:?}"
        );
    }

    #[test]
    fn progress_is_reported_per_batch_up_to_the_whole() {
        let ram = create_guest_ram(64).unwrap();
        ram.memory.write_slice(&vec![0x5a; 40 << 20], GuestAddress(0)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut reports = Vec::new();
        write_image_with_progress(&ram, &dir.path().join("memory.bin"), None, &mut |done, total| {
            reports.push((done, total))
        })
        .unwrap();
        let total = reports.last().unwrap().1;
        assert!(total >= 40 << 20, "{reports:?}");
        assert_eq!(reports.last().unwrap().0, total, "the last report is the whole");
        assert!(reports.len() >= 3 && reports.windows(2).all(|pair| pair[0].0 < pair[1].0), "{reports:?}");
    }

    #[test]
    fn flipped_byte_in_memory_file_is_refused() {
        use std::os::unix::fs::FileExt;
        let ram = create_guest_ram(16).unwrap();
        ram.memory.write_slice(&[7; 4096], GuestAddress(0x2000)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let image = write_image(&ram, &path, None).unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[8], 0x2100).unwrap();
        let error = read_image(&create_guest_ram(16).unwrap(), &path, &image).unwrap_err();
        assert!(matches!(error, MemoryFileError::Corrupt { offset: 0x2000, .. }), "{error}");
    }

    #[test]
    fn truncated_memory_file_or_bad_chunk_list_is_refused() {
        let ram = create_guest_ram(16).unwrap();
        ram.memory.write_slice(&[7; 4096], GuestAddress(0x2000)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let image = write_image(&ram, &path, None).unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(1 << 20).unwrap();
        let error = read_image(&create_guest_ram(16).unwrap(), &path, &image).unwrap_err();
        assert!(matches!(error, MemoryFileError::WrongSize { .. }), "{error}");
        let mut bad = image.clone();
        bad.chunks[0].offset = 16 << 20;
        assert!(matches!(bad.validate(16 << 20), Err(MemoryFileError::BadChunk { .. })));
        let mut across = image.clone();
        across.chunks[0] = Chunk { offset: CHUNK_BYTES - 4096, len: 8192, ..across.chunks[0] };
        assert!(matches!(across.validate(16 << 20), Err(MemoryFileError::CrossesBlock { .. })));
    }
}

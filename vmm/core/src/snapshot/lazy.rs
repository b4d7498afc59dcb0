//! Lazy restore: guest RAM filled on first touch, from the snapshot's files, with
//! userfaultfd.
//!
//! RAM stays the memfd it always is (so the zero-copy screen, KVM's slots and the next
//! snapshot work as after an eager restore); its mappings are registered for missing-page
//! faults. RAM is cut into blocks of [`CHUNK_BYTES`]; a block is built once from every
//! layer of the chain (the full root, then each diff's chunks and cleared ranges), each
//! chunk checked against its digest, and copied in whole. A loader thread serves faults
//! (a vCPU's, a device's, KVM's own) and, once the VM runs ([`LazyMemory::fetch_ahead`]:
//! not before, so the restore has the CPUs to itself), fills the viewed ranges (below),
//! then fetches the remaining data blocks in order between faults; when none is left it
//! unregisters RAM and ends. Blocks the snapshot holds no data for are holes of the memfd
//! and read as zeros without its help.
//!
//! The hazard: a page read through another mapping of the memfd (the screen's view maps
//! the scanout's pages on its own) would be allocated as zeros and never fault here.
//! The loader fills the blocks under such ranges first. A restore either waits for them
//! ([`LazyMemory::wait_viewed`], which starts the loader) or, to let the guest run sooner,
//! hands the screen a [`ViewGate`] ([`LazyMemory::defer_viewed`]) that its views wait on
//! before they map anything; a block found partly present is completed by plain copies
//! instead of refusing. Until the gate opens it lends the screen a reader of RAM as it
//! will be ([`LoadingRam`], on [`Layers`]): a raw screenshot asked for at once is sent
//! from the snapshot's files (pages already in, from RAM) while the loader is still busy.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use carrel_gpu::{LoadingRam, ViewGate};

use super::memory::{MemoryImage, CHUNK_BYTES};
use super::uffd::{Copied, Userfault};
use crate::memory::GuestRam;
use vmm_sys_util::eventfd::EventFd;

/// Errors of a lazy restore.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("lazy restore needs userfaultfd, which is not available here ({0}); restore with --eager")]
    Unavailable(#[source] std::io::Error),
    #[error("cannot register guest RAM with userfaultfd: {0}")]
    Register(#[source] std::io::Error),
    #[error("reading {path} at offset {offset:#x} failed: {source}")]
    Read { path: String, offset: u64, source: std::io::Error },
    #[error("{path} is corrupt: the chunk at offset {offset:#x} does not match its digest")]
    Corrupt { path: String, offset: u64 },
    #[error("filling guest RAM at offset {offset:#x} failed: {source}")]
    Fill { offset: u64, source: std::io::Error },
    #[error("a fault at {address:#x} lies outside guest RAM")]
    Stray { address: u64 },
    #[error("the lazy loader thread could not start: {0}")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Image(#[from] super::memory::MemoryFileError),
    #[error("the lazy restore was abandoned: the screen's memory could not be loaded")]
    Abandoned,
}

/// A piece of one block, from one layer.
#[derive(Debug, Clone, Copy)]
enum Piece {
    /// Bytes of chunk `offset..offset + len` of layer `layer`, with its digest.
    Data {
        layer: usize,
        offset: u64,
        len: u64,
        digest: [u8; 32],
    },
    Zero {
        offset: u64,
        len: u64,
    },
}

impl Piece {
    fn range(&self) -> (u64, u64) {
        match *self {
            Piece::Data { offset, len, .. } | Piece::Zero { offset, len } => (offset, offset + len),
        }
    }
}

/// Drops the pieces (of one block, in layer order) that later ones cover whole: a long
/// chain of diffs that each rewrote the same pages (a screen redrawn between hibernations)
/// then reads and checks only the newest copy. A piece covered in part stays, read and
/// checked whole, and the later pieces are laid over it.
fn hide_covered(pieces: &mut Vec<Piece>) {
    // The union of the later pieces' ranges, sorted and merged.
    let mut later: Vec<(u64, u64)> = Vec::new();
    let mut kept = Vec::with_capacity(pieces.len());
    for piece in pieces.drain(..).rev() {
        let (start, end) = piece.range();
        if !later.iter().any(|&(from, to)| from <= start && end <= to) {
            kept.push(piece);
        }
        later.push((start, end));
        later.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(later.len());
        for (from, to) in later.drain(..) {
            match merged.last_mut() {
                Some(last) if from <= last.1 => last.1 = last.1.max(to),
                _ => merged.push((from, to)),
            }
        }
        later = merged;
    }
    kept.reverse();
    *pieces = kept;
}

/// Every block's pieces, flat: block by block and, within a block, in layer order. Built
/// with a handful of allocations, as a restore builds it before the guest runs (a map of
/// one small vector per block took a millisecond per GiB).
#[derive(Debug, Default)]
struct BlockMap {
    pieces: Vec<Piece>,
    /// Block `i`'s pieces are `pieces[starts[i]..starts[i + 1]]`.
    starts: Vec<usize>,
}

impl BlockMap {
    /// The map of `blocks` blocks from `layers` (memory images, the full root first),
    /// each block without the pieces later ones cover whole.
    fn build<'a>(layers: impl Iterator<Item = &'a MemoryImage>, blocks: usize) -> BlockMap {
        let mut placed: Vec<(usize, Piece)> = Vec::new();
        for (layer, image) in layers.enumerate() {
            placed.reserve(image.chunks.len() + image.zeroed.len());
            for &(offset, len) in &image.zeroed {
                // A cleared range may span blocks: one piece per block.
                let mut at = offset;
                while at < offset + len {
                    let end = ((at / CHUNK_BYTES + 1) * CHUNK_BYTES).min(offset + len);
                    placed.push(((at / CHUNK_BYTES) as usize, Piece::Zero { offset: at, len: end - at }));
                    at = end;
                }
            }
            for chunk in &image.chunks {
                let piece = Piece::Data { layer, offset: chunk.offset, len: chunk.len, digest: chunk.digest };
                placed.push(((chunk.offset / CHUNK_BYTES) as usize, piece));
            }
        }
        // Stable: a block's pieces stay in layer order.
        placed.sort_by_key(|&(block, _)| block);
        let mut map = BlockMap { pieces: Vec::with_capacity(placed.len()), starts: Vec::with_capacity(blocks + 1) };
        let mut group = Vec::new();
        let mut next = 0;
        for block in 0..blocks {
            map.starts.push(map.pieces.len());
            let from = next;
            while next < placed.len() && placed[next].0 == block {
                next += 1;
            }
            match &placed[from..next] {
                [] => {}
                [(_, piece)] => map.pieces.push(*piece),
                several => {
                    group.clear();
                    group.extend(several.iter().map(|&(_, piece)| piece));
                    hide_covered(&mut group);
                    map.pieces.extend_from_slice(&group);
                }
            }
        }
        map.starts.push(map.pieces.len());
        map
    }

    fn of(&self, block: u64) -> &[Piece] {
        let block = block as usize;
        match (self.starts.get(block), self.starts.get(block + 1)) {
            (Some(&from), Some(&to)) => &self.pieces[from..to],
            _ => &[],
        }
    }

    /// The blocks that have pieces, in order.
    fn with_pieces(&self) -> impl Iterator<Item = u64> + '_ {
        self.starts.windows(2).enumerate().filter(|(_, range)| range[0] < range[1]).map(|(block, _)| block as u64)
    }
}

/// How a lazy restore went, once RAM is whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LazyStats {
    /// Blocks filled because something touched them, and in the background.
    pub faulted: u64,
    pub fetched: u64,
    /// Bytes copied in, and time from start until RAM was whole.
    pub bytes: u64,
    pub elapsed_us: u64,
}

/// The chain's bytes, block by block: what the loader copies into RAM, and what a read
/// of RAM's file before then is answered from ([`LoadingRam`]).
#[derive(Debug)]
struct Layers {
    files: Vec<(String, File)>,
    blocks: BlockMap,
    /// Bytes the restore puts over the snapshot's (memfd offset, bytes), in order.
    writes: Vec<(u64, Vec<u8>)>,
    /// (memfd offset, length) of each RAM region.
    regions: Vec<(u64, u64)>,
    /// RAM's file, read where its pages are in.
    ram: File,
}

impl Layers {
    /// Bytes of block `index` (those inside its RAM region), or `None` past RAM.
    fn block_len(&self, index: u64) -> Option<u64> {
        let start = index * CHUNK_BYTES;
        self.regions.iter().find_map(|&(offset, len)| {
            (start >= offset && start < offset + len).then_some(CHUNK_BYTES.min(offset + len - start))
        })
    }

    /// Builds block `index` into `buffer` (its length): the chain's pieces, each checked
    /// against its digest, with the restore's writes over them.
    fn compose(&self, index: u64, buffer: &mut [u8]) -> Result<(), LazyError> {
        let start = index * CHUNK_BYTES;
        let pieces = self.blocks.of(index);
        zero_gaps(pieces, start, buffer);
        for piece in pieces {
            match *piece {
                Piece::Zero { offset, len } => {
                    let at = (offset - start) as usize;
                    buffer[at..at + len as usize].fill(0);
                }
                Piece::Data { layer, offset, len, digest } => {
                    let (path, file) = &self.files[layer];
                    let at = (offset - start) as usize;
                    let target = &mut buffer[at..at + len as usize];
                    file.read_exact_at(target, offset).map_err(|source| LazyError::Read {
                        path: path.clone(),
                        offset,
                        source,
                    })?;
                    if blake3::hash(target).as_bytes() != &digest {
                        return Err(LazyError::Corrupt { path: path.clone(), offset });
                    }
                }
            }
        }
        let end = start + buffer.len() as u64;
        for (offset, bytes) in &self.writes {
            // The part of the write inside this block.
            let (from, to) = ((*offset).max(start), (offset + bytes.len() as u64).min(end));
            if from < to {
                let source = &bytes[(from - offset) as usize..(to - offset) as usize];
                buffer[(from - start) as usize..(to - start) as usize].copy_from_slice(source);
            }
        }
        Ok(())
    }
}

/// Zeroes the bytes of `buffer` (block bytes from `start` on) that none of `pieces`
/// covers, the rest being written by them: a block whole in one chunk, as most are, is
/// not cleared first. In one pass, in any order: `covered` is the furthest end seen, and
/// a byte no piece covers lies in a gap before the first piece that passes it, or after
/// them all.
fn zero_gaps(pieces: &[Piece], start: u64, buffer: &mut [u8]) {
    let mut covered = 0usize;
    for piece in pieces {
        let (from, to) = piece.range();
        let (from, to) = ((from - start) as usize, (to - start) as usize);
        if from > covered {
            buffer[covered..from].fill(0);
        }
        covered = covered.max(to);
    }
    if covered < buffer.len() {
        buffer[covered..].fill(0);
    }
}

/// A read before the loader is done, the screen's first: pages that are in RAM's file
/// are read from it; the rest of a block is built as the loader would build it. A page
/// not in yet cannot have changed (the first touch of one waits for the loader, and the
/// loader's copy puts it in the file before it wakes anyone), so each page reads as RAM
/// holds it at some moment during the read, as a screenshot of a running guest does.
impl LoadingRam for Layers {
    fn piece_bytes(&self) -> u64 {
        CHUNK_BYTES
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let mut done = 0usize;
        while done < out.len() {
            let at = offset + done as u64;
            let index = at / CHUNK_BYTES;
            let block_len = self
                .block_len(index)
                .ok_or_else(|| std::io::Error::other(format!("offset {at:#x} lies outside guest RAM")))?;
            let within = at - index * CHUNK_BYTES;
            let count = ((block_len - within) as usize).min(out.len() - done);
            let part = &mut out[done..done + count];
            let present = super::memory::data_extents_between(&self.ram, at, at + count as u64)?;
            if present.first().is_none_or(|&(start, len)| start > at || len < count as u64) {
                if within == 0 && count as u64 == block_len {
                    self.compose(index, part).map_err(std::io::Error::other)?;
                } else {
                    let mut block = vec![0u8; block_len as usize];
                    self.compose(index, &mut block).map_err(std::io::Error::other)?;
                    part.copy_from_slice(&block[within as usize..within as usize + count]);
                }
            }
            for (start, len) in present {
                let from = (start - at) as usize;
                self.ram.read_exact_at(&mut part[from..from + len as usize], start)?;
            }
            done += count;
        }
        Ok(())
    }
}

/// The loader's side: the layers, guest RAM's host mappings, the fault queue.
struct Source {
    layers: Arc<Layers>,
    /// (memfd offset, host address, length) of each RAM region.
    regions: Vec<(u64, usize, u64)>,
    fault: Userfault,
    /// Written when fetching ahead may begin.
    go: EventFd,
    /// Blocks already filled.
    filled: Vec<bool>,
    buffer: Vec<u8>,
    stats: LazyStats,
}

/// Guest RAM being filled lazily; [`LazyMemory::finish`] waits until it is whole.
#[derive(Debug)]
pub struct LazyMemory {
    loader: Option<JoinHandle<Result<LazyStats, LazyError>>>,
    viewed: Arc<ViewedSignal>,
    go: EventFd,
}

/// Whether the viewed ranges are in: told once by the loader, to a restore waiting for it
/// or, once the restore deferred the wait to the screen, through the [`ViewGate`].
#[derive(Debug, Default)]
struct ViewedSignal {
    state: Mutex<Viewed>,
    changed: Condvar,
    gate: ViewGate,
}

#[derive(Debug, Default)]
enum Viewed {
    /// Still loading.
    #[default]
    Loading,
    Loaded,
    Failed(LazyError),
    /// The answer was taken by [`LazyMemory::wait_viewed`].
    Told,
    /// The restore went on without waiting: a failure from now on ends the process.
    Deferred,
}

impl ViewedSignal {
    fn lock(&self) -> std::sync::MutexGuard<'_, Viewed> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The loader's answer. After [`LazyMemory::defer_viewed`] nobody can refuse the
    /// restore any more: the VM ends with the reason, its `sockets` removed.
    fn tell(&self, result: Result<(), LazyError>, sockets: &[PathBuf]) {
        let mut state = self.lock();
        self.gate.open(result.is_ok());
        let deferred = matches!(*state, Viewed::Deferred);
        match (deferred, result) {
            (true, Err(err)) => {
                eprintln!("carrel-vmm: error: lazy restore: {err}; the VM is stopped");
                crate::sockets::remove_and_exit(sockets, 1);
            }
            (true, Ok(())) => {}
            (false, Ok(())) => *state = Viewed::Loaded,
            (false, Err(err)) => *state = Viewed::Failed(err),
        }
        self.changed.notify_all();
    }
}

impl Source {
    fn host(&self, offset: u64) -> Option<(usize, u64)> {
        self.regions.iter().find_map(|&(start, host, len)| {
            (offset >= start && offset < start + len)
                .then_some((host + (offset - start) as usize, start + len - offset))
        })
    }

    fn offset_of(&self, address: u64) -> Option<u64> {
        self.regions.iter().find_map(|&(start, host, len)| {
            let host = host as u64;
            (address >= host && address < host + len).then_some(start + address - host)
        })
    }

    /// Builds block `index` from its pieces and copies it into RAM, if not done yet.
    fn fill(&mut self, index: u64) -> Result<bool, LazyError> {
        if self.filled.get(index as usize).copied().unwrap_or(true) {
            return Ok(false);
        }
        let start = index * CHUNK_BYTES;
        let Some((host, room)) = self.host(start) else { return Ok(false) };
        let len = CHUNK_BYTES.min(room) as usize;
        let buffer = &mut self.buffer[..len];
        self.layers.compose(index, buffer)?;
        let fill_error = |source| LazyError::Fill { offset: start, source };
        if let Copied::Exists { .. } = self.fault.copy(host as *mut u8, buffer).map_err(fill_error)? {
            // Some page was already there (touched through another mapping): fill the
            // block page by page, writing present pages through the mapping directly.
            let page = super::memory::PAGE_BYTES as usize;
            for at in (0..len).step_by(page) {
                let end = (at + page).min(len);
                let target = (host + at) as *mut u8;
                if let Copied::Exists { .. } = self.fault.copy(target, &buffer[at..end]).map_err(fill_error)? {
                    // SAFETY: the page is present (the copy said so), so writing it
                    // cannot fault back into this thread; it is guest RAM owned by the
                    // VM for as long as the loader runs.
                    unsafe { std::ptr::copy_nonoverlapping(buffer[at..end].as_ptr(), target, end - at) };
                }
            }
        }
        self.filled[index as usize] = true;
        self.stats.bytes += len as u64;
        Ok(true)
    }

    /// Serves every waiting fault.
    fn serve_faults(&mut self) -> Result<(), LazyError> {
        while let Some(address) = self.fault.next_fault().map_err(|source| LazyError::Fill { offset: 0, source })? {
            let offset = self.offset_of(address).ok_or(LazyError::Stray { address })?;
            // A fault on a block filled since it was queued was woken by that fill.
            if self.fill(offset / CHUNK_BYTES)? {
                self.stats.faulted += 1;
            }
        }
        Ok(())
    }

    /// Fills the blocks under `ranges` (memfd offset, length) in order, serving faults
    /// between them, and tells `loaded` of the blocks under each range once they are in.
    fn preload(&mut self, ranges: &[(u64, u64)], loaded: impl Fn(u64, u64)) -> Result<(), LazyError> {
        for &(offset, len) in ranges {
            let blocks = offset / CHUNK_BYTES..(offset + len.max(1)).div_ceil(CHUNK_BYTES);
            for index in blocks.clone() {
                self.serve_faults()?;
                if self.fill(index)? {
                    self.stats.fetched += 1;
                }
            }
            loaded(blocks.start * CHUNK_BYTES, (blocks.end - blocks.start) * CHUNK_BYTES);
        }
        Ok(())
    }

    /// Serves faults until told to go on.
    fn serve_until_go(&mut self) -> Result<(), LazyError> {
        loop {
            self.serve_faults()?;
            let mut polls = [
                libc::pollfd { fd: self.fault.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.go.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: two pollfds, valid for the call.
            let ready = unsafe { libc::poll(polls.as_mut_ptr(), 2, -1) };
            if ready < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Err(LazyError::Fill { offset: 0, source: std::io::Error::last_os_error() });
            }
            if polls[1].revents & libc::POLLIN != 0 {
                return Ok(());
            }
        }
    }

    /// Serves faults and fetches data blocks until every one is in, then lets RAM go.
    fn run(mut self, started: Instant) -> Result<LazyStats, LazyError> {
        // Fetching ahead is background work: it yields the CPUs to the guest and the
        // VMM's own threads (nice 10 for this thread alone; faults are served here too).
        // SAFETY: setpriority on this thread's id; no memory is touched.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
        // Blocks with data, and those the restore writes into even where the snapshot
        // holds none: a block never touched would otherwise stay a hole.
        let mut pending: Vec<u64> = self.layers.blocks.with_pieces().collect();
        for (offset, bytes) in &self.layers.writes {
            pending.extend(offset / CHUNK_BYTES..(offset + bytes.len() as u64).div_ceil(CHUNK_BYTES));
        }
        pending.sort_unstable();
        pending.dedup();
        let mut next = pending.into_iter();
        loop {
            self.serve_faults()?;
            match next.next() {
                Some(index) => {
                    if self.fill(index)? {
                        self.stats.fetched += 1;
                    }
                }
                None => break,
            }
        }
        // A fault still queued is woken by the unregister and retried as an ordinary one.
        for &(_, host, len) in &self.regions {
            self.fault.unregister(host as *mut u8, len).map_err(LazyError::Register)?;
        }
        self.stats.elapsed_us = started.elapsed().as_micros() as u64;
        Ok(self.stats)
    }
}

impl LazyMemory {
    /// Registers `ram` (fresh, all holes) for lazy filling from `layers` (directory and
    /// memory image, the full root first) and starts the loader thread, which fills the
    /// blocks under `viewed` (memfd offset, length: RAM other mappings read) first.
    /// `writes` (memfd offset, bytes) go over the snapshot's bytes as their blocks are
    /// filled: what the restore itself changes in RAM, without a fault on its way.
    ///
    /// A chunk found damaged later cannot be refused any more: the process ends with
    /// exit code 1 and the reason, after removing `sockets` (the VM's listening sockets),
    /// so nothing half-restored stays reachable.
    pub fn start(
        ram: &GuestRam,
        layers: &[(PathBuf, &MemoryImage)],
        viewed: Vec<(u64, u64)>,
        writes: Vec<(u64, Vec<u8>)>,
        sockets: Vec<PathBuf>,
    ) -> Result<LazyMemory, LazyError> {
        let started = Instant::now();
        let fault = Userfault::open().map_err(LazyError::Unavailable)?;
        let go = EventFd::new(libc::EFD_NONBLOCK).map_err(LazyError::Thread)?;
        let go_later = go.try_clone().map_err(LazyError::Thread)?;
        // Host addresses as integers: the loader thread owns this list.
        let regions: Vec<(u64, usize, u64)> = super::memory::ram_regions(ram)
            .into_iter()
            .map(|(offset, host, len)| (offset, host as usize, len))
            .collect();
        for &(_, host, len) in &regions {
            fault.register(host as *mut u8, len).map_err(LazyError::Register)?;
        }
        let mut files = Vec::with_capacity(layers.len());
        for (dir, image) in layers {
            image.validate(ram.size)?;
            let path = dir.join(super::MEMORY_FILE);
            let file = super::memory::open_image(&path, ram.size)?;
            files.push((path.display().to_string(), file));
        }
        let count = ram.size.div_ceil(CHUNK_BYTES) as usize;
        let layers = Arc::new(Layers {
            files,
            blocks: BlockMap::build(layers.iter().map(|(_, image)| *image), count),
            writes,
            regions: regions.iter().map(|&(offset, _, len)| (offset, len)).collect(),
            ram: ram.memfd.try_clone().map_err(LazyError::Thread)?,
        });
        // Until the viewed ranges are in, the screen reads them through the layers.
        let signal = Arc::new(ViewedSignal { gate: ViewGate::reading_from(layers.clone()), ..Default::default() });
        let mut source = Source {
            layers,
            regions,
            fault,
            go,
            filled: vec![false; count],
            buffer: vec![0; CHUNK_BYTES as usize],
            stats: LazyStats::default(),
        };
        let told = Arc::clone(&signal);
        let loader = std::thread::Builder::new()
            .name("lazy-memory".into())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Loader);
                // While the VM is built, faults only: the build has the CPUs to itself.
                let loaded = source
                    .serve_until_go()
                    .and_then(|()| source.preload(&viewed, |offset, len| told.gate.open_range(offset, len)));
                if let Err(err) = loaded {
                    // A restore waiting for this answer is refused with it.
                    told.tell(Err(err), &sockets);
                    return Err(LazyError::Abandoned);
                }
                told.tell(Ok(()), &sockets);
                let result = source.run(started);
                match &result {
                    Ok(stats) => eprintln!(
                        "carrel-vmm: lazy restore: memory whole in {:.1} ms ({} MiB; {} blocks on first touch, {} fetched ahead)",
                        stats.elapsed_us as f64 / 1e3,
                        stats.bytes >> 20,
                        stats.faulted,
                        stats.fetched
                    ),
                    // Whatever waits on a page now would wait forever, and RAM cannot be
                    // completed truthfully: end the VM with the reason.
                    Err(err) => {
                        eprintln!("carrel-vmm: error: lazy restore: {err}; the VM is stopped");
                        crate::sockets::remove_and_exit(&sockets, 1);
                    }
                }
                result
            })
            .map_err(LazyError::Thread)?;
        Ok(LazyMemory { loader: Some(loader), viewed: signal, go: go_later })
    }

    /// Starts the loader and waits until the viewed ranges are in (the first time; at
    /// once after that).
    pub fn wait_viewed(&mut self) -> Result<(), LazyError> {
        self.fetch_ahead();
        let mut state = self.viewed.lock();
        while matches!(*state, Viewed::Loading) {
            state = self.viewed.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        match std::mem::replace(&mut *state, Viewed::Told) {
            Viewed::Failed(err) => Err(err),
            Viewed::Deferred => {
                // The gate says when they are in (a failure has ended the process).
                *state = Viewed::Deferred;
                drop(state);
                if self.viewed.gate.wait() {
                    Ok(())
                } else {
                    Err(LazyError::Abandoned)
                }
            }
            Viewed::Loading | Viewed::Loaded | Viewed::Told => Ok(()),
        }
    }

    /// Lets the restore go on without waiting for the viewed ranges: the returned gate
    /// opens once they are in, and views of them wait for it. A failure already known is
    /// returned (the restore is refused with it); one found later ends the process.
    pub fn defer_viewed(&mut self) -> Result<ViewGate, LazyError> {
        let mut state = self.viewed.lock();
        match std::mem::replace(&mut *state, Viewed::Deferred) {
            Viewed::Failed(err) => {
                *state = Viewed::Told;
                Err(err)
            }
            Viewed::Loading | Viewed::Loaded | Viewed::Told | Viewed::Deferred => Ok(self.viewed.gate.clone()),
        }
    }

    /// Whether RAM is whole (the loader has ended).
    pub fn is_done(&self) -> bool {
        self.loader.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Lets the loader go on from serving faults: it fills the viewed ranges, then
    /// fetches the rest of RAM ahead of the guest, between faults.
    pub fn fetch_ahead(&self) {
        let _ = self.go.write(1);
    }

    /// What does [`LazyMemory::fetch_ahead`] from another thread (the vCPU that first
    /// enters the guest); without a second eventfd, it fetches ahead at once.
    pub fn fetch_ahead_trigger(&self) -> impl FnOnce() + Send + 'static {
        let go = self.go.try_clone().ok();
        if go.is_none() {
            self.fetch_ahead();
        }
        move || {
            if let Some(go) = go {
                let _ = go.write(1);
            }
        }
    }

    /// Fetches ahead and waits until RAM is whole.
    pub fn finish(mut self) -> Result<LazyStats, LazyError> {
        self.fetch_ahead();
        match self.loader.take() {
            Some(loader) => loader.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            None => Ok(LazyStats::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_ram;
    use crate::snapshot::memory::testing::{device_dirty_pages, ram_bytes};
    use crate::snapshot::memory::{write_image, DirtyPages, Parent};
    use vm_memory::{Bytes, GuestAddress};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// A chain of two layers under `dir`: RAM of `mib` MiB as `before` writes it, saved
    /// whole in `base/`, then the pages `after` writes, saved as a diff in `diff/`.
    struct Chain {
        ram: GuestRam,
        base_dir: PathBuf,
        diff_dir: PathBuf,
        base: MemoryImage,
        diff: MemoryImage,
    }

    fn chain(dir: &std::path::Path, mib: u64, before: &[(u64, Vec<u8>)], after: &[(u64, Vec<u8>)]) -> Chain {
        let (base_dir, diff_dir) = (dir.join("base"), dir.join("diff"));
        std::fs::create_dir_all(&base_dir).unwrap();
        std::fs::create_dir_all(&diff_dir).unwrap();
        let ram = create_guest_ram(mib).unwrap();
        for (at, bytes) in before {
            ram.memory.write_slice(bytes, GuestAddress(*at)).unwrap();
        }
        let base = write_image(&ram, &base_dir.join("memory.bin"), None).unwrap();
        device_dirty_pages(&ram);
        for (at, bytes) in after {
            ram.memory.write_slice(bytes, GuestAddress(*at)).unwrap();
        }
        let dirty: Vec<Vec<u64>> = device_dirty_pages(&ram);
        let parent = Parent { dir: base_dir.clone(), digest: [0; 32] };
        let dirty: &DirtyPages = &dirty;
        let diff = write_image(&ram, &diff_dir.join("memory.bin"), Some((dirty, parent))).unwrap();
        Chain { ram, base_dir, diff_dir, base, diff }
    }

    #[test]
    fn lazily_filled_ram_reads_as_the_chain_and_the_viewed_range_is_loaded_first() {
        let dir = tempfile::tempdir().unwrap();
        let Chain { ram, base_dir, diff_dir, base, diff } = chain(
            dir.path(),
            32,
            &[(0x10_0000, pattern(3 << 20, 1)), (0x1f0_0000, pattern(8192, 2))],
            &[(0x20_0000, pattern(4096, 3)), (0x1f0_0000, vec![0u8; 4096])],
        );

        let restored = create_guest_ram(32).unwrap();
        let layers = [(base_dir, &base), (diff_dir, &diff)];
        // A range read through another mapping before anything touches it.
        let viewed = (0x30_0000u64, 0x1000u64);
        let mut lazy = LazyMemory::start(&restored, &layers, vec![viewed], Vec::new(), Vec::new())
            .expect("userfaultfd (tests run as root)");
        lazy.wait_viewed().unwrap();
        let mut other = vec![0u8; viewed.1 as usize];
        {
            use std::os::unix::fs::FileExt;
            restored.memfd.read_exact_at(&mut other, viewed.0).unwrap();
        }
        assert_eq!(other, pattern(3 << 20, 1)[0x20_0000..0x20_1000], "the viewed range holds the snapshot's bytes");
        // Touch the far end first: a fault the loader serves ahead of its own order.
        let mut last = vec![0u8; 8192];
        restored.memory.read_slice(&mut last, GuestAddress(0x1f0_0000)).unwrap();
        assert!(last[..4096].iter().all(|&b| b == 0) && last[4096..] == pattern(8192, 2)[4096..]);
        let stats = lazy.finish().unwrap();
        assert!(ram_bytes(&restored) == ram_bytes(&ram), "RAM is the chain's: base, then the diff");
        assert!(stats.faulted + stats.fetched >= 3, "{stats:?}");
    }

    #[test]
    fn reads_before_the_load_see_the_chain_then_what_ram_holds_and_refuse_damage() {
        let dir = tempfile::tempdir().unwrap();
        let Chain { ram, base_dir, diff_dir, base, diff } = chain(
            dir.path(),
            16,
            &[(0, pattern(4 * CHUNK_BYTES as usize, 1))],
            &[(CHUNK_BYTES + 0x3000, pattern(4096, 2))],
        );
        let write = (2 * CHUNK_BYTES - 8, vec![0xaa; 16]);
        let mut expected = ram_bytes(&ram);
        expected[write.0 as usize..write.0 as usize + 16].copy_from_slice(&write.1);

        let restored = create_guest_ram(16).unwrap();
        let layers = [(base_dir.clone(), &base), (diff_dir, &diff)];
        let scanout = (0u64, 4 * CHUNK_BYTES);
        let lazy = LazyMemory::start(&restored, &layers, vec![scanout], vec![write], Vec::new()).unwrap();
        let ram_reader = lazy.viewed.gate.reader_while_loading(&[scanout]).expect("a reader while nothing is in");
        // A whole block, and a range across three blocks starting mid-page: the chain's
        // bytes (the diff over the base, the restore's write over both).
        let mut block = vec![0u8; CHUNK_BYTES as usize];
        ram_reader.read_at(CHUNK_BYTES, &mut block).unwrap();
        assert!(block[..] == expected[CHUNK_BYTES as usize..2 * CHUNK_BYTES as usize]);
        let mut across = vec![0u8; 2 * CHUNK_BYTES as usize];
        ram_reader.read_at(CHUNK_BYTES / 2 + 100, &mut across).unwrap();
        let from = (CHUNK_BYTES / 2 + 100) as usize;
        assert!(across[..] == expected[from..from + across.len()]);
        // The guest touches block 3 (the loader brings it in) and draws on it: a read
        // now sees RAM, not the snapshot.
        restored.memory.write_slice(&[0x5a; 64], GuestAddress(3 * CHUNK_BYTES + 64)).unwrap();
        let mut drawn = vec![0u8; 128];
        ram_reader.read_at(3 * CHUNK_BYTES, &mut drawn).unwrap();
        assert!(drawn[..64] == expected[3 * CHUNK_BYTES as usize..3 * CHUNK_BYTES as usize + 64]);
        assert!(drawn[64..].iter().all(|&byte| byte == 0x5a), "the guest's drawing, read from RAM");
        assert!(ram_reader.read_at(16 << 20, &mut [0u8; 8]).is_err(), "past RAM");
        lazy.finish().unwrap();

        // A damaged chunk is refused by the reader as by the loader.
        {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new().write(true).open(base_dir.join("memory.bin")).unwrap();
            file.write_all_at(&[0xff], 0x10).unwrap();
        }
        let restored = create_guest_ram(16).unwrap();
        let layers = [(base_dir, &base)];
        let mut lazy = LazyMemory::start(&restored, &layers, vec![scanout], Vec::new(), Vec::new()).unwrap();
        let ram_reader = lazy.viewed.gate.reader_while_loading(&[scanout]).unwrap();
        let error = ram_reader.read_at(0, &mut [0u8; 64]).unwrap_err();
        assert!(error.to_string().contains("does not match its digest"), "{error}");
        assert!(lazy.wait_viewed().is_err());
        assert!(lazy.viewed.gate.reader_while_loading(&[scanout]).is_none(), "let go once the gate opened");
    }

    #[test]
    fn the_restores_own_writes_go_over_the_snapshot_in_data_and_in_holes() {
        let dir = tempfile::tempdir().unwrap();
        let ram = create_guest_ram(16).unwrap();
        let data = pattern(2 * CHUNK_BYTES as usize, 6);
        ram.memory.write_slice(&data, GuestAddress(0)).unwrap();
        let image = write_image(&ram, &dir.path().join("memory.bin"), None).unwrap();
        let restored = create_guest_ram(16).unwrap();
        let layers = [(dir.path().to_path_buf(), &image)];
        // Across two data blocks, and into a block the snapshot has no data for.
        let across = (CHUNK_BYTES - 4, vec![0xaa; 8]);
        let hole = (8 * CHUNK_BYTES + 16, vec![0x55; 8]);
        let writes = vec![across.clone(), hole.clone()];
        let lazy = LazyMemory::start(&restored, &layers, Vec::new(), writes, Vec::new()).unwrap();
        // One half of the first write faults in, the rest is fetched ahead.
        let mut first = [0u8; 4];
        restored.memory.read_slice(&mut first, GuestAddress(across.0)).unwrap();
        assert_eq!(first, [0xaa; 4]);
        lazy.finish().unwrap();
        let mut expected = ram_bytes(&ram);
        for (offset, bytes) in [across, hole] {
            expected[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes);
        }
        assert!(ram_bytes(&restored) == expected, "the snapshot's bytes with the writes over them");
    }

    #[test]
    fn a_screen_view_mapped_during_a_lazy_restore_sees_the_snapshot_not_zeros() {
        use carrel_gpu::protocol::MemoryEntry;
        use carrel_gpu::view::{Backing, MappedView};
        let dir = tempfile::tempdir().unwrap();
        let ram = create_guest_ram(16).unwrap();
        let pixels = pattern(64 << 10, 4);
        ram.memory.write_slice(&pixels, GuestAddress(0x40_0000)).unwrap();
        let image = write_image(&ram, &dir.path().join("memory.bin"), None).unwrap();
        let restored = create_guest_ram(16).unwrap();
        let layers = [(dir.path().to_path_buf(), &image)];
        // Nothing is loaded ahead: the view is the first to want these pages.
        let mut lazy = LazyMemory::start(&restored, &layers, Vec::new(), Vec::new(), Vec::new()).unwrap();
        lazy.wait_viewed().unwrap();
        let entries = [MemoryEntry { addr: 0x40_0000, length: pixels.len() as u32 }];
        let backing = Backing::new(&restored.memory, &entries).unwrap();
        let view = MappedView::map(&restored.memory, &backing, pixels.len() as u64).unwrap();
        // SAFETY: the view maps `pixels.len()` readable bytes for as long as it lives.
        let seen = unsafe { std::slice::from_raw_parts(view.as_ptr(), pixels.len()) };
        assert!(seen == pixels.as_slice(), "the view shows the snapshot's pixels");
        let mut guest = vec![0u8; pixels.len()];
        restored.memory.read_slice(&mut guest, GuestAddress(0x40_0000)).unwrap();
        assert!(guest == pixels, "and the guest sees them too");
        lazy.finish().unwrap();
    }

    #[test]
    fn pieces_that_later_layers_cover_whole_are_not_read() {
        let data = |layer, offset, len| Piece::Data { layer, offset, len, digest: [layer as u8; 32] };
        let mut pieces = vec![
            data(0, 0, 0x4_0000),
            data(1, 0x1000, 0x2000),
            data(2, 0x1000, 0x1000),
            Piece::Zero { offset: 0x2000, len: 0x1000 },
            data(3, 0x8000, 0x1000),
        ];
        hide_covered(&mut pieces);
        let kept: Vec<(u64, u64)> = pieces.iter().map(Piece::range).collect();
        // The root is covered in part only; layer 1 whole, by layer 2 and the cleared page.
        assert_eq!(kept, [(0, 0x4_0000), (0x1000, 0x2000), (0x2000, 0x3000), (0x8000, 0x9000)]);
        let mut redrawn =
            vec![data(0, 0, 0x4_0000), data(1, 0, 0x2_0000), data(2, 0x2_0000, 0x2_0000), data(3, 0, 0x4_0000)];
        hide_covered(&mut redrawn);
        assert!(matches!(redrawn[..], [Piece::Data { layer: 3, .. }]), "only the newest copy: {redrawn:?}");
    }

    #[test]
    fn only_the_bytes_no_piece_covers_are_cleared() {
        let data = |offset, len| Piece::Data { layer: 0, offset, len, digest: [0; 32] };
        let start = 3 * CHUNK_BYTES;
        let cleared = |pieces: &[Piece]| -> Vec<(u64, u64)> {
            let mut buffer = vec![0xeeu8; CHUNK_BYTES as usize];
            zero_gaps(pieces, start, &mut buffer);
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for (at, _) in buffer.iter().enumerate().filter(|(_, &byte)| byte == 0) {
                match runs.last_mut() {
                    Some(run) if run.1 == at as u64 => run.1 += 1,
                    _ => runs.push((at as u64, at as u64 + 1)),
                }
            }
            runs
        };
        assert_eq!(cleared(&[data(start, CHUNK_BYTES)]), [], "a whole block is not cleared first");
        assert_eq!(cleared(&[]), [(0, CHUNK_BYTES)]);
        // In order: the gaps, and only them.
        let sorted = [data(start + 0x1000, 0x1000), Piece::Zero { offset: start + 0x4000, len: 0x1000 }];
        assert_eq!(cleared(&sorted), [(0, 0x1000), (0x2000, 0x4000), (0x5000, CHUNK_BYTES)]);
        // Out of order and overlapping, as layers lay them: every byte no piece covers.
        let pieces = [
            data(start + 0x8000, 0x2000),
            data(start + 0x1000, 0x1000),
            Piece::Zero { offset: start + 0x9000, len: 0x4000 },
            data(start + 0x1800, 0x1000),
        ];
        let gaps = [(0, 0x1000), (0x2800, 0x8000), (0xd000, CHUNK_BYTES)];
        let runs = cleared(&pieces);
        for (from, to) in gaps {
            assert!(runs.iter().any(|&(start, end)| start <= from && to <= end), "{from:#x}..{to:#x} in {runs:x?}");
        }
    }

    #[test]
    fn the_block_map_groups_pieces_by_block_in_layer_order() {
        use crate::snapshot::memory::Chunk;
        let chunk = |offset, len, tag| Chunk { offset, len, digest: [tag; 32] };
        let mut root = MemoryImage::empty(4 * CHUNK_BYTES);
        root.chunks = vec![chunk(0, CHUNK_BYTES, 1), chunk(2 * CHUNK_BYTES, 0x1000, 2)];
        let mut diff = MemoryImage::empty(4 * CHUNK_BYTES);
        // A cleared range over blocks 0 and 1, and block 2's page rewritten whole.
        diff.zeroed = vec![(CHUNK_BYTES - 0x1000, 0x2000)];
        diff.chunks = vec![chunk(2 * CHUNK_BYTES, 0x1000, 3)];
        let map = BlockMap::build([&root, &diff].into_iter(), 4);
        let ranges = |block| map.of(block).iter().map(Piece::range).collect::<Vec<_>>();
        assert_eq!(ranges(0), [(0, CHUNK_BYTES), (CHUNK_BYTES - 0x1000, CHUNK_BYTES)]);
        assert_eq!(ranges(1), [(CHUNK_BYTES, CHUNK_BYTES + 0x1000)]);
        assert!(matches!(map.of(2), [Piece::Data { layer: 1, .. }]), "the root's copy is hidden: {:?}", map.of(2));
        assert!(map.of(3).is_empty() && map.of(4).is_empty());
        assert_eq!(map.with_pieces().collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn a_chunk_across_a_block_boundary_is_refused_before_anything_loads() {
        // What a writer never makes, from a state.bin made by hand (its own digest right):
        // one chunk over two blocks, its bytes and digest true.
        let dir = tempfile::tempdir().unwrap();
        let bytes = pattern(8192, 9);
        let offset = CHUNK_BYTES - 4096;
        {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::create(dir.path().join("memory.bin")).unwrap();
            file.set_len(16 << 20).unwrap();
            file.write_all_at(&bytes, offset).unwrap();
        }
        let mut image = MemoryImage::empty(16 << 20);
        image.chunks.push(crate::snapshot::memory::Chunk {
            offset,
            len: 8192,
            digest: *blake3::hash(&bytes).as_bytes(),
        });
        let restored = create_guest_ram(16).unwrap();
        let layers = [(dir.path().to_path_buf(), &image)];
        let scanout = (0u64, 2 * CHUNK_BYTES);
        let error = LazyMemory::start(&restored, &layers, vec![scanout], Vec::new(), Vec::new()).unwrap_err();
        assert!(error.to_string().contains("memory map is invalid"), "{error}");
    }

    #[test]
    fn a_corrupt_chunk_is_refused_when_it_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let ram = create_guest_ram(16).unwrap();
        ram.memory.write_slice(&pattern(4096, 9), GuestAddress(0x8000)).unwrap();
        let image = write_image(&ram, &dir.path().join("memory.bin"), None).unwrap();
        {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new().write(true).open(dir.path().join("memory.bin")).unwrap();
            file.write_all_at(&[0xff], 0x8010).unwrap();
        }
        let restored = create_guest_ram(16).unwrap();
        let layers = [(dir.path().to_path_buf(), &image)];
        let mut lazy = LazyMemory::start(&restored, &layers, vec![(0x8000, 16)], Vec::new(), Vec::new()).unwrap();
        let error = lazy.wait_viewed().unwrap_err();
        assert!(matches!(error, LazyError::Corrupt { offset: 0x8000, .. }), "{error}");
    }

    #[test]
    fn a_deferred_view_gate_opens_once_the_viewed_range_is_in_and_a_known_failure_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let ram = create_guest_ram(16).unwrap();
        ram.memory.write_slice(&pattern(8192, 5), GuestAddress(0x8000)).unwrap();
        let image = write_image(&ram, &dir.path().join("memory.bin"), None).unwrap();
        let restored = create_guest_ram(16).unwrap();
        let layers = [(dir.path().to_path_buf(), &image)];
        let mut lazy = LazyMemory::start(&restored, &layers, vec![(0x8000, 8192)], Vec::new(), Vec::new()).unwrap();
        let gate = lazy.defer_viewed().unwrap();
        lazy.wait_viewed().unwrap();
        assert!(gate.wait(), "the gate opens: the viewed range loaded");
        let mut seen = vec![0u8; 8192];
        std::os::unix::fs::FileExt::read_exact_at(&restored.memfd, &mut seen, 0x8000).unwrap();
        assert_eq!(seen, pattern(8192, 5), "and the memfd holds the snapshot's bytes there");
        lazy.finish().unwrap();

        {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new().write(true).open(dir.path().join("memory.bin")).unwrap();
            file.write_all_at(&[0xff], 0x8010).unwrap();
        }
        let restored = create_guest_ram(16).unwrap();
        let mut lazy = LazyMemory::start(&restored, &layers, vec![(0x8000, 16)], Vec::new(), Vec::new()).unwrap();
        // Loading began before the restore deferred the wait, and failed: the restore is
        // refused with the failure.
        lazy.fetch_ahead();
        assert!(!lazy.viewed.gate.wait(), "the gate says the range never loaded");
        let error = lazy.defer_viewed().unwrap_err();
        assert!(matches!(error, LazyError::Corrupt { offset: 0x8000, .. }), "{error}");
    }
}

//! Resource backing: the guest-RAM pages a resource's pixels live in, and the zero-copy
//! scanout view that maps those pages of the guest-memory memfd, in order, into one
//! contiguous host range.
//!
//! The view is built by reserving a host range with `mmap(PROT_NONE)` and then mapping
//! each run of backing pages `MAP_SHARED | MAP_FIXED` from the memfd at the page's file
//! offset. The guest writes its pixels into RAM; the host reads the same pages through
//! the view, so neither TRANSFER_TO_HOST_2D nor a screenshot copies guest memory.
//! Backing that cannot be viewed this way (not page aligned, RAM without a file, or RAM
//! mapped privately, as after a lazy snapshot restore) is copied instead.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemoryMmap;

use crate::protocol::MemoryEntry;

/// Host and guest page size on x86_64, the only architecture Carrel runs on.
pub const PAGE_SIZE: u64 = 4096;

/// Errors checking, mapping or reading a resource's backing.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error("backing entry {addr:#x}+{length:#x} is not inside guest RAM")]
    CheckBacking { addr: u64, length: u64 },
    #[error("backing of {got} bytes is smaller than the resource's {needed} bytes")]
    SizeBacking { needed: u64, got: u64 },
    #[error("backing at {addr:#x}+{length:#x} is not page aligned, so it cannot be viewed in place")]
    AlignBacking { addr: u64, length: u64 },
    #[error("guest RAM at {addr:#x} is not a shared file mapping, so it cannot be viewed in place")]
    FindBackingFile { addr: u64 },
    #[error("could not reserve {len} bytes of host address space for a scanout view: {source}")]
    ReserveView { len: usize, source: io::Error },
    #[error("could not map guest RAM at {addr:#x} into a scanout view: {source}")]
    MapBacking { addr: u64, source: io::Error },
    #[error("could not read {len} bytes of backing at offset {offset:#x}: {source}")]
    ReadBacking { offset: u64, len: usize, source: vm_memory::GuestMemoryError },
}

/// A resource's backing: the guest's scatter list, checked to lie in guest RAM.
#[derive(Debug, Clone)]
pub struct Backing {
    entries: Vec<MemoryEntry>,
    /// Offset of each entry's first byte within the backing.
    starts: Vec<u64>,
    total: u64,
}

impl Backing {
    /// Checks that every entry lies in guest RAM; empty entries are dropped.
    pub fn new(memory: &GuestMemoryMmap, entries: &[MemoryEntry]) -> Result<Backing, BackingError> {
        let mut kept = Vec::with_capacity(entries.len());
        let mut starts = Vec::with_capacity(entries.len());
        let mut total = 0u64;
        for entry in entries.iter().filter(|entry| entry.length > 0) {
            let in_ram = entry.addr.checked_add(entry.length as u64).is_some()
                && memory.check_range(GuestAddress(entry.addr), entry.length as usize);
            if !in_ram {
                return Err(BackingError::CheckBacking { addr: entry.addr, length: entry.length as u64 });
            }
            kept.push(*entry);
            starts.push(total);
            total += entry.length as u64;
        }
        Ok(Backing { entries: kept, starts, total })
    }

    /// Total bytes of backing.
    pub fn len(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    pub fn entries(&self) -> &[MemoryEntry] {
        &self.entries
    }

    /// Copies backing bytes at `offset` into `dst`.
    pub fn read(&self, memory: &GuestMemoryMmap, offset: u64, dst: &mut [u8]) -> Result<(), BackingError> {
        let len = dst.len();
        let fail = |source| BackingError::ReadBacking { offset, len, source };
        if offset.checked_add(dst.len() as u64).is_none_or(|end| end > self.total) {
            return Err(fail(vm_memory::GuestMemoryError::InvalidBackendAddress));
        }
        let mut index = self.starts.partition_point(|&start| start <= offset).saturating_sub(1);
        let mut position = offset;
        let mut done = 0usize;
        while done < dst.len() {
            let (Some(entry), Some(start)) = (self.entries.get(index), self.starts.get(index)) else {
                return Err(fail(vm_memory::GuestMemoryError::InvalidBackendAddress));
            };
            let within = position - start;
            let count = ((entry.length as u64 - within) as usize).min(dst.len() - done);
            vm_memory::Bytes::read_slice(memory, &mut dst[done..done + count], GuestAddress(entry.addr + within))
                .map_err(fail)?;
            done += count;
            position += count as u64;
            index += 1;
        }
        Ok(())
    }
}

/// When guest RAM may be viewed in place: RAM that is still being filled (a lazily
/// restored snapshot) must not get a second mapping before its pages are in, or reading
/// through that mapping would allocate them as zeros. The filler says which ranges of the
/// RAM's file are in as it loads them ([`ViewGate::open_range`], the scanout's first) and
/// when all are ([`ViewGate::open`]); a view waits on its first read for the ranges under
/// its own backing, so the guest runs meanwhile and the screen is back as soon as its
/// pixels are. A filler that can also read RAM as it will be ([`LoadingRam`]) lends that
/// reader until the gate opens: a whole-screen send need not wait for the load.
#[derive(Debug, Clone, Default)]
pub struct ViewGate {
    state: Arc<(Mutex<GateState>, Condvar)>,
}

/// RAM's file as it reads now, while it is still being filled: loaded bytes where they
/// are in (the guest may have changed them since), and elsewhere the bytes the filler
/// would load, from where it loads them (nothing can have changed those: the guest's
/// first touch of a page waits for its load).
pub trait LoadingRam: Send + Sync + std::fmt::Debug {
    /// The size reads are best cut at, and aligned to in the file: the filler's unit.
    fn piece_bytes(&self) -> u64;

    /// Fills `out` with RAM's file at `offset`.
    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()>;
}

#[derive(Debug, Default)]
struct GateState {
    /// File ranges (start, end) known to be loaded: sorted and merged as they come, so a
    /// backing of a thousand scattered pages (a Linux framebuffer) is checked quickly.
    loaded: Vec<(u64, u64)>,
    /// Everything is in (`true`), or will never be (`false`).
    done: Option<bool>,
    /// The filler's reader, until the gate opens.
    ram: Option<Arc<dyn LoadingRam>>,
}

impl GateState {
    fn add(&mut self, offset: u64, len: u64) {
        let (mut start, mut end) = (offset, offset.saturating_add(len));
        // The ranges that overlap or touch this one become one.
        let from = self.loaded.partition_point(|&(_, loaded_end)| loaded_end < start);
        let mut to = from;
        while let Some(&(loaded_start, loaded_end)) = self.loaded.get(to).filter(|range| range.0 <= end) {
            (start, end) = (start.min(loaded_start), end.max(loaded_end));
            to += 1;
        }
        self.loaded.splice(from..to, [(start, end)]);
    }

    fn holds(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        // Apart and sorted: only the first range reaching `end` can hold it.
        let candidate = self.loaded.partition_point(|&(_, loaded_end)| loaded_end < end);
        self.loaded.get(candidate).is_some_and(|&(start, _)| start <= offset)
    }
}

impl ViewGate {
    pub fn new() -> ViewGate {
        ViewGate::default()
    }

    /// A gate whose filler lends `ram` to reads of ranges not yet in.
    pub fn reading_from(ram: Arc<dyn LoadingRam>) -> ViewGate {
        let gate = ViewGate::default();
        gate.state.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).ram = Some(ram);
        gate
    }

    /// The filler's reader, while some of `ranges` (file offset, length) is not in yet:
    /// `None` once they are, once the gate opened, or for a filler without one.
    pub fn reader_while_loading(&self, ranges: &[(u64, u64)]) -> Option<Arc<dyn LoadingRam>> {
        let state = self.state.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let loaded = ranges.iter().all(|&(offset, len)| state.holds(offset, len));
        state.ram.as_ref().filter(|_| state.done.is_none() && !loaded).map(Arc::clone)
    }

    /// Says `len` bytes of the RAM's file at `offset` are in, waking waiters.
    pub fn open_range(&self, offset: u64, len: u64) {
        let (state, changed) = &*self.state;
        state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).add(offset, len);
        changed.notify_all();
    }

    /// Says every viewed page is in (`true`) or will never be (`false`), waking waiters.
    pub fn open(&self, loaded: bool) {
        let (state, changed) = &*self.state;
        let mut state = state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        state.done = Some(loaded);
        // Views map RAM from now on; the filler's reader is let go.
        state.ram = None;
        changed.notify_all();
    }

    /// Waits until [`ViewGate::open`]; whether the pages were loaded.
    pub fn wait(&self) -> bool {
        self.wait_until(|state| state.done)
    }

    /// Waits until the file `ranges` (offset, length) are in; whether they are (`false`
    /// once loading failed).
    pub fn wait_for(&self, ranges: &[(u64, u64)]) -> bool {
        self.wait_until(|state| match state.done {
            Some(done) => Some(done),
            None => ranges.iter().all(|&(offset, len)| state.holds(offset, len)).then_some(true),
        })
    }

    fn wait_until(&self, answer: impl Fn(&GateState) -> Option<bool>) -> bool {
        let (state, changed) = &*self.state;
        let mut state = state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            if let Some(answer) = answer(&state) {
                return answer;
            }
            state = changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

/// A read-only host view of guest pages: `len` bytes at `base`, unmapped on drop.
#[derive(Debug)]
pub struct MappedView {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the view owns its mapping; it is only read, through raw copies, and the memory
// stays mapped until drop, so sharing it between threads is as sound as using it on one.
unsafe impl Send for MappedView {}
// SAFETY: as above; no method mutates through `&self`.
unsafe impl Sync for MappedView {}

/// One run of backing pages inside one guest-memory region: `count` bytes of the view at
/// `position`, guest address `gpa`, at `file_offset` of the region's file `fd`.
struct ViewPiece {
    position: u64,
    gpa: u64,
    count: u64,
    fd: RawFd,
    file_offset: u64,
}

impl MappedView {
    /// Maps the first `len` bytes of `backing` (rounded up to whole pages) into one
    /// contiguous host range.
    pub fn map(memory: &GuestMemoryMmap, backing: &Backing, len: u64) -> Result<MappedView, BackingError> {
        let (map_len, pieces) = MappedView::plan(memory, backing, len)?;
        let view = MappedView::reserve(map_len as usize)?;
        for piece in &pieces {
            view.map_piece(memory, piece)?;
        }
        Ok(view)
    }

    /// Whether [`MappedView::map`] could view `backing` in place, without mapping it.
    pub fn check(memory: &GuestMemoryMmap, backing: &Backing, len: u64) -> Result<(), BackingError> {
        MappedView::plan(memory, backing, len).map(|_| ())
    }

    /// Cuts the first `len` bytes of `backing`, rounded up to whole pages, into runs
    /// that can each be mapped from one file: the view's length and its pieces.
    /// The ranges (offset, length) of the guest memory's files a view of the first `len`
    /// bytes of `backing` would map.
    pub(crate) fn file_ranges(
        memory: &GuestMemoryMmap,
        backing: &Backing,
        len: u64,
    ) -> Result<Vec<(u64, u64)>, BackingError> {
        let (_, pieces) = MappedView::plan(memory, backing, len)?;
        Ok(pieces.iter().map(|piece| (piece.file_offset, piece.count)).collect())
    }

    fn plan(memory: &GuestMemoryMmap, backing: &Backing, len: u64) -> Result<(u64, Vec<ViewPiece>), BackingError> {
        if backing.len() < len {
            return Err(BackingError::SizeBacking { needed: len, got: backing.len() });
        }
        let map_len = len.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let mut pieces = Vec::new();
        let mut position = 0u64;
        for entry in backing.entries() {
            if position >= map_len {
                break;
            }
            // The entry holding the resource's last byte may end mid-page: its whole last
            // page is mapped (checked to be guest RAM below).
            let covers_rest = entry.length as u64 >= len - position;
            if entry.addr % PAGE_SIZE != 0 || (!covers_rest && entry.length as u64 % PAGE_SIZE != 0) {
                return Err(BackingError::AlignBacking { addr: entry.addr, length: entry.length as u64 });
            }
            let piece = if covers_rest { map_len - position } else { entry.length as u64 };
            MappedView::plan_guest_range(memory, position, entry.addr, piece, &mut pieces)?;
            position += piece;
        }
        if position < map_len {
            return Err(BackingError::SizeBacking { needed: len, got: position });
        }
        Ok((map_len, pieces))
    }

    fn reserve(len: usize) -> Result<MappedView, BackingError> {
        // SAFETY: an anonymous PROT_NONE mapping at an address of the kernel's choice
        // touches no existing memory; the result is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(BackingError::ReserveView { len, source: io::Error::last_os_error() });
        }
        let base = NonNull::new(base.cast::<u8>())
            .ok_or(BackingError::ReserveView { len, source: io::Error::from(io::ErrorKind::AddrNotAvailable) })?;
        Ok(MappedView { base, len })
    }

    /// Splits guest RAM `[addr, addr + len)`, to go at `position` in the view, at region
    /// boundaries, checking each run can be mapped from the region's file.
    fn plan_guest_range(
        memory: &GuestMemoryMmap,
        position: u64,
        addr: u64,
        len: u64,
        pieces: &mut Vec<ViewPiece>,
    ) -> Result<(), BackingError> {
        let mut done = 0u64;
        while done < len {
            let gpa = addr + done;
            let region = memory
                .find_region(GuestAddress(gpa))
                .ok_or(BackingError::CheckBacking { addr: gpa, length: len - done })?;
            let region_offset = gpa - region.start_addr().raw_value();
            let count = (len - done).min(region.len() - region_offset);
            let file = region.file_offset().ok_or(BackingError::FindBackingFile { addr: gpa })?;
            // A private mapping keeps the guest's writes in anonymous copy-on-write pages
            // the file never sees.
            if region.flags() & libc::MAP_SHARED == 0 {
                return Err(BackingError::FindBackingFile { addr: gpa });
            }
            let file_offset = file.start() + region_offset;
            if file_offset % PAGE_SIZE != 0 || count % PAGE_SIZE != 0 {
                return Err(BackingError::AlignBacking { addr: gpa, length: count });
            }
            pieces.push(ViewPiece { position: position + done, gpa, count, fd: file.file().as_raw_fd(), file_offset });
            done += count;
        }
        Ok(())
    }

    /// Maps one planned piece into the view.
    fn map_piece(&self, memory: &GuestMemoryMmap, piece: &ViewPiece) -> Result<(), BackingError> {
        // Each page is touched through the guest's own mapping before this second mapping
        // of it exists. Where guest RAM is filled lazily (a restore with userfaultfd), that
        // loads the page: MAP_POPULATE here would otherwise allocate it as zeros, hiding
        // the snapshot's bytes from the screen and the guest alike.
        for page in (0..piece.count).step_by(PAGE_SIZE as usize) {
            memory
                .read_obj::<u8>(GuestAddress(piece.gpa + page))
                .map_err(|_| BackingError::CheckBacking { addr: piece.gpa + page, length: PAGE_SIZE })?;
        }
        // SAFETY: the piece lies inside this view's reservation (`plan` keeps every piece
        // within the view's length), so MAP_FIXED replaces only pages this value owns; the
        // file range exists because it backs a guest region that `memory` keeps open.
        let mapped = unsafe {
            libc::mmap(
                self.base.as_ptr().add(piece.position as usize).cast(),
                piece.count as usize,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_POPULATE,
                piece.fd,
                piece.file_offset as libc::off_t,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(BackingError::MapBacking { addr: piece.gpa, source: io::Error::last_os_error() });
        }
        Ok(())
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.base.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for MappedView {
    fn drop(&mut self) {
        // SAFETY: `base..base + len` is the reservation made in `reserve`, owned by this
        // value and no longer reachable once it is dropped.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Zeros;

    impl LoadingRam for Zeros {
        fn piece_bytes(&self) -> u64 {
            4096
        }

        fn read_at(&self, _offset: u64, out: &mut [u8]) -> io::Result<()> {
            out.fill(0);
            Ok(())
        }
    }

    #[test]
    fn the_gate_lends_its_reader_only_while_the_ranges_are_loading() {
        let gate = ViewGate::reading_from(Arc::new(Zeros));
        let screen = [(0x1000u64, 0x2000u64)];
        assert!(gate.reader_while_loading(&screen).is_some());
        gate.open_range(0x1000, 0x1000);
        assert!(gate.reader_while_loading(&screen).is_some(), "half of it is in");
        gate.open_range(0x2000, 0x1000);
        assert!(gate.reader_while_loading(&screen).is_none(), "all of it is in: views map it");
        assert!(gate.reader_while_loading(&[(0x8000, 0x1000)]).is_some(), "another range is still loading");
        gate.open(true);
        assert!(gate.reader_while_loading(&[(0x8000, 0x1000)]).is_none(), "let go once the gate opened");
        assert!(ViewGate::new().reader_while_loading(&screen).is_none(), "a filler without a reader");
    }

    #[test]
    fn the_gate_merges_scattered_ranges_and_holds_only_what_was_opened() {
        let gate = ViewGate::new();
        // A thousand scattered pages, opened out of order, and a run of touching ones.
        let pages: Vec<(u64, u64)> = (0..1000u64).map(|page| ((page * 7919 % 1000) * 0x3000, 0x1000)).collect();
        for &(offset, len) in pages.iter().rev() {
            gate.open_range(offset, len);
        }
        for page in 0..16u64 {
            gate.open_range(0x100_0000 + page * 0x1000, 0x1000);
        }
        assert!(gate.wait_for(&pages), "every page opened is held");
        let state = gate.state.0.lock().unwrap();
        assert_eq!(state.loaded.len(), 1001, "the touching pages are one range");
        assert!(state.holds(0x100_0000 + 0x800, 0xf000));
        assert!(!state.holds(0x1000, 0x1000), "a page between two opened ones is not held");
        assert!(!state.holds(0x0, 0x2000), "nor a range that runs past an opened page");
        assert!(!state.holds(0x100_0000 - 1, 2) && !state.holds(0x101_0000 - 1, 2));
    }
}

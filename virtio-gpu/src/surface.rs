//! A resource's pixels in host memory, and the lent, read-only view of a scanout's pixels.
//!
//! A surface is either the zero-copy view of guest RAM ([`MappedView`]) or, when the
//! backing could not be viewed in place, a host copy refreshed by TRANSFER_TO_HOST_2D.
//! Surfaces are shared (`Arc`) between the device and screenshot readers, so detaching a
//! resource's backing while a screenshot reads it only unmaps once the reader is done.

use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::format::PixelFormat;
use crate::memory::GuestMemoryMmap;
use crate::protocol::Rect;
use crate::view::{Backing, BackingError, LoadingRam, MappedView, ViewGate, PAGE_SIZE};

/// Where a surface's pixels are.
#[derive(Debug)]
pub(crate) enum Storage {
    /// Guest RAM viewed in place.
    Mapped(MappedView),
    /// A host copy of the backing, refreshed on TRANSFER_TO_HOST_2D.
    Copied(RwLock<Vec<u8>>),
    /// Guest RAM to be viewed in place once its pages are loaded: mapped on first read.
    Deferred(DeferredView),
}

/// A view mapped on first use, after its gate opens (see [`ViewGate`]).
#[derive(Debug)]
pub(crate) struct DeferredView {
    memory: GuestMemoryMmap,
    backing: Backing,
    len: u64,
    gate: ViewGate,
    /// The memory files' ranges the view maps: what it waits for.
    ranges: Vec<(u64, u64)>,
    view: OnceLock<Option<MappedView>>,
}

impl DeferredView {
    /// A view of `backing` once `gate` says its pages are in; `Err` where it could never
    /// be mapped.
    pub fn new(
        memory: GuestMemoryMmap,
        backing: Backing,
        len: u64,
        gate: ViewGate,
    ) -> Result<DeferredView, BackingError> {
        let ranges = MappedView::file_ranges(&memory, &backing, len)?;
        Ok(DeferredView { memory, backing, len, gate, ranges, view: OnceLock::new() })
    }

    /// The view, mapped the first time (`None` if the pages never loaded or cannot be
    /// mapped: the surface then has no pixels to lend).
    fn get(&self) -> Option<&MappedView> {
        self.view
            .get_or_init(|| {
                if !self.gate.wait_for(&self.ranges) {
                    return None;
                }
                MappedView::map(&self.memory, &self.backing, self.len).ok()
            })
            .as_ref()
    }

    /// The filler's reader, while the view is not mapped and its pages are not all in.
    fn reader_while_loading(&self) -> Option<Arc<dyn LoadingRam>> {
        match self.view.get() {
            Some(_) => None,
            None => self.gate.reader_while_loading(&self.ranges),
        }
    }
}

/// The pixels of one resource: `height` rows of `stride` bytes.
#[derive(Debug)]
pub(crate) struct Surface {
    pub width: u32,
    pub height: u32,
    pub stride: usize,
    pub format: PixelFormat,
    pub storage: Storage,
}

impl Surface {
    /// Size in bytes of the pixels (rows times stride).
    pub fn byte_len(&self) -> usize {
        self.stride * self.height as usize
    }

    /// Lends the pixels of `rect` (checked to lie inside the surface; `None` otherwise).
    pub fn pixels(&self, rect: Rect) -> Option<ScanoutPixels<'_>> {
        if rect.is_empty() || !rect.fits_in(self.width, self.height) {
            return None;
        }
        let offset = rect.y as usize * self.stride + rect.x as usize * PixelFormat::BYTES_PER_PIXEL as usize;
        let (base, guard) = match &self.storage {
            Storage::Mapped(view) => {
                if view.len() < self.byte_len() {
                    return None;
                }
                (view.as_ptr(), None)
            }
            Storage::Deferred(deferred) => {
                let view = deferred.get()?;
                if view.len() < self.byte_len() {
                    return None;
                }
                (view.as_ptr(), None)
            }
            Storage::Copied(lock) => {
                let guard = lock.read().unwrap_or_else(|poisoned| poisoned.into_inner());
                if guard.len() < self.byte_len() {
                    return None;
                }
                (guard.as_ptr(), Some(guard))
            }
        };
        // SAFETY: `offset` is inside the `byte_len()` bytes at `base` checked above, since
        // `rect` lies inside the surface.
        let base = unsafe { base.add(offset) };
        Some(ScanoutPixels {
            base,
            width: rect.width,
            height: rect.height,
            stride: self.stride,
            format: self.format,
            _guard: guard,
            _surface: PhantomData,
        })
    }

    /// Lends the pixels of `rect` for a packed write: in place, or read through the
    /// filler's reader while a lazy restore has not loaded them yet (rather than waiting
    /// for it). `None` where [`Surface::pixels`] would have none.
    pub fn packed(&self, rect: Rect) -> Option<PackedPixels<'_>> {
        if rect.is_empty() || !rect.fits_in(self.width, self.height) {
            return None;
        }
        if let Storage::Deferred(deferred) = &self.storage {
            if let Some(ram) = deferred.reader_while_loading().filter(|_| deferred.len >= self.byte_len() as u64) {
                let first = rect.y as u64 * self.stride as u64 + rect.x as u64 * PixelFormat::BYTES_PER_PIXEL as u64;
                return Some(PackedPixels {
                    width: rect.width,
                    height: rect.height,
                    format: self.format,
                    source: PackedSource::Loading { ram, ranges: &deferred.ranges, first, stride: self.stride as u64 },
                });
            }
        }
        let pixels = self.pixels(rect)?;
        Some(PackedPixels {
            width: pixels.width,
            height: pixels.height,
            format: pixels.format,
            source: PackedSource::Lent(pixels),
        })
    }

    /// Write access to a copy-backed surface's pixels, `None` for a mapped one.
    pub fn copy_buffer(&self) -> Option<RwLockWriteGuard<'_, Vec<u8>>> {
        match &self.storage {
            Storage::Mapped(_) | Storage::Deferred(_) => None,
            Storage::Copied(lock) => Some(lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())),
        }
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped(_) | Storage::Deferred(_))
    }
}

/// The scanout's pixels, lent without a copy: `height` rows of `width` pixels, each row
/// `stride` bytes after the previous one.
///
/// For a zero-copy scanout these bytes are guest RAM that the guest may be writing at the
/// same moment, so they are never handed out as `&[u8]`: read rows with [`read_row`]
/// (a raw copy), or take the raw pointer.
///
/// [`read_row`]: ScanoutPixels::read_row
pub struct ScanoutPixels<'a> {
    base: *const u8,
    width: u32,
    height: u32,
    stride: usize,
    format: PixelFormat,
    _guard: Option<RwLockReadGuard<'a, Vec<u8>>>,
    _surface: PhantomData<&'a Surface>,
}

impl std::fmt::Debug for ScanoutPixels<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScanoutPixels")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("stride", &self.stride)
            .field("format", &self.format)
            .finish()
    }
}

impl<'a> ScanoutPixels<'a> {
    /// Pixels held by the caller (a raw capture): `height` rows of `width` pixels,
    /// `stride` bytes apart; `None` when `bytes` is too short for them.
    pub(crate) fn of_bytes(
        bytes: &'a [u8],
        width: u32,
        height: u32,
        stride: usize,
        format: PixelFormat,
    ) -> Option<ScanoutPixels<'a>> {
        let row = width as usize * PixelFormat::BYTES_PER_PIXEL as usize;
        let span = (height as usize).checked_sub(1)?.checked_mul(stride)?.checked_add(row)?;
        (width > 0 && stride >= row && bytes.len() >= span).then_some(ScanoutPixels {
            base: bytes.as_ptr(),
            width,
            height,
            stride,
            format,
            _guard: None,
            _surface: PhantomData,
        })
    }
}

impl ScanoutPixels<'_> {
    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// Bytes from one row to the next.
    pub fn stride(&self) -> usize {
        self.stride
    }

    pub fn format(&self) -> PixelFormat {
        self.format
    }

    /// Bytes of one row's pixels (`width * 4`).
    pub fn row_bytes(&self) -> usize {
        self.width as usize * PixelFormat::BYTES_PER_PIXEL as usize
    }

    /// Bytes from the first pixel to one past the last: `(height - 1) * stride + row_bytes`.
    pub fn span_bytes(&self) -> usize {
        (self.height as usize - 1) * self.stride + self.row_bytes()
    }

    /// Copies pixels `x..x + count` of row `y` into the start of `dst`; parts outside the
    /// image or past `dst` are left out. Returns the bytes copied.
    pub fn read_row_span(&self, y: u32, x: u32, count: u32, dst: &mut [u8]) -> usize {
        if y >= self.height || x >= self.width {
            return 0;
        }
        let pixels = count.min(self.width - x) as usize;
        let len = (pixels * PixelFormat::BYTES_PER_PIXEL as usize).min(dst.len());
        let offset = y as usize * self.stride + x as usize * PixelFormat::BYTES_PER_PIXEL as usize;
        // SAFETY: `offset + len` stays inside row `y` of the lent area (checked against
        // width and height above), which `Surface::pixels` checked lies in the storage, and
        // the storage outlives `self`. `dst` is a distinct host buffer. The source may be
        // written by the guest concurrently: it is read as raw bytes, never referenced.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(offset), dst.as_mut_ptr(), len) };
        len
    }

    /// Copies row `y` into the start of `dst`. Returns the bytes copied.
    pub fn read_row(&self, y: u32, dst: &mut [u8]) -> usize {
        self.read_row_span(y, 0, self.width, dst)
    }

    /// Pointer to the first pixel, for callers that hand the view to other code (an
    /// encoder in C, a socket). Valid while `self` lives; the guest may write it.
    pub fn as_ptr(&self) -> *const u8 {
        self.base
    }

    /// Writes every row, packed (`row_bytes` apart, `row_bytes * height` in all), to `fd`
    /// straight from where the pixels are: the kernel reads them, nothing is copied in
    /// this process. The guest may draw meanwhile, as during any capture.
    pub fn write_packed_to(&self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        let row = self.row_bytes();
        if self.stride == row {
            return write_all_from(fd, self.base, self.span_bytes());
        }
        for y in 0..self.height as usize {
            // SAFETY: row `y` starts inside the lent area, as in `read_row_span`.
            write_all_from(fd, unsafe { self.base.add(y * self.stride) }, row)?;
        }
        Ok(())
    }
}

/// A scanout's pixels for a packed write (`height` rows of `width` pixels, one after
/// the other): lent in place, or, while a lazy restore is still loading them, read from
/// where they are loaded from ([`LoadingRam`]), piece by piece.
pub struct PackedPixels<'a> {
    width: u32,
    height: u32,
    format: PixelFormat,
    source: PackedSource<'a>,
}

enum PackedSource<'a> {
    Lent(ScanoutPixels<'a>),
    /// The view's pixels start at byte `first` of the view, whose pages are the RAM file
    /// `ranges` (offset, length) in order; rows are `stride` apart.
    Loading {
        ram: Arc<dyn LoadingRam>,
        ranges: &'a [(u64, u64)],
        first: u64,
        stride: u64,
    },
}

impl std::fmt::Debug for PackedPixels<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedPixels")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("in_place", &self.is_in_place())
            .finish()
    }
}

impl PackedPixels<'_> {
    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    pub fn format(&self) -> PixelFormat {
        self.format
    }

    /// Bytes of one row's pixels (`width * 4`).
    pub fn row_bytes(&self) -> usize {
        self.width as usize * PixelFormat::BYTES_PER_PIXEL as usize
    }

    /// Whether the pixels are read in place (`false`: through a lazy restore's reader).
    pub fn is_in_place(&self) -> bool {
        matches!(self.source, PackedSource::Lent(_))
    }

    /// Writes every row, packed (`row_bytes * height` bytes in all), to `fd`.
    pub fn write_to(&self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        match &self.source {
            PackedSource::Lent(pixels) => pixels.write_packed_to(fd),
            PackedSource::Loading { ram, ranges, first, stride } => {
                let rows =
                    Rows { first: *first, row: self.row_bytes() as u64, stride: *stride, height: self.height as u64 };
                write_rows_loading(&**ram, ranges, rows, fd)
            }
        }
    }
}

/// `height` rows of `row` bytes, `stride` apart, the first at byte `first` of a view.
#[derive(Debug, Clone, Copy)]
struct Rows {
    first: u64,
    row: u64,
    stride: u64,
    height: u64,
}

/// Writes `rows` of a view that is not mapped yet to `fd`, packed, read through `ram`
/// from the RAM file `ranges` (offset, length) the view would map, in order. Reads are
/// cut at the reader's pieces, so each piece is read and checked once; the rows' bytes
/// in a piece go out in one write where they touch.
fn write_rows_loading(
    ram: &dyn LoadingRam,
    ranges: &[(u64, u64)],
    rows: Rows,
    fd: BorrowedFd<'_>,
) -> std::io::Result<()> {
    let Some(last) = rows.height.checked_sub(1) else { return Ok(()) };
    let end = rows.first + last * rows.stride + rows.row;
    let piece = ram.piece_bytes().max(PAGE_SIZE);
    let mut buffer = vec![0u8; piece as usize];
    // Range `index` of the view starts at byte `range_start`.
    let (mut index, mut range_start) = (0usize, 0u64);
    let mut position = rows.first;
    while position < end {
        let &(file_start, range_len) =
            ranges.get(index).ok_or_else(|| std::io::Error::other("the scanout's pixels run past its backing"))?;
        if position >= range_start + range_len {
            range_start += range_len;
            index += 1;
            continue;
        }
        let file_offset = file_start + (position - range_start);
        let len = (end - position).min(range_start + range_len - position).min(piece - file_offset % piece);
        let bytes = &mut buffer[..len as usize];
        ram.read_at(file_offset, bytes)?;
        // The rows' bytes in [position, position + len), joined where they touch.
        let mut run: Option<(u64, u64)> = None;
        let mut y = (position - rows.first) / rows.stride;
        while y < rows.height && rows.first + y * rows.stride < position + len {
            let row_start = rows.first + y * rows.stride;
            let (from, to) = (row_start.max(position), (row_start + rows.row).min(position + len));
            run = match run {
                Some((start, stop)) if stop == from => Some((start, to)),
                Some((start, stop)) => {
                    write_all_from(fd, bytes[(start - position) as usize..].as_ptr(), (stop - start) as usize)?;
                    Some((from, to))
                }
                None if from < to => Some((from, to)),
                None => None,
            };
            y += 1;
        }
        if let Some((start, stop)) = run.filter(|(start, stop)| start < stop) {
            write_all_from(fd, bytes[(start - position) as usize..].as_ptr(), (stop - start) as usize)?;
        }
        position += len;
    }
    Ok(())
}

/// write(2)s `len` bytes from `at` to `fd`, however many calls that takes. No slice is
/// made of them: the guest may be writing them.
fn write_all_from(fd: BorrowedFd<'_>, mut at: *const u8, mut len: usize) -> std::io::Result<()> {
    while len > 0 {
        // SAFETY: the caller lends `len` readable bytes at `at` (pixels of a view that
        // outlives the call); write only reads them.
        let written = unsafe { libc::write(fd.as_raw_fd(), at.cast(), len) };
        match written {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            written if written > 0 => {
                // SAFETY: `written <= len`, so `at` stays inside the lent bytes or one past.
                at = unsafe { at.add(written as usize) };
                len -= written as usize;
            }
            _ => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    /// Pixels written in place arrive packed, row after row, with or without padding
    /// between the rows where they lie.
    #[test]
    fn pixels_written_in_place_arrive_packed() {
        let (width, height) = (3u32, 4u32);
        for stride in [12usize, 20] {
            let bytes: Vec<u8> = (0..stride * height as usize).map(|i| i as u8).collect();
            let pixels = ScanoutPixels::of_bytes(&bytes, width, height, stride, PixelFormat::B8G8R8X8).unwrap();
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            pixels.write_packed_to(ours.as_fd()).unwrap();
            drop(ours);
            let mut received = Vec::new();
            theirs.read_to_end(&mut received).unwrap();
            let packed: Vec<u8> = bytes.chunks(stride).flat_map(|row| row[..12].to_vec()).collect();
            assert_eq!(received, packed, "stride {stride}");
        }
    }

    /// RAM's file as a byte vector, cut in pieces of `piece` bytes; remembers each read.
    #[derive(Debug)]
    struct FileRam {
        bytes: Vec<u8>,
        piece: u64,
        reads: std::sync::Mutex<Vec<(u64, usize)>>,
    }

    impl LoadingRam for FileRam {
        fn piece_bytes(&self) -> u64 {
            self.piece
        }

        fn read_at(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.reads.lock().unwrap().push((offset, out.len()));
            let bytes = self
                .bytes
                .get(offset as usize..offset as usize + out.len())
                .ok_or(std::io::ErrorKind::UnexpectedEof)?;
            out.copy_from_slice(bytes);
            Ok(())
        }
    }

    /// Rows of a view that is not mapped yet arrive packed, read through the loader's
    /// reader from the file ranges the view would map, each read inside one piece.
    #[test]
    fn rows_of_a_view_still_loading_are_read_through_the_loader_and_arrive_packed() {
        let file: Vec<u8> = (0..32768u32).map(|i| (i * 7 + i / 251) as u8).collect();
        // The view is three scattered runs of the file.
        let ranges = [(16384u64, 5000u64), (2048, 9000), (28000, 4000)];
        let view: Vec<u8> =
            ranges.iter().flat_map(|&(at, len)| file[at as usize..(at + len) as usize].to_vec()).collect();
        for (first, row, stride, height) in [(40u64, 480u64, 1000u64, 17u64), (0, 640, 640, 28), (17000, 12, 12, 1)] {
            let ram = FileRam { bytes: file.clone(), piece: 4096, reads: Default::default() };
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            let rows = Rows { first, row, stride, height };
            let writer = std::thread::spawn(move || {
                write_rows_loading(&ram, &ranges, rows, ours.as_fd()).map(|()| ram.reads.into_inner().unwrap())
            });
            let mut received = Vec::new();
            theirs.read_to_end(&mut received).unwrap();
            let reads = writer.join().unwrap().unwrap();
            let packed: Vec<u8> = (0..height)
                .flat_map(|y| view[(first + y * stride) as usize..(first + y * stride + row) as usize].to_vec())
                .collect();
            assert!(received == packed, "rows {rows:?}");
            assert!(reads.iter().all(|&(at, len)| at / 4096 == (at + len as u64 - 1) / 4096), "{reads:?}");
        }
        // Rows that run past the view's ranges are an error, not a short answer.
        let ram = FileRam { bytes: file, piece: 4096, reads: Default::default() };
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let rows = Rows { first: 0, row: 9000, stride: 9000, height: 3 };
        assert!(write_rows_loading(&ram, &ranges, rows, ours.as_fd()).is_err());
    }

    #[test]
    fn writing_in_place_to_a_closed_socket_is_an_error() {
        let bytes = vec![7u8; 64];
        let pixels = ScanoutPixels::of_bytes(&bytes, 4, 4, 16, PixelFormat::B8G8R8X8).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        assert!(pixels.write_packed_to(ours.as_fd()).is_err());
    }
}

//! Guest RAM: one memfd, mapped MAP_SHARED, split around the MMIO gap.
//!
//! The memfd is the single source of the guest's memory: the same fd later serves the
//! zero-copy screen view, snapshot writes and restores (shared/DESIGN.md).

use std::fs::File;
use std::os::fd::FromRawFd;

use carrel_firmware::layout::{MMIO_GAP_END, MMIO_GAP_START};
pub use carrel_gpu::memory::{AtomicBitmap, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vm_memory::{FileOffset, GuestAddress};

/// Smallest guest RAM accepted: room for boot structures and a small kernel.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest RAM accepted.
pub const MAX_MEM_MIB: u64 = 256 * 1024;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {mib} MiB is out of range ({MIN_MEM_MIB}..={MAX_MEM_MIB} MiB)")]
    BadSize { mib: u64 },
    #[error("memfd_create for guest RAM failed: {0}")]
    CreateMemfd(#[source] std::io::Error),
    #[error("could not size the guest RAM memfd to {bytes} bytes: {source}")]
    SizeMemfd { bytes: u64, source: std::io::Error },
    #[error("could not duplicate the guest RAM memfd: {0}")]
    CloneMemfd(#[source] std::io::Error),
    #[error("could not map guest RAM region at {gpa:#x}: {source}")]
    MapRegion { gpa: u64, source: vm_memory::mmap::MmapRegionError },
    #[error("guest RAM region at {gpa:#x} is invalid")]
    InvalidRegion { gpa: u64 },
    #[error("could not assemble guest memory: {0}")]
    Assemble(#[source] vm_memory::GuestRegionCollectionError),
}

/// Guest RAM and the memfd behind it.
#[derive(Debug)]
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    pub memfd: File,
    pub size: u64,
}

/// The guest-physical ranges (start, length) RAM of `size` bytes occupies: below the MMIO
/// gap first, the rest from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((MMIO_GAP_END, size - low));
    }
    ranges
}

/// The memfd offset of guest-physical `gpa`, for RAM of `size` bytes.
pub fn ram_offset(gpa: u64, size: u64) -> Option<u64> {
    let mut offset = 0;
    for (start, len) in ram_ranges(size) {
        if gpa >= start && gpa < start + len {
            return Some(offset + gpa - start);
        }
        offset += len;
    }
    None
}

/// Creates `mib` MiB of guest RAM backed by a fresh memfd.
pub fn create_guest_ram(mib: u64) -> Result<GuestRam, MemoryError> {
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
        return Err(MemoryError::BadSize { mib });
    }
    let size = mib << 20;
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"carrel-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::CreateMemfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let memfd = unsafe { File::from_raw_fd(fd) };
    memfd.set_len(size).map_err(|source| MemoryError::SizeMemfd { bytes: size, source })?;

    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (gpa, len) in ram_ranges(size) {
        let file = memfd.try_clone().map_err(MemoryError::CloneMemfd)?;
        let mapping = MmapRegion::from_file(FileOffset::new(file, file_offset), len as usize)
            .map_err(|source| MemoryError::MapRegion { gpa, source })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(gpa)).ok_or(MemoryError::InvalidRegion { gpa })?;
        regions.push(region);
        file_offset += len;
    }
    let memory = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Assemble)?;
    Ok(GuestRam { memory, memfd, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn ram_ranges_below_gap_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
    }

    #[test]
    fn ram_ranges_above_gap_resumes_at_4gib() {
        let size = MMIO_GAP_START + (1 << 30);
        assert_eq!(ram_ranges(size), vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]);
    }

    #[test]
    fn create_guest_ram_rejects_tiny_size() {
        assert!(matches!(create_guest_ram(1), Err(MemoryError::BadSize { mib: 1 })));
    }

    #[test]
    fn guest_ram_writes_land_in_the_memfd() {
        use std::os::unix::fs::FileExt;
        let ram = create_guest_ram(32).unwrap();
        ram.memory.write_obj(0xdead_beef_u32, GuestAddress(0x1234)).unwrap();
        let mut bytes = [0u8; 4];
        ram.memfd.read_exact_at(&mut bytes, 0x1234).unwrap();
        assert_eq!(u32::from_le_bytes(bytes), 0xdead_beef);
        assert_eq!(ram.memory.num_regions(), 1);
    }
}

//! The screen of a hibernated VM, straight from its snapshot files: no KVM, no VM.
//!
//! A whole-screen PNG is the one the snapshot kept (`screen.bin`, see [`super::shown`]);
//! anything else, or a snapshot without a good one, is drawn from memory:
//! `memory.bin` is mapped shared and read-only, so the screen's resources are viewed in
//! place as in the running VM and nothing can write the file. carrel-gpu rebuilds the
//! saved device on it (the same validating restore a wake uses) and captures the scanout.
//! The chunks the scanout's pixels lie in are checked against their digests first. A diff
//! is shown from the screen's chunks of each layer of its chain, loaded into fresh memory
//! and checked.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::memory::{GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use carrel_gpu::{Gpu, GpuConfig};
use vm_memory::{FileOffset, GuestAddress};

use super::{load_snapshot, SnapshotError, MEMORY_FILE};
use crate::control::protocol::{Screenshot, ScreenshotRequest};
use crate::memory::{ram_offset as file_offset, ram_ranges};
use crate::services::screen::{capture, ScreenSource};

fn refused(dir: &Path, reason: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Mismatch(format!("{}: {reason}", dir.display()))
}

/// Guest RAM of `size` bytes as a shared, read-only mapping of `memory.bin`.
fn map_memory(dir: &Path, size: u64) -> Result<GuestMemoryMmap, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let error = |source| SnapshotError::ReadFile { path: path.display().to_string(), source };
    let file = super::memory::open_image(&path, size)?;
    let mut regions = Vec::new();
    let mut offset = 0;
    for (gpa, len) in ram_ranges(size) {
        let file = file.try_clone().map_err(error)?;
        let mapping =
            MmapRegion::build(Some(FileOffset::new(file, offset)), len as usize, libc::PROT_READ, libc::MAP_SHARED)
                .map_err(|err| refused(dir, format!("cannot map {MEMORY_FILE}: {err}")))?;
        regions
            .push(GuestRegionMmap::new(mapping, GuestAddress(gpa)).ok_or_else(|| refused(dir, "bad memory region"))?);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|err| refused(dir, err))
}

/// The RAM (file offset, length) under the scanout resource's backing.
fn scanout_ram(gpu: &carrel_gpu::persist::GpuState, size: u64) -> Vec<(u64, u64)> {
    let scanout = gpu.scanout.map(|(id, ..)| id);
    gpu.resources
        .iter()
        .filter(|resource| Some(resource.resource_id) == scanout)
        .flat_map(|resource| resource.backing.iter().flatten())
        .filter_map(|&(gpa, len)| Some((file_offset(gpa, size)?, u64::from(len))))
        .collect()
}

/// `ranges` (offset, length) sorted, with overlapping and touching ones joined.
fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut joined: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (offset, len) in ranges {
        match joined.last_mut() {
            Some((start, size)) if offset <= *start + *size => *size = (*size).max(offset + len - *start),
            _ => joined.push((offset, len)),
        }
    }
    joined
}

/// A screenshot of the VM saved in `dir`, as its screen was when the snapshot was taken.
pub fn screenshot(dir: &Path, request: &ScreenshotRequest) -> Result<Screenshot, SnapshotError> {
    let snapshot = load_snapshot(dir)?;
    let gpu_state = snapshot.state.gpu().ok_or_else(|| refused(dir, "the VM has no screen"))?;
    // The screen the snapshot kept, when that is what is asked.
    let kept = (gpu_state.width, gpu_state.height, gpu_state.gpu.last_frame);
    if let Some(shown) = super::shown::Shown::read(dir)
        .filter(|shown| shown.answers(request) && (shown.width, shown.height, shown.frame) == kept)
    {
        return Ok(shown.screenshot());
    }
    let size = snapshot.state.memory.size;
    snapshot.state.memory.validate(size)?;
    let config = GpuConfig::new(gpu_state.width, gpu_state.height).map_err(|err| refused(dir, err))?;
    if snapshot.state.memory.parent.is_some() {
        let parents = super::load_parents(&snapshot)?;
        let ram = crate::memory::create_guest_ram(snapshot.config.mem_mib).map_err(|err| refused(dir, err))?;
        let shown = scanout_ram(&gpu_state.gpu, size);
        let layers: Vec<_> = super::layers(&snapshot, &parents).collect();
        // What each layer's successors write: its chunks there need not be read. A screen
        // redrawn between hibernations is then read once, from the newest layer.
        let mut hidden = vec![Vec::new(); layers.len()];
        let mut written: Vec<(u64, u64)> = Vec::new();
        for (index, layer) in layers.iter().enumerate().rev() {
            hidden[index] = merged(written.clone());
            let image = &layer.state.memory;
            written.extend(image.chunks.iter().map(|chunk| (chunk.offset, chunk.len)));
            written.extend(image.zeroed.iter().copied());
        }
        for (layer, hidden) in layers.iter().zip(&hidden) {
            let path = layer.dir.join(MEMORY_FILE);
            super::memory::read_image_within(&ram, &path, &layer.state.memory, Some(&shown), hidden)?;
        }
        let gpu = Gpu::restore(config, ram.memory, &gpu_state.gpu).map_err(|err| refused(dir, err))?;
        return capture(&ScreenSource::Local(gpu.screen()), request).map_err(|err| refused(dir, err));
    }
    let memory = map_memory(dir, size)?;

    // Check the chunks under the scanout's backing before showing their pixels.
    let memory_file = File::open(dir.join(MEMORY_FILE))
        .map_err(|source| SnapshotError::ReadFile { path: dir.join(MEMORY_FILE).display().to_string(), source })?;
    let mut checked = std::collections::BTreeSet::new();
    // Backing outside RAM is left out here: the device restore below refuses it.
    for (first, len) in scanout_ram(&gpu_state.gpu, size) {
        let last = first + len.max(1) - 1;
        for (index, chunk) in snapshot.state.memory.chunks.iter().enumerate() {
            if chunk.offset <= last && chunk.offset + chunk.len > first && checked.insert(index) {
                let mut bytes = vec![0u8; chunk.len as usize];
                let read = memory_file.read_exact_at(&mut bytes, chunk.offset);
                if read.is_err() || blake3::hash(&bytes).as_bytes() != &chunk.digest {
                    return Err(super::MemoryFileError::Corrupt {
                        path: dir.join(MEMORY_FILE).display().to_string(),
                        offset: chunk.offset,
                    }
                    .into());
                }
            }
        }
    }
    let gpu = Gpu::restore(config, memory, &gpu_state.gpu).map_err(|err| refused(dir, err))?;
    capture(&ScreenSource::Local(gpu.screen()), request).map_err(|err| refused(dir, err))
}

#[cfg(test)]
mod tests {
    use super::merged;

    #[test]
    fn ranges_are_merged_where_they_overlap_or_touch() {
        let ranges = vec![(0x5000, 0x1000), (0, 0x2000), (0x1000, 0x800), (0x2000, 0x1000), (0x9000, 0x10)];
        assert_eq!(merged(ranges), [(0, 0x3000), (0x5000, 0x1000), (0x9000, 0x10)]);
        assert_eq!(merged(Vec::new()), []);
    }
}

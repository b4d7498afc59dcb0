//! Physical memory for buffers the host reads (framebuffers): a bump allocator over the
//! usable ranges of BootInfo. Memory is identity mapped, so an allocation's physical
//! address is also where the kernel writes it. Nothing is freed: Desk allocates its
//! buffers once at start, then hands the largest block left to the heap.

use carrel_firmware::{memory_kind, BootInfo, MAX_MEMORY_RANGES};

use crate::GuestCell;

struct Ranges {
    ranges: [(u64, u64); MAX_MEMORY_RANGES],
    count: usize,
}

static FREE: GuestCell<Ranges> = GuestCell::new(Ranges { ranges: [(0, 0); MAX_MEMORY_RANGES], count: 0 });

/// Highest address the boot page tables map (the VMM maps at least 4 GiB).
const MAPPED_LIMIT: u64 = 4 << 30;

/// Takes the usable ranges above the kernel image from BootInfo.
pub fn init(info: &BootInfo) {
    let free = FREE.get();
    for range in info.memory_ranges().iter().filter(|range| range.kind == memory_kind::USABLE) {
        let start = range.base.max(info.kernel_end).next_multiple_of(4096);
        let end = (range.base + range.size).min(MAPPED_LIMIT);
        if start < end && free.count < MAX_MEMORY_RANGES {
            free.ranges[free.count] = (start, end);
            free.count += 1;
        }
    }
}

/// A page-aligned block of `size` bytes, or `None` when memory is short. The block is
/// zero: guest RAM starts as a fresh zero-filled memfd and nothing is handed out twice.
/// (Writing zeroes anyway would fault in every page of the heap at boot: ~15 µs a page.)
pub fn allocate(size: u64) -> Option<u64> {
    let size = size.next_multiple_of(4096);
    let free = FREE.get();
    for range in free.ranges[..free.count].iter_mut() {
        if range.1 - range.0 >= size {
            let block = range.0;
            range.0 += size;
            return Some(block);
        }
    }
    None
}

/// The largest free block whole, as (start, size): what is left once the device buffers
/// are taken becomes the heap. `None` when nothing is free.
pub fn allocate_largest() -> Option<(u64, u64)> {
    let free = FREE.get();
    let range =
        free.ranges[..free.count].iter_mut().filter(|range| range.1 > range.0).max_by_key(|range| range.1 - range.0)?;
    let block = (range.0, range.1 - range.0);
    range.0 = range.1;
    Some(block)
}

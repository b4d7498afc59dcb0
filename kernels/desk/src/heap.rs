//! The kernel heap (for the guest agent's messages, files and `fill` buffers): a
//! first-fit free list over the largest block of physical memory left at start, nearly
//! all of guest RAM.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Gives the heap `size` bytes starting at `start` (identity mapped, unused).
pub fn init(start: u64, size: u64) {
    // SAFETY: the caller hands over a block nothing else uses, for the kernel's lifetime.
    unsafe { HEAP.lock().init(start as *mut u8, size as usize) };
}

/// Bytes the heap has free.
pub fn free_bytes() -> usize {
    HEAP.lock().free()
}

/// Bytes the heap manages.
pub fn size_bytes() -> usize {
    HEAP.lock().size()
}

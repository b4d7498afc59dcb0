//! The guest-memory types every Carrel device works on: vm-memory's mmap backend with a
//! dirty-page bitmap per region.
//!
//! Each write a device makes to guest RAM through these types (used rings, response and
//! receive buffers) marks its pages in the region's [`AtomicBitmap`]. Together with KVM's
//! dirty log of the vCPUs' own writes, that is what a diff snapshot saves.

pub use vm_memory::bitmap::AtomicBitmap;

/// Guest RAM as the devices see it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;
/// The mapping behind a [`GuestRegionMmap`].
pub type MmapRegion = vm_memory::MmapRegion<AtomicBitmap>;

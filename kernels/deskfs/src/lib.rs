//! The Desk kernel's persistent file store: whole files by path, over any
//! [`BlockDevice`] of 4 KiB blocks, safe against a crash or a power loss at any point.
//!
//! `no_std` + `alloc`, so the same code runs in the Desk kernel (over its virtio-blk
//! driver) and in host unit tests (over simulated disks that lose and tear writes).
//!
//! # On disk
//!
//! ```text
//! block 0        superblock slot A     \  one 512-byte sector used, the rest zero
//! block 1        superblock slot B     /
//! blocks 2..16   reserved, always zero (the first 64 KiB: where other formats keep headers)
//! blocks 16..    file data and metadata, wherever the allocator put them
//! ```
//!
//! A superblock holds a generation number, the disk size it was made for, where the
//! metadata lies (up to [`layout::MAX_METADATA_EXTENTS`] extents), its length and blake3
//! digest, and a blake3 digest of the superblock itself. The metadata is the whole file
//! table: for each file its path, mode, size, the blake3 of its content and its extents.
//!
//! # Commits (copy on write)
//!
//! Every change (a put, a remove, a recursive remove) is one commit:
//!
//! 1. the new file data and the new metadata go to blocks the live version does not
//!    use (nothing the live version points to is ever written);
//! 2. flush;
//! 3. the new superblock (generation + 1) goes into the *other* slot, the one holding the
//!    version before the live one;
//! 4. flush. Only now does the commit return success.
//!
//! A crash before step 3 reaches the disk leaves the live superblock pointing at
//! untouched blocks; a crash during step 3 leaves the new superblock either whole or
//! failing its digest, and the live one in the other slot untouched. Mount takes the
//! valid superblock with the highest generation whose file table matches its digest, so
//! it finds either the old version or the new one, never a mix. The superblock fits in
//! one sector, so a device that writes 512-byte sectors atomically (what disks promise)
//! never tears it; the second slot and the digests cover a device that tears even a
//! sector.
//!
//! The free map is not stored: mount rebuilds it from the live file table. Mount flushes
//! before the first new commit can start, so a superblock that an earlier boot wrote but
//! never saw flushed is made durable before the blocks of the version before it are
//! reused. When a commit fails after its superblock write was sent, that version may be
//! on disk: its blocks stay in use until the next mount, and the next commit goes into
//! the same slot.
//!
//! A disk is formatted only when [`inspect`] says [`DiskContents::Blank`]: its first
//! 64 KiB are zero, or hold nothing but pieces of the superblock a format writes (a
//! format cut short); a disk holding anything else is never written by
//! [`Store::format`]. Each commit rewrites the whole file table, so the store suits the
//! few hundred or few thousand files of an agent's workspace, not millions.
//!
//! The tests (`src/tests.rs`) crash a simulated disk at every device operation of
//! random sequences of puts and removes, keep a random subset or a torn prefix of the
//! unflushed writes (torn at sector borders or at any byte), and check after each mount
//! that every file is its old or its new version.

#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

mod free_map;
pub mod layout;
mod store;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

use alloc::string::String;

pub use store::{inspect, DiskContents, FileEntry, Store};

/// Bytes in a block, the unit of [`BlockDevice`] and of every allocation.
pub const BLOCK_SIZE: usize = 4096;
/// Bytes in the device's sector, the unit a device writes atomically.
pub const SECTOR_SIZE: usize = 512;
/// Longest path a file may have, in bytes.
pub const MAX_PATH_LEN: usize = 4096;

/// A disk of [`BLOCK_SIZE`] blocks.
///
/// `read` and `write` move whole consecutive blocks: a buffer's length is a non-zero
/// multiple of [`BLOCK_SIZE`], and `block` plus the buffer's block count is at most
/// [`block_count`](BlockDevice::block_count). `flush` returns once every write that
/// completed before it is durable.
pub trait BlockDevice {
    fn block_count(&self) -> u64;
    fn read(&mut self, block: u64, buffer: &mut [u8]) -> Result<(), DeviceError>;
    fn write(&mut self, block: u64, data: &[u8]) -> Result<(), DeviceError>;
    fn flush(&mut self) -> Result<(), DeviceError>;
    /// Whether the device refuses writes; a read-only device mounts read-only.
    fn read_only(&self) -> bool {
        false
    }
}

/// Why the device could not do what was asked, in the device driver's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DeviceError(pub String);

/// A run of consecutive blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Why a store operation failed. A failed operation changes nothing the store shows:
/// the files are those before it, on disk and in memory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("reading block {block} of the disk failed: {source}")]
    ReadBlock { block: u64, source: DeviceError },
    #[error("writing block {block} of the disk failed: {source}")]
    WriteBlock { block: u64, source: DeviceError },
    #[error("flushing the disk failed: {source}")]
    Flush { source: DeviceError },
    #[error("the disk is read-only: files cannot be written or removed")]
    ReadOnly,
    #[error("the disk is full: {needed} bytes needed, {free} bytes free; remove files to make room")]
    NoSpace { needed: u64, free: u64 },
    #[error("{path}: no such file")]
    NotFound { path: String },
    #[error("a path must be 1 to {MAX_PATH_LEN} bytes long (this one is {len})")]
    InvalidPath { len: usize },
    #[error("the disk is blank (its first 64 KiB are zero): format it to make a store")]
    Blank,
    #[error("the disk holds something other than a Carrel store; it is left as it is")]
    Unrecognized,
    #[error("the disk's store is damaged ({reason}); it is left as it is")]
    Damaged { reason: &'static str },
    #[error("{path}: the data on disk does not match the file's blake3 digest")]
    ContentMismatch { path: String },
    #[error("the disk has {blocks} blocks of 4 KiB; a store needs at least {}", layout::MIN_BLOCKS)]
    TooSmall { blocks: u64 },
    #[error("the store was made for {made_for} blocks but the disk now has {found}")]
    DiskShrank { made_for: u64, found: u64 },
}

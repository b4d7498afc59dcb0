//! The store's bytes on disk: the superblock and the file table it points to, encoded
//! little-endian by hand. Decoding never trusts the bytes: every length and extent is
//! checked, and anything out of shape is `None`, never a panic.
//!
//! Superblock (the first sector of its block; the rest of the block is zero):
//!
//! ```text
//!   0  magic "CarrelFS"          8
//!   8  format version u32        4
//!  12  flags u32 (0)             4
//!  16  generation u64            8
//!  24  block count u64           8    the disk size the store was made for
//!  32  metadata length u64       8    bytes
//!  40  metadata blake3           32
//!  72  metadata extent count u32 4
//!  76  zero                      4
//!  80  extents (start u64, len u64) x 24 = 384
//! 464  zero                      16
//! 480  blake3 of bytes 0..480    32
//! ```
//!
//! File table: `count u32`, then per file `path_len u16, path (UTF-8), mode u32,
//! size u64, blake3 [32], extent_count u32, extents (start u64, len u64) x extent_count`,
//! sorted by path.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use crate::store::FileEntry;
use crate::{Extent, BLOCK_SIZE, MAX_PATH_LEN, SECTOR_SIZE};

pub const MAGIC: [u8; 8] = *b"CarrelFS";
pub const FORMAT_VERSION: u32 = 1;
/// Blocks at the start of the disk that hold no data: the two superblock slots and
/// zeros to the end of the first 64 KiB.
pub const RESERVED_BLOCKS: u64 = 16;
/// Where the two superblocks live.
pub const SUPERBLOCK_SLOTS: [u64; 2] = [0, 1];
/// Metadata extents one superblock can point to.
pub const MAX_METADATA_EXTENTS: usize = 24;
/// Smallest disk a store is made on: the reserved area and 240 blocks (~1 MiB) for files.
pub const MIN_BLOCKS: u64 = 256;

const DIGEST_OFFSET: usize = 480;
const EXTENTS_OFFSET: usize = 80;

/// What a superblock says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub generation: u64,
    pub block_count: u64,
    pub metadata_len: u64,
    pub metadata_digest: [u8; 32],
    pub metadata_extents: Vec<Extent>,
}

impl Superblock {
    /// The whole block to write into a slot.
    pub fn encode(&self) -> Vec<u8> {
        let mut block = alloc::vec![0u8; BLOCK_SIZE];
        block[0..8].copy_from_slice(&MAGIC);
        block[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        block[16..24].copy_from_slice(&self.generation.to_le_bytes());
        block[24..32].copy_from_slice(&self.block_count.to_le_bytes());
        block[32..40].copy_from_slice(&self.metadata_len.to_le_bytes());
        block[40..72].copy_from_slice(&self.metadata_digest);
        block[72..76].copy_from_slice(&(self.metadata_extents.len() as u32).to_le_bytes());
        for (index, extent) in self.metadata_extents.iter().enumerate() {
            let at = EXTENTS_OFFSET + index * 16;
            block[at..at + 8].copy_from_slice(&extent.start.to_le_bytes());
            block[at + 8..at + 16].copy_from_slice(&extent.len.to_le_bytes());
        }
        let digest = blake3::hash(&block[..DIGEST_OFFSET]);
        block[DIGEST_OFFSET..SECTOR_SIZE].copy_from_slice(digest.as_bytes());
        block
    }

    /// The superblock in `block`, or `None` when it is not one whole and valid.
    pub fn decode(block: &[u8]) -> Option<Superblock> {
        let sector = block.get(..SECTOR_SIZE)?;
        if sector[0..8] != MAGIC || u32_at(sector, 8)? != FORMAT_VERSION {
            return None;
        }
        if blake3::hash(&sector[..DIGEST_OFFSET]).as_bytes() != &sector[DIGEST_OFFSET..SECTOR_SIZE] {
            return None;
        }
        let count = u32_at(sector, 72)? as usize;
        if count > MAX_METADATA_EXTENTS {
            return None;
        }
        let metadata_extents = (0..count)
            .map(|index| {
                let at = EXTENTS_OFFSET + index * 16;
                Some(Extent { start: u64_at(sector, at)?, len: u64_at(sector, at + 8)? })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Superblock {
            generation: u64_at(sector, 16)?,
            block_count: u64_at(sector, 24)?,
            metadata_len: u64_at(sector, 32)?,
            metadata_digest: sector[40..72].try_into().ok()?,
            metadata_extents,
        })
    }

    /// Whether this block starts like a superblock (valid or not): the disk is ours.
    pub fn has_magic(block: &[u8]) -> bool {
        block.get(..8) == Some(&MAGIC[..])
    }
}

/// The file table as bytes.
pub fn encode_files(files: &BTreeMap<String, FileEntry>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(files.len() as u32).to_le_bytes());
    for (path, file) in files {
        out.extend_from_slice(&(path.len() as u16).to_le_bytes());
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(&file.mode.to_le_bytes());
        out.extend_from_slice(&file.size.to_le_bytes());
        out.extend_from_slice(&file.digest);
        out.extend_from_slice(&(file.extents.len() as u32).to_le_bytes());
        for extent in &file.extents {
            out.extend_from_slice(&extent.start.to_le_bytes());
            out.extend_from_slice(&extent.len.to_le_bytes());
        }
    }
    out
}

/// The file table in `bytes`, or `None` when it is out of shape: a truncated entry, a
/// path that is not UTF-8 or out of order, or extents that do not cover the size.
/// Whether the extents fit the disk and overlap is the free map's check, at mount.
pub fn decode_files(bytes: &[u8]) -> Option<BTreeMap<String, FileEntry>> {
    let mut reader = Reader { bytes, at: 0 };
    let count = reader.u32()?;
    let mut files = BTreeMap::new();
    let mut previous: Option<String> = None;
    for _ in 0..count {
        let path_len = usize::from(reader.u16()?);
        if path_len == 0 || path_len > MAX_PATH_LEN {
            return None;
        }
        let path = String::from(core::str::from_utf8(reader.take(path_len)?).ok()?);
        if previous.as_ref().is_some_and(|previous| previous >= &path) {
            return None;
        }
        let mode = reader.u32()?;
        let size = reader.u64()?;
        let digest: [u8; 32] = reader.take(32)?.try_into().ok()?;
        let extent_count = reader.u32()? as usize;
        // Each extent takes 16 bytes: a count the bytes cannot hold is refused before
        // anything is allocated for it.
        if extent_count > reader.left() / 16 {
            return None;
        }
        let mut extents = Vec::with_capacity(extent_count);
        let mut blocks: u64 = 0;
        for _ in 0..extent_count {
            let extent = Extent { start: reader.u64()?, len: reader.u64()? };
            if extent.len == 0 {
                return None;
            }
            blocks = blocks.checked_add(extent.len)?;
            extents.push(extent);
        }
        if blocks != blocks_for(size) {
            return None;
        }
        previous = Some(path.clone());
        files.insert(path, FileEntry { mode, size, digest, extents });
    }
    (reader.left() == 0).then_some(files)
}

/// Blocks that hold `bytes` bytes.
pub fn blocks_for(bytes: u64) -> u64 {
    bytes.div_ceil(BLOCK_SIZE as u64)
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let slice = self.bytes.get(self.at..self.at.checked_add(len)?)?;
        self.at += len;
        Some(slice)
    }

    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_files() -> BTreeMap<String, FileEntry> {
        let mut files = BTreeMap::new();
        files.insert(
            String::from("/a"),
            FileEntry { mode: 0o644, size: 5000, digest: [7; 32], extents: alloc::vec![Extent { start: 20, len: 2 }] },
        );
        files
            .insert(String::from("/b/empty"), FileEntry { mode: 0o600, size: 0, digest: [1; 32], extents: Vec::new() });
        files
    }

    #[test]
    fn superblock_round_trips_and_fits_one_sector() {
        let superblock = Superblock {
            generation: 9,
            block_count: 1 << 20,
            metadata_len: 123,
            metadata_digest: [3; 32],
            metadata_extents: alloc::vec![Extent { start: 16, len: 1 }, Extent { start: 99, len: 4 }],
        };
        let block = superblock.encode();
        assert_eq!(block.len(), BLOCK_SIZE);
        assert!(block[SECTOR_SIZE..].iter().all(|&byte| byte == 0));
        assert_eq!(Superblock::decode(&block), Some(superblock));
    }

    #[test]
    fn superblock_with_any_flipped_byte_is_refused() {
        let block = Superblock {
            generation: 1,
            block_count: 512,
            metadata_len: 4,
            metadata_digest: [0; 32],
            metadata_extents: alloc::vec![Extent { start: 16, len: 1 }],
        }
        .encode();
        for at in 0..SECTOR_SIZE {
            let mut damaged = block.clone();
            damaged[at] ^= 0x10;
            assert_eq!(Superblock::decode(&damaged), None, "byte {at}");
        }
    }

    #[test]
    fn file_table_round_trips() {
        let files = sample_files();
        assert_eq!(decode_files(&encode_files(&files)), Some(files));
    }

    #[test]
    fn truncated_or_extended_file_table_is_refused() {
        let bytes = encode_files(&sample_files());
        for len in 0..bytes.len() {
            assert_eq!(decode_files(&bytes[..len]), None, "length {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode_files(&longer), None);
    }

    #[test]
    fn file_table_whose_extents_miss_the_size_is_refused() {
        let mut files = sample_files();
        files.get_mut("/a").unwrap().size = 9000;
        assert_eq!(decode_files(&encode_files(&files)), None);
    }

    #[test]
    fn file_table_with_huge_counts_is_refused_without_allocating() {
        let mut bytes = alloc::vec![1, 0, 0, 0, 1, 0, b'/'];
        bytes.extend_from_slice(&[0; 4 + 8 + 32]);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_files(&bytes), None);
        assert_eq!(decode_files(&u32::MAX.to_le_bytes()), None);
    }
}

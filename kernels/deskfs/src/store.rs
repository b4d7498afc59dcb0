//! The mounted store: the file table in memory, the free map, and the commit that
//! writes a new version copy-on-write (see the crate documentation for the order).

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use crate::free_map::FreeMap;
use crate::layout::{
    self, blocks_for, Superblock, MAX_METADATA_EXTENTS, MIN_BLOCKS, RESERVED_BLOCKS, SUPERBLOCK_SLOTS,
};
use crate::{BlockDevice, DeviceError, Extent, StoreError, BLOCK_SIZE, MAX_PATH_LEN};

/// One file of the live version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub mode: u32,
    pub size: u64,
    /// blake3 of the content.
    pub digest: [u8; 32],
    pub(crate) extents: Vec<Extent>,
}

/// What a disk holds, as far as its first 64 KiB tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskContents {
    /// A store: at least one superblock is valid (the highest generation is given).
    Store { generation: u64 },
    /// Superblocks of ours, none of them valid: a damaged store, never formatted over.
    Damaged,
    /// All zero, or holding only pieces of an interrupted format: safe to format.
    Blank,
    /// Anything else: another filesystem, a partition table, benchmark scratch data.
    Foreign,
}

/// Reads the first 64 KiB of `device` and says what they hold.
pub fn inspect<D: BlockDevice>(device: &mut D) -> Result<DiskContents, StoreError> {
    let area = read_reserved_area(device)?;
    let slots = SUPERBLOCK_SLOTS.map(|slot| &area[slot as usize * BLOCK_SIZE..][..BLOCK_SIZE]);
    if let Some(generation) = slots.iter().filter_map(|block| Superblock::decode(block)).map(|sb| sb.generation).max() {
        return Ok(DiskContents::Store { generation });
    }
    let reserved_zero = area[SUPERBLOCK_SLOTS.len() * BLOCK_SIZE..].iter().all(|&byte| byte == 0);
    // A format's first superblock is the same on every disk of a size, so a slot whose
    // every byte is zero or that superblock's byte holds what a torn format left.
    let first = first_superblock(device.block_count()).encode();
    let torn_format = |block: &[u8]| block.iter().zip(&first).all(|(&byte, &expected)| byte == 0 || byte == expected);
    if reserved_zero && slots.iter().all(|block| torn_format(block)) {
        return Ok(DiskContents::Blank);
    }
    if slots.iter().any(|block| Superblock::has_magic(block)) {
        return Ok(DiskContents::Damaged);
    }
    Ok(DiskContents::Foreign)
}

/// The superblock a format writes: generation 1, an empty file table in the first
/// block after the reserved area.
fn first_superblock(block_count: u64) -> Superblock {
    let table = layout::encode_files(&BTreeMap::new());
    Superblock {
        generation: 1,
        block_count,
        metadata_len: table.len() as u64,
        metadata_digest: *blake3::hash(&table).as_bytes(),
        metadata_extents: vec![Extent { start: RESERVED_BLOCKS, len: 1 }],
    }
}

fn read_reserved_area<D: BlockDevice>(device: &mut D) -> Result<Vec<u8>, StoreError> {
    let blocks = RESERVED_BLOCKS.min(device.block_count());
    if blocks < SUPERBLOCK_SLOTS.len() as u64 {
        return Err(StoreError::TooSmall { blocks: device.block_count() });
    }
    let mut area = vec![0u8; blocks as usize * BLOCK_SIZE];
    device.read(0, &mut area).map_err(|source| StoreError::ReadBlock { block: 0, source })?;
    Ok(area)
}

/// A mounted store on `D`.
#[derive(Debug)]
pub struct Store<D> {
    device: D,
    files: BTreeMap<String, FileEntry>,
    free: FreeMap,
    generation: u64,
    /// The slot holding the live superblock: the next commit writes the other one.
    slot: usize,
    pub(crate) metadata_extents: Vec<Extent>,
    block_count: u64,
    read_only: bool,
}

impl<D: BlockDevice> Store<D> {
    /// Makes an empty store (generation 1) on a blank disk. A disk that is not
    /// [`DiskContents::Blank`] is refused and left as it is.
    pub fn format(mut device: D) -> Result<Store<D>, StoreError> {
        if device.read_only() {
            return Err(StoreError::ReadOnly);
        }
        let block_count = device.block_count();
        if block_count < MIN_BLOCKS {
            return Err(StoreError::TooSmall { blocks: block_count });
        }
        match inspect(&mut device)? {
            DiskContents::Blank => {}
            DiskContents::Foreign => return Err(StoreError::Unrecognized),
            DiskContents::Damaged => return Err(StoreError::Damaged { reason: "no superblock is valid" }),
            DiskContents::Store { .. } => return Err(StoreError::Damaged { reason: "it is a store already" }),
        }
        let mut free = FreeMap::new(block_count);
        free.claim(Extent { start: 0, len: RESERVED_BLOCKS });
        // Generation 0 is a version that was never on disk: the first commit writes
        // generation 1 into slot 0.
        let mut store = Store {
            device,
            files: BTreeMap::new(),
            free,
            generation: 0,
            slot: 1,
            metadata_extents: Vec::new(),
            block_count,
            read_only: false,
        };
        store.commit(BTreeMap::new(), Vec::new(), Vec::new())?;
        debug_assert_eq!(store.metadata_extents, first_superblock(block_count).metadata_extents);
        Ok(store)
    }

    /// Mounts the store on `device`: the valid superblock with the highest generation
    /// whose file table is whole. Blank and foreign disks are refused ([`StoreError::Blank`],
    /// [`StoreError::Unrecognized`]).
    pub fn mount(mut device: D) -> Result<Store<D>, StoreError> {
        let read_only = device.read_only();
        if !read_only {
            // What the last boot wrote and never saw flushed becomes durable before any
            // block the version before it used can be written again (crate docs).
            device.flush().map_err(|source| StoreError::Flush { source })?;
        }
        let area = read_reserved_area(&mut device)?;
        let mut candidates: Vec<(usize, Superblock)> = SUPERBLOCK_SLOTS
            .iter()
            .enumerate()
            .filter_map(|(slot, &block)| {
                Superblock::decode(&area[block as usize * BLOCK_SIZE..][..BLOCK_SIZE]).map(|sb| (slot, sb))
            })
            .collect();
        candidates.sort_by_key(|(_, superblock)| core::cmp::Reverse(superblock.generation));
        let mut last_problem = None;
        for (slot, superblock) in candidates {
            match load_version(&mut device, &superblock)? {
                Ok((files, free)) => {
                    return Ok(Store {
                        device,
                        files,
                        free,
                        generation: superblock.generation,
                        slot,
                        metadata_extents: superblock.metadata_extents,
                        block_count: superblock.block_count,
                        read_only,
                    })
                }
                Err(problem) => last_problem = Some(problem),
            }
        }
        if let Some(problem) = last_problem {
            return Err(problem);
        }
        match inspect(&mut device)? {
            DiskContents::Blank => Err(StoreError::Blank),
            DiskContents::Damaged | DiskContents::Store { .. } => {
                Err(StoreError::Damaged { reason: "no superblock is valid" })
            }
            DiskContents::Foreign => Err(StoreError::Unrecognized),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The live files by path, in path order.
    pub fn files(&self) -> &BTreeMap<String, FileEntry> {
        &self.files
    }

    pub fn stat(&self, path: &str) -> Option<&FileEntry> {
        self.files.get(path)
    }

    /// Bytes the store was made for, reserved area included.
    pub fn capacity_bytes(&self) -> u64 {
        self.block_count * BLOCK_SIZE as u64
    }

    /// Bytes free for new data (each commit also takes a few blocks for the file table).
    pub fn free_bytes(&self) -> u64 {
        self.free.free_blocks() * BLOCK_SIZE as u64
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn into_device(self) -> D {
        self.device
    }

    /// The content of `path`, checked against its digest.
    pub fn get(&mut self, path: &str) -> Result<Vec<u8>, StoreError> {
        let entry = self.files.get(path).ok_or_else(|| StoreError::NotFound { path: String::from(path) })?;
        let mut data = vec![0u8; (blocks_for(entry.size) as usize) * BLOCK_SIZE];
        let mut at = 0;
        for extent in &entry.extents {
            let len = extent.len as usize * BLOCK_SIZE;
            read(&mut self.device, extent.start, &mut data[at..at + len])?;
            at += len;
        }
        data.truncate(entry.size as usize);
        if blake3::hash(&data).as_bytes() != &entry.digest {
            return Err(StoreError::ContentMismatch { path: String::from(path) });
        }
        Ok(data)
    }

    /// Stores `data` as `path` (replacing the file there) and commits. When this
    /// returns `Ok`, the new file is durable.
    pub fn put(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), StoreError> {
        self.check_writable()?;
        if path.is_empty() || path.len() > MAX_PATH_LEN {
            return Err(StoreError::InvalidPath { len: path.len() });
        }
        let blocks = blocks_for(data.len() as u64);
        let Some(extents) = self.free.allocate(blocks, usize::MAX) else {
            return Err(self.no_space(blocks));
        };
        let entry = FileEntry { mode, size: data.len() as u64, digest: *blake3::hash(data).as_bytes(), extents };
        if let Err(err) = write_file(&mut self.device, &entry.extents, data) {
            // Nothing points to these blocks: they are free again.
            entry.extents.iter().for_each(|extent| self.free.release(*extent));
            return Err(err);
        }
        let mut files = self.files.clone();
        let allocated = entry.extents.clone();
        let freed = files.insert(String::from(path), entry).map(|old| old.extents).unwrap_or_default();
        self.commit(files, allocated, freed)
    }

    /// Removes `path` and commits.
    pub fn remove(&mut self, path: &str) -> Result<(), StoreError> {
        self.check_writable()?;
        let mut files = self.files.clone();
        let old = files.remove(path).ok_or_else(|| StoreError::NotFound { path: String::from(path) })?;
        self.commit(files, Vec::new(), old.extents)
    }

    /// Removes every file whose path starts with `prefix` in one commit; returns how
    /// many there were (no commit when none).
    pub fn remove_prefix(&mut self, prefix: &str) -> Result<usize, StoreError> {
        self.check_writable()?;
        let mut files = self.files.clone();
        let mut freed = Vec::new();
        files.retain(|path, entry| {
            let keep = !path.starts_with(prefix);
            if !keep {
                freed.extend_from_slice(&entry.extents);
            }
            keep
        });
        let removed = self.files.len() - files.len();
        if removed > 0 {
            self.commit(files, Vec::new(), freed)?;
        }
        Ok(removed)
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        if self.read_only {
            Err(StoreError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn no_space(&self, blocks: u64) -> StoreError {
        StoreError::NoSpace { needed: blocks * BLOCK_SIZE as u64, free: self.free_bytes() }
    }

    /// Writes `files` as the next version: file table, flush, superblock into the other
    /// slot, flush. `allocated` are the new data blocks (already written and marked in
    /// use), `freed` the blocks the live version uses and `files` no longer does.
    ///
    /// On failure the live version stays what it was. Blocks are given back only while
    /// no superblock write was attempted: after that the new version may be the one on
    /// disk, so its blocks stay in use until the next mount.
    fn commit(
        &mut self,
        files: BTreeMap<String, FileEntry>,
        allocated: Vec<Extent>,
        freed: Vec<Extent>,
    ) -> Result<(), StoreError> {
        let table = layout::encode_files(&files);
        let table_blocks = blocks_for(table.len() as u64);
        let Some(metadata_extents) = self.free.allocate(table_blocks, MAX_METADATA_EXTENTS) else {
            allocated.iter().for_each(|extent| self.free.release(*extent));
            return Err(self.no_space(table_blocks + allocated.iter().map(|extent| extent.len).sum::<u64>()));
        };
        let superblock = Superblock {
            generation: self.generation + 1,
            block_count: self.block_count,
            metadata_len: table.len() as u64,
            metadata_digest: *blake3::hash(&table).as_bytes(),
            metadata_extents,
        };
        let slot = 1 - self.slot;
        let mut wrote_superblock = false;
        let result = (|| {
            write_file(&mut self.device, &superblock.metadata_extents, &table)?;
            flush(&mut self.device)?;
            wrote_superblock = true;
            write(&mut self.device, SUPERBLOCK_SLOTS[slot], &superblock.encode())?;
            flush(&mut self.device)
        })();
        if let Err(err) = result {
            if !wrote_superblock {
                allocated.iter().chain(&superblock.metadata_extents).for_each(|extent| self.free.release(*extent));
            }
            return Err(err);
        }
        freed.iter().chain(&self.metadata_extents).for_each(|extent| self.free.release(*extent));
        self.files = files;
        self.generation = superblock.generation;
        self.slot = slot;
        self.metadata_extents = superblock.metadata_extents;
        Ok(())
    }
}

/// Reads and checks the version `superblock` points to: its file table and the free
/// map that follows from it. The outer error is the device's (mount fails); the inner
/// one says this version is not whole (mount tries the other slot).
#[allow(clippy::type_complexity)]
fn load_version<D: BlockDevice>(
    device: &mut D,
    superblock: &Superblock,
) -> Result<Result<(BTreeMap<String, FileEntry>, FreeMap), StoreError>, StoreError> {
    let damaged = |reason| Ok(Err(StoreError::Damaged { reason }));
    let found = device.block_count();
    if superblock.block_count > found {
        return Ok(Err(StoreError::DiskShrank { made_for: superblock.block_count, found }));
    }
    if superblock.block_count < MIN_BLOCKS {
        return damaged("the superblock gives a disk smaller than a store");
    }
    let mut free = FreeMap::new(superblock.block_count);
    free.claim(Extent { start: 0, len: RESERVED_BLOCKS });
    let mut blocks: u64 = 0;
    for extent in &superblock.metadata_extents {
        if extent.len == 0 || !free.claim(*extent) {
            return damaged("the file table's extents overlap or leave the disk");
        }
        blocks += extent.len;
    }
    if blocks != blocks_for(superblock.metadata_len) {
        return damaged("the file table's extents do not match its length");
    }
    let mut table = vec![0u8; blocks as usize * BLOCK_SIZE];
    let mut at = 0;
    for extent in &superblock.metadata_extents {
        let len = extent.len as usize * BLOCK_SIZE;
        read(device, extent.start, &mut table[at..at + len])?;
        at += len;
    }
    table.truncate(superblock.metadata_len as usize);
    if blake3::hash(&table).as_bytes() != &superblock.metadata_digest {
        return damaged("the file table does not match its digest");
    }
    let Some(files) = layout::decode_files(&table) else {
        return damaged("the file table is out of shape");
    };
    for entry in files.values() {
        if !entry.extents.iter().all(|extent| free.claim(*extent)) {
            return damaged("file extents overlap or leave the disk");
        }
    }
    Ok(Ok((files, free)))
}

fn read<D: BlockDevice>(device: &mut D, block: u64, buffer: &mut [u8]) -> Result<(), StoreError> {
    device.read(block, buffer).map_err(|source| StoreError::ReadBlock { block, source })
}

fn write<D: BlockDevice>(device: &mut D, block: u64, data: &[u8]) -> Result<(), StoreError> {
    device.write(block, data).map_err(|source| StoreError::WriteBlock { block, source })
}

fn flush<D: BlockDevice>(device: &mut D) -> Result<(), StoreError> {
    device.flush().map_err(|source: DeviceError| StoreError::Flush { source })
}

/// Writes `data` over `extents` in order, the last block padded with zeros. Whole
/// blocks go straight from `data`; only the tail is copied.
fn write_file<D: BlockDevice>(device: &mut D, extents: &[Extent], data: &[u8]) -> Result<(), StoreError> {
    let mut rest = data;
    for extent in extents {
        let len = (extent.len as usize * BLOCK_SIZE).min(rest.len());
        let whole = len / BLOCK_SIZE * BLOCK_SIZE;
        if whole > 0 {
            write(device, extent.start, &rest[..whole])?;
        }
        if whole < len {
            let mut tail = vec![0u8; BLOCK_SIZE];
            tail[..len - whole].copy_from_slice(&rest[whole..len]);
            write(device, extent.start + (whole / BLOCK_SIZE) as u64, &tail)?;
        }
        rest = &rest[len..];
    }
    Ok(())
}

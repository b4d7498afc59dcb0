//! The stored Merkle tree: the hash of every complete subtree, one flat file per level.
//!
//! `tree/level-LL.hashes` holds the hashes of level `LL` (0 = leaf hashes) in order, 32
//! bytes each, so node `(level, index)` is at byte `32 * index` of its level's file. A tree
//! of `n` leaves has `n >> level` hashes at each level: about 64 bytes per leaf in all.
//! Files are read through read-only shared memory maps, so a proof is O(log n) memory
//! reads with no system call. The store is a cache of what the records say: it is not
//! fsynced on every commit; [`TreeStore::sync`] marks durable points, recovery rebuilds
//! what lies past them from the records, and the verifier never trusts it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::tree::{node_hash, Hash, NodeSource, MAX_LEVELS};

const HASH_LEN: u64 = 32;
/// The smallest map; maps grow by doubling so remaps are rare.
const MIN_MAP_BYTES: usize = 1 << 20;

/// Errors of the tree store.
#[derive(Debug, Error)]
pub enum TreeStoreError {
    #[error("cannot create the tree directory {path}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot open the tree level file {path}")]
    OpenLevel { path: PathBuf, source: std::io::Error },
    #[error("cannot write the tree level file {path}")]
    WriteLevel { path: PathBuf, source: std::io::Error },
    #[error("cannot truncate the tree level file {path}")]
    TruncateLevel { path: PathBuf, source: std::io::Error },
    #[error("cannot sync the tree level file {path}")]
    SyncLevel { path: PathBuf, source: std::io::Error },
    #[error("cannot map the tree level file {path}")]
    MapLevel { path: PathBuf, source: std::io::Error },
    #[error("the tree store has {size} leaves, cannot cut it back to {requested}")]
    CheckTruncate { size: u64, requested: u64 },
    #[error("the tree store cannot read the hash at level {level}, index {index}")]
    ReadNode { level: u32, index: u64 },
    #[error("the tree store is read-only")]
    CheckWritable,
}

/// A read-only shared map of the start of a file.
struct Mapping {
    address: *mut libc::c_void,
    length: usize,
}

// SAFETY: the mapping is read-only and owned by this value; reading it from several
// threads is as safe as reading a shared slice.
unsafe impl Send for Mapping {}
// SAFETY: as above: no interior mutability through the mapping.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, length: usize) -> std::io::Result<Mapping> {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh read-only shared mapping chosen by the kernel; it aliases no Rust
        // memory. Pages past the end of the file are never read (see `read_hash`).
        let address =
            unsafe { libc::mmap(std::ptr::null_mut(), length, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if address == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping { address, length })
    }

    /// The 32 bytes at `offset`. The caller guarantees that the file holds them (they were
    /// written or found there and the store is the only writer), so the read never touches
    /// a page beyond the end of the file.
    fn read_hash(&self, offset: usize) -> Option<Hash> {
        if offset.checked_add(HASH_LEN as usize)? > self.length {
            return None;
        }
        let mut hash = [0u8; 32];
        // SAFETY: `offset + 32 <= length`, so the source lies inside the mapping, which stays
        // mapped while `self` lives; the destination is a local array; they do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.address.cast::<u8>().add(offset), hash.as_mut_ptr(), hash.len());
        }
        Some(hash)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range `new` mapped; no reference into it outlives self.
        unsafe {
            libc::munmap(self.address, self.length);
        }
    }
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping").field("length", &self.length).finish()
    }
}

#[derive(Debug)]
struct Level {
    path: PathBuf,
    file: File,
    /// Hashes in the file that belong to the tree.
    count: u64,
    map: Option<Mapping>,
}

impl Level {
    fn read(&self, index: u64) -> Option<Hash> {
        if index >= self.count {
            return None;
        }
        self.map.as_ref()?.read_hash(usize::try_from(index * HASH_LEN).ok()?)
    }

    /// Makes sure the map covers `count` hashes.
    fn ensure_mapped(&mut self) -> Result<(), TreeStoreError> {
        let needed = usize::try_from(self.count * HASH_LEN).unwrap_or(usize::MAX);
        if needed == 0 || self.map.as_ref().is_some_and(|map| map.length >= needed) {
            return Ok(());
        }
        let length = needed.next_power_of_two().max(MIN_MAP_BYTES);
        self.map = None;
        let map = Mapping::new(&self.file, length)
            .map_err(|source| TreeStoreError::MapLevel { path: self.path.clone(), source })?;
        self.map = Some(map);
        Ok(())
    }
}

/// The stored tree of one log.
#[derive(Debug)]
pub struct TreeStore {
    dir: PathBuf,
    levels: Vec<Level>,
    size: u64,
    writable: bool,
    /// New hashes per level during an append, before they are written.
    pending: Vec<Vec<Hash>>,
}

fn level_path(dir: &Path, level: u32) -> PathBuf {
    dir.join(format!("level-{level:02}.hashes"))
}

impl TreeStore {
    /// Opens (creating if needed) the store in `dir` for writing. Hashes past the largest
    /// size that every level agrees on (a crash can leave levels of different lengths, or a
    /// partial hash) are cut off.
    pub fn open(dir: &Path) -> Result<TreeStore, TreeStoreError> {
        std::fs::create_dir_all(dir).map_err(|source| TreeStoreError::CreateDir { path: dir.to_path_buf(), source })?;
        let mut store = TreeStore::open_levels(dir, true)?;
        let size = store.size;
        store.cut_files(size)?;
        Ok(store)
    }

    /// Opens the store in `dir` for reading only; a missing directory is an empty tree.
    pub fn open_read_only(dir: &Path) -> Result<TreeStore, TreeStoreError> {
        TreeStore::open_levels(dir, false)
    }

    fn open_levels(dir: &Path, writable: bool) -> Result<TreeStore, TreeStoreError> {
        let mut levels = Vec::new();
        let mut counts = Vec::new();
        for level in 0..MAX_LEVELS {
            let path = level_path(dir, level);
            let opened = OpenOptions::new().read(true).write(writable).open(&path);
            let file = match opened {
                Ok(file) => file,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => break,
                Err(source) => return Err(TreeStoreError::OpenLevel { path, source }),
            };
            let length =
                file.metadata().map_err(|source| TreeStoreError::OpenLevel { path: path.clone(), source })?.len();
            counts.push(length / HASH_LEN);
            levels.push(Level { path, file, count: 0, map: None });
        }
        // The largest size n with n >> level <= count[level] at every level.
        let mut size = counts.first().copied().unwrap_or(0);
        for (level, &count) in counts.iter().enumerate().skip(1) {
            let limit = (count.saturating_add(1) << level).saturating_sub(1);
            size = size.min(limit);
        }
        if counts.len() < MAX_LEVELS as usize {
            let missing = counts.len() as u32;
            size = size.min((1u64 << missing) - 1);
        }
        for (level, entry) in levels.iter_mut().enumerate() {
            entry.count = size >> level;
            entry.ensure_mapped()?;
        }
        Ok(TreeStore { dir: dir.to_path_buf(), levels, size, writable, pending: Vec::new() })
    }

    /// The number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Cuts the tree back to its first `size` leaves.
    pub fn truncate(&mut self, size: u64) -> Result<(), TreeStoreError> {
        if !self.writable {
            return Err(TreeStoreError::CheckWritable);
        }
        if size > self.size {
            return Err(TreeStoreError::CheckTruncate { size: self.size, requested: size });
        }
        self.cut_files(size)
    }

    fn cut_files(&mut self, size: u64) -> Result<(), TreeStoreError> {
        for (level, entry) in self.levels.iter_mut().enumerate() {
            entry.count = size >> level;
            entry
                .file
                .set_len(entry.count * HASH_LEN)
                .map_err(|source| TreeStoreError::TruncateLevel { path: entry.path.clone(), source })?;
        }
        self.size = size;
        Ok(())
    }

    fn level_mut(&mut self, level: u32) -> Result<&mut Level, TreeStoreError> {
        while self.levels.len() <= level as usize {
            let new_level = self.levels.len() as u32;
            let path = level_path(&self.dir, new_level);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(|source| TreeStoreError::OpenLevel { path: path.clone(), source })?;
            self.levels.push(Level { path, file, count: 0, map: None });
        }
        Ok(&mut self.levels[level as usize])
    }

    /// Hash of a complete subtree, from the files or from the hashes of the append in
    /// progress.
    fn node_or_pending(&self, level: u32, index: u64) -> Option<Hash> {
        let stored = self.levels.get(level as usize).map_or(0, |entry| entry.count);
        if index < stored {
            return self.levels[level as usize].read(index);
        }
        let pending = self.pending.get(level as usize)?;
        pending.get(usize::try_from(index - stored).ok()?).copied()
    }

    /// Appends leaf hashes and every complete subtree they close; one write per level.
    pub fn append(&mut self, leaves: &[Hash]) -> Result<(), TreeStoreError> {
        if !self.writable {
            return Err(TreeStoreError::CheckWritable);
        }
        if leaves.is_empty() {
            return Ok(());
        }
        let mut pending = std::mem::take(&mut self.pending);
        for level in pending.iter_mut() {
            level.clear();
        }
        self.pending = pending;
        for (offset, leaf) in leaves.iter().enumerate() {
            let index = self.size + offset as u64;
            self.push_pending(0, *leaf);
            let mut hash = *leaf;
            let mut level = 0u32;
            while (index >> level) & 1 == 1 {
                let left = self
                    .node_or_pending(level, (index >> level) - 1)
                    .ok_or(TreeStoreError::ReadNode { level, index: (index >> level) - 1 })?;
                hash = node_hash(&left, &hash);
                level += 1;
                self.push_pending(level, hash);
            }
        }
        let pending = std::mem::take(&mut self.pending);
        let written = self.write_pending(&pending);
        self.pending = pending;
        written?;
        self.size += leaves.len() as u64;
        Ok(())
    }

    fn push_pending(&mut self, level: u32, hash: Hash) {
        while self.pending.len() <= level as usize {
            self.pending.push(Vec::new());
        }
        self.pending[level as usize].push(hash);
    }

    fn write_pending(&mut self, pending: &[Vec<Hash>]) -> Result<(), TreeStoreError> {
        for (level, hashes) in pending.iter().enumerate() {
            if hashes.is_empty() {
                continue;
            }
            let entry = self.level_mut(level as u32)?;
            let bytes: &[u8] = hashes.as_flattened();
            entry
                .file
                .write_all_at(bytes, entry.count * HASH_LEN)
                .map_err(|source| TreeStoreError::WriteLevel { path: entry.path.clone(), source })?;
            entry.count += hashes.len() as u64;
            entry.ensure_mapped()?;
        }
        Ok(())
    }

    /// Makes the stored hashes durable.
    pub fn sync(&self) -> Result<(), TreeStoreError> {
        for entry in &self.levels {
            entry.file.sync_data().map_err(|source| TreeStoreError::SyncLevel { path: entry.path.clone(), source })?;
        }
        Ok(())
    }

    /// Bytes the level files take.
    pub fn stored_bytes(&self) -> u64 {
        self.levels.iter().map(|entry| entry.count * HASH_LEN).sum()
    }
}

impl NodeSource for TreeStore {
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        if level >= MAX_LEVELS || index >= self.size >> level {
            return None;
        }
        self.levels.get(level as usize)?.read(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;
    use crate::tree::{self, leaf_hash, MemoryTree};

    fn leaves(range: std::ops::Range<u64>) -> Vec<Hash> {
        range.map(|i| leaf_hash(&i.to_le_bytes())).collect()
    }

    #[test]
    fn append_in_batches_matches_memory_tree() {
        let dir = TempDir::new("tree-store-batches");
        let mut store = TreeStore::open(dir.path()).unwrap();
        let all = leaves(0..1000);
        let mut start = 0usize;
        for batch in [1usize, 2, 3, 7, 100, 300, 587] {
            store.append(&all[start..start + batch]).unwrap();
            start += batch;
        }
        let memory = MemoryTree::from_leaves(all);
        for size in [1u64, 2, 5, 64, 513, 1000] {
            assert_eq!(tree::root(&store, size).unwrap(), tree::root(&memory, size).unwrap());
        }
        for level in 0..10 {
            for index in 0..(1000u64 >> level) {
                assert_eq!(store.node(level, index), memory.node(level, index));
            }
        }
    }

    #[test]
    fn open_after_append_sees_same_tree() {
        let dir = TempDir::new("tree-store-reopen");
        let all = leaves(0..77);
        {
            let mut store = TreeStore::open(dir.path()).unwrap();
            store.append(&all).unwrap();
            store.sync().unwrap();
        }
        let store = TreeStore::open_read_only(dir.path()).unwrap();
        assert_eq!(store.size(), 77);
        let memory = MemoryTree::from_leaves(all);
        assert_eq!(tree::root(&store, 77).unwrap(), tree::root(&memory, 77).unwrap());
    }

    #[test]
    fn open_with_short_upper_level_cuts_back_to_consistent_size() {
        let dir = TempDir::new("tree-store-short-level");
        {
            let mut store = TreeStore::open(dir.path()).unwrap();
            store.append(&leaves(0..40)).unwrap();
        }
        // A crash lost the last hashes of level 2 (10 -> 7 hashes) and half of a leaf hash.
        let level2 = level_path(dir.path(), 2);
        std::fs::OpenOptions::new().write(true).open(&level2).unwrap().set_len(7 * 32).unwrap();
        let level0 = level_path(dir.path(), 0);
        std::fs::OpenOptions::new().write(true).open(&level0).unwrap().set_len(40 * 32 - 5).unwrap();
        let mut store = TreeStore::open(dir.path()).unwrap();
        assert_eq!(store.size(), 31);
        store.append(&leaves(31..40)).unwrap();
        let memory = MemoryTree::from_leaves(leaves(0..40));
        assert_eq!(tree::root(&store, 40).unwrap(), tree::root(&memory, 40).unwrap());
    }

    #[test]
    fn truncate_then_append_rebuilds_same_tree() {
        let dir = TempDir::new("tree-store-truncate");
        let mut store = TreeStore::open(dir.path()).unwrap();
        store.append(&leaves(0..100)).unwrap();
        store.truncate(37).unwrap();
        assert_eq!(store.node(0, 37), None);
        store.append(&leaves(37..100)).unwrap();
        let memory = MemoryTree::from_leaves(leaves(0..100));
        assert_eq!(tree::root(&store, 100).unwrap(), tree::root(&memory, 100).unwrap());
    }

    #[test]
    fn append_to_read_only_store_returns_error() {
        let dir = TempDir::new("tree-store-read-only");
        let mut store = TreeStore::open_read_only(dir.path()).unwrap();
        assert!(matches!(store.append(&leaves(0..1)), Err(TreeStoreError::CheckWritable)));
    }
}

//! The layer file: a copy-on-write overlay that holds only the blocks written to it.
//!
//! ```text
//! 0        header page: "CARRELDK", length, postcard LayerHeader, ..., blake3 at 4064
//! 4096     index slot A: generation, blake3(generation, bitmap), bitmap of blocks held
//! +slot    index slot B: the same; the valid slot with the higher generation is current
//! data     1 MiB aligned: block N of the virtual disk at data + N * 4096 (a sparse file)
//! ```
//!
//! A block is in the layer when its bit is set; otherwise a read goes to the parent. A
//! commit writes the bitmap into the older slot only after the data it claims is durable
//! (fdatasync, slot write, fdatasync), so a crash leaves the last committed index whole
//! and every block it names on disk. Both slots are allocated when the layer is made, so
//! a commit never needs new space on a full filesystem.
//!
//! No maintained crate fits: qcow2 crates are either async-runtime bound or read-only,
//! and Carrel needs O(1) freezes and an index whose durability it controls.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The disk's block: the unit of copy-on-write and of the index.
pub const BLOCK_SIZE: u64 = 4096;
/// The first bytes of every layer file.
pub const MAGIC: [u8; 8] = *b"CARRELDK";
const VERSION: u32 = 1;
const HEADER_SIZE: u64 = 4096;
const HEADER_DIGEST_AT: usize = 4064;
const SLOT_HEAD: usize = 8 + 32;
const DATA_ALIGN: u64 = 1 << 20;
/// Largest virtual disk: 16 TiB (a 512 MiB index).
pub const MAX_CAPACITY: u64 = 16 << 40;

/// Errors opening, creating or committing a layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot open layer {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot create layer {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("{path} is not a Carrel disk layer (no CARRELDK magic)")]
    NotALayer { path: PathBuf },
    #[error("layer {path} is damaged: {reason}; it was not opened")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot commit layer {path}'s index: {source}")]
    Commit { path: PathBuf, source: io::Error },
}

/// What a layer lies over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParentRef {
    /// Nothing: unwritten blocks read as zeros.
    None,
    /// A raw image, read-only, of this size.
    Raw { path: PathBuf, size: u64 },
    /// Another layer, known by its id.
    Layer { path: PathBuf, id: [u8; 16] },
}

/// The header page's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerHeader {
    pub version: u32,
    /// Virtual disk size in bytes, a multiple of 512.
    pub capacity: u64,
    /// This layer's identity, named by its children and by snapshots.
    pub id: [u8; 16],
    pub parent: ParentRef,
}

/// An open layer with its index in memory.
#[derive(Debug)]
pub struct Layer {
    pub file: File,
    pub path: PathBuf,
    pub header: LayerHeader,
    present: Vec<u64>,
    generation: u64,
    /// Bits changed since the last commit.
    dirty: bool,
    writable: bool,
    slot_size: u64,
    data_start: u64,
}

fn blocks_of(capacity: u64) -> u64 {
    capacity.div_ceil(BLOCK_SIZE)
}

fn geometry(capacity: u64) -> (u64, u64) {
    let bitmap = blocks_of(capacity).div_ceil(64) * 8;
    let slot_size = (SLOT_HEAD as u64 + bitmap).next_multiple_of(4096);
    let data_start = (HEADER_SIZE + 2 * slot_size).next_multiple_of(DATA_ALIGN);
    (slot_size, data_start)
}

/// A fresh random layer id.
pub fn new_id() -> io::Result<[u8; 16]> {
    let mut id = [0u8; 16];
    crate::devices::virtio::rng::host_entropy(&mut id)?;
    Ok(id)
}

fn encode_header(header: &LayerHeader) -> Vec<u8> {
    let body = postcard::to_allocvec(header).expect("a layer header always serializes");
    let mut page = vec![0u8; HEADER_SIZE as usize];
    page[..8].copy_from_slice(&MAGIC);
    page[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
    page[12..12 + body.len()].copy_from_slice(&body);
    let digest = blake3::hash(&page[..HEADER_DIGEST_AT]);
    page[HEADER_DIGEST_AT..HEADER_DIGEST_AT + 32].copy_from_slice(digest.as_bytes());
    page
}

fn decode_header(page: &[u8], path: &Path) -> Result<LayerHeader, LayerError> {
    let corrupt = |reason: &str| LayerError::Corrupt { path: path.to_path_buf(), reason: reason.to_string() };
    if page.len() < HEADER_SIZE as usize || page[..8] != MAGIC {
        return Err(LayerError::NotALayer { path: path.to_path_buf() });
    }
    if blake3::hash(&page[..HEADER_DIGEST_AT]).as_bytes()[..] != page[HEADER_DIGEST_AT..HEADER_DIGEST_AT + 32] {
        return Err(corrupt("its header does not match its digest"));
    }
    let len = u32::from_le_bytes(page[8..12].try_into().unwrap()) as usize;
    let body =
        page.get(12..12 + len).filter(|_| 12 + len <= HEADER_DIGEST_AT).ok_or_else(|| corrupt("header length"))?;
    let header: LayerHeader = postcard::from_bytes(body).map_err(|_| corrupt("its header does not decode"))?;
    if header.version != VERSION {
        return Err(corrupt(&format!("format version {} (this carrel-vmm reads {VERSION})", header.version)));
    }
    if header.capacity == 0 || header.capacity % 512 != 0 || header.capacity > MAX_CAPACITY {
        return Err(corrupt(&format!("capacity {} is not a size this format holds", header.capacity)));
    }
    Ok(header)
}

fn encode_slot(generation: u64, present: &[u64], slot_size: u64) -> Vec<u8> {
    let mut slot = vec![0u8; slot_size as usize];
    slot[..8].copy_from_slice(&generation.to_le_bytes());
    let bitmap = &mut slot[SLOT_HEAD..SLOT_HEAD + present.len() * 8];
    for (word, bytes) in present.iter().zip(bitmap.chunks_exact_mut(8)) {
        bytes.copy_from_slice(&word.to_le_bytes());
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(&slot[..8]);
    hasher.update(&slot[SLOT_HEAD..SLOT_HEAD + present.len() * 8]);
    slot[8..SLOT_HEAD].copy_from_slice(hasher.finalize().as_bytes());
    slot
}

/// The generation and bitmap a slot holds, or `None` when it is torn or empty.
fn decode_slot(slot: &[u8], words: usize) -> Option<(u64, Vec<u64>)> {
    let generation = u64::from_le_bytes(slot[..8].try_into().ok()?);
    let bitmap = slot.get(SLOT_HEAD..SLOT_HEAD + words * 8)?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(&slot[..8]);
    hasher.update(bitmap);
    if generation == 0 || hasher.finalize().as_bytes()[..] != slot[8..SLOT_HEAD] {
        return None;
    }
    Some((generation, bitmap.chunks_exact(8).map(|bytes| u64::from_le_bytes(bytes.try_into().unwrap())).collect()))
}

impl Layer {
    /// Makes a new, empty layer at `path` (which must not exist) and syncs it.
    pub fn create(path: &Path, capacity: u64, parent: ParentRef) -> Result<Layer, LayerError> {
        let fail = |source| LayerError::Create { path: path.to_path_buf(), source };
        if capacity == 0 || capacity % 512 != 0 || capacity > MAX_CAPACITY {
            return Err(fail(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("size {capacity} must be a positive multiple of 512 up to 16 TiB"),
            )));
        }
        let header = LayerHeader { version: VERSION, capacity, id: new_id().map_err(fail)?, parent };
        let (slot_size, data_start) = geometry(capacity);
        let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path).map_err(fail)?;
        let present = vec![0u64; blocks_of(capacity).div_ceil(64) as usize];
        let written = (|| {
            file.write_all_at(&encode_header(&header), 0)?;
            // Generation g lives in slot g % 2; both are allocated now so that no commit
            // ever needs new space.
            file.write_all_at(&vec![0u8; slot_size as usize], HEADER_SIZE)?;
            file.write_all_at(&encode_slot(1, &present, slot_size), HEADER_SIZE + slot_size)?;
            file.set_len(data_start + capacity.next_multiple_of(BLOCK_SIZE))?;
            file.sync_all()
        })();
        if let Err(source) = written {
            let _ = std::fs::remove_file(path);
            return Err(fail(source));
        }
        Ok(Layer {
            file,
            path: path.to_path_buf(),
            header,
            present,
            generation: 1,
            dirty: false,
            writable: true,
            slot_size,
            data_start,
        })
    }

    /// Opens the layer at `path`, checking its header and index.
    pub fn open(path: &Path, writable: bool) -> Result<Layer, LayerError> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| LayerError::Open { path: path.to_path_buf(), source })?;
        Layer::from_file(file, path, writable)
    }

    fn from_file(file: File, path: &Path, writable: bool) -> Result<Layer, LayerError> {
        let corrupt = |reason: String| LayerError::Corrupt { path: path.to_path_buf(), reason };
        let mut page = vec![0u8; HEADER_SIZE as usize];
        match file.read_exact_at(&mut page, 0) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(LayerError::NotALayer { path: path.to_path_buf() })
            }
            Err(source) => return Err(LayerError::Open { path: path.to_path_buf(), source }),
        }
        let header = decode_header(&page, path)?;
        let (slot_size, data_start) = geometry(header.capacity);
        let words = blocks_of(header.capacity).div_ceil(64) as usize;
        let mut best: Option<(u64, Vec<u64>)> = None;
        for slot in 0..2 {
            let mut bytes = vec![0u8; slot_size as usize];
            if file.read_exact_at(&mut bytes, HEADER_SIZE + slot * slot_size).is_err() {
                continue;
            }
            if let Some((generation, present)) = decode_slot(&bytes, words) {
                if best.as_ref().is_none_or(|(best, _)| generation > *best) {
                    best = Some((generation, present));
                }
            }
        }
        let (generation, present) = best.ok_or_else(|| corrupt("neither index slot is valid".into()))?;
        let blocks = blocks_of(header.capacity);
        let tail = blocks % 64;
        if tail != 0 && present.last().is_some_and(|word| word >> tail != 0) {
            return Err(corrupt("its index names blocks past the disk's end".into()));
        }
        Ok(Layer {
            file,
            path: path.to_path_buf(),
            header,
            present,
            generation,
            dirty: false,
            writable,
            slot_size,
            data_start,
        })
    }

    pub fn id(&self) -> [u8; 16] {
        self.header.id
    }

    pub fn capacity(&self) -> u64 {
        self.header.capacity
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Where virtual byte `offset` lives in the file.
    pub fn data_offset(&self, offset: u64) -> u64 {
        self.data_start + offset
    }

    pub fn has(&self, block: u64) -> bool {
        self.present.get((block / 64) as usize).is_some_and(|word| word & (1 << (block % 64)) != 0)
    }

    /// Marks blocks `first..first + count` as held by this layer.
    pub fn mark(&mut self, first: u64, count: u64) {
        for block in first..first + count {
            if let Some(word) = self.present.get_mut((block / 64) as usize) {
                if *word & (1 << (block % 64)) == 0 {
                    *word |= 1 << (block % 64);
                    self.dirty = true;
                }
            }
        }
    }

    /// How many blocks the layer holds.
    pub fn blocks_held(&self) -> u64 {
        self.present.iter().map(|word| u64::from(word.count_ones())).sum()
    }

    /// Makes everything written so far durable, then the index that names it.
    pub fn commit(&mut self) -> Result<(), LayerError> {
        if !self.writable {
            return Ok(());
        }
        let index = self.prepare_commit();
        let written = self.file.sync_data().and_then(|()| match &index {
            Some((slot, at)) => self.file.write_all_at(slot, *at).and_then(|()| self.file.sync_data()),
            None => Ok(()),
        });
        if written.is_err() {
            self.commit_failed();
        }
        written.map_err(|source| LayerError::Commit { path: self.path.clone(), source })
    }

    /// The index slot a commit writes now, and where (`None` when the index is unchanged
    /// since the last commit: only the data needs syncing). The caller syncs the data,
    /// writes the slot, syncs again, and calls [`Layer::commit_failed`] if any of it
    /// failed. The index is encoded now: a bit set later belongs to the next commit,
    /// whose sync covers its data.
    pub fn prepare_commit(&mut self) -> Option<(Vec<u8>, u64)> {
        if !self.writable || !self.dirty {
            return None;
        }
        let generation = self.generation + 1;
        let slot = encode_slot(generation, &self.present, self.slot_size);
        let at = HEADER_SIZE + (generation % 2) * self.slot_size;
        self.generation = generation;
        self.dirty = false;
        Some((slot, at))
    }

    /// A prepared commit did not reach the disk: the next one writes the index again.
    /// (Its slot may be torn; the other slot, one generation older, stays valid.)
    pub fn commit_failed(&mut self) {
        self.dirty = true;
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(dir: &Path, capacity: u64) -> Layer {
        Layer::create(&dir.join("top.layer"), capacity, ParentRef::None).unwrap()
    }

    #[test]
    fn committed_index_survives_reopen_and_an_uncommitted_mark_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut top = layer(dir.path(), 1 << 20);
        top.mark(3, 2);
        top.commit().unwrap();
        top.mark(200, 1);
        let path = top.path.clone();
        drop(top);
        let reopened = Layer::open(&path, true).unwrap();
        assert!(reopened.has(3) && reopened.has(4) && !reopened.has(5));
        assert!(!reopened.has(200), "a mark never committed is not in the index");
        assert_eq!(reopened.generation(), 2);
    }

    #[test]
    fn a_torn_newer_slot_falls_back_to_the_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut top = layer(dir.path(), 1 << 20);
        top.mark(1, 1);
        top.commit().unwrap(); // generation 2, slot A
        top.mark(2, 1);
        top.commit().unwrap(); // generation 3, slot B
        let (slot_size, _) = geometry(1 << 20);
        // Tear slot B (the newest) in the middle of its digest.
        top.file.write_all_at(&[0xff; 8], HEADER_SIZE + slot_size + 12).unwrap();
        let path = top.path.clone();
        drop(top);
        let reopened = Layer::open(&path, false).unwrap();
        assert_eq!(reopened.generation(), 2);
        assert!(reopened.has(1) && !reopened.has(2));
        // With both torn, the layer is refused.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff; 8], HEADER_SIZE + 12).unwrap();
        assert!(matches!(Layer::open(&path, false), Err(LayerError::Corrupt { .. })));
    }

    #[test]
    fn damaged_header_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let top = layer(dir.path(), 1 << 20);
        let path = top.path.clone();
        top.file.write_all_at(b"\x07", 40).unwrap();
        drop(top);
        assert!(matches!(Layer::open(&path, false), Err(LayerError::Corrupt { .. })));
        let raw = dir.path().join("raw.img");
        std::fs::write(&raw, vec![0u8; 8192]).unwrap();
        assert!(matches!(Layer::open(&raw, false), Err(LayerError::NotALayer { .. })));
        std::fs::write(&raw, b"short").unwrap();
        assert!(matches!(Layer::open(&raw, false), Err(LayerError::NotALayer { .. })));
    }

    #[test]
    fn an_index_naming_blocks_past_the_end_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let top = layer(dir.path(), 5 * BLOCK_SIZE);
        let (slot_size, _) = geometry(5 * BLOCK_SIZE);
        top.file.write_all_at(&encode_slot(9, &[0b100000], slot_size), HEADER_SIZE + slot_size).unwrap();
        let path = top.path.clone();
        drop(top);
        let err = Layer::open(&path, false).unwrap_err();
        assert!(err.to_string().contains("past the disk's end"), "{err}");
    }

    #[test]
    fn create_refuses_bad_sizes_and_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Layer::create(&dir.path().join("a"), 1000, ParentRef::None).is_err());
        assert!(Layer::create(&dir.path().join("b"), 0, ParentRef::None).is_err());
        let _ = layer(dir.path(), 1 << 20);
        assert!(Layer::create(&dir.path().join("top.layer"), 1 << 20, ParentRef::None).is_err());
    }
}

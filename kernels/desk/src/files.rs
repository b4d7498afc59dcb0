//! The agent's files: in memory when Desk has no disk store (they last until the VM
//! stops), or in the store on disk 0 when one is mounted (a write returns only once it
//! is durable). Paths are the agent's normalized absolute paths; directories are implied
//! by the paths under them.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;

use carrel_agent_proto::message::ErrorCode;
use carrel_deskfs::{Store, StoreError};

use crate::blk::Block;

/// An error for the agent to send: its code and a message for the user.
pub type FileError = (ErrorCode, String);

pub struct MemoryFile {
    /// Shared with transfers in flight, so a get never copies the file.
    data: Rc<Vec<u8>>,
    mode: u32,
    digest: [u8; 32],
}

/// A file's content as the agent serves it.
pub struct FileData {
    pub data: Rc<Vec<u8>>,
    pub mode: u32,
    /// blake3 of `data`.
    pub digest: [u8; 32],
}

pub enum Files {
    Memory(BTreeMap<String, MemoryFile>),
    /// Boxed: the driver's bookkeeping makes it far larger than a map.
    Disk(Box<Store<Block>>),
}

impl Files {
    pub fn in_memory() -> Files {
        Files::Memory(BTreeMap::new())
    }

    /// Size and mode of the file at `path`.
    pub fn stat(&self, path: &str) -> Option<(u64, u32)> {
        match self {
            Files::Memory(files) => files.get(path).map(|file| (file.data.len() as u64, file.mode)),
            Files::Disk(store) => store.stat(path).map(|entry| (entry.size, entry.mode)),
        }
    }

    pub fn read(&mut self, path: &str) -> Result<FileData, FileError> {
        match self {
            Files::Memory(files) => files
                .get(path)
                .map(|file| FileData { data: file.data.clone(), mode: file.mode, digest: file.digest })
                .ok_or_else(|| not_found(path)),
            Files::Disk(store) => {
                let (mode, digest) = match store.stat(path) {
                    Some(entry) => (entry.mode, entry.digest),
                    None => return Err(not_found(path)),
                };
                let data = store.get(path).map_err(|err| store_error(path, err))?;
                Ok(FileData { data: Rc::new(data), mode, digest })
            }
        }
    }

    /// Whether `size` more bytes can be stored: checked when a put starts, so a put
    /// that cannot succeed is refused before its data is sent.
    pub fn check_room(&self, path: &str, size: u64) -> Result<(), FileError> {
        let Files::Disk(store) = self else { return Ok(()) };
        if store.is_read_only() {
            return Err(store_error(path, StoreError::ReadOnly));
        }
        // A replaced file keeps its blocks until the new one is committed.
        if size > store.free_bytes() {
            return Err(store_error(path, StoreError::NoSpace { needed: size, free: store.free_bytes() }));
        }
        Ok(())
    }

    /// Stores `data` (whose blake3 is `digest`) as `path`; on disk, returns once it is
    /// durable.
    pub fn write(&mut self, path: String, mode: u32, data: Vec<u8>, digest: [u8; 32]) -> Result<(), FileError> {
        match self {
            Files::Memory(files) => {
                files.insert(path, MemoryFile { data: Rc::new(data), mode, digest });
                Ok(())
            }
            Files::Disk(store) => store.put(&path, mode, &data).map_err(|err| store_error(&path, err)),
        }
    }

    pub fn remove(&mut self, path: &str) -> Result<(), FileError> {
        match self {
            Files::Memory(files) => files.remove(path).map(|_| ()).ok_or_else(|| not_found(path)),
            Files::Disk(store) => store.remove(path).map_err(|err| store_error(path, err)),
        }
    }

    /// Removes every file under the directory `dir`, in one commit on disk.
    pub fn remove_dir(&mut self, dir: &str) -> Result<(), FileError> {
        let prefix = dir_prefix(dir);
        match self {
            Files::Memory(files) => {
                files.retain(|name, _| !name.starts_with(&prefix));
                Ok(())
            }
            Files::Disk(store) => store.remove_prefix(&prefix).map(|_| ()).map_err(|err| store_error(dir, err)),
        }
    }

    /// (path, size) of every file under the directory `dir`, in path order.
    pub fn under<'a>(&'a self, dir: &str) -> Box<dyn Iterator<Item = (&'a str, u64)> + 'a> {
        let prefix = dir_prefix(dir);
        match self {
            Files::Memory(files) => Box::new(
                files
                    .range(prefix.clone()..)
                    .take_while(move |(name, _)| name.starts_with(&prefix))
                    .map(|(name, file)| (name.as_str(), file.data.len() as u64)),
            ),
            Files::Disk(store) => Box::new(
                store
                    .files()
                    .range(prefix.clone()..)
                    .take_while(move |(name, _)| name.starts_with(&prefix))
                    .map(|(name, entry)| (name.as_str(), entry.size)),
            ),
        }
    }

    /// Whether `path` is a directory: the root, or a prefix of some file's path.
    pub fn is_dir(&self, path: &str) -> bool {
        path == "/" || self.under(path).next().is_some()
    }

    /// How many files, and their bytes.
    pub fn summary(&self) -> (usize, u64) {
        self.under("/").fold((0, 0), |(count, bytes), (_, size)| (count + 1, bytes + size))
    }

    pub fn store(&self) -> Option<&Store<Block>> {
        match self {
            Files::Memory(_) => None,
            Files::Disk(store) => Some(store),
        }
    }
}

/// `dir` with one trailing slash: what the paths under it start with.
fn dir_prefix(dir: &str) -> String {
    format!("{}/", dir.trim_end_matches('/'))
}

fn not_found(path: &str) -> FileError {
    (ErrorCode::NOT_FOUND, format!("{path}: no such file"))
}

fn store_error(path: &str, err: StoreError) -> FileError {
    let code = match err {
        StoreError::NotFound { .. } => ErrorCode::NOT_FOUND,
        StoreError::ReadOnly => ErrorCode::PERMISSION_DENIED,
        StoreError::InvalidPath { .. } => ErrorCode::INVALID_PATH,
        _ => ErrorCode::IO,
    };
    (code, format!("{path}: {err}"))
}

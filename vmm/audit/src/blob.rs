//! The content-addressed blob store for screenshots.
//!
//! A blob lives at `blobs/ab/cdef...` (its blake3 in hex, split after two digits), so the
//! same screenshot is stored once however many events name it, and a blob's name is its
//! own integrity check. A put is durable when it returns: events that name a blob are
//! appended after it.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::codec::{from_hex, to_hex};
use crate::files::{sync_dir, write_atomic};

/// Errors of the blob store.
#[derive(Debug, Error)]
pub enum BlobError {
    #[error("cannot create the blob directory {path}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot write the blob {path}")]
    WriteBlob { path: PathBuf, source: std::io::Error },
    #[error("cannot read the blob {path}")]
    ReadBlob { path: PathBuf, source: std::io::Error },
    #[error("the blob {path} does not hash to its name (it is {actual}): it was altered")]
    CheckContent { path: PathBuf, actual: String },
    #[error("cannot list the blob directory {path}")]
    ListBlobs { path: PathBuf, source: std::io::Error },
}

/// A file found in the blob store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlobEntry {
    /// The hash the file's name stands for; `None` when the name is not a blob name.
    pub hash: Option<[u8; 32]>,
    pub path: PathBuf,
}

/// A blob directory.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    /// The store in `dir`, created if missing.
    pub fn open(dir: &Path) -> Result<BlobStore, BlobError> {
        std::fs::create_dir_all(dir).map_err(|source| BlobError::CreateDir { path: dir.to_path_buf(), source })?;
        Ok(BlobStore { dir: dir.to_path_buf() })
    }

    /// The store in `dir` for reading; nothing is created.
    pub fn at(dir: &Path) -> BlobStore {
        BlobStore { dir: dir.to_path_buf() }
    }

    /// Where the blob with this hash lives.
    pub fn path(&self, hash: &[u8; 32]) -> PathBuf {
        let hex = to_hex(hash);
        self.dir.join(&hex[..2]).join(&hex[2..])
    }

    /// Stores `bytes` (once) and returns their blake3. An existing blob under the name is
    /// kept when it still hashes to it, and replaced when it does not.
    pub fn put(&self, bytes: &[u8]) -> Result<blake3::Hash, BlobError> {
        let hash = blake3::hash(bytes);
        let path = self.path(hash.as_bytes());
        if let Ok(existing) = std::fs::read(&path) {
            if blake3::hash(&existing) == hash {
                return Ok(hash);
            }
        }
        let shard = path.parent().unwrap_or(&self.dir);
        let created = !shard.exists();
        std::fs::create_dir_all(shard).map_err(|source| BlobError::CreateDir { path: shard.to_path_buf(), source })?;
        write_atomic(&path, bytes, 0o644).map_err(|source| BlobError::WriteBlob { path: path.clone(), source })?;
        if created {
            sync_dir(&self.dir).map_err(|source| BlobError::WriteBlob { path: path.clone(), source })?;
        }
        Ok(hash)
    }

    /// Whether a blob with this hash is stored (its content is not checked).
    pub fn contains(&self, hash: &[u8; 32]) -> bool {
        self.path(hash).is_file()
    }

    /// The blob with this hash, checked against its name.
    pub fn get(&self, hash: &[u8; 32]) -> Result<Vec<u8>, BlobError> {
        let path = self.path(hash);
        let bytes = std::fs::read(&path).map_err(|source| BlobError::ReadBlob { path: path.clone(), source })?;
        let actual = blake3::hash(&bytes);
        if actual.as_bytes() != hash {
            return Err(BlobError::CheckContent { path, actual: actual.to_hex().to_string() });
        }
        Ok(bytes)
    }

    /// Every file in the store.
    pub fn list(&self) -> Result<Vec<BlobEntry>, BlobError> {
        let list_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BlobError::ListBlobs { path, source }
        };
        let mut blobs = Vec::new();
        let shards = match std::fs::read_dir(&self.dir) {
            Ok(shards) => shards,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(blobs),
            Err(error) => return Err(list_error(&self.dir)(error)),
        };
        for shard in shards {
            let shard = shard.map_err(list_error(&self.dir))?.path();
            let shard_name = shard.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
            if !shard.is_dir() {
                blobs.push(BlobEntry { hash: None, path: shard });
                continue;
            }
            for entry in std::fs::read_dir(&shard).map_err(list_error(&shard))? {
                let path = entry.map_err(list_error(&shard))?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.starts_with('.') {
                    continue;
                }
                let hash = from_hex::<32>(&format!("{shard_name}{name}")).ok();
                blobs.push(BlobEntry { hash, path });
            }
        }
        blobs.sort();
        Ok(blobs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    #[test]
    fn put_twice_stores_one_file() {
        let dir = TempDir::new("blob-dedup");
        let store = BlobStore::open(dir.path()).unwrap();
        let first = store.put(b"pixels").unwrap();
        let second = store.put(b"pixels").unwrap();
        assert_eq!(first, second);
        assert_eq!(store.list().unwrap().len(), 1);
        assert_eq!(store.get(first.as_bytes()).unwrap(), b"pixels");
    }

    #[test]
    fn get_of_replaced_blob_returns_error() {
        let dir = TempDir::new("blob-replaced");
        let store = BlobStore::open(dir.path()).unwrap();
        let hash = store.put(b"pixels").unwrap();
        std::fs::write(store.path(hash.as_bytes()), b"other pixels").unwrap();
        assert!(matches!(store.get(hash.as_bytes()), Err(BlobError::CheckContent { .. })));
    }

    #[test]
    fn put_over_altered_blob_restores_it() {
        let dir = TempDir::new("blob-restore");
        let store = BlobStore::open(dir.path()).unwrap();
        let hash = store.put(b"pixels").unwrap();
        std::fs::write(store.path(hash.as_bytes()), b"garbage").unwrap();
        store.put(b"pixels").unwrap();
        assert_eq!(store.get(hash.as_bytes()).unwrap(), b"pixels");
    }
}

//! File operations for the host, confined to an optional root directory.
//!
//! With a root, request paths are read relative to it ("/" is the root) and must stay
//! inside: `..` may not climb above it, and every existing part of the path is resolved with
//! `canonicalize`, so a symlink that points outside is refused. The last component is not
//! followed for `stat`, `remove` and `put` (a put replaces a symlink rather than writing
//! through it). Without a root, paths must be absolute and are used as given.
//!
//! The checks resolve the path and then open it, so a process in the guest that swaps a
//! directory for a symlink in between can still escape; `openat2(RESOLVE_IN_ROOT)` would
//! close that window.
//!
//! The root confines file requests only: an exec runs with the agent's user and can reach
//! whatever that user can.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use carrel_agent_proto::{DirEntry, End, ErrorCode, FileKind, FileStat, MAX_CHUNK};

/// Entries per `DirEntries` frame: 512 names of at most 255 bytes stay far below a frame.
pub const DIR_ENTRIES_PER_FRAME: usize = 512;

/// Errors of file operations; [`FileError::code`] is what the host is told.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The configured root is unusable.
    #[error("agent root {path:?} is not a usable directory")]
    OpenRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The request's path is empty, relative without a root, or names nothing.
    #[error("path {path:?} is invalid: {reason}")]
    ParsePath { path: String, reason: &'static str },
    /// The path leads outside the root.
    #[error("path {path:?} leads outside the agent's root")]
    ConfinePath { path: String },
    /// Resolving the path failed (usually: a part of it does not exist).
    #[error("resolving {path:?} failed")]
    ResolvePath {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("reading metadata of {path:?} failed")]
    Stat {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("listing directory {path:?} failed")]
    ListDir {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("removing {path:?} failed")]
    Remove {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("opening {path:?} failed")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("writing {path:?} failed")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("reading {path:?} failed")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    /// More data arrived than the put announced, or less by `End`.
    #[error("put {path:?} announced {expected} bytes but {actual} arrived")]
    CheckSize { path: String, expected: u64, actual: u64 },
    /// The data's blake3 does not match the sender's; the file was discarded.
    #[error("put {path:?}: blake3 digest of the received data does not match the sender's; the file was discarded")]
    CheckDigest { path: String },
    #[error("moving the finished file to {path:?} failed")]
    Rename {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl FileError {
    /// The protocol error code for this failure.
    pub fn code(&self) -> ErrorCode {
        let source = match self {
            FileError::ParsePath { .. } => return ErrorCode::INVALID_PATH,
            FileError::ConfinePath { .. } => return ErrorCode::PATH_ESCAPES_ROOT,
            FileError::CheckSize { .. } => return ErrorCode::SIZE_MISMATCH,
            FileError::CheckDigest { .. } => return ErrorCode::DIGEST_MISMATCH,
            FileError::OpenRoot { source, .. }
            | FileError::ResolvePath { source, .. }
            | FileError::Stat { source, .. }
            | FileError::ListDir { source, .. }
            | FileError::Remove { source, .. }
            | FileError::Open { source, .. }
            | FileError::Write { source, .. }
            | FileError::Read { source, .. }
            | FileError::Rename { source, .. } => source,
        };
        io_code(source)
    }
}

/// The protocol code for an I/O error.
pub fn io_code(error: &io::Error) -> ErrorCode {
    match error.kind() {
        io::ErrorKind::NotFound => ErrorCode::NOT_FOUND,
        io::ErrorKind::PermissionDenied => ErrorCode::PERMISSION_DENIED,
        io::ErrorKind::AlreadyExists => ErrorCode::ALREADY_EXISTS,
        io::ErrorKind::NotADirectory => ErrorCode::NOT_A_DIRECTORY,
        io::ErrorKind::IsADirectory => ErrorCode::IS_A_DIRECTORY,
        io::ErrorKind::DirectoryNotEmpty => ErrorCode::DIRECTORY_NOT_EMPTY,
        _ => ErrorCode::IO,
    }
}

/// Where file requests may reach.
#[derive(Debug, Clone)]
pub struct FileRoot {
    /// Canonical root, or `None` for the whole filesystem.
    root: Option<PathBuf>,
}

impl FileRoot {
    /// Confines requests to `root` (canonicalized), or allows any absolute path.
    pub fn new(root: Option<&Path>) -> Result<FileRoot, FileError> {
        let Some(root) = root else {
            return Ok(FileRoot { root: None });
        };
        let open_root = |source| FileError::OpenRoot { path: root.to_path_buf(), source };
        let canonical = root.canonicalize().map_err(open_root)?;
        if !canonical.is_dir() {
            return Err(open_root(io::Error::from(io::ErrorKind::NotADirectory)));
        }
        Ok(FileRoot { root: Some(canonical) })
    }

    /// The path on this machine a request names, before symlinks are resolved: `..` is
    /// applied lexically and may not climb above the root.
    fn lexical(&self, path: &str) -> Result<PathBuf, FileError> {
        let invalid = |reason| FileError::ParsePath { path: path.to_string(), reason };
        if path.is_empty() {
            return Err(invalid("empty"));
        }
        if path.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        let Some(root) = &self.root else {
            if !Path::new(path).is_absolute() {
                return Err(invalid("must be absolute"));
            }
            return Ok(PathBuf::from(path));
        };
        let mut inside = PathBuf::new();
        for component in Path::new(path).components() {
            match component {
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
                Component::ParentDir => {
                    if !inside.pop() {
                        return Err(FileError::ConfinePath { path: path.to_string() });
                    }
                }
                Component::Normal(part) => inside.push(part),
            }
        }
        Ok(root.join(inside))
    }

    fn check_inside(&self, path: &str, resolved: &Path) -> Result<(), FileError> {
        match &self.root {
            Some(root) if !resolved.starts_with(root) => Err(FileError::ConfinePath { path: path.to_string() }),
            _ => Ok(()),
        }
    }

    /// Resolves every component, following symlinks, and checks the result is inside.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, FileError> {
        let lexical = self.lexical(path)?;
        let resolved =
            lexical.canonicalize().map_err(|source| FileError::ResolvePath { path: path.to_string(), source })?;
        self.check_inside(path, &resolved)?;
        Ok(resolved)
    }

    /// Resolves the parent directory, following symlinks, and keeps the last component as
    /// is. `None` for the name when the path is the root itself.
    pub fn resolve_parent(&self, path: &str) -> Result<(PathBuf, Option<OsString>), FileError> {
        let lexical = self.lexical(path)?;
        let is_root = match &self.root {
            Some(root) => lexical == *root,
            None => lexical.file_name().is_none(),
        };
        if is_root {
            return Ok((self.resolve(path)?, None));
        }
        let name = lexical
            .file_name()
            .map(OsString::from)
            .ok_or(FileError::ParsePath { path: path.to_string(), reason: "names no file (ends in `..`?)" })?;
        let parent = lexical.parent().unwrap_or(Path::new("/"));
        let resolved =
            parent.canonicalize().map_err(|source| FileError::ResolvePath { path: path.to_string(), source })?;
        self.check_inside(path, &resolved)?;
        Ok((resolved, Some(name)))
    }

    /// Metadata of `path`, not following a final symlink.
    pub fn stat(&self, path: &str) -> Result<FileStat, FileError> {
        let (parent, name) = self.resolve_parent(path)?;
        let target = name.map_or(parent.clone(), |name| parent.join(name));
        let metadata =
            fs::symlink_metadata(&target).map_err(|source| FileError::Stat { path: path.to_string(), source })?;
        Ok(FileStat {
            kind: kind_of(&metadata.file_type()),
            size: metadata.len(),
            mode: metadata.permissions().mode() & 0o7777,
            mtime_secs: metadata.mtime(),
        })
    }

    /// The entries of directory `path`, sorted by name.
    pub fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>, FileError> {
        let dir = self.resolve(path)?;
        let list_error = |source| FileError::ListDir { path: path.to_string(), source };
        let mut entries = Vec::new();
        for entry in fs::read_dir(&dir).map_err(list_error)? {
            let entry = entry.map_err(list_error)?;
            let metadata = entry.metadata().map_err(list_error)?;
            entries.push(DirEntry {
                name: entry.file_name().to_string_lossy().into_owned(),
                kind: kind_of(&metadata.file_type()),
                size: metadata.len(),
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Removes a file or symlink, or a directory (recursively when asked). The root itself
    /// cannot be removed.
    pub fn remove(&self, path: &str, recursive: bool) -> Result<(), FileError> {
        let (parent, name) = self.resolve_parent(path)?;
        let Some(name) = name else {
            return Err(FileError::ParsePath { path: path.to_string(), reason: "is the root" });
        };
        let target = parent.join(name);
        let remove_error = |source| FileError::Remove { path: path.to_string(), source };
        let metadata = fs::symlink_metadata(&target).map_err(remove_error)?;
        match (metadata.is_dir(), recursive) {
            (true, true) => fs::remove_dir_all(&target),
            (true, false) => fs::remove_dir(&target),
            (false, _) => fs::remove_file(&target),
        }
        .map_err(remove_error)
    }

    /// Opens `path` for a get: a regular file, with its size and mode.
    pub fn open_for_get(&self, path: &str) -> Result<(File, u64, u32), FileError> {
        let resolved = self.resolve(path)?;
        let open_error = |source| FileError::Open { path: path.to_string(), source };
        let file = File::open(&resolved).map_err(open_error)?;
        let metadata = file.metadata().map_err(open_error)?;
        if metadata.is_dir() {
            return Err(open_error(io::Error::from(io::ErrorKind::IsADirectory)));
        }
        Ok((file, metadata.len(), metadata.permissions().mode() & 0o7777))
    }

    /// Starts a put: a hidden temporary file beside the target, renamed over it once the
    /// digest checks out.
    pub fn start_put(&self, path: &str, size: u64, mode: u32, request_id: u32) -> Result<Put, FileError> {
        let (parent, name) = self.resolve_parent(path)?;
        let Some(name) = name else {
            return Err(FileError::ParsePath { path: path.to_string(), reason: "is the root" });
        };
        let target = parent.join(&name);
        if fs::symlink_metadata(&target).is_ok_and(|metadata| metadata.is_dir()) {
            let source = io::Error::from(io::ErrorKind::IsADirectory);
            return Err(FileError::Open { path: path.to_string(), source });
        }
        let mut temp_name = OsString::from(".");
        temp_name.push(&name);
        temp_name.push(format!(".carrel-put-{request_id}"));
        let temp = parent.join(temp_name);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode & 0o7777)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)
            .map_err(|source| FileError::Open { path: path.to_string(), source })?;
        Ok(Put {
            path: path.to_string(),
            target,
            temp,
            file,
            expected: size,
            received: 0,
            hasher: blake3::Hasher::new(),
        })
    }
}

fn kind_of(file_type: &fs::FileType) -> FileKind {
    if file_type.is_symlink() {
        FileKind::Symlink
    } else if file_type.is_dir() {
        FileKind::Dir
    } else if file_type.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    }
}

/// A put in progress. Dropping it unfinished deletes the temporary file.
#[derive(Debug)]
pub struct Put {
    path: String,
    target: PathBuf,
    temp: PathBuf,
    file: File,
    expected: u64,
    received: u64,
    hasher: blake3::Hasher,
}

impl Put {
    /// Writes one chunk.
    pub fn write(&mut self, data: &[u8]) -> Result<(), FileError> {
        let received = self.received + data.len() as u64;
        if received > self.expected || data.len() > MAX_CHUNK {
            return Err(FileError::CheckSize { path: self.path.clone(), expected: self.expected, actual: received });
        }
        self.file.write_all(data).map_err(|source| FileError::Write { path: self.path.clone(), source })?;
        self.hasher.update(data);
        self.received = received;
        Ok(())
    }

    /// Checks size and digest and moves the file into place.
    pub fn finish(mut self, end: &End) -> Result<u64, FileError> {
        if end.size != self.received || self.received != self.expected {
            return Err(FileError::CheckSize {
                path: self.path.clone(),
                expected: self.expected,
                actual: self.received,
            });
        }
        if *self.hasher.finalize().as_bytes() != end.digest {
            return Err(FileError::CheckDigest { path: self.path.clone() });
        }
        self.file.flush().map_err(|source| FileError::Write { path: self.path.clone(), source })?;
        fs::rename(&self.temp, &self.target).map_err(|source| FileError::Rename { path: self.path.clone(), source })?;
        // Renamed: nothing left for Drop to clean up.
        self.temp = PathBuf::new();
        Ok(self.received)
    }
}

impl Drop for Put {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn confined() -> (tempfile::TempDir, FileRoot) {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/file"), b"hello").unwrap();
        let root = FileRoot::new(Some(dir.path())).unwrap();
        (dir, root)
    }

    #[test]
    fn resolve_inside_root_returns_canonical_path() {
        let (dir, root) = confined();
        let resolved = root.resolve("/sub/../sub/./file").unwrap();
        assert_eq!(resolved, dir.path().canonicalize().unwrap().join("sub/file"));
        assert_eq!(root.resolve("sub/file").unwrap(), resolved);
    }

    #[test]
    fn resolve_dotdot_above_root_returns_escape_error() {
        let (_dir, root) = confined();
        let error = root.resolve("/../etc/passwd").unwrap_err();
        assert_eq!(error.code(), ErrorCode::PATH_ESCAPES_ROOT);
        assert_eq!(root.stat("sub/../../x").unwrap_err().code(), ErrorCode::PATH_ESCAPES_ROOT);
    }

    #[test]
    fn resolve_symlink_leaving_root_returns_escape_error() {
        let (dir, root) = confined();
        symlink("/etc", dir.path().join("out")).unwrap();
        assert_eq!(root.resolve("/out/passwd").unwrap_err().code(), ErrorCode::PATH_ESCAPES_ROOT);
        assert_eq!(root.list_dir("/out").unwrap_err().code(), ErrorCode::PATH_ESCAPES_ROOT);
        assert_eq!(root.start_put("/out/x", 0, 0o644, 1).unwrap_err().code(), ErrorCode::PATH_ESCAPES_ROOT);
        // The link itself is inside: stat and remove act on it, not on /etc.
        assert_eq!(root.stat("/out").unwrap().kind, FileKind::Symlink);
        root.remove("/out", false).unwrap();
        assert!(Path::new("/etc").is_dir());
    }

    #[test]
    fn lexical_without_root_requires_absolute_path() {
        let root = FileRoot::new(None).unwrap();
        assert_eq!(root.stat("relative").unwrap_err().code(), ErrorCode::INVALID_PATH);
        assert_eq!(root.stat("").unwrap_err().code(), ErrorCode::INVALID_PATH);
        assert_eq!(root.stat("/").unwrap().kind, FileKind::Dir);
    }

    #[test]
    fn remove_root_returns_invalid_path() {
        let (_dir, root) = confined();
        assert_eq!(root.remove("/", true).unwrap_err().code(), ErrorCode::INVALID_PATH);
        assert_eq!(root.remove("/sub/..", true).unwrap_err().code(), ErrorCode::INVALID_PATH);
    }

    #[test]
    fn put_with_matching_digest_moves_file_into_place() {
        let (dir, root) = confined();
        let mut put = root.start_put("/new", 5, 0o600, 3).unwrap();
        put.write(b"12345").unwrap();
        put.finish(&End { size: 5, digest: *blake3::hash(b"12345").as_bytes() }).unwrap();
        assert_eq!(fs::read(dir.path().join("new")).unwrap(), b"12345");
        assert_eq!(fs::metadata(dir.path().join("new")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "no temporary file is left");
    }

    #[test]
    fn put_with_wrong_digest_discards_file() {
        let (dir, root) = confined();
        let mut put = root.start_put("/new", 5, 0o644, 3).unwrap();
        put.write(b"12345").unwrap();
        let error = put.finish(&End { size: 5, digest: [0; 32] }).unwrap_err();
        assert_eq!(error.code(), ErrorCode::DIGEST_MISMATCH);
        assert!(!dir.path().join("new").exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn put_with_more_data_than_announced_returns_size_error() {
        let (_dir, root) = confined();
        let mut put = root.start_put("/new", 2, 0o644, 3).unwrap();
        assert_eq!(put.write(b"123").unwrap_err().code(), ErrorCode::SIZE_MISMATCH);
    }

    #[test]
    fn list_dir_returns_sorted_entries_with_kinds() {
        let (dir, root) = confined();
        fs::write(dir.path().join("a"), b"x").unwrap();
        let names: Vec<(String, FileKind)> =
            root.list_dir("/").unwrap().into_iter().map(|entry| (entry.name, entry.kind)).collect();
        assert_eq!(names, [("a".to_string(), FileKind::File), ("sub".to_string(), FileKind::Dir)]);
    }

    #[test]
    fn open_for_get_of_directory_returns_is_a_directory() {
        let (_dir, root) = confined();
        assert_eq!(root.open_for_get("/sub").unwrap_err().code(), ErrorCode::IS_A_DIRECTORY);
        assert_eq!(root.open_for_get("/missing").unwrap_err().code(), ErrorCode::NOT_FOUND);
    }
}

//! The secret store: values kept on the host for their owner, typed into a VM or given
//! to a guest command by name, so the model driving the VM never sees them.
//!
//! ```text
//! <state>/secrets/            0700
//! <state>/secrets/<uid>/      0700, one per owner
//! <state>/secrets/<uid>/NAME  0600, the value's bytes
//! ```
//!
//! A value is written to a temporary file, synced and renamed, then the directory is
//! synced. Values are not encrypted at rest: the key would have to sit on the same host,
//! readable by the same root-only daemon, so it would protect nothing the directory
//! modes do not (see README). An owner reaches only their own directory: a name is
//! looked up under the caller's uid, so another uid's secret of that name is simply not
//! found.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The longest secret name.
pub const MAX_NAME_LEN: usize = 64;
/// The largest secret value.
pub const MAX_VALUE_BYTES: usize = 64 << 10;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret name {0:?} must be 1 to {MAX_NAME_LEN} of a-z, 0-9, '-', '_' and '.', not starting with '.'")]
    InvalidName(String),
    #[error("a secret holds at most {MAX_VALUE_BYTES} bytes, this one {0}")]
    TooLarge(usize),
    #[error("a secret cannot be empty")]
    Empty,
    #[error("no secret named {0:?}")]
    NotFound(String),
    #[error("cannot write the secret store at {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read the secret store at {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// Whether `name` may name a secret.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
}

/// The store under the daemon's state directory.
#[derive(Debug)]
pub struct SecretStore {
    dir: PathBuf,
}

impl SecretStore {
    pub fn open(state: &Path) -> Result<SecretStore, SecretError> {
        let dir = state.join("secrets");
        make_private_dir(&dir)?;
        Ok(SecretStore { dir })
    }

    fn owner_dir(&self, uid: u32) -> PathBuf {
        self.dir.join(uid.to_string())
    }

    fn path(&self, uid: u32, name: &str) -> Result<PathBuf, SecretError> {
        if !valid_name(name) {
            return Err(SecretError::InvalidName(name.into()));
        }
        Ok(self.owner_dir(uid).join(name))
    }

    /// Keeps `value` as `uid`'s secret `name`, replacing one of that name.
    pub fn set(&self, uid: u32, name: &str, value: &[u8]) -> Result<(), SecretError> {
        let path = self.path(uid, name)?;
        if value.is_empty() {
            return Err(SecretError::Empty);
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(SecretError::TooLarge(value.len()));
        }
        let dir = self.owner_dir(uid);
        make_private_dir(&dir)?;
        // A dot name: never a valid secret name, so never listed or looked up; numbered,
        // so two Sets of one name at once each write their own.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let number = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let temporary = dir.join(format!(".{name}.{number}.tmp"));
        let fail = |source| SecretError::Write { path: path.clone(), source };
        let _ = std::fs::remove_file(&temporary);
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temporary).map_err(fail)?;
        file.write_all(value).and_then(|()| file.sync_all()).map_err(fail)?;
        std::fs::rename(&temporary, &path).map_err(fail)?;
        std::fs::File::open(&dir).and_then(|dir| dir.sync_all()).map_err(fail)
    }

    /// `uid`'s secret `name`.
    pub fn get(&self, uid: u32, name: &str) -> Result<Vec<u8>, SecretError> {
        let path = self.path(uid, name)?;
        std::fs::read(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => SecretError::NotFound(name.into()),
            _ => SecretError::Read { path, source },
        })
    }

    /// `uid`'s secrets: names and lengths, by name.
    pub fn list(&self, uid: u32) -> Result<Vec<(String, u64)>, SecretError> {
        let dir = self.owner_dir(uid);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(SecretError::Read { path: dir, source }),
        };
        let mut secrets = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| SecretError::Read { path: dir.clone(), source })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !valid_name(&name) {
                continue;
            }
            let length = entry.metadata().map_err(|source| SecretError::Read { path: entry.path(), source })?.len();
            secrets.push((name, length));
        }
        secrets.sort();
        Ok(secrets)
    }

    /// Forgets `uid`'s secret `name`.
    pub fn delete(&self, uid: u32, name: &str) -> Result<(), SecretError> {
        let path = self.path(uid, name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err(SecretError::NotFound(name.into())),
            Err(source) => Err(SecretError::Write { path, source }),
        }
    }
}

/// Makes `dir` (0700) if it is missing, and makes sure it is 0700 if it is there.
fn make_private_dir(dir: &Path) -> Result<(), SecretError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |source| SecretError::Write { path: dir.to_path_buf(), source };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)
        }
        Err(source) => Err(fail(source)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secrets_are_kept_per_owner_with_private_modes() {
        let state = tempfile::tempdir().unwrap();
        let store = SecretStore::open(state.path()).unwrap();
        store.set(1000, "github-token", b"s3cr3t").unwrap();
        store.set(1000, "github-token", b"longer-s3cr3t").unwrap();
        store.set(1000, "a.b_c", b"x").unwrap();
        assert_eq!(store.get(1000, "github-token").unwrap(), b"longer-s3cr3t");
        assert_eq!(store.list(1000).unwrap(), [("a.b_c".to_string(), 1), ("github-token".to_string(), 13)]);
        // Another owner sees nothing of it.
        assert!(matches!(store.get(1001, "github-token"), Err(SecretError::NotFound(_))));
        assert!(store.list(1001).unwrap().is_empty());
        assert!(matches!(store.delete(1001, "github-token"), Err(SecretError::NotFound(_))));
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state.path().join("secrets")), 0o700);
        assert_eq!(mode(&state.path().join("secrets/1000")), 0o700);
        assert_eq!(mode(&state.path().join("secrets/1000/github-token")), 0o600);
        let files: Vec<_> = std::fs::read_dir(state.path().join("secrets/1000")).unwrap().collect();
        assert_eq!(files.len(), 2, "no temporary file left");
        store.delete(1000, "github-token").unwrap();
        assert!(matches!(store.get(1000, "github-token"), Err(SecretError::NotFound(_))));
    }

    #[test]
    fn names_and_values_are_checked() {
        let state = tempfile::tempdir().unwrap();
        let store = SecretStore::open(state.path()).unwrap();
        for name in ["", ".hidden", "../x", "A", "a/b", &"a".repeat(MAX_NAME_LEN + 1)] {
            assert!(matches!(store.set(0, name, b"v"), Err(SecretError::InvalidName(_))), "{name:?}");
        }
        assert!(valid_name(&"a".repeat(MAX_NAME_LEN)));
        assert!(matches!(store.set(0, "e", b""), Err(SecretError::Empty)));
        assert!(matches!(store.set(0, "big", &vec![1; MAX_VALUE_BYTES + 1]), Err(SecretError::TooLarge(_))));
    }
}

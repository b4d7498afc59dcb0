//! Signed checkpoints and the host key that signs them.
//!
//! A checkpoint states the size and root of a log's tree at a time, signed with the host's
//! ed25519 key. It is a small text file an auditor can keep and later check the log
//! against (`carrel-audit verify --checkpoint FILE`):
//!
//! ```text
//! carrel-audit checkpoint v1
//! origin <vm id>
//! size <leaves>
//! root <64 hex>
//! time <unix nanoseconds>
//! key <64 hex: the public key>
//! signature <128 hex>
//! ```
//!
//! The signature covers the first five lines exactly as written, newlines included. The
//! host key is 32 raw secret bytes in a file of mode 0600; its public half is written as
//! hex to `host.pub` in the log directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use thiserror::Error;

use crate::codec::{from_hex, to_hex};
use crate::files::{random_bytes, write_atomic};
use crate::tree::Hash;

const FIRST_LINE: &str = "carrel-audit checkpoint v1";
/// The file name suffix of checkpoints in `checkpoints/`.
pub const CHECKPOINT_SUFFIX: &str = ".ckpt";

/// Errors of keys and checkpoints.
#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("cannot read the host key {path}")]
    ReadKey { path: PathBuf, source: std::io::Error },
    #[error("cannot create the host key {path}")]
    CreateKey { path: PathBuf, source: std::io::Error },
    #[error("the host key {path} is {length} bytes, a host key is 32")]
    CheckKeyLength { path: PathBuf, length: usize },
    #[error("the host key {path} can be read by other users (mode {mode:o}); chmod 600 it")]
    CheckKeyMode { path: PathBuf, mode: u32 },
    #[error("cannot read the public key {path}")]
    ReadPublicKey { path: PathBuf, source: std::io::Error },
    #[error("{what} is not an ed25519 public key ({reason})")]
    ParsePublicKey { what: String, reason: String },
    #[error("cannot write {path}")]
    WriteFile { path: PathBuf, source: std::io::Error },
    #[error("cannot read the checkpoint {path}")]
    ReadCheckpoint { path: PathBuf, source: std::io::Error },
    #[error("line {line} of the checkpoint: {reason}")]
    ParseCheckpoint { line: usize, reason: String },
    #[error("the checkpoint is signed by key {found}, expected key {expected}")]
    CheckSigner { found: String, expected: String },
    #[error("the checkpoint signature does not verify: the checkpoint was altered or forged")]
    VerifySignature,
    #[error("cannot list the checkpoints in {path}")]
    ListCheckpoints { path: PathBuf, source: std::io::Error },
}

/// What a checkpoint states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's origin: the VM id it was opened for.
    pub origin: String,
    pub tree_size: u64,
    pub root: Hash,
    pub time_unix_nanos: u64,
}

impl Checkpoint {
    /// The exact bytes the host key signs.
    pub fn message(&self) -> String {
        format!(
            "{FIRST_LINE}\norigin {}\nsize {}\nroot {}\ntime {}\n",
            self.origin,
            self.tree_size,
            to_hex(&self.root),
            self.time_unix_nanos
        )
    }
}

/// A checkpoint with its signature and the public key that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    pub checkpoint: Checkpoint,
    pub key: [u8; 32],
    pub signature: [u8; 64],
}

impl SignedCheckpoint {
    /// The checkpoint file's text.
    pub fn to_text(&self) -> String {
        format!("{}key {}\nsignature {}\n", self.checkpoint.message(), to_hex(&self.key), to_hex(&self.signature))
    }

    /// Parses a checkpoint file's text (strictly: the lines in order, nothing else).
    pub fn parse(text: &str) -> Result<SignedCheckpoint, CheckpointError> {
        let bad = |line: usize, reason: &str| CheckpointError::ParseCheckpoint { line, reason: reason.to_string() };
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        if lines.len() != 7 {
            return Err(bad(lines.len().min(7), "a checkpoint has exactly 7 lines"));
        }
        if lines[0] != FIRST_LINE {
            return Err(bad(1, "not a carrel-audit v1 checkpoint"));
        }
        let field = |index: usize, name: &str| -> Result<&str, CheckpointError> {
            lines[index]
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .ok_or_else(|| bad(index + 1, &format!("expected '{name} ...'")))
        };
        let origin = field(1, "origin")?.to_string();
        let tree_size = field(2, "size")?.parse().map_err(|_| bad(3, "the size is not a number"))?;
        let root = from_hex::<32>(field(3, "root")?).map_err(|e| bad(4, &e.to_string()))?;
        let time_unix_nanos = field(4, "time")?.parse().map_err(|_| bad(5, "the time is not a number"))?;
        let key = from_hex::<32>(field(5, "key")?).map_err(|e| bad(6, &e.to_string()))?;
        let signature = from_hex::<64>(field(6, "signature")?).map_err(|e| bad(7, &e.to_string()))?;
        let checkpoint = Checkpoint { origin, tree_size, root, time_unix_nanos };
        if checkpoint.message().split_terminator('\n').count() != 5 {
            return Err(bad(2, "the origin has a line break"));
        }
        Ok(SignedCheckpoint { checkpoint, key, signature })
    }

    /// Reads and parses a checkpoint file.
    pub fn read(path: &Path) -> Result<SignedCheckpoint, CheckpointError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| CheckpointError::ReadCheckpoint { path: path.to_path_buf(), source })?;
        SignedCheckpoint::parse(&text)
    }

    /// Checks that `trusted` signed this checkpoint.
    pub fn verify(&self, trusted: &VerifyingKey) -> Result<(), CheckpointError> {
        if self.key != trusted.to_bytes() {
            return Err(CheckpointError::CheckSigner {
                found: to_hex(&self.key),
                expected: to_hex(&trusted.to_bytes()),
            });
        }
        let signature = Signature::from_bytes(&self.signature);
        trusted
            .verify_strict(self.checkpoint.message().as_bytes(), &signature)
            .map_err(|_| CheckpointError::VerifySignature)
    }
}

/// The host's signing key.
pub struct HostKey {
    signing: SigningKey,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("public", &to_hex(&self.signing.verifying_key().to_bytes()))
            .finish_non_exhaustive()
    }
}

impl HostKey {
    /// Loads the key at `path`, or creates one (mode 0600) when there is no file.
    pub fn load_or_create(path: &Path) -> Result<HostKey, CheckpointError> {
        match HostKey::load(path) {
            Err(CheckpointError::ReadKey { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                HostKey::create(path)
            }
            other => other,
        }
    }

    /// Loads the key at `path`; refuses a key file other users can read.
    pub fn load(path: &Path) -> Result<HostKey, CheckpointError> {
        let read_error = |source| CheckpointError::ReadKey { path: path.to_path_buf(), source };
        let mode = std::fs::metadata(path).map_err(read_error)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(CheckpointError::CheckKeyMode { path: path.to_path_buf(), mode: mode & 0o777 });
        }
        let bytes = std::fs::read(path).map_err(read_error)?;
        let seed: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| CheckpointError::CheckKeyLength { path: path.to_path_buf(), length: bytes.len() })?;
        Ok(HostKey { signing: SigningKey::from_bytes(&seed) })
    }

    fn create(path: &Path) -> Result<HostKey, CheckpointError> {
        let create_error = |source| CheckpointError::CreateKey { path: path.to_path_buf(), source };
        let seed = random_bytes::<32>().map_err(create_error)?;
        write_atomic(path, &seed, 0o600).map_err(create_error)?;
        Ok(HostKey { signing: SigningKey::from_bytes(&seed) })
    }

    /// The public half.
    pub fn public_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// Signs a checkpoint.
    pub fn sign(&self, checkpoint: Checkpoint) -> SignedCheckpoint {
        let signature = self.signing.sign(checkpoint.message().as_bytes());
        SignedCheckpoint { checkpoint, key: self.public_key().to_bytes(), signature: signature.to_bytes() }
    }
}

/// Parses a public key from hex text.
pub fn parse_public_key(text: &str, what: &str) -> Result<VerifyingKey, CheckpointError> {
    let bad = |reason: String| CheckpointError::ParsePublicKey { what: what.to_string(), reason };
    let bytes = from_hex::<32>(text).map_err(|e| bad(e.to_string()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| bad(e.to_string()))
}

/// Reads a public key file (hex text, as `host.pub`).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, CheckpointError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| CheckpointError::ReadPublicKey { path: path.to_path_buf(), source })?;
    parse_public_key(&text, &path.display().to_string())
}

/// Writes a public key file.
pub fn write_public_key(path: &Path, key: &VerifyingKey) -> Result<(), CheckpointError> {
    let text = format!("{}\n", to_hex(&key.to_bytes()));
    write_atomic(path, text.as_bytes(), 0o644)
        .map_err(|source| CheckpointError::WriteFile { path: path.to_path_buf(), source })
}

/// The file name of the checkpoint for a tree size.
pub fn checkpoint_file_name(tree_size: u64) -> String {
    format!("{tree_size:020}{CHECKPOINT_SUFFIX}")
}

/// Writes `checkpoint` into the directory `dir` (atomically) and returns its path.
pub fn write_checkpoint(dir: &Path, checkpoint: &SignedCheckpoint) -> Result<PathBuf, CheckpointError> {
    let path = dir.join(checkpoint_file_name(checkpoint.checkpoint.tree_size));
    write_atomic(&path, checkpoint.to_text().as_bytes(), 0o644)
        .map_err(|source| CheckpointError::WriteFile { path: path.clone(), source })?;
    Ok(path)
}

/// The checkpoint files in `dir`, ordered by name (so by tree size). A missing directory
/// has none.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let list_error = |source| CheckpointError::ListCheckpoints { path: dir.to_path_buf(), source };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(list_error(error)),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(list_error)?.path();
        let is_checkpoint = path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.ends_with(CHECKPOINT_SUFFIX) && !name.starts_with('.'));
        if is_checkpoint {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// The checkpoint with the largest tree size in `dir`, if any parses.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<SignedCheckpoint>, CheckpointError> {
    for path in list_checkpoints(dir)?.iter().rev() {
        if let Ok(checkpoint) = SignedCheckpoint::read(path) {
            return Ok(Some(checkpoint));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    fn sample(key: &HostKey) -> SignedCheckpoint {
        key.sign(Checkpoint {
            origin: "vm-a".into(),
            tree_size: 12,
            root: [7; 32],
            time_unix_nanos: 1_700_000_000_123_456_789,
        })
    }

    #[test]
    fn parse_of_to_text_round_trips_and_verifies() {
        let dir = TempDir::new("checkpoint-round-trip");
        let key = HostKey::load_or_create(&dir.path().join("host.key")).unwrap();
        let signed = sample(&key);
        let parsed = SignedCheckpoint::parse(&signed.to_text()).unwrap();
        assert_eq!(parsed, signed);
        parsed.verify(&key.public_key()).unwrap();
    }

    #[test]
    fn verify_of_altered_size_fails() {
        let dir = TempDir::new("checkpoint-altered");
        let key = HostKey::load_or_create(&dir.path().join("host.key")).unwrap();
        let text = sample(&key).to_text().replace("size 12", "size 13");
        let parsed = SignedCheckpoint::parse(&text).unwrap();
        assert!(matches!(parsed.verify(&key.public_key()), Err(CheckpointError::VerifySignature)));
    }

    #[test]
    fn verify_with_other_key_fails() {
        let dir = TempDir::new("checkpoint-other-key");
        let key = HostKey::load_or_create(&dir.path().join("a.key")).unwrap();
        let other = HostKey::load_or_create(&dir.path().join("b.key")).unwrap();
        assert!(matches!(sample(&key).verify(&other.public_key()), Err(CheckpointError::CheckSigner { .. })));
    }

    #[test]
    fn load_or_create_makes_private_key_and_reloads_it() {
        let dir = TempDir::new("checkpoint-key-mode");
        let path = dir.path().join("host.key");
        let created = HostKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = HostKey::load_or_create(&path).unwrap();
        assert_eq!(created.public_key(), loaded.public_key());
    }

    #[test]
    fn load_of_world_readable_key_returns_error() {
        let dir = TempDir::new("checkpoint-key-open");
        let path = dir.path().join("host.key");
        HostKey::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(HostKey::load(&path), Err(CheckpointError::CheckKeyMode { .. })));
    }

    #[test]
    fn parse_with_extra_line_returns_error() {
        let dir = TempDir::new("checkpoint-extra-line");
        let key = HostKey::load_or_create(&dir.path().join("host.key")).unwrap();
        let text = sample(&key).to_text() + "note hello\n";
        assert!(matches!(SignedCheckpoint::parse(&text), Err(CheckpointError::ParseCheckpoint { .. })));
    }
}

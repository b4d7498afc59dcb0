//! Carrel's audit log: a blake3 Merkle transparency log of everything an agent saw and did.
//!
//! Every request served on a VM's control socket becomes an [`Event`] record (who, what,
//! redacted parameters, result, screenshots before and after), appended to segment files
//! and to a Merkle tree in the shape of RFC 6962/9162 with blake3 (leaf hash
//! `blake3(0x00 || record)`, node hash `blake3(0x01 || left || right)`). The host signs
//! checkpoints (tree size, root, time) with its ed25519 key; anyone holding a checkpoint
//! can check, offline, that a copy of the log is consistent with it ([`verify::verify_dir`],
//! `carrel-audit verify`), and inclusion and consistency proofs show a record is in the log
//! and that the log only grew.
//!
//! Modules: [`tree`] (hashing and proofs, pure), [`tree_store`] (stored subtree hashes),
//! [`segment`] (record files and framing), [`audit`] (the writer: group commit, recovery,
//! checkpoints), [`checkpoint`] (signed checkpoints, the host key), [`blob`] (screenshots
//! by hash), [`reader`], [`verify`], [`export`], [`replay`].
//!
//! The VMM's use:
//!
//! ```no_run
//! use carrel_audit::{AuditLog, NewEvent, Outcome};
//! # fn main() -> Result<(), carrel_audit::AuditError> {
//! let log = AuditLog::open(std::path::Path::new("/var/lib/carrel/audit/vm-1"), "vm-1")?;
//! let before = log.put_blob(b"...png bytes...")?;
//! let seq = log.append(
//!     NewEvent::new("input.click")
//!         .param("x", "120")
//!         .param("y", "48")
//!         .screenshots(Some(*before.as_bytes()), None)
//!         .outcome(Outcome::Ok),
//! )?; // durable when it returns
//! let checkpoint = log.checkpoint()?;
//! # let _ = (seq, checkpoint);
//! # Ok(())
//! # }
//! ```

pub mod audit;
pub mod blob;
pub mod checkpoint;
pub mod codec;
pub mod event;
pub mod export;
mod files;
pub mod layout;
pub mod reader;
pub mod replay;
pub mod segment;
pub mod tree;
pub mod tree_store;
pub mod verify;

#[cfg(test)]
mod test_support;

pub use audit::{error_chain, AuditConfig, AuditError, AuditLog, CutTail, Recovery};
pub use checkpoint::{Checkpoint, HostKey, SignedCheckpoint};
pub use event::{redact, Actor, Event, NewEvent, Outcome, Param};
pub use tree::Hash;
pub use verify::{verify_dir, Finding, VerifyOptions, VerifyReport};

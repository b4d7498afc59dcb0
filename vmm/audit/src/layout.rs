//! Where things live in a log directory.
//!
//! ```text
//! DIR/origin               the VM id the log was created for
//! DIR/host.key             the ed25519 host key (0600; unless a key path is given)
//! DIR/host.pub             its public half, hex
//! DIR/lock                 held (flock) by the one writer
//! DIR/log/*.seg            records (see `segment`)
//! DIR/tree/level-NN.hashes stored subtree hashes (see `tree_store`)
//! DIR/tree/durable         leaves of the tree known durable (its last sync)
//! DIR/checkpoints/*.ckpt   signed checkpoints, named by tree size
//! DIR/blobs/ab/cdef...     screenshots by blake3
//! DIR/torn/*.bin           torn tails cut off by recovery, kept for inspection
//! ```

use std::path::{Path, PathBuf};

/// The paths of one log directory.
#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// The layout of the log in `dir`.
    pub fn new(dir: &Path) -> Layout {
        Layout { dir: dir.to_path_buf() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn origin(&self) -> PathBuf {
        self.dir.join("origin")
    }

    pub fn host_key(&self) -> PathBuf {
        self.dir.join("host.key")
    }

    pub fn host_public_key(&self) -> PathBuf {
        self.dir.join("host.pub")
    }

    pub fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("log")
    }

    pub fn tree(&self) -> PathBuf {
        self.dir.join("tree")
    }

    pub fn tree_durable_mark(&self) -> PathBuf {
        self.dir.join("tree").join("durable")
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }

    pub fn blobs(&self) -> PathBuf {
        self.dir.join("blobs")
    }

    pub fn torn(&self) -> PathBuf {
        self.dir.join("torn")
    }
}

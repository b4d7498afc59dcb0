//! The registry of agent VMs, persisted under the state directory:
//!
//! ```text
//! <state>/vms/<name>/vm.json       the record: owner, config, the VMM's pid, how it ended
//! <state>/vms/<name>/control.sock  the VMM's private control socket
//! <state>/vms/<name>/vsock.sock    its guest agent's host side
//! <state>/vms/<name>/console.log   its serial console
//! <state>/vms/<name>/vmm.log       the VMM's own messages
//! <state>/vms/<name>/audit/        its audit log (carrel-audit verify reads it)
//! ```
//!
//! A record is written to a temporary file, synced and renamed, so a daemon killed
//! mid-write leaves the previous record, never half of one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors reading or writing the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read the registry at {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("registry record {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("cannot write the registry record {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// A disk as the API names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub path: PathBuf,
    pub readonly: bool,
    pub base: Option<PathBuf>,
    pub size_bytes: Option<u64>,
}

/// A VM's configuration as given at Create, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub memory_mib: u64,
    pub cpus: u32,
    pub display: String,
    pub cmdline: Option<String>,
    pub disks: Vec<DiskRecord>,
    /// Restart after failures, up to this many in a row (0: never).
    #[serde(default)]
    pub max_restarts: u32,
    /// Restart the VM when its agent sends no heartbeat this long (0: no watchdog).
    #[serde(default)]
    pub watchdog_seconds: u32,
    /// The VMM's memory limit when not the default (RAM plus the measured overhead).
    #[serde(default)]
    pub memory_limit_mib: Option<u64>,
    /// Reads and writes per second on the host's devices under its disks (0: no limit).
    #[serde(default)]
    pub disk_bytes_per_second: u64,
    #[serde(default)]
    pub disk_iops: u64,
    /// Hibernate after this long idle (0: never).
    #[serde(default)]
    pub idle_hibernate_seconds: u32,
    /// The template it starts from (a restore of its snapshot) instead of a cold boot.
    #[serde(default)]
    pub template: Option<TemplateSource>,
    /// Take a checkpoint at most this often while in use (0: none), keeping this many.
    #[serde(default)]
    pub checkpoint_seconds: u32,
    #[serde(default)]
    pub keep_checkpoints: u32,
}

/// A template a VM starts from: its name and its snapshot's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateSource {
    pub name: String,
    pub snapshot: PathBuf,
    /// Where the disk layers the template froze lie (its VM's disks' directories): the
    /// VM's own top layers lie over them, so its jail may read them.
    #[serde(default)]
    pub layer_dirs: Vec<PathBuf>,
}

/// What the registry knows of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub name: String,
    pub owner_uid: u32,
    pub spec: VmSpec,
    /// The carrel-vmm process while it runs (kept so a restarted daemon re-attaches).
    pub pid: Option<u32>,
    /// The user asked it to stop: its end is not a crash.
    pub stopped: bool,
    pub exit_reason: Option<String>,
    /// Restarts after failures since the last start by request.
    #[serde(default)]
    pub restarts: u32,
    /// The unprivileged uid (and gid) its jailed VMM runs as; none when not jailed.
    #[serde(default)]
    pub jail_uid: Option<u32>,
    /// Snapshots taken through the daemon, oldest first, in the VM's `snapshots/`.
    #[serde(default)]
    pub snapshots: Vec<SnapshotRecord>,
    /// The snapshot a hibernated VM wakes from.
    #[serde(default)]
    pub hibernated: Option<String>,
    /// The snapshot of its own its running VMM's memory last matched (restored from, or
    /// saved to): the parent of its next diff.
    #[serde(default)]
    pub parent: Option<String>,
}

impl VmRecord {
    /// Its newest checkpoint.
    pub fn last_checkpoint(&self) -> Option<&SnapshotRecord> {
        self.snapshots.iter().rev().find(|snapshot| snapshot.checkpoint)
    }

    /// The checkpoints past the newest `keep` that nothing kept depends on: every
    /// snapshot a user took, the newest checkpoints, the one it sleeps in and its
    /// VMM's parent are kept, with the chains of parents under them.
    pub fn prunable_checkpoints(&self, keep: usize) -> Vec<String> {
        let newest: Vec<&str> = self
            .snapshots
            .iter()
            .rev()
            .filter(|snapshot| snapshot.checkpoint)
            .take(keep)
            .map(|s| s.id.as_str())
            .collect();
        let mut kept: Vec<&str> = self
            .snapshots
            .iter()
            .filter(|snapshot| !snapshot.checkpoint || newest.contains(&snapshot.id.as_str()))
            .map(|snapshot| snapshot.id.as_str())
            .chain(self.hibernated.as_deref())
            .chain(self.parent.as_deref())
            .collect();
        let mut index = 0;
        while index < kept.len() {
            let parent =
                self.snapshots.iter().find(|snapshot| snapshot.id == kept[index]).and_then(|s| s.parent.as_deref());
            if let Some(parent) = parent.filter(|parent| !kept.contains(parent)) {
                kept.push(parent);
            }
            index += 1;
        }
        self.snapshots.iter().filter(|snapshot| !kept.contains(&snapshot.id.as_str())).map(|s| s.id.clone()).collect()
    }
}

/// One snapshot of a VM, in `<vm dir>/snapshots/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub diff: bool,
    /// The snapshot of this VM a diff is over.
    #[serde(default)]
    pub parent: Option<String>,
    /// Taken by the checkpoint policy, and pruned by it.
    #[serde(default)]
    pub checkpoint: bool,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub paused_us: u64,
    pub unix_time: i64,
}

/// The on-disk registry.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
}

/// Whether `name` may name a VM: 1 to 63 of `a-z 0-9 -`, starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

impl Registry {
    pub fn open(state: &Path) -> Result<Registry, RegistryError> {
        let dir = state.join("vms");
        std::fs::create_dir_all(&dir).map_err(|source| RegistryError::Write { path: dir.clone(), source })?;
        Ok(Registry { dir })
    }

    /// The VM's own directory.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Every record on disk, by name.
    pub fn load(&self) -> Result<BTreeMap<String, VmRecord>, RegistryError> {
        let mut records = BTreeMap::new();
        let entries =
            std::fs::read_dir(&self.dir).map_err(|source| RegistryError::Read { path: self.dir.clone(), source })?;
        for entry in entries {
            let entry = entry.map_err(|source| RegistryError::Read { path: self.dir.clone(), source })?;
            let path = entry.path().join("vm.json");
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                // A directory whose record was never written: a Create that did not finish.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(RegistryError::Read { path, source }),
            };
            let record: VmRecord = serde_json::from_str(&text)
                .map_err(|err| RegistryError::Damaged { path: path.clone(), reason: err.to_string() })?;
            records.insert(record.name.clone(), record);
        }
        Ok(records)
    }

    /// Writes `record` atomically and durably.
    pub fn save(&self, record: &VmRecord) -> Result<(), RegistryError> {
        self.write(record, true)
    }

    /// Writes `record` atomically, without waiting for the disk: for a change that a power
    /// loss makes moot, such as the pid of a VMM just started (no VMM outlives the host),
    /// and that a crash of the daemon alone must not tear.
    pub fn update(&self, record: &VmRecord) -> Result<(), RegistryError> {
        self.write(record, false)
    }

    fn write(&self, record: &VmRecord, durably: bool) -> Result<(), RegistryError> {
        let dir = self.vm_dir(&record.name);
        let path = dir.join("vm.json");
        let fail = |source| RegistryError::Write { path: path.clone(), source };
        std::fs::create_dir_all(&dir).map_err(fail)?;
        let temporary = dir.join("vm.json.tmp");
        let text = serde_json::to_string_pretty(record).expect("a record always serializes");
        let mut file = std::fs::File::create(&temporary).map_err(fail)?;
        file.write_all(text.as_bytes()).map_err(fail)?;
        if durably {
            file.sync_all().map_err(fail)?;
        }
        std::fs::rename(&temporary, &path).map_err(fail)?;
        if durably {
            std::fs::File::open(&dir).and_then(|dir| dir.sync_all()).map_err(fail)?;
        }
        Ok(())
    }

    /// Removes the VM's directory and everything in it.
    pub fn remove(&self, name: &str) -> Result<(), RegistryError> {
        let dir = self.vm_dir(name);
        std::fs::remove_dir_all(&dir).map_err(|source| RegistryError::Write { path: dir, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> VmRecord {
        VmRecord {
            name: name.into(),
            owner_uid: 1000,
            spec: VmSpec {
                kernel: "desk.elf".into(),
                memory_mib: 128,
                cpus: 1,
                display: "1280x800".into(),
                cmdline: None,
                disks: Vec::new(),
                max_restarts: 5,
                watchdog_seconds: 0,
                memory_limit_mib: None,
                disk_bytes_per_second: 0,
                disk_iops: 0,
                idle_hibernate_seconds: 0,
                template: None,
                checkpoint_seconds: 0,
                keep_checkpoints: 0,
            },
            pid: Some(42),
            jail_uid: Some(200_000),
            snapshots: Vec::new(),
            hibernated: None,
            parent: None,
            stopped: false,
            exit_reason: None,
            restarts: 0,
        }
    }

    #[test]
    fn pruning_keeps_the_newest_checkpoints_user_snapshots_and_every_parent_they_need() {
        let snapshot = |id: &str, parent: Option<&str>, checkpoint| SnapshotRecord {
            id: id.into(),
            diff: parent.is_some(),
            parent: parent.map(str::to_string),
            checkpoint,
            memory_bytes: 0,
            disk_bytes: 0,
            paused_us: 0,
            unix_time: 0,
        };
        let mut vm = record("vm");
        vm.snapshots = vec![
            snapshot("s1", None, true),
            snapshot("s2", Some("s1"), true),
            snapshot("s3", None, false),
            snapshot("s4", Some("s3"), true),
            snapshot("s5", Some("s4"), true),
            snapshot("s6", None, true),
            snapshot("s7", Some("s6"), true),
        ];
        // The newest two (s6, s7) and the user's s3 stay; s1, s2, s4, s5 go.
        assert_eq!(vm.prunable_checkpoints(2), ["s1", "s2", "s4", "s5"]);
        // s5 kept makes s4 (its parent) stay too.
        assert_eq!(vm.prunable_checkpoints(3), ["s1", "s2"]);
        // Asleep in s2: s2 and s1 under it stay.
        vm.hibernated = Some("s2".into());
        assert_eq!(vm.prunable_checkpoints(2), ["s4", "s5"]);
        assert_eq!(vm.last_checkpoint().unwrap().id, "s7");
    }

    #[test]
    fn records_round_trip_and_a_damaged_one_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        registry.save(&record("a")).unwrap();
        registry.save(&record("b")).unwrap();
        let loaded = registry.load().unwrap();
        assert_eq!(loaded.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(loaded["a"], record("a"));
        registry.remove("a").unwrap();
        assert_eq!(registry.load().unwrap().len(), 1);
        std::fs::write(registry.vm_dir("b").join("vm.json"), "{ not json").unwrap();
        assert!(matches!(registry.load(), Err(RegistryError::Damaged { .. })));
    }

    #[test]
    fn names_are_short_lowercase_words() {
        assert!(valid_name("agent-7"));
        assert!(!valid_name(""));
        assert!(!valid_name("-x"));
        assert!(!valid_name("Agent"));
        assert!(!valid_name("../etc"));
        assert!(!valid_name(&"a".repeat(64)));
    }
}

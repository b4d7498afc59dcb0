//! Templates: a snapshot of a booted, ready VM that new VMs start from instead of a cold
//! boot. Each is a directory `<state>/templates/<name>/` holding `template.json` (who made
//! it, from which VM, its machine) and `snapshot/`, hard links to the files of the
//! source VM's full snapshot (a copy where links cannot be made), readable by every jail
//! uid and written by none: a VM restores it read-only, lazily, with its own identity.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors of the template store.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("no template named {0:?}")]
    NotFound(String),
    #[error("a template named {0:?} exists")]
    Exists(String),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// What a template is, beside its snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub name: String,
    pub owner_uid: u32,
    pub from_vm: String,
    pub memory_mib: u64,
    pub cpus: u32,
    pub display: String,
    pub kernel: PathBuf,
    /// Guest memory its snapshot holds.
    pub memory_bytes: u64,
    pub unix_time: i64,
    /// Its VM's disks, in order: a VM from the template gets a top layer of its own over
    /// each writable one's frozen layers, and the read-only ones as they are.
    #[serde(default)]
    pub disks: Vec<crate::registry::DiskRecord>,
    /// The directories of those frozen layers, and of the layers under them.
    #[serde(default)]
    pub layer_dirs: Vec<PathBuf>,
}

/// The templates under the daemon's state directory.
#[derive(Debug)]
pub struct Templates {
    dir: PathBuf,
}

impl Templates {
    pub fn open(state: &Path) -> Result<Templates, TemplateError> {
        let dir = state.join("templates");
        std::fs::create_dir_all(&dir).map_err(|source| TemplateError::Write { path: dir.clone(), source })?;
        Ok(Templates { dir })
    }

    /// The snapshot a VM made from template `name` restores.
    pub fn snapshot(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("snapshot")
    }

    /// Makes template `record` from the snapshot in `source`: its files are linked (or
    /// copied) under a temporary name, made read-only for all, then the directory is
    /// renamed into place, so a half-made template is never seen.
    pub fn create(&self, record: &TemplateRecord, source: &Path) -> Result<(), TemplateError> {
        use std::os::unix::fs::PermissionsExt;
        let target = self.dir.join(&record.name);
        if target.exists() {
            return Err(TemplateError::Exists(record.name.clone()));
        }
        let temporary = self.dir.join(format!(".{}.tmp", record.name));
        let _ = std::fs::remove_dir_all(&temporary);
        let write = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TemplateError::Write { path, source }
        };
        let snapshot = temporary.join("snapshot");
        std::fs::create_dir_all(&snapshot).map_err(write(&snapshot))?;
        for entry in
            std::fs::read_dir(source).map_err(|err| TemplateError::Read { path: source.into(), source: err })?
        {
            let entry = entry.map_err(|err| TemplateError::Read { path: source.into(), source: err })?;
            let to = snapshot.join(entry.file_name());
            if std::fs::hard_link(entry.path(), &to).is_err() {
                std::fs::copy(entry.path(), &to).map_err(write(&to))?;
            }
            std::os::unix::fs::chown(&to, Some(0), Some(0)).map_err(write(&to))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o444)).map_err(write(&to))?;
        }
        let json = serde_json::to_vec_pretty(record).expect("a template record always serializes");
        let path = temporary.join("template.json");
        std::fs::write(&path, json).map_err(write(&path))?;
        for dir in [&temporary, &snapshot] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(write(dir))?;
        }
        std::fs::File::open(&temporary).and_then(|dir| dir.sync_all()).map_err(write(&temporary))?;
        std::fs::rename(&temporary, &target).map_err(write(&target))
    }

    pub fn get(&self, name: &str) -> Result<TemplateRecord, TemplateError> {
        let path = self.dir.join(name).join("template.json");
        let bytes = std::fs::read(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => TemplateError::NotFound(name.into()),
            _ => TemplateError::Read { path: path.clone(), source },
        })?;
        serde_json::from_slice(&bytes).map_err(|err| TemplateError::Read { path, source: std::io::Error::other(err) })
    }

    /// Every template, by name; a damaged one is left out.
    pub fn list(&self) -> Vec<TemplateRecord> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|name| !name.starts_with('.'))
            .collect();
        names.sort();
        names.iter().filter_map(|name| self.get(name).ok()).collect()
    }

    pub fn remove(&self, name: &str) -> Result<(), TemplateError> {
        self.get(name)?;
        let dir = self.dir.join(name);
        std::fs::remove_dir_all(&dir).map_err(|source| TemplateError::Write { path: dir, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> TemplateRecord {
        TemplateRecord {
            name: name.into(),
            owner_uid: 1000,
            from_vm: "base".into(),
            memory_mib: 128,
            cpus: 1,
            display: "1280x800".into(),
            kernel: "desk.elf".into(),
            memory_bytes: 8 << 20,
            unix_time: 1,
            disks: Vec::new(),
            layer_dirs: Vec::new(),
        }
    }

    #[test]
    fn a_template_links_its_snapshot_read_only_and_is_listed_until_removed() {
        use std::os::unix::fs::PermissionsExt;
        let state = tempfile::tempdir().unwrap();
        let source = state.path().join("s1");
        std::fs::create_dir(&source).unwrap();
        std::fs::write(source.join("memory.bin"), b"memory").unwrap();
        std::fs::write(source.join("state.bin"), b"state").unwrap();
        let templates = Templates::open(state.path()).unwrap();
        templates.create(&record("desk"), &source).unwrap();
        let memory = templates.snapshot("desk").join("memory.bin");
        assert_eq!(std::fs::read(&memory).unwrap(), b"memory");
        assert_eq!(std::fs::metadata(&memory).unwrap().permissions().mode() & 0o777, 0o444);
        assert_eq!(templates.list(), vec![record("desk")]);
        assert!(matches!(templates.create(&record("desk"), &source), Err(TemplateError::Exists(_))));
        templates.remove("desk").unwrap();
        assert!(matches!(templates.get("desk"), Err(TemplateError::NotFound(_))));
        assert!(templates.list().is_empty());
    }
}

//! Snapshots: a paused VM as a directory, and back (shared/DESIGN.md).
//!
//! ```text
//! <dir>/vm.json     the VM's configuration, readable
//! <dir>/memory.bin  guest RAM, sparse, written with io_uring (memory.rs)
//! <dir>/state.bin   vCPUs, irqchip, clock and devices, with a digest (format.rs)
//! ```
//!
//! A snapshot is written into a temporary sibling directory, every file fsynced, then
//! renamed into place: a crash or a full disk midway leaves no directory under the
//! snapshot's name, and an existing snapshot is never overwritten. A restore reads the
//! files and changes none of them.
//!
//! A diff snapshot's `memory.bin` holds only what changed since its parent, which it
//! names by directory and `state.bin` digest; a restore loads the chain from its full
//! root, and [`merge`] folds a chain into one full snapshot.

pub mod format;
pub mod lazy;
pub mod memory;
pub mod screen;
pub mod shown;
mod uffd;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::boot::BootProtocol;
use crate::config::VmConfig;
use crate::devices::legacy::SerialSaved;
use crate::devices::virtio::persist::MmioState;
use crate::memory::GuestRam;
use crate::vstate::persist::{VcpuState, VmState};
use carrel_firmware::PlatformKind;
use memory::{DirtyPages, MemoryFileError, MemoryImage, Parent};

pub const CONFIG_FILE: &str = "vm.json";
pub const STATE_FILE: &str = "state.bin";
pub const MEMORY_FILE: &str = "memory.bin";

/// Errors taking or loading a snapshot. Each says which file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path} already exists: pick a new directory (snapshots are never overwritten)")]
    Exists { path: String },
    #[error("cannot create the snapshot next to {path}: {source}")]
    CreateDir { path: String, source: std::io::Error },
    #[error("not enough disk space for the snapshot at {path}: {needed} bytes needed, {free} free")]
    NoSpace { path: String, needed: u64, free: u64 },
    #[error("cannot write {path}: {source}")]
    WriteFile { path: String, source: std::io::Error },
    #[error("cannot read {path}: {source}")]
    ReadFile { path: String, source: std::io::Error },
    #[error("{path} is refused: {source}")]
    State { path: String, source: format::FormatError },
    #[error("{path} is not a valid VM configuration: {message}")]
    Config { path: String, message: String },
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    #[error(transparent)]
    Lazy(#[from] lazy::LazyError),
    #[error("the saved state does not match its configuration: {0}")]
    Mismatch(String),
    #[error("{path} is a diff over {parent}, which cannot be used: {reason}")]
    Parent { path: String, parent: String, reason: String },
    #[error("{path} is a diff chain deeper than {MAX_CHAIN} snapshots: merge it (carrel-vmm snapshot merge)")]
    ChainTooLong { path: String },
    #[error("cannot set up memory to merge {path} into: {reason}")]
    MergeMemory { path: String, reason: String },
}

/// The most snapshots a diff chain may hold, its full root included.
pub const MAX_CHAIN: usize = 64;

/// Everything of a VM but its memory, as saved in `state.bin`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    pub protocol: BootProtocol,
    /// How many restores led to this state; the restored guest is told the next count.
    pub restores: u64,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSaved,
    /// One per virtio device, in the order the builder attaches them.
    pub virtio: Vec<MmioState>,
    pub memory: MemoryImage,
}

impl SnapshotState {
    /// The saved state of the VM's screen, if it has one.
    pub fn gpu(&self) -> Option<&crate::devices::virtio::gpu::GpuDeviceState> {
        self.virtio.iter().find_map(|device| match &device.device {
            crate::devices::virtio::persist::VirtioDeviceState::Gpu(state) => Some(state),
            _ => None,
        })
    }

    /// The RAM (memfd offset, length) that other mappings than the guest's read: the GPU
    /// resources' backing, which the screen views in place; the scanout's first.
    pub fn viewed_ram(&self) -> Vec<(u64, u64)> {
        let Some(gpu) = self.gpu().map(|state| &state.gpu) else { return Vec::new() };
        // The scanout's pixels first: the first screenshot after a restore waits for them.
        let scanout = gpu.scanout.map(|(resource_id, ..)| resource_id);
        let mut resources: Vec<_> = gpu.resources.iter().collect();
        resources.sort_by_key(|resource| Some(resource.resource_id) != scanout);
        resources
            .into_iter()
            .flat_map(|resource| resource.backing.iter().flatten())
            .filter_map(|&(gpa, len)| Some((crate::memory::ram_offset(gpa, self.memory.size)?, u64::from(len))))
            .collect()
    }
}

/// What taking a snapshot did, for the caller and the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub dir: PathBuf,
    /// Guest RAM written (data chunks), and the files' bytes on disk.
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    /// blake3 of state.bin, hex: the snapshot's name in a diff chain and the audit log.
    pub digest: String,
    /// Time with the vCPUs paused, and of the memory write alone.
    pub paused_us: u64,
    pub memory_write_us: u64,
    /// For a diff: its parent's digest, hex.
    pub parent: Option<String>,
}

/// A snapshot read back and checked.
#[derive(Debug)]
pub struct LoadedSnapshot {
    pub dir: PathBuf,
    pub config: VmConfig,
    pub state: SnapshotState,
    /// The KVM platform the vCPU state was taken on.
    pub platform: PlatformKind,
    pub digest: [u8; 32],
}

/// Lowercase hex, as digests are shown and logged.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let text = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs is plain data, filled by the call.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    if unsafe { libc::statvfs(text.as_ptr(), &mut stats) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stats.f_bavail * stats.f_frsize)
}

fn fsync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let error = |source| SnapshotError::WriteFile { path: path.display().to_string(), source };
    let mut file = File::create_new(path).map_err(error)?;
    file.write_all(bytes).map_err(error)?;
    file.sync_all().map_err(error)
}

/// Guest RAM bytes a snapshot of `ram` will write at most: its data extents.
pub fn memory_bytes_needed(ram: &GuestRam) -> Result<u64, SnapshotError> {
    let extents = memory::data_extents(&ram.memfd, ram.size).map_err(MemoryFileError::Extents)?;
    Ok(extents.iter().map(|(_, len)| len).sum())
}

/// Writes a snapshot of a paused VM to `dir`, all or nothing: a full one, or with `diff`
/// only the pages it marks, over its parent. `progress` hears (bytes of memory looked
/// at, bytes to look at) as the memory is written. Returns what was written and the new
/// snapshot as the parent of a diff over it.
#[allow(clippy::too_many_arguments)] // each is one part of the snapshot being written
pub fn write_snapshot(
    dir: &Path,
    config: &VmConfig,
    platform: PlatformKind,
    ram: &GuestRam,
    mut state: SnapshotState,
    paused_at: Instant,
    diff: Option<(&DirtyPages, Parent)>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(SnapshotInfo, Parent), SnapshotError> {
    let name = dir.display().to_string();
    if dir.exists() {
        return Err(SnapshotError::Exists { path: name });
    }
    let parent = match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let memory_bytes = match &diff {
        Some((dirty, _)) => memory::dirty_bytes(ram, dirty),
        None => memory_bytes_needed(ram)?,
    };
    let needed = memory_bytes + (1 << 20);
    let free = free_bytes(&parent).map_err(|source| SnapshotError::CreateDir { path: name.clone(), source })?;
    if needed > free {
        return Err(SnapshotError::NoSpace { path: name, needed, free });
    }
    let file_name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "snapshot".into());
    let temporary = parent.join(format!(".{file_name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&temporary);
    std::fs::create_dir(&temporary).map_err(|source| SnapshotError::CreateDir { path: name.clone(), source })?;
    let result = write_files(&temporary, config, platform, ram, &mut state, paused_at, diff, progress);
    let (info, digest) = match result {
        Ok(written) => written,
        Err(err) => {
            let _ = std::fs::remove_dir_all(&temporary);
            return Err(err);
        }
    };
    let renamed =
        fsync_dir(&temporary).and_then(|()| std::fs::rename(&temporary, dir)).and_then(|()| fsync_dir(&parent));
    if let Err(source) = renamed {
        let _ = std::fs::remove_dir_all(&temporary);
        return Err(SnapshotError::WriteFile { path: name, source });
    }
    Ok((SnapshotInfo { dir: dir.to_path_buf(), ..info }, Parent::new(dir, digest)))
}

#[allow(clippy::too_many_arguments)] // each is one part of the snapshot being written
fn write_files(
    temporary: &Path,
    config: &VmConfig,
    platform: PlatformKind,
    ram: &GuestRam,
    state: &mut SnapshotState,
    paused_at: Instant,
    diff: Option<(&DirtyPages, Parent)>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(SnapshotInfo, [u8; 32]), SnapshotError> {
    let started = Instant::now();
    state.memory = memory::write_image_with_progress(ram, &temporary.join(MEMORY_FILE), diff, progress)?;
    let memory_write_us = started.elapsed().as_micros() as u64;
    let json = serde_json::to_vec_pretty(config)
        .map_err(|err| SnapshotError::Config { path: CONFIG_FILE.into(), message: err.to_string() })?;
    write_synced(&temporary.join(CONFIG_FILE), &json)?;
    // The state goes last: its digest covers the memory map, and a directory without a
    // whole state.bin is never taken for a snapshot.
    let encoded =
        format::encode(platform, &*state).map_err(|source| SnapshotError::State { path: STATE_FILE.into(), source })?;
    write_synced(&temporary.join(STATE_FILE), &encoded)?;
    let memory_bytes = state.memory.data_bytes();
    let digest = format::digest_of(&encoded);
    let info = SnapshotInfo {
        dir: temporary.to_path_buf(),
        memory_bytes,
        disk_bytes: memory_bytes + json.len() as u64 + encoded.len() as u64,
        digest: hex(&digest),
        paused_us: paused_at.elapsed().as_micros() as u64,
        memory_write_us,
        parent: state.memory.parent.as_ref().map(|parent| hex(&parent.digest)),
    };
    Ok((info, digest))
}

/// Reads and checks a snapshot's configuration and state (memory is loaded by the
/// restore builder, into the new VM's RAM).
pub fn load_snapshot(dir: &Path) -> Result<LoadedSnapshot, SnapshotError> {
    let config = read_config(dir)?;
    let bytes = read_file(dir, STATE_FILE)?;
    let state_path = dir.join(STATE_FILE).display().to_string();
    let (platform, state): (PlatformKind, SnapshotState) =
        format::decode(&bytes).map_err(|source| SnapshotError::State { path: state_path, source })?;
    if state.memory.size != config.mem_mib << 20 {
        return Err(SnapshotError::Mismatch(format!(
            "memory map of {} bytes, configuration of {} MiB",
            state.memory.size, config.mem_mib
        )));
    }
    if state.vcpus.len() as u64 != config.cpus {
        return Err(SnapshotError::Mismatch(format!("{} vCPUs saved, {} configured", state.vcpus.len(), config.cpus)));
    }
    Ok(LoadedSnapshot { dir: dir.to_path_buf(), config, state, platform, digest: format::digest_of(&bytes) })
}

fn read_file(dir: &Path, file: &str) -> Result<Vec<u8>, SnapshotError> {
    let path = dir.join(file);
    std::fs::read(&path).map_err(|source| SnapshotError::ReadFile { path: path.display().to_string(), source })
}

/// The checked configuration of the snapshot in `dir` (its `vm.json`) alone: what a
/// jailed restore reads before it enters its jail, to know which files the jail needs.
pub fn read_config(dir: &Path) -> Result<VmConfig, SnapshotError> {
    let config_path = dir.join(CONFIG_FILE).display().to_string();
    let config: VmConfig = serde_json::from_slice(&read_file(dir, CONFIG_FILE)?)
        .map_err(|err| SnapshotError::Config { path: config_path.clone(), message: err.to_string() })?;
    config.validate_machine().map_err(|err| SnapshotError::Config { path: config_path, message: err.to_string() })?;
    Ok(config)
}

/// Where `parent` of the diff in `child` is: where it was when the diff was taken, or,
/// when a set of snapshots moved together, beside the diff under the same name.
fn find_parent(child: &Path, parent: &Parent) -> PathBuf {
    if parent.dir.join(STATE_FILE).exists() {
        return parent.dir.clone();
    }
    match (child.parent(), parent.dir.file_name()) {
        (Some(beside), Some(name)) if beside.join(name).join(STATE_FILE).exists() => beside.join(name),
        _ => parent.dir.clone(),
    }
}

/// The snapshots a diff applies over, its full root first; empty for a full snapshot.
/// Each parent must be there, unchanged (its digest), and of the same machine.
pub fn load_parents(snapshot: &LoadedSnapshot) -> Result<Vec<LoadedSnapshot>, SnapshotError> {
    let mut chain: Vec<LoadedSnapshot> = Vec::new();
    let mut next = snapshot.state.memory.parent.clone().map(|parent| (snapshot.dir.clone(), parent));
    while let Some((child, parent)) = next {
        if chain.len() + 1 >= MAX_CHAIN {
            return Err(SnapshotError::ChainTooLong { path: snapshot.dir.display().to_string() });
        }
        let refused = |reason: String| SnapshotError::Parent {
            path: child.display().to_string(),
            parent: parent.dir.display().to_string(),
            reason,
        };
        let loaded = load_snapshot(&find_parent(&child, &parent)).map_err(|err| refused(err.to_string()))?;
        if loaded.digest != parent.digest {
            return Err(refused(format!(
                "its state.bin digest is {}, the diff was taken over {}",
                hex(&loaded.digest),
                hex(&parent.digest)
            )));
        }
        if loaded.config.mem_mib != snapshot.config.mem_mib || loaded.platform != snapshot.platform {
            return Err(refused("it is of another machine (memory size or KVM platform)".into()));
        }
        next = loaded.state.memory.parent.clone().map(|grandparent| (loaded.dir.clone(), grandparent));
        chain.push(loaded);
    }
    chain.reverse();
    Ok(chain)
}

/// The snapshots whose memory makes up `snapshot`'s, root first: its parents, then itself.
pub fn layers<'a>(
    snapshot: &'a LoadedSnapshot,
    parents: &'a [LoadedSnapshot],
) -> impl Iterator<Item = &'a LoadedSnapshot> {
    parents.iter().chain(std::iter::once(snapshot))
}

/// Loads the memory of `snapshot` into fresh RAM: its parents' first, root first.
pub fn read_memory(ram: &GuestRam, snapshot: &LoadedSnapshot, parents: &[LoadedSnapshot]) -> Result<(), SnapshotError> {
    for layer in layers(snapshot, parents) {
        memory::read_image(ram, &layer.dir.join(MEMORY_FILE), &layer.state.memory)?;
    }
    Ok(())
}

/// Folds the diff chain ending in `dir` into one full snapshot at `out`, which restores
/// exactly as `dir` does. `dir` and its parents are only read.
pub fn merge(dir: &Path, out: &Path) -> Result<SnapshotInfo, SnapshotError> {
    let started = Instant::now();
    let snapshot = load_snapshot(dir)?;
    let parents = load_parents(&snapshot)?;
    let ram = crate::memory::create_guest_ram(snapshot.config.mem_mib)
        .map_err(|err| SnapshotError::MergeMemory { path: dir.display().to_string(), reason: err.to_string() })?;
    read_memory(&ram, &snapshot, &parents)?;
    let LoadedSnapshot { config, mut state, platform, .. } = snapshot;
    state.memory = MemoryImage::empty(ram.size);
    let (info, _) = write_snapshot(out, &config, platform, &ram, state, started, None, &mut progress_line(out))?;
    // The chain's screen is its newest link's.
    if let Some(shown) = shown::Shown::read(dir) {
        shown.keep(out);
    }
    Ok(info)
}

/// How far the snapshot this process is writing has got, for the control socket's
/// `SnapshotProgress` (its connection threads read it while the VMM thread writes): one
/// VMM writes one snapshot at a time.
static PROGRESS: Progress = Progress {
    writing: std::sync::atomic::AtomicBool::new(false),
    done: std::sync::atomic::AtomicU64::new(0),
    total: std::sync::atomic::AtomicU64::new(0),
};

#[derive(Debug)]
struct Progress {
    writing: std::sync::atomic::AtomicBool,
    done: std::sync::atomic::AtomicU64,
    total: std::sync::atomic::AtomicU64,
}

/// Marks a snapshot as being written until it is dropped.
#[derive(Debug)]
struct Writing;

impl Writing {
    fn begin() -> Writing {
        use std::sync::atomic::Ordering::Relaxed;
        PROGRESS.done.store(0, Relaxed);
        PROGRESS.total.store(0, Relaxed);
        PROGRESS.writing.store(true, Relaxed);
        Writing
    }

    fn report(&self, done: u64, total: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        PROGRESS.total.store(total, Relaxed);
        PROGRESS.done.store(done, Relaxed);
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        PROGRESS.writing.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The snapshot being written now, if one is: (bytes of guest memory looked at, bytes to
/// look at). Both are 0 until its memory image begins.
pub fn progress() -> Option<(u64, u64)> {
    use std::sync::atomic::Ordering::Relaxed;
    PROGRESS.writing.load(Relaxed).then(|| (PROGRESS.done.load(Relaxed), PROGRESS.total.load(Relaxed)))
}

/// A progress report for long snapshots: one stderr line at most every half second, and
/// [`progress`] for the control socket while the snapshot is written.
pub fn progress_line(dir: &Path) -> impl FnMut(u64, u64) + '_ {
    let mut last = Instant::now();
    let writing = Writing::begin();
    move |done, total| {
        writing.report(done, total);
        if last.elapsed() >= std::time::Duration::from_millis(500) && done < total {
            last = Instant::now();
            eprintln!("carrel-vmm: snapshot {}: {} of {} MiB", dir.display(), done >> 20, total >> 20);
        }
    }
}

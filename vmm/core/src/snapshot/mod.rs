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

pub mod format;
pub mod memory;
pub mod screen;

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
use memory::{MemoryFileError, MemoryImage};

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
    #[error("the saved state does not match its configuration: {0}")]
    Mismatch(String),
}

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

/// Writes a snapshot of a paused VM to `dir`, all or nothing.
pub fn write_snapshot(
    dir: &Path,
    config: &VmConfig,
    platform: PlatformKind,
    ram: &GuestRam,
    mut state: SnapshotState,
    paused_at: Instant,
) -> Result<SnapshotInfo, SnapshotError> {
    let name = dir.display().to_string();
    if dir.exists() {
        return Err(SnapshotError::Exists { path: name });
    }
    let parent = match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let needed = memory_bytes_needed(ram)? + (1 << 20);
    let free = free_bytes(&parent).map_err(|source| SnapshotError::CreateDir { path: name.clone(), source })?;
    if needed > free {
        return Err(SnapshotError::NoSpace { path: name, needed, free });
    }
    let file_name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "snapshot".into());
    let temporary = parent.join(format!(".{file_name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&temporary);
    std::fs::create_dir(&temporary).map_err(|source| SnapshotError::CreateDir { path: name.clone(), source })?;
    let result = write_files(&temporary, config, platform, ram, &mut state, paused_at);
    let info = match result {
        Ok(info) => info,
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
    Ok(SnapshotInfo { dir: dir.to_path_buf(), ..info })
}

fn write_files(
    temporary: &Path,
    config: &VmConfig,
    platform: PlatformKind,
    ram: &GuestRam,
    state: &mut SnapshotState,
    paused_at: Instant,
) -> Result<SnapshotInfo, SnapshotError> {
    let started = Instant::now();
    state.memory = memory::write_image(ram, &temporary.join(MEMORY_FILE))?;
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
    Ok(SnapshotInfo {
        dir: temporary.to_path_buf(),
        memory_bytes,
        disk_bytes: memory_bytes + json.len() as u64 + encoded.len() as u64,
        digest: hex(&format::digest_of(&encoded)),
        paused_us: paused_at.elapsed().as_micros() as u64,
        memory_write_us,
    })
}

/// Reads and checks a snapshot's configuration and state (memory is loaded by the
/// restore builder, into the new VM's RAM).
pub fn load_snapshot(dir: &Path) -> Result<LoadedSnapshot, SnapshotError> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read(&path).map_err(|source| SnapshotError::ReadFile { path: path.display().to_string(), source })
    };
    let config_path = dir.join(CONFIG_FILE).display().to_string();
    let config: VmConfig = serde_json::from_slice(&read(CONFIG_FILE)?)
        .map_err(|err| SnapshotError::Config { path: config_path.clone(), message: err.to_string() })?;
    config.validate_machine().map_err(|err| SnapshotError::Config { path: config_path, message: err.to_string() })?;
    let bytes = read(STATE_FILE)?;
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

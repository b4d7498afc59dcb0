//! A VM's disk as the block device sees it: a raw image, or a chain of layers over an
//! optional read-only raw base, where only the top layer is ever written.
//!
//! ```text
//! --disk agent.layer,base=debian.raw     agent.layer (top, written)
//!                                          -> agent.layer.frozen-<id> (a snapshot's)
//!                                          -> debian.raw (base, read-only)
//! ```
//!
//! A snapshot freezes the top in O(1): the top is committed, given a second name
//! (`<top>.frozen-<id>`), and a new empty top takes the configured path, so memory and
//! disk are saved at the same instant and no disk byte is copied. Frozen layers and the
//! base are opened read-only and locked shared; a writable top or raw image is locked
//! exclusively, so two VMs never write one file. [`commit`] folds a chain into one layer.

pub mod layer;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use layer::{Layer, LayerError, ParentRef, BLOCK_SIZE, MAGIC};

/// Longest chain of layers a disk may have.
pub const MAX_LAYERS: usize = 64;

/// Errors opening or changing a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("--disk {text:?}: {reason}")]
    Spec { text: String, reason: String },
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("disk {path} is in use by another VM (it is locked); stop that VM or give this one its own layer")]
    InUse { path: PathBuf },
    #[error("disk {path} was made over {recorded}, not {given}")]
    WrongBase { path: PathBuf, recorded: String, given: String },
    #[error("disk {path}: {reason}")]
    Chain { path: PathBuf, reason: String },
    #[error(
        "disk {path} is a raw image written in place: a snapshot cannot freeze it without a copy; \
         run with --disk LAYER,base={path} instead"
    )]
    RawSnapshot { path: PathBuf },
    #[error("cannot freeze disk {path} for the snapshot: {source}")]
    Freeze { path: PathBuf, source: io::Error },
    #[error("cannot fold disk {path}: {source}")]
    Fold { path: PathBuf, source: io::Error },
}

/// One `--disk` as given: `PATH[,readonly][,base=RAW][,size=N[K|M|G]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    /// A raw image the layer at `path` lies over (made if `path` does not exist).
    #[serde(default)]
    pub base: Option<PathBuf>,
    /// The size of a new disk made at `path` when it does not exist and has no base.
    #[serde(default)]
    pub size: Option<u64>,
}

/// Parses a size such as `4096`, `64K`, `512M` or `8G`.
pub fn parse_size(text: &str) -> Option<u64> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let shift = match unit {
        "" => 0,
        "K" | "k" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

impl std::str::FromStr for DiskSpec {
    type Err = DiskError;

    fn from_str(text: &str) -> Result<DiskSpec, DiskError> {
        let bad = |reason: String| DiskError::Spec { text: text.to_string(), reason };
        let mut parts = text.split(',');
        let path = parts.next().filter(|path| !path.is_empty()).ok_or_else(|| bad("no path".into()))?;
        let mut spec = DiskSpec { path: path.into(), readonly: false, base: None, size: None };
        for part in parts {
            match part.split_once('=') {
                None if part == "readonly" || part == "ro" => spec.readonly = true,
                Some(("base", base)) if !base.is_empty() => spec.base = Some(base.into()),
                Some(("size", size)) => {
                    spec.size = Some(parse_size(size).ok_or_else(|| bad(format!("size {size:?} is not e.g. 64M")))?)
                }
                _ => return Err(bad(format!("unknown option {part:?} (readonly, base=PATH, size=N)"))),
            }
        }
        Ok(spec)
    }
}

/// Where a stretch of the virtual disk is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Layer `i` of the chain (0 is the top).
    Layer(usize),
    Base,
    /// Not written anywhere: reads as zeros.
    Zero,
}

/// A stretch of a read: `len` bytes at virtual `offset` from `source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub source: Source,
    pub offset: u64,
    pub len: u64,
}

/// A raw image: the base of a chain, or the whole disk.
#[derive(Debug)]
struct Raw {
    file: File,
    path: PathBuf,
    size: u64,
    writable: bool,
}

/// A disk's layers as saved in a snapshot: the frozen chain, not the live top.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    pub capacity: u64,
    pub readonly: bool,
    /// The frozen layers, top first, each by path and id.
    pub layers: Vec<(PathBuf, [u8; 16])>,
    /// The raw base (or read-only raw disk) and its size.
    pub base: Option<(PathBuf, u64)>,
}

/// A flush as steps an I/O engine runs in order, each after the previous succeeded:
/// sync `fd`'s data (after every write submitted before it), then, when the top layer's
/// index changed, write `index` (slot bytes, file offset) and sync again.
#[derive(Debug)]
pub struct FlushPlan {
    pub fd: RawFd,
    pub index: Option<(Vec<u8>, u64)>,
}

/// An open disk.
#[derive(Debug)]
pub struct Disk {
    /// Top first; when writable and layered, `layers[0]` is the one written.
    layers: Vec<Layer>,
    base: Option<Raw>,
    capacity: u64,
    readonly: bool,
    /// The path the top layer is known by (the configured path).
    top_path: PathBuf,
}

/// How long a lock held by a VMM that just ended may take to go: the kernel tears down
/// a dead process's io_uring, and the file references its requests held, after the
/// process is gone.
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

fn lock(file: &File, exclusive: bool, path: &Path) -> Result<(), DiskError> {
    let kind = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
    let deadline = std::time::Instant::now() + LOCK_GRACE;
    loop {
        // SAFETY: flock on an fd this function borrows.
        if unsafe { libc::flock(file.as_raw_fd(), kind | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(DiskError::Open { path: path.to_path_buf(), source: err });
        }
        if std::time::Instant::now() >= deadline {
            return Err(DiskError::InUse { path: path.to_path_buf() });
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn is_layer(path: &Path) -> Result<bool, DiskError> {
    let file = File::open(path).map_err(|source| DiskError::Open { path: path.to_path_buf(), source })?;
    let mut magic = [0u8; 8];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) => Ok(magic == MAGIC),
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(source) => Err(DiskError::Open { path: path.to_path_buf(), source }),
    }
}

fn open_raw(path: &Path, writable: bool) -> Result<Raw, DiskError> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|source| DiskError::Open { path: path.to_path_buf(), source })?;
    lock(&file, writable, path)?;
    let size = file.metadata().map_err(|source| DiskError::Open { path: path.to_path_buf(), source })?.len();
    Ok(Raw { file, path: path.to_path_buf(), size, writable })
}

fn open_layer(path: &Path, writable: bool) -> Result<Layer, DiskError> {
    let layer = Layer::open(path, writable)?;
    lock(&layer.file, writable, path)?;
    Ok(layer)
}

fn fsync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

impl Disk {
    /// Opens (or makes) the disk `spec` describes.
    pub fn open(spec: &DiskSpec) -> Result<Disk, DiskError> {
        let path = &spec.path;
        let writable = !spec.readonly;
        if let Some(base) = &spec.base {
            if !path.exists() {
                if spec.readonly {
                    return Err(DiskError::Chain {
                        path: path.clone(),
                        reason: "does not exist, and a read-only disk is not made".into(),
                    });
                }
                let raw = open_raw(base, false)?;
                let capacity = raw.size.next_multiple_of(512).max(512);
                let parent = ParentRef::Raw { path: absolute(base), size: raw.size };
                let top = Layer::create(path, capacity, parent)?;
                lock(&top.file, true, path)?;
                return Ok(Disk {
                    layers: vec![top],
                    base: Some(raw),
                    capacity,
                    readonly: false,
                    top_path: path.clone(),
                });
            }
            let disk = Disk::open_chain(path, writable)?;
            let recorded = disk.base.as_ref().map(|raw| absolute(&raw.path));
            if recorded.as_deref() != Some(absolute(base).as_path()) {
                return Err(DiskError::WrongBase {
                    path: path.clone(),
                    recorded: recorded.map_or("no base".into(), |base| base.display().to_string()),
                    given: base.display().to_string(),
                });
            }
            return Ok(disk);
        }
        if !path.exists() {
            let size = spec.size.ok_or_else(|| DiskError::Chain {
                path: path.clone(),
                reason: "does not exist; give size=N to make an empty disk, or base=RAW to layer over an image".into(),
            })?;
            if spec.readonly {
                return Err(DiskError::Chain { path: path.clone(), reason: "does not exist".into() });
            }
            let top = Layer::create(path, size, ParentRef::None)?;
            lock(&top.file, true, path)?;
            return Ok(Disk { layers: vec![top], base: None, capacity: size, readonly: false, top_path: path.clone() });
        }
        if is_layer(path)? {
            return Disk::open_chain(path, writable);
        }
        let raw = open_raw(path, writable)?;
        if raw.size < 512 {
            return Err(DiskError::Chain { path: path.clone(), reason: "is smaller than one 512-byte sector".into() });
        }
        // A raw disk's last partial sector is not offered to the guest.
        let capacity = raw.size / 512 * 512;
        Ok(Disk { layers: Vec::new(), base: Some(raw), capacity, readonly: spec.readonly, top_path: path.clone() })
    }

    /// Opens the layer at `top` and every parent, checking each link by id and size.
    fn open_chain(top: &Path, writable: bool) -> Result<Disk, DiskError> {
        let first = open_layer(top, writable)?;
        let capacity = first.capacity();
        let mut layers = vec![first];
        loop {
            let last = layers.last().expect("the chain starts with the top");
            let chain_error = |reason: String| DiskError::Chain { path: last.path.clone(), reason };
            match last.header.parent.clone() {
                ParentRef::None => {
                    return Ok(Disk { layers, base: None, capacity, readonly: !writable, top_path: top.to_path_buf() })
                }
                ParentRef::Raw { path, size } => {
                    let raw = open_raw(&path, false)?;
                    if raw.size != size {
                        return Err(chain_error(format!(
                            "its base {} is {} bytes, it was made over {size}: the base changed",
                            path.display(),
                            raw.size
                        )));
                    }
                    return Ok(Disk {
                        layers,
                        base: Some(raw),
                        capacity,
                        readonly: !writable,
                        top_path: top.to_path_buf(),
                    });
                }
                ParentRef::Layer { path, id } => {
                    if layers.len() >= MAX_LAYERS {
                        return Err(chain_error(format!(
                            "the chain is longer than {MAX_LAYERS} layers: fold it with `carrel-vmm disk commit`"
                        )));
                    }
                    let parent = open_layer(&path, false)?;
                    if parent.id() != id {
                        return Err(chain_error(format!(
                            "its parent {} is not the layer it was made over",
                            path.display()
                        )));
                    }
                    if parent.capacity() != capacity {
                        return Err(chain_error(format!("its parent {} has another size", path.display())));
                    }
                    layers.push(parent);
                }
            }
        }
    }

    /// Opens the disk a snapshot saved and starts a new empty top at `spec.path` over
    /// it (a read-only disk opens as it was).
    pub fn restore(spec: &DiskSpec, state: &DiskState) -> Result<Disk, DiskError> {
        let chain = |reason: String| DiskError::Chain { path: spec.path.clone(), reason };
        if state.layers.is_empty() {
            let Some((path, size)) = &state.base else {
                return Err(chain("the snapshot names no layer and no base".into()));
            };
            if !state.readonly {
                return Err(chain("the snapshot names a writable raw disk, which snapshots never freeze".into()));
            }
            let raw = open_raw(path, false)?;
            if raw.size != *size {
                return Err(chain(format!("{} changed size since the snapshot", path.display())));
            }
            return Ok(Disk {
                layers: Vec::new(),
                capacity: state.capacity,
                base: Some(raw),
                readonly: true,
                top_path: path.clone(),
            });
        }
        let (frozen, id) = &state.layers[0];
        let mut disk = Disk::open_chain(frozen, false)?;
        let found: Vec<_> = disk.layers.iter().map(|layer| (layer.path.clone(), layer.id())).collect();
        let base = disk.base.as_ref().map(|raw| (raw.path.clone(), raw.size));
        if disk.layers[0].id() != *id || found != state.layers || base != state.base || disk.capacity != state.capacity
        {
            return Err(chain("the disk layers on the host are not the ones the snapshot saved".into()));
        }
        if state.readonly {
            disk.top_path = frozen.clone();
            return Ok(disk);
        }
        // The configured path may hold a newer top (the VM ran on after the snapshot): it
        // is replaced, unless a running VM holds it.
        if let Ok(current) = File::open(&spec.path) {
            lock(&current, true, &spec.path)?;
        }
        let parent = ParentRef::Layer { path: absolute(frozen), id: *id };
        let top = new_top(&spec.path, state.capacity, parent)?;
        disk.layers.insert(0, top);
        disk.readonly = false;
        disk.top_path = spec.path.clone();
        Ok(disk)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn is_readonly(&self) -> bool {
        self.readonly
    }

    pub fn path(&self) -> &Path {
        &self.top_path
    }

    /// A 20-byte serial for GET_ID: the top layer's id, or the raw image's name.
    pub fn serial(&self) -> [u8; 20] {
        let mut serial = [0u8; 20];
        let text = match self.layers.first() {
            Some(top) => top.id().iter().take(10).map(|byte| format!("{byte:02x}")).collect::<String>(),
            None => self.top_path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        let count = text.len().min(20);
        serial[..count].copy_from_slice(&text.as_bytes()[..count]);
        serial
    }

    fn block_source(&self, block: u64) -> Source {
        if let Some(index) = self.layers.iter().position(|layer| layer.has(block)) {
            return Source::Layer(index);
        }
        match &self.base {
            Some(raw) if block * BLOCK_SIZE < raw.size => Source::Base,
            _ => Source::Zero,
        }
    }

    /// Where each stretch of `offset..offset + len` is read from, in order; the range
    /// must lie within the capacity.
    pub fn plan_read(&self, offset: u64, len: u64) -> Vec<Extent> {
        let mut extents = Vec::new();
        self.plan_read_into(offset, len, &mut extents);
        extents
    }

    /// [`Disk::plan_read`] into a list the caller reuses (cleared first).
    pub fn plan_read_into(&self, offset: u64, len: u64, extents: &mut Vec<Extent>) {
        extents.clear();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let block = at / BLOCK_SIZE;
            let mut source = self.block_source(block);
            let mut stop = ((block + 1) * BLOCK_SIZE).min(end);
            if source == Source::Base {
                let base_end = self.base.as_ref().map_or(0, |raw| raw.size);
                if at >= base_end {
                    source = Source::Zero;
                } else {
                    stop = stop.min(base_end);
                }
            }
            match extents.last_mut() {
                Some(last) if last.source == source && last.offset + last.len == at => last.len += stop - at,
                _ => extents.push(Extent { source, offset: at, len: stop - at }),
            }
            at = stop;
        }
    }

    /// The fd and file offset an extent of [`Disk::plan_read`] is read at.
    pub fn read_target(&self, extent: &Extent) -> Option<(&File, u64)> {
        match extent.source {
            Source::Layer(index) => self.layers.get(index).map(|layer| (&layer.file, layer.data_offset(extent.offset))),
            Source::Base => self.base.as_ref().map(|raw| (&raw.file, extent.offset)),
            Source::Zero => None,
        }
    }

    /// Reads `buffer.len()` bytes at virtual `offset` synchronously (copy-up, folding).
    pub fn read_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        let mut filled = 0usize;
        for extent in self.plan_read(offset, buffer.len() as u64) {
            let part = &mut buffer[filled..filled + extent.len as usize];
            match self.read_target(&extent) {
                Some((file, at)) => file.read_exact_at(part, at)?,
                None => part.fill(0),
            }
            filled += extent.len as usize;
        }
        Ok(())
    }

    fn top_mut(&mut self) -> io::Result<&mut Layer> {
        match self.layers.first_mut() {
            Some(top) if top.is_writable() => Ok(top),
            _ => Err(io::Error::new(io::ErrorKind::PermissionDenied, "the disk is read-only")),
        }
    }

    /// Gets `offset..offset + len` ready to be written in place and says where: the top
    /// layer (partial blocks it does not hold yet are copied up first) or the raw image.
    /// Call [`Disk::written`] once the write succeeded.
    pub fn prepare_write(&mut self, offset: u64, len: u64) -> io::Result<(&File, u64)> {
        if self.readonly {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the disk is read-only"));
        }
        if self.layers.is_empty() {
            let raw =
                self.base.as_ref().filter(|raw| raw.writable).ok_or_else(|| io::Error::other("no writable image"))?;
            return Ok((&raw.file, offset));
        }
        let end = offset + len;
        let first = offset / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        for block in [first, last] {
            let start = block * BLOCK_SIZE;
            let covered = offset <= start && end >= start + BLOCK_SIZE;
            if !covered && !self.layers[0].has(block) {
                let mut bytes = vec![0u8; (BLOCK_SIZE.min(self.capacity - start)) as usize];
                self.read_at(&mut bytes, start)?;
                let top = self.top_mut()?;
                top.file.write_all_at(&bytes, top.data_offset(start))?;
                top.mark(block, 1);
            }
        }
        let top = self.top_mut()?;
        Ok((&top.file, top.data_offset(offset)))
    }

    /// Records a completed write of `offset..offset + len` in the top layer's index.
    pub fn written(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Ok(top) = self.top_mut() {
            let first = offset / BLOCK_SIZE;
            top.mark(first, (offset + len - 1) / BLOCK_SIZE + 1 - first);
        }
    }

    /// Makes `offset..offset + len` read as zeros, freeing the space where it can.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.layers.is_empty() {
            let (file, at) = self.prepare_write(offset, len)?;
            return punch_hole(file, at, len);
        }
        let end = offset + len;
        let first_full = offset.next_multiple_of(BLOCK_SIZE);
        let last_full = end / BLOCK_SIZE * BLOCK_SIZE;
        if first_full >= last_full {
            let zeros = vec![0u8; len as usize];
            let (file, at) = self.prepare_write(offset, len)?;
            file.write_all_at(&zeros, at)?;
            self.written(offset, len);
            return Ok(());
        }
        for (start, stop) in [(offset, first_full), (last_full, end)] {
            if stop > start {
                let zeros = vec![0u8; (stop - start) as usize];
                let (file, at) = self.prepare_write(start, stop - start)?;
                file.write_all_at(&zeros, at)?;
                self.written(start, stop - start);
            }
        }
        // Whole blocks: a hole in the top that the index claims reads as zeros.
        let top = self.top_mut()?;
        punch_hole(&top.file, top.data_offset(first_full), last_full - first_full)?;
        top.mark(first_full / BLOCK_SIZE, (last_full - first_full) / BLOCK_SIZE);
        Ok(())
    }

    /// What a flush must do, for an engine that runs it asynchronously: `None` when there
    /// is nothing to make durable (a read-only disk). See [`FlushPlan`].
    pub fn prepare_flush(&mut self) -> Option<FlushPlan> {
        if self.readonly {
            return None;
        }
        match self.layers.first_mut() {
            Some(top) if top.is_writable() => {
                let index = top.prepare_commit();
                Some(FlushPlan { fd: top.file().as_raw_fd(), index })
            }
            Some(_) => None,
            None => self
                .base
                .as_ref()
                .filter(|raw| raw.writable)
                .map(|raw| FlushPlan { fd: raw.file.as_raw_fd(), index: None }),
        }
    }

    /// A flush from [`Disk::prepare_flush`] failed: the next one writes the index again.
    pub fn flush_failed(&mut self) {
        if let Some(top) = self.layers.first_mut() {
            top.commit_failed();
        }
    }

    /// Makes every completed write durable: data first, then the index naming it.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        match self.layers.first_mut() {
            Some(top) => top.commit().map_err(io::Error::other),
            None => self.base.as_ref().map_or(Ok(()), |raw| raw.file.sync_data()),
        }
    }

    /// Freezes the top for a snapshot and puts a new empty top at the configured path;
    /// returns the frozen chain for the snapshot's state. A read-only disk is already
    /// frozen.
    pub fn freeze(&mut self) -> Result<DiskState, DiskError> {
        if self.readonly {
            return Ok(self.state());
        }
        if self.layers.is_empty() {
            return Err(DiskError::RawSnapshot { path: self.top_path.clone() });
        }
        let path = self.top_path.clone();
        let freeze_error = |source| DiskError::Freeze { path: path.clone(), source };
        self.layers[0].commit()?;
        let id = self.layers[0].id();
        let hex: String = id.iter().map(|byte| format!("{byte:02x}")).collect();
        let mut frozen_name = path.as_os_str().to_os_string();
        frozen_name.push(format!(".frozen-{hex}"));
        let frozen = absolute(Path::new(&frozen_name));
        // A second name first: a crash before the new top is in place leaves the old top
        // at the configured path, as if no snapshot had started.
        std::fs::hard_link(&path, &frozen).map_err(freeze_error)?;
        let top = match new_top(&path, self.capacity, ParentRef::Layer { path: frozen.clone(), id }) {
            Ok(top) => top,
            Err(err) => {
                let _ = std::fs::remove_file(&frozen);
                return Err(err);
            }
        };
        // The old top is read-only from now on: reopened so, and its mode says so.
        self.layers[0] = top;
        let reopened = open_layer(&frozen, false)?;
        let _ = std::fs::set_permissions(&frozen, std::fs::Permissions::from_mode(0o444));
        self.layers.insert(1, reopened);
        let mut state = self.state();
        state.readonly = false;
        Ok(state)
    }

    /// The chain below the live top (all of it for a read-only disk).
    pub fn state(&self) -> DiskState {
        let frozen = if self.readonly { &self.layers[..] } else { self.layers.get(1..).unwrap_or(&[]) };
        DiskState {
            capacity: self.capacity,
            readonly: self.readonly,
            layers: frozen.iter().map(|layer| (absolute(&layer.path), layer.id())).collect(),
            base: self.base.as_ref().map(|raw| (absolute(&raw.path), raw.size)),
        }
    }

    /// One line about the disk for `disk info` and the start-up banner.
    pub fn describe(&self) -> String {
        let held: u64 = self.layers.iter().map(Layer::blocks_held).sum();
        let base = match &self.base {
            Some(raw) if self.layers.is_empty() => format!("raw image {}", raw.path.display()),
            Some(raw) => format!("over base {}", raw.path.display()),
            None => "no base".into(),
        };
        format!(
            "{} MiB, {} layer(s), {} MiB written in layers, {base}{}",
            self.capacity >> 20,
            self.layers.len(),
            (held * BLOCK_SIZE) >> 20,
            if self.readonly { ", read-only" } else { "" }
        )
    }
}

/// A new empty layer made beside `path` and renamed over it (what was there is
/// replaced whole or not at all), locked for writing.
fn new_top(path: &Path, capacity: u64, parent: ParentRef) -> Result<Layer, DiskError> {
    let mut temporary = path.as_os_str().to_os_string();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let mut top = Layer::create(&temporary, capacity, parent)?;
    if let Err(source) = std::fs::rename(&temporary, path).and_then(|()| fsync_dir(path)) {
        let _ = std::fs::remove_file(&temporary);
        return Err(DiskError::Freeze { path: path.to_path_buf(), source });
    }
    lock(&top.file, true, path)?;
    top.path = path.to_path_buf();
    Ok(top)
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a borrowed fd; no memory is passed.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    // A filesystem without holes gets the zeros written.
    let zeros = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let count = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..count], offset + done)?;
        done += count as u64;
    }
    Ok(())
}

/// Folds the chain under the layer at `path` into one layer at `out` (or in place when
/// `out` is `None`) over the same raw base; frozen layers and the base are only read.
/// Returns the blocks the folded layer holds.
pub fn commit(path: &Path, out: Option<&Path>) -> Result<u64, DiskError> {
    let disk = Disk::open_chain(path, false)?;
    let target = out.unwrap_or(path);
    let fold_error = |source| DiskError::Fold { path: path.to_path_buf(), source };
    // The chain is locked shared while it is read: a VM writing the top holds it
    // exclusively, so folding a disk in use was refused above.
    if out.is_none() && disk.layers.len() == 1 {
        return Ok(disk.layers[0].blocks_held());
    }
    let parent = match &disk.base {
        Some(raw) => ParentRef::Raw { path: absolute(&raw.path), size: raw.size },
        None => ParentRef::None,
    };
    let mut temporary = target.as_os_str().to_os_string();
    temporary.push(".fold");
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let mut folded = Layer::create(&temporary, disk.capacity, parent)?;
    let blocks = disk.capacity.div_ceil(BLOCK_SIZE);
    let mut buffer = vec![0u8; BLOCK_SIZE as usize];
    let mut held = 0;
    let copied = (|| -> io::Result<()> {
        for block in 0..blocks {
            if let Source::Layer(_) = disk.block_source(block) {
                let start = block * BLOCK_SIZE;
                let len = BLOCK_SIZE.min(disk.capacity - start) as usize;
                disk.read_at(&mut buffer[..len], start)?;
                if buffer[..len].iter().any(|byte| *byte != 0) {
                    folded.file.write_all_at(&buffer[..len], folded.data_offset(start))?;
                }
                folded.mark(block, 1);
                held += 1;
            }
        }
        Ok(())
    })();
    let done = copied
        .map_err(fold_error)
        .and_then(|()| folded.commit().map_err(DiskError::from))
        .and_then(|()| std::fs::rename(&temporary, target).and_then(|()| fsync_dir(target)).map_err(fold_error));
    if let Err(err) = done {
        let _ = std::fs::remove_file(&temporary);
        return Err(err);
    }
    Ok(held)
}

#[cfg(test)]
mod tests;

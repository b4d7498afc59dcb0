//! The writer: one VM's audit log, opened (and recovered) once, appended to from any
//! thread.
//!
//! Appends are group-committed. [`AuditLog::append_buffered`] frames a record into the
//! pending batch and returns its sequence number at once; [`AuditLog::sync`] is the
//! durability point: the first waiter becomes the leader, writes the whole batch with one
//! `write` and one `fdatasync`, then wakes everyone whose record it covered, while records
//! that arrive meanwhile form the next batch. [`AuditLog::append`] is both in one call: it
//! returns once the event is durable. A failed write stops the log (every later append
//! fails) rather than leaving a hole between acknowledged records.
//!
//! Opening recovers after a crash: a torn tail of the last segment (a partial frame, or a
//! frame whose check fails) is cut back to the last complete record and kept in `torn/`,
//! never read as data; damage before the last durable point (the latest checkpoint or tree
//! sync) is refused. The stored tree is then brought to the records' length.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use ed25519_dalek::VerifyingKey;
use thiserror::Error;

use crate::blob::{BlobError, BlobStore};
use crate::checkpoint::{
    latest_checkpoint, read_public_key, write_checkpoint, write_public_key, Checkpoint, CheckpointError, HostKey,
    SignedCheckpoint,
};
use crate::event::{now_unix_nanos, Event, EventError, NewEvent};
use crate::files::{sync_dir, write_atomic};
use crate::layout::Layout;
use crate::reader::{for_each_record, ReadError};
use crate::segment::{
    encode_frame, encode_header, list_segments, parse_header, segment_file_name, Frames, SegmentError,
    FRAME_HEADER_LEN, HEADER_LEN, MAX_RECORD_LEN,
};
use crate::tree::{self, leaf_hash, Hash, TreeError};
use crate::tree_store::{TreeStore, TreeStoreError};

/// Segments are rotated once they pass this many bytes.
pub const DEFAULT_SEGMENT_BYTES: u64 = 32 << 20;
/// Leaves added to the stored tree per write while rebuilding it.
const REBUILD_BATCH: usize = 1 << 16;

/// Errors of the audit log.
#[derive(Debug, Error)]
pub enum AuditError {
    #[error("'{vm}' cannot be a VM id for the audit log: {reason}")]
    CheckVm { vm: String, reason: &'static str },
    #[error("cannot create the audit directory {path}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("the audit log {path} is open in another process (one writer per log)")]
    LockLog { path: PathBuf, source: std::io::Error },
    #[error("cannot read or write the origin file {path}")]
    WriteOrigin { path: PathBuf, source: std::io::Error },
    #[error("the audit log in {dir} belongs to VM '{found}', not '{expected}'; use another directory")]
    CheckOrigin { dir: PathBuf, found: String, expected: String },
    #[error("cannot load the host key")]
    LoadKey(#[source] CheckpointError),
    #[error("{path} holds a different public key than the host key; restore the matching key or move the log")]
    CheckPublicKey { path: PathBuf },
    #[error("cannot write the public key")]
    WritePublicKey(#[source] CheckpointError),
    #[error("cannot read the segments")]
    ReadSegments(#[source] SegmentError),
    #[error("cannot read the records")]
    ReadRecords(#[source] ReadError),
    #[error("refusing to recover {path}: {reason}; run carrel-audit verify on it")]
    RecoverSegment { path: PathBuf, reason: String },
    #[error("cannot cut the torn tail of {path}")]
    CutTail { path: PathBuf, source: std::io::Error },
    #[error("cannot create the segment {path}")]
    CreateSegment { path: PathBuf, source: std::io::Error },
    #[error("cannot write the segment {path}")]
    WriteSegment { path: PathBuf, source: std::io::Error },
    #[error("cannot open the tree store")]
    OpenTree(#[source] TreeStoreError),
    #[error("cannot update the tree store")]
    UpdateTree(#[source] TreeStoreError),
    #[error("cannot write the tree's durable mark {path}")]
    WriteTreeMark { path: PathBuf, source: std::io::Error },
    #[error("cannot encode the event")]
    EncodeEvent(#[source] EventError),
    #[error("the event's record is {length} bytes, more than the {MAX_RECORD_LEN} a record may be")]
    CheckRecordSize { length: usize },
    #[error("the audit log stopped after a failed write ({reason}); reopen it to recover")]
    CheckHealthy { reason: String },
    #[error("tree size {requested} is beyond the log's {size} durable records")]
    CheckTreeSize { requested: u64, size: u64 },
    #[error("cannot build the proof")]
    BuildProof(#[source] TreeError),
    #[error("cannot write the checkpoint")]
    WriteCheckpoint(#[source] CheckpointError),
    #[error("cannot read the checkpoints")]
    ReadCheckpoints(#[source] CheckpointError),
    #[error("cannot store the blob")]
    PutBlob(#[source] BlobError),
}

/// How to open a log.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The VM id: recorded in every event and signed into checkpoints as the origin.
    pub vm: String,
    /// The host key; `DIR/host.key` when `None`. Created (0600) when missing.
    pub key_path: Option<PathBuf>,
    /// Segment rotation size.
    pub segment_bytes: u64,
}

impl AuditConfig {
    /// Defaults for the VM `vm`.
    pub fn new(vm: impl Into<String>) -> AuditConfig {
        AuditConfig { vm: vm.into(), key_path: None, segment_bytes: DEFAULT_SEGMENT_BYTES }
    }
}

/// A torn tail that recovery cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutTail {
    pub segment: PathBuf,
    pub offset: u64,
    pub bytes: u64,
    pub reason: String,
    /// Where the cut bytes were saved.
    pub saved_to: PathBuf,
}

/// What opening the log had to repair.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Records in the log after recovery.
    pub records: u64,
    pub cut_tail: Option<CutTail>,
    /// Segments whose header was never completely written, moved to `torn/`.
    pub removed_segments: Vec<PathBuf>,
    /// The stored tree was recomputed from the records from this leaf on.
    pub tree_rebuilt_from: Option<u64>,
}

impl Recovery {
    /// Whether anything was repaired.
    pub fn repaired(&self) -> bool {
        self.cut_tail.is_some() || !self.removed_segments.is_empty()
    }
}

/// Records framed but not yet durable, and the group-commit bookkeeping.
#[derive(Debug)]
struct Batch {
    next_seq: u64,
    /// Records `[durable, next_seq)` are framed here (or being written by the leader).
    frames: Vec<u8>,
    leaves: Vec<Hash>,
    durable: u64,
    writing: bool,
    failed: Option<String>,
    /// Batches written (one fsync each).
    commits: u64,
}

/// The files the leader writes.
#[derive(Debug)]
struct Storage {
    layout: Layout,
    segment: File,
    segment_path: PathBuf,
    segment_first: u64,
    segment_len: u64,
    segment_bytes: u64,
    records: u64,
    tree: TreeStore,
}

#[derive(Debug)]
struct Shared {
    layout: Layout,
    vm: String,
    key: HostKey,
    blobs: BlobStore,
    recovery: Recovery,
    batch: Mutex<Batch>,
    durable_changed: Condvar,
    storage: Mutex<Storage>,
    _lock: File,
}

/// One VM's audit log. Cheap to clone; clones share the log, and appends from any number
/// of threads share fsyncs.
#[derive(Debug, Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind; the `failed` flag, not
    // the poison, is what stops the log.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn check_vm(vm: &str) -> Result<(), AuditError> {
    let bad = |reason| Err(AuditError::CheckVm { vm: vm.to_string(), reason });
    if vm.is_empty() {
        return bad("it is empty");
    }
    if vm.len() > 256 {
        return bad("it is longer than 256 bytes");
    }
    if vm.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return bad("it has white space or control characters");
    }
    Ok(())
}

fn create_dir(path: &Path) -> Result<(), AuditError> {
    std::fs::create_dir_all(path).map_err(|source| AuditError::CreateDir { path: path.to_path_buf(), source })
}

fn lock_directory(layout: &Layout) -> Result<File, AuditError> {
    use std::os::fd::AsRawFd;
    let path = layout.lock();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| AuditError::LockLog { path: path.clone(), source })?;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if result != 0 {
        return Err(AuditError::LockLog { path, source: std::io::Error::last_os_error() });
    }
    Ok(file)
}

fn check_origin(layout: &Layout, vm: &str) -> Result<(), AuditError> {
    let path = layout.origin();
    let origin_error = |source| AuditError::WriteOrigin { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let found = text.trim_end_matches('\n');
            if found != vm {
                return Err(AuditError::CheckOrigin {
                    dir: layout.dir().to_path_buf(),
                    found: found.to_string(),
                    expected: vm.to_string(),
                });
            }
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            write_atomic(&path, format!("{vm}\n").as_bytes(), 0o644).map_err(origin_error)
        }
        Err(error) => Err(origin_error(error)),
    }
}

fn load_key(layout: &Layout, config: &AuditConfig) -> Result<HostKey, AuditError> {
    let key_path = config.key_path.clone().unwrap_or_else(|| layout.host_key());
    let key = HostKey::load_or_create(&key_path).map_err(AuditError::LoadKey)?;
    let public_path = layout.host_public_key();
    match read_public_key(&public_path) {
        Ok(public) if public == key.public_key() => {}
        Ok(_) => return Err(AuditError::CheckPublicKey { path: public_path }),
        Err(CheckpointError::ReadPublicKey { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            write_public_key(&public_path, &key.public_key()).map_err(AuditError::WritePublicKey)?;
        }
        Err(_) => return Err(AuditError::CheckPublicKey { path: public_path }),
    }
    Ok(key)
}

fn read_tree_mark(layout: &Layout) -> u64 {
    std::fs::read_to_string(layout.tree_durable_mark()).ok().and_then(|text| text.trim().parse().ok()).unwrap_or(0)
}

/// Saves `bytes` (a cut tail or a removed segment) under `torn/` and returns the path.
fn save_torn(layout: &Layout, records: u64, bytes: &[u8]) -> Result<PathBuf, AuditError> {
    let dir = layout.torn();
    create_dir(&dir)?;
    let path = dir.join(format!("{records:020}-{}.bin", now_unix_nanos()));
    write_atomic(&path, bytes, 0o644).map_err(|source| AuditError::CutTail { path: path.clone(), source })?;
    Ok(path)
}

fn create_segment(layout: &Layout, first_seq: u64) -> Result<(File, PathBuf), AuditError> {
    let path = layout.log().join(segment_file_name(first_seq));
    let create_error = |source| AuditError::CreateSegment { path: path.clone(), source };
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(create_error)?;
    file.write_all_at(&encode_header(first_seq), 0).map_err(create_error)?;
    file.sync_all().map_err(create_error)?;
    sync_dir(&layout.log()).map_err(create_error)?;
    Ok((file, path))
}

/// Finds the last segment's end, cutting a torn tail; returns the open segment, its first
/// sequence number, its length and the number of records in the log.
fn recover_segments(
    layout: &Layout,
    durable_floor: u64,
    recovery: &mut Recovery,
) -> Result<(File, PathBuf, u64, u64, u64), AuditError> {
    let log_dir = layout.log();
    let mut segments = list_segments(&log_dir).map_err(AuditError::ReadSegments)?;
    loop {
        let Some((first, path)) = segments.last().cloned() else {
            let (file, path) = create_segment(layout, 0)?;
            return Ok((file, path, 0, HEADER_LEN as u64, 0));
        };
        let refuse = |reason: String| AuditError::RecoverSegment { path: path.clone(), reason };
        let bytes = std::fs::read(&path).map_err(|source| AuditError::CutTail { path: path.clone(), source })?;
        let header = match parse_header(&path, &bytes) {
            Ok(header) => header,
            Err(_) if bytes.len() <= HEADER_LEN && first >= durable_floor && (segments.len() > 1 || first == 0) => {
                // Creating the segment was cut short before its header was durable: it
                // never held a record.
                let saved = save_torn(layout, first, &bytes)?;
                let remove_error = |source| AuditError::CutTail { path: path.clone(), source };
                std::fs::remove_file(&path).map_err(remove_error)?;
                sync_dir(&log_dir).map_err(remove_error)?;
                recovery.removed_segments.push(saved);
                segments.pop();
                continue;
            }
            Err(error) => return Err(refuse(error.to_string())),
        };
        if header != first {
            return Err(refuse(format!("its header says it starts at record {header}")));
        }
        let mut count = 0u64;
        let mut end = HEADER_LEN as u64;
        let mut cut: Option<(u64, String)> = None;
        for frame in Frames::new(&bytes) {
            let frame = match frame {
                Ok(frame) if frame.check_ok => frame,
                Ok(frame) => {
                    cut = Some((frame.offset, "the frame's check does not match its body".into()));
                    break;
                }
                Err(problem) => {
                    cut = Some((problem.offset(), problem.to_string()));
                    break;
                }
            };
            let index = first + count;
            match Event::decode(frame.body) {
                Ok(event) if event.seq == index => {}
                Ok(event) => return Err(refuse(format!("record {index} carries sequence number {}", event.seq))),
                Err(error) => return Err(refuse(format!("record {index} does not decode: {error}"))),
            }
            count += 1;
            end = frame.offset + (FRAME_HEADER_LEN + frame.body.len()) as u64;
        }
        let records = first + count;
        if let Some((offset, reason)) = cut {
            if records < durable_floor {
                return Err(refuse(format!(
                    "the frame at offset {offset} is damaged ({reason}) but {durable_floor} records were durable"
                )));
            }
            let saved_to = save_torn(layout, records, &bytes[offset as usize..])?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|source| AuditError::CutTail { path: path.clone(), source })?;
            file.set_len(offset)
                .and_then(|()| file.sync_all())
                .map_err(|source| AuditError::CutTail { path: path.clone(), source })?;
            recovery.cut_tail =
                Some(CutTail { segment: path.clone(), offset, bytes: bytes.len() as u64 - offset, reason, saved_to });
        } else if records < durable_floor {
            return Err(refuse(format!(
                "the log has {records} records but {durable_floor} were durable: records are missing"
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| AuditError::WriteSegment { path: path.clone(), source })?;
        return Ok((file, path, first, end, records));
    }
}

/// Brings the stored tree to `records` leaves, trusting it only up to its durable mark and
/// only when it agrees with the latest checkpoint.
fn recover_tree(
    layout: &Layout,
    records: u64,
    latest: Option<&SignedCheckpoint>,
    recovery: &mut Recovery,
) -> Result<TreeStore, AuditError> {
    let mut tree = TreeStore::open(&layout.tree()).map_err(AuditError::OpenTree)?;
    let mut trusted = tree.size().min(read_tree_mark(layout)).min(records);
    if let Some(latest) = latest {
        let size = latest.checkpoint.tree_size;
        if size <= trusted && tree::root(&tree, size).ok() != Some(latest.checkpoint.root) {
            trusted = 0;
        }
    }
    tree.truncate(trusted).map_err(AuditError::UpdateTree)?;
    if trusted < records {
        recovery.tree_rebuilt_from = Some(trusted);
        let mut leaves = Vec::with_capacity(REBUILD_BATCH);
        let mut failure = None;
        for_each_record(&layout.log(), trusted, |record| {
            leaves.push(record.leaf);
            if leaves.len() == REBUILD_BATCH {
                if let Err(error) = tree.append(&leaves) {
                    failure = Some(error);
                    return Ok(std::ops::ControlFlow::Break(()));
                }
                leaves.clear();
            }
            Ok(std::ops::ControlFlow::Continue(()))
        })
        .map_err(AuditError::ReadRecords)?;
        if let Some(error) = failure {
            return Err(AuditError::UpdateTree(error));
        }
        tree.append(&leaves).map_err(AuditError::UpdateTree)?;
        if tree.size() != records {
            return Err(AuditError::RecoverSegment {
                path: layout.log(),
                reason: format!("the segments hold {} records, expected {records}", tree.size()),
            });
        }
    }
    Ok(tree)
}

impl Storage {
    fn write_batch(&mut self, frames: &[u8], leaves: &[Hash]) -> Result<(), AuditError> {
        if self.segment_len >= self.segment_bytes && self.records > self.segment_first {
            self.rotate()?;
        }
        let write_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AuditError::WriteSegment { path, source }
        };
        self.segment.write_all_at(frames, self.segment_len).map_err(write_error(&self.segment_path))?;
        self.segment.sync_data().map_err(write_error(&self.segment_path))?;
        self.segment_len += frames.len() as u64;
        self.records += leaves.len() as u64;
        self.tree.append(leaves).map_err(AuditError::UpdateTree)
    }

    fn rotate(&mut self) -> Result<(), AuditError> {
        self.sync_tree()?;
        let (file, path) = create_segment(&self.layout, self.records)?;
        self.segment = file;
        self.segment_path = path;
        self.segment_first = self.records;
        self.segment_len = HEADER_LEN as u64;
        Ok(())
    }

    /// Makes the stored tree durable and records how far.
    fn sync_tree(&mut self) -> Result<(), AuditError> {
        self.tree.sync().map_err(AuditError::UpdateTree)?;
        let path = self.layout.tree_durable_mark();
        write_atomic(&path, format!("{}\n", self.tree.size()).as_bytes(), 0o644)
            .map_err(|source| AuditError::WriteTreeMark { path, source })
    }
}

impl AuditLog {
    /// Opens the log of VM `vm` in `dir` with the host key `dir/host.key`, creating either
    /// when missing and recovering after a crash.
    pub fn open(dir: &Path, vm: &str) -> Result<AuditLog, AuditError> {
        AuditLog::open_with(dir, AuditConfig::new(vm))
    }

    /// Opens the log in `dir` as `config` says.
    pub fn open_with(dir: &Path, config: AuditConfig) -> Result<AuditLog, AuditError> {
        check_vm(&config.vm)?;
        let layout = Layout::new(dir);
        create_dir(dir)?;
        let lock_file = lock_directory(&layout)?;
        for path in [layout.log(), layout.tree(), layout.checkpoints(), layout.blobs()] {
            create_dir(&path)?;
        }
        check_origin(&layout, &config.vm)?;
        let key = load_key(&layout, &config)?;
        let blobs = BlobStore::open(&layout.blobs()).map_err(AuditError::PutBlob)?;

        let latest = latest_checkpoint(&layout.checkpoints()).map_err(AuditError::ReadCheckpoints)?;
        let checkpoint_size = latest.as_ref().map_or(0, |c| c.checkpoint.tree_size);
        let durable_floor = checkpoint_size.max(read_tree_mark(&layout));
        let mut recovery = Recovery::default();
        let (segment, segment_path, segment_first, segment_len, records) =
            recover_segments(&layout, durable_floor, &mut recovery)?;
        let tree = recover_tree(&layout, records, latest.as_ref(), &mut recovery)?;
        recovery.records = records;

        let mut storage = Storage {
            layout: layout.clone(),
            segment,
            segment_path,
            segment_first,
            segment_len,
            segment_bytes: config.segment_bytes.max(HEADER_LEN as u64 + 1),
            records,
            tree,
        };
        if recovery.tree_rebuilt_from.is_some() || recovery.repaired() {
            storage.sync_tree()?;
        }
        let batch = Batch {
            next_seq: records,
            frames: Vec::new(),
            leaves: Vec::new(),
            durable: records,
            writing: false,
            failed: None,
            commits: 0,
        };
        Ok(AuditLog {
            shared: Arc::new(Shared {
                layout,
                vm: config.vm,
                key,
                blobs,
                recovery,
                batch: Mutex::new(batch),
                durable_changed: Condvar::new(),
                storage: Mutex::new(storage),
                _lock: lock_file,
            }),
        })
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        self.shared.layout.dir()
    }

    /// The VM id the log records.
    pub fn vm(&self) -> &str {
        &self.shared.vm
    }

    /// The public key checkpoints are signed with.
    pub fn public_key(&self) -> VerifyingKey {
        self.shared.key.public_key()
    }

    /// What opening the log repaired.
    pub fn recovery(&self) -> &Recovery {
        &self.shared.recovery
    }

    /// Records that are durable.
    pub fn size(&self) -> u64 {
        lock(&self.shared.batch).durable
    }

    /// Group commits (batch writes, one fsync each) since the log was opened.
    pub fn commits(&self) -> u64 {
        lock(&self.shared.batch).commits
    }

    /// Appends `event` and returns its sequence number once it is durable. Secret
    /// parameters are redacted first. An error means the event is not acknowledged.
    pub fn append(&self, event: NewEvent) -> Result<u64, AuditError> {
        let seq = self.append_buffered(event)?;
        self.wait_durable(seq + 1)?;
        Ok(seq)
    }

    /// Frames `event` into the pending batch and returns its sequence number at once; it is
    /// durable after the next [`AuditLog::sync`] (or an [`AuditLog::append`] after it).
    pub fn append_buffered(&self, event: NewEvent) -> Result<u64, AuditError> {
        let mut batch = lock(&self.shared.batch);
        if let Some(reason) = &batch.failed {
            return Err(AuditError::CheckHealthy { reason: reason.clone() });
        }
        let seq = batch.next_seq;
        let record = Event::from_new(event, seq, &self.shared.vm, now_unix_nanos());
        let body = record.encode().map_err(AuditError::EncodeEvent)?;
        if body.len() > MAX_RECORD_LEN {
            return Err(AuditError::CheckRecordSize { length: body.len() });
        }
        let leaf = leaf_hash(&body);
        encode_frame(&body, &leaf, &mut batch.frames);
        batch.leaves.push(leaf);
        batch.next_seq += 1;
        Ok(seq)
    }

    /// The durability point: returns once every event appended before the call is durable,
    /// with the number of durable records.
    pub fn sync(&self) -> Result<u64, AuditError> {
        let target = lock(&self.shared.batch).next_seq;
        self.wait_durable(target)
    }

    fn wait_durable(&self, target: u64) -> Result<u64, AuditError> {
        let shared = &*self.shared;
        let mut batch = lock(&shared.batch);
        loop {
            if batch.durable >= target {
                return Ok(batch.durable);
            }
            if let Some(reason) = &batch.failed {
                return Err(AuditError::CheckHealthy { reason: reason.clone() });
            }
            if batch.writing {
                batch = shared.durable_changed.wait(batch).unwrap_or_else(|poisoned| poisoned.into_inner());
                continue;
            }
            // Lead this batch: write it with the batch lock released so that appends go on
            // filling the next one.
            batch.writing = true;
            let frames = std::mem::take(&mut batch.frames);
            let leaves = std::mem::take(&mut batch.leaves);
            let end = batch.next_seq;
            drop(batch);
            let written = lock(&shared.storage).write_batch(&frames, &leaves);
            batch = lock(&shared.batch);
            batch.writing = false;
            match written {
                Ok(()) => {
                    batch.durable = end;
                    batch.commits += 1;
                    if batch.frames.is_empty() {
                        // Hand the allocations back for the next batch.
                        let (mut frames, mut leaves) = (frames, leaves);
                        frames.clear();
                        leaves.clear();
                        batch.frames = frames;
                        batch.leaves = leaves;
                    }
                }
                Err(error) => {
                    let reason = error_chain(&error);
                    batch.failed = Some(reason);
                    shared.durable_changed.notify_all();
                    return Err(error);
                }
            }
            shared.durable_changed.notify_all();
        }
    }

    /// Stores a screenshot (deduplicated, durable on return) and returns its blake3, to
    /// name in `NewEvent::screenshot_before` / `screenshot_after`.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<blake3::Hash, AuditError> {
        self.shared.blobs.put(bytes).map_err(AuditError::PutBlob)
    }

    /// Makes everything appended durable, then signs and stores a checkpoint of the tree.
    pub fn checkpoint(&self) -> Result<SignedCheckpoint, AuditError> {
        let size = self.sync()?;
        let mut storage = lock(&self.shared.storage);
        let root = tree::root(&storage.tree, size).map_err(AuditError::BuildProof)?;
        storage.sync_tree()?;
        let signed = self.shared.key.sign(Checkpoint {
            origin: self.shared.vm.clone(),
            tree_size: size,
            root,
            time_unix_nanos: now_unix_nanos(),
        });
        write_checkpoint(&self.shared.layout.checkpoints(), &signed).map_err(AuditError::WriteCheckpoint)?;
        Ok(signed)
    }

    fn with_tree<T>(&self, size: u64, build: impl FnOnce(&TreeStore) -> Result<T, TreeError>) -> Result<T, AuditError> {
        let storage = lock(&self.shared.storage);
        if size > storage.tree.size() {
            return Err(AuditError::CheckTreeSize { requested: size, size: storage.tree.size() });
        }
        build(&storage.tree).map_err(AuditError::BuildProof)
    }

    /// The root of the tree of the first `size` records.
    pub fn root(&self, size: u64) -> Result<Hash, AuditError> {
        self.with_tree(size, |tree| tree::root(tree, size))
    }

    /// The leaf hash of record `index`.
    pub fn leaf_hash(&self, index: u64) -> Result<Hash, AuditError> {
        self.with_tree(index + 1, |tree| {
            use crate::tree::NodeSource;
            tree.node(0, index).ok_or(TreeError::ReadNode { level: 0, index })
        })
    }

    /// The inclusion proof of record `index` in the tree of the first `size` records.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, AuditError> {
        self.with_tree(size, |tree| tree::inclusion_proof(tree, index, size))
    }

    /// The consistency proof between the trees of the first `old_size` and `new_size`
    /// records.
    pub fn consistency_proof(&self, old_size: u64, new_size: u64) -> Result<Vec<Hash>, AuditError> {
        self.with_tree(new_size, |tree| tree::consistency_proof(tree, old_size, new_size))
    }

    /// Bytes on disk: (segments, stored tree).
    pub fn stored_bytes(&self) -> (u64, u64) {
        let storage = lock(&self.shared.storage);
        let tree = storage.tree.stored_bytes();
        let segments = list_segments(&self.shared.layout.log())
            .map(|segments| {
                segments
                    .iter()
                    .filter_map(|(_, path)| std::fs::metadata(path).ok())
                    .map(|metadata| metadata.len())
                    .sum()
            })
            .unwrap_or(0);
        (segments, tree)
    }

    /// Makes everything appended durable and syncs the stored tree, reporting errors that
    /// dropping the last handle would swallow.
    pub fn close(self) -> Result<(), AuditError> {
        self.sync()?;
        lock(&self.shared.storage).sync_tree()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The last handle is gone: write what is pending so buffered appends are not lost
        // on a clean exit. Errors cannot be returned from here; `close` reports them.
        let batch = self.batch.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        if batch.failed.is_some() {
            return;
        }
        let frames = std::mem::take(&mut batch.frames);
        let leaves = std::mem::take(&mut batch.leaves);
        let storage = self.storage.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !frames.is_empty() && storage.write_batch(&frames, &leaves).is_err() {
            return;
        }
        let _ = storage.sync_tree();
    }
}

/// An error and its sources on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

//! Offline verification of a copied log directory, trusting nothing the host computed.
//!
//! Every record is read from the segments, its frame check, encoding, sequence number and
//! VM checked, and the Merkle tree recomputed from the records alone. Every checkpoint
//! (the log's own and any the auditor kept) must carry a valid signature from the trusted
//! key, and the recomputed root at its size must equal its root: that is the consistency
//! of the log with the checkpoint. The stored tree is compared node by node with the
//! recomputed one, and every screenshot blob with its name. Problems are collected as
//! [`Finding`]s that say exactly which record, node, checkpoint or blob failed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use thiserror::Error;

use crate::blob::BlobStore;
use crate::checkpoint::{list_checkpoints, read_public_key, SignedCheckpoint};
use crate::codec::to_hex;
use crate::event::Event;
use crate::layout::Layout;
use crate::segment::{list_segments, parse_header, parse_segment_name, FrameProblem, Frames};
use crate::tree::{Frontier, Hash, NodeSource};
use crate::tree_store::TreeStore;

/// Stored-tree mismatches listed one by one before they are only counted.
const MAX_TREE_FINDINGS: usize = 8;

/// Errors that stop verification before it can judge the log.
#[derive(Debug, Error)]
pub enum VerifyError {
    #[error("{path} is not a log directory (no log/ inside)")]
    CheckLogDir { path: PathBuf },
    #[error("cannot list the segments")]
    ListSegments(#[source] crate::segment::SegmentError),
    #[error("cannot list the checkpoints")]
    ListCheckpoints(#[source] crate::checkpoint::CheckpointError),
    #[error("cannot list the blobs")]
    ListBlobs(#[source] crate::blob::BlobError),
}

/// Where the verifier's trusted key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Given by the auditor.
    Pinned,
    /// Read from the log directory's `host.pub`: only as good as the copy.
    LogDirectory(PathBuf),
}

/// What to verify against.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// The host's public key; `host.pub` in the directory when `None`.
    pub key: Option<VerifyingKey>,
    /// Checkpoints the auditor kept from earlier, checked besides the log's own.
    pub checkpoints: Vec<PathBuf>,
}

/// One problem, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    SegmentName { path: PathBuf },
    SegmentHeader { path: PathBuf, reason: String },
    SegmentGap { path: PathBuf, expected: u64, found: u64 },
    TornTail { path: PathBuf, after_record: u64, problem: FrameProblem },
    RecordCheck { index: u64, path: PathBuf, offset: u64 },
    RecordDecode { index: u64, path: PathBuf, offset: u64, reason: String },
    RecordSequence { index: u64, path: PathBuf, offset: u64, seq: u64 },
    RecordVm { index: u64, vm: String, origin: String },
    StoredTreeNode { level: u32, index: u64 },
    StoredTreeNodesMore { count: u64 },
    NoKey { reason: String },
    CheckpointUnreadable { path: PathBuf, reason: String },
    CheckpointSignature { path: PathBuf, reason: String },
    CheckpointOrigin { path: PathBuf, found: String, expected: String },
    CheckpointBeyondLog { path: PathBuf, size: u64, records: u64 },
    CheckpointRoot { path: PathBuf, size: u64, last_good_size: Option<u64> },
    BlobMissing { hash: [u8; 32], index: u64, field: &'static str },
    BlobContent { path: PathBuf, referenced_by: Option<u64> },
    BlobName { path: PathBuf },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::SegmentName { path } => {
                write!(f, "segment {}: the name is not a segment name", path.display())
            }
            Finding::SegmentHeader { path, reason } => {
                write!(f, "segment {}: bad header ({reason}); its records were not read", path.display())
            }
            Finding::SegmentGap { path, expected, found } => write!(
                f,
                "segment {}: starts at record {found} but the records before it end at {expected} (segment missing or out of place)",
                path.display()
            ),
            Finding::TornTail { path, after_record, problem } => write!(
                f,
                "segment {}: torn tail after record {after_record}: {problem} (the writer cuts it on its next open; it is not part of the log)",
                path.display()
            ),
            Finding::RecordCheck { index, path, offset } => write!(
                f,
                "record {index} ({} offset {offset}): its bytes do not match its frame check: the record was altered or damaged",
                path.display()
            ),
            Finding::RecordDecode { index, path, offset, reason } => write!(
                f,
                "record {index} ({} offset {offset}): does not decode: {reason}",
                path.display()
            ),
            Finding::RecordSequence { index, path, offset, seq } => write!(
                f,
                "record {index} ({} offset {offset}): carries sequence number {seq}: records were reordered, dropped or inserted",
                path.display()
            ),
            Finding::RecordVm { index, vm, origin } => {
                write!(f, "record {index}: names VM '{vm}' but the log belongs to '{origin}'")
            }
            Finding::StoredTreeNode { level: 0, index } => write!(
                f,
                "record {index}: its leaf hash differs from the stored tree's: the record or the stored tree was changed"
            ),
            Finding::StoredTreeNode { level, index } => write!(
                f,
                "stored tree node (level {level}, index {index}, records {}..{}) differs from the hash of the records",
                index << level,
                (index + 1) << level
            ),
            Finding::StoredTreeNodesMore { count } => {
                write!(f, "... and {count} more stored tree nodes differ")
            }
            Finding::NoKey { reason } => write!(f, "no key to check signatures with: {reason}"),
            Finding::CheckpointUnreadable { path, reason } => {
                write!(f, "checkpoint {}: unreadable: {reason}", path.display())
            }
            Finding::CheckpointSignature { path, reason } => {
                write!(f, "checkpoint {}: {reason}", path.display())
            }
            Finding::CheckpointOrigin { path, found, expected } => write!(
                f,
                "checkpoint {}: is for log '{found}', this log is '{expected}'",
                path.display()
            ),
            Finding::CheckpointBeyondLog { path, size, records } => write!(
                f,
                "checkpoint {}: signs {size} records but the log has {records}: records {records}..{size} were removed",
                path.display()
            ),
            Finding::CheckpointRoot { path, size, last_good_size } => {
                write!(
                    f,
                    "checkpoint {}: the log's first {size} records do not hash to its root: records were changed after it was signed",
                    path.display()
                )?;
                match last_good_size {
                    Some(good) => write!(f, " (a checkpoint at size {good} still matches: the change is in records {good}..{size})"),
                    None => Ok(()),
                }
            }
            Finding::BlobMissing { hash, index, field } => write!(
                f,
                "record {index}: {field} blob {} is missing from the blob store",
                to_hex(hash)
            ),
            Finding::BlobContent { path, referenced_by } => {
                write!(f, "blob {}: its content does not hash to its name: the screenshot was replaced", path.display())?;
                match referenced_by {
                    Some(index) => write!(f, " (named by record {index})"),
                    None => Ok(()),
                }
            }
            Finding::BlobName { path } => {
                write!(f, "blob store: {} is not a blob name", path.display())
            }
        }
    }
}

/// A checkpoint the verifier looked at.
#[derive(Debug, Clone)]
pub struct CheckedCheckpoint {
    pub path: PathBuf,
    /// Given by the auditor rather than found in the log.
    pub external: bool,
    pub size: u64,
    pub ok: bool,
}

/// The result of verifying a log.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub dir: PathBuf,
    pub origin: String,
    pub key: Option<(String, KeySource)>,
    pub segments: usize,
    pub records: u64,
    pub root: Hash,
    pub stored_tree_size: u64,
    pub stored_nodes_compared: u64,
    pub checkpoints: Vec<CheckedCheckpoint>,
    pub blobs_checked: u64,
    /// Records after the largest valid checkpoint: no signature covers them yet.
    pub unsigned_records: u64,
    pub warnings: Vec<String>,
    pub findings: Vec<Finding>,
}

impl VerifyReport {
    /// Whether the log passed.
    pub fn ok(&self) -> bool {
        self.findings.is_empty()
    }

    /// The report as lines for a person: what was checked, then OK or the findings (the
    /// first `limit` of them, all when `None`).
    pub fn lines(&self, limit: Option<usize>) -> Vec<String> {
        let mut lines = vec![format!("log {} (origin '{}')", self.dir.display(), self.origin)];
        match &self.key {
            Some((key, KeySource::Pinned)) => lines.push(format!("key {key} (pinned)")),
            Some((key, KeySource::LogDirectory(path))) => {
                lines.push(format!("key {key} (from {}; pass --key to pin the host's key)", path.display()))
            }
            None => lines.push("key: none".into()),
        }
        lines.push(format!(
            "records: {} in {} segments: frames, encoding, sequence and VM checked",
            self.records, self.segments
        ));
        lines.push(format!("tree: size {} root {} recomputed from the records", self.records, to_hex(&self.root)));
        lines.push(format!(
            "stored tree: {} leaves, {} nodes compared with the recomputed tree",
            self.stored_tree_size, self.stored_nodes_compared
        ));
        for checkpoint in &self.checkpoints {
            lines.push(format!(
                "checkpoint {}{}: size {}: {}",
                checkpoint.path.display(),
                if checkpoint.external { " (given)" } else { "" },
                checkpoint.size,
                if checkpoint.ok { "signature valid, log consistent with it" } else { "FAILED" }
            ));
        }
        lines.push(format!("blobs: {} checked against their names", self.blobs_checked));
        if self.unsigned_records > 0 {
            lines.push(format!("note: the last {} records are not covered by a checkpoint yet", self.unsigned_records));
        }
        for warning in &self.warnings {
            lines.push(format!("warning: {warning}"));
        }
        if self.ok() {
            lines.push("OK".into());
        } else {
            let shown = limit.unwrap_or(usize::MAX).min(self.findings.len());
            for finding in &self.findings[..shown] {
                lines.push(format!("FAIL {finding}"));
            }
            if shown < self.findings.len() {
                lines.push(format!(
                    "... and {} more problems (carrel-audit verify --all lists every one)",
                    self.findings.len() - shown
                ));
            }
            lines.push(format!("FAILED: {} problems", self.findings.len()));
        }
        lines
    }
}

struct PendingCheckpoint {
    path: PathBuf,
    external: bool,
    checkpoint: SignedCheckpoint,
    report_index: usize,
}

/// Verifies the log in `dir`.
pub fn verify_dir(dir: &Path, options: &VerifyOptions) -> Result<VerifyReport, VerifyError> {
    let layout = Layout::new(dir);
    if !layout.log().is_dir() {
        return Err(VerifyError::CheckLogDir { path: dir.to_path_buf() });
    }
    let mut findings = Vec::new();
    let mut warnings = Vec::new();
    let origin = std::fs::read_to_string(layout.origin())
        .map(|text| text.trim_end_matches('\n').to_string())
        .unwrap_or_else(|_| {
            warnings.push("no origin file: the VM of records and checkpoints is not checked".into());
            String::new()
        });

    let key = match &options.key {
        Some(key) => Ok((*key, KeySource::Pinned)),
        None => read_public_key(&layout.host_public_key())
            .map(|key| (key, KeySource::LogDirectory(layout.host_public_key())))
            .map_err(|error| crate::audit::error_chain(&error)),
    };

    // Checkpoints: signatures now, roots while the tree is recomputed.
    let mut checked = Vec::new();
    let mut pending = Vec::new();
    let mut paths: Vec<(PathBuf, bool)> = list_checkpoints(&layout.checkpoints())
        .map_err(VerifyError::ListCheckpoints)?
        .into_iter()
        .map(|path| (path, false))
        .collect();
    paths.extend(options.checkpoints.iter().map(|path| (path.clone(), true)));
    let mut reported_no_key = false;
    for (path, external) in paths {
        let report_index = checked.len();
        let signed = match SignedCheckpoint::read(&path) {
            Ok(signed) => signed,
            Err(error) => {
                findings.push(Finding::CheckpointUnreadable {
                    path: path.clone(),
                    reason: crate::audit::error_chain(&error),
                });
                checked.push(CheckedCheckpoint { path, external, size: 0, ok: false });
                continue;
            }
        };
        let size = signed.checkpoint.tree_size;
        checked.push(CheckedCheckpoint { path: path.clone(), external, size, ok: false });
        match &key {
            Ok((key, _)) => {
                if let Err(error) = signed.verify(key) {
                    findings.push(Finding::CheckpointSignature { path, reason: error.to_string() });
                    continue;
                }
            }
            Err(reason) => {
                if !reported_no_key {
                    findings.push(Finding::NoKey { reason: reason.clone() });
                    reported_no_key = true;
                }
                continue;
            }
        }
        if !origin.is_empty() && signed.checkpoint.origin != origin {
            findings.push(Finding::CheckpointOrigin {
                path,
                found: signed.checkpoint.origin.clone(),
                expected: origin.clone(),
            });
            continue;
        }
        pending.push(PendingCheckpoint { path, external, checkpoint: signed, report_index });
    }
    pending.sort_by_key(|p| (p.checkpoint.checkpoint.tree_size, p.external));

    let stored = match TreeStore::open_read_only(&layout.tree()) {
        Ok(tree) => Some(tree),
        Err(error) => {
            if layout.tree().exists() {
                warnings.push(format!(
                    "the stored tree cannot be read ({}); checked from the records alone (a writer rebuilds it on open)",
                    crate::audit::error_chain(&error)
                ));
            }
            None
        }
    };
    let stored_tree_size = stored.as_ref().map_or(0, |tree| tree.size());
    let mut stored_nodes_compared = 0u64;
    let mut stored_nodes_missing = 0u64;
    let mut stored_mismatches = 0u64;
    let mut last_mismatch_leaf: Option<u64> = None;

    let mut frontier = Frontier::new();
    let mut next_pending = 0usize;
    let mut last_good_size: Option<u64> = None;
    let mut referenced: BTreeMap<[u8; 32], (u64, &'static str)> = BTreeMap::new();
    let mut last_time = 0u64;
    let mut time_warned = false;

    // Checkpoints at size 0 are checked before any record.
    let mut check_roots = |frontier: &Frontier,
                           findings: &mut Vec<Finding>,
                           checked: &mut Vec<CheckedCheckpoint>,
                           next_pending: &mut usize| {
        while let Some(entry) = pending.get(*next_pending) {
            if entry.checkpoint.checkpoint.tree_size != frontier.size() {
                break;
            }
            if frontier.root() == entry.checkpoint.checkpoint.root {
                checked[entry.report_index].ok = true;
                last_good_size = Some(frontier.size());
            } else {
                findings.push(Finding::CheckpointRoot {
                    path: entry.path.clone(),
                    size: frontier.size(),
                    last_good_size,
                });
            }
            *next_pending += 1;
        }
    };
    check_roots(&frontier, &mut findings, &mut checked, &mut next_pending);

    let segments = list_segments(&layout.log()).map_err(VerifyError::ListSegments)?;
    let mut expected_first = 0u64;
    for (first, path) in &segments {
        if parse_segment_name(path).is_err() {
            findings.push(Finding::SegmentName { path: path.clone() });
            continue;
        }
        if *first != expected_first {
            findings.push(Finding::SegmentGap { path: path.clone(), expected: expected_first, found: *first });
        }
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) => {
                findings.push(Finding::SegmentHeader { path: path.clone(), reason: error.to_string() });
                continue;
            }
        };
        match parse_header(path, &bytes) {
            Ok(header) if header == *first => {}
            Ok(header) => {
                findings.push(Finding::SegmentHeader {
                    path: path.clone(),
                    reason: format!("the header says it starts at record {header}"),
                });
            }
            Err(error) => {
                findings.push(Finding::SegmentHeader { path: path.clone(), reason: error.to_string() });
                continue;
            }
        }
        for frame in Frames::new(&bytes) {
            let index = frontier.size();
            let frame = match frame {
                Ok(frame) => frame,
                Err(problem) => {
                    findings.push(Finding::TornTail { path: path.clone(), after_record: index, problem });
                    break;
                }
            };
            if !frame.check_ok {
                findings.push(Finding::RecordCheck { index, path: path.clone(), offset: frame.offset });
            }
            match Event::decode(frame.body) {
                Ok(event) => {
                    if event.seq != index {
                        findings.push(Finding::RecordSequence {
                            index,
                            path: path.clone(),
                            offset: frame.offset,
                            seq: event.seq,
                        });
                    }
                    if !origin.is_empty() && event.vm != origin {
                        findings.push(Finding::RecordVm { index, vm: event.vm.clone(), origin: origin.clone() });
                    }
                    if event.time_unix_nanos < last_time && !time_warned {
                        warnings.push(format!("record {index}: time goes back (the host clock was stepped?)"));
                        time_warned = true;
                    }
                    last_time = event.time_unix_nanos;
                    for (field, hash) in event.screenshots() {
                        referenced.entry(hash).or_insert((index, field));
                    }
                }
                Err(error) => findings.push(Finding::RecordDecode {
                    index,
                    path: path.clone(),
                    offset: frame.offset,
                    reason: crate::audit::error_chain(&error),
                }),
            }
            frontier.push_with(frame.leaf, |level, node_index, hash| {
                let Some(stored) = stored.as_ref() else {
                    return;
                };
                let Some(stored_hash) = stored.node(level, node_index) else {
                    // A node the stored size says is there but its level file lacks.
                    if (node_index + 1) << level <= stored_tree_size {
                        stored_nodes_missing += 1;
                    }
                    return;
                };
                stored_nodes_compared += 1;
                if stored_hash != *hash {
                    // A node above a differing node differs too: report only where the
                    // difference starts.
                    let first_leaf = node_index << level;
                    if last_mismatch_leaf.is_some_and(|leaf| leaf >= first_leaf) {
                        return;
                    }
                    last_mismatch_leaf = Some(first_leaf);
                    stored_mismatches += 1;
                    if stored_mismatches as usize <= MAX_TREE_FINDINGS {
                        findings.push(Finding::StoredTreeNode { level, index: node_index });
                    }
                }
            });
            check_roots(&frontier, &mut findings, &mut checked, &mut next_pending);
        }
        expected_first = frontier.size();
    }
    if stored_mismatches as usize > MAX_TREE_FINDINGS {
        findings.push(Finding::StoredTreeNodesMore { count: stored_mismatches - MAX_TREE_FINDINGS as u64 });
    }
    let records = frontier.size();
    for entry in &pending[next_pending..] {
        findings.push(Finding::CheckpointBeyondLog {
            path: entry.path.clone(),
            size: entry.checkpoint.checkpoint.tree_size,
            records,
        });
    }
    if stored_nodes_missing > 0 {
        warnings.push(format!(
            "the stored tree lacks {stored_nodes_missing} hashes its size says it holds (damaged tree files; a writer rebuilds them on open)"
        ));
    }
    if stored.is_some() && stored_tree_size < records {
        warnings.push(format!(
            "the stored tree covers {stored_tree_size} of {records} records (short tree files: a crash before their sync, or damage; a writer rebuilds them on open)"
        ));
    }
    if stored_tree_size > records {
        warnings.push(format!("the stored tree has {stored_tree_size} leaves but the log has {records} records"));
    }
    if checked.is_empty() {
        warnings.push("no checkpoints: no signature binds these records to the host key".into());
    }

    // Blobs: every file must hash to its name, every named screenshot must be there.
    let blobs = BlobStore::at(&layout.blobs());
    let mut blobs_checked = 0u64;
    for entry in blobs.list().map_err(VerifyError::ListBlobs)? {
        let (hash, path) = (entry.hash, entry.path);
        let Some(hash) = hash else {
            findings.push(Finding::BlobName { path });
            continue;
        };
        blobs_checked += 1;
        let referenced_by = referenced.get(&hash).map(|(index, _)| *index);
        match std::fs::read(&path) {
            Ok(bytes) if blake3::hash(&bytes).as_bytes() == &hash => {}
            _ => findings.push(Finding::BlobContent { path, referenced_by }),
        }
    }
    for (hash, (index, field)) in &referenced {
        if !blobs.contains(hash) {
            findings.push(Finding::BlobMissing { hash: *hash, index: *index, field });
        }
    }

    let signed_size = checked.iter().filter(|c| c.ok).map(|c| c.size).max().unwrap_or(0);
    Ok(VerifyReport {
        dir: dir.to_path_buf(),
        origin,
        key: key.ok().map(|(key, source)| (to_hex(&key.to_bytes()), source)),
        segments: segments.len(),
        records,
        root: frontier.root(),
        stored_tree_size,
        stored_nodes_compared,
        checkpoints: checked,
        blobs_checked,
        unsigned_records: records.saturating_sub(signed_size),
        warnings,
        findings,
    })
}

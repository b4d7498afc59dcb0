//! Reading a log's records in order, for recovery and the tools.
//!
//! Strict: a record that fails its check, does not decode or carries the wrong sequence
//! number stops the read with an error that says where; the only thing tolerated is a
//! partial frame at the very end of the last segment (a writer may be appending right now),
//! which is reported, not read. Finding *every* problem in a log is the verifier's job.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::event::{Event, EventError};
use crate::segment::{list_segments, read_segment, FrameProblem, Frames, SegmentError};
use crate::tree::Hash;

/// Errors of reading records.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error(transparent)]
    ReadSegment(#[from] SegmentError),
    #[error("segment {path} starts at record {found} but the previous segment ends at record {expected}; run carrel-audit verify")]
    CheckSegmentOrder { path: PathBuf, expected: u64, found: u64 },
    #[error("record {index} in {path} at offset {offset} fails its check; run carrel-audit verify")]
    CheckRecord { index: u64, path: PathBuf, offset: u64 },
    #[error("record {index} in {path}: {problem}; run carrel-audit verify")]
    ReadFrame { index: u64, path: PathBuf, problem: FrameProblem },
    #[error("record {index} in {path} at offset {offset} does not decode; run carrel-audit verify")]
    DecodeRecord { index: u64, path: PathBuf, offset: u64, source: EventError },
    #[error("record {index} in {path} carries sequence number {seq}; run carrel-audit verify")]
    CheckSequence { index: u64, path: PathBuf, seq: u64 },
}

/// One record as read.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub index: u64,
    pub body: &'a [u8],
    pub leaf: Hash,
    pub segment: &'a Path,
    pub offset: u64,
}

/// How a read ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadSummary {
    /// Records read (or, when stopped early, up to and including the last one visited).
    pub records: u64,
    /// A partial frame at the end of the last segment, left unread.
    pub torn_tail: Option<String>,
}

/// Calls `visit` for every record from index `from` on, in order.
pub fn for_each_record(
    log_dir: &Path,
    from: u64,
    mut visit: impl FnMut(RecordRef<'_>) -> Result<ControlFlow<()>, ReadError>,
) -> Result<ReadSummary, ReadError> {
    let segments = list_segments(log_dir)?;
    let mut summary = ReadSummary::default();
    // Skip segments that end before `from`: those followed by one starting at or before it.
    let start = segments.iter().rposition(|(first, _)| *first <= from).unwrap_or(0);
    let mut expected: Option<u64> = None;
    for (position, (first, path)) in segments.iter().enumerate().skip(start) {
        let is_last = position + 1 == segments.len();
        if let Some(expected) = expected {
            if *first != expected {
                return Err(ReadError::CheckSegmentOrder { path: path.clone(), expected, found: *first });
            }
        }
        let (_, bytes) = read_segment(path)?;
        let mut index = *first;
        for frame in Frames::new(&bytes) {
            let frame = match frame {
                Ok(frame) => frame,
                Err(problem @ FrameProblem::Truncated { .. }) if is_last => {
                    summary.torn_tail = Some(format!("{}: {problem}", path.display()));
                    break;
                }
                Err(problem) => return Err(ReadError::ReadFrame { index, path: path.clone(), problem }),
            };
            if !frame.check_ok {
                return Err(ReadError::CheckRecord { index, path: path.clone(), offset: frame.offset });
            }
            if index >= from {
                let record =
                    RecordRef { index, body: frame.body, leaf: frame.leaf, segment: path, offset: frame.offset };
                if visit(record)?.is_break() {
                    summary.records = index + 1;
                    return Ok(summary);
                }
            }
            index += 1;
        }
        summary.records = index;
        expected = Some(index);
    }
    Ok(summary)
}

/// Calls `visit` with every event (decoded, its sequence number checked) from index `from`.
pub fn for_each_event(
    log_dir: &Path,
    from: u64,
    mut visit: impl FnMut(&Event, &Hash) -> ControlFlow<()>,
) -> Result<ReadSummary, ReadError> {
    for_each_record(log_dir, from, |record| {
        let event = Event::decode(record.body).map_err(|source| ReadError::DecodeRecord {
            index: record.index,
            path: record.segment.to_path_buf(),
            offset: record.offset,
            source,
        })?;
        if event.seq != record.index {
            return Err(ReadError::CheckSequence {
                index: record.index,
                path: record.segment.to_path_buf(),
                seq: event.seq,
            });
        }
        Ok(visit(&event, &record.leaf))
    })
}

//! Segment files: the append-only record storage of a log.
//!
//! `log/NNNNNNNNNNNNNNNNNNNN.seg` (the sequence number of its first record, 20 decimal
//! digits) starts with a 24-byte header (magic `CRLAUDIT`, format version, zero, first
//! sequence number) and holds records back to back, each framed as
//! `length: u32 LE | check: first 8 bytes of the leaf hash | body`. The check is the leaf
//! hash the Merkle tree needs anyway, so framing costs one hash per record; a torn or
//! rewritten frame fails it. This module reads and writes frames and headers; the policy of
//! what to do with a bad frame (cut a torn tail, refuse, report) belongs to the callers.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::tree::{leaf_hash, Hash};

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"CRLAUDIT";
/// Segment format version.
pub const SEGMENT_VERSION: u32 = 1;
/// Bytes of the segment header.
pub const HEADER_LEN: usize = 24;
/// Bytes of a frame before its body.
pub const FRAME_HEADER_LEN: usize = 12;
/// The largest record body accepted.
pub const MAX_RECORD_LEN: usize = 1 << 20;
/// The file name suffix of segments.
pub const SEGMENT_SUFFIX: &str = ".seg";

/// Errors of reading segment files and their names.
#[derive(Debug, Error)]
pub enum SegmentError {
    #[error("cannot list the segment directory {path}")]
    ListSegments { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a segment name (20 decimal digits and .seg)")]
    ParseName { path: PathBuf },
    #[error("segment {path} has no valid header ({reason})")]
    ParseHeader { path: PathBuf, reason: &'static str },
    #[error("segment {path} is named for sequence {named} but its header says {header}")]
    CheckHeaderSequence { path: PathBuf, named: u64, header: u64 },
    #[error("cannot read segment {path}")]
    ReadSegment { path: PathBuf, source: std::io::Error },
}

/// A segment file's name for its first sequence number.
pub fn segment_file_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

/// The first sequence number a segment name stands for.
pub fn parse_segment_name(path: &Path) -> Result<u64, SegmentError> {
    let name = path.file_name().and_then(|name| name.to_str()).unwrap_or("");
    let digits = name.strip_suffix(SEGMENT_SUFFIX).unwrap_or("");
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SegmentError::ParseName { path: path.to_path_buf() });
    }
    digits.parse().map_err(|_| SegmentError::ParseName { path: path.to_path_buf() })
}

/// The segments in `log_dir` ordered by first sequence number. Files that do not end in
/// `.seg` are ignored; a `.seg` file with a bad name is an error.
pub fn list_segments(log_dir: &Path) -> Result<Vec<(u64, PathBuf)>, SegmentError> {
    let list_error = |source| SegmentError::ListSegments { path: log_dir.to_path_buf(), source };
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(log_dir).map_err(list_error)? {
        let path = entry.map_err(list_error)?.path();
        if path.extension().is_none_or(|ext| ext != "seg") {
            continue;
        }
        segments.push((parse_segment_name(&path)?, path));
    }
    segments.sort();
    Ok(segments)
}

/// The header of a segment starting at `first_seq`.
pub fn encode_header(first_seq: u64) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&first_seq.to_le_bytes());
    header
}

/// Checks a segment's header and returns the first sequence number it states.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<u64, SegmentError> {
    let bad = |reason| SegmentError::ParseHeader { path: path.to_path_buf(), reason };
    if bytes.len() < HEADER_LEN {
        return Err(bad("file shorter than the header"));
    }
    if bytes[..8] != SEGMENT_MAGIC {
        return Err(bad("wrong magic"));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != SEGMENT_VERSION {
        return Err(bad("unknown format version"));
    }
    if bytes[12..16] != [0; 4] {
        return Err(bad("reserved bytes are not zero"));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[16..24]);
    Ok(u64::from_le_bytes(seq))
}

/// Reads a whole segment and checks its header against its name.
pub fn read_segment(path: &Path) -> Result<(u64, Vec<u8>), SegmentError> {
    let named = parse_segment_name(path)?;
    let bytes = std::fs::read(path).map_err(|source| SegmentError::ReadSegment { path: path.to_path_buf(), source })?;
    let header = parse_header(path, &bytes)?;
    if header != named {
        return Err(SegmentError::CheckHeaderSequence { path: path.to_path_buf(), named, header });
    }
    Ok((named, bytes))
}

/// Appends the frame of `body` (whose leaf hash is `leaf`) to `out`.
pub fn encode_frame(body: &[u8], leaf: &Hash, out: &mut Vec<u8>) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&leaf[..8]);
    out.extend_from_slice(body);
}

/// One frame read from a segment.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// Byte offset of the frame in the segment file.
    pub offset: u64,
    pub body: &'a [u8],
    /// The leaf hash of the body as read.
    pub leaf: Hash,
    /// Whether the frame's check matches the body.
    pub check_ok: bool,
}

/// Why reading frames stopped before the end of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameProblem {
    /// The file ends inside a frame: `have` of `need` bytes are there.
    Truncated { offset: u64, need: u64, have: u64 },
    /// The length field is zero or larger than any record.
    BadLength { offset: u64, length: u32 },
}

impl FrameProblem {
    /// Where the bad frame starts.
    pub fn offset(&self) -> u64 {
        match *self {
            FrameProblem::Truncated { offset, .. } | FrameProblem::BadLength { offset, .. } => offset,
        }
    }
}

impl std::fmt::Display for FrameProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            FrameProblem::Truncated { offset, need, have } => {
                write!(f, "the file ends inside the frame at offset {offset} ({have} of {need} bytes)")
            }
            FrameProblem::BadLength { offset, length } => {
                write!(f, "the frame at offset {offset} has an impossible length {length}")
            }
        }
    }
}

/// The frames of a segment's bytes (header included), in order. A frame whose check fails
/// is still yielded (with `check_ok == false`) because its length was plausible; a frame
/// that cannot be delimited ends the iteration with an error.
#[derive(Debug)]
pub struct Frames<'a> {
    bytes: &'a [u8],
    offset: usize,
    done: bool,
}

impl<'a> Frames<'a> {
    /// Frames of `bytes`, a whole segment file whose header was checked.
    pub fn new(bytes: &'a [u8]) -> Frames<'a> {
        Frames { bytes, offset: HEADER_LEN.min(bytes.len()), done: false }
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, FrameProblem>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.offset >= self.bytes.len() {
            return None;
        }
        let offset = self.offset;
        let rest = &self.bytes[offset..];
        if rest.len() < FRAME_HEADER_LEN {
            self.done = true;
            return Some(Err(FrameProblem::Truncated {
                offset: offset as u64,
                need: FRAME_HEADER_LEN as u64,
                have: rest.len() as u64,
            }));
        }
        let length = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        if length == 0 || length as usize > MAX_RECORD_LEN {
            self.done = true;
            return Some(Err(FrameProblem::BadLength { offset: offset as u64, length }));
        }
        let end = FRAME_HEADER_LEN + length as usize;
        if rest.len() < end {
            self.done = true;
            return Some(Err(FrameProblem::Truncated {
                offset: offset as u64,
                need: end as u64,
                have: rest.len() as u64,
            }));
        }
        let body = &rest[FRAME_HEADER_LEN..end];
        let leaf = leaf_hash(body);
        let check_ok = rest[4..12] == leaf[..8];
        self.offset += end;
        Some(Ok(Frame { offset: offset as u64, body, leaf, check_ok }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(bodies: &[&[u8]]) -> Vec<u8> {
        let mut bytes = encode_header(5).to_vec();
        for body in bodies {
            encode_frame(body, &leaf_hash(body), &mut bytes);
        }
        bytes
    }

    #[test]
    fn frames_of_written_segment_read_back() {
        let bytes = segment(&[b"one", b"two", b"three"]);
        assert_eq!(parse_header(Path::new("x"), &bytes).unwrap(), 5);
        let bodies: Vec<&[u8]> = Frames::new(&bytes).map(|frame| frame.unwrap().body).collect();
        assert_eq!(bodies, vec![&b"one"[..], b"two", b"three"]);
    }

    #[test]
    fn frames_with_torn_tail_end_with_truncated() {
        let bytes = segment(&[b"one", b"two"]);
        for cut in HEADER_LEN + 16..bytes.len() {
            let results: Vec<_> = Frames::new(&bytes[..cut]).collect();
            assert!(results[0].is_ok(), "cut {cut}");
            let last = results.last().unwrap();
            assert!(matches!(last, Err(FrameProblem::Truncated { .. })), "cut {cut}");
        }
    }

    #[test]
    fn frames_with_flipped_body_byte_report_failed_check() {
        let mut bytes = segment(&[b"one", b"two"]);
        let last = bytes.len() - 1;
        bytes[last] ^= 0x20;
        let frames: Vec<_> = Frames::new(&bytes).map(|frame| frame.unwrap()).collect();
        assert!(frames[0].check_ok);
        assert!(!frames[1].check_ok);
    }

    #[test]
    fn frames_with_zero_length_end_with_bad_length() {
        let mut bytes = segment(&[b"one"]);
        bytes.extend_from_slice(&[0u8; 40]);
        let last = Frames::new(&bytes).last().unwrap();
        assert!(matches!(last, Err(FrameProblem::BadLength { length: 0, .. })));
    }

    #[test]
    fn parse_header_with_wrong_magic_returns_error() {
        let mut bytes = segment(&[]);
        bytes[0] = b'X';
        assert!(matches!(
            parse_header(Path::new("x"), &bytes),
            Err(SegmentError::ParseHeader { reason: "wrong magic", .. })
        ));
    }

    #[test]
    fn parse_segment_name_of_bad_names_returns_error() {
        assert_eq!(parse_segment_name(Path::new("log/00000000000000000042.seg")).unwrap(), 42);
        for name in ["42.seg", "0000000000000000004x.seg", "00000000000000000042.log"] {
            assert!(parse_segment_name(Path::new(name)).is_err(), "{name}");
        }
    }
}

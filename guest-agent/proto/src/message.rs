//! Message types, their kind numbers and their bodies (postcard, or raw bytes for bulk data).
//!
//! Kind numbers are the wire identity of a message: never reuse or renumber one; add new
//! kinds instead. Structs are encoded with postcard, so a field can only be added together
//! with a new protocol version.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

/// Kind numbers, grouped by area.
pub mod kind {
    pub const HELLO: u16 = 1;
    pub const PING: u16 = 2;
    pub const PONG: u16 = 3;
    pub const HEARTBEAT: u16 = 4;
    pub const ERROR: u16 = 5;
    pub const DONE: u16 = 6;

    pub const EXEC: u16 = 16;
    pub const STDOUT: u16 = 17;
    pub const STDERR: u16 = 18;
    pub const EXEC_EXIT: u16 = 19;
    pub const KILL: u16 = 20;

    pub const PUT_FILE: u16 = 32;
    pub const GET_FILE: u16 = 33;
    pub const FILE_INFO: u16 = 34;
    pub const DATA: u16 = 35;
    pub const END: u16 = 36;
    pub const CREDIT: u16 = 37;

    pub const STAT: u16 = 48;
    pub const STAT_REPLY: u16 = 49;
    pub const LIST_DIR: u16 = 50;
    pub const DIR_ENTRIES: u16 = 51;
    pub const REMOVE: u16 = 52;
}

/// Errors turning messages into bodies and back.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// postcard could not encode the message.
    #[error("encoding a kind {kind} message failed")]
    EncodeBody {
        kind: u16,
        #[source]
        source: postcard::Error,
    },
    /// The encoded body is larger than a frame may carry.
    #[error("kind {kind} message body of {len} bytes is larger than the frame limit")]
    EncodeSize { kind: u16, len: usize },
    /// The body does not decode as the message its kind names.
    #[error("kind {kind} message body does not decode")]
    DecodeBody {
        kind: u16,
        #[source]
        source: postcard::Error,
    },
    /// The kind is not one this side knows (a newer peer, or garbage).
    #[error("unknown message kind {kind}")]
    DecodeKind { kind: u16 },
}

impl MessageError {
    /// The error code to answer the offending request with.
    pub fn code(&self) -> ErrorCode {
        match self {
            MessageError::EncodeBody { .. } | MessageError::DecodeBody { .. } => ErrorCode::MALFORMED,
            MessageError::EncodeSize { .. } => ErrorCode::TOO_LARGE,
            MessageError::DecodeKind { .. } => ErrorCode::UNKNOWN_KIND,
        }
    }
}

/// Opens a connection in both directions: who is speaking, and which protocol version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    /// Program name and version, e.g. "carrel-guest-agent 0.1.0".
    pub name: String,
    /// Operating system, e.g. "linux 6.8.0 x86_64" or "desk".
    pub os: String,
}

/// A round-trip probe; answered with `Pong` carrying the same nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    pub nonce: u64,
}

/// Sent by the guest with id 0 when a connection opens and every second after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// 0 for the first heartbeat of a connection, then +1 each time.
    pub seq: u64,
    /// Time since the guest booted.
    pub uptime_ms: u64,
}

/// Why a request failed. A number rather than an enum so a peer can receive codes newer
/// than itself; [`ErrorCode::name`] names the known ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    pub const VERSION_MISMATCH: ErrorCode = ErrorCode(1);
    pub const UNKNOWN_KIND: ErrorCode = ErrorCode(2);
    pub const MALFORMED: ErrorCode = ErrorCode(3);
    pub const TOO_LARGE: ErrorCode = ErrorCode(4);
    pub const UNEXPECTED: ErrorCode = ErrorCode(5);
    pub const UNKNOWN_REQUEST: ErrorCode = ErrorCode(6);
    pub const BUSY: ErrorCode = ErrorCode(7);
    pub const DUPLICATE_ID: ErrorCode = ErrorCode(8);
    pub const NOT_FOUND: ErrorCode = ErrorCode(16);
    pub const PERMISSION_DENIED: ErrorCode = ErrorCode(17);
    pub const PATH_ESCAPES_ROOT: ErrorCode = ErrorCode(18);
    pub const INVALID_PATH: ErrorCode = ErrorCode(19);
    pub const IO: ErrorCode = ErrorCode(20);
    pub const DIGEST_MISMATCH: ErrorCode = ErrorCode(21);
    pub const SIZE_MISMATCH: ErrorCode = ErrorCode(22);
    pub const FLOW_CONTROL: ErrorCode = ErrorCode(23);
    pub const SPAWN_FAILED: ErrorCode = ErrorCode(24);
    pub const ALREADY_EXISTS: ErrorCode = ErrorCode(25);
    pub const NOT_A_DIRECTORY: ErrorCode = ErrorCode(26);
    pub const IS_A_DIRECTORY: ErrorCode = ErrorCode(27);
    pub const DIRECTORY_NOT_EMPTY: ErrorCode = ErrorCode(28);
    pub const CANCELLED: ErrorCode = ErrorCode(29);

    /// The code's name, or "unknown" for codes newer than this crate.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::VERSION_MISMATCH => "version mismatch",
            ErrorCode::UNKNOWN_KIND => "unknown message kind",
            ErrorCode::MALFORMED => "malformed message",
            ErrorCode::TOO_LARGE => "frame too large",
            ErrorCode::UNEXPECTED => "unexpected message",
            ErrorCode::UNKNOWN_REQUEST => "unknown request id",
            ErrorCode::BUSY => "too many requests in flight",
            ErrorCode::DUPLICATE_ID => "request id already in use",
            ErrorCode::NOT_FOUND => "not found",
            ErrorCode::PERMISSION_DENIED => "permission denied",
            ErrorCode::PATH_ESCAPES_ROOT => "path escapes the agent's root",
            ErrorCode::INVALID_PATH => "invalid path",
            ErrorCode::IO => "I/O error",
            ErrorCode::DIGEST_MISMATCH => "digest mismatch",
            ErrorCode::SIZE_MISMATCH => "size mismatch",
            ErrorCode::FLOW_CONTROL => "flow control violated",
            ErrorCode::SPAWN_FAILED => "spawn failed",
            ErrorCode::ALREADY_EXISTS => "already exists",
            ErrorCode::NOT_A_DIRECTORY => "not a directory",
            ErrorCode::IS_A_DIRECTORY => "is a directory",
            ErrorCode::DIRECTORY_NOT_EMPTY => "directory not empty",
            ErrorCode::CANCELLED => "cancelled",
            _ => "unknown",
        }
    }
}

/// The failure answer to a request; ends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    /// Human-readable detail: what failed and, where it helps, what to do.
    pub message: String,
}

/// Run a program. Output comes back as `Stdout`/`Stderr` chunks, then `ExecExit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    /// Program and arguments; the program is looked up in PATH.
    pub argv: Vec<String>,
    /// Variables set on top of the agent's environment (or instead of it: `clear_env`).
    pub env: Vec<(String, String)>,
    pub clear_env: bool,
    /// Working directory; the agent's own when `None`.
    pub cwd: Option<String>,
    /// Bytes written to stdin, which is then closed (at most [`crate::MAX_STDIN`]).
    pub stdin: Vec<u8>,
    /// Kill the command's process group after this long.
    pub timeout_ms: Option<u64>,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecExit {
    /// Exit code when it exited.
    pub code: Option<i32>,
    /// Signal number when a signal ended it.
    pub signal: Option<i32>,
    /// The agent killed it because its timeout passed.
    pub timed_out: bool,
}

/// Kill a running exec (SIGKILL to its process group) or abort a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kill {
    /// The request id of the exec or transfer.
    pub target: u32,
}

/// Start writing a file on the guest. The guest answers with the first `Credit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutFile {
    pub path: String,
    /// Bytes that will follow; checked at `End`.
    pub size: u64,
    /// Permission bits of the new file.
    pub mode: u32,
}

/// Start reading a file from the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetFile {
    pub path: String,
    /// Chunks the guest may send before the first `Credit` (at most [`crate::MAX_WINDOW`]).
    pub window: u32,
}

/// The guest's first answer to `GetFile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub size: u64,
    pub mode: u32,
}

/// The end of a transfer's data: total size and blake3 digest of all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub size: u64,
    pub digest: [u8; 32],
}

/// The receiver of a transfer allows the sender `chunks` more `Data` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    pub chunks: u32,
}

/// A request naming one path (`Stat`, `ListDir`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathRequest {
    pub path: String,
}

/// What a directory entry or a stat names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// The answer to `Stat`. Symlinks are not followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime_secs: i64,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
}

/// Part of a directory listing; large directories take several frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntries {
    pub entries: Vec<DirEntry>,
    /// True on the last part.
    pub done: bool,
}

/// Remove a file, a symlink, or a directory (`recursive` for a non-empty one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remove {
    pub path: String,
    pub recursive: bool,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Ping(Ping),
    Pong(Ping),
    Heartbeat(Heartbeat),
    Error(ErrorReply),
    /// Generic success of a request that returns nothing else.
    Done,
    Exec(Exec),
    /// Raw bytes of a command's stdout.
    Stdout(Vec<u8>),
    /// Raw bytes of a command's stderr.
    Stderr(Vec<u8>),
    ExecExit(ExecExit),
    Kill(Kill),
    PutFile(PutFile),
    GetFile(GetFile),
    FileInfo(FileInfo),
    /// Raw bytes of a file transfer, at most [`crate::MAX_CHUNK`].
    Data(Vec<u8>),
    End(End),
    Credit(Credit),
    Stat(PathRequest),
    StatReply(FileStat),
    ListDir(PathRequest),
    DirEntries(DirEntries),
    Remove(Remove),
}

impl Message {
    /// The kind number on the wire.
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello(_) => kind::HELLO,
            Message::Ping(_) => kind::PING,
            Message::Pong(_) => kind::PONG,
            Message::Heartbeat(_) => kind::HEARTBEAT,
            Message::Error(_) => kind::ERROR,
            Message::Done => kind::DONE,
            Message::Exec(_) => kind::EXEC,
            Message::Stdout(_) => kind::STDOUT,
            Message::Stderr(_) => kind::STDERR,
            Message::ExecExit(_) => kind::EXEC_EXIT,
            Message::Kill(_) => kind::KILL,
            Message::PutFile(_) => kind::PUT_FILE,
            Message::GetFile(_) => kind::GET_FILE,
            Message::FileInfo(_) => kind::FILE_INFO,
            Message::Data(_) => kind::DATA,
            Message::End(_) => kind::END,
            Message::Credit(_) => kind::CREDIT,
            Message::Stat(_) => kind::STAT,
            Message::StatReply(_) => kind::STAT_REPLY,
            Message::ListDir(_) => kind::LIST_DIR,
            Message::DirEntries(_) => kind::DIR_ENTRIES,
            Message::Remove(_) => kind::REMOVE,
        }
    }

    /// A short error answer.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Message {
        Message::Error(ErrorReply { code, message: message.into() })
    }

    /// Appends the body (without header) to `out`.
    pub fn encode_body_into(&self, out: &mut Vec<u8>) -> Result<(), MessageError> {
        fn put<T: Serialize>(kind: u16, value: &T, out: &mut Vec<u8>) -> Result<(), MessageError> {
            let body = postcard::to_allocvec(value).map_err(|source| MessageError::EncodeBody { kind, source })?;
            out.extend_from_slice(&body);
            Ok(())
        }
        let kind = self.kind();
        match self {
            Message::Hello(m) => put(kind, m, out),
            Message::Ping(m) | Message::Pong(m) => put(kind, m, out),
            Message::Heartbeat(m) => put(kind, m, out),
            Message::Error(m) => put(kind, m, out),
            Message::Done => Ok(()),
            Message::Exec(m) => put(kind, m, out),
            Message::Stdout(bytes) | Message::Stderr(bytes) | Message::Data(bytes) => {
                out.extend_from_slice(bytes);
                Ok(())
            }
            Message::ExecExit(m) => put(kind, m, out),
            Message::Kill(m) => put(kind, m, out),
            Message::PutFile(m) => put(kind, m, out),
            Message::GetFile(m) => put(kind, m, out),
            Message::FileInfo(m) => put(kind, m, out),
            Message::End(m) => put(kind, m, out),
            Message::Credit(m) => put(kind, m, out),
            Message::Stat(m) | Message::ListDir(m) => put(kind, m, out),
            Message::StatReply(m) => put(kind, m, out),
            Message::DirEntries(m) => put(kind, m, out),
            Message::Remove(m) => put(kind, m, out),
        }
    }

    /// Decodes a body of the given kind. Raw-byte kinds take `body` without copying.
    pub fn decode(kind: u16, body: Vec<u8>) -> Result<Message, MessageError> {
        fn get<'a, T: Deserialize<'a>>(kind: u16, body: &'a [u8]) -> Result<T, MessageError> {
            postcard::from_bytes(body).map_err(|source| MessageError::DecodeBody { kind, source })
        }
        Ok(match kind {
            kind::HELLO => Message::Hello(get(kind, &body)?),
            kind::PING => Message::Ping(get(kind, &body)?),
            kind::PONG => Message::Pong(get(kind, &body)?),
            kind::HEARTBEAT => Message::Heartbeat(get(kind, &body)?),
            kind::ERROR => Message::Error(get(kind, &body)?),
            kind::DONE => Message::Done,
            kind::EXEC => Message::Exec(get(kind, &body)?),
            kind::STDOUT => Message::Stdout(body),
            kind::STDERR => Message::Stderr(body),
            kind::EXEC_EXIT => Message::ExecExit(get(kind, &body)?),
            kind::KILL => Message::Kill(get(kind, &body)?),
            kind::PUT_FILE => Message::PutFile(get(kind, &body)?),
            kind::GET_FILE => Message::GetFile(get(kind, &body)?),
            kind::FILE_INFO => Message::FileInfo(get(kind, &body)?),
            kind::DATA => Message::Data(body),
            kind::END => Message::End(get(kind, &body)?),
            kind::CREDIT => Message::Credit(get(kind, &body)?),
            kind::STAT => Message::Stat(get(kind, &body)?),
            kind::STAT_REPLY => Message::StatReply(get(kind, &body)?),
            kind::LIST_DIR => Message::ListDir(get(kind, &body)?),
            kind::DIR_ENTRIES => Message::DirEntries(get(kind, &body)?),
            kind::REMOVE => Message::Remove(get(kind, &body)?),
            _ => return Err(MessageError::DecodeKind { kind }),
        })
    }
}

#[cfg(test)]
mod tests {
    use alloc::string::ToString;
    use alloc::vec;

    use super::*;
    use crate::frame::{encode_frame, FrameDecoder};

    fn samples() -> Vec<Message> {
        let path = || "/tmp/a b/ünïcode".to_string();
        vec![
            Message::Hello(Hello { protocol_version: 1, name: "agent 0.1".into(), os: "linux".into() }),
            Message::Ping(Ping { nonce: u64::MAX }),
            Message::Pong(Ping { nonce: 0 }),
            Message::Heartbeat(Heartbeat { seq: 12, uptime_ms: 3_600_000 }),
            Message::error(ErrorCode::PATH_ESCAPES_ROOT, "../etc/passwd"),
            Message::Done,
            Message::Exec(Exec {
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec![("A".into(), "1".into())],
                clear_env: true,
                cwd: Some("/".into()),
                stdin: vec![1, 2, 3],
                timeout_ms: Some(500),
            }),
            Message::Exec(Exec::default()),
            Message::Stdout(b"out".to_vec()),
            Message::Stderr(Vec::new()),
            Message::ExecExit(ExecExit { code: Some(-1), signal: None, timed_out: false }),
            Message::ExecExit(ExecExit { code: None, signal: Some(9), timed_out: true }),
            Message::Kill(Kill { target: 77 }),
            Message::PutFile(PutFile { path: path(), size: 1 << 40, mode: 0o644 }),
            Message::GetFile(GetFile { path: path(), window: 16 }),
            Message::FileInfo(FileInfo { size: 5, mode: 0o755 }),
            Message::Data(vec![0xAB; 1000]),
            Message::End(End { size: 1000, digest: [7; 32] }),
            Message::Credit(Credit { chunks: 8 }),
            Message::Stat(PathRequest { path: path() }),
            Message::StatReply(FileStat { kind: FileKind::Symlink, size: 3, mode: 0o777, mtime_secs: -5 }),
            Message::ListDir(PathRequest { path: path() }),
            Message::DirEntries(DirEntries {
                entries: vec![
                    DirEntry { name: "a".into(), kind: FileKind::File, size: 1 },
                    DirEntry { name: "d".into(), kind: FileKind::Dir, size: 0 },
                    DirEntry { name: "p".into(), kind: FileKind::Other, size: 0 },
                ],
                done: true,
            }),
            Message::Remove(Remove { path: path(), recursive: true }),
        ]
    }

    #[test]
    fn every_message_round_trips_through_a_frame() {
        let messages = samples();
        let mut kinds: Vec<u16> = messages.iter().map(Message::kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), 22, "every kind has a sample");
        for (index, message) in messages.into_iter().enumerate() {
            let bytes = encode_frame(index as u32 + 1, &message).unwrap();
            let mut input = &bytes[..];
            let frame = FrameDecoder::new().decode(&mut input).unwrap().unwrap();
            assert!(input.is_empty());
            assert_eq!(frame.id, index as u32 + 1);
            assert_eq!(frame.kind, message.kind());
            assert_eq!(frame.into_message().unwrap(), message);
        }
    }

    #[test]
    fn decode_unknown_kind_returns_kind_error() {
        let error = Message::decode(999, vec![1, 2]).unwrap_err();
        assert!(matches!(error, MessageError::DecodeKind { kind: 999 }));
        assert_eq!(error.code(), ErrorCode::UNKNOWN_KIND);
    }

    #[test]
    fn decode_truncated_body_returns_body_error() {
        let mut body = Vec::new();
        Message::Hello(Hello { protocol_version: 1, name: "x".into(), os: "y".into() })
            .encode_body_into(&mut body)
            .unwrap();
        body.pop();
        let error = Message::decode(kind::HELLO, body).unwrap_err();
        assert!(matches!(error, MessageError::DecodeBody { kind: kind::HELLO, .. }));
        assert_eq!(error.code(), ErrorCode::MALFORMED);
    }

    #[test]
    fn decode_invalid_utf8_path_returns_body_error() {
        let body = vec![2, 0xFF, 0xFE];
        assert!(matches!(Message::decode(kind::STAT, body), Err(MessageError::DecodeBody { .. })));
    }

    #[test]
    fn error_code_unknown_to_this_crate_has_a_name() {
        assert_eq!(ErrorCode(60000).name(), "unknown");
        assert_eq!(ErrorCode::DIGEST_MISMATCH.name(), "digest mismatch");
    }
}

//! The VM control protocol: the requests and answers on a VM's control socket, their
//! framing, and the client. A frame is a little-endian u32 length and a postcard body;
//! each connection carries request/response pairs in order (file transfers add their data
//! frames between a request and its answer). The daemon and the CLI speak this; the
//! services answer it; the server (`super::server`) only moves frames.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Largest request accepted: requests are small; anything bigger is not ours.
pub const MAX_REQUEST_BYTES: u32 = 1 << 20;
/// Largest response accepted by the client (screenshots come later and are large).
pub const MAX_RESPONSE_BYTES: u32 = 256 << 20;

/// What a client may ask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Status,
    Stop,
    /// Stop running the guest's vCPUs (devices keep serving); `Resume` goes on.
    Pause,
    Resume,
    Screenshot(ScreenshotRequest),
    Agent(AgentRequest),
    Input(InputRequest),
    /// Save the whole VM into a new snapshot directory; with `hibernate`, end the VM once
    /// the snapshot is on disk.
    Snapshot(SnapshotRequest),
    /// Bytes for the guest's serial console, as if typed on it.
    ConsoleInput(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The rest of this connection's requests are made for this caller (pid, uid, gid),
    /// and are audited as theirs: the daemon forwarding a client's calls says whose they
    /// are. Only root may say so.
    ActFor {
        pid: i32,
        uid: u32,
        gid: u32,
    },
    /// How far the snapshot being written is, answered on the connection thread while
    /// the VMM thread writes it. Not audited: it reads nothing of the guest and changes
    /// nothing (the snapshot itself is on the record).
    SnapshotProgress,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    pub dir: PathBuf,
    pub hibernate: bool,
    /// Only what changed since the VM's last snapshot (or the one it was restored from).
    #[serde(default)]
    pub diff: bool,
}

/// The VMM's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Status(VmStatus),
    Stopping,
    Paused,
    Resumed,
    Screenshot(Screenshot),
    Agent(AgentResponse),
    Input(InputResult),
    Snapshot(crate::snapshot::SnapshotInfo),
    /// Console input taken: this many bytes.
    ConsoleInput(usize),
    /// The connection now acts for the caller an `ActFor` named.
    ActingFor,
    Error(Failure),
    /// `None` when no snapshot is being written.
    SnapshotProgress(Option<SnapshotProgress>),
}

/// A snapshot being written: bytes of guest memory looked at so far, of the total (0 of 0
/// until the memory image begins; zero pages are looked at but not written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// An action on the keyboard or mouse, then optionally a wait and a screenshot: one call
/// does "act, then look".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRequest {
    pub action: crate::input::Action,
    /// What to wait for after the action; `FrameAfter(0)` means "the next frame after the
    /// one on screen when the action started". `None` returns at once.
    pub wait: Option<Wait>,
    /// Capture the screen after the wait.
    pub screenshot: Option<ImageFormat>,
    pub timeout_ms: u64,
    /// Key and button hold time, and the gap between keystrokes; defaults when `None`.
    pub hold_ms: Option<u64>,
    pub gap_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputResult {
    /// The frame on screen when the wait ended (or at once without a wait).
    pub frame: Option<u64>,
    /// The wait ended at its timeout: the action was done but nothing new was drawn.
    pub timed_out: bool,
    pub screenshot: Option<Screenshot>,
}

/// What kind of failure an error answer is, so a client (the daemon) can act on it and
/// map it to a precise status (these follow gRPC's codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request itself is wrong: a bad frame, coordinates off the screen, an unknown key.
    InvalidArgument,
    /// What the request names does not exist (a guest file, a snapshot).
    NotFound,
    /// What the request would make exists already.
    AlreadyExists,
    /// Refused in the VM's present state or configuration (no screen, no parent snapshot).
    FailedPrecondition,
    /// The wait ended before what it waited for happened.
    DeadlineExceeded,
    /// A part of the VM cannot be reached now (the guest agent, the GPU backend); retry.
    Unavailable,
    /// Not enough room (disk space for a snapshot).
    ResourceExhausted,
    /// The guest refused it for lack of rights.
    PermissionDenied,
    /// Broken off midway (a transfer whose client hung up).
    Aborted,
    /// Not built.
    Unimplemented,
    /// Something in the VMM failed (the audit log, KVM).
    Internal,
}

/// An error answer: its kind and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Failure {
        Failure { kind, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(ErrorKind::InvalidArgument, message)
    }

    pub fn precondition(message: impl Into<String>) -> Failure {
        Failure::new(ErrorKind::FailedPrecondition, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Failure {
        Failure::new(ErrorKind::Unavailable, message)
    }

    pub fn internal(message: impl Into<String>) -> Failure {
        Failure::new(ErrorKind::Internal, message)
    }
}

impl Response {
    /// An error answer of `kind`.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response::Error(Failure::new(kind, message))
    }
}

/// A request for the guest agent. Files travel as bytes on the control connection: the
/// VMM never opens a path a client names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentRequest {
    Ping,
    Exec(AgentExec),
    /// Followed on the same connection by [`AgentRequest::Data`] frames that hold exactly
    /// `size` bytes; answered by `Done` (bytes, blake3) or an error once they are in.
    Put {
        remote: String,
        size: u64,
        mode: u32,
    },
    /// Answered by `FileStart`, then [`AgentResponse::Data`] frames, then `Done` (bytes,
    /// blake3) or an error.
    Get {
        remote: String,
    },
    List {
        path: String,
    },
    Remove {
        path: String,
        recursive: bool,
    },
    /// A piece of a put's file, at most [`TRANSFER_CHUNK`] bytes.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// The most file bytes one `Data` frame carries.
pub const TRANSFER_CHUNK: usize = 256 << 10;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentExec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    #[serde(with = "serde_bytes")]
    pub stdin: Vec<u8>,
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentResponse {
    Pong {
        rtt_us: u64,
    },
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
    },
    /// A transfer or removal finished: bytes moved and their blake3 (hex).
    Done {
        bytes: u64,
        digest: String,
    },
    Entries(Vec<AgentEntry>),
    /// A get's file is coming: its size and mode; `Data` frames follow.
    FileStart {
        size: u64,
        mode: u32,
    },
    /// A piece of a get's file.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEntry {
    pub name: String,
    pub directory: bool,
    pub size: u64,
}

/// How a screenshot is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageFormat {
    Png,
    Qoi,
    /// The scanout's pixels as they are, rows `stride` bytes apart.
    Raw,
}

/// What to wait for before capturing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Wait {
    /// Only for the guest's first frame, if it has drawn none yet.
    FirstFrame,
    /// For a frame numbered above this one.
    FrameAfter(u64),
    /// Until the screen has been still (no new frame) for this many milliseconds.
    StillFor(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScreenshotRequest {
    pub format: ImageFormat,
    /// x, y, width, height in screen pixels.
    pub crop: Option<[u32; 4]>,
    /// Output width and height.
    pub scale: Option<[u32; 2]>,
    pub cursor: bool,
    pub wait: Wait,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Screenshot {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    /// Bytes per row of raw pixels; 0 for encoded images.
    pub stride: u32,
    /// Layout of raw pixels, e.g. "B8G8R8X8".
    pub pixel_format: String,
    /// The last frame the guest had finished when the capture started.
    pub frame: u64,
    /// As one block on the wire, not byte by byte.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// What `status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// "hardware" or "pvm".
    pub platform: String,
    pub state: String,
    pub boot_protocol: String,
    pub kernel: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub uptime_ms: u64,
    pub devices: Vec<String>,
    pub pid: u32,
    /// Whether the screen is read in place from guest memory (None: no scanout, or a
    /// screen in another process).
    #[serde(default)]
    pub zero_copy_screen: Option<bool>,
    /// Whether guest RAM is still being filled from a snapshot (a lazy restore).
    #[serde(default)]
    pub memory_loading: bool,
}

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on control socket {path}: {source}")]
    Bind { path: String, source: std::io::Error },
    #[error("cannot connect to control socket {path}: {source}. Is the VM running with --socket {path}?")]
    Connect { path: String, source: std::io::Error },
    #[error("control socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {len} bytes is larger than the {max} allowed")]
    FrameTooLarge { len: u32, max: u32 },
    #[error("malformed frame: {0}")]
    Decode(#[from] postcard::Error),
}

/// Writes one frame, its length and body in one write: a reader woken by the length
/// finds the body with it (one wakeup and one read, not two).
pub fn write_frame<T: Serialize>(stream: &mut impl Write, message: &T) -> Result<(), ControlError> {
    // Sized first, then serialized straight to the stream: a screenshot's pixels are not
    // copied into a frame on the way (a fresh 4 MiB buffer is ~2 ms of page faults alone).
    let len = postcard::serialize_with_flavor::<T, _, usize>(message, postcard::ser_flavors::Size::default())?;
    let len = u32::try_from(len).map_err(|_| ControlError::FrameTooLarge { len: u32::MAX, max: u32::MAX })?;
    let mut writer = std::io::BufWriter::with_capacity(FRAME_BUFFER_BYTES, stream);
    writer.write_all(&len.to_le_bytes())?;
    postcard::to_io(message, &mut writer)?;
    writer.flush()?;
    Ok(())
}

/// What [`write_frame`] gathers before a write: a whole small frame, one write; a large
/// field (pixels, file data) passes through unbuffered.
const FRAME_BUFFER_BYTES: usize = 16 << 10;

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub fn read_frame<T: for<'de> Deserialize<'de>>(stream: &mut impl Read, max: u32) -> Result<Option<T>, ControlError> {
    match read_body(stream, max)? {
        Some(body) => Ok(Some(postcard::from_bytes(&body)?)),
        None => Ok(None),
    }
}

/// Reads one answer, as [`read_frame`] does, with a screenshot's pixels left where they
/// were read ([`decode_response`]).
pub fn read_response(stream: &mut impl Read, max: u32) -> Result<Option<Response>, ControlError> {
    read_body(stream, max)?.map(|body| decode_response(body, 0)).transpose()
}

/// The body of one frame; `Ok(None)` at a clean end of stream.
fn read_body(stream: &mut impl Read, max: u32) -> Result<Option<Vec<u8>>, ControlError> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err.into()),
    }
    let len = u32::from_le_bytes(len);
    if len > max {
        return Err(ControlError::FrameTooLarge { len, max });
    }
    // Read into spare capacity: a screenshot's 4 MB are not zeroed first only to be
    // written over (std reads a socket into uninitialized memory).
    let mut body = Vec::with_capacity(len as usize);
    stream.take(u64::from(len)).read_to_end(&mut body)?;
    if body.len() != len as usize {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(Some(body))
}

/// postcard's tag of [`Response::Screenshot`]: its index, a one-byte varint.
const SCREENSHOT_TAG: u8 = 4;

/// A screenshot answer as it lies in a frame's body, its pixels borrowed.
#[derive(Deserialize)]
struct ScreenshotView<'a> {
    format: ImageFormat,
    width: u32,
    height: u32,
    stride: u32,
    pixel_format: String,
    frame: u64,
    #[serde(borrow)]
    bytes: &'a [u8],
}

/// The answer in a frame's body, which is `buffer[at..]`. A screenshot's pixels (4 MB
/// raw at 1280x800) become the buffer itself, moved to its front, rather than a copy in a
/// new buffer: on a fresh buffer the page faults alone cost more than the move.
pub fn decode_response(mut buffer: Vec<u8>, at: usize) -> Result<Response, ControlError> {
    let body = buffer.get(at..).unwrap_or_default();
    if body.first() != Some(&SCREENSHOT_TAG) {
        return Ok(postcard::from_bytes(body)?);
    }
    let ScreenshotView { format, width, height, stride, pixel_format, frame, bytes } =
        postcard::from_bytes(&body[1..])?;
    let start = bytes.as_ptr() as usize - buffer.as_ptr() as usize;
    let pixels = start..start + bytes.len();
    buffer.copy_within(pixels.clone(), 0);
    buffer.truncate(pixels.len());
    Ok(Response::Screenshot(Screenshot { format, width, height, stride, pixel_format, frame, bytes: buffer }))
}

/// A client of a VM's control socket.
#[derive(Debug)]
pub struct ControlClient {
    stream: UnixStream,
}

impl ControlClient {
    pub fn connect(path: &Path) -> Result<ControlClient, ControlError> {
        let stream = UnixStream::connect(path)
            .map_err(|source| ControlError::Connect { path: path.display().to_string(), source })?;
        Ok(ControlClient { stream })
    }

    /// Sends `request` and waits up to `timeout` for the answer.
    pub fn call(&mut self, request: &Request, timeout: Duration) -> Result<Response, ControlError> {
        self.stream.set_read_timeout(Some(timeout))?;
        write_frame(&mut self.stream, request)?;
        self.answer()
    }

    fn answer(&mut self) -> Result<Response, ControlError> {
        read_response(&mut self.stream, MAX_RESPONSE_BYTES)?.ok_or_else(|| {
            ControlError::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "VM closed the connection"))
        })
    }

    /// Puts `size` bytes from `reader` at `remote` in the guest, streamed over this
    /// connection; the answer is `Done` or an error.
    pub fn put(
        &mut self,
        reader: &mut dyn Read,
        size: u64,
        mode: u32,
        remote: &str,
        timeout: Duration,
    ) -> Result<Response, ControlError> {
        self.stream.set_read_timeout(Some(timeout))?;
        write_frame(&mut self.stream, &Request::Agent(AgentRequest::Put { remote: remote.into(), size, mode }))?;
        let mut buffer = vec![0u8; TRANSFER_CHUNK];
        let mut left = size;
        while left > 0 {
            let want = (left as usize).min(TRANSFER_CHUNK);
            let got = reader.read(&mut buffer[..want])?;
            if got == 0 {
                return Err(ControlError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the local file ended {left} bytes early"),
                )));
            }
            write_frame(&mut self.stream, &Request::Agent(AgentRequest::Data(buffer[..got].to_vec())))?;
            left -= got as u64;
        }
        self.answer()
    }

    /// Gets `remote` from the guest: `open(size, mode)` gives the writer once the file's
    /// size is known; the answer is `Done` or an error (the writer may then hold part).
    pub fn get<'w>(
        &mut self,
        remote: &str,
        open: impl FnOnce(u64, u32) -> std::io::Result<&'w mut dyn Write>,
        timeout: Duration,
    ) -> Result<Response, ControlError> {
        self.stream.set_read_timeout(Some(timeout))?;
        write_frame(&mut self.stream, &Request::Agent(AgentRequest::Get { remote: remote.into() }))?;
        let writer = match self.answer()? {
            Response::Agent(AgentResponse::FileStart { size, mode }) => open(size, mode)?,
            other => return Ok(other),
        };
        loop {
            match self.answer()? {
                Response::Agent(AgentResponse::Data(bytes)) => writer.write_all(&bytes)?,
                other => {
                    writer.flush()?;
                    return Ok(other);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_whose_body_ends_early_is_an_error_not_an_answer() {
        let mut buffer = Vec::new();
        write_frame(&mut buffer, &Request::Stop).unwrap();
        write_frame(&mut buffer, &Request::Stop).unwrap();
        buffer.pop();
        let mut reader = buffer.as_slice();
        assert_eq!(read_frame::<Request>(&mut reader, MAX_REQUEST_BYTES).unwrap(), Some(Request::Stop));
        let error = read_frame::<Request>(&mut reader, MAX_REQUEST_BYTES).unwrap_err();
        assert!(matches!(&error, ControlError::Io(err) if err.kind() == std::io::ErrorKind::UnexpectedEof), "{error}");
    }

    #[test]
    fn frame_round_trips_request_and_response() {
        let mut buffer = Vec::new();
        write_frame(&mut buffer, &Request::Stop).unwrap();
        let status = Response::Status(VmStatus {
            platform: "pvm".into(),
            state: "running".into(),
            boot_protocol: "desk".into(),
            kernel: "k".into(),
            vcpus: 1,
            mem_mib: 128,
            uptime_ms: 5,
            devices: vec!["rng".into()],
            pid: 1,
            zero_copy_screen: Some(true),
            memory_loading: false,
        });
        write_frame(&mut buffer, &status).unwrap();
        let mut reader = buffer.as_slice();
        assert_eq!(read_frame::<Request>(&mut reader, MAX_REQUEST_BYTES).unwrap(), Some(Request::Stop));
        assert_eq!(read_frame::<Response>(&mut reader, MAX_REQUEST_BYTES).unwrap(), Some(status));
        assert_eq!(read_frame::<Request>(&mut reader, MAX_REQUEST_BYTES).unwrap(), None);
    }

    fn screenshot(bytes: Vec<u8>) -> Response {
        Response::Screenshot(Screenshot {
            format: ImageFormat::Raw,
            width: 3,
            height: 2,
            stride: 12,
            pixel_format: "B8G8R8X8".into(),
            frame: 300,
            bytes,
        })
    }

    /// A screenshot answer read with its pixels moved, not copied, is the answer that was
    /// written, whatever its pixels; other answers read as read_frame reads them.
    #[test]
    fn answers_read_without_copying_pixels_are_the_answers_written() {
        assert_eq!(postcard::to_allocvec(&screenshot(Vec::new())).unwrap()[0], SCREENSHOT_TAG);
        let pixels: Vec<u8> = (0..4 * 1280 * 800u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let answers = [
            screenshot(pixels),
            screenshot(Vec::new()),
            screenshot(vec![SCREENSHOT_TAG; 200]),
            Response::Error(Failure::invalid("no")),
            Response::Stopping,
        ];
        let mut buffer = Vec::new();
        for answer in &answers {
            write_frame(&mut buffer, answer).unwrap();
        }
        let mut reader = buffer.as_slice();
        for answer in answers {
            assert_eq!(read_response(&mut reader, MAX_RESPONSE_BYTES).unwrap(), Some(answer));
        }
        assert_eq!(read_response(&mut reader, MAX_RESPONSE_BYTES).unwrap(), None);
    }

    /// A screenshot answer cut short anywhere, or with garbage after its tag, is a decode
    /// error, never a panic or pixels from outside the frame.
    #[test]
    fn damaged_screenshot_answers_are_decode_errors() {
        let whole = postcard::to_allocvec(&screenshot(vec![7; 64])).unwrap();
        for len in 1..whole.len() {
            assert!(matches!(decode_response(whole[..len].to_vec(), 0), Err(ControlError::Decode(_))), "cut at {len}");
        }
        assert!(matches!(decode_response(vec![SCREENSHOT_TAG, 0xff, 0xff, 0xff], 0), Err(ControlError::Decode(_))));
        // A body further into its buffer (carreld keeps the length in front).
        let mut framed = vec![9, 9, 9, 9];
        framed.extend_from_slice(&whole);
        assert_eq!(decode_response(framed, 4).unwrap(), screenshot(vec![7; 64]));
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let bytes = u32::MAX.to_le_bytes();
        let result = read_frame::<Request>(&mut bytes.as_slice(), MAX_REQUEST_BYTES);
        assert!(matches!(result, Err(ControlError::FrameTooLarge { .. })));
    }

    #[test]
    fn garbage_body_is_a_decode_error() {
        let mut bytes = 2u32.to_le_bytes().to_vec();
        bytes.extend([0xff, 0xff]);
        assert!(matches!(read_frame::<Request>(&mut bytes.as_slice(), 16), Err(ControlError::Decode(_))));
    }

    #[test]
    fn truncated_body_is_an_io_error() {
        let mut bytes = 8u32.to_le_bytes().to_vec();
        bytes.extend([0, 1]);
        assert!(matches!(read_frame::<Request>(&mut bytes.as_slice(), 16), Err(ControlError::Io(_))));
    }

    #[test]
    fn random_and_mutated_request_frames_never_panic() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut valid = Vec::new();
        write_frame(&mut valid, &Request::Status).unwrap();
        let mut decoded = 0;
        for _ in 0..20_000 {
            let mut bytes = if next() % 2 == 0 {
                let len = (next() % 64) as usize;
                let mut bytes = (len as u32).to_le_bytes().to_vec();
                bytes.extend((0..len).map(|_| next() as u8));
                bytes
            } else {
                let mut bytes = valid.clone();
                let index = (next() as usize) % bytes.len();
                bytes[index] ^= (next() as u8) | 1;
                bytes
            };
            bytes.truncate((next() as usize) % (bytes.len() + 1));
            if let Ok(Some(_)) = read_frame::<Request>(&mut bytes.as_slice(), MAX_REQUEST_BYTES) {
                decoded += 1;
            }
        }
        // Some random frames happen to be valid requests; most must be refused.
        assert!(decoded < 20_000);
    }
}

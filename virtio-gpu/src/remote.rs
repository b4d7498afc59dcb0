//! The screen across a process boundary: a small request/response protocol over a Unix
//! socket, so a VMM can wait for frames and take screenshots of a [`Screen`] that lives in
//! another process (the vhost-user backend, `carrel-gpu-backend`).
//!
//! A frame is a little-endian u32 length and a postcard body. Each connection carries
//! request/response pairs in order; the server answers each connection on its own thread,
//! so a long wait on one connection never holds up a capture on another. A request that
//! cannot be decoded is answered with an error; one whose length is past the cap is answered
//! with an error and the connection is closed, since the next frame cannot be found.
//!
//! [`RemoteScreen`] is the client: the same methods as [`Screen`], with the same types where
//! the socket allows (a frame's time is carried as its age and rebuilt on arrival).

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::capture::{Capture, CaptureFormat, CaptureOptions};
use crate::format::PixelFormat;
use crate::protocol::Rect;
use crate::screen::{Frame, Screen};

/// Largest request accepted: requests are a few dozen bytes.
pub const MAX_REQUEST_BYTES: u32 = 4096;
/// Largest response: a raw capture at the largest scale (8192 x 8192 x 4 bytes) plus room.
pub const MAX_RESPONSE_BYTES: u32 = 257 << 20;
/// Longest wait the server performs, whatever the client asks.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// Most connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How much longer than its wait a client waits for an answer before giving up.
const ANSWER_SLACK: Duration = Duration::from_secs(30);
/// Idle connections a client keeps for the next call.
const MAX_IDLE_CONNECTIONS: usize = 4;

/// Errors talking to a remote screen.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("cannot connect to the screen socket {path}: {source} (is carrel-gpu-backend running with --screen-socket {path}?)")]
    Connect { path: String, source: io::Error },
    #[error("cannot write to the screen socket: {0}")]
    WriteFrame(#[source] io::Error),
    #[error("cannot read from the screen socket: {0}")]
    ReadFrame(#[source] io::Error),
    #[error("a frame of {len} bytes is over the {max}-byte limit")]
    CheckFrameSize { len: u32, max: u32 },
    #[error("cannot decode a frame from the screen socket: {0}")]
    DecodeFrame(#[source] postcard::Error),
    #[error("cannot encode a frame for the screen socket: {0}")]
    EncodeFrame(#[source] postcard::Error),
    #[error("the screen server answered a {asked} request with {got}")]
    CheckResponse { asked: &'static str, got: &'static str },
    #[error("the screen server sent a capture in an unknown pixel format {code}")]
    CheckPixelFormat { code: u32 },
    /// The screen itself failed (no scanout, a wait timed out, a bad crop...): its message.
    #[error("{0}")]
    Screen(String),
}

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    DisplaySize,
    LatestFrame,
    WaitForFrameAfter { after: u64, timeout_ms: u64 },
    WaitUntilStill { still_ms: u64, timeout_ms: u64 },
    Capture(WireCaptureOptions),
}

/// The server's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    DisplaySize { width: u32, height: u32 },
    Frame(Option<WireFrame>),
    Capture(WireCapture),
    Error(String),
}

impl Response {
    fn name(&self) -> &'static str {
        match self {
            Response::DisplaySize { .. } => "a display size",
            Response::Frame(_) => "a frame",
            Response::Capture(_) => "a capture",
            Response::Error(_) => "an error",
        }
    }
}

/// A [`Frame`] on the wire: its time travels as its age when the answer was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireFrame {
    pub number: u64,
    /// x, y, width, height.
    pub damage: [u32; 4],
    pub age_us: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireFormat {
    Raw,
    Png,
    Qoi,
}

/// [`CaptureOptions`] on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireCaptureOptions {
    pub format: WireFormat,
    /// x, y, width, height.
    pub crop: Option<[u32; 4]>,
    pub scale: Option<(u32, u32)>,
    pub cursor: bool,
}

/// A [`Capture`] on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireCapture {
    pub format: WireFormat,
    pub width: u32,
    pub height: u32,
    pub stride: u64,
    /// The virtio code of the pixel format.
    pub pixel_format: u32,
    #[serde(with = "byte_buffer")]
    pub bytes: Vec<u8>,
    pub frame: u64,
}

/// Pixels as one length-prefixed run of bytes, not a sequence of single bytes.
mod byte_buffer {
    use serde::de::{Deserializer, Error, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl Visitor<'_> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("bytes")
            }
            fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
                Ok(bytes.to_vec())
            }
            fn visit_byte_buf<E: Error>(self, bytes: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(bytes)
            }
        }
        deserializer.deserialize_byte_buf(Bytes)
    }
}

fn rect_to_wire(rect: Rect) -> [u32; 4] {
    [rect.x, rect.y, rect.width, rect.height]
}

fn rect_from_wire([x, y, width, height]: [u32; 4]) -> Rect {
    Rect { x, y, width, height }
}

impl From<CaptureFormat> for WireFormat {
    fn from(format: CaptureFormat) -> WireFormat {
        match format {
            CaptureFormat::Raw => WireFormat::Raw,
            CaptureFormat::Png => WireFormat::Png,
            CaptureFormat::Qoi => WireFormat::Qoi,
        }
    }
}

impl From<WireFormat> for CaptureFormat {
    fn from(format: WireFormat) -> CaptureFormat {
        match format {
            WireFormat::Raw => CaptureFormat::Raw,
            WireFormat::Png => CaptureFormat::Png,
            WireFormat::Qoi => CaptureFormat::Qoi,
        }
    }
}

impl From<&CaptureOptions> for WireCaptureOptions {
    fn from(options: &CaptureOptions) -> WireCaptureOptions {
        WireCaptureOptions {
            format: options.format.into(),
            crop: options.crop.map(rect_to_wire),
            scale: options.scale,
            cursor: options.cursor,
        }
    }
}

impl From<WireCaptureOptions> for CaptureOptions {
    fn from(options: WireCaptureOptions) -> CaptureOptions {
        CaptureOptions {
            format: options.format.into(),
            crop: options.crop.map(rect_from_wire),
            scale: options.scale,
            cursor: options.cursor,
        }
    }
}

impl WireFrame {
    fn new(frame: Frame) -> WireFrame {
        let age_us = frame.time.elapsed().as_micros().min(u64::MAX as u128) as u64;
        WireFrame { number: frame.number, damage: rect_to_wire(frame.damage), age_us }
    }

    fn into_frame(self) -> Frame {
        let now = Instant::now();
        let time = now.checked_sub(Duration::from_micros(self.age_us)).unwrap_or(now);
        Frame { number: self.number, damage: rect_from_wire(self.damage), time }
    }
}

/// Writes `message` as one frame: length, then the postcard body.
pub fn write_frame<T: Serialize>(stream: &mut impl Write, message: &T) -> Result<(), RemoteError> {
    let frame = encode_frame(message)?;
    stream.write_all(&frame).map_err(RemoteError::WriteFrame)
}

fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, RemoteError> {
    // Room for the length first, so the frame leaves in one write.
    let mut frame = postcard::to_extend(message, vec![0u8; 4]).map_err(RemoteError::EncodeFrame)?;
    let len =
        u32::try_from(frame.len() - 4).map_err(|_| RemoteError::CheckFrameSize { len: u32::MAX, max: u32::MAX })?;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    Ok(frame)
}

/// Reads one frame's body of at most `max` bytes; `None` at a clean end of stream.
pub fn read_frame(stream: &mut impl Read, max: u32) -> Result<Option<Vec<u8>>, RemoteError> {
    let mut prefix = [0u8; 4];
    match stream.read(&mut prefix[..1]) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(err) => return Err(RemoteError::ReadFrame(err)),
    }
    stream.read_exact(&mut prefix[1..]).map_err(RemoteError::ReadFrame)?;
    let len = u32::from_le_bytes(prefix);
    if len > max {
        return Err(RemoteError::CheckFrameSize { len, max });
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body).map_err(RemoteError::ReadFrame)?;
    Ok(Some(body))
}

/// Serves `screen` on `listener` until accepting fails: each connection on its own thread.
pub fn serve(listener: UnixListener, screen: Arc<Screen>) -> io::Result<()> {
    let connections = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, _) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            connections.fetch_sub(1, Ordering::SeqCst);
            continue; // Dropping the stream closes it.
        }
        let (shared_screen, counter) = (Arc::clone(&screen), Arc::clone(&connections));
        let spawned = std::thread::Builder::new().name("screen-client".into()).spawn(move || {
            serve_connection(stream, &shared_screen);
            counter.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            // The closure (and its stream) is gone with the failed spawn; the count is not.
            connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Answers the requests of one connection until it closes or sends a frame past the cap.
pub fn serve_connection(mut stream: UnixStream, screen: &Screen) {
    loop {
        let response = match read_frame(&mut stream, MAX_REQUEST_BYTES) {
            Ok(Some(body)) => match postcard::from_bytes::<Request>(&body) {
                Ok(request) => answer(screen, request),
                Err(err) => Response::Error(format!("not a screen request: {err}")),
            },
            Ok(None) => return,
            Err(err @ RemoteError::CheckFrameSize { .. }) => {
                let _ = write_response(&mut stream, &Response::Error(err.to_string()));
                return;
            }
            Err(_) => return,
        };
        if write_response(&mut stream, &response).is_err() {
            return;
        }
    }
}

fn write_response(stream: &mut UnixStream, response: &Response) -> Result<(), RemoteError> {
    let frame = encode_frame(response)?;
    let frame = if frame.len() - 4 > MAX_RESPONSE_BYTES as usize {
        let message = format!("the answer of {} bytes is over the {MAX_RESPONSE_BYTES}-byte limit", frame.len() - 4);
        encode_frame(&Response::Error(message))?
    } else {
        frame
    };
    stream.write_all(&frame).map_err(RemoteError::WriteFrame)
}

/// Runs one request against the screen.
pub fn answer(screen: &Screen, request: Request) -> Response {
    let millis = |ms: u64| Duration::from_millis(ms).min(MAX_WAIT);
    let frame = |result: Result<Frame, crate::ScreenError>| match result {
        Ok(frame) => Response::Frame(Some(WireFrame::new(frame))),
        Err(err) => Response::Error(err.to_string()),
    };
    match request {
        Request::DisplaySize => {
            let (width, height) = screen.display_size();
            Response::DisplaySize { width, height }
        }
        Request::LatestFrame => Response::Frame(screen.latest_frame().map(WireFrame::new)),
        Request::WaitForFrameAfter { after, timeout_ms } => {
            frame(screen.wait_for_frame_after(after, millis(timeout_ms)))
        }
        Request::WaitUntilStill { still_ms, timeout_ms } => {
            frame(screen.wait_until_still(millis(still_ms), millis(timeout_ms)))
        }
        Request::Capture(options) => match screen.capture(&options.into()) {
            Ok(capture) => Response::Capture(WireCapture {
                format: capture.format.into(),
                width: capture.width,
                height: capture.height,
                stride: capture.stride as u64,
                pixel_format: capture.pixel_format.virtio_code(),
                bytes: capture.bytes,
                frame: capture.frame,
            }),
            Err(err) => Response::Error(err.to_string()),
        },
    }
}

/// A [`Screen`] in another process, reached through its screen socket. Shareable between
/// threads: each call takes an idle connection (or opens one), so calls run side by side.
#[derive(Debug)]
pub struct RemoteScreen {
    path: PathBuf,
    display: (u32, u32),
    idle: Mutex<Vec<UnixStream>>,
}

impl RemoteScreen {
    /// Connects to the screen socket at `path` and learns the display size.
    pub fn connect(path: impl AsRef<Path>) -> Result<RemoteScreen, RemoteError> {
        let mut screen =
            RemoteScreen { path: path.as_ref().to_path_buf(), display: (0, 0), idle: Mutex::new(Vec::new()) };
        match screen.call(&Request::DisplaySize, Duration::ZERO)? {
            Response::DisplaySize { width, height } => screen.display = (width, height),
            other => return Err(RemoteError::CheckResponse { asked: "display size", got: other.name() }),
        }
        Ok(screen)
    }

    /// The display size offered to the guest (width, height).
    pub fn display_size(&self) -> (u32, u32) {
        self.display
    }

    /// The last finished frame; `None` if the guest never finished one.
    pub fn latest_frame(&self) -> Result<Option<Frame>, RemoteError> {
        match self.call(&Request::LatestFrame, Duration::ZERO)? {
            Response::Frame(frame) => Ok(frame.map(WireFrame::into_frame)),
            other => Err(unexpected("latest frame", other)),
        }
    }

    /// Waits until a frame numbered above `after` exists and returns the latest.
    pub fn wait_for_frame_after(&self, after: u64, timeout: Duration) -> Result<Frame, RemoteError> {
        let request = Request::WaitForFrameAfter { after, timeout_ms: timeout.as_millis() as u64 };
        self.call_for_frame(&request, "wait for frame", timeout)
    }

    /// Waits until no frame has finished for `still` (see [`Screen::wait_until_still`]).
    pub fn wait_until_still(&self, still: Duration, timeout: Duration) -> Result<Frame, RemoteError> {
        let request =
            Request::WaitUntilStill { still_ms: still.as_millis() as u64, timeout_ms: timeout.as_millis() as u64 };
        self.call_for_frame(&request, "wait until still", timeout)
    }

    /// Takes a screenshot as `options` asks.
    pub fn capture(&self, options: &CaptureOptions) -> Result<Capture, RemoteError> {
        match self.call(&Request::Capture(options.into()), Duration::ZERO)? {
            Response::Capture(capture) => Ok(Capture {
                format: capture.format.into(),
                width: capture.width,
                height: capture.height,
                stride: capture.stride as usize,
                pixel_format: PixelFormat::from_virtio(capture.pixel_format)
                    .ok_or(RemoteError::CheckPixelFormat { code: capture.pixel_format })?,
                bytes: capture.bytes,
                frame: capture.frame,
            }),
            other => Err(unexpected("capture", other)),
        }
    }

    fn call_for_frame(&self, request: &Request, asked: &'static str, wait: Duration) -> Result<Frame, RemoteError> {
        match self.call(request, wait)? {
            Response::Frame(Some(frame)) => Ok(frame.into_frame()),
            other => Err(unexpected(asked, other)),
        }
    }

    /// Sends `request` and reads the answer, allowing `wait` plus some slack for it. An
    /// error answer becomes [`RemoteError::Screen`].
    fn call(&self, request: &Request, wait: Duration) -> Result<Response, RemoteError> {
        let idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop();
        let mut stream = match idle {
            Some(stream) => stream,
            None => UnixStream::connect(&self.path)
                .map_err(|source| RemoteError::Connect { path: self.path.display().to_string(), source })?,
        };
        let deadline = wait.min(MAX_WAIT) + ANSWER_SLACK;
        stream.set_read_timeout(Some(deadline)).map_err(RemoteError::ReadFrame)?;
        write_frame(&mut stream, request)?;
        let body = read_frame(&mut stream, MAX_RESPONSE_BYTES)?
            .ok_or_else(|| RemoteError::ReadFrame(io::ErrorKind::UnexpectedEof.into()))?;
        let response: Response = postcard::from_bytes(&body).map_err(RemoteError::DecodeFrame)?;
        // Only a connection whose exchange completed is reused: it is at a frame boundary.
        let mut idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push(stream);
        }
        drop(idle);
        match response {
            Response::Error(message) => Err(RemoteError::Screen(message)),
            response => Ok(response),
        }
    }
}

fn unexpected(asked: &'static str, got: Response) -> RemoteError {
    match got {
        Response::Error(message) => RemoteError::Screen(message),
        other => RemoteError::CheckResponse { asked, got: other.name() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    fn socket_path(name: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        std::env::temp_dir().join(format!("carrel-gpu-remote-{}-{n}-{name}.sock", std::process::id()))
    }

    /// A served socket's path, removed when the test is done with it.
    struct Served {
        path: PathBuf,
    }

    impl Drop for Served {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Serves `screen` on a fresh socket path.
    fn start_server(screen: Arc<Screen>, name: &str) -> Served {
        let path = socket_path(name);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || serve(listener, screen));
        Served { path }
    }

    /// A device showing a 64x48 pattern with one finished frame.
    fn showing_pattern() -> Harness {
        let mut harness = Harness::new();
        harness.paint(PIXELS_ADDR, 64, 48, pattern);
        harness.show(1, 64, 48, PIXELS_ADDR);
        harness.flush(1, Rect::new(0, 0, 64, 48));
        harness
    }

    /// Sends raw bytes on a fresh connection served by `serve_connection`; returns what
    /// came back before the server closed it (or the client stopped writing).
    fn exchange_raw(screen: Arc<Screen>, bytes: &[u8], close_after_write: bool) -> Vec<Response> {
        let (mut client, server) = UnixStream::pair().unwrap();
        let worker = std::thread::spawn(move || serve_connection(server, &screen));
        client.write_all(bytes).unwrap();
        if close_after_write {
            client.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let mut responses = Vec::new();
        while let Ok(Some(body)) = read_frame(&mut client, MAX_RESPONSE_BYTES) {
            responses.push(postcard::from_bytes(&body).unwrap());
            if !close_after_write {
                break;
            }
        }
        drop(client);
        worker.join().unwrap();
        responses
    }

    #[test]
    fn remote_screen_reports_display_size_and_latest_frame() {
        let harness = showing_pattern();
        let served = start_server(harness.gpu.screen(), "frame");
        let remote = RemoteScreen::connect(&served.path).unwrap();
        assert_eq!(remote.display_size(), (1280, 800));
        let frame = remote.latest_frame().unwrap().unwrap();
        assert_eq!((frame.number, frame.damage), (1, Rect::new(0, 0, 64, 48)));
        assert!(frame.time <= Instant::now());
    }

    #[test]
    fn remote_capture_equals_local_capture_in_every_format() {
        let harness = showing_pattern();
        let screen = harness.gpu.screen();
        let served = start_server(Arc::clone(&screen), "capture");
        let remote = RemoteScreen::connect(&served.path).unwrap();
        for options in [
            CaptureOptions::default(),
            CaptureOptions { format: CaptureFormat::Png, ..Default::default() },
            CaptureOptions { format: CaptureFormat::Qoi, crop: Some(Rect::new(8, 4, 32, 16)), ..Default::default() },
            CaptureOptions { format: CaptureFormat::Raw, scale: Some((16, 12)), cursor: true, ..Default::default() },
        ] {
            assert_eq!(remote.capture(&options).unwrap(), screen.capture(&options).unwrap(), "{options:?}");
        }
    }

    #[test]
    fn remote_capture_before_scanout_returns_the_screen_error() {
        let harness = Harness::new();
        let served = start_server(harness.gpu.screen(), "noscanout");
        let remote = RemoteScreen::connect(&served.path).unwrap();
        let error = remote.capture(&CaptureOptions::default()).unwrap_err();
        assert!(matches!(&error, RemoteError::Screen(message) if message.contains("wait for a frame")), "{error}");
        assert_eq!(remote.latest_frame().unwrap(), None);
    }

    #[test]
    fn remote_bad_crop_returns_error_and_connection_stays_usable() {
        let harness = showing_pattern();
        let served = start_server(harness.gpu.screen(), "crop");
        let remote = RemoteScreen::connect(&served.path).unwrap();
        let options = CaptureOptions { crop: Some(Rect::new(0, 0, 65, 1)), ..Default::default() };
        assert!(matches!(remote.capture(&options), Err(RemoteError::Screen(_))));
        assert_eq!(remote.latest_frame().unwrap().unwrap().number, 1);
    }

    #[test]
    fn remote_wait_for_frame_after_wakes_on_flush() {
        let mut harness = showing_pattern();
        let served = start_server(harness.gpu.screen(), "wait");
        let remote = RemoteScreen::connect(&served.path).unwrap();
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| remote.wait_for_frame_after(1, Duration::from_secs(10)));
            // Whether the waiter is waiting yet or not, frame 2 ends its wait.
            std::thread::sleep(Duration::from_millis(5));
            harness.flush(1, Rect::new(0, 0, 4, 4));
            let frame = waiter.join().unwrap().unwrap();
            assert_eq!((frame.number, frame.damage), (2, Rect::new(0, 0, 4, 4)));
        });
    }

    #[test]
    fn remote_wait_for_frame_after_times_out_with_the_screen_message() {
        let harness = showing_pattern();
        let served = start_server(harness.gpu.screen(), "timeout");
        let remote = RemoteScreen::connect(&served.path).unwrap();
        let error = remote.wait_for_frame_after(1, Duration::from_millis(20)).unwrap_err();
        assert!(
            matches!(&error, RemoteError::Screen(message) if message.contains("no frame after frame 1")),
            "{error}"
        );
    }

    #[test]
    fn remote_wait_until_still_returns_last_frame() {
        let harness = showing_pattern();
        let served = start_server(harness.gpu.screen(), "still");
        let remote = RemoteScreen::connect(&served.path).unwrap();
        let start = Instant::now();
        let frame = remote.wait_until_still(Duration::from_millis(20), Duration::from_secs(10)).unwrap();
        assert_eq!(frame.number, 1);
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn remote_calls_from_many_threads_run_side_by_side() {
        let harness = showing_pattern();
        let served = start_server(harness.gpu.screen(), "threads");
        let remote = RemoteScreen::connect(&served.path).unwrap();
        std::thread::scope(|scope| {
            // One long wait holds a connection; captures on other threads are not stuck behind it.
            let waiter = scope.spawn(|| remote.wait_for_frame_after(1, Duration::from_millis(300)));
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..5 {
                        assert_eq!(remote.capture(&CaptureOptions::default()).unwrap().frame, 1);
                    }
                });
            }
            assert!(waiter.join().unwrap().is_err());
        });
    }

    #[test]
    fn connect_to_missing_socket_says_what_to_start() {
        let error = RemoteScreen::connect(socket_path("missing")).unwrap_err();
        assert!(matches!(error, RemoteError::Connect { .. }));
        assert!(error.to_string().contains("carrel-gpu-backend"), "{error}");
    }

    #[test]
    fn undecodable_request_is_answered_with_error_and_next_request_is_served() {
        let harness = showing_pattern();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        bytes.extend_from_slice(&encode_frame(&Request::LatestFrame).unwrap());
        let responses = exchange_raw(harness.gpu.screen(), &bytes, true);
        assert_eq!(responses.len(), 2, "{responses:?}");
        assert!(matches!(&responses[0], Response::Error(message) if message.contains("not a screen request")));
        assert!(matches!(&responses[1], Response::Frame(Some(frame)) if frame.number == 1));
    }

    #[test]
    fn oversized_request_frame_is_answered_with_error_and_closed() {
        let harness = Harness::new();
        let bytes = (MAX_REQUEST_BYTES + 1).to_le_bytes();
        let responses = exchange_raw(harness.gpu.screen(), &bytes, false);
        assert!(matches!(&responses[..], [Response::Error(message)] if message.contains("over the")), "{responses:?}");
    }

    #[test]
    fn truncated_request_frame_ends_the_connection_without_answer() {
        let harness = Harness::new();
        let mut bytes = 10u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[1, 2, 3]);
        assert!(exchange_raw(harness.gpu.screen(), &bytes, true).is_empty());
        // A lone partial length prefix too.
        assert!(exchange_raw(harness.gpu.screen(), &[7, 0], true).is_empty());
    }

    #[test]
    fn random_request_bodies_never_panic_the_server() {
        let harness = showing_pattern();
        let screen = harness.gpu.screen();
        // A fixed-seed xorshift keeps the test repeatable.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut bytes = Vec::new();
        for _ in 0..200 {
            let len = (next() % 24) as usize;
            let mut body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Variants 2 and 3 are waits: decoded by chance they could wait for minutes.
            if let Some(variant @ (2 | 3)) = body.first_mut() {
                *variant += 3;
            }
            bytes.extend_from_slice(&(len as u32).to_le_bytes());
            bytes.extend_from_slice(&body);
        }
        // Every frame gets an answer: an error, or a real answer when the bytes decode.
        let responses = exchange_raw(screen, &bytes, true);
        assert_eq!(responses.len(), 200);
    }

    #[test]
    fn read_frame_refuses_length_over_limit() {
        let mut bytes: &[u8] = &[0xff, 0xff, 0xff, 0x7f];
        let error = read_frame(&mut bytes, MAX_RESPONSE_BYTES).unwrap_err();
        assert!(matches!(error, RemoteError::CheckFrameSize { len: 0x7fff_ffff, .. }));
    }

    #[test]
    fn wire_capture_round_trips_bytes_as_one_run() {
        let capture = WireCapture {
            format: WireFormat::Raw,
            width: 2,
            height: 1,
            stride: 8,
            pixel_format: PixelFormat::B8G8R8X8.virtio_code(),
            bytes: (0..8).collect(),
            frame: 7,
        };
        let encoded = postcard::to_allocvec(&Response::Capture(capture.clone())).unwrap();
        assert!(encoded.windows(8).any(|window| window == [0, 1, 2, 3, 4, 5, 6, 7]));
        assert_eq!(postcard::from_bytes::<Response>(&encoded).unwrap(), Response::Capture(capture));
    }
}

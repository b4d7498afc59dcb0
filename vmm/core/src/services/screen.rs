//! Screenshots for the control socket: wait for the frame the caller asked for, capture
//! straight from the scanout view, record what the caller was shown.
//!
//! The screen is the in-process device's, or that of a `carrel-gpu-backend` process
//! reached over its screen socket ([`ScreenSource`]): both serve the same requests.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use carrel_gpu::{
    Capture, CaptureError, CaptureFormat, CaptureOptions, Frame, PackedPixels, Rect, RemoteError, RemoteScreen, Screen,
    ScreenError,
};

use crate::control::protocol::{
    write_frame, ControlError, ErrorKind, Failure, ImageFormat, Response, Screenshot, ScreenshotRequest, Wait,
};
use crate::recorder::{Record, Recorder};
use crate::snapshot::shown::Shown;

/// Longest any wait may last, whatever the caller asks.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// Errors reading the screen, wherever it lives.
#[derive(Debug, thiserror::Error)]
pub enum ScreenSourceError {
    #[error(transparent)]
    ReadScreen(#[from] ScreenError),
    #[error(transparent)]
    ReadRemoteScreen(#[from] RemoteError),
}

/// Where the screen is: the GPU device in this process, or a GPU backend process.
#[derive(Debug, Clone)]
pub enum ScreenSource {
    Local(Arc<Screen>),
    Remote(Arc<RemoteScreen>),
}

impl ScreenSource {
    /// The display size offered to the guest (width, height).
    pub fn display_size(&self) -> (u32, u32) {
        match self {
            ScreenSource::Local(screen) => screen.display_size(),
            ScreenSource::Remote(screen) => screen.display_size(),
        }
    }

    /// The last finished frame; `None` if the guest never finished one.
    pub fn latest_frame(&self) -> Result<Option<Frame>, ScreenSourceError> {
        match self {
            ScreenSource::Local(screen) => Ok(screen.latest_frame()),
            ScreenSource::Remote(screen) => Ok(screen.latest_frame()?),
        }
    }

    /// Waits until a frame numbered above `after` exists and returns the latest.
    pub fn wait_for_frame_after(&self, after: u64, timeout: Duration) -> Result<Frame, ScreenSourceError> {
        match self {
            ScreenSource::Local(screen) => Ok(screen.wait_for_frame_after(after, timeout)?),
            ScreenSource::Remote(screen) => Ok(screen.wait_for_frame_after(after, timeout)?),
        }
    }

    /// Waits until no frame has finished for `still` and returns the last frame.
    pub fn wait_until_still(&self, still: Duration, timeout: Duration) -> Result<Frame, ScreenSourceError> {
        match self {
            ScreenSource::Local(screen) => Ok(screen.wait_until_still(still, timeout)?),
            ScreenSource::Remote(screen) => Ok(screen.wait_until_still(still, timeout)?),
        }
    }

    /// Takes a screenshot as `options` asks.
    pub fn capture(&self, options: &CaptureOptions) -> Result<Capture, ScreenSourceError> {
        match self {
            ScreenSource::Local(screen) => Ok(screen.capture(options)?),
            ScreenSource::Remote(screen) => Ok(screen.capture(options)?),
        }
    }
}

/// Serves screen requests on the connection threads.
#[derive(Debug)]
pub struct ScreenService {
    screen: Option<ScreenSource>,
    /// The screen a restore's snapshot kept: the answer to a whole-screen PNG while the
    /// guest has drawn no frame since (its pixels need no page of restored RAM).
    shown: Option<Shown>,
    recorder: Recorder,
}

impl ScreenService {
    pub fn new(screen: Option<ScreenSource>, shown: Option<Shown>, recorder: Recorder) -> ScreenService {
        ScreenService { screen, shown, recorder }
    }

    /// Answers a screenshot request.
    pub fn serve(&self, screenshot: &ScreenshotRequest, peer: Option<(i32, u32, u32)>) -> Response {
        let result = self.screenshot(screenshot);
        let params = vec![
            ("format", format!("{:?}", screenshot.format).to_lowercase()),
            ("wait", format!("{:?}", screenshot.wait)),
        ];
        let record = match &result {
            Ok(shot) => Record {
                action: "screenshot",
                params: [params, vec![("frame", shot.frame.to_string())]].concat(),
                screenshot_after: Some(&shot.bytes),
                ..Default::default()
            },
            Err(failure) => {
                Record { action: "screenshot", params, error: Some(failure.message.clone()), ..Default::default() }
            }
        };
        if let Err(err) = self.recorder.record(peer, record) {
            return Response::error(ErrorKind::Internal, format!("the audit log failed, screenshot withheld: {err}"));
        }
        match result {
            Ok(shot) => Response::Screenshot(shot),
            Err(failure) => Response::Error(failure),
        }
    }

    /// Answers a raw, whole-screen screenshot request on `stream` with the pixels written
    /// to it straight from the scanout's memory: no copy of them in this process (4 MB at
    /// 1280x800, whose fresh pages alone cost ~2 ms). Right after a lazy restore, before
    /// the scanout's pages are loaded, they are read from where the loader reads them
    /// instead of waiting for it (see [`carrel_gpu::LoadingRam`]). `None` when the request
    /// is not one answered so: an encoded image, a crop, a scale or the cursor (those are
    /// computed), a screen in another process, or an audit log (it keeps the very bytes
    /// the caller was sent, so those are copied once, recorded, then sent).
    pub fn send_in_place(&self, request: &ScreenshotRequest, stream: &UnixStream) -> Option<Result<(), ControlError>> {
        let plain_raw =
            request.format == ImageFormat::Raw && request.crop.is_none() && request.scale.is_none() && !request.cursor;
        let source = self.screen.as_ref()?;
        let ScreenSource::Local(screen) = source else { return None };
        if !plain_raw || self.recorder.log().is_some() {
            return None;
        }
        let timeout = Duration::from_millis(request.timeout_ms).min(MAX_WAIT);
        let sent = wait_for(source, request.wait, timeout)
            .and_then(|()| Ok(screen.with_packed_pixels(|pixels, frame| send_pixels(stream, pixels, frame))?));
        Some(match sent {
            Ok(sent) => sent,
            // Nothing of the answer was written yet: the error is the whole answer.
            Err(err) => write_frame(&mut &*stream, &Response::Error(err.failure())),
        })
    }

    fn screenshot(&self, request: &ScreenshotRequest) -> Result<Screenshot, Failure> {
        let screen = self
            .screen
            .as_ref()
            .ok_or_else(|| Failure::precondition("this VM has no screen (it was started with --no-display)"))?;
        let timeout = Duration::from_millis(request.timeout_ms).min(MAX_WAIT);
        wait_for(screen, request.wait, timeout).map_err(|err| err.failure())?;
        if let Some(shown) = self.shown.as_ref().filter(|shown| shown.answers(request)) {
            let latest = screen.latest_frame().map_err(|err| err.failure())?.map(|frame| frame.number);
            if latest == Some(shown.frame) {
                return Ok(shown.screenshot());
            }
        }
        capture(screen, request)
    }
}

impl ScreenSourceError {
    /// The error as an answer of the kind it is.
    pub fn failure(&self) -> Failure {
        let kind = match self {
            ScreenSourceError::ReadScreen(ScreenError::FindScanout | ScreenError::FindScanoutBacking) => {
                ErrorKind::FailedPrecondition
            }
            ScreenSourceError::ReadScreen(
                ScreenError::WaitForFrame { .. }
                | ScreenError::WaitUntilStill { .. }
                | ScreenError::WaitUntilStillNoFrame { .. },
            ) => ErrorKind::DeadlineExceeded,
            ScreenSourceError::ReadScreen(ScreenError::Capture(
                CaptureError::CheckCrop { .. } | CaptureError::CheckScale { .. },
            )) => ErrorKind::InvalidArgument,
            ScreenSourceError::ReadScreen(ScreenError::Capture(_)) => ErrorKind::Internal,
            // The screen lives in the GPU backend process, which may be gone.
            ScreenSourceError::ReadRemoteScreen(_) => ErrorKind::Unavailable,
        };
        Failure::new(kind, self.to_string())
    }
}

/// Writes the answer to a raw screenshot of `pixels`, frame `frame`, to `stream`: the
/// frame [`write_frame`] would write for it, its pixels written from where they are.
fn send_pixels(stream: &UnixStream, pixels: &PackedPixels<'_>, frame: u64) -> Result<(), ControlError> {
    let len = pixels.row_bytes() * pixels.height() as usize;
    let shot = Screenshot {
        format: ImageFormat::Raw,
        width: pixels.width(),
        height: pixels.height(),
        stride: pixels.row_bytes() as u32,
        pixel_format: format!("{:?}", pixels.format()),
        frame,
        bytes: Vec::new(),
    };
    // The pixels are the answer's last field: empty, they are one byte, their length 0.
    // Their real length goes there instead, and they follow it.
    let mut head = postcard::to_stdvec(&Response::Screenshot(shot))?;
    if head.pop() != Some(0) {
        return Err(ControlError::Io(std::io::Error::other("a screenshot answer does not end in its pixels")));
    }
    head.extend_from_slice(&postcard::to_stdvec(&len)?);
    let frame_len =
        u32::try_from(head.len() + len).map_err(|_| ControlError::FrameTooLarge { len: u32::MAX, max: u32::MAX })?;
    let mut prefix = Vec::with_capacity(4 + head.len());
    prefix.extend_from_slice(&frame_len.to_le_bytes());
    prefix.extend_from_slice(&head);
    (&*stream).write_all(&prefix)?;
    pixels.write_to(stream.as_fd())?;
    Ok(())
}

/// Waits for what `wait` asks, up to `timeout`.
pub fn wait_for(screen: &ScreenSource, wait: Wait, timeout: Duration) -> Result<(), ScreenSourceError> {
    match wait {
        Wait::FirstFrame if screen.latest_frame()?.is_none() => screen.wait_for_frame_after(0, timeout).map(drop),
        Wait::FirstFrame => Ok(()),
        Wait::FrameAfter(after) => screen.wait_for_frame_after(after, timeout).map(drop),
        Wait::StillFor(ms) => screen.wait_until_still(Duration::from_millis(ms), timeout).map(drop),
    }
}

/// Captures the screen as `request` asks (its wait is not looked at).
pub fn capture(screen: &ScreenSource, request: &ScreenshotRequest) -> Result<Screenshot, Failure> {
    let options = CaptureOptions {
        format: match request.format {
            ImageFormat::Png => CaptureFormat::Png,
            ImageFormat::Qoi => CaptureFormat::Qoi,
            ImageFormat::Raw => CaptureFormat::Raw,
        },
        crop: request.crop.map(|[x, y, width, height]| Rect { x, y, width, height }),
        scale: request.scale.map(|[width, height]| (width, height)),
        cursor: request.cursor,
    };
    let capture = screen.capture(&options).map_err(|err| err.failure())?;
    Ok(Screenshot {
        format: request.format,
        width: capture.width,
        height: capture.height,
        stride: capture.stride as u32,
        pixel_format: format!("{:?}", capture.pixel_format),
        frame: capture.frame,
        bytes: capture.bytes,
    })
}

//! Screenshots for the control socket: wait for the frame the caller asked for, capture
//! straight from the scanout view, record what the caller was shown.
//!
//! The screen is the in-process device's, or that of a `carrel-gpu-backend` process
//! reached over its screen socket ([`ScreenSource`]): both serve the same requests.

use std::sync::Arc;
use std::time::Duration;

use carrel_gpu::{
    Capture, CaptureError, CaptureFormat, CaptureOptions, Frame, Rect, RemoteError, RemoteScreen, Screen, ScreenError,
};

use crate::control::protocol::{ErrorKind, Failure, ImageFormat, Response, Screenshot, ScreenshotRequest, Wait};
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

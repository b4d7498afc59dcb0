//! Keyboard and mouse actions from the control socket: planned in screen pixels and key
//! names (crate::input), injected through the virtio-input devices with their hold and gap
//! times, then optionally a wait for the screen and a screenshot: "act, then look".

use std::sync::Arc;
use std::time::Duration;

use crate::control::protocol::{ErrorKind, Failure, InputRequest, InputResult, Response, ScreenshotRequest, Wait};
use crate::devices::virtio::input::InputSink;
use crate::input::{plan, Action, Device, Timing};
use crate::recorder::{Record, Recorder};
use crate::services::screen::{capture, wait_for, ScreenSource, MAX_WAIT};

/// The two input devices' sinks.
#[derive(Debug, Clone)]
pub struct InputSinks {
    pub keyboard: Arc<InputSink>,
    pub tablet: Arc<InputSink>,
}

#[derive(Debug)]
pub struct InputService {
    sinks: Option<InputSinks>,
    screen: Option<ScreenSource>,
    recorder: Recorder,
}

impl InputService {
    pub fn new(sinks: Option<InputSinks>, screen: Option<ScreenSource>, recorder: Recorder) -> InputService {
        InputService { sinks, screen, recorder }
    }

    pub fn serve(&self, request: &InputRequest, peer: Option<(i32, u32, u32)>) -> Response {
        let result = self.act(request);
        let (action, params) = describe(&request.action);
        let record = match &result {
            Ok(done) => Record {
                action,
                params: [params, vec![("frame", done.frame.map(|f| f.to_string()).unwrap_or_default())]].concat(),
                screenshot_after: done.screenshot.as_ref().map(|shot| shot.bytes.as_slice()),
                ..Default::default()
            },
            Err(failure) => Record { action, params, error: Some(failure.message.clone()), ..Default::default() },
        };
        if let Err(err) = self.recorder.record(peer, record) {
            return Response::error(
                ErrorKind::Internal,
                format!("the audit log failed after the action; answer withheld: {err}"),
            );
        }
        match result {
            Ok(done) => Response::Input(done),
            Err(failure) => Response::Error(failure),
        }
    }

    fn act(&self, request: &InputRequest) -> Result<InputResult, Failure> {
        let sinks = self
            .sinks
            .as_ref()
            .ok_or_else(|| Failure::precondition("this VM has no keyboard or mouse (it has no screen)"))?;
        let screen = self.screen.as_ref().ok_or_else(|| Failure::precondition("this VM has no screen"))?;
        let mut timing = Timing::default();
        if let Some(hold) = request.hold_ms {
            timing.hold = Duration::from_millis(hold.min(10_000));
        }
        if let Some(gap) = request.gap_ms {
            timing.gap = Duration::from_millis(gap.min(10_000));
        }
        let steps =
            plan(&request.action, screen.display_size(), &timing).map_err(|err| Failure::invalid(err.to_string()))?;
        // An unreachable screen fails the request before anything is done.
        let before = screen.latest_frame().map_err(|err| err.failure())?.map_or(0, |frame| frame.number);
        for step in steps {
            let sink = match step.device {
                Device::Keyboard => &sinks.keyboard,
                Device::Tablet => &sinks.tablet,
            };
            sink.push(&step.events).map_err(|err| Failure::unavailable(err.to_string()))?;
            if !step.pause_after.is_zero() {
                std::thread::sleep(step.pause_after);
            }
        }
        let timeout = Duration::from_millis(request.timeout_ms).min(MAX_WAIT);
        let latest = || screen.latest_frame().ok().flatten().map(|frame| frame.number);
        let (frame, timed_out) = match request.wait {
            None => (latest(), false),
            Some(wait) => {
                // FrameAfter(0) means the next frame after the action started.
                let wait = match wait {
                    Wait::FrameAfter(0) => Wait::FrameAfter(before),
                    other => other,
                };
                match wait_for(screen, wait, timeout) {
                    Ok(()) => (latest(), false),
                    Err(_) => (latest(), true),
                }
            }
        };
        let screenshot = match request.screenshot {
            Some(format) => {
                let options = ScreenshotRequest {
                    format,
                    crop: None,
                    scale: None,
                    cursor: true,
                    wait: Wait::FirstFrame,
                    timeout_ms: 0,
                };
                Some(capture(screen, &options)?)
            }
            None => None,
        };
        Ok(InputResult { frame, timed_out, screenshot })
    }
}

/// The audit action and parameters. Typed text is recorded by length only: agents type
/// passwords too.
fn describe(action: &Action) -> (&'static str, Vec<(&'static str, String)>) {
    match action {
        Action::Move { x, y } => ("input.move", vec![("x", x.to_string()), ("y", y.to_string())]),
        Action::Click { x, y, button, count } => (
            "input.click",
            vec![
                ("x", x.to_string()),
                ("y", y.to_string()),
                ("button", format!("{button:?}")),
                ("count", count.to_string()),
            ],
        ),
        Action::ButtonDown { button } => ("input.button_down", vec![("button", format!("{button:?}"))]),
        Action::ButtonUp { button } => ("input.button_up", vec![("button", format!("{button:?}"))]),
        Action::Drag { button, path } => {
            ("input.drag", vec![("button", format!("{button:?}")), ("points", path.len().to_string())])
        }
        Action::Scroll { x, y, dx, dy } => (
            "input.scroll",
            vec![("x", x.to_string()), ("y", y.to_string()), ("dx", dx.to_string()), ("dy", dy.to_string())],
        ),
        Action::Type { text } => ("input.type", vec![("chars", text.chars().count().to_string())]),
        // The key cannot name a secret: the audit log redacts the values of such keys.
        Action::TypeSecret { name, text } => {
            ("input.type", vec![("source", format!("secret {name}")), ("chars", text.0.chars().count().to_string())])
        }
        Action::Key { combo } => ("input.key", vec![("keys", combo.clone())]),
    }
}

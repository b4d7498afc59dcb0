//! The screen as the host sees it: what the guest shows on its scanout, the frame clock,
//! the cursor, and screenshots. Shared as an `Arc<Screen>` with threads other than the
//! device's (the control socket), which read it while the device runs.
//!
//! Each RESOURCE_FLUSH of the scanout's resource ends a frame: its number (1, 2, ...), the
//! damaged rectangle and the monotonic time. Waiting for frames uses a condition variable
//! and always ends by its timeout.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::capture::{self, Capture, CaptureError, CaptureFormat, CaptureOptions, CursorImage, CursorOverlay};
use crate::protocol::Rect;
use crate::surface::{PackedPixels, ScanoutPixels, Surface};

/// Errors reading the screen.
#[derive(Debug, thiserror::Error)]
pub enum ScreenError {
    #[error("the guest has not shown anything yet (no scanout is set); wait for a frame first")]
    FindScanout,
    #[error("the scanout's resource has no backing memory yet; wait for a frame first")]
    FindScanoutBacking,
    #[error("no frame after frame {after} within {timeout:?}; the guest may be idle or hung")]
    WaitForFrame { after: u64, timeout: Duration },
    #[error("the screen did not stay still for {still:?} within {timeout:?} (last frame {last_frame:?})")]
    WaitUntilStill { still: Duration, timeout: Duration, last_frame: Option<u64> },
    #[error("the guest has not finished a frame within {timeout:?}")]
    WaitUntilStillNoFrame { timeout: Duration },
    #[error("could not capture the screen: {0}")]
    Capture(#[from] CaptureError),
}

/// One finished frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// 1 for the first frame; increases by one per frame, never reused (not even on reset).
    pub number: u64,
    /// The flushed rectangle, in screen coordinates.
    pub damage: Rect,
    pub time: Instant,
}

/// What the scanout shows.
#[derive(Debug, Clone)]
pub(crate) struct Scanout {
    pub resource_id: u32,
    /// The part of the resource shown, in resource pixels.
    pub rect: Rect,
    pub surface: Option<Arc<Surface>>,
}

/// The cursor as the guest last set it.
#[derive(Debug, Clone, Default)]
pub(crate) struct CursorState {
    /// `None` while hidden.
    pub image: Option<Arc<CursorImage>>,
    pub hot_x: u32,
    pub hot_y: u32,
    pub x: u32,
    pub y: u32,
}

#[derive(Debug, Default)]
struct ScreenState {
    scanout: Option<Scanout>,
    latest: Option<Frame>,
    /// Number of the last frame before this device was restored (0 for a fresh boot).
    restored_frame: u64,
    cursor: CursorState,
}

/// The guest's screen, shareable with other threads.
#[derive(Debug)]
pub struct Screen {
    display: (u32, u32),
    state: Mutex<ScreenState>,
    frame_finished: Condvar,
}

impl Screen {
    pub(crate) fn new(width: u32, height: u32) -> Screen {
        Screen { display: (width, height), state: Mutex::default(), frame_finished: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, ScreenState> {
        // A panic elsewhere while holding the lock leaves plain data behind: keep going.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The display size offered to the guest (width, height).
    pub fn display_size(&self) -> (u32, u32) {
        self.display
    }

    /// The size of what the guest shows now (the scanout rectangle), if anything.
    pub fn scanout_size(&self) -> Option<(u32, u32)> {
        self.lock().scanout.as_ref().map(|s| (s.rect.width, s.rect.height))
    }

    /// Whether the scanout's pixels are viewed in place (`Some(true)`), copied on each
    /// transfer (`Some(false)`), or not there (`None`: no scanout or no backing).
    pub fn scanout_is_zero_copy(&self) -> Option<bool> {
        let state = self.lock();
        state.scanout.as_ref()?.surface.as_ref().map(|surface| surface.is_mapped())
    }

    /// The last finished frame; `None` if the guest never finished one.
    pub fn latest_frame(&self) -> Option<Frame> {
        self.lock().latest
    }

    /// Waits until a frame numbered above `after` exists and returns the latest.
    pub fn wait_for_frame_after(&self, after: u64, timeout: Duration) -> Result<Frame, ScreenError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(frame) = state.latest.filter(|frame| frame.number > after) {
                return Ok(frame);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ScreenError::WaitForFrame { after, timeout });
            }
            state = self.wait(state, deadline - now);
        }
    }

    /// Waits until no frame has finished for `still`, counted from the later of the last
    /// frame and this call (so an action just taken gets `still` to show on screen), and
    /// returns the last frame. Fails if that does not happen within `timeout`, or if the
    /// guest never finished a frame.
    pub fn wait_until_still(&self, still: Duration, timeout: Duration) -> Result<Frame, ScreenError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut state = self.lock();
        loop {
            let quiet_since = state.latest.map_or(start, |frame| frame.time.max(start));
            let now = Instant::now();
            if now >= quiet_since + still {
                return state.latest.ok_or(ScreenError::WaitUntilStillNoFrame { timeout });
            }
            if now >= deadline {
                let last_frame = state.latest.map(|frame| frame.number);
                return Err(ScreenError::WaitUntilStill { still, timeout, last_frame });
            }
            let wake = (quiet_since + still).min(deadline);
            state = self.wait(state, wake - now);
        }
    }

    fn wait<'a>(&self, state: MutexGuard<'a, ScreenState>, timeout: Duration) -> MutexGuard<'a, ScreenState> {
        match self.frame_finished.wait_timeout(state, timeout) {
            Ok((state, _)) => state,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    /// Takes a screenshot as `options` asks.
    pub fn capture(&self, options: &CaptureOptions) -> Result<Capture, ScreenError> {
        let (scanout, frame, cursor) = self.snapshot(options.cursor)?;
        let surface = scanout.surface.as_ref().ok_or(ScreenError::FindScanoutBacking)?;
        // A raw capture's buffer is faulted in before the view: right after a lazy restore
        // the view waits for the screen's pages to load, and a fresh buffer of a screen's
        // size costs page faults of its own (about 2 ms for 4 MiB), paid meanwhile.
        let buffer = (options.format == CaptureFormat::Raw).then(|| capture::raw_buffer(options, scanout.rect));
        let pixels = surface.pixels(scanout.rect).ok_or(ScreenError::FindScanoutBacking)?;
        Ok(capture::encode_into(&pixels, options, cursor.as_ref(), frame, buffer.unwrap_or_default())?)
    }

    /// Lends the scanout's pixels to `read` without copying them, with the number of the
    /// last finished frame.
    pub fn with_pixels<T>(&self, read: impl FnOnce(&ScanoutPixels<'_>, u64) -> T) -> Result<T, ScreenError> {
        let (scanout, frame, _) = self.snapshot(false)?;
        let surface = scanout.surface.as_ref().ok_or(ScreenError::FindScanoutBacking)?;
        let pixels = surface.pixels(scanout.rect).ok_or(ScreenError::FindScanoutBacking)?;
        Ok(read(&pixels, frame))
    }

    /// Lends the scanout's pixels for a packed write to `send`, with the number of the
    /// last finished frame: in place, or from where a lazy restore loads them while it
    /// has not yet (see [`Surface::packed`]).
    pub fn with_packed_pixels<T>(&self, send: impl FnOnce(&PackedPixels<'_>, u64) -> T) -> Result<T, ScreenError> {
        let (scanout, frame, _) = self.snapshot(false)?;
        let surface = scanout.surface.as_ref().ok_or(ScreenError::FindScanoutBacking)?;
        let pixels = surface.packed(scanout.rect).ok_or(ScreenError::FindScanoutBacking)?;
        Ok(send(&pixels, frame))
    }

    /// The scanout, frame number and cursor at this moment; the lock is released before
    /// any pixel is read, so the device never waits on an encoder.
    fn snapshot(&self, with_cursor: bool) -> Result<(Scanout, u64, Option<CursorOverlay>), ScreenError> {
        let state = self.lock();
        let scanout = state.scanout.clone().ok_or(ScreenError::FindScanout)?;
        let frame = state.latest.map_or(0, |frame| frame.number);
        let cursor = if with_cursor {
            // The cursor position is in screen pixels, the hot spot in image pixels.
            state.cursor.image.as_ref().map(|image| CursorOverlay {
                left: state.cursor.x as i64 - state.cursor.hot_x as i64,
                top: state.cursor.y as i64 - state.cursor.hot_y as i64,
                image: Arc::clone(image),
            })
        } else {
            None
        };
        Ok((scanout, frame, cursor))
    }

    // Device side.

    pub(crate) fn set_scanout(&self, scanout: Option<Scanout>) {
        self.lock().scanout = scanout;
    }

    pub(crate) fn scanout_resource(&self) -> Option<u32> {
        self.lock().scanout.as_ref().map(|s| s.resource_id)
    }

    /// Replaces the surface of the scanout if it shows `resource_id`.
    pub(crate) fn replace_surface(&self, resource_id: u32, surface: Option<Arc<Surface>>) {
        if let Some(scanout) = self.lock().scanout.as_mut().filter(|s| s.resource_id == resource_id) {
            scanout.surface = surface;
        }
    }

    /// Ends a frame if `resource_id` is on the scanout; `damage` is in resource pixels.
    /// Returns whether a frame ended.
    pub(crate) fn flush(&self, resource_id: u32, damage: Rect) -> bool {
        let mut state = self.lock();
        let Some(scanout) = state.scanout.as_ref().filter(|s| s.resource_id == resource_id) else {
            return false;
        };
        let origin = scanout.rect;
        let damage = damage
            .intersect(&origin)
            .map(|r| Rect::new(r.x - origin.x, r.y - origin.y, r.width, r.height))
            .unwrap_or_default();
        let number = state.latest.map_or(state.restored_frame, |frame| frame.number) + 1;
        state.latest = Some(Frame { number, damage, time: Instant::now() });
        drop(state);
        self.frame_finished.notify_all();
        true
    }

    pub(crate) fn set_cursor(&self, cursor: CursorState) {
        self.lock().cursor = cursor;
    }

    pub(crate) fn move_cursor(&self, x: u32, y: u32) {
        let mut state = self.lock();
        state.cursor.x = x;
        state.cursor.y = y;
    }

    /// Scanout (resource, rectangle), cursor and last frame number, for saving.
    pub(crate) fn saved_parts(&self) -> (Option<(u32, Rect)>, CursorState, u64) {
        let state = self.lock();
        let scanout = state.scanout.as_ref().map(|s| (s.resource_id, s.rect));
        let last_frame = state.latest.map_or(state.restored_frame, |frame| frame.number);
        (scanout, state.cursor.clone(), last_frame)
    }

    /// Makes the next frame number `last_frame + 1` (after a restore).
    /// Numbers frames on from `last_frame` after a restore. When the restored device shows
    /// a scanout (`shown`, its rectangle), that saved frame is the latest again, so a
    /// screenshot right after a restore needs no new frame from the guest.
    pub(crate) fn continue_frames_from(&self, last_frame: u64, shown: Option<Rect>) {
        let mut state = self.lock();
        state.restored_frame = last_frame;
        state.latest = match shown {
            Some(damage) if last_frame > 0 => Some(Frame { number: last_frame, damage, time: Instant::now() }),
            _ => None,
        };
    }

    /// Forgets the scanout and cursor (device reset); the frame count continues.
    pub(crate) fn reset(&self) {
        let mut state = self.lock();
        state.scanout = None;
        state.cursor = CursorState::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    const SHORT: Duration = Duration::from_millis(20);
    const GENEROUS: Duration = Duration::from_secs(10);

    #[test]
    fn screen_is_shareable_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Screen>();
        shareable::<Arc<Screen>>();
    }

    #[test]
    fn latest_frame_before_any_flush_is_none() {
        let mut harness = Harness::new();
        assert_eq!(harness.gpu.screen().latest_frame(), None);
        harness.show(1, 16, 16, PIXELS_ADDR);
        assert_eq!(harness.gpu.screen().latest_frame(), None);
    }

    #[test]
    fn capture_before_scanout_says_nothing_is_shown() {
        let harness = Harness::new();
        let error = harness.gpu.screen().capture(&CaptureOptions::default()).unwrap_err();
        assert!(matches!(error, ScreenError::FindScanout));
        assert!(error.to_string().contains("wait for a frame"), "{error}");
        assert!(matches!(harness.gpu.screen().with_pixels(|_, _| ()), Err(ScreenError::FindScanout)));
    }

    #[test]
    fn display_size_is_the_configured_size() {
        assert_eq!(Harness::new().gpu.screen().display_size(), (1280, 800));
    }

    #[test]
    fn wait_for_frame_after_times_out_when_guest_is_idle() {
        let harness = Harness::new();
        let start = Instant::now();
        let error = harness.gpu.screen().wait_for_frame_after(0, SHORT).unwrap_err();
        assert!(matches!(error, ScreenError::WaitForFrame { after: 0, .. }));
        assert!(start.elapsed() >= SHORT);
    }

    #[test]
    fn wait_for_frame_after_returns_at_once_when_a_later_frame_exists() {
        let mut harness = Harness::new();
        harness.show(1, 16, 16, PIXELS_ADDR);
        harness.flush(1, Rect::new(0, 0, 16, 16));
        harness.flush(1, Rect::new(0, 0, 4, 4));
        let frame = harness.gpu.screen().wait_for_frame_after(0, Duration::ZERO).unwrap();
        assert_eq!((frame.number, frame.damage), (2, Rect::new(0, 0, 4, 4)));
        assert!(harness.gpu.screen().wait_for_frame_after(2, Duration::ZERO).is_err());
    }

    #[test]
    fn wait_for_frame_after_wakes_on_flush_from_device_thread() {
        let mut harness = Harness::new();
        harness.show(1, 16, 16, PIXELS_ADDR);
        let screen = harness.gpu.screen();
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| screen.wait_for_frame_after(0, GENEROUS));
            // The device thread: flush once the waiter is (very likely) waiting; the
            // result is the same either way.
            std::thread::sleep(Duration::from_millis(5));
            harness.flush(1, Rect::new(0, 0, 16, 16));
            assert_eq!(waiter.join().unwrap().unwrap().number, 1);
        });
    }

    #[test]
    fn wait_until_still_returns_last_frame_after_quiet_period() {
        let mut harness = Harness::new();
        harness.show(1, 16, 16, PIXELS_ADDR);
        harness.flush(1, Rect::new(0, 0, 16, 16));
        let start = Instant::now();
        let frame = harness.gpu.screen().wait_until_still(SHORT, GENEROUS).unwrap();
        assert_eq!(frame.number, 1);
        assert!(start.elapsed() >= SHORT, "stillness counts from the call");
    }

    #[test]
    fn wait_until_still_without_any_frame_returns_error() {
        let harness = Harness::new();
        let error = harness.gpu.screen().wait_until_still(SHORT, GENEROUS).unwrap_err();
        assert!(matches!(error, ScreenError::WaitUntilStillNoFrame { .. }), "{error}");
    }

    #[test]
    fn wait_until_still_while_frames_keep_coming_times_out() {
        let mut harness = Harness::new();
        harness.show(1, 16, 16, PIXELS_ADDR);
        let screen = harness.gpu.screen();
        let (still, timeout) = (Duration::from_millis(200), Duration::from_millis(400));
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| screen.wait_until_still(still, timeout));
            // A frame every 2 ms: the screen is never still for 200 ms.
            while !waiter.is_finished() {
                harness.flush(1, Rect::new(0, 0, 16, 16));
                std::thread::sleep(Duration::from_millis(2));
            }
            let error = waiter.join().unwrap().unwrap_err();
            assert!(matches!(error, ScreenError::WaitUntilStill { last_frame: Some(_), .. }), "{error}");
        });
    }
}

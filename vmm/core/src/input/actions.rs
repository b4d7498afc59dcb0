//! Agent actions (click, drag, scroll, type, key combo) planned as timed steps of evdev
//! events for the virtual keyboard and tablet.
//!
//! Planning validates everything up front, so an action either fails before any event
//! reaches the guest or is delivered whole. Each [`Step`] is one evdev frame (ending in
//! SYN_REPORT) for one device, followed by a pause: the caller pushes a step, sleeps
//! `pause_after`, pushes the next. Every action ends with a `gap` pause so consecutive
//! actions stay distinct events for the guest's toolkit (a double click is two clicks
//! `gap` apart, not two actions run together).

use std::time::Duration;

use super::key::KEY_LEFTSHIFT;
use super::keymap::{parse_combo, text_to_keys};
use super::{InputError, InputEvent, ABS_MAX, ABS_X, ABS_Y, BTN_LEFT, BTN_MIDDLE, BTN_RIGHT, EV_ABS, EV_REL};
use super::{REL_HWHEEL, REL_WHEEL};

/// Most characters one Type action may carry.
pub const MAX_TYPE_CHARS: usize = 4096;
/// Most clicks one Click action may make.
pub const MAX_CLICK_COUNT: u32 = 10;
/// Most points one Drag path may have.
pub const MAX_DRAG_POINTS: usize = 1000;
/// Largest scroll, in wheel notches, per axis.
pub const MAX_SCROLL: i32 = 100;

/// A mouse button.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Button {
    Left,
    Right,
    Middle,
}

impl Button {
    /// The evdev code of the button.
    pub fn code(self) -> u16 {
        match self {
            Button::Left => BTN_LEFT,
            Button::Right => BTN_RIGHT,
            Button::Middle => BTN_MIDDLE,
        }
    }
}

/// What the agent asks the mouse or keyboard to do. Coordinates are screen pixels.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Action {
    Move {
        x: u32,
        y: u32,
    },
    Click {
        x: u32,
        y: u32,
        button: Button,
        count: u32,
    },
    ButtonDown {
        button: Button,
    },
    ButtonUp {
        button: Button,
    },
    /// Press at the first point, move through the rest, release at the last.
    Drag {
        button: Button,
        path: Vec<(u32, u32)>,
    },
    /// Wheel notches at a point: `dy` > 0 scrolls up and `dx` > 0 right, as in evdev.
    Scroll {
        x: u32,
        y: u32,
        dx: i32,
        dy: i32,
    },
    /// Text typed on a US keyboard: printable ASCII, newline and tab.
    Type {
        text: String,
    },
    /// The value of a secret the host keeps, typed like [`Action::Type`]: the audit log
    /// names the secret and counts its characters, and nothing prints the value.
    TypeSecret {
        name: String,
        text: SecretText,
    },
    /// A key combination such as "ctrl+shift+t" (see [`super::parse_combo`]).
    Key {
        combo: String,
    },
}

/// A secret's value on its way to the keyboard. Its `Debug` shows the length only, so no
/// log or error message that prints an action can show it.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecretText(pub String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "SecretText({} chars)", self.0.chars().count())
    }
}

/// How long keys and buttons stay down, and the pause between keystrokes and clicks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// From key or button down to up.
    pub hold: Duration,
    /// Between keystrokes, clicks, and after every action.
    pub gap: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing { hold: Duration::from_millis(10), gap: Duration::from_millis(10) }
    }
}

/// Which virtual device a step goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Keyboard,
    Tablet,
}

/// One evdev frame for one device; `events` always ends with SYN_REPORT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub device: Device,
    pub events: Vec<InputEvent>,
    pub pause_after: Duration,
}

impl Step {
    fn new(device: Device, mut events: Vec<InputEvent>, pause_after: Duration) -> Step {
        events.push(InputEvent::syn());
        Step { device, events, pause_after }
    }
}

/// Plans `action` on a `screen` of (width, height) pixels.
pub fn plan(action: &Action, screen: (u32, u32), timing: &Timing) -> Result<Vec<Step>, InputError> {
    let mut steps = match action {
        Action::Move { x, y } => vec![move_step(*x, *y, screen, timing.gap)?],
        Action::Click { x, y, button, count } => plan_click(*x, *y, *button, *count, screen, timing)?,
        Action::ButtonDown { button } => vec![button_step(*button, true, timing.gap)],
        Action::ButtonUp { button } => vec![button_step(*button, false, timing.gap)],
        Action::Drag { button, path } => plan_drag(*button, path, screen, timing)?,
        Action::Scroll { x, y, dx, dy } => plan_scroll(*x, *y, *dx, *dy, screen, timing)?,
        Action::Type { text } | Action::TypeSecret { text: SecretText(text), .. } => plan_type(text, timing)?,
        Action::Key { combo } => plan_key(combo, timing)?,
    };
    if let Some(last) = steps.last_mut() {
        last.pause_after = timing.gap;
    }
    Ok(steps)
}

/// Maps a pixel coordinate to the tablet's 0..=ABS_MAX range, rounding to nearest.
pub fn scale_to_abs(pixel: u32, extent: u32) -> i32 {
    if extent <= 1 {
        return 0;
    }
    let last = u64::from(extent - 1);
    let scaled = (u64::from(pixel.min(extent - 1)) * ABS_MAX as u64 + last / 2) / last;
    scaled as i32
}

fn check_point(x: u32, y: u32, (width, height): (u32, u32)) -> Result<(), InputError> {
    if width == 0 || height == 0 {
        return Err(InputError::MapScreen { width, height });
    }
    if x >= width || y >= height {
        return Err(InputError::MapPoint { x, y, width, height });
    }
    Ok(())
}

fn move_step(x: u32, y: u32, screen: (u32, u32), pause_after: Duration) -> Result<Step, InputError> {
    check_point(x, y, screen)?;
    let events = vec![
        InputEvent::new(EV_ABS, ABS_X, scale_to_abs(x, screen.0)),
        InputEvent::new(EV_ABS, ABS_Y, scale_to_abs(y, screen.1)),
    ];
    Ok(Step::new(Device::Tablet, events, pause_after))
}

fn button_step(button: Button, pressed: bool, pause_after: Duration) -> Step {
    Step::new(Device::Tablet, vec![InputEvent::key(button.code(), pressed)], pause_after)
}

fn key_step(code: u16, pressed: bool, pause_after: Duration) -> Step {
    Step::new(Device::Keyboard, vec![InputEvent::key(code, pressed)], pause_after)
}

fn plan_click(
    x: u32,
    y: u32,
    button: Button,
    count: u32,
    screen: (u32, u32),
    timing: &Timing,
) -> Result<Vec<Step>, InputError> {
    if count == 0 || count > MAX_CLICK_COUNT {
        return Err(InputError::ClickCount { count, max: MAX_CLICK_COUNT });
    }
    let mut steps = vec![move_step(x, y, screen, timing.gap)?];
    for _ in 0..count {
        steps.push(button_step(button, true, timing.hold));
        steps.push(button_step(button, false, timing.gap));
    }
    Ok(steps)
}

fn plan_drag(
    button: Button,
    path: &[(u32, u32)],
    screen: (u32, u32),
    timing: &Timing,
) -> Result<Vec<Step>, InputError> {
    if path.len() < 2 || path.len() > MAX_DRAG_POINTS {
        return Err(InputError::DragPath { points: path.len(), max: MAX_DRAG_POINTS });
    }
    let moves = path.iter().map(|(x, y)| move_step(*x, *y, screen, timing.gap)).collect::<Result<Vec<_>, _>>()?;
    let mut steps = Vec::with_capacity(path.len() + 2);
    let mut moves = moves.into_iter();
    steps.extend(moves.next());
    steps.push(button_step(button, true, timing.hold));
    steps.extend(moves);
    steps.push(button_step(button, false, timing.gap));
    Ok(steps)
}

fn plan_scroll(x: u32, y: u32, dx: i32, dy: i32, screen: (u32, u32), timing: &Timing) -> Result<Vec<Step>, InputError> {
    let in_range = |d: i32| (-MAX_SCROLL..=MAX_SCROLL).contains(&d);
    if (dx == 0 && dy == 0) || !in_range(dx) || !in_range(dy) {
        return Err(InputError::ScrollAmount { dx, dy, max: MAX_SCROLL });
    }
    let mut wheel = Vec::with_capacity(2);
    if dy != 0 {
        wheel.push(InputEvent::new(EV_REL, REL_WHEEL, dy));
    }
    if dx != 0 {
        wheel.push(InputEvent::new(EV_REL, REL_HWHEEL, dx));
    }
    Ok(vec![move_step(x, y, screen, timing.gap)?, Step::new(Device::Tablet, wheel, timing.gap)])
}

fn plan_type(text: &str, timing: &Timing) -> Result<Vec<Step>, InputError> {
    if text.is_empty() {
        return Err(InputError::EmptyText);
    }
    let chars = text.chars().count();
    if chars > MAX_TYPE_CHARS {
        return Err(InputError::TypeTooLong { chars, max: MAX_TYPE_CHARS });
    }
    let keys = text_to_keys(text)?;
    let mut steps = Vec::with_capacity(keys.len() * 4);
    for (code, shift) in keys {
        // Shift gets its own frame before the key, so the guest sees it held when the key
        // goes down; it is released after the key for the same reason.
        if shift {
            steps.push(key_step(KEY_LEFTSHIFT, true, Duration::ZERO));
        }
        steps.push(key_step(code, true, timing.hold));
        if shift {
            steps.push(key_step(code, false, Duration::ZERO));
            steps.push(key_step(KEY_LEFTSHIFT, false, timing.gap));
        } else {
            steps.push(key_step(code, false, timing.gap));
        }
    }
    Ok(steps)
}

fn plan_key(combo: &str, timing: &Timing) -> Result<Vec<Step>, InputError> {
    let keys = parse_combo(combo)?;
    let Some((&pressed, held)) = keys.split_last() else {
        return Err(InputError::ParseCombo { combo: combo.to_string(), reason: "it names no key".to_string() });
    };
    let mut steps = Vec::with_capacity(keys.len() * 2);
    steps.extend(held.iter().map(|code| key_step(*code, true, Duration::ZERO)));
    steps.push(key_step(pressed, true, timing.hold));
    steps.push(key_step(pressed, false, Duration::ZERO));
    steps.extend(held.iter().rev().map(|code| key_step(*code, false, Duration::ZERO)));
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::key::*;
    use crate::input::{EV_KEY, EV_SYN, SYN_REPORT};

    const SCREEN: (u32, u32) = (1280, 800);
    const HOLD: Duration = Duration::from_millis(7);
    const GAP: Duration = Duration::from_millis(13);
    const TIMING: Timing = Timing { hold: HOLD, gap: GAP };

    fn syn() -> InputEvent {
        InputEvent::syn()
    }

    fn abs(x: i32, y: i32) -> Vec<InputEvent> {
        vec![InputEvent::new(EV_ABS, ABS_X, x), InputEvent::new(EV_ABS, ABS_Y, y), syn()]
    }

    fn key(code: u16, pressed: bool) -> Vec<InputEvent> {
        vec![InputEvent::key(code, pressed), syn()]
    }

    /// The plan as (device, events, pause) triples, for whole-sequence comparisons.
    fn flatten(steps: &[Step]) -> Vec<(Device, Vec<InputEvent>, Duration)> {
        steps.iter().map(|step| (step.device, step.events.clone(), step.pause_after)).collect()
    }

    fn assert_every_step_ends_with_one_syn(steps: &[Step]) {
        for step in steps {
            assert_eq!(step.events.last(), Some(&InputEvent::new(EV_SYN, SYN_REPORT, 0)), "{step:?}");
            assert_eq!(step.events.iter().filter(|event| event.kind == EV_SYN).count(), 1, "{step:?}");
        }
    }

    #[test]
    fn timing_default_is_ten_milliseconds_each() {
        assert_eq!(Timing::default(), Timing { hold: Duration::from_millis(10), gap: Duration::from_millis(10) });
    }

    #[test]
    fn scale_to_abs_maps_edges_to_zero_and_max() {
        assert_eq!(scale_to_abs(0, 1280), 0);
        assert_eq!(scale_to_abs(1279, 1280), ABS_MAX);
        assert_eq!(scale_to_abs(0, 1), 0);
        assert_eq!(scale_to_abs(1, 2), ABS_MAX);
        // 640 * 32767 / 1279 = 16396.3: rounded to nearest.
        assert_eq!(scale_to_abs(640, 1280), 16396);
        assert_eq!(scale_to_abs(2, 4), 21845);
        assert_eq!(scale_to_abs(1, 3), 16384);
    }

    #[test]
    fn move_plans_one_absolute_frame_on_the_tablet() {
        let steps = plan(&Action::Move { x: 0, y: 799 }, SCREEN, &TIMING).unwrap();
        assert_eq!(flatten(&steps), vec![(Device::Tablet, abs(0, ABS_MAX), GAP)]);
        let steps = plan(&Action::Move { x: 1279, y: 0 }, SCREEN, &TIMING).unwrap();
        assert_eq!(flatten(&steps), vec![(Device::Tablet, abs(ABS_MAX, 0), GAP)]);
    }

    #[test]
    fn move_on_one_pixel_screen_maps_to_zero() {
        let steps = plan(&Action::Move { x: 0, y: 0 }, (1, 1), &TIMING).unwrap();
        assert_eq!(steps[0].events, abs(0, 0));
    }

    #[test]
    fn click_moves_then_presses_and_releases_count_times() {
        let action = Action::Click { x: 1279, y: 0, button: Button::Right, count: 2 };
        let steps = plan(&action, SCREEN, &TIMING).unwrap();
        assert_every_step_ends_with_one_syn(&steps);
        let tablet = Device::Tablet;
        assert_eq!(
            flatten(&steps),
            vec![
                (tablet, abs(ABS_MAX, 0), GAP),
                (tablet, key(BTN_RIGHT, true), HOLD),
                (tablet, key(BTN_RIGHT, false), GAP),
                (tablet, key(BTN_RIGHT, true), HOLD),
                (tablet, key(BTN_RIGHT, false), GAP),
            ]
        );
    }

    #[test]
    fn click_count_out_of_range_returns_error() {
        for count in [0, 11, u32::MAX] {
            let action = Action::Click { x: 1, y: 1, button: Button::Left, count };
            assert_eq!(plan(&action, SCREEN, &TIMING), Err(InputError::ClickCount { count, max: 10 }));
        }
        let action = Action::Click { x: 1, y: 1, button: Button::Middle, count: 10 };
        assert_eq!(plan(&action, SCREEN, &TIMING).unwrap().len(), 21);
    }

    #[test]
    fn point_outside_screen_returns_error() {
        let outside = [(1280, 0), (0, 800), (u32::MAX, u32::MAX)];
        for (x, y) in outside {
            let expected = Err(InputError::MapPoint { x, y, width: 1280, height: 800 });
            assert_eq!(plan(&Action::Move { x, y }, SCREEN, &TIMING), expected);
            assert_eq!(plan(&Action::Click { x, y, button: Button::Left, count: 1 }, SCREEN, &TIMING), expected);
            assert_eq!(plan(&Action::Scroll { x, y, dx: 0, dy: 1 }, SCREEN, &TIMING), expected);
            let drag = Action::Drag { button: Button::Left, path: vec![(1, 1), (x, y)] };
            assert_eq!(plan(&drag, SCREEN, &TIMING), expected);
        }
        let message = plan(&Action::Move { x: 1280, y: 0 }, SCREEN, &TIMING).unwrap_err().to_string();
        assert!(message.contains("(1280, 0)") && message.contains("1280x800"), "{message}");
    }

    #[test]
    fn empty_screen_returns_error() {
        assert_eq!(
            plan(&Action::Move { x: 0, y: 0 }, (0, 800), &TIMING),
            Err(InputError::MapScreen { width: 0, height: 800 })
        );
    }

    #[test]
    fn button_down_and_up_are_single_frames() {
        let down = plan(&Action::ButtonDown { button: Button::Middle }, SCREEN, &TIMING).unwrap();
        assert_eq!(flatten(&down), vec![(Device::Tablet, key(BTN_MIDDLE, true), GAP)]);
        let up = plan(&Action::ButtonUp { button: Button::Left }, SCREEN, &TIMING).unwrap();
        assert_eq!(flatten(&up), vec![(Device::Tablet, key(BTN_LEFT, false), GAP)]);
    }

    #[test]
    fn drag_presses_at_first_point_moves_and_releases_at_last() {
        let action = Action::Drag { button: Button::Left, path: vec![(0, 0), (640, 400), (1279, 799)] };
        let steps = plan(&action, SCREEN, &TIMING).unwrap();
        assert_every_step_ends_with_one_syn(&steps);
        let tablet = Device::Tablet;
        let middle = (scale_to_abs(640, 1280), scale_to_abs(400, 800));
        assert_eq!(
            flatten(&steps),
            vec![
                (tablet, abs(0, 0), GAP),
                (tablet, key(BTN_LEFT, true), HOLD),
                (tablet, abs(middle.0, middle.1), GAP),
                (tablet, abs(ABS_MAX, ABS_MAX), GAP),
                (tablet, key(BTN_LEFT, false), GAP),
            ]
        );
    }

    #[test]
    fn drag_path_too_short_or_long_returns_error() {
        for points in [0, 1, MAX_DRAG_POINTS + 1] {
            let action = Action::Drag { button: Button::Left, path: vec![(1, 1); points] };
            assert_eq!(plan(&action, SCREEN, &TIMING), Err(InputError::DragPath { points, max: MAX_DRAG_POINTS }));
        }
        let longest = Action::Drag { button: Button::Left, path: vec![(1, 1); MAX_DRAG_POINTS] };
        assert_eq!(plan(&longest, SCREEN, &TIMING).unwrap().len(), MAX_DRAG_POINTS + 2);
    }

    #[test]
    fn scroll_moves_then_sends_both_wheels_in_one_frame() {
        let steps = plan(&Action::Scroll { x: 0, y: 0, dx: -2, dy: 3 }, SCREEN, &TIMING).unwrap();
        assert_every_step_ends_with_one_syn(&steps);
        let wheel = vec![InputEvent::new(EV_REL, REL_WHEEL, 3), InputEvent::new(EV_REL, REL_HWHEEL, -2), syn()];
        assert_eq!(flatten(&steps), vec![(Device::Tablet, abs(0, 0), GAP), (Device::Tablet, wheel, GAP)]);
    }

    #[test]
    fn scroll_one_axis_sends_only_that_wheel() {
        let steps = plan(&Action::Scroll { x: 0, y: 0, dx: 0, dy: -100 }, SCREEN, &TIMING).unwrap();
        assert_eq!(steps[1].events, vec![InputEvent::new(EV_REL, REL_WHEEL, -100), syn()]);
        let steps = plan(&Action::Scroll { x: 0, y: 0, dx: 100, dy: 0 }, SCREEN, &TIMING).unwrap();
        assert_eq!(steps[1].events, vec![InputEvent::new(EV_REL, REL_HWHEEL, 100), syn()]);
    }

    #[test]
    fn scroll_zero_or_too_far_returns_error() {
        for (dx, dy) in [(0, 0), (101, 0), (0, -101), (i32::MIN, 1), (1, i32::MAX)] {
            let action = Action::Scroll { x: 0, y: 0, dx, dy };
            assert_eq!(plan(&action, SCREEN, &TIMING), Err(InputError::ScrollAmount { dx, dy, max: MAX_SCROLL }));
        }
    }

    #[test]
    fn type_lowercase_is_down_hold_up_gap_per_character() {
        let steps = plan(&Action::Type { text: "a1".to_string() }, SCREEN, &TIMING).unwrap();
        assert_every_step_ends_with_one_syn(&steps);
        let keyboard = Device::Keyboard;
        assert_eq!(
            flatten(&steps),
            vec![
                (keyboard, key(KEY_A, true), HOLD),
                (keyboard, key(KEY_A, false), GAP),
                (keyboard, key(KEY_1, true), HOLD),
                (keyboard, key(KEY_1, false), GAP),
            ]
        );
    }

    #[test]
    fn type_shifted_character_wraps_key_in_shift() {
        let steps = plan(&Action::Type { text: "A~\n".to_string() }, SCREEN, &TIMING).unwrap();
        assert_every_step_ends_with_one_syn(&steps);
        let keyboard = Device::Keyboard;
        let zero = Duration::ZERO;
        assert_eq!(
            flatten(&steps),
            vec![
                (keyboard, key(KEY_LEFTSHIFT, true), zero),
                (keyboard, key(KEY_A, true), HOLD),
                (keyboard, key(KEY_A, false), zero),
                (keyboard, key(KEY_LEFTSHIFT, false), GAP),
                (keyboard, key(KEY_LEFTSHIFT, true), zero),
                (keyboard, key(KEY_GRAVE, true), HOLD),
                (keyboard, key(KEY_GRAVE, false), zero),
                (keyboard, key(KEY_LEFTSHIFT, false), GAP),
                (keyboard, key(KEY_ENTER, true), HOLD),
                (keyboard, key(KEY_ENTER, false), GAP),
            ]
        );
    }

    #[test]
    fn type_every_printable_ascii_character_plans_balanced_presses() {
        let text: String = (0x20u8..=0x7e).map(char::from).chain(['\n', '\t']).collect();
        let steps = plan(&Action::Type { text }, SCREEN, &TIMING).unwrap();
        assert_every_step_ends_with_one_syn(&steps);
        let presses = steps.iter().filter(|step| step.events[0].value == 1).count();
        let releases = steps.iter().filter(|step| step.events[0].value == 0).count();
        assert_eq!(presses, releases);
        assert!(steps.iter().all(|step| step.device == Device::Keyboard && step.events[0].kind == EV_KEY));
    }

    #[test]
    fn type_invalid_text_returns_error() {
        assert_eq!(plan(&Action::Type { text: String::new() }, SCREEN, &TIMING), Err(InputError::EmptyText));
        let long = "x".repeat(MAX_TYPE_CHARS + 1);
        assert_eq!(
            plan(&Action::Type { text: long }, SCREEN, &TIMING),
            Err(InputError::TypeTooLong { chars: MAX_TYPE_CHARS + 1, max: MAX_TYPE_CHARS })
        );
        assert!(plan(&Action::Type { text: "x".repeat(MAX_TYPE_CHARS) }, SCREEN, &TIMING).is_ok());
        let secret = Action::TypeSecret { name: "pw".into(), text: SecretText("a1".into()) };
        assert_eq!(plan(&secret, SCREEN, &TIMING), plan(&Action::Type { text: "a1".into() }, SCREEN, &TIMING));
        assert!(!format!("{secret:?}").contains("a1"), "{secret:?}");
        assert_eq!(
            plan(&Action::Type { text: "naïve".to_string() }, SCREEN, &TIMING),
            Err(InputError::TypeCharacter { character: 'ï', position: 2 })
        );
    }

    #[test]
    fn key_combo_presses_modifiers_in_order_and_releases_in_reverse() {
        let steps = plan(&Action::Key { combo: "ctrl+shift+t".to_string() }, SCREEN, &TIMING).unwrap();
        assert_every_step_ends_with_one_syn(&steps);
        let keyboard = Device::Keyboard;
        let zero = Duration::ZERO;
        assert_eq!(
            flatten(&steps),
            vec![
                (keyboard, key(KEY_LEFTCTRL, true), zero),
                (keyboard, key(KEY_LEFTSHIFT, true), zero),
                (keyboard, key(KEY_T, true), HOLD),
                (keyboard, key(KEY_T, false), zero),
                (keyboard, key(KEY_LEFTSHIFT, false), zero),
                (keyboard, key(KEY_LEFTCTRL, false), GAP),
            ]
        );
    }

    #[test]
    fn key_single_key_is_down_hold_up() {
        let steps = plan(&Action::Key { combo: "Return".to_string() }, SCREEN, &TIMING).unwrap();
        assert_eq!(
            flatten(&steps),
            vec![(Device::Keyboard, key(KEY_ENTER, true), HOLD), (Device::Keyboard, key(KEY_ENTER, false), GAP)]
        );
    }

    #[test]
    fn key_unknown_name_returns_error() {
        assert_eq!(
            plan(&Action::Key { combo: "ctrl+hyper".to_string() }, SCREEN, &TIMING),
            Err(InputError::ParseKey { name: "hyper".to_string() })
        );
        assert!(matches!(
            plan(&Action::Key { combo: String::new() }, SCREEN, &TIMING),
            Err(InputError::ParseCombo { .. })
        ));
    }
}

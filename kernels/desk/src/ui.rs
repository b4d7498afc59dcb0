//! What input does to the desktop: pointer and buttons hit-test the widgets, keys type
//! into the focused field or show up in the status bar. Events are applied per evdev
//! report (up to SYN_REPORT), like a real input stack.

use core::fmt::Write;

use crate::desktop::{Desktop, Layout, LIST_ITEMS, LIST_ROWS_VISIBLE};
use crate::gpu::Rect;
use crate::input::Event;

const EV_SYN: u16 = 0;
const EV_KEY: u16 = 1;
const EV_REL: u16 = 2;
const EV_ABS: u16 = 3;
const ABS_X: u16 = 0;
const ABS_Y: u16 = 1;
const REL_WHEEL: u16 = 8;
const BTN_LEFT: u16 = 0x110;
const ABS_MAX: u32 = 32767;

const KEY_BACKSPACE: u16 = 14;
const KEY_ENTER: u16 = 28;
const KEY_LEFTCTRL: u16 = 29;
const KEY_LEFTSHIFT: u16 = 42;
const KEY_RIGHTSHIFT: u16 = 54;
const KEY_LEFTALT: u16 = 56;
const KEY_CAPSLOCK: u16 = 58;
const KEY_RIGHTCTRL: u16 = 97;
const KEY_RIGHTALT: u16 = 100;
const KEY_LEFTMETA: u16 = 125;
const KEY_RIGHTMETA: u16 = 126;

/// US layout: evdev code -> (plain, shifted) character, for codes 2..=57.
const US_LAYOUT: [(u8, u8); 56] = [
    (b'1', b'!'),
    (b'2', b'@'),
    (b'3', b'#'),
    (b'4', b'$'),
    (b'5', b'%'),
    (b'6', b'^'),
    (b'7', b'&'),
    (b'8', b'*'),
    (b'9', b'('),
    (b'0', b')'),
    (b'-', b'_'),
    (b'=', b'+'),
    (0, 0),
    (0, 0),
    (b'q', b'Q'),
    (b'w', b'W'),
    (b'e', b'E'),
    (b'r', b'R'),
    (b't', b'T'),
    (b'y', b'Y'),
    (b'u', b'U'),
    (b'i', b'I'),
    (b'o', b'O'),
    (b'p', b'P'),
    (b'[', b'{'),
    (b']', b'}'),
    (0, 0),
    (0, 0),
    (b'a', b'A'),
    (b's', b'S'),
    (b'd', b'D'),
    (b'f', b'F'),
    (b'g', b'G'),
    (b'h', b'H'),
    (b'j', b'J'),
    (b'k', b'K'),
    (b'l', b'L'),
    (b';', b':'),
    (b'\'', b'"'),
    (b'`', b'~'),
    (0, 0),
    (b'\\', b'|'),
    (b'z', b'Z'),
    (b'x', b'X'),
    (b'c', b'C'),
    (b'v', b'V'),
    (b'b', b'B'),
    (b'n', b'N'),
    (b'm', b'M'),
    (b',', b'<'),
    (b'.', b'>'),
    (b'/', b'?'),
    (0, 0),
    (b'*', b'*'),
    (0, 0),
    (b' ', b' '),
];

/// A printable character for `code`, if it is one.
fn character(code: u16, shift: bool) -> Option<char> {
    let (plain, shifted) = *US_LAYOUT.get(usize::from(code).checked_sub(2)?)?;
    let byte = if shift { shifted } else { plain };
    (byte != 0).then_some(byte as char)
}

/// A name for keys that are not characters.
fn key_name(code: u16) -> Option<&'static str> {
    Some(match code {
        1 => "Escape",
        14 => "BackSpace",
        15 => "Tab",
        28 => "Return",
        57 => "space",
        59 => "F1",
        60 => "F2",
        61 => "F3",
        62 => "F4",
        63 => "F5",
        64 => "F6",
        65 => "F7",
        66 => "F8",
        67 => "F9",
        68 => "F10",
        87 => "F11",
        88 => "F12",
        102 => "Home",
        103 => "Up",
        104 => "Page_Up",
        105 => "Left",
        106 => "Right",
        107 => "End",
        108 => "Down",
        109 => "Page_Down",
        110 => "Insert",
        111 => "Delete",
        _ => return None,
    })
}

#[derive(Default)]
pub struct InputState {
    pending_x: Option<u32>,
    pending_y: Option<u32>,
    left_down: bool,
    wheel: i32,
    keys: [(u16, u32); 16],
    key_count: usize,
    ctrl: u8,
    shift: u8,
    alt: u8,
    meta: u8,
    caps: bool,
}

impl InputState {
    /// Applies one event; at each SYN_REPORT the report takes effect. Returns the part
    /// of the screen that changed, if anything did.
    pub fn apply(&mut self, event: Event, desktop: &mut Desktop, width: u32, height: u32) -> Option<Rect> {
        match (event.kind, event.code) {
            (EV_ABS, ABS_X) => self.pending_x = Some(scale(event.value, width)),
            (EV_ABS, ABS_Y) => self.pending_y = Some(scale(event.value, height)),
            (EV_REL, REL_WHEEL) => self.wheel += event.value as i32,
            (EV_KEY, _) if self.key_count < self.keys.len() => {
                self.keys[self.key_count] = (event.code, event.value);
                self.key_count += 1;
            }
            (EV_SYN, 0) => return self.report(desktop, width, height),
            _ => {}
        }
        None
    }

    fn report(&mut self, desktop: &mut Desktop, width: u32, height: u32) -> Option<Rect> {
        let before = desktop.pointer;
        let mut changed = false;
        if self.pending_x.is_some() || self.pending_y.is_some() {
            let (old_x, old_y) = desktop.pointer.unwrap_or((width / 2, height / 2));
            desktop.pointer = Some((self.pending_x.take().unwrap_or(old_x), self.pending_y.take().unwrap_or(old_y)));
        }
        let layout = Layout::for_screen(width, height);
        let (x, y) = desktop.pointer.unwrap_or((0, 0));
        if self.wheel != 0 {
            if contains(layout.list, x, y) {
                let max = LIST_ITEMS - LIST_ROWS_VISIBLE;
                // evdev: positive is away from the user (scroll up).
                let scroll = desktop.list_scroll as i32 - self.wheel;
                desktop.list_scroll = scroll.clamp(0, max as i32) as u32;
                changed = true; // the list
            }
            self.wheel = 0;
        }
        let mut widgets: Option<Rect> = None;
        let keys = self.keys;
        for (code, value) in keys.iter().take(self.key_count) {
            if let Some(rect) = self.key(*code, *value, desktop, &layout, x, y) {
                widgets = Some(widgets.map_or(rect, |widgets| widgets.union(rect)));
            }
        }
        self.key_count = 0;
        let moved = desktop.pointer != before;
        if changed {
            widgets = Some(widgets.map_or(layout.list, |widgets| widgets.union(layout.list)));
        }
        let cursor = moved.then(|| cursor_damage(before, desktop.pointer, width, height));
        match (widgets, cursor) {
            (Some(widgets), Some(cursor)) => Some(widgets.union(cursor)),
            (widgets, cursor) => widgets.or(cursor),
        }
    }

    /// Applies one key event; returns where the screen changed, if it did.
    fn key(&mut self, code: u16, value: u32, desktop: &mut Desktop, layout: &Layout, x: u32, y: u32) -> Option<Rect> {
        let pressed = value != 0;
        let modifier = match code {
            KEY_LEFTCTRL | KEY_RIGHTCTRL => Some(&mut self.ctrl),
            KEY_LEFTSHIFT | KEY_RIGHTSHIFT => Some(&mut self.shift),
            KEY_LEFTALT | KEY_RIGHTALT => Some(&mut self.alt),
            KEY_LEFTMETA | KEY_RIGHTMETA => Some(&mut self.meta),
            _ => None,
        };
        if let Some(count) = modifier {
            *count = if pressed { count.saturating_add(1) } else { count.saturating_sub(1) };
            return None;
        }
        if code == BTN_LEFT {
            // A click may change focus, a button, the checkbox: all inside the window.
            return self.left_button(pressed, desktop, layout, x, y).then_some(layout.window);
        }
        if !pressed || code >= 0x100 {
            return None;
        }
        if code == KEY_CAPSLOCK {
            self.caps = !self.caps;
            return None;
        }
        let shift = self.shift > 0;
        let chord = self.ctrl > 0 || self.alt > 0 || self.meta > 0;
        if desktop.text_focused && !chord {
            if code == KEY_BACKSPACE {
                desktop.text.pop();
                return Some(layout.text_field);
            }
            if code == KEY_ENTER {
                desktop.status.clear();
                let _ = write!(desktop.status, "Entered: {}", desktop.text.as_str());
                return Some(layout.status);
            }
            if let Some(c) = character(code, shift ^ (self.caps && (c_is_letter(code)))) {
                let _ = write!(desktop.text, "{c}");
                return Some(layout.text_field);
            }
        }
        // Anything else is a key (combo) for the status bar.
        desktop.status.clear();
        let _ = desktop.status.write_str("Key: ");
        for (held, name) in [(self.ctrl, "ctrl+"), (self.alt, "alt+"), (self.meta, "super+"), (self.shift, "shift+")] {
            if held > 0 {
                let _ = desktop.status.write_str(name);
            }
        }
        match (key_name(code), character(code, false)) {
            (Some(name), _) => {
                let _ = desktop.status.write_str(name);
            }
            (None, Some(c)) => {
                let _ = write!(desktop.status, "{c}");
            }
            (None, None) => {
                let _ = write!(desktop.status, "key {code}");
            }
        }
        Some(layout.status)
    }

    fn left_button(&mut self, pressed: bool, desktop: &mut Desktop, layout: &Layout, x: u32, y: u32) -> bool {
        if pressed == self.left_down {
            return false;
        }
        self.left_down = pressed;
        if pressed {
            desktop.text_focused = contains(layout.text_field, x, y);
            desktop.pressed_button = layout.buttons.iter().position(|button| contains(*button, x, y));
            if contains(layout.checkbox, x, y) {
                desktop.checkbox = !desktop.checkbox;
            }
            return true;
        }
        // A button counts when released over itself.
        if let Some(index) = desktop.pressed_button.take() {
            if contains(layout.buttons[index], x, y) {
                desktop.button_presses[index] += 1;
            }
        }
        true
    }
}

fn c_is_letter(code: u16) -> bool {
    character(code, false).is_some_and(|c| c.is_ascii_lowercase())
}

fn scale(value: u32, size: u32) -> u32 {
    let value = value.min(ABS_MAX);
    ((u64::from(value) * u64::from(size.saturating_sub(1)) + u64::from(ABS_MAX / 2)) / u64::from(ABS_MAX)) as u32
}

fn contains(rect: Rect, x: u32, y: u32) -> bool {
    x >= rect.x && x < rect.x + rect.width && y >= rect.y && y < rect.y + rect.height
}

/// The union of the old and new cursor pictures.
fn cursor_damage(before: Option<(u32, u32)>, after: Option<(u32, u32)>, width: u32, height: u32) -> Rect {
    let (w, h) = crate::desktop::CURSOR_SIZE;
    let points = [before, after];
    let xs = points.iter().flatten().map(|p| p.0);
    let ys = points.iter().flatten().map(|p| p.1);
    let (x0, x1) = (xs.clone().min().unwrap_or(0), xs.max().unwrap_or(0));
    let (y0, y1) = (ys.clone().min().unwrap_or(0), ys.max().unwrap_or(0));
    Rect { x: x0, y: y0, width: (x1 + w).min(width) - x0, height: (y1 + h).min(height) - y0 }
}

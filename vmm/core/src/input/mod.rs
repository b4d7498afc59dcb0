//! Input for the agent: what a mouse and keyboard action becomes as Linux evdev events.
//!
//! This module is pure (no I/O, no devices): [`keymap`] turns X11/xdotool key names and
//! text into evdev key codes for the US layout, and [`actions`] plans an [`actions::Action`]
//! (click, drag, type, key combo, ...) into timed [`actions::Step`]s of [`InputEvent`]s. The
//! virtio-input devices in `devices::virtio::input` carry those events to the guest.

pub mod actions;
pub mod keymap;

pub use actions::{
    plan, scale_to_abs, Action, Button, Device, SecretText, Step, Timing, MAX_CLICK_COUNT, MAX_DRAG_POINTS, MAX_SCROLL,
    MAX_TYPE_CHARS,
};
pub use keymap::{char_to_key, known_key_codes, parse_combo, parse_key, text_to_keys, MAX_COMBO_KEYS};

/// Event types (linux/input-event-codes.h).
pub const EV_SYN: u16 = 0x00;
pub const EV_KEY: u16 = 0x01;
pub const EV_REL: u16 = 0x02;
pub const EV_ABS: u16 = 0x03;
pub const EV_MSC: u16 = 0x04;
pub const EV_LED: u16 = 0x11;
pub const EV_REP: u16 = 0x14;

/// Synchronization: the end of one frame of events.
pub const SYN_REPORT: u16 = 0;

/// Relative axes.
pub const REL_HWHEEL: u16 = 0x06;
pub const REL_WHEEL: u16 = 0x08;

/// Absolute axes.
pub const ABS_X: u16 = 0x00;
pub const ABS_Y: u16 = 0x01;
/// The tablet's absolute range is 0..=ABS_MAX on both axes.
pub const ABS_MAX: i32 = 32767;

/// LEDs (the guest reports them on the status queue).
pub const LED_NUML: u16 = 0x00;
pub const LED_CAPSL: u16 = 0x01;
pub const LED_SCROLLL: u16 = 0x02;

/// Mouse buttons.
pub const BTN_LEFT: u16 = 0x110;
pub const BTN_RIGHT: u16 = 0x111;
pub const BTN_MIDDLE: u16 = 0x112;

/// Bus type of a virtual device (linux/input.h).
pub const BUS_VIRTUAL: u16 = 0x06;

/// Key codes (linux/input-event-codes.h); the values are the Linux ABI.
pub mod key {
    pub const KEY_ESC: u16 = 1;
    pub const KEY_1: u16 = 2;
    pub const KEY_2: u16 = 3;
    pub const KEY_3: u16 = 4;
    pub const KEY_4: u16 = 5;
    pub const KEY_5: u16 = 6;
    pub const KEY_6: u16 = 7;
    pub const KEY_7: u16 = 8;
    pub const KEY_8: u16 = 9;
    pub const KEY_9: u16 = 10;
    pub const KEY_0: u16 = 11;
    pub const KEY_MINUS: u16 = 12;
    pub const KEY_EQUAL: u16 = 13;
    pub const KEY_BACKSPACE: u16 = 14;
    pub const KEY_TAB: u16 = 15;
    pub const KEY_Q: u16 = 16;
    pub const KEY_W: u16 = 17;
    pub const KEY_E: u16 = 18;
    pub const KEY_R: u16 = 19;
    pub const KEY_T: u16 = 20;
    pub const KEY_Y: u16 = 21;
    pub const KEY_U: u16 = 22;
    pub const KEY_I: u16 = 23;
    pub const KEY_O: u16 = 24;
    pub const KEY_P: u16 = 25;
    pub const KEY_LEFTBRACE: u16 = 26;
    pub const KEY_RIGHTBRACE: u16 = 27;
    pub const KEY_ENTER: u16 = 28;
    pub const KEY_LEFTCTRL: u16 = 29;
    pub const KEY_A: u16 = 30;
    pub const KEY_S: u16 = 31;
    pub const KEY_D: u16 = 32;
    pub const KEY_F: u16 = 33;
    pub const KEY_G: u16 = 34;
    pub const KEY_H: u16 = 35;
    pub const KEY_J: u16 = 36;
    pub const KEY_K: u16 = 37;
    pub const KEY_L: u16 = 38;
    pub const KEY_SEMICOLON: u16 = 39;
    pub const KEY_APOSTROPHE: u16 = 40;
    pub const KEY_GRAVE: u16 = 41;
    pub const KEY_LEFTSHIFT: u16 = 42;
    pub const KEY_BACKSLASH: u16 = 43;
    pub const KEY_Z: u16 = 44;
    pub const KEY_X: u16 = 45;
    pub const KEY_C: u16 = 46;
    pub const KEY_V: u16 = 47;
    pub const KEY_B: u16 = 48;
    pub const KEY_N: u16 = 49;
    pub const KEY_M: u16 = 50;
    pub const KEY_COMMA: u16 = 51;
    pub const KEY_DOT: u16 = 52;
    pub const KEY_SLASH: u16 = 53;
    pub const KEY_RIGHTSHIFT: u16 = 54;
    pub const KEY_KPASTERISK: u16 = 55;
    pub const KEY_LEFTALT: u16 = 56;
    pub const KEY_SPACE: u16 = 57;
    pub const KEY_CAPSLOCK: u16 = 58;
    pub const KEY_F1: u16 = 59;
    pub const KEY_F2: u16 = 60;
    pub const KEY_F3: u16 = 61;
    pub const KEY_F4: u16 = 62;
    pub const KEY_F5: u16 = 63;
    pub const KEY_F6: u16 = 64;
    pub const KEY_F7: u16 = 65;
    pub const KEY_F8: u16 = 66;
    pub const KEY_F9: u16 = 67;
    pub const KEY_F10: u16 = 68;
    pub const KEY_NUMLOCK: u16 = 69;
    pub const KEY_SCROLLLOCK: u16 = 70;
    pub const KEY_KP7: u16 = 71;
    pub const KEY_KP8: u16 = 72;
    pub const KEY_KP9: u16 = 73;
    pub const KEY_KPMINUS: u16 = 74;
    pub const KEY_KP4: u16 = 75;
    pub const KEY_KP5: u16 = 76;
    pub const KEY_KP6: u16 = 77;
    pub const KEY_KPPLUS: u16 = 78;
    pub const KEY_KP1: u16 = 79;
    pub const KEY_KP2: u16 = 80;
    pub const KEY_KP3: u16 = 81;
    pub const KEY_KP0: u16 = 82;
    pub const KEY_KPDOT: u16 = 83;
    pub const KEY_102ND: u16 = 86;
    pub const KEY_F11: u16 = 87;
    pub const KEY_F12: u16 = 88;
    pub const KEY_KPENTER: u16 = 96;
    pub const KEY_RIGHTCTRL: u16 = 97;
    pub const KEY_KPSLASH: u16 = 98;
    pub const KEY_SYSRQ: u16 = 99;
    pub const KEY_RIGHTALT: u16 = 100;
    pub const KEY_HOME: u16 = 102;
    pub const KEY_UP: u16 = 103;
    pub const KEY_PAGEUP: u16 = 104;
    pub const KEY_LEFT: u16 = 105;
    pub const KEY_RIGHT: u16 = 106;
    pub const KEY_END: u16 = 107;
    pub const KEY_DOWN: u16 = 108;
    pub const KEY_PAGEDOWN: u16 = 109;
    pub const KEY_INSERT: u16 = 110;
    pub const KEY_DELETE: u16 = 111;
    pub const KEY_MUTE: u16 = 113;
    pub const KEY_VOLUMEDOWN: u16 = 114;
    pub const KEY_VOLUMEUP: u16 = 115;
    pub const KEY_KPEQUAL: u16 = 117;
    pub const KEY_PAUSE: u16 = 119;
    pub const KEY_KPCOMMA: u16 = 121;
    pub const KEY_LEFTMETA: u16 = 125;
    pub const KEY_RIGHTMETA: u16 = 126;
    /// The PC context-menu key; X11's `Menu` keysym comes from this code.
    pub const KEY_COMPOSE: u16 = 127;
    pub const KEY_MENU: u16 = 139;
    pub const KEY_NEXTSONG: u16 = 163;
    pub const KEY_PLAYPAUSE: u16 = 164;
    pub const KEY_PREVIOUSSONG: u16 = 165;
    pub const KEY_STOPCD: u16 = 166;
    pub const KEY_KPLEFTPAREN: u16 = 179;
    pub const KEY_KPRIGHTPAREN: u16 = 180;
    pub const KEY_F13: u16 = 183;
    pub const KEY_F14: u16 = 184;
    pub const KEY_F15: u16 = 185;
    pub const KEY_F16: u16 = 186;
    pub const KEY_F17: u16 = 187;
    pub const KEY_F18: u16 = 188;
    pub const KEY_F19: u16 = 189;
    pub const KEY_F20: u16 = 190;
    pub const KEY_F21: u16 = 191;
    pub const KEY_F22: u16 = 192;
    pub const KEY_F23: u16 = 193;
    pub const KEY_F24: u16 = 194;
    pub const KEY_MICMUTE: u16 = 248;
}

/// One Linux input event, as `struct virtio_input_event` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InputEvent {
    /// The event type (`EV_*`).
    pub kind: u16,
    pub code: u16,
    pub value: i32,
}

/// Size of `struct virtio_input_event` on the wire.
pub const EVENT_SIZE: usize = 8;

impl InputEvent {
    pub const fn new(kind: u16, code: u16, value: i32) -> InputEvent {
        InputEvent { kind, code, value }
    }

    /// The SYN_REPORT that ends a frame.
    pub const fn syn() -> InputEvent {
        InputEvent::new(EV_SYN, SYN_REPORT, 0)
    }

    /// A key or button press (`pressed`) or release.
    pub const fn key(code: u16, pressed: bool) -> InputEvent {
        InputEvent::new(EV_KEY, code, pressed as i32)
    }

    /// `struct virtio_input_event { le16 type; le16 code; le32 value; }`.
    pub fn to_le_bytes(&self) -> [u8; EVENT_SIZE] {
        let mut bytes = [0u8; EVENT_SIZE];
        bytes[0..2].copy_from_slice(&self.kind.to_le_bytes());
        bytes[2..4].copy_from_slice(&self.code.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.value.to_le_bytes());
        bytes
    }

    pub fn from_le_bytes(bytes: [u8; EVENT_SIZE]) -> InputEvent {
        InputEvent {
            kind: u16::from_le_bytes([bytes[0], bytes[1]]),
            code: u16::from_le_bytes([bytes[2], bytes[3]]),
            value: i32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
        }
    }
}

/// Errors planning input or handing it to a device. Each says what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error(
        "unknown key name {name:?}; use X11/xdotool names such as Return, Escape, BackSpace, Tab, space, \
         Page_Up, Up, F5, ctrl, shift, alt, super, Delete, minus, comma, or a single character"
    )]
    ParseKey { name: String },
    #[error("cannot parse key combination {combo:?}: {reason}")]
    ParseCombo { combo: String, reason: String },
    #[error(
        "cannot type {character:?} (U+{code:04X}) at character {position} of the text: the US keyboard layout has \
         no key for it; type only printable ASCII, newline and tab",
        code = u32::from(*character)
    )]
    TypeCharacter { character: char, position: usize },
    #[error("nothing to type: the text is empty")]
    EmptyText,
    #[error("text of {chars} characters is too long to type at once; send at most {max} per action")]
    TypeTooLong { chars: usize, max: usize },
    #[error("screen size {width}x{height} is empty; the display must be at least 1x1")]
    MapScreen { width: u32, height: u32 },
    #[error("point ({x}, {y}) is outside the {width}x{height} screen; x must be below {width} and y below {height}")]
    MapPoint { x: u32, y: u32, width: u32, height: u32 },
    #[error("click count {count} is out of range; use 1 to {max}")]
    ClickCount { count: u32, max: u32 },
    #[error("drag path has {points} points; give between 2 and {max}")]
    DragPath { points: usize, max: usize },
    #[error("scroll by ({dx}, {dy}) is out of range; each of dx and dy must be within -{max}..={max}, not both 0")]
    ScrollAmount { dx: i32, dy: i32, max: i32 },
    #[error(
        "the {device} input queue is full ({pending} events wait, {requested} more do not fit in {capacity}); \
         the guest is not reading input, retry later"
    )]
    PushEvents { device: &'static str, pending: usize, requested: usize, capacity: usize },
    #[error("the guest has no {device} driver running yet, so the input was dropped; wait for the guest to boot")]
    DeviceInactive { device: &'static str },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_wire_format_is_little_endian_type_code_value() {
        let event = InputEvent::new(EV_REL, REL_WHEEL, -2);
        let bytes = event.to_le_bytes();
        assert_eq!(bytes, [0x02, 0x00, 0x08, 0x00, 0xfe, 0xff, 0xff, 0xff]);
        assert_eq!(InputEvent::from_le_bytes(bytes), event);
    }

    #[test]
    fn key_event_value_is_one_for_press_zero_for_release() {
        assert_eq!(InputEvent::key(BTN_LEFT, true), InputEvent::new(EV_KEY, BTN_LEFT, 1));
        assert_eq!(InputEvent::key(BTN_LEFT, false), InputEvent::new(EV_KEY, BTN_LEFT, 0));
        assert_eq!(InputEvent::syn(), InputEvent::new(0, 0, 0));
    }

    #[test]
    fn type_character_error_names_character_and_position() {
        let message = InputError::TypeCharacter { character: 'é', position: 3 }.to_string();
        assert!(message.contains("'é'") && message.contains("U+00E9") && message.contains("character 3"), "{message}");
    }
}

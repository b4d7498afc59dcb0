//! Key names and text to evdev key codes, for the US keyboard layout.
//!
//! Names follow X11 keysyms as xdotool accepts them ("Return", "Page_Up", "ctrl",
//! "XF86AudioMute"), matched case-insensitively with underscores ignored, plus common
//! aliases ("Enter", "Esc", "PageUp", "cmd", "win") and any single character the US layout
//! can type. Characters map to the physical key plus whether shift must be held, which is
//! what the guest's US keymap turns back into the character.

use super::key::*;
use super::InputError;

/// Most keys one combination may hold down together.
pub const MAX_COMBO_KEYS: usize = 8;

/// Named keys: (normalized name, code, needs shift). Normalized means lowercase without
/// underscores; single characters are handled by [`char_to_key`] instead.
const NAMED_KEYS: &[(&str, u16, bool)] = &[
    ("return", KEY_ENTER, false),
    ("enter", KEY_ENTER, false),
    ("escape", KEY_ESC, false),
    ("esc", KEY_ESC, false),
    ("backspace", KEY_BACKSPACE, false),
    ("tab", KEY_TAB, false),
    ("space", KEY_SPACE, false),
    ("spacebar", KEY_SPACE, false),
    // Navigation.
    ("pageup", KEY_PAGEUP, false),
    ("prior", KEY_PAGEUP, false),
    ("pgup", KEY_PAGEUP, false),
    ("pagedown", KEY_PAGEDOWN, false),
    ("next", KEY_PAGEDOWN, false),
    ("pgdn", KEY_PAGEDOWN, false),
    ("pgdown", KEY_PAGEDOWN, false),
    ("home", KEY_HOME, false),
    ("end", KEY_END, false),
    ("insert", KEY_INSERT, false),
    ("ins", KEY_INSERT, false),
    ("delete", KEY_DELETE, false),
    ("del", KEY_DELETE, false),
    ("up", KEY_UP, false),
    ("arrowup", KEY_UP, false),
    ("down", KEY_DOWN, false),
    ("arrowdown", KEY_DOWN, false),
    ("left", KEY_LEFT, false),
    ("arrowleft", KEY_LEFT, false),
    ("right", KEY_RIGHT, false),
    ("arrowright", KEY_RIGHT, false),
    // Function keys.
    ("f1", KEY_F1, false),
    ("f2", KEY_F2, false),
    ("f3", KEY_F3, false),
    ("f4", KEY_F4, false),
    ("f5", KEY_F5, false),
    ("f6", KEY_F6, false),
    ("f7", KEY_F7, false),
    ("f8", KEY_F8, false),
    ("f9", KEY_F9, false),
    ("f10", KEY_F10, false),
    ("f11", KEY_F11, false),
    ("f12", KEY_F12, false),
    ("f13", KEY_F13, false),
    ("f14", KEY_F14, false),
    ("f15", KEY_F15, false),
    ("f16", KEY_F16, false),
    ("f17", KEY_F17, false),
    ("f18", KEY_F18, false),
    ("f19", KEY_F19, false),
    ("f20", KEY_F20, false),
    ("f21", KEY_F21, false),
    ("f22", KEY_F22, false),
    ("f23", KEY_F23, false),
    ("f24", KEY_F24, false),
    // Modifiers: a bare name is the left-hand key.
    ("ctrl", KEY_LEFTCTRL, false),
    ("control", KEY_LEFTCTRL, false),
    ("controll", KEY_LEFTCTRL, false),
    ("ctrll", KEY_LEFTCTRL, false),
    ("lctrl", KEY_LEFTCTRL, false),
    ("leftctrl", KEY_LEFTCTRL, false),
    ("leftcontrol", KEY_LEFTCTRL, false),
    ("controlr", KEY_RIGHTCTRL, false),
    ("ctrlr", KEY_RIGHTCTRL, false),
    ("rctrl", KEY_RIGHTCTRL, false),
    ("rightctrl", KEY_RIGHTCTRL, false),
    ("rightcontrol", KEY_RIGHTCTRL, false),
    ("shift", KEY_LEFTSHIFT, false),
    ("shiftl", KEY_LEFTSHIFT, false),
    ("lshift", KEY_LEFTSHIFT, false),
    ("leftshift", KEY_LEFTSHIFT, false),
    ("shiftr", KEY_RIGHTSHIFT, false),
    ("rshift", KEY_RIGHTSHIFT, false),
    ("rightshift", KEY_RIGHTSHIFT, false),
    ("alt", KEY_LEFTALT, false),
    ("altl", KEY_LEFTALT, false),
    ("lalt", KEY_LEFTALT, false),
    ("leftalt", KEY_LEFTALT, false),
    ("option", KEY_LEFTALT, false),
    ("altr", KEY_RIGHTALT, false),
    ("ralt", KEY_RIGHTALT, false),
    ("rightalt", KEY_RIGHTALT, false),
    ("altgr", KEY_RIGHTALT, false),
    ("isolevel3shift", KEY_RIGHTALT, false),
    ("super", KEY_LEFTMETA, false),
    ("superl", KEY_LEFTMETA, false),
    ("lsuper", KEY_LEFTMETA, false),
    ("leftsuper", KEY_LEFTMETA, false),
    ("meta", KEY_LEFTMETA, false),
    ("metal", KEY_LEFTMETA, false),
    ("lmeta", KEY_LEFTMETA, false),
    ("leftmeta", KEY_LEFTMETA, false),
    ("cmd", KEY_LEFTMETA, false),
    ("command", KEY_LEFTMETA, false),
    ("win", KEY_LEFTMETA, false),
    ("windows", KEY_LEFTMETA, false),
    ("lwin", KEY_LEFTMETA, false),
    ("superr", KEY_RIGHTMETA, false),
    ("rsuper", KEY_RIGHTMETA, false),
    ("rightsuper", KEY_RIGHTMETA, false),
    ("metar", KEY_RIGHTMETA, false),
    ("rmeta", KEY_RIGHTMETA, false),
    ("rightmeta", KEY_RIGHTMETA, false),
    ("rwin", KEY_RIGHTMETA, false),
    // Locks and system keys.
    ("capslock", KEY_CAPSLOCK, false),
    ("caps", KEY_CAPSLOCK, false),
    ("numlock", KEY_NUMLOCK, false),
    ("scrolllock", KEY_SCROLLLOCK, false),
    ("menu", KEY_COMPOSE, false),
    ("apps", KEY_COMPOSE, false),
    ("contextmenu", KEY_COMPOSE, false),
    ("print", KEY_SYSRQ, false),
    ("printscreen", KEY_SYSRQ, false),
    ("prtsc", KEY_SYSRQ, false),
    ("prtscn", KEY_SYSRQ, false),
    ("sysrq", KEY_SYSRQ, false),
    ("pause", KEY_PAUSE, false),
    ("break", KEY_PAUSE, false),
    // Keypad.
    ("kp0", KEY_KP0, false),
    ("kp1", KEY_KP1, false),
    ("kp2", KEY_KP2, false),
    ("kp3", KEY_KP3, false),
    ("kp4", KEY_KP4, false),
    ("kp5", KEY_KP5, false),
    ("kp6", KEY_KP6, false),
    ("kp7", KEY_KP7, false),
    ("kp8", KEY_KP8, false),
    ("kp9", KEY_KP9, false),
    ("kpenter", KEY_KPENTER, false),
    ("kpadd", KEY_KPPLUS, false),
    ("kpplus", KEY_KPPLUS, false),
    ("kpsubtract", KEY_KPMINUS, false),
    ("kpminus", KEY_KPMINUS, false),
    ("kpmultiply", KEY_KPASTERISK, false),
    ("kpasterisk", KEY_KPASTERISK, false),
    ("kpdivide", KEY_KPSLASH, false),
    ("kpslash", KEY_KPSLASH, false),
    ("kpdecimal", KEY_KPDOT, false),
    ("kpdot", KEY_KPDOT, false),
    ("kpequal", KEY_KPEQUAL, false),
    ("kpseparator", KEY_KPCOMMA, false),
    ("kpcomma", KEY_KPCOMMA, false),
    ("kpleftparen", KEY_KPLEFTPAREN, false),
    ("kprightparen", KEY_KPRIGHTPAREN, false),
    // Media.
    ("volumeup", KEY_VOLUMEUP, false),
    ("audioraisevolume", KEY_VOLUMEUP, false),
    ("xf86audioraisevolume", KEY_VOLUMEUP, false),
    ("volumedown", KEY_VOLUMEDOWN, false),
    ("audiolowervolume", KEY_VOLUMEDOWN, false),
    ("xf86audiolowervolume", KEY_VOLUMEDOWN, false),
    ("mute", KEY_MUTE, false),
    ("volumemute", KEY_MUTE, false),
    ("audiomute", KEY_MUTE, false),
    ("xf86audiomute", KEY_MUTE, false),
    ("micmute", KEY_MICMUTE, false),
    ("audiomicmute", KEY_MICMUTE, false),
    ("xf86audiomicmute", KEY_MICMUTE, false),
    ("playpause", KEY_PLAYPAUSE, false),
    ("play", KEY_PLAYPAUSE, false),
    ("audioplay", KEY_PLAYPAUSE, false),
    ("xf86audioplay", KEY_PLAYPAUSE, false),
    ("mediaplaypause", KEY_PLAYPAUSE, false),
    ("nextsong", KEY_NEXTSONG, false),
    ("audionext", KEY_NEXTSONG, false),
    ("xf86audionext", KEY_NEXTSONG, false),
    ("medianexttrack", KEY_NEXTSONG, false),
    ("previoussong", KEY_PREVIOUSSONG, false),
    ("prevsong", KEY_PREVIOUSSONG, false),
    ("audioprev", KEY_PREVIOUSSONG, false),
    ("xf86audioprev", KEY_PREVIOUSSONG, false),
    ("mediaprevtrack", KEY_PREVIOUSSONG, false),
    ("audiostop", KEY_STOPCD, false),
    ("xf86audiostop", KEY_STOPCD, false),
    ("mediastop", KEY_STOPCD, false),
    // Punctuation by X11 keysym name.
    ("minus", KEY_MINUS, false),
    ("dash", KEY_MINUS, false),
    ("equal", KEY_EQUAL, false),
    ("equals", KEY_EQUAL, false),
    ("bracketleft", KEY_LEFTBRACE, false),
    ("leftbracket", KEY_LEFTBRACE, false),
    ("bracketright", KEY_RIGHTBRACE, false),
    ("rightbracket", KEY_RIGHTBRACE, false),
    ("backslash", KEY_BACKSLASH, false),
    ("semicolon", KEY_SEMICOLON, false),
    ("apostrophe", KEY_APOSTROPHE, false),
    ("quote", KEY_APOSTROPHE, false),
    ("quoteright", KEY_APOSTROPHE, false),
    ("grave", KEY_GRAVE, false),
    ("backtick", KEY_GRAVE, false),
    ("quoteleft", KEY_GRAVE, false),
    ("comma", KEY_COMMA, false),
    ("period", KEY_DOT, false),
    ("dot", KEY_DOT, false),
    ("slash", KEY_SLASH, false),
    ("exclam", KEY_1, true),
    ("exclamation", KEY_1, true),
    ("at", KEY_2, true),
    ("numbersign", KEY_3, true),
    ("hash", KEY_3, true),
    ("dollar", KEY_4, true),
    ("percent", KEY_5, true),
    ("asciicircum", KEY_6, true),
    ("caret", KEY_6, true),
    ("ampersand", KEY_7, true),
    ("asterisk", KEY_8, true),
    ("parenleft", KEY_9, true),
    ("parenright", KEY_0, true),
    ("underscore", KEY_MINUS, true),
    ("plus", KEY_EQUAL, true),
    ("braceleft", KEY_LEFTBRACE, true),
    ("braceright", KEY_RIGHTBRACE, true),
    ("bar", KEY_BACKSLASH, true),
    ("pipe", KEY_BACKSLASH, true),
    ("colon", KEY_SEMICOLON, true),
    ("quotedbl", KEY_APOSTROPHE, true),
    ("doublequote", KEY_APOSTROPHE, true),
    ("asciitilde", KEY_GRAVE, true),
    ("tilde", KEY_GRAVE, true),
    ("less", KEY_COMMA, true),
    ("greater", KEY_DOT, true),
    ("question", KEY_SLASH, true),
];

/// The key that types `c` on a US keyboard and whether shift must be held.
///
/// Covers every printable ASCII character (0x20..=0x7e), `'\n'` (Enter) and `'\t'` (Tab).
/// Other characters are an [`InputError::TypeCharacter`] at position 0; [`text_to_keys`]
/// reports the real position within a text.
pub fn char_to_key(c: char) -> Result<(u16, bool), InputError> {
    us_key(c).ok_or(InputError::TypeCharacter { character: c, position: 0 })
}

/// Every character of `text` as (key, shift), or the first character the US layout cannot
/// type with its position (counted in characters from 0).
pub fn text_to_keys(text: &str) -> Result<Vec<(u16, bool)>, InputError> {
    text.chars()
        .enumerate()
        .map(|(position, character)| us_key(character).ok_or(InputError::TypeCharacter { character, position }))
        .collect()
}

fn us_key(c: char) -> Option<(u16, bool)> {
    const LETTERS: [u16; 26] = [
        KEY_A, KEY_B, KEY_C, KEY_D, KEY_E, KEY_F, KEY_G, KEY_H, KEY_I, KEY_J, KEY_K, KEY_L, KEY_M, KEY_N, KEY_O, KEY_P,
        KEY_Q, KEY_R, KEY_S, KEY_T, KEY_U, KEY_V, KEY_W, KEY_X, KEY_Y, KEY_Z,
    ];
    const DIGITS: [u16; 10] = [KEY_0, KEY_1, KEY_2, KEY_3, KEY_4, KEY_5, KEY_6, KEY_7, KEY_8, KEY_9];
    let key = match c {
        'a'..='z' => (LETTERS[(c as u8 - b'a') as usize], false),
        'A'..='Z' => (LETTERS[(c as u8 - b'A') as usize], true),
        '0'..='9' => (DIGITS[(c as u8 - b'0') as usize], false),
        '\n' => (KEY_ENTER, false),
        '\t' => (KEY_TAB, false),
        ' ' => (KEY_SPACE, false),
        '!' => (KEY_1, true),
        '@' => (KEY_2, true),
        '#' => (KEY_3, true),
        '$' => (KEY_4, true),
        '%' => (KEY_5, true),
        '^' => (KEY_6, true),
        '&' => (KEY_7, true),
        '*' => (KEY_8, true),
        '(' => (KEY_9, true),
        ')' => (KEY_0, true),
        '-' => (KEY_MINUS, false),
        '_' => (KEY_MINUS, true),
        '=' => (KEY_EQUAL, false),
        '+' => (KEY_EQUAL, true),
        '[' => (KEY_LEFTBRACE, false),
        '{' => (KEY_LEFTBRACE, true),
        ']' => (KEY_RIGHTBRACE, false),
        '}' => (KEY_RIGHTBRACE, true),
        '\\' => (KEY_BACKSLASH, false),
        '|' => (KEY_BACKSLASH, true),
        ';' => (KEY_SEMICOLON, false),
        ':' => (KEY_SEMICOLON, true),
        '\'' => (KEY_APOSTROPHE, false),
        '"' => (KEY_APOSTROPHE, true),
        '`' => (KEY_GRAVE, false),
        '~' => (KEY_GRAVE, true),
        ',' => (KEY_COMMA, false),
        '<' => (KEY_COMMA, true),
        '.' => (KEY_DOT, false),
        '>' => (KEY_DOT, true),
        '/' => (KEY_SLASH, false),
        '?' => (KEY_SLASH, true),
        _ => return None,
    };
    Some(key)
}

/// A key name (or single character) as (key, shift needed for the symbol it names).
fn lookup(name: &str) -> Option<(u16, bool)> {
    let mut chars = name.chars();
    if let (Some(c), None) = (chars.next(), chars.next()) {
        // Letters name the key, whatever their case: "ctrl+T" is ctrl+t.
        return us_key(c).map(|(code, shift)| (code, shift && !c.is_ascii_alphabetic()));
    }
    let normalized: String = name.chars().filter(|c| *c != '_').map(|c| c.to_ascii_lowercase()).collect();
    NAMED_KEYS.iter().find(|(known, _, _)| *known == normalized).map(|(_, code, shift)| (*code, *shift))
}

/// The evdev code of the key called `name`.
///
/// Symbols typed with shift ("plus", "!", "colon") give their physical key (KEY_EQUAL,
/// KEY_1, KEY_SEMICOLON); [`parse_combo`] adds the shift. Letters are case-insensitive:
/// "A" is KEY_A.
pub fn parse_key(name: &str) -> Result<u16, InputError> {
    lookup(name).map(|(code, _)| code).ok_or_else(|| InputError::ParseKey { name: name.to_string() })
}

/// The keys of a combination such as "ctrl+shift+t", in press order: every key but the
/// last is held while the last is pressed. The "+" key is written "plus".
///
/// A shifted symbol ("ctrl+plus", "ctrl+?") gets KEY_LEFTSHIFT inserted before it unless
/// the combination already holds a shift; letters never get an implicit shift, so
/// "ctrl+T" is ctrl+t (write "ctrl+shift+t" for the capital).
pub fn parse_combo(combo: &str) -> Result<Vec<u16>, InputError> {
    let refuse = |reason: String| InputError::ParseCombo { combo: combo.to_string(), reason };
    if combo.trim().is_empty() {
        return Err(refuse("it is empty; join key names with '+', as in ctrl+shift+t".to_string()));
    }
    let names: Vec<&str> = combo.split('+').map(str::trim).collect();
    if names.len() > MAX_COMBO_KEYS {
        return Err(refuse(format!("it holds {} keys; at most {MAX_COMBO_KEYS} can be pressed together", names.len())));
    }
    let mut keys = Vec::with_capacity(names.len() + 1);
    let mut first_shifted = None;
    for name in &names {
        if name.is_empty() {
            return Err(refuse("it has an empty key name; write the + key as \"plus\", as in ctrl+plus".to_string()));
        }
        let (code, shift) = lookup(name).ok_or_else(|| InputError::ParseKey { name: name.to_string() })?;
        if keys.contains(&code) {
            return Err(refuse(format!("{name:?} names a key that is already in the combination")));
        }
        if shift && first_shifted.is_none() {
            first_shifted = Some(keys.len());
        }
        keys.push(code);
    }
    if let Some(index) = first_shifted {
        if !keys.contains(&KEY_LEFTSHIFT) && !keys.contains(&KEY_RIGHTSHIFT) {
            keys.insert(index, KEY_LEFTSHIFT);
        }
    }
    Ok(keys)
}

/// Every key code a name or character here can produce, sorted and without repeats: the
/// keys the virtual keyboard must advertise.
pub fn known_key_codes() -> Vec<u16> {
    let mut codes: Vec<u16> = NAMED_KEYS.iter().map(|(_, code, _)| *code).collect();
    codes.extend((0u8..=0x7f).filter_map(|byte| us_key(char::from(byte))).map(|(code, _)| code));
    codes.sort_unstable();
    codes.dedup();
    codes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_key_accepts_aliases_in_any_case() {
        let cases: &[(&str, u16)] = &[
            ("Return", KEY_ENTER),
            ("Enter", KEY_ENTER),
            ("RETURN", KEY_ENTER),
            ("Escape", KEY_ESC),
            ("esc", KEY_ESC),
            ("BackSpace", KEY_BACKSPACE),
            ("Tab", KEY_TAB),
            ("space", KEY_SPACE),
            ("Page_Up", KEY_PAGEUP),
            ("PageUp", KEY_PAGEUP),
            ("Prior", KEY_PAGEUP),
            ("Page_Down", KEY_PAGEDOWN),
            ("Next", KEY_PAGEDOWN),
            ("Up", KEY_UP),
            ("Down", KEY_DOWN),
            ("Left", KEY_LEFT),
            ("Right", KEY_RIGHT),
            ("Home", KEY_HOME),
            ("End", KEY_END),
            ("Insert", KEY_INSERT),
            ("Delete", KEY_DELETE),
            ("Del", KEY_DELETE),
            ("F1", KEY_F1),
            ("F5", KEY_F5),
            ("f10", KEY_F10),
            ("F11", KEY_F11),
            ("F12", KEY_F12),
            ("F13", KEY_F13),
            ("F24", KEY_F24),
            ("a", KEY_A),
            ("A", KEY_A),
            ("1", KEY_1),
            ("0", KEY_0),
            ("ctrl", KEY_LEFTCTRL),
            ("control", KEY_LEFTCTRL),
            ("Control_L", KEY_LEFTCTRL),
            ("Control_R", KEY_RIGHTCTRL),
            ("shift", KEY_LEFTSHIFT),
            ("Shift_R", KEY_RIGHTSHIFT),
            ("alt", KEY_LEFTALT),
            ("Alt_R", KEY_RIGHTALT),
            ("super", KEY_LEFTMETA),
            ("meta", KEY_LEFTMETA),
            ("cmd", KEY_LEFTMETA),
            ("win", KEY_LEFTMETA),
            ("Super_L", KEY_LEFTMETA),
            ("Super_R", KEY_RIGHTMETA),
            ("Caps_Lock", KEY_CAPSLOCK),
            ("Num_Lock", KEY_NUMLOCK),
            ("Scroll_Lock", KEY_SCROLLLOCK),
            ("Menu", KEY_COMPOSE),
            ("Print", KEY_SYSRQ),
            ("Pause", KEY_PAUSE),
            ("KP_Enter", KEY_KPENTER),
            ("KP_7", KEY_KP7),
            ("KP_Add", KEY_KPPLUS),
            ("XF86AudioMute", KEY_MUTE),
            ("XF86AudioRaiseVolume", KEY_VOLUMEUP),
            ("XF86AudioLowerVolume", KEY_VOLUMEDOWN),
            ("minus", KEY_MINUS),
            ("comma", KEY_COMMA),
            ("period", KEY_DOT),
            ("slash", KEY_SLASH),
            ("plus", KEY_EQUAL),
            ("-", KEY_MINUS),
            ("!", KEY_1),
            (" ", KEY_SPACE),
        ];
        for (name, code) in cases {
            assert_eq!(parse_key(name), Ok(*code), "{name}");
        }
    }

    #[test]
    fn parse_key_unknown_name_returns_error_naming_it() {
        for name in ["", "F25", "hyper_x", "ctrl+c", "é", "Returnn"] {
            let error = parse_key(name).unwrap_err();
            assert_eq!(error, InputError::ParseKey { name: name.to_string() });
            assert!(error.to_string().contains(&format!("{name:?}")), "{error}");
        }
    }

    #[test]
    fn char_to_key_covers_every_printable_ascii_character() {
        for byte in 0x20u8..=0x7e {
            let c = char::from(byte);
            let (code, _) = char_to_key(c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
            assert!((KEY_ESC..=KEY_MICMUTE).contains(&code), "{c:?}");
        }
        assert_eq!(char_to_key('\n'), Ok((KEY_ENTER, false)));
        assert_eq!(char_to_key('\t'), Ok((KEY_TAB, false)));
    }

    #[test]
    fn char_to_key_us_layout_matches_the_keycaps() {
        // Every printable ASCII character with its key and shift, as printed on a US keyboard.
        let unshifted = "`1234567890-=qwertyuiop[]\\asdfghjkl;'zxcvbnm,./";
        let shifted = "~!@#$%^&*()_+QWERTYUIOP{}|ASDFGHJKL:\"ZXCVBNM<>?";
        let keys = [
            KEY_GRAVE,
            KEY_1,
            KEY_2,
            KEY_3,
            KEY_4,
            KEY_5,
            KEY_6,
            KEY_7,
            KEY_8,
            KEY_9,
            KEY_0,
            KEY_MINUS,
            KEY_EQUAL,
            KEY_Q,
            KEY_W,
            KEY_E,
            KEY_R,
            KEY_T,
            KEY_Y,
            KEY_U,
            KEY_I,
            KEY_O,
            KEY_P,
            KEY_LEFTBRACE,
            KEY_RIGHTBRACE,
            KEY_BACKSLASH,
            KEY_A,
            KEY_S,
            KEY_D,
            KEY_F,
            KEY_G,
            KEY_H,
            KEY_J,
            KEY_K,
            KEY_L,
            KEY_SEMICOLON,
            KEY_APOSTROPHE,
            KEY_Z,
            KEY_X,
            KEY_C,
            KEY_V,
            KEY_B,
            KEY_N,
            KEY_M,
            KEY_COMMA,
            KEY_DOT,
            KEY_SLASH,
        ];
        assert_eq!(unshifted.len(), keys.len());
        assert_eq!(shifted.len(), keys.len());
        for ((plain, upper), key) in unshifted.chars().zip(shifted.chars()).zip(keys) {
            assert_eq!(char_to_key(plain), Ok((key, false)), "{plain:?}");
            assert_eq!(char_to_key(upper), Ok((key, true)), "{upper:?}");
        }
        assert_eq!(char_to_key(' '), Ok((KEY_SPACE, false)));
        // 47 keys twice plus space: all 95 printable characters.
        assert_eq!(keys.len() * 2 + 1, 0x7e - 0x20 + 1);
        assert_eq!(char_to_key('A'), Ok((KEY_A, true)));
        assert_eq!(char_to_key('!'), Ok((KEY_1, true)));
        assert_eq!(char_to_key('~'), Ok((KEY_GRAVE, true)));
    }

    #[test]
    fn char_to_key_non_ascii_or_control_returns_error() {
        for c in ['é', '€', '\u{7f}', '\r', '\0', '😀'] {
            assert_eq!(char_to_key(c), Err(InputError::TypeCharacter { character: c, position: 0 }));
        }
    }

    #[test]
    fn text_to_keys_untypable_character_reports_its_position() {
        assert_eq!(text_to_keys("héllo"), Err(InputError::TypeCharacter { character: 'é', position: 1 }));
        assert_eq!(text_to_keys("ab€"), Err(InputError::TypeCharacter { character: '€', position: 2 }));
        assert_eq!(text_to_keys("Hi"), Ok(vec![(KEY_H, true), (KEY_I, false)]));
    }

    #[test]
    fn parse_combo_modifiers_then_key() {
        assert_eq!(parse_combo("ctrl+shift+t"), Ok(vec![KEY_LEFTCTRL, KEY_LEFTSHIFT, KEY_T]));
        assert_eq!(parse_combo("Return"), Ok(vec![KEY_ENTER]));
        assert_eq!(parse_combo(" alt + F4 "), Ok(vec![KEY_LEFTALT, KEY_F4]));
        assert_eq!(parse_combo("super+l"), Ok(vec![KEY_LEFTMETA, KEY_L]));
        assert_eq!(parse_combo("ctrl+T"), Ok(vec![KEY_LEFTCTRL, KEY_T]));
        assert_eq!(parse_combo("shift"), Ok(vec![KEY_LEFTSHIFT]));
    }

    #[test]
    fn parse_combo_shifted_symbol_adds_shift_once() {
        assert_eq!(parse_combo("ctrl+plus"), Ok(vec![KEY_LEFTCTRL, KEY_LEFTSHIFT, KEY_EQUAL]));
        assert_eq!(parse_combo("ctrl+?"), Ok(vec![KEY_LEFTCTRL, KEY_LEFTSHIFT, KEY_SLASH]));
        assert_eq!(parse_combo("ctrl+shift+plus"), Ok(vec![KEY_LEFTCTRL, KEY_LEFTSHIFT, KEY_EQUAL]));
        assert_eq!(parse_combo("ctrl+minus"), Ok(vec![KEY_LEFTCTRL, KEY_MINUS]));
    }

    #[test]
    fn parse_combo_malformed_returns_error() {
        assert!(matches!(parse_combo(""), Err(InputError::ParseCombo { .. })));
        assert!(matches!(parse_combo("   "), Err(InputError::ParseCombo { .. })));
        let error = parse_combo("ctrl++").unwrap_err();
        assert!(error.to_string().contains("plus"), "{error}");
        assert!(matches!(parse_combo("+a"), Err(InputError::ParseCombo { .. })));
        assert!(matches!(parse_combo("ctrl+ctrl+c"), Err(InputError::ParseCombo { .. })));
        assert!(matches!(parse_combo("ctrl+control+c"), Err(InputError::ParseCombo { .. })));
        assert!(matches!(parse_combo("a+b+c+d+e+f+g+h+i"), Err(InputError::ParseCombo { .. })));
        assert_eq!(parse_combo("ctrl+bogus"), Err(InputError::ParseKey { name: "bogus".to_string() }));
    }

    #[test]
    fn known_key_codes_cover_every_name_and_fit_the_keyboard_range() {
        let codes = known_key_codes();
        for (name, code, _) in NAMED_KEYS {
            assert!(codes.contains(code), "{name}");
            assert!(!name.contains('_') && name.to_ascii_lowercase() == *name, "{name} is not normalized");
        }
        assert!(codes.iter().all(|code| (KEY_ESC..=KEY_MICMUTE).contains(code)));
        assert!(codes.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn named_keys_have_no_duplicate_names() {
        let mut names: Vec<&str> = NAMED_KEYS.iter().map(|(name, _, _)| *name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before);
    }
}

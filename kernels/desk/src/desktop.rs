//! The Desk desktop: wallpaper, a top bar with a clock, and one window with a text field,
//! three buttons, a checkbox and a list. `render` is a pure function of `Desktop` and the
//! screen size: the same state always gives the same pixels (tests compare against a
//! golden image). Layout is computed from the screen size, so any size works.

use core::fmt::Write;

use crate::draw::{rgb, Canvas, TextSize, Weight};
use crate::gpu::Rect;

const TOP_BAR_HEIGHT: u32 = 32;
const WINDOW_WIDTH: u32 = 760;
const WINDOW_HEIGHT: u32 = 540;
const TITLE_HEIGHT: u32 = 36;
const LIST_ROW_HEIGHT: u32 = 26;
pub const LIST_ITEMS: u32 = 40;
pub const LIST_ROWS_VISIBLE: u32 = 9;
/// Size of the cursor picture.
pub const CURSOR_SIZE: (u32, u32) = (12, 19);
const CLOCK_WIDTH: u32 = 96;

const WALLPAPER_TOP: u32 = rgb(0x1d, 0x3b, 0x5c);
const WALLPAPER_BOTTOM: u32 = rgb(0x2f, 0x7a, 0x78);
const BAR: u32 = rgb(0x16, 0x1b, 0x22);
const BAR_TEXT: u32 = rgb(0xe8, 0xec, 0xf1);
const WINDOW: u32 = rgb(0xf4, 0xf5, 0xf7);
const WINDOW_BORDER: u32 = rgb(0x9a, 0xa4, 0xb1);
const TITLE: u32 = rgb(0x2b, 0x57, 0x9a);
const TEXT: u32 = rgb(0x1f, 0x23, 0x28);
const MUTED: u32 = rgb(0x8a, 0x92, 0x9c);
const FIELD: u32 = rgb(0xff, 0xff, 0xff);
const ACCENT: u32 = rgb(0x2f, 0x6f, 0xd6);
const BUTTON: u32 = rgb(0xe1, 0xe6, 0xee);
const BUTTON_PRESSED: u32 = rgb(0xa9, 0xc3, 0xee);
const ROW_ALTERNATE: u32 = rgb(0xec, 0xef, 0xf3);

/// A fixed-capacity string (no allocator in Desk yet).
pub struct TextBuffer<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> TextBuffer<N> {
    pub const fn new() -> Self {
        TextBuffer { bytes: [0; N], len: 0 }
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Removes the last character (the text is ASCII).
    pub fn pop(&mut self) {
        self.len = self.len.saturating_sub(1);
    }
}

impl<const N: usize> Write for TextBuffer<N> {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        let room = N - self.len;
        let count = text.len().min(room);
        self.bytes[self.len..self.len + count].copy_from_slice(&text.as_bytes()[..count]);
        self.len += count;
        Ok(())
    }
}

/// Everything the screen shows.
pub struct Desktop {
    pub uptime_seconds: u64,
    pub text: TextBuffer<96>,
    pub text_focused: bool,
    pub button_presses: [u32; 3],
    pub pressed_button: Option<usize>,
    pub checkbox: bool,
    pub list_scroll: u32,
    pub status: TextBuffer<96>,
    /// Where the pointer is; hidden until the first pointer event.
    pub pointer: Option<(u32, u32)>,
}

impl Desktop {
    pub const fn new() -> Desktop {
        Desktop {
            uptime_seconds: 0,
            text: TextBuffer::new(),
            text_focused: false,
            button_presses: [0; 3],
            pressed_button: None,
            checkbox: false,
            list_scroll: 0,
            status: TextBuffer::new(),
            pointer: None,
        }
    }
}

pub const BUTTON_LABELS: [&str; 3] = ["Save", "Clear", "Apply"];

/// Where each widget is on a screen of a given size.
pub struct Layout {
    pub window: Rect,
    pub text_field: Rect,
    pub buttons: [Rect; 3],
    pub checkbox: Rect,
    pub list: Rect,
    pub status: Rect,
}

impl Layout {
    pub fn for_screen(width: u32, height: u32) -> Layout {
        let window_width = WINDOW_WIDTH.min(width.saturating_sub(16));
        let window_height = WINDOW_HEIGHT.min(height.saturating_sub(TOP_BAR_HEIGHT + 16));
        let x = (width - window_width) / 2;
        let y = TOP_BAR_HEIGHT + (height - TOP_BAR_HEIGHT - window_height) / 2;
        let inner_x = x + 24;
        let inner_width = window_width.saturating_sub(48);
        let row = |offset: u32, height: u32| Rect { x: inner_x, y: y + offset, width: inner_width, height };
        let button = |index: u32| Rect { x: inner_x + index * 136, y: y + 124, width: 120, height: 36 };
        Layout {
            window: Rect { x, y, width: window_width, height: window_height },
            text_field: row(TITLE_HEIGHT + 28, 36),
            buttons: [button(0), button(1), button(2)],
            checkbox: Rect { x: inner_x, y: y + 178, width: 220, height: 22 },
            list: row(216, LIST_ROW_HEIGHT * LIST_ROWS_VISIBLE + 2),
            status: row(window_height - 40, 24),
        }
    }
}

/// Where the clock is: the only part of the screen that changes on its own.
pub fn clock_rect(width: u32) -> Rect {
    Rect { x: width.saturating_sub(CLOCK_WIDTH + 8), y: 0, width: CLOCK_WIDTH + 8, height: TOP_BAR_HEIGHT }
}

fn fill(canvas: &mut Canvas, rect: Rect, color: u32) {
    canvas.fill(rect.x as i32, rect.y as i32, rect.width, rect.height, color);
}

fn outline(canvas: &mut Canvas, rect: Rect, color: u32) {
    canvas.outline(rect.x as i32, rect.y as i32, rect.width, rect.height, color);
}

/// Draws the whole desktop.
pub fn render(canvas: &mut Canvas, desktop: &Desktop) {
    let (width, height) = (canvas.width, canvas.height);
    canvas.vertical_gradient(0, 0, width, height, WALLPAPER_TOP, WALLPAPER_BOTTOM);
    render_top_bar(canvas, desktop);
    let layout = Layout::for_screen(width, height);
    render_window(canvas, desktop, &layout);
    if let Some((x, y)) = desktop.pointer {
        render_cursor(canvas, x as i32, y as i32);
    }
}

/// An arrow: black outline, white inside, its tip at (x, y).
fn render_cursor(canvas: &mut Canvas, x: i32, y: i32) {
    const ARROW: [&[u8; 12]; 19] = [
        b"X           ",
        b"XX          ",
        b"X.X         ",
        b"X..X        ",
        b"X...X       ",
        b"X....X      ",
        b"X.....X     ",
        b"X......X    ",
        b"X.......X   ",
        b"X........X  ",
        b"X.........X ",
        b"X......XXXXX",
        b"X...X..X    ",
        b"X..XX..X    ",
        b"X.X  X..X   ",
        b"XX   X..X   ",
        b"X     X..X  ",
        b"      X..X  ",
        b"       XX   ",
    ];
    for (row, line) in ARROW.iter().enumerate() {
        for (column, cell) in line.iter().enumerate() {
            let color = match cell {
                b'X' => rgb(0, 0, 0),
                b'.' => rgb(0xff, 0xff, 0xff),
                _ => continue,
            };
            canvas.fill(x + column as i32, y + row as i32, 1, 1, color);
        }
    }
}

fn render_top_bar(canvas: &mut Canvas, desktop: &Desktop) {
    let width = canvas.width;
    canvas.fill(0, 0, width, TOP_BAR_HEIGHT, BAR);
    canvas.text(12, 6, "Carrel Desk", BAR_TEXT, Weight::Bold, TextSize::Size20);
    let seconds = desktop.uptime_seconds;
    let mut clock = TextBuffer::<16>::new();
    let _ = write!(clock, "{:02}:{:02}:{:02}", seconds / 3600 % 100, seconds / 60 % 60, seconds % 60);
    let rect = clock_rect(width);
    canvas.text(rect.x as i32 + 8, 6, clock.as_str(), BAR_TEXT, Weight::Regular, TextSize::Size20);
}

fn render_window(canvas: &mut Canvas, desktop: &Desktop, layout: &Layout) {
    let window = layout.window;
    // A soft shadow, the frame, the title bar.
    canvas.fill(window.x as i32 + 6, window.y as i32 + 6, window.width, window.height, rgb(0x10, 0x22, 0x33));
    fill(canvas, window, WINDOW);
    outline(canvas, window, WINDOW_BORDER);
    fill(canvas, Rect { height: TITLE_HEIGHT, ..window }, TITLE);
    canvas.text(window.x as i32 + 14, window.y as i32 + 8, "Notes", BAR_TEXT, Weight::Bold, TextSize::Size20);

    // Text field with a placeholder or the typed text and a caret.
    let field = layout.text_field;
    fill(canvas, field, FIELD);
    outline(canvas, field, if desktop.text_focused { ACCENT } else { WINDOW_BORDER });
    let text_x = field.x as i32 + 10;
    let text_y = field.y as i32 + 9;
    // Text longer than the field is cut at its border, so a change of it stays inside.
    let mut inside =
        canvas.within(field.x + 1, field.y + 1, field.width.saturating_sub(2), field.height.saturating_sub(2));
    if desktop.text.as_str().is_empty() && !desktop.text_focused {
        inside.text(text_x, text_y, "Type here", MUTED, Weight::Regular, TextSize::Size16);
    } else {
        let end = inside.text(text_x, text_y, desktop.text.as_str(), TEXT, Weight::Regular, TextSize::Size16);
        if desktop.text_focused {
            inside.fill(end + 1, field.y as i32 + 7, 2, 22, ACCENT);
        }
    }

    // Buttons with their press counters.
    for (index, rect) in layout.buttons.iter().enumerate() {
        let pressed = desktop.pressed_button == Some(index);
        fill(canvas, *rect, if pressed { BUTTON_PRESSED } else { BUTTON });
        outline(canvas, *rect, if pressed { ACCENT } else { WINDOW_BORDER });
        let mut label = TextBuffer::<24>::new();
        let _ = write!(label, "{} ({})", BUTTON_LABELS[index], desktop.button_presses[index]);
        canvas.text_centered(
            rect.x as i32,
            rect.y as i32,
            rect.width,
            rect.height,
            label.as_str(),
            TEXT,
            Weight::Regular,
            TextSize::Size16,
        );
    }

    // Checkbox.
    let check = layout.checkbox;
    let square = Rect { x: check.x, y: check.y, width: 20, height: 20 };
    fill(canvas, square, FIELD);
    outline(canvas, square, WINDOW_BORDER);
    if desktop.checkbox {
        fill(canvas, Rect { x: square.x + 4, y: square.y + 4, width: 12, height: 12 }, ACCENT);
    }
    canvas.text(check.x as i32 + 30, check.y as i32 + 1, "Enable sync", TEXT, Weight::Regular, TextSize::Size16);

    // List, scrolled by whole rows.
    let list = layout.list;
    fill(canvas, list, FIELD);
    outline(canvas, list, WINDOW_BORDER);
    for row in 0..LIST_ROWS_VISIBLE {
        let item = desktop.list_scroll + row;
        if item >= LIST_ITEMS {
            break;
        }
        let y = list.y + 1 + row * LIST_ROW_HEIGHT;
        if item % 2 == 1 {
            canvas.fill(list.x as i32 + 1, y as i32, list.width - 2, LIST_ROW_HEIGHT, ROW_ALTERNATE);
        }
        let mut label = TextBuffer::<24>::new();
        let _ = write!(label, "Item {:02}", item + 1);
        canvas.text(list.x as i32 + 12, y as i32 + 4, label.as_str(), TEXT, Weight::Regular, TextSize::Size16);
    }

    // Status line.
    let status = layout.status;
    let text = if desktop.status.as_str().is_empty() { "Ready" } else { desktop.status.as_str() };
    let mut inside = canvas.within(status.x, status.y, status.width, status.height);
    inside.text(status.x as i32, status.y as i32 + 2, text, MUTED, Weight::Regular, TextSize::Size16);
}

//! Keyboard and mouse end to end: each action goes through the control socket, waits for
//! the frame that shows it, and comes back with a screenshot that is checked here.
//! No sleeps: every step waits on the guest's next frame.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use carrel_vmm::control::{ControlClient, ErrorKind, ImageFormat, InputRequest, InputResult, Request, Response, Wait};
use carrel_vmm::input::{Action, Button};
use common::{scratch_path, RunningVm};

const BOOT_DEADLINE: Duration = Duration::from_secs(30);
const WIDTH: u32 = 1280;
/// Widget rectangles of the Desk window on a 1280x800 screen (desktop.rs `Layout`).
const TEXT_FIELD: [u32; 4] = [284, 210, 712, 36];
const BUTTONS: [u32; 4] = [284, 270, 392, 36];
const CHECKBOX_CENTER: (u32, u32) = (294, 334);
/// A pixel of the checkbox's tick that the cursor (tip at the click point) leaves visible.
const CHECKBOX_TICK: (u32, u32) = (289, 329);
const LIST: [u32; 4] = [284, 362, 712, 236];
const STATUS: [u32; 4] = [284, 646, 712, 24];
const ACCENT: [u8; 3] = [0x2f, 0x6f, 0xd6];

struct Screen {
    pixels: Vec<u8>,
}

impl Screen {
    fn decode(bytes: &[u8]) -> Screen {
        let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        decoder.set_transformations(png::Transformations::EXPAND);
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.color_type.samples()), (WIDTH, 3));
        pixels.truncate(info.buffer_size());
        Screen { pixels }
    }

    fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let offset = ((y * WIDTH + x) * 3) as usize;
        [self.pixels[offset], self.pixels[offset + 1], self.pixels[offset + 2]]
    }

    fn crop(&self, [x, y, width, height]: [u32; 4]) -> Vec<u8> {
        (y..y + height).flat_map(|row| (x..x + width).flat_map(move |column| self.pixel(column, row))).collect()
    }
}

/// Compares a region with its golden crop (`CARREL_UPDATE_GOLDEN=1` writes the crop).
fn assert_region_matches(screen: &Screen, region: [u32; 4], name: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/input-{name}.png"));
    let crop = screen.crop(region);
    if std::env::var_os("CARREL_UPDATE_GOLDEN").is_some() {
        let file = std::fs::File::create(&path).unwrap();
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), region[2], region[3]);
        encoder.set_color(png::ColorType::Rgb);
        encoder.write_header().unwrap().write_image_data(&crop).unwrap();
    }
    let mut decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).expect("golden crop")));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().unwrap();
    let mut golden = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut golden).unwrap();
    golden.truncate(info.buffer_size());
    let differing = crop.chunks(3).zip(golden.chunks(3)).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "{name}: {differing} pixels differ from {}", path.display());
}

fn act(socket: &std::path::Path, action: Action) -> (InputResult, Screen) {
    let request = InputRequest {
        action,
        wait: Some(Wait::FrameAfter(0)),
        screenshot: Some(ImageFormat::Png),
        timeout_ms: 5_000,
        hold_ms: None,
        gap_ms: None,
    };
    match ControlClient::connect(socket).unwrap().call(&Request::Input(request), Duration::from_secs(20)).unwrap() {
        Response::Input(result) => {
            assert!(!result.timed_out, "the action drew no frame");
            let screen = Screen::decode(&result.screenshot.as_ref().unwrap().bytes);
            (result, screen)
        }
        other => panic!("expected an input result, got {other:?}"),
    }
}

fn boot(socket: &std::path::Path) -> RunningVm {
    let mut vm = RunningVm::start_desk(&["--socket", socket.to_str().unwrap()]);
    vm.wait_for_line("first frame drawn", BOOT_DEADLINE);
    vm
}

#[test]
fn agent_session_of_clicks_typing_buttons_checkbox_and_scroll_shows_each_effect() {
    let socket = scratch_path("input.sock");
    let _vm = boot(&socket);

    let (_, screen) = act(&socket, Action::Click { x: 640, y: 228, button: Button::Left, count: 1 });
    assert_eq!(screen.pixel(TEXT_FIELD[0], 228), ACCENT, "the text field has focus");

    let (typed, screen) = act(&socket, Action::Type { text: "Hello, World! It's 42.".into() });
    assert!(typed.frame.is_some());
    assert_region_matches(&screen, TEXT_FIELD, "typed");

    act(&socket, Action::Click { x: 344, y: 288, button: Button::Left, count: 1 });
    let (_, screen) = act(&socket, Action::Click { x: 344, y: 288, button: Button::Left, count: 1 });
    assert_region_matches(&screen, BUTTONS, "save-twice");
    assert_ne!(screen.pixel(TEXT_FIELD[0], 228), ACCENT, "clicking a button moves focus away");

    let (x, y) = CHECKBOX_CENTER;
    let (_, screen) = act(&socket, Action::Click { x, y, button: Button::Left, count: 1 });
    assert_eq!(screen.pixel(CHECKBOX_TICK.0, CHECKBOX_TICK.1), ACCENT, "the checkbox is ticked");
    let (_, screen) = act(&socket, Action::Click { x, y, button: Button::Left, count: 1 });
    assert_ne!(screen.pixel(CHECKBOX_TICK.0, CHECKBOX_TICK.1), ACCENT, "and unticked");

    let (_, screen) = act(&socket, Action::Scroll { x: 640, y: 480, dx: 0, dy: -3 });
    assert_region_matches(&screen, LIST, "scrolled");

    let (_, screen) = act(&socket, Action::Key { combo: "ctrl+shift+t".into() });
    assert_region_matches(&screen, STATUS, "combo");
}

#[test]
fn bad_input_requests_are_clear_errors_and_never_hang() {
    let socket = scratch_path("badinput.sock");
    let _vm = boot(&socket);
    let call = |action: Action| {
        let request = InputRequest {
            action,
            wait: Some(Wait::FrameAfter(0)),
            screenshot: None,
            timeout_ms: 2_000,
            hold_ms: None,
            gap_ms: None,
        };
        ControlClient::connect(&socket).unwrap().call(&Request::Input(request), Duration::from_secs(10)).unwrap()
    };
    let outside = call(Action::Click { x: 5000, y: 10, button: Button::Left, count: 1 });
    assert!(
        matches!(&outside, Response::Error(m) if m.message.contains("5000")
        && m.kind == ErrorKind::InvalidArgument),
        "{outside:?}"
    );
    let unknown = call(Action::Key { combo: "ctrl+hyperspace".into() });
    assert!(matches!(&unknown, Response::Error(m) if m.message.contains("hyperspace")), "{unknown:?}");
    let empty = call(Action::Type { text: String::new() });
    assert!(matches!(empty, Response::Error(_)));
    let huge = call(Action::Type { text: "x".repeat(100_000) });
    assert!(matches!(huge, Response::Error(_)));
    let emoji = call(Action::Type { text: "caf\u{e9}".into() });
    assert!(matches!(&emoji, Response::Error(m) if m.message.contains('\u{e9}')), "{emoji:?}");
}

#[test]
fn action_that_draws_nothing_returns_at_its_timeout_marked_so() {
    let socket = scratch_path("nodraw.sock");
    // Without a timer-driven redraw in the way: the clock only changes once a second, so a
    // right-button press (which the desktop ignores) draws nothing for a while.
    let mut vm = RunningVm::start_desk(&["--socket", socket.to_str().unwrap()]);
    vm.wait_for_line("first frame drawn", BOOT_DEADLINE);
    let request = InputRequest {
        action: Action::ButtonDown { button: Button::Right },
        wait: Some(Wait::FrameAfter(0)),
        screenshot: None,
        timeout_ms: 150,
        hold_ms: None,
        gap_ms: None,
    };
    let started = std::time::Instant::now();
    let answer =
        ControlClient::connect(&socket).unwrap().call(&Request::Input(request), Duration::from_secs(10)).unwrap();
    let Response::Input(result) = answer else { panic!("expected an input result: {answer:?}") };
    // Either the clock ticked within 150 ms (a frame), or the wait timed out; it never hangs.
    assert!(result.timed_out || result.frame.is_some());
    assert!(started.elapsed() < Duration::from_secs(3));
}

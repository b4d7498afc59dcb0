//! The screen end to end: the Desk kernel draws its desktop through virtio-gpu, the host
//! captures it from guest RAM over the control socket.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use carrel_vmm::control::{
    ControlClient, ErrorKind, ImageFormat, Request, Response, Screenshot, ScreenshotRequest, Wait,
};
use common::{decode_png, differences, guest, inside, scaled, scratch_path, RunningVm};

const BOOT_DEADLINE: Duration = Duration::from_secs(30);
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 800;
/// Where the Desk clock is drawn (desktop.rs: `clock_rect`): the only area that changes
/// by itself.
const CLOCK: [u32; 4] = [WIDTH - 104, 0, 104, 32];

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/desk-1280x800.png")
}

fn boot_desk(socket: &std::path::Path) -> RunningVm {
    let mut vm = RunningVm::start_desk(&["--socket", socket.to_str().unwrap()]);
    // The desktop is drawn just after `desk: ready`; waits like "still for 50 ms" need a frame.
    vm.wait_for_line("first frame drawn", BOOT_DEADLINE);
    vm
}

fn capture(socket: &std::path::Path, format: ImageFormat, wait: Wait) -> Screenshot {
    let request = ScreenshotRequest { format, crop: None, scale: None, cursor: false, wait, timeout_ms: 10_000 };
    match ControlClient::connect(socket)
        .unwrap()
        .call(&Request::Screenshot(request), scaled(Duration::from_secs(20)))
        .unwrap()
    {
        Response::Screenshot(shot) => shot,
        other => panic!("expected a screenshot, got {other:?}"),
    }
}

#[test]
fn desk_first_frame_matches_golden_image_except_clock() {
    let socket = scratch_path("screen.sock");
    let _vm = boot_desk(&socket);
    let shot = capture(&socket, ImageFormat::Png, Wait::FirstFrame);
    assert_eq!((shot.width, shot.height), (WIDTH, HEIGHT));
    let (width, height, pixels) = decode_png(&shot.bytes);
    assert_eq!((width, height), (WIDTH, HEIGHT));

    if std::env::var_os("CARREL_UPDATE_GOLDEN").is_some() {
        std::fs::write(golden_path(), &shot.bytes).unwrap();
    }
    let (_, _, golden) =
        decode_png(&std::fs::read(golden_path()).expect("golden image (CARREL_UPDATE_GOLDEN=1 writes it)"));
    let outside_clock: Vec<_> =
        differences(&pixels, &golden, WIDTH).into_iter().filter(|(x, y)| !inside(CLOCK, *x, *y)).collect();
    assert!(
        outside_clock.is_empty(),
        "{} pixels differ from the golden image, first at {:?}",
        outside_clock.len(),
        outside_clock.first()
    );
}

#[test]
fn clock_tick_changes_only_the_clock_damage_rectangle() {
    let socket = scratch_path("tick.sock");
    let _vm = boot_desk(&socket);
    let first = capture(&socket, ImageFormat::Png, Wait::FirstFrame);
    // The next frame is the clock's: it ticks every second.
    let second = capture(&socket, ImageFormat::Png, Wait::FrameAfter(first.frame));
    assert!(second.frame > first.frame);
    let (_, _, before) = decode_png(&first.bytes);
    let (_, _, after) = decode_png(&second.bytes);
    let changed = differences(&before, &after, WIDTH);
    assert!(!changed.is_empty(), "the clock must have changed");
    let outside: Vec<_> = changed.iter().filter(|(x, y)| !inside(CLOCK, *x, *y)).collect();
    assert!(outside.is_empty(), "pixels outside the clock changed: {:?}", &outside[..outside.len().min(5)]);
}

#[test]
fn raw_qoi_scaled_and_cropped_captures_agree_with_png() {
    let socket = scratch_path("formats.sock");
    let _vm = boot_desk(&socket);
    // Wait until the screen is still (between clock ticks) so all captures see one frame.
    let png = capture(&socket, ImageFormat::Png, Wait::StillFor(50));
    let raw = capture(&socket, ImageFormat::Raw, Wait::FirstFrame);
    if raw.frame != png.frame {
        return; // The clock ticked in between; the golden test covers content.
    }
    assert_eq!(raw.pixel_format, "B8G8R8X8");
    assert_eq!(raw.stride, WIDTH * 4);
    let (_, _, rgb) = decode_png(&png.bytes);
    for (index, pixel) in raw.bytes.chunks_exact(4).enumerate().step_by(997) {
        assert_eq!([pixel[2], pixel[1], pixel[0]], rgb[index * 3..index * 3 + 3], "pixel {index}");
    }
    let qoi = capture(&socket, ImageFormat::Qoi, Wait::FirstFrame);
    assert_eq!(&qoi.bytes[..4], b"qoif");
    assert_eq!(u32::from_be_bytes(qoi.bytes[4..8].try_into().unwrap()), WIDTH);

    let request = ScreenshotRequest {
        format: ImageFormat::Png,
        crop: Some([260, 146, 760, 540]),
        scale: Some([380, 270]),
        cursor: false,
        wait: Wait::FirstFrame,
        timeout_ms: 5_000,
    };
    let Response::Screenshot(small) =
        ControlClient::connect(&socket).unwrap().call(&Request::Screenshot(request), Duration::from_secs(10)).unwrap()
    else {
        panic!("expected a screenshot");
    };
    let (width, height, _) = decode_png(&small.bytes);
    assert_eq!((width, height), (380, 270));
}

/// A whole-screen raw screenshot is written to the socket straight from the scanout's
/// memory; one cropped to the whole screen is copied out first. Both answers are the same
/// bytes, and a raw request that fails (a wait that times out) is a plain error answer
/// after which the connection still serves.
#[test]
fn raw_pixels_written_in_place_equal_a_copied_capture_and_errors_keep_the_connection() {
    let socket = scratch_path("inplace.sock");
    let _vm = boot_desk(&socket);
    let mut client = ControlClient::connect(&socket).unwrap();
    let mut ask = |crop: Option<[u32; 4]>, wait: Wait, timeout_ms: u64| {
        let request =
            ScreenshotRequest { format: ImageFormat::Raw, crop, scale: None, cursor: false, wait, timeout_ms };
        client.call(&Request::Screenshot(request), scaled(Duration::from_secs(20))).unwrap()
    };
    let mut compared = 0;
    for _ in 0..10 {
        let Response::Screenshot(in_place) = ask(None, Wait::StillFor(50), 10_000) else { panic!("no screenshot") };
        let Response::Screenshot(copied) = ask(Some([0, 0, WIDTH, HEIGHT]), Wait::FirstFrame, 10_000) else {
            panic!("no screenshot")
        };
        // The clock may tick in between; then the two frames differ and are not compared.
        if in_place.frame == copied.frame {
            assert_eq!(in_place, copied);
            assert_eq!(in_place.bytes.len(), (WIDTH * HEIGHT * 4) as usize);
            compared += 1;
        }
    }
    assert!(compared > 0, "the clock ticked between every pair of screenshots");
    let answer = ask(None, Wait::FrameAfter(u64::MAX - 1), 30);
    assert!(matches!(&answer, Response::Error(failure) if failure.kind == ErrorKind::DeadlineExceeded), "{answer:?}");
    assert!(matches!(ask(None, Wait::FirstFrame, 10_000), Response::Screenshot(_)));
}

#[test]
fn screenshot_of_vm_without_display_is_a_clear_error() {
    let socket = scratch_path("nodisplay.sock");
    let mut vm = RunningVm::start_desk(&["--socket", socket.to_str().unwrap(), "--no-display"]);
    vm.wait_for_line("desk: ready", BOOT_DEADLINE);
    let request = ScreenshotRequest {
        format: ImageFormat::Png,
        crop: None,
        scale: None,
        cursor: false,
        wait: Wait::FirstFrame,
        timeout_ms: 100,
    };
    let answer =
        ControlClient::connect(&socket).unwrap().call(&Request::Screenshot(request), Duration::from_secs(10)).unwrap();
    assert!(
        matches!(&answer, Response::Error(failure) if failure.message.contains("no screen")
        && failure.kind == ErrorKind::FailedPrecondition),
        "{answer:?}"
    );
}

#[test]
fn waiting_for_a_frame_that_never_comes_times_out_with_an_error() {
    let socket = scratch_path("timeout.sock");
    let _vm = boot_desk(&socket);
    let first = capture(&socket, ImageFormat::Png, Wait::FirstFrame);
    let request = ScreenshotRequest {
        format: ImageFormat::Png,
        crop: None,
        scale: None,
        cursor: false,
        wait: Wait::FrameAfter(first.frame + 1000),
        timeout_ms: 300,
    };
    let started = std::time::Instant::now();
    let answer =
        ControlClient::connect(&socket).unwrap().call(&Request::Screenshot(request), Duration::from_secs(10)).unwrap();
    assert!(
        matches!(&answer, Response::Error(failure) if failure.message.contains("no frame after")
        && failure.kind == ErrorKind::DeadlineExceeded),
        "{answer:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "the wait ends at its timeout");
}

#[test]
fn desk_draws_at_the_configured_display_size_up_to_4k() {
    let socket = scratch_path("4k.sock");
    let mut vm = RunningVm::start_desk(&["--socket", socket.to_str().unwrap(), "--display", "3840x2160"]);
    vm.wait_for_line("desk: screen 3840x2160 first frame drawn", BOOT_DEADLINE);
    let shot = capture(&socket, ImageFormat::Png, Wait::FirstFrame);
    assert_eq!((shot.width, shot.height), (3840, 2160));
    let (width, height, pixels) = decode_png(&shot.bytes);
    assert_eq!((width, height), (3840, 2160));
    // The window is centred: its title bar (rgb 2b579a) crosses the middle column.
    let title_row = (0..height).find(|y| {
        let offset = ((y * width + width / 2) * 3) as usize;
        pixels[offset..offset + 3] == [0x2b, 0x57, 0x9a]
    });
    let title_row = title_row.expect("a title bar in the middle column");
    assert!(title_row > 600 && title_row < 1000, "centred vertically: row {title_row}");
}

#[test]
fn display_size_out_of_range_is_a_clear_error() {
    let kernel = guest("desk.elf");
    let output = std::process::Command::new(common::vmm_binary())
        .args(["run", "--kernel", kernel.to_str().unwrap(), "--display", "8000x8000"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("8000") && stderr.lines().count() == 1, "{stderr}");
}

#[test]
fn screenshot_whose_audit_record_cannot_be_written_is_withheld() {
    // The audit log lives on a 1 MiB tmpfs in the VM's own mount namespace: screenshots
    // (stored as blobs) fill it after a few captures.
    let kernel = guest("desk.elf");
    let socket = scratch_path("full-audit.sock");
    let audit = scratch_path("full-audit");
    std::fs::create_dir_all(&audit).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=1m none {audit} && exec {vmm} run --kernel {kernel} --socket {socket} --audit {audit}",
        audit = audit.display(),
        vmm = common::vmm_binary().display(),
        kernel = kernel.display(),
        socket = socket.display(),
    );
    let mut vm = RunningVm::start_binary(
        std::path::Path::new("unshare"),
        &["--mount", "--propagation", "private", "sh", "-c", &script],
    );
    vm.wait_for_line("first frame drawn", BOOT_DEADLINE);
    let mut served = 0;
    let mut refusal = None;
    for _ in 0..40 {
        let request = ScreenshotRequest {
            format: ImageFormat::Raw,
            crop: None,
            scale: None,
            cursor: false,
            wait: Wait::FirstFrame,
            timeout_ms: 1_000,
        };
        match ControlClient::connect(&socket)
            .unwrap()
            .call(&Request::Screenshot(request), Duration::from_secs(10))
            .unwrap()
        {
            Response::Screenshot(_) => served += 1,
            Response::Error(failure) => {
                refusal = Some(failure.message);
                break;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    let refusal = refusal.expect("the full audit log must stop screenshots");
    assert!(refusal.contains("audit log failed") && refusal.contains("withheld"), "{refusal}");
    assert!(served < 40, "served {served} screenshots before the log filled");
    // And it stays refused: nothing unrecorded is handed out later either.
    let request = ScreenshotRequest {
        format: ImageFormat::Png,
        crop: None,
        scale: None,
        cursor: false,
        wait: Wait::FirstFrame,
        timeout_ms: 1_000,
    };
    let again =
        ControlClient::connect(&socket).unwrap().call(&Request::Screenshot(request), Duration::from_secs(10)).unwrap();
    assert!(matches!(again, Response::Error(_)), "{again:?}");
    let _ = std::fs::remove_dir_all(&audit);
}

#[test]
fn paused_vm_draws_no_frames_until_resumed() {
    let socket = scratch_path("pause.sock");
    let _vm = boot_desk(&socket);
    let call =
        |request: Request| ControlClient::connect(&socket).unwrap().call(&request, Duration::from_secs(10)).unwrap();
    assert_eq!(call(Request::Pause), Response::Paused);
    assert_eq!(call(Request::Pause), Response::Paused, "pausing twice is fine");
    let Response::Status(status) = call(Request::Status) else { panic!("expected a status") };
    assert_eq!(status.state, "paused");
    let on_screen = capture(&socket, ImageFormat::Png, Wait::FirstFrame).frame;
    // Running, the clock draws a frame every second; paused, nothing is drawn.
    let waiting = ScreenshotRequest {
        format: ImageFormat::Png,
        crop: None,
        scale: None,
        cursor: false,
        wait: Wait::FrameAfter(on_screen),
        timeout_ms: 1_500,
    };
    let answer = call(Request::Screenshot(waiting.clone()));
    assert!(matches!(&answer, Response::Error(message) if message.message.contains("no frame after")), "{answer:?}");
    assert_eq!(call(Request::Resume), Response::Resumed);
    let Response::Status(status) = call(Request::Status) else { panic!("expected a status") };
    assert_eq!(status.state, "running");
    let answer = call(Request::Screenshot(ScreenshotRequest { timeout_ms: 5_000, ..waiting }));
    assert!(matches!(answer, Response::Screenshot(shot) if shot.frame > on_screen));
}

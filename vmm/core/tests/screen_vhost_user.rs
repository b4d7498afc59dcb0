//! The screen out of process: the Desk kernel draws through a vhost-user GPU served by
//! `carrel-gpu-backend`, which maps the VM's memfd; screenshots and input go through the
//! VM's control socket exactly as with the in-process device. Desk's driver is the same.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use carrel_vmm::control::{ControlClient, ImageFormat, InputRequest, Request, Response, ScreenshotRequest, Wait};
use carrel_vmm::input::{Action, Button};
use common::{decode_png, differences, gpu_backend_binary, inside, scratch_path, screenshot, RunningVm};

const BOOT_DEADLINE: Duration = Duration::from_secs(30);
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 800;
/// Where the Desk clock is drawn: the only area that changes by itself.
const CLOCK: [u32; 4] = [WIDTH - 104, 0, 104, 32];
const CHECKBOX_CENTER: (u32, u32) = (294, 334);
/// A pixel of the checkbox's tick that Desk's cursor (tip at the click point) leaves visible.
const CHECKBOX_TICK: (u32, u32) = (289, 329);
const ACCENT: [u8; 3] = [0x2f, 0x6f, 0xd6];

/// A backend process and a VM using it; dropped in field order: the VM first.
struct VhostUserDesk {
    vm: RunningVm,
    backend: RunningVm,
    socket: PathBuf,
}

fn boot_desk_with_backend(name: &str) -> VhostUserDesk {
    let (vhost, screen, socket) =
        (scratch_path(&format!("{name}-gpu.sock")), scratch_path(&format!("{name}-screen.sock")), scratch_path(name));
    let mut backend = RunningVm::start_binary(
        &gpu_backend_binary(),
        &["--socket", vhost.to_str().unwrap(), "--screen-socket", screen.to_str().unwrap()],
    );
    backend.wait_for_line("carrel-gpu-backend: ready", BOOT_DEADLINE);
    // Every test here runs the backend under its seccomp filter, installed before its
    // first thread, so every thread of it is filtered.
    for task in std::fs::read_dir(format!("/proc/{}/task", backend.child.id())).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        assert!(status.lines().any(|line| line == "Seccomp:\t2"), "an unfiltered backend thread: {status}");
    }
    let mut vm = RunningVm::start_desk(&[
        "--socket",
        socket.to_str().unwrap(),
        "--gpu-backend",
        vhost.to_str().unwrap(),
        "--gpu-screen",
        screen.to_str().unwrap(),
    ]);
    vm.wait_for_line("first frame drawn", BOOT_DEADLINE);
    VhostUserDesk { vm, backend, socket }
}

fn pixel(rgb: &[u8], (x, y): (u32, u32)) -> [u8; 3] {
    let offset = ((y * WIDTH + x) * 3) as usize;
    [rgb[offset], rgb[offset + 1], rgb[offset + 2]]
}

#[test]
fn desk_through_gpu_backend_matches_golden_image_except_clock() {
    let desk = boot_desk_with_backend("golden.sock");
    let shot = screenshot(&desk.socket, Wait::FirstFrame);
    let (width, height, pixels) = decode_png(&shot.bytes);
    assert_eq!((width, height), (WIDTH, HEIGHT));
    let golden_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/desk-1280x800.png");
    let (_, _, golden) = decode_png(&std::fs::read(golden_path).expect("golden image"));
    let outside_clock: Vec<_> =
        differences(&pixels, &golden, WIDTH).into_iter().filter(|(x, y)| !inside(CLOCK, *x, *y)).collect();
    assert!(
        outside_clock.is_empty(),
        "{} pixels differ from the golden image, first at {:?}",
        outside_clock.len(),
        outside_clock.first()
    );
    // The next frame (the clock's) arrives through the backend's frame clock too.
    let next = screenshot(&desk.socket, Wait::FrameAfter(shot.frame));
    assert!(next.frame > shot.frame);
}

#[test]
fn click_through_gpu_backend_ticks_the_checkbox() {
    let desk = boot_desk_with_backend("click.sock");
    let before = screenshot(&desk.socket, Wait::FirstFrame);
    assert_ne!(pixel(&decode_png(&before.bytes).2, CHECKBOX_TICK), ACCENT, "the checkbox starts unticked");

    let (x, y) = CHECKBOX_CENTER;
    let request = InputRequest {
        action: Action::Click { x, y, button: Button::Left, count: 1 },
        wait: Some(Wait::FrameAfter(0)),
        screenshot: Some(ImageFormat::Png),
        timeout_ms: 5_000,
        hold_ms: None,
        gap_ms: None,
    };
    let result = match ControlClient::connect(&desk.socket)
        .unwrap()
        .call(&Request::Input(request), Duration::from_secs(20))
        .unwrap()
    {
        Response::Input(result) => result,
        other => panic!("expected an input result, got {other:?}"),
    };
    assert!(!result.timed_out, "the click drew no frame");
    // The frame after the click may be the clock's; the tick shows within the next few.
    let mut shot = result.screenshot.expect("a screenshot after the click");
    for _ in 0..3 {
        if pixel(&decode_png(&shot.bytes).2, CHECKBOX_TICK) == ACCENT {
            break;
        }
        shot = screenshot(&desk.socket, Wait::FrameAfter(shot.frame));
    }
    assert_eq!(pixel(&decode_png(&shot.bytes).2, CHECKBOX_TICK), ACCENT, "the checkbox is ticked");
}

#[test]
fn gpu_backend_exits_when_the_vm_stops() {
    let mut desk = boot_desk_with_backend("stop.sock");
    let answer = ControlClient::connect(&desk.socket).unwrap().call(&Request::Stop, Duration::from_secs(10)).unwrap();
    assert_eq!(answer, Response::Stopping);
    assert!(desk.vm.wait_for_exit(BOOT_DEADLINE).success(), "{}", desk.vm.text());
    let status = desk.backend.wait_for_exit(BOOT_DEADLINE);
    assert!(status.success(), "the backend ends cleanly with its frontend: {}", desk.backend.text());
}

#[test]
fn vm_with_gpu_backend_that_is_not_running_fails_with_a_clear_error() {
    let missing = scratch_path("missing-gpu.sock");
    let screen = scratch_path("missing-screen.sock");
    let mut vm =
        RunningVm::start_desk(&["--gpu-backend", missing.to_str().unwrap(), "--gpu-screen", screen.to_str().unwrap()]);
    let status = vm.wait_for_exit(BOOT_DEADLINE);
    assert!(!status.success());
    assert!(vm.text().contains("start carrel-gpu-backend"), "{}", vm.text());
}

#[test]
fn vm_says_so_when_the_gpu_backend_dies_and_keeps_serving_everything_else() {
    let mut desk = boot_desk_with_backend("dies.sock");
    screenshot(&desk.socket, Wait::FirstFrame);
    desk.backend.signal(libc::SIGKILL);
    desk.backend.wait_for_exit(BOOT_DEADLINE);
    desk.vm.wait_for_line("the GPU backend at", BOOT_DEADLINE);
    let request = ScreenshotRequest {
        format: ImageFormat::Png,
        crop: None,
        scale: None,
        cursor: false,
        wait: Wait::FirstFrame,
        timeout_ms: 1_000,
    };
    let answer = ControlClient::connect(&desk.socket)
        .unwrap()
        .call(&Request::Screenshot(request), Duration::from_secs(10))
        .unwrap();
    assert!(matches!(answer, Response::Error(_)), "no screenshot without the backend: {answer:?}");
    let status = ControlClient::connect(&desk.socket).unwrap().call(&Request::Status, Duration::from_secs(10)).unwrap();
    assert!(matches!(status, Response::Status(_)), "the VM still answers: {status:?}");
    let stop = ControlClient::connect(&desk.socket).unwrap().call(&Request::Stop, Duration::from_secs(10)).unwrap();
    assert_eq!(stop, Response::Stopping);
    assert!(desk.vm.wait_for_exit(BOOT_DEADLINE).success(), "{}", desk.vm.text());
}

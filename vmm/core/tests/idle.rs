//! What an idle Desk costs the host. A tickless Desk (the default) wakes only for what
//! it has to do, here the clock on screen once a second; `desk.tick=periodic` wakes it
//! 1000 times a second. Both run side by side, so host load weighs on them alike, and the
//! tickless one must cost a small fraction of the other while its clock still moves.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use carrel_vmm::control::{ControlClient, ImageFormat, Request, Response, Screenshot, ScreenshotRequest, Wait};
use common::{scratch_path, RunningVm};

const BOOT_DEADLINE: Duration = Duration::from_secs(30);
/// Clock frames the measurement lasts: about one a second.
const MEASURED_CLOCK_FRAMES: usize = 3;
/// Where the Desk clock is drawn at the default 1280x800 (desktop.rs: `clock_rect`).
const CLOCK: [u32; 4] = [1280 - 104, 0, 104, 32];

/// CPU time of every thread of `pid` (vCPU and device threads, guest time included).
/// Nanoseconds from schedstat, not the 10 ms ticks of /proc/PID/stat: a tickless VM uses
/// less than one tick in the whole window.
fn cpu_time(pid: u32) -> Duration {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the VMM is running");
    let nanoseconds = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanoseconds)
}

/// The clock's pixels, raw and cropped, so the capture itself costs the VMM next to nothing.
fn capture_clock(socket: &Path, wait: Wait) -> Screenshot {
    let request = ScreenshotRequest {
        format: ImageFormat::Raw,
        crop: Some(CLOCK),
        scale: None,
        cursor: false,
        wait,
        timeout_ms: 10_000,
    };
    match ControlClient::connect(socket).unwrap().call(&Request::Screenshot(request), Duration::from_secs(20)).unwrap()
    {
        Response::Screenshot(shot) => shot,
        other => panic!("expected a screenshot, got {other:?}"),
    }
}

fn boot(socket: &Path, extra: &[&str], timer_line: &str) -> RunningVm {
    let mut args = vec!["--socket", socket.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut vm = RunningVm::start_desk(&args);
    vm.wait_for_line(timer_line, BOOT_DEADLINE);
    vm.wait_for_line("first frame drawn", BOOT_DEADLINE);
    vm
}

fn percent_of_a_core(cpu: Duration, wall: Duration) -> f64 {
    cpu.as_secs_f64() / wall.as_secs_f64() * 100.0
}

#[test]
fn idle_desk_tickless_uses_under_a_fifth_of_the_periodic_cpu_and_its_clock_still_ticks() {
    let periodic_socket = scratch_path("periodic.sock");
    let tickless_socket = scratch_path("tickless.sock");
    let periodic = boot(&periodic_socket, &["--cmdline", "desk.tick=periodic"], "desk: timer 1000 Hz periodic");
    let tickless = boot(&tickless_socket, &[], "desk: timer tickless");

    // Boot work is over once the clock has moved on both; the window starts at a tick.
    let first = capture_clock(&periodic_socket, Wait::FirstFrame);
    capture_clock(&periodic_socket, Wait::FrameAfter(first.frame));
    let first = capture_clock(&tickless_socket, Wait::FirstFrame);
    let mut shot = capture_clock(&tickless_socket, Wait::FrameAfter(first.frame));
    let start_pixels = shot.bytes.clone();

    let started = Instant::now();
    let (periodic_before, tickless_before) = (cpu_time(periodic.child.id()), cpu_time(tickless.child.id()));
    for _ in 0..MEASURED_CLOCK_FRAMES {
        shot = capture_clock(&tickless_socket, Wait::FrameAfter(shot.frame));
    }
    let periodic_cpu = cpu_time(periodic.child.id()) - periodic_before;
    let tickless_cpu = cpu_time(tickless.child.id()) - tickless_before;
    let wall = started.elapsed();

    assert_ne!(shot.bytes, start_pixels, "the tickless clock must have moved in {wall:?}");
    let (periodic_percent, tickless_percent) =
        (percent_of_a_core(periodic_cpu, wall), percent_of_a_core(tickless_cpu, wall));
    eprintln!("idle over {wall:?}: tickless {tickless_percent:.3} % of a core, periodic {periodic_percent:.3} %");
    assert!(
        tickless_cpu * 5 < periodic_cpu,
        "over {wall:?} the tickless VM used {tickless_percent:.3} % of a core, the periodic one \
         {periodic_percent:.3} %: tickless must cost under a fifth"
    );
}

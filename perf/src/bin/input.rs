//! Input latency: from the control-socket call to the frame that shows the effect.
//!
//! Boots the Desk kernel, then clicks its buttons N times (hold and gap 0, so the click
//! itself adds no sleep), each call waiting for the next frame: the agent's "act, then
//! look" loop. Measured three ways: the frame alone, the frame plus a PNG screenshot, the
//! frame plus a QOI screenshot. Needs `cargo build --release -p carrel-vmm` and
//! `scripts/build-guests.sh`. `--runs N` (default 200).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use carrel_perf::{desk_kernel, report, start_vm, Summary};
use carrel_vmm::control::{ControlClient, ImageFormat, InputRequest, Request, Response, Wait};
use carrel_vmm::input::{Action, Button};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = match args.iter().position(|arg| arg == "--runs") {
        Some(index) => args.get(index + 1).context("--runs needs a number")?.parse()?,
        None => 200,
    };
    let socket = std::env::temp_dir().join(format!("carrel-bench-input-{}.sock", std::process::id()));
    let kernel = desk_kernel();
    let mut child = start_vm(
        &["--kernel".as_ref(), kernel.as_os_str(), "--socket".as_ref(), socket.as_os_str()],
        "first frame drawn",
    )?;

    let mut client = ControlClient::connect(&socket)?;
    // Save and Clear buttons of the Desk window on the 1280x800 screen.
    let targets = [(344, 288), (480, 288)];
    let mut measure = |screenshot: Option<ImageFormat>| -> anyhow::Result<(Vec<Duration>, u64)> {
        let mut samples = Vec::with_capacity(runs);
        let mut timeouts = 0;
        for index in 0..runs {
            let (x, y) = targets[index % 2];
            let request = InputRequest {
                action: Action::Click { x, y, button: Button::Left, count: 1 },
                wait: Some(Wait::FrameAfter(0)),
                screenshot,
                timeout_ms: 2_000,
                hold_ms: Some(0),
                gap_ms: Some(0),
            };
            let started = Instant::now();
            match client.call(&Request::Input(request), Duration::from_secs(10))? {
                Response::Input(result) if result.timed_out => timeouts += 1,
                Response::Input(_) => samples.push(started.elapsed()),
                other => bail!("unexpected answer {other:?}"),
            }
        }
        Ok((samples, timeouts))
    };
    let (frame_only, frame_timeouts) = measure(None)?;
    let (with_png, png_timeouts) = measure(Some(ImageFormat::Png))?;
    let (with_qoi, qoi_timeouts) = measure(Some(ImageFormat::Qoi))?;
    let _ = client.call(&Request::Stop, Duration::from_secs(5));
    let _ = child.wait();

    let summary = |samples: &[Duration], timeouts: u64| {
        let mut value = Summary::of(samples).map(|s| s.to_json_ms()).unwrap_or_default();
        value["timeouts"] = json!(timeouts);
        value
    };
    report(
        "input",
        json!({
            "platform": if std::path::Path::new("/sys/module/kvm_pvm").exists() { "pvm" } else { "hardware" },
            "runs": runs,
            "click_to_frame": summary(&frame_only, frame_timeouts),
            "click_to_frame_and_png": summary(&with_png, png_timeouts),
            "click_to_frame_and_qoi": summary(&with_qoi, qoi_timeouts),
            "targets": { "click_to_frame_median_ms": 5.0 }
        }),
    )?;
    Ok(())
}

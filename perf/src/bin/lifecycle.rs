//! Lifecycle benchmark: what a VM costs the host over its life. One function per
//! measurement, each returning its JSON; `main` runs them and writes one report.
//!
//! - `idle_desk_vms`: N Desk VMs of 128 MiB started with `carrel-vmm run`, each waited
//!   on to `desk: ready`, left to settle, then the CPU time of every VMM process (all
//!   its threads: vCPU and device threads, guest time included) over a window, and its
//!   RSS. Measured once with `desk.tick=periodic` (the 1 kHz timer) and once tickless
//!   (the default), one set of VMs after the other, with the same kernel binary.
//!
//! CPU time is the sum over the process's threads of `/proc/PID/task/TID/schedstat`
//! (nanoseconds), because the clock ticks of `/proc/PID/stat` (10 ms each) cannot tell
//! 0.01 % of a core from 0.1 % over a few seconds; the `/proc/PID/stat` utime+stime of
//! all VMs together is reported beside it as a cross-check.
//!
//! - `through_the_daemon`: a release carreld (as root: jailed VMMs, cgroups) and, through
//!   its socket, a template made from a ready Desk VM; VMs created from it (create to
//!   running, to the first screenshot, to the first agent answer); hibernation and the
//!   wakes (a hibernated VM's screenshot, wake to a live screenshot, wake to a click
//!   that landed); checkpoints (a diff snapshot after typing, while the guest runs);
//!   and density: `--density N` idle VMs from the template at once, their RSS and CPU,
//!   then hibernated, with their disk bytes each.
//!
//! Needs `cargo build --release -p carrel-vmm -p carrel-daemon` and
//! `scripts/build-guests.sh`. `--vms N` (default 10), `--seconds S` (the window, default
//! 10), `--settle S` (default 2), `--runs R` (default 10), `--density N` (default 300).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::Context;
use carrel_perf::{cpu_ticks, desk_kernel, report, start_vm, status_kib};
use serde_json::{json, Value};

struct Options {
    vms: usize,
    window: Duration,
    settle: Duration,
    runs: usize,
    density: usize,
}

impl Options {
    fn parse() -> anyhow::Result<Options> {
        let args: Vec<String> = std::env::args().collect();
        let number = |name: &str, default: u64| -> anyhow::Result<u64> {
            match args.iter().position(|arg| arg == name) {
                Some(index) => Ok(args.get(index + 1).with_context(|| format!("{name} needs a number"))?.parse()?),
                None => Ok(default),
            }
        };
        Ok(Options {
            vms: number("--vms", 10)?.max(1) as usize,
            window: Duration::from_secs(number("--seconds", 10)?.max(1)),
            settle: Duration::from_secs(number("--settle", 2)?),
            runs: number("--runs", 10)?.max(1) as usize,
            density: number("--density", 300)? as usize,
        })
    }
}

/// CPU time of every live thread of `pid`, in nanoseconds.
fn cpu_nanoseconds(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Median and maximum of `values` (not empty).
fn median_and_max(values: &[f64]) -> (f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    (sorted[sorted.len() / 2], sorted[sorted.len() - 1])
}

/// Running VMMs that are stopped when dropped, also when a start fails half way.
struct Fleet {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in &mut self.children {
            // SAFETY: SIGTERM to our own child: the VMM powers the guest off and exits 0.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `count` Desk VMs with `cmdline`, each waited on to `desk: ready` before the next.
fn start_desk_vms(count: usize, cmdline: &str, label: &str) -> anyhow::Result<Fleet> {
    let dir = std::env::temp_dir().join(format!("carrel-lifecycle-{}-{label}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut fleet = Fleet { children: Vec::new(), dir: dir.clone() };
    let kernel = desk_kernel();
    for index in 0..count {
        let socket = dir.join(format!("vm{index}.sock"));
        let vsock = dir.join(format!("vm{index}.vsock"));
        let mut args: Vec<&OsStr> = vec![
            "--kernel".as_ref(),
            kernel.as_os_str(),
            "--socket".as_ref(),
            socket.as_os_str(),
            "--vsock".as_ref(),
            vsock.as_os_str(),
            "--mem".as_ref(),
            "128".as_ref(),
        ];
        if !cmdline.is_empty() {
            args.extend([OsStr::new("--cmdline"), OsStr::new(cmdline)]);
        }
        let child = start_vm(&args, "desk: ready").with_context(|| format!("starting {label} VM {index}"))?;
        fleet.children.push(child);
    }
    Ok(fleet)
}

/// Idle CPU and RSS of `options.vms` running Desk VMs booted with `cmdline`.
fn idle_desk_vms(options: &Options, cmdline: &str, label: &str) -> anyhow::Result<Value> {
    let fleet = start_desk_vms(options.vms, cmdline, label)?;
    std::thread::sleep(options.settle);
    let pids: Vec<u32> = fleet.children.iter().map(Child::id).collect();
    let before: Vec<u64> = pids.iter().map(|pid| cpu_nanoseconds(*pid)).collect();
    let ticks_before: u64 = pids.iter().map(|pid| cpu_ticks(*pid)).sum();
    let started = Instant::now();
    std::thread::sleep(options.window);
    let after: Vec<u64> = pids.iter().map(|pid| cpu_nanoseconds(*pid)).collect();
    let ticks_after: u64 = pids.iter().map(|pid| cpu_ticks(*pid)).sum();
    let elapsed = started.elapsed().as_secs_f64();
    let rss_mib: Vec<f64> = pids.iter().map(|pid| status_kib(*pid, "VmRSS:") as f64 / 1024.0).collect();
    drop(fleet);

    let percent: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(before, after)| after.saturating_sub(*before) as f64 / 1e9 / elapsed * 100.0)
        .collect();
    let (percent_median, percent_max) = median_and_max(&percent);
    let (rss_median, rss_max) = median_and_max(&rss_mib);
    // SAFETY: sysconf only reads configuration.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let stat_percent_total = ticks_after.saturating_sub(ticks_before) as f64 / ticks_per_second / elapsed * 100.0;
    Ok(json!({
        "cmdline": cmdline,
        "vms": pids.len(),
        "window_s": elapsed,
        "cpu_percent_of_a_core_per_vm": { "median": percent_median, "max": percent_max, "each": percent },
        "cpu_percent_of_a_core_total": percent.iter().sum::<f64>(),
        "cpu_percent_of_a_core_total_from_proc_stat": stat_percent_total,
        "rss_mib_per_vm": { "median": rss_median, "max": rss_max },
        "rss_mib_total": rss_mib.iter().sum::<f64>(),
    }))
}

/// A release carreld on a socket of its own, killed (its VMs with it) when dropped.
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its VMMs outlive it by design: end them by the pids in its registry.
        for entry in std::fs::read_dir(self.dir.join("state/vms")).into_iter().flatten().flatten() {
            let record = std::fs::read_to_string(entry.path().join("vm.json")).unwrap_or_default();
            if let Some(pid) = serde_json::from_str::<Value>(&record).ok().and_then(|record| record["pid"].as_u64()) {
                // SAFETY: kill(2) on a VMM this benchmark's daemon started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn milliseconds(samples: &[Duration]) -> Value {
    carrel_perf::Summary::of(samples).map(|summary| summary.to_json_ms()).unwrap_or(Value::Null)
}

/// Runs until it answers: the guest's agent or input driver may not be up yet.
async fn until_ok<T, F, Fut>(mut call: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(status) if status.code() == tonic::Code::Unavailable && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(2)).await
            }
            Err(status) => anyhow::bail!("{status}"),
        }
    }
}

/// One call on a clone of `client` (tonic clients are handles to one channel), as an
/// owned future that [`until_ok`] can retry.
fn call<C: Clone, R, F>(client: &C, request: R, rpc: impl FnOnce(C, R) -> F) -> F {
    rpc(client.clone(), request)
}

/// The pause before each measured create or wake: long enough for carreld to have its
/// standby VMM ready again (it starts one 50 ms after taking one).
const BETWEEN_STARTS: Duration = Duration::from_millis(300);

/// Templates, wakes, checkpoints and density, through carreld's socket.
async fn through_the_daemon(options: &Options) -> anyhow::Result<Value> {
    use carrel_api::v1;
    let release = carrel_perf::workspace_root().join("target/release");
    let (carreld, vmm) = (release.join("carreld"), release.join("carrel-vmm"));
    anyhow::ensure!(carreld.exists(), "build first: cargo build --release -p carrel-vmm -p carrel-daemon");
    let dir = std::env::temp_dir().join(format!("carrel-lifecycle-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("carrel.sock");
    let child = std::process::Command::new(&carreld)
        .args(["--socket".as_ref(), socket.as_os_str(), "--state".as_ref(), dir.join("state").as_os_str()])
        .args(["--vmm".as_ref(), vmm.as_os_str(), "--kernel".as_ref(), desk_kernel().as_os_str()])
        .args(["--cgroup", "carrel-bench-lifecycle"])
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let _daemon = Daemon { child, dir: dir.clone() };
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let channel = carrel_api::connect(&socket).await?;
    let mut vms = v1::vms_client::VmsClient::new(channel.clone());
    let mut screen = v1::screen_client::ScreenClient::new(channel.clone());
    let input = v1::input_client::InputClient::new(channel.clone());
    let agent = v1::agent_client::AgentClient::new(channel.clone());
    let mut snapshots = v1::snapshots_client::SnapshotsClient::new(channel.clone());
    let mut templates = v1::templates_client::TemplatesClient::new(channel.clone());
    let create = |name: &str, template: &str| v1::CreateVmRequest {
        name: name.into(),
        template: template.into(),
        ..Default::default()
    };
    let echo = |name: &str| v1::ExecRequest { name: name.into(), argv: vec!["echo".into()], ..Default::default() };
    let shot = |name: &str, live| v1::ScreenshotRequest { name: name.into(), live, ..Default::default() };
    let click = |name: &str, x| v1::ActRequest {
        name: name.into(),
        action: Some(v1::act_request::Action::Click(v1::Click { x, y: 300 })),
        screenshot: true,
        timeout_ms: 5_000,
    };

    // The template: a Desk VM booted and ready.
    vms.create(create("base", "")).await?;
    until_ok(|| call(&agent, echo("base"), |mut c, r| async move { c.exec(r).await })).await?;
    let started = Instant::now();
    let template = templates.create(v1::CreateTemplateRequest { name: "desk".into(), from_vm: "base".into() }).await?;
    let template_made = started.elapsed();
    let template_memory = template.into_inner().memory_bytes;

    // VMs from the template: create returns once its VMM answers on its socket. Creates
    // come a moment apart, as on a host at work, not back to back: carreld's standby VMM
    // (started ahead of the next VM) is ready again by then.
    let (mut to_running, mut to_screenshot, mut to_agent) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..options.runs {
        let name = format!("clone-{run}");
        tokio::time::sleep(BETWEEN_STARTS).await;
        let started = Instant::now();
        vms.create(create(&name, "desk")).await?;
        to_running.push(started.elapsed());
        screen.screenshot(shot(&name, false)).await?;
        to_screenshot.push(started.elapsed());
        until_ok(|| call(&agent, echo(&name), |mut c, r| async move { c.exec(r).await })).await?;
        to_agent.push(started.elapsed());
        vms.delete(v1::VmName { name }).await?;
    }

    // Hibernation and wakes of one VM from the template.
    vms.create(create("sleeper", "desk")).await?;
    until_ok(|| call(&agent, echo("sleeper"), |mut c, r| async move { c.exec(r).await })).await?;
    let (mut hibernate, mut asleep, mut wake_shot, mut wake_click) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut hibernated_bytes = Vec::new();
    for run in 0..options.runs {
        let started = Instant::now();
        let info = snapshots.hibernate(v1::SnapshotRequest { name: "sleeper".into(), diff: run > 0 }).await?;
        hibernate.push(started.elapsed());
        hibernated_bytes.push(info.into_inner().disk_bytes);
        let started = Instant::now();
        screen.screenshot(shot("sleeper", false)).await?;
        asleep.push(started.elapsed());
        // A hibernated VM wakes long after it slept.
        tokio::time::sleep(BETWEEN_STARTS).await;
        let started = Instant::now();
        if run % 2 == 0 {
            screen.screenshot(shot("sleeper", true)).await?;
            wake_shot.push(started.elapsed());
        } else {
            until_ok(|| call(&input, click("sleeper", 300 + run as u32), |mut c, r| async move { c.act(r).await }))
                .await?;
            wake_click.push(started.elapsed());
        }
    }

    // Checkpoints while the guest runs: type a line, then a diff snapshot.
    let (mut checkpoint_rpc, mut checkpoint_paused, mut checkpoint_bytes) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..options.runs {
        let typing = v1::ActRequest {
            name: "sleeper".into(),
            action: Some(v1::act_request::Action::TypeText(format!("line {run}"))),
            screenshot: false,
            timeout_ms: 5_000,
        };
        until_ok(|| call(&input, typing.clone(), |mut c, r| async move { c.act(r).await })).await?;
        let started = Instant::now();
        let info = snapshots.snapshot(v1::SnapshotRequest { name: "sleeper".into(), diff: true }).await?.into_inner();
        checkpoint_rpc.push(started.elapsed());
        checkpoint_paused.push(Duration::from_micros(info.paused_us));
        checkpoint_bytes.push(info.disk_bytes);
    }
    vms.delete(v1::VmName { name: "sleeper".into() }).await?;

    // Density: idle VMs from the template, all running at once.
    let mut pids = Vec::new();
    let mut refused = None;
    let started = Instant::now();
    for index in 0..options.density {
        match vms.create(create(&format!("dense-{index}"), "desk")).await {
            Ok(vm) => pids.push(vm.into_inner().pid),
            Err(status) => {
                refused = Some(format!("VM {index}: {status}"));
                break;
            }
        }
    }
    let created_in = started.elapsed();
    tokio::time::sleep(options.settle).await;
    let tree: Vec<u32> = pids.iter().flat_map(|pid| carrel_perf::process_tree(*pid)).collect();
    let rss_kib: u64 = tree.iter().map(|pid| status_kib(*pid, "VmRSS:")).sum();
    let cpu_before: u64 = tree.iter().map(|pid| cpu_nanoseconds(*pid)).sum();
    tokio::time::sleep(options.window).await;
    let cpu_after: u64 = tree.iter().map(|pid| cpu_nanoseconds(*pid)).sum();
    let running = pids.len();
    let cores = cpu_after.saturating_sub(cpu_before) as f64 / 1e9 / options.window.as_secs_f64();
    // Then asleep: each hibernated to its own diff over the template.
    let mut asleep_bytes = Vec::new();
    for index in 0..running {
        let name = format!("dense-{index}");
        let info = snapshots.hibernate(v1::SnapshotRequest { name, diff: true }).await?.into_inner();
        asleep_bytes.push(info.disk_bytes as f64);
    }
    let (asleep_median, asleep_max) = if asleep_bytes.is_empty() { (0.0, 0.0) } else { median_and_max(&asleep_bytes) };

    let median = |samples: &[Duration]| carrel_perf::Summary::of(samples).map_or(0.0, |s| s.median.as_secs_f64() * 1e3);
    Ok(json!({
        "template": {
            "create_ms": template_made.as_secs_f64() * 1e3,
            "memory_bytes": template_memory,
            "create_to_running": milliseconds(&to_running),
            "create_to_first_screenshot": milliseconds(&to_screenshot),
            "create_to_agent_answer": milliseconds(&to_agent),
        },
        "hibernation": {
            "hibernate_rpc": milliseconds(&hibernate),
            "disk_bytes": hibernated_bytes,
            "screenshot_while_asleep": milliseconds(&asleep),
            "wake_to_live_screenshot": milliseconds(&wake_shot),
            "wake_to_click_landed": milliseconds(&wake_click),
        },
        "checkpoint_after_typing": {
            "diff_snapshot_rpc": milliseconds(&checkpoint_rpc),
            "paused": milliseconds(&checkpoint_paused),
            "disk_bytes": checkpoint_bytes,
        },
        "density": {
            "asked": options.density,
            "running_idle_at_once": running,
            "refused": refused,
            "created_all_in_s": created_in.as_secs_f64(),
            "guest_memory_mib_each": 128,
            "host_rss_mib_total": rss_kib as f64 / 1024.0,
            "host_rss_mib_per_vm": if running > 0 { rss_kib as f64 / 1024.0 / running as f64 } else { 0.0 },
            "idle_cores_total": cores,
            "idle_percent_of_a_core_per_vm": if running > 0 { cores * 100.0 / running as f64 } else { 0.0 },
            "hibernated_disk_bytes_per_vm": { "median": asleep_median, "max": asleep_max },
        },
        "medians_ms": {
            "template_create_to_running": median(&to_running),
            "wake_to_live_screenshot": median(&wake_shot),
            "wake_to_click_landed": median(&wake_click),
        },
    }))
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse()?;
    let periodic = idle_desk_vms(&options, "desk.tick=periodic", "periodic")?;
    let tickless = idle_desk_vms(&options, "", "tickless")?;
    let daemon = tokio::runtime::Runtime::new()?.block_on(through_the_daemon(&options))?;
    let median = |value: &Value| value["cpu_percent_of_a_core_per_vm"]["median"].as_f64().unwrap_or(0.0);
    let ratio = if median(&tickless) > 0.0 { json!(median(&periodic) / median(&tickless)) } else { json!(null) };
    report(
        "lifecycle",
        json!({
            "platform": if Path::new("/sys/module/kvm_pvm").exists() { "pvm" } else { "hardware" },
            "idle_desk_vms": {
                "periodic_1khz": periodic,
                "tickless": tickless,
                "median_ratio_periodic_over_tickless": ratio,
            },
            "through_the_daemon": daemon,
            "targets": {
                "idle_cpu_percent_of_a_core_per_vm": 0.1,
                "wake_to_screenshot_ms": 20,
                "template_create_to_ready_ms": 15,
                "running_idle_desk_vms": 300,
            },
        }),
    )?;
    Ok(())
}

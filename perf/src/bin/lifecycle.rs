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
//! Needs `cargo build --release -p carrel-vmm` and `scripts/build-guests.sh`.
//! `--vms N` (default 10), `--seconds S` (the window, default 10), `--settle S` (default 2).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::Context;
use carrel_perf::{desk_kernel, report, start_vm};
use serde_json::{json, Value};

struct Options {
    vms: usize,
    window: Duration,
    settle: Duration,
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

/// utime + stime of `pid` (all threads, dead ones too) in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| text.lines().find(|line| line.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
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
    let rss_mib: Vec<f64> = pids.iter().map(|pid| rss_kib(*pid) as f64 / 1024.0).collect();
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

fn main() -> anyhow::Result<()> {
    let options = Options::parse()?;
    let periodic = idle_desk_vms(&options, "desk.tick=periodic", "periodic")?;
    let tickless = idle_desk_vms(&options, "", "tickless")?;
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
            "targets": { "idle_cpu_percent_of_a_core_per_vm": 0.1 },
        }),
    )?;
    Ok(())
}

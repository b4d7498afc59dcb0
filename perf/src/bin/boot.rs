//! Boot benchmark: process start to first guest output, and the VMM's memory.
//!
//! Interleaved in one run, N times each:
//! - `carrel-vmm` + Desk kernel: process start to `desk: ready`;
//! - `carrel-vmm` + the tiny PVH image: process start to `OK`;
//! - QEMU `-M microvm` + the same PVH image: process start to `OK`.
//!
//! Peak RSS comes from wait4's rusage; for the Desk runs the guest RAM the VMM has touched
//! is read from /proc/PID/smaps at `desk: ready` and subtracted, which leaves what the VMM
//! itself costs.
//!
//! Needs `cargo build --release -p carrel-vmm`, `scripts/build-guests.sh` and
//! qemu-system-x86_64 (scripts/provision-host.sh). `--runs N` (default 30).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use carrel_perf::{report, workspace_root, Summary};
use serde_json::json;

struct Run {
    latency: Duration,
    peak_rss_kib: u64,
    guest_rss_kib: u64,
}

/// Waits for `pid` and returns its peak RSS in KiB.
fn reap(pid: u32) -> anyhow::Result<u64> {
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; status and usage are valid for writes.
    let rc = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
    if rc < 0 {
        bail!("wait4({pid}) failed: {}", std::io::Error::last_os_error());
    }
    Ok(usage.ru_maxrss as u64)
}

/// RSS of the guest-RAM memfd mappings of `pid`, in KiB.
fn guest_rss_kib(pid: u32) -> u64 {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return 0;
    };
    let mut in_guest_ram = false;
    let mut total = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // A mapping header: "start-end perms offset dev inode path".
            in_guest_ram = line.contains("memfd:carrel-guest-ram");
        } else if let (true, Some(kib)) = (in_guest_ram, line.strip_prefix("Rss:")) {
            total += kib.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
        }
    }
    total
}

/// Starts `command`, waits for a stdout line containing `needle`, then lets it finish
/// (or kills it when `kill` is set) and reaps it. With `sample_at`, the guest RAM the
/// process maps (guest mapping and zero-copy views of it alike) is read when that later
/// line appears, once the guest has set everything up.
fn time_to_line(mut command: Command, needle: &str, kill: bool, sample_at: Option<&str>) -> anyhow::Result<Run> {
    command.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null());
    let started = Instant::now();
    let mut child = command.spawn().context("spawning the VMM")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut latency = None;
    let mut guest_rss = 0;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line?;
        if latency.is_none() && line.contains(needle) {
            latency = Some(started.elapsed());
        }
        if let Some(sample) = sample_at {
            if line.contains(sample) {
                guest_rss = guest_rss_kib(child.id());
            }
        }
        if latency.is_some() && (sample_at.is_none() || guest_rss > 0) {
            break;
        }
    }
    if kill {
        // SAFETY: SIGKILL to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    }
    // Drain so the child never blocks on a full pipe while finishing.
    for _ in lines {}
    let peak = reap(child.id())?;
    let Some(latency) = latency else { bail!("{needle:?} never appeared") };
    Ok(Run { latency, peak_rss_kib: peak, guest_rss_kib: guest_rss })
}

fn summary(runs: &[Run]) -> serde_json::Value {
    let latencies: Vec<Duration> = runs.iter().map(|run| run.latency).collect();
    let mut value = Summary::of(&latencies).map(|s| s.to_json_ms()).unwrap_or_default();
    let mut peaks: Vec<u64> = runs.iter().map(|run| run.peak_rss_kib).collect();
    peaks.sort_unstable();
    let mut overhead: Vec<u64> = runs.iter().map(|run| run.peak_rss_kib.saturating_sub(run.guest_rss_kib)).collect();
    overhead.sort_unstable();
    if let serde_json::Value::Object(map) = &mut value {
        map.insert("peak_rss_kib_median".into(), json!(peaks[peaks.len() / 2]));
        if runs.iter().any(|run| run.guest_rss_kib > 0) {
            map.insert("guest_ram_touched_kib_median".into(), json!(runs[runs.len() / 2].guest_rss_kib));
            map.insert("vmm_rss_beyond_guest_kib_median".into(), json!(overhead[overhead.len() / 2]));
        }
    }
    value
}

fn require(path: &Path, hint: &str) -> anyhow::Result<()> {
    if !path.exists() {
        bail!("{} is missing: {hint}", path.display());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runs = match args.iter().position(|arg| arg == "--runs") {
        Some(index) => args.get(index + 1).context("--runs needs a number")?.parse()?,
        None => 30usize,
    };
    let root = workspace_root();
    let vmm: PathBuf = root.join("target/release/carrel-vmm");
    let desk = root.join("target/guests/desk.elf");
    let pvh = root.join("target/guests/pvh-ok.elf");
    require(&vmm, "run `cargo build --release -p carrel-vmm`")?;
    require(&desk, "run scripts/build-guests.sh")?;
    require(&pvh, "run scripts/build-guests.sh")?;
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok();

    let (mut desk_runs, mut pvh_runs, mut qemu_runs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut command = Command::new(&vmm);
        command.args(["run", "--mem", "128", "--kernel"]).arg(&desk).args(["--cmdline", "desk.exit=1"]);
        desk_runs.push(time_to_line(command, "desk: ready", false, Some("desk: 10 ticks in"))?);

        let mut command = Command::new(&vmm);
        command.args(["run", "--mem", "128", "--kernel"]).arg(&pvh);
        pvh_runs.push(time_to_line(command, "OK", false, None)?);

        if qemu {
            let mut command = Command::new("qemu-system-x86_64");
            command
                .args(["-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "128"])
                .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-kernel"])
                .arg(&pvh);
            qemu_runs.push(time_to_line(command, "OK", true, None)?);
        }
    }

    let median = |runs: &[Run]| Summary::of(&runs.iter().map(|r| r.latency).collect::<Vec<_>>()).map(|s| s.median);
    let ratio = match (median(&qemu_runs), median(&pvh_runs)) {
        (Some(qemu), Some(carrel)) => json!(qemu.as_secs_f64() / carrel.as_secs_f64()),
        _ => json!(null),
    };
    let platform = if Path::new("/sys/module/kvm_pvm").exists() { "pvm" } else { "hardware" };
    report(
        "boot",
        json!({
            "platform": platform,
            "runs": runs,
            "desk_start_to_ready": summary(&desk_runs),
            "pvh_ok_carrel_vmm": summary(&pvh_runs),
            "pvh_ok_qemu_microvm": if qemu { summary(&qemu_runs) } else { json!("qemu-system-x86_64 not installed") },
            "pvh_ok_median_ratio_qemu_over_carrel": ratio,
            "targets": {
                "pvh_ok_median_ms": 5.0,
                "desk_ready_median_ms": 15.0,
                "vmm_rss_beyond_guest_kib": 5120
            }
        }),
    )?;
    Ok(())
}

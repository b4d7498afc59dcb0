//! Hibernation benchmark: snapshots, hibernation and restores of Desk guests, side by
//! side with QEMU's migration to a file and Firecracker's snapshots, in one run.
//!
//! For each guest size (`--sizes 256,1024` MiB) the Desk agent first dirties three
//! quarters of RAM (`fill`), then:
//! - in three rounds, the disk's own O_DIRECT sequential write speed (8 MiB writes, then
//!   fdatasync), the limit, and right after it a full snapshot: time paused, memory write
//!   time, bytes, and its speed as a fraction of the disk's in that round (medians of
//!   the rounds reported, each round kept);
//! - diff snapshots, each after typing a line into the Desk text field;
//! - hibernate: the request until the VMM process has ended;
//! - a screenshot of the hibernated VM from its files (`screenshot --snapshot`, CLI wall);
//! - restores (each side's after the host wrote back what its snapshots left dirty), lazy
//!   and eager, with the page cache warm (the snapshot's files read just before each
//!   restore, every side's) and (when /proc/sys/vm/drop_caches is writable) cold:
//!   process start to the vCPUs running (the first guest instruction,
//!   by the host's monotonic clock the VMM reads as it enters the guest, so that its
//!   report's trip through a pipe on a busy machine is not counted),
//!   to the first screenshot served (asked for as soon as the control socket accepts)
//!   and to the first agent ping; lazily also into a `carrel-vmm standby` started ahead
//!   (as carreld keeps one), from the hand-over of its command line. The first
//!   screenshot is raw pixels (4 MB of the screen's memory) and, in the `_png` rows, a
//!   PNG, the format agents ask for;
//! - QEMU (`-accel tcg -S`, RAM of the same size, the same number of non-zero bytes
//!   loaded into it): migrate to a file (`exec:cat`, bandwidth unlimited) and the fsync
//!   after it, and an incoming restore from that file until the VM is paused and ready;
//! - with `--firecracker PATH` (a Firecracker v1.16 binary), Firecracker's snapshot API on
//!   a guest of the same size holding the same non-zero bytes (`firecracker.rs`).
//!
//! Snapshots go under `--dir` (default target/perf-hibernate, on the same filesystem as
//! the build). Needs `cargo build --release -p carrel-vmm`, `scripts/build-guests.sh` and
//! qemu-system-x86_64. `--runs N` restores per mode (default 5).
//!
//! `--snapshot DIR` measures the restores of the hibernated VM in DIR alone and prints
//! them (for work on the restore path; nothing is written under perf/results).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use carrel_perf::{desk_kernel, report, workspace_root, Summary};
use carrel_vmm::control::{
    AgentRequest, ControlClient, ImageFormat, Request, Response, ScreenshotRequest, SnapshotRequest, Wait,
};
use carrel_vmm::snapshot::SnapshotInfo;
use serde_json::{json, Value};

mod firecracker;
mod qemu;

const DEADLINE: Duration = Duration::from_secs(120);

struct Options {
    sizes: Vec<u64>,
    runs: usize,
    dir: PathBuf,
    firecracker: Option<PathBuf>,
    snapshot: Option<PathBuf>,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        sizes: vec![256, 1024],
        runs: 5,
        dir: workspace_root().join("target/perf-hibernate"),
        firecracker: None,
        snapshot: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut index = 0;
    while index < args.len() {
        let value = args.get(index + 1).cloned().unwrap_or_default();
        match args[index].as_str() {
            "--sizes" => options.sizes = value.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--runs" => options.runs = value.parse()?,
            "--dir" => options.dir = value.into(),
            "--firecracker" => options.firecracker = Some(value.into()),
            "--snapshot" => options.snapshot = Some(value.into()),
            other => bail!("unknown flag {other:?} (--sizes A,B --runs N --dir DIR --firecracker PATH --snapshot DIR)"),
        }
        index += 2;
    }
    Ok(options)
}

fn vmm() -> PathBuf {
    workspace_root().join("target/release/carrel-vmm")
}

pub(crate) fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The summary of `samples` in milliseconds, `null` when there are none.
pub(crate) fn summary_ms(samples: &[Duration]) -> Value {
    Summary::of(samples).map(|s| s.to_json_ms()).unwrap_or(Value::Null)
}

/// A connection to the Unix socket at `path` (`what` it is), tried until it is accepted
/// or [`DEADLINE`] passes: the peer's process may still be starting.
pub(crate) fn connect_until_accepted(path: &Path, what: &str) -> anyhow::Result<UnixStream> {
    let end = Instant::now() + DEADLINE;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_micros(100)),
            Err(err) => bail!("{what} {}: {err}", path.display()),
        }
    }
}

/// A carrel-vmm process whose stderr lines arrive, timestamped, on a channel.
struct Vmm {
    child: Child,
    started: Instant,
    /// `started` on the host's monotonic clock, in seconds.
    started_monotonic: f64,
    lines: mpsc::Receiver<(Instant, String)>,
    socket: PathBuf,
}

impl Vmm {
    fn spawn(args: &[String], socket: PathBuf) -> anyhow::Result<Vmm> {
        let (started, started_monotonic) = (Instant::now(), monotonic_now());
        let (child, lines) = Vmm::launch(args, Stdio::null(), Stdio::null())?;
        Ok(Vmm { child, started, started_monotonic, lines, socket })
    }

    /// A `carrel-vmm standby` started ahead, as carreld keeps one, then handed `args`:
    /// the time counts from the hand-over, the analogue of loading a snapshot into a
    /// VMM process that is already running.
    fn hand_over(args: &[String], socket: PathBuf) -> anyhow::Result<Vmm> {
        let (mut child, lines) = Vmm::launch(&["standby".to_string()], Stdio::piped(), Stdio::piped())?;
        let mut stdin = child.stdin.take().context("stdin")?;
        let mut ready = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut ready)?;
        anyhow::ensure!(ready == "ready\n", "the standby VMM did not say it was ready: {ready:?}");
        // Settled, as a daemon's standby is by the time a wake comes (the previous VM's
        // exit done with, its own start long past).
        std::thread::sleep(Duration::from_millis(100));
        let (started, started_monotonic) = (Instant::now(), monotonic_now());
        writeln!(stdin, "{}", json!({ "args": args }))?;
        drop(stdin);
        Ok(Vmm { child, started, started_monotonic, lines, socket })
    }

    /// `carrel-vmm ARGS`, its stderr lines timestamped on the returned channel.
    fn launch(
        args: &[String],
        stdin: Stdio,
        stdout: Stdio,
    ) -> anyhow::Result<(Child, mpsc::Receiver<(Instant, String)>)> {
        let mut child = Command::new(vmm())
            .args(args)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning carrel-vmm {}", args[0]))?;
        let stderr = child.stderr.take().context("stderr")?;
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = sender.send((Instant::now(), line));
            }
        });
        Ok((child, lines))
    }

    /// Time from spawn to the first guest instruction: the `vCPUs running` line's own
    /// monotonic stamp (the line arrives later, by a pipe).
    fn until_vcpus_run(&self) -> anyhow::Result<Duration> {
        let line = self.line_with("vCPUs running")?.1;
        let stamp = line
            .split("(monotonic ")
            .nth(1)
            .and_then(|rest| rest.trim_end_matches(')').parse::<f64>().ok())
            .with_context(|| format!("no monotonic stamp in {line:?}"))?;
        anyhow::ensure!(stamp >= self.started_monotonic, "the stamp {stamp} is before the start");
        Ok(Duration::from_secs_f64(stamp - self.started_monotonic))
    }

    /// Time from spawn to a stderr line containing `needle`.
    fn until_line(&self, needle: &str) -> anyhow::Result<Duration> {
        Ok(self.line_with(needle)?.0 - self.started)
    }

    /// The first stderr line containing `needle`, and when it came.
    fn line_with(&self, needle: &str) -> anyhow::Result<(Instant, String)> {
        let end = Instant::now() + DEADLINE;
        loop {
            let (at, line) = self
                .lines
                .recv_timeout(end.saturating_duration_since(Instant::now()))
                .with_context(|| format!("no {needle:?} line from carrel-vmm"))?;
            if line.contains(needle) {
                return Ok((at, line));
            }
            if line.contains("error") {
                bail!("carrel-vmm: {line}");
            }
        }
    }

    fn client(&self) -> anyhow::Result<ControlClient> {
        let end = Instant::now() + DEADLINE;
        loop {
            match ControlClient::connect(&self.socket) {
                Ok(client) => return Ok(client),
                Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_micros(100)),
                Err(err) => bail!("control socket {}: {err}", self.socket.display()),
            }
        }
    }

    fn call(&self, request: &Request) -> anyhow::Result<Response> {
        Ok(self.client()?.call(request, DEADLINE)?)
    }

    fn exec(&self, argv: &[&str]) -> anyhow::Result<()> {
        let output = Command::new(vmm())
            .args(["agent", "--socket", &self.socket.display().to_string(), "exec", "--timeout", "120", "--"])
            .args(argv)
            .output()?;
        if !output.status.success() {
            bail!("agent exec {argv:?}: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(())
    }

    fn input(&self, action: &[&str]) -> anyhow::Result<()> {
        let status = Command::new(vmm())
            .args(["input", "--socket", &self.socket.display().to_string()])
            .args(action)
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("input {action:?} failed");
        }
        Ok(())
    }

    fn snapshot(&self, dir: &Path, hibernate: bool, diff: bool) -> anyhow::Result<SnapshotInfo> {
        let request = Request::Snapshot(SnapshotRequest { dir: dir.to_path_buf(), hibernate, diff });
        match self.call(&request)? {
            Response::Snapshot(info) => Ok(info),
            other => bail!("snapshot {}: {other:?}", dir.display()),
        }
    }

    fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.call(&Request::Stop);
        self.child.wait()?;
        Ok(())
    }
}

/// `carrel-vmm run` with `flags`, talking on `socket` and `vsock`, its console off.
fn run_args(flags: &[&str], socket: &Path, vsock: &Path) -> Vec<String> {
    let mut args = vec!["run".to_string()];
    args.extend(flags.iter().map(|flag| flag.to_string()));
    let (socket, vsock) = (socket.display().to_string(), vsock.display().to_string());
    args.extend(["--socket".into(), socket, "--vsock".into(), vsock, "--no-console".into()]);
    args
}

fn snapshot_json(info: &SnapshotInfo) -> Value {
    json!({
        "paused_ms": info.paused_us as f64 / 1e3,
        "memory_write_ms": info.memory_write_us as f64 / 1e3,
        "memory_bytes": info.memory_bytes,
        "disk_bytes": info.disk_bytes,
    })
}

/// Sequential O_DIRECT writes of `bytes` in 8 MiB pieces, then fdatasync: MB/s.
fn disk_write_speed(dir: &Path, bytes: u64) -> anyhow::Result<f64> {
    const PIECE: usize = 8 << 20;
    let path = dir.join("disk-speed.bin");
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_DIRECT).open(&path)?;
    let layout = std::alloc::Layout::from_size_align(PIECE, 4096)?;
    // SAFETY: a non-zero size with a valid alignment; freed below.
    let buffer = unsafe { std::alloc::alloc(layout) };
    anyhow::ensure!(!buffer.is_null(), "no memory for the write buffer");
    // SAFETY: `buffer` holds PIECE bytes just allocated.
    let piece = unsafe { std::slice::from_raw_parts_mut(buffer, PIECE) };
    let mut state = 0x243f_6a88_85a3_08d3u64;
    for word in piece.chunks_exact_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes());
    }
    let started = Instant::now();
    let mut written = 0u64;
    let result = (|| -> std::io::Result<()> {
        while written < bytes {
            file.write_all(piece)?;
            written += PIECE as u64;
        }
        file.sync_data()
    })();
    let elapsed = started.elapsed();
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(buffer, layout) };
    let _ = std::fs::remove_file(&path);
    result?;
    Ok(written as f64 / 1e6 / elapsed.as_secs_f64())
}

/// The host's monotonic clock (CLOCK_MONOTONIC, what `Instant` reads), in seconds.
fn monotonic_now() -> f64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9
}

/// Waits until the host has written back what the snapshots before left dirty, so that
/// restores are not measured against the kernel's writeback of the last gigabyte (a host
/// has long done it by the time a VM wakes). Every side's restores start after it.
pub(crate) fn settle_writeback() {
    // SAFETY: sync takes no arguments and touches no memory of this process.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_millis(200));
}

pub(crate) fn drop_caches() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", "1").is_ok()
}

/// Reads the data of `paths` (files, or directories of files) once, so that a warm
/// restore finds it in the page cache whatever the host did since: a host may page out
/// what nobody read for a while (DAMON's `pageout`, as on the machines these numbers come
/// from, after a minute), which turned "warm" restores partly cold.
pub(crate) fn warm_page_cache(paths: &[&Path]) -> anyhow::Result<()> {
    let mut buffer = vec![0u8; 1 << 20];
    for path in paths {
        let files: Vec<PathBuf> = if path.is_dir() {
            std::fs::read_dir(path)?.map(|entry| entry.map(|entry| entry.path())).collect::<Result<_, _>>()?
        } else {
            vec![path.to_path_buf()]
        };
        for file in files.iter().filter(|file| file.is_file()) {
            let opened = std::fs::File::open(file)?;
            let extents = carrel_vmm::snapshot::memory::data_extents(&opened, opened.metadata()?.len())?;
            for (start, len) in extents {
                let mut at = start;
                while at < start + len {
                    let want = ((start + len - at) as usize).min(buffer.len());
                    let read = std::os::unix::fs::FileExt::read_at(&opened, &mut buffer[..want], at)?;
                    anyhow::ensure!(read > 0, "{} ended early", file.display());
                    at += read as u64;
                }
            }
        }
    }
    Ok(())
}

/// One restore: spawn (or the hand-over to a standby VMM) to vCPUs running, to a
/// screenshot (asked for as soon as the control socket accepts), to an agent ping; then
/// stop.
fn restore_once(
    dir: &Path,
    mode: &str,
    standby: bool,
    format: ImageFormat,
    scratch: &Path,
) -> anyhow::Result<(Duration, Duration, Duration)> {
    let socket = scratch.join("restore.sock");
    let vsock = scratch.join("restore.vsock");
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&vsock);
    let args = run_args(&["--restore", &dir.display().to_string(), mode], &socket, &vsock);
    let vm = if standby { Vmm::hand_over(&args, socket)? } else { Vmm::spawn(&args, socket)? };
    // The client asks as soon as the control socket accepts, as a supervisor would,
    // without waiting to read the VMM's report of its vCPUs first.
    let shot = ScreenshotRequest {
        format,
        crop: None,
        scale: None,
        cursor: false,
        wait: Wait::FirstFrame,
        timeout_ms: 10_000,
    };
    let mut client = vm.client()?;
    match client.call(&Request::Screenshot(shot), DEADLINE)? {
        Response::Screenshot(_) => {}
        other => bail!("screenshot after restore: {other:?}"),
    }
    let screenshot = vm.started.elapsed();
    let running = vm.until_vcpus_run()?;
    let end = Instant::now() + DEADLINE;
    loop {
        match client.call(&Request::Agent(AgentRequest::Ping), DEADLINE)? {
            Response::Agent(_) => break,
            _ if Instant::now() < end => std::thread::sleep(Duration::from_micros(200)),
            other => bail!("agent ping after restore: {other:?}"),
        }
    }
    let ping = vm.started.elapsed();
    vm.stop()?;
    Ok((running, screenshot, ping))
}

fn restores(dir: &Path, scratch: &Path, runs: usize) -> anyhow::Result<Value> {
    settle_writeback();
    let mut results = serde_json::Map::new();
    let cold_possible = drop_caches();
    // Raw pixels first (the screen's memory itself), and once as a PNG, what agents ask
    // for (the image the snapshot kept, while the guest has drawn no new frame).
    let ways = [
        ("--lazy", false, ImageFormat::Raw),
        ("--eager", false, ImageFormat::Raw),
        ("--lazy", true, ImageFormat::Raw),
        ("--lazy", false, ImageFormat::Png),
        ("--lazy", true, ImageFormat::Png),
    ];
    for (mode, standby, format) in ways {
        for cold in [false, true] {
            if cold && !cold_possible {
                continue;
            }
            let (mut running, mut screenshot, mut ping) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..runs {
                if cold {
                    drop_caches();
                } else {
                    warm_page_cache(&[dir])?;
                }
                let (r, s, p) = restore_once(dir, mode, standby, format, scratch)?;
                running.push(r);
                screenshot.push(s);
                ping.push(p);
            }
            let name = format!(
                "{}{}{}_{}",
                mode.trim_start_matches("--"),
                if standby { "_standby" } else { "" },
                if format == ImageFormat::Png { "_png" } else { "" },
                if cold { "cold" } else { "warm" }
            );
            results.insert(
                name,
                json!({
                    "to_vcpus_running": summary_ms(&running),
                    "to_first_screenshot": summary_ms(&screenshot),
                    "to_first_agent_ping": summary_ms(&ping),
                }),
            );
        }
    }
    if !cold_possible {
        results.insert("cold".into(), json!("not measured: /proc/sys/vm/drop_caches is not writable"));
    }
    Ok(Value::Object(results))
}

fn hibernated_screenshots(dir: &Path, scratch: &Path, runs: usize) -> anyhow::Result<Value> {
    let out = scratch.join("hibernated.png");
    let mut samples = Vec::new();
    for _ in 0..runs.max(5) {
        let started = Instant::now();
        let status = Command::new(vmm())
            .args(["screenshot", "--snapshot", &dir.display().to_string(), "-o", &out.display().to_string()])
            .stdout(Stdio::null())
            .status()?;
        samples.push(started.elapsed());
        anyhow::ensure!(status.success(), "screenshot --snapshot failed");
    }
    Ok(summary_ms(&samples))
}

/// A file of `mib` MiB of non-zero, incompressible bytes: what the peers' guests hold in
/// RAM, as much as the Desk agent's `fill` dirtied.
fn dirty_blob(path: &Path, mib: u64) -> anyhow::Result<()> {
    let mut bytes = vec![0u8; (mib << 20) as usize];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for word in bytes.chunks_exact_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    std::fs::write(path, &bytes)?;
    Ok(())
}

/// Rounds of the disk's speed, then a full snapshot.
const FULL_ROUNDS: usize = 3;

/// The median of `values` (the upper one of an even count); NaN when there are none.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn one_size(size_mib: u64, options: &Options) -> anyhow::Result<Value> {
    let scratch = options.dir.join(format!("{size_mib}"));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let dirty_mib = size_mib * 3 / 4;

    let socket = scratch.join("vm.sock");
    let vsock = scratch.join("vm.vsock");
    let machine = ["--kernel", &desk_kernel().display().to_string(), "--mem", &size_mib.to_string()];
    let mut vm = Vmm::spawn(&run_args(&machine, &socket, &vsock), socket)?;
    vm.until_line("vCPUs running")?;
    let end = Instant::now() + DEADLINE;
    while vm.call(&Request::Agent(AgentRequest::Ping)).map(|r| !matches!(r, Response::Agent(_))).unwrap_or(true) {
        anyhow::ensure!(Instant::now() < end, "the Desk agent never answered");
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.exec(&["fill", &dirty_mib.to_string(), "3"])?;
    vm.input(&["click", "640", "228"])?;

    // The disk's speed varies from one second to the next here (the host's own caching):
    // each full snapshot is measured right after the disk, in rounds, and set against it.
    let mut rounds = Vec::new();
    let mut full = None;
    for round in 0..FULL_ROUNDS {
        let disk = disk_write_speed(&scratch, (size_mib << 20).max(512 << 20))?;
        let dir = scratch.join("full");
        let _ = std::fs::remove_dir_all(&dir);
        let info = vm.snapshot(&dir, false, false)?;
        let write_mb_s = info.memory_bytes as f64 / 1e6 / (info.memory_write_us as f64 / 1e6);
        rounds.push(json!({
            "round": round,
            "disk_o_direct_write_mb_s": disk,
            "snapshot": snapshot_json(&info),
            "memory_write_mb_s": write_mb_s,
            "fraction_of_disk_speed": write_mb_s / disk,
        }));
        full = Some(info);
    }
    let full = full.context("no full snapshot was taken")?;
    let median_of = |key: &str| median(rounds.iter().filter_map(|round| round[key].as_f64()).collect());
    let (disk, write_mb_s) = (median_of("disk_o_direct_write_mb_s"), median_of("memory_write_mb_s"));
    let mut diffs = Vec::new();
    let mut parent_diffs = Vec::new();
    for run in 0..options.runs {
        vm.input(&["type", &format!("line {run} typed before a diff")])?;
        let info = vm.snapshot(&scratch.join(format!("diff-{run}")), false, true)?;
        diffs.push(Duration::from_micros(info.paused_us));
        parent_diffs.push(snapshot_json(&info));
    }
    let hibernate_dir = scratch.join("hibernated");
    let started = Instant::now();
    let hibernated = vm.snapshot(&hibernate_dir, true, false)?;
    vm.child.wait()?;
    let hibernate_ms = ms(started.elapsed());

    let hibernated_screenshot = hibernated_screenshots(&hibernate_dir, &scratch, options.runs)?;
    let restore = restores(&hibernate_dir, &scratch, options.runs)?;
    let blob = scratch.join("dirty.bin");
    dirty_blob(&blob, dirty_mib)?;
    let qemu = qemu::side(size_mib, &blob, &scratch, options.runs)?;
    let firecracker = match &options.firecracker {
        Some(binary) => firecracker::side(binary, size_mib, &blob, &scratch, options.runs)
            .unwrap_or_else(|err| json!({ "error": format!("{err:#}") })),
        None => json!("not measured: no --firecracker PATH given"),
    };
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(json!({
        "size_mib": size_mib,
        "dirty_mib": dirty_mib,
        "disk_o_direct_write_mb_s": disk,
        "full_snapshot": {
            "snapshot": snapshot_json(&full),
            "memory_write_mb_s": write_mb_s,
            "fraction_of_disk_speed": median_of("fraction_of_disk_speed"),
            "rounds": rounds,
        },
        "diff_snapshot_after_typing": {
            "paused": Summary::of(&diffs).map(|s| s.to_json_ms()),
            "each": parent_diffs,
        },
        "hibernate": { "request_to_process_end_ms": hibernate_ms, "snapshot": snapshot_json(&hibernated) },
        "screenshot_of_hibernated_vm_cli": hibernated_screenshot,
        "restore": restore,
        "qemu": qemu,
        "firecracker": firecracker,
    }))
}

fn main() -> anyhow::Result<()> {
    let options = options()?;
    if let Some(dir) = &options.snapshot {
        // Restores alone, of a snapshot made before: printed, not kept.
        let scratch = options.dir.join("restores");
        std::fs::create_dir_all(&scratch)?;
        let restores = restores(dir, &scratch, options.runs);
        let _ = std::fs::remove_dir_all(&scratch);
        println!("{}", serde_json::to_string_pretty(&restores?)?);
        return Ok(());
    }
    if !vmm().exists() || !desk_kernel().exists() {
        bail!("build first: cargo build --release -p carrel-vmm && scripts/build-guests.sh");
    }
    std::fs::create_dir_all(&options.dir)?;
    let mut sizes = Vec::new();
    for &size in &options.sizes {
        eprintln!("hibernate bench: {size} MiB guest");
        sizes.push(one_size(size, &options)?);
    }
    let path = report(
        "hibernate",
        json!({
            "targets": {
                "restore_to_first_instruction_median_ms": 5,
                "restore_to_screenshot_ms": 10,
                "diff_snapshot_ms": 20,
                "full_snapshot_fraction_of_disk_speed": 0.7,
                "hibernated_screenshot_ms": 15,
            },
            "sizes": sizes,
        }),
    )?;
    eprintln!("hibernate bench: results in {}", path.display());
    Ok(())
}

//! Helpers for integration tests that run the real `carrel-vmm` binary on real KVM.
//!
//! Tests wait on events (a console line, process exit), never on sleeps; the deadlines
//! here only turn a hang into a failure with the output so far.
//!
//! Two environment switches serve the nested test machine (scripts/nested-test.sh), where
//! these binaries run on hardware KVM inside an emulated CPU, without cargo:
//! - `CARREL_PREBUILT_GUESTS=1`: `guest()` uses the guests already in `target/guests/`
//!   instead of running scripts/build-guests.sh (which needs cargo);
//! - `CARREL_DEADLINE_SCALE=F`: every deadline here is multiplied by F (a number >= 1), so
//!   a hang still fails but an emulated machine's slowness does not.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root exists")
}

pub fn vmm_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_carrel-vmm"))
}

/// `deadline` multiplied by `CARREL_DEADLINE_SCALE` (unset, unparsable or below 1: 1).
pub fn scaled(deadline: Duration) -> Duration {
    static SCALE: OnceLock<f64> = OnceLock::new();
    let scale = *SCALE.get_or_init(|| {
        std::env::var("CARREL_DEADLINE_SCALE")
            .ok()
            .and_then(|value| value.parse::<f64>().ok())
            .filter(|scale| scale.is_finite() && *scale >= 1.0)
            .unwrap_or(1.0)
    });
    deadline.mul_f64(scale)
}

/// Builds the project's guests once per test binary and returns the path of `name`.
/// With `CARREL_PREBUILT_GUESTS=1` only checks that it was built.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let root = workspace_root();
    if std::env::var_os("CARREL_PREBUILT_GUESTS").is_some_and(|value| value == "1") {
        let path = root.join("target/guests").join(name);
        assert!(
            path.is_file(),
            "{} is missing and CARREL_PREBUILT_GUESTS=1 forbids building it: run scripts/build-guests.sh first",
            path.display()
        );
        return path;
    }
    let built = BUILT.get_or_init(|| {
        let status = Command::new("bash")
            .arg(root.join("scripts/build-guests.sh"))
            .status()
            .map_err(|err| format!("cannot run scripts/build-guests.sh: {err}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("scripts/build-guests.sh failed: {status}"))
        }
    });
    if let Err(message) = built {
        panic!("{message}");
    }
    root.join("target/guests").join(name)
}

/// Whether this machine's KVM is the paravirtual kvm_pvm.
pub fn on_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// A running `carrel-vmm` with its console lines arriving on a channel.
pub struct RunningVm {
    pub child: Child,
    lines: Receiver<String>,
    pub output: Vec<String>,
}

impl RunningVm {
    /// Boots the Desk kernel with `carrel-vmm run --kernel desk.elf` and `extra` flags.
    pub fn start_desk(extra: &[&str]) -> RunningVm {
        let kernel = guest("desk.elf");
        let mut args = vec!["run", "--kernel", kernel.to_str().expect("UTF-8 path")];
        args.extend_from_slice(extra);
        RunningVm::start(&args)
    }

    pub fn start(args: &[&str]) -> RunningVm {
        RunningVm::start_binary(&vmm_binary(), args)
    }

    /// Starts another of the project's programs (such as `carrel-gpu-backend`) the same way.
    pub fn start_binary(binary: &Path, args: &[&str]) -> RunningVm {
        let mut child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("{} starts: {err}", binary.display()));
        let (sender, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        for stream in [Box::new(stdout) as Box<dyn std::io::Read + Send>, Box::new(stderr)] {
            let sender = sender.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if sender.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        RunningVm { child, lines, output: Vec::new() }
    }

    /// Waits for a line containing `needle`; panics with everything seen at the deadline.
    pub fn wait_for_line(&mut self, needle: &str, deadline: Duration) -> String {
        let deadline = scaled(deadline);
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.output.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("no line with {needle:?} within {deadline:?}; output:\n{}", self.output.join("\n"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("carrel-vmm closed its output before {needle:?}; output:\n{}", self.output.join("\n"))
                }
            }
        }
    }

    /// Waits for the process to exit, collecting the rest of its output.
    pub fn wait_for_exit(&mut self, deadline: Duration) -> ExitStatus {
        let deadline = scaled(deadline);
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait works") {
                // Drain what the reader threads still hold.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.output.push(line);
                }
                return status;
            }
            match self.lines.recv_timeout(Duration::from_millis(20)) {
                Ok(line) => self.output.push(line),
                Err(_) if Instant::now() > end => {
                    let _ = self.child.kill();
                    panic!("carrel-vmm did not exit within {deadline:?}; output:\n{}", self.output.join("\n"));
                }
                Err(_) => {}
            }
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill({signal}) failed");
    }

    pub fn text(&self) -> String {
        self.output.join("\n")
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `carrel-vmm` to completion with `args`; returns (exit code, stdout + stderr).
pub fn run_to_exit(args: &[&str], deadline: Duration) -> (Option<i32>, String) {
    let mut vm = RunningVm::start(args);
    let status = vm.wait_for_exit(deadline);
    (status.code(), vm.text())
}

/// A unique scratch path (nothing is made there) in this test process's scratch directory.
pub fn scratch_path(name: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    scratch_root().join(format!("{n}-{name}"))
}

static SCRATCH_ROOT: OnceLock<PathBuf> = OnceLock::new();

/// `carrel-test-<pid>` under the system temp dir, made on first use and removed with
/// everything in it when the test process exits (snapshots of a few hundred MiB each
/// would otherwise pile up run after run).
fn scratch_root() -> &'static Path {
    SCRATCH_ROOT.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("carrel-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap_or_else(|err| panic!("cannot make {}: {err}", root.display()));
        extern "C" fn remove_scratch_root() {
            if let Some(root) = SCRATCH_ROOT.get() {
                let _ = std::fs::remove_dir_all(root);
            }
        }
        // SAFETY: `remove_scratch_root` is a plain function that takes no arguments and
        // does not unwind (remove_dir_all reports errors, which it ignores).
        unsafe { libc::atexit(remove_scratch_root) };
        root
    })
}

/// The `carrel-gpu-backend` binary beside `carrel-vmm`, brought up to date once per test
/// binary: it belongs to the carrel-gpu package, so Cargo builds it for that package's
/// tests only, not for these.
pub fn gpu_backend_binary() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let profile_dir = vmm_binary().parent().expect("carrel-vmm is in a profile directory").to_path_buf();
        let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(other) => other.to_string(),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace_root())
            .args(["build", "--quiet", "-p", "carrel-gpu", "--bin", "carrel-gpu-backend", "--profile", &profile])
            .status()
            .map_err(|err| format!("cannot run cargo to build carrel-gpu-backend: {err}"))?;
        if !status.success() {
            return Err(format!("building carrel-gpu-backend failed: {status}"));
        }
        Ok(profile_dir.join("carrel-gpu-backend"))
    });
    built.clone().unwrap_or_else(|message| panic!("{message}"))
}

/// Decodes a PNG into (width, height, RGB bytes).
pub fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    pixels.truncate(info.buffer_size());
    // Normalise to RGB.
    let channels = info.color_type.samples();
    let rgb = pixels.chunks_exact(channels).flat_map(|pixel| [pixel[0], pixel[1], pixel[2]]).collect();
    (info.width, info.height, rgb)
}

/// Whether (x, y) lies in `rect` = [x, y, width, height].
pub fn inside(rect: [u32; 4], x: u32, y: u32) -> bool {
    x >= rect[0] && x < rect[0] + rect[2] && y >= rect[1] && y < rect[1] + rect[3]
}

/// Pixels that differ between two RGB images, as (x, y).
pub fn differences(a: &[u8], b: &[u8], width: u32) -> Vec<(u32, u32)> {
    a.chunks_exact(3)
        .zip(b.chunks_exact(3))
        .enumerate()
        .filter(|(_, (pa, pb))| pa != pb)
        .map(|(index, _)| (index as u32 % width, index as u32 / width))
        .collect()
}

/// A PNG screenshot over the control socket after `wait`.
pub fn screenshot(socket: &Path, wait: carrel_vmm::control::Wait) -> carrel_vmm::control::Screenshot {
    screenshot_as(socket, carrel_vmm::control::ImageFormat::Png, wait)
}

/// A whole-screen screenshot in `format` (no crop, scale or cursor) after `wait`.
pub fn screenshot_as(
    socket: &Path,
    format: carrel_vmm::control::ImageFormat,
    wait: carrel_vmm::control::Wait,
) -> carrel_vmm::control::Screenshot {
    let request = carrel_vmm::control::ScreenshotRequest {
        format,
        crop: None,
        scale: None,
        cursor: false,
        wait,
        timeout_ms: 10_000,
    };
    match carrel_vmm::control::ControlClient::connect(socket)
        .unwrap()
        .call(&carrel_vmm::control::Request::Screenshot(request), Duration::from_secs(20))
        .unwrap()
    {
        carrel_vmm::control::Response::Screenshot(shot) => shot,
        other => panic!("expected a screenshot, got {other:?}"),
    }
}

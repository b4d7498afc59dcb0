//! Firecracker's side of the hibernation bench: its snapshot create/load API on a guest
//! of the same size holding the same non-zero bytes as the Desk guest.
//!
//! The guest is `pvh-idle.elf` (PVH entry: it says `OK` on COM1 and halts) with the
//! dirty bytes as its initrd, so RAM holds as many non-zero bytes as the Desk guest's
//! after `fill`. Firecracker cannot run the Desk kernel (it boots Linux or PVH images,
//! not Carrel's BootInfo), and on `kvm_pvm` its guests run emulated (shared/PLATFORM.md);
//! a halted guest makes that moot for what is timed here: the snapshot files and the
//! restore into a fresh process.
//!
//! Measured, each through the API on its Unix socket (HTTP/1.1, one request per
//! connection): a full snapshot (`PUT /snapshot/create` with the VM paused; Firecracker
//! fsyncs its files itself, and the fsync after it is timed to show there is nothing
//! left to write); diff
//! snapshots with KVM dirty-page tracking on (`track_dirty_pages`) after the guest ran
//! again, idle; and restores into a new process, from spawn until `PUT /snapshot/load`
//! with `resume_vm` has answered (the vCPUs are running then), memory from the file
//! (`backend_type: File`, a private mapping: pages load on first touch).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use carrel_perf::workspace_root;
use serde_json::{json, Value};

use super::{connect_until_accepted, drop_caches, ms, settle_writeback, summary_ms, warm_page_cache, DEADLINE};

/// A Firecracker process and its API socket; killed when dropped.
struct Firecracker {
    child: Child,
    api: PathBuf,
    started: Instant,
    console: mpsc::Receiver<String>,
}

impl Firecracker {
    fn spawn(binary: &Path, api: &Path) -> anyhow::Result<Firecracker> {
        let _ = std::fs::remove_file(api);
        let started = Instant::now();
        let mut child = Command::new(binary)
            .arg("--api-sock")
            .arg(api)
            .args(["--level", "Warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (sender, console) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        Ok(Firecracker { child, api: api.to_path_buf(), started, console })
    }

    /// `method path` with a JSON body; fails unless Firecracker answers 2xx.
    fn call(&self, method: &str, path: &str, body: Value) -> anyhow::Result<()> {
        let (status, answer) = self.request(method, path, &body.to_string())?;
        if !(200..300).contains(&status) {
            bail!("Firecracker {method} {path}: HTTP {status}: {answer}");
        }
        Ok(())
    }

    /// One HTTP/1.1 request on a fresh connection: the status code and body of the answer.
    /// Just enough of HTTP for Firecracker's API: bodies sized by Content-Length.
    fn request(&self, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
        let mut stream = connect_until_accepted(&self.api, "Firecracker's API socket")?;
        stream.set_read_timeout(Some(DEADLINE))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line)?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("not an HTTP answer from Firecracker: {status_line:?}"))?;
        let mut length = 0;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                bail!("Firecracker closed the connection inside the headers of {method} {path}");
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().context("Content-Length")?;
                }
            }
        }
        let mut answer = vec![0; length];
        reader.read_exact(&mut answer)?;
        Ok((status, String::from_utf8_lossy(&answer).into_owned()))
    }

    /// Waits for a console line holding `needle`.
    fn until_console(&self, needle: &str) -> anyhow::Result<()> {
        let end = Instant::now() + DEADLINE;
        loop {
            let line = self
                .console
                .recv_timeout(end.saturating_duration_since(Instant::now()))
                .with_context(|| format!("no {needle:?} on Firecracker's console"))?;
            if line.contains(needle) {
                return Ok(());
            }
        }
    }

    fn pause(&self) -> anyhow::Result<()> {
        self.call("PATCH", "/vm", json!({ "state": "Paused" }))
    }

    fn resume(&self) -> anyhow::Result<()> {
        self.call("PATCH", "/vm", json!({ "state": "Resumed" }))
    }

    /// `PUT /snapshot/create` of `kind` ("Full" or "Diff") into `dir`: the request's time.
    fn snapshot(&self, kind: &str, dir: &Path) -> anyhow::Result<Duration> {
        std::fs::create_dir_all(dir)?;
        let started = Instant::now();
        self.call(
            "PUT",
            "/snapshot/create",
            json!({
                "snapshot_type": kind,
                "snapshot_path": dir.join("vmstate"),
                "mem_file_path": dir.join("memory"),
            }),
        )?;
        Ok(started.elapsed())
    }
}

impl Drop for Firecracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.api);
    }
}

/// A snapshot's files: the memory file's apparent and allocated size, the state file's.
fn files_json(dir: &Path) -> anyhow::Result<Value> {
    let memory = std::fs::metadata(dir.join("memory"))?;
    let state = std::fs::metadata(dir.join("vmstate"))?;
    Ok(json!({
        "memory_file_bytes": memory.len(),
        "memory_file_allocated_bytes": memory.blocks() * 512,
        "state_file_bytes": state.len(),
    }))
}

/// The version line `binary --version` prints.
fn version(binary: &Path) -> anyhow::Result<String> {
    let output = Command::new(binary).arg("--version").output().with_context(|| format!("{}", binary.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

/// Firecracker at `binary` with a `size_mib` guest whose RAM holds `blob`: snapshots and
/// restores, `runs` of each.
pub fn side(binary: &Path, size_mib: u64, blob: &Path, scratch: &Path, runs: usize) -> anyhow::Result<Value> {
    let kernel = workspace_root().join("target/guests/pvh-idle.elf");
    anyhow::ensure!(kernel.exists(), "{} is missing: run scripts/build-guests.sh", kernel.display());
    let version = version(binary)?;
    let api = scratch.join("firecracker.sock");
    let source = Firecracker::spawn(binary, &api)?;
    source.call(
        "PUT",
        "/boot-source",
        json!({ "kernel_image_path": kernel, "initrd_path": blob, "boot_args": "console=ttyS0" }),
    )?;
    source.call(
        "PUT",
        "/machine-config",
        json!({ "vcpu_count": 1, "mem_size_mib": size_mib, "track_dirty_pages": true }),
    )?;
    source.call("PUT", "/actions", json!({ "action_type": "InstanceStart" }))?;
    source.until_console("OK")?;

    source.pause()?;
    let full_dir = scratch.join("firecracker-full");
    let full = source.snapshot("Full", &full_dir)?;
    let synced_at = Instant::now();
    std::fs::File::open(full_dir.join("memory"))?.sync_all()?;
    let fsync = synced_at.elapsed();
    let full_files = files_json(&full_dir)?;

    let mut diffs = Vec::new();
    let mut diff_files = Vec::new();
    for run in 0..runs {
        source.resume()?;
        std::thread::sleep(Duration::from_millis(10));
        source.pause()?;
        let dir = scratch.join(format!("firecracker-diff-{run}"));
        diffs.push(source.snapshot("Diff", &dir)?);
        diff_files.push(files_json(&dir)?);
        std::fs::remove_dir_all(&dir)?;
    }
    drop(source);

    settle_writeback();
    let mut restores = serde_json::Map::new();
    let cold_possible = drop_caches();
    for cold in [false, true] {
        if cold && !cold_possible {
            continue;
        }
        let mut samples = Vec::new();
        for _ in 0..runs {
            if cold {
                drop_caches();
            } else {
                warm_page_cache(&[&full_dir])?;
            }
            let target = Firecracker::spawn(binary, &api)?;
            target.call(
                "PUT",
                "/snapshot/load",
                json!({
                    "snapshot_path": full_dir.join("vmstate"),
                    "mem_backend": { "backend_type": "File", "backend_path": full_dir.join("memory") },
                    "resume_vm": true,
                }),
            )?;
            samples.push(target.started.elapsed());
        }
        let name = if cold { "file_backend_cold" } else { "file_backend_warm" };
        restores.insert(name.into(), summary_ms(&samples));
    }
    if !cold_possible {
        restores.insert("cold".into(), json!("not measured: /proc/sys/vm/drop_caches is not writable"));
    }
    std::fs::remove_dir_all(&full_dir)?;
    Ok(json!({
        "version": version,
        "machine": "Firecracker, 1 vCPU, the PVH image pvh-idle.elf halted, the dirty bytes as its initrd",
        "full_snapshot": { "create_ms": ms(full), "fsync_after_ms": ms(fsync), "files": full_files },
        "diff_snapshot_idle_guest": {
            "create": summary_ms(&diffs),
            "each": diff_files,
        },
        "restore_spawn_to_resumed": restores,
    }))
}

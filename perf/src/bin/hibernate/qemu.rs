//! QEMU's side of the hibernation bench: migration to a file and an incoming restore of
//! a machine whose RAM holds the same number of non-zero bytes as the Desk guest's.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::{connect_until_accepted, ms, settle_writeback, summary_ms, warm_page_cache};

/// A minimal QMP client: one command at a time, events skipped.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> anyhow::Result<Qmp> {
        let stream = connect_until_accepted(path, "QMP socket")?;
        let mut qmp = Qmp { reader: BufReader::new(stream.try_clone()?), writer: stream };
        let mut greeting = String::new();
        qmp.reader.read_line(&mut greeting)?;
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        writeln!(self.writer, "{}", json!({ "execute": command, "arguments": arguments }))?;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("QEMU closed QMP during {command}");
            }
            let reply: Value = serde_json::from_str(&line)?;
            if let Some(result) = reply.get("return") {
                return Ok(result.clone());
            }
            if let Some(error) = reply.get("error") {
                bail!("QMP {command}: {error}");
            }
        }
    }
}

fn qemu(size_mib: u64, qmp: &Path, extra: &[String]) -> anyhow::Result<Child> {
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args(["-accel", "tcg", "-machine", "pc", "-nodefaults", "-display", "none", "-S", "-m"])
        .arg(format!("{size_mib}M"))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command.spawn().context("spawning qemu-system-x86_64 (scripts/provision-host.sh installs it)")
}

/// QEMU with the bytes of `blob` in RAM: migrate to a file, then restore.
pub fn side(size_mib: u64, blob: &Path, scratch: &Path, runs: usize) -> anyhow::Result<Value> {
    let image = scratch.join("qemu.mig");
    let qmp_path = scratch.join("qemu.qmp");
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&qmp_path);
    let loader = format!("loader,file={},addr=0x100000,force-raw=on", blob.display());
    let mut source = qemu(size_mib, &qmp_path, &["-device".into(), loader.clone()])?;
    let mut qmp = Qmp::connect(&qmp_path)?;
    qmp.execute("migrate-set-parameters", json!({ "max-bandwidth": 100u64 << 30 }))?;
    let started = Instant::now();
    qmp.execute("migrate", json!({ "uri": format!("exec:cat > {}", image.display()) }))?;
    let total_ms = loop {
        let status = qmp.execute("query-migrate", json!({}))?;
        match status.get("status").and_then(Value::as_str) {
            Some("completed") => break status.get("total-time").and_then(Value::as_f64),
            Some("failed") => bail!("QEMU migration failed: {status}"),
            _ => std::thread::sleep(Duration::from_micros(500)),
        }
    };
    let migrated = started.elapsed();
    let _ = qmp.execute("quit", json!({}));
    source.wait()?;
    let synced_at = Instant::now();
    std::fs::OpenOptions::new().write(true).open(&image)?.sync_all()?;
    let fsync = synced_at.elapsed();
    let file_bytes = std::fs::metadata(&image)?.len();

    settle_writeback();
    let mut restores = Vec::new();
    for _ in 0..runs {
        warm_page_cache(&[&image])?;
        let _ = std::fs::remove_file(&qmp_path);
        let started = Instant::now();
        let mut target = qemu(size_mib, &qmp_path, &["-incoming".into(), format!("exec:cat {}", image.display())])?;
        let mut qmp = Qmp::connect(&qmp_path)?;
        loop {
            let status = qmp.execute("query-status", json!({}))?;
            if status.get("status").and_then(Value::as_str) != Some("inmigrate") {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        restores.push(started.elapsed());
        let _ = qmp.execute("quit", json!({}));
        target.wait()?;
    }
    let _ = std::fs::remove_file(&image);
    Ok(json!({
        "machine": "qemu-system-x86_64 -accel tcg -machine pc -S (the guest never runs; its RAM holds the same number of non-zero bytes)",
        "migrate_to_file_ms": ms(migrated),
        "qemu_total_time_ms": total_ms,
        "fsync_after_ms": ms(fsync),
        "file_bytes": file_bytes,
        "incoming_restore": summary_ms(&restores),
    }))
}

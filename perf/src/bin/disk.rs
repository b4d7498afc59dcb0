//! The disk from inside the Desk guest next to the host's own limit, in one run.
//!
//! A scratch raw image (filled with data, so reads are of real blocks) is measured first
//! on the host with this bench's own io_uring loop, buffered like carrel-vmm's I/O, and
//! then from inside a Desk VM that has it as its second disk, by the agent's `diskbench`
//! built-in: sequential read and write MB/s, 4 KiB random read and write IOPS at queue
//! depth 1 and 32, the same patterns on both sides. Needs
//! `cargo build --release -p carrel-vmm` and `scripts/build-guests.sh`.
//! `--mib N` scratch size (default 256), `--dir DIR` where the images live (default
//! target/bench-disk), `--runs N` guest runs (default 3; the medians of both sides are reported; each run
//! refills the image first, since diskbench discards its region when done).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use carrel_agent_client::{connect_vsock_uds, Client, ExecRequest};
use carrel_perf::{desk_kernel, report, start_vm, workspace_root};
use io_uring::{opcode, types, IoUring};
use serde_json::{json, Map, Value};

/// Sequential requests: size and how many are in flight (the guest's diskbench uses the same).
const SEQ_REQUEST: usize = 128 * 1024;
const SEQ_DEPTH: usize = 8;
/// Random requests: 4 KiB each, for this long per measurement (as the guest's phases).
const RANDOM_REQUEST: usize = 4096;
const RANDOM_PHASE: Duration = Duration::from_secs(1);

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|arg| arg == name).and_then(|index| args.get(index + 1).cloned())
}

/// What one measurement does.
#[derive(Debug, Clone, Copy)]
struct Pattern {
    size: usize,
    depth: usize,
    ops: usize,
    phase: Option<Duration>,
    random: bool,
    write: bool,
}

/// One host pattern: `ops` requests of `size` bytes (or as many as fit in `phase`),
/// `depth` in flight, at offsets in order or from a fixed pseudo-random sequence; writes
/// end with an fdatasync inside the timing, as the guest's flush does. Returns the
/// requests done, the time they took and the part of it the fdatasync took.
fn host_pattern(file: &File, bytes: u64, pattern: Pattern) -> anyhow::Result<(usize, Duration, Duration)> {
    let Pattern { size, depth, ops, phase, random, write } = pattern;
    let mut ring = IoUring::new(64)?;
    let blocks = bytes / size as u64;
    let mut buffers: Vec<Vec<u8>> = (0..depth).map(|i| vec![(i as u8) ^ 0x5a; size]).collect();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = 0u64;
    let mut offset = || {
        let block = if random {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % blocks
        } else {
            let block = next % blocks;
            next += 1;
            block
        };
        block * size as u64
    };
    let started = Instant::now();
    let (mut submitted, mut completed) = (0usize, 0usize);
    let mut ops = ops;
    let fd = types::Fd(file.as_raw_fd());
    let push = |ring: &mut IoUring, slot: usize, buffer: &mut Vec<u8>, at: u64| -> anyhow::Result<()> {
        let entry = if write {
            opcode::Write::new(fd, buffer.as_ptr(), size as u32).offset(at).build()
        } else {
            opcode::Read::new(fd, buffer.as_mut_ptr(), size as u32).offset(at).build()
        };
        // SAFETY: the buffer lives in `buffers` until its completion is reaped below.
        unsafe { ring.submission().push(&entry.user_data(slot as u64)) }.map_err(|_| anyhow::anyhow!("ring full"))?;
        Ok(())
    };
    for (slot, buffer) in buffers.iter_mut().enumerate().take(depth.min(ops)) {
        push(&mut ring, slot, buffer, offset())?;
        submitted += 1;
    }
    while completed < ops {
        ring.submit_and_wait(1)?;
        let done: Vec<_> = ring.completion().map(|entry| (entry.user_data() as usize, entry.result())).collect();
        for (slot, result) in done {
            if result != size as i32 {
                bail!("host {} returned {result}", if write { "write" } else { "read" });
            }
            completed += 1;
            if phase.is_some_and(|phase| started.elapsed() >= phase) {
                ops = submitted;
            }
            if submitted < ops {
                push(&mut ring, slot, &mut buffers[slot], offset())?;
                submitted += 1;
            }
        }
    }
    let flush_started = Instant::now();
    if write {
        file.sync_data()?;
    }
    Ok((completed, started.elapsed(), flush_started.elapsed()))
}

/// The host's numbers with the same keys as the guest's diskbench.
fn host_limits(file: &File, bytes: u64) -> anyhow::Result<Map<String, Value>> {
    let mut results = Map::new();
    let mbps = |(_, elapsed, _): (usize, Duration, Duration)| bytes as f64 / elapsed.as_secs_f64() / 1e6;
    let iops = |(done, elapsed, _): (usize, Duration, Duration)| done as f64 / elapsed.as_secs_f64();
    let flush_ms = |(_, _, flush): (usize, Duration, Duration)| flush.as_secs_f64() * 1e3;
    let seq_ops = (bytes / SEQ_REQUEST as u64) as usize;
    let seq = |write| {
        let pattern = Pattern { size: SEQ_REQUEST, depth: SEQ_DEPTH, ops: seq_ops, phase: None, random: false, write };
        host_pattern(file, bytes, pattern)
    };
    let seq_write = seq(true)?;
    results.insert("seq_write_mbps".into(), json!(mbps(seq_write)));
    results.insert("flush_ms_seq_write".into(), json!(flush_ms(seq_write)));
    results.insert("seq_read_mbps".into(), json!(mbps(seq(false)?)));
    for depth in [1, 32] {
        let random = |write| {
            let phase = Some(RANDOM_PHASE);
            host_pattern(
                file,
                bytes,
                Pattern { size: RANDOM_REQUEST, depth, ops: usize::MAX, phase, random: true, write },
            )
        };
        results.insert(format!("rand_read_iops_qd{depth}"), json!(iops(random(false)?)));
        let write = random(true)?;
        results.insert(format!("rand_write_iops_qd{depth}"), json!(iops(write)));
        results.insert(format!("flush_ms_rand_write_qd{depth}"), json!(flush_ms(write)));
    }
    Ok(results)
}

/// Parses the diskbench output: one `name value` line per measurement.
fn parse_guest(output: &str) -> Map<String, Value> {
    output
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(' ')?;
            Some((name.to_string(), json!(value.trim().parse::<f64>().ok()?)))
        })
        .collect()
}

/// Writes `mib` MiB of data over the whole image and syncs it, so every block is
/// allocated and holds data (no holes left by an earlier run's discard).
fn fill(path: &std::path::Path, mib: u64) -> anyhow::Result<()> {
    let file = OpenOptions::new().create(true).write(true).truncate(true).open(path)?;
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    for _ in 0..mib {
        std::io::Write::write_all(&mut &file, &chunk)?;
    }
    file.sync_all()?;
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = arg(&args, "--mib").map_or(Ok(256), |text| text.parse())?;
    let runs: usize = arg(&args, "--runs").map_or(Ok(3), |text| text.parse())?;
    let dir = arg(&args, "--dir").map_or_else(|| workspace_root().join("target/bench-disk"), PathBuf::from);
    std::fs::create_dir_all(&dir)?;
    let bytes = mib << 20;
    let scratch = dir.join("scratch.raw");
    let store = dir.join("store.layer");
    let vsock = std::env::temp_dir().join(format!("carrel-bench-disk-{}.sock", std::process::id()));
    let kernel = desk_kernel();
    let store_disk = format!("{},size=64M", store.display());
    let scratch_disk = scratch.display().to_string();
    // Each run starts from the same image on both sides: filled with data and synced,
    // then the host's patterns, then filled again and the guest's.
    let mut host_runs = Vec::new();
    let mut guest_runs = Vec::new();
    for _ in 0..runs {
        fill(&scratch, mib)?;
        let host_file = OpenOptions::new().read(true).write(true).open(&scratch)?;
        host_runs.push(host_limits(&host_file, bytes)?);
        drop(host_file);

        fill(&scratch, mib)?;
        let _ = std::fs::remove_file(&store);
        // The first disk holds the agent's file store; the second is the scratch image.
        let vm_args = [
            "--no-display".as_ref(),
            "--mem".as_ref(),
            "256".as_ref(),
            "--kernel".as_ref(),
            kernel.as_os_str(),
            "--vsock".as_ref(),
            vsock.as_os_str(),
            "--disk".as_ref(),
            store_disk.as_ref(),
            "--disk".as_ref(),
            scratch_disk.as_ref(),
        ];
        let mut child = start_vm(&vm_args, "agent listening")?;
        let stream = connect_vsock_uds(&vsock, carrel_agent_proto::AGENT_VSOCK_PORT)?;
        stream.set_read_timeout(Some(Duration::from_secs(300)))?;
        let mut client = Client::new(stream);
        client.wait_ready(Duration::from_secs(10))?;
        let mut output = Vec::new();
        let mut request = ExecRequest::new(["diskbench".to_string(), "1".to_string(), mib.to_string()]);
        request.timeout = Some(Duration::from_secs(300));
        let status = client.exec(request, |_, bytes| output.extend_from_slice(bytes))?;
        let text = String::from_utf8_lossy(&output).into_owned();
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&vsock);
        if !status.success() {
            bail!("diskbench failed: {status:?}: {text}");
        }
        guest_runs.push(parse_guest(&text));
    }
    let _ = std::fs::remove_file(&store);

    let mut host = Map::new();
    let mut guest = Map::new();
    let mut ratio = Map::new();
    for name in host_runs[0].keys() {
        let mut limits: Vec<f64> = host_runs.iter().filter_map(|run| run.get(name)?.as_f64()).collect();
        let mut values: Vec<f64> = guest_runs.iter().filter_map(|run| run.get(name)?.as_f64()).collect();
        if values.is_empty() {
            bail!("diskbench printed no {name}: {guest_runs:?}");
        }
        let (limit, value) = (median(&mut limits), median(&mut values));
        host.insert(name.clone(), json!(limit));
        guest.insert(name.clone(), json!(value));
        ratio.insert(name.clone(), json!(value / limit));
    }
    report(
        "disk",
        json!({
            "platform": if std::path::Path::new("/sys/module/kvm_pvm").exists() { "pvm" } else { "hardware" },
            "scratch_mib": mib,
            "filesystem_dir": dir,
            "patterns": {
                "sequential": { "request_bytes": SEQ_REQUEST, "in_flight": SEQ_DEPTH },
                "random": { "request_bytes": RANDOM_REQUEST, "phase_s": RANDOM_PHASE.as_secs_f64(), "queue_depths": [1, 32] },
                "io": "buffered (page cache) on both sides; writes end with one flush / fdatasync inside the timing (flush_ms_*: how long it took)",
            },
            "runs": runs,
            "host": host,
            "guest": guest,
            "host_runs": host_runs,
            "guest_runs": guest_runs,
            "guest_over_host": ratio,
            "targets": { "sequential_ratio": 0.8, "random_qd32_ratio": 0.6 }
        }),
    )?;
    Ok(())
}

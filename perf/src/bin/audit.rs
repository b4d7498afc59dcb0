//! Audit log benchmark: append throughput with a durability point every millisecond,
//! concurrent durable appends (group commit), bytes per event, inclusion and consistency
//! proof time at the base size and a large size, and offline verify time at the base size.
//!
//! `cargo run -p carrel-perf --bin audit --release -- [--entries N] [--large N]
//!  [--samples N] [--dir PATH] [--keep]`; defaults: 1M entries, 10M large (0 skips it),
//! 10000 proof samples, a fresh directory under the temp dir (removed unless --keep).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use carrel_audit::tree;
use carrel_audit::{verify_dir, Actor, AuditLog, NewEvent, Outcome, VerifyOptions};
use carrel_perf::{report, Summary};
use serde_json::{json, Value};

struct Options {
    entries: u64,
    large: u64,
    samples: usize,
    dir: PathBuf,
    keep: bool,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        entries: 1_000_000,
        large: 10_000_000,
        samples: 10_000,
        dir: std::env::temp_dir().join(format!("carrel-perf-audit-{}", std::process::id())),
        keep: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--entries" => options.entries = value()?.parse()?,
            "--large" => options.large = value()?.parse()?,
            "--samples" => options.samples = value()?.parse()?,
            "--dir" => options.dir = PathBuf::from(value()?),
            "--keep" => options.keep = true,
            other => {
                bail!("unknown argument {other}; see the doc comment of perf/src/bin/audit.rs")
            }
        }
    }
    if options.entries == 0 {
        bail!("--entries must be at least 1");
    }
    Ok(options)
}

/// xorshift64*: cheap randomness for sample positions, seeded from the kernel.
struct Random(u64);

impl Random {
    fn new() -> Random {
        let mut seed = [0u8; 8];
        if let Ok(mut file) = std::fs::File::open("/dev/urandom") {
            let _ = std::io::Read::read_exact(&mut file, &mut seed);
        }
        Random(u64::from_le_bytes(seed) | 1)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound.max(1)
    }
}

/// Distinct screenshots the events name (stored once each, as deduplication would).
const SCREENSHOTS: u64 = 16;

fn screenshot(i: u64) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\nbenchmark screen ".to_vec();
    bytes.extend_from_slice(&(i % SCREENSHOTS).to_le_bytes());
    bytes
}

/// A typical event: a click with its coordinates and the screenshots around it.
fn event(i: u64) -> NewEvent {
    let before = *blake3::hash(&screenshot(i)).as_bytes();
    let after = *blake3::hash(&screenshot(i + 1)).as_bytes();
    NewEvent::new("input.click")
        .actor(Actor { pid: 4242, uid: 1000, gid: 1000 })
        .param("x", (i % 1920).to_string())
        .param("y", (i % 1080).to_string())
        .outcome(Outcome::Ok)
        .screenshots(Some(before), Some(after))
}

/// Appends events `from..to` with a durability point every millisecond; returns appends
/// per second and the number of durability points.
fn append_with_1ms_sync(log: &AuditLog, from: u64, to: u64) -> anyhow::Result<(f64, u64)> {
    let commits_before = log.commits();
    let start = Instant::now();
    let mut last_sync = Instant::now();
    for i in from..to {
        log.append_buffered(event(i))?;
        if i % 32 == 0 && last_sync.elapsed() >= Duration::from_millis(1) {
            log.sync()?;
            last_sync = Instant::now();
        }
    }
    log.sync()?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(((to - from) as f64 / seconds, log.commits() - commits_before))
}

/// Several threads each calling the durable `append` in a loop.
fn concurrent_durable_appends(log: &AuditLog, threads: u64, per_thread: u64) -> anyhow::Result<Value> {
    let commits_before = log.commits();
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let mut latencies = Vec::with_capacity(per_thread as usize);
                for i in 0..per_thread {
                    let begun = Instant::now();
                    log.append(event(t * per_thread + i))?;
                    latencies.push(begun.elapsed());
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for handle in handles {
        latencies.extend(handle.join().map_err(|_| anyhow::anyhow!("appender panicked"))??);
    }
    let seconds = start.elapsed().as_secs_f64();
    let total = threads * per_thread;
    Ok(json!({
        "threads": threads,
        "appends": total,
        "appends_per_second": total as f64 / seconds,
        "fsyncs": log.commits() - commits_before,
        "append_latency": Summary::of(&latencies).map(|s| s.to_json_us()),
    }))
}

/// Proof generation (and client-side verification) times at the log's current size.
fn proof_times(log: &AuditLog, samples: usize, random: &mut Random) -> anyhow::Result<Value> {
    let size = log.size();
    let root = log.root(size)?;
    let mut inclusion = Vec::with_capacity(samples);
    let mut inclusion_verify = Vec::with_capacity(samples);
    let mut consistency = Vec::with_capacity(samples);
    let mut consistency_verify = Vec::with_capacity(samples);
    let mut inclusion_len = 0usize;
    let mut consistency_len = 0usize;
    for _ in 0..samples {
        let index = random.below(size);
        let begun = Instant::now();
        let proof = log.inclusion_proof(index, size)?;
        inclusion.push(begun.elapsed());
        inclusion_len = inclusion_len.max(proof.len());
        let leaf = log.leaf_hash(index)?;
        let begun = Instant::now();
        tree::verify_inclusion(&leaf, index, size, &proof, &root)?;
        inclusion_verify.push(begun.elapsed());

        let old = 1 + random.below(size);
        let old_root = log.root(old)?;
        let begun = Instant::now();
        let proof = log.consistency_proof(old, size)?;
        consistency.push(begun.elapsed());
        consistency_len = consistency_len.max(proof.len());
        let begun = Instant::now();
        tree::verify_consistency(old, size, &old_root, &root, &proof)?;
        consistency_verify.push(begun.elapsed());
    }
    let begun = Instant::now();
    log.root(size)?;
    let root_time = begun.elapsed();
    Ok(json!({
        "tree_size": size,
        "inclusion_proof": Summary::of(&inclusion).map(|s| s.to_json_us()),
        "inclusion_verify": Summary::of(&inclusion_verify).map(|s| s.to_json_us()),
        "inclusion_hashes_max": inclusion_len,
        "consistency_proof": Summary::of(&consistency).map(|s| s.to_json_us()),
        "consistency_verify": Summary::of(&consistency_verify).map(|s| s.to_json_us()),
        "consistency_hashes_max": consistency_len,
        "root_us": root_time.as_secs_f64() * 1e6,
    }))
}

fn bytes_per_event(log: &AuditLog) -> Value {
    let (segments, tree) = log.stored_bytes();
    let size = log.size().max(1) as f64;
    json!({
        "records": segments as f64 / size,
        "tree": tree as f64 / size,
        "total": (segments + tree) as f64 / size,
    })
}

fn main() -> anyhow::Result<()> {
    let options = parse_options()?;
    let mut random = Random::new();
    let _ = std::fs::remove_dir_all(&options.dir);
    let log_dir = options.dir.join("log");
    let log = AuditLog::open(&log_dir, "bench-vm")?;
    for i in 0..SCREENSHOTS {
        log.put_blob(&screenshot(i))?;
    }

    eprintln!("appending {} events with a durability point every 1 ms", options.entries);
    let (rate, syncs) = append_with_1ms_sync(&log, 0, options.entries)?;
    let mut results = json!({
        "entries": options.entries,
        "append_1ms_durability": {
            "appends_per_second": rate,
            "durability_points": syncs,
        },
        "bytes_per_event": bytes_per_event(&log),
    });

    eprintln!("proofs at {}", options.entries);
    results["proofs_base"] = proof_times(&log, options.samples, &mut random)?;

    let begun = Instant::now();
    let checkpoint = log.checkpoint()?;
    results["checkpoint_ms"] = json!(begun.elapsed().as_secs_f64() * 1e3);

    // Verify reads a cold copy in real use; here the page cache is warm, as after a copy.
    eprintln!("verifying {} records", options.entries);
    let begun = Instant::now();
    let report = verify_dir(&log_dir, &VerifyOptions::default())?;
    let verify_time = begun.elapsed();
    if !report.ok() || report.records != checkpoint.checkpoint.tree_size {
        bail!("verify failed on the benchmark log:\n{}", report.lines(Some(20)).join("\n"));
    }
    results["verify"] = json!({
        "records": report.records,
        "seconds": verify_time.as_secs_f64(),
        "records_per_second": report.records as f64 / verify_time.as_secs_f64(),
    });

    eprintln!("concurrent durable appends");
    results["append_durable_4_threads"] = concurrent_durable_appends(&log, 4, 2_000)?;

    if options.large > log.size() {
        let from = log.size();
        eprintln!("growing the log to {} events", options.large);
        let (rate, syncs) = append_with_1ms_sync(&log, from, options.large)?;
        results["append_1ms_durability_to_large"] = json!({
            "appends_per_second": rate,
            "durability_points": syncs,
        });
        eprintln!("proofs at {}", options.large);
        results["proofs_large"] = proof_times(&log, options.samples, &mut random)?;
        results["bytes_per_event_large"] = bytes_per_event(&log);
    }
    drop(log);
    if !options.keep {
        std::fs::remove_dir_all(&options.dir).ok();
    }
    let path = report_results(results)?;
    eprintln!("saved {}", path.display());
    Ok(())
}

fn report_results(results: Value) -> anyhow::Result<PathBuf> {
    report("audit", results)
}

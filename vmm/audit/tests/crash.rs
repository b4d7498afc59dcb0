//! Crash tests: a writer process is SIGKILLed at random points while it appends; after
//! recovery every event it acknowledged is in the log with its content, and the log
//! verifies.
//!
//! The writer is this test binary itself, started with `--ignored --exact
//! crash_child_writer_process` and the log directory in an environment variable. It appends
//! from three threads (two through `append`, one in buffered batches closed by `sync`),
//! takes checkpoints now and then, rotates segments often (small segment size), and prints
//! `ack SEQ TOKEN` after each durability point. A kill loses nothing the kernel already
//! has, so every other iteration also damages the unsynced tail the way a power cut could
//! (cut at a random point past the durable records, maybe followed by garbage).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use carrel_audit::checkpoint::latest_checkpoint;
use carrel_audit::reader::for_each_event;
use carrel_audit::segment::{list_segments, HEADER_LEN};
use carrel_audit::{verify_dir, AuditConfig, AuditLog, NewEvent, VerifyOptions};
use common::{random_u64, TempDir};

const CHILD_DIR_ENV: &str = "CARREL_AUDIT_CRASH_CHILD_DIR";
const ITERATIONS: u64 = 24;
const SEGMENT_BYTES: u64 = 16 << 10;
/// The child stops by itself after this long if nobody kills it.
const CHILD_LIFETIME: Duration = Duration::from_secs(20);

fn config() -> AuditConfig {
    AuditConfig { segment_bytes: SEGMENT_BYTES, ..AuditConfig::new("vm-crash") }
}

fn print_ack(seq: u64, token: &str) {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // One short write per line: a pipe write under PIPE_BUF is atomic, so a kill never
    // leaves half an acknowledgement.
    let line = format!("ack {seq} {token}\n");
    out.write_all(line.as_bytes()).unwrap();
    out.flush().unwrap();
}

#[test]
#[ignore = "the writer process of crash_kill_during_appends_loses_no_acknowledged_event, run only by it"]
fn crash_child_writer_process() {
    let dir = std::env::var(CHILD_DIR_ENV).expect("run by the crash test, which sets the directory");
    let log = AuditLog::open_with(Path::new(&dir), config()).unwrap();
    let generation = log.size();
    let started = Instant::now();
    let appenders: Vec<_> = (0..2)
        .map(|thread| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut counter = 0u64;
                while started.elapsed() < CHILD_LIFETIME {
                    let token = format!("g{generation}-t{thread}-{counter}");
                    let seq =
                        log.append(NewEvent::new("input.click").param("n", token.as_str()).param("x", "10")).unwrap();
                    print_ack(seq, &token);
                    counter += 1;
                }
            })
        })
        .collect();
    let mut counter = 0u64;
    while started.elapsed() < CHILD_LIFETIME {
        let batch = 1 + random_u64() % 20;
        let mut pending = Vec::new();
        for _ in 0..batch {
            let token = format!("g{generation}-b-{counter}");
            let seq = log.append_buffered(NewEvent::new("input.type").param("n", token.as_str())).unwrap();
            pending.push((seq, token));
            counter += 1;
        }
        log.sync().unwrap();
        for (seq, token) in pending {
            print_ack(seq, &token);
        }
        if counter % 100 < batch {
            log.checkpoint().unwrap();
        }
    }
    for appender in appenders {
        appender.join().unwrap();
    }
}

/// Starts the writer, kills it at a random point, returns the acknowledgements it printed.
fn run_and_kill(dir: &Path, wait_for_first_ack: bool) -> Vec<(u64, String)> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child_writer_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut parts = line.split(' ');
            if parts.next() != Some("ack") {
                continue;
            }
            let (Some(seq), Some(token)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(seq) = seq.parse::<u64>() else {
                continue;
            };
            if lines_tx.send((seq, token.to_string())).is_err() {
                break;
            }
        }
    });
    let mut acks = Vec::new();
    if wait_for_first_ack {
        let first = lines_rx.recv_timeout(Duration::from_secs(30)).expect("the writer acknowledged nothing in 30 s");
        acks.push(first);
        std::thread::sleep(Duration::from_micros(random_u64() % 15_000));
    } else {
        // Anywhere from process start through open and recovery into the first appends.
        std::thread::sleep(Duration::from_micros(random_u64() % 40_000));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    acks.extend(lines_rx.try_iter());
    acks
}

/// What a power cut adds to a kill: writes after the last durability point may be lost or
/// half-written. Cuts the last segment at a random offset past every record that must
/// survive (acknowledged, checkpointed or marked durable), and may append garbage.
fn damage_unsynced_tail(log_dir: &Path, acknowledged: &BTreeMap<u64, String>) {
    let checkpointed = latest_checkpoint(&log_dir.join("checkpoints")).unwrap().map_or(0, |c| c.checkpoint.tree_size);
    let marked: u64 = std::fs::read_to_string(log_dir.join("tree").join("durable"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0);
    let acked = acknowledged.last_key_value().map_or(0, |(&seq, _)| seq + 1);
    let floor = checkpointed.max(marked).max(acked);
    let Some((first, segment)) = list_segments(&log_dir.join("log")).unwrap().pop() else {
        return;
    };
    let mut bytes = std::fs::read(&segment).unwrap();
    let frames = common::frame_ranges(&bytes);
    let keep = floor.saturating_sub(first).min(frames.len() as u64) as usize;
    let earliest = if keep == 0 { HEADER_LEN } else { frames[keep - 1].1 };
    if earliest > bytes.len() {
        return;
    }
    let cut = earliest + (random_u64() % (bytes.len() - earliest + 1) as u64) as usize;
    bytes.truncate(cut);
    if random_u64() % 2 == 0 {
        let garbage = 1 + random_u64() % 100;
        bytes.extend((0..garbage).map(|_| random_u64() as u8));
    }
    std::fs::write(&segment, &bytes).unwrap();
}

#[test]
fn crash_kill_during_appends_loses_no_acknowledged_event() {
    let dir = TempDir::new("crash");
    let log_dir = dir.join("log");
    let mut acknowledged: BTreeMap<u64, String> = BTreeMap::new();
    let mut cut_tails = 0;
    for iteration in 0..ITERATIONS {
        let acks = run_and_kill(&log_dir, iteration % 3 != 2);
        for (seq, token) in acks {
            if let Some(previous) = acknowledged.insert(seq, token.clone()) {
                panic!("sequence {seq} acknowledged twice: {previous} and {token}");
            }
        }
        if !log_dir.join("log").exists() {
            continue; // killed before the log was created
        }
        if iteration % 2 == 1 {
            damage_unsynced_tail(&log_dir, &acknowledged);
        }
        // Recovery, then every acknowledged event must be there with its content.
        let log = AuditLog::open_with(&log_dir, config())
            .unwrap_or_else(|e| panic!("iteration {iteration}: recovery failed: {}", carrel_audit::error_chain(&e)));
        cut_tails += usize::from(log.recovery().cut_tail.is_some());
        let size = log.size();
        drop(log);
        if let Some((&last, _)) = acknowledged.last_key_value() {
            assert!(last < size, "iteration {iteration}: event {last} acknowledged, log has {size}");
        }
        let mut found = 0;
        for_each_event(&log_dir.join("log"), 0, |event, _| {
            if let Some(token) = acknowledged.get(&event.seq) {
                let recorded = event.params.iter().find(|p| p.key == "n").map(|p| p.value.as_str());
                assert_eq!(recorded, Some(token.as_str()), "event {} content", event.seq);
                found += 1;
            }
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(found, acknowledged.len(), "iteration {iteration}: acknowledged events missing");
        let report = verify_dir(&log_dir, &VerifyOptions::default()).unwrap();
        assert!(report.ok(), "iteration {iteration}:\n{}", report.lines(None).join("\n"));
    }
    assert!(acknowledged.len() > 100, "only {} events acknowledged", acknowledged.len());
    eprintln!("{ITERATIONS} kills, {} acknowledged events kept, {cut_tails} torn tails cut", acknowledged.len());
}

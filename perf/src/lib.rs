//! Shared pieces of Carrel's benchmarks: timing statistics and the JSON report.
//!
//! Every benchmark prints one JSON object on stdout and writes the same object to
//! `perf/results/<bench>-<git revision>.json`, so runs can be compared revision against
//! revision. Benchmarks measure; they never fail on a number.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

/// The current git revision (`git describe --always --dirty`), or "unknown" outside git.
pub fn git_revision() -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Summary statistics of a set of timings.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub count: usize,
    pub median: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub min: Duration,
    pub max: Duration,
}

impl Summary {
    /// Summarises `samples`; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let rank = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        Some(Summary {
            count: sorted.len(),
            median: rank(0.5),
            p90: rank(0.9),
            p99: rank(0.99),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        })
    }

    /// The summary as JSON, in milliseconds.
    pub fn to_json_ms(&self) -> Value {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        json!({
            "count": self.count,
            "median_ms": ms(self.median),
            "p90_ms": ms(self.p90),
            "p99_ms": ms(self.p99),
            "min_ms": ms(self.min),
            "max_ms": ms(self.max),
        })
    }

    /// The summary as JSON, in microseconds.
    pub fn to_json_us(&self) -> Value {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        json!({
            "count": self.count,
            "median_us": us(self.median),
            "p90_us": us(self.p90),
            "p99_us": us(self.p99),
            "min_us": us(self.min),
            "max_us": us(self.max),
        })
    }
}

/// Adds the bench name, git revision and time to `results`, prints it and saves it under
/// `perf/results/`. Returns the path written.
///
/// A bench that runs where the checkout is read-only (the nested test machine of
/// scripts/nested-test.sh) is told the revision in `CARREL_PERF_REVISION` and where to
/// write in `CARREL_PERF_OUT`; the harness moves the file into `perf/results/`.
pub fn report(bench: &str, mut results: Value) -> anyhow::Result<PathBuf> {
    let revision = std::env::var("CARREL_PERF_REVISION").unwrap_or_else(|_| git_revision());
    let unix_time =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if let Value::Object(map) = &mut results {
        map.insert("bench".into(), json!(bench));
        map.insert("git_revision".into(), json!(revision));
        map.insert("unix_time".into(), json!(unix_time));
        map.insert("host".into(), host_facts());
    }
    let text = serde_json::to_string_pretty(&results)?;
    println!("{text}");
    if let Some(path) = std::env::var_os("CARREL_PERF_OUT").map(PathBuf::from) {
        std::fs::write(&path, text + "\n")?;
        return Ok(path);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{bench}-{revision}.json"));
    std::fs::write(&path, text + "\n")?;
    Ok(path)
}

/// What about the machine moves the numbers: its kernel, CPU count, and the scheduler
/// knob some hosts' guest kernels carry (`kernel.sched_vcpu_pack`: woken and new threads
/// are kept on the busy CPU rather than waking an idle one, so a thread a process starts
/// may run only once its parent blocks).
fn host_facts() -> Value {
    let read = |path: &str| std::fs::read_to_string(path).ok().map(|text| text.trim().to_string());
    json!({
        "kernel": read("/proc/sys/kernel/osrelease"),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "sched_vcpu_pack": read("/proc/sys/kernel/sched_vcpu_pack"),
    })
}

/// The workspace root (the directory holding the root Cargo.toml).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}

/// Starts the release `carrel-vmm` with `args` and waits for a console line containing
/// `ready`; the rest of its output is drained in the background. Needs
/// `cargo build --release -p carrel-vmm` and `scripts/build-guests.sh`.
pub fn start_vm(args: &[&std::ffi::OsStr], ready: &str) -> anyhow::Result<std::process::Child> {
    use std::io::BufRead;
    let root = workspace_root();
    let vmm = root.join("target/release/carrel-vmm");
    if !vmm.exists() || !root.join("target/guests/desk.elf").exists() {
        anyhow::bail!("build first: cargo build --release -p carrel-vmm && scripts/build-guests.sh");
    }
    let mut child = Command::new(&vmm)
        .arg("run")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(line) => {
                if line?.contains(ready) {
                    break;
                }
            }
            None => anyhow::bail!("the VM ended before printing {ready:?}"),
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Ok(child)
}

/// A `/proc/PID/status` field in KiB (0 when the process is gone).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|line| line.starts_with(field))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// User plus system CPU ticks of every thread of `pid` so far (dead ones too).
pub fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// `pid` and every process under it: a jailed VMM is the child of the process its
/// supervisor started, which waits for it outside its PID namespace.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut tree = vec![pid];
    let mut index = 0;
    while index < tree.len() {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", tree[index])).unwrap_or_default();
        tree.extend(children.split_whitespace().filter_map(|child| child.parse::<u32>().ok()));
        index += 1;
    }
    tree
}

/// The Desk kernel built by `scripts/build-guests.sh`.
pub fn desk_kernel() -> PathBuf {
    workspace_root().join("target/guests/desk.elf")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_ten_samples_picks_ranks() {
        let samples: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        let summary = Summary::of(&samples).unwrap();
        assert_eq!(summary.min, Duration::from_millis(1));
        assert_eq!(summary.max, Duration::from_millis(10));
        assert_eq!(summary.median, Duration::from_millis(6));
        assert_eq!(summary.p90, Duration::from_millis(9));
    }

    #[test]
    fn summary_of_nothing_is_none() {
        assert!(Summary::of(&[]).is_none());
    }
}

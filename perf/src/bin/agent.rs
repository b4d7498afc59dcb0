//! Guest agent benchmark, on the host over a Unix socket: ping round trip, exec of `echo`
//! round trip, and put/get throughput of a file with blake3 checks on both ends.
//!
//! The Linux agent runs in this process (service mode: it only waits for its own children)
//! on a Unix socket in a temporary directory; the client is `carrel-agent-client`, as the
//! control plane will use it. Inside a VM the transport is vsock instead; the protocol and
//! both ends are the same code.
//!
//! `cargo run --release -p carrel-perf --bin agent -- [--pings N] [--execs N] [--size-mib N] [--runs N]`

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use carrel_agent_client::{connect_unix_ready, ExecRequest};
use carrel_guest_agent::{listen, Agent, AgentConfig};
use carrel_perf::{report, Summary};
use serde_json::json;

struct Options {
    pings: usize,
    execs: usize,
    size_mib: usize,
    runs: usize,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options { pings: 20_000, execs: 300, size_mib: 256, runs: 3 };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value: usize = args.next().with_context(|| format!("{flag} needs a value"))?.parse()?;
        match flag.as_str() {
            "--pings" => options.pings = value,
            "--execs" => options.execs = value,
            "--size-mib" => options.size_mib = value,
            "--runs" => options.runs = value.max(1),
            _ => bail!("unknown argument {flag}; see the module doc for usage"),
        }
    }
    Ok(options)
}

/// A file of pseudo-random bytes (xorshift), so hashing does real work.
fn write_random_file(path: &Path, size: usize) -> anyhow::Result<()> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let take = left.min(block.len());
        file.write_all(&block[..take])?;
        left -= take;
    }
    file.flush()?;
    Ok(())
}

fn mib_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Removes the benchmark's scratch directory however the run ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() -> anyhow::Result<()> {
    let options = parse_options()?;
    let scratch = Scratch(std::env::temp_dir().join(format!("carrel-perf-agent-{}", std::process::id())));
    let root = scratch.0.join("root");
    std::fs::create_dir_all(&root)?;
    let socket = scratch.0.join("agent.sock");

    let config = AgentConfig { unix: Some(socket.clone()), root: Some(root.clone()), ..AgentConfig::default() };
    let agent = Agent::new(&config)?;
    let listener = listen::bind_unix(&socket)?;
    std::thread::spawn(move || agent.serve_unix(&listener));
    let mut client = connect_unix_ready(&socket, Duration::from_secs(10))?;
    let hello = client.hello()?;

    for _ in 0..1000 {
        client.ping()?;
    }
    let pings: Vec<Duration> = (0..options.pings).map(|_| client.ping()).collect::<Result<_, _>>()?;

    let echo = || ExecRequest::new(["echo", "carrel"]);
    for _ in 0..10 {
        client.exec(echo(), |_, _| {})?;
    }
    let mut execs = Vec::with_capacity(options.execs);
    for _ in 0..options.execs {
        let start = Instant::now();
        let mut output = Vec::new();
        let status = client.exec(echo(), |_, bytes| output.extend_from_slice(bytes))?;
        execs.push(start.elapsed());
        if !status.success() || output != b"carrel\n" {
            bail!("echo returned {status:?} with output {output:?}");
        }
    }

    let size = options.size_mib * 1024 * 1024;
    let source = scratch.0.join("source.bin");
    write_random_file(&source, size)?;
    let copy = scratch.0.join("copy.bin");
    let (mut puts, mut gets) = (Vec::new(), Vec::new());
    for _ in 0..options.runs {
        let start = Instant::now();
        client.put_file(&source, "/bench.bin", |_, _| {})?;
        puts.push(mib_per_s(size, start.elapsed()));
        let start = Instant::now();
        client.get_file("/bench.bin", &copy, |_, _| {})?;
        gets.push(mib_per_s(size, start.elapsed()));
        std::fs::remove_file(&copy)?;
        client.remove("/bench.bin", false)?;
    }

    let ping = Summary::of(&pings).context("no ping samples")?;
    let exec = Summary::of(&execs).context("no exec samples")?;
    let results = json!({
        "transport": "unix socket, agent in process",
        "agent": hello.name,
        "os": hello.os,
        "ping_round_trip": ping.to_json_us(),
        "exec_echo_round_trip": exec.to_json_ms(),
        "file_mib": options.size_mib,
        "put_mib_per_s": { "runs": puts.clone(), "median": median(&mut puts) },
        "get_mib_per_s": { "runs": gets.clone(), "median": median(&mut gets) },
        "note": "put and get include blake3 on both ends and the agent's file write/read (temp dir)",
    });
    report("agent", results)?;
    Ok(())
}

//! The guest agent in the Desk kernel over virtio-vsock: ping round trip, exec round trip,
//! put and get throughput, through the host client library on the VM's vsock socket.
//! Needs `cargo build --release -p carrel-vmm` and `scripts/build-guests.sh`.
//! `--pings N` (default 1000), `--mib N` file size (default 64).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use carrel_agent_client::{connect_vsock_uds, Client, ExecRequest};
use carrel_perf::{desk_kernel, report, start_vm, Summary};
use serde_json::json;

fn arg(args: &[String], name: &str, default: usize) -> anyhow::Result<usize> {
    match args.iter().position(|arg| arg == name) {
        Some(index) => Ok(args.get(index + 1).context("flag needs a number")?.parse()?),
        None => Ok(default),
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let pings = arg(&args, "--pings", 1000)?;
    let mib = arg(&args, "--mib", 64)?;
    let vsock = std::env::temp_dir().join(format!("carrel-bench-agent-{}.sock", std::process::id()));
    let memory = (mib * 4 + 256).to_string();
    let kernel = desk_kernel();
    let args = [
        "--no-display".as_ref(),
        "--mem".as_ref(),
        memory.as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--vsock".as_ref(),
        vsock.as_os_str(),
    ];
    let mut child = start_vm(&args, "agent listening")?;

    let stream = connect_vsock_uds(&vsock, carrel_agent_proto::AGENT_VSOCK_PORT)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut client = Client::new(stream);
    client.wait_ready(Duration::from_secs(10))?;

    let mut ping_samples = Vec::with_capacity(pings);
    for _ in 0..pings {
        ping_samples.push(client.ping()?);
    }
    let mut exec_samples = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let status = client.exec(ExecRequest::new(["echo", "hi"]), |_, _| {})?;
        if !status.success() {
            bail!("echo failed: {status:?}");
        }
        exec_samples.push(started.elapsed());
    }

    let dir = std::env::temp_dir().join(format!("carrel-bench-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let local = dir.join("put.bin");
    let data: Vec<u8> = (0..(mib << 20) as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    std::fs::write(&local, &data)?;
    let started = Instant::now();
    client.put_file(&local, "/bench.bin", |_, _| {})?;
    let put = started.elapsed();
    let back = dir.join("get.bin");
    let started = Instant::now();
    client.get_file("/bench.bin", &back, |_, _| {})?;
    let get = started.elapsed();
    if blake3::hash(&std::fs::read(&back)?) != blake3::hash(&data) {
        bail!("the file came back different");
    }
    std::fs::remove_dir_all(&dir)?;
    let _ = child.kill();
    let _ = child.wait();

    let rate = |elapsed: Duration| (mib << 20) as f64 / elapsed.as_secs_f64() / 1e6;
    report(
        "desk_agent",
        json!({
            "platform": if std::path::Path::new("/sys/module/kvm_pvm").exists() { "pvm" } else { "hardware" },
            "ping_round_trip": Summary::of(&ping_samples).map(|s| s.to_json_us()),
            "exec_echo_round_trip": Summary::of(&exec_samples).map(|s| s.to_json_us()),
            "file_mib": mib,
            "put_mb_per_s": rate(put),
            "get_mb_per_s": rate(get),
            "targets": { "ping_median_us": 300, "put_get_mb_per_s": 200 }
        }),
    )?;
    Ok(())
}

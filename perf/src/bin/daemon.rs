//! carreld: a trivial RPC's latency next to a per-VM control socket call, Create to
//! `desk: ready` through the daemon, and a VMM's crash to its VM running again.
//! Needs `cargo build --release -p carrel-vmm -p carrel-daemon` and
//! `scripts/build-guests.sh`. `--runs N` (default 10), `--calls N` (default 2000),
//! `--density N` (default 100): that many 128 MiB Desk VMs at once, their host memory
//! (RSS of every VMM) and their idle CPU over 5 s.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use carrel_api::v1;
use carrel_perf::{cpu_ticks, desk_kernel, process_tree, report, status_kib, workspace_root, Summary};
use carrel_vmm::control::{ControlClient, Request};
use serde_json::json;

fn arg(args: &[String], name: &str, default: usize) -> anyhow::Result<usize> {
    match args.iter().position(|arg| arg == name) {
        Some(index) => Ok(args.get(index + 1).context("flag needs a number")?.parse()?),
        None => Ok(default),
    }
}

async fn wait_for_line(path: &Path, needle: &str, deadline: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + deadline;
    loop {
        if std::fs::read_to_string(path).map(|text| text.contains(needle)).unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("no {needle:?} in {} within {deadline:?}", path.display());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runs = arg(&args, "--runs", 10)?;
    let calls = arg(&args, "--calls", 2000)?;
    let density = arg(&args, "--density", 100)?;
    let release = workspace_root().join("target/release");
    let (carreld, vmm) = (release.join("carreld"), release.join("carrel-vmm"));
    if !carreld.exists() || !vmm.exists() {
        bail!("build first: cargo build --release -p carrel-vmm -p carrel-daemon && scripts/build-guests.sh");
    }
    let dir = std::env::temp_dir().join(format!("carrel-bench-daemon-{}", std::process::id()));
    let (socket, state) = (dir.join("carrel.sock"), dir.join("state"));
    std::fs::create_dir_all(&dir)?;
    let mut daemon = std::process::Command::new(&carreld)
        .args(["--socket", socket.to_str().unwrap(), "--state", state.to_str().unwrap()])
        .args(["--vmm", vmm.to_str().unwrap(), "--kernel", desk_kernel().to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()?;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let channel = carrel_api::connect(&socket).await?;
    let mut host = v1::host_client::HostClient::new(channel.clone());
    let mut vms = v1::vms_client::VmsClient::new(channel.clone());

    // Create to `desk: ready`, each VM deleted after.
    let mut create_to_ready = Vec::new();
    let mut create_rpc = Vec::new();
    for run in 0..runs {
        let name = format!("bench-{run}");
        let started = Instant::now();
        vms.create(v1::CreateVmRequest { name: name.clone(), config: None, ..Default::default() }).await?;
        create_rpc.push(started.elapsed());
        wait_for_line(&state.join("vms").join(&name).join("console.log"), "desk: ready", Duration::from_secs(30))
            .await?;
        create_to_ready.push(started.elapsed());
        if run + 1 < runs {
            vms.delete(v1::VmName { name }).await?;
        }
    }
    let kept = format!("bench-{}", runs - 1);

    // A trivial RPC, next to the same kind of call on the VM's own control socket.
    let mut rpc = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        host.info(v1::HostInfoRequest {}).await?;
        rpc.push(started.elapsed());
    }
    let control_socket = state.join("vms").join(&kept).join("control.sock");
    let per_vm = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Duration>> {
        let mut client = ControlClient::connect(&control_socket)?;
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            let started = Instant::now();
            client.call(&Request::Status, Duration::from_secs(5))?;
            samples.push(started.elapsed());
        }
        Ok(samples)
    })
    .await??;

    // kill -9 the VMM; time until carreld has it running again.
    let mut crash_to_running = Vec::new();
    for _ in 0..runs {
        let before = vms.get(v1::GetVmRequest { name: kept.clone() }).await?.into_inner();
        let killed = Instant::now();
        // SAFETY: kill(2) on the VMM this benchmark's daemon started.
        unsafe { libc::kill(before.pid as i32, libc::SIGKILL) };
        loop {
            let vm = vms.get(v1::GetVmRequest { name: kept.clone() }).await?.into_inner();
            if vm.state == v1::VmState::Running as i32 && vm.pid != before.pid {
                crash_to_running.push(killed.elapsed());
                break;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                bail!("{kept} did not come back: {vm:?}");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        // The restart policy counts failures in a row: a start by request resets it.
        vms.stop(v1::VmName { name: kept.clone() }).await?;
        vms.start(v1::VmName { name: kept.clone() }).await?;
    }
    vms.delete(v1::VmName { name: kept }).await?;

    // Density: N Desk VMs at once, each booted to `desk: ready`.
    let mut pids = Vec::new();
    let mut refused = None;
    for index in 0..density {
        let name = format!("dense-{index}");
        match vms.create(v1::CreateVmRequest { name: name.clone(), config: None, ..Default::default() }).await {
            Ok(vm) => {
                pids.push(vm.into_inner().pid);
                wait_for_line(
                    &state.join("vms").join(&name).join("console.log"),
                    "desk: ready",
                    Duration::from_secs(60),
                )
                .await?;
            }
            Err(status) => {
                refused = Some(format!("VM {index}: {status}"));
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Each VM's processes: the jailed VMM runs under the one carreld started.
    let tree: Vec<u32> = pids.iter().flat_map(|pid| process_tree(*pid)).collect();
    let rss_kib: u64 = tree.iter().map(|pid| status_kib(*pid, "VmRSS:")).sum();
    let cpu_before: u64 = tree.iter().map(|pid| cpu_ticks(*pid)).sum();
    let idle = Duration::from_secs(5);
    tokio::time::sleep(idle).await;
    let cpu_after: u64 = tree.iter().map(|pid| cpu_ticks(*pid)).sum();
    // SAFETY: sysconf only reads configuration.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let idle_cores = cpu_after.saturating_sub(cpu_before) as f64 / ticks_per_s / idle.as_secs_f64();
    let running = pids.len();
    for index in 0..running {
        vms.delete(v1::VmName { name: format!("dense-{index}") }).await?;
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let _: PathBuf = dir;

    report(
        "daemon",
        json!({
            "platform": if Path::new("/sys/module/kvm_pvm").exists() { "pvm" } else { "hardware" },
            "host_info_rpc": Summary::of(&rpc).map(|s| s.to_json_us()),
            "per_vm_socket_status": Summary::of(&per_vm).map(|s| s.to_json_us()),
            "create_rpc": Summary::of(&create_rpc).map(|s| s.to_json_ms()),
            "create_to_desk_ready": Summary::of(&create_to_ready).map(|s| s.to_json_ms()),
            "crash_to_running_again": Summary::of(&crash_to_running).map(|s| s.to_json_ms()),
            "targets": { "rpc_median_us": 200, "create_to_ready_ms": 40, "crash_to_running_ms": 1000 },
            "density": {
                "asked": density,
                "running_at_once": running,
                "refused": refused,
                "guest_memory_mib_each": 128,
                "host_rss_mib_total": rss_kib as f64 / 1024.0,
                "host_rss_mib_each": rss_kib as f64 / 1024.0 / running.max(1) as f64,
                "idle_cpu_cores_total": idle_cores,
                "idle_cpu_percent_of_a_core_each": idle_cores * 100.0 / running.max(1) as f64,
            },
            "density_target_vms": 100
        }),
    )?;
    Ok(())
}

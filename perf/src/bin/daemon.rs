//! carreld: a trivial RPC's latency next to a per-VM control socket call, Create to
//! `desk: ready` through the daemon, and a VMM's crash to its VM running again.
//! Needs `cargo build --release -p carrel-vmm -p carrel-daemon` and
//! `scripts/build-guests.sh`. `--runs N` (default 10), `--calls N` (default 2000),
//! `--density N` (default 100): that many 128 MiB Desk VMs at once, their host memory
//! (RSS of every VMM) and their idle CPU over 5 s.
//!
//! A forwarded call, a small raw screenshot, is timed through carreld next to the same
//! request on the VM's own socket: the difference is what the daemon adds. With
//! `--baseline-carreld PATH` (an older build), a second daemon with a VM of its own is
//! timed in the same run, its blocks of calls taking turns with this build's, so both see
//! the same machine; `--baseline-vmm PATH` gives it an older carrel-vmm too.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use carrel_api::v1;
use carrel_perf::{cpu_ticks, desk_kernel, process_tree, report, status_kib, workspace_root, Summary};
use carrel_vmm::control::{ControlClient, ImageFormat, Request, ScreenshotRequest, Wait};
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

/// A carreld of the bench's, on its own socket and state.
struct Daemon {
    child: std::process::Child,
    channel: tonic::transport::Channel,
    socket: PathBuf,
    state: PathBuf,
}

impl Drop for Daemon {
    /// A bench that stopped midway leaves no daemon or VMM behind (the VMMs outlive their
    /// daemon by design, so their pids are read from its registry).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for entry in std::fs::read_dir(self.state.join("vms")).into_iter().flatten().flatten() {
            let record = std::fs::read_to_string(entry.path().join("vm.json")).unwrap_or_default();
            let pid = serde_json::from_str::<serde_json::Value>(&record).ok().and_then(|record| record["pid"].as_u64());
            if let Some(pid) = pid {
                // SAFETY: kill(2) on a VMM this bench's daemon started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

async fn start_daemon(carreld: &Path, vmm: &Path, dir: &Path, extra: &[&str]) -> anyhow::Result<Daemon> {
    let (socket, state) = (dir.join("carrel.sock"), dir.join("state"));
    std::fs::create_dir_all(dir)?;
    let child = std::process::Command::new(carreld)
        .args(["--socket", socket.to_str().unwrap(), "--state", state.to_str().unwrap()])
        .args(["--vmm", vmm.to_str().unwrap(), "--kernel", desk_kernel().to_str().unwrap()])
        .args(extra)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let channel = carrel_api::connect(&socket).await?;
    Ok(Daemon { child, channel, socket, state })
}

/// A small raw screenshot: a forwarded call whose work in the VMM is slight.
const SMALL_SHOT: [u32; 2] = [64, 40];

fn small_screenshot(name: &str) -> v1::ScreenshotRequest {
    v1::ScreenshotRequest {
        name: name.into(),
        format: v1::ImageFormat::Raw as i32,
        scale_width: SMALL_SHOT[0],
        scale_height: SMALL_SHOT[1],
        ..Default::default()
    }
}

/// Times `blocks` × `per_block` calls of each daemon, their blocks taking turns.
async fn interleaved(
    daemons: &[&Daemon],
    blocks: usize,
    per_block: usize,
    name: &str,
    screenshot: bool,
) -> anyhow::Result<Vec<Vec<Duration>>> {
    let mut samples = vec![Vec::with_capacity(blocks * per_block); daemons.len()];
    for _ in 0..blocks {
        for (daemon, samples) in daemons.iter().zip(samples.iter_mut()) {
            let mut host = v1::host_client::HostClient::new(daemon.channel.clone());
            let mut screen = v1::screen_client::ScreenClient::new(daemon.channel.clone());
            for _ in 0..per_block {
                let started = Instant::now();
                if screenshot {
                    screen.screenshot(small_screenshot(name)).await?;
                } else {
                    host.info(v1::HostInfoRequest {}).await?;
                }
                samples.push(started.elapsed());
            }
        }
    }
    Ok(samples)
}

/// Host.Info as the `carrel` CLI calls it: from a current-thread runtime of its own
/// (the bench's other calls come from a two-worker runtime), each daemon's blocks
/// taking turns.
fn interleaved_on_one_thread(
    sockets: Vec<PathBuf>,
    blocks: usize,
    per_block: usize,
) -> anyhow::Result<Vec<Vec<Duration>>> {
    std::thread::spawn(move || -> anyhow::Result<Vec<Vec<Duration>>> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let mut clients = Vec::new();
            for socket in &sockets {
                clients.push(v1::host_client::HostClient::new(carrel_api::connect(socket).await?));
            }
            let mut samples = vec![Vec::with_capacity(blocks * per_block); clients.len()];
            for _ in 0..blocks {
                for (host, samples) in clients.iter_mut().zip(samples.iter_mut()) {
                    for _ in 0..per_block {
                        let started = Instant::now();
                        host.info(v1::HostInfoRequest {}).await?;
                        samples.push(started.elapsed());
                    }
                }
            }
            Ok::<_, anyhow::Error>(samples)
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the current-thread client panicked"))?
}

async fn wait_ready(daemon: &Daemon, name: &str) -> anyhow::Result<()> {
    let mut vms = v1::vms_client::VmsClient::new(daemon.channel.clone());
    vms.create(v1::CreateVmRequest { name: name.into(), config: None, ..Default::default() }).await?;
    wait_for_line(&daemon.state.join("vms").join(name).join("console.log"), "desk: ready", Duration::from_secs(30))
        .await
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
    let baseline_carreld = args
        .iter()
        .position(|arg| arg == "--baseline-carreld")
        .map(|index| args.get(index + 1).map(PathBuf::from).context("--baseline-carreld needs the path of a carreld"));
    let dir = std::env::temp_dir().join(format!("carrel-bench-daemon-{}", std::process::id()));
    let current = start_daemon(&carreld, &vmm, &dir, &[]).await?;
    let baseline_carreld = baseline_carreld.transpose()?;
    let baseline_vmm = match args.iter().position(|arg| arg == "--baseline-vmm") {
        Some(index) => {
            args.get(index + 1).map(PathBuf::from).context("--baseline-vmm needs the path of a carrel-vmm")?
        }
        None => vmm.clone(),
    };
    let baseline = match &baseline_carreld {
        // Its VMs' cgroups and jail uids apart from this build's.
        Some(path) => {
            let apart = ["--cgroup", "carrel-bench-baseline", "--jail-uids", "210000"];
            Some(start_daemon(path, &baseline_vmm, &dir.join("baseline"), &apart).await?)
        }
        None => None,
    };
    let state = current.state.clone();
    let channel = current.channel.clone();
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

    // A trivial RPC, next to the same kind of call on the VM's own control socket; a
    // forwarded call next to the same request on the VM's socket. The baseline daemon,
    // when there is one, takes turns block by block.
    let daemons: Vec<&Daemon> = std::iter::once(&current).chain(baseline.as_ref()).collect();
    if let Some(baseline) = &baseline {
        wait_ready(baseline, &kept).await?;
    }
    let (blocks, per_block) = (calls.div_ceil(100), calls.min(100));
    let mut rpc = interleaved(&daemons, blocks, per_block, &kept, false).await?;
    let sockets = daemons.iter().map(|daemon| daemon.socket.clone()).collect();
    let mut rpc_one_thread =
        tokio::task::spawn_blocking(move || interleaved_on_one_thread(sockets, blocks, per_block)).await??;
    let mut forwarded = interleaved(&daemons, blocks, per_block, &kept, true).await?;
    let control_socket = state.join("vms").join(&kept).join("control.sock");
    let (per_vm, per_vm_screenshot) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut client = ControlClient::connect(&control_socket)?;
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            let started = Instant::now();
            client.call(&Request::Status, Duration::from_secs(5))?;
            samples.push(started.elapsed());
        }
        let shot = Request::Screenshot(ScreenshotRequest {
            format: ImageFormat::Raw,
            crop: None,
            scale: Some(SMALL_SHOT),
            cursor: false,
            wait: Wait::FirstFrame,
            timeout_ms: 5_000,
        });
        let mut shots = Vec::with_capacity(calls);
        for _ in 0..calls {
            let started = Instant::now();
            client.call(&shot, Duration::from_secs(5))?;
            shots.push(started.elapsed());
        }
        Ok((samples, shots))
    })
    .await??;
    let baseline_json = baseline.as_ref().map(|_| {
        json!({
            "carreld": baseline_carreld.as_ref().map(|path| path.display().to_string()),
            "carrel_vmm": baseline_vmm.display().to_string(),
            "host_info_rpc": Summary::of(&rpc[1]).map(|s| s.to_json_us()),
            "host_info_rpc_current_thread_client": Summary::of(&rpc_one_thread[1]).map(|s| s.to_json_us()),
            "forwarded_screenshot_rpc": Summary::of(&forwarded[1]).map(|s| s.to_json_us()),
        })
    });
    let (rpc, forwarded) = (std::mem::take(&mut rpc[0]), std::mem::take(&mut forwarded[0]));
    let rpc_one_thread = std::mem::take(&mut rpc_one_thread[0]);

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
    if let Some(baseline) = &baseline {
        let mut vms = v1::vms_client::VmsClient::new(baseline.channel.clone());
        vms.delete(v1::VmName { name: format!("bench-{}", runs - 1) }).await?;
    }
    drop((current, baseline));
    let _ = std::fs::remove_dir_all(&dir);

    report(
        "daemon",
        json!({
            "platform": if Path::new("/sys/module/kvm_pvm").exists() { "pvm" } else { "hardware" },
            "host_info_rpc": Summary::of(&rpc).map(|s| s.to_json_us()),
            "host_info_rpc_current_thread_client": Summary::of(&rpc_one_thread).map(|s| s.to_json_us()),
            "per_vm_socket_status": Summary::of(&per_vm).map(|s| s.to_json_us()),
            "forwarded_screenshot_rpc": Summary::of(&forwarded).map(|s| s.to_json_us()),
            "per_vm_socket_screenshot": Summary::of(&per_vm_screenshot).map(|s| s.to_json_us()),
            "small_screenshot": format!("raw, scaled to {}x{}", SMALL_SHOT[0], SMALL_SHOT[1]),
            "baseline": baseline_json,
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

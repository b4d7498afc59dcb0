//! Isolation benchmark: what the jail and the seccomp filters cost.
//!
//! In one run, interleaved, N times each:
//! - process start to `desk: ready` with no filters (`--no-seccomp`), with the filters
//!   (the default), and jailed with the filters (`--jail DIR --uid U --gid G`);
//! - on one running VM of each kind, the hot control requests: a raw screenshot, a PNG
//!   screenshot, a pointer move (no wait), and an agent ping; M requests each.
//!
//! Needs root (the jail), `cargo build --release -p carrel-vmm` and
//! `scripts/build-guests.sh`. `--runs N` (default 20), `--requests M` (default 200),
//! `--guest-cmdline S` (e.g. `desk.tick=periodic`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use carrel_perf::{desk_kernel, report, workspace_root, Summary};
use carrel_vmm::control::{
    AgentRequest, ControlClient, ImageFormat, InputRequest, Request, Response, ScreenshotRequest, Wait,
};
use carrel_vmm::input::Action;
use serde_json::json;

/// The uid the jailed VMs run as.
const JAIL_UID: u32 = 64_100;
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
enum Confinement {
    None,
    Seccomp,
    JailAndSeccomp,
}

impl Confinement {
    const ALL: [Confinement; 3] = [Confinement::None, Confinement::Seccomp, Confinement::JailAndSeccomp];

    fn name(self) -> &'static str {
        match self {
            Confinement::None => "no_filters",
            Confinement::Seccomp => "seccomp",
            Confinement::JailAndSeccomp => "jail_and_seccomp",
        }
    }
}

/// A scratch directory owned by the jail's uid, with an empty jail root beside it.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> anyhow::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("carrel-isolation-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("vm"))?;
        std::os::unix::fs::chown(dir.join("vm"), Some(JAIL_UID), Some(JAIL_UID))?;
        Ok(Scratch { dir })
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("vm/control.sock")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn command(vmm: &Path, confinement: Confinement, scratch: &Scratch, cmdline: &str) -> Command {
    let mut command = Command::new(vmm);
    command
        .args(["run", "--mem", "128", "--kernel"])
        .arg(desk_kernel())
        .arg("--socket")
        .arg(scratch.socket())
        .arg("--vsock")
        .arg(scratch.dir.join("vm/vsock.sock"));
    if !cmdline.is_empty() {
        command.args(["--cmdline", cmdline]);
    }
    match confinement {
        Confinement::None => {
            command.arg("--no-seccomp");
        }
        Confinement::Seccomp => {}
        Confinement::JailAndSeccomp => {
            command.arg("--jail").arg(scratch.dir.join("root"));
            command.args(["--uid", &JAIL_UID.to_string(), "--gid", &JAIL_UID.to_string()]);
        }
    }
    command
}

/// Starts the VM and returns it with the time from spawn to `needle` on its console.
fn start(mut command: Command, needle: &str) -> anyhow::Result<(Child, Duration)> {
    command.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null());
    let started = Instant::now();
    let mut child = command.spawn().context("spawning the VMM")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    loop {
        match lines.next() {
            Some(line) => {
                if line?.contains(needle) {
                    break;
                }
            }
            None => bail!("the VM ended before {needle:?}"),
        }
    }
    let elapsed = started.elapsed();
    std::thread::spawn(move || for _ in lines {});
    Ok((child, elapsed))
}

fn stop(mut child: Child) {
    // SAFETY: SIGTERM to our own child; a jailed VMM's outer process passes it on.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// The hot requests, timed one by one on one connection.
fn requests(socket: &Path, count: usize) -> anyhow::Result<serde_json::Value> {
    let end = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        match ControlClient::connect(socket) {
            Ok(client) => break client,
            Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(5)),
            Err(err) => return Err(err.into()),
        }
    };
    let screenshot = |format| {
        Request::Screenshot(ScreenshotRequest {
            format,
            crop: None,
            scale: None,
            cursor: false,
            wait: Wait::FirstFrame,
            timeout_ms: 5_000,
        })
    };
    let pointer = |x| {
        Request::Input(InputRequest {
            action: Action::Move { x, y: 300 },
            wait: None,
            screenshot: None,
            timeout_ms: 5_000,
            hold_ms: None,
            gap_ms: None,
        })
    };
    // The agent listens a little after `desk: ready`.
    while !matches!(client.call(&Request::Agent(AgentRequest::Ping), CALL_TIMEOUT)?, Response::Agent(_)) {
        anyhow::ensure!(Instant::now() < end, "the agent never answered a ping");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut results = serde_json::Map::new();
    for (name, make) in [
        ("screenshot_raw", &(|_| screenshot(ImageFormat::Raw)) as &dyn Fn(usize) -> Request),
        ("screenshot_png", &|_| screenshot(ImageFormat::Png)),
        ("input_move", &|index| pointer(100 + (index % 400) as u32)),
        ("agent_ping", &|_| Request::Agent(AgentRequest::Ping)),
        // Served on the event loop thread: two thread wake-ups per request.
        ("status", &|_| Request::Status),
    ] {
        let mut samples = Vec::with_capacity(count);
        for index in 0..count {
            let request = make(index);
            let started = Instant::now();
            match client.call(&request, CALL_TIMEOUT)? {
                Response::Error(failure) => bail!("{name}: {failure:?}"),
                _ => samples.push(started.elapsed()),
            }
        }
        results.insert(name.into(), Summary::of(&samples).map(|s| s.to_json_us()).unwrap_or_default());
    }
    Ok(results.into())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let option = |flag: &str, default: usize| -> anyhow::Result<usize> {
        match args.iter().position(|arg| arg == flag) {
            Some(index) => Ok(args.get(index + 1).context("a number")?.parse()?),
            None => Ok(default),
        }
    };
    let (runs, count) = (option("--runs", 20)?, option("--requests", 200)?);
    // The guest's command line, e.g. `desk.tick=periodic` to compare with a busy guest.
    let cmdline = match args.iter().position(|arg| arg == "--guest-cmdline") {
        Some(index) => args.get(index + 1).context("--guest-cmdline needs a value")?.clone(),
        None => String::new(),
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the jailed runs need root");
    }
    let vmm = workspace_root().join("target/release/carrel-vmm");
    if !vmm.exists() || !desk_kernel().exists() {
        bail!("build first: cargo build --release -p carrel-vmm && scripts/build-guests.sh");
    }

    let mut starts: Vec<Vec<Duration>> = vec![Vec::new(); Confinement::ALL.len()];
    for _ in 0..runs {
        for (kind, confinement) in Confinement::ALL.into_iter().enumerate() {
            let scratch = Scratch::new(confinement.name())?;
            let (child, elapsed) = start(command(&vmm, confinement, &scratch, &cmdline), "desk: ready")?;
            starts[kind].push(elapsed);
            stop(child);
        }
    }
    let median = |samples: &[Duration]| Summary::of(samples).map(|s| s.median.as_secs_f64() * 1e3).unwrap_or(0.0);
    let mut start_results = serde_json::Map::new();
    for (kind, confinement) in Confinement::ALL.into_iter().enumerate() {
        start_results
            .insert(confinement.name().into(), Summary::of(&starts[kind]).map(|s| s.to_json_ms()).unwrap_or_default());
    }
    start_results.insert("jail_and_seccomp_added_ms_median".into(), json!(median(&starts[2]) - median(&starts[0])));

    let mut request_results = serde_json::Map::new();
    for confinement in Confinement::ALL {
        let scratch = Scratch::new(confinement.name())?;
        let (child, _) = start(command(&vmm, confinement, &scratch, &cmdline), "desk: ready")?;
        let measured = requests(&scratch.socket(), count);
        stop(child);
        request_results.insert(confinement.name().into(), measured?);
    }

    let path = report(
        "isolation",
        json!({
            "runs": runs,
            "requests_each": count,
            "guest_cmdline": cmdline,
            "start_to_desk_ready": start_results,
            "requests": request_results,
            "target": "jail and filters add < 3 ms to start; per-request cost of the filters on the hot paths",
        }),
    )?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

//! `carrel-vmm`: run a VM, or talk to a running VM's control socket.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use carrel_vmm::builder::{build_vm, MemoryLoad};
use carrel_vmm::config::VmConfig;
use carrel_vmm::control::{
    AgentExec, AgentRequest, AgentResponse, ControlClient, ImageFormat, InputRequest, Request, Response,
    ScreenshotRequest, SnapshotRequest, Wait,
};
use carrel_vmm::input::{Action, Button};
use carrel_vmm::vmm::{VmOutcome, Vmm};

const USAGE: &str = "usage:
  carrel-vmm run --kernel PATH [--initrd PATH] [--cmdline S] [--mem MiB] [--cpus N]
                 [--console-log PATH] [--no-console] [--socket PATH] [--boot auto|desk|linux|pvh]
                 [--no-rng] [--vsock PATH] [--cid N] [--disk PATH[,readonly][,base=RAW][,size=N]]...
                 [--audit DIR] [--name NAME] [--display WxH | --no-display]
                 [--gpu-backend VHOST.sock --gpu-screen SCREEN.sock]
                 [--jail DIR --uid U --gid G [--jail-writable DIR]...] [--no-seccomp]
  carrel-vmm run --config vm.toml [flags above override the file]
  carrel-vmm run --restore SNAPSHOT_DIR [--lazy|--eager] [--socket PATH] [--vsock PATH] [--cid N] [--name NAME]
                 [--audit DIR] [--console-log PATH] [--no-console] [--jail ... as above] [--no-seccomp]
  carrel-vmm snapshot --socket PATH --dir DIR [--diff]   (the VM goes on; --diff: only what
                 changed since its last snapshot or the one it was restored from)
  carrel-vmm hibernate --socket PATH --dir DIR [--diff]  (snapshot, then the VM process ends)
  carrel-vmm snapshot merge --dir DIFF --out DIR         (fold a diff chain into one full snapshot)
  carrel-vmm disk create PATH (--size N[K|M|G] | --base RAW)  (a new layer: empty, or over a raw base)
  carrel-vmm disk info PATH                              (size, layers, base, blocks written)
  carrel-vmm disk commit PATH [--out LAYER]              (fold PATH's chain of frozen layers into one
                 layer over the same base: in place, or into LAYER; the frozen layers stay)
  carrel-vmm status --socket PATH [--json]
  carrel-vmm stop --socket PATH
  carrel-vmm pause --socket PATH | resume --socket PATH
  carrel-vmm screenshot (--socket PATH | --snapshot DIR) -o FILE [--format png|qoi|raw] [--scale WxH]
                 [--crop x,y,w,h] [--cursor] [--after FRAME | --still MS] [--timeout S]
  carrel-vmm agent --socket PATH ping | ls PATH | rm PATH | put LOCAL REMOTE | get REMOTE LOCAL
  carrel-vmm agent --socket PATH exec [--timeout S] [--cwd DIR] [--env K=V]... -- CMD ARGS...
  carrel-vmm input --socket PATH [--wait frame|none|still:MS] [--timeout S] [--screenshot FILE]
                 [--hold MS] [--gap MS] ACTION
      ACTION: click X Y [--button left|right|middle] [--count N] | move X Y | down BUTTON
              | up BUTTON | drag X1 Y1 X2 Y2 [X Y]... | scroll X Y DX DY | type TEXT | key COMBO";

/// A usage error: exit code 2 with the usage text.
struct Usage(String);

fn main() -> ExitCode {
    let started = Instant::now();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => match take_process_options(&mut args) {
            Ok(options) if args.iter().any(|arg| arg == "--restore") => {
                parse_restore(&args[1..]).map(|(dir, overrides)| restore(&dir, &overrides, &options, started))
            }
            Ok(options) => parse_run(&args[1..]).map(|config| run(config, &options, started)),
            Err(usage) => Err(usage),
        },
        Some("snapshot") if args.get(1).map(String::as_str) == Some("merge") => {
            parse_merge(&args[2..]).map(|(dir, out)| merge(&dir, &out))
        }
        Some("snapshot") => parse_snapshot(&args[1..], false).map(|(socket, request)| snapshot(&socket, request)),
        Some("hibernate") => parse_snapshot(&args[1..], true).map(|(socket, request)| snapshot(&socket, request)),
        Some("disk") => disk_command(&args[1..]),
        Some("status") => parse_socket(&args[1..]).map(|(socket, json)| status(&socket, json)),
        Some("stop") => parse_socket(&args[1..]).map(|(socket, _)| stop(&socket)),
        Some("pause") => parse_socket(&args[1..]).map(|(socket, _)| simple(&socket, Request::Pause)),
        Some("resume") => parse_socket(&args[1..]).map(|(socket, _)| simple(&socket, Request::Resume)),
        Some("agent") => parse_agent(&args[1..]).map(|(socket, command)| agent(&socket, command)),
        Some("input") => {
            parse_input(&args[1..]).map(|(socket, output, request)| input(&socket, output.as_deref(), request))
        }
        Some("screenshot") => {
            parse_screenshot(&args[1..]).map(|(target, output, request)| screenshot(&target, &output, request))
        }
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(Usage(format!("unknown command {other:?}"))),
        None => Err(Usage("no command given".into())),
    };
    match result {
        Ok(Ok(code)) => code,
        Ok(Err(err)) => {
            eprintln!("carrel-vmm: error: {err}");
            ExitCode::FAILURE
        }
        Err(Usage(message)) => {
            eprintln!("carrel-vmm: {message}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn value<'a>(args: &'a [String], index: &mut usize, flag: &str) -> Result<&'a str, Usage> {
    *index += 1;
    args.get(*index).map(String::as_str).ok_or_else(|| Usage(format!("{flag} needs a value")))
}

fn number(text: &str, flag: &str) -> Result<u64, Usage> {
    text.parse().map_err(|_| Usage(format!("{flag} takes a whole number, got {text:?}")))
}

fn parse_run(args: &[String]) -> Result<VmConfig, Usage> {
    // The config file first, so flags override it wherever they appear.
    let mut config = VmConfig::default();
    if let Some(position) = args.iter().position(|arg| arg == "--config") {
        let path = args.get(position + 1).ok_or_else(|| Usage("--config needs a value".into()))?;
        config = VmConfig::from_file(&PathBuf::from(path)).map_err(|err| Usage(err.to_string()))?;
    }
    let mut index = 0;
    while index < args.len() {
        let flag = args[index].as_str();
        match flag {
            "--config" => index += 1,
            "--kernel" => config.kernel = Some(value(args, &mut index, flag)?.into()),
            "--initrd" => config.initrd = Some(value(args, &mut index, flag)?.into()),
            "--cmdline" => config.cmdline = Some(value(args, &mut index, flag)?.to_string()),
            "--mem" => config.mem_mib = number(value(args, &mut index, flag)?, flag)?,
            "--cpus" => config.cpus = number(value(args, &mut index, flag)?, flag)?,
            "--console-log" => config.console_log = Some(value(args, &mut index, flag)?.into()),
            "--no-console" => config.console_stdout = false,
            "--socket" => config.socket = Some(value(args, &mut index, flag)?.into()),
            "--boot" => config.boot = value(args, &mut index, flag)?.parse().map_err(Usage)?,
            "--no-rng" => config.rng = false,
            "--vsock" => config.vsock = Some(value(args, &mut index, flag)?.into()),
            "--display" => config.display = value(args, &mut index, flag)?.to_string(),
            "--no-display" => config.display = "none".to_string(),
            "--gpu-backend" => config.gpu_backend = Some(value(args, &mut index, flag)?.into()),
            "--gpu-screen" => config.gpu_screen = Some(value(args, &mut index, flag)?.into()),
            "--audit" => config.audit = Some(value(args, &mut index, flag)?.into()),
            "--name" => config.name = value(args, &mut index, flag)?.to_string(),
            "--cid" => config.guest_cid = number(value(args, &mut index, flag)?, flag)?,
            "--disk" => config.disks.push(
                value(args, &mut index, flag)?
                    .parse()
                    .map_err(|err: carrel_vmm::disk::DiskError| Usage(err.to_string()))?,
            ),
            other => return Err(Usage(format!("unknown flag {other:?}"))),
        }
        index += 1;
    }
    Ok(config)
}

/// How the VMM process itself is confined, for `run` and `run --restore` alike.
#[derive(Debug, Default)]
struct ProcessOptions {
    jail: Option<carrel_vmm::jail::JailConfig>,
    seccomp: bool,
    /// Checks run inside the jail once it is set up (test builds only).
    #[cfg_attr(not(feature = "test-probes"), allow(dead_code))]
    probes: Vec<String>,
}

/// Takes the confinement flags out of `args`: `--jail DIR --uid U --gid G`,
/// `--jail-writable DIR` (repeatable), `--no-seccomp`.
fn take_process_options(args: &mut Vec<String>) -> Result<ProcessOptions, Usage> {
    let (mut root, mut uid, mut gid, mut writable) = (None, None, None, Vec::new());
    let mut options = ProcessOptions { seccomp: true, ..ProcessOptions::default() };
    let mut rest = Vec::with_capacity(args.len());
    let mut index = 0;
    while index < args.len() {
        let flag = args[index].as_str();
        match flag {
            "--jail" => root = Some(PathBuf::from(value(args, &mut index, flag)?)),
            "--uid" => uid = Some(id(value(args, &mut index, flag)?, flag)?),
            "--gid" => gid = Some(id(value(args, &mut index, flag)?, flag)?),
            "--jail-writable" => writable.push(absolute(value(args, &mut index, flag)?)),
            "--no-seccomp" => options.seccomp = false,
            #[cfg(feature = "test-probes")]
            "--jail-probe" => options.probes.push(value(args, &mut index, flag)?.to_string()),
            _ => rest.push(args[index].clone()),
        }
        index += 1;
    }
    *args = rest;
    options.jail = match (root, uid, gid) {
        (None, None, None) if writable.is_empty() => None,
        (Some(root), Some(uid), Some(gid)) => {
            Some(carrel_vmm::jail::JailConfig { root: absolute(&root.to_string_lossy()), uid, gid, writable })
        }
        _ => return Err(Usage("--jail DIR, --uid U and --gid G go together (and --jail-writable needs them)".into())),
    };
    Ok(options)
}

/// A uid or gid: a whole number that fits 32 bits.
fn id(text: &str, flag: &str) -> Result<u32, Usage> {
    u32::try_from(number(text, flag)?).map_err(|_| Usage(format!("{flag} takes a 32-bit id, got {text}")))
}

/// Enters the jail of `options` for a VM of `config` (restored from `restore`), after
/// turning its paths into the absolute ones the jail binds; `None` when not jailed.
fn confine(
    options: &ProcessOptions,
    config: &mut VmConfig,
    restore: Option<&Path>,
) -> anyhow::Result<Option<carrel_vmm::jail::Jail>> {
    carrel_vmm::seccomp::enable("carrel-vmm", options.seccomp)?;
    let Some(jail) = &options.jail else { return Ok(None) };
    carrel_vmm::jail::resolve_config(config)?;
    let binds = carrel_vmm::jail::binds_for(config, jail, restore);
    Ok(Some(carrel_vmm::jail::enter(jail, &binds)?))
}

/// Gives the VM's own files made at build, as root (disk layers, its console log and vsock
/// socket), to its jail's uid.
fn hand_over(jail: Option<&carrel_vmm::jail::Jail>, config: &VmConfig) -> anyhow::Result<()> {
    if let Some(jail) = jail {
        let disks = config.disks.iter().filter(|disk| !disk.readonly).map(|disk| disk.path.clone());
        // The vsock socket too: the VMM's own agent client connects to it.
        let own: Vec<PathBuf> = disks.chain(config.console_log.clone()).chain(config.vsock.clone()).collect();
        jail.hand_over(&own)?;
    }
    Ok(())
}

/// Runs the VM to its end, with the test-only probes first when asked.
fn run_vmm(vmm: Vmm, _options: &ProcessOptions) -> anyhow::Result<ExitCode> {
    #[cfg(feature = "test-probes")]
    carrel_vmm::jail::probes::run(&_options.probes);
    finish(vmm.run()?)
}

/// What a restore may set anew: the VM's identity and where it talks, never its machine.
#[derive(Debug, Default)]
struct RestoreOverrides {
    load: MemoryLoad,
    socket: Option<PathBuf>,
    vsock: Option<PathBuf>,
    cid: Option<u64>,
    name: Option<String>,
    audit: Option<PathBuf>,
    console_log: Option<PathBuf>,
    no_console: bool,
}

fn parse_restore(args: &[String]) -> Result<(PathBuf, RestoreOverrides), Usage> {
    let mut dir = None;
    let mut overrides = RestoreOverrides::default();
    let mut index = 0;
    while index < args.len() {
        let flag = args[index].as_str();
        match flag {
            "--restore" => dir = Some(PathBuf::from(value(args, &mut index, flag)?)),
            "--eager" => overrides.load = MemoryLoad::Eager,
            "--lazy" => overrides.load = MemoryLoad::Lazy,
            "--socket" => overrides.socket = Some(value(args, &mut index, flag)?.into()),
            "--vsock" => overrides.vsock = Some(value(args, &mut index, flag)?.into()),
            "--cid" => overrides.cid = Some(number(value(args, &mut index, flag)?, flag)?),
            "--name" => overrides.name = Some(value(args, &mut index, flag)?.to_string()),
            "--audit" => overrides.audit = Some(value(args, &mut index, flag)?.into()),
            "--console-log" => overrides.console_log = Some(value(args, &mut index, flag)?.into()),
            "--no-console" => overrides.no_console = true,
            other => {
                return Err(Usage(format!(
                    "{other:?} cannot be given with --restore: the machine is the snapshot's (vm.json)"
                )))
            }
        }
        index += 1;
    }
    Ok((dir.ok_or_else(|| Usage("--restore needs a value".into()))?, overrides))
}

fn parse_snapshot(args: &[String], hibernate: bool) -> Result<(PathBuf, SnapshotRequest), Usage> {
    let (mut socket, mut dir, mut diff) = (None, None, false);
    let mut index = 0;
    while index < args.len() {
        let flag = args[index].as_str();
        match flag {
            "--socket" => socket = Some(PathBuf::from(value(args, &mut index, flag)?)),
            "--dir" => dir = Some(absolute(value(args, &mut index, flag)?)),
            "--diff" => diff = true,
            other => return Err(Usage(format!("unknown flag {other:?}"))),
        }
        index += 1;
    }
    let socket = socket.ok_or_else(|| Usage("--socket PATH is required".into()))?;
    let dir = dir.ok_or_else(|| Usage("--dir DIR is required: the new snapshot's directory".into()))?;
    Ok((socket, SnapshotRequest { dir, hibernate, diff }))
}

fn parse_merge(args: &[String]) -> Result<(PathBuf, PathBuf), Usage> {
    let (mut dir, mut out) = (None, None);
    let mut index = 0;
    while index < args.len() {
        let flag = args[index].as_str();
        match flag {
            "--dir" => dir = Some(absolute(value(args, &mut index, flag)?)),
            "--out" => out = Some(absolute(value(args, &mut index, flag)?)),
            other => return Err(Usage(format!("unknown flag {other:?}"))),
        }
        index += 1;
    }
    let dir = dir.ok_or_else(|| Usage("--dir DIR is required: the last snapshot of the chain".into()))?;
    let out = out.ok_or_else(|| Usage("--out DIR is required: the merged snapshot's directory".into()))?;
    Ok((dir, out))
}

fn parse_socket(args: &[String]) -> Result<(PathBuf, bool), Usage> {
    let mut socket = None;
    let mut json = false;
    let mut index = 0;
    while index < args.len() {
        match args[index].as_str() {
            "--socket" => socket = Some(PathBuf::from(value(args, &mut index, "--socket")?)),
            "--json" => json = true,
            other => return Err(Usage(format!("unknown flag {other:?}"))),
        }
        index += 1;
    }
    Ok((socket.ok_or_else(|| Usage("--socket PATH is required".into()))?, json))
}

fn pair(text: &str, flag: &str) -> Result<[u32; 2], Usage> {
    let bad = || Usage(format!("{flag} takes WIDTHxHEIGHT, got {text:?}"));
    let (width, height) = text.split_once('x').ok_or_else(bad)?;
    Ok([width.parse().map_err(|_| bad())?, height.parse().map_err(|_| bad())?])
}

fn rectangle(text: &str, flag: &str) -> Result<[u32; 4], Usage> {
    let parts: Vec<u32> = text
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| Usage(format!("{flag} takes x,y,w,h")))?;
    parts.try_into().map_err(|_| Usage(format!("{flag} takes four numbers x,y,w,h, got {text:?}")))
}

/// Where a screenshot comes from: a running VM, or a hibernated VM's snapshot.
enum ScreenTarget {
    Socket(PathBuf),
    Snapshot(PathBuf),
}

fn parse_screenshot(args: &[String]) -> Result<(ScreenTarget, PathBuf, ScreenshotRequest), Usage> {
    let (mut socket, mut output, mut snapshot) = (None, None, None);
    let mut request = ScreenshotRequest {
        format: ImageFormat::Png,
        crop: None,
        scale: None,
        cursor: false,
        wait: Wait::FirstFrame,
        timeout_ms: 10_000,
    };
    let mut format_given = false;
    let mut index = 0;
    while index < args.len() {
        let flag = args[index].as_str();
        match flag {
            "--socket" => socket = Some(PathBuf::from(value(args, &mut index, flag)?)),
            "--snapshot" => snapshot = Some(PathBuf::from(value(args, &mut index, flag)?)),
            "-o" | "--output" => output = Some(PathBuf::from(value(args, &mut index, flag)?)),
            "--format" => {
                format_given = true;
                request.format = match value(args, &mut index, flag)? {
                    "png" => ImageFormat::Png,
                    "qoi" => ImageFormat::Qoi,
                    "raw" => ImageFormat::Raw,
                    other => return Err(Usage(format!("--format takes png, qoi or raw, got {other:?}"))),
                }
            }
            "--scale" => request.scale = Some(pair(value(args, &mut index, flag)?, flag)?),
            "--crop" => request.crop = Some(rectangle(value(args, &mut index, flag)?, flag)?),
            "--cursor" => request.cursor = true,
            "--after" => request.wait = Wait::FrameAfter(number(value(args, &mut index, flag)?, flag)?),
            "--still" => request.wait = Wait::StillFor(number(value(args, &mut index, flag)?, flag)?),
            "--timeout" => {
                let text = value(args, &mut index, flag)?;
                let seconds: f64 = text.parse().map_err(|_| Usage(format!("--timeout takes seconds, got {text:?}")))?;
                request.timeout_ms = (seconds.max(0.0) * 1000.0) as u64;
            }
            other => return Err(Usage(format!("unknown flag {other:?}"))),
        }
        index += 1;
    }
    let output = output.ok_or_else(|| Usage("-o FILE is required".into()))?;
    if !format_given {
        // The file name decides when no --format is given.
        match output.extension().and_then(|ext| ext.to_str()) {
            Some("qoi") => request.format = ImageFormat::Qoi,
            Some("raw") => request.format = ImageFormat::Raw,
            _ => {}
        }
    }
    let target = match (socket, snapshot) {
        (Some(socket), None) => ScreenTarget::Socket(socket),
        (None, Some(dir)) => ScreenTarget::Snapshot(dir),
        _ => return Err(Usage("give --socket PATH (a running VM) or --snapshot DIR (a hibernated one)".into())),
    };
    Ok((target, output, request))
}

/// An agent command: a request, or a file transfer whose local side this CLI opens.
enum AgentCommand {
    Request(AgentRequest),
    Put { local: PathBuf, remote: String },
    Get { remote: String, local: PathBuf },
}

fn parse_agent(args: &[String]) -> Result<(PathBuf, AgentCommand), Usage> {
    let mut socket = None;
    let mut index = 0;
    while index < args.len() && args[index].starts_with("--") {
        match args[index].as_str() {
            "--socket" => socket = Some(PathBuf::from(value(args, &mut index, "--socket")?)),
            other => return Err(Usage(format!("unknown flag {other:?}"))),
        }
        index += 1;
    }
    let socket = socket.ok_or_else(|| Usage("--socket PATH is required".into()))?;
    let rest = &args[index..];
    let operand = |position: usize, name: &str| {
        rest.get(position).cloned().ok_or_else(|| Usage(format!("agent {} needs {name}", rest[0])))
    };
    let request = match rest.first().map(String::as_str) {
        Some("ping") => AgentRequest::Ping,
        Some("ls") => AgentRequest::List { path: rest.get(1).cloned().unwrap_or_else(|| "/".into()) },
        Some("rm") => AgentRequest::Remove { path: operand(1, "PATH")?, recursive: false },
        Some("put") => {
            return Ok((
                socket,
                AgentCommand::Put { local: operand(1, "LOCAL")?.into(), remote: operand(2, "REMOTE")? },
            ))
        }
        Some("get") => {
            return Ok((
                socket,
                AgentCommand::Get { remote: operand(1, "REMOTE")?, local: operand(2, "LOCAL")?.into() },
            ))
        }
        Some("exec") => {
            let mut exec = AgentExec::default();
            let mut position = 1;
            while position < rest.len() {
                let flag = rest[position].as_str();
                match flag {
                    "--" => {
                        position += 1;
                        break;
                    }
                    "--timeout" => {
                        let text = value(rest, &mut position, flag)?;
                        let seconds: f64 =
                            text.parse().map_err(|_| Usage(format!("--timeout takes seconds, got {text:?}")))?;
                        exec.timeout_ms = Some((seconds.max(0.0) * 1000.0) as u64);
                    }
                    "--cwd" => exec.cwd = Some(value(rest, &mut position, flag)?.to_string()),
                    "--env" => {
                        let pair = value(rest, &mut position, flag)?;
                        let (key, value) =
                            pair.split_once('=').ok_or_else(|| Usage(format!("--env takes K=V, got {pair:?}")))?;
                        exec.env.push((key.to_string(), value.to_string()));
                    }
                    _ => break,
                }
                position += 1;
            }
            exec.argv = rest[position..].to_vec();
            if exec.argv.is_empty() {
                return Err(Usage("agent exec needs a command: exec -- CMD ARGS...".into()));
            }
            AgentRequest::Exec(exec)
        }
        Some(other) => return Err(Usage(format!("unknown agent command {other:?}"))),
        None => return Err(Usage("agent needs a command: ping, exec, put, get, ls, rm".into())),
    };
    Ok((socket, AgentCommand::Request(request)))
}

fn button(text: &str) -> Result<Button, Usage> {
    match text {
        "left" => Ok(Button::Left),
        "right" => Ok(Button::Right),
        "middle" => Ok(Button::Middle),
        other => Err(Usage(format!("buttons are left, right or middle, got {other:?}"))),
    }
}

fn parse_input(args: &[String]) -> Result<(PathBuf, Option<PathBuf>, InputRequest), Usage> {
    let mut socket = None;
    let mut output = None;
    let mut request = InputRequest {
        action: Action::Move { x: 0, y: 0 },
        wait: Some(Wait::FrameAfter(0)),
        screenshot: None,
        timeout_ms: 5_000,
        hold_ms: None,
        gap_ms: None,
    };
    let mut words = Vec::new();
    let (mut click_button, mut click_count) = (Button::Left, 1u32);
    let mut index = 0;
    while index < args.len() {
        let flag = args[index].as_str();
        match flag {
            "--socket" => socket = Some(PathBuf::from(value(args, &mut index, flag)?)),
            "--screenshot" => {
                let path = PathBuf::from(value(args, &mut index, flag)?);
                request.screenshot = Some(match path.extension().and_then(|ext| ext.to_str()) {
                    Some("qoi") => ImageFormat::Qoi,
                    Some("raw") => ImageFormat::Raw,
                    _ => ImageFormat::Png,
                });
                output = Some(path);
            }
            "--wait" => {
                request.wait = match value(args, &mut index, flag)? {
                    "frame" => Some(Wait::FrameAfter(0)),
                    "none" => None,
                    other => match other.strip_prefix("still:") {
                        Some(ms) => Some(Wait::StillFor(number(ms, flag)?)),
                        None => return Err(Usage(format!("--wait takes frame, none or still:MS, got {other:?}"))),
                    },
                }
            }
            "--timeout" => {
                let text = value(args, &mut index, flag)?;
                let seconds: f64 = text.parse().map_err(|_| Usage(format!("--timeout takes seconds, got {text:?}")))?;
                request.timeout_ms = (seconds.max(0.0) * 1000.0) as u64;
            }
            "--hold" => request.hold_ms = Some(number(value(args, &mut index, flag)?, flag)?),
            "--gap" => request.gap_ms = Some(number(value(args, &mut index, flag)?, flag)?),
            "--button" => click_button = button(value(args, &mut index, flag)?)?,
            "--count" => click_count = number(value(args, &mut index, flag)?, flag)? as u32,
            _ => words.push(args[index].clone()),
        }
        index += 1;
    }
    let coordinate = |position: usize| -> Result<u32, Usage> {
        let text = words.get(position).ok_or_else(|| Usage(format!("{} needs more coordinates", words[0])))?;
        text.parse().map_err(|_| Usage(format!("coordinates are whole pixels, got {text:?}")))
    };
    let delta = |position: usize| -> Result<i32, Usage> {
        let text = words.get(position).ok_or_else(|| Usage("scroll needs X Y DX DY".into()))?;
        text.parse().map_err(|_| Usage(format!("scroll amounts are whole notches, got {text:?}")))
    };
    request.action = match words.first().map(String::as_str) {
        Some("click") => {
            Action::Click { x: coordinate(1)?, y: coordinate(2)?, button: click_button, count: click_count }
        }
        Some("move") => Action::Move { x: coordinate(1)?, y: coordinate(2)? },
        Some("down") => Action::ButtonDown { button: button(words.get(1).map_or("left", String::as_str))? },
        Some("up") => Action::ButtonUp { button: button(words.get(1).map_or("left", String::as_str))? },
        Some("drag") => {
            let numbers = words[1..].iter().map(|w| w.parse::<u32>()).collect::<Result<Vec<_>, _>>();
            let numbers = numbers.map_err(|_| Usage("drag takes pixel coordinates X1 Y1 X2 Y2 ...".into()))?;
            if numbers.len() % 2 != 0 {
                return Err(Usage("drag takes pairs of coordinates".into()));
            }
            Action::Drag { button: click_button, path: numbers.chunks(2).map(|pair| (pair[0], pair[1])).collect() }
        }
        Some("scroll") => Action::Scroll { x: coordinate(1)?, y: coordinate(2)?, dx: delta(3)?, dy: delta(4)? },
        Some("type") => Action::Type { text: words.get(1).cloned().ok_or_else(|| Usage("type needs TEXT".into()))? },
        Some("key") => Action::Key {
            combo: words.get(1).cloned().ok_or_else(|| Usage("key needs a COMBO such as ctrl+a".into()))?,
        },
        Some(other) => return Err(Usage(format!("unknown input action {other:?}"))),
        None => return Err(Usage("input needs an action: click, move, down, up, drag, scroll, type, key".into())),
    };
    Ok((socket.ok_or_else(|| Usage("--socket PATH is required".into()))?, output, request))
}

fn input(socket: &Path, output: Option<&Path>, request: InputRequest) -> anyhow::Result<ExitCode> {
    let timeout = Duration::from_millis(request.timeout_ms) + CALL_TIMEOUT;
    match ControlClient::connect(socket)?.call(&Request::Input(request), timeout)? {
        Response::Input(result) => {
            let frame = result.frame.map(|f| f.to_string()).unwrap_or_else(|| "none".into());
            let note = if result.timed_out { " (no new frame before the timeout)" } else { "" };
            println!("done: frame {frame}{note}");
            if let (Some(path), Some(shot)) = (output, result.screenshot) {
                std::fs::write(path, &shot.bytes)
                    .map_err(|err| anyhow::anyhow!("cannot write {}: {err}", path.display()))?;
                println!("{}: {}x{} {:?}, frame {}", path.display(), shot.width, shot.height, shot.format, shot.frame);
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::Error(message) => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

/// Local paths are opened by the VMM process, which may run elsewhere: make them absolute.
fn absolute(path: &str) -> PathBuf {
    let path = PathBuf::from(path);
    if path.is_absolute() {
        return path;
    }
    std::env::current_dir().map(|dir| dir.join(&path)).unwrap_or(path)
}

/// Runs an agent command; the exit code is the guest command's (128 + signal when killed,
/// 124 on timeout), so scripts can use it.
fn agent(socket: &Path, command: AgentCommand) -> anyhow::Result<ExitCode> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let transfer_timeout = Duration::from_secs(3600);
    let mut client = ControlClient::connect(socket)?;
    let response = match command {
        AgentCommand::Request(request) => {
            let timeout = match &request {
                AgentRequest::Exec(exec) => Duration::from_millis(exec.timeout_ms.unwrap_or(3_600_000)) + CALL_TIMEOUT,
                _ => transfer_timeout,
            };
            client.call(&Request::Agent(request), timeout)?
        }
        AgentCommand::Put { local, remote } => {
            let mut file = std::fs::File::open(&local).with_context(|| format!("cannot open {}", local.display()))?;
            let metadata = file.metadata()?;
            let mode = metadata.permissions().mode() & 0o7777;
            client.put(&mut file, metadata.len(), mode, &remote, transfer_timeout)?
        }
        AgentCommand::Get { remote, local } => {
            let mut file = None;
            let response = client.get(
                &remote,
                |_, mode| {
                    let opened =
                        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&local)?;
                    Ok(file.insert(opened) as &mut dyn std::io::Write)
                },
                transfer_timeout,
            );
            // A get that did not end in Done leaves no partial file behind.
            if !matches!(response, Ok(Response::Agent(AgentResponse::Done { .. }))) && file.is_some() {
                let _ = std::fs::remove_file(&local);
            }
            response.with_context(|| format!("get {remote} into {}", local.display()))?
        }
    };
    let answer = match response {
        Response::Agent(answer) => answer,
        Response::Error(message) => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    };
    match answer {
        AgentResponse::Pong { rtt_us } => println!("pong: {rtt_us} us"),
        AgentResponse::Entries(entries) => {
            for entry in entries {
                let suffix = if entry.directory { "/" } else { "" };
                println!("{:>12}  {}{suffix}", entry.size, entry.name);
            }
        }
        AgentResponse::Done { bytes, digest } => {
            if bytes > 0 || !digest.is_empty() {
                println!("{bytes} bytes, blake3 {digest}");
            }
        }
        AgentResponse::FileStart { .. } | AgentResponse::Data(_) => anyhow::bail!("a transfer frame out of place"),
        AgentResponse::Exit { code, signal, timed_out, stdout, stderr } => {
            use std::io::Write;
            std::io::stdout().write_all(&stdout)?;
            std::io::stderr().write_all(&stderr)?;
            let status = match (timed_out, signal, code) {
                (true, _, _) => 124,
                (false, Some(signal), _) => 128 + signal,
                (false, None, Some(code)) => code,
                (false, None, None) => 1,
            };
            return Ok(ExitCode::from(status.clamp(0, 255) as u8));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn screenshot(target: &ScreenTarget, output: &Path, request: ScreenshotRequest) -> anyhow::Result<ExitCode> {
    let timeout = Duration::from_millis(request.timeout_ms) + CALL_TIMEOUT;
    let answer = match target {
        ScreenTarget::Socket(socket) => ControlClient::connect(socket)?.call(&Request::Screenshot(request), timeout)?,
        ScreenTarget::Snapshot(dir) => Response::Screenshot(carrel_vmm::snapshot::screen::screenshot(dir, &request)?),
    };
    match answer {
        Response::Screenshot(shot) => {
            std::fs::write(output, &shot.bytes)
                .map_err(|err| anyhow::anyhow!("cannot write {}: {err}", output.display()))?;
            let layout =
                if shot.stride > 0 { format!(", {} stride {}", shot.pixel_format, shot.stride) } else { String::new() };
            println!(
                "{}: {}x{} {:?}{layout}, frame {}, {} bytes",
                output.display(),
                shot.width,
                shot.height,
                shot.format,
                shot.frame,
                shot.bytes.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Response::Error(message) => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

fn snapshot(socket: &Path, request: SnapshotRequest) -> anyhow::Result<ExitCode> {
    let hibernate = request.hibernate;
    // Writing guest memory takes about a second per GiB on a slow disk.
    match ControlClient::connect(socket)?.call(&Request::Snapshot(request), Duration::from_secs(600))? {
        Response::Snapshot(info) => {
            print_snapshot(&info);
            if hibernate {
                println!("the VM has ended (wake it with run --restore)");
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::Error(message) => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

fn print_snapshot(info: &carrel_vmm::snapshot::SnapshotInfo) {
    println!(
        "{}: {} KiB of memory, {} bytes on disk, paused {:.1} ms, state {}{}",
        info.dir.display(),
        info.memory_bytes >> 10,
        info.disk_bytes,
        info.paused_us as f64 / 1e3,
        &info.digest[..16],
        info.parent.as_ref().map(|parent| format!(", a diff over {}", &parent[..16])).unwrap_or_default(),
    );
}

/// `carrel-vmm disk create|info|commit`.
fn disk_command(args: &[String]) -> Result<anyhow::Result<ExitCode>, Usage> {
    use carrel_vmm::disk::{self, layer::Layer, layer::ParentRef, parse_size, Disk, DiskSpec};
    let (Some(command), Some(path)) = (args.first().map(String::as_str), args.get(1).map(PathBuf::from)) else {
        return Err(Usage("disk needs a command and a PATH".into()));
    };
    let mut options = (None, None, None);
    let mut index = 2;
    while index < args.len() {
        let flag = args[index].as_str();
        match flag {
            "--size" => {
                let text = value(args, &mut index, flag)?;
                options.0 =
                    Some(parse_size(text).ok_or_else(|| Usage(format!("--size takes e.g. 64M, got {text:?}")))?);
            }
            "--base" => options.1 = Some(PathBuf::from(value(args, &mut index, flag)?)),
            "--out" => options.2 = Some(PathBuf::from(value(args, &mut index, flag)?)),
            other => return Err(Usage(format!("unknown flag {other:?} for disk {command}"))),
        }
        index += 1;
    }
    Ok(match (command, options) {
        ("create", (size, base, None)) if size.is_some() != base.is_some() => (|| {
            let disk = match base {
                Some(base) => {
                    Disk::open(&DiskSpec { path: path.clone(), readonly: false, base: Some(base), size: None })?
                }
                None => {
                    Layer::create(&path, size.unwrap_or_default(), ParentRef::None)?;
                    Disk::open(&DiskSpec { path: path.clone(), readonly: true, base: None, size: None })?
                }
            };
            println!("{}: {}", path.display(), disk.describe());
            Ok(ExitCode::SUCCESS)
        })(),
        ("create", _) => return Err(Usage("disk create takes --size N or --base RAW".into())),
        ("info", (None, None, None)) => (|| {
            let disk = Disk::open(&DiskSpec { path: path.clone(), readonly: true, base: None, size: None })?;
            println!("{}: {}", path.display(), disk.describe());
            for (layer, id) in disk.state().layers {
                let hex: String = id.iter().map(|byte| format!("{byte:02x}")).collect();
                println!("  layer {} (id {hex})", layer.display());
            }
            Ok(ExitCode::SUCCESS)
        })(),
        ("commit", (None, None, out)) => {
            disk::commit(&path, out.as_deref()).map_err(anyhow::Error::from).map(|blocks| {
                println!(
                    "{}: folded, {} MiB in one layer",
                    out.as_ref().unwrap_or(&path).display(),
                    (blocks * 4096) >> 20
                );
                ExitCode::SUCCESS
            })
        }
        (other, _) => return Err(Usage(format!("unknown disk command {other:?} (create, info, commit) or flags"))),
    })
}

fn merge(dir: &Path, out: &Path) -> anyhow::Result<ExitCode> {
    let info = carrel_vmm::snapshot::merge(dir, out)?;
    print_snapshot(&info);
    Ok(ExitCode::SUCCESS)
}

fn restore(
    dir: &Path,
    overrides: &RestoreOverrides,
    options: &ProcessOptions,
    started: Instant,
) -> anyhow::Result<ExitCode> {
    // A jailed restore learns which files it needs from vm.json alone, and reads the
    // rest of the snapshot inside the jail.
    let (dir, jail) = match &options.jail {
        Some(_) => {
            let dir = carrel_vmm::jail::resolve(dir)?;
            let mut config = carrel_vmm::snapshot::read_config(&dir)?;
            apply_overrides(&mut config, overrides);
            let jail = confine(options, &mut config, Some(&dir))?;
            (dir, jail)
        }
        None => (dir.to_path_buf(), confine(options, &mut VmConfig::default(), None)?),
    };
    let snapshot = carrel_vmm::snapshot::load_snapshot(&dir)?;
    let mut config = snapshot.config.clone();
    apply_overrides(&mut config, overrides);
    if jail.is_some() {
        carrel_vmm::jail::resolve_config(&mut config)?;
    }
    let built = carrel_vmm::builder::restore_vm(&config, &snapshot, overrides.load, started)?;
    hand_over(jail.as_ref(), &config)?;
    eprintln!(
        "carrel-vmm: restored {} ({} KVM, {} MiB, restore {}) in {:.1} ms",
        dir.display(),
        built.platform.name(),
        config.mem_mib,
        built.restores,
        started.elapsed().as_secs_f64() * 1e3
    );
    run_vmm(Vmm::start(built, config, jail.as_ref())?, options)
}

/// The VM's identity and where it talks, from the restore's flags.
fn apply_overrides(config: &mut VmConfig, overrides: &RestoreOverrides) {
    let replace = |field: &mut Option<PathBuf>, value: &Option<PathBuf>| {
        if value.is_some() {
            field.clone_from(value);
        }
    };
    replace(&mut config.socket, &overrides.socket);
    replace(&mut config.vsock, &overrides.vsock);
    replace(&mut config.audit, &overrides.audit);
    replace(&mut config.console_log, &overrides.console_log);
    config.guest_cid = overrides.cid.unwrap_or(config.guest_cid);
    if let Some(name) = &overrides.name {
        config.name.clone_from(name);
    }
    config.console_stdout &= !overrides.no_console;
}

fn finish(outcome: VmOutcome) -> anyhow::Result<ExitCode> {
    Ok(match outcome {
        VmOutcome::PoweredOff(0) | VmOutcome::Stopped => ExitCode::SUCCESS,
        VmOutcome::PoweredOff(code) => {
            eprintln!("carrel-vmm: guest powered off with code {code}");
            ExitCode::from(code.clamp(1, 255) as u8)
        }
    })
}

fn run(mut config: VmConfig, options: &ProcessOptions, started: Instant) -> anyhow::Result<ExitCode> {
    let jail = confine(options, &mut config, None)?;
    let built = build_vm(&config, started)?;
    hand_over(jail.as_ref(), &config)?;
    eprintln!(
        "carrel-vmm: {} KVM ({}), {} boot, {} MiB, {} vCPU(s), built in {:.1} ms",
        built.platform.name(),
        match built.platform {
            carrel_vmm::platform::PlatformKind::Pvm => "paravirtual kvm_pvm",
            carrel_vmm::platform::PlatformKind::Hardware => "VMX/SVM",
        },
        format!("{:?}", built.protocol).to_lowercase(),
        config.mem_mib,
        config.cpus,
        started.elapsed().as_secs_f64() * 1e3
    );
    run_vmm(Vmm::start(built, config, jail.as_ref())?, options)
}

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn status(socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    match ControlClient::connect(socket)?.call(&Request::Status, CALL_TIMEOUT)? {
        Response::Status(status) if json => {
            let zero_copy = status.zero_copy_screen.map_or("null".to_string(), |zero_copy| zero_copy.to_string());
            println!(
                "{{\"platform\":\"{}\",\"state\":\"{}\",\"boot_protocol\":\"{}\",\"vcpus\":{},\"mem_mib\":{},\"uptime_ms\":{},\"pid\":{},\"zero_copy_screen\":{},\"memory_loading\":{}}}",
                status.platform, status.state, status.boot_protocol, status.vcpus, status.mem_mib, status.uptime_ms, status.pid, zero_copy, status.memory_loading
            );
            Ok(ExitCode::SUCCESS)
        }
        Response::Status(status) => {
            println!("state:     {}", status.state);
            println!("platform:  {}", status.platform);
            println!("boot:      {} ({})", status.boot_protocol, status.kernel);
            println!("vcpus:     {}", status.vcpus);
            println!(
                "memory:    {} MiB{}",
                status.mem_mib,
                if status.memory_loading { " (loading from its snapshot)" } else { "" }
            );
            let screen = match status.zero_copy_screen {
                Some(true) => "read in place (zero-copy)",
                Some(false) => "copied on each transfer",
                None => "no local scanout",
            };
            println!("screen:    {screen}");
            println!("devices:   {}", status.devices.join(", "));
            println!("uptime:    {} ms", status.uptime_ms);
            println!("pid:       {}", status.pid);
            Ok(ExitCode::SUCCESS)
        }
        Response::Error(message) => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

/// A request whose only answer is "done".
fn simple(socket: &Path, request: Request) -> anyhow::Result<ExitCode> {
    match ControlClient::connect(socket)?.call(&request, CALL_TIMEOUT)? {
        Response::Paused | Response::Resumed => Ok(ExitCode::SUCCESS),
        Response::Error(message) => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

fn stop(socket: &Path) -> anyhow::Result<ExitCode> {
    match ControlClient::connect(socket)?.call(&Request::Stop, CALL_TIMEOUT)? {
        Response::Stopping => Ok(ExitCode::SUCCESS),
        Response::Error(message) => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

//! `carrel-vmm`: run a VM, or talk to a running VM's control socket.

mod args;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use args::{AgentCommand, Cli, Command, DiskCommand, Launch, ProcessOptions, RestoreOverrides, ScreenTarget};
use carrel_vmm::builder::build_vm;
use carrel_vmm::config::VmConfig;
use carrel_vmm::control::{
    AgentRequest, AgentResponse, ControlClient, InputRequest, Request, Response, ScreenshotRequest, SnapshotRequest,
};
use carrel_vmm::vmm::{AuditOpening, VmOutcome, Vmm};
use clap::{CommandFactory, Parser};

fn main() -> ExitCode {
    let mut started = Instant::now();
    // An unjailed VMM has KVM make its VM while it reads its command line and
    // configuration (KVM_CREATE_VM needs neither). A jailed one forks into its namespaces
    // and closes what it inherited: a KVM VM belongs to the process that made it.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let jailed = args.iter().any(|arg| arg.to_str().is_some_and(|arg| arg == "--jail" || arg.starts_with("--jail=")));
    if args.get(1).is_some_and(|command| command == "run") && !jailed {
        carrel_vmm::vstate::vm::make_ahead(ram_hint(&args));
    }
    // Usage errors end here with exit code 2 (and --help with 0), as clap does.
    let mut cli = Cli::parse();
    carrel_vmm::timeline::mark("parsed");
    if let Command::Standby = cli.command {
        // The VM is made while the standby waits (a jailed assignment discards it).
        carrel_vmm::vstate::vm::make_ahead(None);
        match standby() {
            // From here the process is the VM's, and its time starts now.
            Ok(assigned) => (cli, started) = (assigned, Instant::now()),
            Err(err) => {
                eprintln!("carrel-vmm: standby: {err:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    let result = match cli.command {
        Command::Run(run) => {
            let (launch, process) = run.launch().unwrap_or_else(|err| err.exit());
            let options = process.options().unwrap_or_else(|err| err.exit());
            match launch {
                Launch::Boot(config) => self::run(*config, &options, started),
                Launch::Restore { dir, overrides } => restore(&dir, &overrides, &options, started),
            }
        }
        Command::Snapshot(command) => match command.merge {
            Some(args::SnapshotSubcommand::Merge { dir, out }) => merge(&args::absolute(&dir), &args::absolute(&out)),
            None => match command.take.request(false) {
                Some((socket, request)) => snapshot(&socket, request),
                None => unreachable!("clap requires --socket and --dir without merge"),
            },
        },
        Command::Hibernate(take) => match take.request(true) {
            Some((socket, request)) => snapshot(&socket, request),
            None => unreachable!("clap requires --socket and --dir"),
        },
        Command::Disk { command } => disk(command),
        Command::Status { socket, json } => status(&socket.socket, json),
        Command::Stop(socket) => stop(&socket.socket),
        Command::Pause(socket) => simple(&socket.socket, Request::Pause),
        Command::Resume(socket) => simple(&socket.socket, Request::Resume),
        Command::Screenshot(shot) => {
            let (target, output, request) = shot.request();
            screenshot(&target, &output, request)
        }
        Command::Agent(agent_args) => agent(&agent_args.socket, agent_args.command.into()),
        Command::Input(input_args) => {
            let (socket, output, request) = input_args.request().unwrap_or_else(|err| err.exit());
            input(&socket, output.as_deref(), request)
        }
        Command::Completions { shell } => completions(shell),
        Command::Standby => Err(anyhow::anyhow!("a standby VMM's command line cannot be another standby")),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("carrel-vmm: error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// What a supervisor hands a standby VMM.
#[derive(serde::Deserialize)]
struct Assignment {
    /// The command line, without the program's name.
    args: Vec<String>,
    /// The file stderr goes to from now on (created or truncated).
    stderr: Option<PathBuf>,
}

/// The size of RAM a `run` with `args` will ask for, read before they are parsed: its
/// `--mem`, or the `mem_mib` of the `vm.json` of its `--restore DIR`. A hint only: RAM
/// made ahead with it is used when the configuration agrees.
fn ram_hint(args: &[std::ffi::OsString]) -> Option<u64> {
    let value = |flag: &str| -> Option<&str> {
        let mut args = args.iter().filter_map(|arg| arg.to_str());
        while let Some(arg) = args.next() {
            if arg == flag {
                return args.next();
            }
            if let Some(value) = arg.strip_prefix(flag).and_then(|rest| rest.strip_prefix('=')) {
                return Some(value);
            }
        }
        None
    };
    match value("--restore") {
        Some(dir) => {
            let config = std::fs::read(Path::new(dir).join(carrel_vmm::snapshot::CONFIG_FILE)).ok()?;
            serde_json::from_slice::<serde_json::Value>(&config).ok()?.get("mem_mib")?.as_u64()
        }
        None => value("--mem")?.parse().ok(),
    }
}

/// Waits for the command line of the VM this process is to run, sent by the supervisor
/// that started it ahead of need: the fork and exec of a new process are then not part
/// of the VM's start. First it says `ready` on stdout, so a supervisor hands a VM only
/// to a standby that started well; stdout and stdin then read and write nothing.
fn standby() -> anyhow::Result<Cli> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").context("opening /dev/null")?;
    let redirect = |file: &std::fs::File, to: i32| {
        // SAFETY: dup2 of a descriptor this function owns onto a standard one.
        if unsafe { libc::dup2(file.as_raw_fd(), to) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(b"ready\n").and_then(|()| stdout.flush()).context("saying ready")?;
    drop(stdout);
    redirect(&null, libc::STDOUT_FILENO).context("closing stdout")?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading the command line")?;
    anyhow::ensure!(!line.is_empty(), "stdin closed before a command line came");
    let assignment: Assignment =
        serde_json::from_str(&line).context("the command line is not what carrel-vmm reads")?;
    redirect(&null, libc::STDIN_FILENO).context("closing stdin")?;
    if let Some(path) = &assignment.stderr {
        let log = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        redirect(&log, libc::STDERR_FILENO).with_context(|| format!("sending stderr to {}", path.display()))?;
    }
    let cli = Cli::try_parse_from(std::iter::once("carrel-vmm".to_string()).chain(assignment.args))
        .unwrap_or_else(|err| err.exit());
    Ok(cli)
}

/// Prints the completion script, written whole so a closed pipe is an error, not a panic.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<ExitCode> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "carrel-vmm", &mut script);
    std::io::Write::write_all(&mut std::io::stdout(), &script)?;
    Ok(ExitCode::SUCCESS)
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
    // The jail forks into its namespaces: a VM made ahead would not go with it.
    carrel_vmm::vstate::vm::discard_ahead();
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
fn disk(command: DiskCommand) -> anyhow::Result<ExitCode> {
    use carrel_vmm::disk::{self, layer::Layer, layer::ParentRef, Disk, DiskSpec};
    let describe = |path: &Path| -> anyhow::Result<Disk> {
        Ok(Disk::open(&DiskSpec { path: path.to_path_buf(), readonly: true, base: None, size: None })?)
    };
    match command {
        DiskCommand::Create { path, size, base } => {
            let disk = match base {
                Some(base) => {
                    Disk::open(&DiskSpec { path: path.clone(), readonly: false, base: Some(base), size: None })?
                }
                None => {
                    Layer::create(&path, size.unwrap_or_default(), ParentRef::None)?;
                    describe(&path)?
                }
            };
            println!("{}: {}", path.display(), disk.describe());
        }
        DiskCommand::Info { path } => {
            let disk = describe(&path)?;
            println!("{}: {}", path.display(), disk.describe());
            for (layer, id) in disk.state().layers {
                let hex: String = id.iter().map(|byte| format!("{byte:02x}")).collect();
                println!("  layer {} (id {hex})", layer.display());
            }
        }
        DiskCommand::Commit { path, out } => {
            let blocks = disk::commit(&path, out.as_deref())?;
            println!("{}: folded, {} MiB in one layer", out.as_ref().unwrap_or(&path).display(), (blocks * 4096) >> 20);
        }
    }
    Ok(ExitCode::SUCCESS)
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
            apply_overrides(&mut config, overrides)?;
            let jail = confine(options, &mut config, Some(&dir))?;
            (dir, jail)
        }
        None => (dir.to_path_buf(), confine(options, &mut VmConfig::default(), None)?),
    };
    carrel_vmm::timeline::mark("confined");
    let mut config = carrel_vmm::snapshot::read_config(&dir)?;
    apply_overrides(&mut config, overrides)?;
    if jail.is_some() {
        carrel_vmm::jail::resolve_config(&mut config)?;
    }
    let audit = AuditOpening::start(&config, jail.as_ref())?;
    let built = carrel_vmm::builder::restore_vm(&config, &dir, overrides.load, started)?;
    hand_over(jail.as_ref(), &config)?;
    carrel_vmm::timeline::mark("handed over");
    carrel_vmm::timeline::say(&format!(
        "carrel-vmm: restored {} ({} KVM, {} MiB, restore {}) in {:.1} ms",
        dir.display(),
        built.platform.name(),
        config.mem_mib,
        built.restores,
        started.elapsed().as_secs_f64() * 1e3
    ));
    run_vmm(Vmm::start(built, config, jail.as_ref(), audit)?, options)
}

/// The VM's identity and where it talks, from the restore's flags.
fn apply_overrides(config: &mut VmConfig, overrides: &RestoreOverrides) -> anyhow::Result<()> {
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
    if !overrides.disk_tops.is_empty() {
        let writable: Vec<_> = config.disks.iter_mut().filter(|disk| !disk.readonly).collect();
        anyhow::ensure!(
            writable.len() == overrides.disk_tops.len(),
            "--disk-top was given {} time(s), and the snapshot has {} writable disk(s)",
            overrides.disk_tops.len(),
            writable.len()
        );
        for (disk, top) in writable.into_iter().zip(&overrides.disk_tops) {
            disk.path.clone_from(top);
        }
    }
    Ok(())
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
    let audit = AuditOpening::start(&config, jail.as_ref())?;
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
    run_vmm(Vmm::start(built, config, jail.as_ref(), audit)?, options)
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

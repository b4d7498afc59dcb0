//! `carrel-vmm`: run a VM, or talk to a running VM's control socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use carrel_vmm::builder::build_vm;
use carrel_vmm::config::VmConfig;
use carrel_vmm::control::{ControlClient, Request, Response};
use carrel_vmm::vmm::{VmOutcome, Vmm};

const USAGE: &str = "usage:
  carrel-vmm run --kernel PATH [--initrd PATH] [--cmdline S] [--mem MiB] [--cpus N]
                 [--console-log PATH] [--no-console] [--socket PATH] [--boot auto|desk|linux|pvh]
                 [--no-rng] [--vsock PATH] [--cid N]
                 [--audit DIR] [--name NAME]
  carrel-vmm run --config vm.toml [flags above override the file]
  carrel-vmm status --socket PATH [--json]
  carrel-vmm stop --socket PATH";

/// A usage error: exit code 2 with the usage text.
struct Usage(String);

fn main() -> ExitCode {
    let started = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => parse_run(&args[1..]).map(|config| run(config, started)),
        Some("status") => parse_socket(&args[1..]).map(|(socket, json)| status(&socket, json)),
        Some("stop") => parse_socket(&args[1..]).map(|(socket, _)| stop(&socket)),
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
            "--audit" => config.audit = Some(value(args, &mut index, flag)?.into()),
            "--name" => config.name = value(args, &mut index, flag)?.to_string(),
            "--cid" => config.guest_cid = number(value(args, &mut index, flag)?, flag)?,
            other => return Err(Usage(format!("unknown flag {other:?}"))),
        }
        index += 1;
    }
    Ok(config)
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

fn run(config: VmConfig, started: Instant) -> anyhow::Result<ExitCode> {
    let built = build_vm(&config, started)?;
    eprintln!(
        "carrel-vmm: {} KVM ({}), {} boot, {} MiB, {} vCPU(s), built in {:.1} ms",
        built.platform.name(),
        match built.platform {
            carrel_vmm::platform::PlatformKind::Pvm => "paravirtual kvm_pvm",
            carrel_vmm::platform::PlatformKind::Hardware => "VMX/SVM",
        },
        format!("{:?}", built.boot.protocol).to_lowercase(),
        config.mem_mib,
        config.cpus,
        started.elapsed().as_secs_f64() * 1e3
    );
    let outcome = Vmm::start(built, config)?.run()?;
    Ok(match outcome {
        VmOutcome::PoweredOff(0) | VmOutcome::Stopped => ExitCode::SUCCESS,
        VmOutcome::PoweredOff(code) => {
            eprintln!("carrel-vmm: guest powered off with code {code}");
            ExitCode::from(code.clamp(1, 255) as u8)
        }
    })
}

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn status(socket: &PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    match ControlClient::connect(socket)?.call(&Request::Status, CALL_TIMEOUT)? {
        Response::Status(status) if json => {
            println!(
                "{{\"platform\":\"{}\",\"state\":\"{}\",\"boot_protocol\":\"{}\",\"vcpus\":{},\"mem_mib\":{},\"uptime_ms\":{},\"pid\":{}}}",
                status.platform, status.state, status.boot_protocol, status.vcpus, status.mem_mib, status.uptime_ms, status.pid
            );
            Ok(ExitCode::SUCCESS)
        }
        Response::Status(status) => {
            println!("state:     {}", status.state);
            println!("platform:  {}", status.platform);
            println!("boot:      {} ({})", status.boot_protocol, status.kernel);
            println!("vcpus:     {}", status.vcpus);
            println!("memory:    {} MiB", status.mem_mib);
            println!("devices:   {}", status.devices.join(", "));
            println!("uptime:    {} ms", status.uptime_ms);
            println!("pid:       {}", status.pid);
            Ok(ExitCode::SUCCESS)
        }
        Response::Error(message) => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

fn stop(socket: &PathBuf) -> anyhow::Result<ExitCode> {
    match ControlClient::connect(socket)?.call(&Request::Stop, CALL_TIMEOUT)? {
        Response::Stopping => Ok(ExitCode::SUCCESS),
        Response::Error(message) => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

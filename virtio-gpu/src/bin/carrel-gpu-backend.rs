//! `carrel-gpu-backend`: Carrel's virtio-gpu device as a vhost-user backend process. It
//! listens for one frontend (carrel-vmm run --gpu-backend), serves the device in the guest
//! memory the frontend shares, serves screenshots on the screen socket, and exits when the
//! frontend disconnects. Its main thread installs the backend's seccomp filter before it
//! starts any other thread, so the whole process runs under it (`--no-seccomp` to turn
//! it off).

use std::path::PathBuf;
use std::process::ExitCode;

use carrel_gpu::backend::{BackendConfig, BoundBackend};
use carrel_gpu::GpuConfig;

const USAGE: &str =
    "usage: carrel-gpu-backend --socket VHOST.sock --screen-socket SCREEN.sock [--display WxH] [--no-seccomp]";

fn parse(args: &[String]) -> Result<(BackendConfig, bool), String> {
    let (mut socket, mut screen_socket, mut display) = (None, None, (1280, 800));
    let mut seccomp = true;
    let mut arguments = args.iter();
    while let Some(flag) = arguments.next() {
        let mut value = || arguments.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--socket" => socket = Some(PathBuf::from(value()?)),
            "--screen-socket" => screen_socket = Some(PathBuf::from(value()?)),
            "--display" => {
                let text = value()?;
                let bad = || format!("--display takes WIDTHxHEIGHT (e.g. 1280x800), got {text:?}");
                let (width, height) = text.split_once('x').ok_or_else(bad)?;
                display = (width.parse().map_err(|_| bad())?, height.parse().map_err(|_| bad())?);
            }
            "--no-seccomp" => seccomp = false,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    let gpu = GpuConfig::new(display.0, display.1).map_err(|err| err.to_string())?;
    let config = BackendConfig {
        socket: socket.ok_or("--socket PATH is required")?,
        screen_socket: screen_socket.ok_or("--screen-socket PATH is required")?,
        gpu,
    };
    Ok((config, seccomp))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (config, seccomp) = match parse(&args) {
        Ok(parsed) => parsed,
        Err(message) if message.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("carrel-gpu-backend: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let summary = format!(
        "vhost-user on {}, screen on {}, display {}x{}",
        config.socket.display(),
        config.screen_socket.display(),
        config.gpu.width,
        config.gpu.height
    );
    let filtered = carrel_sandbox::enable("carrel-gpu-backend", seccomp)
        .and_then(|()| carrel_sandbox::install(carrel_sandbox::ThreadKind::GpuBackend));
    if let Err(err) = filtered {
        eprintln!("carrel-gpu-backend: error: {err}");
        return ExitCode::FAILURE;
    }
    let result = BoundBackend::bind(config).and_then(|bound| {
        eprintln!("carrel-gpu-backend: ready: {summary}");
        bound.serve()
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("carrel-gpu-backend: error: {err}");
            ExitCode::FAILURE
        }
    }
}

//! carreld: the Carrel host daemon. One gRPC socket (package carrel.v1, with gRPC health
//! and server reflection) for a host of agent computers, each its own supervised
//! `carrel-vmm` process. VMMs outlive a daemon restart and are re-attached.
//!
//! ```text
//! carreld [--socket /run/carrel/carrel.sock] [--state /var/lib/carrel]
//!         [--vmm PATH] [--kernel PATH] [--admin-gid GID] [--cgroup NAME | --no-cgroups]
//!         [--jail-uids UID | --no-jail] [--no-standby]
//! ```

mod cgroup;
mod host;
mod registry;
mod secrets;
mod service;
mod standby;
mod supervisor;
mod templates;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use carrel_api::v1;
use host::{Host, HostConfig};
use service::Services;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

const USAGE: &str = "usage: carreld [--socket PATH] [--state DIR] [--vmm PATH] [--kernel PATH] [--admin-gid GID]
               [--cgroup NAME | --no-cgroups] [--jail-uids UID | --no-jail] [--no-standby]
  --cgroup NAME   the VMs' cgroups go under NAME in carreld's own cgroup (default: carrel)
  --no-cgroups    run the VMs without resource limits
  --jail-uids UID each VMM runs jailed as its own uid from UID on (default 200000, when root)
  --no-jail       run the VMMs unjailed, as the daemon's user
  --no-standby    keep no carrel-vmm started ahead of the next VM (each start then forks one)";

/// The first uid of the jailed VMMs' range: far above the host's users (and out of the
/// way of the usual 100000+ subordinate-id ranges' first block).
const DEFAULT_FIRST_JAIL_UID: u32 = 200_000;

/// How long calls in flight may take to finish once carreld is asked to stop.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

struct Args {
    socket: PathBuf,
    config: HostConfig,
}

fn parse(args: &[String]) -> anyhow::Result<Args> {
    let exe_dir = std::env::current_exe()?.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut socket = PathBuf::from("/run/carrel/carrel.sock");
    let mut config = HostConfig {
        state: "/var/lib/carrel".into(),
        vmm: exe_dir.join("carrel-vmm"),
        default_kernel: exe_dir.join("../guests/desk.elf"),
        admin_gid: None,
        cgroup: Some("carrel".into()),
        // SAFETY: geteuid has no preconditions. Only root can build the jails.
        jail_uids: (unsafe { libc::geteuid() } == 0).then_some(DEFAULT_FIRST_JAIL_UID),
        standby: true,
    };
    let mut index = 0;
    while index < args.len() {
        let value = || args.get(index + 1).cloned().with_context(|| format!("{} needs a value\n{USAGE}", args[index]));
        match args[index].as_str() {
            "--socket" => socket = value()?.into(),
            "--state" => config.state = value()?.into(),
            "--vmm" => config.vmm = value()?.into(),
            "--kernel" => config.default_kernel = value()?.into(),
            "--admin-gid" => config.admin_gid = Some(value()?.parse().context("--admin-gid takes a number")?),
            "--cgroup" => {
                let name = value()?;
                let valid = name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
                if name.is_empty() || name.starts_with('.') || !valid {
                    bail!("--cgroup takes a name of letters, digits, '-', '_' and '.'");
                }
                config.cgroup = Some(name);
            }
            "--jail-uids" => {
                let first: u32 = value()?.parse().context("--jail-uids takes the first uid of the range")?;
                if first == 0 {
                    bail!("--jail-uids takes an unprivileged uid, not 0");
                }
                config.jail_uids = Some(first);
            }
            "--no-jail" => {
                config.jail_uids = None;
                index += 1;
                continue;
            }
            "--no-cgroups" => {
                config.cgroup = None;
                index += 1;
                continue;
            }
            "--no-standby" => {
                config.standby = false;
                index += 1;
                continue;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown flag {other:?}\n{USAGE}"),
        }
        index += 2;
    }
    Ok(Args { socket, config })
}

/// Binds the API socket: a live daemon on it is an error, a stale file is replaced.
fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!("another carreld is serving {} already", socket.display());
        }
        std::fs::remove_file(socket).with_context(|| format!("cannot remove the stale socket {}", socket.display()))?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
    // Anyone may connect; every request is then checked against the caller's peer
    // credentials (a VM is its owner's and the admin group's only).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Args { socket, config } = parse(&args)?;
    std::fs::create_dir_all(&config.state).with_context(|| format!("cannot create {}", config.state.display()))?;
    let listener = bind(&socket)?;
    let host = Host::open(config).await?;
    let services = Services { host: host.clone() };
    services.clone().lifecycle_policies();

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<v1::vms_server::VmsServer<Services>>().await;
    // Both reflection versions: grpcurl speaks v1, Python's grpcio-reflection v1alpha.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(carrel_api::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(carrel_api::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    eprintln!("carreld: serving {} ({} VMs in the registry)", socket.display(), host.vms.lock().await.len());
    // On SIGTERM or Ctrl-C new connections stop and calls in flight get a grace period:
    // an attached console or a watch is a stream that would otherwise hold the daemon
    // up for as long as its client stays.
    let (stopping, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = stopping.send(true);
    });
    let mut signalled = stop.clone();
    let shutdown = async move {
        let _ = signalled.wait_for(|stopped| *stopped).await;
    };
    let mut grace = stop;
    let grace_over = async move {
        let _ = grace.wait_for(|stopped| *stopped).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(v1::host_server::HostServer::new(services.clone()))
        .add_service(v1::vms_server::VmsServer::new(services.clone()))
        .add_service(v1::screen_server::ScreenServer::new(services.clone()))
        .add_service(v1::input_server::InputServer::new(services.clone()))
        .add_service(v1::agent_server::AgentServer::new(services.clone()))
        .add_service(v1::secrets_server::SecretsServer::new(services.clone()))
        .add_service(v1::console_server::ConsoleServer::new(services.clone()))
        .add_service(v1::snapshots_server::SnapshotsServer::new(services.clone()))
        .add_service(v1::templates_server::TemplatesServer::new(services.clone()))
        .add_service(v1::audit_server::AuditServer::new(services))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown);
    tokio::select! {
        served = server => served?,
        () = grace_over => eprintln!("carreld: streams still open after {SHUTDOWN_GRACE:?}: closing them"),
    }
    // The VMs run on; the next carreld re-attaches to them.
    host.standby.close().await;
    host.checkpoint_now();
    let _ = std::fs::remove_file(&socket);
    eprintln!("carreld: stopped; the VMs run on");
    Ok(())
}

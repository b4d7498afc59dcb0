//! carrel: the command-line client of carreld. Human output by default, `--json` for
//! scripts. Exit codes: 0 done; 2 usage; 10 + the gRPC status code when carreld refuses
//! (15 not found, 16 already exists, 17 permission denied, 19 failed precondition, 12
//! unimplemented, ...); `exec` exits with the guest command's own code.

use std::path::PathBuf;
use std::process::ExitCode;

use carrel_api::v1;
use clap::{CommandFactory, Parser, Subcommand};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(name = "carrel", about = "Drive the agent computers of a Carrel host (carreld)")]
struct Cli {
    /// carreld's socket.
    #[arg(long, default_value = "/run/carrel/carrel.sock", global = true)]
    socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The host: platform, CPUs, memory, VMs.
    Info,
    /// The VMs you may see.
    Ls,
    /// Create and start a VM.
    Create {
        name: String,
        #[arg(long, default_value_t = 128)]
        mem: u64,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        #[arg(long, default_value = "1280x800")]
        display: String,
        /// The guest kernel (default: carreld's Desk kernel).
        #[arg(long)]
        kernel: Option<String>,
        /// Leave it crashed when its VMM fails instead of restarting it.
        #[arg(long)]
        no_restart: bool,
        /// Restart it when its guest agent sends no heartbeat for this many seconds.
        #[arg(long, default_value_t = 0)]
        watchdog: u32,
        /// The most memory its VMM may use, in MiB, guest RAM included (default: --mem
        /// plus the VMM's overhead). Over it, the VMM is killed by the OOM killer.
        #[arg(long)]
        memory_limit: Option<u64>,
        /// A disk: PATH[,readonly][,base=RAW][,size=BYTES] (repeatable; the guest's
        /// /dev/vda, /dev/vdb, ... in order). A file name alone (`data.layer,size=1G`)
        /// is a disk of the VM's own, kept in its directory on the host and deleted with
        /// it; a path with a directory is taken from here.
        #[arg(long = "disk", value_parser = parse_disk)]
        disks: Vec<v1::Disk>,
        /// The most MiB per second its disks may read, and write, each (default: no limit).
        #[arg(long)]
        disk_mbps: Option<u64>,
        /// The most reads, and writes, per second on its disks (default: no limit).
        #[arg(long)]
        disk_iops: Option<u64>,
        /// Hibernate it after this many seconds with no call and an idle guest (default:
        /// never); the next call that needs it wakes it.
        #[arg(long, default_value_t = 0)]
        idle_hibernate: u32,
        /// Start from this template instead of a cold boot (its machine: give no --mem,
        /// --cpus, --display or --kernel that differ).
        #[arg(long)]
        template: Option<String>,
        /// Take a checkpoint at most this often (seconds) while it is in use; a crash or
        /// hang restarts it from the last one (default: no checkpoints).
        #[arg(long, default_value_t = 0)]
        checkpoint: u32,
        /// Checkpoints to keep (default 3).
        #[arg(long, default_value_t = 0)]
        keep: u32,
    },
    /// Return a VM to one of its snapshots or checkpoints (`carrel snapshots NAME`).
    Rollback {
        name: String,
        #[arg(long)]
        to: String,
    },
    /// One VM's state, owner, exit reason.
    Get {
        name: String,
    },
    Start {
        name: String,
    },
    Stop {
        name: String,
    },
    /// Stop and delete a VM.
    Rm {
        name: String,
    },
    /// Save a screenshot as PNG.
    Screenshot {
        name: String,
        #[arg(short, long)]
        output: PathBuf,
        /// Wait until the screen has been still this many ms first.
        #[arg(long, default_value_t = 0)]
        still: u64,
        /// Of a hibernated VM: wake it for a live frame (default: its saved screen).
        #[arg(long)]
        live: bool,
    },
    /// Save the VM to a snapshot of its own; it goes on running.
    Snapshot {
        name: String,
        /// Only what changed since its last snapshot.
        #[arg(long)]
        diff: bool,
    },
    /// Save the VM and end its VMM: it costs no CPU or RAM until woken (by `wake` or by
    /// any call that needs it running).
    Hibernate {
        name: String,
        #[arg(long)]
        diff: bool,
    },
    /// Wake a hibernated VM.
    Wake {
        name: String,
    },
    /// The VM's snapshots.
    Snapshots {
        name: String,
    },
    /// Click at X Y, then wait for the frame that shows it.
    Click {
        name: String,
        x: u32,
        y: u32,
    },
    /// Type text, or the value of one of your secrets (--secret NAME).
    Type {
        name: String,
        #[arg(required_unless_present = "secret", conflicts_with = "secret")]
        text: Option<String>,
        /// Type this secret's value (never shown, logged or recorded).
        #[arg(long)]
        secret: Option<String>,
    },
    /// Press a key combination such as ctrl+shift+t.
    Key {
        name: String,
        combo: String,
    },
    /// Run a command in the guest; exits with its exit code.
    Exec {
        name: String,
        /// VAR=SECRET: the command gets environment variable VAR set to your secret's value.
        #[arg(long = "secret-env", value_name = "VAR=SECRET")]
        secret_env: Vec<String>,
        #[arg(required = true, last = true)]
        argv: Vec<String>,
    },
    /// Your secrets, kept by carreld for you only.
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// Templates: snapshots of a ready VM that new VMs start from (`create --template`).
    Template {
        #[command(subcommand)]
        command: TemplateCommand,
    },
    /// Copy a file into or out of a VM: `carrel cp ./in.txt VM:/data/in.txt`, or
    /// `carrel cp VM:/data/out.txt ./out.txt`. The bytes travel through carreld.
    Cp {
        from: String,
        to: String,
    },
    /// The VM's serial console: its recent history, then live; typing goes to the guest.
    /// On a terminal it runs raw; Ctrl-] detaches.
    Console {
        name: String,
    },
    /// Print the VM's state and each change of it until it is deleted (or Ctrl-C).
    Watch {
        name: String,
    },
    /// Stop the VM and start it cold.
    Reboot {
        name: String,
    },
    /// Audit logs: a VM's records through carreld, or a check of a log's files.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print a shell completion script: `carrel completions bash > /etc/bash_completion.d/carrel`.
    Completions {
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// The VM's audit records, one JSON line each.
    Records {
        name: String,
        /// From this record index on.
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Check an audit log's directory (a VM's `<state>/vms/NAME/audit` or carreld's
    /// `<state>/audit`, or a copy of one) offline: every record, the Merkle tree and the
    /// signed checkpoints. Exits 1 when anything is wrong.
    Verify { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
enum TemplateCommand {
    /// Make template NAME from a running VM of yours (without disks).
    Create {
        name: String,
        #[arg(long)]
        from_vm: String,
    },
    /// The templates you may use.
    Ls,
    /// Forget a template no VM uses.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
enum SecretCommand {
    /// Keep a secret: its value is read from stdin (never from the command line, which
    /// every user of the host can read in /proc/PID/cmdline). One trailing newline is
    /// dropped.
    Set { name: String },
    /// Your secrets' names and lengths (never their values).
    Ls,
    /// Forget a secret.
    Rm { name: String },
}

async fn connect(socket: &std::path::Path) -> Result<Channel, String> {
    carrel_api::connect(socket)
        .await
        .map_err(|err| format!("cannot reach carreld at {}: {err}. Is carreld running?", socket.display()))
}

fn state_name(state: i32) -> &'static str {
    match v1::VmState::try_from(state) {
        Ok(v1::VmState::Starting) => "starting",
        Ok(v1::VmState::Running) => "running",
        Ok(v1::VmState::Paused) => "paused",
        Ok(v1::VmState::Stopped) => "stopped",
        Ok(v1::VmState::Crashed) => "crashed",
        Ok(v1::VmState::Hibernated) => "hibernated",
        _ => "unknown",
    }
}

fn vm_json(vm: &v1::Vm) -> serde_json::Value {
    let usage = vm.usage.as_ref().map(|usage| {
        serde_json::json!({
            "memory_current_bytes": usage.memory_current_bytes,
            "memory_peak_bytes": usage.memory_peak_bytes,
            "memory_limit_bytes": usage.memory_limit_bytes,
            "cpu_usage_us": usage.cpu_usage_us,
            "cpu_quota_us": usage.cpu_quota_us,
            "pids_current": usage.pids_current,
            "pids_limit": usage.pids_limit,
            "oom_kills": usage.oom_kills,
            "cgroup_version": usage.cgroup_version,
        })
    });
    serde_json::json!({
        "name": vm.name,
        "state": state_name(vm.state),
        "owner_uid": vm.owner_uid,
        "pid": vm.pid,
        "restarts": vm.restarts,
        "exit_reason": vm.exit_reason,
        "usage": usage,
    })
}

/// "12.3 MiB".
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

fn print_usage(usage: &v1::ResourceUsage) {
    let limit = if usage.memory_limit_bytes == 0 { "no limit".to_string() } else { mib(usage.memory_limit_bytes) };
    println!(
        "  memory {} (peak {}) of {limit}; cpu {:.2} s (quota {} %); tasks {} of {}; oom kills {} (cgroup {})",
        mib(usage.memory_current_bytes),
        mib(usage.memory_peak_bytes),
        usage.cpu_usage_us as f64 / 1e6,
        usage.cpu_quota_us / 1000,
        usage.pids_current,
        usage.pids_limit,
        usage.oom_kills,
        usage.cgroup_version
    );
}

fn print_vm(vm: &v1::Vm, json: bool) {
    if json {
        println!("{}", vm_json(vm));
    } else {
        println!(
            "{:<20} {:<9} uid {:<6} pid {:<8} restarts {}",
            vm.name,
            state_name(vm.state),
            vm.owner_uid,
            vm.pid,
            vm.restarts
        );
        if !vm.exit_reason.is_empty() {
            println!("  last exit: {}", vm.exit_reason);
        }
        if let Some(usage) = &vm.usage {
            print_usage(usage);
        }
    }
}

/// The exit code of a refusal: 10 + its gRPC code.
fn refused(status: tonic::Status) -> Outcome {
    Outcome::Refused(status)
}

/// Prints the VM an RPC answered with, or the refusal.
fn vm_answer(answer: Result<tonic::Response<v1::Vm>, tonic::Status>, json: bool) -> Outcome {
    match answer {
        Ok(vm) => {
            print_vm(&vm.into_inner(), json);
            Outcome::Done
        }
        Err(status) => refused(status),
    }
}

enum Outcome {
    Done,
    Code(u8),
    Refused(tonic::Status),
}

async fn run(cli: Cli) -> Result<Outcome, String> {
    let channel = connect(&cli.socket).await?;
    let mut vms = v1::vms_client::VmsClient::new(channel.clone());
    let json = cli.json;
    let act = |name: String, action: v1::act_request::Action| v1::ActRequest {
        name,
        action: Some(action),
        screenshot: false,
        timeout_ms: 5_000,
    };
    match cli.command {
        Command::Info => match v1::host_client::HostClient::new(channel).info(v1::HostInfoRequest {}).await {
            Ok(info) => {
                let info = info.into_inner();
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"platform": info.platform, "cpus": info.cpus, "memory_bytes": info.memory_bytes, "vms": info.vms, "version": info.carreld_version})
                    );
                } else {
                    println!(
                        "platform {}, {} CPUs, {} MiB, {} VMs, carreld {}",
                        info.platform,
                        info.cpus,
                        info.memory_bytes >> 20,
                        info.vms,
                        info.carreld_version
                    );
                }
                Ok(Outcome::Done)
            }
            Err(status) => Ok(refused(status)),
        },
        Command::Ls => match vms.list(v1::ListVmsRequest {}).await {
            Ok(list) => {
                let list = list.into_inner().vms;
                if json {
                    println!("{}", serde_json::Value::Array(list.iter().map(vm_json).collect()));
                } else {
                    for vm in &list {
                        print_vm(vm, false);
                    }
                }
                Ok(Outcome::Done)
            }
            Err(status) => Ok(refused(status)),
        },
        Command::Create {
            name,
            mem,
            cpus,
            display,
            kernel,
            no_restart,
            watchdog,
            memory_limit,
            disks,
            disk_mbps,
            disk_iops,
            idle_hibernate,
            template,
            checkpoint,
            keep,
        } => {
            let mut config = v1::VmConfig {
                kernel: kernel.unwrap_or_default(),
                memory_mib: mem,
                cpus,
                display,
                restart: if no_restart { v1::RestartPolicy::Never as i32 } else { v1::RestartPolicy::OnFailure as i32 },
                watchdog_seconds: watchdog,
                memory_limit_mib: memory_limit.unwrap_or(0),
                disks,
                disk_bytes_per_second: disk_mbps.map_or(0, |mbps| mbps << 20),
                disk_iops: disk_iops.unwrap_or(0),
                idle_hibernate_seconds: idle_hibernate,
                checkpoint_seconds: checkpoint,
                keep_checkpoints: keep,
                ..Default::default()
            };
            let template = template.unwrap_or_default();
            if !template.is_empty() {
                // The template's machine: only what was asked for is sent.
                config.memory_mib = 0;
                config.cpus = 0;
                config.display.clear();
            }
            let creating = vms.create(v1::CreateVmRequest { name, config: Some(config), template });
            Ok(vm_answer(with_elapsed("starting", creating).await, json))
        }
        Command::Get { name } => Ok(vm_answer(vms.get(v1::GetVmRequest { name }).await, json)),
        Command::Start { name } => Ok(vm_answer(vms.start(v1::VmName { name }).await, json)),
        Command::Stop { name } => Ok(vm_answer(vms.stop(v1::VmName { name }).await, json)),
        Command::Rm { name } => Ok(match vms.delete(v1::VmName { name }).await {
            Ok(_) => Outcome::Done,
            Err(status) => refused(status),
        }),
        Command::Snapshot { name, diff } => Ok(save(channel, v1::SnapshotRequest { name, diff }, false, json).await),
        Command::Hibernate { name, diff } => Ok(save(channel, v1::SnapshotRequest { name, diff }, true, json).await),
        Command::Rollback { name, to } => {
            let request = v1::RollbackRequest { name, id: to };
            Ok(vm_answer(v1::snapshots_client::SnapshotsClient::new(channel).rollback(request).await, json))
        }
        Command::Wake { name } => {
            let answer = v1::snapshots_client::SnapshotsClient::new(channel).wake(v1::VmName { name }).await;
            Ok(vm_answer(answer, json))
        }
        Command::Snapshots { name } => {
            Ok(match v1::snapshots_client::SnapshotsClient::new(channel).list(v1::VmName { name }).await {
                Ok(list) => {
                    for info in list.into_inner().snapshots {
                        print_snapshot(&info, json);
                    }
                    Outcome::Done
                }
                Err(status) => refused(status),
            })
        }
        Command::Screenshot { name, output, still, live } => {
            let request =
                v1::ScreenshotRequest { name, still_ms: still, timeout_ms: 10_000, live, ..Default::default() };
            Ok(match v1::screen_client::ScreenClient::new(channel).screenshot(request).await {
                Ok(shot) => {
                    let shot = shot.into_inner();
                    std::fs::write(&output, &shot.image)
                        .map_err(|err| format!("cannot write {}: {err}", output.display()))?;
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"width": shot.width, "height": shot.height, "frame": shot.frame, "file": output})
                        );
                    } else {
                        println!("{}x{} frame {} -> {}", shot.width, shot.height, shot.frame, output.display());
                    }
                    Outcome::Done
                }
                Err(status) => refused(status),
            })
        }
        Command::Secret { command } => secret(channel, command, json).await,
        Command::Template { command } => template(channel, command, json).await,
        Command::Completions { .. } => unreachable!("answered in main, without carreld"),
        Command::Cp { from, to } => copy(channel, &from, &to, json).await,
        Command::Console { name } => console(channel, name).await,
        Command::Reboot { name } => Ok(vm_answer(vms.reboot(v1::VmName { name }).await, json)),
        Command::Watch { name } => {
            let mut events = match vms.watch(v1::VmName { name }).await {
                Ok(events) => events.into_inner(),
                Err(status) => return Ok(refused(status)),
            };
            loop {
                match events.message().await {
                    Ok(Some(event)) if json => println!(
                        "{}",
                        serde_json::json!({"name": event.name, "state": state_name(event.state), "reason": event.reason})
                    ),
                    Ok(Some(event)) => println!("{} {} {}", event.name, state_name(event.state), event.reason),
                    Ok(None) => return Ok(Outcome::Done),
                    Err(status) if status.code() == tonic::Code::NotFound => return Ok(Outcome::Done),
                    Err(status) => return Ok(refused(status)),
                }
            }
        }
        Command::Audit { command: AuditCommand::Verify { .. } } => unreachable!("answered in main, without carreld"),
        Command::Audit { command: AuditCommand::Records { name, from } } => {
            let mut client = v1::audit_client::AuditClient::new(channel);
            let mut records = match client.records(v1::AuditRequest { name, from }).await {
                Ok(records) => records.into_inner(),
                Err(status) => return Ok(refused(status)),
            };
            loop {
                match records.message().await {
                    Ok(Some(record)) => println!("{}", record.json),
                    Ok(None) => return Ok(Outcome::Done),
                    Err(status) => return Ok(refused(status)),
                }
            }
        }
        Command::Click { name, x, y } => {
            input(channel, act(name, v1::act_request::Action::Click(v1::Click { x, y })), json).await
        }
        Command::Type { name, text, secret } => {
            let action = match (text, secret) {
                (_, Some(secret)) => v1::act_request::Action::TypeSecret(secret),
                (Some(text), None) => v1::act_request::Action::TypeText(text),
                (None, None) => return Err("give the text to type, or --secret NAME".into()),
            };
            input(channel, act(name, action), json).await
        }
        Command::Key { name, combo } => input(channel, act(name, v1::act_request::Action::Key(combo)), json).await,
        Command::Exec { name, secret_env, argv } => {
            let secret_env = secret_env
                .iter()
                .map(|pair| match pair.split_once('=') {
                    Some((variable, secret)) => Ok(v1::SecretEnv { variable: variable.into(), secret: secret.into() }),
                    None => Err(format!("--secret-env takes VAR=SECRET, got {pair:?}")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let request = v1::ExecRequest { name, argv, secret_env, ..Default::default() };
            Ok(match v1::agent_client::AgentClient::new(channel).exec(request).await {
                Ok(done) => {
                    use std::io::Write;
                    let done = done.into_inner();
                    std::io::stdout().write_all(&done.stdout).map_err(|err| err.to_string())?;
                    std::io::stderr().write_all(&done.stderr).map_err(|err| err.to_string())?;
                    Outcome::Code(if done.timed_out { 124 } else { done.exit_code.clamp(0, 255) as u8 })
                }
                Err(status) => refused(status),
            })
        }
    }
}

async fn secret(channel: Channel, command: SecretCommand, json: bool) -> Result<Outcome, String> {
    let mut secrets = v1::secrets_client::SecretsClient::new(channel);
    let answer = match command {
        SecretCommand::Set { name } => {
            use std::io::Read;
            let mut value = Vec::new();
            std::io::stdin()
                .read_to_end(&mut value)
                .map_err(|err| format!("cannot read the secret from stdin: {err}"))?;
            if value.last() == Some(&b'\n') {
                value.pop();
            }
            secrets.set(v1::SetSecretRequest { name, value }).await.map(|info| {
                let info = info.into_inner();
                if json {
                    println!("{}", serde_json::json!({"name": info.name, "length": info.length}));
                } else {
                    println!("secret {} kept ({} bytes)", info.name, info.length);
                }
            })
        }
        SecretCommand::Ls => secrets.list(v1::ListSecretsRequest {}).await.map(|list| {
            let list = list.into_inner().secrets;
            if json {
                let entries = list.iter().map(|info| serde_json::json!({"name": info.name, "length": info.length}));
                println!("{}", serde_json::Value::Array(entries.collect()));
            } else {
                for info in &list {
                    println!("{:<32} {} bytes", info.name, info.length);
                }
            }
        }),
        SecretCommand::Rm { name } => secrets.delete(v1::DeleteSecretRequest { name }).await.map(|_| ()),
    };
    Ok(match answer {
        Ok(()) => Outcome::Done,
        Err(status) => refused(status),
    })
}

async fn input(channel: Channel, request: v1::ActRequest, json: bool) -> Result<Outcome, String> {
    Ok(match v1::input_client::InputClient::new(channel).act(request).await {
        Ok(done) => {
            let done = done.into_inner();
            if json {
                println!("{}", serde_json::json!({"frame": done.frame, "timed_out": done.timed_out}));
            } else if done.timed_out {
                println!("done; no new frame within the timeout");
            } else {
                println!("done; frame {}", done.frame);
            }
            Outcome::Done
        }
        Err(status) => refused(status),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Audit { command: AuditCommand::Verify { dir } } = &cli.command {
        // Offline: the log's own files, no daemon needed.
        return match carrel_audit::verify_dir(dir, &carrel_audit::VerifyOptions::default()) {
            Ok(report) => {
                for line in report.lines(Some(50)) {
                    println!("{line}");
                }
                if report.ok() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(err) => {
                eprintln!("carrel: cannot verify {}: {}", dir.display(), carrel_audit::error_chain(&err));
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Completions { shell } = cli.command {
        // Written whole, so a closed pipe (`| head`) is a quiet error, not a panic.
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "carrel", &mut script);
        return match std::io::Write::write_all(&mut std::io::stdout(), &script) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    match run(cli).await {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Code(code)) => ExitCode::from(code),
        Ok(Outcome::Refused(status)) => {
            eprintln!("carrel: {:?}: {}", status.code(), status.message());
            ExitCode::from(10 + status.code() as u8)
        }
        Err(message) => {
            eprintln!("carrel: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `PATH[,readonly][,base=RAW][,size=BYTES]`, as `carrel-vmm run --disk` takes it.
fn parse_disk(text: &str) -> Result<v1::Disk, String> {
    let mut parts = text.split(',');
    let path = parts.next().filter(|path| !path.is_empty()).ok_or("a disk needs a PATH")?;
    // carreld runs elsewhere: a path with a directory is made absolute from here; a file
    // name alone stays one (a disk of the VM's own).
    let from_here = |path: &str| {
        std::path::absolute(path).map(|path| path.display().to_string()).map_err(|err| format!("{path}: {err}"))
    };
    let path = if path.contains('/') { from_here(path)? } else { path.to_string() };
    let mut disk = v1::Disk { path, ..Default::default() };
    for part in parts {
        match part.split_once('=') {
            None if part == "readonly" => disk.readonly = true,
            Some(("base", base)) => disk.base = from_here(base)?,
            Some(("size", size)) => {
                disk.size_bytes = size.parse().map_err(|_| format!("size={size} is not a number of bytes"))?
            }
            _ => return Err(format!("unknown disk option {part:?} (readonly, base=RAW, size=BYTES)")),
        }
    }
    Ok(disk)
}

fn print_snapshot(info: &v1::SnapshotInfo, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "id": info.id,
                "diff": info.diff,
                "memory_bytes": info.memory_bytes,
                "disk_bytes": info.disk_bytes,
                "paused_us": info.paused_us,
                "unix_time": info.unix_time,
                "checkpoint": info.checkpoint,
                "parent": info.parent,
            })
        );
    } else {
        println!(
            "{}{}{}: {} KiB of memory, {} KiB on disk, paused {:.1} ms",
            info.id,
            if info.checkpoint { " checkpoint" } else { "" },
            match (info.diff, info.parent.as_str()) {
                (false, _) => String::new(),
                (true, "") => " (diff)".to_string(),
                (true, parent) => format!(" (diff over {parent})"),
            },
            info.memory_bytes >> 10,
            info.disk_bytes >> 10,
            info.paused_us as f64 / 1e3
        );
    }
}

/// A snapshot, or a hibernation, of one VM. On a terminal it shows how far the VMM is
/// with the memory (MiB done of the total, the rate) as the daemon streams it; a daemon
/// without `Snapshots.Save` gets the plain call, with the time it takes.
async fn save(channel: Channel, request: v1::SnapshotRequest, hibernate: bool, json: bool) -> Outcome {
    let mut client = v1::snapshots_client::SnapshotsClient::new(channel);
    let doing = if hibernate { "hibernating" } else { "saving" };
    let streamed = v1::SaveRequest { name: request.name.clone(), diff: request.diff, hibernate };
    let answer = match client.save(streamed).await {
        Ok(events) => with_save_progress(doing, events.into_inner()).await,
        Err(status) if status.code() == tonic::Code::Unimplemented => with_elapsed(doing, async {
            if hibernate {
                client.hibernate(request).await
            } else {
                client.snapshot(request).await
            }
        })
        .await
        .map(tonic::Response::into_inner),
        Err(status) => Err(status),
    };
    match answer {
        Ok(info) => {
            print_snapshot(&info, json);
            Outcome::Done
        }
        Err(status) => refused(status),
    }
}

/// Follows a save's events to its snapshot, showing on a terminal's stderr the memory's
/// progress (`carrel: hibernating... 512.0 of 1024.0 MiB (50 %), 830 MiB/s, 0.7 s`) or, before
/// it, the time.
async fn with_save_progress(
    doing: &str,
    mut events: tonic::Streaming<v1::SaveEvent>,
) -> Result<v1::SnapshotInfo, tonic::Status> {
    // SAFETY: isatty only inspects the fd.
    let terminal = unsafe { libc::isatty(2) } == 1;
    let started = std::time::Instant::now();
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(100));
    let mut latest: Option<v1::SaveProgress> = None;
    let mut shown = false;
    let result = loop {
        tokio::select! {
            event = events.message() => match event {
                Ok(Some(v1::SaveEvent { event: Some(v1::save_event::Event::Progress(progress)) })) => {
                    latest = Some(progress);
                }
                Ok(Some(v1::SaveEvent { event: Some(v1::save_event::Event::Done(info)) })) => break Ok(info),
                Ok(Some(v1::SaveEvent { event: None })) => {}
                Ok(None) => break Err(tonic::Status::unavailable("the daemon ended the save without its result")),
                Err(status) => break Err(status),
            },
            _ = ticker.tick() => {
                // Only what takes a while shows: a save the VMM tells progress of does.
                if terminal && (latest.is_some() || started.elapsed() >= std::time::Duration::from_millis(300)) {
                    eprint!("\rcarrel: {doing}... {}\x1b[K", save_progress_text(latest.as_ref(), started.elapsed()));
                    shown = true;
                }
            }
        }
    };
    if shown {
        if let Ok(info) = &result {
            // The whole, once done: the memory the VMM looked at was all of it.
            let elapsed_us = started.elapsed().as_micros() as u64;
            let whole =
                latest.map(|progress| v1::SaveProgress { done_bytes: progress.total_bytes, elapsed_us, ..progress });
            let whole = whole.filter(|_| info.memory_bytes > 0);
            eprint!("\rcarrel: {doing}... {}\x1b[K", save_progress_text(whole.as_ref(), started.elapsed()));
        }
        eprintln!();
    }
    result
}

/// `512.0 of 1024.0 MiB (50 %), 830 MiB/s, 0.7 s`, or only the time before the memory
/// is being written.
fn save_progress_text(progress: Option<&v1::SaveProgress>, elapsed: std::time::Duration) -> String {
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    match progress.filter(|progress| progress.total_bytes > 0) {
        Some(progress) => {
            let rate = mib(progress.done_bytes) / (progress.elapsed_us.max(1) as f64 / 1e6);
            format!(
                "{:.1} of {:.1} MiB ({} %), {:.0} MiB/s, {:.1} s",
                mib(progress.done_bytes),
                mib(progress.total_bytes),
                progress.done_bytes * 100 / progress.total_bytes,
                rate,
                elapsed.as_secs_f64()
            )
        }
        None => format!("{:.1} s", elapsed.as_secs_f64()),
    }
}

async fn template(channel: Channel, command: TemplateCommand, json: bool) -> Result<Outcome, String> {
    let mut client = v1::templates_client::TemplatesClient::new(channel);
    let print = |template: &v1::Template| {
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "name": template.name,
                    "from_vm": template.from_vm,
                    "owner_uid": template.owner_uid,
                    "memory_mib": template.memory_mib,
                    "cpus": template.cpus,
                    "display": template.display,
                    "memory_bytes": template.memory_bytes,
                    "unix_time": template.unix_time,
                })
            );
        } else {
            println!(
                "{:<20} from {:<20} {} MiB, {} vCPU(s), {}, {} KiB of memory saved",
                template.name,
                template.from_vm,
                template.memory_mib,
                template.cpus,
                template.display,
                template.memory_bytes >> 10
            );
        }
    };
    Ok(match command {
        TemplateCommand::Create { name, from_vm } => {
            match with_elapsed("saving the template", client.create(v1::CreateTemplateRequest { name, from_vm })).await
            {
                Ok(template) => {
                    print(&template.into_inner());
                    Outcome::Done
                }
                Err(status) => refused(status),
            }
        }
        TemplateCommand::Ls => match client.list(v1::ListTemplatesRequest {}).await {
            Ok(list) => {
                list.into_inner().templates.iter().for_each(print);
                Outcome::Done
            }
            Err(status) => refused(status),
        },
        TemplateCommand::Rm { name } => match client.delete(v1::TemplateName { name }).await {
            Ok(_) => Outcome::Done,
            Err(status) => refused(status),
        },
    })
}

/// `carrel cp`: one side is `VM:/path`, the other a local file.
async fn copy(channel: Channel, from: &str, to: &str, json: bool) -> Result<Outcome, String> {
    fn remote(text: &str) -> Option<(&str, &str)> {
        text.split_once(':').filter(|(vm, path)| !vm.is_empty() && path.starts_with('/'))
    }
    let mut agent = v1::agent_client::AgentClient::new(channel);
    match (remote(from), remote(to)) {
        (None, Some((name, path))) => {
            let bytes = std::fs::read(from).map_err(|err| format!("cannot read {from}: {err}"))?;
            let size = bytes.len() as u64;
            let mut chunks: Vec<v1::PutChunk> = bytes
                .chunks(256 << 10)
                .map(|data| v1::PutChunk { data: data.to_vec(), ..Default::default() })
                .collect();
            if chunks.is_empty() {
                chunks.push(v1::PutChunk::default());
            }
            chunks[0] = v1::PutChunk { name: name.into(), path: path.into(), size, mode: 0o644, ..chunks[0].clone() };
            let mut progress = Progress::new(Some(size));
            let chunks = tokio_stream::StreamExt::map(tokio_stream::iter(chunks), move |chunk| {
                progress.add(chunk.data.len() as u64);
                chunk
            });
            Ok(match agent.put(chunks).await {
                Ok(done) => {
                    let done = done.into_inner();
                    match json {
                        true => println!("{}", serde_json::json!({"bytes": done.bytes, "blake3": done.blake3})),
                        false => println!("{} bytes, blake3 {}", done.bytes, done.blake3),
                    }
                    Outcome::Done
                }
                Err(status) => refused(status),
            })
        }
        (Some((name, path)), None) => {
            let request = v1::GetRequest { name: name.into(), path: path.into() };
            let mut stream = match agent.get(request).await {
                Ok(stream) => stream.into_inner(),
                Err(status) => return Ok(refused(status)),
            };
            // Written to a temporary file beside `to` and renamed once whole: a failed
            // copy leaves `to` as it was.
            let temporary = format!("{to}.carrel-partial");
            let mut bytes = Vec::new();
            let mut progress = Progress::new(None);
            loop {
                match stream.message().await {
                    Ok(Some(chunk)) => {
                        progress.add(chunk.data.len() as u64);
                        bytes.extend(chunk.data);
                    }
                    Ok(None) => break,
                    Err(status) => return Ok(refused(status)),
                }
            }
            std::fs::write(&temporary, &bytes).map_err(|err| format!("cannot write {temporary}: {err}"))?;
            std::fs::rename(&temporary, to).map_err(|err| format!("cannot write {to}: {err}"))?;
            match json {
                true => println!("{}", serde_json::json!({"bytes": bytes.len(), "file": to})),
                false => println!("{} bytes -> {to}", bytes.len()),
            }
            Ok(Outcome::Done)
        }
        _ => Err("give one side as VM:/absolute/path and the other as a local file".into()),
    }
}

/// A terminal in raw mode until dropped (keys go to the guest as typed).
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode on stdin when it is a terminal.
    fn enter() -> Option<RawTerminal> {
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0, which is open.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above; a non-terminal stdin makes tcgetattr fail, and nothing changes.
        if unsafe { libc::isatty(0) } != 1 || unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the copy; tcsetattr applies it to fd 0.
        unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw);
        }
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from fd 0 in `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// Ctrl-]: detach from the console.
const DETACH: u8 = 0x1d;

/// `carrel console`: history and live output to stdout, stdin to the guest.
async fn console(channel: Channel, name: String) -> Result<Outcome, String> {
    use std::io::Write;
    let (sender, receiver) = tokio::sync::mpsc::channel::<v1::ConsoleInput>(16);
    sender.send(v1::ConsoleInput { name, data: Vec::new() }).await.map_err(|err| err.to_string())?;
    let mut client = v1::console_client::ConsoleClient::new(channel);
    let mut output = match client.attach(tokio_stream::wrappers::ReceiverStream::new(receiver)).await {
        Ok(output) => output.into_inner(),
        Err(status) => return Ok(refused(status)),
    };
    let terminal = RawTerminal::enter();
    if terminal.is_some() {
        eprint!("carrel: attached; Ctrl-] detaches\r\n");
    }
    // Keys are read on a thread of their own (stdin blocks) and sent in order.
    let (keys, mut typed) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut buffer = [0u8; 256];
        loop {
            match std::io::Read::read(&mut std::io::stdin(), &mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(count) => {
                    if keys.blocking_send(buffer[..count].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let outcome = loop {
        tokio::select! {
            chunk = output.message() => match chunk {
                Ok(Some(chunk)) => {
                    let mut stdout = std::io::stdout();
                    let _ = stdout.write_all(&chunk.data).and_then(|()| stdout.flush());
                }
                Ok(None) => break Outcome::Done,
                Err(status) => break refused(status),
            },
            Some(bytes) = typed.recv() => {
                let detach = terminal.is_some() && bytes.contains(&DETACH);
                let data: Vec<u8> = bytes.into_iter().take_while(|byte| !(detach && *byte == DETACH)).collect();
                if !data.is_empty() {
                    let _ = sender.send(v1::ConsoleInput { name: String::new(), data }).await;
                }
                if detach {
                    break Outcome::Done;
                }
            }
        }
    };
    drop(terminal);
    Ok(outcome)
}

/// A transfer's progress on stderr, when stderr is a terminal: MiB so far (of the total
/// when known), rewritten in place at most every 100 ms, and a newline at the end.
struct Progress {
    done: u64,
    total: Option<u64>,
    shown: Option<std::time::Instant>,
    terminal: bool,
}

impl Progress {
    fn new(total: Option<u64>) -> Progress {
        // SAFETY: isatty only inspects the fd.
        let terminal = unsafe { libc::isatty(2) } == 1;
        Progress { done: 0, total, shown: None, terminal }
    }

    fn add(&mut self, bytes: u64) {
        self.done += bytes;
        let due = self.shown.is_none_or(|shown| shown.elapsed() >= std::time::Duration::from_millis(100));
        if self.terminal && (due || Some(self.done) == self.total) {
            self.shown = Some(std::time::Instant::now());
            let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
            match self.total {
                Some(total) => eprint!("\rcarrel: {:.1} of {:.1} MiB", mib(self.done), mib(total)),
                None => eprint!("\rcarrel: {:.1} MiB", mib(self.done)),
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.terminal && self.shown.is_some() {
            eprintln!();
        }
    }
}

/// Runs `work`, showing on a terminal's stderr what is being done and for how long
/// (`carrel: hibernating... 1.4 s`) until it ends; the daemon's calls carry no progress.
async fn with_elapsed<T>(doing: &str, work: impl std::future::Future<Output = T>) -> T {
    // SAFETY: isatty only inspects the fd.
    if unsafe { libc::isatty(2) } != 1 {
        return work.await;
    }
    let started = std::time::Instant::now();
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(100));
    tokio::pin!(work);
    let mut shown = false;
    let result = loop {
        tokio::select! {
            result = &mut work => break result,
            _ = ticker.tick() => {
                // Only what takes a while shows.
                if started.elapsed() >= std::time::Duration::from_millis(300) {
                    eprint!("\rcarrel: {doing}... {:.1} s", started.elapsed().as_secs_f64());
                    shown = true;
                }
            }
        }
    };
    if shown {
        eprintln!();
    }
    result
}

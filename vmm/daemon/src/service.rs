//! The gRPC services over the host: each call checks the caller's peer credentials
//! against the VM's owner, then speaks to that VM's carrel-vmm over its control socket.
//! The VMM's error kinds become precise gRPC codes; what is not built answers
//! UNIMPLEMENTED with a message.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use carrel_api::v1;
use carrel_vmm::control::{ErrorKind, Failure, ImageFormat, InputRequest, Request, Response, ScreenshotRequest, Wait};
use tokio_stream::Stream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};

use crate::cgroup::{MIN_MEMORY_LIMIT_MIB, VMM_OVERHEAD_MIB};
use crate::host::{Caller, Host, VmEntry};
use crate::registry::{valid_name, DiskRecord, SnapshotRecord, TemplateSource, VmRecord, VmSpec};
use crate::secrets::SecretError;
use crate::supervisor;
use crate::templates::{TemplateError, TemplateRecord};

/// How long one per-VM control call may take beyond what the request itself waits.
const CALL_SLACK: Duration = Duration::from_secs(10);

/// How much console history a Console.Attach starts with.
const CONSOLE_HISTORY: u64 = 64 << 10;
/// How often an attached console looks for new output.
const CONSOLE_POLL: Duration = Duration::from_millis(20);

/// How often a save with progress asks the VMM how far it is.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// How often the lifecycle policies look at the VMs.
const POLICY_TICK: Duration = Duration::from_millis(500);
/// CPU a guest may use per second and still count as idle: 1 % of a core (an idle
/// tickless Desk uses under 0.1 %).
const IDLE_CPU_US_PER_SECOND: u64 = 10_000;
/// Diffs in a row before a hibernation saves a full snapshot again, so a wake never reads
/// a long chain.
const MAX_DIFFS_IN_A_ROW: usize = 16;

/// What a save of a VM is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Save {
    /// Asked for: kept until the VM is deleted.
    Snapshot,
    /// Then its VMM ends.
    Hibernate,
    /// By the checkpoint policy: pruned past the newest `keep_checkpoints`.
    Checkpoint,
}

/// The services, sharing the host.
#[derive(Debug, Clone)]
pub struct Services {
    pub host: Arc<Host>,
}

/// The caller's credentials; a connection without them is refused.
fn caller<T>(request: &GrpcRequest<T>) -> Result<Caller, Status> {
    let credentials = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .ok_or_else(|| Status::unauthenticated("no peer credentials on this connection"))?;
    Ok(Caller { pid: credentials.pid().unwrap_or(0), uid: credentials.uid(), gid: credentials.gid() })
}

/// A VMM failure as a gRPC status of its kind.
pub fn status_of(failure: Failure) -> Status {
    let code = match failure.kind {
        ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
        ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorKind::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        ErrorKind::Unavailable => tonic::Code::Unavailable,
        ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
        ErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
        ErrorKind::Aborted => tonic::Code::Aborted,
        ErrorKind::Unimplemented => tonic::Code::Unimplemented,
        ErrorKind::Internal => tonic::Code::Internal,
    };
    Status::new(code, failure.message)
}

/// One request to a VM's carrel-vmm for `caller` (the VM's audit log names them); an
/// error answer becomes its gRPC status.
async fn ask(
    host: &Host,
    socket: &std::path::Path,
    caller: Caller,
    request: Request,
    timeout: Duration,
) -> Result<Response, Status> {
    match host.connections.call(socket, Some(caller), &request, timeout).await {
        Ok(Response::Error(failure)) | Err(failure) => Err(status_of(failure)),
        Ok(answer) => Ok(answer),
    }
}

/// A VMM's answer to a request that carried secret values, with any error message that
/// holds one of them withheld (the status code stays).
fn withhold_secrets(answer: Result<Response, Status>, values: &[String]) -> Result<Response, Status> {
    answer.map_err(|status| {
        if values.iter().any(|value| !value.is_empty() && status.message().contains(value.as_str())) {
            Status::new(status.code(), "the VM refused the request (its message is withheld: it held a secret's value)")
        } else {
            status
        }
    })
}

/// A secret store error as a status. A missing secret and another owner's are the same
/// NOT_FOUND.
fn secret_status(err: SecretError) -> Status {
    match err {
        SecretError::NotFound(_) => Status::not_found(err.to_string()),
        SecretError::InvalidName(_) | SecretError::TooLarge(_) | SecretError::Empty => {
            Status::invalid_argument(err.to_string())
        }
        SecretError::Write { .. } | SecretError::Read { .. } => Status::internal(err.to_string()),
    }
}

/// An answer of the wrong kind from a VMM.
fn unexpected(answer: Response) -> Status {
    Status::internal(format!("unexpected answer from the VMM: {answer:?}"))
}

pub fn vm_message(host: &Host, entry: &VmEntry) -> v1::Vm {
    let spec = &entry.record.spec;
    v1::Vm {
        name: entry.record.name.clone(),
        state: entry.state as i32,
        owner_uid: entry.record.owner_uid,
        config: Some(v1::VmConfig {
            kernel: spec.kernel.display().to_string(),
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            display: spec.display.clone(),
            cmdline: spec.cmdline.clone().unwrap_or_default(),
            restart: if spec.max_restarts == 0 {
                v1::RestartPolicy::Never as i32
            } else {
                v1::RestartPolicy::OnFailure as i32
            },
            max_restarts: spec.max_restarts,
            watchdog_seconds: spec.watchdog_seconds,
            memory_limit_mib: spec.memory_limit_mib.unwrap_or_default(),
            disk_bytes_per_second: spec.disk_bytes_per_second,
            disk_iops: spec.disk_iops,
            idle_hibernate_seconds: spec.idle_hibernate_seconds,
            template: spec.template.as_ref().map(|template| template.name.clone()).unwrap_or_default(),
            checkpoint_seconds: spec.checkpoint_seconds,
            keep_checkpoints: spec.keep_checkpoints,
            disks: spec
                .disks
                .iter()
                .map(|disk| v1::Disk {
                    path: disk.path.display().to_string(),
                    readonly: disk.readonly,
                    base: disk.base.as_ref().map(|base| base.display().to_string()).unwrap_or_default(),
                    size_bytes: disk.size_bytes.unwrap_or_default(),
                })
                .collect(),
        }),
        pid: entry.record.pid.unwrap_or_default(),
        exit_reason: entry.record.exit_reason.clone().unwrap_or_default(),
        platform: String::new(),
        restarts: entry.record.restarts,
        usage: host.usage(&entry.record.name),
    }
}

impl Services {
    /// Checks a Create's config and fills in the defaults.
    fn spec(&self, config: Option<v1::VmConfig>) -> Result<VmSpec, Status> {
        let config = config.unwrap_or_default();
        let kernel =
            if config.kernel.is_empty() { self.host.config.default_kernel.clone() } else { config.kernel.into() };
        if !kernel.is_file() {
            return Err(Status::invalid_argument(format!("kernel {} does not exist", kernel.display())));
        }
        let memory_mib = if config.memory_mib == 0 { 128 } else { config.memory_mib };
        if !(16..=65536).contains(&memory_mib) {
            return Err(Status::invalid_argument(format!("memory_mib must be 16 to 65536, got {memory_mib}")));
        }
        let cpus = if config.cpus == 0 { 1 } else { config.cpus };
        if cpus > u32::from(carrel_vmm::config::MAX_VCPUS) {
            return Err(Status::invalid_argument(format!(
                "cpus must be 1 to {}, got {cpus}",
                carrel_vmm::config::MAX_VCPUS
            )));
        }
        let display = if config.display.is_empty() { "1280x800".to_string() } else { config.display };
        let check = carrel_vmm::config::VmConfig { display: display.clone(), ..Default::default() };
        match check.display_size() {
            Ok(Some((width, height))) if !(64..=3840).contains(&width) || !(64..=2160).contains(&height) => {
                return Err(Status::invalid_argument(format!("display {display} is out of range (64x64 to 3840x2160)")))
            }
            Ok(_) => {}
            Err(err) => return Err(Status::invalid_argument(err.to_string())),
        }
        let disks = config
            .disks
            .into_iter()
            .map(|disk| DiskRecord {
                path: disk.path.into(),
                readonly: disk.readonly,
                base: (!disk.base.is_empty()).then(|| disk.base.into()),
                size_bytes: (disk.size_bytes > 0).then_some(disk.size_bytes),
            })
            .collect();
        let cmdline = (!config.cmdline.is_empty()).then_some(config.cmdline);
        let max_restarts = match v1::RestartPolicy::try_from(config.restart) {
            Ok(v1::RestartPolicy::Never) => 0,
            Ok(v1::RestartPolicy::OnFailure) if config.max_restarts == 0 => 5,
            Ok(v1::RestartPolicy::OnFailure) => config.max_restarts,
            Err(_) => return Err(Status::invalid_argument(format!("unknown restart policy {}", config.restart))),
        };
        if config.watchdog_seconds > 3600 {
            return Err(Status::invalid_argument("watchdog_seconds must be 0 (off) to 3600"));
        }
        let memory_limit_mib = match config.memory_limit_mib {
            0 => None,
            limit if (MIN_MEMORY_LIMIT_MIB..=65536 + VMM_OVERHEAD_MIB).contains(&limit) => Some(limit),
            limit => {
                return Err(Status::invalid_argument(format!(
                    "memory_limit_mib must be 0 (RAM + {VMM_OVERHEAD_MIB} MiB) or {MIN_MEMORY_LIMIT_MIB} to {}, got {limit}",
                    65536 + VMM_OVERHEAD_MIB
                )))
            }
        };
        if config.disk_bytes_per_second != 0 && config.disk_bytes_per_second < 1 << 20 {
            return Err(Status::invalid_argument("disk_bytes_per_second must be 0 (no limit) or at least 1 MiB/s"));
        }
        if config.disk_iops != 0 && config.disk_iops < 10 {
            return Err(Status::invalid_argument("disk_iops must be 0 (no limit) or at least 10"));
        }
        if config.checkpoint_seconds > 86_400 || config.keep_checkpoints > 100 {
            return Err(Status::invalid_argument("checkpoint_seconds must be 0 to 86400, keep_checkpoints 0 to 100"));
        }
        Ok(VmSpec {
            kernel,
            memory_mib,
            cpus,
            display,
            cmdline,
            disks,
            max_restarts,
            watchdog_seconds: config.watchdog_seconds,
            memory_limit_mib,
            disk_bytes_per_second: config.disk_bytes_per_second,
            disk_iops: config.disk_iops,
            idle_hibernate_seconds: config.idle_hibernate_seconds,
            template: None,
            checkpoint_seconds: config.checkpoint_seconds,
            keep_checkpoints: if config.keep_checkpoints == 0 { 3 } else { config.keep_checkpoints },
        })
    }

    /// The spec of a VM that starts from `template`: the template's machine, with the
    /// rest (restart policy, limits, idle policy) from `config`.
    fn spec_from_template(
        &self,
        template: &str,
        config: Option<v1::VmConfig>,
        caller: Caller,
    ) -> Result<VmSpec, Status> {
        let record = self.host.templates.get(template).map_err(template_status)?;
        if !self.host.allowed(caller, record.owner_uid) {
            return Err(Status::not_found(format!("no template named {template:?}")));
        }
        let mut config = config.unwrap_or_default();
        let machine = (config.memory_mib, config.cpus, config.display.as_str(), config.kernel.as_str());
        let differs = (machine.0 != 0 && machine.0 != record.memory_mib)
            || (machine.1 != 0 && machine.1 != record.cpus)
            || (!machine.2.is_empty() && machine.2 != record.display)
            || !machine.3.is_empty();
        if differs || !config.disks.is_empty() {
            return Err(Status::invalid_argument(format!(
                "a VM from template {template:?} has the template's machine ({} MiB, {} vCPU(s), {}) and its {} disk(s)",
                record.memory_mib,
                record.cpus,
                record.display,
                record.disks.len()
            )));
        }
        config.memory_mib = record.memory_mib;
        config.cpus = record.cpus;
        config.display = record.display.clone();
        config.kernel = record.kernel.display().to_string();
        let mut spec = self.spec(Some(config))?;
        // Each writable disk gets a top layer of its own (a file name alone: the VM's own
        // disks directory), made at its first start over the layer the template froze;
        // read-only disks are shared.
        spec.disks = record
            .disks
            .iter()
            .enumerate()
            .map(|(index, disk)| match disk.readonly {
                true => disk.clone(),
                false => DiskRecord { path: format!("disk-{index}.layer").into(), size_bytes: None, ..disk.clone() },
            })
            .collect();
        spec.template = Some(TemplateSource {
            name: record.name,
            snapshot: self.host.templates.snapshot(template),
            layer_dirs: record.layer_dirs,
        });
        Ok(spec)
    }

    /// `caller`'s secret `name`; another owner's secret of that name is not found.
    fn secret(&self, caller: Caller, name: &str) -> Result<Vec<u8>, Status> {
        self.host.secrets.get(caller.uid, name).map_err(secret_status)
    }

    /// The environment of an exec's secret variables.
    fn secret_env(&self, caller: Caller, pairs: &[v1::SecretEnv]) -> Result<Vec<(String, String)>, Status> {
        let mut env = Vec::new();
        for pair in pairs {
            let variable = &pair.variable;
            let valid = variable
                .bytes()
                .enumerate()
                .all(|(index, b)| b == b'_' || b.is_ascii_alphabetic() || (index > 0 && b.is_ascii_digit()));
            if variable.is_empty() || !valid {
                return Err(Status::invalid_argument(format!(
                    "environment variable name {variable:?} must be letters, digits and '_', not starting with a digit"
                )));
            }
            let value = String::from_utf8(self.secret(caller, &pair.secret)?).map_err(|_| {
                Status::invalid_argument(format!(
                    "secret {:?} is not UTF-8 text, so it cannot be an environment variable",
                    pair.secret
                ))
            })?;
            if value.contains('\0') {
                return Err(Status::invalid_argument(format!(
                    "secret {:?} holds a NUL byte, so it cannot be an environment variable",
                    pair.secret
                )));
            }
            env.push((variable.clone(), value));
        }
        Ok(env)
    }

    /// The control socket of a running VM `caller` may use.
    /// The control socket of `name` once it runs: a hibernated VM is woken first (once,
    /// however many calls wait for it); the wake is on its audit log as its restore.
    /// Such a call is a use of the VM for the idle policy (looking it up is not).
    async fn running(&self, name: &str, caller: Caller) -> Result<std::path::PathBuf, Status> {
        {
            let vms = self.host.vms.lock().await;
            let entry = self.host.check(&vms, name, caller)?;
            entry.touch();
            match entry.state {
                v1::VmState::Running => return Ok(entry.paths.control()),
                v1::VmState::Hibernated => {}
                state => return Err(Status::failed_precondition(format!("VM {name:?} is {state:?}, not running"))),
            }
        }
        let _waking = self.host.waking.lock().await;
        let state = self.host.vms.lock().await.get(name).map(|entry| entry.state);
        if state == Some(v1::VmState::Hibernated) {
            let started = std::time::Instant::now();
            self.host.boot(name, true).await?;
            eprintln!("carreld: woke {name:?} in {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
        }
        let vms = self.host.vms.lock().await;
        let entry = self.host.check(&vms, name, caller)?;
        entry.touch();
        match entry.state {
            v1::VmState::Running => Ok(entry.paths.control()),
            state => Err(Status::failed_precondition(format!("VM {name:?} is {state:?}, not running"))),
        }
    }

    /// The lifecycle policies, every [`POLICY_TICK`]: a VM whose config asks for it is
    /// hibernated once no call has touched it and its guest has used under
    /// [`IDLE_CPU_US_PER_SECOND`] for its `idle_hibernate_seconds` (the next call that
    /// needs it wakes it); and a VM in use gets a checkpoint every `checkpoint_seconds`.
    pub fn lifecycle_policies(self) {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(POLICY_TICK);
            loop {
                ticker.tick().await;
                self.host.connections.close_idle();
                for (name, kind, diff) in self.due().await {
                    let daemon = Caller::daemon();
                    let mut saved = self.save(&name, daemon, diff, kind).await;
                    if diff && saved.as_ref().is_err_and(|status| status.code() == tonic::Code::FailedPrecondition) {
                        // No parent in this run of the VMM (it booted cold): a full one.
                        saved = self.save(&name, daemon, false, kind).await;
                    }
                    match saved {
                        Ok(record) => eprintln!("carreld: {name:?}: {kind:?} {}", record.id),
                        Err(status) => eprintln!("carreld: {name:?}: {kind:?} not taken: {}", status.message()),
                    }
                    if kind == Save::Checkpoint {
                        if let Some(entry) = self.host.vms.lock().await.get_mut(&name) {
                            entry.last_checkpoint_at = std::time::Instant::now();
                        }
                    }
                }
            }
        });
    }

    /// The running VMs due for a hibernation or a checkpoint, and whether a diff may do.
    async fn due(&self) -> Vec<(String, Save, bool)> {
        let mut vms = self.host.vms.lock().await;
        let mut due = Vec::new();
        for (name, entry) in vms.iter_mut() {
            if entry.state != v1::VmState::Running || entry.hibernating {
                continue;
            }
            let cpu_us = self.host.usage(name).map_or(0, |usage| usage.cpu_usage_us);
            let worked = cpu_us.saturating_sub(entry.cpu_seen_us);
            entry.cpu_seen_us = cpu_us;
            if worked * 1000 > IDLE_CPU_US_PER_SECOND * POLICY_TICK.as_millis() as u64 {
                entry.touch();
            }
            let spec = &entry.record.spec;
            let diffs = entry.record.snapshots.iter().rev().take_while(|snapshot| snapshot.diff).count();
            let diff = entry.record.parent.is_some() && diffs < MAX_DIFFS_IN_A_ROW;
            let idle_limit = Duration::from_secs(u64::from(spec.idle_hibernate_seconds));
            let every = Duration::from_secs(u64::from(spec.checkpoint_seconds));
            let since_checkpoint = entry.last_checkpoint_at.elapsed();
            if !idle_limit.is_zero() && entry.idle_for() >= idle_limit {
                due.push((name.clone(), Save::Hibernate, diff));
            } else if !every.is_zero() && since_checkpoint >= every && entry.idle_for() < since_checkpoint {
                // In use since the last checkpoint: take the next one. Chains are cut at the
                // number kept, so pruning can drop a whole older chain.
                let chain_fits = diffs + 1 < spec.keep_checkpoints.max(1) as usize;
                due.push((name.clone(), Save::Checkpoint, diff && chain_fits));
            }
        }
        due
    }

    /// Saves `name` to a new snapshot in its `snapshots/` (a diff over its last one when
    /// `diff`); a hibernation ends its VMM once saved, a checkpoint prunes the old ones.
    async fn save(&self, name: &str, caller: Caller, diff: bool, kind: Save) -> Result<SnapshotRecord, Status> {
        let hibernate = kind == Save::Hibernate;
        let (socket, id, dir) = {
            let mut vms = self.host.vms.lock().await;
            let entry = self.host.check(&vms, name, caller)?;
            if entry.state != v1::VmState::Running {
                return Err(Status::failed_precondition(format!("VM {name:?} is {:?}, not running", entry.state)));
            }
            let entry = vms.get_mut(name).expect("checked above");
            let id = next_snapshot_id(&entry.record.snapshots);
            entry.hibernating = hibernate;
            (entry.paths.control(), id.clone(), entry.paths.snapshot(&id))
        };
        let request = carrel_vmm::control::SnapshotRequest { dir, hibernate, diff };
        let answer = ask(&self.host, &socket, caller, Request::Snapshot(request), CALL_SLACK * 6).await;
        let mut vms = self.host.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| Status::not_found(format!("{name:?} was deleted")))?;
        let info = match answer {
            Ok(Response::Snapshot(info)) => info,
            Ok(other) => {
                entry.hibernating = false;
                return Err(unexpected(other));
            }
            Err(status) => {
                entry.hibernating = false;
                return Err(status);
            }
        };
        let record = SnapshotRecord {
            id,
            diff,
            parent: if diff { entry.record.parent.clone() } else { None },
            checkpoint: kind == Save::Checkpoint,
            memory_bytes: info.memory_bytes,
            disk_bytes: info.disk_bytes,
            paused_us: info.paused_us,
            unix_time: unix_time(),
        };
        entry.record.snapshots.push(record.clone());
        entry.record.parent = Some(record.id.clone());
        if hibernate {
            entry.record.hibernated = Some(record.id.clone());
        }
        if kind == Save::Checkpoint {
            let pruned = entry.record.prunable_checkpoints(entry.record.spec.keep_checkpoints as usize);
            for id in &pruned {
                let _ = std::fs::remove_dir_all(entry.paths.snapshot(id));
            }
            entry.record.snapshots.retain(|snapshot| !pruned.contains(&snapshot.id));
        }
        self.host.registry.save(&entry.record).map_err(|err| Status::internal(err.to_string()))?;
        drop(vms);
        if hibernate {
            // The VMM ends right after its answer: wait for the daemon to see it go.
            let deadline = std::time::Instant::now() + CALL_SLACK;
            while self.host.vms.lock().await.get(name).is_some_and(|entry| entry.record.pid.is_some()) {
                if std::time::Instant::now() > deadline {
                    return Err(Status::deadline_exceeded(format!("VM {name:?} was saved but its VMM did not end")));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        Ok(record)
    }

    /// Asks `name`'s VMM to stop and waits for it to end.
    async fn stop_vm(&self, name: &str, caller: Caller) -> Result<(), Status> {
        let socket = {
            let mut vms = self.host.vms.lock().await;
            self.host.check(&vms, name, caller)?;
            let entry = vms.get_mut(name).expect("checked above");
            entry.record.stopped = true;
            // A stopped VM starts cold: a hibernated one forgets where it slept.
            entry.record.hibernated = None;
            self.host.registry.save(&entry.record).map_err(|err| Status::internal(err.to_string()))?;
            if entry.state != v1::VmState::Running {
                self.host.set_state(entry, v1::VmState::Stopped);
                return Ok(());
            }
            entry.paths.control()
        };
        let _ = self.host.connections.call(&socket, Some(caller), &Request::Stop, CALL_SLACK).await;
        let deadline = std::time::Instant::now() + CALL_SLACK;
        loop {
            let pid = self.host.vms.lock().await.get(name).and_then(|entry| entry.record.pid);
            match pid {
                None => return Ok(()),
                Some(_) if std::time::Instant::now() > deadline => {
                    return Err(Status::deadline_exceeded(format!("VM {name:?} did not stop within {CALL_SLACK:?}")))
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
}

#[tonic::async_trait]
impl v1::host_server::Host for Services {
    async fn info(&self, request: GrpcRequest<v1::HostInfoRequest>) -> Result<GrpcResponse<v1::HostInfo>, Status> {
        let caller = caller(&request)?;
        let visible = {
            let vms = self.host.vms.lock().await;
            vms.values().filter(|entry| self.host.allowed(caller, entry.record.owner_uid)).count()
        };
        let machine = &self.host.machine;
        Ok(GrpcResponse::new(v1::HostInfo {
            platform: machine.platform.into(),
            cpus: machine.cpus,
            memory_bytes: machine.memory_bytes,
            vms: visible as u32,
            carreld_version: env!("CARGO_PKG_VERSION").into(),
            carrel_vmm: self.host.config.vmm.display().to_string(),
        }))
    }
}

type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl v1::vms_server::Vms for Services {
    async fn create(&self, request: GrpcRequest<v1::CreateVmRequest>) -> Result<GrpcResponse<v1::Vm>, Status> {
        let caller = caller(&request)?;
        let params = vec![("name", request.get_ref().name.clone()), ("template", request.get_ref().template.clone())];
        let work = async move {
            let request = request.into_inner();
            let name = request.name;
            if !valid_name(&name) {
                return Err(Status::invalid_argument(format!(
                    "VM name {name:?} must be 1 to 63 of a-z, 0-9 and '-', not starting with '-'"
                )));
            }
            let mut spec = match request.template.as_str() {
                "" => self.spec(request.config)?,
                template => self.spec_from_template(template, request.config, caller)?,
            };
            let paths = supervisor::VmPaths { dir: self.host.registry.vm_dir(&name) };
            for disk in &mut spec.disks {
                disk.path = own_disk(&paths, &disk.path)?;
            }
            {
                let mut vms = self.host.vms.lock().await;
                if vms.contains_key(&name) {
                    return Err(Status::already_exists(format!("a VM named {name:?} exists")));
                }
                let record = VmRecord {
                    name: name.clone(),
                    owner_uid: caller.uid,
                    spec,
                    pid: None,
                    stopped: false,
                    exit_reason: None,
                    restarts: 0,
                    jail_uid: self.host.config.jail_uids.map(|first| free_jail_uid(first, &vms)),
                    snapshots: Vec::new(),
                    hibernated: None,
                    parent: None,
                };
                self.host.registry.save(&record).map_err(|err| Status::internal(err.to_string()))?;
                let paths = supervisor::VmPaths { dir: self.host.registry.vm_dir(&name) };
                vms.insert(name.clone(), VmEntry::new(record, v1::VmState::Starting, paths));
            }
            self.host.boot(&name, true).await.map(GrpcResponse::new)
        };
        self.host.audited(caller, "vm.create", params, work).await
    }

    async fn get(&self, request: GrpcRequest<v1::GetVmRequest>) -> Result<GrpcResponse<v1::Vm>, Status> {
        let caller = caller(&request)?;
        let vms = self.host.vms.lock().await;
        let entry = self.host.check(&vms, &request.get_ref().name, caller)?;
        Ok(GrpcResponse::new(vm_message(&self.host, entry)))
    }

    async fn list(
        &self,
        request: GrpcRequest<v1::ListVmsRequest>,
    ) -> Result<GrpcResponse<v1::ListVmsResponse>, Status> {
        let caller = caller(&request)?;
        let vms = self.host.vms.lock().await;
        let visible = vms
            .values()
            .filter(|entry| self.host.allowed(caller, entry.record.owner_uid))
            .map(|entry| vm_message(&self.host, entry))
            .collect();
        Ok(GrpcResponse::new(v1::ListVmsResponse { vms: visible }))
    }

    async fn start(&self, request: GrpcRequest<v1::VmName>) -> Result<GrpcResponse<v1::Vm>, Status> {
        let caller = caller(&request)?;
        let params = vec![("name", request.get_ref().name.clone())];
        let work = async move {
            let name = request.into_inner().name;
            {
                let vms = self.host.vms.lock().await;
                let entry = self.host.check(&vms, &name, caller)?;
                if matches!(entry.state, v1::VmState::Running | v1::VmState::Starting) {
                    return Err(Status::failed_precondition(format!("VM {name:?} is running already")));
                }
            }
            self.host.boot(&name, true).await.map(GrpcResponse::new)
        };
        self.host.audited(caller, "vm.start", params, work).await
    }

    async fn stop(&self, request: GrpcRequest<v1::VmName>) -> Result<GrpcResponse<v1::Vm>, Status> {
        let caller = caller(&request)?;
        let params = vec![("name", request.get_ref().name.clone())];
        let work = async move {
            let name = request.into_inner().name;
            self.stop_vm(&name, caller).await?;
            let vms = self.host.vms.lock().await;
            Ok(GrpcResponse::new(vm_message(&self.host, self.host.check(&vms, &name, caller)?)))
        };
        self.host.audited(caller, "vm.stop", params, work).await
    }

    /// A stop, then a cold start (or a fresh restore of its template).
    async fn reboot(&self, request: GrpcRequest<v1::VmName>) -> Result<GrpcResponse<v1::Vm>, Status> {
        let caller = caller(&request)?;
        let params = vec![("name", request.get_ref().name.clone())];
        let work = async move {
            let name = request.into_inner().name;
            self.stop_vm(&name, caller).await?;
            Ok(GrpcResponse::new(self.host.boot(&name, true).await?))
        };
        self.host.audited(caller, "vm.reboot", params, work).await
    }

    async fn delete(&self, request: GrpcRequest<v1::VmName>) -> Result<GrpcResponse<v1::DeleteVmResponse>, Status> {
        let caller = caller(&request)?;
        let params = vec![("name", request.get_ref().name.clone())];
        let work = async move {
            let name = request.into_inner().name;
            self.host.check(&*self.host.vms.lock().await, &name, caller)?;
            // A template's VMs read the disk layers it froze in this VM's directory.
            let vm_dir = self.host.registry.vm_dir(&name);
            let over_its_disks = self
                .host
                .templates
                .list()
                .into_iter()
                .find(|template| template.layer_dirs.iter().any(|dir| dir.starts_with(&vm_dir)));
            if let Some(template) = over_its_disks {
                return Err(Status::failed_precondition(format!(
                    "template {:?} lies over VM {name:?}'s disks: delete the template first",
                    template.name
                )));
            }
            self.stop_vm(&name, caller).await?;
            let mut vms = self.host.vms.lock().await;
            self.host.check(&vms, &name, caller)?;
            if let Some(mut entry) = vms.remove(&name) {
                // Its watchers' streams end.
                self.host.set_state(&mut entry, v1::VmState::Unspecified);
            }
            self.host.registry.remove(&name).map_err(|err| Status::internal(err.to_string()))?;
            self.host.remove_cgroup(&name).map_err(Status::internal)?;
            Ok(GrpcResponse::new(v1::DeleteVmResponse {}))
        };
        self.host.audited(caller, "vm.delete", params, work).await
    }

    type WatchStream = Stream2<v1::VmEvent>;

    /// The VM's state now, then every change of it with the exit reason, until it is
    /// deleted (the stream ends with NOT_FOUND) or the caller goes.
    async fn watch(&self, request: GrpcRequest<v1::VmName>) -> Result<GrpcResponse<Self::WatchStream>, Status> {
        use tokio::sync::broadcast::error::RecvError;
        let caller = caller(&request)?;
        let name = request.into_inner().name;
        // Subscribed before the state is read, so no change falls between the two.
        let mut changes = self.host.events.subscribe();
        let now = {
            let vms = self.host.vms.lock().await;
            let entry = self.host.check(&vms, &name, caller)?;
            v1::VmEvent {
                name: name.clone(),
                state: entry.state as i32,
                reason: entry.record.exit_reason.clone().unwrap_or_default(),
            }
        };
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<v1::VmEvent, Status>>(64);
        let host = self.host.clone();
        tokio::spawn(async move {
            if sender.send(Ok(now)).await.is_err() {
                return;
            }
            loop {
                let event = match changes.recv().await {
                    Ok(event) if event.name == name => event,
                    Ok(_) => continue,
                    // Too slow a watcher: it gets the state as it is now.
                    Err(RecvError::Lagged(_)) => match host.vms.lock().await.get(&name) {
                        Some(entry) => v1::VmEvent {
                            name: name.clone(),
                            state: entry.state as i32,
                            reason: entry.record.exit_reason.clone().unwrap_or_default(),
                        },
                        None => break,
                    },
                    Err(RecvError::Closed) => return,
                };
                if event.state == v1::VmState::Unspecified as i32 || sender.send(Ok(event)).await.is_err() {
                    break;
                }
            }
            let _ = sender.send(Err(Status::not_found(format!("VM {name:?} was deleted")))).await;
        });
        Ok(GrpcResponse::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))))
    }
}

fn image_format(format: i32) -> (ImageFormat, v1::ImageFormat) {
    match v1::ImageFormat::try_from(format).unwrap_or(v1::ImageFormat::Png) {
        v1::ImageFormat::Png => (ImageFormat::Png, v1::ImageFormat::Png),
        v1::ImageFormat::Qoi => (ImageFormat::Qoi, v1::ImageFormat::Qoi),
        v1::ImageFormat::Raw => (ImageFormat::Raw, v1::ImageFormat::Raw),
    }
}

fn screenshot_message(shot: carrel_vmm::control::Screenshot, format: v1::ImageFormat) -> v1::Screenshot {
    v1::Screenshot {
        image: shot.bytes,
        format: format as i32,
        width: shot.width,
        height: shot.height,
        frame: shot.frame,
    }
}

#[tonic::async_trait]
impl v1::screen_server::Screen for Services {
    async fn screenshot(
        &self,
        request: GrpcRequest<v1::ScreenshotRequest>,
    ) -> Result<GrpcResponse<v1::Screenshot>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let (format, answer_format) = image_format(request.format);
        let wait = match (request.after_frame, request.still_ms) {
            (0, 0) => Wait::FirstFrame,
            (after, 0) => Wait::FrameAfter(after),
            (_, still) => Wait::StillFor(still),
        };
        let scale = (request.scale_width > 0 && request.scale_height > 0)
            .then_some([request.scale_width, request.scale_height]);
        let timeout_ms = if request.timeout_ms == 0 { 5_000 } else { request.timeout_ms };
        let screenshot = ScreenshotRequest { format, crop: None, scale, cursor: false, wait, timeout_ms };
        // A hibernated VM's screen is in its snapshot: served from there, not woken.
        let asleep = {
            let vms = self.host.vms.lock().await;
            let entry = self.host.check(&vms, &request.name, caller)?;
            match (&entry.record.hibernated, entry.state) {
                (Some(id), v1::VmState::Hibernated) if !request.live => Some(entry.paths.snapshot(id)),
                _ => None,
            }
        };
        if let Some(dir) = asleep {
            let shot = tokio::task::spawn_blocking(move || carrel_vmm::snapshot::screen::screenshot(&dir, &screenshot))
                .await
                .map_err(|err| Status::internal(err.to_string()))?
                .map_err(|err| Status::failed_precondition(format!("cannot read the hibernated VM's screen: {err}")))?;
            return Ok(GrpcResponse::new(screenshot_message(shot, answer_format)));
        }
        let socket = self.running(&request.name, caller).await?;
        match ask(
            &self.host,
            &socket,
            caller,
            Request::Screenshot(screenshot),
            Duration::from_millis(timeout_ms) + CALL_SLACK,
        )
        .await?
        {
            Response::Screenshot(shot) => Ok(GrpcResponse::new(screenshot_message(shot, answer_format))),
            other => Err(unexpected(other)),
        }
    }
}

#[tonic::async_trait]
impl v1::input_server::Input for Services {
    async fn act(&self, request: GrpcRequest<v1::ActRequest>) -> Result<GrpcResponse<v1::ActResponse>, Status> {
        use carrel_vmm::input::{Action, Button};
        let caller = caller(&request)?;
        let request = request.into_inner();
        let socket = self.running(&request.name, caller).await?;
        // A secret's value is typed like text and kept out of every answer and log.
        let mut secret = None;
        let action = match request.action {
            Some(v1::act_request::Action::Click(click)) => {
                Action::Click { x: click.x, y: click.y, button: Button::Left, count: 1 }
            }
            Some(v1::act_request::Action::TypeText(text)) => Action::Type { text },
            Some(v1::act_request::Action::Key(combo)) => Action::Key { combo },
            Some(v1::act_request::Action::TypeSecret(name)) => {
                let value = self.secret(caller, &name)?;
                let text = String::from_utf8(value)
                    .ok()
                    .filter(|text| {
                        text.chars().count() <= carrel_vmm::input::MAX_TYPE_CHARS
                            && carrel_vmm::input::text_to_keys(text).is_ok()
                    })
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "secret {name:?} cannot be typed: it must be at most {} characters of printable ASCII, \
                             newline and tab",
                            carrel_vmm::input::MAX_TYPE_CHARS
                        ))
                    })?;
                eprintln!(
                    "carreld: uid {} types secret {name:?} ({} bytes) into VM {:?}",
                    caller.uid,
                    text.len(),
                    request.name
                );
                secret = Some(text.clone());
                Action::TypeSecret { name, text: carrel_vmm::input::SecretText(text) }
            }
            None => {
                return Err(Status::invalid_argument("an action is required: click, type_text, type_secret or key"))
            }
        };
        let timeout_ms = if request.timeout_ms == 0 { 5_000 } else { request.timeout_ms };
        let input = InputRequest {
            action,
            wait: Some(Wait::FrameAfter(0)),
            screenshot: request.screenshot.then_some(ImageFormat::Png),
            timeout_ms,
            hold_ms: None,
            gap_ms: None,
        };
        let answer =
            ask(&self.host, &socket, caller, Request::Input(input), Duration::from_millis(timeout_ms) + CALL_SLACK)
                .await;
        match withhold_secrets(answer, secret.as_slice())? {
            Response::Input(done) => Ok(GrpcResponse::new(v1::ActResponse {
                frame: done.frame.unwrap_or_default(),
                timed_out: done.timed_out,
                screenshot: done.screenshot.map(|shot| screenshot_message(shot, v1::ImageFormat::Png)),
            })),
            other => Err(unexpected(other)),
        }
    }
}

#[tonic::async_trait]
impl v1::agent_server::Agent for Services {
    async fn exec(&self, request: GrpcRequest<v1::ExecRequest>) -> Result<GrpcResponse<v1::ExecResponse>, Status> {
        use carrel_vmm::control::{AgentExec, AgentRequest, AgentResponse};
        let caller = caller(&request)?;
        let request = request.into_inner();
        let socket = self.running(&request.name, caller).await?;
        let timeout_ms = (request.timeout_ms > 0).then_some(request.timeout_ms);
        let env = self.secret_env(caller, &request.secret_env)?;
        // Kept to withhold an error answer that quotes one.
        let values: Vec<String> = env.iter().map(|(_, value)| value.clone()).collect();
        if !env.is_empty() {
            let named: Vec<String> = request
                .secret_env
                .iter()
                .zip(&values)
                .map(|(pair, value)| format!("{}=secret {:?} ({} bytes)", pair.variable, pair.secret, value.len()))
                .collect();
            eprintln!("carreld: uid {} runs a command in VM {:?} with {}", caller.uid, request.name, named.join(", "));
        }
        let exec = AgentExec { argv: request.argv, env, cwd: None, stdin: request.stdin, timeout_ms };
        let wait = Duration::from_millis(timeout_ms.unwrap_or(600_000)) + CALL_SLACK;
        let answer = ask(&self.host, &socket, caller, Request::Agent(AgentRequest::Exec(exec)), wait).await;
        match withhold_secrets(answer, &values)? {
            Response::Agent(AgentResponse::Exit { code, signal, timed_out, stdout, stderr }) => {
                let exit_code = code.unwrap_or_else(|| 128 + signal.unwrap_or(0));
                Ok(GrpcResponse::new(v1::ExecResponse { exit_code, timed_out, stdout, stderr }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn put(
        &self,
        request: GrpcRequest<tonic::Streaming<v1::PutChunk>>,
    ) -> Result<GrpcResponse<v1::PutResponse>, Status> {
        use carrel_vmm::control::AgentResponse;
        let caller = caller(&request)?;
        let mut chunks = request.into_inner();
        let first = chunks.message().await?.ok_or_else(|| Status::invalid_argument("an empty put: no first chunk"))?;
        let socket = self.running(&first.name, caller).await?;
        let (size, mode, path) = (first.size, if first.mode == 0 { 0o644 } else { first.mode }, first.path.clone());
        // The bytes go from the gRPC stream to the VM's control connection as they come:
        // the blocking side reads what the async side passes on, a few chunks ahead.
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let transfer = tokio::task::spawn_blocking(move || {
            let mut reader = ChunkReader { chunks: receiver, pending: Vec::new(), at: 0 };
            let mut client = supervisor::connect_for(&socket, Some(caller)).map_err(status_of)?;
            client
                .put(&mut reader, size, mode, &path, CALL_SLACK * 6)
                .map_err(|err| Status::aborted(format!("the put was broken off: {err}")))
        });
        let mut sent = 0u64;
        let mut next = Some(first.data);
        while let Some(data) = next.take() {
            sent += data.len() as u64;
            if sent > size {
                return Err(Status::invalid_argument(format!("the put sent more than its size of {size} bytes")));
            }
            if !data.is_empty() && sender.send(data).is_err() {
                break;
            }
            next = chunks.message().await?.map(|chunk| chunk.data);
        }
        drop(sender);
        match transfer.await.map_err(|err| Status::internal(err.to_string()))?? {
            Response::Agent(AgentResponse::Done { bytes, digest }) => {
                Ok(GrpcResponse::new(v1::PutResponse { bytes, blake3: digest }))
            }
            Response::Error(failure) => Err(status_of(failure)),
            other => Err(unexpected(other)),
        }
    }

    type GetStream = Stream2<v1::GetChunk>;

    async fn get(&self, request: GrpcRequest<v1::GetRequest>) -> Result<GrpcResponse<Self::GetStream>, Status> {
        use carrel_vmm::control::AgentResponse;
        let caller = caller(&request)?;
        let request = request.into_inner();
        let socket = self.running(&request.name, caller).await?;
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<v1::GetChunk, Status>>(4);
        tokio::task::spawn_blocking(move || {
            let mut writer = ChunkWriter { chunks: sender.clone() };
            let answer = supervisor::connect_for(&socket, Some(caller)).map_err(status_of).and_then(|mut client| {
                client
                    .get(&request.path, |_size, _mode| Ok(&mut writer), CALL_SLACK * 6)
                    .map_err(|err| Status::aborted(format!("the get was broken off: {err}")))
            });
            // The stream ends after the last bytes; a failure ends it with its status.
            match answer {
                Ok(Response::Agent(AgentResponse::Done { .. })) => {}
                Ok(Response::Error(failure)) => {
                    let _ = sender.blocking_send(Err(status_of(failure)));
                }
                Ok(other) => {
                    let _ = sender.blocking_send(Err(unexpected(other)));
                }
                Err(status) => {
                    let _ = sender.blocking_send(Err(status));
                }
            }
        });
        Ok(GrpcResponse::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))))
    }
}

#[tonic::async_trait]
impl v1::secrets_server::Secrets for Services {
    async fn set(&self, request: GrpcRequest<v1::SetSecretRequest>) -> Result<GrpcResponse<v1::SecretInfo>, Status> {
        let caller = caller(&request)?;
        let params =
            vec![("name", request.get_ref().name.clone()), ("length", request.get_ref().value.len().to_string())];
        let work = async move {
            let request = request.into_inner();
            self.host.secrets.set(caller.uid, &request.name, &request.value).map_err(secret_status)?;
            eprintln!("carreld: uid {} set secret {:?} ({} bytes)", caller.uid, request.name, request.value.len());
            Ok(GrpcResponse::new(v1::SecretInfo { name: request.name, length: request.value.len() as u64 }))
        };
        self.host.audited(caller, "secret.set", params, work).await
    }

    async fn list(
        &self,
        request: GrpcRequest<v1::ListSecretsRequest>,
    ) -> Result<GrpcResponse<v1::ListSecretsResponse>, Status> {
        let caller = caller(&request)?;
        let secrets = self.host.secrets.list(caller.uid).map_err(secret_status)?;
        Ok(GrpcResponse::new(v1::ListSecretsResponse {
            secrets: secrets.into_iter().map(|(name, length)| v1::SecretInfo { name, length }).collect(),
        }))
    }

    async fn delete(
        &self,
        request: GrpcRequest<v1::DeleteSecretRequest>,
    ) -> Result<GrpcResponse<v1::DeleteSecretResponse>, Status> {
        let caller = caller(&request)?;
        let params = vec![("name", request.get_ref().name.clone())];
        let work = async move {
            let name = request.into_inner().name;
            self.host.secrets.delete(caller.uid, &name).map_err(secret_status)?;
            eprintln!("carreld: uid {} deleted secret {name:?}", caller.uid);
            Ok(GrpcResponse::new(v1::DeleteSecretResponse {}))
        };
        self.host.audited(caller, "secret.delete", params, work).await
    }
}

#[tonic::async_trait]
impl v1::console_server::Console for Services {
    type AttachStream = Stream2<v1::ConsoleOutput>;

    /// The last [`CONSOLE_HISTORY`] bytes of the VM's console, then its output as it
    /// comes (the console log, followed); the caller's bytes go to the guest's serial
    /// port while the VM runs. The first message names the VM.
    async fn attach(
        &self,
        request: GrpcRequest<tonic::Streaming<v1::ConsoleInput>>,
    ) -> Result<GrpcResponse<Self::AttachStream>, Status> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let caller = caller(&request)?;
        let mut inputs = request.into_inner();
        let first =
            inputs.message().await?.ok_or_else(|| Status::invalid_argument("name the VM in a first message"))?;
        let name = first.name.clone();
        let (log, socket) = {
            let vms = self.host.vms.lock().await;
            let entry = self.host.check(&vms, &name, caller)?;
            (entry.paths.console(), entry.paths.control())
        };
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<v1::ConsoleOutput, Status>>(16);
        // Output: the history, then whatever the log gains, until the caller goes.
        let output = sender.clone();
        tokio::spawn(async move {
            let mut file = loop {
                match tokio::fs::File::open(&log).await {
                    Ok(file) => break file,
                    Err(_) if !output.is_closed() => tokio::time::sleep(CONSOLE_POLL).await,
                    Err(_) => return,
                }
            };
            let length = file.metadata().await.map_or(0, |metadata| metadata.len());
            let _ = file.seek(std::io::SeekFrom::Start(length.saturating_sub(CONSOLE_HISTORY))).await;
            let mut buffer = vec![0u8; 64 << 10];
            loop {
                match file.read(&mut buffer).await {
                    Ok(0) if output.is_closed() => return,
                    Ok(0) => tokio::time::sleep(CONSOLE_POLL).await,
                    Ok(count) => {
                        if output.send(Ok(v1::ConsoleOutput { data: buffer[..count].to_vec() })).await.is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        let _ = output.send(Err(Status::data_loss(format!("cannot read the console: {err}")))).await;
                        return;
                    }
                }
            }
        });
        // Input: to the VMM's serial port, in order.
        let host = self.host.clone();
        tokio::spawn(async move {
            let mut next = Some(first.data);
            while let Some(data) = next.take() {
                let running = host.vms.lock().await.get(&name).is_some_and(|entry| entry.state == v1::VmState::Running);
                if !data.is_empty() && running {
                    if let Err(failure) =
                        host.connections.call(&socket, Some(caller), &Request::ConsoleInput(data), CALL_SLACK).await
                    {
                        let _ = sender.send(Err(status_of(failure))).await;
                        return;
                    }
                }
                next = match inputs.message().await {
                    Ok(Some(input)) => Some(input.data),
                    _ => None,
                };
            }
        });
        Ok(GrpcResponse::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))))
    }
}

#[tonic::async_trait]
impl v1::snapshots_server::Snapshots for Services {
    async fn snapshot(
        &self,
        request: GrpcRequest<v1::SnapshotRequest>,
    ) -> Result<GrpcResponse<v1::SnapshotInfo>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let record = self.save(&request.name, caller, request.diff, Save::Snapshot).await?;
        Ok(GrpcResponse::new(snapshot_message(&record)))
    }

    async fn hibernate(
        &self,
        request: GrpcRequest<v1::SnapshotRequest>,
    ) -> Result<GrpcResponse<v1::SnapshotInfo>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let record = self.save(&request.name, caller, request.diff, Save::Hibernate).await?;
        Ok(GrpcResponse::new(snapshot_message(&record)))
    }

    type SaveStream = Stream2<v1::SaveEvent>;

    /// A snapshot or a hibernation that tells how far it is: while the VMM writes it, the
    /// daemon asks it every [`PROGRESS_EVERY`] on a connection of its own and passes on
    /// the bytes of memory done; the last message is the snapshot's info.
    async fn save(&self, request: GrpcRequest<v1::SaveRequest>) -> Result<GrpcResponse<Self::SaveStream>, Status> {
        let caller = caller(&request)?;
        let started = std::time::Instant::now();
        let request = request.into_inner();
        let socket = {
            let vms = self.host.vms.lock().await;
            self.host.check(&vms, &request.name, caller)?.paths.control()
        };
        let kind = if request.hibernate { Save::Hibernate } else { Save::Snapshot };
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<v1::SaveEvent, Status>>(16);
        let progress = sender.clone();
        let host = self.host.clone();
        let poller = tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                let asked = host.connections.call(&socket, None, &Request::SnapshotProgress, Duration::from_secs(1));
                let now = match asked.await {
                    Ok(Response::SnapshotProgress(now)) => now,
                    // A VMM that does not know the request, or that has ended (a
                    // hibernation): nothing more to tell.
                    _ => return,
                };
                let Some(now) = now.filter(|now| now.total_bytes > 0) else { continue };
                let event = v1::SaveProgress {
                    done_bytes: now.done_bytes,
                    total_bytes: now.total_bytes,
                    elapsed_us: started.elapsed().as_micros() as u64,
                };
                let event = v1::SaveEvent { event: Some(v1::save_event::Event::Progress(event)) };
                if progress.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        });
        let services = self.clone();
        tokio::spawn(async move {
            let saved = services.save(&request.name, caller, request.diff, kind).await;
            // No progress after the end.
            poller.abort();
            let _ = poller.await;
            let last = saved
                .map(|record| v1::SaveEvent { event: Some(v1::save_event::Event::Done(snapshot_message(&record))) });
            let _ = sender.send(last).await;
        });
        Ok(GrpcResponse::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))))
    }

    async fn wake(&self, request: GrpcRequest<v1::VmName>) -> Result<GrpcResponse<v1::Vm>, Status> {
        let caller = caller(&request)?;
        let name = request.into_inner().name;
        self.running(&name, caller).await?;
        let vms = self.host.vms.lock().await;
        Ok(GrpcResponse::new(vm_message(&self.host, self.host.check(&vms, &name, caller)?)))
    }

    async fn rollback(&self, request: GrpcRequest<v1::RollbackRequest>) -> Result<GrpcResponse<v1::Vm>, Status> {
        let caller = caller(&request)?;
        let v1::RollbackRequest { name, id } = request.into_inner();
        {
            let vms = self.host.vms.lock().await;
            let entry = self.host.check(&vms, &name, caller)?;
            if !entry.record.snapshots.iter().any(|snapshot| snapshot.id == id) {
                return Err(Status::not_found(format!("VM {name:?} has no snapshot {id:?}")));
            }
        }
        self.stop_vm(&name, caller).await?;
        {
            let mut vms = self.host.vms.lock().await;
            let entry = vms.get_mut(&name).ok_or_else(|| Status::not_found(format!("{name:?} was deleted")))?;
            entry.record.hibernated = Some(id.clone());
            entry.record.exit_reason = Some(format!("rolled back to {id}"));
        }
        Ok(GrpcResponse::new(self.host.boot(&name, true).await?))
    }

    async fn list(&self, request: GrpcRequest<v1::VmName>) -> Result<GrpcResponse<v1::ListSnapshotsResponse>, Status> {
        let caller = caller(&request)?;
        let name = request.into_inner().name;
        let vms = self.host.vms.lock().await;
        let entry = self.host.check(&vms, &name, caller)?;
        let snapshots = entry.record.snapshots.iter().map(snapshot_message).collect();
        Ok(GrpcResponse::new(v1::ListSnapshotsResponse { snapshots }))
    }
}

#[tonic::async_trait]
impl v1::templates_server::Templates for Services {
    async fn create(
        &self,
        request: GrpcRequest<v1::CreateTemplateRequest>,
    ) -> Result<GrpcResponse<v1::Template>, Status> {
        let caller = caller(&request)?;
        let params = vec![("name", request.get_ref().name.clone()), ("from_vm", request.get_ref().from_vm.clone())];
        let work = async move {
            let request = request.into_inner();
            if !valid_name(&request.name) {
                return Err(Status::invalid_argument(format!(
                    "template name {:?} must be 1 to 63 of a-z, 0-9 and '-', not starting with '-'",
                    request.name
                )));
            }
            if self.host.templates.get(&request.name).is_ok() {
                return Err(Status::already_exists(format!("a template named {:?} exists", request.name)));
            }
            self.running(&request.from_vm, caller).await?;
            let spec = {
                let vms = self.host.vms.lock().await;
                self.host.check(&vms, &request.from_vm, caller)?.record.spec.clone()
            };
            // The snapshot freezes each writable disk's top beside it (a raw disk written
            // in place is refused there); the template's VMs lay their own tops over those
            // frozen layers, reading them where they lie.
            let mut layer_dirs: Vec<PathBuf> = spec.template.iter().flat_map(|t| t.layer_dirs.clone()).collect();
            for disk in spec.disks.iter().filter(|disk| !disk.readonly) {
                let dir = disk.path.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
                if !layer_dirs.contains(&dir) {
                    layer_dirs.push(dir);
                }
            }
            let snapshot = self.save(&request.from_vm, caller, false, Save::Snapshot).await?;
            let source = self.host.registry.vm_dir(&request.from_vm).join("snapshots").join(&snapshot.id);
            let record = TemplateRecord {
                name: request.name,
                owner_uid: caller.uid,
                from_vm: request.from_vm,
                memory_mib: spec.memory_mib,
                cpus: spec.cpus,
                display: spec.display,
                kernel: spec.kernel,
                memory_bytes: snapshot.memory_bytes,
                unix_time: snapshot.unix_time,
                disks: spec.disks.clone(),
                layer_dirs,
            };
            let host = self.host.clone();
            let made = record.clone();
            tokio::task::spawn_blocking(move || host.templates.create(&made, &source))
                .await
                .map_err(|err| Status::internal(err.to_string()))?
                .map_err(template_status)?;
            Ok(GrpcResponse::new(template_message(&record)))
        };
        self.host.audited(caller, "template.create", params, work).await
    }

    async fn list(
        &self,
        request: GrpcRequest<v1::ListTemplatesRequest>,
    ) -> Result<GrpcResponse<v1::ListTemplatesResponse>, Status> {
        let caller = caller(&request)?;
        let templates = self.host.templates.list();
        let visible = templates.iter().filter(|template| self.host.allowed(caller, template.owner_uid));
        Ok(GrpcResponse::new(v1::ListTemplatesResponse { templates: visible.map(template_message).collect() }))
    }

    async fn delete(
        &self,
        request: GrpcRequest<v1::TemplateName>,
    ) -> Result<GrpcResponse<v1::DeleteTemplateResponse>, Status> {
        let caller = caller(&request)?;
        let params = vec![("name", request.get_ref().name.clone())];
        let work = async move {
            let name = request.into_inner().name;
            let record = self.host.templates.get(&name).map_err(template_status)?;
            if !self.host.allowed(caller, record.owner_uid) {
                return Err(Status::not_found(format!("no template named {name:?}")));
            }
            let vms = self.host.vms.lock().await;
            let users: Vec<&str> = vms
                .values()
                .filter(|entry| entry.record.spec.template.as_ref().is_some_and(|template| template.name == name))
                .map(|entry| entry.record.name.as_str())
                .collect();
            if !users.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "template {name:?} is in use by {}: delete those VMs first",
                    users.join(", ")
                )));
            }
            self.host.templates.remove(&name).map_err(template_status)?;
            Ok(GrpcResponse::new(v1::DeleteTemplateResponse {}))
        };
        self.host.audited(caller, "template.delete", params, work).await
    }
}

fn template_message(record: &TemplateRecord) -> v1::Template {
    v1::Template {
        name: record.name.clone(),
        from_vm: record.from_vm.clone(),
        owner_uid: record.owner_uid,
        memory_mib: record.memory_mib,
        cpus: record.cpus,
        display: record.display.clone(),
        memory_bytes: record.memory_bytes,
        unix_time: record.unix_time,
    }
}

fn template_status(err: TemplateError) -> Status {
    match err {
        TemplateError::NotFound(_) => Status::not_found(err.to_string()),
        TemplateError::Exists(_) => Status::already_exists(err.to_string()),
        TemplateError::Write { .. } | TemplateError::Read { .. } => Status::internal(err.to_string()),
    }
}

#[tonic::async_trait]
impl v1::audit_server::Audit for Services {
    type RecordsStream = Stream2<v1::AuditRecord>;

    /// The VM's audit records from index `from` on, each as its JSON export line (the
    /// same as `carrel-audit export --jsonl`); a hibernated VM's log is read from disk.
    async fn records(
        &self,
        request: GrpcRequest<v1::AuditRequest>,
    ) -> Result<GrpcResponse<Self::RecordsStream>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let dir = {
            let vms = self.host.vms.lock().await;
            self.host.check(&vms, &request.name, caller)?.paths.audit()
        };
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<v1::AuditRecord, Status>>(64);
        tokio::task::spawn_blocking(move || {
            let log = carrel_audit::layout::Layout::new(&dir).log();
            let read = carrel_audit::reader::for_each_event(&log, request.from, |event, leaf| {
                let record = v1::AuditRecord {
                    index: event.seq,
                    action: event.action.clone(),
                    json: carrel_audit::export::event_json(event, leaf).to_string(),
                };
                match sender.blocking_send(Ok(record)) {
                    Ok(()) => std::ops::ControlFlow::Continue(()),
                    Err(_) => std::ops::ControlFlow::Break(()),
                }
            });
            if let Err(err) = read {
                let _ = sender.blocking_send(Err(Status::data_loss(format!("the audit log cannot be read: {err}"))));
            }
        });
        Ok(GrpcResponse::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))))
    }
}

/// The bytes of a put as the blocking control client reads them, chunk by chunk from the
/// gRPC stream's side.
struct ChunkReader {
    chunks: std::sync::mpsc::Receiver<Vec<u8>>,
    pending: Vec<u8>,
    at: usize,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.pending.len() {
            match self.chunks.recv() {
                Ok(chunk) => (self.pending, self.at) = (chunk, 0),
                // The client is done (or gone): end of file.
                Err(_) => return Ok(0),
            }
        }
        let count = buffer.len().min(self.pending.len() - self.at);
        buffer[..count].copy_from_slice(&self.pending[self.at..self.at + count]);
        self.at += count;
        Ok(count)
    }
}

/// The bytes of a get as the blocking control client writes them, passed on to the
/// gRPC stream.
struct ChunkWriter {
    chunks: tokio::sync::mpsc::Sender<Result<v1::GetChunk, Status>>,
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.chunks
            .blocking_send(Ok(v1::GetChunk { data: bytes.to_vec() }))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away"))?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn snapshot_message(record: &SnapshotRecord) -> v1::SnapshotInfo {
    v1::SnapshotInfo {
        checkpoint: record.checkpoint,
        parent: record.parent.clone().unwrap_or_default(),
        id: record.id.clone(),
        memory_bytes: record.memory_bytes,
        paused_us: record.paused_us,
        diff: record.diff,
        disk_bytes: record.disk_bytes,
        unix_time: record.unix_time,
    }
}

/// The next snapshot's id: `s1`, `s2`, ... past the highest taken.
fn next_snapshot_id(taken: &[SnapshotRecord]) -> String {
    let highest = taken.iter().filter_map(|record| record.id.strip_prefix('s')?.parse::<u64>().ok()).max();
    format!("s{}", highest.unwrap_or(0) + 1)
}

fn unix_time() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs() as i64)
}

/// The lowest uid from `first` on that no VM of `vms` runs as: one uid per VM, so no two
/// VMMs can reach each other's files or processes.
fn free_jail_uid(first: u32, vms: &std::collections::BTreeMap<String, VmEntry>) -> u32 {
    let taken: std::collections::BTreeSet<u32> = vms.values().filter_map(|entry| entry.record.jail_uid).collect();
    (first..).find(|uid| !taken.contains(uid)).unwrap_or(first)
}

/// Where a disk given as `path` lies: an absolute path where it says; a file name alone
/// in the VM's own disks directory (deleted with the VM), where its jailed VMM may also
/// freeze the disk's layers for a snapshot.
fn own_disk(paths: &supervisor::VmPaths, path: &Path) -> Result<PathBuf, Status> {
    use std::path::Component;
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    let mut components = path.components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(name)), None) if !name.to_string_lossy().starts_with('.') => {
            Ok(paths.disks().join(name))
        }
        _ => Err(Status::invalid_argument(format!(
            "disk {}: give an absolute path, or a file name alone for a disk of the VM's own",
            path.display()
        ))),
    }
}

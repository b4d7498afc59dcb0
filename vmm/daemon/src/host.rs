//! The daemon's state: every VM with its record and state, who may act on it, the
//! watchers that notice a VMM ending (pidfd) and keep the reason, the VMs' cgroups and
//! the owners' secrets.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use carrel_api::v1;
use tokio::io::unix::AsyncFd;
use tokio::sync::Mutex;
use tonic::Status;

use crate::cgroup::{self, Cgroups, DiskLimits, Limits};
use crate::registry::{Registry, VmRecord};
use crate::secrets::SecretStore;
use crate::standby::{Standby, StandbyPool};
use crate::supervisor::{self, VmPaths};
use crate::templates::Templates;

/// Who is calling, from the socket's peer credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl Caller {
    /// carreld itself (its policies), as the VM's audit log and the host log name it.
    pub fn daemon() -> Caller {
        Caller { pid: std::process::id() as i32, uid: 0, gid: 0 }
    }
}

/// One VM as the daemon holds it.
#[derive(Debug)]
pub struct VmEntry {
    pub record: VmRecord,
    pub state: v1::VmState,
    pub paths: VmPaths,
    /// Why the daemon itself ended the VMM (the watchdog), for the exit reason.
    pub ended_by: Option<String>,
    /// Its VMM is saving it to disk and will end: that end is no crash.
    pub hibernating: bool,
    /// When a call last touched it, or its guest last worked: the idle policy's clock.
    pub last_active: std::sync::Mutex<std::time::Instant>,
    /// Its cgroup's CPU time when the policies last looked.
    pub cpu_seen_us: u64,
    /// When its last checkpoint was taken (or it started).
    pub last_checkpoint_at: std::time::Instant,
}

impl VmEntry {
    pub fn new(record: VmRecord, state: v1::VmState, paths: VmPaths) -> VmEntry {
        let last_active = std::sync::Mutex::new(std::time::Instant::now());
        let last_checkpoint_at = std::time::Instant::now();
        VmEntry {
            record,
            state,
            paths,
            ended_by: None,
            hibernating: false,
            last_active,
            cpu_seen_us: 0,
            last_checkpoint_at,
        }
    }

    /// A call or the guest's own work: the VM is not idle now.
    pub fn touch(&self) {
        *self.last_active.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = std::time::Instant::now();
    }

    pub fn idle_for(&self) -> std::time::Duration {
        self.last_active.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).elapsed()
    }
}

/// Settings the daemon starts with.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub state: PathBuf,
    pub vmm: PathBuf,
    /// The kernel of a VM whose config names none (the Desk kernel).
    pub default_kernel: PathBuf,
    /// Members of this group may see and act on every VM.
    pub admin_gid: Option<u32>,
    /// The VMs' parent cgroup under the daemon's own (None: no cgroups).
    pub cgroup: Option<String>,
    /// Jail every VMM, each as its own uid from this one on (None: no jails).
    pub jail_uids: Option<u32>,
    /// Keep a VMM started ahead of the next VM's start.
    pub standby: bool,
}

#[derive(Debug)]
pub struct Host {
    pub config: HostConfig,
    pub registry: Registry,
    pub vms: Mutex<BTreeMap<String, VmEntry>>,
    /// Where the VMs' cgroups are; None when the host has none the daemon can use.
    pub cgroups: Option<Cgroups>,
    pub secrets: SecretStore,
    /// Held while a hibernated VM wakes, so two calls that need it wake it once.
    pub waking: Mutex<()>,
    /// Every change of a VM's state, for Vms.Watch.
    pub events: tokio::sync::broadcast::Sender<v1::VmEvent>,
    /// The host's own audit log (`<state>/audit`): requests that are not one VM's, and
    /// each VM's creation and deletion, with the caller.
    pub audit: Option<carrel_audit::AuditLog>,
    /// A signed checkpoint of the host's audit log is on its way (see `record`).
    checkpoint_pending: Arc<std::sync::atomic::AtomicBool>,
    pub templates: Templates,
    /// Control connections to the VMMs kept between calls.
    pub connections: supervisor::Connections,
    /// What Host.Info tells of the machine, read once.
    pub machine: Machine,
    /// The VMM the next start takes.
    pub standby: Arc<StandbyPool>,
}

/// The machine carreld runs on, as Host.Info tells it: it does not change while carreld
/// runs, so it is read once rather than from sysfs and sysconf on every call.
#[derive(Debug, Clone)]
pub struct Machine {
    pub platform: &'static str,
    pub cpus: u32,
    pub memory_bytes: u64,
}

impl Machine {
    pub fn read() -> Machine {
        // SAFETY: sysconf only reads system configuration.
        let (cpus, pages, page) = unsafe {
            (
                libc::sysconf(libc::_SC_NPROCESSORS_ONLN),
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let platform = if std::path::Path::new("/sys/module/kvm_pvm").exists() { "pvm" } else { "hardware" };
        Machine { platform, cpus: cpus.max(0) as u32, memory_bytes: (pages.max(0) as u64) * (page.max(0) as u64) }
    }
}

impl Host {
    /// Loads the registry and re-attaches to every VMM still running.
    pub async fn open(config: HostConfig) -> anyhow::Result<Arc<Host>> {
        let registry = Registry::open(&config.state)?;
        let records = registry.load()?;
        let secrets = SecretStore::open(&config.state)?;
        let templates = Templates::open(&config.state)?;
        let audit = match carrel_audit::AuditLog::open(&config.state.join("audit"), "host") {
            Ok(log) => Some(log),
            Err(err) => {
                eprintln!("carreld: warning: no host audit log: {}", carrel_audit::error_chain(&err));
                None
            }
        };
        let cgroups = match config.cgroup.as_deref().map(Cgroups::open) {
            Some(Ok(cgroups)) => {
                eprintln!("carreld: VM resource limits in {}", cgroups.describe());
                Some(cgroups)
            }
            Some(Err(why)) => {
                eprintln!("carreld: warning: VMs run without resource limits: {why}");
                None
            }
            None => None,
        };
        let standby = StandbyPool::new(config.vmm.clone(), cgroups.clone(), config.standby);
        standby.refill(std::time::Duration::ZERO);
        let host = Arc::new(Host {
            config,
            registry,
            vms: Mutex::new(BTreeMap::new()),
            cgroups,
            secrets,
            waking: Mutex::new(()),
            events: tokio::sync::broadcast::channel(1024).0,
            audit,
            checkpoint_pending: Arc::default(),
            templates,
            connections: supervisor::Connections::default(),
            machine: Machine::read(),
            standby,
        });
        let mut revive = Vec::new();
        for (name, mut record) in records {
            let paths = VmPaths { dir: host.registry.vm_dir(&name) };
            let mut state = match (record.stopped, &record.hibernated) {
                (true, _) => v1::VmState::Stopped,
                (false, Some(_)) => v1::VmState::Hibernated,
                (false, None) => v1::VmState::Crashed,
            };
            if let Some(pid) = record.pid.filter(|pid| supervisor::alive(*pid)) {
                let answers = supervisor::call(
                    &paths.control(),
                    carrel_vmm::control::Request::Status,
                    std::time::Duration::from_secs(2),
                )
                .await;
                if answers.is_ok() {
                    state = v1::VmState::Running;
                    host.clone().watch_pid(name.clone(), pid);
                }
            } else if record.pid.is_some() {
                record.pid = None;
                record.exit_reason = Some("the VMM ended while carreld was not running".into());
                // It was running when the host (or its VMM) went down: back from its last
                // checkpoint, once the daemon is up.
                if let Some(checkpoint) = record.last_checkpoint().map(|snapshot| snapshot.id.clone()) {
                    if let Some(reason) = &mut record.exit_reason {
                        reason.push_str(&format!("; restarted from checkpoint {checkpoint}"));
                    }
                    record.hibernated = Some(checkpoint);
                    revive.push(name.clone());
                    state = v1::VmState::Starting;
                }
                host.registry.save(&record)?;
            }
            if state == v1::VmState::Running && record.spec.watchdog_seconds > 0 {
                if let Some(pid) = record.pid {
                    host.clone().watch_heartbeat(name.clone(), pid, paths.vsock(), record.spec.watchdog_seconds);
                }
            }
            host.vms.lock().await.insert(name, VmEntry::new(record, state, paths));
        }
        for name in revive {
            let host = host.clone();
            tokio::spawn(async move {
                if let Err(status) = host.boot(&name, false).await {
                    eprintln!("carreld: {name:?} did not come back from its checkpoint: {}", status.message());
                }
            });
        }
        Ok(host)
    }

    /// Records a host-level request in the host's audit log: who, what, with which
    /// parameters (secrets by name and length only), and how it ended.
    pub fn record(&self, caller: Caller, action: &str, params: &[(&str, String)], outcome: Result<(), &Status>) {
        let Some(log) = &self.audit else { return };
        let outcome = match outcome {
            Ok(()) => carrel_audit::Outcome::Ok,
            Err(status) => carrel_audit::Outcome::Error(format!("{:?}: {}", status.code(), status.message())),
        };
        let actor = carrel_audit::Actor { pid: caller.pid as u32, uid: caller.uid, gid: caller.gid };
        let mut event = carrel_audit::NewEvent::new(action).actor(actor).outcome(outcome);
        for (key, value) in params {
            event = event.param(*key, value.clone());
        }
        // The record is durable before the call is answered.
        if let Err(err) = log.append(event) {
            eprintln!("carreld: warning: the host audit log failed: {}", carrel_audit::error_chain(&err));
            return;
        }
        self.checkpoint_soon(log);
    }

    /// Host requests are few: each is covered by a signed checkpoint, so none can be
    /// dropped later unnoticed. The checkpoint (the tree's files synced, then one signed
    /// and written: about 3 ms) is taken on a blocking thread rather than in the call,
    /// one for every record made while it waits.
    fn checkpoint_soon(&self, log: &carrel_audit::AuditLog) {
        use std::sync::atomic::Ordering;
        if self.checkpoint_pending.swap(true, Ordering::SeqCst) {
            return;
        }
        let (log, pending) = (log.clone(), self.checkpoint_pending.clone());
        tokio::task::spawn_blocking(move || {
            // Cleared first: a record made from here on asks for a checkpoint of its own.
            pending.store(false, Ordering::SeqCst);
            sign_checkpoint(&log);
        });
    }

    /// Signs the checkpoint still on its way, if one is (at shutdown, when a blocking
    /// task queued may never start; one that started is waited for).
    pub fn checkpoint_now(&self) {
        if !self.checkpoint_pending.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if let Some(log) = &self.audit {
            sign_checkpoint(log);
        }
    }

    /// Runs a host-level request's `work` and records it with its outcome.
    pub async fn audited<T>(
        &self,
        caller: Caller,
        action: &str,
        params: Vec<(&str, String)>,
        work: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let result = work.await;
        self.record(caller, action, &params, result.as_ref().map(|_| ()));
        result
    }

    /// Sets `entry`'s state and tells the watchers.
    pub fn set_state(&self, entry: &mut VmEntry, state: v1::VmState) {
        entry.state = state;
        let reason = entry.record.exit_reason.clone().unwrap_or_default();
        // No watcher is no error.
        let _ = self.events.send(v1::VmEvent { name: entry.record.name.clone(), state: state as i32, reason });
    }

    /// Whether `caller` may see and act on a VM owned by `owner`.
    pub fn allowed(&self, caller: Caller, owner: u32) -> bool {
        caller.uid == 0 || caller.uid == owner || self.config.admin_gid == Some(caller.gid)
    }

    /// Checks that `name` exists and `caller` may use it; a VM the caller may not see is
    /// answered as permission denied (never its details).
    pub fn check<'a>(
        &self,
        vms: &'a BTreeMap<String, VmEntry>,
        name: &str,
        caller: Caller,
    ) -> Result<&'a VmEntry, Status> {
        let entry = vms.get(name).ok_or_else(|| Status::not_found(format!("no VM named {name:?}")))?;
        if !self.allowed(caller, entry.record.owner_uid) {
            return Err(Status::permission_denied(format!("VM {name:?} belongs to another user")));
        }
        Ok(entry)
    }

    /// Watches a child this daemon started: its exit status becomes the exit reason.
    pub fn watch_child(self: Arc<Host>, name: String, paths: VmPaths, mut child: tokio::process::Child) {
        tokio::spawn(async move {
            let status = child.wait().await;
            let reason = match status {
                Ok(status) => supervisor::describe_status(status, &paths),
                Err(err) => format!("waiting for the VMM failed: {err}"),
            };
            self.ended(&name, reason).await;
        });
    }

    /// Watches a VMM this daemon re-attached to (not its child) through a pidfd.
    pub fn watch_pid(self: Arc<Host>, name: String, pid: u32) {
        tokio::spawn(async move {
            // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
            let reason = if fd < 0 {
                "the VMM ended (its pidfd could not be opened)".to_string()
            } else {
                // SAFETY: the fd was just returned by pidfd_open and is owned here only.
                let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
                // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open and the
                // same for its whole life.
                match unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) } {
                    Ok(fd) => {
                        let _ = fd.readable().await;
                        "the VMM ended (re-attached after a daemon restart: its exit status went to its parent)".into()
                    }
                    Err(err) => format!("cannot watch the VMM: {err}"),
                }
            };
            self.ended(&name, reason).await;
        });
    }

    /// Starts `name`'s VMM and marks it running; a VMM that fails to start leaves the VM
    /// crashed with the reason. A start by request begins a new run of restarts; a restart
    /// after a failure does nothing if the VM was stopped meanwhile.
    pub async fn boot(self: &Arc<Host>, name: &str, by_request: bool) -> Result<v1::Vm, Status> {
        let (record, paths) = {
            let mut vms = self.vms.lock().await;
            let entry = vms.get_mut(name).ok_or_else(|| Status::not_found(format!("no VM named {name:?}")))?;
            if by_request {
                let was_stopped = std::mem::replace(&mut entry.record.stopped, false);
                entry.record.restarts = 0;
                // Asked to run, it runs again after a power loss too.
                if was_stopped {
                    self.registry.save(&entry.record).map_err(|err| Status::internal(err.to_string()))?;
                }
            } else if entry.record.stopped {
                return Ok(crate::service::vm_message(self, entry));
            }
            self.set_state(entry, v1::VmState::Starting);
            (entry.record.clone(), entry.paths.clone())
        };
        let mut standby = self.standby.take();
        let started = match self.prepare_cgroup(&record, standby.as_mut()) {
            Ok(procs) => supervisor::start(&self.config.vmm, &record, &paths, procs, standby).await,
            Err(reason) => Err(reason),
        };
        let mut vms = self.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| Status::not_found(format!("{name:?} was deleted")))?;
        match started {
            Ok(child) => {
                entry.record.pid = child.id();
                self.set_state(entry, v1::VmState::Running);
                // Awake: the snapshot it restored stays, as the parent of its next diff.
                entry.record.parent = entry.record.hibernated.take();
                entry.last_checkpoint_at = std::time::Instant::now();
                // Not synced: after a power loss the pid names no VMM, and a hibernated
                // VM's snapshot, the one durable fact here, stays as its parent.
                self.registry.update(&entry.record).map_err(|err| Status::internal(err.to_string()))?;
                let pid = child.id();
                self.clone().watch_child(name.to_string(), paths.clone(), child);
                if let (Some(pid), watchdog @ 1..) = (pid, entry.record.spec.watchdog_seconds) {
                    self.clone().watch_heartbeat(name.to_string(), pid, paths.vsock(), watchdog);
                }
                Ok(crate::service::vm_message(self, entry))
            }
            Err(reason) => {
                entry.record.exit_reason = Some(reason.clone());
                self.set_state(entry, v1::VmState::Crashed);
                let _ = self.registry.save(&entry.record);
                Err(Status::internal(format!("VM {name:?} did not start: {reason}")))
            }
        }
    }

    /// A fresh cgroup for `record`'s next run, with its limits: `standby`'s own group
    /// where it can be renamed, else a new one; the `cgroup.procs` files the VMM enters
    /// (none when the host has no cgroups).
    fn prepare_cgroup(&self, record: &VmRecord, standby: Option<&mut Standby>) -> Result<Vec<OwnedFd>, String> {
        let Some(cgroups) = &self.cgroups else { return Ok(Vec::new()) };
        let spec = &record.spec;
        let mut limits = Limits::for_vm(spec.memory_mib, spec.cpus, spec.memory_limit_mib);
        if spec.disk_bytes_per_second != 0 || spec.disk_iops != 0 {
            let files =
                spec.disks.iter().flat_map(|disk| std::iter::once(disk.path.as_path()).chain(disk.base.as_deref()));
            limits.disk = DiskLimits {
                devices: cgroup::block_devices(files),
                bytes_per_second: spec.disk_bytes_per_second,
                iops: spec.disk_iops,
            };
        }
        if let Some(procs) = standby.and_then(|standby| standby.rename_group(cgroups, &record.name, &limits)) {
            return Ok(procs);
        }
        cgroups.prepare(&record.name, &limits).and_then(|group| group.open_procs()).map_err(|err| err.to_string())
    }

    /// The VM's use of the host while its cgroup is there.
    pub fn usage(&self, name: &str) -> Option<v1::ResourceUsage> {
        let cgroups = self.cgroups.as_ref()?;
        let group = cgroups.vm(name);
        if !group.exists() {
            return None;
        }
        let usage = group.usage();
        Some(v1::ResourceUsage {
            memory_current_bytes: usage.memory_current_bytes,
            memory_peak_bytes: usage.memory_peak_bytes,
            memory_limit_bytes: usage.memory_limit_bytes,
            cpu_usage_us: usage.cpu_usage_us,
            cpu_quota_us: usage.cpu_quota_us,
            pids_current: usage.pids_current as u32,
            pids_limit: usage.pids_limit as u32,
            oom_kills: usage.oom_kills,
            cgroup_version: cgroups.version().label().into(),
        })
    }

    /// Removes the VM's cgroup (when it is deleted).
    pub fn remove_cgroup(&self, name: &str) -> Result<(), String> {
        match &self.cgroups {
            Some(cgroups) => cgroups.vm(name).remove().map_err(|err| err.to_string()),
            None => Ok(()),
        }
    }

    /// The watchdog: a VM whose guest agent sends no heartbeat for `seconds` is hung;
    /// its VMM is killed and the restart policy brings it back. The first heartbeat may
    /// take the boot's time (30 s at most).
    pub fn watch_heartbeat(self: Arc<Host>, name: String, pid: u32, vsock: PathBuf, seconds: u32) {
        use carrel_agent_client::{connect_vsock_uds, Client, ClientError};
        let timeout = std::time::Duration::from_secs(u64::from(seconds));
        tokio::spawn(async move {
            let hung = tokio::task::spawn_blocking(move || {
                let boot = std::time::Instant::now() + std::time::Duration::from_secs(30);
                let stream = loop {
                    match connect_vsock_uds(&vsock, carrel_agent_proto::AGENT_VSOCK_PORT) {
                        Ok(stream) => break stream,
                        Err(_) if std::time::Instant::now() < boot && supervisor::alive(pid) => {
                            std::thread::sleep(std::time::Duration::from_millis(50))
                        }
                        Err(_) => return false,
                    }
                };
                let mut client = Client::new(stream);
                if matches!(client.wait_ready(std::time::Duration::from_secs(30)), Err(ClientError::WaitReady { .. })) {
                    return supervisor::alive(pid);
                }
                loop {
                    match client.next_heartbeat(timeout) {
                        Ok(_) => {}
                        // Silence while the VMM runs: the guest is hung.
                        Err(ClientError::WaitReady { .. }) => return supervisor::alive(pid),
                        // The connection ended with the VMM: nothing to do.
                        Err(_) => return false,
                    }
                }
            })
            .await
            .unwrap_or(false);
            if !hung {
                return;
            }
            let mut vms = self.vms.lock().await;
            if let Some(entry) = vms.get_mut(&name).filter(|entry| entry.record.pid == Some(pid)) {
                entry.ended_by = Some(format!("watchdog: no heartbeat from the guest agent for {seconds} s"));
                // SAFETY: kill(2) on the VMM this daemon runs for the VM.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        });
    }

    /// A VMM ended: keep why, and restart it when it was not asked to stop and its
    /// policy allows (at once the first time, then with a doubling backoff).
    async fn ended(self: &Arc<Host>, name: &str, reason: String) {
        let restart = {
            let mut vms = self.vms.lock().await;
            let Some(entry) = vms.get_mut(name) else { return };
            if std::mem::take(&mut entry.hibernating) {
                entry.record.pid = None;
                self.set_state(entry, v1::VmState::Hibernated);
                if let Err(err) = self.registry.save(&entry.record) {
                    eprintln!("carreld: {err}");
                }
                return;
            }
            let stopped = entry.record.stopped;
            let tail = supervisor::last_lines(&entry.paths, 5);
            let oom_kills = self.cgroups.as_ref().map(|cgroups| cgroups.vm(name)).filter(|group| group.oom_kills() > 0);
            let reason = match (entry.ended_by.take(), oom_kills) {
                (Some(why), _) => format!("{why} ({reason})"),
                (None, Some(group)) => format!(
                    "killed by the OOM killer: over its memory limit of {} MiB ({reason})",
                    group.memory_limit_mib()
                ),
                (None, None) => reason,
            };
            entry.record.pid = None;
            entry.record.exit_reason =
                Some(if tail.is_empty() { reason } else { format!("{reason}; last lines: {tail}") });
            self.set_state(entry, if stopped { v1::VmState::Stopped } else { v1::VmState::Crashed });
            let restart = !stopped && entry.record.restarts < entry.record.spec.max_restarts;
            if restart {
                entry.record.restarts += 1;
                self.set_state(entry, v1::VmState::Starting);
                // Healing: back to its last good state rather than a cold boot.
                if let Some(checkpoint) = entry.record.last_checkpoint().map(|snapshot| snapshot.id.clone()) {
                    if let Some(reason) = &mut entry.record.exit_reason {
                        reason.push_str(&format!("; restarted from checkpoint {checkpoint}"));
                    }
                    entry.record.hibernated = Some(checkpoint);
                }
            }
            if let Err(err) = self.registry.save(&entry.record) {
                eprintln!("carreld: {err}");
            }
            // The first restart at once, then 100 ms, 200 ms, 400 ms, ...
            restart.then(|| RESTART_BACKOFF * ((1u32 << (entry.record.restarts - 1).min(8)) / 2))
        };
        if let Some(backoff) = restart {
            let host = self.clone();
            let name = name.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(backoff.min(MAX_BACKOFF)).await;
                if let Err(status) = host.boot(&name, false).await {
                    eprintln!("carreld: restarting {name}: {}", status.message());
                }
            });
        }
    }
}

/// The backoff unit between restarts after failures: 0, 100 ms, 200 ms, 400 ms, ...
const RESTART_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);
const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(10);

/// Signs and stores a checkpoint of the host's audit log; a failure is said, not fatal.
fn sign_checkpoint(log: &carrel_audit::AuditLog) {
    if let Err(err) = log.checkpoint() {
        eprintln!("carreld: warning: the host audit log's checkpoint failed: {}", carrel_audit::error_chain(&err));
    }
}

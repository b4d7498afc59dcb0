//! A `carrel-vmm` started ahead of need (`carrel-vmm standby`), which becomes the next
//! VM's process: that VM's start skips the fork of the daemon, the exec of the VMM and,
//! on cgroup v1, the move into the VM's cgroup (10-25 ms here for the memory controller
//! alone, more than the rest of a restore). The pool keeps one ready and starts the next
//! a little after one is taken, so its start does not compete with the VM that just
//! started.
//!
//! On cgroup v1 a standby waits in a group of its own, [`STANDBY_GROUP`], which is
//! renamed to the VM's and given its limits: everything the process ever used is the
//! VM's. Where groups cannot be renamed (v2) the standby waits in the daemon's group and
//! is moved into the VM's before it reads its command line; what it allocated while
//! waiting (its loading, well under a MiB) stays charged where it was.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::cgroup::{self, Cgroups, Limits, Version};

/// How long after a standby is taken the next one is started.
const REFILL_DELAY: Duration = Duration::from_millis(50);
/// How long a new standby has to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The group a standby waits in: not a VM name (those never start with a dot).
pub const STANDBY_GROUP: &str = ".standby";

/// A waiting `carrel-vmm standby`.
#[derive(Debug)]
pub struct Standby {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    /// Whether it waits in [`STANDBY_GROUP`] (else in the daemon's group).
    grouped: bool,
    /// Whether its group is its VM's already.
    placed: bool,
}

impl Standby {
    /// Starts one, its stdin a pipe from the daemon: in [`STANDBY_GROUP`] where groups
    /// can be renamed, else in the daemon's group.
    fn start(vmm: &Path, cgroups: Option<&Cgroups>) -> Result<Standby, String> {
        let procs = match cgroups.filter(|cgroups| cgroups.version() == Version::V1) {
            Some(cgroups) => cgroups
                .prepare(STANDBY_GROUP, &Limits::for_vm(0, 1, None))
                .and_then(|group| group.open_procs())
                .map_err(|err| err.to_string())?,
            None => Vec::new(),
        };
        let mut child = crate::supervisor::vmm_command(vmm, cgroup::raw_fds(&procs))
            .arg("standby")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|err| format!("cannot start {}: {err}", vmm.display()))?;
        let stdin = child.stdin.take().ok_or("the standby has no stdin")?;
        Ok(Standby { child, stdin, grouped: !procs.is_empty(), placed: false })
    }

    /// Waits until it says it is ready (waiting for a command line). One that ends first,
    /// or says something else, is killed: a VM is never handed to it.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let stdout = self.child.stdout.take().ok_or("the standby has no stdout")?;
        let mut line = String::new();
        let said = tokio::time::timeout(READY_TIMEOUT, tokio::io::BufReader::new(stdout).read_line(&mut line)).await;
        if matches!(said, Ok(Ok(_))) && line == "ready\n" {
            return Ok(());
        }
        let _ = self.child.kill().await;
        let status = self.child.wait().await.map(|status| status.to_string()).unwrap_or_else(|err| err.to_string());
        Err(format!("the standby VMM did not say it was ready ({status})"))
    }

    /// Gives the standby's group to `vm` with `limits` by renaming it; the group's
    /// `cgroup.procs` files, or `None` when it waits in no group of its own or the rename
    /// failed (then the caller makes the VM's group and [`Standby::assign`] moves it in).
    pub fn rename_group(&mut self, cgroups: &Cgroups, vm: &str, limits: &Limits) -> Option<Vec<OwnedFd>> {
        if !self.grouped {
            return None;
        }
        let renamed = cgroups
            .rename(STANDBY_GROUP, vm, limits)
            .and_then(|group| group.map(|group| group.open_procs()).transpose());
        match renamed {
            Ok(Some(procs)) => {
                self.placed = true;
                Some(procs)
            }
            Ok(None) => None,
            Err(err) => {
                eprintln!("carreld: warning: the standby VMM's cgroup could not be given to {vm}: {err}");
                None
            }
        }
    }

    /// Makes it the process of the VM run by `args` (`carrel-vmm` arguments): moves it
    /// into the group whose `cgroup.procs` files are `cgroup_procs` unless it is there
    /// already, then hands it the command line, its stderr going to `stderr`. On failure
    /// nothing was handed over: the standby is gone and the caller starts a VMM the
    /// ordinary way.
    pub async fn assign(
        mut self,
        cgroup_procs: &[OwnedFd],
        args: &[String],
        stderr: &Path,
    ) -> std::io::Result<tokio::process::Child> {
        let pid = self.child.id().ok_or_else(|| std::io::Error::other("the standby VMM has ended"))?;
        if !self.placed {
            cgroup::move_into(cgroup_procs, pid)?;
        }
        let assignment = serde_json::json!({ "args": args, "stderr": stderr });
        let mut line = assignment.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await?;
        drop(self.stdin);
        Ok(self.child)
    }
}

/// The daemon's standby VMM, if one is ready.
#[derive(Debug)]
pub struct StandbyPool {
    vmm: PathBuf,
    cgroups: Option<Cgroups>,
    enabled: bool,
    ready: Mutex<Option<Standby>>,
    starting: AtomicBool,
}

impl StandbyPool {
    pub fn new(vmm: PathBuf, cgroups: Option<Cgroups>, enabled: bool) -> Arc<StandbyPool> {
        Arc::new(StandbyPool { vmm, cgroups, enabled, ready: Mutex::new(None), starting: AtomicBool::new(false) })
    }

    /// The ready standby, if it is alive; the next one starts a little later.
    pub fn take(self: &Arc<Self>) -> Option<Standby> {
        let taken = self.ready.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        self.refill(REFILL_DELAY);
        let mut standby = taken?;
        match standby.child.try_wait() {
            Ok(None) => Some(standby),
            // It ended while waiting (the binary was replaced, or it was killed).
            Ok(Some(_)) | Err(_) => None,
        }
    }

    /// Ends the ready standby and removes its group, as the daemon stops. (One left by a
    /// daemon that was killed ends by itself when its stdin closes; the next daemon
    /// replaces its group.)
    pub async fn close(&self) {
        let ready = self.ready.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(mut standby) = ready {
            let _ = standby.child.kill().await;
        }
        if let Some(cgroups) = self.cgroups.as_ref().filter(|cgroups| cgroups.version() == Version::V1) {
            if let Err(err) = cgroups.vm(STANDBY_GROUP).remove() {
                eprintln!("carreld: warning: {err}");
            }
        }
    }

    /// Starts a standby after `delay`, unless one is ready or starting.
    pub fn refill(self: &Arc<Self>, delay: Duration) {
        if !self.enabled || self.starting.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let starter = Arc::clone(&pool);
            // The fork blocks its thread for milliseconds: not on a runtime worker.
            let started =
                tokio::task::spawn_blocking(move || Standby::start(&starter.vmm, starter.cgroups.as_ref())).await;
            let started = match started {
                Ok(Ok(mut standby)) => standby.wait_ready().await.map(|()| standby),
                Ok(Err(err)) => Err(err),
                Err(err) => Err(err.to_string()),
            };
            match started {
                Ok(standby) => {
                    let mut ready = pool.ready.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    if ready.is_none() {
                        *ready = Some(standby);
                    }
                }
                Err(err) => eprintln!("carreld: warning: no standby VMM: {err}"),
            }
            pool.starting.store(false, Ordering::Release);
        });
    }
}

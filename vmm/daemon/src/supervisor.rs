//! One `carrel-vmm` process per VM: started in its own process group (so it outlives a
//! daemon restart), watched until it ends, and spoken to over its private control socket.
//! Calls speak the per-VM protocol on tokio's sockets, on connections kept between calls;
//! file transfers use the blocking client on tokio's blocking pool.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use carrel_vmm::control::{ControlClient, Failure, Request, Response};

use crate::cgroup;
use crate::host::Caller;
use crate::registry::VmRecord;
use crate::standby::Standby;

/// How long a new VMM has to open its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Where a VM's files are.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    pub fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    pub fn audit(&self) -> PathBuf {
        self.dir.join("audit")
    }

    /// Where a jailed VMM mounts its root (in its own mount namespace: empty here).
    pub fn jail_root(&self) -> PathBuf {
        self.dir.join("jail")
    }

    /// Where the VM's snapshots go (and where a jailed VMM may write).
    pub fn snapshots(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    /// Where the disks of the VM's own (named by a file name alone) lie, and where its
    /// VMM freezes their layers for a snapshot.
    pub fn disks(&self) -> PathBuf {
        self.dir.join("disks")
    }

    pub fn snapshot(&self, id: &str) -> PathBuf {
        self.snapshots().join(id)
    }
}

/// Makes the VM's directory its jail uid's: the VMM writes its sockets, console, audit log
/// and snapshots there after leaving root. Only the daemon (root) and that uid may enter.
fn prepare_jail(paths: &VmPaths, uid: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |what: &Path, err: std::io::Error| format!("cannot prepare {} for the jail: {err}", what.display());
    for dir in [paths.jail_root(), paths.snapshots(), paths.disks()] {
        std::fs::create_dir_all(&dir).map_err(|err| fail(&dir, err))?;
    }
    std::fs::set_permissions(&paths.dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|err| fail(&paths.dir, err))?;
    // Made now by root, perhaps in a directory that is the VM's already.
    std::os::unix::fs::lchown(paths.disks(), Some(uid), Some(uid)).map_err(|err| fail(&paths.disks(), err))?;
    // What an earlier unjailed run made (audit segments, snapshots) becomes the VM's too;
    // the jail root stays root's. Once the directory is the VM's, what its VMM makes is.
    if std::fs::metadata(&paths.dir).is_ok_and(|dir| std::os::unix::fs::MetadataExt::uid(&dir) == uid) {
        return Ok(());
    }
    let mut pending = vec![paths.dir.clone()];
    while let Some(path) = pending.pop() {
        if path == paths.jail_root() {
            continue;
        }
        std::os::unix::fs::lchown(&path, Some(uid), Some(uid)).map_err(|err| fail(&path, err))?;
        if path.is_dir() && !path.is_symlink() {
            for entry in std::fs::read_dir(&path).map_err(|err| fail(&path, err))? {
                pending.push(entry.map_err(|err| fail(&path, err))?.path());
            }
        }
    }
    Ok(())
}

/// The `carrel-vmm run` arguments for `record`: when it is hibernated, a restore of its
/// snapshot; when it comes from a template, a restore of the template's; else a fresh
/// boot of its machine (a restore's machine is in its snapshot).
pub fn run_args(record: &VmRecord, paths: &VmPaths) -> Vec<String> {
    let spec = &record.spec;
    let mut args = vec!["run".to_string()];
    match (&record.hibernated, &spec.template) {
        (Some(id), _) => args.extend(["--restore".into(), paths.snapshot(id).display().to_string()]),
        (None, Some(template)) => {
            args.extend(["--restore".into(), template.snapshot.display().to_string()]);
            for disk in spec.disks.iter().filter(|disk| !disk.readonly) {
                args.extend(["--disk-top".into(), disk.path.display().to_string()]);
            }
        }
        (None, None) => {
            args.extend(["--kernel".into(), spec.kernel.display().to_string()]);
            args.extend(["--mem".into(), spec.memory_mib.to_string(), "--cpus".into(), spec.cpus.to_string()]);
            args.extend(["--display".into(), spec.display.clone()]);
            if let Some(cmdline) = &spec.cmdline {
                args.extend(["--cmdline".into(), cmdline.clone()]);
            }
            for disk in &spec.disks {
                let mut text = disk.path.display().to_string();
                if disk.readonly {
                    text.push_str(",readonly");
                }
                if let Some(base) = &disk.base {
                    text.push_str(&format!(",base={}", base.display()));
                }
                if let Some(size) = disk.size_bytes {
                    text.push_str(&format!(",size={size}"));
                }
                args.extend(["--disk".into(), text]);
            }
        }
    }
    args.extend([
        "--name".into(),
        record.name.clone(),
        "--socket".into(),
        paths.control().display().to_string(),
        "--vsock".into(),
        paths.vsock().display().to_string(),
        "--console-log".into(),
        paths.console().display().to_string(),
        "--no-console".into(),
        "--audit".into(),
        paths.audit().display().to_string(),
    ]);
    if let Some(uid) = record.jail_uid {
        args.extend(["--jail".into(), paths.jail_root().display().to_string()]);
        args.extend(["--uid".into(), uid.to_string(), "--gid".into(), uid.to_string()]);
        args.extend(["--jail-writable".into(), paths.snapshots().display().to_string()]);
        // A VM from a template reads its snapshot (a diff of the VM's may lie over it) and
        // the disk layers it froze.
        if let Some(template) = &spec.template {
            let snapshot_dir = template.snapshot.parent().unwrap_or(&template.snapshot);
            for dir in std::iter::once(snapshot_dir).chain(template.layer_dirs.iter().map(PathBuf::as_path)) {
                args.extend(["--jail-readable".into(), dir.display().to_string()]);
            }
        }
    }
    args
}

/// `carrel-vmm` as the daemon starts it: in its own process group (a signal to the
/// daemon's group does not end the VMs), entering the cgroup whose `cgroup.procs` files
/// are `cgroup_fds` before exec (so the VMM never runs outside its group), with nothing
/// of the daemon's but stdio.
pub fn vmm_command(vmm: &Path, cgroup_fds: Vec<i32>) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(vmm);
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe syscalls (write(2) on descriptors opened before the fork, then
    // close_range); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            cgroup::enter_self(&cgroup_fds)?;
            // Every other fd closes on exec (CLOSE_RANGE_CLOEXEC keeps the spawn's own
            // error pipe working).
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.stdin(Stdio::null()).stdout(Stdio::null()).process_group(0).kill_on_drop(false);
    command
}

/// Starts the VMM for `record` inside the cgroup whose `cgroup.procs` files are
/// `cgroup_procs` (opened by the caller), as `standby` when one is given; returns the
/// child once its control socket listens.
pub async fn start(
    vmm: &Path,
    record: &VmRecord,
    paths: &VmPaths,
    cgroup_procs: Vec<OwnedFd>,
    standby: Option<Standby>,
) -> Result<tokio::process::Child, String> {
    for stale in [paths.control(), paths.vsock()] {
        let _ = std::fs::remove_file(stale);
    }
    for dir in [paths.snapshots(), paths.disks()] {
        std::fs::create_dir_all(&dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    }
    if let Some(uid) = record.jail_uid {
        prepare_jail(paths, uid)?;
    }
    let args = run_args(record, paths);
    let log = paths.dir.join("vmm.log");
    let assigned = match standby {
        Some(standby) => standby.assign(&cgroup_procs, &args, &log).await.ok(),
        None => None,
    };
    let mut child = match assigned {
        Some(child) => child,
        None => {
            let stderr = std::fs::File::create(&log).map_err(|err| format!("cannot create vmm.log: {err}"))?;
            vmm_command(vmm, cgroup::raw_fds(&cgroup_procs))
                .args(&args)
                .stderr(stderr)
                .spawn()
                .map_err(|err| format!("cannot start {} in its cgroup: {err}", vmm.display()))?
        }
    };
    drop(cgroup_procs);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().map_err(|err| err.to_string())? {
            return Err(format!(
                "carrel-vmm ended at start ({}): {}",
                describe_status(status, paths),
                last_lines(paths, 5)
            ));
        }
        // Listening is answering: the VMM binds its control socket once the VM is built,
        // its start recorded and its privileges dropped, and a request waits in the
        // socket's queue for the event loop, which runs a moment later. (A Status call
        // here took 1.5-2 ms more, answered while the new VM's threads start.)
        if std::os::unix::net::UnixStream::connect(paths.control()).is_ok() {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.start_kill();
            return Err(format!("carrel-vmm did not open its control socket within {START_TIMEOUT:?}"));
        }
        // A restored VM answers within milliseconds: look often, more often than tokio's
        // timer (1 ms steps, which made each look 1-2.5 ms apart) can wake a task.
        let _ = tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_micros(250))).await;
    }
}

/// How long an idle control connection is kept for its next call.
const IDLE_CONNECTION: Duration = Duration::from_secs(5);
/// Idle connections kept per VM at most (each holds a thread of its VMM's).
const IDLE_PER_VM: usize = 4;

/// Control connections kept open between calls, by VM socket and caller: a call on one
/// skips the connect, the `ActFor` and the VMM's start of a connection thread, and runs
/// on the daemon's own threads (no blocking pool). Idle ones close after
/// [`IDLE_CONNECTION`].
#[derive(Debug, Default)]
pub struct Connections {
    idle: std::sync::Mutex<std::collections::HashMap<PathBuf, Vec<IdleConnection>>>,
}

#[derive(Debug)]
struct IdleConnection {
    caller: Option<Caller>,
    stream: tokio::net::UnixStream,
    since: Instant,
}

impl Connections {
    /// One request on the VM's control socket for `caller` (the VM's audit log names
    /// them), on a kept connection when there is one. A connection that fails or times
    /// out is not kept, so a late answer never meets the next request.
    pub async fn call(
        &self,
        socket: &Path,
        caller: Option<Caller>,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, Failure> {
        let mut stream = match self.take(socket, caller) {
            Some(stream) => stream,
            None => open(socket, caller).await?,
        };
        match tokio::time::timeout(timeout, exchange(&mut stream, request)).await {
            Ok(Ok(response)) => {
                self.keep(socket, caller, stream);
                Ok(response)
            }
            Ok(Err(failure)) => Err(failure),
            Err(_) => Err(Failure::unavailable(format!("the VM did not answer within {timeout:?}"))),
        }
    }

    /// Closes the connections idle for longer than [`IDLE_CONNECTION`].
    pub fn close_idle(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for kept in idle.values_mut() {
            kept.retain(|connection| connection.since.elapsed() < IDLE_CONNECTION);
        }
        idle.retain(|_, kept| !kept.is_empty());
    }

    /// A kept connection of `caller`'s to `socket` whose VMM is still there.
    fn take(&self, socket: &Path, caller: Option<Caller>) -> Option<tokio::net::UnixStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let kept = idle.get_mut(socket)?;
        while let Some(at) = kept.iter().rposition(|connection| connection.caller == caller) {
            let connection = kept.remove(at);
            if connection.since.elapsed() < IDLE_CONNECTION && quiet(&connection.stream) {
                return Some(connection.stream);
            }
        }
        None
    }

    fn keep(&self, socket: &Path, caller: Option<Caller>, stream: tokio::net::UnixStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let kept = idle.entry(socket.to_path_buf()).or_default();
        if kept.len() >= IDLE_PER_VM {
            kept.remove(0);
        }
        kept.push(IdleConnection { caller, stream, since: Instant::now() });
    }
}

/// Whether an idle connection has nothing to read: its VMM is there and owes no answer
/// (an ended VMM reads as the end of the stream).
fn quiet(stream: &tokio::net::UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a local buffer on the stream's own open socket.
    let peeked = unsafe {
        libc::recv(stream.as_raw_fd(), (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
    peeked < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
}

/// A new control connection, made `caller`'s by an `ActFor` when given.
async fn open(socket: &Path, caller: Option<Caller>) -> Result<tokio::net::UnixStream, Failure> {
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|err| Failure::unavailable(format!("cannot connect to {}: {err}", socket.display())))?;
    if let Some(Caller { pid, uid, gid }) = caller {
        let act_for = Request::ActFor { pid, uid, gid };
        match tokio::time::timeout(Duration::from_secs(5), exchange(&mut stream, &act_for)).await {
            Ok(Ok(Response::ActingFor)) => {}
            Ok(Ok(Response::Error(failure))) | Ok(Err(failure)) => return Err(failure),
            Ok(Ok(other)) => return Err(Failure::internal(format!("unexpected answer to ActFor: {other:?}"))),
            Err(_) => return Err(Failure::unavailable("the VM did not answer ActFor")),
        }
    }
    Ok(stream)
}

/// Sends one request frame and reads its answer frame (the control protocol's framing:
/// a little-endian u32 length, then the postcard body).
async fn exchange(stream: &mut tokio::net::UnixStream, request: &Request) -> Result<Response, Failure> {
    use carrel_vmm::control::{decode_response, write_frame, MAX_RESPONSE_BYTES};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broken = |err: &dyn std::fmt::Display| Failure::unavailable(format!("the control connection broke: {err}"));
    let mut frame = Vec::new();
    write_frame(&mut frame, request).map_err(|err| Failure::invalid(err.to_string()))?;
    stream.write_all(&frame).await.map_err(|err| broken(&err))?;
    // As much as has come in each read: an answer written in one write is read in one.
    let mut answer = Vec::with_capacity(16 << 10);
    loop {
        if let Some(length) = answer.get(..4) {
            let body_length = u32::from_le_bytes(length.try_into().expect("four bytes"));
            if body_length > MAX_RESPONSE_BYTES {
                return Err(broken(&format!("an answer of {body_length} bytes")));
            }
            let whole = 4 + body_length as usize;
            if answer.len() >= whole {
                if answer.len() > whole {
                    return Err(broken(&"more than one answer to one request"));
                }
                break;
            }
            answer.reserve(whole - answer.len());
        }
        if stream.read_buf(&mut answer).await.map_err(|err| broken(&err))? == 0 {
            return Err(broken(&"the VM closed the connection"));
        }
    }
    // The answer is decoded where it was read: a screenshot's pixels are not copied.
    decode_response(answer, 4).map_err(|err| broken(&err))
}

/// One request on the VM's control socket, on a connection of its own (the start's and
/// the re-attach's probes).
pub async fn call(socket: &Path, request: Request, timeout: Duration) -> Result<Response, Failure> {
    let mut stream = open(socket, None).await?;
    tokio::time::timeout(timeout, exchange(&mut stream, &request))
        .await
        .map_err(|_| Failure::unavailable(format!("the VM did not answer within {timeout:?}")))?
}

/// A control connection whose requests are `caller`'s (blocking).
pub fn connect_for(socket: &Path, caller: Option<Caller>) -> Result<ControlClient, Failure> {
    let mut client = ControlClient::connect(socket).map_err(|err| Failure::unavailable(err.to_string()))?;
    if let Some(Caller { pid, uid, gid }) = caller {
        match client.call(&Request::ActFor { pid, uid, gid }, Duration::from_secs(5)) {
            Ok(Response::ActingFor) => {}
            Ok(Response::Error(failure)) => return Err(failure),
            Ok(other) => return Err(Failure::internal(format!("unexpected answer to ActFor: {other:?}"))),
            Err(err) => return Err(Failure::unavailable(err.to_string())),
        }
    }
    Ok(client)
}

/// "exit code N" or "signal N"; for a VMM its seccomp filter ended, the call it made
/// first: "seccomp violation: syscall N (kind thread) (exit code 159)".
pub fn describe_status(status: std::process::ExitStatus, paths: &VmPaths) -> String {
    use std::os::unix::process::ExitStatusExt;
    let described = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => "ended".into(),
    };
    match status.code() {
        Some(carrel_vmm::seccomp::VIOLATION_EXIT_CODE) => match seccomp_violation(paths) {
            Some(violation) => format!("{violation} ({described})"),
            None => described,
        },
        _ => described,
    }
}

/// The VMM's own account of the call its filter refused, from its log.
fn seccomp_violation(paths: &VmPaths) -> Option<String> {
    let log = std::fs::read_to_string(paths.dir.join("vmm.log")).ok()?;
    let line = log.lines().rev().find(|line| line.contains("seccomp violation: "))?;
    line.find("seccomp violation: ").map(|at| line[at..].trim().to_string())
}

/// The last `count` lines of the VM's console and VMM log, for an exit reason.
pub fn last_lines(paths: &VmPaths, count: usize) -> String {
    let mut lines = Vec::new();
    for file in [paths.console(), paths.dir.join("vmm.log")] {
        if let Ok(text) = std::fs::read_to_string(&file) {
            let tail: Vec<&str> = text.lines().rev().take(count).collect();
            lines.extend(tail.into_iter().rev().map(str::to_string));
        }
    }
    lines.join(" | ")
}

/// Whether process `pid` runs (for re-attaching after a daemon restart): a zombie, an
/// ended VMM nobody has reaped yet, does not count.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

//! The jail a VMM process runs in when asked (`--jail ROOT --uid U --gid G`; the daemon
//! asks for every VM).
//!
//! [`enter`] runs first, while the process is still single-threaded: it closes every
//! inherited fd past stdio, unshares the mount, PID, IPC and network namespaces, and forks
//! so the VMM is PID 1 of its own PID namespace (the original process stays outside,
//! waits for it and passes its end on, so a supervisor keeps one pid per VM). The VMM
//! then mounts a small tmpfs at ROOT in its private mount namespace, binds into it only
//! what this VM needs, each at the path it has on the host (kernel, disks, snapshots,
//! its sockets' directories, `/dev/kvm`, `/dev/urandom`), and makes it `/` with
//! `pivot_root`. The configured paths therefore mean the same inside and outside, and
//! nothing the jail holds is written to the host's ROOT.
//!
//! The VM is built inside the jail as root, because KVM and the images are opened once
//! at build time; [`Jail::drop_privileges`] then leaves root for U:G with no capabilities
//! and `no_new_privs`, before any guest instruction runs or any client connects.
//!
//! Why not a separate jailer binary: the VMM knows which files its configuration needs,
//! so binding exactly those at their own paths keeps one configuration for jailed and
//! unjailed runs, and a restore's snapshot chain needs no copying into a chroot.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use crate::config::VmConfig;

/// Errors setting up or entering the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("--jail needs root (the jail is built with namespaces and mounts, then left for --uid/--gid)")]
    NotRoot,
    #[error("--jail needs --uid and --gid of an unprivileged user (not 0)")]
    PrivilegedIds,
    #[error("the jail root {path} must be an absolute path")]
    RelativeRoot { path: String },
    #[error("{path} is needed in the jail but cannot be resolved: {source}")]
    Resolve { path: String, source: std::io::Error },
    #[error("{path} must be writable by the VM's uid {uid}: it is owned by uid {owner}; chown {uid}:{gid} it first")]
    NotOwned { path: String, uid: u32, gid: u32, owner: u32 },
    #[error("cannot {action}: {source}")]
    Sys { action: String, source: std::io::Error },
    #[error("the VM process inside the jail could not be waited for: {0}")]
    Wait(#[source] std::io::Error),
}

fn sys(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let action = action.into();
    move |source| JailError::Sys { action, source }
}

/// Fails with the last OS error when `rc` is negative.
fn check(rc: libc::c_long, action: impl Into<String>) -> Result<(), JailError> {
    if rc < 0 {
        return Err(sys(action)(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Where and as whom a VMM process is jailed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// An empty host directory the jail's root is mounted on (in the VMM's own mount
    /// namespace: the host sees the directory stay empty).
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// More directories the VM may write, at runtime, besides its own sockets', disks'
    /// and audit directories: where its snapshots go.
    pub writable: Vec<PathBuf>,
    /// More directories the VM may read: a template's snapshot and the disk layers it froze.
    pub readable: Vec<PathBuf>,
}

/// How a path is bound into the jail, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    ReadOnly,
    /// A device node (`/dev/kvm`): bound as it is.
    Device,
    /// Writable through what the VMM opened as root (a disk's directory, where only a
    /// snapshot's freeze writes beside the disk).
    Writable,
    /// A directory the VMM makes files in after leaving root (its sockets', audit log's,
    /// snapshots'): it must be the jail uid's.
    Owned,
}

impl Access {
    fn writable(self) -> bool {
        matches!(self, Access::Writable | Access::Owned)
    }
}

/// One host path the jail holds, at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub access: Access,
}

/// The jail this process is in, once entered: the runtime checks ask it.
static ENTERED: OnceLock<JailConfig> = OnceLock::new();

/// The devices a VMM uses: KVM, entropy for its own keys, and userfaultfd for lazy restores.
const DEVICES: [&str; 4] = ["/dev/kvm", "/dev/urandom", "/dev/null", "/dev/userfaultfd"];

/// The tmpfs at the jail root only holds mount points.
const ROOT_TMPFS_OPTIONS: &str = "mode=0755,size=1m,nr_inodes=4096";

/// Makes `path` absolute with every symlink resolved; a path that does not exist yet
/// (a console log, a new disk layer) is resolved through its parent directory.
pub fn resolve(path: &Path) -> Result<PathBuf, JailError> {
    let error = |source| JailError::Resolve { path: path.display().to_string(), source };
    match std::fs::canonicalize(path) {
        Ok(resolved) => Ok(resolved),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let name = path.file_name().ok_or_else(|| error(err))?;
            let parent = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            Ok(std::fs::canonicalize(parent).map_err(error)?.join(name))
        }
        Err(err) => Err(error(err)),
    }
}

/// Rewrites every path of `config` as [`resolve`] does, so each means the same after the
/// jail's `pivot_root` (no relative paths, no symlinks leading outside).
pub fn resolve_config(config: &mut VmConfig) -> Result<(), JailError> {
    let resolve_in_place = |path: &mut PathBuf| -> Result<(), JailError> {
        *path = resolve(path)?;
        Ok(())
    };
    for path in [
        &mut config.kernel,
        &mut config.initrd,
        &mut config.console_log,
        &mut config.socket,
        &mut config.vsock,
        &mut config.audit,
        &mut config.gpu_backend,
        &mut config.gpu_screen,
    ]
    .into_iter()
    .flatten()
    {
        resolve_in_place(path)?;
    }
    for disk in &mut config.disks {
        resolve_in_place(&mut disk.path)?;
        if let Some(base) = &mut disk.base {
            resolve_in_place(base)?;
        }
    }
    Ok(())
}

fn parent_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"))
}

/// What the VM of `config` needs in its jail (paths already [`resolve`]d); `restore` is
/// the snapshot it starts from, whose directory's siblings hold the rest of its chain.
pub fn binds_for(config: &VmConfig, jail: &JailConfig, restore: Option<&Path>) -> Vec<Bind> {
    let mut binds = Vec::new();
    let mut add = |path: PathBuf, access| binds.push(Bind { path, access });
    for image in [&config.kernel, &config.initrd].into_iter().flatten() {
        add(image.clone(), Access::ReadOnly);
    }
    for disk in &config.disks {
        match disk.readonly {
            true => add(disk.path.clone(), Access::ReadOnly),
            // A layer's freeze links and renames files beside it: its directory.
            false => add(parent_of(&disk.path), Access::Writable),
        }
        if let Some(base) = &disk.base {
            add(base.clone(), Access::ReadOnly);
        }
    }
    for socket in [&config.socket, &config.vsock, &config.gpu_backend, &config.gpu_screen].into_iter().flatten() {
        add(parent_of(socket), Access::Owned);
    }
    if let Some(log) = &config.console_log {
        add(log.clone(), Access::Writable);
    }
    if let Some(audit) = &config.audit {
        add(audit.clone(), Access::Owned);
    }
    if let Some(snapshot) = restore {
        add(parent_of(snapshot), Access::ReadOnly);
    }
    for dir in &jail.writable {
        add(dir.clone(), Access::Owned);
    }
    for dir in &jail.readable {
        add(dir.clone(), Access::ReadOnly);
    }
    for device in DEVICES {
        if Path::new(device).exists() {
            add(PathBuf::from(device), Access::Device);
        }
    }
    normalize(binds)
}

/// Parents before children; a path inside a writable directory already bound is not
/// bound again, and a path bound twice keeps its widest access.
fn normalize(mut binds: Vec<Bind>) -> Vec<Bind> {
    binds.sort_by(|a, b| a.path.cmp(&b.path).then(b.access.cmp(&a.access)));
    binds.dedup_by(|later, earlier| later.path == earlier.path);
    let writable: Vec<PathBuf> =
        binds.iter().filter(|bind| bind.access.writable()).map(|bind| bind.path.clone()).collect();
    binds.retain(|bind| !writable.iter().any(|dir| bind.path != *dir && bind.path.starts_with(dir)));
    binds
}

/// Whether `path` lies under one of the jail's writable directories: where a jailed VM
/// may put a snapshot. Outside a jail everything is allowed. `..` never counts as inside.
pub fn may_write(path: &Path) -> Result<(), String> {
    let Some(jail) = ENTERED.get() else { return Ok(()) };
    let lexical = path.components().all(|part| !matches!(part, Component::ParentDir)) && path.is_absolute();
    if lexical && jail.writable.iter().any(|dir| path.starts_with(dir) && path != dir) {
        return Ok(());
    }
    let allowed: Vec<String> = jail.writable.iter().map(|dir| dir.display().to_string()).collect();
    Err(format!(
        "{} is outside this VM's jail: its snapshots go under {}",
        path.display(),
        if allowed.is_empty() {
            "no directory (start it with --jail-writable DIR)".to_string()
        } else {
            allowed.join(", ")
        }
    ))
}

/// A jailed VMM, inside its namespaces and root, still root until
/// [`Jail::drop_privileges`].
#[derive(Debug, Clone)]
pub struct Jail {
    config: JailConfig,
}

/// Enters the jail. Must be called while the process has one thread. Returns in the VMM
/// (PID 1 of the new PID namespace); the original process never returns: it waits for
/// the VMM and ends as it did (exit code, or the same signal).
pub fn enter(jail: &JailConfig, binds: &[Bind]) -> Result<Jail, JailError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot);
    }
    if jail.uid == 0 || jail.gid == 0 {
        return Err(JailError::PrivilegedIds);
    }
    if !jail.root.is_absolute() {
        return Err(JailError::RelativeRoot { path: jail.root.display().to_string() });
    }
    for bind in binds.iter().filter(|bind| bind.access == Access::Owned) {
        check_owner(&bind.path, jail)?;
    }
    std::fs::create_dir_all(&jail.root).map_err(sys(format!("create {}", jail.root.display())))?;

    // Nothing inherited past stdio reaches the VM.
    // SAFETY: close_range takes plain integers; the fds closed are not used by this code.
    check(unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) }, "close inherited fds")?;
    let namespaces = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWNET;
    // SAFETY: unshare takes flags only.
    check(unsafe { libc::unshare(namespaces) }.into(), "unshare namespaces")?;
    // SAFETY: the process is single-threaded here (the caller's contract), so the child
    // may run arbitrary code after fork.
    let child = unsafe { libc::fork() };
    match child {
        -1 => return Err(sys("fork into the PID namespace")(std::io::Error::last_os_error())),
        0 => {}
        pid => supervise(pid),
    }
    // The VMM ends with the process that started it (a supervisor's kill -9 reaches it).
    // SAFETY: prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) }.into(), "set the parent-death signal")?;
    build_root(jail, binds)?;
    let _ = ENTERED.set(jail.clone());
    Ok(Jail { config: jail.clone() })
}

fn check_owner(path: &Path, jail: &JailConfig) -> Result<(), JailError> {
    let dir = if path.is_dir() { path.to_path_buf() } else { parent_of(path) };
    let metadata =
        std::fs::metadata(&dir).map_err(|source| JailError::Resolve { path: dir.display().to_string(), source })?;
    if metadata.uid() != jail.uid {
        return Err(JailError::NotOwned {
            path: dir.display().to_string(),
            uid: jail.uid,
            gid: jail.gid,
            owner: metadata.uid(),
        });
    }
    Ok(())
}

/// The original process: forwards SIGTERM/SIGINT/SIGHUP to the VMM, waits for it, and
/// ends the way it ended.
fn supervise(vmm: libc::pid_t) -> ! {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset; the mask and signalfd
    // calls take valid pointers to it.
    let signals = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
            libc::sigaddset(&mut set, signal);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC)
    };
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local.
        let waited = unsafe { libc::waitpid(vmm, &mut status, libc::WNOHANG) };
        if waited == vmm {
            end_like(status);
        }
        if waited < 0 {
            eprintln!("carrel-vmm: error: {}", JailError::Wait(std::io::Error::last_os_error()));
            std::process::exit(1);
        }
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        // SAFETY: reads one siginfo into a buffer of its size from our signalfd.
        let read = unsafe { libc::read(signals, info.as_mut_ptr().cast(), info.len()) };
        if read == info.len() as isize {
            // SAFETY: the kernel wrote a whole signalfd_siginfo; it is plain data.
            let signal = unsafe { std::ptr::read_unaligned(info.as_ptr().cast::<libc::signalfd_siginfo>()) }.ssi_signo;
            if signal as i32 != libc::SIGCHLD {
                // SAFETY: kill with a pid we own and a signal number.
                unsafe { libc::kill(vmm, signal as i32) };
            }
        }
    }
}

/// Ends this process as the waited-for `status` says: the same exit code or signal.
fn end_like(status: i32) -> ! {
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        // SAFETY: restoring the default action and raising a signal at ourselves.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(signal);
        }
    }
    std::process::exit(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 1 })
}

fn c_path(path: &Path) -> CString {
    // Paths from the OS hold no NUL byte.
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let source = source.map(c_path);
    let target_c = c_path(target);
    let fstype = fstype.map(|text| CString::new(text).unwrap_or_default());
    let data = data.map(|text| CString::new(text).unwrap_or_default());
    let pointer = |value: &Option<CString>| value.as_ref().map_or(std::ptr::null(), |text| text.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let rc =
        unsafe { libc::mount(pointer(&source), target_c.as_ptr(), pointer(&fstype), flags, pointer(&data).cast()) };
    check(rc.into(), format!("mount {} (flags {flags:#x})", target.display()))
}

/// Mounts the tmpfs root, binds `binds` into it, and pivots into it.
fn build_root(jail: &JailConfig, binds: &[Bind]) -> Result<(), JailError> {
    // Nothing mounted from here on reaches the host's namespace.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    let root = &jail.root;
    mount(
        Some(Path::new("carrel-jail")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(ROOT_TMPFS_OPTIONS),
    )?;
    for bind in binds {
        let target = root.join(bind.path.strip_prefix("/").unwrap_or(&bind.path));
        let is_dir = bind.path.is_dir();
        if is_dir {
            std::fs::create_dir_all(&target).map_err(sys(format!("create {}", target.display())))?;
        } else {
            if bind.access.writable() && !bind.path.exists() {
                // A console log that does not exist yet: made now, so it can be bound.
                std::fs::File::create(&bind.path).map_err(sys(format!("create {}", bind.path.display())))?;
                std::os::unix::fs::chown(&bind.path, Some(jail.uid), Some(jail.gid))
                    .map_err(sys(format!("chown {}", bind.path.display())))?;
            }
            std::fs::create_dir_all(parent_of(&target)).map_err(sys(format!("create {}", target.display())))?;
            std::fs::File::create(&target).map_err(sys(format!("create {}", target.display())))?;
        }
        mount(Some(&bind.path), &target, None, libc::MS_BIND, None)?;
        let flags = match bind.access {
            Access::Device => continue,
            Access::ReadOnly => libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Access::Writable | Access::Owned => libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        };
        mount(None, &target, None, libc::MS_REMOUNT | libc::MS_BIND | flags, None)?;
    }
    std::env::set_current_dir(root).map_err(sys(format!("enter {}", root.display())))?;
    let dot = c_path(Path::new("."));
    // SAFETY: pivot_root with two valid NUL-terminated paths: "." onto "." stacks the old
    // root under the new one, to be detached next.
    check(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) }, "pivot_root into the jail")?;
    // SAFETY: umount2 of "." (the old root, now stacked on top) with MNT_DETACH.
    check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) }.into(), "detach the host's root")?;
    std::env::set_current_dir("/").map_err(sys("enter the jail's root"))?;
    // The root holds mount points only: read-only from now on.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
}

impl Jail {
    /// Gives files this VM made for itself while root (a new disk layer) to its uid, so
    /// it can still freeze them under that uid: those in a directory its uid owns. A file
    /// elsewhere (a disk the caller keeps in its own directory) is left as it is.
    pub fn hand_over(&self, paths: &[PathBuf]) -> Result<(), JailError> {
        let in_own_dir =
            |path: &&PathBuf| std::fs::metadata(parent_of(path)).is_ok_and(|dir| dir.uid() == self.config.uid);
        for path in paths.iter().filter(|path| path.exists()).filter(in_own_dir) {
            std::os::unix::fs::chown(path, Some(self.config.uid), Some(self.config.gid))
                .map_err(sys(format!("chown {}", path.display())))?;
        }
        Ok(())
    }

    /// Leaves root for the jail's uid and gid for good, in every thread: no
    /// supplementary groups, no capabilities (bounding set emptied too), and
    /// `no_new_privs`, which seccomp filters also need.
    /// Takes the jail's uid and gid for the calling thread alone (raw syscalls: glibc's
    /// wrappers would change every thread), so the files it makes are the VM's while the
    /// rest of the process is still building the VM as root. The thread keeps no
    /// capability; [`Jail::drop_privileges`] later does the same for the whole process.
    pub fn become_ids_on_this_thread(&self) -> Result<(), JailError> {
        let (uid, gid) = (self.config.uid, self.config.gid);
        // SAFETY: raw setgroups with an empty list and setresgid/setresuid with plain ids;
        // they change the calling thread's credentials only.
        unsafe {
            check(libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()), "drop supplementary groups")?;
            check(libc::syscall(libc::SYS_setresgid, gid, gid, gid), format!("become gid {gid}"))?;
            check(libc::syscall(libc::SYS_setresuid, uid, uid, uid), format!("become uid {uid}"))?;
        }
        Ok(())
    }

    pub fn drop_privileges(&self) -> Result<(), JailError> {
        let (uid, gid) = (self.config.uid, self.config.gid);
        for capability in 0..64 {
            // SAFETY: prctl with integer arguments; capabilities past the last one the
            // kernel knows fail with EINVAL, which ends the loop.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, capability) } < 0 {
                break;
            }
        }
        // SAFETY: setgroups with an empty list; setresgid/setresuid with plain ids (glibc
        // applies them to every thread of the process).
        unsafe {
            check(libc::setgroups(0, std::ptr::null()).into(), "drop supplementary groups")?;
            check(libc::setresgid(gid, gid, gid).into(), format!("become gid {gid}"))?;
            check(libc::setresuid(uid, uid, uid).into(), format!("become uid {uid}"))?;
        }
        // SAFETY: prctl with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into(), "set no_new_privs")?;
        // A change of ids clears the parent-death signal: set it again, so a kill -9 of
        // the outer process still ends the VMM.
        // SAFETY: prctl with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) }.into(), "set the parent-death signal")?;
        let (mut real, mut effective, mut saved) = (0, 0, 0);
        // SAFETY: getresuid writes three ids into locals.
        unsafe { libc::getresuid(&mut real, &mut effective, &mut saved) };
        if [real, effective, saved] != [uid; 3] || capabilities_left() {
            return Err(sys("leave root")(std::io::Error::other("uid or capabilities still held")));
        }
        Ok(())
    }
}

/// Whether this thread still holds any capability (effective or permitted).
fn capabilities_left() -> bool {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget fills two Data entries for version 3, both owned by this frame.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut Header, data.as_mut_ptr()) };
    rc != 0 || data.iter().any(|entry| entry.effective != 0 || entry.permitted != 0)
}

/// Checks a jail test asks a jailed VMM to make from inside, on its event loop thread,
/// once the jail and the filters are in place (`--jail-probe NAME`, test builds only).
/// Each prints `jail-probe: NAME: RESULT`; a call the filters forbid ends the process
/// with the seccomp violation instead.
#[cfg(feature = "test-probes")]
pub mod probes {
    use std::path::Path;

    pub fn run(probes: &[String]) {
        for probe in probes {
            let result = match probe.split_once(':') {
                Some(("path", path)) => match std::fs::metadata(path) {
                    Ok(_) => "visible".to_string(),
                    Err(err) => format!("absent ({err})"),
                },
                Some(("connect", path)) => match std::os::unix::net::UnixStream::connect(Path::new(path)) {
                    Ok(_) => "connected".to_string(),
                    Err(err) => format!("refused ({err})"),
                },
                _ => call(probe),
            };
            eprintln!("jail-probe: {probe}: {result}");
        }
    }

    fn call(probe: &str) -> String {
        let errno = |rc: libc::c_long| match rc {
            rc if rc < 0 => format!("refused ({})", std::io::Error::last_os_error()),
            rc => format!("allowed ({rc})"),
        };
        // SAFETY: each call is made with arguments that cannot touch this process's
        // memory (null pointers, invalid fds); they exist to be refused.
        unsafe {
            match probe {
                "ids" => {
                    let held = if super::capabilities_left() { "capabilities held" } else { "no capabilities" };
                    format!("uid {} gid {} {held}", libc::getuid(), libc::getgid())
                }
                "ptrace" => errno(libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0)),
                "mount" => {
                    errno(libc::mount(c"none".as_ptr(), c"/".as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()).into())
                }
                "open_by_handle_at" => errno(libc::syscall(libc::SYS_open_by_handle_at, -1, 0, 0)),
                "kexec_load" => errno(libc::syscall(libc::SYS_kexec_load, 0, 0, 0, 0)),
                "bpf" => errno(libc::syscall(libc::SYS_bpf, 0, 0, 0)),
                "fork" => match libc::fork() {
                    0 => libc::_exit(0),
                    pid => errno(pid.into()),
                },
                "execve" => errno(libc::execve(c"/bin/true".as_ptr(), std::ptr::null(), std::ptr::null()).into()),
                // BLKGETSIZE64: a block-device ioctl no VMM thread uses.
                "ioctl" => errno(libc::ioctl(0, 0x8008_1272, std::ptr::null_mut::<u64>()).into()),
                other => format!("unknown probe {other:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(path: &str, access: Access) -> Bind {
        Bind { path: PathBuf::from(path), access }
    }

    #[test]
    fn normalize_keeps_parents_first_and_drops_what_a_writable_dir_covers() {
        let binds = normalize(vec![
            bind("/vm/disk.layer.d", Access::Writable),
            bind("/vm", Access::Owned),
            bind("/images/kernel", Access::ReadOnly),
            bind("/vm/snapshots", Access::ReadOnly),
            bind("/images/kernel", Access::Writable),
        ]);
        assert_eq!(binds, vec![bind("/images/kernel", Access::Writable), bind("/vm", Access::Owned)]);
    }

    #[test]
    fn binds_for_a_layered_disk_cover_its_directory_and_its_base_read_only() {
        let mut config = VmConfig {
            kernel: Some("/images/desk.elf".into()),
            socket: Some("/vm/control.sock".into()),
            ..VmConfig::default()
        };
        config.disks.push("/disks/a/agent.layer,base=/images/base.raw".parse().unwrap());
        let jail = JailConfig {
            root: "/jail".into(),
            uid: 1000,
            gid: 1000,
            writable: vec!["/vm/snapshots".into()],
            readable: vec!["/templates/disks".into()],
        };
        let binds = binds_for(&config, &jail, None);
        let find = |path: &str| binds.iter().find(|bind| bind.path == Path::new(path)).map(|bind| bind.access);
        assert_eq!(find("/images/desk.elf"), Some(Access::ReadOnly));
        assert_eq!(find("/images/base.raw"), Some(Access::ReadOnly));
        assert_eq!(find("/disks/a"), Some(Access::Writable), "not checked for ownership: opened as root");
        assert_eq!(find("/vm"), Some(Access::Owned));
        assert_eq!(find("/vm/snapshots"), None, "covered by /vm");
        assert_eq!(find("/templates/disks"), Some(Access::ReadOnly), "a template's layers, read only");
        assert_eq!(find("/dev/kvm"), Some(Access::Device));
        assert!(find("/etc").is_none() && find("/").is_none());
    }

    #[test]
    fn resolve_makes_missing_files_absolute_through_their_parent() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let resolved = resolve(&link.join("new.log")).unwrap();
        assert_eq!(resolved, std::fs::canonicalize(dir.path()).unwrap().join("new.log"));
        assert!(resolve(Path::new("/no/such/dir/file")).is_err());
    }
}

//! carrel-sandbox: seccomp filters, one per kind of thread (rust-vmm's `seccompiler`),
//! for `carrel-vmm` and the out-of-process GPU backend (`carrel-gpu-backend`).
//!
//! Each thread installs its own filter when it starts ([`install`]): the vCPU threads,
//! which run guest code and handle its exits, get the narrowest (KVM ioctls, eventfd
//! writes, memory); the control threads get sockets and the audit log's file calls; the
//! event loop gets what devices, snapshots and disks need; the lazy-restore loader gets
//! userfaultfd and reads. The lists were taken from `strace -f` of a VM's whole life
//! (boot, screenshots, input, agent exec and files, disks, snapshots, restores) and are
//! checked by the whole test suite, which runs with the filters on.
//!
//! A call outside a thread's list traps: the handler writes `seccomp violation: syscall N
//! (kind thread)` to stderr and the process exits with [`VIOLATION_EXIT_CODE`], which is
//! what a supervisor shows as the reason. New processes are refused: `clone` is allowed
//! only with `CLONE_THREAD`, `clone3` (whose flags a filter cannot read) answers ENOSYS so
//! the C library falls back to `clone`, and `execve`, `fork`, `ptrace`, `mount` and the
//! like are in no list. The GPU backend process installs its filter on its main thread
//! before it starts any other, so all of its threads run under it. io_uring operations
//! do not pass through seccomp: carrel-vmm restricts its rings instead.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// The exit code of a process that made a call outside its thread's filter: 128 + SIGSYS,
/// as a shell reports a death by that signal.
pub const VIOLATION_EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {kind} thread's seccomp filter: {message}")]
    Build { kind: &'static str, message: String },
    #[error("cannot install the {kind} thread's seccomp filter: {source}")]
    Install { kind: &'static str, source: seccompiler::Error },
    #[error("cannot install the seccomp violation handler: {0}")]
    Handler(#[source] std::io::Error),
}

/// The kinds of thread a VMM runs, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The event loop: devices' queues, snapshots, disks, the vsock muxer.
    EventLoop,
    /// A vCPU: KVM_RUN and the exits it handles.
    Vcpu,
    /// The control socket's accept and connection threads: screenshots, input, agent.
    Control,
    /// The lazy restore's loader: userfaultfd and reads of the snapshot's files.
    Loader,
    /// Every thread of the vhost-user GPU backend process: its sockets, the frontend's
    /// memory it maps, epoll and eventfds; no files, no ioctls.
    GpuBackend,
}

impl ThreadKind {
    const ALL: [ThreadKind; 5] =
        [ThreadKind::EventLoop, ThreadKind::Vcpu, ThreadKind::Control, ThreadKind::Loader, ThreadKind::GpuBackend];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::EventLoop => "event loop",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Control => "control",
            ThreadKind::Loader => "loader",
            ThreadKind::GpuBackend => "gpu backend",
        }
    }
}

/// Whether threads install their filters: set once, by `main`, before any thread starts.
static ENABLED: OnceLock<bool> = OnceLock::new();

/// The program's name for the violation message.
static PROGRAM: OnceLock<&'static str> = OnceLock::new();

thread_local! {
    /// This thread's kind, for the violation message.
    /// A thread that installed none runs under the filter of the thread that started it.
    static KIND: Cell<&'static str> = const { Cell::new("inherited") };
}

/// Turns the filters on (or off) for every thread started from now on, and installs the
/// violation handler; `program` names the process in its message. Call once, before the
/// threads start.
pub fn enable(program: &'static str, on: bool) -> Result<(), SeccompError> {
    let _ = ENABLED.set(on);
    let _ = PROGRAM.set(program);
    if on {
        install_violation_handler()?;
    }
    Ok(())
}

/// Whether filters are on.
pub fn enabled() -> bool {
    ENABLED.get().copied().unwrap_or(false)
}

/// Each kind's filters, compiled once per process.
static COMPILED: [OnceLock<Vec<BpfProgram>>; ThreadKind::ALL.len()] =
    [const { OnceLock::new() }; ThreadKind::ALL.len()];

/// Compiles the filters of `kinds` now, when filters are on, so that the threads that
/// install them later (a vCPU about to enter the guest) only install them: a VMM
/// starting against the clock compiles them off its critical path.
pub fn prepare(kinds: &[ThreadKind]) -> Result<(), SeccompError> {
    if enabled() {
        for &kind in kinds {
            compiled(kind)?;
        }
    }
    Ok(())
}

fn compiled(kind: ThreadKind) -> Result<&'static [BpfProgram], SeccompError> {
    let slot = &COMPILED[kind as usize];
    if let Some(programs) = slot.get() {
        return Ok(programs);
    }
    let programs = filters(kind)?;
    // Two threads compiling at once build the same programs; either is kept.
    Ok(slot.get_or_init(|| programs))
}

/// Installs `kind`'s filter on the calling thread when filters are on.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    for program in compiled(kind)? {
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install { kind: kind.name(), source })?;
    }
    KIND.with(|name| name.set(kind.name()));
    Ok(())
}

/// Installs `kind`'s filter, or ends the process: a thread that would run unfiltered
/// when filters are asked for must not run.
pub fn install_or_exit(kind: ThreadKind) {
    if let Err(err) = install(kind) {
        eprintln!("carrel-vmm: error: {err}");
        std::process::exit(1);
    }
}

/// The compiled filters of `kind`: the allowlist, and one that answers ENOSYS to `clone3`.
pub fn filters(kind: ThreadKind) -> Result<Vec<BpfProgram>, SeccompError> {
    let build = |rules, mismatch, matched| -> Result<BpfProgram, SeccompError> {
        let error =
            |err: seccompiler::BackendError| SeccompError::Build { kind: kind.name(), message: err.to_string() };
        let filter = SeccompFilter::new(rules, mismatch, matched, seccompiler::TargetArch::x86_64).map_err(error)?;
        filter.try_into().map_err(error)
    };
    let clone3 = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    // The allowlist goes last: installing a filter takes prctl and seccomp calls it does
    // not allow.
    Ok(vec![
        build(clone3, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32))?,
        build(allowed(kind), SeccompAction::Trap, SeccompAction::Allow)?,
    ])
}

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Argument indices below 6 and these operators are always valid.
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).expect("a valid seccomp condition")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("a rule with conditions")
}

/// `ioctl` with a request number of one of `types` (the type byte, bits 8-15: 0xAE for
/// KVM, 0xAA for userfaultfd, 0x54 for terminals and FIONBIO).
fn ioctl_of(types: &[u64]) -> Vec<SeccompRule> {
    types.iter().map(|kind| rule(vec![condition(1, SeccompCmpOp::MaskedEq(0xff00), kind << 8)])).collect()
}

const KVM_IOCTLS: u64 = 0xae;
const UFFD_IOCTLS: u64 = 0xaa;
const TTY_IOCTLS: u64 = 0x54;

/// Calls every thread makes: memory, futexes, signals' return, time, its own exit.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_getrandom,
    libc::SYS_fcntl,
    libc::SYS_lseek,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_tgkill,
];

/// Files: the audit log, snapshots, disk layers.
const FILES: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_linkat,
    libc::SYS_link,
    libc::SYS_rmdir,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fchmod,
    libc::SYS_chmod,
    libc::SYS_fchmodat,
    libc::SYS_getdents64,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_flock,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_access,
    libc::SYS_faccessat2,
    libc::SYS_dup,
    libc::SYS_dup3,
];

/// Unix sockets: the control socket, the host side of vsock, the GPU backend.
const SOCKETS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
];

/// The event loop's own: epoll, eventfds, io_uring, memory views for screenshots and
/// snapshots.
const EVENT_LOOP: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_setup,
    libc::SYS_memfd_create,
    libc::SYS_prlimit64,
    // Reading its own capabilities (status, the jail's checks).
    libc::SYS_capget,
];

/// A vCPU activates the devices its guest sets up (a register write): the vhost-user
/// screen's activation speaks to its backend, handing over eventfds it makes.
const VCPU: &[i64] = &[libc::SYS_sendmsg, libc::SYS_recvmsg, libc::SYS_eventfd2];

/// The GPU backend: the vhost-user and screen sockets' epoll loops.
const GPU_BACKEND: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_unlink,
    // Its serving loop sets signal dispositions after the filter is in.
    libc::SYS_rt_sigaction,
];

/// The loader drops its priority, and takes part in leaving root (the C library makes
/// every thread change its ids when one does).
const LOADER: &[i64] = &[
    libc::SYS_setpriority,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
    libc::SYS_openat,
    libc::SYS_pread64,
    libc::SYS_preadv,
    // A damaged chunk ends the VM from this thread, removing its sockets first.
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

fn allowed(kind: ThreadKind) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut allow = |calls: &[i64]| {
        for call in calls {
            rules.insert(*call, vec![]);
        }
    };
    allow(COMMON);
    match kind {
        ThreadKind::Vcpu => allow(VCPU),
        ThreadKind::Control => {
            allow(FILES);
            allow(SOCKETS);
        }
        ThreadKind::EventLoop => {
            allow(FILES);
            allow(SOCKETS);
            allow(EVENT_LOOP);
        }
        ThreadKind::Loader => allow(LOADER),
        ThreadKind::GpuBackend => {
            allow(SOCKETS);
            allow(GPU_BACKEND);
        }
    }
    // Threads only: a new process (fork, vfork, clone without CLONE_THREAD) traps.
    let thread = libc::CLONE_THREAD as u64;
    let spawns = matches!(kind, ThreadKind::Control | ThreadKind::EventLoop | ThreadKind::GpuBackend);
    if spawns {
        rules.insert(libc::SYS_clone, vec![rule(vec![condition(0, SeccompCmpOp::MaskedEq(thread), thread)])]);
        rules.insert(libc::SYS_clone3, vec![]);
    }
    // Unix sockets only.
    if matches!(kind, ThreadKind::Control | ThreadKind::EventLoop | ThreadKind::GpuBackend) {
        rules.insert(libc::SYS_socket, vec![rule(vec![condition(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)])]);
    }
    // Naming threads; nothing else of prctl.
    rules.insert(libc::SYS_prctl, vec![rule(vec![condition(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)])]);
    let ioctls = match kind {
        ThreadKind::Vcpu => ioctl_of(&[KVM_IOCTLS]),
        ThreadKind::EventLoop => ioctl_of(&[KVM_IOCTLS, UFFD_IOCTLS, TTY_IOCTLS]),
        ThreadKind::Control => ioctl_of(&[TTY_IOCTLS]),
        ThreadKind::Loader => ioctl_of(&[UFFD_IOCTLS]),
        ThreadKind::GpuBackend => Vec::new(),
    };
    if ioctls.is_empty() {
        return rules;
    }
    rules.insert(libc::SYS_ioctl, ioctls);
    rules
}

/// SIGSYS: a call outside the thread's filter. Says which and ends the process; only
/// async-signal-safe calls (write, exit_group) and no allocation.
extern "C" fn on_violation(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // In the SIGSYS layout of siginfo_t the syscall number is the int at byte 24 (after
    // signo, errno, code, padding and the call address).
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; byte 24 is
    // within it.
    let syscall = unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(24).cast::<i32>()) };
    let mut message = [0u8; 128];
    let mut length = 0;
    let mut push = |bytes: &[u8]| {
        let take = bytes.len().min(message.len() - length);
        message[length..length + take].copy_from_slice(&bytes[..take]);
        length += take;
    };
    push(PROGRAM.get().copied().unwrap_or("carrel").as_bytes());
    push(b": seccomp violation: syscall ");
    let mut digits = [0u8; 12];
    let mut at = digits.len();
    let mut value = syscall.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    push(&digits[at..]);
    push(b" (");
    KIND.with(|kind| push(kind.get().as_bytes()));
    push(b" thread)\n");
    // SAFETY: write of a stack buffer and _exit are async-signal-safe.
    unsafe {
        libc::write(libc::STDERR_FILENO, message.as_ptr().cast(), length);
        libc::_exit(VIOLATION_EXIT_CODE);
    }
}

fn install_violation_handler() -> Result<(), SeccompError> {
    // SAFETY: sigaction is plain data; the handler has the SA_SIGINFO signature.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_violation as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_kind_has_a_filter_that_compiles_once() {
        for (index, kind) in ThreadKind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, index, "ThreadKind::ALL is in declaration order");
            let programs = filters(kind).unwrap();
            assert_eq!(programs.len(), 2);
            assert!(programs.iter().all(|program| !program.is_empty()));
            let cached = compiled(kind).unwrap();
            assert_eq!(cached, programs.as_slice());
            assert!(std::ptr::eq(cached, compiled(kind).unwrap()), "compiled once, then kept");
        }
    }

    #[test]
    fn a_vcpu_may_not_open_files_or_sockets() {
        let rules = allowed(ThreadKind::Vcpu);
        for call in [libc::SYS_openat, libc::SYS_socket, libc::SYS_connect, libc::SYS_execve, libc::SYS_ptrace] {
            assert!(!rules.contains_key(&call), "syscall {call} allowed on a vCPU");
        }
        assert!(rules.contains_key(&libc::SYS_ioctl));
    }

    #[test]
    fn no_thread_may_exec_trace_mount_or_load_code() {
        let forbidden = [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_open_by_handle_at,
            libc::SYS_kexec_load,
            libc::SYS_bpf,
            libc::SYS_setns,
            libc::SYS_unshare,
            libc::SYS_init_module,
            libc::SYS_process_vm_writev,
        ];
        for kind in ThreadKind::ALL {
            let rules = allowed(kind);
            for call in forbidden {
                assert!(!rules.contains_key(&call), "syscall {call} allowed on the {} thread", kind.name());
            }
        }
    }
}

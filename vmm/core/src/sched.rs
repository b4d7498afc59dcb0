//! How the VMM's threads ask the host's scheduler for what they need.

use std::time::Duration;

/// The slice of the threads that answer requests in short bursts (the control threads,
/// the event loop): short, so that a request is taken up at once even when the guest and
/// the memory loader keep the CPUs busy.
pub const SERVICE_SLICE: Duration = Duration::from_micros(100);

/// `struct sched_attr` of sched_setattr(2), which the libc crate does not define.
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// Asks that the calling thread run in slices of `slice` (ordinary policy and nice
/// value): Linux's EEVDF (6.12 and later) lets a thread with a shorter slice preempt the
/// one running when it wakes, so a thread that answers requests in short bursts is not
/// left waiting behind a vCPU or the memory loader for the rest of their slice. Threads
/// started later by this one inherit it. Best effort: kernels without custom slices
/// ignore the request, and a refusal is not worth failing for.
pub fn short_slices(slice: Duration) {
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        runtime: slice.as_nanos() as u64,
        ..SchedAttr::default()
    };
    // SAFETY: sched_setattr reads `attr`, of the size it is told, for the calling thread
    // (pid 0); nothing else is touched.
    unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
}

/// The CPU the calling thread is running on, when the kernel says.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes nothing and returns a CPU number or -1.
    usize::try_from(unsafe { libc::sched_getcpu() }).ok()
}

/// Keeps the calling thread off CPU `cpu` when its affinity allows another: a thread
/// started to work beside its parent runs beside it, even where the scheduler would
/// keep it on its parent's CPU while that one is busy (as `kernel.sched_vcpu_pack` does
/// on the machines here). Best effort, as it is only about when the work is done.
pub fn avoid_cpu(cpu: usize) {
    if cpu >= libc::CPU_SETSIZE as usize {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it, the
    // CPU_ macros stay inside it (`cpu` is checked above), sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, size, &mut set) != 0 || !libc::CPU_ISSET(cpu, &set) || libc::CPU_COUNT(&set) < 2 {
            return;
        }
        libc::CPU_CLR(cpu, &mut set);
        libc::sched_setaffinity(0, size, &set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's slice as the kernel reports it.
    fn slice_of_this_thread() -> Duration {
        let mut attr = SchedAttr::default();
        // SAFETY: sched_getattr writes at most `size` bytes into `attr`.
        let rc = unsafe {
            libc::syscall(libc::SYS_sched_getattr, 0, &mut attr as *mut SchedAttr, std::mem::size_of::<SchedAttr>(), 0)
        };
        assert_eq!(rc, 0, "sched_getattr: {}", std::io::Error::last_os_error());
        Duration::from_nanos(attr.runtime)
    }

    #[test]
    fn a_short_slice_is_taken_and_inherited_by_the_threads_started_after() {
        let (own, inherited) = std::thread::spawn(|| {
            short_slices(SERVICE_SLICE);
            let own = slice_of_this_thread();
            (own, std::thread::spawn(slice_of_this_thread).join().unwrap())
        })
        .join()
        .unwrap();
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut numbers = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
        if (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) < (6, 12) {
            eprintln!("Linux {} has no custom slices (6.12 and later): the request is ignored", release.trim());
            return;
        }
        assert_eq!(own, SERVICE_SLICE);
        assert_eq!(inherited, own, "a connection's thread runs as its acceptor does");
        assert_ne!(slice_of_this_thread(), own, "other threads keep theirs");
    }

    #[test]
    fn a_thread_kept_off_a_cpu_runs_elsewhere() {
        let allowed = std::thread::available_parallelism().map_or(1, usize::from);
        let (avoided, after) = std::thread::spawn(|| {
            let cpu = current_cpu().expect("sched_getcpu");
            avoid_cpu(cpu);
            std::thread::yield_now();
            (cpu, current_cpu().expect("sched_getcpu"))
        })
        .join()
        .unwrap();
        if allowed < 2 {
            assert_eq!(after, avoided, "with one CPU allowed, nothing changes");
        } else {
            assert_ne!(after, avoided);
        }
    }
}

//! Child processes: spawning, waiting and killing, race-free against pid reuse.
//!
//! Every child is waited for in two steps: `waitid(WNOWAIT)` learns that it exited without
//! reaping it, then, under the table lock, the entry is removed and the child reaped. A kill
//! takes the same lock and only signals children still in the table, so it can never hit a
//! pid that was reaped and handed to another process.
//!
//! As a service the agent waits for each child on its own thread (`waitid(P_PID)`), so it
//! never reaps processes it did not start (the perf harness embeds the agent). As PID 1 one
//! reaper thread waits for any child (`waitid(P_ALL)`): the agent's own, whose status goes
//! to their exec, and orphans re-parented to init, which are reaped and dropped.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// A raw wait status, as `waitpid` returns it.
pub type WaitStatus = i32;

#[derive(Debug, Default)]
struct ChildTable {
    live: HashMap<i32, SyncSender<WaitStatus>>,
    /// Bumped on every spawn, so the PID-1 reaper knows to wait again.
    generation: u64,
}

/// The agent's children.
#[derive(Debug)]
pub struct Children {
    pid1: bool,
    table: Mutex<ChildTable>,
    spawned: Condvar,
}

impl Children {
    /// A child table; as PID 1 it also starts the reaper thread.
    pub fn new(pid1: bool) -> io::Result<Arc<Children>> {
        let children = Arc::new(Children { pid1, table: Mutex::new(ChildTable::default()), spawned: Condvar::new() });
        if pid1 {
            let reaper = Arc::clone(&children);
            std::thread::Builder::new().name("reaper".into()).spawn(move || reaper.reap_any_forever())?;
        }
        Ok(children)
    }

    fn lock(&self) -> MutexGuard<'_, ChildTable> {
        // A panic while holding the lock leaves a consistent table (single inserts and
        // removes), so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Spawns `command`; the receiver gets the raw wait status once the child exits.
    pub fn spawn(self: &Arc<Self>, command: &mut Command) -> io::Result<(Child, Receiver<WaitStatus>)> {
        let (sender, receiver) = sync_channel(1);
        // The lock is held across the fork so the PID-1 reaper cannot reap the child
        // before it is in the table.
        let mut table = self.lock();
        let child = command.spawn()?;
        let pid = child.id() as i32;
        table.live.insert(pid, sender);
        table.generation += 1;
        drop(table);
        self.spawned.notify_all();
        if !self.pid1 {
            let children = Arc::clone(self);
            let waiter = std::thread::Builder::new().name(format!("wait-{pid}")).spawn(move || {
                if wait_exited(libc::P_PID, pid as libc::id_t).is_ok() {
                    children.reap(pid);
                }
            });
            if let Err(error) = waiter {
                // Without a waiter the child would never be reported: do not leave it running.
                self.kill_group(pid);
                self.lock().live.remove(&pid);
                return Err(error);
            }
        }
        Ok((child, receiver))
    }

    /// SIGKILLs the process group led by `pid` if that child has not been reaped yet.
    pub fn kill_group(&self, pid: i32) -> bool {
        let table = self.lock();
        if !table.live.contains_key(&pid) {
            return false;
        }
        // SAFETY: kill has no memory effects; the group leader is our unreaped child, so the
        // id cannot belong to anyone else.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        true
    }

    /// Reaps `pid`, which has exited, and reports its status to its exec.
    fn reap(&self, pid: i32) {
        let mut table = self.lock();
        let sender = table.live.remove(&pid);
        let mut status = 0;
        // SAFETY: status is a valid out-pointer; pid has exited (waitid said so), so this
        // does not block.
        let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        drop(table);
        if let (Some(sender), true) = (sender, reaped == pid) {
            let _ = sender.send(status);
        }
    }

    fn reap_any_forever(&self) {
        loop {
            let generation = self.lock().generation;
            match wait_exited(libc::P_ALL, 0) {
                Ok(pid) => self.reap(pid),
                Err(_) => {
                    // No children: sleep until one is spawned. The timeout also catches
                    // orphans re-parented to init while the agent had no children.
                    let table = self.lock();
                    if table.generation == generation {
                        let _unused = self.spawned.wait_timeout(table, Duration::from_secs(1));
                    }
                }
            }
        }
    }
}

/// Blocks until a child (`P_PID` + id, or `P_ALL`) has exited and returns its pid, leaving
/// it unreaped.
fn wait_exited(id_type: libc::idtype_t, id: libc::id_t) -> io::Result<i32> {
    loop {
        // SAFETY: siginfo_t is plain data that waitid fills.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: info is a valid out-pointer; WNOWAIT leaves the child to be reaped later.
        let rc = unsafe { libc::waitid(id_type, id, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 {
            // SAFETY: waitid succeeded with WEXITED, so si_pid is the field it filled.
            let pid = unsafe { info.si_pid() };
            if pid > 0 {
                return Ok(pid);
            }
            continue;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Exit code or terminating signal of a raw wait status.
pub fn decode_status(status: WaitStatus) -> (Option<i32>, Option<i32>) {
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    }
}

#[cfg(test)]
mod tests {
    use std::process::Stdio;

    use super::*;

    #[test]
    fn spawn_true_reports_exit_code_zero() {
        let children = Children::new(false).unwrap();
        let (_child, status) = children.spawn(Command::new("true").stdin(Stdio::null())).unwrap();
        assert_eq!(decode_status(status.recv().unwrap()), (Some(0), None));
    }

    #[test]
    fn kill_group_of_sleeper_reports_sigkill() {
        let children = Children::new(false).unwrap();
        let mut command = Command::new("sleep");
        command.arg("30");
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let (child, status) = children.spawn(&mut command).unwrap();
        assert!(children.kill_group(child.id() as i32));
        assert_eq!(decode_status(status.recv().unwrap()), (None, Some(libc::SIGKILL)));
        assert!(!children.kill_group(child.id() as i32), "a reaped child is not signalled");
    }

    #[test]
    fn spawn_missing_program_returns_not_found() {
        let children = Children::new(false).unwrap();
        let error = children.spawn(&mut Command::new("/nonexistent/carrel-no-such-program")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }
}

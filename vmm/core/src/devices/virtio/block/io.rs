//! The block device's I/O engine: reads and writes between the disk's files and guest
//! memory on io_uring, completions signalled to the event loop by an eventfd; where
//! io_uring cannot be set up, the same transfers run synchronously (said at start).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

use crate::disk::FlushPlan;

/// Ring entries: the queue's 256 requests, a few transfers each, are batched into it.
const RING_ENTRIES: u32 = 256;

/// One transfer between a file and guest buffers; the engine copies the iovecs into
/// storage it keeps for the transfer's slot, so the caller's list can be reused.
#[derive(Debug, Clone, Copy)]
pub struct Transfer<'a> {
    pub fd: RawFd,
    pub offset: u64,
    pub iovecs: &'a [libc::iovec],
    pub write: bool,
}

fn total_len(iovecs: &[libc::iovec]) -> usize {
    iovecs.iter().map(|iovec| iovec.iov_len).sum()
}

/// A finished transfer: its request's token and whether it moved every byte.
#[derive(Debug)]
pub struct Completion {
    pub token: u64,
    pub result: io::Result<()>,
}

/// What one ring entry does.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Op {
    #[default]
    Read,
    Write,
    /// fdatasync of the file.
    Sync,
}

/// An operation the engine holds, waiting for room in the ring or in it; its iovecs (and
/// the bytes in `owned`, which they may name) must stay put until it completes. Slots are
/// reused, and so are each slot's lists.
#[derive(Debug, Default)]
struct Slot {
    token: u64,
    expected: usize,
    fd: RawFd,
    offset: u64,
    op: Op,
    iovecs: Vec<libc::iovec>,
    /// Bytes the engine writes from its own memory (a disk index slot).
    owned: Vec<u8>,
    /// Starts after everything submitted before it has completed.
    drain: bool,
    /// Entries in the chain this slot heads (the next ones run only if this succeeds);
    /// 0 for a slot inside a chain.
    chain: u32,
    busy: bool,
}

/// io_uring with a registered eventfd.
pub struct Uring {
    ring: IoUring,
    eventfd: EventFd,
    /// Transfers the engine holds, indexed by their user_data.
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Slots waiting for room in the submission queue, oldest first.
    waiting: VecDeque<usize>,
    unsubmitted: u32,
}

// SAFETY: the raw pointers in the held iovecs name guest RAM, which every thread of the
// VMM may access and which stays mapped while the device exists; the ring is used only
// by the thread that holds the device's lock.
unsafe impl Send for Uring {}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring").field("held", &(self.slots.len() - self.free.len())).finish()
    }
}

/// How the device moves its data.
#[derive(Debug)]
pub enum Engine {
    Uring(Box<Uring>),
    /// Transfers run as they are pushed; their completions wait in the list.
    Sync(Vec<Completion>),
    /// Tests: transfers run as they are pushed, but their completions are held back
    /// (first list) until [`Engine::release`] or a wait hands them out (second list), as
    /// a slow disk would.
    #[cfg(test)]
    Held(Vec<Completion>, Vec<Completion>),
}

impl Default for Engine {
    fn default() -> Engine {
        Engine::new()
    }
}

impl Engine {
    /// io_uring when the kernel allows it, else synchronous (the reason on stderr).
    pub fn new() -> Engine {
        match Uring::new() {
            Ok(uring) => Engine::Uring(Box::new(uring)),
            Err(err) => {
                eprintln!("carrel-vmm: virtio-blk: io_uring unavailable ({err}); disk I/O runs synchronously");
                Engine::Sync(Vec::new())
            }
        }
    }

    pub fn synchronous() -> Engine {
        Engine::Sync(Vec::new())
    }

    pub fn name(&self) -> &'static str {
        match self {
            Engine::Uring(_) => "io_uring",
            Engine::Sync(_) => "synchronous",
            #[cfg(test)]
            Engine::Held(..) => "held",
        }
    }

    /// The fd that becomes readable when transfers complete.
    pub fn event_fd(&self) -> Option<RawFd> {
        match self {
            Engine::Uring(uring) => Some(uring.eventfd.as_raw_fd()),
            Engine::Sync(_) => None,
            #[cfg(test)]
            Engine::Held(..) => None,
        }
    }

    /// Queues a transfer (a synchronous engine runs it now).
    pub fn push(&mut self, token: u64, transfer: Transfer<'_>) {
        match self {
            Engine::Uring(uring) => uring.push(token, transfer),
            Engine::Sync(done) => done.push(Completion { token, result: run(&transfer) }),
            #[cfg(test)]
            Engine::Held(held, _) => held.push(Completion { token, result: run(&transfer) }),
        }
    }

    /// Queues a flush under `token` (a synchronous engine runs it now): the plan's steps
    /// in order, the first after every transfer queued before it. Returns how many
    /// completions the token gets, all `Ok` only if every step succeeded.
    pub fn push_flush(&mut self, token: u64, plan: FlushPlan) -> usize {
        match self {
            Engine::Uring(uring) => uring.push_flush(token, plan),
            Engine::Sync(done) => {
                done.push(Completion { token, result: run_flush(&plan) });
                1
            }
            #[cfg(test)]
            Engine::Held(held, _) => {
                held.push(Completion { token, result: run_flush(&plan) });
                1
            }
        }
    }

    /// Hands the queued transfers to the kernel.
    pub fn submit(&mut self) {
        if let Engine::Uring(uring) = self {
            uring.submit(0);
        }
    }

    /// Blocks until at least one transfer completes.
    pub fn wait(&mut self) {
        match self {
            Engine::Uring(uring) => uring.submit(1),
            Engine::Sync(_) => {}
            #[cfg(test)]
            Engine::Held(..) => self.release(),
        }
    }

    /// Tests: lets the held completions out.
    #[cfg(test)]
    pub fn release(&mut self) {
        if let Engine::Held(held, released) = self {
            released.append(held);
        }
    }

    /// Appends the transfers finished since the last call to `done`.
    pub fn completions(&mut self, done: &mut Vec<Completion>) {
        match self {
            Engine::Uring(uring) => uring.reap(done),
            Engine::Sync(finished) => done.append(finished),
            #[cfg(test)]
            Engine::Held(_, released) => done.append(released),
        }
    }
}

/// The steps of a flush, run now: one result for the whole plan.
fn run_flush(plan: &FlushPlan) -> io::Result<()> {
    let sync = || {
        // SAFETY: fdatasync on a file descriptor the disk keeps open; no memory is passed.
        if unsafe { libc::fdatasync(plan.fd) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    sync()?;
    if let Some((bytes, offset)) = &plan.index {
        let iovec = [libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() }];
        run(&Transfer { fd: plan.fd, offset: *offset, iovecs: &iovec, write: true })?;
        sync()?;
    }
    Ok(())
}

/// How many ring entries (and so completions) a flush takes.
fn flush_steps(plan: &FlushPlan) -> usize {
    if plan.index.is_some() {
        3
    } else {
        1
    }
}

fn short(expected: usize, got: usize) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("moved {got} of {expected} bytes"))
}

/// Runs one transfer with preadv/pwritev, resuming after partial transfers.
fn run(transfer: &Transfer<'_>) -> io::Result<()> {
    let expected = total_len(transfer.iovecs);
    let mut iovecs = transfer.iovecs.to_vec();
    let mut done = 0usize;
    while done < expected {
        let (offset, count) = (transfer.offset + done as u64, iovecs.len().min(libc::UIO_MAXIOV as usize));
        // SAFETY: the iovecs describe guest buffers checked by the handler, mapped for
        // the VM's lifetime; the kernel reads or writes only within them.
        let moved = unsafe {
            if transfer.write {
                libc::pwritev(transfer.fd, iovecs.as_ptr(), count as i32, offset as i64)
            } else {
                libc::preadv(transfer.fd, iovecs.as_ptr(), count as i32, offset as i64)
            }
        };
        if moved < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if moved == 0 {
            return Err(short(expected, done));
        }
        done += moved as usize;
        advance(&mut iovecs, moved as usize);
    }
    Ok(())
}

/// Drops the first `count` bytes from `iovecs`.
fn advance(iovecs: &mut Vec<libc::iovec>, mut count: usize) {
    let mut first = 0;
    while count > 0 && first < iovecs.len() {
        let iovec = &mut iovecs[first];
        if count >= iovec.iov_len {
            count -= iovec.iov_len;
            first += 1;
        } else {
            // SAFETY: count < iov_len, so the pointer stays inside the buffer.
            iovec.iov_base = unsafe { iovec.iov_base.cast::<u8>().add(count) }.cast();
            iovec.iov_len -= count;
            count = 0;
        }
    }
    iovecs.drain(..first);
}

impl Uring {
    fn new() -> io::Result<Uring> {
        let eventfd = EventFd::new(libc::EFD_NONBLOCK)?;
        // Every completion signals, not only the io-wq workers' (register_eventfd_async):
        // a completion posted by task work in this thread would otherwise sit in the ring
        // while the event loop sleeps.
        let opcodes = [opcode::Readv::CODE, opcode::Writev::CODE, opcode::Fsync::CODE];
        let ring = crate::seccomp::restricted_ring(RING_ENTRIES, &opcodes, |ring| {
            ring.submitter().register_eventfd(eventfd.as_raw_fd())
        })?;
        Ok(Uring { ring, eventfd, slots: Vec::new(), free: Vec::new(), waiting: VecDeque::new(), unsubmitted: 0 })
    }

    /// A free slot, marked busy, with its lists emptied.
    fn take_slot(&mut self, token: u64, fd: RawFd, op: Op) -> usize {
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::default());
            self.slots.len() - 1
        });
        let slot = &mut self.slots[index];
        slot.token = token;
        slot.fd = fd;
        slot.op = op;
        slot.offset = 0;
        slot.expected = 0;
        slot.iovecs.clear();
        slot.owned.clear();
        slot.drain = false;
        slot.chain = 1;
        slot.busy = true;
        index
    }

    fn push(&mut self, token: u64, transfer: Transfer<'_>) {
        let op = if transfer.write { Op::Write } else { Op::Read };
        let index = self.take_slot(token, transfer.fd, op);
        let slot = &mut self.slots[index];
        slot.expected = total_len(transfer.iovecs);
        slot.offset = transfer.offset;
        slot.iovecs.extend_from_slice(transfer.iovecs);
        self.waiting.push_back(index);
        self.fill();
    }

    /// A flush as one chain: a data sync that waits for everything before it, then the
    /// index write and its sync, each only if the step before it succeeded.
    fn push_flush(&mut self, token: u64, plan: FlushPlan) -> usize {
        let steps = flush_steps(&plan);
        let sync = self.take_slot(token, plan.fd, Op::Sync);
        self.slots[sync].drain = true;
        self.slots[sync].chain = steps as u32;
        self.waiting.push_back(sync);
        if let Some((bytes, offset)) = plan.index {
            let write = self.take_slot(token, plan.fd, Op::Write);
            let slot = &mut self.slots[write];
            slot.chain = 0;
            slot.offset = offset;
            slot.expected = bytes.len();
            slot.owned = bytes;
            slot.iovecs.push(libc::iovec { iov_base: slot.owned.as_mut_ptr().cast(), iov_len: slot.owned.len() });
            self.waiting.push_back(write);
            let again = self.take_slot(token, plan.fd, Op::Sync);
            self.slots[again].chain = 0;
            self.waiting.push_back(again);
        }
        self.fill();
        steps
    }

    /// Moves waiting operations into the submission queue while it has room; a chain
    /// goes in whole, in one submission, or waits.
    fn fill(&mut self) {
        let mut linked = 0u32;
        while let Some(&index) = self.waiting.front() {
            let slot = &self.slots[index];
            if linked == 0 && slot.chain > 1 {
                let chain = slot.chain;
                if self.room() < chain as usize {
                    if self.ring.submit().is_err() {
                        return;
                    }
                    self.unsubmitted = 0;
                    if self.room() < chain as usize {
                        return;
                    }
                }
                linked = chain;
            }
            let slot = &self.slots[index];
            let fd = types::Fd(slot.fd);
            let count = slot.iovecs.len() as u32;
            let mut entry = match slot.op {
                Op::Write => opcode::Writev::new(fd, slot.iovecs.as_ptr(), count).offset(slot.offset).build(),
                Op::Read => opcode::Readv::new(fd, slot.iovecs.as_ptr(), count).offset(slot.offset).build(),
                Op::Sync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            };
            let mut flags = squeue::Flags::empty();
            if slot.drain {
                flags |= squeue::Flags::IO_DRAIN;
            }
            if linked > 1 {
                flags |= squeue::Flags::IO_LINK;
            }
            entry = entry.flags(flags);
            // SAFETY: the iovecs (and the guest buffers or owned bytes they name) stay in
            // their slot, unchanged, until the completion for this slot is reaped.
            let pushed = unsafe { self.ring.submission().push(&entry.user_data(index as u64)) };
            if pushed.is_err() {
                // Only a lone entry can find the queue full: a chain made room above.
                if self.ring.submit().is_err() {
                    return;
                }
                self.unsubmitted = 0;
                if self.ring.submission().is_full() {
                    return;
                }
                continue;
            }
            linked = linked.saturating_sub(1);
            self.waiting.pop_front();
            self.unsubmitted += 1;
        }
    }

    /// Free entries in the submission queue.
    fn room(&mut self) -> usize {
        let queue = self.ring.submission();
        queue.capacity() - queue.len()
    }

    fn submit(&mut self, wait: usize) {
        self.fill();
        let result = if wait > 0 && !self.ring.completion().is_empty() {
            self.ring.submit()
        } else {
            self.ring.submit_and_wait(wait)
        };
        match result {
            Ok(_) => self.unsubmitted = 0,
            // EBUSY: the completion queue is full; reaping makes room.
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) || err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => eprintln!("carrel-vmm: virtio-blk: io_uring submit failed: {err}"),
        }
    }

    fn reap(&mut self, done: &mut Vec<Completion>) {
        let _ = self.eventfd.read();
        for entry in self.ring.completion() {
            let index = entry.user_data() as usize;
            let Some(slot) = self.slots.get_mut(index).filter(|slot| slot.busy) else { continue };
            slot.busy = false;
            self.free.push(index);
            let result = match entry.result() {
                moved if moved < 0 => Err(io::Error::from_raw_os_error(-moved)),
                moved if moved as usize != slot.expected => Err(short(slot.expected, moved as usize)),
                _ => Ok(()),
            };
            done.push(Completion { token: slot.token, result });
        }
        if !self.waiting.is_empty() {
            self.submit(0);
        }
    }
}

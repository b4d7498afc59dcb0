//! The block device's I/O engine: reads and writes between the disk's files and guest
//! memory on io_uring, completions signalled to the event loop by an eventfd; where
//! io_uring cannot be set up, the same transfers run synchronously (said at start).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

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

/// A transfer the engine holds, waiting for room in the ring or in it; its iovecs must
/// stay put until it completes. Slots are reused, and so is each slot's iovec list.
#[derive(Debug, Default)]
struct Slot {
    token: u64,
    expected: usize,
    fd: RawFd,
    offset: u64,
    write: bool,
    iovecs: Vec<libc::iovec>,
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
        let ring =
            crate::seccomp::restricted_ring(RING_ENTRIES, &[opcode::Readv::CODE, opcode::Writev::CODE], |ring| {
                ring.submitter().register_eventfd(eventfd.as_raw_fd())
            })?;
        Ok(Uring { ring, eventfd, slots: Vec::new(), free: Vec::new(), waiting: VecDeque::new(), unsubmitted: 0 })
    }

    fn push(&mut self, token: u64, transfer: Transfer<'_>) {
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::default());
            self.slots.len() - 1
        });
        let slot = &mut self.slots[index];
        slot.token = token;
        slot.expected = total_len(transfer.iovecs);
        slot.fd = transfer.fd;
        slot.offset = transfer.offset;
        slot.write = transfer.write;
        slot.iovecs.clear();
        slot.iovecs.extend_from_slice(transfer.iovecs);
        slot.busy = true;
        self.waiting.push_back(index);
        self.fill();
    }

    /// Moves waiting transfers into the submission queue while it has room.
    fn fill(&mut self) {
        while let Some(&index) = self.waiting.front() {
            let slot = &self.slots[index];
            let fd = types::Fd(slot.fd);
            let count = slot.iovecs.len() as u32;
            let entry = if slot.write {
                opcode::Writev::new(fd, slot.iovecs.as_ptr(), count).offset(slot.offset).build()
            } else {
                opcode::Readv::new(fd, slot.iovecs.as_ptr(), count).offset(slot.offset).build()
            };
            // SAFETY: the iovecs (and the guest buffers they name) stay in their slot,
            // unchanged, until the completion for this slot is reaped.
            let pushed = unsafe { self.ring.submission().push(&entry.user_data(index as u64)) };
            if pushed.is_err() {
                if self.ring.submit().is_err() {
                    return;
                }
                self.unsubmitted = 0;
                if self.ring.submission().is_full() {
                    return;
                }
                continue;
            }
            self.waiting.pop_front();
            self.unsubmitted += 1;
        }
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

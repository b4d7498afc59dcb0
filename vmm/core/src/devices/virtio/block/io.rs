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

/// One transfer between a file and guest buffers.
#[derive(Debug)]
pub struct Transfer {
    pub fd: RawFd,
    pub offset: u64,
    pub iovecs: Vec<libc::iovec>,
    pub write: bool,
}

impl Transfer {
    fn len(&self) -> usize {
        self.iovecs.iter().map(|iovec| iovec.iov_len).sum()
    }
}

/// A finished transfer: its request's token and whether it moved every byte.
#[derive(Debug)]
pub struct Completion {
    pub token: u64,
    pub result: io::Result<()>,
}

/// A transfer the ring is working on; its iovecs must stay put until it completes.
#[derive(Debug)]
struct Submitted {
    token: u64,
    expected: usize,
    _iovecs: Vec<libc::iovec>,
}

/// io_uring with a registered eventfd.
pub struct Uring {
    ring: IoUring,
    eventfd: EventFd,
    /// Slots of transfers the ring holds, indexed by their user_data.
    submitted: Vec<Option<Submitted>>,
    free: Vec<usize>,
    /// Transfers waiting for room in the submission queue.
    waiting: VecDeque<(u64, Transfer)>,
    unsubmitted: u32,
}

// SAFETY: the raw pointers in the held iovecs name guest RAM, which every thread of the
// VMM may access and which stays mapped while the device exists; the ring is used only
// by the thread that holds the device's lock.
unsafe impl Send for Uring {}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring").field("in_ring", &(self.submitted.len() - self.free.len())).finish()
    }
}

/// How the device moves its data.
#[derive(Debug)]
pub enum Engine {
    Uring(Box<Uring>),
    /// Transfers run as they are pushed; their completions wait in the list.
    Sync(Vec<Completion>),
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
        }
    }

    /// The fd that becomes readable when transfers complete.
    pub fn event_fd(&self) -> Option<RawFd> {
        match self {
            Engine::Uring(uring) => Some(uring.eventfd.as_raw_fd()),
            Engine::Sync(_) => None,
        }
    }

    /// Queues a transfer (a synchronous engine runs it now).
    pub fn push(&mut self, token: u64, transfer: Transfer) {
        match self {
            Engine::Uring(uring) => uring.push(token, transfer),
            Engine::Sync(done) => done.push(Completion { token, result: run(&transfer) }),
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
        if let Engine::Uring(uring) = self {
            uring.submit(1);
        }
    }

    /// The transfers finished since the last call.
    pub fn completions(&mut self) -> Vec<Completion> {
        match self {
            Engine::Uring(uring) => uring.reap(),
            Engine::Sync(done) => std::mem::take(done),
        }
    }
}

fn short(expected: usize, got: usize) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("moved {got} of {expected} bytes"))
}

/// Runs one transfer with preadv/pwritev, resuming after partial transfers.
fn run(transfer: &Transfer) -> io::Result<()> {
    let expected = transfer.len();
    let mut iovecs = transfer.iovecs.clone();
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
        Ok(Uring { ring, eventfd, submitted: Vec::new(), free: Vec::new(), waiting: VecDeque::new(), unsubmitted: 0 })
    }

    fn push(&mut self, token: u64, transfer: Transfer) {
        self.waiting.push_back((token, transfer));
        self.fill();
    }

    /// Moves waiting transfers into the submission queue while it has room.
    fn fill(&mut self) {
        while let Some((token, transfer)) = self.waiting.pop_front() {
            let slot = self.free.pop().unwrap_or_else(|| {
                self.submitted.push(None);
                self.submitted.len() - 1
            });
            let fd = types::Fd(transfer.fd);
            let count = transfer.iovecs.len() as u32;
            let entry = if transfer.write {
                opcode::Writev::new(fd, transfer.iovecs.as_ptr(), count).offset(transfer.offset).build()
            } else {
                opcode::Readv::new(fd, transfer.iovecs.as_ptr(), count).offset(transfer.offset).build()
            };
            // SAFETY: the iovecs (and the guest buffers they name) live in `submitted`
            // until the completion for this slot is reaped.
            let pushed = unsafe { self.ring.submission().push(&entry.user_data(slot as u64)) };
            if pushed.is_err() {
                self.free.push(slot);
                self.waiting.push_front((token, transfer));
                if self.ring.submit().is_err() {
                    return;
                }
                self.unsubmitted = 0;
                if self.ring.submission().is_full() {
                    return;
                }
                continue;
            }
            self.unsubmitted += 1;
            self.submitted[slot] = Some(Submitted { token, expected: transfer.len(), _iovecs: transfer.iovecs });
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

    fn reap(&mut self) -> Vec<Completion> {
        let _ = self.eventfd.read();
        let mut done = Vec::new();
        for entry in self.ring.completion() {
            let slot = entry.user_data() as usize;
            let Some(submitted) = self.submitted.get_mut(slot).and_then(Option::take) else { continue };
            self.free.push(slot);
            let result = match entry.result() {
                moved if moved < 0 => Err(io::Error::from_raw_os_error(-moved)),
                moved if moved as usize != submitted.expected => Err(short(submitted.expected, moved as usize)),
                _ => Ok(()),
            };
            done.push(Completion { token: submitted.token, result });
        }
        if !self.waiting.is_empty() {
            self.submit(0);
        }
        done
    }
}

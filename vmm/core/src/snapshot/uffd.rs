//! The few userfaultfd calls a lazy restore needs (linux/userfaultfd.h): open, API
//! handshake, register a range for missing-page faults, read a fault, copy a page in.
//!
//! Written here rather than taken from the `userfaultfd` crate: that crate generates its
//! bindings with bindgen (libclang at build time) and brings nix 0.27 for these five
//! ioctls.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const UFFD_API: u64 = 0xaa;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// Bit of `uffdio_register.ioctls` saying UFFDIO_COPY works on the range.
const UFFDIO_COPY_BIT: u64 = 1 << 3;

// _IOWR/_IOR(0xaa, nr, struct) on x86_64.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
/// /dev/userfaultfd's ioctl for a new userfaultfd (Linux 6.1+).
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffd_msg`: 32 bytes; for a page fault the address is at offset 16.
#[repr(C)]
#[derive(Default)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _feature: u64,
}

/// What copying a range in did.
#[derive(Debug, PartialEq, Eq)]
pub enum Copied {
    /// The whole range was filled and its waiters woken.
    All,
    /// Some page of the range was already present: nothing past `done` bytes was copied.
    Exists { done: u64 },
}

/// An open userfaultfd.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
}

impl AsRawFd for Userfault {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Userfault {
    /// Opens a userfaultfd that also sees faults from inside the kernel (KVM's), by the
    /// syscall or, where that is not allowed, /dev/userfaultfd; and does the handshake.
    pub fn open() -> io::Result<Userfault> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the syscall takes flags and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as libc::c_int;
        let raw = if raw >= 0 {
            raw
        } else {
            let syscall_error = io::Error::last_os_error();
            let device = File::options().read(true).write(true).open("/dev/userfaultfd").map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!("userfaultfd: {syscall_error}; /dev/userfaultfd: {err} (vm.unprivileged_userfaultfd?)"),
                )
            })?;
            // SAFETY: an ioctl on the device fd with the flags as its argument.
            let raw = unsafe { libc::ioctl(device.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
            check(raw)?;
            raw
        };
        // SAFETY: `raw` is a new fd that nothing else owns.
        let fault = Userfault { fd: unsafe { OwnedFd::from_raw_fd(raw) } };
        let mut api = UffdioApi { api: UFFD_API, features: 0, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and fills the struct it is given.
        check(unsafe { libc::ioctl(fault.fd.as_raw_fd(), UFFDIO_API, &mut api) })?;
        Ok(fault)
    }

    /// Routes missing-page faults in `[start, start + len)` of this process to this fd.
    pub fn register(&self, start: *mut u8, len: u64) -> io::Result<()> {
        let mut register = UffdioRegister {
            range: UffdioRange { start: start as u64, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads the range and fills `ioctls`; the kernel checks
        // the range is mapped.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut register) })?;
        if register.ioctls & UFFDIO_COPY_BIT == 0 {
            return Err(io::Error::other("this kernel cannot fill the guest RAM mapping (no UFFDIO_COPY for it)"));
        }
        Ok(())
    }

    /// Ends fault routing for the range: later faults there are ordinary ones, and any
    /// waiting fault is retried.
    pub fn unregister(&self, start: *mut u8, len: u64) -> io::Result<()> {
        let range = UffdioRange { start: start as u64, len };
        // SAFETY: UFFDIO_UNREGISTER reads the range.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &range) })
    }

    /// The address of the next missing-page fault, if one is waiting.
    pub fn next_fault(&self) -> io::Result<Option<u64>> {
        loop {
            let mut message = UffdMsg::default();
            let size = std::mem::size_of::<UffdMsg>();
            // SAFETY: reads at most `size` bytes into the message.
            let read = unsafe { libc::read(self.fd.as_raw_fd(), (&mut message as *mut UffdMsg).cast(), size) };
            if read < 0 {
                let err = io::Error::last_os_error();
                return match err.kind() {
                    io::ErrorKind::WouldBlock => Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(err),
                };
            }
            if read as usize != size {
                return Err(io::Error::other(format!("short userfaultfd message of {read} bytes")));
            }
            if message.event == UFFD_EVENT_PAGEFAULT {
                return Ok(Some(message.address));
            }
            // Other events (fork, remap) are not asked for; skip any that come.
        }
    }

    /// Fills the missing pages `[dst, dst + src.len())` from `src` and wakes whoever waits.
    pub fn copy(&self, dst: *mut u8, src: &[u8]) -> io::Result<Copied> {
        let mut done = 0u64;
        let len = src.len() as u64;
        while done < len {
            let mut copy = UffdioCopy {
                dst: dst as u64 + done,
                src: src.as_ptr() as u64 + done,
                len: len - done,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads `len` bytes at `src` (a live slice) into pages of a
            // registered range; it reports progress in `copy`.
            let result = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut copy) };
            if copy.copy > 0 {
                done += copy.copy as u64;
            }
            if result == 0 {
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) => continue,
                Some(libc::EEXIST) => return Ok(Copied::Exists { done }),
                _ => return Err(err),
            }
        }
        Ok(Copied::All)
    }
}

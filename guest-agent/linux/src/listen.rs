//! Listeners: a Unix socket, and AF_VSOCK through libc (std has no vsock support).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Errors binding a listener.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("binding Unix socket {path:?} failed")]
    BindUnix {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The kernel has no vsock support (or no transport for this side).
    #[error(
        "AF_VSOCK is not supported here: in a guest, enable CONFIG_VIRTIO_VSOCKETS (or load \
         vmw_vsock_virtio_transport); on a host, use --unix PATH"
    )]
    CreateVsock {
        #[source]
        source: io::Error,
    },
    #[error("binding vsock port {port} failed")]
    BindVsock {
        port: u32,
        #[source]
        source: io::Error,
    },
}

/// Binds a Unix listener at `path`, replacing a stale socket left by an earlier run.
pub fn bind_unix(path: &Path) -> Result<UnixListener, ListenError> {
    if std::fs::symlink_metadata(path).is_ok_and(|metadata| metadata.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| ListenError::BindUnix { path: path.to_path_buf(), source })
}

/// A listening AF_VSOCK stream socket on any CID.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
    port: u32,
}

impl VsockListener {
    /// Binds `port` on VMADDR_CID_ANY and listens.
    pub fn bind(port: u32) -> Result<VsockListener, ListenError> {
        // SAFETY: socket has no memory effects; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(ListenError::CreateVsock { source: io::Error::last_os_error() });
        }
        // SAFETY: raw is a fresh socket that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid start.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        let bind_error = |source| ListenError::BindVsock { port, source };
        // SAFETY: addr is a valid sockaddr_vm and the length says so.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(bind_error(io::Error::last_os_error()));
        }
        // SAFETY: listen on our own bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 16) } != 0 {
            return Err(bind_error(io::Error::last_os_error()));
        }
        Ok(VsockListener { fd, port })
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<VsockStream> {
        // SAFETY: null address pointers are allowed (the peer address is not wanted).
        let raw = unsafe {
            libc::accept4(self.fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh connected socket that nothing else owns.
        Ok(VsockStream { file: File::from(unsafe { OwnedFd::from_raw_fd(raw) }) })
    }

    /// The port listened on.
    pub fn port(&self) -> u32 {
        self.port
    }
}

/// A connected vsock stream. Reads and writes are the plain read(2)/write(2) that `File`
/// does, which is all a stream socket needs.
#[derive(Debug)]
pub struct VsockStream {
    file: File,
}

impl VsockStream {
    /// Connects to `port` on `cid` (the host uses its hybrid-vsock Unix socket instead; this
    /// is for tests over the loopback transport, CID 1, and for guest-side tools).
    pub fn connect(cid: u32, port: u32) -> io::Result<VsockStream> {
        // SAFETY: socket has no memory effects; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh socket that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid start.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = cid;
        // SAFETY: addr is a valid sockaddr_vm and the length says so.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(VsockStream { file: File::from(fd) })
    }

    /// Another handle to the same socket.
    pub fn try_clone(&self) -> io::Result<VsockStream> {
        Ok(VsockStream { file: self.file.try_clone()? })
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_bind_without_support_returns_clear_error_or_listens() {
        // This machine may lack AF_VSOCK entirely; either outcome is fine, a panic is not.
        match VsockListener::bind(0x7fff_0001) {
            Ok(listener) => assert_eq!(listener.port(), 0x7fff_0001),
            Err(ListenError::CreateVsock { source }) => {
                assert!(source.raw_os_error().is_some());
                let text = ListenError::CreateVsock { source }.to_string();
                assert!(text.contains("--unix"), "{text}");
            }
            Err(ListenError::BindVsock { .. }) => {}
            Err(other) => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn bind_unix_over_stale_socket_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        drop(bind_unix(&path).unwrap());
        assert!(path.exists());
        bind_unix(&path).unwrap();
    }
}

//! Opening connections: a Unix socket straight to an agent, or the VMM's hybrid-vsock Unix
//! socket (Firecracker's convention: send `CONNECT <port>\n`, get `OK <host port>\n`).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Client, ClientError};

/// Longest handshake reply accepted ("OK 4294967295\n" is 14 bytes).
const MAX_HANDSHAKE_REPLY: usize = 64;

/// Errors opening a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {path:?} failed")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vsock handshake on {path:?} failed")]
    Handshake {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The VMM answered something other than `OK <port>`: nothing listens on the port yet.
    #[error("vsock CONNECT {port} on {path:?} was refused ({reply:?}); is the guest agent listening on port {port}?")]
    AcceptHandshake { path: PathBuf, port: u32, reply: String },
    #[error(transparent)]
    WaitReady(#[from] ClientError),
}

/// Connects to an agent's Unix socket.
pub fn connect_unix(path: &Path) -> Result<Client<UnixStream>, ConnectError> {
    let stream = UnixStream::connect(path).map_err(|source| ConnectError::Connect { path: path.into(), source })?;
    Ok(Client::new(stream))
}

/// Connects to an agent's Unix socket, retrying while it is not there yet, and waits for the
/// first heartbeat, all within `timeout`.
pub fn connect_unix_ready(path: &Path, timeout: Duration) -> Result<Client<UnixStream>, ConnectError> {
    let deadline = Instant::now() + timeout;
    let mut client = loop {
        match connect_unix(path) {
            Ok(client) => break client,
            Err(ConnectError::Connect { source, .. })
                if Instant::now() < deadline
                    && matches!(source.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) =>
            {
                // The agent has not bound its socket yet; there is no event to wait on.
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(error) => return Err(error),
        }
    };
    client.wait_ready(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)))?;
    Ok(client)
}

/// Connects to guest vsock `port` through the VMM's hybrid-vsock Unix socket at `path`.
/// The returned stream carries the agent protocol from its first byte.
pub fn connect_vsock_uds(path: &Path, port: u32) -> Result<UnixStream, ConnectError> {
    let mut stream = UnixStream::connect(path).map_err(|source| ConnectError::Connect { path: path.into(), source })?;
    let handshake_error = |source| ConnectError::Handshake { path: path.into(), source };
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(handshake_error)?;
    // Byte by byte, so no byte of the agent's first frame is read past the newline.
    let mut reply = Vec::new();
    loop {
        let mut byte = [0u8];
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => reply.push(byte[0]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(handshake_error(error)),
        }
        if reply.len() > MAX_HANDSHAKE_REPLY {
            break;
        }
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let accepted = reply.strip_prefix("OK ").is_some_and(|rest| rest.trim().parse::<u32>().is_ok());
    if !accepted {
        return Err(ConnectError::AcceptHandshake { path: path.into(), port, reply });
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    use super::*;

    fn fake_vmm(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            io::BufReader::new(stream.try_clone().unwrap()).read_line(&mut line).unwrap();
            (&stream).write_all(reply).unwrap();
            line
        });
        (dir, path, server)
    }

    #[test]
    fn connect_vsock_uds_with_ok_reply_returns_stream_at_first_agent_byte() {
        let (_dir, path, server) = fake_vmm(b"OK 1073741824\nAGENT");
        let mut stream = connect_vsock_uds(&path, 1024).unwrap();
        assert_eq!(server.join().unwrap(), "CONNECT 1024\n");
        let mut rest = [0u8; 5];
        stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"AGENT");
    }

    #[test]
    fn connect_vsock_uds_with_refusal_returns_clear_error() {
        let (_dir, path, server) = fake_vmm(b"");
        let error = connect_vsock_uds(&path, 1024).unwrap_err();
        server.join().unwrap();
        assert!(matches!(error, ConnectError::AcceptHandshake { port: 1024, .. }), "{error}");
        assert!(error.to_string().contains("port 1024"));
    }

    #[test]
    fn connect_unix_to_missing_socket_returns_connect_error() {
        let error = connect_unix(Path::new("/nonexistent/carrel.sock")).unwrap_err();
        assert!(matches!(error, ConnectError::Connect { .. }));
    }
}

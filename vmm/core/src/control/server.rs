//! The VM's control socket server: an accept thread and one thread per connection that
//! parses frames and hands each request to the services that wait on this thread
//! (screen, input, agent) or to the VMM thread (everything else: the control plane is
//! thin).

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::protocol::{read_frame, write_frame, ControlError, ErrorKind, Request, Response, MAX_REQUEST_BYTES};

/// A request waiting for the VMM thread, with where its answer goes.
#[derive(Debug)]
pub struct PendingRequest {
    pub request: Request,
    pub reply: Sender<Response>,
    /// The peer's credentials (pid, uid, gid), for the audit record.
    pub peer: Option<(i32, u32, u32)>,
    /// Signalled once the answer is on the wire, so a VMM that is about to exit can
    /// wait for its last answer to leave.
    pub written: mpsc::Receiver<()>,
}

impl PendingRequest {
    /// Sends `response` and waits up to `timeout` for it to be written to the client.
    pub fn answer_and_flush(self, response: Response, timeout: Duration) {
        if self.reply.send(response).is_ok() {
            let _ = self.written.recv_timeout(timeout);
        }
    }
}

/// Where connection threads queue requests: a channel and an eventfd the event loop polls.
/// Requests that wait (screenshots) are served on the connection thread by `local`, so a
/// wait never blocks the event loop the guest's devices run on.
#[derive(Debug, Clone)]
pub struct RequestQueue {
    sender: Sender<PendingRequest>,
    wake: Arc<EventFd>,
    local: Arc<crate::services::ConnectionServices>,
}

impl RequestQueue {
    pub fn new(
        sender: Sender<PendingRequest>,
        wake: Arc<EventFd>,
        local: Arc<crate::services::ConnectionServices>,
    ) -> RequestQueue {
        RequestQueue { sender, wake, local }
    }

    fn submit(&self, pending: PendingRequest) -> bool {
        let sent = self.sender.send(pending).is_ok();
        if sent {
            let _ = self.wake.write(1);
        }
        sent
    }
}

/// The listening socket; removes its path when dropped.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket file) and starts accepting on a thread,
    /// which runs under the control threads' seccomp filter, as do the connection
    /// threads it starts.
    pub fn start(path: &Path, queue: RequestQueue) -> Result<ControlServer, ControlError> {
        let name = path.display().to_string();
        if path.exists() && UnixStream::connect(path).is_err() {
            // A socket file nobody listens on: left over from a VMM that died.
            let _ = std::fs::remove_file(path);
        }
        let listener =
            crate::sockets::bind(path).map_err(|source| ControlError::Bind { path: name.clone(), source })?;
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                // Requests come in short bursts; each connection's thread inherits this.
                crate::sched::short_slices(crate::sched::SERVICE_SLICE);
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Control);
                accept_loop(listener, queue)
            })
            .map_err(|source| ControlError::Bind { path: name, source })?;
        Ok(ControlServer { path: path.to_path_buf() })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, queue: RequestQueue) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let queue = queue.clone();
        // One thread per client: clients are few (the daemon, a developer's CLI).
        let _ = std::thread::Builder::new().name("control-conn".into()).spawn(move || serve_connection(stream, queue));
    }
}

fn peer_credentials(stream: &UnixStream) -> Option<(i32, u32, u32)> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the fd is the
    // stream's own open socket.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((cred.pid, cred.uid, cred.gid))
}

fn serve_connection(mut stream: UnixStream, queue: RequestQueue) {
    let mut peer = peer_credentials(&stream);
    loop {
        let request = match read_frame::<Request>(&mut stream, MAX_REQUEST_BYTES) {
            Ok(None) => return,
            Ok(Some(request)) => request,
            // A broken frame: answer once so the client learns why, then hang up, since
            // the stream can no longer be trusted to be at a frame boundary.
            Err(err) => {
                let _ = write_frame(
                    &mut stream,
                    &Response::error(ErrorKind::InvalidArgument, format!("bad request: {err}")),
                );
                return;
            }
        };
        if let Request::ActFor { pid, uid, gid } = request {
            let response = match peer {
                Some((_, 0, _)) => {
                    peer = Some((pid, uid, gid));
                    Response::ActingFor
                }
                _ => Response::error(ErrorKind::PermissionDenied, "only root may act for another caller"),
            };
            if write_frame(&mut stream, &response).is_err() {
                return;
            }
            continue;
        }
        if let Request::SnapshotProgress = request {
            let progress = crate::snapshot::progress()
                .map(|(done_bytes, total_bytes)| super::protocol::SnapshotProgress { done_bytes, total_bytes });
            if write_frame(&mut stream, &Response::SnapshotProgress(progress)).is_err() {
                return;
            }
            continue;
        }
        if let Request::Screenshot(screenshot) = &request {
            if let Some(sent) = queue.local.screen.send_in_place(screenshot, &stream) {
                if sent.is_err() {
                    return;
                }
                continue;
            }
        }
        if let Some(response) = queue.local.serve(&request, peer, &mut stream) {
            if write_frame(&mut stream, &response).is_err() {
                return;
            }
            continue;
        }
        let (reply, answer) = mpsc::channel();
        let (written_sender, written) = mpsc::channel();
        let response = if queue.submit(PendingRequest { request, reply, peer, written }) {
            answer.recv().unwrap_or_else(|_| Response::error(ErrorKind::Unavailable, "the VM stopped before answering"))
        } else {
            Response::error(ErrorKind::Unavailable, "the VM is shutting down")
        };
        let sent = write_frame(&mut stream, &response);
        let _ = written_sender.send(());
        if sent.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{ControlClient, MAX_RESPONSE_BYTES};
    use std::io::Write;

    #[test]
    fn server_answers_over_a_real_socket_and_reports_bad_frames() {
        let path = std::env::temp_dir().join(format!("carrel-control-test-{}.sock", std::process::id()));
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let (sender, receiver) = mpsc::channel();
        let local = crate::services::ConnectionServices::new(
            crate::services::screen::ScreenService::new(None, None, Default::default()),
            crate::services::agent::AgentService::new(None, Default::default()),
            crate::services::input::InputService::new(None, None, Default::default()),
        );
        let _server = ControlServer::start(&path, RequestQueue::new(sender, wake, local)).unwrap();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let handler = std::thread::spawn(move || {
            let pending: PendingRequest = receiver.recv().unwrap();
            assert_eq!(pending.request, Request::Stop);
            assert_eq!(pending.peer.map(|(pid, _, _)| pid as u32), Some(std::process::id()));
            pending.reply.send(Response::Stopping).unwrap();
            // After an ActFor (from root, as carreld runs), the requests are the named
            // caller's.
            if !root {
                return;
            }
            let pending: PendingRequest = receiver.recv().unwrap();
            assert_eq!(pending.peer, Some((42, 1000, 1001)));
            pending.reply.send(Response::Paused).unwrap();
        });
        let mut client = ControlClient::connect(&path).unwrap();
        assert_eq!(client.call(&Request::Stop, Duration::from_secs(5)).unwrap(), Response::Stopping);
        let act_for = Request::ActFor { pid: 42, uid: 1000, gid: 1001 };
        match client.call(&act_for, Duration::from_secs(5)).unwrap() {
            Response::ActingFor if root => {}
            Response::Error(failure) if !root => assert_eq!(failure.kind, ErrorKind::PermissionDenied),
            other => panic!("unexpected {other:?} (root: {root})"),
        }
        if root {
            assert_eq!(client.call(&Request::Pause, Duration::from_secs(5)).unwrap(), Response::Paused);
        }
        handler.join().unwrap();
        // Answered on the connection thread: no snapshot is being written here.
        let progress = client.call(&Request::SnapshotProgress, Duration::from_secs(5)).unwrap();
        assert_eq!(progress, Response::SnapshotProgress(None));

        let mut raw = UnixStream::connect(&path).unwrap();
        raw.write_all(&(MAX_REQUEST_BYTES + 1).to_le_bytes()).unwrap();
        let answer: Response = read_frame(&mut raw, MAX_RESPONSE_BYTES).unwrap().unwrap();
        assert!(
            matches!(&answer, Response::Error(failure) if failure.message.contains("larger")
            && failure.kind == ErrorKind::InvalidArgument),
            "{answer:?}"
        );
    }
}

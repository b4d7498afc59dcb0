//! Guest agent requests on the control socket: the VMM connects to its own vsock device
//! (the hybrid-vsock Unix socket), runs the request with the agent client, and records it.
//! Put and get stream the file's bytes over the control connection itself, so this
//! process never opens a host path a client named (no confused deputy).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use carrel_agent_client::{connect_vsock_uds, Client, ClientError, ExecRequest, OutputStream};
use carrel_agent_proto::AGENT_VSOCK_PORT;

use crate::control::protocol::{
    read_frame, write_frame, AgentEntry, AgentExec, AgentRequest, AgentResponse, ErrorKind, Failure, Request, Response,
    MAX_REQUEST_BYTES, TRANSFER_CHUNK,
};
use crate::recorder::{Record, Recorder};

/// Most output kept per stream of an exec answered over the control socket.
pub const MAX_EXEC_OUTPUT: usize = 16 << 20;
/// How long the agent has to say it is alive.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause before connecting again to an agent that closed a new connection.
const RECONNECT_PAUSE: Duration = Duration::from_millis(20);
/// How long one reply from the agent may take (an exec's own timeout comes on top).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct AgentService {
    /// The VM's vsock host socket, when it has vsock.
    vsock: Option<PathBuf>,
    recorder: Recorder,
}

type AgentClient = Client<std::os::unix::net::UnixStream>;

impl AgentService {
    pub fn new(vsock: Option<PathBuf>, recorder: Recorder) -> AgentService {
        AgentService { vsock, recorder }
    }

    fn connect(&self, extra: Duration) -> Result<AgentClient, Failure> {
        let path = self
            .vsock
            .as_deref()
            .ok_or_else(|| Failure::precondition("this VM has no vsock device: start it with --vsock PATH"))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let stream = connect_vsock_uds(path, AGENT_VSOCK_PORT)
                .map_err(|err| Failure::unavailable(format!("cannot reach the guest agent: {err}")))?;
            stream.set_read_timeout(Some(REPLY_TIMEOUT + extra)).map_err(|err| Failure::internal(err.to_string()))?;
            let mut client = Client::new(stream);
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            match client.wait_ready(left) {
                Ok(_) => return Ok(client),
                // Accepted, then closed before the agent said it was alive: the agent may be
                // starting again (as after a wake). Nothing was asked on that connection, so
                // asking on a new one runs nothing twice.
                Err(ClientError::ReceiveClosed) if Instant::now() + RECONNECT_PAUSE < deadline => {
                    crate::timeline::say(
                        "carrel-vmm: the guest agent closed a new connection before its first heartbeat; connecting again",
                    );
                    std::thread::sleep(RECONNECT_PAUSE);
                }
                Err(err) => return Err(Failure::unavailable(format!("the guest agent did not answer: {err}"))),
            }
        }
    }

    /// Serves one agent request and records it with its parameters and result.
    pub fn serve(
        &self,
        request: &AgentRequest,
        peer: Option<(i32, u32, u32)>,
        connection: &mut dyn Connection,
    ) -> Response {
        let (action, params) = describe(request);
        let result = self.run(request, connection);
        let (error, mut params) = match &result {
            Ok(response) => (None, [params, result_params(response)].concat()),
            Err(failure) => (Some(failure.message.clone()), params),
        };
        params.retain(|(_, value)| !value.is_empty());
        if let Err(err) = self.recorder.record(peer, Record { action, params, error, ..Default::default() }) {
            return Response::error(ErrorKind::Internal, format!("the audit log failed, agent answer withheld: {err}"));
        }
        match result {
            Ok(response) => Response::Agent(response),
            Err(failure) => Response::Error(failure),
        }
    }

    fn run(&self, request: &AgentRequest, connection: &mut dyn Connection) -> Result<AgentResponse, Failure> {
        let error = |err: carrel_agent_client::ClientError| client_failure(&err);
        match request {
            AgentRequest::Ping => {
                let mut client = self.connect(Duration::ZERO)?;
                let rtt = client.ping().map_err(error)?;
                Ok(AgentResponse::Pong { rtt_us: rtt.as_micros() as u64 })
            }
            AgentRequest::Exec(exec) => self.exec(exec),
            AgentRequest::Put { remote, size, mode } => {
                let mut incoming = IncomingFile { connection, left: *size, buffer: Vec::new(), at: 0 };
                let sent = self.connect(Duration::ZERO).and_then(|mut client| {
                    client
                        .put_from(&mut incoming, Path::new("<control connection>"), *size, *mode, remote, |_, _| {})
                        .map_err(error)
                });
                // Whatever happened, the rest of the file's frames are read, so the
                // connection is at a frame boundary for the answer.
                incoming.drain().map_err(|err| {
                    Failure::new(ErrorKind::Aborted, format!("the file's bytes did not arrive: {err}"))
                })?;
                let (bytes, digest) = sent?;
                Ok(AgentResponse::Done { bytes, digest: blake3::Hash::from(digest).to_hex().to_string() })
            }
            AgentRequest::Get { remote } => {
                let mut client = self.connect(Duration::ZERO)?;
                let mut outgoing = OutgoingFile { connection, buffer: Vec::with_capacity(TRANSFER_CHUNK) };
                let outgoing = &mut outgoing;
                let (bytes, digest) = client
                    .get_into(
                        remote,
                        Path::new("<control connection>"),
                        move |info| {
                            let start = Response::Agent(AgentResponse::FileStart { size: info.size, mode: info.mode });
                            write_frame(&mut outgoing.connection, &start).map_err(|err| {
                                carrel_agent_client::ClientError::WriteLocal {
                                    path: "<control connection>".into(),
                                    source: std::io::Error::other(err.to_string()),
                                }
                            })?;
                            Ok(outgoing as &mut dyn Write)
                        },
                        |_, _| {},
                    )
                    .map_err(error)?;
                Ok(AgentResponse::Done { bytes, digest: blake3::Hash::from(digest).to_hex().to_string() })
            }
            AgentRequest::Data(_) => Err(Failure::invalid("a file data frame outside a put")),
            AgentRequest::List { path } => {
                let mut client = self.connect(Duration::ZERO)?;
                let entries = client.list_dir(path).map_err(error)?;
                Ok(AgentResponse::Entries(
                    entries
                        .into_iter()
                        .map(|entry| AgentEntry {
                            name: entry.name,
                            directory: matches!(entry.kind, carrel_agent_proto::message::FileKind::Dir),
                            size: entry.size,
                        })
                        .collect(),
                ))
            }
            AgentRequest::Remove { path, recursive } => {
                let mut client = self.connect(Duration::ZERO)?;
                client.remove(path, *recursive).map_err(error)?;
                Ok(AgentResponse::Done { bytes: 0, digest: String::new() })
            }
        }
    }

    fn exec(&self, exec: &AgentExec) -> Result<AgentResponse, Failure> {
        let timeout = exec.timeout_ms.map(Duration::from_millis);
        let mut client = self.connect(timeout.unwrap_or(Duration::ZERO))?;
        let mut request = ExecRequest::new(exec.argv.clone()).stdin(exec.stdin.clone());
        for (key, value) in &exec.env {
            request = request.env(key.clone(), value.clone());
        }
        if let Some(cwd) = &exec.cwd {
            request = request.cwd(cwd.clone());
        }
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = client
            .exec(request, |stream, bytes| {
                let sink = match stream {
                    OutputStream::Stdout => &mut stdout,
                    OutputStream::Stderr => &mut stderr,
                };
                let room = MAX_EXEC_OUTPUT.saturating_sub(sink.len());
                sink.extend_from_slice(&bytes[..bytes.len().min(room)]);
            })
            .map_err(|err| client_failure(&err))?;
        Ok(AgentResponse::Exit {
            code: status.code,
            signal: status.signal,
            timed_out: status.timed_out,
            stdout,
            stderr,
        })
    }
}

/// An agent client error as an answer of the kind it is: the agent's own refusals by
/// their code, a silent or gone agent as unavailable.
fn client_failure(err: &carrel_agent_client::ClientError) -> Failure {
    use carrel_agent_client::ClientError;
    use carrel_agent_proto::ErrorCode;
    let kind = match err {
        ClientError::Agent { code, .. } => match *code {
            ErrorCode::NOT_FOUND => ErrorKind::NotFound,
            ErrorCode::PERMISSION_DENIED => ErrorKind::PermissionDenied,
            ErrorCode::ALREADY_EXISTS => ErrorKind::AlreadyExists,
            ErrorCode::INVALID_PATH
            | ErrorCode::PATH_ESCAPES_ROOT
            | ErrorCode::NOT_A_DIRECTORY
            | ErrorCode::MALFORMED
            | ErrorCode::TOO_LARGE
            | ErrorCode::UNKNOWN_REQUEST => ErrorKind::InvalidArgument,
            ErrorCode::BUSY => ErrorKind::Unavailable,
            ErrorCode::SPAWN_FAILED => ErrorKind::FailedPrecondition,
            _ => ErrorKind::Internal,
        },
        ClientError::Send(_) | ClientError::Receive(_) | ClientError::ReceiveClosed | ClientError::WaitReady { .. } => {
            ErrorKind::Unavailable
        }
        ClientError::BuildExec { .. } => ErrorKind::InvalidArgument,
        ClientError::ReadLocal { .. } => ErrorKind::Aborted,
        _ => ErrorKind::Internal,
    };
    Failure::new(kind, err.to_string())
}

/// What a control connection is to a transfer: frames in and out.
pub trait Connection: Read + Write {}

impl<T: Read + Write> Connection for T {}

/// A put's bytes as they arrive in `Data` frames; exactly `left` more are expected.
struct IncomingFile<'c> {
    connection: &'c mut dyn Connection,
    left: u64,
    buffer: Vec<u8>,
    at: usize,
}

impl IncomingFile<'_> {
    fn next_frame(&mut self) -> std::io::Result<()> {
        let frame = read_frame::<Request>(&mut self.connection, MAX_REQUEST_BYTES)
            .map_err(|err| std::io::Error::other(err.to_string()))?;
        match frame {
            Some(Request::Agent(AgentRequest::Data(bytes))) if bytes.len() as u64 <= self.left && !bytes.is_empty() => {
                self.left -= bytes.len() as u64;
                self.buffer = bytes;
                self.at = 0;
                Ok(())
            }
            Some(Request::Agent(AgentRequest::Data(_))) => {
                Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "more bytes than the put announced"))
            }
            Some(_) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "another request inside a put")),
            None => Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the client hung up inside a put")),
        }
    }

    /// Reads and drops what is still to come.
    fn drain(&mut self) -> std::io::Result<()> {
        while self.left > 0 {
            self.next_frame()?;
        }
        Ok(())
    }
}

impl Read for IncomingFile<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.buffer.len() {
            if self.left == 0 {
                return Ok(0);
            }
            self.next_frame()?;
        }
        let count = out.len().min(self.buffer.len() - self.at);
        out[..count].copy_from_slice(&self.buffer[self.at..self.at + count]);
        self.at += count;
        Ok(count)
    }
}

/// A get's bytes leaving in `Data` frames of up to [`TRANSFER_CHUNK`].
struct OutgoingFile<'c> {
    connection: &'c mut dyn Connection,
    buffer: Vec<u8>,
}

impl Write for OutgoingFile<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let count = bytes.len().min(TRANSFER_CHUNK - self.buffer.len());
        self.buffer.extend_from_slice(&bytes[..count]);
        if self.buffer.len() == TRANSFER_CHUNK {
            self.flush()?;
        }
        Ok(count)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buffer.is_empty() {
            let frame = Response::Agent(AgentResponse::Data(std::mem::take(&mut self.buffer)));
            write_frame(&mut self.connection, &frame).map_err(|err| std::io::Error::other(err.to_string()))?;
        }
        Ok(())
    }
}

/// The audit action and parameters of a request. Stdin may carry secrets: it is recorded
/// by size only.
fn describe(request: &AgentRequest) -> (&'static str, Vec<(&'static str, String)>) {
    match request {
        AgentRequest::Ping => ("agent.ping", Vec::new()),
        AgentRequest::Exec(exec) => (
            "agent.exec",
            vec![
                ("argv", exec.argv.join(" ")),
                ("cwd", exec.cwd.clone().unwrap_or_default()),
                ("stdin_bytes", exec.stdin.len().to_string()),
            ],
        ),
        AgentRequest::Put { remote, size, .. } => {
            ("agent.put", vec![("remote", remote.clone()), ("size", size.to_string())])
        }
        AgentRequest::Get { remote } => ("agent.get", vec![("remote", remote.clone())]),
        AgentRequest::Data(bytes) => ("agent.data", vec![("bytes", bytes.len().to_string())]),
        AgentRequest::List { path } => ("agent.list", vec![("path", path.clone())]),
        AgentRequest::Remove { path, .. } => ("agent.remove", vec![("path", path.clone())]),
    }
}

fn result_params(response: &AgentResponse) -> Vec<(&'static str, String)> {
    match response {
        AgentResponse::Exit { code, signal, timed_out, stdout, stderr } => vec![
            ("exit_code", code.map(|c| c.to_string()).unwrap_or_default()),
            ("signal", signal.map(|s| s.to_string()).unwrap_or_default()),
            ("timed_out", if *timed_out { "true".into() } else { String::new() }),
            ("stdout_blake3", blake3::hash(stdout).to_hex().to_string()),
            ("stderr_bytes", stderr.len().to_string()),
        ],
        AgentResponse::Done { bytes, digest } => vec![("bytes", bytes.to_string()), ("blake3", digest.clone())],
        AgentResponse::Pong { rtt_us } => vec![("rtt_us", rtt_us.to_string())],
        AgentResponse::Entries(entries) => vec![("entries", entries.len().to_string())],
        AgentResponse::FileStart { size, .. } => vec![("size", size.to_string())],
        AgentResponse::Data(bytes) => vec![("bytes", bytes.len().to_string())],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carrel_agent_proto::{io::write_frame, Heartbeat, Message};
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// A hybrid-vsock socket whose first connection is accepted and then closed before
    /// any heartbeat, and whose second gets one: the service connects again and is ready.
    #[test]
    fn a_connection_closed_before_the_first_heartbeat_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let listener = UnixListener::bind(&path).unwrap();
        let guest = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for (port, heartbeat) in [(1u32, false), (2, true)] {
                let (mut stream, _) = listener.accept().unwrap();
                let mut line = String::new();
                std::io::BufReader::new(&stream).read_line(&mut line).unwrap();
                lines.push(line);
                stream.write_all(format!("OK {port}\n").as_bytes()).unwrap();
                if heartbeat {
                    write_frame(&mut stream, 0, &Message::Heartbeat(Heartbeat { seq: 0, uptime_ms: 5 })).unwrap();
                    // Held open until the client has read it.
                    let _ = stream.read(&mut [0u8; 1]);
                }
            }
            lines
        });
        let service = AgentService::new(Some(path), Recorder::new(None));
        let client = service.connect(Duration::ZERO).unwrap();
        assert_eq!(client.last_heartbeat().map(|heartbeat| heartbeat.uptime_ms), Some(5));
        drop(client);
        assert_eq!(guest.join().unwrap(), ["CONNECT 1024\n", "CONNECT 1024\n"]);
    }
}

//! Host side of the Carrel guest agent protocol: a blocking client over any byte stream.
//!
//! [`Client`] speaks `carrel-agent-proto` over a `Read + Write` stream: a Unix socket to a
//! Linux agent running on the host (tests), or the VMM's hybrid-vsock Unix socket after the
//! `CONNECT <port>` handshake ([`connect_vsock_uds`]). Calls are sequential (`&mut self`):
//! each sends a request and reads until that request is answered, recording heartbeats and
//! dropping stale frames of requests that are over (late credit, output of an abandoned
//! exec). [`Client::exec_many`] runs several commands at once on one connection, and
//! [`Client::start_exec`] / [`Client::send_kill`] / [`Client::next_message`] give the
//! request-id level for anything else.

mod connect;

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use carrel_agent_proto::io::{read_full, write_frame, write_raw_frame, FrameIoError, FrameReader};
use carrel_agent_proto::{
    kind, Credit, DirEntry, End, ErrorCode, Exec, ExecExit, FileInfo, FileStat, FlowError, GetFile, Heartbeat, Hello,
    Kill, Message, MessageError, PathRequest, Ping, PutFile, RecvCredit, Remove, SendCredit, DEFAULT_WINDOW, MAX_CHUNK,
    MAX_STDIN, PROTOCOL_VERSION,
};

pub use carrel_agent_proto as proto;
pub use connect::{connect_unix, connect_unix_ready, connect_vsock_uds, ConnectError};

/// Errors of client calls.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("sending to the agent failed")]
    Send(#[source] FrameIoError),
    #[error("receiving from the agent failed")]
    Receive(#[source] FrameIoError),
    #[error("the agent closed the connection")]
    ReceiveClosed,
    #[error("a kind {kind} frame from the agent (request {id}) does not decode")]
    Decode {
        id: u32,
        kind: u16,
        #[source]
        source: MessageError,
    },
    /// The agent speaks another protocol version.
    #[error("protocol version mismatch: {message}")]
    CheckVersion { message: String },
    /// The agent answered the request with an error.
    #[error("agent: {} ({}): {message}", code.name(), code.0)]
    Agent { code: ErrorCode, message: String },
    #[error("agent sent kind {kind} for request {id}, which does not fit the request")]
    Unexpected { id: u32, kind: u16 },
    #[error("agent broke flow control")]
    Flow(#[from] FlowError),
    #[error("invalid exec request: {reason}")]
    BuildExec { reason: String },
    #[error("opening local file {path:?} failed")]
    OpenLocal {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading local file {path:?} failed")]
    ReadLocal {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing local file {path:?} failed")]
    WriteLocal {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The data received does not hash to the digest the agent sent; the local file was removed.
    #[error("get {remote:?}: blake3 digest of the received data does not match the agent's; {local:?} was removed")]
    CheckDigest { remote: String, local: PathBuf },
    #[error("get {remote:?}: agent announced {expected} bytes but sent {actual}; the local file was removed")]
    CheckSize { remote: String, expected: u64, actual: u64 },
    /// No heartbeat arrived in time: the agent is not up (or not reachable).
    #[error("no heartbeat from the agent within {timeout:?}; is the agent running and the vsock device attached?")]
    WaitReady { timeout: Duration },
    #[error("setting the read timeout failed")]
    SetTimeout(#[source] io::Error),
}

impl ClientError {
    /// The agent's error code, when the agent refused the request.
    pub fn agent_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Agent { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Streams whose reads can time out, for [`Client::wait_ready`].
pub trait ReadTimeout {
    /// Sets or clears the read timeout.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl ReadTimeout for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

/// Which output pipe a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A command to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub clear_env: bool,
    pub cwd: Option<String>,
    /// Written to stdin, which is then closed (at most 512 KiB; put a file for more).
    pub stdin: Vec<u8>,
    pub timeout: Option<Duration>,
}

impl ExecRequest {
    /// Runs `argv[0]` (looked up in PATH) with the rest as arguments.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(argv: I) -> ExecRequest {
        ExecRequest { argv: argv.into_iter().map(Into::into).collect(), ..ExecRequest::default() }
    }

    /// Runs `sh -c script`.
    pub fn shell(script: impl Into<String>) -> ExecRequest {
        ExecRequest::new(["sh".to_string(), "-c".to_string(), script.into()])
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> ExecRequest {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> ExecRequest {
        self.cwd = Some(cwd.into());
        self
    }

    /// Sets the stdin bytes.
    pub fn stdin(mut self, stdin: impl Into<Vec<u8>>) -> ExecRequest {
        self.stdin = stdin.into();
        self
    }

    /// Kills the command's process group after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> ExecRequest {
        self.timeout = Some(timeout);
        self
    }

    fn into_message(self) -> Result<Message, ClientError> {
        if self.argv.is_empty() {
            return Err(ClientError::BuildExec { reason: "argv is empty".into() });
        }
        if self.stdin.len() > MAX_STDIN {
            let reason = format!("stdin is {} bytes, more than {MAX_STDIN}; put a file instead", self.stdin.len());
            return Err(ClientError::BuildExec { reason });
        }
        Ok(Message::Exec(Exec {
            argv: self.argv,
            env: self.env,
            clear_env: self.clear_env,
            cwd: self.cwd,
            stdin: self.stdin,
            timeout_ms: self.timeout.map(|timeout| timeout.as_millis().min(u128::from(u64::MAX)) as u64),
        }))
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The agent killed it at its timeout.
    pub timed_out: bool,
}

impl ExitStatus {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl From<ExecExit> for ExitStatus {
    fn from(exit: ExecExit) -> Self {
        ExitStatus { code: exit.code, signal: exit.signal, timed_out: exit.timed_out }
    }
}

/// A connection to a guest agent.
#[derive(Debug)]
pub struct Client<S: Read + Write> {
    io: FrameReader<S>,
    next_id: u32,
    last_heartbeat: Option<Heartbeat>,
}

impl<S: Read + Write> Client<S> {
    /// Wraps a connected stream. Nothing is sent until the first call.
    pub fn new(stream: S) -> Client<S> {
        Client { io: FrameReader::new(stream), next_id: 1, last_heartbeat: None }
    }

    /// The underlying stream.
    pub fn stream(&self) -> &S {
        self.io.get_ref()
    }

    /// The most recent heartbeat seen so far.
    pub fn last_heartbeat(&self) -> Option<Heartbeat> {
        self.last_heartbeat
    }

    fn allocate_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        id
    }

    /// Sends `message` as a new request and returns its id.
    pub fn send(&mut self, message: &Message) -> Result<u32, ClientError> {
        let id = self.allocate_id();
        self.send_to(id, message)?;
        Ok(id)
    }

    /// Sends `message` for an existing request id (data, credit, end).
    pub fn send_to(&mut self, id: u32, message: &Message) -> Result<(), ClientError> {
        write_frame(self.io.get_mut(), id, message).map_err(ClientError::Send)
    }

    /// The next message from the agent, heartbeats included (and recorded).
    fn next_any(&mut self) -> Result<(u32, Message), ClientError> {
        let frame = self.io.read_frame().map_err(ClientError::Receive)?.ok_or(ClientError::ReceiveClosed)?;
        let (id, frame_kind) = (frame.id, frame.kind);
        let message = frame.into_message().map_err(|source| ClientError::Decode { id, kind: frame_kind, source })?;
        if let Message::Heartbeat(heartbeat) = message {
            self.last_heartbeat = Some(heartbeat);
        }
        Ok((id, message))
    }

    /// The next message from the agent, heartbeats excepted (they are recorded).
    pub fn next_message(&mut self) -> Result<(u32, Message), ClientError> {
        loop {
            match self.next_any()? {
                (_, Message::Heartbeat(_)) => {}
                other => return Ok(other),
            }
        }
    }

    /// The next message for request `id`; an `Error` becomes [`ClientError::Agent`]. Frames
    /// of other requests are stale here and dropped.
    fn reply_to(&mut self, id: u32) -> Result<Message, ClientError> {
        loop {
            let (from, message) = self.next_message()?;
            if from == id {
                return match message {
                    Message::Error(error) => Err(ClientError::Agent { code: error.code, message: error.message }),
                    message => Ok(message),
                };
            }
            if from == 0 {
                if let Message::Error(error) = message {
                    return Err(ClientError::Agent { code: error.code, message: error.message });
                }
            }
        }
    }

    /// Exchanges `Hello`: checks the protocol version and returns the agent's name and OS.
    pub fn hello(&mut self) -> Result<Hello, ClientError> {
        let ours = Hello {
            protocol_version: PROTOCOL_VERSION,
            name: format!("carrel-agent-client {}", env!("CARGO_PKG_VERSION")),
            os: "host".into(),
        };
        let id = self.send(&Message::Hello(ours))?;
        match self.reply_to(id) {
            Ok(Message::Hello(theirs)) if theirs.protocol_version == PROTOCOL_VERSION => Ok(theirs),
            Ok(Message::Hello(theirs)) => Err(ClientError::CheckVersion {
                message: format!(
                    "agent {} speaks v{}, this client speaks v{PROTOCOL_VERSION}",
                    theirs.name, theirs.protocol_version
                ),
            }),
            Ok(other) => Err(ClientError::Unexpected { id, kind: other.kind() }),
            Err(ClientError::Agent { code: ErrorCode::VERSION_MISMATCH, message }) => {
                Err(ClientError::CheckVersion { message })
            }
            Err(error) => Err(error),
        }
    }

    /// One ping round trip.
    pub fn ping(&mut self) -> Result<Duration, ClientError> {
        let nonce = u64::from(self.next_id) ^ 0x5EED_0000_0000;
        let start = Instant::now();
        let id = self.send(&Message::Ping(Ping { nonce }))?;
        match self.reply_to(id)? {
            Message::Pong(pong) if pong.nonce == nonce => Ok(start.elapsed()),
            other => Err(ClientError::Unexpected { id, kind: other.kind() }),
        }
    }

    /// Starts a command and returns its request id; read its output with
    /// [`Client::next_message`] (`Stdout`, `Stderr`, then `ExecExit` or `Error`).
    pub fn start_exec(&mut self, request: ExecRequest) -> Result<u32, ClientError> {
        let message = request.into_message()?;
        self.send(&message)
    }

    /// Asks the agent to kill exec (or abort transfer) `target`; returns the kill's own id,
    /// which is answered with `Done` or an `Error`.
    pub fn send_kill(&mut self, target: u32) -> Result<u32, ClientError> {
        self.send(&Message::Kill(Kill { target }))
    }

    /// Runs a command, passing its output to `on_output` as it arrives.
    pub fn exec(
        &mut self,
        request: ExecRequest,
        mut on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<ExitStatus, ClientError> {
        let mut statuses = self.exec_many(vec![request], |_, stream, bytes| on_output(stream, bytes))?;
        statuses.pop().ok_or(ClientError::ReceiveClosed)
    }

    /// Runs several commands at once on this connection; `on_output` gets the index of the
    /// command each chunk belongs to. Returns when all have ended, their statuses in order.
    /// If the agent refuses one, the others are killed and the refusal returned.
    pub fn exec_many(
        &mut self,
        requests: Vec<ExecRequest>,
        mut on_output: impl FnMut(usize, OutputStream, &[u8]),
    ) -> Result<Vec<ExitStatus>, ClientError> {
        let messages: Vec<Message> =
            requests.into_iter().map(ExecRequest::into_message).collect::<Result<_, ClientError>>()?;
        let mut ids = Vec::with_capacity(messages.len());
        for message in &messages {
            ids.push(self.send(message)?);
        }
        let mut statuses: Vec<Option<ExitStatus>> = vec![None; ids.len()];
        let mut failure = None;
        while statuses.iter().any(Option::is_none) {
            let (id, message) = self.next_message()?;
            let Some(index) = ids.iter().position(|&candidate| candidate == id) else { continue };
            match message {
                Message::Stdout(bytes) => on_output(index, OutputStream::Stdout, &bytes),
                Message::Stderr(bytes) => on_output(index, OutputStream::Stderr, &bytes),
                Message::ExecExit(exit) => statuses[index] = Some(exit.into()),
                Message::Error(error) => {
                    statuses[index] = Some(ExitStatus { code: None, signal: None, timed_out: false });
                    if failure.is_none() {
                        failure = Some(ClientError::Agent { code: error.code, message: error.message });
                        for (other, status) in ids.iter().zip(&statuses) {
                            if status.is_none() {
                                self.send_kill(*other)?;
                            }
                        }
                    }
                }
                other => return Err(ClientError::Unexpected { id, kind: other.kind() }),
            }
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(statuses.into_iter().flatten().collect()),
        }
    }

    /// Copies local file `local` to `remote` in the guest; `on_progress(sent, total)` after
    /// each chunk. The agent checks the blake3 digest before the file appears.
    pub fn put_file(
        &mut self,
        local: &Path,
        remote: &str,
        on_progress: impl FnMut(u64, u64),
    ) -> Result<u64, ClientError> {
        let open_error = |source| ClientError::OpenLocal { path: local.to_path_buf(), source };
        let mut file = File::open(local).map_err(open_error)?;
        let metadata = file.metadata().map_err(open_error)?;
        let (size, mode) = (metadata.len(), metadata.permissions().mode() & 0o7777);
        self.put_from(&mut file, local, size, mode, remote, on_progress).map(|(sent, _)| sent)
    }

    /// Copies `size` bytes from `reader` (named `source` in errors) to `remote` with
    /// `mode`; returns the bytes sent and their blake3 digest, which the agent checked.
    pub fn put_from(
        &mut self,
        reader: &mut dyn Read,
        source: &Path,
        size: u64,
        mode: u32,
        remote: &str,
        mut on_progress: impl FnMut(u64, u64),
    ) -> Result<(u64, [u8; 32]), ClientError> {
        let id = self.send(&Message::PutFile(PutFile { path: remote.to_string(), size, mode }))?;
        let mut credit = SendCredit::new();
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; MAX_CHUNK];
        let mut sent = 0u64;
        loop {
            let read = read_full(reader, &mut buf)
                .map_err(|source_error| ClientError::ReadLocal { path: source.to_path_buf(), source: source_error })?;
            if read == 0 && sent > 0 {
                break;
            }
            // Even an empty file waits for the first credit: it says the path was accepted.
            while !credit.try_take() {
                match self.reply_to(id)? {
                    Message::Credit(Credit { chunks }) => credit.grant(chunks)?,
                    other => return Err(ClientError::Unexpected { id, kind: other.kind() }),
                }
            }
            if read == 0 {
                break;
            }
            write_raw_frame(self.io.get_mut(), id, kind::DATA, &buf[..read]).map_err(ClientError::Send)?;
            hasher.update(&buf[..read]);
            sent += read as u64;
            on_progress(sent, size);
        }
        let digest = *hasher.finalize().as_bytes();
        self.send_to(id, &Message::End(End { size: sent, digest }))?;
        loop {
            match self.reply_to(id)? {
                Message::Done => return Ok((sent, digest)),
                Message::Credit(_) => {}
                other => return Err(ClientError::Unexpected { id, kind: other.kind() }),
            }
        }
    }

    /// Copies `remote` from the guest to local file `local`, checking size and blake3
    /// digest; a failed copy removes `local`. `on_progress(received, total)` after each chunk.
    pub fn get_file(
        &mut self,
        remote: &str,
        local: &Path,
        on_progress: impl FnMut(u64, u64),
    ) -> Result<u64, ClientError> {
        let mut file = None;
        let result = self.get_into(
            remote,
            local,
            |info| {
                let opened = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(info.mode)
                    .open(local)
                    .map_err(|source| ClientError::OpenLocal { path: local.to_path_buf(), source })?;
                Ok(file.insert(opened) as &mut dyn Write)
            },
            on_progress,
        );
        if result.is_err() && file.is_some() {
            let _ = std::fs::remove_file(local);
        }
        result.map(|(received, _)| received)
    }

    /// Copies `remote` from the guest into the writer `open` returns once the agent has
    /// said the file's size and mode (`target` names it in errors); checks size and
    /// blake3 digest and returns both.
    pub fn get_into<'w>(
        &mut self,
        remote: &str,
        target: &Path,
        open: impl FnOnce(&FileInfo) -> Result<&'w mut dyn Write, ClientError>,
        mut on_progress: impl FnMut(u64, u64),
    ) -> Result<(u64, [u8; 32]), ClientError> {
        let (mut credit, window) = RecvCredit::new(DEFAULT_WINDOW);
        let id = self.send(&Message::GetFile(GetFile { path: remote.to_string(), window }))?;
        let info = match self.reply_to(id)? {
            Message::FileInfo(info) => info,
            other => return Err(ClientError::Unexpected { id, kind: other.kind() }),
        };
        let writer = open(&info)?;
        let mut hasher = blake3::Hasher::new();
        let mut received = 0u64;
        loop {
            match self.reply_to(id)? {
                Message::Data(bytes) => {
                    credit.on_receive()?;
                    writer
                        .write_all(&bytes)
                        .map_err(|source| ClientError::WriteLocal { path: target.to_path_buf(), source })?;
                    hasher.update(&bytes);
                    received += bytes.len() as u64;
                    if let Some(chunks) = credit.on_consume() {
                        self.send_to(id, &Message::Credit(Credit { chunks }))?;
                    }
                    on_progress(received, info.size);
                }
                Message::End(end) => {
                    if end.size != received {
                        return Err(ClientError::CheckSize {
                            remote: remote.into(),
                            expected: end.size,
                            actual: received,
                        });
                    }
                    let digest = *hasher.finalize().as_bytes();
                    if digest != end.digest {
                        return Err(ClientError::CheckDigest { remote: remote.into(), local: target.to_path_buf() });
                    }
                    writer.flush().map_err(|source| ClientError::WriteLocal { path: target.to_path_buf(), source })?;
                    return Ok((received, digest));
                }
                other => return Err(ClientError::Unexpected { id, kind: other.kind() }),
            }
        }
    }

    /// Metadata of a guest path (a final symlink is not followed).
    pub fn stat(&mut self, path: &str) -> Result<FileStat, ClientError> {
        let id = self.send(&Message::Stat(PathRequest { path: path.to_string() }))?;
        match self.reply_to(id)? {
            Message::StatReply(stat) => Ok(stat),
            other => Err(ClientError::Unexpected { id, kind: other.kind() }),
        }
    }

    /// The entries of a guest directory, sorted by name.
    pub fn list_dir(&mut self, path: &str) -> Result<Vec<DirEntry>, ClientError> {
        let id = self.send(&Message::ListDir(PathRequest { path: path.to_string() }))?;
        let mut entries = Vec::new();
        loop {
            match self.reply_to(id)? {
                Message::DirEntries(part) => {
                    entries.extend(part.entries);
                    if part.done {
                        return Ok(entries);
                    }
                }
                other => return Err(ClientError::Unexpected { id, kind: other.kind() }),
            }
        }
    }

    /// Removes a guest file, symlink or directory (`recursive` for a non-empty one).
    pub fn remove(&mut self, path: &str, recursive: bool) -> Result<(), ClientError> {
        let id = self.send(&Message::Remove(Remove { path: path.to_string(), recursive }))?;
        match self.reply_to(id)? {
            Message::Done => Ok(()),
            other => Err(ClientError::Unexpected { id, kind: other.kind() }),
        }
    }
}

impl<S: Read + Write + ReadTimeout> Client<S> {
    /// Waits for the agent's first heartbeat (returns at once if one was already seen).
    /// Waits up to `timeout` for a heartbeat newer than any seen so far (a watchdog's
    /// question: is the agent still alive?).
    pub fn next_heartbeat(&mut self, timeout: Duration) -> Result<Heartbeat, ClientError> {
        self.last_heartbeat = None;
        self.wait_ready(timeout)
    }

    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Heartbeat, ClientError> {
        if let Some(heartbeat) = self.last_heartbeat {
            return Ok(heartbeat);
        }
        let deadline = Instant::now() + timeout;
        let result = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break Err(ClientError::WaitReady { timeout });
            }
            self.io.get_ref().set_read_timeout(Some(remaining)).map_err(ClientError::SetTimeout)?;
            match self.next_any() {
                // Anything else before the first heartbeat belongs to no request of ours.
                Ok(_) => {}
                Err(ClientError::Receive(FrameIoError::Read { source }))
                    if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
                {
                    break Err(ClientError::WaitReady { timeout });
                }
                Err(error) => break Err(error),
            }
            if let Some(heartbeat) = self.last_heartbeat {
                break Ok(heartbeat);
            }
        };
        self.io.get_ref().set_read_timeout(None).map_err(ClientError::SetTimeout)?;
        result
    }
}

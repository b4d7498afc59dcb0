//! One host connection: the reader loop that dispatches requests, the shared frame writer,
//! the heartbeat, and the per-connection state of execs and transfers.
//!
//! The reader thread handles short requests inline (hello, ping, stat, list, remove, put
//! data, which it writes to disk as it arrives). Execs and gets run on their own threads and
//! share the writer, a mutex around the stream: each frame is written whole with a blocking
//! write, which is where back-pressure comes from. Bad input (oversized frames, unknown
//! kinds, bodies that do not decode, requests out of order) is answered with an `Error` for
//! that request id and the connection goes on; only a broken stream ends it. When it ends,
//! the connection's commands are killed and unfinished transfers dropped.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use carrel_agent_proto::io::{read_full, write_frame, write_raw_frame, FrameIoError, FrameReader};
use carrel_agent_proto::{
    kind, Credit, DirEntries, End, ErrorCode, FileInfo, FrameError, GetFile, Heartbeat, Hello, Message, PutFile,
    RecvCredit, SendCredit, DEFAULT_WINDOW, MAX_CHUNK, PROTOCOL_VERSION,
};

use crate::exec::{self, ExecTable};
use crate::files::{FileError, Put, DIR_ENTRIES_PER_FRAME};
use crate::AgentContext;

/// Execs one connection may run at once.
pub const MAX_EXECS: usize = 64;
/// Transfers (puts plus gets) one connection may run at once.
pub const MAX_TRANSFERS: usize = 16;

/// Errors of the connection itself (request failures go back to the host instead).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Writing to the host failed; the connection is over.
    #[error("sending to the host failed")]
    Send(#[source] FrameIoError),
    /// A thread for the connection could not be started.
    #[error("starting a connection thread failed")]
    SpawnThread(#[source] io::Error),
}

/// The sending half of a connection, shared by every thread that answers the host.
pub struct Writer {
    stream: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Writer {
    /// Wraps the sending half of a stream.
    pub fn new(stream: Box<dyn Write + Send>) -> Writer {
        Writer { stream: Mutex::new(stream) }
    }

    fn lock(&self) -> MutexGuard<'_, Box<dyn Write + Send>> {
        self.stream.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends one message for request `id`.
    pub fn send(&self, id: u32, message: &Message) -> Result<(), SessionError> {
        write_frame(&mut **self.lock(), id, message).map_err(SessionError::Send)
    }

    /// Sends one raw-body frame (`Data`, `Stdout`, `Stderr`).
    pub fn send_raw(&self, id: u32, kind: u16, payload: &[u8]) -> Result<(), SessionError> {
        write_raw_frame(&mut **self.lock(), id, kind, payload).map_err(SessionError::Send)
    }

    fn send_error(&self, id: u32, code: ErrorCode, error: &dyn std::error::Error) -> Result<(), SessionError> {
        self.send(id, &Message::error(code, describe(error)))
    }
}

/// An error and its sources on one line, for the host.
pub fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Shared state of a get: the credit the host has granted, and whether it was cancelled.
#[derive(Debug, Default)]
struct GetControl {
    state: Mutex<(SendCredit, bool)>,
    changed: Condvar,
}

impl GetControl {
    fn lock(&self) -> MutexGuard<'_, (SendCredit, bool)> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn cancel(&self) {
        self.lock().1 = true;
        self.changed.notify_all();
    }

    /// Waits for one chunk of credit; false when cancelled.
    fn take_credit(&self) -> bool {
        let mut state = self.lock();
        loop {
            if state.1 {
                return false;
            }
            if state.0.try_take() {
                return true;
            }
            state = self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

type GetTable = Arc<Mutex<HashMap<u32, Arc<GetControl>>>>;

/// Whether the connection is still open, for the heartbeat thread.
#[derive(Debug, Default)]
struct Liveness {
    closed: Mutex<bool>,
    changed: Condvar,
}

/// Serves one connection until the host closes it or the stream breaks.
pub fn serve(ctx: &Arc<AgentContext>, reader: Box<dyn Read + Send>, writer: Box<dyn Write + Send>) {
    let writer = Arc::new(Writer::new(writer));
    let liveness = Arc::new(Liveness::default());
    let heartbeat = {
        let (ctx, writer, liveness) = (Arc::clone(ctx), Arc::clone(&writer), Arc::clone(&liveness));
        std::thread::Builder::new().name("heartbeat".into()).spawn(move || send_heartbeats(&ctx, &writer, &liveness))
    };
    let mut session =
        Session { ctx: Arc::clone(ctx), writer, execs: Arc::default(), gets: Arc::default(), puts: HashMap::new() };
    if heartbeat.is_ok() {
        session.run(FrameReader::new(reader));
    }
    session.close();
    *liveness.closed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = true;
    liveness.changed.notify_all();
    if let Ok(heartbeat) = heartbeat {
        let _ = heartbeat.join();
    }
}

fn send_heartbeats(ctx: &AgentContext, writer: &Writer, liveness: &Liveness) {
    let mut seq = 0;
    let mut closed = liveness.closed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    while !*closed {
        drop(closed);
        if writer.send(0, &Message::Heartbeat(Heartbeat { seq, uptime_ms: uptime_ms() })).is_err() {
            return;
        }
        seq += 1;
        closed = liveness.closed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !*closed {
            closed = liveness
                .changed
                .wait_timeout(closed, ctx.heartbeat_interval)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

/// Time since boot (CLOCK_BOOTTIME): the guest's uptime, suspend included.
fn uptime_ms() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: now is a valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    (now.tv_sec as u64).saturating_mul(1000) + now.tv_nsec as u64 / 1_000_000
}

struct Session {
    ctx: Arc<AgentContext>,
    writer: Arc<Writer>,
    execs: ExecTable,
    gets: GetTable,
    /// Puts in progress, with the credit owed to the host. Only the reader thread uses them.
    puts: HashMap<u32, (Put, RecvCredit)>,
}

impl Session {
    fn run(&mut self, mut reader: FrameReader<Box<dyn Read + Send>>) {
        loop {
            let result = match reader.read_frame() {
                Ok(Some(frame)) => {
                    let id = frame.id;
                    match frame.into_message() {
                        Ok(message) => self.handle(id, message),
                        Err(error) => {
                            self.abort_put(id);
                            self.writer.send_error(id, error.code(), &error)
                        }
                    }
                }
                Ok(None) => return,
                Err(FrameIoError::Frame(error)) => {
                    let (id, code) = match error {
                        FrameError::AcceptSize { id, .. } => (id, ErrorCode::TOO_LARGE),
                        _ => (0, ErrorCode::MALFORMED),
                    };
                    self.abort_put(id);
                    self.writer.send_error(id, code, &error)
                }
                Err(_) => return,
            };
            if result.is_err() {
                return;
            }
        }
    }

    fn close(&mut self) {
        let execs = std::mem::take(&mut *self.execs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        for pid in execs.values() {
            self.ctx.children.kill_group(*pid);
        }
        for get in self.gets.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).values() {
            get.cancel();
        }
        // Dropping the puts deletes their temporary files.
        self.puts.clear();
    }

    fn abort_put(&mut self, id: u32) {
        self.puts.remove(&id);
    }

    fn in_use(&self, id: u32) -> bool {
        self.puts.contains_key(&id)
            || self.execs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).contains_key(&id)
            || self.gets.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).contains_key(&id)
    }

    fn handle(&mut self, id: u32, message: Message) -> Result<(), SessionError> {
        let starts_request = matches!(message, Message::Exec(_) | Message::PutFile(_) | Message::GetFile(_));
        if starts_request && (id == 0 || self.in_use(id)) {
            let text = format!("request id {id} is 0 or already in use by a running request on this connection");
            return self.writer.send(id, &Message::error(ErrorCode::DUPLICATE_ID, text));
        }
        match message {
            Message::Hello(hello) => self.hello(id, &hello),
            Message::Ping(ping) => self.writer.send(id, &Message::Pong(ping)),
            Message::Exec(request) => {
                if self.execs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len() >= MAX_EXECS {
                    let text = format!("{MAX_EXECS} execs already running on this connection; wait for one to end");
                    return self.writer.send(id, &Message::error(ErrorCode::BUSY, text));
                }
                match exec::start(id, request, &self.ctx.children, &self.writer, &self.execs) {
                    Ok(()) => Ok(()),
                    Err(error) => self.writer.send_error(id, error.code(), &error),
                }
            }
            Message::Kill(kill) => self.kill(id, kill.target),
            Message::PutFile(put) => self.start_put(id, &put),
            Message::Data(data) => self.put_data(id, &data),
            Message::End(end) => self.finish_put(id, &end),
            Message::GetFile(get) => self.start_get(id, &get),
            Message::Credit(credit) => {
                // Credit for a get that already ended is expected (it crossed the end).
                if let Some(get) = self.gets.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&id) {
                    let granted = get.lock().0.grant(credit.chunks);
                    if let Err(error) = granted {
                        get.cancel();
                        return self.writer.send_error(id, ErrorCode::FLOW_CONTROL, &error);
                    }
                    get.changed.notify_all();
                }
                Ok(())
            }
            Message::Stat(request) => match self.ctx.root.stat(&request.path) {
                Ok(stat) => self.writer.send(id, &Message::StatReply(stat)),
                Err(error) => self.writer.send_error(id, error.code(), &error),
            },
            Message::ListDir(request) => match self.ctx.root.list_dir(&request.path) {
                Ok(entries) => {
                    let mut parts = entries.chunks(DIR_ENTRIES_PER_FRAME).peekable();
                    if parts.peek().is_none() {
                        return self.writer.send(id, &Message::DirEntries(DirEntries { entries: vec![], done: true }));
                    }
                    while let Some(part) = parts.next() {
                        let done = parts.peek().is_none();
                        self.writer.send(id, &Message::DirEntries(DirEntries { entries: part.to_vec(), done }))?;
                    }
                    Ok(())
                }
                Err(error) => self.writer.send_error(id, error.code(), &error),
            },
            Message::Remove(request) => match self.ctx.root.remove(&request.path, request.recursive) {
                Ok(()) => self.writer.send(id, &Message::Done),
                Err(error) => self.writer.send_error(id, error.code(), &error),
            },
            other => {
                let text = format!("message kind {} is not a request the agent accepts", other.kind());
                self.writer.send(id, &Message::error(ErrorCode::UNEXPECTED, text))
            }
        }
    }

    fn hello(&self, id: u32, hello: &Hello) -> Result<(), SessionError> {
        if hello.protocol_version != PROTOCOL_VERSION {
            let text = format!(
                "host speaks agent protocol v{}, this agent ({}) speaks v{PROTOCOL_VERSION}; use a matching carrel-agent-client or agent",
                hello.protocol_version, self.ctx.name
            );
            return self.writer.send(id, &Message::error(ErrorCode::VERSION_MISMATCH, text));
        }
        let reply = Hello { protocol_version: PROTOCOL_VERSION, name: self.ctx.name.clone(), os: self.ctx.os.clone() };
        self.writer.send(id, &Message::Hello(reply))
    }

    fn kill(&mut self, id: u32, target: u32) -> Result<(), SessionError> {
        let pid = self.execs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&target).copied();
        if let Some(pid) = pid {
            // The exec reports its own end (signal 9) with ExecExit.
            self.ctx.children.kill_group(pid);
            return self.writer.send(id, &Message::Done);
        }
        if let Some(get) = self.gets.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&target) {
            get.cancel();
            return self.writer.send(id, &Message::Done);
        }
        if self.puts.remove(&target).is_some() {
            self.writer.send(target, &Message::error(ErrorCode::CANCELLED, "put cancelled by the host"))?;
            return self.writer.send(id, &Message::Done);
        }
        let text = format!("no running exec or transfer has request id {target}");
        self.writer.send(id, &Message::error(ErrorCode::UNKNOWN_REQUEST, text))
    }

    fn transfers(&self) -> usize {
        self.puts.len() + self.gets.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }

    fn start_put(&mut self, id: u32, request: &PutFile) -> Result<(), SessionError> {
        if self.transfers() >= MAX_TRANSFERS {
            let text = format!("{MAX_TRANSFERS} transfers already running on this connection");
            return self.writer.send(id, &Message::error(ErrorCode::BUSY, text));
        }
        match self.ctx.root.start_put(&request.path, request.size, request.mode, id) {
            Ok(put) => {
                let (credit, first) = RecvCredit::new(DEFAULT_WINDOW);
                self.puts.insert(id, (put, credit));
                self.writer.send(id, &Message::Credit(Credit { chunks: first }))
            }
            Err(error) => self.writer.send_error(id, error.code(), &error),
        }
    }

    fn put_data(&mut self, id: u32, data: &[u8]) -> Result<(), SessionError> {
        // Data for a put that already failed or was cancelled is dropped: the host learns
        // of the failure from the error sent when it happened.
        let Some((put, credit)) = self.puts.get_mut(&id) else { return Ok(()) };
        if let Err(error) = credit.on_receive() {
            self.puts.remove(&id);
            return self.writer.send_error(id, ErrorCode::FLOW_CONTROL, &error);
        }
        if let Err(error) = put.write(data) {
            self.puts.remove(&id);
            return self.writer.send_error(id, error.code(), &error);
        }
        match credit.on_consume() {
            Some(chunks) => self.writer.send(id, &Message::Credit(Credit { chunks })),
            None => Ok(()),
        }
    }

    fn finish_put(&mut self, id: u32, end: &End) -> Result<(), SessionError> {
        let Some((put, _)) = self.puts.remove(&id) else {
            let text = format!("End for request {id}, which is not a running put");
            return self.writer.send(id, &Message::error(ErrorCode::UNKNOWN_REQUEST, text));
        };
        match put.finish(end) {
            Ok(_) => self.writer.send(id, &Message::Done),
            Err(error) => self.writer.send_error(id, error.code(), &error),
        }
    }

    fn start_get(&mut self, id: u32, request: &GetFile) -> Result<(), SessionError> {
        if self.transfers() >= MAX_TRANSFERS {
            let text = format!("{MAX_TRANSFERS} transfers already running on this connection");
            return self.writer.send(id, &Message::error(ErrorCode::BUSY, text));
        }
        let control = Arc::new(GetControl::default());
        if let Err(error) = control.lock().0.grant(request.window) {
            return self.writer.send_error(id, ErrorCode::FLOW_CONTROL, &error);
        }
        let (file, size, mode) = match self.ctx.root.open_for_get(&request.path) {
            Ok(opened) => opened,
            Err(error) => return self.writer.send_error(id, error.code(), &error),
        };
        self.writer.send(id, &Message::FileInfo(FileInfo { size, mode }))?;
        self.gets.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(id, Arc::clone(&control));
        let (writer, gets, path) = (Arc::clone(&self.writer), Arc::clone(&self.gets), request.path.clone());
        let sender = std::thread::Builder::new().name(format!("get-{id}")).spawn(move || {
            send_file(id, &path, file, &control, &writer);
            gets.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&id);
        });
        if let Err(error) = sender {
            self.gets.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&id);
            return self.writer.send_error(id, ErrorCode::IO, &SessionError::SpawnThread(error));
        }
        Ok(())
    }
}

/// Streams a file as `Data` chunks within the host's credit, then `End` with its digest.
fn send_file(id: u32, path: &str, mut file: File, control: &GetControl, writer: &Writer) {
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    loop {
        let read = match read_full(&mut file, &mut buf) {
            Ok(read) => read,
            Err(source) => {
                let error = FileError::Read { path: path.to_string(), source };
                let _ = writer.send_error(id, error.code(), &error);
                return;
            }
        };
        if read == 0 {
            break;
        }
        if !control.take_credit() {
            let _ = writer.send(id, &Message::error(ErrorCode::CANCELLED, "get cancelled"));
            return;
        }
        if writer.send_raw(id, kind::DATA, &buf[..read]).is_err() {
            return;
        }
        hasher.update(&buf[..read]);
        size += read as u64;
    }
    let _ = writer.send(id, &Message::End(End { size, digest: *hasher.finalize().as_bytes() }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("outer")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn describe_nested_error_joins_sources() {
        let error = Outer(io::Error::other("inner"));
        assert_eq!(describe(&error), "outer: inner");
    }

    #[test]
    fn get_control_cancelled_refuses_credit() {
        let control = GetControl::default();
        control.lock().0.grant(1).unwrap();
        assert!(control.take_credit());
        control.cancel();
        assert!(!control.take_credit());
    }
}

//! Running commands for the host: spawn with pipes in a new process group, stream stdout
//! and stderr as chunks, enforce the timeout, report the exit.
//!
//! Each exec has a supervisor thread (waits for the exit, applies the timeout, sends
//! `ExecExit`), one pump thread per output pipe, and a writer for inline stdin. Pumps send
//! with blocking writes, so a host that stops reading stops the pumps and, once the pipe
//! fills, the command: nothing is buffered beyond one chunk per pipe.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use carrel_agent_proto::{kind, ErrorCode, Exec, ExecExit, Message, MAX_CHUNK, MAX_STDIN};

use crate::children::{decode_status, Children};
use crate::session::Writer;

/// Errors starting a command.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("exec request has an empty argv")]
    ParseArgv,
    #[error(
        "exec stdin of {len} bytes is larger than the inline limit of {MAX_STDIN}; put a file and redirect instead"
    )]
    AcceptStdin { len: usize },
    #[error("starting {program:?} failed")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("starting a thread for the exec failed")]
    SpawnThread {
        #[source]
        source: io::Error,
    },
}

impl ExecError {
    /// The protocol error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            ExecError::ParseArgv => ErrorCode::MALFORMED,
            ExecError::AcceptStdin { .. } => ErrorCode::TOO_LARGE,
            ExecError::Spawn { source, .. } if source.kind() == io::ErrorKind::NotFound => ErrorCode::NOT_FOUND,
            ExecError::Spawn { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
                ErrorCode::PERMISSION_DENIED
            }
            ExecError::Spawn { .. } | ExecError::SpawnThread { .. } => ErrorCode::SPAWN_FAILED,
        }
    }
}

/// The running execs of one connection, by request id: the pid of each process group.
pub type ExecTable = Arc<Mutex<HashMap<u32, i32>>>;

/// Starts `request` as exec `id`; output and the exit go to `writer`, and the exec stays in
/// `table` until it has exited.
pub fn start(
    id: u32,
    request: Exec,
    children: &Arc<Children>,
    writer: &Arc<Writer>,
    table: &ExecTable,
) -> Result<(), ExecError> {
    let program = request.argv.first().ok_or(ExecError::ParseArgv)?.clone();
    if request.stdin.len() > MAX_STDIN {
        return Err(ExecError::AcceptStdin { len: request.stdin.len() });
    }
    let mut command = Command::new(&program);
    command
        .args(&request.argv[1..])
        .stdin(if request.stdin.is_empty() { Stdio::null() } else { Stdio::piped() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout or kill reaches everything it started.
        .process_group(0);
    if request.clear_env {
        command.env_clear();
    }
    command.envs(request.env.iter().map(|(key, value)| (key, value)));
    if let Some(cwd) = &request.cwd {
        command.current_dir(cwd);
    }
    let (mut child, exited) =
        children.spawn(&mut command).map_err(|source| ExecError::Spawn { program: program.clone(), source })?;
    let pid = child.id() as i32;
    table.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(id, pid);

    let spawn_thread = |name: String, body: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new().name(name).spawn(body).map_err(|source| ExecError::SpawnThread { source })
    };
    // Output may only be sent while the gate is open; the supervisor closes it before
    // sending the exit, so no chunk can follow `ExecExit`.
    let gate = Arc::new(Mutex::new(true));
    let mut pumps: Vec<JoinHandle<()>> = Vec::new();
    let mut started = Ok(());
    if let Some(mut stdin) = child.stdin.take() {
        let bytes = request.stdin;
        // The command may exit without reading its input: a broken pipe is expected.
        started = spawn_thread(format!("stdin-{id}"), Box::new(move || drop(stdin.write_all(&bytes)))).map(drop);
    }
    for (pipe, stream_kind) in [
        (child.stdout.take().map(|pipe| Box::new(pipe) as Box<dyn Read + Send>), kind::STDOUT),
        (child.stderr.take().map(|pipe| Box::new(pipe) as Box<dyn Read + Send>), kind::STDERR),
    ] {
        let (Some(pipe), Ok(())) = (pipe, &started) else { continue };
        let (writer, gate) = (Arc::clone(writer), Arc::clone(&gate));
        match spawn_thread(format!("pump-{id}"), Box::new(move || pump(id, stream_kind, pipe, &writer, &gate))) {
            Ok(handle) => pumps.push(handle),
            Err(error) => started = Err(error),
        }
    }
    let timeout = request.timeout_ms.map(Duration::from_millis);
    if let Err(error) = started {
        children.kill_group(pid);
        table.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&id);
        return Err(error);
    }
    let owner = Arc::clone(children);
    let (children, writer, table) = (Arc::clone(children), Arc::clone(writer), Arc::clone(table));
    let supervise = move || {
        let deadline = timeout.map(|timeout| Instant::now() + timeout);
        let mut timed_out = false;
        let status = match deadline {
            Some(deadline) => match exited.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(status) => Ok(status),
                Err(RecvTimeoutError::Timeout) => {
                    timed_out = children.kill_group(pid);
                    exited.recv()
                }
                Err(RecvTimeoutError::Disconnected) => exited.recv(),
            },
            None => exited.recv(),
        };
        // Background processes of the command may still hold the pipes: at the deadline
        // the whole group is killed, so the pumps end.
        let (done_sender, done) = std::sync::mpsc::channel::<()>();
        let joiner = std::thread::Builder::new().name(format!("join-{id}")).spawn(move || {
            for pump in pumps {
                let _ = pump.join();
            }
            let _ = done_sender.send(());
        });
        if joiner.is_ok() {
            if let Some(deadline) = deadline {
                if done.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_err() {
                    // SAFETY: kill has no memory effects; the group may hold only leftovers
                    // of this exec (its leader is reaped, so its id is not reusable while
                    // the group exists).
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                    timed_out = true;
                    let _ = done.recv_timeout(Duration::from_secs(1));
                }
            } else {
                let _ = done.recv();
            }
        }
        *gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = false;
        table.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&id);
        let (code, signal) = status.map(decode_status).unwrap_or((None, None));
        let _ = writer.send(id, &Message::ExecExit(ExecExit { code, signal, timed_out }));
    };
    spawn_thread(format!("exec-{id}"), Box::new(supervise)).map(drop).inspect_err(|_| {
        // Without a supervisor nobody would report it: stop it (its pumps end with it).
        owner.kill_group(pid);
    })
}

/// Copies one output pipe to the host as chunks of up to [`MAX_CHUNK`] bytes.
fn pump(id: u32, stream_kind: u16, mut pipe: Box<dyn Read + Send>, writer: &Writer, gate: &Mutex<bool>) {
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let read = match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let open = gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !*open || writer.send_raw(id, stream_kind, &buf[..read]).is_err() {
            // The host is gone or the exec is over: drop the pipe; the command gets
            // SIGPIPE if it keeps writing.
            return;
        }
    }
}

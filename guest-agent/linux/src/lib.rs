//! The Carrel guest agent for Linux guests: serves the host's exec, file and ping requests
//! over virtio-vsock (port 1024), or over a Unix socket for tests and for running on a host.
//!
//! One thread accepts per listener, one thread serves each connection ([`session`]), and
//! execs and gets add their own threads; std threads only, no async runtime. As PID 1 of a
//! minimal initramfs the agent also mounts /proc, /sys and /dev and reaps every child
//! ([`pid1`], [`children`]). The protocol itself is `carrel-agent-proto`.

pub mod children;
pub mod config;
pub mod exec;
pub mod files;
pub mod listen;
pub mod pid1;
pub mod session;

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use config::{AgentConfig, ConfigError};
pub use listen::{VsockListener, VsockStream};

use children::Children;
use files::{FileError, FileRoot};
use listen::ListenError;

/// Connections served at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 32;

/// Errors setting up or running the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    OpenRoot(#[from] FileError),
    #[error("starting the child reaper failed")]
    StartReaper(#[source] io::Error),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("accepting a connection on {listener} failed")]
    Accept {
        listener: String,
        #[source]
        source: io::Error,
    },
    #[error("starting a thread failed")]
    SpawnThread(#[source] io::Error),
    #[error("no listener configured: pass --unix PATH and/or --vsock-port N")]
    ChooseListener,
}

/// What every connection shares.
#[derive(Debug)]
pub struct AgentContext {
    pub root: FileRoot,
    pub children: Arc<Children>,
    pub heartbeat_interval: Duration,
    /// "carrel-guest-agent <version>", sent in Hello.
    pub name: String,
    /// "linux <release> <machine>", sent in Hello.
    pub os: String,
    connections: AtomicUsize,
}

/// The agent: its shared context and its accept loops.
#[derive(Debug, Clone)]
pub struct Agent {
    ctx: Arc<AgentContext>,
}

impl Agent {
    /// Opens the root and starts the child table (and the reaper when `config.pid1`).
    pub fn new(config: &AgentConfig) -> Result<Agent, AgentError> {
        let ctx = AgentContext {
            root: FileRoot::new(config.root.as_deref())?,
            children: Children::new(config.pid1).map_err(AgentError::StartReaper)?,
            heartbeat_interval: config.heartbeat_interval,
            name: format!("carrel-guest-agent {}", env!("CARGO_PKG_VERSION")),
            os: os_description(),
            connections: AtomicUsize::new(0),
        };
        Ok(Agent { ctx: Arc::new(ctx) })
    }

    /// Binds every configured listener and serves until one of them fails.
    pub fn run(&self, config: &AgentConfig) -> Result<(), AgentError> {
        let mut loops = Vec::new();
        if let Some(path) = &config.unix {
            let listener = listen::bind_unix(path)?;
            let agent = self.clone();
            loops.push(spawn_named("accept-unix", move || agent.serve_unix(&listener))?);
        }
        if let Some(port) = config.vsock_port {
            let listener = VsockListener::bind(port)?;
            let agent = self.clone();
            loops.push(spawn_named("accept-vsock", move || agent.serve_vsock(&listener))?);
        }
        if loops.is_empty() {
            return Err(AgentError::ChooseListener);
        }
        for accept_loop in loops {
            match accept_loop.join() {
                Ok(result) => result?,
                Err(_) => return Err(AgentError::SpawnThread(io::Error::other("accept loop panicked"))),
            }
        }
        Ok(())
    }

    /// Accepts Unix-socket connections forever, each on its own thread.
    pub fn serve_unix(&self, listener: &UnixListener) -> Result<(), AgentError> {
        let name = listener
            .local_addr()
            .ok()
            .and_then(|addr| addr.as_pathname().map(|path| path.display().to_string()))
            .unwrap_or_else(|| "unix socket".into());
        loop {
            match listener.accept() {
                Ok((stream, _)) => self.spawn_connection(stream)?,
                Err(error) if transient_accept_error(&error) => continue,
                Err(source) => return Err(AgentError::Accept { listener: name, source }),
            }
        }
    }

    /// Accepts vsock connections forever, each on its own thread.
    pub fn serve_vsock(&self, listener: &VsockListener) -> Result<(), AgentError> {
        loop {
            match listener.accept() {
                Ok(stream) => self.spawn_connection(stream)?,
                Err(error) if transient_accept_error(&error) => continue,
                Err(source) => {
                    return Err(AgentError::Accept { listener: format!("vsock port {}", listener.port()), source })
                }
            }
        }
    }

    fn spawn_connection<S: Connection>(&self, stream: S) -> Result<(), AgentError> {
        if self.ctx.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            self.ctx.connections.fetch_sub(1, Ordering::SeqCst);
            return Ok(());
        }
        let agent = self.clone();
        let spawned = spawn_named("connection", move || {
            agent.serve_connection(stream);
            agent.ctx.connections.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            self.ctx.connections.fetch_sub(1, Ordering::SeqCst);
        }
        // Out of threads is worth reporting but not worth stopping the listener for.
        Ok(())
    }

    /// Serves one connection on the calling thread until it closes.
    pub fn serve_connection<S: Connection>(&self, stream: S) {
        let Ok(writer) = stream.try_clone_stream() else { return };
        session::serve(&self.ctx, Box::new(stream), Box::new(writer));
    }
}

/// A byte stream the agent can serve: it must split into a reading and a writing half.
pub trait Connection: io::Read + io::Write + Send + 'static + Sized {
    /// Another handle to the same stream.
    fn try_clone_stream(&self) -> io::Result<Self>;
}

impl Connection for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl Connection for VsockStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

fn transient_accept_error(error: &io::Error) -> bool {
    match error.raw_os_error() {
        // A connection that died in the backlog, or a signal.
        Some(libc::ECONNABORTED | libc::EINTR) => true,
        // Out of fds or memory: back off and try again rather than stop listening.
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS) => {
            std::thread::sleep(Duration::from_millis(100));
            true
        }
        _ => false,
    }
}

fn spawn_named<T: Send + 'static>(
    name: &str,
    body: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>, AgentError> {
    std::thread::Builder::new().name(name.into()).spawn(body).map_err(AgentError::SpawnThread)
}

/// "linux 6.8.0 x86_64" from uname.
fn os_description() -> String {
    // SAFETY: utsname is plain data that uname fills.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uts is a valid out-pointer.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return "linux".into();
    }
    let field = |chars: &[libc::c_char]| {
        let bytes: Vec<u8> = chars.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    format!("{} {} {}", field(&uts.sysname).to_lowercase(), field(&uts.release), field(&uts.machine))
}

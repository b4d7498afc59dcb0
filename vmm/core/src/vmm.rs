//! The running VMM: vCPU threads plus one event loop thread (this one) that serves queue
//! notifications, console input, control requests, signals and the guest's power off.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use carrel_audit::AuditLog;
use carrel_gpu::CaptureOptions;

use crate::builder::BuiltVm;
use crate::config::VmConfig;
use crate::control::{
    ControlServer, ErrorKind, Failure, PendingRequest, Request, RequestQueue, Response, SnapshotRequest, VmStatus,
};
use crate::devices::bus::lock;
use crate::devices::virtio::persist::VirtioPersistError;
use crate::jail::Jail;
use crate::recorder::{Record, Recorder};
use crate::seccomp::{self, ThreadKind};
use crate::services::agent::AgentService;
use crate::services::input::InputService;
use crate::services::screen::ScreenService;
use crate::services::screen::ScreenSource;
use crate::services::ConnectionServices;
use crate::snapshot::lazy::LazyMemory;
use crate::snapshot::memory::{MemoryImage, Parent};
use crate::snapshot::shown::Shown;
use crate::snapshot::{write_snapshot, SnapshotInfo, SnapshotState};
use crate::vstate::vcpu::{
    install_kick_handler, Announce, VcpuEvent, VcpuEventSender, VcpuHandle, VcpuMessage, VcpuStop,
};

/// Errors running a VM.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("event loop set-up failed: {0}")]
    EventLoop(#[source] std::io::Error),
    #[error("cannot block termination signals: {0}")]
    BlockSignals(#[source] std::io::Error),
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error("cannot open the audit log: {}", carrel_audit::error_chain(.0))]
    OpenAudit(#[source] carrel_audit::AuditError),
    #[error("cannot start the thread that opens the audit log: {0}")]
    AuditThread(#[source] std::io::Error),
    #[error("cannot record the VM's start in the audit log: {0}")]
    RecordStart(String),
    #[error("the vCPUs did not answer a {} request in time", if *pause { "pause" } else { "resume" })]
    VcpuNoAnswer { pause: bool },
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("vCPU {id} stopped: {stop}")]
    VcpuStopped { id: u8, stop: VcpuStop },
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest powered off with this exit code (0 = clean).
    PoweredOff(i32),
    /// SIGTERM/SIGINT or a control-socket stop.
    Stopped,
}

/// How long vCPUs have to answer a pause or resume.
const VCPU_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a stopping VMM waits for its last control answer to be written.
const LAST_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

const TOKEN_VCPU_EVENT: u64 = 1;
const TOKEN_GUEST_EXIT: u64 = 2;
const TOKEN_SIGNAL: u64 = 3;
const TOKEN_STDIN: u64 = 4;
const TOKEN_CONTROL: u64 = 5;
/// Device event tokens: base + device index.
const TOKEN_DEVICE_EVENTS_BASE: u64 = 1 << 8;
/// Queue tokens: base + device index * 64 + queue index.
const TOKEN_QUEUE_BASE: u64 = 1 << 16;
const QUEUES_PER_DEVICE: u64 = 64;

/// Blocks SIGTERM and SIGINT in this thread (and every thread it starts afterwards) and
/// returns a signalfd that reads them.
fn termination_signalfd() -> Result<OwnedFd, RunError> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    // SAFETY: `set` is initialised; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(RunError::BlockSignals(std::io::Error::from_raw_os_error(rc)));
    }
    // SAFETY: `set` is initialised; -1 asks for a new fd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(RunError::BlockSignals(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by signalfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The VM's audit log, opened on a thread of its own while the VM is built: a new log's
/// files are made and synced one by one (about 4 ms here), which would otherwise come
/// before the guest's first instruction. In a jail the thread takes the jail's ids first,
/// for itself alone, so the log's files are the VM's as if made after the process left
/// root.
#[derive(Debug)]
pub struct AuditOpening(Option<std::thread::JoinHandle<Result<AuditLog, RunError>>>);

impl AuditOpening {
    /// Starts opening `config`'s audit log, if it names one.
    pub fn start(config: &VmConfig, jail: Option<&Jail>) -> Result<AuditOpening, RunError> {
        let Some(dir) = config.audit.clone() else { return Ok(AuditOpening(None)) };
        let (name, jail) = (config.name.clone(), jail.cloned());
        let thread = std::thread::Builder::new()
            .name("audit-open".into())
            .spawn(move || {
                if let Some(jail) = &jail {
                    jail.become_ids_on_this_thread()?;
                }
                AuditLog::open(&dir, &name).map_err(RunError::OpenAudit)
            })
            .map_err(RunError::AuditThread)?;
        Ok(AuditOpening(Some(thread)))
    }

    fn finish(self) -> Result<Option<AuditLog>, RunError> {
        match self.0 {
            None => Ok(None),
            Some(thread) => thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)).map(Some),
        }
    }
}

/// A VM whose vCPUs run.
#[derive(Debug)]
pub struct Vmm {
    built: BuiltVm,
    config: VmConfig,
    handles: Vec<VcpuHandle>,
    epoll: Epoll,
    vcpu_events: Receiver<VcpuEvent>,
    vcpu_wake: Arc<EventFd>,
    requests: Receiver<PendingRequest>,
    request_wake: Arc<EventFd>,
    signals: OwnedFd,
    recorder: Recorder,
    paused: bool,
    /// The snapshot this VM's memory last matched, which a diff snapshot applies over.
    parent: Option<Parent>,
    _control: Option<ControlServer>,
}

impl Vmm {
    /// Starts the control socket and the vCPUs of `built`. In a `jail`, the process
    /// leaves root first, before any client is accepted or guest instruction runs; each
    /// thread then installs its seccomp filter as it starts, this one last.
    pub fn start(
        mut built: BuiltVm,
        config: VmConfig,
        jail: Option<&Jail>,
        audit: AuditOpening,
    ) -> Result<Vmm, RunError> {
        // The audit log's thread ends before the process leaves root: glibc changes the
        // ids of every thread, which that thread, no longer root, could not follow.
        let audit = audit.finish()?;
        // What this process writes from here on (audit log, control socket, snapshots)
        // it writes as the jail's uid.
        if let Some(jail) = jail {
            jail.drop_privileges()?;
        }
        let signals = termination_signalfd()?;
        install_kick_handler()?;
        let epoll = Epoll::new().map_err(RunError::EventLoop)?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)).map_err(RunError::EventLoop)
        };

        let vcpu_wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(RunError::EventLoop)?);
        let request_wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(RunError::EventLoop)?);
        add(vcpu_wake.as_raw_fd(), TOKEN_VCPU_EVENT)?;
        add(built.exit.eventfd.as_raw_fd(), TOKEN_GUEST_EXIT)?;
        add(signals.as_raw_fd(), TOKEN_SIGNAL)?;
        add(request_wake.as_raw_fd(), TOKEN_CONTROL)?;
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } == 1 {
            add(libc::STDIN_FILENO, TOKEN_STDIN)?;
        }
        for (device, attached) in built.virtio.iter().enumerate() {
            if let Some(fd) = lock(&attached.transport).device_event_fd() {
                add(fd, TOKEN_DEVICE_EVENTS_BASE + device as u64)?;
            }
            for (queue, event) in attached.queue_events.iter().enumerate() {
                add(event.as_raw_fd(), TOKEN_QUEUE_BASE + device as u64 * QUEUES_PER_DEVICE + queue as u64)?;
            }
        }

        let recorder = Recorder::new(audit);
        let start = match &built.restored_from {
            None => Record {
                action: "vm.start",
                params: vec![
                    ("kernel", config.kernel.as_ref().map(|p| p.display().to_string()).unwrap_or_default()),
                    ("platform", built.platform.name().to_string()),
                ],
                ..Default::default()
            },
            Some(parent) => Record {
                action: "vm.restore",
                params: vec![
                    ("snapshot", parent.dir.display().to_string()),
                    ("state_digest", crate::snapshot::hex(&parent.digest)),
                    ("restores", built.restores.to_string()),
                    ("platform", built.platform.name().to_string()),
                ],
                ..Default::default()
            },
        };
        recorder.record(None, start).map_err(RunError::RecordStart)?;

        let (event_sender, vcpu_events) = mpsc::channel();
        let vcpus = std::mem::take(&mut built.vcpus);
        let vcpu_count = vcpus.len() as u8;
        let mut handles = Vec::with_capacity(vcpus.len());
        // The vCPUs' start has the CPUs to itself: a lazy restore's loader fetches ahead,
        // and this thread goes on, once the guest runs.
        let fetch_ahead = built.lazy.as_ref().map(LazyMemory::fetch_ahead_trigger);
        let (entered_sender, entered) = mpsc::sync_channel(1);
        let mut then = Some(move || {
            if let Some(go) = fetch_ahead {
                go();
            }
            let _ = entered_sender.send(());
        });
        for vcpu in vcpus {
            // The last vCPU to start says when the guest runs.
            let announce = (vcpu.id + 1 == vcpu_count)
                .then(|| Announce { started: built.started, then: then.take().map(|then| Box::new(then) as _) });
            handles.push(vcpu.start(VcpuEventSender::new(event_sender.clone(), vcpu_wake.clone()), announce)?);
        }
        drop(then);
        // The control socket opens while the vCPUs enter the guest.
        let (request_sender, requests) = mpsc::channel();
        let control = match &config.socket {
            Some(path) => {
                let local = ConnectionServices::new(
                    ScreenService::new(built.screen.clone(), built.shown.take(), recorder.clone()),
                    AgentService::new(config.vsock.clone(), recorder.clone()),
                    InputService::new(built.input.clone(), built.screen.clone(), recorder.clone()),
                );
                match ControlServer::start(path, RequestQueue::new(request_sender, request_wake.clone(), local)) {
                    Ok(server) => Some(server),
                    Err(err) => {
                        handles.into_iter().for_each(VcpuHandle::exit_and_join);
                        return Err(err.into());
                    }
                }
            }
            None => None,
        };
        crate::timeline::mark("control");
        // An error if the vCPU ended before it entered, which the event loop reports.
        let _ = entered.recv();
        if built.restored_from.is_some() {
            // Devices tell the guest what did not survive the snapshot now that it runs:
            // what they write to its memory is not in the way of its first instruction.
            for attached in &built.virtio {
                lock(&attached.transport).restored();
            }
        }
        let parent = built.restored_from.clone();
        // The event loop answers the guest's notifications and queued control requests
        // in short bursts: like the control threads, it should not wait behind a vCPU.
        crate::sched::short_slices(crate::sched::SERVICE_SLICE);
        seccomp::install(ThreadKind::EventLoop)?;
        Ok(Vmm {
            built,
            config,
            handles,
            epoll,
            vcpu_events,
            vcpu_wake,
            requests,
            request_wake,
            signals,
            recorder,
            paused: false,
            parent,
            _control: control,
        })
    }

    /// Runs the event loop until the guest powers off, a signal or a stop request ends
    /// the VM, or a vCPU fails. vCPU threads are joined before returning.
    pub fn run(mut self) -> Result<VmOutcome, RunError> {
        let outcome = self.event_loop();
        for handle in self.handles.drain(..) {
            handle.exit_and_join();
        }
        let result = match &outcome {
            Ok(outcome) => format!("{outcome:?}"),
            Err(err) => format!("error: {err}"),
        };
        let _ = self
            .recorder
            .record(None, Record { action: "vm.exit", params: vec![("outcome", result)], ..Default::default() });
        if let Some(log) = self.recorder.log() {
            // The last records get a signed checkpoint, so dropping them later is detectable.
            let _ = log.checkpoint();
            let _ = log.sync();
        }
        outcome
    }

    fn event_loop(&mut self) -> Result<VmOutcome, RunError> {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let count = match self.epoll.wait(-1, &mut events) {
                Ok(count) => count,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(RunError::EventLoop(err)),
            };
            for event in &events[..count] {
                if let Some(outcome) = self.handle_event(event.data())? {
                    return Ok(outcome);
                }
            }
        }
    }

    fn handle_event(&mut self, token: u64) -> Result<Option<VmOutcome>, RunError> {
        match token {
            TOKEN_GUEST_EXIT => {
                let _ = self.built.exit.eventfd.read();
                Ok(Some(VmOutcome::PoweredOff(self.built.exit.code())))
            }
            TOKEN_SIGNAL => {
                // The signal's details do not matter: SIGTERM and SIGINT both stop the VM.
                let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
                // SAFETY: reads into a stack buffer of the given length from our signalfd.
                let _ = unsafe { libc::read(self.signals.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
                Ok(Some(VmOutcome::Stopped))
            }
            TOKEN_VCPU_EVENT => {
                let _ = self.vcpu_wake.read();
                while let Ok(event) = self.vcpu_events.try_recv() {
                    if let VcpuEvent::Stopped(id, stop) = event {
                        return Err(RunError::VcpuStopped { id, stop });
                    }
                }
                Ok(None)
            }
            TOKEN_STDIN => {
                self.forward_stdin();
                Ok(None)
            }
            TOKEN_CONTROL => {
                let _ = self.request_wake.read();
                let mut outcome = None;
                while let Ok(pending) = self.requests.try_recv() {
                    let (response, stop) = self.serve(&pending);
                    if stop {
                        // The process ends next: let the answer leave first.
                        pending.answer_and_flush(response, LAST_ANSWER_TIMEOUT);
                        outcome = Some(VmOutcome::Stopped);
                    } else {
                        let _ = pending.reply.send(response);
                    }
                }
                Ok(outcome)
            }
            device_token if (TOKEN_DEVICE_EVENTS_BASE..TOKEN_QUEUE_BASE).contains(&device_token) => {
                if let Some(attached) = self.built.virtio.get((device_token - TOKEN_DEVICE_EVENTS_BASE) as usize) {
                    lock(&attached.transport).process_device_events();
                }
                Ok(None)
            }
            queue_token if queue_token >= TOKEN_QUEUE_BASE => {
                let index = queue_token - TOKEN_QUEUE_BASE;
                let (device, queue) = ((index / QUEUES_PER_DEVICE) as usize, (index % QUEUES_PER_DEVICE) as usize);
                if let Some(attached) = self.built.virtio.get(device) {
                    if attached.queue_events.get(queue).map(|event| event.read()).is_some() {
                        lock(&attached.transport).notify_queue(queue);
                    }
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    fn forward_stdin(&self) {
        let mut buffer = [0u8; 64];
        // SAFETY: reading into a stack buffer of the given length from stdin.
        let count = unsafe { libc::read(libc::STDIN_FILENO, buffer.as_mut_ptr().cast(), buffer.len()) };
        if count > 0 {
            lock(&self.built.serial).enqueue_input(&buffer[..count as usize]);
        } else if count == 0 {
            // stdin closed: stop polling it.
            let _ = self.epoll.ctl(ControlOperation::Delete, libc::STDIN_FILENO, EpollEvent::default());
        }
    }

    /// Serves one request and records it through the recorder, like every request; a
    /// request whose record cannot be written fails, and one that would stop the VM is
    /// recorded before it does.
    fn serve(&mut self, pending: &PendingRequest) -> (Response, bool) {
        let action = request_action(&pending.request);
        if matches!(pending.request, Request::Stop) {
            if let Err(err) = self.recorder.record(pending.peer, Record { action, ..Default::default() }) {
                return (
                    Response::error(ErrorKind::Internal, format!("not stopped: the audit log failed: {err}")),
                    false,
                );
            }
            return self.handle_request(&pending.request);
        }
        let (response, stop) = self.handle_request(&pending.request);
        let error = match &response {
            Response::Error(failure) => Some(failure.message.clone()),
            _ => None,
        };
        let params = response_params(&response);
        match self.recorder.record(pending.peer, Record { action, params, error, ..Default::default() }) {
            Ok(()) => (response, stop),
            Err(err) => (
                Response::error(ErrorKind::Internal, format!("the audit log failed, request not served: {err}")),
                false,
            ),
        }
    }

    /// Handles one control request; `true` when the VM should stop after answering.
    fn handle_request(&mut self, request: &Request) -> (Response, bool) {
        match request {
            Request::Status => (Response::Status(self.status()), false),
            Request::Stop => (Response::Stopping, true),
            Request::Pause => match self.set_paused(true) {
                Ok(()) => (Response::Paused, false),
                Err(err) => (Response::error(ErrorKind::Internal, err.to_string()), false),
            },
            Request::Resume => match self.set_paused(false) {
                Ok(()) => (Response::Resumed, false),
                Err(err) => (Response::error(ErrorKind::Internal, err.to_string()), false),
            },
            Request::Snapshot(request) => match self.snapshot(&request.dir, request.diff) {
                Ok(info) => (Response::Snapshot(info), request.hibernate),
                Err(failure) => (Response::Error(failure), false),
            },
            Request::ConsoleInput(bytes) => {
                lock(&self.built.serial).enqueue_input(bytes);
                (Response::ConsoleInput(bytes.len()), false)
            }
            // Served on the connection thread (the services, and the connection's own
            // caller).
            Request::Screenshot(_)
            | Request::Agent(_)
            | Request::Input(_)
            | Request::ActFor { .. }
            | Request::SnapshotProgress => {
                (Response::error(ErrorKind::Internal, "served on the connection thread, not here"), false)
            }
        }
    }

    /// Pauses or resumes every vCPU and waits until each has answered: a paused VM's
    /// vCPU threads sleep on their message channel and cost no CPU. Devices keep serving.
    fn set_paused(&mut self, pause: bool) -> Result<(), RunError> {
        if self.paused == pause {
            return Ok(());
        }
        let message = if pause { VcpuMessage::Pause } else { VcpuMessage::Resume };
        for handle in &self.handles {
            handle.send(message);
        }
        let mut answered = 0;
        let deadline = Instant::now() + VCPU_ANSWER_TIMEOUT;
        while answered < self.handles.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.vcpu_events.recv_timeout(left) {
                Ok(VcpuEvent::Paused(_)) if pause => answered += 1,
                Ok(VcpuEvent::Resumed(_)) if !pause => answered += 1,
                Ok(VcpuEvent::Stopped(id, stop)) => return Err(RunError::VcpuStopped { id, stop }),
                Ok(_) => {}
                Err(_) => return Err(RunError::VcpuNoAnswer { pause }),
            }
        }
        self.paused = pause;
        Ok(())
    }

    /// Pauses the VM (if it runs), saves every vCPU, the VM and every device, writes the
    /// snapshot, and lets the VM go on as it was. Devices are served on this thread, so
    /// none touches guest memory while the snapshot is taken.
    ///
    /// Every snapshot starts a new dirty-page set; a `diff` one writes only the pages of the
    /// set it ends, over the VM's last snapshot. A snapshot not taken gives its set back.
    fn snapshot(&mut self, dir: &Path, diff: bool) -> Result<SnapshotInfo, Failure> {
        crate::jail::may_write(dir)
            .map_err(|message| Failure::new(ErrorKind::PermissionDenied, format!("snapshot not taken: {message}")))?;
        let parent = match &self.parent {
            Some(parent) if diff => Some(parent.clone()),
            None if diff => {
                return Err(Failure::precondition(
                    "snapshot not taken: a diff needs a parent, and this VM has had no snapshot since it booted: \
                     take a full snapshot first",
                ))
            }
            _ => None,
        };
        // A lazily restored VM's RAM is made whole first: a block not yet loaded is a
        // hole of the memfd that the snapshot would take for zeros.
        if let Some(lazy) = self.built.lazy.take() {
            lazy.finish().map_err(|err| Failure::internal(format!("snapshot not taken: {err}")))?;
        }
        let paused_at = Instant::now();
        let mut screen = None;
        let was_paused = self.paused;
        self.set_paused(true).map_err(|err| Failure::internal(format!("cannot pause the VM for a snapshot: {err}")))?;
        let result = self.capture_state().and_then(|state| {
            let memory = &self.built.ram.memory;
            let dirty = self.built.vm.take_dirty_pages(memory).map_err(|err| Failure::internal(err.to_string()))?;
            // The screen as shown, for screenshots of the snapshot and after a wake: its
            // pixels now, encoded once the VM runs again (none before the first frame).
            screen = self.built.screen.as_ref().and_then(|screen| screen.capture(&CaptureOptions::default()).ok());
            let written = write_snapshot(
                dir,
                &self.config,
                self.built.platform,
                &self.built.ram,
                state,
                paused_at,
                parent.map(|parent| (&dirty[..], parent)),
                &mut crate::snapshot::progress_line(dir),
            );
            if written.is_err() {
                give_back_dirty_pages(memory, &dirty);
            }
            written.map_err(|err| {
                let kind = match err {
                    crate::snapshot::SnapshotError::Exists { .. } => ErrorKind::AlreadyExists,
                    crate::snapshot::SnapshotError::NoSpace { .. } => ErrorKind::ResourceExhausted,
                    _ => ErrorKind::Internal,
                };
                Failure::new(kind, err.to_string())
            })
        });
        let result = result
            .map_err(|failure| Failure::new(failure.kind, format!("snapshot not taken: {}", failure.message)))
            .map(|(info, parent)| {
                self.parent = Some(parent);
                info
            });
        if !was_paused {
            if let Err(err) = self.set_paused(false) {
                let first = result.err().map(|failure| failure.message).unwrap_or_default();
                return Err(Failure::internal(format!("{first}; and the VM did not resume: {err}")));
            }
        }
        if let (Ok(info), Some(raw)) = (&result, &screen) {
            match Shown::encode_raw(raw) {
                Ok(shown) => shown.keep(&info.dir),
                Err(err) => eprintln!("carrel-vmm: the screen was not kept beside {}: {err}", info.dir.display()),
            }
        }
        if let Ok(info) = &result {
            eprintln!(
                "carrel-vmm: snapshot {}: {} MiB of memory in {:.1} ms ({:.1} ms paused)",
                info.dir.display(),
                info.memory_bytes >> 20,
                info.memory_write_us as f64 / 1e3,
                info.paused_us as f64 / 1e3
            );
        }
        result
    }

    /// The state of the paused VM, memory aside. A device that cannot be saved in this
    /// configuration (a raw disk written in place) is a failed precondition.
    fn capture_state(&mut self) -> Result<SnapshotState, Failure> {
        // A notification the guest sent just before the pause is served first, so the
        // saved queues hold no kick that a restored device would never hear.
        for attached in &self.built.virtio {
            for (queue, event) in attached.queue_events.iter().enumerate() {
                if event.read().is_ok() {
                    lock(&attached.transport).notify_queue(queue);
                }
            }
            lock(&attached.transport)
                .prepare_snapshot()
                .map_err(|err| Failure::precondition(format!("{} device: {err}", attached.name)))?;
        }
        for handle in &self.handles {
            handle.send(VcpuMessage::SaveState);
        }
        let mut vcpus = Vec::with_capacity(self.handles.len());
        let deadline = Instant::now() + VCPU_ANSWER_TIMEOUT;
        while vcpus.len() < self.handles.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.vcpu_events.recv_timeout(left) {
                Ok(VcpuEvent::Saved(_, Ok(state))) => vcpus.push(*state),
                Ok(VcpuEvent::Saved(id, Err(err))) => return Err(Failure::internal(format!("vCPU {id}: {err}"))),
                Ok(VcpuEvent::Stopped(id, stop)) => {
                    return Err(Failure::internal(format!("vCPU {id} stopped: {stop}")))
                }
                Ok(_) => {}
                Err(_) => return Err(Failure::internal("the vCPUs did not answer a save request in time")),
            }
        }
        vcpus.sort_by_key(|vcpu| vcpu.id);
        let vm = self.built.vm.save_state().map_err(|err| Failure::internal(err.to_string()))?;
        let virtio = self
            .built
            .virtio
            .iter()
            .map(|attached| lock(&attached.transport).save())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| {
                // A device that cannot be saved at all (a vhost-user GPU) is not built yet.
                let kind = match err {
                    VirtioPersistError::Save { .. } => ErrorKind::Unimplemented,
                    _ => ErrorKind::Internal,
                };
                Failure::new(kind, err.to_string())
            })?;
        Ok(SnapshotState {
            protocol: self.built.protocol,
            restores: self.built.restores,
            vm,
            vcpus,
            serial: lock(&self.built.serial).save(),
            virtio,
            memory: MemoryImage::empty(self.built.ram.size),
        })
    }

    fn status(&self) -> VmStatus {
        VmStatus {
            platform: self.built.platform.name().to_string(),
            state: if self.paused { "paused" } else { "running" }.to_string(),
            boot_protocol: format!("{:?}", self.built.protocol).to_lowercase(),
            kernel: self.config.kernel.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            vcpus: self.handles.len() as u8,
            mem_mib: self.config.mem_mib,
            uptime_ms: Instant::now().duration_since(self.built.started).as_millis() as u64,
            devices: self.built.virtio.iter().map(|device| device.name.to_string()).collect(),
            pid: std::process::id(),
            zero_copy_screen: match &self.built.screen {
                Some(ScreenSource::Local(screen)) => screen.scanout_is_zero_copy(),
                _ => None,
            },
            memory_loading: self.built.lazy.as_ref().is_some_and(|lazy| !lazy.is_done()),
        }
    }
}

/// The audit action name of a request.
fn request_action(request: &Request) -> &'static str {
    match request {
        Request::Status => "status",
        Request::Stop => "stop",
        Request::Pause => "pause",
        Request::Resume => "resume",
        Request::Screenshot(_) => "screenshot",
        Request::Agent(_) => "agent",
        Request::Input(_) => "input",
        Request::Snapshot(SnapshotRequest { hibernate: false, diff: false, .. }) => "snapshot",
        Request::Snapshot(SnapshotRequest { hibernate: false, diff: true, .. }) => "snapshot.diff",
        Request::Snapshot(SnapshotRequest { hibernate: true, .. }) => "hibernate",
        // The bytes are not kept: they may be a password typed at a login prompt.
        Request::ConsoleInput(_) => "console.input",
        Request::ActFor { .. } => "act_for",
        Request::SnapshotProgress => "snapshot.progress",
    }
}

/// What the audit log keeps of a request's answer beyond its action.
fn response_params(response: &Response) -> Vec<(&'static str, String)> {
    match response {
        Response::Snapshot(info) => {
            let mut params = vec![
                ("dir", info.dir.display().to_string()),
                ("state_digest", info.digest.clone()),
                ("memory_bytes", info.memory_bytes.to_string()),
                ("paused_us", info.paused_us.to_string()),
            ];
            if let Some(parent) = &info.parent {
                params.push(("parent_digest", parent.clone()));
            }
            params
        }
        _ => Vec::new(),
    }
}

/// Marks `dirty` pages in the regions' bitmaps again, so the next diff still holds them.
fn give_back_dirty_pages(memory: &crate::memory::GuestMemoryMmap, dirty: &crate::snapshot::memory::DirtyPages) {
    use vm_memory::GuestMemoryBackend;
    for (region, bitmap) in memory.iter().zip(dirty) {
        let mapping: &crate::memory::MmapRegion = region;
        for page in crate::snapshot::memory::set_bits(bitmap) {
            mapping.bitmap().set_bit(page as usize);
        }
    }
}

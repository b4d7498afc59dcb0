//! vCPUs: each runs on its own thread as a state machine driven by messages.
//!
//! ```text
//!            Pause                 Exit
//!  Running --------> Paused ----------------> (thread ends)
//!     ^   <--------    |
//!     |     Resume     | Exit
//!     +-- KVM_RUN      v
//!     |  exits       (thread ends)
//!     v
//!  Stopped (guest powered off, triple fault, KVM error): waits for Exit
//! ```
//!
//! A message reaches a vCPU inside KVM_RUN by a signal that sets `immediate_exit`, so the
//! run returns at once instead of at the next exit. Register state is only read while the
//! vCPU is paused: a SaveState message to a running vCPU is refused, not raced.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::bus::Bus;
use crate::vstate::persist::{self, VcpuState};

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    IMMEDIATE_EXIT.with(|flag| {
        let pointer = flag.get();
        if !pointer.is_null() {
            // SAFETY: the pointer is this thread's kvm_run mapping, set by the vCPU loop
            // below while the VcpuFd (and so the mapping) is alive on this thread.
            unsafe { pointer.write_volatile(1) };
        }
    });
}

/// Installs the kick signal handler; once per process, before vCPU threads start.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::RegisterKickHandler)
}

/// Errors of the vCPU machinery.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU {id} failed: {source}")]
    CreateVcpu { id: u8, source: kvm_ioctls::Error },
    #[error("KVM_SET_CPUID2 on vCPU {id} failed: {source}")]
    SetCpuid { id: u8, source: kvm_ioctls::Error },
    #[error("could not install the vCPU kick signal handler: {0}")]
    RegisterKickHandler(#[source] vmm_sys_util::errno::Error),
    #[error("could not start the thread of vCPU {id}: {source}")]
    SpawnThread { id: u8, source: std::io::Error },
}

/// Messages the VMM sends a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuMessage {
    Pause,
    Resume,
    /// Save the registers (answered with [`VcpuEvent::Saved`]); only while paused.
    SaveState,
    Exit,
}

/// Why a vCPU stopped running the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// KVM_EXIT_SHUTDOWN: a triple fault or a reset request the irqchip did not take.
    TripleFault { registers: String },
    /// The guest could not be entered or KVM failed internally.
    Failed { reason: String, registers: String },
}

impl std::fmt::Display for VcpuStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuStop::TripleFault { registers } => {
                write!(f, "guest triple fault (KVM_EXIT_SHUTDOWN); {registers}")
            }
            VcpuStop::Failed { reason, registers } => write!(f, "{reason}; {registers}"),
        }
    }
}

/// What a vCPU thread reports to the VMM.
#[derive(Debug)]
pub enum VcpuEvent {
    Paused(u8),
    Resumed(u8),
    Stopped(u8, VcpuStop),
    /// The answer to SaveState: the state, or why it could not be saved.
    Saved(u8, Result<Box<VcpuState>, String>),
}

/// Where vCPU threads send [`VcpuEvent`]s: a channel plus an eventfd the event loop polls.
#[derive(Debug, Clone)]
pub struct VcpuEventSender {
    sender: Sender<VcpuEvent>,
    wake: Arc<EventFd>,
}

impl VcpuEventSender {
    pub fn new(sender: Sender<VcpuEvent>, wake: Arc<EventFd>) -> VcpuEventSender {
        VcpuEventSender { sender, wake }
    }

    fn send(&self, event: VcpuEvent) {
        // The VMM may be gone already while shutting down; then nobody is waiting.
        if self.sender.send(event).is_ok() {
            let _ = self.wake.write(1);
        }
    }
}

/// A configured vCPU, not yet running.
#[derive(Debug)]
pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    /// The MSRs a SaveState reads.
    msr_indices: Arc<[u32]>,
}

impl Vcpu {
    pub fn new(
        vm: &kvm_ioctls::VmFd,
        id: u8,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        msr_indices: Arc<[u32]>,
    ) -> Result<Vcpu, VcpuError> {
        let fd = vm.create_vcpu(u64::from(id)).map_err(|source| VcpuError::CreateVcpu { id, source })?;
        Ok(Vcpu { id, fd, io_bus, mmio_bus, msr_indices })
    }

    pub fn set_msr_indices(&mut self, msr_indices: Arc<[u32]>) {
        self.msr_indices = msr_indices;
    }

    fn save_state(&self) -> Result<Box<VcpuState>, String> {
        persist::save_vcpu(&self.fd, self.id, &self.msr_indices).map(Box::new).map_err(|err| err.to_string())
    }

    pub fn set_cpuid(&self, cpuid: &kvm_bindings::CpuId) -> Result<(), VcpuError> {
        self.fd.set_cpuid2(cpuid).map_err(|source| VcpuError::SetCpuid { id: self.id, source })
    }

    /// Starts the vCPU on its own thread, running the guest at once. With `announce`, the
    /// thread says when it first enters the guest.
    pub fn start(self, events: VcpuEventSender, announce: Option<Announce>) -> Result<VcpuHandle, VcpuError> {
        let id = self.id;
        let (sender, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.run_thread(receiver, events, announce))
            .map_err(|source| VcpuError::SpawnThread { id, source })?;
        Ok(VcpuHandle { id, sender, thread: Some(thread) })
    }

    fn run_thread(mut self, messages: Receiver<VcpuMessage>, events: VcpuEventSender, announce: Option<Announce>) {
        crate::timeline::mark("vcpu thread");
        crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Vcpu);
        crate::timeline::mark("vcpu filter");
        IMMEDIATE_EXIT.with(|flag| flag.set(&mut self.fd.get_kvm_run().immediate_exit as *mut u8));
        if let Some(announce) = announce {
            announce.entering();
        }
        let mut state = VcpuRunState::Running;
        loop {
            state = match state {
                VcpuRunState::Running => match messages.try_recv() {
                    Ok(VcpuMessage::Exit) | Err(mpsc::TryRecvError::Disconnected) => break,
                    Ok(VcpuMessage::Pause) => {
                        events.send(VcpuEvent::Paused(self.id));
                        VcpuRunState::Paused
                    }
                    Ok(VcpuMessage::SaveState) => {
                        events.send(VcpuEvent::Saved(self.id, Err("the vCPU is running: pause it first".into())));
                        VcpuRunState::Running
                    }
                    Ok(VcpuMessage::Resume) | Err(mpsc::TryRecvError::Empty) => match self.run_once() {
                        Ok(()) => VcpuRunState::Running,
                        Err(stop) => {
                            events.send(VcpuEvent::Stopped(self.id, stop));
                            VcpuRunState::Stopped
                        }
                    },
                },
                VcpuRunState::Paused => match messages.recv() {
                    Ok(VcpuMessage::Resume) => {
                        events.send(VcpuEvent::Resumed(self.id));
                        VcpuRunState::Running
                    }
                    Ok(VcpuMessage::Pause) => VcpuRunState::Paused,
                    Ok(VcpuMessage::SaveState) => {
                        events.send(VcpuEvent::Saved(self.id, self.save_state()));
                        VcpuRunState::Paused
                    }
                    Ok(VcpuMessage::Exit) | Err(_) => break,
                },
                VcpuRunState::Stopped => match messages.recv() {
                    Ok(VcpuMessage::Exit) | Err(_) => break,
                    Ok(VcpuMessage::SaveState) => {
                        events.send(VcpuEvent::Saved(self.id, Err("the vCPU has stopped".into())));
                        VcpuRunState::Stopped
                    }
                    Ok(_) => VcpuRunState::Stopped,
                },
            };
        }
        IMMEDIATE_EXIT.with(|flag| flag.set(std::ptr::null_mut()));
    }

    /// One KVM_RUN and the handling of its exit. `Err` means the guest cannot go on.
    fn run_once(&mut self) -> Result<(), VcpuStop> {
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                self.io_bus.write(u64::from(port), data);
                Ok(())
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.io_bus.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                Ok(())
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio_bus.read(addr, data) {
                    data.fill(0);
                }
                Ok(())
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.mmio_bus.write(addr, data);
                Ok(())
            }
            Ok(VcpuExit::Shutdown) => Err(VcpuStop::TripleFault { registers: self.registers_after_shutdown() }),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Err(VcpuStop::Failed {
                reason: format!("KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"),
                registers: self.describe_registers(),
            }),
            Ok(VcpuExit::InternalError) => Err(VcpuStop::Failed {
                reason: "KVM internal error (KVM_EXIT_INTERNAL_ERROR: often an instruction KVM cannot emulate)".into(),
                registers: self.describe_registers(),
            }),
            Ok(VcpuExit::Hlt) => Err(VcpuStop::Failed {
                reason: "guest halted with no interrupt source (KVM_EXIT_HLT)".into(),
                registers: self.describe_registers(),
            }),
            Ok(other) => Err(VcpuStop::Failed {
                reason: format!("unexpected KVM exit {other:?}"),
                registers: self.describe_registers(),
            }),
            Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Ok(())
            }
            Err(err) => {
                Err(VcpuStop::Failed { reason: format!("KVM_RUN failed: {err}"), registers: self.describe_registers() })
            }
        }
    }

    /// The registers, for error messages: what a developer needs to find the fault.
    /// The registers after KVM_EXIT_SHUTDOWN, unless KVM has already reset the vCPU (on
    /// SVM its shutdown intercept leaves the VMCB undefined, so KVM puts the vCPU back in
    /// its reset state): those would be the reset vector's, not the guest's.
    fn registers_after_shutdown(&self) -> String {
        let reset = matches!(
            (self.fd.get_regs(), self.fd.get_sregs()),
            (Ok(regs), Ok(sregs)) if regs.rip == 0xfff0 && sregs.cs.selector == 0xf000
        );
        if reset {
            format!("vCPU {}: registers lost (KVM reset the vCPU at the shutdown, as it does on SVM)", self.id)
        } else {
            self.describe_registers()
        }
    }

    pub fn describe_registers(&self) -> String {
        let mut text = format!("vCPU {} registers:", self.id);
        match self.fd.get_regs() {
            Ok(r) => {
                let _ = write!(
                    text,
                    " rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
                    r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
                );
            }
            Err(err) => {
                let _ = write!(text, " (KVM_GET_REGS failed: {err})");
            }
        }
        if let Ok(s) = self.fd.get_sregs() {
            let _ = write!(
                text,
                " cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            );
        }
        text
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VcpuRunState {
    Running,
    Paused,
    Stopped,
}

/// What the last vCPU to start does as it first enters the guest: it says so on stderr,
/// with the process's start and the moment on the host's monotonic clock (which a
/// supervisor that spawned the process can compare with its own), and then runs `then`
/// (work that should wait until the guest runs, without holding it up).
pub struct Announce {
    pub started: Instant,
    pub then: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Announce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announce").field("started", &self.started).finish_non_exhaustive()
    }
}

impl Announce {
    fn entering(self) {
        let since_start = self.started.elapsed();
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes the timespec it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        // The next call is KVM_RUN: the guest's first instruction since start.
        crate::timeline::say(&format!(
            "carrel-vmm: vCPUs running {:.1} ms after start (monotonic {}.{:09})",
            since_start.as_secs_f64() * 1e3,
            now.tv_sec,
            now.tv_nsec
        ));
        if let Some(marks) = crate::timeline::take(self.started) {
            crate::timeline::say(&format!("carrel-vmm: timeline: {marks}"));
        }
        if let Some(then) = self.then {
            then();
        }
    }
}

/// The VMM's handle on a running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    pub id: u8,
    sender: Sender<VcpuMessage>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Sends `message` and kicks the thread out of KVM_RUN so it reads it now.
    pub fn send(&self, message: VcpuMessage) {
        if self.sender.send(message).is_ok() {
            if let Some(thread) = &self.thread {
                // The thread may have ended already; then there is nobody to kick.
                let _ = thread.kill(kick_signal());
            }
        }
    }

    /// Tells the thread to exit and waits for it.
    pub fn exit_and_join(mut self) {
        self.send(VcpuMessage::Exit);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

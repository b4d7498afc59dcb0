//! The one place a VM is wired together, in the order it happens: memory, VM, buses and
//! devices, vCPUs and platform, then the kernel and boot state for a fresh boot
//! ([`build_vm`]) or the saved state for a restore ([`restore_vm`]).

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use carrel_firmware::layout::{self, FIRST_DEVICE_IRQ, LAST_DEVICE_IRQ, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use carrel_firmware::{ports, BootInfo, DeviceEntry, PlatformKind};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootProtocol, BootRequest, BootSetup};
use crate::config::VmConfig;
use crate::devices::bus::{lock, Bus, BusDevice};
use crate::devices::legacy::power::PowerPort;
use crate::devices::legacy::{ConsoleOutput, PowerDevice, SerialDevice, VmExitSignal};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::gpu::GpuDevice;
use crate::devices::virtio::input::{InputDevice, InputKind};
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vhost_user_gpu::VhostUserGpu;
use crate::devices::virtio::vsock::{Vsock, VsockConfig};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::memory::{create_guest_ram, GuestRam};
use crate::platform;
use crate::seccomp::ThreadKind;
use crate::services::input::InputSinks;
use crate::services::screen::ScreenSource;
use crate::snapshot::lazy::{LazyError, LazyMemory};
use crate::snapshot::{self, LoadedSnapshot, SnapshotError, SnapshotState};
use crate::vstate::persist;
use crate::vstate::regs;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;
use carrel_gpu::{Gpu, GpuConfig, RemoteScreen, ViewGate};

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error(transparent)]
    Regs(#[from] crate::vstate::regs::RegsError),
    #[error(transparent)]
    Platform(#[from] crate::platform::PlatformError),
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
    #[error(transparent)]
    Image(#[from] crate::boot::image::ImageError),
    #[error("cannot create the screen: {0}")]
    Gpu(#[from] carrel_gpu::GpuError),
    #[error(transparent)]
    VhostUserGpu(#[from] crate::devices::virtio::vhost_user_gpu::VhostUserGpuError),
    #[error("cannot reach the GPU backend's screen: {0}")]
    ConnectGpuScreen(#[source] carrel_gpu::RemoteError),
    #[error("--gpu-backend needs --gpu-screen: the backend's screen socket, for screenshots and input")]
    MissingGpuScreen,
    #[error(transparent)]
    Input(#[from] crate::devices::virtio::input::InputDeviceError),
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    #[error(transparent)]
    Block(#[from] crate::devices::virtio::block::BlockError),
    #[error(transparent)]
    Rng(#[from] crate::devices::virtio::rng::RngError),
    #[error(transparent)]
    Bus(#[from] crate::devices::bus::BusError),
    #[error("cannot create an eventfd for {what}: {source}")]
    CreateEventFd { what: &'static str, source: std::io::Error },
    #[error("cannot open console log {path}: {source}")]
    OpenConsoleLog { path: String, source: std::io::Error },
    #[error("more virtio devices than interrupt lines")]
    TooManyDevices,
    #[error(transparent)]
    Persist(#[from] crate::vstate::persist::PersistError),
    #[error("cannot restore a device: {0}")]
    VirtioPersist(#[from] crate::devices::virtio::persist::VirtioPersistError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot restore the snapshot: {0}")]
    Restore(String),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// A virtio device as the event loop sees it: its transport and one eventfd per queue.
#[derive(Debug)]
pub struct AttachedVirtio {
    pub name: &'static str,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub queue_events: Vec<EventFd>,
}

/// A built VM, not yet running.
#[derive(Debug)]
pub struct BuiltVm {
    pub vm: Vm,
    pub ram: GuestRam,
    pub vcpus: Vec<Vcpu>,
    pub platform: PlatformKind,
    pub protocol: BootProtocol,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub exit: Arc<VmExitSignal>,
    pub virtio: Vec<AttachedVirtio>,
    /// The screen, when the VM has one.
    pub screen: Option<ScreenSource>,
    /// Keyboard and tablet, which come with the screen.
    pub input: Option<InputSinks>,
    /// How many restores led here (0 for a fresh boot).
    pub restores: u64,
    /// The snapshot this VM was restored from (the parent of its first diff).
    pub restored_from: Option<snapshot::memory::Parent>,
    /// Guest RAM still being filled from the snapshot (a lazy restore).
    pub lazy: Option<LazyMemory>,
    /// The screen as the snapshot kept it, for screenshots until the next frame.
    pub shown: Option<snapshot::shown::Shown>,
    pub started: Instant,
}

/// How a restore loads guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryLoad {
    /// All of it, checked, before the guest runs.
    Eager,
    /// On first touch and in the background (userfaultfd); refused where unavailable.
    Lazy,
    /// Lazily where userfaultfd is available, else eagerly (said on stderr).
    #[default]
    LazyIfPossible,
}

fn eventfd(what: &'static str) -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| BuildError::CreateEventFd { what, source })
}

/// Guest RAM of `mib` MiB: the one made ahead of the configuration
/// ([`crate::vstate::vm::make_ahead`]) when it is of that size, else a new one.
fn guest_ram(mib: u64) -> Result<GuestRam, BuildError> {
    match crate::vstate::vm::take_ram_ahead(mib) {
        Some(ram) => Ok(ram),
        None => Ok(create_guest_ram(mib)?),
    }
}

/// Builds a VM from `config` for a fresh boot, ready for its vCPUs to start.
pub fn build_vm(config: &VmConfig, started: Instant) -> Result<BuiltVm, BuildError> {
    let kernel = config.validate()?;

    let ram = guest_ram(config.mem_mib)?;
    let vm = Vm::new(&ram.memory)?;
    let (wired, boot) = wire_fresh(config, kernel, &vm, &ram)?;
    // kvm_pvm checks the VIF address against the memory slots, which are in by now.
    if boot.wants_vif {
        for vcpu in &wired.vcpus {
            platform::register_vif_page(wired.platform, &vcpu.fd, layout::VIF_ADDR)?;
        }
    }
    Ok(wired.into_built(vm, ram, boot.protocol, 0, started))
}

/// Builds a VM from a snapshot: the same devices as the fresh boot that led to it, each
/// loaded from its saved state; memory read from `memory.bin` and checked. The guest
/// continues where it was when its vCPUs run.
///
/// `config` is the snapshot's `vm.json` with the restore's own names and sockets.
pub fn restore_vm(config: &VmConfig, dir: &Path, load: MemoryLoad, started: Instant) -> Result<BuiltVm, BuildError> {
    config.validate_machine()?;
    let ram = guest_ram(config.mem_mib)?;
    crate::timeline::mark("ram");
    // The VM with its memory slot (about a millisecond per GiB for the kernel) is taken
    // from the thread that made it ahead, or made, on a thread of its own; the threads'
    // seccomp filters are compiled and the kept screen is read there too, while this one
    // reads the snapshot and sets up the loading of its memory.
    let (vm, memory, shown) = std::thread::scope(|scope| {
        let make_vm = || {
            let vm = Vm::new(&ram.memory);
            crate::timeline::mark("vm");
            let filters = crate::seccomp::prepare(&[ThreadKind::Vcpu, ThreadKind::EventLoop, ThreadKind::Control]);
            crate::timeline::mark("filters");
            (vm, filters, snapshot::shown::Shown::read(dir))
        };
        let making = std::thread::Builder::new().name("make-vm".into()).spawn_scoped(scope, make_vm);
        let memory = load_snapshot(config, dir).and_then(|snapshot| {
            let (parents, lazy) = prepare_memory(config, &snapshot, &ram, load)?;
            Ok((snapshot, parents, lazy))
        });
        let (vm, filters, shown) = match making {
            Ok(thread) => thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(_) => make_vm(),
        };
        (filters.map_err(BuildError::from).and(vm.map_err(BuildError::from)), memory, shown)
    });
    crate::timeline::mark("joined");
    let vm = vm?;
    let (snapshot, parents, mut lazy) = memory?;
    let saved = &snapshot.state;
    // The guest runs while the loader fills the screen's memory; the screen waits for it.
    let view_gate = match &mut lazy {
        Some(lazy) => Some(lazy.defer_viewed().map_err(SnapshotError::from)?),
        None => None,
    };
    match &lazy {
        Some(_) => {}
        None => snapshot::read_memory(&ram, &snapshot, &parents)?,
    }
    let wired = wire(config, &vm, &ram, Some(saved), view_gate)?;
    crate::timeline::mark("wired");
    if wired.platform != snapshot.platform {
        return Err(BuildError::Restore(format!(
            "the snapshot was taken on {} KVM and this host runs {} KVM: vCPU state does not move between them",
            snapshot.platform.name(),
            wired.platform.name()
        )));
    }
    vm.restore_state(&saved.vm)?;
    for (vcpu, state) in wired.vcpus.iter().zip(&saved.vcpus) {
        let refused = persist::restore_vcpu(&vcpu.fd, state)?;
        if refused > 0 {
            eprintln!("carrel-vmm: restore: KVM refused {refused} saved MSR(s) of vCPU {}", vcpu.id);
        }
    }
    crate::timeline::mark("vcpus restored");
    let restores = saved.restores + 1;
    if lazy.is_none() {
        for (gpa, bytes) in restore_writes(saved) {
            ram.memory
                .write_slice(&bytes, GuestAddress(gpa))
                .map_err(|err| BuildError::Restore(format!("cannot tell the guest it was restored: {err}")))?;
        }
    }
    let mut built = wired.into_built(vm, ram, saved.protocol, restores, started);
    built.restored_from = Some(snapshot::memory::Parent::new(&snapshot.dir, snapshot.digest));
    built.lazy = lazy;
    // Only for the screen the snapshot saved: its size and frame are the restored ones.
    let gpu = saved.gpu().map(|gpu| (gpu.width, gpu.height, gpu.gpu.last_frame));
    built.shown = shown.filter(|shown| gpu == Some((shown.width, shown.height, shown.frame)));
    Ok(built)
}

/// What a restore writes into guest RAM over the snapshot's bytes (guest address, bytes):
/// Desk re-reads its boot information's restore count to notice it was restored (fresh
/// entropy, reconnects).
fn restore_writes(saved: &SnapshotState) -> Vec<(u64, Vec<u8>)> {
    match saved.protocol {
        BootProtocol::Desk => {
            let restores = saved.restores + 1;
            vec![(layout::BOOT_INFO_ADDR + BootInfo::RESTORES_OFFSET, restores.to_le_bytes().to_vec())]
        }
        _ => Vec::new(),
    }
}

/// The snapshot in `dir`, whose machine must still be the one of `config`.
fn load_snapshot(config: &VmConfig, dir: &Path) -> Result<LoadedSnapshot, BuildError> {
    let snapshot = snapshot::load_snapshot(dir)?;
    let machine = |config: &VmConfig| (config.mem_mib, config.cpus);
    if machine(&snapshot.config) != machine(config) {
        return Err(BuildError::Restore(format!(
            "{} changed while it was restored: {} MiB and {} vCPUs, not {} MiB and {}",
            dir.display(),
            snapshot.config.mem_mib,
            snapshot.config.cpus,
            config.mem_mib,
            config.cpus
        )));
    }
    Ok(snapshot)
}

/// The snapshot's parents, and with a lazy `load` the loader of its memory into `ram`:
/// RAM is registered with userfaultfd before anything (the devices' restore) touches it,
/// and while the VM is built the loader only serves faults.
fn prepare_memory(
    config: &VmConfig,
    snapshot: &LoadedSnapshot,
    ram: &GuestRam,
    load: MemoryLoad,
) -> Result<(Vec<LoadedSnapshot>, Option<LazyMemory>), BuildError> {
    let parents = snapshot::load_parents(snapshot)?;
    let lazy = match load {
        MemoryLoad::Eager => None,
        MemoryLoad::Lazy | MemoryLoad::LazyIfPossible => {
            let layers: Vec<(std::path::PathBuf, &snapshot::memory::MemoryImage)> =
                snapshot::layers(snapshot, &parents).map(|layer| (layer.dir.clone(), &layer.state.memory)).collect();
            let sockets = config.socket.iter().chain(&config.vsock).cloned().collect();
            let mut writes = Vec::new();
            for (gpa, bytes) in restore_writes(&snapshot.state) {
                let offset = crate::memory::ram_offset(gpa, ram.size).ok_or_else(|| {
                    BuildError::Restore(format!("guest address {gpa:#x} is outside a RAM of {} bytes", ram.size))
                })?;
                writes.push((offset, bytes));
            }
            match LazyMemory::start(ram, &layers, snapshot.state.viewed_ram(), writes, sockets) {
                Ok(lazy) => Some(lazy),
                Err(LazyError::Unavailable(err)) if load == MemoryLoad::LazyIfPossible => {
                    eprintln!("carrel-vmm: restore: no userfaultfd ({err}): memory is read whole instead");
                    None
                }
                Err(err) => return Err(SnapshotError::from(err).into()),
            }
        }
    };
    crate::timeline::mark("memory loader");
    Ok((parents, lazy))
}

/// Everything of a VM but its memory and VM fd.
struct Wired {
    vcpus: Vec<Vcpu>,
    platform: PlatformKind,
    serial: Arc<Mutex<SerialDevice>>,
    exit: Arc<VmExitSignal>,
    virtio: Vec<AttachedVirtio>,
    devices: Vec<DeviceEntry>,
    screen: Option<ScreenSource>,
    input: Option<InputSinks>,
}

impl Wired {
    fn into_built(self, vm: Vm, ram: GuestRam, protocol: BootProtocol, restores: u64, started: Instant) -> BuiltVm {
        BuiltVm {
            vm,
            ram,
            vcpus: self.vcpus,
            platform: self.platform,
            protocol,
            serial: self.serial,
            exit: self.exit,
            virtio: self.virtio,
            screen: self.screen,
            input: self.input,
            restores,
            restored_from: None,
            lazy: None,
            shown: None,
            started,
        }
    }
}

/// A fresh boot: devices and vCPUs, then the kernel and the boot state.
fn wire_fresh(
    config: &VmConfig,
    kernel: &std::path::Path,
    vm: &Vm,
    ram: &GuestRam,
) -> Result<(Wired, BootSetup), BuildError> {
    let wired = wire(config, vm, ram, None, None)?;
    let vcpu_count = wired.vcpus.len() as u8;
    let tsc_khz = wired.vcpus[0].fd.get_tsc_khz().unwrap_or(0);
    let request = BootRequest {
        kernel,
        initrd: config.initrd.as_deref(),
        cmdline: config.cmdline.as_deref(),
        protocol: config.boot,
        platform: wired.platform,
        vcpu_count,
        tsc_khz,
        devices: &wired.devices,
        framebuffer: wired.screen.as_ref().map_or((0, 0), ScreenSource::display_size),
    };
    let boot = boot::load(&ram.memory, ram.size, &request)?;
    if boot.wants_pit {
        vm.create_pit()?;
    }

    regs::write_descriptor_tables(&ram.memory)?;
    let mapped_gib = ram_gib(ram.size).clamp(4, layout::PAGE_TABLES_MAX_GIB);
    regs::write_page_tables(&ram.memory, mapped_gib)?;
    let supported = vm.supported_cpuid()?;
    for vcpu in &wired.vcpus {
        let mut cpuid = supported.clone();
        platform::adjust_cpuid(&mut cpuid, wired.platform, boot.guest, vcpu.id, vcpu_count);
        vcpu.set_cpuid(&cpuid)?;
        regs::set_lint(&vcpu.fd, boot.lint)?;
    }
    // The boot vCPU starts at the entry point; the others wait for the guest's SIPI.
    regs::set_entry_state(&wired.vcpus[0].fd, boot.entry)?;
    if boot.guest == platform::GuestKind::Stock {
        for vcpu in &wired.vcpus[1..] {
            regs::set_waiting_for_sipi(&vcpu.fd)?;
        }
    }
    Ok((wired, boot))
}

/// Buses, devices and vCPUs, in that order; with `saved`, every device is loaded from
/// its saved state and must match it one for one.
/// `view_gate`: where RAM is still being filled (a lazy restore), the screen's views of it
/// wait for this gate.
fn wire(
    config: &VmConfig,
    vm: &Vm,
    ram: &GuestRam,
    saved: Option<&SnapshotState>,
    view_gate: Option<ViewGate>,
) -> Result<Wired, BuildError> {
    let vcpu_count = config.cpus as u8;

    // Appended to: a VM's console history goes on across its restarts and wakes.
    let console_log = match &config.console_log {
        Some(path) => Some(
            File::options()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| BuildError::OpenConsoleLog { path: path.display().to_string(), source })?,
        ),
        None => None,
    };
    let console = ConsoleOutput::new(config.console_stdout, console_log);
    let exit = Arc::new(VmExitSignal::new().map_err(|source| BuildError::CreateEventFd { what: "VM exit", source })?);

    let mut io_bus = Bus::new();
    let serial = attach_serial(vm, &mut io_bus, console.clone())?;
    if let Some(saved) = saved {
        lock(&serial).restore(&saved.serial).map_err(BuildError::Restore)?;
    }
    attach_power_ports(&mut io_bus, &exit, ram, &console)?;

    let mut virtio_bus = VirtioBus { vm, ram, mmio: Bus::new(), attached: Vec::new(), entries: Vec::new(), saved };
    if config.rng {
        virtio_bus.attach("rng", Box::new(Rng::new()?))?;
    }

    let mut screen = None;
    let mut input = None;
    // The GPU runs in a vhost-user backend process when one is named, else in this one.
    let gpu: Option<(Box<dyn VirtioDevice>, ScreenSource)> = if let Some(backend) = &config.gpu_backend {
        let screen_socket = config.gpu_screen.as_ref().ok_or(BuildError::MissingGpuScreen)?;
        let device = VhostUserGpu::connect(backend)?;
        let remote = RemoteScreen::connect(screen_socket).map_err(BuildError::ConnectGpuScreen)?;
        Some((Box::new(device), ScreenSource::Remote(Arc::new(remote))))
    } else if let Some((width, height)) = config.display_size()? {
        let mut gpu = Gpu::new(GpuConfig::new(width, height)?, ram.memory.clone())?;
        if let Some(gate) = view_gate {
            gpu.defer_views(gate);
        }
        let device = GpuDevice::new(gpu);
        let local = ScreenSource::Local(device.screen());
        Some((Box::new(device), local))
    } else {
        None
    };
    if let Some((device, source)) = gpu {
        screen = Some(source);
        virtio_bus.attach("gpu", device)?;
        // A screen comes with a keyboard and a tablet (absolute pointer).
        let (keyboard, keyboard_sink) = InputDevice::new(InputKind::Keyboard)?;
        virtio_bus.attach("keyboard", Box::new(keyboard))?;
        let (tablet, tablet_sink) = InputDevice::new(InputKind::Tablet)?;
        virtio_bus.attach("tablet", Box::new(tablet))?;
        input = Some(InputSinks { keyboard: keyboard_sink, tablet: tablet_sink });
    }
    for spec in &config.disks {
        let block = match saved {
            None => Block::new(spec.clone())?,
            Some(_) => Block::awaiting_restore(spec.clone()),
        };
        if let Some(disk) = block.disk() {
            eprintln!("carrel-vmm: disk {}: {} ({})", spec.path.display(), disk.describe(), block.engine_name());
        }
        virtio_bus.attach("disk", Box::new(block))?;
    }
    if let Some(socket) = &config.vsock {
        let vsock = Vsock::new(VsockConfig { guest_cid: config.guest_cid, socket: socket.clone() })?;
        virtio_bus.attach("vsock", Box::new(vsock))?;
    }
    let VirtioBus { mmio, attached: virtio, entries: devices, .. } = virtio_bus;
    if let Some(saved) = saved {
        if saved.virtio.len() != virtio.len() {
            return Err(BuildError::Restore(format!(
                "the snapshot has {} virtio devices, this configuration {}",
                saved.virtio.len(),
                virtio.len()
            )));
        }
    }

    crate::timeline::mark("devices");
    let io_bus = Arc::new(io_bus);
    let mmio_bus = Arc::new(mmio);
    // The first vCPU tells the platform, which decides the MSRs every vCPU saves.
    let mut first = Vcpu::new(vm.fd(), 0, io_bus.clone(), mmio_bus.clone(), Arc::from(Vec::new()))?;
    let platform = platform::detect(&first.fd);
    let msr_indices: Arc<[u32]> = Arc::from(vm.saved_msr_indices(platform)?);
    first.set_msr_indices(msr_indices.clone());
    let mut vcpus = vec![first];
    for id in 1..vcpu_count {
        vcpus.push(Vcpu::new(vm.fd(), id, io_bus.clone(), mmio_bus.clone(), msr_indices.clone())?);
    }
    Ok(Wired { vcpus, platform, serial, exit, virtio, devices, screen, input })
}

fn ram_gib(bytes: u64) -> u64 {
    let end = crate::memory::ram_ranges(bytes).last().map_or(0, |(start, len)| start + len);
    end.div_ceil(1 << 30)
}

fn attach_serial(vm: &Vm, io_bus: &mut Bus, console: ConsoleOutput) -> Result<Arc<Mutex<SerialDevice>>, BuildError> {
    let interrupt = eventfd("serial interrupt")?;
    vm.register_irqfd(&interrupt, layout::SERIAL_IRQ)?;
    let serial = SerialDevice::new(interrupt, console)
        .map_err(|source| BuildError::CreateEventFd { what: "serial interrupt", source })?;
    let serial = Arc::new(Mutex::new(serial));
    io_bus.insert(serial.clone(), u64::from(ports::SERIAL_COM1), 8)?;
    Ok(serial)
}

fn attach_power_ports(
    io_bus: &mut Bus,
    exit: &Arc<VmExitSignal>,
    ram: &GuestRam,
    console: &ConsoleOutput,
) -> Result<(), BuildError> {
    for (port, base, len) in [
        (PowerPort::I8042, ports::I8042_COMMAND, 1),
        (PowerPort::Power, ports::POWER, 1),
        (PowerPort::Console, ports::CONSOLE, 4),
        (PowerPort::AcpiSleepControl, ports::ACPI_SLEEP_CONTROL, 1),
        (PowerPort::AcpiSleepStatus, ports::ACPI_SLEEP_STATUS, 1),
        (PowerPort::AcpiReset, ports::ACPI_RESET, 1),
    ] {
        let device: Arc<Mutex<dyn BusDevice>> =
            Arc::new(Mutex::new(PowerDevice::new(port, exit.clone(), ram.memory.clone(), console.clone())));
        io_bus.insert(device, u64::from(base), len)?;
    }
    Ok(())
}

/// The virtio-mmio bus as devices are attached, one window and interrupt line each.
struct VirtioBus<'a> {
    vm: &'a Vm,
    ram: &'a GuestRam,
    mmio: Bus,
    attached: Vec<AttachedVirtio>,
    entries: Vec<DeviceEntry>,
    /// On a restore, the saved state of each device in attach order.
    saved: Option<&'a SnapshotState>,
}

impl VirtioBus<'_> {
    fn attach(&mut self, name: &'static str, device: Box<dyn VirtioDevice>) -> Result<(), BuildError> {
        let index = self.attached.len();
        let irq = FIRST_DEVICE_IRQ + index as u32;
        if irq > LAST_DEVICE_IRQ {
            return Err(BuildError::TooManyDevices);
        }
        let base = VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE;
        let irqfd = eventfd("virtio interrupt")?;
        self.vm.register_irqfd(&irqfd, irq)?;
        let device_type = device.device_type();
        let queue_count = device.queue_max_sizes().len();
        let interrupt = Arc::new(VirtioInterrupt::new(irqfd));
        let memory = self.ram.memory.clone();
        let transport = match self.saved {
            None => MmioTransport::new(device, memory, interrupt),
            Some(saved) => {
                let state = saved.virtio.get(index).ok_or_else(|| {
                    BuildError::Restore(format!("the snapshot has no state for device {index} ({name})"))
                })?;
                MmioTransport::restore(device, memory, interrupt, state)?
            }
        };
        let transport = Arc::new(Mutex::new(transport));
        let mut queue_events = Vec::with_capacity(queue_count);
        for queue in 0..queue_count {
            let event = eventfd("virtio queue notification")?;
            self.vm.register_mmio_ioevent(&event, base + reg::QUEUE_NOTIFY, queue as u32)?;
            queue_events.push(event);
        }
        self.mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
        self.entries.push(DeviceEntry { base, size: VIRTIO_MMIO_SIZE, irq, device_type });
        self.attached.push(AttachedVirtio { name, transport, queue_events });
        Ok(())
    }
}

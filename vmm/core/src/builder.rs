//! The one place a VM is wired together for a fresh boot, in the order it happens:
//! memory, VM, buses and devices, vCPUs and platform, kernel, boot state.

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use carrel_firmware::layout::{self, FIRST_DEVICE_IRQ, LAST_DEVICE_IRQ, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use carrel_firmware::{ports, DeviceEntry, PlatformKind};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootRequest, BootSetup};
use crate::config::VmConfig;
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::legacy::power::PowerPort;
use crate::devices::legacy::{ConsoleOutput, PowerDevice, SerialDevice, VmExitSignal};
use crate::devices::virtio::gpu::GpuDevice;
use crate::devices::virtio::input::{InputDevice, InputKind, InputSink};
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vhost_user_gpu::VhostUserGpu;
use crate::devices::virtio::vsock::{Vsock, VsockConfig};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::memory::{create_guest_ram, GuestRam};
use crate::platform;
use crate::services::input::InputSinks;
use crate::services::screen::ScreenSource;
use crate::vstate::regs;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;
use carrel_gpu::{Gpu, GpuConfig, RemoteScreen};

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
    Bus(#[from] crate::devices::bus::BusError),
    #[error("cannot create an eventfd for {what}: {source}")]
    CreateEventFd { what: &'static str, source: std::io::Error },
    #[error("cannot open console log {path}: {source}")]
    OpenConsoleLog { path: String, source: std::io::Error },
    #[error("more virtio devices than interrupt lines")]
    TooManyDevices,
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
    pub boot: BootSetup,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub exit: Arc<VmExitSignal>,
    pub virtio: Vec<AttachedVirtio>,
    /// The screen, when the VM has one.
    pub screen: Option<ScreenSource>,
    /// Keyboard and tablet, which come with the screen.
    pub input: Option<InputSinks>,
    pub started: Instant,
}

fn eventfd(what: &'static str) -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| BuildError::CreateEventFd { what, source })
}

/// Builds a VM from `config`, ready for its vCPUs to start.
pub fn build_vm(config: &VmConfig, started: Instant) -> Result<BuiltVm, BuildError> {
    let kernel = config.validate()?;

    let ram = create_guest_ram(config.mem_mib)?;
    let vm = Vm::new()?;
    // Adding a memory slot costs milliseconds inside KVM whatever the size (a fixed cost of
    // the memslot update, most of a start here); nothing below needs the slot until the
    // vCPUs run, so it overlaps with the rest of the build.
    std::thread::scope(|scope| {
        let registering = scope.spawn(|| vm.register_memory(&ram.memory));
        let devices = wire_vm(config, kernel, &vm, &ram);
        let registered = registering.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        registered?;
        let wired = devices?;
        // kvm_pvm checks the VIF address against the memory slots: only now may it be set.
        if wired.boot.wants_vif {
            for vcpu in &wired.vcpus {
                platform::register_vif_page(wired.platform, &vcpu.fd, layout::VIF_ADDR)?;
            }
        }
        Ok::<Wired, BuildError>(wired)
    })
    .map(|wired| BuiltVm {
        vm,
        ram,
        vcpus: wired.vcpus,
        platform: wired.platform,
        boot: wired.boot,
        serial: wired.serial,
        exit: wired.exit,
        virtio: wired.virtio,
        screen: wired.screen,
        input: wired.input,
        started,
    })
}

/// Everything of a VM but its memory and VM fd.
struct Wired {
    vcpus: Vec<Vcpu>,
    platform: PlatformKind,
    boot: BootSetup,
    serial: Arc<Mutex<SerialDevice>>,
    exit: Arc<VmExitSignal>,
    virtio: Vec<AttachedVirtio>,
    screen: Option<ScreenSource>,
    input: Option<InputSinks>,
}

/// Devices, vCPUs, kernel and boot state, in that order.
fn wire_vm(config: &VmConfig, kernel: &std::path::Path, vm: &Vm, ram: &GuestRam) -> Result<Wired, BuildError> {
    let vcpu_count = config.cpus as u8;

    let console_log = match &config.console_log {
        Some(path) => Some(
            File::create(path)
                .map_err(|source| BuildError::OpenConsoleLog { path: path.display().to_string(), source })?,
        ),
        None => None,
    };
    let console = ConsoleOutput::new(config.console_stdout, console_log);
    let exit = Arc::new(VmExitSignal::new().map_err(|source| BuildError::CreateEventFd { what: "VM exit", source })?);

    let mut io_bus = Bus::new();
    let serial = attach_serial(vm, &mut io_bus, console.clone())?;
    attach_power_ports(&mut io_bus, &exit, ram, &console)?;

    let mut mmio_bus = Bus::new();
    let mut virtio = Vec::new();
    let mut devices = Vec::new();
    if config.rng {
        let (attached, entry) = attach_virtio(vm, &mut mmio_bus, ram, "rng", Box::new(Rng::new()), devices.len())?;
        virtio.push(attached);
        devices.push(entry);
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
        let device = GpuDevice::new(Gpu::new(GpuConfig::new(width, height)?, ram.memory.clone())?);
        let local = ScreenSource::Local(device.screen());
        Some((Box::new(device), local))
    } else {
        None
    };
    if let Some((device, source)) = gpu {
        screen = Some(source);
        let (attached, entry) = attach_virtio(vm, &mut mmio_bus, ram, "gpu", device, devices.len())?;
        virtio.push(attached);
        devices.push(entry);
        // A screen comes with a keyboard and a tablet (absolute pointer).
        let mut sink = |kind: InputKind, name: &'static str| -> Result<Arc<InputSink>, BuildError> {
            let (device, sink) = InputDevice::new(kind)?;
            let (attached, entry) = attach_virtio(vm, &mut mmio_bus, ram, name, Box::new(device), devices.len())?;
            virtio.push(attached);
            devices.push(entry);
            Ok(sink)
        };
        let keyboard = sink(InputKind::Keyboard, "keyboard")?;
        let tablet = sink(InputKind::Tablet, "tablet")?;
        input = Some(InputSinks { keyboard, tablet });
    }
    if let Some(socket) = &config.vsock {
        let vsock = Vsock::new(VsockConfig { guest_cid: config.guest_cid, socket: socket.clone() })?;
        let (attached, entry) = attach_virtio(vm, &mut mmio_bus, ram, "vsock", Box::new(vsock), devices.len())?;
        virtio.push(attached);
        devices.push(entry);
    }

    let io_bus = Arc::new(io_bus);
    let mmio_bus = Arc::new(mmio_bus);
    let vcpus = (0..vcpu_count)
        .map(|id| Vcpu::new(vm.fd(), id, io_bus.clone(), mmio_bus.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let platform = platform::detect(&vcpus[0].fd);
    let tsc_khz = vcpus[0].fd.get_tsc_khz().unwrap_or(0);

    let request = BootRequest {
        kernel,
        initrd: config.initrd.as_deref(),
        cmdline: config.cmdline.as_deref(),
        protocol: config.boot,
        platform,
        vcpu_count,
        tsc_khz,
        devices: &devices,
        framebuffer: screen.as_ref().map_or((0, 0), ScreenSource::display_size),
    };
    let boot = boot::load(&ram.memory, ram.size, &request)?;
    if boot.wants_pit {
        vm.create_pit()?;
    }

    regs::write_descriptor_tables(&ram.memory)?;
    let mapped_gib = ram_gib(ram.size).clamp(4, layout::PAGE_TABLES_MAX_GIB);
    regs::write_page_tables(&ram.memory, mapped_gib)?;
    let supported = vm.supported_cpuid()?;
    for vcpu in &vcpus {
        let mut cpuid = supported.clone();
        platform::adjust_cpuid(&mut cpuid, platform, boot.guest, vcpu.id, vcpu_count);
        vcpu.set_cpuid(&cpuid)?;
        regs::set_lint(&vcpu.fd, boot.lint)?;
    }
    // The boot vCPU starts at the entry point; the others wait for the guest's SIPI.
    regs::set_entry_state(&vcpus[0].fd, boot.entry)?;

    Ok(Wired { vcpus, platform, boot, serial, exit, virtio, screen, input })
}

fn ram_gib(bytes: u64) -> u64 {
    let end = crate::memory::ram_ranges(bytes).last().map_or(0, |(start, len)| start + len);
    end.div_ceil(1 << 30)
}

fn attach_serial(vm: &Vm, io_bus: &mut Bus, console: ConsoleOutput) -> Result<Arc<Mutex<SerialDevice>>, BuildError> {
    let interrupt = eventfd("serial interrupt")?;
    vm.register_irqfd(&interrupt, layout::SERIAL_IRQ)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(interrupt, console)));
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
    ] {
        let device: Arc<Mutex<dyn BusDevice>> =
            Arc::new(Mutex::new(PowerDevice::new(port, exit.clone(), ram.memory.clone(), console.clone())));
        io_bus.insert(device, u64::from(base), len)?;
    }
    Ok(())
}

fn attach_virtio(
    vm: &Vm,
    mmio_bus: &mut Bus,
    ram: &GuestRam,
    name: &'static str,
    device: Box<dyn VirtioDevice>,
    index: usize,
) -> Result<(AttachedVirtio, DeviceEntry), BuildError> {
    let irq = FIRST_DEVICE_IRQ + index as u32;
    if irq > LAST_DEVICE_IRQ {
        return Err(BuildError::TooManyDevices);
    }
    let base = VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE;
    let irqfd = eventfd("virtio interrupt")?;
    vm.register_irqfd(&irqfd, irq)?;
    let device_type = device.device_type();
    let queue_count = device.queue_max_sizes().len();
    let interrupt = Arc::new(VirtioInterrupt::new(irqfd));
    let transport = Arc::new(Mutex::new(MmioTransport::new(device, ram.memory.clone(), interrupt)));
    let mut queue_events = Vec::with_capacity(queue_count);
    for queue in 0..queue_count {
        let event = eventfd("virtio queue notification")?;
        vm.register_mmio_ioevent(&event, base + reg::QUEUE_NOTIFY, queue as u32)?;
        queue_events.push(event);
    }
    mmio_bus.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
    let entry = DeviceEntry { base, size: VIRTIO_MMIO_SIZE, irq, device_type };
    Ok((AttachedVirtio { name, transport, queue_events }, entry))
}

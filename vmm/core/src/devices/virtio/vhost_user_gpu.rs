//! The screen out of process: a vhost-user frontend for virtio-gpu. The device model runs
//! in `carrel-gpu-backend` (crate carrel-gpu); this device hands it what the transport
//! negotiated with the driver: features, config space, and on activation the guest RAM
//! (the memfd regions with their offsets, so the backend's zero-copy scanout view maps
//! the guest's pixels in its own process) and the two queues.
//!
//! Queue notifications reach [`VirtioDevice::process_queue`] through the VMM's ioeventfds
//! and become writes to a kick eventfd the backend polls. The backend signals used buffers
//! on one call eventfd shared by both queues; it is this device's event fd, and each call
//! sets the used-ring bit of the interrupt status and raises the interrupt.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::memory::GuestMemoryMmap;
use carrel_firmware::virtio_id;
use carrel_gpu::device::{CONFIG_SPACE_SIZE, QUEUE_SIZES};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::{
    read_config_bytes, ActivateError, ActiveState, DeviceState, VirtioDevice, INTERRUPT_USED_RING,
};

/// How long to wait for the backend's socket to appear and accept, after its process
/// was started.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Protocol features this frontend uses when the backend offers them.
const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::CONFIG
    .union(VhostUserProtocolFeatures::RESET_DEVICE)
    .union(VhostUserProtocolFeatures::REPLY_ACK);

/// Errors connecting to or driving the GPU backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserGpuError {
    #[error("cannot connect to the GPU backend at {path}: {source} (start carrel-gpu-backend --socket {path} first)")]
    ConnectBackend { path: String, source: io::Error },
    #[error("the GPU backend at {path} failed {step}: {source}")]
    Backend { path: String, step: &'static str, source: vhost::Error },
    #[error("cannot create an eventfd for the GPU backend: {0}")]
    CreateEventFd(#[source] io::Error),
    #[error("guest RAM at {gpa:#x} has no memfd behind it, so it cannot be shared with the GPU backend")]
    ShareMemory { gpa: u64 },
    #[error("queue {index} is not in guest RAM")]
    TranslateQueue { index: usize },
    #[error("cannot watch the GPU backend's events: {0}")]
    WatchBackend(#[source] io::Error),
}

/// Tokens of the device's own epoll.
const CALL_TOKEN: u64 = 0;
const BACKEND_SOCKET_TOKEN: u64 = 1;

/// The virtio-gpu device, served by a vhost-user backend process.
pub struct VhostUserGpu {
    path: PathBuf,
    frontend: Frontend,
    /// Virtio feature bits the backend offers, without the vhost-user protocol bit.
    features: u64,
    /// Whether the backend speaks the vhost-user protocol features (and so SET_VRING_ENABLE).
    protocol: bool,
    /// Config space through GET_CONFIG/SET_CONFIG; otherwise `config` stands in for it.
    remote_config: bool,
    reset_device: bool,
    config: [u8; CONFIG_SPACE_SIZE],
    queue_sizes: [u16; 2],
    kicks: Vec<EventFd>,
    call: EventFd,
    /// Watches the backend's call eventfd and its socket (for hang-up): the device's
    /// event fd in the VMM's loop.
    events: Epoll,
    /// The backend closed its socket: the screen is gone until the VM restarts.
    backend_gone: bool,
    state: DeviceState,
}

impl std::fmt::Debug for VhostUserGpu {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("VhostUserGpu")
            .field("path", &self.path)
            .field("features", &format_args!("{:#x}", self.features))
            .field("remote_config", &self.remote_config)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl VhostUserGpu {
    /// Connects to the backend at `path` (waiting a little for it to start listening),
    /// claims it, and learns its features.
    pub fn connect(path: &Path) -> Result<VhostUserGpu, VhostUserGpuError> {
        let name = path.display().to_string();
        let stream = connect_with_retry(path, CONNECT_TIMEOUT)
            .map_err(|source| VhostUserGpuError::ConnectBackend { path: name.clone(), source })?;
        let mut frontend = Frontend::from_stream(stream, QUEUE_SIZES.len() as u64);
        let failed = |step| {
            let path = name.clone();
            move |source| VhostUserGpuError::Backend { path, step, source }
        };
        frontend.set_owner().map_err(failed("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(failed("GET_FEATURES"))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let protocol = offered & protocol_bit != 0;
        let mut negotiated = VhostUserProtocolFeatures::empty();
        if protocol {
            let available = frontend.get_protocol_features().map_err(failed("GET_PROTOCOL_FEATURES"))?;
            negotiated = available & WANTED_PROTOCOL_FEATURES;
            frontend.set_protocol_features(negotiated).map_err(failed("SET_PROTOCOL_FEATURES"))?;
            if negotiated.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every set-up message is acknowledged, so a refusal fails activation
                // instead of passing unnoticed.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(VhostUserGpuError::CreateEventFd);
        // Without GET_CONFIG, the config space is the one the in-process device shows:
        // no events, one scanout.
        let mut config = [0u8; CONFIG_SPACE_SIZE];
        config[8..12].copy_from_slice(&1u32.to_le_bytes());
        let call = eventfd()?;
        let events = Epoll::new().map_err(VhostUserGpuError::WatchBackend)?;
        events
            .ctl(ControlOperation::Add, call.as_raw_fd(), EpollEvent::new(EventSet::IN, CALL_TOKEN))
            .map_err(VhostUserGpuError::WatchBackend)?;
        // The backend never writes unasked on this socket: readable means it hung up.
        let hang_up = EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP;
        events
            .ctl(ControlOperation::Add, frontend.as_raw_fd(), EpollEvent::new(hang_up, BACKEND_SOCKET_TOKEN))
            .map_err(VhostUserGpuError::WatchBackend)?;
        Ok(VhostUserGpu {
            path: path.to_path_buf(),
            frontend,
            features: offered & !protocol_bit,
            protocol,
            remote_config: negotiated.contains(VhostUserProtocolFeatures::CONFIG),
            reset_device: negotiated.contains(VhostUserProtocolFeatures::RESET_DEVICE),
            config,
            queue_sizes: QUEUE_SIZES,
            kicks: vec![eventfd()?, eventfd()?],
            call,
            events,
            backend_gone: false,
            state: DeviceState::Inactive,
        })
    }

    fn failed(&self, step: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserGpuError + '_ {
        move |source| VhostUserGpuError::Backend { path: self.path.display().to_string(), step, source }
    }

    /// Hands the backend the guest RAM and the driver's queues, and starts them.
    fn start_backend(
        &mut self,
        memory: &GuestMemoryMmap,
        queues: &[Queue],
        acked: u64,
    ) -> Result<(), VhostUserGpuError> {
        let protocol_bit = if self.protocol { VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() } else { 0 };
        self.frontend.set_features(acked | protocol_bit).map_err(self.failed("SET_FEATURES"))?;
        let regions = memory
            .iter()
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region)
                    .map_err(|_| VhostUserGpuError::ShareMemory { gpa: region.start_addr().0 })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.frontend.set_mem_table(&regions).map_err(self.failed("SET_MEM_TABLE"))?;
        let mut frontend = self.frontend.clone();
        for (index, queue) in queues.iter().enumerate() {
            // The backend translates ring addresses through the memory table's host
            // addresses (this process's mapping), as vhost-user defines them.
            let host = |addr: u64| {
                memory
                    .get_host_address(GuestAddress(addr))
                    .map(|pointer| pointer as u64)
                    .map_err(|_| VhostUserGpuError::TranslateQueue { index })
            };
            let rings = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host(queue.desc_table())?,
                used_ring_addr: host(queue.used_ring())?,
                avail_ring_addr: host(queue.avail_ring())?,
                log_addr: None,
            };
            frontend.set_vring_num(index, queue.size()).map_err(self.failed("SET_VRING_NUM"))?;
            frontend.set_vring_addr(index, &rings).map_err(self.failed("SET_VRING_ADDR"))?;
            frontend.set_vring_base(index, queue.next_avail()).map_err(self.failed("SET_VRING_BASE"))?;
            frontend.set_vring_kick(index, &self.kicks[index]).map_err(self.failed("SET_VRING_KICK"))?;
            frontend.set_vring_call(index, &self.call).map_err(self.failed("SET_VRING_CALL"))?;
            if self.protocol {
                frontend.set_vring_enable(index, true).map_err(self.failed("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops the backend's queues (GET_VRING_BASE) and resets its device.
    fn stop_backend(&mut self) -> Result<(), VhostUserGpuError> {
        for index in 0..self.queue_sizes.len() {
            self.frontend.get_vring_base(index).map_err(self.failed("GET_VRING_BASE"))?;
        }
        if self.reset_device {
            let mut frontend = self.frontend.clone();
            frontend.reset_device().map_err(self.failed("RESET_DEVICE"))?;
        }
        Ok(())
    }
}

/// Connects to `path`, retrying while the backend has not created or opened its socket.
fn connect_with_retry(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(err)
                if matches!(err.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => return Err(err),
        }
    }
}

impl VirtioDevice for VhostUserGpu {
    fn device_type(&self) -> u32 {
        virtio_id::GPU
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let in_range = offset < CONFIG_SPACE_SIZE as u64 && !data.is_empty();
        if !self.remote_config || !in_range {
            return read_config_bytes(&self.config, offset, data);
        }
        let mut frontend = self.frontend.clone();
        let asked = vec![0u8; data.len()];
        match frontend.get_config(offset as u32, data.len() as u32, VhostUserConfigFlags::empty(), &asked) {
            Ok((_, bytes)) if bytes.len() == data.len() => data.copy_from_slice(&bytes),
            // A backend that cannot answer reads as the local copy: the driver sees a
            // plausible device, and the failure shows at activation.
            _ => read_config_bytes(&self.config, offset, data),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if self.remote_config && offset < CONFIG_SPACE_SIZE as u64 && !data.is_empty() {
            let mut frontend = self.frontend.clone();
            // Only events_clear is writable; a lost write leaves an event bit the driver
            // clears again on its next read.
            let _ = frontend.set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data);
        }
    }

    fn activate(&mut self, state: ActiveState, acked_features: u64) -> Result<(), ActivateError> {
        if state.queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount { needed: self.queue_sizes.len(), got: state.queues.len() });
        }
        if let Err(err) = self.start_backend(&state.memory, &state.queues, acked_features) {
            // The transport sets DEVICE_NEEDS_RESET; the operator needs the cause.
            eprintln!("carrel-vmm: the GPU backend could not be started: {err}");
            return Err(ActivateError::Backend(err.to_string()));
        }
        // Buffers the driver queued before DRIVER_OK get looked at now.
        for kick in &self.kicks {
            let _ = kick.write(1);
        }
        self.state = DeviceState::Active(state);
        Ok(())
    }

    fn reset(&mut self) {
        if matches!(self.state, DeviceState::Active(_)) {
            if let Err(err) = self.stop_backend() {
                eprintln!("carrel-vmm: the GPU backend did not reset: {err}");
            }
        }
        let _ = self.call.read();
        self.state = DeviceState::Inactive;
    }

    fn process_queue(&mut self, index: usize) {
        if let (DeviceState::Active(_), Some(kick)) = (&self.state, self.kicks.get(index)) {
            // A full counter means a kick is pending already.
            let _ = kick.write(1);
        }
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.events.as_raw_fd())
    }

    fn process_events(&mut self) {
        let mut ready = [EpollEvent::default(); 2];
        let count = self.events.wait(0, &mut ready).unwrap_or(0);
        for event in &ready[..count] {
            match event.data() {
                // Reading resets the counter, so the level-triggered event loop sleeps again.
                CALL_TOKEN if self.call.read().is_ok() => {
                    if let DeviceState::Active(active) = &self.state {
                        active.interrupt.signal(INTERRUPT_USED_RING);
                    }
                }
                BACKEND_SOCKET_TOKEN if !self.backend_gone => {
                    // Stop watching (a hang-up stays readable) and say so once; the guest's
                    // requests now go unanswered and screenshots fail with the cause.
                    let _ = self.events.ctl(ControlOperation::Delete, self.frontend.as_raw_fd(), EpollEvent::default());
                    self.backend_gone = true;
                    eprintln!(
                        "carrel-vmm: the GPU backend at {} hung up; the screen is gone until the VM restarts",
                        self.path.display()
                    );
                }
                _ => {}
            }
        }
    }

    fn active_queues(&self) -> Option<&[virtio_queue::Queue]> {
        None
    }

    fn save(&self) -> Result<super::persist::VirtioDeviceState, super::persist::VirtioPersistError> {
        Err(super::persist::VirtioPersistError::Save {
            device: "gpu",
            reason: "snapshots of a VM whose screen runs in a vhost-user backend are not implemented yet".into(),
        })
    }

    fn restore(
        &mut self,
        _state: &super::persist::VirtioDeviceState,
    ) -> Result<(), super::persist::VirtioPersistError> {
        Err(super::persist::VirtioPersistError::Save {
            device: "gpu",
            reason: "restoring into a vhost-user GPU backend is not implemented yet".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use carrel_gpu::backend::{BackendConfig, BoundBackend};
    use carrel_gpu::protocol::{CMD_GET_DISPLAY_INFO, RESP_OK_DISPLAY_INFO};
    use carrel_gpu::GpuConfig;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    use crate::devices::virtio::{VirtioInterrupt, VIRTIO_F_VERSION_1};
    use crate::memory::create_guest_ram;

    const REQUEST: u64 = 0x4_0000;
    const RESPONSE: u64 = 0x4_1000;

    /// Runs a carrel-gpu backend on a fresh socket in this process; returns its socket and
    /// the thread serving it (which ends when the frontend disconnects).
    fn start_backend(name: &str) -> (PathBuf, std::thread::JoinHandle<Result<(), String>>) {
        let base = std::env::temp_dir().join(format!("carrel-vhost-user-gpu-{}-{name}", std::process::id()));
        let config = BackendConfig {
            socket: base.with_extension("vhost.sock"),
            screen_socket: base.with_extension("screen.sock"),
            gpu: GpuConfig::default(),
        };
        let socket = config.socket.clone();
        let bound = BoundBackend::bind(config).unwrap();
        (socket, std::thread::spawn(move || bound.serve().map_err(|err| err.to_string())))
    }

    fn wait_readable(fd: RawFd) -> bool {
        let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut poll, 1, 5_000) == 1 }
    }

    #[test]
    fn connect_offers_backend_features_without_the_protocol_bit_and_reads_config_from_it() {
        let (socket, backend) = start_backend("config");
        let device = VhostUserGpu::connect(&socket).unwrap();
        assert_eq!(device.device_type(), virtio_id::GPU);
        assert_eq!(device.device_features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert_eq!(device.device_features() & carrel_gpu::Gpu::features(), carrel_gpu::Gpu::features());
        assert!(device.remote_config);
        let mut scanouts = [0u8; 4];
        device.read_config(8, &mut scanouts);
        assert_eq!(u32::from_le_bytes(scanouts), 1);
        let mut past_end = [0xffu8; 4];
        device.read_config(64, &mut past_end);
        assert_eq!(past_end, [0; 4]);
        drop(device);
        assert_eq!(backend.join().unwrap(), Ok(()), "the backend ends cleanly with its frontend");
    }

    #[test]
    fn request_is_kicked_to_backend_and_its_call_raises_the_used_ring_interrupt_before_and_after_reset() {
        let (socket, backend) = start_backend("queue");
        let mut device = VhostUserGpu::connect(&socket).unwrap();
        let ram = create_guest_ram(16).unwrap();
        let control = MockSplitQueue::create(&ram.memory, GuestAddress(0x1_0000), 16);
        let cursor = MockSplitQueue::create(&ram.memory, GuestAddress(0x2_0000), 16);
        let mut header = [0u8; 24];
        header[..4].copy_from_slice(&CMD_GET_DISPLAY_INFO.to_le_bytes());
        ram.memory.write_slice(&header, GuestAddress(REQUEST)).unwrap();
        let chain = [
            RawDescriptor::from(Descriptor::new(REQUEST, 24, 1, 1)),
            RawDescriptor::from(Descriptor::new(RESPONSE, 408, 2, 0)),
        ];
        control.add_desc_chains(&chain, 0).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let queues = vec![control.create_queue().unwrap(), cursor.create_queue().unwrap()];
        let state = ActiveState { memory: ram.memory.clone(), queues, interrupt: interrupt.clone() };
        device.activate(state, VIRTIO_F_VERSION_1).unwrap();

        device.process_queue(0);
        assert!(wait_readable(device.event_fd().unwrap()), "the backend signals the call eventfd");
        device.process_events();
        assert_ne!(interrupt.status() & INTERRUPT_USED_RING, 0);
        assert_eq!(control.used().idx().load(), 1);
        let response: u32 = ram.memory.read_obj(GuestAddress(RESPONSE)).unwrap();
        assert_eq!(response, RESP_OK_DISPLAY_INFO);
        let width: u32 = ram.memory.read_obj(GuestAddress(RESPONSE + 24 + 8)).unwrap();
        assert_eq!(width, 1280);

        // After a reset the driver sets the queues up afresh and the device serves again.
        device.reset();
        assert!(matches!(device.state, DeviceState::Inactive));
        ram.memory.write_slice(&[0u8; 0x2_0000], GuestAddress(0x1_0000)).unwrap();
        let control = MockSplitQueue::create(&ram.memory, GuestAddress(0x1_0000), 16);
        let cursor = MockSplitQueue::create(&ram.memory, GuestAddress(0x2_0000), 16);
        control.add_desc_chains(&chain, 0).unwrap();
        ram.memory.write_obj(0u32, GuestAddress(RESPONSE)).unwrap();
        let queues = vec![control.create_queue().unwrap(), cursor.create_queue().unwrap()];
        let state = ActiveState { memory: ram.memory.clone(), queues, interrupt: interrupt.clone() };
        interrupt.acknowledge(u32::MAX);
        device.activate(state, VIRTIO_F_VERSION_1).unwrap();
        device.process_queue(0);
        assert!(wait_readable(device.event_fd().unwrap()), "the backend serves the new queues");
        device.process_events();
        assert_ne!(interrupt.status() & INTERRUPT_USED_RING, 0);
        assert_eq!(control.used().idx().load(), 1);
        assert_eq!(ram.memory.read_obj::<u32>(GuestAddress(RESPONSE)).unwrap(), RESP_OK_DISPLAY_INFO);

        drop(device);
        assert_eq!(backend.join().unwrap(), Ok(()));
    }

    #[test]
    fn connect_to_missing_backend_names_the_program_to_start() {
        let path = std::env::temp_dir().join(format!("carrel-vhost-user-gpu-{}-missing.sock", std::process::id()));
        let error = connect_with_retry(&path, Duration::ZERO).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        let error = VhostUserGpuError::ConnectBackend { path: path.display().to_string(), source: error };
        assert!(error.to_string().contains("start carrel-gpu-backend"), "{error}");
    }
}

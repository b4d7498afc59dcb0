//! The virtio-gpu device as a vhost-user backend: [`GpuBackend`] runs [`Gpu`] on the queues
//! a vhost-user frontend (carrel-vmm) hands over, in the guest memory the frontend shares
//! with VHOST_USER_SET_MEM_TABLE. Those regions are the frontend's memfd, mapped with their
//! file and offset, so the zero-copy scanout view maps the guest's pixels in this process
//! exactly as it does inside the VMM.
//!
//! [`BoundBackend`] is the whole `carrel-gpu-backend` process: the screen socket
//! ([`crate::remote`]) and one frontend, served until it disconnects.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use vm_memory::{FileOffset, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::device::{Gpu, GpuConfig, GpuError, CONTROL_QUEUE, CURSOR_QUEUE, QUEUE_SIZES};
use crate::memory::{GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use crate::screen::Screen;

/// VIRTIO_F_VERSION_1: a vhost-user backend offers the transport's feature bits too.
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Largest config-space read answered (the GPU's is 16 bytes; the rest reads as zero).
const MAX_CONFIG_READ: u32 = 256;

/// Errors starting or running the backend process.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot create the device: {0}")]
    CreateDevice(#[from] GpuError),
    #[error("cannot listen on the screen socket {path}: {source}")]
    BindScreenSocket { path: String, source: io::Error },
    #[error("cannot start the screen server thread: {0}")]
    StartScreenServer(#[source] io::Error),
    #[error("cannot listen on the vhost-user socket {path}: {message}")]
    BindVhostSocket { path: String, message: String },
    #[error("cannot set up the vhost-user daemon: {message}")]
    CreateDaemon { message: String },
    #[error("serving the frontend on {path} failed: {message}")]
    ServeFrontend { path: String, message: String },
}

/// The device behind the vhost-user protocol. Requests arrive on the daemon's thread and
/// kicks on its worker thread, so the device sits behind a lock.
#[derive(Debug)]
pub struct GpuBackend {
    gpu: Mutex<Gpu>,
    screen: Arc<Screen>,
}

impl GpuBackend {
    /// A device with no guest memory yet: it arrives with VHOST_USER_SET_MEM_TABLE.
    pub fn new(config: GpuConfig) -> Result<GpuBackend, GpuError> {
        let gpu = Gpu::new(config, GuestMemoryMmap::new())?;
        let screen = gpu.screen();
        Ok(GpuBackend { gpu: Mutex::new(gpu), screen })
    }

    /// The screen, for the screen socket.
    pub fn screen(&self) -> Arc<Screen> {
        Arc::clone(&self.screen)
    }

    fn lock(&self) -> MutexGuard<'_, Gpu> {
        // A panic elsewhere while holding the lock leaves the device usable: keep going.
        self.gpu.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The frontend's memory table as vhost-user-backend maps it (no dirty bitmap).
type FrontendMemory = vm_memory::GuestMemoryMmap<()>;

/// The frontend's memory mapped again with the device's memory type. The bitmap records
/// nothing anyone reads: this process's writes are not part of the VMM's dirty tracking,
/// and the VMM does not snapshot a VM whose GPU runs here.
fn with_bitmap(memory: &FrontendMemory) -> io::Result<GuestMemoryMmap> {
    let mut regions = Vec::new();
    for region in memory.iter() {
        let file = region.file_offset().ok_or_else(|| io::Error::other("guest memory region without a file"))?;
        let offset = FileOffset::new(file.file().try_clone()?, file.start());
        let mapping = MmapRegion::from_file(offset, region.len() as usize).map_err(io::Error::other)?;
        regions.push(
            GuestRegionMmap::new(mapping, region.start_addr())
                .ok_or_else(|| io::Error::other("guest memory region out of range"))?,
        );
    }
    GuestMemoryMmap::from_regions(regions).map_err(io::Error::other)
}

impl VhostUserBackend for GpuBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        QUEUE_SIZES.len()
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZES.iter().copied().max().unwrap_or(0) as usize
    }

    fn features(&self) -> u64 {
        Gpu::features() | VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::RESET_DEVICE
    }

    // EVENT_IDX is not offered, so it is never enabled.
    fn set_event_idx(&self, _enabled: bool) {}

    fn reset_device(&self) {
        self.lock().reset();
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The frontend checks that the answer has exactly the size it asked for.
        let mut config = vec![0u8; size.min(MAX_CONFIG_READ) as usize];
        self.lock().read_config(u64::from(offset), &mut config);
        config
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.lock().write_config(u64::from(offset), buf);
        Ok(())
    }

    fn update_memory(&self, memory: GuestMemoryAtomic<FrontendMemory>) -> io::Result<()> {
        // A new memory table comes with each activation: the device starts afresh in it, so
        // no resource keeps a backing checked against the old table.
        let tracked = with_bitmap(&memory.memory())?;
        let mut gpu = self.lock();
        gpu.reset();
        gpu.memory = tracked;
        Ok(())
    }

    fn exit_event(&self, _thread: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without an exit event the worker thread could not be told to end, and dropping
        // the daemon (which joins it) would hang once the frontend has gone.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _events: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        let index = usize::from(device_event);
        let Some(vring) = vrings.get(index) else {
            return Err(io::Error::other(format!("event for unknown queue {index}")));
        };
        let mut gpu = self.lock();
        let mut vring = vring.get_mut();
        let notify = match index {
            CONTROL_QUEUE => gpu.process_control_queue(vring.get_queue_mut()),
            CURSOR_QUEUE => gpu.process_cursor_queue(vring.get_queue_mut()),
            _ => false,
        };
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

/// Where the backend listens and what it shows.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// The vhost-user socket the frontend connects to.
    pub socket: PathBuf,
    /// The screen socket ([`crate::remote`]).
    pub screen_socket: PathBuf,
    pub gpu: GpuConfig,
}

/// A backend listening on both sockets, not yet serving.
pub struct BoundBackend {
    config: BackendConfig,
    daemon: VhostUserDaemon<Arc<GpuBackend>>,
    listener: Listener,
}

impl std::fmt::Debug for BoundBackend {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("BoundBackend").field("config", &self.config).finish_non_exhaustive()
    }
}

impl BoundBackend {
    /// Creates the device, starts the screen server and listens for the frontend. Stale
    /// socket files at either path are replaced.
    pub fn bind(config: BackendConfig) -> Result<BoundBackend, BackendError> {
        let backend = Arc::new(GpuBackend::new(config.gpu)?);
        let screen_listener = bind_replacing(&config.screen_socket).map_err(|source| {
            BackendError::BindScreenSocket { path: config.screen_socket.display().to_string(), source }
        })?;
        let screen = backend.screen();
        std::thread::Builder::new()
            .name("screen-server".into())
            .spawn(move || crate::remote::serve(screen_listener, screen))
            .map_err(BackendError::StartScreenServer)?;
        let memory = GuestMemoryAtomic::new(FrontendMemory::new());
        let daemon = VhostUserDaemon::new("carrel-gpu-backend".into(), backend, memory)
            .map_err(|err| BackendError::CreateDaemon { message: err.to_string() })?;
        let listener = Listener::new(&config.socket, true).map_err(|err| BackendError::BindVhostSocket {
            path: config.socket.display().to_string(),
            message: err.to_string(),
        })?;
        Ok(BoundBackend { config, daemon, listener })
    }

    /// Serves one frontend until it disconnects (a clean end), then removes the sockets.
    pub fn serve(mut self) -> Result<(), BackendError> {
        let path = self.config.socket.display().to_string();
        let fail = |err: vhost_user_backend::Error| BackendError::ServeFrontend {
            path: path.clone(),
            message: err.to_string(),
        };
        let result = self.daemon.start(&mut self.listener).and_then(|()| self.daemon.wait());
        let _ = std::fs::remove_file(&self.config.screen_socket);
        match result {
            Ok(()) => Ok(()),
            // The frontend went away, as a VMM does when its VM ends.
            Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage | VhostUserError::SocketBroken(_),
            )) => Ok(()),
            Err(err) => Err(fail(err)),
        }
    }
}

/// Binds a Unix listener at `path`, replacing a socket file left by an earlier run.
fn bind_replacing(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket()) {
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Rect;
    use crate::testing::{memfd_memory, Harness, MEMORY_SIZE, PIXELS_ADDR};

    #[test]
    fn features_offer_version_1_and_protocol_features_but_not_event_idx() {
        let backend = GpuBackend::new(GpuConfig::default()).unwrap();
        let features = backend.features();
        assert_eq!(features & Gpu::features(), Gpu::features());
        assert_ne!(features & VIRTIO_F_VERSION_1, 0);
        assert_ne!(features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert_eq!(features & (1 << 29), 0, "EVENT_IDX is not offered");
        assert!(backend.protocol_features().contains(VhostUserProtocolFeatures::CONFIG));
        assert_eq!((backend.num_queues(), backend.max_queue_size()), (2, 256));
    }

    #[test]
    fn get_config_answers_exactly_the_size_asked_with_one_scanout() {
        let backend = GpuBackend::new(GpuConfig::default()).unwrap();
        assert_eq!(backend.get_config(8, 4), 1u32.to_le_bytes());
        assert_eq!(backend.get_config(0, 16).len(), 16);
        assert_eq!(backend.get_config(12, 40), vec![0; 40], "past the end reads as zero");
        assert_eq!(backend.get_config(0, u32::MAX).len(), MAX_CONFIG_READ as usize, "reads are capped");
    }

    /// The memory table as vhost-user-backend maps it from the frontend's fd.
    fn frontend_memory(memfd: &std::fs::File) -> FrontendMemory {
        let offset = FileOffset::new(memfd.try_clone().unwrap(), 0);
        let mapping = vm_memory::MmapRegion::from_file(offset, MEMORY_SIZE as usize).unwrap();
        let region = vm_memory::GuestRegionMmap::new(mapping, vm_memory::GuestAddress(0)).unwrap();
        FrontendMemory::from_regions(vec![region]).unwrap()
    }

    #[test]
    fn update_memory_views_the_memfd_and_a_new_table_resets_the_device() {
        let backend = GpuBackend::new(GpuConfig::default()).unwrap();
        let (memory, memfd) = memfd_memory(&[(0, MEMORY_SIZE)]);
        backend.update_memory(GuestMemoryAtomic::new(frontend_memory(&memfd))).unwrap();
        {
            // Drive the backend's device as a queue would, through a harness sharing it.
            let mut harness = Harness { memory: memory.clone(), gpu: Gpu::new(GpuConfig::default(), memory).unwrap() };
            std::mem::swap(&mut harness.gpu, &mut backend.lock());
            harness.show(1, 16, 16, PIXELS_ADDR);
            harness.flush(1, Rect::new(0, 0, 16, 16));
            std::mem::swap(&mut harness.gpu, &mut backend.lock());
        }
        assert_eq!(backend.screen().latest_frame().unwrap().number, 1);
        assert_eq!(backend.screen().scanout_is_zero_copy(), Some(true), "the memfd view works here too");
        let (_, memfd) = memfd_memory(&[(0, MEMORY_SIZE)]);
        backend.update_memory(GuestMemoryAtomic::new(frontend_memory(&memfd))).unwrap();
        assert_eq!(backend.screen().scanout_size(), None, "a new memory table starts a fresh device");
        assert_eq!(backend.lock().resource_bytes(), 0);
    }
}

//! Saved state of a virtio device and its MMIO transport: plain serde data.
//!
//! The transport saves its register file and the queues as the device runs them (their
//! ring positions live in the active device). [`MmioTransport::restore`] rebuilds a
//! transport around a freshly built device: each queue is checked as virtio-queue checks
//! a driver's set-up, the device loads its own state, and a device that was running is
//! activated again with the saved queues.

use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::block::BlockState;
use super::gpu::GpuDeviceState;
use super::input::InputState;
use super::mmio::{status, MmioTransport};
use super::vsock::VsockState;
use super::{ActiveState, VirtioDevice, VirtioInterrupt};

/// Errors saving or restoring a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPersistError {
    #[error("cannot snapshot the {device} device: {reason}")]
    Save { device: &'static str, reason: String },
    #[error("saved {saved} device does not match this VM's {built} device: the snapshot is for another configuration")]
    WrongDevice { saved: String, built: &'static str },
    #[error("saved queue {index} of the {device} device is invalid: {reason}")]
    BadQueue { device: &'static str, index: usize, reason: String },
    #[error("saved {device} device state is invalid: {reason}")]
    BadState { device: &'static str, reason: String },
}

/// One queue as saved: virtio-queue's `QueueState`, which is not serde itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSaved {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl QueueSaved {
    pub fn of(queue: &Queue) -> QueueSaved {
        let state = queue.state();
        QueueSaved {
            max_size: state.max_size,
            next_avail: state.next_avail,
            next_used: state.next_used,
            event_idx_enabled: state.event_idx_enabled,
            size: state.size,
            ready: state.ready,
            desc_table: state.desc_table,
            avail_ring: state.avail_ring,
            used_ring: state.used_ring,
        }
    }

    /// The queue, checked as virtio-queue checks a queue the driver set up.
    pub fn to_queue(self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// A device's own state, one variant per device kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    Rng,
    Gpu(GpuDeviceState),
    Input(InputState),
    Vsock(VsockState),
    Block(BlockState),
}

impl VirtioDeviceState {
    pub fn kind(&self) -> &'static str {
        match self {
            VirtioDeviceState::Rng => "rng",
            VirtioDeviceState::Gpu(_) => "gpu",
            VirtioDeviceState::Input(_) => "input",
            VirtioDeviceState::Vsock(_) => "vsock",
            VirtioDeviceState::Block(_) => "block",
        }
    }
}

/// A transport and its device as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub queue_select: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    /// The register view of every queue (what the driver set up).
    pub queues: Vec<QueueSaved>,
    /// The queues the running device works on, with their ring positions; empty unless
    /// the device is active.
    pub active_queues: Vec<QueueSaved>,
    pub device: VirtioDeviceState,
}

impl MmioTransport {
    /// The transport's and its device's state; only while the vCPUs are paused and the
    /// event loop is not processing this device.
    pub fn save(&self) -> Result<MmioState, VirtioPersistError> {
        let device = &self.device;
        let active_queues = match device.active_queues() {
            Some(queues) if self.status & status::DRIVER_OK != 0 => queues.iter().map(QueueSaved::of).collect(),
            _ => Vec::new(),
        };
        Ok(MmioState {
            device_type: device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(QueueSaved::of).collect(),
            active_queues,
            device: device.save()?,
        })
    }

    /// A transport for the freshly built `device` in the state `saved`: every part is
    /// checked before anything runs, and a device that was active is active again.
    pub fn restore(
        mut device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        saved: &MmioState,
    ) -> Result<MmioTransport, VirtioPersistError> {
        let name = saved.device.kind();
        if saved.device_type != device.device_type() {
            return Err(VirtioPersistError::WrongDevice {
                saved: format!("{} (virtio type {})", name, saved.device_type),
                built: device_name(device.device_type()),
            });
        }
        let max_sizes = device.queue_max_sizes().to_vec();
        if saved.queues.len() != max_sizes.len() {
            return Err(VirtioPersistError::BadQueue {
                device: name,
                index: saved.queues.len(),
                reason: format!("{} queues saved, the device has {}", saved.queues.len(), max_sizes.len()),
            });
        }
        let queue = |index: usize, queue: &QueueSaved| -> Result<Queue, VirtioPersistError> {
            let bad = |reason: String| VirtioPersistError::BadQueue { device: name, index, reason };
            if max_sizes.get(index) != Some(&queue.max_size) {
                return Err(bad(format!("max size {} is not the device's", queue.max_size)));
            }
            queue.to_queue().map_err(|err| bad(format!("{err:?}")))
        };
        let queues = saved.queues.iter().enumerate().map(|(i, q)| queue(i, q)).collect::<Result<Vec<_>, _>>()?;
        device.restore(&saved.device)?;
        let active = saved.status & status::DRIVER_OK != 0 && saved.status & status::DEVICE_NEEDS_RESET == 0;
        if active {
            let ready: Vec<usize> = (0..queues.len()).filter(|&i| queues[i].ready()).collect();
            if saved.active_queues.len() != ready.len() {
                return Err(VirtioPersistError::BadQueue {
                    device: name,
                    index: ready.len(),
                    reason: format!("{} running queues saved, {} set up", saved.active_queues.len(), ready.len()),
                });
            }
            let mut running = Vec::with_capacity(ready.len());
            for (position, &index) in ready.iter().enumerate() {
                let running_queue = queue(index, &saved.active_queues[position])?;
                if !running_queue.is_valid(&memory) {
                    return Err(VirtioPersistError::BadQueue {
                        device: name,
                        index,
                        reason: "its rings are not inside guest memory".into(),
                    });
                }
                running.push(running_queue);
            }
            let state = ActiveState { memory: memory.clone(), queues: running, interrupt: interrupt.clone() };
            device
                .activate(state, saved.driver_features)
                .map_err(|err| VirtioPersistError::BadState { device: name, reason: err.to_string() })?;
        }
        if saved.interrupt_status != 0 {
            interrupt.signal(saved.interrupt_status);
        }
        let mut transport = MmioTransport::new(device, memory, interrupt);
        transport.queues = queues;
        transport.status = saved.status;
        transport.driver_features = saved.driver_features;
        transport.device_features_select = saved.device_features_select;
        transport.driver_features_select = saved.driver_features_select;
        transport.queue_select = saved.queue_select;
        transport.config_generation = saved.config_generation;
        Ok(transport)
    }
}

fn device_name(device_type: u32) -> &'static str {
    use carrel_firmware::virtio_id;
    match device_type {
        virtio_id::ENTROPY => "rng",
        virtio_id::GPU => "gpu",
        virtio_id::INPUT => "input",
        virtio_id::VSOCK => "vsock",
        _ => "unknown",
    }
}

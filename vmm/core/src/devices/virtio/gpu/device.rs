//! The virtio-gpu adapter: hands carrel-gpu its queues and raises its interrupt.

use std::sync::Arc;

use carrel_firmware::virtio_id;
use carrel_gpu::{Gpu, Screen};

use virtio_queue::Queue;

use super::persist::GpuDeviceState;
use crate::devices::virtio::persist::{VirtioDeviceState, VirtioPersistError};
use crate::devices::virtio::{ActivateError, ActiveState, DeviceState, VirtioDevice, INTERRUPT_USED_RING};

const CONTROL_QUEUE: usize = 0;
const CURSOR_QUEUE: usize = 1;

/// The virtio-gpu device.
#[derive(Debug)]
pub struct GpuDevice {
    gpu: Gpu,
    queue_sizes: [u16; 2],
    state: DeviceState,
}

impl GpuDevice {
    pub fn new(gpu: Gpu) -> GpuDevice {
        GpuDevice { gpu, queue_sizes: Gpu::queue_sizes(), state: DeviceState::Inactive }
    }

    /// The shared view of the screen: frames, waits and captures from any thread.
    pub fn screen(&self) -> Arc<Screen> {
        self.gpu.screen()
    }
}

impl VirtioDevice for GpuDevice {
    fn device_type(&self) -> u32 {
        virtio_id::GPU
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        Gpu::features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.gpu.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.gpu.write_config(offset, data);
    }

    fn activate(&mut self, state: ActiveState, _acked_features: u64) -> Result<(), ActivateError> {
        if state.queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount { needed: self.queue_sizes.len(), got: state.queues.len() });
        }
        self.state = DeviceState::Active(state);
        Ok(())
    }

    fn reset(&mut self) {
        self.gpu.reset();
        self.state = DeviceState::Inactive;
    }

    fn process_queue(&mut self, index: usize) {
        let DeviceState::Active(active) = &mut self.state else { return };
        let Some(queue) = active.queues.get_mut(index) else { return };
        let notify = match index {
            CONTROL_QUEUE => self.gpu.process_control_queue(queue),
            CURSOR_QUEUE => self.gpu.process_cursor_queue(queue),
            _ => false,
        };
        if notify {
            active.interrupt.signal(INTERRUPT_USED_RING);
        }
    }

    fn active_queues(&self) -> Option<&[Queue]> {
        self.state.queues()
    }

    fn save(&self) -> Result<VirtioDeviceState, VirtioPersistError> {
        let config = self.gpu.config();
        Ok(VirtioDeviceState::Gpu(GpuDeviceState { width: config.width, height: config.height, gpu: self.gpu.save() }))
    }

    fn restore(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioPersistError> {
        let VirtioDeviceState::Gpu(saved) = state else {
            return Err(VirtioPersistError::WrongDevice { saved: state.kind().into(), built: "gpu" });
        };
        let config = self.gpu.config();
        if (saved.width, saved.height) != (config.width, config.height) {
            return Err(VirtioPersistError::BadState {
                device: "gpu",
                reason: format!(
                    "saved display {}x{}, this VM's is {}x{}",
                    saved.width, saved.height, config.width, config.height
                ),
            });
        }
        self.gpu.load(&saved.gpu).map_err(|err| VirtioPersistError::BadState { device: "gpu", reason: err.to_string() })
    }
}

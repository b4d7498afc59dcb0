//! The screen's saved state: the display size it was built with and carrel-gpu's own
//! [`GpuState`] (resources, scanout, cursor, frame number).

use carrel_gpu::GpuState;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDeviceState {
    pub width: u32,
    pub height: u32,
    pub gpu: GpuState,
}

//! Saved device state for snapshots: plain serde data, untrusted on the way back in.
//!
//! [`Gpu::restore`] rebuilds a device by replaying the saved state as the commands that
//! made it (create, attach backing, set scanout, transfer), so a restored state passes the
//! same checks as the guest's own commands. Guest memory is an argument, never saved; the
//! scanout view is mapped afresh (or falls back to a copy when restored RAM is mapped
//! privately, as after a lazy snapshot restore).

use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};

use crate::capture::CursorImage;
use crate::device::{Gpu, GpuConfig, GpuError, MAX_CURSOR_DIMENSION};
use crate::protocol::{Command, MemoryEntry, Rect, Response};
use crate::screen::CursorState;

/// Errors restoring a saved device.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot set up the restored device: {0}")]
    CreateDevice(#[from] GpuError),
    #[error("saved resource {resource_id} is rejected ({response:?}): the snapshot does not match this VM")]
    RestoreResource { resource_id: u32, response: Response },
    #[error("saved scanout of resource {resource_id} is rejected ({response:?})")]
    RestoreScanout { resource_id: u32, response: Response },
    #[error("saved cursor image {width}x{height} with {len} bytes is malformed")]
    RestoreCursor { width: u32, height: u32, len: usize },
}

/// One resource as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceState {
    pub resource_id: u32,
    /// The virtio format code.
    pub format: u32,
    pub width: u32,
    pub height: u32,
    /// Guest-physical (address, length) runs; `None` when no backing is attached.
    pub backing: Option<Vec<(u64, u32)>>,
}

/// The cursor as saved.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CursorSaved {
    pub x: u32,
    pub y: u32,
    pub hot_x: u32,
    pub hot_y: u32,
    /// (width, height, RGBA bytes); `None` while hidden.
    pub image: Option<(u32, u32, Vec<u8>)>,
}

/// Everything the device needs to carry on after a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuState {
    pub resources: Vec<ResourceState>,
    /// (resource id, x, y, width, height) of the scanout, if one is set.
    pub scanout: Option<(u32, u32, u32, u32, u32)>,
    pub cursor: CursorSaved,
    pub events_read: u32,
    /// The last frame number, so numbering continues after a restore.
    pub last_frame: u64,
}

impl Gpu {
    /// The device's state, for a snapshot.
    pub fn save(&self) -> GpuState {
        let mut resources: Vec<ResourceState> = self
            .resources()
            .map(|(resource_id, format, width, height, backing)| ResourceState {
                resource_id,
                format: format.virtio_code(),
                width,
                height,
                backing: backing.map(|b| b.entries().iter().map(|e| (e.addr, e.length)).collect()),
            })
            .collect();
        resources.sort_by_key(|r| r.resource_id);
        let screen = self.screen();
        let (scanout, cursor, last_frame) = screen.saved_parts();
        let cursor = CursorSaved {
            x: cursor.x,
            y: cursor.y,
            hot_x: cursor.hot_x,
            hot_y: cursor.hot_y,
            image: cursor.image.as_ref().map(|image| (image.width, image.height, image.rgba.clone())),
        };
        GpuState {
            resources,
            scanout: scanout.map(|(id, r)| (id, r.x, r.y, r.width, r.height)),
            cursor,
            events_read: self.events_read(),
            last_frame,
        }
    }

    /// A device rebuilt from `state` on `memory`, every part checked as a guest command.
    pub fn restore(config: GpuConfig, memory: GuestMemoryMmap, state: &GpuState) -> Result<Gpu, PersistError> {
        let mut gpu = Gpu::new(config, memory)?;
        gpu.load(state)?;
        Ok(gpu)
    }

    /// Loads `state` into this device after a reset, keeping its [`crate::Screen`] (whoever
    /// holds the screen sees the restored one). A state that fails a check leaves the
    /// device reset.
    pub fn load(&mut self, state: &GpuState) -> Result<(), PersistError> {
        self.reset();
        let result = self.replay(state);
        if result.is_err() {
            self.reset();
        }
        result
    }

    fn replay(&mut self, state: &GpuState) -> Result<(), PersistError> {
        let gpu = self;
        for resource in &state.resources {
            let resource_id = resource.resource_id;
            let mut replay = |command: Command| match gpu.execute(&command) {
                Response::OkNoData => Ok(()),
                response => Err(PersistError::RestoreResource { resource_id, response }),
            };
            let (width, height) = (resource.width, resource.height);
            replay(Command::ResourceCreate2d { resource_id, format: resource.format, width, height })?;
            if let Some(backing) = &resource.backing {
                let entries = backing.iter().map(|&(addr, length)| MemoryEntry { addr, length }).collect();
                replay(Command::ResourceAttachBacking { resource_id, entries })?;
                // A copy-backed resource starts from the guest's pixels, not black.
                replay(Command::TransferToHost2d { rect: Rect::new(0, 0, width, height), offset: 0, resource_id })?;
            }
        }
        if let Some((resource_id, x, y, width, height)) = state.scanout {
            let command = Command::SetScanout { rect: Rect::new(x, y, width, height), scanout_id: 0, resource_id };
            match gpu.execute(&command) {
                Response::OkNoData => {}
                response => return Err(PersistError::RestoreScanout { resource_id, response }),
            }
        }
        let saved = &state.cursor;
        let image = match &saved.image {
            None => None,
            Some((width, height, rgba)) => {
                let fits = (1..=MAX_CURSOR_DIMENSION).contains(width) && (1..=MAX_CURSOR_DIMENSION).contains(height);
                if !fits || rgba.len() != (*width * *height * 4) as usize {
                    return Err(PersistError::RestoreCursor { width: *width, height: *height, len: rgba.len() });
                }
                Some(Arc::new(CursorImage { width: *width, height: *height, rgba: rgba.clone() }))
            }
        };
        let screen = gpu.screen();
        screen.set_cursor(CursorState { image, hot_x: saved.hot_x, hot_y: saved.hot_y, x: saved.x, y: saved.y });
        let shown = state.scanout.map(|(_, _, _, width, height)| Rect::new(0, 0, width, height));
        screen.continue_frames_from(state.last_frame, shown);
        gpu.set_events_read(state.events_read);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode::{attach_backing, words};
    use crate::protocol::{CMD_RESOURCE_CREATE_2D, CMD_UPDATE_CURSOR};
    use crate::testing::*;
    use crate::CaptureOptions;

    fn busy_device() -> Harness {
        let mut harness = Harness::new();
        harness.show(1, 64, 32, PIXELS_ADDR);
        harness.paint(PIXELS_ADDR, 64, 32, pattern);
        harness.ok(&words(CMD_RESOURCE_CREATE_2D, &[2, 1, 4, 4]));
        harness.ok(&attach_backing(2, &[(PIXELS_ADDR + 0x10_0000, 64)]));
        harness.ok(&words(CMD_RESOURCE_CREATE_2D, &[3, 67, 8, 8]));
        harness.send_cursor(&words(CMD_UPDATE_CURSOR, &[0, 10, 20, 0, 2, 1, 1, 0]));
        harness.flush(1, Rect::new(0, 0, 64, 32));
        harness.flush(1, Rect::new(0, 0, 64, 32));
        harness
    }

    #[test]
    fn gpu_state_round_trips_through_restore() {
        let harness = busy_device();
        let saved = harness.gpu.save();
        let bytes = postcard::to_allocvec(&saved).unwrap();
        let loaded: GpuState = postcard::from_bytes(&bytes).unwrap();
        let restored = Gpu::restore(GpuConfig::default(), harness.memory.clone(), &loaded).unwrap();
        assert_eq!(restored.save(), saved);
        assert_eq!(restored.resource_bytes(), harness.gpu.resource_bytes());
        let options = CaptureOptions { cursor: true, ..CaptureOptions::default() };
        let before = harness.gpu.screen().capture(&options).unwrap();
        let after = restored.screen().capture(&options).unwrap();
        assert_eq!(before.bytes, after.bytes, "same pixels, same cursor");
        assert_eq!(restored.screen().scanout_is_zero_copy(), Some(true));
    }

    #[test]
    fn restore_continues_frame_numbers() {
        let harness = busy_device();
        let mut restored = Harness {
            memory: harness.memory.clone(),
            gpu: Gpu::restore(GpuConfig::default(), harness.memory.clone(), &harness.gpu.save()).unwrap(),
        };
        assert_eq!(restored.gpu.screen().latest_frame().unwrap().number, 2, "the saved frame is on screen");
        restored.flush(1, Rect::new(0, 0, 1, 1));
        assert_eq!(restored.gpu.screen().latest_frame().unwrap().number, 3);
    }

    #[test]
    fn restore_into_private_ram_copies_pixels_once() {
        let harness = busy_device();
        let private = anonymous_memory();
        let mut pixels = vec![0u8; 64 * 32 * 4];
        vm_memory::Bytes::read_slice(&harness.memory, &mut pixels, vm_memory::GuestAddress(PIXELS_ADDR)).unwrap();
        vm_memory::Bytes::write_slice(&private, &pixels, vm_memory::GuestAddress(PIXELS_ADDR)).unwrap();
        let restored = Gpu::restore(GpuConfig::default(), private, &harness.gpu.save()).unwrap();
        assert_eq!(restored.screen().scanout_is_zero_copy(), Some(false));
        let capture = restored.screen().capture(&CaptureOptions::default()).unwrap();
        assert_eq!(capture.bytes, pixels);
    }

    #[test]
    fn restore_with_backing_outside_ram_is_rejected() {
        let harness = busy_device();
        let mut state = harness.gpu.save();
        state.resources[0].backing = Some(vec![(MEMORY_SIZE, 8192)]);
        let error = Gpu::restore(GpuConfig::default(), harness.memory.clone(), &state).unwrap_err();
        assert!(matches!(error, PersistError::RestoreResource { resource_id: 1, .. }), "{error}");
    }

    #[test]
    fn restore_with_duplicate_or_oversized_resources_is_rejected() {
        let harness = busy_device();
        let mut state = harness.gpu.save();
        state.resources.push(state.resources[0].clone());
        assert!(Gpu::restore(GpuConfig::default(), harness.memory.clone(), &state).is_err());
        let mut state = harness.gpu.save();
        state.resources[2].width = u32::MAX;
        assert!(Gpu::restore(GpuConfig::default(), harness.memory.clone(), &state).is_err());
    }

    #[test]
    fn restore_with_bad_scanout_or_cursor_is_rejected() {
        let harness = busy_device();
        let mut state = harness.gpu.save();
        state.scanout = Some((1, 0, 0, 65, 32));
        assert!(matches!(
            Gpu::restore(GpuConfig::default(), harness.memory.clone(), &state),
            Err(PersistError::RestoreScanout { .. })
        ));
        let mut state = harness.gpu.save();
        state.cursor.image = Some((4, 4, vec![0; 3]));
        assert!(matches!(
            Gpu::restore(GpuConfig::default(), harness.memory.clone(), &state),
            Err(PersistError::RestoreCursor { .. })
        ));
    }
}

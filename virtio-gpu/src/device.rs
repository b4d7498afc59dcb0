//! The virtio-gpu device: configuration, features, config space, and the 2D resources
//! the guest creates, backs with its RAM, and shows on the one scanout.
//!
//! Every command the guest sends is checked here before it touches host state: unknown
//! resource ids, rectangles outside their resource, backing outside guest RAM, and sizes
//! past the caps each get the virtio-gpu error response and a counter, never a panic.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::memory::GuestMemoryMmap;

use crate::capture::CursorImage;
use crate::edid::edid_for;
use crate::format::PixelFormat;
use crate::metrics::{bump, GpuMetrics};
use crate::protocol::{Command, CursorPosition, ErrorCode, MemoryEntry, Rect, Response};
use crate::screen::{CursorState, Scanout, Screen};
use crate::surface::{DeferredView, Storage, Surface};
use crate::view::{Backing, MappedView, ViewGate};

/// Largest display the device offers.
pub const MAX_DISPLAY_WIDTH: u32 = 3840;
pub const MAX_DISPLAY_HEIGHT: u32 = 2160;
/// Display size when the VM's configuration names none.
pub const DEFAULT_DISPLAY_WIDTH: u32 = 1280;
pub const DEFAULT_DISPLAY_HEIGHT: u32 = 800;
/// Default cap on the bytes of all resources together (width * height * 4 each).
pub const DEFAULT_MAX_RESOURCE_BYTES: u64 = 256 << 20;
/// Largest width or height of one resource.
pub const MAX_RESOURCE_DIMENSION: u32 = 16384;
/// Most resources alive at once (each costs host bookkeeping even at 1x1).
pub const MAX_RESOURCES: usize = 4096;
/// Largest cursor image accepted by UPDATE_CURSOR (drivers use 64x64).
pub const MAX_CURSOR_DIMENSION: u32 = 256;
/// Feature bit VIRTIO_GPU_F_EDID.
pub const VIRTIO_GPU_F_EDID: u64 = 1 << 1;
/// Queue sizes: control queue, cursor queue.
pub const QUEUE_SIZES: [u16; 2] = [256, 16];
/// Index of the control queue.
pub const CONTROL_QUEUE: usize = 0;
/// Index of the cursor queue.
pub const CURSOR_QUEUE: usize = 1;
/// Config-space event bit: the display configuration changed.
pub const EVENT_DISPLAY: u32 = 1;
/// Size of `struct virtio_gpu_config`.
pub const CONFIG_SPACE_SIZE: usize = 16;

/// Errors setting the device up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    #[error(
        "display size {width}x{height} is out of range: width 1..={MAX_DISPLAY_WIDTH}, height 1..={MAX_DISPLAY_HEIGHT}"
    )]
    CheckDisplaySize { width: u32, height: u32 },
    #[error("resource memory cap of {bytes} bytes cannot hold one full-screen resource ({needed} bytes); raise it")]
    CheckResourceMemory { bytes: u64, needed: u64 },
}

/// How the device is configured by the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuConfig {
    pub width: u32,
    pub height: u32,
    /// Cap on the bytes of all resources together; creations past it get ERR_OUT_OF_MEMORY.
    pub max_resource_bytes: u64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            width: DEFAULT_DISPLAY_WIDTH,
            height: DEFAULT_DISPLAY_HEIGHT,
            max_resource_bytes: DEFAULT_MAX_RESOURCE_BYTES,
        }
    }
}

impl GpuConfig {
    /// A checked configuration for a `width` x `height` display with the default cap.
    pub fn new(width: u32, height: u32) -> Result<GpuConfig, GpuError> {
        let config = GpuConfig { width, height, ..GpuConfig::default() };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), GpuError> {
        if !(1..=MAX_DISPLAY_WIDTH).contains(&self.width) || !(1..=MAX_DISPLAY_HEIGHT).contains(&self.height) {
            return Err(GpuError::CheckDisplaySize { width: self.width, height: self.height });
        }
        let needed = self.width as u64 * self.height as u64 * PixelFormat::BYTES_PER_PIXEL as u64;
        if self.max_resource_bytes < needed {
            return Err(GpuError::CheckResourceMemory { bytes: self.max_resource_bytes, needed });
        }
        Ok(())
    }
}

/// A 2D resource the guest created.
#[derive(Debug)]
struct Resource {
    format: PixelFormat,
    width: u32,
    height: u32,
    backing: Option<Backing>,
    surface: Option<Arc<Surface>>,
}

impl Resource {
    fn stride(&self) -> usize {
        self.width as usize * PixelFormat::BYTES_PER_PIXEL as usize
    }

    fn byte_len(&self) -> u64 {
        self.width as u64 * self.height as u64 * PixelFormat::BYTES_PER_PIXEL as u64
    }
}

/// The virtio-gpu 2D device model.
#[derive(Debug)]
pub struct Gpu {
    config: GpuConfig,
    pub(crate) memory: GuestMemoryMmap,
    resources: HashMap<u32, Resource>,
    resource_bytes: u64,
    events_read: u32,
    screen: Arc<Screen>,
    pub(crate) metrics: Arc<GpuMetrics>,
    /// Set while guest RAM is still being filled: views wait for it (see [`ViewGate`]).
    view_gate: Option<ViewGate>,
}

impl Gpu {
    /// A device for a guest whose RAM is `memory`.
    pub fn new(config: GpuConfig, memory: GuestMemoryMmap) -> Result<Gpu, GpuError> {
        config.validate()?;
        Ok(Gpu {
            config,
            memory,
            resources: HashMap::new(),
            resource_bytes: 0,
            events_read: 0,
            screen: Arc::new(Screen::new(config.width, config.height)),
            metrics: Arc::new(GpuMetrics::default()),
            view_gate: None,
        })
    }

    /// Views of guest RAM made from now on are mapped on their first read, once `gate`
    /// opens, instead of at once: for RAM that a lazy restore is still filling.
    pub fn defer_views(&mut self, gate: ViewGate) {
        self.view_gate = Some(gate);
    }

    pub fn config(&self) -> &GpuConfig {
        &self.config
    }

    /// Device feature bits (VIRTIO_F_VERSION_1 is the transport's to add).
    pub fn features() -> u64 {
        VIRTIO_GPU_F_EDID
    }

    pub fn queue_sizes() -> [u16; 2] {
        QUEUE_SIZES
    }

    /// The screen, for readers on other threads.
    pub fn screen(&self) -> Arc<Screen> {
        Arc::clone(&self.screen)
    }

    pub fn metrics(&self) -> Arc<GpuMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Bytes of all live resources (width * height * 4 each), counted against the cap.
    pub fn resource_bytes(&self) -> u64 {
        self.resource_bytes
    }

    /// Reads `struct virtio_gpu_config` at `offset`; bytes past its end read as zero.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SPACE_SIZE];
        config[0..4].copy_from_slice(&self.events_read.to_le_bytes());
        config[8..12].copy_from_slice(&1u32.to_le_bytes()); // num_scanouts
        data.fill(0);
        if let Some(available) = usize::try_from(offset).ok().and_then(|start| config.get(start..)) {
            let count = available.len().min(data.len());
            data[..count].copy_from_slice(&available[..count]);
        }
    }

    /// Writes config space: only `events_clear` is writable; it clears bits of `events_read`.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let (4, Ok(bytes)) = (offset, <[u8; 4]>::try_from(data)) {
            self.events_read &= !u32::from_le_bytes(bytes);
        }
    }

    /// Every resource as (id, format, width, height, backing), for saving.
    pub(crate) fn resources(&self) -> impl Iterator<Item = (u32, PixelFormat, u32, u32, Option<&Backing>)> {
        self.resources.iter().map(|(id, r)| (*id, r.format, r.width, r.height, r.backing.as_ref()))
    }

    pub(crate) fn events_read(&self) -> u32 {
        self.events_read
    }

    pub(crate) fn set_events_read(&mut self, events: u32) {
        self.events_read = events;
    }

    /// Raises a display-change event for the driver to read (the transport signals the
    /// config interrupt).
    pub fn signal_display_event(&mut self) {
        self.events_read |= EVENT_DISPLAY;
    }

    /// Returns to the power-on state: no resources, no scanout, no cursor. Frame numbers
    /// keep counting up.
    pub fn reset(&mut self) {
        self.screen.reset();
        self.resources.clear();
        self.resource_bytes = 0;
        self.events_read = 0;
    }

    /// Runs one parsed command and returns its response. Public so tools and benchmarks
    /// can drive the device without a virtqueue.
    pub fn execute(&mut self, command: &Command) -> Response {
        let result = match command {
            Command::GetDisplayInfo => {
                Ok(Response::OkDisplayInfo { width: self.config.width, height: self.config.height })
            }
            Command::GetEdid { scanout_id } => self
                .check_scanout(*scanout_id)
                .map(|()| Response::OkEdid { edid: edid_for(self.config.width, self.config.height).to_vec() }),
            Command::ResourceCreate2d { resource_id, format, width, height } => {
                self.create_resource(*resource_id, *format, *width, *height)
            }
            Command::ResourceUnref { resource_id } => self.unref_resource(*resource_id),
            Command::SetScanout { rect, scanout_id, resource_id } => self.set_scanout(*rect, *scanout_id, *resource_id),
            Command::ResourceFlush { rect, resource_id } => self.flush_resource(*rect, *resource_id),
            Command::TransferToHost2d { rect, offset, resource_id } => {
                self.transfer_to_host(*rect, *offset, *resource_id)
            }
            Command::ResourceAttachBacking { resource_id, entries } => self.attach_backing(*resource_id, entries),
            Command::ResourceDetachBacking { resource_id } => self.detach_backing(*resource_id),
            Command::UpdateCursor { position, resource_id, hot_x, hot_y } => {
                self.update_cursor(position, *resource_id, *hot_x, *hot_y)
            }
            Command::MoveCursor { position } => self.check_scanout(position.scanout_id).map(|()| {
                self.screen.move_cursor(position.x, position.y);
                Response::OkNoData
            }),
            Command::Unsupported { .. } => Err(ErrorCode::Unspec),
        };
        result.unwrap_or_else(Response::Error)
    }

    fn check_scanout(&self, scanout_id: u32) -> Result<(), ErrorCode> {
        if scanout_id == 0 {
            Ok(())
        } else {
            Err(ErrorCode::InvalidScanoutId)
        }
    }

    fn resource(&self, resource_id: u32) -> Result<&Resource, ErrorCode> {
        self.resources.get(&resource_id).ok_or(ErrorCode::InvalidResourceId)
    }

    fn create_resource(
        &mut self,
        resource_id: u32,
        format: u32,
        width: u32,
        height: u32,
    ) -> Result<Response, ErrorCode> {
        if resource_id == 0 || self.resources.contains_key(&resource_id) {
            return Err(ErrorCode::InvalidResourceId);
        }
        let format = PixelFormat::from_virtio(format).ok_or(ErrorCode::InvalidParameter)?;
        let dimension_ok = |d: u32| (1..=MAX_RESOURCE_DIMENSION).contains(&d);
        if !dimension_ok(width) || !dimension_ok(height) {
            return Err(ErrorCode::InvalidParameter);
        }
        let resource = Resource { format, width, height, backing: None, surface: None };
        let bytes = resource.byte_len();
        if self.resources.len() >= MAX_RESOURCES || self.resource_bytes + bytes > self.config.max_resource_bytes {
            return Err(ErrorCode::OutOfMemory);
        }
        self.resource_bytes += bytes;
        self.resources.insert(resource_id, resource);
        Ok(Response::OkNoData)
    }

    fn unref_resource(&mut self, resource_id: u32) -> Result<Response, ErrorCode> {
        let resource = self.resources.remove(&resource_id).ok_or(ErrorCode::InvalidResourceId)?;
        self.resource_bytes -= resource.byte_len();
        if self.screen.scanout_resource() == Some(resource_id) {
            self.screen.set_scanout(None);
        }
        Ok(Response::OkNoData)
    }

    fn set_scanout(&mut self, rect: Rect, scanout_id: u32, resource_id: u32) -> Result<Response, ErrorCode> {
        self.check_scanout(scanout_id)?;
        if resource_id == 0 {
            self.screen.set_scanout(None);
            return Ok(Response::OkNoData);
        }
        let resource = self.resource(resource_id)?;
        if rect.is_empty() || !rect.fits_in(resource.width, resource.height) {
            return Err(ErrorCode::InvalidParameter);
        }
        let surface = resource.surface.clone();
        self.screen.set_scanout(Some(Scanout { resource_id, rect, surface }));
        Ok(Response::OkNoData)
    }

    fn flush_resource(&mut self, rect: Rect, resource_id: u32) -> Result<Response, ErrorCode> {
        let resource = self.resource(resource_id)?;
        if !rect.fits_in(resource.width, resource.height) {
            return Err(ErrorCode::InvalidParameter);
        }
        if self.screen.flush(resource_id, rect) {
            bump(&self.metrics.frames);
        }
        Ok(Response::OkNoData)
    }

    fn transfer_to_host(&mut self, rect: Rect, offset: u64, resource_id: u32) -> Result<Response, ErrorCode> {
        let resource = self.resource(resource_id)?;
        if !rect.fits_in(resource.width, resource.height) {
            return Err(ErrorCode::InvalidParameter);
        }
        let (Some(backing), Some(surface)) = (&resource.backing, &resource.surface) else {
            return Err(ErrorCode::Unspec);
        };
        if rect.is_empty() {
            return Ok(Response::OkNoData);
        }
        // Source rows start at `offset` and are one resource stride apart (as in QEMU and
        // crosvm); all of them must lie in the backing.
        let stride = resource.stride() as u64;
        let row_bytes = rect.width as u64 * PixelFormat::BYTES_PER_PIXEL as u64;
        let source_end = (rect.height as u64 - 1)
            .checked_mul(stride)
            .and_then(|rows| rows.checked_add(offset))
            .and_then(|start| start.checked_add(row_bytes));
        if source_end.is_none_or(|end| end > backing.len()) {
            return Err(ErrorCode::InvalidParameter);
        }
        // A view of guest RAM already shows what the guest wrote: the transfer is only
        // damage, which the following flush reports.
        let Some(mut pixels) = surface.copy_buffer() else {
            return Ok(Response::OkNoData);
        };
        for row in 0..rect.height as u64 {
            let target = (rect.y as u64 + row) * stride + rect.x as u64 * PixelFormat::BYTES_PER_PIXEL as u64;
            let Some(target) = pixels.get_mut(target as usize..(target + row_bytes) as usize) else {
                return Err(ErrorCode::Unspec);
            };
            backing.read(&self.memory, offset + row * stride, target).map_err(|_| ErrorCode::Unspec)?;
        }
        self.metrics
            .transfer_copy_bytes
            .fetch_add(row_bytes * rect.height as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(Response::OkNoData)
    }

    fn attach_backing(&mut self, resource_id: u32, entries: &[MemoryEntry]) -> Result<Response, ErrorCode> {
        let resource = self.resources.get_mut(&resource_id).ok_or(ErrorCode::InvalidResourceId)?;
        if resource.backing.is_some() {
            return Err(ErrorCode::Unspec);
        }
        let backing = Backing::new(&self.memory, entries).map_err(|_| ErrorCode::InvalidParameter)?;
        let byte_len = resource.byte_len();
        if backing.len() < byte_len {
            return Err(ErrorCode::InvalidParameter);
        }
        let mapped = match &self.view_gate {
            Some(gate) => MappedView::check(&self.memory, &backing, byte_len)
                .and_then(|()| DeferredView::new(self.memory.clone(), backing.clone(), byte_len, gate.clone()))
                .map(Storage::Deferred),
            None => MappedView::map(&self.memory, &backing, byte_len).map(Storage::Mapped),
        };
        let storage = match mapped {
            Ok(storage) => {
                bump(&self.metrics.zero_copy_resources);
                storage
            }
            // Backing that cannot be viewed in place is still valid guest memory: copy it
            // on each transfer instead. The copy's size is already within the memory cap.
            Err(_) => {
                bump(&self.metrics.copy_fallback_resources);
                Storage::Copied(RwLock::new(vec![0; byte_len as usize]))
            }
        };
        let surface = Arc::new(Surface {
            width: resource.width,
            height: resource.height,
            stride: resource.stride(),
            format: resource.format,
            storage,
        });
        resource.backing = Some(backing);
        resource.surface = Some(Arc::clone(&surface));
        self.screen.replace_surface(resource_id, Some(surface));
        Ok(Response::OkNoData)
    }

    fn detach_backing(&mut self, resource_id: u32) -> Result<Response, ErrorCode> {
        let resource = self.resources.get_mut(&resource_id).ok_or(ErrorCode::InvalidResourceId)?;
        if resource.backing.take().is_none() {
            return Err(ErrorCode::Unspec);
        }
        // Readers still holding the surface keep the view mapped until they finish.
        resource.surface = None;
        self.screen.replace_surface(resource_id, None);
        Ok(Response::OkNoData)
    }

    fn update_cursor(
        &mut self,
        position: &CursorPosition,
        resource_id: u32,
        hot_x: u32,
        hot_y: u32,
    ) -> Result<Response, ErrorCode> {
        self.check_scanout(position.scanout_id)?;
        let mut cursor = CursorState { image: None, hot_x, hot_y, x: position.x, y: position.y };
        if resource_id != 0 {
            let resource = self.resource(resource_id)?;
            if resource.width > MAX_CURSOR_DIMENSION || resource.height > MAX_CURSOR_DIMENSION {
                return Err(ErrorCode::InvalidParameter);
            }
            let surface = resource.surface.as_ref().ok_or(ErrorCode::Unspec)?;
            let pixels = surface.pixels(Rect::new(0, 0, resource.width, resource.height)).ok_or(ErrorCode::Unspec)?;
            // The image is copied now, as the spec intends: the guest may reuse the resource.
            let mut row = vec![0u8; pixels.row_bytes()];
            let mut rgba = Vec::with_capacity(row.len() * resource.height as usize);
            for y in 0..resource.height {
                pixels.read_row(y, &mut row);
                rgba.extend(row.chunks_exact(4).flat_map(|pixel| resource.format.cursor_to_rgba(pixel)));
            }
            cursor.image = Some(Arc::new(CursorImage { width: resource.width, height: resource.height, rgba }));
        }
        self.screen.set_cursor(cursor);
        Ok(Response::OkNoData)
    }
}

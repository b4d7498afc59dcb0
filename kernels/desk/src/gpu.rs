//! virtio-gpu driver, 2D: two guest-RAM framebuffers flipped by SET_SCANOUT, so the host
//! never captures a half-drawn frame. Each `present` is one frame: transfer (damage
//! only), set scanout, flush.

use crate::virtio::{empty_queue, Buffer, MmioDevice, SplitQueue, VirtioError, Virtqueue};
use crate::{phys, GuestCell};

const GET_DISPLAY_INFO: u32 = 0x0100;
const RESOURCE_CREATE_2D: u32 = 0x0101;
const SET_SCANOUT: u32 = 0x0103;
const RESOURCE_FLUSH: u32 = 0x0104;
const TRANSFER_TO_HOST_2D: u32 = 0x0105;
const RESOURCE_ATTACH_BACKING: u32 = 0x0106;
const RESP_OK_NODATA: u32 = 0x1100;
const RESP_OK_DISPLAY_INFO: u32 = 0x1101;
/// B8G8R8X8: bytes B, G, R, X in memory, so a pixel is the u32 0x00RRGGBB.
const FORMAT_B8G8R8X8: u32 = 2;
const MAX_SCANOUTS: usize = 16;

static CONTROL_QUEUE: GuestCell<SplitQueue> = GuestCell::new(empty_queue());
static CURSOR_QUEUE: GuestCell<SplitQueue> = GuestCell::new(empty_queue());

/// Why the display could not be used.
#[allow(dead_code)] // fields are read through Debug in the error line
#[derive(Debug, Clone, Copy)]
pub enum GpuError {
    Virtio(VirtioError),
    NoDisplay,
    OutOfMemory { bytes: u64 },
    Command { command: u32, response: u32 },
}

impl From<VirtioError> for GpuError {
    fn from(err: VirtioError) -> Self {
        GpuError::Virtio(err)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Header {
    kind: u32,
    flags: u32,
    fence_id: u64,
    context_id: u32,
    ring_index: u8,
    padding: [u8; 3],
}

impl Header {
    fn new(kind: u32) -> Header {
        Header { kind, ..Default::default() }
    }
}

/// A rectangle in screen pixels.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    /// The smallest rectangle holding both.
    pub fn union(self, other: Rect) -> Rect {
        let x = self.x.min(other.x);
        let y = self.y.min(other.y);
        let right = (self.x + self.width).max(other.x + other.width);
        let bottom = (self.y + self.height).max(other.y + other.height);
        Rect { x, y, width: right - x, height: bottom - y }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DisplayMode {
    rect: Rect,
    enabled: u32,
    flags: u32,
}

#[repr(C)]
struct DisplayInfo {
    header: Header,
    modes: [DisplayMode; MAX_SCANOUTS],
}

#[repr(C)]
struct ResourceCreate2d {
    header: Header,
    resource_id: u32,
    format: u32,
    width: u32,
    height: u32,
}

#[repr(C)]
struct AttachBacking {
    header: Header,
    resource_id: u32,
    entry_count: u32,
    address: u64,
    length: u32,
    padding: u32,
}

#[repr(C)]
struct SetScanout {
    header: Header,
    rect: Rect,
    scanout_id: u32,
    resource_id: u32,
}

#[repr(C)]
struct ResourceFlush {
    header: Header,
    rect: Rect,
    resource_id: u32,
    padding: u32,
}

#[repr(C)]
struct TransferToHost2d {
    header: Header,
    rect: Rect,
    offset: u64,
    resource_id: u32,
    padding: u32,
}

/// The screen: two resources backed by guest RAM.
pub struct Display {
    device: MmioDevice,
    control: Virtqueue,
    _cursor: Virtqueue,
    pub width: u32,
    pub height: u32,
    buffers: [u64; 2],
    front: usize,
    timeout_cycles: u64,
    pub frames: u64,
    /// What changed in the frame on screen: the back buffer, two frames old, lacks it.
    previous_damage: Option<Rect>,
}

impl Display {
    pub fn new(base: u64, timeout_cycles: u64) -> Result<Display, GpuError> {
        let device = MmioDevice::negotiate(base, carrel_firmware::virtio_id::GPU, 0)?;
        let control = device.setup_queue(0, &CONTROL_QUEUE)?;
        let cursor = device.setup_queue(1, &CURSOR_QUEUE)?;
        device.activate();
        let mut display = Display {
            device,
            control,
            _cursor: cursor,
            width: 0,
            height: 0,
            buffers: [0; 2],
            front: 1,
            timeout_cycles,
            frames: 0,
            previous_damage: None,
        };

        let mut info = DisplayInfo { header: Header::default(), modes: [DisplayMode::default(); MAX_SCANOUTS] };
        display.command(&Header::new(GET_DISPLAY_INFO), Buffer::writable(&mut info), GET_DISPLAY_INFO)?;
        if info.header.kind != RESP_OK_DISPLAY_INFO || info.modes[0].enabled == 0 {
            return Err(GpuError::NoDisplay);
        }
        display.width = info.modes[0].rect.width;
        display.height = info.modes[0].rect.height;
        let bytes = u64::from(display.width) * u64::from(display.height) * 4;
        for (index, resource_id) in [1u32, 2].into_iter().enumerate() {
            let address = phys::allocate(bytes).ok_or(GpuError::OutOfMemory { bytes })?;
            // Fault every page in now: a first touch costs ~10 µs a page here, which would
            // otherwise land on the first frames the user waits for.
            for page in (0..bytes).step_by(4096) {
                // SAFETY: inside the buffer just allocated for this resource.
                unsafe { ((address + page) as *mut u8).write_volatile(0) };
            }
            display.buffers[index] = address;
            let create = ResourceCreate2d {
                header: Header::new(RESOURCE_CREATE_2D),
                resource_id,
                format: FORMAT_B8G8R8X8,
                width: display.width,
                height: display.height,
            };
            display.command_nodata(&create, RESOURCE_CREATE_2D)?;
            let attach = AttachBacking {
                header: Header::new(RESOURCE_ATTACH_BACKING),
                resource_id,
                entry_count: 1,
                address,
                length: bytes as u32,
                padding: 0,
            };
            display.command_nodata(&attach, RESOURCE_ATTACH_BACKING)?;
        }
        Ok(display)
    }

    fn command<T>(&mut self, request: &T, response: Buffer, command: u32) -> Result<(), GpuError> {
        self.control
            .submit_and_wait(&self.device, &[Buffer::readable(request), response], self.timeout_cycles)
            .map(|_| ())
            .map_err(|err| match err {
                VirtioError::Timeout => GpuError::Command { command, response: 0 },
                other => GpuError::Virtio(other),
            })
    }

    fn command_nodata<T>(&mut self, request: &T, command: u32) -> Result<(), GpuError> {
        let mut response = Header::default();
        self.command(request, Buffer::writable(&mut response), command)?;
        if response.kind != RESP_OK_NODATA {
            return Err(GpuError::Command { command, response: response.kind });
        }
        Ok(())
    }

    /// The buffer not on screen, to draw the next frame into.
    pub fn back_buffer(&mut self) -> &'static mut [u32] {
        let back = self.buffers[1 - self.front];
        let pixels = self.width as usize * self.height as usize;
        // SAFETY: the buffer was allocated for exactly width * height pixels, is identity
        // mapped, and only this driver hands it out (one frame at a time).
        unsafe { core::slice::from_raw_parts_mut(back as *mut u32, pixels) }
    }

    pub fn full(&self) -> Rect {
        Rect { x: 0, y: 0, width: self.width, height: self.height }
    }

    /// What the back buffer needs redrawn for a frame whose changes are `damage`: those,
    /// and the previous frame's (drawn into the other buffer). All of it before the
    /// buffer was ever drawn.
    pub fn redraw(&self, damage: Rect) -> Rect {
        match self.previous_damage {
            Some(previous) => previous.union(damage),
            None => self.full(),
        }
    }

    /// Shows the back buffer: `damage` is what changed since the previous frame. The
    /// buffer's [`Display::redraw`] rectangle goes to the host, which holds its own copy
    /// when it cannot view the buffer in place.
    pub fn present(&mut self, damage: Rect, idle: &mut dyn FnMut()) -> Result<(), GpuError> {
        let back = 1 - self.front;
        let resource_id = back as u32 + 1;
        let redraw = self.redraw(damage);
        let offset = u64::from(redraw.y) * u64::from(self.width) * 4 + u64::from(redraw.x) * 4;
        let transfer = TransferToHost2d {
            header: Header::new(TRANSFER_TO_HOST_2D),
            rect: redraw,
            offset,
            resource_id,
            padding: 0,
        };
        let scanout = SetScanout { header: Header::new(SET_SCANOUT), rect: self.full(), scanout_id: 0, resource_id };
        let flush = ResourceFlush { header: Header::new(RESOURCE_FLUSH), rect: damage, resource_id, padding: 0 };
        // The frame's three commands go as one batch, which the device takes in order:
        // one doorbell and one wait, in `idle` (a sleep until the device's interrupt, once
        // the desktop runs). Three spinning waits through the VMM's wake-up were most of
        // an idle desktop's CPU (a frame a second for the clock), more with many VMs on
        // the host's CPUs.
        let mut responses = [Header::default(); 3];
        let [transferred, shown, flushed] = &mut responses;
        let chains: [&[Buffer]; 3] = [
            &[Buffer::readable(&transfer), Buffer::writable(transferred)],
            &[Buffer::readable(&scanout), Buffer::writable(shown)],
            &[Buffer::readable(&flush), Buffer::writable(flushed)],
        ];
        let submitted = self.control.submit_batch_and_wait_with(&self.device, &chains, self.timeout_cycles, idle);
        submitted.map_err(|err| match err {
            VirtioError::Timeout => GpuError::Command { command: RESOURCE_FLUSH, response: 0 },
            other => GpuError::Virtio(other),
        })?;
        let commands = [TRANSFER_TO_HOST_2D, SET_SCANOUT, RESOURCE_FLUSH];
        for (command, response) in commands.into_iter().zip(responses) {
            if response.kind != RESP_OK_NODATA {
                return Err(GpuError::Command { command, response: response.kind });
            }
        }
        self.front = back;
        self.frames += 1;
        // Until the second frame, the new back buffer was never drawn.
        self.previous_damage = if self.frames >= 2 { Some(damage) } else { None };
        Ok(())
    }
}

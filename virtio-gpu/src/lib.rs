//! carrel-gpu: Carrel's virtio-gpu 2D device model, as a library with no dependency on the
//! VMM.
//!
//! - [`Gpu`] is the device: configuration space, features, and the control and cursor
//!   queues ([`Gpu::process_control_queue`], [`Gpu::process_cursor_queue`]).
//! - A resource backed by guest RAM is viewed in place: its backing pages of the
//!   guest-memory memfd are mapped, in order, into one contiguous host range ([`view`]),
//!   so TRANSFER_TO_HOST_2D only records damage and a screenshot reads the guest's pixels
//!   without copying them. Backing that cannot be mapped falls back to a copy
//!   ([`GpuMetrics::copy_fallback_resources`]).
//! - [`Screen`] (from [`Gpu::screen`]) is shared with other threads: the frame clock
//!   (each RESOURCE_FLUSH of the scanout ends a frame), waits with timeouts, and
//!   screenshots as raw pixels, PNG or QOI, cropped, scaled, with or without the cursor.
//!
//! - The same device runs out of the VMM's process as a vhost-user backend ([`backend`],
//!   the `carrel-gpu-backend` binary); its screen is reached over a socket ([`remote`]).
//!
//! Guest input is hostile: every request is parsed by [`parse_request`] and checked by
//! the device; malformed requests get the virtio-gpu error response and a counter.

pub mod backend;
pub mod capture;
pub mod device;
pub mod edid;
pub mod format;
mod handler;
pub mod memory;
pub mod metrics;
pub mod persist;
pub mod protocol;
pub mod qoi;
pub mod remote;
pub mod screen;
mod surface;
pub mod view;

#[cfg(test)]
mod testing;

pub use capture::{Capture, CaptureError, CaptureFormat, CaptureOptions};
pub use device::{Gpu, GpuConfig, GpuError};
pub use format::PixelFormat;
pub use metrics::GpuMetrics;
pub use persist::{GpuState, PersistError};
pub use protocol::{parse_request, Command, ProtocolError, Rect, Request, Response};
pub use remote::{RemoteError, RemoteScreen};
pub use screen::{Frame, Screen, ScreenError};
pub use surface::{PackedPixels, ScanoutPixels};
pub use view::{LoadingRam, ViewGate};

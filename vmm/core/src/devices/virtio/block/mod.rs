//! virtio-blk (block device, id 2): a disk image or a chain of layers (crate::disk),
//! reads and writes on io_uring straight between the image files and guest memory.

mod device;
mod handler;
mod io;
mod persist;

pub use device::{Block, BlockError, BlockMetrics};
pub use handler::{parse_request, BlockBackend, Request, RequestError, RequestKind, MAX_REQUEST_BYTES, SECTOR_SIZE};
pub use io::Engine;
pub use persist::BlockState;

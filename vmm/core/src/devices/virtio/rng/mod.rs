//! virtio-rng (entropy device, id 4): fills the guest's buffers from the host's getrandom.

mod device;
mod handler;

pub use device::{host_entropy, Rng, RngMetrics};
pub use handler::{process_request_queue, RequestOutcome, MAX_BYTES_PER_REQUEST};

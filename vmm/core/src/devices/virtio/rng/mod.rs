//! virtio-rng (entropy device, id 4): fills the guest's buffers from the host's getrandom,
//! without ever blocking on a host whose entropy pool is not ready yet.

mod device;
mod handler;

pub use device::{host_entropy, host_entropy_nonblocking, Rng, RngError, RngMetrics};
pub use handler::{process_request_queue, RequestOutcome, MAX_BYTES_PER_REQUEST};

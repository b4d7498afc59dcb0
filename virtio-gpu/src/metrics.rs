//! Counters a developer or the control socket can read to see what the device did.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::protocol::ErrorCode;

/// The device's counters; all only ever increase.
#[derive(Debug, Default)]
pub struct GpuMetrics {
    /// Requests answered on the control queue.
    pub control_commands: AtomicU64,
    /// Requests answered on the cursor queue.
    pub cursor_commands: AtomicU64,
    pub errors_unspec: AtomicU64,
    pub errors_out_of_memory: AtomicU64,
    pub errors_invalid_scanout_id: AtomicU64,
    pub errors_invalid_resource_id: AtomicU64,
    pub errors_invalid_parameter: AtomicU64,
    /// Commands sent on the wrong queue (also counted under their error).
    pub wrong_queue_commands: AtomicU64,
    /// Chains the device could not read or answer (bad addresses, no response buffer,
    /// response buffer too small).
    pub malformed_chains: AtomicU64,
    /// Backings viewed in place (zero copy).
    pub zero_copy_resources: AtomicU64,
    /// Backings that could not be viewed in place and are copied on every transfer.
    pub copy_fallback_resources: AtomicU64,
    /// Bytes copied by TRANSFER_TO_HOST_2D for copy-backed resources.
    pub transfer_copy_bytes: AtomicU64,
    /// Frames finished (flushes of the scanout's resource).
    pub frames: AtomicU64,
}

impl GpuMetrics {
    pub(crate) fn count_error(&self, code: ErrorCode) {
        let counter = match code {
            ErrorCode::Unspec | ErrorCode::InvalidContextId => &self.errors_unspec,
            ErrorCode::OutOfMemory => &self.errors_out_of_memory,
            ErrorCode::InvalidScanoutId => &self.errors_invalid_scanout_id,
            ErrorCode::InvalidResourceId => &self.errors_invalid_resource_id,
            ErrorCode::InvalidParameter => &self.errors_invalid_parameter,
        };
        bump(counter);
    }

    /// All error responses sent, of every kind.
    pub fn errors(&self) -> u64 {
        [
            &self.errors_unspec,
            &self.errors_out_of_memory,
            &self.errors_invalid_scanout_id,
            &self.errors_invalid_resource_id,
            &self.errors_invalid_parameter,
        ]
        .iter()
        .map(|counter| counter.load(Ordering::Relaxed))
        .sum()
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

//! Credit-based flow control for file transfers: the sender's [`SendCredit`] and the
//! receiver's [`RecvCredit`]. Plain counters, no I/O, so the Desk kernel, the Linux agent and
//! the host client all keep the same rules.

use crate::MAX_WINDOW;

/// A flow-control rule was broken by the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// The peer sent a chunk it had no credit for.
    #[error("peer sent a data chunk without credit")]
    AcceptChunk,
    /// The peer granted more credit than [`MAX_WINDOW`] allows in flight.
    #[error("peer granted {granted} chunks of credit, more than the window of {MAX_WINDOW}")]
    AcceptGrant { granted: u64 },
}

/// The sender's side: how many chunks it may still send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendCredit {
    available: u32,
}

impl SendCredit {
    /// No credit yet.
    pub fn new() -> Self {
        SendCredit { available: 0 }
    }

    /// Adds a grant from the receiver.
    pub fn grant(&mut self, chunks: u32) -> Result<(), FlowError> {
        let total = u64::from(self.available) + u64::from(chunks);
        if total > u64::from(MAX_WINDOW) {
            return Err(FlowError::AcceptGrant { granted: total });
        }
        self.available = total as u32;
        Ok(())
    }

    /// Takes one chunk's credit; false when there is none (wait for a grant).
    pub fn try_take(&mut self) -> bool {
        if self.available == 0 {
            return false;
        }
        self.available -= 1;
        true
    }

    /// Chunks that may be sent now.
    pub fn available(&self) -> u32 {
        self.available
    }
}

/// The receiver's side: counts chunks as they are consumed and says when to grant more.
///
/// Credit is returned in batches of half a window, after the chunks have been written out,
/// so at most one window is ever buffered between the two sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvCredit {
    window: u32,
    /// Granted and not yet used by the sender.
    outstanding: u32,
    /// Consumed since the last grant.
    consumed: u32,
}

impl RecvCredit {
    /// A receiver with `window` chunks (clamped to 1..=[`MAX_WINDOW`]); returns it and the
    /// first grant to send.
    pub fn new(window: u32) -> (Self, u32) {
        let window = window.clamp(1, MAX_WINDOW);
        (RecvCredit { window, outstanding: window, consumed: 0 }, window)
    }

    /// Records one chunk received and consumed; returns a grant to send, if one is due.
    pub fn on_chunk(&mut self) -> Result<Option<u32>, FlowError> {
        if self.outstanding == 0 {
            return Err(FlowError::AcceptChunk);
        }
        self.outstanding -= 1;
        self.consumed += 1;
        if self.consumed >= (self.window / 2).max(1) {
            let grant = self.consumed;
            self.outstanding += grant;
            self.consumed = 0;
            return Ok(Some(grant));
        }
        Ok(None)
    }

    /// The window this receiver grants.
    pub fn window(&self) -> u32 {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec::Vec;

    use super::*;

    #[test]
    fn send_credit_without_grant_refuses_chunk() {
        let mut credit = SendCredit::new();
        assert!(!credit.try_take());
        credit.grant(2).unwrap();
        assert!(credit.try_take());
        assert!(credit.try_take());
        assert!(!credit.try_take());
    }

    #[test]
    fn send_credit_over_window_returns_error() {
        let mut credit = SendCredit::new();
        credit.grant(MAX_WINDOW).unwrap();
        assert_eq!(credit.grant(1), Err(FlowError::AcceptGrant { granted: u64::from(MAX_WINDOW) + 1 }));
        assert_eq!(
            credit.grant(u32::MAX),
            Err(FlowError::AcceptGrant { granted: u64::from(MAX_WINDOW) + 0xFFFF_FFFF })
        );
    }

    #[test]
    fn recv_credit_grants_half_window_batches() {
        let (mut recv, first) = RecvCredit::new(8);
        assert_eq!(first, 8);
        let grants: Vec<Option<u32>> = (0..8).map(|_| recv.on_chunk().unwrap()).collect();
        assert_eq!(grants, [None, None, None, Some(4), None, None, None, Some(4)]);
    }

    #[test]
    fn recv_credit_chunk_beyond_credit_returns_error() {
        let (mut recv, _) = RecvCredit::new(1);
        // A window of one grants one chunk back after each chunk, so the sender is never
        // ahead; a sender that ignores credit is caught by a fresh receiver with none left.
        assert_eq!(recv.on_chunk(), Ok(Some(1)));
        let mut starved = RecvCredit { window: 4, outstanding: 0, consumed: 0 };
        assert_eq!(starved.on_chunk(), Err(FlowError::AcceptChunk));
    }

    #[test]
    fn sender_and_receiver_never_exceed_window() {
        let (mut recv, first) = RecvCredit::new(16);
        let mut send = SendCredit::new();
        send.grant(first).unwrap();
        let mut in_flight = 0u32;
        for _ in 0..1000 {
            while send.try_take() {
                in_flight += 1;
                assert!(in_flight <= 16);
            }
            in_flight -= 1;
            if let Some(grant) = recv.on_chunk().unwrap() {
                send.grant(grant).unwrap();
            }
        }
    }
}

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
/// Credit is returned in batches of half a window, after the chunks have been written out
/// ([`RecvCredit::on_consume`]), so at most one window is ever buffered between the two
/// sides. A receiver that handles each chunk as it reads it (the Linux agent, the host
/// client) holds one chunk at a time whatever the sender does; the check in
/// [`RecvCredit::on_receive`] matters to a receiver that queues.
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

    /// Records one chunk arriving; an error when the sender had no credit for it. A
    /// receiver that queues chunks catches a sender that ignores credit here.
    pub fn on_receive(&mut self) -> Result<(), FlowError> {
        if self.outstanding == 0 {
            return Err(FlowError::AcceptChunk);
        }
        self.outstanding -= 1;
        Ok(())
    }

    /// Records one received chunk written out; returns a grant to send, if one is due.
    pub fn on_consume(&mut self) -> Option<u32> {
        self.consumed += 1;
        if self.consumed >= (self.window / 2).max(1) {
            let grant = self.consumed;
            self.outstanding += grant;
            self.consumed = 0;
            return Some(grant);
        }
        None
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
        let grants: Vec<Option<u32>> = (0..8)
            .map(|_| {
                recv.on_receive().unwrap();
                recv.on_consume()
            })
            .collect();
        assert_eq!(grants, [None, None, None, Some(4), None, None, None, Some(4)]);
    }

    #[test]
    fn recv_credit_chunk_beyond_credit_returns_error() {
        let (mut recv, first) = RecvCredit::new(2);
        assert_eq!(first, 2);
        recv.on_receive().unwrap();
        recv.on_receive().unwrap();
        // A queueing receiver has consumed nothing yet, so a third chunk had no credit.
        assert_eq!(recv.on_receive(), Err(FlowError::AcceptChunk));
        assert_eq!(recv.on_consume(), Some(1));
        recv.on_receive().unwrap();
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
            recv.on_receive().unwrap();
            if let Some(grant) = recv.on_consume() {
                send.grant(grant).unwrap();
            }
        }
    }
}

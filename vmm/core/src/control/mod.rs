//! The VM's own control socket: the protocol (requests, answers, framing, the client)
//! and the server that moves its frames.

pub mod protocol;
pub mod server;

pub use protocol::*;
pub use server::{ControlServer, PendingRequest, RequestQueue};

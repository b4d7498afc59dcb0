//! Requests served on the control connection's own thread rather than the VMM thread:
//! the ones that wait (for a frame, for the guest agent), so a slow request never stalls
//! the event loop the guest's devices run on. Each records itself through the recorder.

pub mod agent;
pub mod input;
pub mod screen;

use std::sync::Arc;

use crate::control::protocol::{Request, Response};
use agent::AgentService;
use input::InputService;
use screen::ScreenService;

/// What a control connection thread can serve by itself.
#[derive(Debug)]
pub struct ConnectionServices {
    pub screen: ScreenService,
    pub agent: AgentService,
    pub input: InputService,
}

impl ConnectionServices {
    pub fn new(screen: ScreenService, agent: AgentService, input: InputService) -> Arc<ConnectionServices> {
        Arc::new(ConnectionServices { screen, agent, input })
    }

    /// Answers `request` here, or `None` to hand it to the VMM thread. A file transfer
    /// reads or writes its bytes on `connection` before the answer.
    pub fn serve(
        &self,
        request: &Request,
        peer: Option<(i32, u32, u32)>,
        connection: &mut dyn agent::Connection,
    ) -> Option<Response> {
        match request {
            Request::Screenshot(screenshot) => Some(self.screen.serve(screenshot, peer)),
            Request::Agent(agent) => Some(self.agent.serve(agent, peer, connection)),
            Request::Input(input) => Some(self.input.serve(input, peer)),
            _ => None,
        }
    }
}

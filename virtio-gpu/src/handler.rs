//! Queue processing: no epoll, no KVM, testable with a mock queue.
//!
//! A request is a chain whose readable part holds the header and body and whose writable
//! part takes the response. Chains are hostile input: a chain the device cannot read, or
//! with no room for the response, is completed with what was written (often nothing) and
//! counted in `malformed_chains`; the host never panics and never writes outside the
//! guest's buffers. Fenced requests are completed synchronously, so every response echoes
//! its fence.

use std::io::{Read, Write};

use crate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};

use crate::device::Gpu;
use crate::metrics::bump;
use crate::protocol::{parse_request, ErrorCode, Header, Response, MAX_REQUEST_BYTES};

/// Which queue a chain came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueKind {
    Control,
    Cursor,
}

impl Gpu {
    /// Answers every available request of the control queue. Returns whether the driver
    /// needs an interrupt for the used ring.
    pub fn process_control_queue(&mut self, queue: &mut Queue) -> bool {
        self.process_queue(queue, QueueKind::Control)
    }

    /// Answers every available request of the cursor queue. Returns whether the driver
    /// needs an interrupt for the used ring.
    pub fn process_cursor_queue(&mut self, queue: &mut Queue) -> bool {
        self.process_queue(queue, QueueKind::Cursor)
    }

    fn process_queue(&mut self, queue: &mut Queue, kind: QueueKind) -> bool {
        // The memory handle is cloned (a vector of Arcs) so requests can borrow the
        // device mutably while chains borrow guest memory.
        let memory = self.memory.clone();
        let mut completed = false;
        let mut request = Vec::new();
        let mut response = Vec::new();
        while let Some(chain) = queue.pop_descriptor_chain(&memory) {
            let head = chain.head_index();
            let written = self.process_chain(&memory, chain, kind, &mut request, &mut response);
            // A used-ring write that fails means the ring left guest RAM after the queue
            // was validated; stop serving this queue until the driver resets it.
            if queue.add_used(&memory, head, written).is_err() {
                bump(&self.metrics.malformed_chains);
                break;
            }
            completed = true;
        }
        completed && queue.needs_notification(&memory).unwrap_or(true)
    }

    /// Reads, runs and answers one request; returns the bytes written to the chain.
    fn process_chain(
        &mut self,
        memory: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        kind: QueueKind,
        request: &mut Vec<u8>,
        response: &mut Vec<u8>,
    ) -> u32 {
        let (reader, writer) = match (chain.clone().reader(memory), chain.writer(memory)) {
            (Ok(reader), Ok(writer)) => (reader, writer),
            _ => {
                bump(&self.metrics.malformed_chains);
                return 0;
            }
        };
        let mut writer = writer;
        request.clear();
        if reader.take(MAX_REQUEST_BYTES as u64).read_to_end(request).is_err() {
            bump(&self.metrics.malformed_chains);
            return 0;
        }
        let header = Header::parse(request).unwrap_or_default();
        let answer = match parse_request(request) {
            Err(error) => Response::Error(error.response_code()),
            Ok(parsed) => {
                if parsed.command.is_cursor_command() != (kind == QueueKind::Cursor) {
                    bump(&self.metrics.wrong_queue_commands);
                    Response::Error(ErrorCode::Unspec)
                } else {
                    self.execute(&parsed.command)
                }
            }
        };
        match kind {
            QueueKind::Control => bump(&self.metrics.control_commands),
            QueueKind::Cursor => bump(&self.metrics.cursor_commands),
        }
        if let Response::Error(code) = answer {
            self.metrics.count_error(code);
        }
        // The cursor queue's driver usually gives no response buffer: that is fine.
        if kind == QueueKind::Cursor && writer.available_bytes() == 0 {
            return 0;
        }
        answer.encode(&header, response);
        let room = writer.available_bytes().min(response.len());
        if room < response.len() {
            bump(&self.metrics.malformed_chains);
        }
        match writer.write_all(&response[..room]) {
            Ok(()) => room as u32,
            Err(_) => {
                bump(&self.metrics.malformed_chains);
                writer.bytes_written() as u32
            }
        }
    }
}

#[cfg(test)]
#[path = "handler_tests.rs"]
mod tests;

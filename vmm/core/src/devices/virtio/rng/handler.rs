//! Request queue processing: no epoll, no KVM, testable with a mock queue.
//!
//! The guest's descriptor chains are hostile input: read-only buffers, addresses outside
//! RAM, zero lengths and loops complete the request with what was written so far (often
//! nothing) and count it as malformed; the host never panics and never writes outside the
//! guest's buffers.
//!
//! The entropy source never blocks: while the host's pool is not ready yet (a freshly
//! booted host) it answers `WouldBlock`, and the request it was serving goes back to the
//! ring, untouched, for a later pass.

use crate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;

/// Most entropy one request gets, however large its buffers claim to be.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// What one pass over the queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RequestOutcome {
    pub completed: u64,
    pub malformed: u64,
    pub bytes: u64,
    pub needs_interrupt: bool,
    /// The host's entropy pool was not ready: the request at the head of the ring waits
    /// for it (untouched, still available) and so do the ones after it.
    pub waiting_for_entropy: bool,
}

/// Serves every available request of the rng's queue from `entropy`.
pub fn process_request_queue(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    entropy: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
) -> RequestOutcome {
    let mut outcome = RequestOutcome::default();
    let mut scratch = vec![0u8; 4096];
    while let Some(chain) = queue.pop_descriptor_chain(memory) {
        let head = chain.head_index();
        let mut written = 0usize;
        let mut malformed = false;
        let mut not_ready = false;
        for descriptor in chain {
            if !descriptor.is_write_only() {
                malformed = true;
                break;
            }
            let mut remaining = (descriptor.len() as usize).min(MAX_BYTES_PER_REQUEST - written);
            let mut addr = descriptor.addr();
            while remaining > 0 {
                let count = remaining.min(scratch.len());
                match entropy(&mut scratch[..count]) {
                    Ok(()) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                        not_ready = true;
                        break;
                    }
                    Err(_) => {
                        malformed = true;
                        break;
                    }
                }
                if memory.write_slice(&scratch[..count], addr).is_err() {
                    malformed = true;
                    break;
                }
                written += count;
                remaining -= count;
                addr = vm_memory::GuestAddress(addr.0 + count as u64);
            }
            if malformed || not_ready || written >= MAX_BYTES_PER_REQUEST {
                break;
            }
        }
        // The pool only ever goes from not ready to ready, so a request it stopped had
        // nothing written yet unless the buffers came in several pieces; one with bytes
        // already in it completes with those.
        if not_ready && written == 0 {
            queue.go_to_previous_position();
            outcome.waiting_for_entropy = true;
            break;
        }
        if malformed {
            outcome.malformed += 1;
        }
        // A used-ring write that fails means the ring itself left guest RAM after the
        // queue was validated; stop serving this queue until the driver resets it.
        if queue.add_used(memory, head, written as u32).is_err() {
            outcome.malformed += 1;
            break;
        }
        outcome.completed += 1;
        outcome.bytes += written as u64;
    }
    if outcome.completed > 0 {
        outcome.needs_interrupt = queue.needs_notification(memory).unwrap_or(true);
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn fill_0xab(buffer: &mut [u8]) -> std::io::Result<()> {
        buffer.fill(0xab);
        Ok(())
    }

    fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn used_len(mock: &MockSplitQueue<GuestMemoryMmap>, index: u16) -> u32 {
        mock.used().ring().ref_at(index as usize).unwrap().load().len()
    }

    #[test]
    fn writable_buffer_is_filled_and_completed() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        mock.add_desc_chains(&[descriptor(0x10_0000, 32, WRITE, 0)], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let outcome = process_request_queue(&mut queue, &memory, &mut fill_0xab);
        assert_eq!(
            outcome,
            RequestOutcome { completed: 1, malformed: 0, bytes: 32, needs_interrupt: true, waiting_for_entropy: false }
        );
        let mut bytes = [0u8; 33];
        memory.read_slice(&mut bytes, GuestAddress(0x10_0000)).unwrap();
        assert!(bytes[..32].iter().all(|b| *b == 0xab));
        assert_eq!(bytes[32], 0, "nothing written past the buffer");
        assert_eq!(used_len(&mock, 0), 32);
    }

    #[test]
    fn chained_buffers_are_all_filled() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        mock.add_desc_chains(&[descriptor(0x10_0000, 16, WRITE | NEXT, 1), descriptor(0x11_0000, 8, WRITE, 0)], 0)
            .unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let outcome = process_request_queue(&mut queue, &memory, &mut fill_0xab);
        assert_eq!((outcome.completed, outcome.bytes, outcome.malformed), (1, 24, 0));
        assert_eq!(used_len(&mock, 0), 24);
    }

    #[test]
    fn read_only_buffer_completes_empty_and_counts_malformed() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        mock.add_desc_chains(&[descriptor(0x10_0000, 32, 0, 0)], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let outcome = process_request_queue(&mut queue, &memory, &mut fill_0xab);
        assert_eq!((outcome.completed, outcome.bytes, outcome.malformed), (1, 0, 1));
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0);
    }

    #[test]
    fn zero_length_buffer_completes_with_zero_bytes() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        mock.add_desc_chains(&[descriptor(0x10_0000, 0, WRITE, 0)], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let outcome = process_request_queue(&mut queue, &memory, &mut fill_0xab);
        assert_eq!((outcome.completed, outcome.bytes, outcome.malformed), (1, 0, 0));
    }

    #[test]
    fn buffer_outside_guest_memory_counts_malformed_without_panic() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        mock.add_desc_chains(&[descriptor(0x1_0000_0000, 64, WRITE, 0)], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let outcome = process_request_queue(&mut queue, &memory, &mut fill_0xab);
        assert_eq!((outcome.completed, outcome.bytes, outcome.malformed), (1, 0, 1));
    }

    #[test]
    fn buffer_straddling_end_of_memory_counts_malformed() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        mock.add_desc_chains(&[descriptor(0x20_0000 - 8, 4096, WRITE, 0)], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let outcome = process_request_queue(&mut queue, &memory, &mut fill_0xab);
        assert_eq!(outcome.malformed, 1);
    }

    #[test]
    fn huge_buffer_is_capped_per_request() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        mock.add_desc_chains(&[descriptor(0x10_0000, 0x10_0000 - 1, WRITE, 0)], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let outcome = process_request_queue(&mut queue, &memory, &mut fill_0xab);
        assert_eq!(outcome.bytes, MAX_BYTES_PER_REQUEST as u64);
        assert_eq!(used_len(&mock, 0), MAX_BYTES_PER_REQUEST as u32);
    }

    #[test]
    fn looping_chain_terminates() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        // Descriptor 0 -> 1 -> 0 -> ...: the chain's TTL ends the walk.
        let looped = [descriptor(0x10_0000, 16, WRITE | NEXT, 1), descriptor(0x11_0000, 16, WRITE | NEXT, 0)];
        mock.add_desc_chains(&looped, 0).unwrap();
        mock.desc_table().store(1, descriptor(0x11_0000, 16, WRITE | NEXT, 0)).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let outcome = process_request_queue(&mut queue, &memory, &mut fill_0xab);
        assert_eq!(outcome.completed, 1);
        assert!(outcome.bytes <= 16 * 16, "a loop must not serve more than the queue's worth");
    }

    #[test]
    fn pool_not_ready_leaves_requests_available_and_a_later_pass_serves_them() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        mock.add_desc_chains(&[descriptor(0x10_0000, 32, WRITE, 0), descriptor(0x11_0000, 16, WRITE, 0)], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut not_ready = |_: &mut [u8]| Err(std::io::Error::from(std::io::ErrorKind::WouldBlock));
        let outcome = process_request_queue(&mut queue, &memory, &mut not_ready);
        assert_eq!(
            outcome,
            RequestOutcome { waiting_for_entropy: true, ..Default::default() },
            "nothing completed, no interrupt, the device waits"
        );
        assert_eq!(mock.used().idx().load(), 0);
        assert_eq!(queue.next_avail(), 0, "the request went back to the ring");
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0);

        let outcome = process_request_queue(&mut queue, &memory, &mut fill_0xab);
        assert_eq!((outcome.completed, outcome.bytes, outcome.waiting_for_entropy), (2, 48, false));
        assert_eq!(used_len(&mock, 0), 32);
        assert_eq!(used_len(&mock, 1), 16);
    }

    #[test]
    fn pool_not_ready_midway_completes_the_request_with_what_was_written() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        mock.add_desc_chains(&[descriptor(0x10_0000, 16, WRITE | NEXT, 1), descriptor(0x11_0000, 8, WRITE, 0)], 0)
            .unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut calls = 0;
        let mut once = |buffer: &mut [u8]| {
            calls += 1;
            match calls {
                1 => fill_0xab(buffer),
                _ => Err(std::io::Error::from(std::io::ErrorKind::WouldBlock)),
            }
        };
        let outcome = process_request_queue(&mut queue, &memory, &mut once);
        assert_eq!((outcome.completed, outcome.bytes, outcome.malformed), (1, 16, 0));
        assert_eq!(used_len(&mock, 0), 16);
    }

    #[test]
    fn entropy_failure_counts_malformed() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        mock.add_desc_chains(&[descriptor(0x10_0000, 32, WRITE, 0)], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut failing = |_: &mut [u8]| Err(std::io::Error::other("no entropy"));
        let outcome = process_request_queue(&mut queue, &memory, &mut failing);
        assert_eq!((outcome.completed, outcome.malformed), (1, 1));
    }

    #[test]
    fn empty_queue_does_nothing_and_asks_no_interrupt() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        let outcome = process_request_queue(&mut queue, &memory, &mut fill_0xab);
        assert_eq!(outcome, RequestOutcome::default());
    }
}

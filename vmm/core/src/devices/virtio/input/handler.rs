//! Event and status queue processing: no epoll, no KVM, testable with a mock queue.
//!
//! The driver posts one writable 8-byte buffer per event on the event queue and sends LED
//! changes as readable 8-byte buffers on the status queue. Its chains are hostile input:
//! a buffer of the wrong direction, shorter than an event, of zero length or outside
//! guest RAM is completed with length 0 (the driver ignores used buffers of any other
//! length than an event's) and counted; the event it would have carried waits for the
//! next buffer, so nothing is lost or reordered and the host never panics.

use std::collections::VecDeque;

use crate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use crate::input::{InputEvent, EVENT_SIZE};

/// What one pass over the event queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EventQueueOutcome {
    /// Events written into buffers.
    pub delivered: u64,
    /// Buffers returned empty because the driver's chain was unusable.
    pub malformed: u64,
    pub needs_interrupt: bool,
}

/// What one pass over the status queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatusQueueOutcome {
    /// Events read from the driver.
    pub received: u64,
    pub malformed: u64,
    pub needs_interrupt: bool,
}

/// Moves `pending` events into the driver's event buffers, one event per chain and in
/// order, until either runs out. Undelivered events stay in `pending` for the next call.
pub fn process_event_queue(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    pending: &mut VecDeque<InputEvent>,
) -> EventQueueOutcome {
    let mut outcome = EventQueueOutcome::default();
    let mut used_any = false;
    while let Some(event) = pending.front().copied() {
        let Some(chain) = queue.pop_descriptor_chain(memory) else { break };
        let head = chain.head_index();
        // The driver's buffer is the chain's first descriptor; Linux never splits one.
        let written = match chain.into_iter().next() {
            Some(descriptor) if descriptor.is_write_only() && descriptor.len() as usize >= EVENT_SIZE => {
                memory.write_slice(&event.to_le_bytes(), descriptor.addr()).is_ok()
            }
            _ => false,
        };
        if written {
            pending.pop_front();
            outcome.delivered += 1;
        } else {
            outcome.malformed += 1;
        }
        let len = if written { EVENT_SIZE as u32 } else { 0 };
        // A used-ring write that fails means the ring itself left guest RAM after the
        // queue was validated; stop serving this queue until the driver resets it.
        if queue.add_used(memory, head, len).is_err() {
            outcome.malformed += 1;
            break;
        }
        used_any = true;
    }
    outcome.needs_interrupt = used_any && queue.needs_notification(memory).unwrap_or(true);
    outcome
}

/// Reads every event the driver sent on the status queue, handing each to `on_event`,
/// and completes the chains.
pub fn process_status_queue(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    on_event: &mut dyn FnMut(InputEvent),
) -> StatusQueueOutcome {
    let mut outcome = StatusQueueOutcome::default();
    let mut used_any = false;
    while let Some(chain) = queue.pop_descriptor_chain(memory) {
        let head = chain.head_index();
        let event = match chain.into_iter().next() {
            Some(descriptor) if !descriptor.is_write_only() && descriptor.len() as usize >= EVENT_SIZE => {
                let mut bytes = [0u8; EVENT_SIZE];
                memory.read_slice(&mut bytes, descriptor.addr()).ok().map(|()| InputEvent::from_le_bytes(bytes))
            }
            _ => None,
        };
        match event {
            Some(event) => {
                on_event(event);
                outcome.received += 1;
            }
            None => outcome.malformed += 1,
        }
        if queue.add_used(memory, head, 0).is_err() {
            outcome.malformed += 1;
            break;
        }
        used_any = true;
    }
    outcome.needs_interrupt = used_any && queue.needs_notification(memory).unwrap_or(true);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{BTN_LEFT, EV_KEY, EV_LED, EV_REL, LED_CAPSL, REL_WHEEL};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const BUFFERS: u64 = 0x10_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// `count` single-descriptor writable event buffers, 0x100 apart.
    fn event_buffers(count: u16) -> Vec<RawDescriptor> {
        (0..count).map(|index| descriptor(BUFFERS + u64::from(index) * 0x100, 8, WRITE, 0)).collect()
    }

    fn events(count: usize) -> VecDeque<InputEvent> {
        (0..count).map(|index| InputEvent::new(EV_REL, REL_WHEEL, index as i32 + 1)).collect()
    }

    /// Used ring entries as (descriptor id, len).
    fn used(mock: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
        let count = mock.used().idx().load();
        (0..count)
            .map(|index| mock.used().ring().ref_at(index as usize).unwrap().load())
            .map(|element| (element.id(), element.len()))
            .collect()
    }

    fn event_at(memory: &GuestMemoryMmap, addr: u64) -> InputEvent {
        let mut bytes = [0u8; EVENT_SIZE];
        memory.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        InputEvent::from_le_bytes(bytes)
    }

    #[test]
    fn event_queue_delivers_one_event_per_buffer_in_order() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        mock.add_desc_chains(&event_buffers(3), 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut pending = events(3);
        let outcome = process_event_queue(&mut queue, &memory, &mut pending);
        assert_eq!(outcome, EventQueueOutcome { delivered: 3, malformed: 0, needs_interrupt: true });
        assert!(pending.is_empty());
        assert_eq!(used(&mock), vec![(0, 8), (1, 8), (2, 8)]);
        for index in 0..3 {
            assert_eq!(
                event_at(&memory, BUFFERS + index * 0x100),
                InputEvent::new(EV_REL, REL_WHEEL, index as i32 + 1)
            );
        }
        let mut raw = [0u8; 8];
        memory.read_slice(&mut raw, GuestAddress(BUFFERS)).unwrap();
        assert_eq!(raw, [0x02, 0, 0x08, 0, 1, 0, 0, 0], "le16 type, le16 code, le32 value");
    }

    #[test]
    fn event_queue_out_of_buffers_keeps_the_rest_for_later() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        mock.add_desc_chains(&event_buffers(2), 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut pending = events(5);
        let outcome = process_event_queue(&mut queue, &memory, &mut pending);
        assert_eq!((outcome.delivered, outcome.malformed), (2, 0));
        assert_eq!(pending, events(5).split_off(2));

        // The driver posts three more buffers: delivery resumes where it stopped.
        let more: Vec<RawDescriptor> =
            (2..5u16).map(|index| descriptor(BUFFERS + u64::from(index) * 0x100, 8, WRITE, 0)).collect();
        mock.add_desc_chains(&more, 2).unwrap();
        let outcome = process_event_queue(&mut queue, &memory, &mut pending);
        assert_eq!(outcome.delivered, 3);
        assert!(pending.is_empty());
        for index in 0..5 {
            assert_eq!(event_at(&memory, BUFFERS + index * 0x100).value, index as i32 + 1);
        }
    }

    #[test]
    fn event_queue_with_nothing_pending_leaves_buffers_posted() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        mock.add_desc_chains(&event_buffers(2), 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let outcome = process_event_queue(&mut queue, &memory, &mut VecDeque::new());
        assert_eq!(outcome, EventQueueOutcome::default());
        assert!(used(&mock).is_empty());
    }

    #[test]
    fn event_queue_empty_queue_keeps_events_and_asks_no_interrupt() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut pending = events(2);
        let outcome = process_event_queue(&mut queue, &memory, &mut pending);
        assert_eq!(outcome, EventQueueOutcome::default());
        assert_eq!(pending.len(), 2);
    }

    #[test]
    fn event_queue_malformed_buffers_complete_empty_and_keep_the_event() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        let chains = [
            descriptor(BUFFERS, 8, 0, 0),             // read-only
            descriptor(BUFFERS + 0x100, 4, WRITE, 0), // shorter than an event
            descriptor(BUFFERS + 0x200, 0, WRITE, 0), // zero length
            descriptor(0x1_0000_0000, 8, WRITE, 0),   // outside guest RAM
            descriptor(0x20_0000 - 4, 8, WRITE, 0),   // straddling the end of RAM
            descriptor(BUFFERS + 0x500, 8, WRITE, 0), // finally a good one
        ];
        mock.add_desc_chains(&chains, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut pending: VecDeque<InputEvent> = [InputEvent::key(BTN_LEFT, true)].into();
        let outcome = process_event_queue(&mut queue, &memory, &mut pending);
        assert_eq!(outcome, EventQueueOutcome { delivered: 1, malformed: 5, needs_interrupt: true });
        assert_eq!(used(&mock), vec![(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 8)]);
        assert_eq!(event_at(&memory, BUFFERS + 0x500), InputEvent::key(BTN_LEFT, true));
        let mut untouched = [0u8; 0x500];
        memory.read_slice(&mut untouched, GuestAddress(BUFFERS)).unwrap();
        assert!(untouched.iter().all(|byte| *byte == 0), "nothing written into bad buffers");
    }

    #[test]
    fn event_queue_larger_or_chained_buffer_gets_one_event() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        let chain = [descriptor(BUFFERS, 64, WRITE | NEXT, 1), descriptor(BUFFERS + 0x100, 8, WRITE, 0)];
        mock.add_desc_chains(&chain, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut pending = events(2);
        let outcome = process_event_queue(&mut queue, &memory, &mut pending);
        assert_eq!((outcome.delivered, outcome.malformed), (1, 0));
        assert_eq!(used(&mock), vec![(0, 8)]);
        assert_eq!(pending.len(), 1);
        assert_eq!(event_at(&memory, BUFFERS + 8), InputEvent::new(0, 0, 0), "one event per chain");
    }

    #[test]
    fn event_queue_looping_chain_terminates() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        let looped = [descriptor(BUFFERS, 8, WRITE | NEXT, 1), descriptor(BUFFERS + 0x100, 8, WRITE | NEXT, 0)];
        mock.add_desc_chains(&looped, 0).unwrap();
        mock.desc_table().store(1, descriptor(BUFFERS + 0x100, 8, WRITE | NEXT, 0)).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut pending = events(1);
        let outcome = process_event_queue(&mut queue, &memory, &mut pending);
        assert_eq!(outcome.delivered, 1);
    }

    #[test]
    fn status_queue_reads_led_events_and_completes_chains() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        let capslock = InputEvent::new(EV_LED, LED_CAPSL, 1);
        let syn = InputEvent::syn();
        memory.write_slice(&capslock.to_le_bytes(), GuestAddress(BUFFERS)).unwrap();
        memory.write_slice(&syn.to_le_bytes(), GuestAddress(BUFFERS + 0x100)).unwrap();
        mock.add_desc_chains(&[descriptor(BUFFERS, 8, 0, 0), descriptor(BUFFERS + 0x100, 8, 0, 0)], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut received = Vec::new();
        let outcome = process_status_queue(&mut queue, &memory, &mut |event| received.push(event));
        assert_eq!(outcome, StatusQueueOutcome { received: 2, malformed: 0, needs_interrupt: true });
        assert_eq!(received, vec![capslock, syn]);
        assert_eq!(used(&mock), vec![(0, 0), (1, 0)]);
    }

    #[test]
    fn status_queue_malformed_chains_are_completed_and_counted() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        memory.write_slice(&InputEvent::key(1, true).to_le_bytes(), GuestAddress(BUFFERS)).unwrap();
        let chains = [
            descriptor(BUFFERS, 8, WRITE, 0),   // wrong direction
            descriptor(BUFFERS, 7, 0, 0),       // shorter than an event
            descriptor(BUFFERS, 0, 0, 0),       // zero length
            descriptor(0x1_0000_0000, 8, 0, 0), // outside guest RAM
        ];
        mock.add_desc_chains(&chains, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut received = Vec::new();
        let outcome = process_status_queue(&mut queue, &memory, &mut |event| received.push(event));
        assert_eq!(outcome, StatusQueueOutcome { received: 0, malformed: 4, needs_interrupt: true });
        assert!(received.is_empty());
        assert_eq!(used(&mock).len(), 4);
        assert_eq!(event_at(&memory, BUFFERS).kind, EV_KEY, "the device never writes status buffers");
    }

    #[test]
    fn status_queue_empty_does_nothing() {
        let memory = memory();
        let mock = MockSplitQueue::new(&memory, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        let outcome = process_status_queue(&mut queue, &memory, &mut |_| panic!("no events"));
        assert_eq!(outcome, StatusQueueOutcome::default());
    }
}

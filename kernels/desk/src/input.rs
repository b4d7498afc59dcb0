//! virtio-input driver: keyboards and tablets post 8-byte evdev events into buffers we
//! keep on the event queue. Each wake, [`InputDevice::poll`] collects what arrived and
//! re-posts the buffers.

use alloc::vec::Vec;

use crate::virtio::{
    drain_used, empty_queue, Descriptor, MmioDevice, SplitQueue, VirtioError, DESC_F_WRITE, QUEUE_SIZE,
};
use crate::GuestCell;

/// Most input devices Desk drives.
pub const MAX_INPUT_DEVICES: usize = 2;

/// One evdev event.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Event {
    pub kind: u16,
    pub code: u16,
    pub value: u32,
}

static EVENT_QUEUES: [GuestCell<SplitQueue>; MAX_INPUT_DEVICES] =
    [GuestCell::new(empty_queue()), GuestCell::new(empty_queue())];
static STATUS_QUEUES: [GuestCell<SplitQueue>; MAX_INPUT_DEVICES] =
    [GuestCell::new(empty_queue()), GuestCell::new(empty_queue())];
static BUFFERS: [GuestCell<[Event; QUEUE_SIZE as usize]>; MAX_INPUT_DEVICES] = [
    GuestCell::new([Event { kind: 0, code: 0, value: 0 }; QUEUE_SIZE as usize]),
    GuestCell::new([Event { kind: 0, code: 0, value: 0 }; QUEUE_SIZE as usize]),
];

pub struct InputDevice {
    device: MmioDevice,
    index: usize,
    seen: u16,
}

impl InputDevice {
    /// Drives the `index`th input device (0 or 1) at `base`.
    pub fn new(base: u64, index: usize) -> Result<InputDevice, VirtioError> {
        let device = MmioDevice::negotiate(base, carrel_firmware::virtio_id::INPUT, 0)?;
        let _events = device.setup_queue(0, &EVENT_QUEUES[index])?;
        let _status = device.setup_queue(1, &STATUS_QUEUES[index])?;
        let ring = EVENT_QUEUES[index].get();
        let buffers = BUFFERS[index].get();
        for (slot, buffer) in buffers.iter().enumerate() {
            ring.descriptors[slot] =
                Descriptor { addr: buffer as *const Event as u64, len: 8, flags: DESC_F_WRITE, next: 0 };
            ring.avail_ring[slot] = slot as u16;
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        ring.avail_idx = QUEUE_SIZE;
        device.activate();
        Ok(InputDevice { device, index, seen: 0 })
    }

    /// Appends the events that arrived to `out`.
    pub fn poll(&mut self, out: &mut Vec<Event>) {
        let buffers = BUFFERS[self.index].get();
        let reposted = drain_used(&EVENT_QUEUES[self.index], &mut self.seen, |slot, len| {
            if len >= core::mem::size_of::<Event>() {
                // SAFETY: the device wrote a whole event into our buffer.
                out.push(unsafe { core::ptr::read_volatile(&buffers[slot]) });
            }
        });
        if reposted {
            self.device.notify(0);
        }
    }
}

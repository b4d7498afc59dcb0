//! The virtio-input device: configuration space, the event and status queues, and the
//! [`InputSink`] other threads push events into.
//!
//! The sink is a bounded queue plus an eventfd: a pusher appends a batch and writes the
//! eventfd; the event loop sees the device's [`VirtioDevice::event_fd`] readable and calls
//! [`VirtioDevice::process_events`], which moves events into the driver's buffers. Events
//! that find no buffer wait in the sink (still bounded) until the driver posts more and
//! notifies the event queue. While no driver runs, pushes are refused and counted, so a
//! click sent before the guest booted never replays later.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use carrel_firmware::virtio_id;
use vmm_sys_util::eventfd::EventFd;

use super::config::{InputConfig, InputKind};
use super::handler::{process_event_queue, process_status_queue};
use super::persist::InputState;
use crate::devices::virtio::persist::{VirtioDeviceState, VirtioPersistError};
use crate::devices::virtio::{ActivateError, ActiveState, DeviceState, VirtioDevice, INTERRUPT_USED_RING};
use crate::input::{InputError, InputEvent, EV_LED};

/// Linux's driver posts at most 64 event buffers, as many as QEMU's queues hold.
const QUEUE_SIZES: &[u16] = &[64, 64];
const EVENT_QUEUE: usize = 0;
const STATUS_QUEUE: usize = 1;

/// Most events waiting for the guest in one sink; a push that would exceed it fails.
pub const SINK_CAPACITY: usize = 4096;

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum InputDeviceError {
    #[error("cannot create the {kind} input eventfd: {source}; raise the process's open file limit")]
    CreateEventFd { kind: InputKind, source: std::io::Error },
}

/// Counters a developer can read to see what the device did.
#[derive(Debug, Default)]
pub struct InputMetrics {
    /// Events accepted by [`InputSink::push`].
    pub events_pushed: AtomicU64,
    /// Events written into the driver's buffers.
    pub events_delivered: AtomicU64,
    /// Events refused or discarded because no driver was running.
    pub events_dropped_inactive: AtomicU64,
    /// Driver buffers returned unused because their chain was unusable.
    pub malformed_buffers: AtomicU64,
    /// Events the driver sent on the status queue.
    pub status_events: AtomicU64,
    /// The LEDs the driver last set: bit n is LED n (`LED_NUML` is bit 0, `LED_CAPSL`
    /// bit 1, `LED_SCROLLL` bit 2).
    pub leds: AtomicU32,
}

/// What the sink holds under its lock.
#[derive(Debug, Default)]
struct SinkQueue {
    /// Whether a driver runs the device; checked under the same lock as `pending` so a
    /// reset and a push never interleave.
    active: bool,
    pending: VecDeque<InputEvent>,
}

/// The host's handle for sending events to one input device, shared between threads.
#[derive(Debug)]
pub struct InputSink {
    kind: InputKind,
    queue: Mutex<SinkQueue>,
    wake: EventFd,
    metrics: Arc<InputMetrics>,
}

impl InputSink {
    fn new(kind: InputKind) -> Result<InputSink, InputDeviceError> {
        let wake =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| InputDeviceError::CreateEventFd { kind, source })?;
        Ok(InputSink { kind, queue: Mutex::default(), wake, metrics: Arc::default() })
    }

    pub fn kind(&self) -> InputKind {
        self.kind
    }

    pub fn metrics(&self) -> Arc<InputMetrics> {
        self.metrics.clone()
    }

    /// Whether the guest's driver runs the device, so pushed events will be delivered.
    pub fn is_active(&self) -> bool {
        self.lock().active
    }

    /// Events pushed and not yet delivered.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// Queues `events` for the guest, all or none, and wakes the device.
    ///
    /// Fails when no driver runs the device (the events are dropped and counted) or when
    /// they do not fit in [`SINK_CAPACITY`] beside what still waits.
    pub fn push(&self, events: &[InputEvent]) -> Result<(), InputError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut queue = self.lock();
        if !queue.active {
            self.metrics.events_dropped_inactive.fetch_add(events.len() as u64, Ordering::Relaxed);
            return Err(InputError::DeviceInactive { device: self.kind.word() });
        }
        if queue.pending.len() + events.len() > SINK_CAPACITY {
            return Err(InputError::PushEvents {
                device: self.kind.word(),
                pending: queue.pending.len(),
                requested: events.len(),
                capacity: SINK_CAPACITY,
            });
        }
        queue.pending.extend(events.iter().copied());
        drop(queue);
        self.metrics.events_pushed.fetch_add(events.len() as u64, Ordering::Relaxed);
        // A failed write means the counter is saturated: the device is woken already.
        let _ = self.wake.write(1);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, SinkQueue> {
        // The queue is plain data that every holder leaves consistent: a panic elsewhere
        // while holding the lock does not make it wrong.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts or stops accepting events; either way what waits is stale and is dropped.
    fn set_active(&self, active: bool) {
        let mut queue = self.lock();
        queue.active = active;
        self.drop_pending(&mut queue);
    }

    fn drop_pending(&self, queue: &mut SinkQueue) {
        let dropped = queue.pending.len() as u64;
        queue.pending.clear();
        self.metrics.events_dropped_inactive.fetch_add(dropped, Ordering::Relaxed);
    }
}

/// The virtio-input device: a keyboard or a tablet.
#[derive(Debug)]
pub struct InputDevice {
    config: InputConfig,
    sink: Arc<InputSink>,
    state: DeviceState,
}

impl InputDevice {
    /// A device of `kind` and the sink that feeds it.
    pub fn new(kind: InputKind) -> Result<(InputDevice, Arc<InputSink>), InputDeviceError> {
        let sink = Arc::new(InputSink::new(kind)?);
        let device = InputDevice { config: InputConfig::new(kind), sink: sink.clone(), state: DeviceState::Inactive };
        Ok((device, sink))
    }

    pub fn kind(&self) -> InputKind {
        self.config.kind()
    }

    pub fn sink(&self) -> Arc<InputSink> {
        self.sink.clone()
    }

    pub fn metrics(&self) -> Arc<InputMetrics> {
        self.sink.metrics()
    }

    /// Moves waiting events into the driver's event buffers.
    fn deliver(&mut self) {
        let DeviceState::Active(active) = &mut self.state else {
            // Pushes are refused while inactive, so this only clears a push that raced
            // the reset.
            let mut queue = self.sink.lock();
            self.sink.drop_pending(&mut queue);
            return;
        };
        let Some(queue) = active.queues.get_mut(EVENT_QUEUE) else { return };
        let outcome = process_event_queue(queue, &active.memory, &mut self.sink.lock().pending);
        let metrics = &self.sink.metrics;
        metrics.events_delivered.fetch_add(outcome.delivered, Ordering::Relaxed);
        metrics.malformed_buffers.fetch_add(outcome.malformed, Ordering::Relaxed);
        if outcome.needs_interrupt {
            active.interrupt.signal(INTERRUPT_USED_RING);
        }
    }

    /// Takes the driver's status events (LED changes).
    fn receive_status(&mut self) {
        let DeviceState::Active(active) = &mut self.state else { return };
        let Some(queue) = active.queues.get_mut(STATUS_QUEUE) else { return };
        let metrics = &self.sink.metrics;
        let outcome = process_status_queue(queue, &active.memory, &mut |event| {
            if event.kind == EV_LED && event.code < 32 {
                let bit = 1u32 << event.code;
                if event.value != 0 {
                    metrics.leds.fetch_or(bit, Ordering::Relaxed);
                } else {
                    metrics.leds.fetch_and(!bit, Ordering::Relaxed);
                }
            }
        });
        metrics.status_events.fetch_add(outcome.received, Ordering::Relaxed);
        metrics.malformed_buffers.fetch_add(outcome.malformed, Ordering::Relaxed);
        if outcome.needs_interrupt {
            active.interrupt.signal(INTERRUPT_USED_RING);
        }
    }
}

impl VirtioDevice for InputDevice {
    fn device_type(&self) -> u32 {
        virtio_id::INPUT
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn activate(&mut self, state: ActiveState, _acked_features: u64) -> Result<(), ActivateError> {
        if state.queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount { needed: QUEUE_SIZES.len(), got: state.queues.len() });
        }
        self.state = DeviceState::Active(state);
        self.sink.set_active(true);
        Ok(())
    }

    fn reset(&mut self) {
        self.sink.set_active(false);
        self.state = DeviceState::Inactive;
        self.config.reset();
        self.sink.metrics.leds.store(0, Ordering::Relaxed);
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            // New buffers: deliver what waited for them.
            EVENT_QUEUE => self.deliver(),
            STATUS_QUEUE => self.receive_status(),
            _ => {}
        }
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.sink.wake.as_raw_fd())
    }

    fn process_events(&mut self) {
        // Nonblocking: a read that finds the counter at zero just means nothing new.
        let _ = self.sink.wake.read();
        self.deliver();
    }

    fn active_queues(&self) -> Option<&[virtio_queue::Queue]> {
        self.state.queues()
    }

    fn save(&self) -> Result<VirtioDeviceState, VirtioPersistError> {
        Ok(VirtioDeviceState::Input(InputState::of(self.kind(), &self.config)))
    }

    fn restore(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioPersistError> {
        let VirtioDeviceState::Input(saved) = state else {
            return Err(VirtioPersistError::WrongDevice { saved: state.kind().into(), built: "input" });
        };
        saved.load_into(&mut self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::VirtioInterrupt;
    use crate::input::{ABS_X, BTN_LEFT, EV_ABS, LED_CAPSL, LED_NUML};
    use crate::memory::GuestMemoryMmap;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};

    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const EVENT_RING: u64 = 0;
    const STATUS_RING: u64 = 0x8000;
    const EVENT_BUFFERS: u64 = 0x10_0000;
    const STATUS_BUFFERS: u64 = 0x18_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn descriptor(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn event_buffers(first: u16, count: u16) -> Vec<RawDescriptor> {
        (first..first + count).map(|index| descriptor(EVENT_BUFFERS + u64::from(index) * 0x10, 8, WRITE)).collect()
    }

    fn used_count(mock: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
        mock.used().idx().load()
    }

    fn delivered(memory: &GuestMemoryMmap, count: u64) -> Vec<InputEvent> {
        (0..count)
            .map(|index| {
                let mut bytes = [0u8; 8];
                memory.read_slice(&mut bytes, GuestAddress(EVENT_BUFFERS + index * 0x10)).unwrap();
                InputEvent::from_le_bytes(bytes)
            })
            .collect()
    }

    fn activate(
        device: &mut InputDevice,
        memory: &GuestMemoryMmap,
        event: &MockSplitQueue<GuestMemoryMmap>,
        status: &MockSplitQueue<GuestMemoryMmap>,
    ) -> Arc<VirtioInterrupt> {
        let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let queues: Vec<Queue> = vec![event.create_queue().unwrap(), status.create_queue().unwrap()];
        let state = ActiveState { memory: memory.clone(), queues, interrupt: interrupt.clone() };
        device.activate(state, 0).unwrap();
        interrupt
    }

    fn click() -> Vec<InputEvent> {
        vec![InputEvent::key(BTN_LEFT, true), InputEvent::syn()]
    }

    #[test]
    fn device_reports_input_id_two_queues_and_no_features() {
        let (device, sink) = InputDevice::new(InputKind::Tablet).unwrap();
        assert_eq!(device.device_type(), 18);
        assert_eq!(device.queue_max_sizes().len(), 2);
        assert_eq!(device.device_features(), 0);
        assert_eq!(sink.kind(), InputKind::Tablet);
        assert_eq!(device.event_fd(), Some(sink.wake.as_raw_fd()));
    }

    #[test]
    fn config_space_reads_through_the_transport_interface() {
        let (mut device, _sink) = InputDevice::new(InputKind::Keyboard).unwrap();
        device.write_config(0, &[super::super::config::VIRTIO_INPUT_CFG_ID_NAME]);
        device.write_config(1, &[0]);
        let mut size = [0u8];
        device.read_config(2, &mut size);
        let mut name = vec![0u8; size[0] as usize];
        device.read_config(8, &mut name);
        assert_eq!(name, b"Carrel Keyboard");
    }

    #[test]
    fn push_while_inactive_is_refused_and_counted() {
        let (_device, sink) = InputDevice::new(InputKind::Tablet).unwrap();
        assert!(!sink.is_active());
        assert_eq!(sink.push(&click()), Err(InputError::DeviceInactive { device: "tablet" }));
        assert_eq!(sink.pending(), 0);
        assert_eq!(sink.metrics().events_dropped_inactive.load(Ordering::Relaxed), 2);
        assert!(sink.wake.read().is_err(), "nothing to wake the device for");
    }

    #[test]
    fn push_then_process_events_delivers_and_signals() {
        let memory = memory();
        let event = MockSplitQueue::create(&memory, GuestAddress(EVENT_RING), 16);
        let status = MockSplitQueue::create(&memory, GuestAddress(STATUS_RING), 16);
        event.add_desc_chains(&event_buffers(0, 4), 0).unwrap();
        let (mut device, sink) = InputDevice::new(InputKind::Tablet).unwrap();
        let interrupt = activate(&mut device, &memory, &event, &status);
        assert!(sink.is_active());

        let frame = vec![InputEvent::new(EV_ABS, ABS_X, 100), InputEvent::syn()];
        sink.push(&frame).unwrap();
        assert_eq!(sink.pending(), 2);
        assert_eq!(sink.wake.read().unwrap(), 1, "the push woke the device");
        sink.wake.write(1).unwrap();
        device.process_events();
        assert_eq!(delivered(&memory, 2), frame);
        assert_eq!(used_count(&event), 2);
        assert_eq!(interrupt.status() & INTERRUPT_USED_RING, INTERRUPT_USED_RING);
        assert_eq!(sink.pending(), 0);
        assert_eq!(sink.metrics().events_delivered.load(Ordering::Relaxed), 2);
        assert_eq!(sink.metrics().events_pushed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn events_beyond_posted_buffers_resume_on_event_queue_notify() {
        let memory = memory();
        let event = MockSplitQueue::create(&memory, GuestAddress(EVENT_RING), 16);
        let status = MockSplitQueue::create(&memory, GuestAddress(STATUS_RING), 16);
        event.add_desc_chains(&event_buffers(0, 1), 0).unwrap();
        let (mut device, sink) = InputDevice::new(InputKind::Tablet).unwrap();
        activate(&mut device, &memory, &event, &status);

        let frames: Vec<InputEvent> = (0..3).map(|x| InputEvent::new(EV_ABS, ABS_X, x)).collect();
        sink.push(&frames).unwrap();
        device.process_events();
        assert_eq!(sink.pending(), 2);
        assert_eq!(used_count(&event), 1);

        event.add_desc_chains(&event_buffers(1, 2), 1).unwrap();
        device.process_queue(EVENT_QUEUE);
        assert_eq!(sink.pending(), 0);
        assert_eq!(delivered(&memory, 3), frames);
    }

    #[test]
    fn push_beyond_capacity_is_refused_whole() {
        let memory = memory();
        let event = MockSplitQueue::create(&memory, GuestAddress(EVENT_RING), 16);
        let status = MockSplitQueue::create(&memory, GuestAddress(STATUS_RING), 16);
        let (mut device, sink) = InputDevice::new(InputKind::Keyboard).unwrap();
        activate(&mut device, &memory, &event, &status);

        sink.push(&vec![InputEvent::syn(); SINK_CAPACITY - 1]).unwrap();
        let error = sink.push(&click()).unwrap_err();
        assert_eq!(
            error,
            InputError::PushEvents {
                device: "keyboard",
                pending: SINK_CAPACITY - 1,
                requested: 2,
                capacity: SINK_CAPACITY
            }
        );
        assert_eq!(sink.pending(), SINK_CAPACITY - 1);
        sink.push(&[InputEvent::syn()]).unwrap();
        assert_eq!(sink.pending(), SINK_CAPACITY);
    }

    #[test]
    fn reset_drops_undelivered_events_and_refuses_new_ones() {
        let memory = memory();
        let event = MockSplitQueue::create(&memory, GuestAddress(EVENT_RING), 16);
        let status = MockSplitQueue::create(&memory, GuestAddress(STATUS_RING), 16);
        let (mut device, sink) = InputDevice::new(InputKind::Tablet).unwrap();
        activate(&mut device, &memory, &event, &status);
        sink.push(&click()).unwrap();

        device.reset();
        assert_eq!(sink.pending(), 0);
        assert_eq!(sink.metrics().events_dropped_inactive.load(Ordering::Relaxed), 2);
        assert!(sink.push(&click()).is_err());
        device.process_events();

        // A fresh driver starts with nothing stale.
        let event = MockSplitQueue::create(&memory, GuestAddress(EVENT_RING), 16);
        event.add_desc_chains(&event_buffers(0, 4), 0).unwrap();
        activate(&mut device, &memory, &event, &status);
        device.process_events();
        assert_eq!(used_count(&event), 0);
    }

    #[test]
    fn status_queue_led_events_update_metrics() {
        let memory = memory();
        let event = MockSplitQueue::create(&memory, GuestAddress(EVENT_RING), 16);
        let status = MockSplitQueue::create(&memory, GuestAddress(STATUS_RING), 16);
        let (mut device, sink) = InputDevice::new(InputKind::Keyboard).unwrap();
        let interrupt = activate(&mut device, &memory, &event, &status);

        let sent = [
            InputEvent::new(EV_LED, LED_NUML, 1),
            InputEvent::new(EV_LED, LED_CAPSL, 1),
            InputEvent::new(EV_LED, LED_NUML, 0),
            InputEvent::new(EV_LED, 200, 1),
        ];
        let chains: Vec<RawDescriptor> = sent
            .iter()
            .enumerate()
            .map(|(index, led)| {
                let addr = STATUS_BUFFERS + index as u64 * 0x10;
                memory.write_slice(&led.to_le_bytes(), GuestAddress(addr)).unwrap();
                descriptor(addr, 8, 0)
            })
            .collect();
        status.add_desc_chains(&chains, 0).unwrap();
        device.process_queue(STATUS_QUEUE);

        let metrics = sink.metrics();
        assert_eq!(metrics.leds.load(Ordering::Relaxed), 1 << LED_CAPSL);
        assert_eq!(metrics.status_events.load(Ordering::Relaxed), 4);
        assert_eq!(status.used().idx().load(), 4);
        assert_eq!(interrupt.status() & INTERRUPT_USED_RING, INTERRUPT_USED_RING);

        device.reset();
        assert_eq!(metrics.leds.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn malformed_event_buffers_are_counted() {
        let memory = memory();
        let event = MockSplitQueue::create(&memory, GuestAddress(EVENT_RING), 16);
        let status = MockSplitQueue::create(&memory, GuestAddress(STATUS_RING), 16);
        event
            .add_desc_chains(&[descriptor(EVENT_BUFFERS, 8, 0), descriptor(EVENT_BUFFERS + 0x10, 8, WRITE)], 0)
            .unwrap();
        let (mut device, sink) = InputDevice::new(InputKind::Tablet).unwrap();
        activate(&mut device, &memory, &event, &status);
        sink.push(&click()[..1]).unwrap();
        device.process_events();
        let metrics = sink.metrics();
        assert_eq!(metrics.malformed_buffers.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.events_delivered.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn activate_with_wrong_queue_count_fails_and_stays_inactive() {
        let memory = memory();
        let (mut device, sink) = InputDevice::new(InputKind::Keyboard).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let state = ActiveState { memory, queues: vec![], interrupt };
        assert!(matches!(device.activate(state, 0), Err(ActivateError::QueueCount { needed: 2, got: 0 })));
        assert!(!sink.is_active());
    }

    #[test]
    fn inactive_device_ignores_queue_notifications() {
        let (mut device, sink) = InputDevice::new(InputKind::Keyboard).unwrap();
        device.process_queue(EVENT_QUEUE);
        device.process_queue(STATUS_QUEUE);
        device.process_queue(7);
        device.process_events();
        assert_eq!(sink.metrics().events_delivered.load(Ordering::Relaxed), 0);
    }
}

//! virtio-input (device id 18, virtio 1.2 section 5.8): the guest's keyboard and
//! absolute-pointer tablet.
//!
//! `config` answers the driver's configuration-space queries (name, ids, which event
//! codes each kind sends), `handler` moves events between the queues and a plain event
//! list (no epoll, no KVM), and `device` wires both to the transport and to the
//! [`InputSink`] the host's threads push events into. What to push comes from
//! [`crate::input`], which plans agent actions as evdev events.

mod config;
mod device;
mod handler;
mod persist;

pub use config::{
    answer as config_answer, InputConfig, InputKind, CONFIG_SIZE, UNION_OFFSET, VENDOR_CARREL,
    VIRTIO_INPUT_CFG_ABS_INFO, VIRTIO_INPUT_CFG_EV_BITS, VIRTIO_INPUT_CFG_ID_DEVIDS, VIRTIO_INPUT_CFG_ID_NAME,
    VIRTIO_INPUT_CFG_ID_SERIAL, VIRTIO_INPUT_CFG_PROP_BITS, VIRTIO_INPUT_CFG_UNSET,
};
pub use device::{InputDevice, InputDeviceError, InputMetrics, InputSink, SINK_CAPACITY};
pub use handler::{process_event_queue, process_status_queue, EventQueueOutcome, StatusQueueOutcome};
pub use persist::InputState;

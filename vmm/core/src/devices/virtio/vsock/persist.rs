//! What a snapshot keeps of the vsock device: the CID the guest had, for the record. Open
//! connections are not kept; a restored device resets the guest's transport instead.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
}

#[cfg(test)]
mod tests {
    use super::super::handler::EVENT_TRANSPORT_RESET;
    use super::super::{Vsock, VsockConfig};
    use super::*;
    use crate::devices::virtio::input::InputState;
    use crate::devices::virtio::mmio::{driver, MmioTransport};
    use crate::devices::virtio::persist::{MmioState, VirtioDeviceState, VirtioPersistError};
    use crate::devices::virtio::{VirtioDevice, INTERRUPT_USED_RING};
    use crate::memory::GuestMemoryMmap;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const GUEST_CID: u64 = 42;
    const QUEUE_SIZE: u16 = 16;
    const EVENT_QUEUE: usize = 2;
    const EVENT_BUFFER: u64 = 0x10_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn vsock(dir: &tempfile::TempDir, name: &str, guest_cid: u64) -> Box<Vsock> {
        Box::new(Vsock::new(VsockConfig { guest_cid, socket: dir.path().join(name) }).unwrap())
    }

    fn guest_cid_in_config(device: &dyn VirtioDevice) -> u64 {
        let mut bytes = [0u8; 8];
        device.read_config(0, &mut bytes);
        u64::from_le_bytes(bytes)
    }

    use crate::devices::virtio::mmio::driver::interrupt;

    #[test]
    fn vsock_state_round_trips_into_a_fresh_device_that_resets_the_guest_transport() {
        let dir = tempfile::tempdir().unwrap();
        let memory = memory();
        let mocks: Vec<_> =
            (0..3).map(|index| MockSplitQueue::create(&memory, GuestAddress(index * 0x1000), QUEUE_SIZE)).collect();
        let mut original = MmioTransport::new(vsock(&dir, "original.sock", GUEST_CID), memory.clone(), interrupt());
        driver::start(&mut original, &mocks, QUEUE_SIZE);

        let saved = original.save().unwrap();
        assert_eq!(saved.device, VirtioDeviceState::Vsock(VsockState { guest_cid: GUEST_CID }));
        assert_eq!(saved.active_queues.len(), 3, "the running device's queues are saved");
        let loaded: MmioState = postcard::from_bytes(&postcard::to_allocvec(&saved).unwrap()).unwrap();
        let restored_interrupt = interrupt();
        let fresh = vsock(&dir, "restored.sock", GUEST_CID);
        let mut restored = MmioTransport::restore(fresh, memory.clone(), restored_interrupt.clone(), &loaded).unwrap();
        assert_eq!(restored.save().unwrap(), saved, "save, restore, save again: the same state");
        // The VMM tells the devices once the restored guest runs.
        restored.restored();

        // Connections did not survive: the first event buffer the guest posts carries a
        // transport reset.
        memory.write_slice(&[0xff; 8], GuestAddress(EVENT_BUFFER)).unwrap();
        let buffer = SplitDescriptor::new(EVENT_BUFFER, 8, VRING_DESC_F_WRITE as u16, 0);
        mocks[EVENT_QUEUE].add_desc_chains(&[RawDescriptor::from(buffer)], 0).unwrap();
        restored.notify_queue(EVENT_QUEUE);
        assert_eq!(mocks[EVENT_QUEUE].used().idx().load(), 1);
        let used = mocks[EVENT_QUEUE].used().ring().ref_at(0).unwrap().load();
        assert_eq!((used.id(), used.len()), (0, 4));
        let event: u32 = memory.read_obj(GuestAddress(EVENT_BUFFER)).unwrap();
        assert_eq!(event, EVENT_TRANSPORT_RESET);
        assert_ne!(restored_interrupt.status() & INTERRUPT_USED_RING, 0);
    }

    #[test]
    fn vsock_restore_keeps_the_cid_of_the_device_it_restores_into() {
        let dir = tempfile::tempdir().unwrap();
        let saved = vsock(&dir, "original.sock", GUEST_CID).save().unwrap();
        let mut fresh = vsock(&dir, "restored.sock", GUEST_CID + 1);
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.save().unwrap(), VirtioDeviceState::Vsock(VsockState { guest_cid: GUEST_CID + 1 }));
        assert_eq!(guest_cid_in_config(&*fresh), GUEST_CID + 1);
    }

    #[test]
    fn vsock_restore_of_another_device_kind_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut device = vsock(&dir, "vsock.sock", GUEST_CID);
        let input = InputState { kind: "keyboard".into(), select: 0, subsel: 0 };
        for other in [VirtioDeviceState::Rng, VirtioDeviceState::Input(input)] {
            let kind = other.kind();
            assert!(
                matches!(
                    device.restore(&other),
                    Err(VirtioPersistError::WrongDevice { ref saved, built: "vsock" }) if saved == kind
                ),
                "{kind} state into a vsock device"
            );
        }
    }
}

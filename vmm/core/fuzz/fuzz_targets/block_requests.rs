//! Any guest memory under a virtio-blk queue: the descriptor table, the available ring
//! and every header, segment and buffer they point at come from the input. The device
//! must answer each chain (OK, IOERR, UNSUPP or unused) and never panic, never write the
//! disk past its end, and never use more of the used ring than the queue holds.
#![no_main]

use std::sync::{Mutex, OnceLock};

use carrel_vmm::devices::virtio::block::{BlockBackend, Engine};
use carrel_vmm::disk::{Disk, DiskSpec};
use carrel_vmm::memory::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MEMORY: usize = 0x1_0000;
const QUEUE_SIZE: u16 = 16;
const DISK_BYTES: u64 = 64 * 1024;

struct Rig {
    memory: GuestMemoryMmap,
    backend: BlockBackend,
}

fn rig() -> &'static Mutex<Rig> {
    static RIG: OnceLock<Mutex<Rig>> = OnceLock::new();
    RIG.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("carrel-fuzz-blk-{}.raw", std::process::id()));
        std::fs::write(&path, vec![0u8; DISK_BYTES as usize]).expect("a scratch disk");
        let disk = Disk::open(&DiskSpec { path, readonly: false, base: None, size: None }).expect("open the disk");
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)]).expect("guest memory");
        Mutex::new(Rig { memory, backend: BlockBackend::new(disk, Engine::synchronous()) })
    })
}

fuzz_target!(|data: &[u8]| {
    let mut rig = rig().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let Rig { memory, backend } = &mut *rig;
    let mut bytes = vec![0u8; MEMORY];
    let count = data.len().min(MEMORY);
    bytes[..count].copy_from_slice(&data[..count]);
    // The used ring starts clean so the count below is the device's doing.
    bytes[0x200..0x200 + 4 + 8 * QUEUE_SIZE as usize].fill(0);
    memory.write_slice(&bytes, GuestAddress(0)).unwrap();
    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x100), Some(0));
    queue.set_used_ring_address(Some(0x200), Some(0));
    queue.set_ready(true);
    let served = backend.process_request_queue(&mut queue, memory);
    let drained = backend.drain(&mut queue, memory);
    let used: u16 = memory.read_obj(GuestAddress(0x202)).unwrap();
    assert_eq!(u64::from(used), served.completed + drained.completed);
    assert_eq!(backend.in_flight(), 0);
    assert!(std::fs::metadata(backend.disk.path()).unwrap().len() <= DISK_BYTES);
});

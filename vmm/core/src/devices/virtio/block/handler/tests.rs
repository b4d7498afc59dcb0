//! Every request type and each malformed chain, against a mock queue and a real disk
//! file, with both I/O engines.

use super::*;
use crate::disk::DiskSpec;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;

const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const DISK_BYTES: u64 = 1 << 20;

struct Rig {
    memory: GuestMemoryMmap,
    mock: MockSplitQueue<'static, GuestMemoryMmap>,
    queue: Queue,
    backend: BlockBackend,
    next_desc: u16,
    /// The disk's directory, when the rig owns it.
    _dir: Option<tempfile::TempDir>,
}

fn leak_memory() -> &'static GuestMemoryMmap {
    Box::leak(Box::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap()))
}

fn rig_with(engine: Engine, readonly: bool) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let bytes: Vec<u8> = (0..DISK_BYTES).map(|i| (i / 512) as u8).collect();
    std::fs::write(&path, bytes).unwrap();
    rig_on(&DiskSpec { path, readonly, base: None, size: None }, engine, Some(dir))
}

/// A rig serving the disk `spec` opens; `dir`, if given, holds its files and goes with it.
fn rig_on(spec: &DiskSpec, engine: Engine, dir: Option<tempfile::TempDir>) -> Rig {
    let disk = Disk::open(spec).unwrap();
    let memory = leak_memory();
    let mock = MockSplitQueue::new(memory, 64);
    let queue: Queue = mock.create_queue().unwrap();
    Rig { memory: memory.clone(), mock, queue, backend: BlockBackend::new(disk, engine), next_desc: 0, _dir: dir }
}

/// The io_uring engine, which every test host has.
fn uring() -> Engine {
    let engine = Engine::new();
    assert_eq!(engine.name(), "io_uring", "this host has io_uring");
    engine
}

fn rig() -> Rig {
    rig_with(Engine::synchronous(), false)
}

fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[0..4].copy_from_slice(&kind.to_le_bytes());
    bytes[8..16].copy_from_slice(&sector.to_le_bytes());
    bytes
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

impl Rig {
    /// Adds a chain of (addr, len, device-writable) buffers; returns its head.
    fn chain(&mut self, buffers: &[(u64, u32, bool)]) -> u16 {
        let first = self.next_desc;
        let descriptors: Vec<_> = buffers
            .iter()
            .enumerate()
            .map(|(i, (addr, len, writable))| {
                let last = i + 1 == buffers.len();
                let flags = if *writable { WRITE } else { 0 } | if last { 0 } else { NEXT };
                desc(*addr, *len, flags, if last { 0 } else { first + i as u16 + 1 })
            })
            .collect();
        self.mock.add_desc_chains(&descriptors, first).unwrap();
        self.next_desc += buffers.len() as u16;
        first
    }

    /// A standard request: header, data buffers, status byte.
    fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> u16 {
        self.memory.write_slice(&header(kind, sector), GuestAddress(HEADER)).unwrap();
        self.memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut buffers = vec![(HEADER, 16, false)];
        buffers.extend_from_slice(data);
        buffers.push((STATUS, 1, true));
        self.chain(&buffers)
    }

    fn serve(&mut self) -> Served {
        let mut served = self.backend.process_request_queue(&mut self.queue, &self.memory);
        let drained = self.backend.drain(&mut self.queue, &self.memory);
        served.completed += drained.completed;
        served.errors += drained.errors;
        served
    }

    fn status(&self) -> u8 {
        self.memory.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn used(&self, index: u16) -> (u16, u32) {
        let used = self.mock.used().ring().ref_at(index as usize).unwrap().load();
        (used.id() as u16, used.len())
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.memory.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }
}

fn read_and_write_round_trip(engine: Engine) {
    let mut rig = rig_with(engine, false);
    // Read sectors 2..4 into two buffers.
    rig.request(VIRTIO_BLK_T_IN, 2, &[(DATA, 512, true), (DATA + 0x1000, 512, true)]);
    let served = rig.serve();
    assert_eq!((served.completed, served.malformed, served.errors), (1, 0, 0));
    assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(rig.used(0).1, 1024 + 1, "data bytes plus the status byte");
    assert_eq!(rig.guest(DATA, 512), vec![2; 512]);
    assert_eq!(rig.guest(DATA + 0x1000, 512), vec![3; 512]);

    // Write 4 KiB at sector 8, flush, read it back.
    rig.memory.write_slice(&[0x5a; 4096], GuestAddress(DATA)).unwrap();
    rig.request(VIRTIO_BLK_T_OUT, 8, &[(DATA, 4096, false)]);
    rig.serve();
    assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(rig.used(1).1, 1, "a write returns only the status byte");
    rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    rig.serve();
    assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
    rig.memory.write_slice(&[0; 4096], GuestAddress(DATA + 0x4000)).unwrap();
    rig.request(VIRTIO_BLK_T_IN, 8, &[(DATA + 0x4000, 4096, true)]);
    rig.serve();
    assert_eq!(rig.guest(DATA + 0x4000, 4096), vec![0x5a; 4096]);
}

#[test]
fn read_write_flush_round_trip_synchronously() {
    read_and_write_round_trip(Engine::synchronous());
}

#[test]
fn read_write_flush_round_trip_on_io_uring() {
    read_and_write_round_trip(uring());
}

#[test]
fn many_requests_in_flight_on_io_uring_all_complete() {
    let mut rig = rig_with(Engine::new(), false);
    for i in 0..20u64 {
        rig.memory.write_obj(0u8, GuestAddress(STATUS + 16 * i)).unwrap();
        let header_at = HEADER + 16 * i;
        rig.memory.write_slice(&header(VIRTIO_BLK_T_IN, i), GuestAddress(header_at)).unwrap();
        rig.chain(&[(header_at, 16, false), (DATA + 512 * i, 512, true), (STATUS + 16 * i, 1, true)]);
    }
    let served = rig.serve();
    assert_eq!(served.completed, 20);
    for i in 0..20u64 {
        assert_eq!(rig.guest(DATA + 512 * i, 512), vec![i as u8; 512], "request {i}");
        assert_eq!(rig.memory.read_obj::<u8>(GuestAddress(STATUS + 16 * i)).unwrap(), 0);
    }
}

#[test]
fn get_id_writes_twenty_bytes() {
    let mut rig = rig();
    rig.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
    rig.serve();
    assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(rig.used(0).1, 21);
    assert_eq!(&rig.guest(DATA, 8), b"disk.raw");
}

fn segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[0..8].copy_from_slice(&sector.to_le_bytes());
    bytes[8..12].copy_from_slice(&sectors.to_le_bytes());
    bytes[12..16].copy_from_slice(&flags.to_le_bytes());
    bytes
}

#[test]
fn write_zeroes_and_discard_make_sectors_read_zero() {
    for kind in [VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD] {
        let mut rig = rig();
        rig.memory.write_slice(&segment(16, 8, 0), GuestAddress(DATA)).unwrap();
        rig.request(kind, 0, &[(DATA, 16, false)]);
        rig.serve();
        assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8, "type {kind}");
        rig.request(VIRTIO_BLK_T_IN, 15, &[(DATA + 0x1000, 512 * 10, true)]);
        rig.serve();
        let bytes = rig.guest(DATA + 0x1000, 512 * 10);
        assert_eq!(bytes[..512], [15; 512]);
        assert!(bytes[512..512 * 9].iter().all(|byte| *byte == 0), "type {kind}");
        assert_eq!(bytes[512 * 9..], [24; 512]);
    }
}

/// Serves one request and returns its status byte and the served counters.
fn outcome(rig: &mut Rig) -> (u8, Served) {
    let served = rig.serve();
    (rig.status(), served)
}

#[test]
fn out_of_range_and_overflowing_sectors_get_ioerr() {
    let mut rig = rig();
    let last = DISK_BYTES / 512;
    for sector in [last, last - 1, u64::MAX, u64::MAX / 512] {
        rig.request(VIRTIO_BLK_T_IN, sector, &[(DATA, 1024, true)]);
        let (status, served) = outcome(&mut rig);
        assert_eq!((status, served.malformed), (VIRTIO_BLK_S_IOERR as u8, 1), "sector {sector}");
    }
    rig.memory.write_slice(&segment(u64::MAX - 1, 4, 0), GuestAddress(DATA)).unwrap();
    rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, false)]);
    assert_eq!(outcome(&mut rig).0, VIRTIO_BLK_S_IOERR as u8);
    rig.memory.write_slice(&segment(0, 4, 0x80), GuestAddress(DATA)).unwrap();
    rig.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, false)]);
    assert_eq!(outcome(&mut rig).0, VIRTIO_BLK_S_IOERR as u8, "unknown segment flags");
}

#[test]
fn lengths_that_are_not_whole_sectors_get_ioerr() {
    let mut rig = rig();
    rig.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 100, true)]);
    assert_eq!(outcome(&mut rig).0, VIRTIO_BLK_S_IOERR as u8);
    rig.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 15, false)]);
    assert_eq!(outcome(&mut rig).0, VIRTIO_BLK_S_IOERR as u8);
    rig.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, u32::MAX - 511, false)]);
    assert_eq!(outcome(&mut rig).0, VIRTIO_BLK_S_IOERR as u8, "a request larger than the device takes");
}

#[test]
fn wrong_descriptor_directions_get_ioerr_and_nothing_is_written() {
    let mut rig = rig();
    // A read into a device-readable buffer.
    rig.memory.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    rig.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, false)]);
    assert_eq!(outcome(&mut rig).0, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(rig.guest(DATA, 512), vec![0x77; 512]);
    // A write from a device-writable buffer.
    rig.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, true)]);
    assert_eq!(outcome(&mut rig).0, VIRTIO_BLK_S_IOERR as u8);
    // A device-writable header.
    rig.memory.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HEADER)).unwrap();
    rig.chain(&[(HEADER, 16, true), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(outcome(&mut rig).0, VIRTIO_BLK_S_IOERR as u8);
    let disk = &rig.backend.disk;
    let mut first = [0u8; 512];
    disk.read_at(&mut first, 0).unwrap();
    assert_eq!(first, [0; 512], "sector 0 kept its bytes");
}

#[test]
fn a_chain_without_a_status_byte_is_returned_unused() {
    let mut rig = rig();
    rig.memory.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HEADER)).unwrap();
    let head = rig.chain(&[(HEADER, 16, false), (DATA, 512, false)]);
    let served = rig.serve();
    assert_eq!((served.completed, served.malformed), (1, 1));
    assert_eq!(rig.used(0), (head, 0));
    // Header alone, and a zero-length status.
    rig.chain(&[(HEADER, 16, false)]);
    rig.chain(&[(HEADER, 16, false), (STATUS, 0, true)]);
    let served = rig.serve();
    assert_eq!((served.completed, served.malformed), (2, 2));
}

#[test]
fn short_header_or_header_outside_memory_gets_ioerr() {
    let mut rig = rig();
    rig.chain(&[(HEADER, 8, false), (STATUS, 1, true)]);
    rig.memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(outcome(&mut rig).0, VIRTIO_BLK_S_IOERR as u8);
    rig.chain(&[(0x1_0000_0000, 16, false), (STATUS, 1, true)]);
    assert_eq!(outcome(&mut rig).0, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn data_outside_guest_memory_gets_ioerr_without_panic() {
    let mut rig = rig();
    rig.request(VIRTIO_BLK_T_IN, 0, &[(0x7f_f000, 0x2000, true)]);
    assert_eq!(outcome(&mut rig).0, VIRTIO_BLK_S_IOERR as u8);
    rig.request(VIRTIO_BLK_T_OUT, 0, &[(0x10_0000_0000, 512, false)]);
    assert_eq!(outcome(&mut rig).0, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn unknown_request_types_get_unsupp() {
    let mut rig = rig();
    rig.request(2, 0, &[(DATA, 512, false)]);
    assert_eq!(outcome(&mut rig).0, VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn a_read_only_disk_refuses_writes_discards_and_zeroes_but_reads() {
    let mut rig = rig_with(Engine::synchronous(), true);
    rig.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]);
    assert_eq!(outcome(&mut rig).0, VIRTIO_BLK_S_IOERR as u8);
    rig.memory.write_slice(&segment(0, 1, 0), GuestAddress(DATA)).unwrap();
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        rig.request(kind, 0, &[(DATA, 16, false)]);
        assert_eq!(outcome(&mut rig).0, VIRTIO_BLK_S_IOERR as u8);
    }
    rig.request(VIRTIO_BLK_T_IN, 1, &[(DATA, 512, true)]);
    assert_eq!(outcome(&mut rig).0, VIRTIO_BLK_S_OK as u8);
    assert_eq!(rig.guest(DATA, 512), vec![1; 512]);
}

#[test]
fn a_looping_chain_terminates() {
    let mut rig = rig();
    rig.memory.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HEADER)).unwrap();
    rig.mock.add_desc_chains(&[desc(HEADER, 16, NEXT, 1), desc(DATA, 512, WRITE | NEXT, 0)], 0).unwrap();
    rig.mock.desc_table().store(1, desc(DATA, 512, WRITE | NEXT, 0)).unwrap();
    let served = rig.serve();
    assert_eq!(served.completed, 1, "the loop ends at the queue's size and the chain is returned");
}

#[test]
fn a_device_written_buffer_is_marked_dirty_for_diff_snapshots() {
    let mut rig = rig_with(Engine::new(), false);
    let dirty_words = |memory: &GuestMemoryMmap| {
        let region: &crate::memory::MmapRegion = memory.iter().next().unwrap();
        region.bitmap().get_and_reset()
    };
    let _ = dirty_words(&rig.memory);
    rig.request(VIRTIO_BLK_T_IN, 0, &[(DATA + 0x3000, 4096, true)]);
    rig.serve();
    let words = dirty_words(&rig.memory);
    let page = ((DATA + 0x3000) / 4096) as usize;
    assert_ne!(words[page / 64] & (1 << (page % 64)), 0, "the page the device read into is dirty");
}

/// A small tmpfs, unmounted on drop; `None` where this process may not mount.
struct TinyFs(PathBuf);

impl TinyFs {
    fn mount(size: &str) -> Option<TinyFs> {
        let dir = std::env::temp_dir().join(format!("carrel-blk-tinyfs-{}-{size}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir.to_str()?])
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(TinyFs(dir))
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

use std::path::PathBuf;

#[test]
fn a_full_host_filesystem_fails_the_write_and_keeps_what_was_flushed() {
    let Some(fs) = TinyFs::mount("1m") else {
        panic!("this test mounts a tmpfs and needs root (CI and the dev machines run as root)");
    };
    let path = fs.0.join("full.layer");
    let disk = Disk::open(&DiskSpec { path: path.clone(), readonly: false, base: None, size: Some(64 << 20) }).unwrap();
    let mut rig = rig();
    rig.backend = BlockBackend::new(disk, Engine::new());
    rig.memory.write_slice(&[0x11; 4096], GuestAddress(DATA)).unwrap();
    rig.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 4096, false)]);
    rig.serve();
    rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    rig.serve();
    assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
    // 64 KiB writes until the 1 MiB filesystem is full.
    rig.memory.write_slice(&[0x22; 65536], GuestAddress(DATA)).unwrap();
    let mut failed_at = None;
    for i in 1..64u64 {
        rig.next_desc = 0;
        rig.request(VIRTIO_BLK_T_OUT, i * 128, &[(DATA, 65536, false)]);
        rig.serve();
        if rig.status() == VIRTIO_BLK_S_IOERR as u8 {
            failed_at = Some(i);
            break;
        }
    }
    assert!(failed_at.is_some(), "a 1 MiB filesystem takes no 4 MiB of writes");
    // The device goes on: the flushed block reads back, and a flush still answers.
    rig.next_desc = 0;
    rig.request(VIRTIO_BLK_T_IN, 0, &[(DATA + 0x8_0000, 4096, true)]);
    rig.serve();
    assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
    assert!(rig.guest(DATA + 0x8_0000, 4096).iter().all(|byte| *byte == 0x11), "the flushed block reads back");
    drop(rig);
    let reopened = Disk::open(&DiskSpec { path, readonly: true, base: None, size: None }).unwrap();
    let mut block = vec![0u8; 4096];
    reopened.read_at(&mut block, 0).unwrap();
    assert!(block.iter().all(|byte| *byte == 0x11), "what was flushed survives the full disk");
}

/// Where the split ring's flags and event fields live. (The mock lays its used ring out
/// for a ring of 1-byte entries, over the end of the available ring: tests of the event
/// fields shrink the queue to 16 entries, which keeps them apart.)
impl Rig {
    fn avail_flags_at(&self) -> GuestAddress {
        self.mock.avail_addr()
    }

    fn used_event_at(&self) -> GuestAddress {
        GuestAddress(self.mock.avail_addr().0 + 4 + 2 * u64::from(self.queue.size()))
    }

    fn used_flags(&self) -> u16 {
        self.memory.read_obj(self.mock.used_addr()).unwrap()
    }

    fn avail_event(&self) -> u16 {
        self.memory.read_obj(GuestAddress(self.mock.used_addr().0 + 4 + 8 * u64::from(self.queue.size()))).unwrap()
    }

    /// A 512-byte read of sector `sector` into its own buffer and status byte.
    fn read_request(&mut self, index: u64) {
        let header_at = HEADER + 16 * index;
        self.memory.write_slice(&header(VIRTIO_BLK_T_IN, index), GuestAddress(header_at)).unwrap();
        self.chain(&[(header_at, 16, false), (DATA + 512 * index, 512, true), (STATUS + 16 * index, 1, true)]);
    }

    /// A 512-byte write of `fill` at sector `index`, from its own buffer.
    fn write_request(&mut self, index: u64, fill: u8) {
        let header_at = HEADER + 16 * index;
        self.memory.write_slice(&header(VIRTIO_BLK_T_OUT, index), GuestAddress(header_at)).unwrap();
        self.memory.write_slice(&[fill; 512], GuestAddress(DATA + 512 * index)).unwrap();
        self.memory.write_obj(0xffu8, GuestAddress(STATUS + 16 * index)).unwrap();
        self.chain(&[(header_at, 16, false), (DATA + 512 * index, 512, false), (STATUS + 16 * index, 1, true)]);
    }
}

#[test]
fn a_driver_that_sets_no_interrupt_gets_none_and_one_that_does_not_gets_one() {
    let mut rig = rig();
    rig.read_request(0);
    let served = rig.backend.process_request_queue(&mut rig.queue, &rig.memory);
    assert_eq!(served.completed, 1);
    assert!(served.needs_interrupt, "flags 0: the driver wants its interrupt");

    rig.memory.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, rig.avail_flags_at()).unwrap();
    rig.read_request(1);
    let served = rig.backend.process_request_queue(&mut rig.queue, &rig.memory);
    assert_eq!(served.completed, 1, "the request is served all the same");
    assert!(!served.needs_interrupt, "VRING_AVAIL_F_NO_INTERRUPT: no interrupt");
    assert_eq!(rig.guest(DATA + 512, 512), vec![1; 512]);
}

#[test]
fn with_event_idx_interrupts_follow_used_event_and_doorbells_avail_event() {
    let mut rig = rig();
    rig.queue.set_size(16);
    rig.queue.set_event_idx(true);
    // The flag is ignored with event idx: used_event alone decides.
    rig.memory.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, rig.avail_flags_at()).unwrap();
    rig.memory.write_obj(0u16, rig.used_event_at()).unwrap();
    rig.read_request(0);
    let served = rig.backend.process_request_queue(&mut rig.queue, &rig.memory);
    rig.next_desc = 0; // every chain is back: their descriptors are free again
    assert!(served.needs_interrupt, "used index 0 -> 1 passes used_event 0");
    assert_eq!(rig.avail_event(), 1, "the device asks for a doorbell for the next request");

    rig.read_request(1);
    let served = rig.backend.process_request_queue(&mut rig.queue, &rig.memory);
    rig.next_desc = 0; // every chain is back: their descriptors are free again
    assert_eq!(served.completed, 1);
    assert!(!served.needs_interrupt, "used index 1 -> 2 does not pass used_event 0");
    assert_eq!(rig.avail_event(), 2);

    // While the device watches the ring, avail_event lies behind what it took: no
    // doorbell for the next chains; when it stops watching, it asks again.
    disable_doorbells(&mut rig.queue, &rig.memory);
    assert_eq!(rig.avail_event(), 1, "behind the device's next_avail (2): the driver's next chain does not pass it");
    assert!(!rig.backend.poll_for_requests(&mut rig.queue, &rig.memory, Duration::ZERO));
    assert_eq!(rig.avail_event(), 2);

    // A polling driver keeps used_event just behind what it has seen: never an interrupt.
    rig.memory.write_obj(1u16.wrapping_sub(1), rig.used_event_at()).unwrap();
    for index in 2..6 {
        rig.read_request(index);
    }
    let served = rig.backend.process_request_queue(&mut rig.queue, &rig.memory);
    rig.next_desc = 0; // every chain is back: their descriptors are free again
    assert_eq!(served.completed, 4);
    assert!(!served.needs_interrupt);

    // used_event 6 lies in the next batch (used index 6 -> 8): one interrupt for it.
    rig.memory.write_obj(6u16, rig.used_event_at()).unwrap();
    rig.read_request(6);
    rig.read_request(7);
    let served = rig.backend.process_request_queue(&mut rig.queue, &rig.memory);
    rig.next_desc = 0; // every chain is back: their descriptors are free again
    assert!(
        served.needs_interrupt,
        "{served:?} used_event {} next_used {}",
        rig.memory.read_obj::<u16>(rig.used_event_at()).unwrap(),
        rig.queue.next_used()
    );
    assert_eq!(rig.avail_event(), 8);
    for index in 0..8 {
        assert_eq!(rig.guest(DATA + 512 * index, 512), vec![index as u8; 512], "request {index}");
    }
}

#[test]
fn doorbells_stay_off_while_transfers_are_in_flight_and_come_back_on_when_none_are() {
    let mut rig = rig_with(Engine::Held(Vec::new(), Vec::new()), false);
    rig.write_request(0, 0x11);
    rig.write_request(1, 0x22);
    let served = rig.backend.process_request_queue(&mut rig.queue, &rig.memory);
    assert_eq!((served.completed, rig.backend.in_flight()), (0, 2));
    assert_eq!(rig.used_flags(), VRING_USED_F_NO_NOTIFY as u16, "completions will wake the device: no doorbells");

    // A request added meanwhile is picked up when the completions come in, without a doorbell.
    rig.write_request(2, 0x33);
    rig.backend.engine.release();
    let served = rig.backend.process_request_queue(&mut rig.queue, &rig.memory);
    assert_eq!((served.completed, rig.backend.in_flight()), (2, 1));
    assert_eq!(rig.used_flags(), VRING_USED_F_NO_NOTIFY as u16);

    rig.backend.engine.release();
    let served = rig.backend.process_request_queue(&mut rig.queue, &rig.memory);
    assert_eq!((served.completed, rig.backend.in_flight()), (1, 0));
    assert_eq!(rig.used_flags(), 0, "nothing in flight: the driver rings for the next request");
    for index in 0..3u64 {
        assert_eq!(rig.memory.read_obj::<u8>(GuestAddress(STATUS + 16 * index)).unwrap(), VIRTIO_BLK_S_OK as u8);
    }
}

#[test]
fn drain_completes_what_is_in_flight_serves_what_came_meanwhile_and_leaves_doorbells_on() {
    let mut rig = rig_with(Engine::Held(Vec::new(), Vec::new()), false);
    rig.write_request(0, 0x44);
    rig.backend.process_request_queue(&mut rig.queue, &rig.memory);
    assert_eq!(rig.backend.in_flight(), 1);
    // Added while doorbells were off: nobody would ring for it after a snapshot.
    rig.write_request(1, 0x55);
    let served = rig.backend.drain(&mut rig.queue, &rig.memory);
    assert_eq!((served.completed, rig.backend.in_flight()), (2, 0));
    assert_eq!(rig.used_flags(), 0, "a snapshot keeps the ring with doorbells on");
    let mut back = [0u8; 1024];
    rig.backend.disk.read_at(&mut back, 0).unwrap();
    assert!(back[..512].iter().all(|&byte| byte == 0x44) && back[512..].iter().all(|&byte| byte == 0x55));
}

/// A layered disk in a new directory: a raw base and a writable top layer beside it.
fn layered_spec() -> (DiskSpec, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x33u8; DISK_BYTES as usize]).unwrap();
    (DiskSpec { path: dir.path().join("top.layer"), readonly: false, base: Some(base), size: None }, dir)
}

fn flushed_writes_survive_a_reopen_of_a_layered_disk(engine: Engine) {
    let (spec, _dir) = layered_spec();
    let mut rig = rig_on(&spec, engine, None);
    // Two writes completed, then a flush: both are in the layer's committed index.
    for (index, sector) in [8u64, 1024].into_iter().enumerate() {
        rig.memory.write_slice(&[0x40 + index as u8; 4096], GuestAddress(DATA)).unwrap();
        rig.request(VIRTIO_BLK_T_OUT, sector, &[(DATA, 4096, false)]);
        assert_eq!(rig.serve().errors, 0);
    }
    rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    let served = rig.serve();
    assert_eq!((served.completed, served.errors), (1, 0));
    assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
    // A write after the flush, never flushed: not in the committed index.
    rig.memory.write_slice(&[0x77; 4096], GuestAddress(DATA)).unwrap();
    rig.request(VIRTIO_BLK_T_OUT, 100, &[(DATA, 4096, false)]);
    rig.serve();
    drop(rig);
    let reopened = Disk::open(&spec).unwrap();
    let mut block = vec![0u8; 4096];
    reopened.read_at(&mut block, 8 * 512).unwrap();
    assert!(block.iter().all(|byte| *byte == 0x40), "the first flushed write is there");
    reopened.read_at(&mut block, 1024 * 512).unwrap();
    assert!(block.iter().all(|byte| *byte == 0x41), "the second flushed write is there");
    reopened.read_at(&mut block, 100 * 512).unwrap();
    assert!(block.iter().all(|byte| *byte == 0x33), "the unflushed write is not in the index: the base shows");
}

#[test]
fn a_flush_commits_a_layered_disk_synchronously() {
    flushed_writes_survive_a_reopen_of_a_layered_disk(Engine::synchronous());
}

#[test]
fn a_flush_commits_a_layered_disk_on_io_uring() {
    flushed_writes_survive_a_reopen_of_a_layered_disk(uring());
}

#[test]
fn a_flush_right_behind_writes_in_one_batch_on_io_uring_answers_after_them() {
    let (spec, dir) = layered_spec();
    let mut rig = rig_on(&spec, Engine::new(), Some(dir));
    rig.memory.write_slice(&[0x5c; 4096], GuestAddress(DATA)).unwrap();
    for sector in 0..8u64 {
        rig.request(VIRTIO_BLK_T_OUT, sector * 8, &[(DATA, 4096, false)]);
    }
    rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    let served = rig.serve();
    assert_eq!((served.completed, served.errors), (9, 0));
    // The flush drains: it is the last of the nine to be used.
    assert_eq!(rig.used(8).0, 8 * 3, "the flush's chain head completes last");
}

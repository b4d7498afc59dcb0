//! Test support: guest memory shaped like carrel-vmm's (one memfd, MAP_SHARED), and a
//! harness that sends requests through a mock virtqueue and reads the responses back.

use std::fs::File;
use std::os::fd::FromRawFd;

use crate::memory::{GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, FileOffset, GuestAddress};

use crate::device::{Gpu, GpuConfig};
use crate::protocol::{
    encode, Header, Rect, CMD_RESOURCE_CREATE_2D, CMD_RESOURCE_FLUSH, CMD_SET_SCANOUT, RESP_OK_NODATA,
};

pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
/// Where the mock queue's rings live (cleared before each request).
const QUEUE_AREA: usize = 0x1_0000;
pub const REQUEST_ADDR: u64 = 0x10_0000;
pub const RESPONSE_ADDR: u64 = 0x30_0000;
/// Page-aligned guest RAM for resource pixels.
pub const PIXELS_ADDR: u64 = 0x40_0000;
pub const MEMORY_SIZE: u64 = 32 << 20;

/// Guest RAM as carrel-vmm builds it: a memfd, regions mapped from it with
/// `MmapRegion::from_file` (MAP_SHARED). `ranges` are (guest address, length) pairs laid
/// out one after another in the file.
pub fn memfd_memory(ranges: &[(u64, u64)]) -> (GuestMemoryMmap, File) {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"carrel-gpu-test-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let memfd = unsafe { File::from_raw_fd(fd) };
    memfd.set_len(ranges.iter().map(|r| r.1).sum()).unwrap();
    let mut regions = Vec::new();
    let mut file_offset = 0;
    for &(gpa, len) in ranges {
        let mapping =
            MmapRegion::from_file(FileOffset::new(memfd.try_clone().unwrap(), file_offset), len as usize).unwrap();
        regions.push(GuestRegionMmap::new(mapping, GuestAddress(gpa)).unwrap());
        file_offset += len;
    }
    (GuestMemoryMmap::from_regions(regions).unwrap(), memfd)
}

/// Anonymous guest RAM: no file behind it, so backings cannot be viewed in place.
pub fn anonymous_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap()
}

pub fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// A response as the guest would read it.
#[derive(Debug)]
pub struct Reply {
    pub header: Header,
    pub bytes: Vec<u8>,
    pub used_len: u32,
    pub needs_interrupt: bool,
}

impl Reply {
    pub fn response_type(&self) -> u32 {
        self.header.command
    }
}

/// A device on memfd guest RAM, driven through mock queues.
pub struct Harness {
    pub memory: GuestMemoryMmap,
    pub gpu: Gpu,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with_memory(memfd_memory(&[(0, MEMORY_SIZE)]).0)
    }

    pub fn with_memory(memory: GuestMemoryMmap) -> Harness {
        Harness::with_config(memory, GpuConfig::default())
    }

    pub fn with_config(memory: GuestMemoryMmap, config: GpuConfig) -> Harness {
        let gpu = Gpu::new(config, memory.clone()).unwrap();
        Harness { memory, gpu }
    }

    /// Runs `descriptors` as one chain on the control (or cursor) queue; returns the used
    /// length and whether an interrupt is needed.
    pub fn run_chain(&mut self, descriptors: &[RawDescriptor], cursor: bool) -> (u32, bool) {
        self.memory.write_slice(&vec![0u8; QUEUE_AREA], GuestAddress(0)).unwrap();
        let mock = MockSplitQueue::new(&self.memory, 16);
        mock.add_desc_chains(descriptors, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let needs_interrupt =
            if cursor { self.gpu.process_cursor_queue(&mut queue) } else { self.gpu.process_control_queue(&mut queue) };
        let used_len = mock.used().ring().ref_at(0).unwrap().load().len();
        (used_len, needs_interrupt)
    }

    fn send_on(&mut self, request: &[u8], cursor: bool) -> Reply {
        self.memory.write_slice(request, GuestAddress(REQUEST_ADDR)).unwrap();
        let room = 4096u32;
        self.memory.write_slice(&vec![0u8; room as usize], GuestAddress(RESPONSE_ADDR)).unwrap();
        let chain =
            [descriptor(REQUEST_ADDR, request.len() as u32, NEXT, 1), descriptor(RESPONSE_ADDR, room, WRITE, 0)];
        let (used_len, needs_interrupt) = self.run_chain(&chain, cursor);
        let mut bytes = vec![0u8; used_len as usize];
        self.memory.read_slice(&mut bytes, GuestAddress(RESPONSE_ADDR)).unwrap();
        let header = Header::parse(&bytes).unwrap_or_default();
        Reply { header, bytes, used_len, needs_interrupt }
    }

    /// Sends a request on the control queue.
    pub fn send(&mut self, request: &[u8]) -> Reply {
        self.send_on(request, false)
    }

    /// Sends a request on the cursor queue (with a response buffer).
    pub fn send_cursor(&mut self, request: &[u8]) -> Reply {
        self.send_on(request, true)
    }

    /// Sends a request that must succeed with OK_NODATA.
    pub fn ok(&mut self, request: &[u8]) {
        let reply = self.send(request);
        assert_eq!(reply.response_type(), RESP_OK_NODATA, "request {:#x?}", Header::parse(request));
    }

    pub fn create(&mut self, resource_id: u32, format: u32, width: u32, height: u32) {
        self.ok(&encode::words(CMD_RESOURCE_CREATE_2D, &[resource_id, format, width, height]));
    }

    /// Creates a B8G8R8X8 resource backed by contiguous RAM at `addr`, shown on the scanout.
    pub fn show(&mut self, resource_id: u32, width: u32, height: u32, addr: u64) {
        self.create(resource_id, 2, width, height);
        self.ok(&encode::attach_backing(resource_id, &[(addr, width * height * 4)]));
        self.ok(&encode::words(CMD_SET_SCANOUT, &[0, 0, width, height, 0, resource_id]));
    }

    pub fn flush(&mut self, resource_id: u32, rect: Rect) {
        self.ok(&encode::words(CMD_RESOURCE_FLUSH, &[rect.x, rect.y, rect.width, rect.height, resource_id, 0]));
    }

    /// Writes B8G8R8X8 pixels computed by `pixel(x, y) -> [r, g, b]` into guest RAM at `addr`.
    pub fn paint(&self, addr: u64, width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) {
        let mut bytes = Vec::with_capacity((width * height * 4) as usize);
        for y in 0..height {
            for x in 0..width {
                let [r, g, b] = pixel(x, y);
                bytes.extend_from_slice(&[b, g, r, 0]);
            }
        }
        self.memory.write_slice(&bytes, GuestAddress(addr)).unwrap();
    }
}

/// A test picture: distinct colour per pixel.
pub fn pattern(x: u32, y: u32) -> [u8; 3] {
    [(x * 7) as u8, (y * 13) as u8, ((x + y) * 3) as u8]
}

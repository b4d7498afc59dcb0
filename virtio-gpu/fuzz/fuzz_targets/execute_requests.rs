//! A sequence of requests (each prefixed by a little-endian u16 length) run against one
//! device on memfd-backed guest RAM, then a screenshot: no input may panic the host.
#![no_main]

use std::fs::File;
use std::os::fd::FromRawFd;

use carrel_gpu::{parse_request, CaptureFormat, CaptureOptions, Gpu, GpuConfig};
use libfuzzer_sys::fuzz_target;
use vm_memory::{FileOffset, GuestAddress};
use carrel_gpu::memory::{GuestMemoryMmap, GuestRegionMmap, MmapRegion};

const RAM_BYTES: usize = 8 << 20;

fn guest_memory() -> GuestMemoryMmap {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"carrel-gpu-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let memfd = unsafe { File::from_raw_fd(fd) };
    memfd.set_len(RAM_BYTES as u64).unwrap();
    let region = MmapRegion::from_file(FileOffset::new(memfd, 0), RAM_BYTES).unwrap();
    GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()]).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let mut gpu = Gpu::new(GpuConfig::default(), guest_memory()).unwrap();
    let mut rest = data;
    while let [low, high, tail @ ..] = rest {
        let len = (u16::from_le_bytes([*low, *high]) as usize).min(tail.len());
        let (request, next) = tail.split_at(len);
        if let Ok(request) = parse_request(request) {
            gpu.execute(&request.command);
        }
        rest = next;
    }
    let _ = gpu.screen().capture(&CaptureOptions { format: CaptureFormat::Qoi, cursor: true, ..Default::default() });
});

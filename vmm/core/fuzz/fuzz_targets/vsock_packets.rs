//! Any bytes as a stream of guest vsock packets (44-byte header, then up to the payload it
//! claims): the muxer must refuse or serve each one and never panic, and what it answers
//! must be well-formed packets for the guest.
#![no_main]

use std::sync::{Mutex, OnceLock};

use carrel_vmm::devices::virtio::vsock::muxer::Muxer;
use carrel_vmm::devices::virtio::vsock::{PacketHeader, HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

fn muxer() -> &'static Mutex<Muxer> {
    static MUXER: OnceLock<Mutex<Muxer>> = OnceLock::new();
    MUXER.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("carrel-fuzz-vsock-{}.sock", std::process::id()));
        Mutex::new(Muxer::new(3, &path).expect("listen on a temp socket"))
    })
}

fuzz_target!(|data: &[u8]| {
    let mut muxer = muxer().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut rest = data;
    while let Some(header) = PacketHeader::from_bytes(rest) {
        rest = &rest[HEADER_SIZE..];
        let claimed = (header.len as usize).min(rest.len());
        muxer.handle_guest_packet(&header, &rest[..claimed]);
        rest = &rest[claimed..];
    }
    while let Some(packet) = muxer.next_packet() {
        assert_eq!(packet.header.len as usize, packet.payload.len());
    }
});

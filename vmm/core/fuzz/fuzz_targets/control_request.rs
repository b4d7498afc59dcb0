//! Any bytes on a VM control socket: framing and decoding must refuse or decode, never
//! panic, and never allocate what a length field merely claims.
#![no_main]

use carrel_vmm::control::{read_frame, Request, MAX_REQUEST_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    while let Ok(Some(_)) = read_frame::<Request>(&mut input, MAX_REQUEST_BYTES) {}
});

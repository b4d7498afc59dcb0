//! Any bytes as the readable part of a control-queue chain: the parser must return a
//! request or an error, never panic, and what parses must encode a response.
#![no_main]

use carrel_gpu::protocol::{parse_request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = parse_request(data) {
        let mut out = Vec::new();
        Response::OkNoData.encode(&request.header, &mut out);
    }
});

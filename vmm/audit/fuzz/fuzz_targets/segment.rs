//! Any bytes as a segment file copied from a host nobody trusts: the header check, the
//! frame walk and the event decoder must each refuse or accept, never panic.
#![no_main]

use std::path::Path;

use carrel_audit::segment::{parse_header, Frames};
use carrel_audit::Event;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_header(Path::new("fuzz.seg"), data);
    for frame in Frames::new(data) {
        let Ok(frame) = frame else { break };
        let _ = Event::decode(frame.body);
    }
});

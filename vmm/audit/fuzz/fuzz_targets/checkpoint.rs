//! Any text as a checkpoint file: parsing must refuse or accept, never panic.
#![no_main]

use carrel_audit::SignedCheckpoint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = SignedCheckpoint::parse(text);
    }
});

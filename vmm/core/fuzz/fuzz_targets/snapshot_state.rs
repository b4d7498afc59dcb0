//! Any bytes as a `state.bin`, and the same bytes as the body of a well-formed, correctly
//! signed one: the header and digest checks, then postcard decoding of `SnapshotState`,
//! must refuse or decode, never panic, and never allocate what a length field merely
//! claims; a state that decodes has its memory map checked as a restore checks it.
//!
//! Mutated files almost never keep their blake3 digest, so without the framed pass the
//! fuzzer would stop at the digest check and never reach the body decoder.
#![no_main]

use carrel_vmm::platform::PlatformKind;
use carrel_vmm::snapshot::format::{self, FORMAT_VERSION, MAGIC};
use carrel_vmm::snapshot::SnapshotState;
use libfuzzer_sys::fuzz_target;

/// `data` as the body of a `state.bin` (layout in `format`'s module doc), signed.
fn framed(data: &[u8]) -> Vec<u8> {
    let mut file = Vec::with_capacity(24 + data.len() + 32);
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&(PlatformKind::Pvm as u32).to_le_bytes());
    file.extend_from_slice(&(data.len() as u64).to_le_bytes());
    file.extend_from_slice(data);
    let digest = format::digest_of(&file);
    file.extend_from_slice(&digest);
    file
}

fn check(file: &[u8]) {
    if let Ok((_platform, state)) = format::decode::<SnapshotState>(file) {
        let _ = state.memory.validate(state.memory.size);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    check(&framed(data));
});

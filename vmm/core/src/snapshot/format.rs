//! `state.bin`: a fixed header, a postcard body, and the blake3 of both.
//!
//! ```text
//! magic "CRRLSNAP" | format version u32 | platform u32 | body length u64 | body | blake3 (32)
//! ```
//!
//! Everything is checked before the body is decoded: length, digest, version, platform.
//! One format version for the whole file; a change of any saved type bumps it.

use serde::{de::DeserializeOwned, Serialize};

use carrel_firmware::PlatformKind;

pub const MAGIC: &[u8; 8] = b"CRRLSNAP";
/// The format version this VMM writes and reads.
pub const FORMAT_VERSION: u32 = 2;
const HEADER_BYTES: usize = 8 + 4 + 4 + 8;
const DIGEST_BYTES: usize = 32;
/// Largest body accepted: VM state is small (memory lives in memory.bin).
pub const MAX_BODY_BYTES: u64 = 64 << 20;

/// Why a `state.bin` was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("it is not a Carrel snapshot (bad magic)")]
    BadMagic,
    #[error("it is truncated ({found} bytes, {expected} expected)")]
    Truncated { found: usize, expected: usize },
    #[error("its digest does not match: the file is corrupt")]
    Digest,
    #[error("it is format version {found}; this carrel-vmm reads version {FORMAT_VERSION}")]
    Version { found: u32 },
    #[error("it names an unknown KVM platform ({0})")]
    Platform(u32),
    #[error("its body is {0} bytes, more than a snapshot state can be")]
    TooLarge(u64),
    #[error("its body does not decode: {0}")]
    Decode(String),
    #[error("its state cannot be encoded: {0}")]
    Encode(String),
}

/// Encodes `body` for `platform`.
pub fn encode<T: Serialize>(platform: PlatformKind, body: &T) -> Result<Vec<u8>, FormatError> {
    let body = postcard::to_allocvec(body).map_err(|err| FormatError::Encode(err.to_string()))?;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + body.len() + DIGEST_BYTES);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(platform as u32).to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&body);
    let digest = blake3::hash(&bytes);
    bytes.extend_from_slice(digest.as_bytes());
    Ok(bytes)
}

/// Decodes a `state.bin`, checking it whole before trusting any of it; returns the
/// platform it was taken on with the body (the restore checks it against this host's).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<(PlatformKind, T), FormatError> {
    if bytes.len() < HEADER_BYTES + DIGEST_BYTES {
        return Err(FormatError::Truncated { found: bytes.len(), expected: HEADER_BYTES + DIGEST_BYTES });
    }
    if &bytes[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let mut length = [0u8; 8];
    length.copy_from_slice(&bytes[16..24]);
    let body_len = u64::from_le_bytes(length);
    if body_len > MAX_BODY_BYTES {
        return Err(FormatError::TooLarge(body_len));
    }
    let expected = HEADER_BYTES + body_len as usize + DIGEST_BYTES;
    if bytes.len() != expected {
        return Err(FormatError::Truncated { found: bytes.len(), expected });
    }
    let (signed, digest) = bytes.split_at(expected - DIGEST_BYTES);
    if blake3::hash(signed).as_bytes() != digest {
        return Err(FormatError::Digest);
    }
    let version = word(8);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    let platform = PlatformKind::from_raw(word(12)).ok_or(FormatError::Platform(word(12)))?;
    let body = postcard::from_bytes(&signed[HEADER_BYTES..]).map_err(|err| FormatError::Decode(err.to_string()))?;
    Ok((platform, body))
}

/// The digest that names a `state.bin` (a diff names its parent by it).
pub fn digest_of(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Re-signs a tampered file so a check after the digest can be reached.
    fn resign(bytes: &mut [u8]) {
        let end = bytes.len() - DIGEST_BYTES;
        let digest = blake3::hash(&bytes[..end]);
        bytes[end..].copy_from_slice(digest.as_bytes());
    }

    #[test]
    fn state_round_trips() {
        let bytes = encode(PlatformKind::Pvm, &(7u32, "desk".to_string())).unwrap();
        let (platform, back): (PlatformKind, (u32, String)) = decode(&bytes).unwrap();
        assert_eq!((platform, back), (PlatformKind::Pvm, (7, "desk".to_string())));
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let bytes = encode(PlatformKind::Pvm, &vec![1u64, 2, 3]).unwrap();
        for index in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[index] ^= 0x40;
            assert!(decode::<Vec<u64>>(&damaged).is_err(), "byte {index}");
        }
    }

    #[test]
    fn truncated_state_is_refused() {
        let bytes = encode(PlatformKind::Pvm, &vec![1u64, 2, 3]).unwrap();
        for len in [0, 10, bytes.len() - 1] {
            assert!(matches!(decode::<Vec<u64>>(&bytes[..len]), Err(FormatError::Truncated { .. })));
        }
    }

    #[test]
    fn wrong_version_or_unknown_platform_is_refused_with_its_reason() {
        let mut bytes = encode(PlatformKind::Pvm, &1u8).unwrap();
        assert_eq!(decode::<u8>(&bytes).unwrap().0, PlatformKind::Pvm);
        bytes[12] = 7;
        resign(&mut bytes);
        assert_eq!(decode::<u8>(&bytes), Err(FormatError::Platform(7)));
        bytes[12] = PlatformKind::Pvm as u8;
        bytes[8] = 9;
        resign(&mut bytes);
        assert_eq!(decode::<u8>(&bytes), Err(FormatError::Version { found: 9 }));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = decode::<Vec<u64>>(&bytes);
        }
    }

    /// A state with every part present: a vCPU, a virtio device, and a diff memory image.
    fn snapshot_state() -> crate::snapshot::SnapshotState {
        use crate::devices::virtio::persist::{MmioState, QueueSaved, VirtioDeviceState};
        use crate::snapshot::memory::{Chunk, MemoryImage, Parent};
        use crate::vstate::persist::{VcpuState, VmState};

        let queue = QueueSaved {
            max_size: 256,
            next_avail: 3,
            next_used: 3,
            event_idx_enabled: false,
            size: 16,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        };
        crate::snapshot::SnapshotState {
            protocol: crate::boot::BootProtocol::Desk,
            restores: 2,
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Some(Default::default()),
                clock: Default::default(),
            },
            vcpus: vec![VcpuState {
                id: 0,
                cpuid: vec![Default::default(); 2],
                mp_state: Default::default(),
                regs: Default::default(),
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                debug_regs: Default::default(),
                lapic: Default::default(),
                msrs: vec![Default::default(); 2],
                vcpu_events: Default::default(),
            }],
            serial: crate::devices::legacy::SerialSaved { registers: [1; 9], in_buffer: b"desk".to_vec() },
            virtio: vec![MmioState {
                device_type: 4,
                status: 15,
                driver_features: 1 << 32,
                device_features_select: 0,
                driver_features_select: 1,
                queue_select: 0,
                config_generation: 0,
                interrupt_status: 0,
                queues: vec![queue],
                active_queues: vec![queue],
                device: VirtioDeviceState::Rng,
            }],
            memory: MemoryImage {
                size: 1 << 20,
                chunks: vec![Chunk { offset: 0, len: 4096, digest: [7; 32] }],
                zeroed: vec![(8192, 4096)],
                parent: Some(Parent { dir: "base".into(), digest: [9; 32] }),
            },
        }
    }

    /// A well-formed, correctly signed file around `body`, so decoding reaches postcard.
    fn frame(body: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_BYTES + body.len() + DIGEST_BYTES);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(PlatformKind::Pvm as u32).to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(body);
        bytes.extend_from_slice(&[0; DIGEST_BYTES]);
        resign(&mut bytes);
        bytes
    }

    #[test]
    fn snapshot_state_truncated_at_any_length_is_refused() {
        let bytes = encode(PlatformKind::Pvm, &snapshot_state()).unwrap();
        let (_, state) = decode::<crate::snapshot::SnapshotState>(&bytes).unwrap();
        assert_eq!((state.vcpus.len(), state.virtio.len()), (1, 1));
        state.memory.validate(state.memory.size).unwrap();
        assert_eq!(frame(&bytes[HEADER_BYTES..bytes.len() - DIGEST_BYTES]), bytes, "frame matches encode");

        for len in 0..bytes.len() {
            let refused = decode::<crate::snapshot::SnapshotState>(&bytes[..len]);
            assert!(matches!(refused, Err(FormatError::Truncated { .. })), "file cut at {len}: {refused:?}");
        }
        // A body cut short but framed and signed as if whole gets past every header check
        // to postcard, which must run out of bytes, not panic or read past them.
        let body = &bytes[HEADER_BYTES..bytes.len() - DIGEST_BYTES];
        for len in 0..body.len() {
            let refused = decode::<crate::snapshot::SnapshotState>(&frame(&body[..len]));
            assert!(matches!(refused, Err(FormatError::Decode(_))), "body cut at {len}: {refused:?}");
        }
    }

    #[test]
    fn random_snapshot_state_files_and_bodies_are_refused_without_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..400usize {
            let len = case * 7 % 2048;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let refused = decode::<crate::snapshot::SnapshotState>(&bytes);
            assert!(refused.is_err(), "random file {case}: {refused:?}");
            let refused = decode::<crate::snapshot::SnapshotState>(&frame(&bytes));
            assert!(matches!(refused, Err(FormatError::Decode(_))), "random body {case}: {refused:?}");
        }
    }
}

//! Fuzz-style test of the frame decoder and message decoding: many random and mutated byte
//! strings, fed in random pieces. Nothing may panic, and every frame that comes out must
//! respect the size limit. Deterministic (a fixed-seed xorshift), so a failure reproduces.

use carrel_agent_proto::{encode_frame, kind, Exec, FrameDecoder, Hello, Message, Ping, MAX_BODY, MAX_FRAME_LEN};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn valid_stream(rng: &mut XorShift) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.below(6) + 1 {
        let message = match rng.below(5) {
            0 => Message::Ping(Ping { nonce: rng.next() }),
            1 => Message::Data(vec![rng.next() as u8; rng.below(300)]),
            2 => Message::Hello(Hello { protocol_version: 1, name: "n".repeat(rng.below(40)), os: "linux".into() }),
            3 => Message::Exec(Exec {
                argv: vec!["sh".into(), "-c".into(), "x".repeat(rng.below(50))],
                env: vec![("K".into(), "V".into())],
                cwd: Some("/tmp".into()),
                ..Exec::default()
            }),
            _ => Message::Done,
        };
        out.extend(encode_frame(rng.next() as u32, &message).unwrap());
    }
    out
}

fn mutate(rng: &mut XorShift, bytes: &mut Vec<u8>) {
    for _ in 0..rng.below(4) + 1 {
        if bytes.is_empty() {
            bytes.push(rng.next() as u8);
        }
        let at = rng.below(bytes.len());
        match rng.below(6) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => bytes[at] = rng.next() as u8,
            2 => bytes.truncate(at),
            3 => bytes.insert(at, rng.next() as u8),
            4 => {
                // Overwrite a 4-byte window, often a length field, with an extreme value.
                let value = [0u32, 1, 5, 6, 7, MAX_FRAME_LEN, MAX_FRAME_LEN + 1, u32::MAX][rng.below(8)];
                for (offset, byte) in value.to_le_bytes().into_iter().enumerate() {
                    if let Some(slot) = bytes.get_mut(at + offset) {
                        *slot = byte;
                    }
                }
            }
            _ => {
                let len = bytes.len();
                bytes.remove(at.min(len - 1));
            }
        }
    }
}

fn feed(rng: &mut XorShift, bytes: &[u8]) {
    let mut decoder = FrameDecoder::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let piece = rng.below(rest.len().min(64)) + 1;
        let mut input = &rest[..piece];
        while let Some(result) = decoder.decode(&mut input) {
            if let Ok(frame) = result {
                assert!(frame.body.len() <= MAX_BODY);
                // Decoding a body of any kind must not panic either.
                let _ = frame.into_message();
            }
        }
        rest = &rest[piece..];
    }
    let _ = decoder.finish();
}

#[test]
fn decoder_fed_random_bytes_never_panics() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for _ in 0..5_000 {
        let len = rng.below(512);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        feed(&mut rng, &bytes);
    }
}

#[test]
fn decoder_fed_mutated_frames_never_panics() {
    let mut rng = XorShift(0xDEAD_BEEF_1234_5678);
    for _ in 0..20_000 {
        let mut bytes = valid_stream(&mut rng);
        mutate(&mut rng, &mut bytes);
        feed(&mut rng, &bytes);
    }
}

#[test]
fn every_kind_with_random_body_never_panics() {
    let mut rng = XorShift(42);
    for kind in 0..=u16::from(u8::MAX) {
        for _ in 0..50 {
            let body: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
            let _ = Message::decode(kind, body);
        }
    }
    assert!(Message::decode(kind::REMOVE + 1000, Vec::new()).is_err());
}

//! Any bytes from a peer, fed to the frame decoder in pieces whose sizes come from the
//! input too: every frame decodes to a message or an error, and a decoded message encodes
//! back to a frame the decoder reads as the same message.
#![no_main]

use carrel_agent_proto::frame::{encode_frame, FrameDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else { return };
    let piece = usize::from(split).max(1);
    let mut decoder = FrameDecoder::new();
    for chunk in bytes.chunks(piece) {
        let mut input = chunk;
        while let Some(frame) = decoder.decode(&mut input) {
            let Ok(frame) = frame else { continue };
            let id = frame.id;
            if let Ok(message) = frame.into_message() {
                if let Ok(encoded) = encode_frame(id, &message) {
                    let mut again = FrameDecoder::new();
                    let mut slice = encoded.as_slice();
                    let decoded = again.decode(&mut slice).expect("a whole frame").expect("a valid frame");
                    assert_eq!(decoded.into_message().expect("decodes again"), message);
                }
            }
        }
    }
    let _ = decoder.finish();
});

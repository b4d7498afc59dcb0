//! Frames: the fixed header, encoding, and a streaming decoder that never allocates more
//! than one bounded frame and never panics on hostile bytes.

use alloc::vec::Vec;

use crate::message::{Message, MessageError};
use crate::{HEADER_LEN, MAX_FRAME_LEN};

/// Bytes of the header after the length field: id and kind.
const ID_KIND_LEN: u32 = 6;

/// Errors found in the byte stream itself. After each one the decoder is ready for the next
/// frame: an oversized frame is skipped, so the connection survives it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length field is smaller than the id and kind it must cover.
    #[error("frame length {len} is shorter than the 6-byte id and kind")]
    ReadLength { len: u32 },
    /// The frame is larger than the protocol allows; its bytes are being skipped.
    #[error("frame of request {id} (kind {kind}) is {len} bytes, more than the limit of {MAX_FRAME_LEN}")]
    AcceptSize { id: u32, kind: u16, len: u32 },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes of it received)")]
    ReadBody { buffered: usize },
}

/// The fixed part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Request id (0: none).
    pub id: u32,
    /// Message kind ([`crate::kind`]).
    pub kind: u16,
    /// Body length in bytes.
    pub body_len: usize,
}

/// Encodes a header for a body of `body_len` bytes. The caller keeps `body_len` within
/// [`crate::MAX_BODY`]; [`encode_frame`] checks it.
pub fn encode_header(id: u32, kind: u16, body_len: usize) -> [u8; HEADER_LEN] {
    let len = (body_len as u32).saturating_add(ID_KIND_LEN);
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&len.to_le_bytes());
    header[4..8].copy_from_slice(&id.to_le_bytes());
    header[8..10].copy_from_slice(&kind.to_le_bytes());
    header
}

/// Encodes `message` for request `id` as one complete frame.
pub fn encode_frame(id: u32, message: &Message) -> Result<Vec<u8>, MessageError> {
    let mut out = Vec::with_capacity(HEADER_LEN + 64);
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    message.encode_body_into(&mut out)?;
    let body_len = out.len() - HEADER_LEN;
    if body_len > crate::MAX_BODY {
        return Err(MessageError::EncodeSize { kind: message.kind(), len: body_len });
    }
    out[..HEADER_LEN].copy_from_slice(&encode_header(id, message.kind(), body_len));
    Ok(out)
}

/// One received frame, body not yet decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Request id (0: none).
    pub id: u32,
    /// Message kind.
    pub kind: u16,
    /// Raw body.
    pub body: Vec<u8>,
}

impl Frame {
    /// Decodes the body; an unknown kind or a bad body is an error for this request only.
    pub fn into_message(self) -> Result<Message, MessageError> {
        Message::decode(self.kind, self.body)
    }
}

#[derive(Debug)]
enum DecodeState {
    /// Collecting the 10-byte header.
    Header { bytes: [u8; HEADER_LEN], have: usize },
    /// Collecting a body of known length.
    Body { id: u32, kind: u16, body: Vec<u8>, need: usize },
    /// Discarding the rest of a frame that was refused.
    Skip { remaining: usize },
}

/// Streaming frame decoder: feed it bytes as they arrive, take complete frames out.
///
/// It buffers at most one frame (bounded by [`MAX_FRAME_LEN`]) and consumes input only up
/// to the end of the frame it completes, so the caller keeps the rest for the next call.
#[derive(Debug)]
pub struct FrameDecoder {
    state: DecodeState,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder waiting for the first header.
    pub fn new() -> Self {
        FrameDecoder { state: DecodeState::Header { bytes: [0; HEADER_LEN], have: 0 } }
    }

    /// Consumes bytes from the front of `input` until a frame completes or an error is
    /// found (`Some`), or `input` is used up (`None`).
    pub fn decode(&mut self, input: &mut &[u8]) -> Option<Result<Frame, FrameError>> {
        loop {
            match &mut self.state {
                DecodeState::Header { bytes, have } => {
                    // The length alone is read first, so a too-short length is refused
                    // before its bytes are taken as id and kind.
                    let target = if *have < 4 { 4 } else { HEADER_LEN };
                    let take = (target - *have).min(input.len());
                    bytes[*have..*have + take].copy_from_slice(&input[..take]);
                    *have += take;
                    *input = &input[take..];
                    if *have < target {
                        return None;
                    }
                    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                    if target == 4 {
                        if len < ID_KIND_LEN {
                            self.state = DecodeState::Skip { remaining: len as usize };
                            return Some(Err(FrameError::ReadLength { len }));
                        }
                        continue;
                    }
                    let id = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
                    let kind = u16::from_le_bytes([bytes[8], bytes[9]]);
                    let body_len = (len - ID_KIND_LEN) as usize;
                    if len > MAX_FRAME_LEN {
                        self.state = DecodeState::Skip { remaining: body_len };
                        return Some(Err(FrameError::AcceptSize { id, kind, len }));
                    }
                    self.state = DecodeState::Body { id, kind, body: Vec::with_capacity(body_len), need: body_len };
                }
                DecodeState::Body { id, kind, body, need } => {
                    let take = (*need - body.len()).min(input.len());
                    body.extend_from_slice(&input[..take]);
                    *input = &input[take..];
                    if body.len() < *need {
                        return None;
                    }
                    let frame = Frame { id: *id, kind: *kind, body: core::mem::take(body) };
                    self.reset();
                    return Some(Ok(frame));
                }
                DecodeState::Skip { remaining } => {
                    let take = (*remaining).min(input.len());
                    *remaining -= take;
                    *input = &input[take..];
                    if *remaining > 0 {
                        return None;
                    }
                    self.reset();
                }
            }
        }
    }

    /// True between frames: the stream may end here without losing anything.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, DecodeState::Header { have: 0, .. })
    }

    /// Checks that the stream ended on a frame boundary.
    pub fn finish(&self) -> Result<(), FrameError> {
        let buffered = match &self.state {
            DecodeState::Header { have, .. } => *have,
            DecodeState::Body { body, .. } => HEADER_LEN + body.len(),
            DecodeState::Skip { .. } => HEADER_LEN,
        };
        if buffered == 0 {
            Ok(())
        } else {
            Err(FrameError::ReadBody { buffered })
        }
    }

    fn reset(&mut self) {
        self.state = DecodeState::Header { bytes: [0; HEADER_LEN], have: 0 };
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec;

    use super::*;
    use crate::message::Ping;
    use crate::MAX_BODY;

    fn decode_all(decoder: &mut FrameDecoder, mut input: &[u8]) -> Vec<Result<Frame, FrameError>> {
        let mut out = Vec::new();
        while let Some(result) = decoder.decode(&mut input) {
            out.push(result);
        }
        out
    }

    #[test]
    fn header_encodes_little_endian_fields() {
        let header = encode_header(0x0102_0304, 0x0506, 3);
        assert_eq!(header, [9, 0, 0, 0, 4, 3, 2, 1, 6, 5]);
    }

    #[test]
    fn decoder_fed_byte_by_byte_yields_frame() {
        let bytes = encode_frame(7, &Message::Ping(Ping { nonce: 99 })).unwrap();
        let mut decoder = FrameDecoder::new();
        let mut frames = Vec::new();
        for byte in &bytes {
            frames.extend(decode_all(&mut decoder, core::slice::from_ref(byte)));
        }
        assert_eq!(frames.len(), 1);
        let frame = frames.pop().unwrap().unwrap();
        assert_eq!(frame.id, 7);
        assert_eq!(frame.into_message().unwrap(), Message::Ping(Ping { nonce: 99 }));
        assert!(decoder.is_idle());
    }

    #[test]
    fn decoder_with_two_frames_in_one_buffer_yields_both() {
        let mut bytes = encode_frame(1, &Message::Ping(Ping { nonce: 1 })).unwrap();
        bytes.extend(encode_frame(2, &Message::Ping(Ping { nonce: 2 })).unwrap());
        let frames = decode_all(&mut FrameDecoder::new(), &bytes);
        let ids: Vec<u32> = frames.into_iter().map(|f| f.unwrap().id).collect();
        assert_eq!(ids, vec![1, 2]);
    }

    #[test]
    fn decoder_with_oversized_frame_reports_it_and_skips_to_next() {
        let len = MAX_FRAME_LEN + 1;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&5u32.to_le_bytes());
        bytes.extend_from_slice(&2u16.to_le_bytes());
        bytes.resize(4 + len as usize, 0xAA);
        bytes.extend(encode_frame(6, &Message::Ping(Ping { nonce: 3 })).unwrap());
        let frames = decode_all(&mut FrameDecoder::new(), &bytes);
        assert_eq!(frames[0], Err(FrameError::AcceptSize { id: 5, kind: 2, len }));
        assert_eq!(frames[1].as_ref().unwrap().id, 6);
        assert_eq!(frames.len(), 2);
    }

    #[test]
    fn decoder_with_huge_length_does_not_allocate_it() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0; 6]);
        let mut decoder = FrameDecoder::new();
        let frames = decode_all(&mut decoder, &bytes);
        assert!(matches!(frames[..], [Err(FrameError::AcceptSize { len: u32::MAX, .. })]));
        assert!(matches!(decoder.state, DecodeState::Skip { .. }));
    }

    #[test]
    fn decoder_with_short_length_reports_and_resyncs() {
        let mut bytes = vec![2, 0, 0, 0, 0xFF, 0xFF];
        bytes.extend(encode_frame(9, &Message::Ping(Ping { nonce: 0 })).unwrap());
        let frames = decode_all(&mut FrameDecoder::new(), &bytes);
        assert_eq!(frames[0], Err(FrameError::ReadLength { len: 2 }));
        assert_eq!(frames[1].as_ref().unwrap().id, 9);
    }

    #[test]
    fn finish_inside_frame_reports_truncation() {
        let bytes = encode_frame(1, &Message::Ping(Ping { nonce: 1 })).unwrap();
        let mut decoder = FrameDecoder::new();
        assert!(decode_all(&mut decoder, &bytes[..bytes.len() - 1]).is_empty());
        assert_eq!(decoder.finish(), Err(FrameError::ReadBody { buffered: bytes.len() - 1 }));
        assert!(FrameDecoder::new().finish().is_ok());
    }

    #[test]
    fn encode_frame_with_body_over_limit_returns_error() {
        let message = Message::Data(vec![0; MAX_BODY + 1]);
        assert!(matches!(encode_frame(1, &message), Err(MessageError::EncodeSize { .. })));
    }

    #[test]
    fn decoder_at_max_body_accepts_frame() {
        let message = Message::Data(vec![7; MAX_BODY]);
        let bytes = encode_frame(1, &message).unwrap();
        let frames = decode_all(&mut FrameDecoder::new(), &bytes);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].as_ref().unwrap().body.len(), MAX_BODY);
    }
}

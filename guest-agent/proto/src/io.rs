//! Blocking frame I/O over `std::io` (feature `std`): what the Linux agent and the host
//! client share. The Desk kernel drives [`FrameDecoder`] from its own vsock queue instead.

use std::boxed::Box;
use std::io::{self, Read, Write};
use std::vec;

use crate::frame::{encode_frame, encode_header, Frame, FrameDecoder, FrameError};
use crate::message::{Message, MessageError};
use crate::MAX_BODY;

/// Errors reading or writing frames on a stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    /// The stream failed (including a read timeout: the reader can be retried).
    #[error("reading from the peer failed")]
    Read {
        #[source]
        source: io::Error,
    },
    /// The byte stream broke a framing rule.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Writing to the peer failed.
    #[error("writing to the peer failed")]
    Write {
        #[source]
        source: io::Error,
    },
    /// The message could not be encoded.
    #[error(transparent)]
    Encode(#[from] MessageError),
}

/// Reads frames from a stream through an internal buffer.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    decoder: FrameDecoder,
}

impl<R: Read> FrameReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: vec![0u8; 128 * 1024].into_boxed_slice(),
            start: 0,
            end: 0,
            decoder: FrameDecoder::new(),
        }
    }

    /// The next frame; `Ok(None)` when the peer closed the stream between frames.
    ///
    /// A framing error (oversized frame, bad length) is returned once and the reader stays
    /// usable: the next call continues with the following frame. An I/O error such as a read
    /// timeout leaves any partial frame buffered, so the call can be repeated.
    pub fn read_frame(&mut self) -> Result<Option<Frame>, FrameIoError> {
        loop {
            let mut input = &self.buf[self.start..self.end];
            let before = input.len();
            let result = self.decoder.decode(&mut input);
            self.start += before - input.len();
            if let Some(result) = result {
                return Ok(Some(result?));
            }
            self.start = 0;
            self.end = 0;
            let read = loop {
                match self.inner.read(&mut self.buf) {
                    Ok(read) => break read,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(source) => return Err(FrameIoError::Read { source }),
                }
            };
            if read == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
            self.end = read;
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The wrapped stream, mutably (bytes already buffered stay in the reader).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// Writes `message` as one frame for request `id`.
pub fn write_frame<W: Write + ?Sized>(writer: &mut W, id: u32, message: &Message) -> Result<(), FrameIoError> {
    let bytes = encode_frame(id, message)?;
    writer.write_all(&bytes).map_err(|source| FrameIoError::Write { source })
}

/// Writes a raw-body frame (`Data`, `Stdout`, `Stderr`) without copying `payload`.
pub fn write_raw_frame<W: Write + ?Sized>(
    writer: &mut W,
    id: u32,
    kind: u16,
    payload: &[u8],
) -> Result<(), FrameIoError> {
    if payload.len() > MAX_BODY {
        return Err(MessageError::EncodeSize { kind, len: payload.len() }.into());
    }
    let header = encode_header(id, kind, payload.len());
    writer.write_all(&header).and_then(|()| writer.write_all(payload)).map_err(|source| FrameIoError::Write { source })
}

/// Reads until `buf` is full or the reader ends, so file chunks are full-size; returns the
/// bytes read.
pub fn read_full<R: Read + ?Sized>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use super::*;
    use crate::message::{kind, Ping};

    /// A reader that returns at most 3 bytes per call.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let take = self.0.len().min(buf.len()).min(3);
            buf[..take].copy_from_slice(&self.0[..take]);
            self.0 = &self.0[take..];
            Ok(take)
        }
    }

    #[test]
    fn reader_over_trickling_stream_reads_all_frames() {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, 1, &Message::Ping(Ping { nonce: 5 })).unwrap();
        write_raw_frame(&mut bytes, 2, kind::DATA, &[9; 1000]).unwrap();
        let mut reader = FrameReader::new(Trickle(&bytes));
        assert_eq!(reader.read_frame().unwrap().unwrap().id, 1);
        let data = reader.read_frame().unwrap().unwrap();
        assert_eq!(data.into_message().unwrap(), Message::Data(vec![9; 1000]));
        assert!(reader.read_frame().unwrap().is_none());
    }

    #[test]
    fn reader_at_eof_inside_frame_returns_truncation() {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, 1, &Message::Ping(Ping { nonce: 5 })).unwrap();
        bytes.pop();
        let mut reader = FrameReader::new(&bytes[..]);
        assert!(matches!(reader.read_frame(), Err(FrameIoError::Frame(FrameError::ReadBody { .. }))));
    }
}

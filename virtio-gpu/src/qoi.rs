//! QOI ("Quite OK Image") encoding, fed row by row, and a decoder for tests and tools.
//!
//! QOI is a single-pass format a few times faster than PNG at similar sizes for desktop
//! pictures; the specification is one page (qoiformat.org). Screenshots are opaque, so
//! the encoder writes 3-channel images whose alpha is always 255.

use crate::format::PixelFormat;

const OP_INDEX: u8 = 0x00;
const OP_DIFF: u8 = 0x40;
const OP_LUMA: u8 = 0x80;
const OP_RUN: u8 = 0xc0;
const OP_RGB: u8 = 0xfe;
const OP_RGBA: u8 = 0xff;
const MASK_2: u8 = 0xc0;
const MAX_RUN: u8 = 62;
const END_MARKER: [u8; 8] = [0, 0, 0, 0, 0, 0, 0, 1];
const HEADER_SIZE: usize = 14;

/// Errors decoding a QOI image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QoiError {
    #[error("not a QOI image: bad magic or a header shorter than {HEADER_SIZE} bytes")]
    ReadHeader,
    #[error("QOI image of {width}x{height} is too large to decode")]
    SizeImage { width: u32, height: u32 },
    #[error("QOI data ends before all {expected} pixels are decoded")]
    ReadPixels { expected: usize },
}

#[inline]
fn hash(pixel: [u8; 4]) -> usize {
    (pixel[0] as usize * 3 + pixel[1] as usize * 5 + pixel[2] as usize * 7 + pixel[3] as usize * 11) % 64
}

/// A QOI encoder that takes the image one row at a time.
#[derive(Debug)]
pub struct QoiEncoder {
    out: Vec<u8>,
    /// Pixels as RGBA packed little-endian into a u32 (red in the low byte).
    index: [u32; 64],
    previous: u32,
    /// The previous pixel as it was in the source, with alpha or padding masked off: a
    /// run is detected without converting the pixel.
    previous_source: u32,
    run: u8,
}

const OPAQUE_BLACK: u32 = 0xff00_0000;

/// The spec's hash of a pixel packed as little-endian RGBA, with one multiplication: the
/// mask spreads r, g, b, a into separate 16-bit lanes and the multiplier sums them with
/// weights 3, 5, 7, 11 into the top byte.
#[inline]
fn packed_hash(rgba: u32) -> usize {
    let v = rgba as u64;
    let lanes = (v << 32 | v) & 0xff00_ff00_00ff_00ff;
    (lanes.wrapping_mul(0x0300_0700_0005_000b) >> 56) as usize & 63
}

impl QoiEncoder {
    /// Starts an opaque `width` x `height` image (channels = 3, sRGB).
    pub fn new(width: u32, height: u32) -> QoiEncoder {
        // Desktop pictures compress to roughly a quarter of their raw RGB size.
        let mut out = Vec::with_capacity(HEADER_SIZE + (width as usize * height as usize) + END_MARKER.len());
        out.extend_from_slice(b"qoif");
        out.extend_from_slice(&width.to_be_bytes());
        out.extend_from_slice(&height.to_be_bytes());
        out.extend_from_slice(&[3, 0]);
        // The spec's starting pixel is opaque black, which is an all-zero source pixel.
        QoiEncoder { out, index: [0; 64], previous: OPAQUE_BLACK, previous_source: 0, run: 0 }
    }

    /// Encodes a row of pixels in `format` (alpha or padding ignored).
    pub fn push_row(&mut self, row: &[u8], format: PixelFormat) {
        let channels = format.channels();
        let (red, green, blue) = (channels.red * 8, channels.green * 8, channels.blue * 8);
        let mask = 0xffu32 << red | 0xff << green | 0xff << blue;
        // Ops are written at `at` into room for the worst case (4 bytes per pixel, an RGB
        // op, plus a run), then the row's bytes are kept: no capacity checks per op.
        let start = self.out.len();
        self.out.resize(start + row.len() + 2, 0);
        let mut at = start;
        let (mut previous, mut previous_source, mut run) = (self.previous, self.previous_source, self.run);
        let out = &mut self.out[..];
        for source in row.chunks_exact(4) {
            let &[b0, b1, b2, b3] = source else { continue };
            let source = u32::from_le_bytes([b0, b1, b2, b3]) & mask;
            if source == previous_source {
                run += 1;
                if run == MAX_RUN {
                    out[at] = OP_RUN | (MAX_RUN - 1);
                    at += 1;
                    run = 0;
                }
                continue;
            }
            previous_source = source;
            if run > 0 {
                out[at] = OP_RUN | (run - 1);
                at += 1;
                run = 0;
            }
            let rgba =
                (source >> red & 0xff) | (source >> green & 0xff) << 8 | (source >> blue & 0xff) << 16 | OPAQUE_BLACK;
            let slot = packed_hash(rgba);
            if self.index[slot] == rgba {
                out[at] = OP_INDEX | slot as u8;
                at += 1;
            } else {
                self.index[slot] = rgba;
                at += encode_difference(rgba, previous, &mut out[at..at + 4]);
            }
            previous = rgba;
        }
        self.previous = previous;
        self.previous_source = previous_source;
        self.run = run;
        self.out.truncate(at);
    }

    /// Ends the image and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        if self.run > 0 {
            self.out.push(OP_RUN | (self.run - 1));
        }
        self.out.extend_from_slice(&END_MARKER);
        self.out
    }
}

/// Writes the DIFF, LUMA or RGB op for `rgba` after `previous` into `out` (4 bytes of
/// room); returns the op's length.
#[inline]
fn encode_difference(rgba: u32, previous: u32, out: &mut [u8]) -> usize {
    let [r, g, b, _] = rgba.to_le_bytes();
    let [pr, pg, pb, _] = previous.to_le_bytes();
    let dr = r.wrapping_sub(pr) as i8;
    let dg = g.wrapping_sub(pg) as i8;
    let db = b.wrapping_sub(pb) as i8;
    let dr_dg = dr.wrapping_sub(dg);
    let db_dg = db.wrapping_sub(dg);
    let op: &[u8] = if (-2..=1).contains(&dr) && (-2..=1).contains(&dg) && (-2..=1).contains(&db) {
        &[OP_DIFF | ((dr + 2) as u8) << 4 | ((dg + 2) as u8) << 2 | (db + 2) as u8]
    } else if (-32..=31).contains(&dg) && (-8..=7).contains(&dr_dg) && (-8..=7).contains(&db_dg) {
        &[OP_LUMA | (dg + 32) as u8, ((dr_dg + 8) as u8) << 4 | (db_dg + 8) as u8]
    } else {
        &[OP_RGB, r, g, b]
    };
    out[..op.len()].copy_from_slice(op);
    op.len()
}

/// A decoded QOI image: RGBA pixels whatever the channel count in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QoiImage {
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub rgba: Vec<u8>,
}

/// Largest image [`decode`] accepts (a 16384 x 16384 screen), so hostile input cannot
/// make it allocate without bound.
const MAX_DECODE_PIXELS: usize = 16384 * 16384;

/// Decodes a QOI image.
pub fn decode(bytes: &[u8]) -> Result<QoiImage, QoiError> {
    let header = bytes.get(..HEADER_SIZE).ok_or(QoiError::ReadHeader)?;
    if &header[..4] != b"qoif" {
        return Err(QoiError::ReadHeader);
    }
    let width = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let height = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
    let channels = header[12];
    let expected = (width as usize).checked_mul(height as usize).filter(|&n| n <= MAX_DECODE_PIXELS);
    let expected = expected.ok_or(QoiError::SizeImage { width, height })?;
    let mut rgba = Vec::with_capacity(expected * 4);
    let mut index = [[0u8; 4]; 64];
    let mut pixel = [0u8, 0, 0, 255];
    let mut data = bytes[HEADER_SIZE..].iter().copied();
    let mut next = || data.next().ok_or(QoiError::ReadPixels { expected });
    let mut produced = 0usize;
    while produced < expected {
        let op = next()?;
        let mut run = 1usize;
        match op {
            OP_RGB => pixel = [next()?, next()?, next()?, pixel[3]],
            OP_RGBA => pixel = [next()?, next()?, next()?, next()?],
            _ => match op & MASK_2 {
                OP_INDEX => pixel = index[(op & 0x3f) as usize],
                OP_DIFF => {
                    pixel[0] = pixel[0].wrapping_add(((op >> 4) & 3).wrapping_sub(2));
                    pixel[1] = pixel[1].wrapping_add(((op >> 2) & 3).wrapping_sub(2));
                    pixel[2] = pixel[2].wrapping_add((op & 3).wrapping_sub(2));
                }
                OP_LUMA => {
                    let second = next()?;
                    let dg = (op & 0x3f).wrapping_sub(32);
                    pixel[0] = pixel[0].wrapping_add(dg.wrapping_add(second >> 4).wrapping_sub(8));
                    pixel[1] = pixel[1].wrapping_add(dg);
                    pixel[2] = pixel[2].wrapping_add(dg.wrapping_add(second & 0x0f).wrapping_sub(8));
                }
                _ => run = (op & 0x3f) as usize + 1,
            },
        }
        index[hash(pixel)] = pixel;
        let count = run.min(expected - produced);
        for _ in 0..count {
            rgba.extend_from_slice(&pixel);
        }
        produced += count;
    }
    Ok(QoiImage { width, height, channels, rgba })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_rgba(width: u32, height: u32, rgba: &[u8]) -> Vec<u8> {
        let mut encoder = QoiEncoder::new(width, height);
        for row in rgba.chunks_exact(width as usize * 4) {
            encoder.push_row(row, PixelFormat::R8G8B8X8);
        }
        encoder.finish()
    }

    #[test]
    fn packed_hash_matches_the_spec_hash() {
        let mut value = 0x1234_5678u32;
        for _ in 0..100_000 {
            value = value.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            assert_eq!(packed_hash(value), hash(value.to_le_bytes()), "{value:#x}");
        }
        for value in [0, u32::MAX, 0xff00_0000, 0x00ff_ffff] {
            assert_eq!(packed_hash(value), hash(value.to_le_bytes()), "{value:#x}");
        }
    }

    #[test]
    fn qoi_round_trip_keeps_every_pixel() {
        let (width, height) = (37u32, 23u32);
        let mut rgba = Vec::new();
        let mut seed = 12345u32;
        for i in 0..width * height {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            // Mix of runs, small steps and random jumps to exercise every op.
            let value = match i % 7 {
                0..=2 => [10, 20, 30],
                3 => [11, 19, 31],
                4 => [40, 60, 50],
                _ => [(seed >> 8) as u8, (seed >> 16) as u8, (seed >> 24) as u8],
            };
            rgba.extend_from_slice(&[value[0], value[1], value[2], 255]);
        }
        let encoded = encode_rgba(width, height, &rgba);
        let decoded = decode(&encoded).unwrap();
        assert_eq!((decoded.width, decoded.height, decoded.channels), (width, height, 3));
        assert_eq!(decoded.rgba, rgba);
    }

    #[test]
    fn qoi_long_run_is_split_into_62_pixel_runs() {
        let rgba: Vec<u8> = [0u8, 0, 0, 255].repeat(200);
        let encoded = encode_rgba(200, 1, &rgba);
        assert_eq!(encoded.len(), HEADER_SIZE + 4 + END_MARKER.len(), "200 = 62 + 62 + 62 + 14");
        assert_eq!(decode(&encoded).unwrap().rgba, rgba);
    }

    #[test]
    fn qoi_decode_truncated_data_is_error() {
        let rgba: Vec<u8> = (0..64u32).flat_map(|i| [(i * 3) as u8, (i * 7) as u8, 200, 255]).collect();
        let encoded = encode_rgba(8, 8, &rgba);
        assert_eq!(decode(&encoded[..HEADER_SIZE + 10]), Err(QoiError::ReadPixels { expected: 64 }));
        assert_eq!(decode(b"qoif"), Err(QoiError::ReadHeader));
    }

    #[test]
    fn qoi_decode_absurd_size_is_refused_without_allocating() {
        let mut header = b"qoif".to_vec();
        header.extend_from_slice(&u32::MAX.to_be_bytes());
        header.extend_from_slice(&u32::MAX.to_be_bytes());
        header.extend_from_slice(&[3, 0]);
        assert!(matches!(decode(&header), Err(QoiError::SizeImage { .. })));
    }
}

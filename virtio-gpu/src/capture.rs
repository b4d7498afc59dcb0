//! Screenshots: the scanout's pixels cropped, scaled, with the cursor drawn in, and
//! encoded as raw pixels, PNG or QOI.
//!
//! Encoding reads straight from the scanout view: each source row is copied once from
//! the (possibly guest-written) pixels into a row buffer inside the encoding pass, so no
//! full-frame copy is made before encoding.

use std::io::Write;

use crate::format::PixelFormat;
use crate::protocol::Rect;
use crate::qoi::QoiEncoder;
use crate::surface::ScanoutPixels;

/// Largest output size a scale may ask for.
pub const MAX_SCALE_DIMENSION: u32 = 8192;

/// Errors producing a screenshot from pixels.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("crop {crop:?} is empty or does not fit the {width}x{height} screen")]
    CheckCrop { crop: Rect, width: u32, height: u32 },
    #[error("scale to {width}x{height} is out of range (1..={MAX_SCALE_DIMENSION} each way)")]
    CheckScale { width: u32, height: u32 },
    #[error("PNG encoding failed: {0}")]
    EncodePng(#[from] png::EncodingError),
    #[error("only a raw capture with all its pixels can be encoded again")]
    NotRaw,
}

/// How a screenshot is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaptureFormat {
    /// Pixels in the scanout's [`PixelFormat`], rows `stride` bytes apart.
    #[default]
    Raw,
    /// An 8-bit RGB PNG (fast compression).
    Png,
    /// A 3-channel QOI image.
    Qoi,
}

/// What a screenshot should contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CaptureOptions {
    pub format: CaptureFormat,
    /// Part of the screen to keep, in screen pixels; the whole screen when `None`.
    pub crop: Option<Rect>,
    /// Output size (width, height) after cropping; box-filtered. No scaling when `None`.
    pub scale: Option<(u32, u32)>,
    /// Draw the guest's cursor into the picture.
    pub cursor: bool,
}

/// A screenshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    pub format: CaptureFormat,
    pub width: u32,
    pub height: u32,
    /// Bytes per row for [`CaptureFormat::Raw`]; 0 for encoded formats.
    pub stride: usize,
    /// Layout of raw pixels (and of the scanout an encoded image came from).
    pub pixel_format: PixelFormat,
    pub bytes: Vec<u8>,
    /// Number of the last frame the guest had finished when the capture started.
    pub frame: u64,
}

/// A cursor picture, copied from the guest's cursor resource when it is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CursorImage {
    pub width: u32,
    pub height: u32,
    /// RGBA, straight (not premultiplied) alpha.
    pub rgba: Vec<u8>,
}

/// A cursor image placed on the screen.
#[derive(Debug, Clone)]
pub(crate) struct CursorOverlay {
    /// Screen position of the image's top-left corner (may be off screen).
    pub left: i64,
    pub top: i64,
    pub image: std::sync::Arc<CursorImage>,
}

impl CursorOverlay {
    /// Blends the cursor's part of screen row `y`, columns `x0..x0 + row.len() / 4`, into `row`.
    fn blend_row(&self, y: u32, x0: u32, row: &mut [u8], format: PixelFormat) {
        let cursor_row = y as i64 - self.top;
        let image = &*self.image;
        if cursor_row < 0 || cursor_row >= image.height as i64 {
            return;
        }
        let row_pixels = (row.len() / 4) as i64;
        let start = (self.left - x0 as i64).max(0);
        let end = (self.left + image.width as i64 - x0 as i64).min(row_pixels);
        let channels = format.channels();
        for column in start..end {
            let cursor_column = (column + x0 as i64 - self.left) as usize;
            let source_offset = (cursor_row as usize * image.width as usize + cursor_column) * 4;
            let Some(source) = image.rgba.get(source_offset..source_offset + 4) else {
                continue;
            };
            let alpha = source[3] as u32;
            if alpha == 0 {
                continue;
            }
            let pixel = &mut row[column as usize * 4..column as usize * 4 + 4];
            for (channel, value) in [(channels.red, source[0]), (channels.green, source[1]), (channels.blue, source[2])]
            {
                let under = pixel[channel] as u32;
                pixel[channel] = ((value as u32 * alpha + under * (255 - alpha) + 127) / 255) as u8;
            }
        }
    }
}

/// Produces the output rows of a screenshot: crop, cursor, then box-filtered scale.
struct RowPipeline<'a, 'p> {
    pixels: &'a ScanoutPixels<'p>,
    crop: Rect,
    cursor: Option<&'a CursorOverlay>,
    out_width: u32,
    out_height: u32,
}

impl<'a, 'p> RowPipeline<'a, 'p> {
    fn new(
        pixels: &'a ScanoutPixels<'p>,
        options: &CaptureOptions,
        cursor: Option<&'a CursorOverlay>,
    ) -> Result<RowPipeline<'a, 'p>, CaptureError> {
        let (width, height) = (pixels.width(), pixels.height());
        let crop = options.crop.unwrap_or(Rect::new(0, 0, width, height));
        if crop.is_empty() || !crop.fits_in(width, height) {
            return Err(CaptureError::CheckCrop { crop, width, height });
        }
        let (out_width, out_height) = options.scale.unwrap_or((crop.width, crop.height));
        let in_range = |d: u32| (1..=MAX_SCALE_DIMENSION).contains(&d);
        if !in_range(out_width) || !in_range(out_height) {
            return Err(CaptureError::CheckScale { width: out_width, height: out_height });
        }
        Ok(RowPipeline { pixels, crop, cursor: cursor.filter(|_| options.cursor), out_width, out_height })
    }

    /// Reads row `y` of the crop (with the cursor) into `row` (crop.width * 4 bytes).
    fn source_row(&self, y: u32, row: &mut [u8]) {
        self.pixels.read_row_span(self.crop.y + y, self.crop.x, self.crop.width, row);
        if let Some(cursor) = self.cursor {
            cursor.blend_row(self.crop.y + y, self.crop.x, row, self.pixels.format());
        }
    }

    /// Calls `emit` with each output row, top to bottom, in the scanout's pixel format.
    fn for_each_row<E>(&self, mut emit: impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        let source_bytes = self.crop.width as usize * 4;
        let mut row = vec![0u8; source_bytes];
        if (self.out_width, self.out_height) == (self.crop.width, self.crop.height) {
            for y in 0..self.crop.height {
                self.source_row(y, &mut row);
                emit(&row)?;
            }
            return Ok(());
        }
        // Box filter: each output pixel averages the source pixels its footprint covers;
        // when enlarging, a footprint is one source pixel (nearest neighbour).
        let footprint = |out: u32, out_size: u32, source_size: u32| {
            let start = (out as u64 * source_size as u64 / out_size as u64) as u32;
            let end = (((out as u64 + 1) * source_size as u64 / out_size as u64) as u32).max(start + 1);
            (start, end.min(source_size))
        };
        let columns: Vec<(u32, u32)> =
            (0..self.out_width).map(|x| footprint(x, self.out_width, self.crop.width)).collect();
        let mut column_sums = vec![0u32; source_bytes];
        let mut out = vec![0u8; self.out_width as usize * 4];
        let mut divisors = Divisors::default();
        for out_y in 0..self.out_height {
            let (top, bottom) = footprint(out_y, self.out_height, self.crop.height);
            column_sums.fill(0);
            for y in top..bottom {
                self.source_row(y, &mut row);
                for (sum, value) in column_sums.iter_mut().zip(&row) {
                    *sum += *value as u32;
                }
            }
            let rows = (bottom - top) as u64;
            for (pixel, &(left, right)) in out.chunks_exact_mut(4).zip(&columns) {
                let mut total = [0u64; 4];
                let sums = column_sums.get(left as usize * 4..right as usize * 4).unwrap_or_default();
                for source in sums.chunks_exact(4) {
                    for (total, sum) in total.iter_mut().zip(source) {
                        *total += *sum as u64;
                    }
                }
                let divisor = divisors.get(rows * (right - left) as u64);
                for (value, total) in pixel.iter_mut().zip(total) {
                    *value = divisor.rounded_quotient(total);
                }
            }
            emit(&out)?;
        }
        Ok(())
    }
}

/// Division by a footprint's pixel count, done as a multiplication: a scale has at most
/// four distinct counts (two footprint widths times two heights), and a hardware division
/// per channel would cost more than the rest of the scaler.
#[derive(Debug, Clone, Copy)]
struct Divisor {
    count: u64,
    /// ceil(2^48 / count); exact for the averages below while count < 2^20, and the
    /// product stays below 2^64.
    multiplier: u64,
}

impl Divisor {
    const SHIFT: u32 = 48;
    const EXACT_BELOW: u64 = 1 << 20;

    fn new(count: u64) -> Divisor {
        let count = count.max(1);
        Divisor { count, multiplier: (1u64 << Self::SHIFT).div_ceil(count) }
    }

    /// round(total / count) for total <= 255 * count.
    fn rounded_quotient(&self, total: u64) -> u8 {
        let numerator = total + self.count / 2;
        let quotient = if self.count < Self::EXACT_BELOW {
            (numerator * self.multiplier) >> Self::SHIFT
        } else {
            numerator / self.count
        };
        quotient.min(255) as u8
    }
}

/// The last few divisors used, so each is computed once.
#[derive(Debug, Default)]
struct Divisors {
    cache: [Option<Divisor>; 4],
    next: usize,
}

impl Divisors {
    fn get(&mut self, count: u64) -> Divisor {
        if let Some(found) = self.cache.iter().flatten().find(|d| d.count == count) {
            return *found;
        }
        let divisor = Divisor::new(count);
        self.cache[self.next] = Some(divisor);
        self.next = (self.next + 1) % self.cache.len();
        divisor
    }
}

/// Encodes a raw [`Capture`] again as `options` asks (its cursor is left out): a capture
/// taken at one moment, encoded later.
pub fn reencode(raw: &Capture, options: &CaptureOptions) -> Result<Capture, CaptureError> {
    let pixels = (raw.format == CaptureFormat::Raw)
        .then(|| ScanoutPixels::of_bytes(&raw.bytes, raw.width, raw.height, raw.stride, raw.pixel_format))
        .flatten()
        .ok_or(CaptureError::NotRaw)?;
    encode_into(&pixels, &CaptureOptions { cursor: false, ..*options }, None, raw.frame, Vec::new())
}

/// An empty buffer with room for a raw capture of `screen` as `options` asks, its pages
/// already faulted in (written once), so filling it costs only the copy.
pub(crate) fn raw_buffer(options: &CaptureOptions, screen: Rect) -> Vec<u8> {
    let (width, height) =
        options.scale.or(options.crop.map(|crop| (crop.width, crop.height))).unwrap_or((screen.width, screen.height));
    // Bounded by the screen: a larger crop or scale is refused later, by the pipeline.
    let len = (width.min(screen.width) as usize) * (height.min(screen.height) as usize) * 4;
    // Written, not `vec![0; len]`: a calloc'd buffer's pages would fault in on the copy.
    #[allow(clippy::slow_vector_initialization)]
    let mut buffer = Vec::with_capacity(len);
    buffer.resize(len, 0u8);
    std::hint::black_box(buffer.as_mut_slice());
    buffer.clear();
    buffer
}

/// Encodes a screenshot of `pixels` as `options` asks; a raw one goes into `buffer`.
pub(crate) fn encode_into(
    pixels: &ScanoutPixels<'_>,
    options: &CaptureOptions,
    cursor: Option<&CursorOverlay>,
    frame: u64,
    buffer: Vec<u8>,
) -> Result<Capture, CaptureError> {
    let pipeline = RowPipeline::new(pixels, options, cursor)?;
    let (width, height) = (pipeline.out_width, pipeline.out_height);
    let format = pixels.format();
    let (bytes, stride) = match options.format {
        CaptureFormat::Raw => {
            let stride = width as usize * 4;
            let mut bytes = buffer;
            bytes.clear();
            bytes.reserve_exact(stride * height as usize);
            pipeline.for_each_row(|row| {
                bytes.extend_from_slice(row);
                Ok::<(), CaptureError>(())
            })?;
            (bytes, stride)
        }
        CaptureFormat::Png => (encode_png(&pipeline, format)?, 0),
        CaptureFormat::Qoi => {
            let mut encoder = QoiEncoder::new(width, height);
            pipeline.for_each_row(|row| {
                encoder.push_row(row, format);
                Ok::<(), CaptureError>(())
            })?;
            (encoder.finish(), 0)
        }
    };
    Ok(Capture { format: options.format, width, height, stride, pixel_format: format, bytes, frame })
}

fn encode_png(pipeline: &RowPipeline<'_, '_>, format: PixelFormat) -> Result<Vec<u8>, CaptureError> {
    let (width, height) = (pipeline.out_width, pipeline.out_height);
    let mut bytes = Vec::with_capacity(width as usize * height as usize);
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    // Adaptive (the Fast default) measured smallest on desktop frames (screen benchmark:
    // 445 KB against 541 KB for Up, 509 KB for Paeth) at the same speed.
    encoder.set_filter(png::Filter::Adaptive);
    let mut writer = encoder.write_header()?;
    {
        let mut stream = writer.stream_writer_with_size(256 * 1024)?;
        let mut rgb = vec![0u8; width as usize * 3];
        pipeline.for_each_row(|row| {
            format.row_to_rgb(row, &mut rgb);
            stream.write_all(&rgb).map_err(|e| CaptureError::EncodePng(e.into()))
        })?;
        stream.finish()?;
    }
    writer.finish()?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode::{attach_backing, words};
    use crate::protocol::CMD_SET_SCANOUT;
    use crate::screen::ScreenError;
    use crate::testing::*;

    /// A 64x32 B8G8R8X8 screen showing `pattern`.
    fn screen_with_pattern() -> Harness {
        let mut harness = Harness::new();
        harness.show(1, 64, 32, PIXELS_ADDR);
        harness.paint(PIXELS_ADDR, 64, 32, pattern);
        harness
    }

    fn capture(harness: &Harness, options: CaptureOptions) -> Capture {
        harness.gpu.screen().capture(&options).unwrap()
    }

    fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut rgb = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut rgb).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        rgb.truncate(info.buffer_size());
        (info.width, info.height, rgb)
    }

    fn expected_rgb(crop: Rect) -> Vec<u8> {
        let mut rgb = Vec::new();
        for y in crop.y..crop.y + crop.height {
            for x in crop.x..crop.x + crop.width {
                rgb.extend_from_slice(&pattern(x, y));
            }
        }
        rgb
    }

    #[test]
    fn divisor_matches_integer_division_for_every_average() {
        for count in (1..=2000u64).chain([4095, 4096, 65_535, (1 << 20) - 1, 1 << 20, 1 << 24, 1 << 28]) {
            let divisor = Divisor::new(count);
            let step = (count / 97).max(1);
            for total in (0..=255 * count).step_by(step as usize).chain([255 * count]) {
                let expected = ((total + count / 2) / count).min(255) as u8;
                assert_eq!(divisor.rounded_quotient(total), expected, "{total} / {count}");
            }
        }
    }

    #[test]
    fn capture_raw_returns_native_pixels_and_stride() {
        let harness = screen_with_pattern();
        let raw = capture(&harness, CaptureOptions::default());
        assert_eq!((raw.width, raw.height, raw.stride, raw.pixel_format), (64, 32, 256, PixelFormat::B8G8R8X8));
        let [r, g, b] = pattern(5, 7);
        assert_eq!(&raw.bytes[7 * 256 + 5 * 4..7 * 256 + 5 * 4 + 3], &[b, g, r]);
    }

    #[test]
    fn a_raw_capture_fills_the_buffer_made_ahead_for_it() {
        let screen = Rect::new(0, 0, 64, 32);
        let crop = Rect::new(10, 4, 20, 9);
        let ways = [
            (CaptureOptions::default(), 64 * 32 * 4),
            (CaptureOptions { crop: Some(crop), ..Default::default() }, 20 * 9 * 4),
            (CaptureOptions { scale: Some((16, 8)), ..Default::default() }, 16 * 8 * 4),
            // Larger than the screen: bounded by it (the pipeline refuses the request).
            (CaptureOptions { scale: Some((1 << 20, 1 << 20)), ..Default::default() }, 64 * 32 * 4),
        ];
        let harness = screen_with_pattern();
        for (options, room) in ways {
            let buffer = raw_buffer(&options, screen);
            assert!(buffer.is_empty() && buffer.capacity() >= room, "{options:?}: {}", buffer.capacity());
            if options.scale.is_some_and(|(width, _)| width > 64) {
                continue;
            }
            let pointer = buffer.as_ptr();
            let pixels = harness.gpu.screen().with_pixels(|pixels, _| {
                let raw = encode_into(pixels, &options, None, 0, buffer).unwrap();
                assert_eq!(raw.bytes.as_ptr(), pointer, "{options:?}: the capture went into another buffer");
                raw.bytes
            });
            assert_eq!(pixels.unwrap(), capture(&harness, options).bytes, "{options:?}");
        }
    }

    #[test]
    fn capture_png_decodes_to_scanout_pixels() {
        let harness = screen_with_pattern();
        let png = capture(&harness, CaptureOptions { format: CaptureFormat::Png, ..CaptureOptions::default() });
        assert_eq!(png.stride, 0);
        assert_eq!(decode_png(&png.bytes), (64, 32, expected_rgb(Rect::new(0, 0, 64, 32))));
    }

    #[test]
    fn capture_qoi_decodes_to_scanout_pixels() {
        let harness = screen_with_pattern();
        let qoi = capture(&harness, CaptureOptions { format: CaptureFormat::Qoi, ..CaptureOptions::default() });
        let image = crate::qoi::decode(&qoi.bytes).unwrap();
        assert_eq!((image.width, image.height, image.channels), (64, 32, 3));
        let rgb: Vec<u8> = image.rgba.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
        assert_eq!(rgb, expected_rgb(Rect::new(0, 0, 64, 32)));
    }

    #[test]
    fn capture_crop_returns_only_the_rectangle() {
        let harness = screen_with_pattern();
        let crop = Rect::new(10, 4, 20, 9);
        let png =
            capture(&harness, CaptureOptions { format: CaptureFormat::Png, crop: Some(crop), ..Default::default() });
        assert_eq!(decode_png(&png.bytes), (20, 9, expected_rgb(crop)));
        let raw = capture(&harness, CaptureOptions { crop: Some(crop), ..Default::default() });
        assert_eq!((raw.width, raw.height, raw.stride, raw.bytes.len()), (20, 9, 80, 20 * 9 * 4));
    }

    #[test]
    fn capture_crop_outside_screen_returns_check_crop() {
        let harness = screen_with_pattern();
        for crop in [Rect::new(60, 0, 5, 5), Rect::new(0, 0, 0, 5), Rect::new(u32::MAX, 0, 2, 2)] {
            let error = harness.gpu.screen().capture(&CaptureOptions { crop: Some(crop), ..Default::default() });
            assert!(matches!(error, Err(ScreenError::Capture(CaptureError::CheckCrop { .. }))), "{crop:?}");
        }
    }

    #[test]
    fn capture_scale_out_of_range_returns_check_scale() {
        let harness = screen_with_pattern();
        for scale in [(0, 10), (10, 0), (MAX_SCALE_DIMENSION + 1, 10)] {
            let error = harness.gpu.screen().capture(&CaptureOptions { scale: Some(scale), ..Default::default() });
            assert!(matches!(error, Err(ScreenError::Capture(CaptureError::CheckScale { .. }))), "{scale:?}");
        }
    }

    #[test]
    fn capture_scale_half_averages_2x2_blocks() {
        let harness = screen_with_pattern();
        let raw = capture(&harness, CaptureOptions { scale: Some((32, 16)), ..Default::default() });
        assert_eq!((raw.width, raw.height), (32, 16));
        for (x, y) in [(0u32, 0u32), (5, 3), (31, 15)] {
            let block = [
                pattern(2 * x, 2 * y),
                pattern(2 * x + 1, 2 * y),
                pattern(2 * x, 2 * y + 1),
                pattern(2 * x + 1, 2 * y + 1),
            ];
            let mean = |c: usize| ((block.iter().map(|p| p[c] as u32).sum::<u32>() + 2) / 4) as u8;
            let offset = (y * 32 + x) as usize * 4;
            assert_eq!(&raw.bytes[offset..offset + 3], &[mean(2), mean(1), mean(0)], "({x}, {y})");
        }
    }

    #[test]
    fn capture_scale_up_repeats_source_pixels() {
        let harness = screen_with_pattern();
        let crop = Rect::new(0, 0, 4, 4);
        let png = capture(
            &harness,
            CaptureOptions { format: CaptureFormat::Png, crop: Some(crop), scale: Some((8, 12)), cursor: false },
        );
        let (width, height, rgb) = decode_png(&png.bytes);
        assert_eq!((width, height), (8, 12));
        for (x, y) in [(0u32, 0u32), (7, 11), (3, 5)] {
            let offset = (y * 8 + x) as usize * 3;
            assert_eq!(&rgb[offset..offset + 3], &pattern(x / 2, y / 3), "({x}, {y})");
        }
    }

    #[test]
    fn capture_scale_to_uneven_size_covers_every_source_pixel() {
        let mut harness = Harness::new();
        harness.show(1, 10, 10, PIXELS_ADDR);
        harness.paint(PIXELS_ADDR, 10, 10, |_, _| [90, 60, 30]);
        let raw = capture(&harness, CaptureOptions { scale: Some((3, 7)), ..Default::default() });
        assert_eq!((raw.width, raw.height, raw.bytes.len()), (3, 7, 3 * 7 * 4));
        assert!(raw.bytes.chunks_exact(4).all(|p| p[..3] == [30, 60, 90]));
    }

    #[test]
    fn capture_of_r8g8b8x8_resource_reads_channels_in_order() {
        let mut harness = Harness::new();
        harness.create(1, 134, 8, 8);
        harness.ok(&attach_backing(1, &[(PIXELS_ADDR, 256)]));
        harness.ok(&words(CMD_SET_SCANOUT, &[0, 0, 8, 8, 0, 1]));
        let pixels: Vec<u8> = [10u8, 20, 30, 0].repeat(64);
        vm_memory::Bytes::write_slice(&harness.memory, &pixels, vm_memory::GuestAddress(PIXELS_ADDR)).unwrap();
        let png = capture(&harness, CaptureOptions { format: CaptureFormat::Png, ..Default::default() });
        let (_, _, rgb) = decode_png(&png.bytes);
        assert_eq!(&rgb[..3], &[10, 20, 30]);
        let qoi = capture(&harness, CaptureOptions { format: CaptureFormat::Qoi, ..Default::default() });
        assert_eq!(&crate::qoi::decode(&qoi.bytes).unwrap().rgba[..4], &[10, 20, 30, 255]);
    }

    #[test]
    fn capture_reports_latest_frame_number() {
        let mut harness = screen_with_pattern();
        assert_eq!(capture(&harness, CaptureOptions::default()).frame, 0);
        harness.flush(1, Rect::new(0, 0, 64, 32));
        harness.flush(1, Rect::new(0, 0, 8, 8));
        assert_eq!(capture(&harness, CaptureOptions::default()).frame, 2);
    }

    #[test]
    fn with_pixels_lends_rows_without_copy() {
        let harness = screen_with_pattern();
        let (width, height, stride, first) = harness
            .gpu
            .screen()
            .with_pixels(|pixels, _| {
                let mut row = vec![0u8; pixels.row_bytes()];
                pixels.read_row(2, &mut row);
                (pixels.width(), pixels.height(), pixels.stride(), row[..3].to_vec())
            })
            .unwrap();
        let [r, g, b] = pattern(0, 2);
        assert_eq!((width, height, stride, first), (64, 32, 256, vec![b, g, r]));
    }
}

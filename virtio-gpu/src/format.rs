//! Pixel formats a 2D resource may have, and where each colour channel sits in a pixel.

/// The 32-bit formats of `enum virtio_gpu_formats`; names give the byte order in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    B8G8R8A8,
    B8G8R8X8,
    A8R8G8B8,
    X8R8G8B8,
    R8G8B8A8,
    X8B8G8R8,
    A8B8G8R8,
    R8G8B8X8,
}

/// Byte positions of the channels inside one 4-byte pixel; `alpha` is `None` for X formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Channels {
    pub red: usize,
    pub green: usize,
    pub blue: usize,
    pub alpha: Option<usize>,
}

impl PixelFormat {
    /// Bytes per pixel of every supported format.
    pub const BYTES_PER_PIXEL: u32 = 4;

    /// The format with virtio code `code`, `None` for formats the device does not offer.
    pub fn from_virtio(code: u32) -> Option<PixelFormat> {
        Some(match code {
            1 => PixelFormat::B8G8R8A8,
            2 => PixelFormat::B8G8R8X8,
            3 => PixelFormat::A8R8G8B8,
            4 => PixelFormat::X8R8G8B8,
            67 => PixelFormat::R8G8B8A8,
            68 => PixelFormat::X8B8G8R8,
            121 => PixelFormat::A8B8G8R8,
            134 => PixelFormat::R8G8B8X8,
            _ => return None,
        })
    }

    pub fn virtio_code(self) -> u32 {
        match self {
            PixelFormat::B8G8R8A8 => 1,
            PixelFormat::B8G8R8X8 => 2,
            PixelFormat::A8R8G8B8 => 3,
            PixelFormat::X8R8G8B8 => 4,
            PixelFormat::R8G8B8A8 => 67,
            PixelFormat::X8B8G8R8 => 68,
            PixelFormat::A8B8G8R8 => 121,
            PixelFormat::R8G8B8X8 => 134,
        }
    }

    pub fn channels(self) -> Channels {
        let (red, green, blue, alpha) = match self {
            PixelFormat::B8G8R8A8 => (2, 1, 0, Some(3)),
            PixelFormat::B8G8R8X8 => (2, 1, 0, None),
            PixelFormat::A8R8G8B8 => (1, 2, 3, Some(0)),
            PixelFormat::X8R8G8B8 => (1, 2, 3, None),
            PixelFormat::R8G8B8A8 => (0, 1, 2, Some(3)),
            PixelFormat::X8B8G8R8 => (3, 2, 1, None),
            PixelFormat::A8B8G8R8 => (3, 2, 1, Some(0)),
            PixelFormat::R8G8B8X8 => (0, 1, 2, None),
        };
        Channels { red, green, blue, alpha }
    }

    /// The index of the byte that is neither red, green nor blue (alpha or padding).
    pub fn fourth_byte(self) -> usize {
        let c = self.channels();
        6 - c.red - c.green - c.blue
    }

    /// Converts a row of pixels in this format to packed RGB.
    pub fn row_to_rgb(self, pixels: &[u8], rgb: &mut [u8]) {
        let Channels { red, green, blue, .. } = self.channels();
        for (src, dst) in pixels.chunks_exact(4).zip(rgb.chunks_exact_mut(3)) {
            dst[0] = src[red];
            dst[1] = src[green];
            dst[2] = src[blue];
        }
    }

    /// Converts an RGBA pixel into this format (alpha kept in the fourth byte either way).
    pub fn from_rgba(self, rgba: [u8; 4]) -> [u8; 4] {
        let Channels { red, green, blue, .. } = self.channels();
        let mut out = [0u8; 4];
        out[red] = rgba[0];
        out[green] = rgba[1];
        out[blue] = rgba[2];
        out[self.fourth_byte()] = rgba[3];
        out
    }

    /// Reads a pixel in this format as RGBA; X formats read as opaque.
    pub fn to_rgba(self, pixel: &[u8]) -> [u8; 4] {
        let Channels { red, green, blue, alpha } = self.channels();
        [pixel[red], pixel[green], pixel[blue], alpha.map_or(255, |a| pixel[a])]
    }

    /// Reads a cursor pixel as RGBA: its fourth byte is alpha whatever the format says.
    /// Cursors are drawn with alpha into resources of any format: Linux makes every dumb
    /// buffer XRGB8888 (B8G8R8X8 here), Xorg's cursor included, and QEMU reads them so too.
    pub fn cursor_to_rgba(self, pixel: &[u8]) -> [u8; 4] {
        let Channels { red, green, blue, .. } = self.channels();
        [pixel[red], pixel[green], pixel[blue], pixel[self.fourth_byte()]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [PixelFormat; 8] = [
        PixelFormat::B8G8R8A8,
        PixelFormat::B8G8R8X8,
        PixelFormat::A8R8G8B8,
        PixelFormat::X8R8G8B8,
        PixelFormat::R8G8B8A8,
        PixelFormat::X8B8G8R8,
        PixelFormat::A8B8G8R8,
        PixelFormat::R8G8B8X8,
    ];

    #[test]
    fn pixel_format_virtio_codes_round_trip() {
        for format in ALL {
            assert_eq!(PixelFormat::from_virtio(format.virtio_code()), Some(format));
        }
        assert_eq!(PixelFormat::from_virtio(0), None);
    }

    #[test]
    fn pixel_format_rgba_round_trips_through_every_format() {
        for format in ALL {
            let pixel = format.from_rgba([10, 20, 30, 40]);
            let expected_alpha = if format.channels().alpha.is_some() { 40 } else { 255 };
            assert_eq!(format.to_rgba(&pixel), [10, 20, 30, expected_alpha], "{format:?}");
        }
    }

    #[test]
    fn b8g8r8x8_row_converts_to_rgb() {
        let mut rgb = [0u8; 6];
        PixelFormat::B8G8R8X8.row_to_rgb(&[1, 2, 3, 0, 4, 5, 6, 0], &mut rgb);
        assert_eq!(rgb, [3, 2, 1, 6, 5, 4]);
    }
}

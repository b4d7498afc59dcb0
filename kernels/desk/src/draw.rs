//! Drawing into a framebuffer of 0x00RRGGBB pixels: rectangles, gradients and text in
//! Noto Sans Mono (pre-rasterized, anti-aliased). Integer math only, so the same state
//! always gives the same pixels.

use noto_sans_mono_bitmap::{get_raster, get_raster_width, FontWeight, RasterHeight};

pub use noto_sans_mono_bitmap::{FontWeight as Weight, RasterHeight as TextSize};

pub const fn rgb(r: u8, g: u8, b: u8) -> u32 {
    ((r as u32) << 16) | ((g as u32) << 8) | b as u32
}

/// Mixes `over` onto `under` with coverage `alpha` (0..=255).
fn blend(under: u32, over: u32, alpha: u32) -> u32 {
    let channel = |shift: u32| {
        let a = (under >> shift) & 0xff;
        let b = (over >> shift) & 0xff;
        ((a * (255 - alpha) + b * alpha + 127) / 255) << shift
    };
    channel(16) | channel(8) | channel(0)
}

pub struct Canvas<'a> {
    pixels: &'a mut [u32],
    pub width: u32,
    pub height: u32,
    /// Drawing lands only inside this (x0, y0, x1, y1); the rest keeps its pixels.
    bounds: (i32, i32, i32, i32),
}

impl<'a> Canvas<'a> {
    /// A canvas of `pixels` (rows `width` apart) that draws only inside the rectangle at
    /// (x, y).
    pub fn clipped(pixels: &'a mut [u32], width: u32, height: u32, x: u32, y: u32, w: u32, h: u32) -> Canvas<'a> {
        let right = x.saturating_add(w).min(width) as i32;
        let bottom = y.saturating_add(h).min(height) as i32;
        Canvas { pixels, width, height, bounds: (x.min(width) as i32, y.min(height) as i32, right, bottom) }
    }

    /// This canvas, drawing only where it does and inside the rectangle at (x, y) too.
    pub fn within(&mut self, x: u32, y: u32, width: u32, height: u32) -> Canvas<'_> {
        let (x0, y0, x1, y1) = self.bounds;
        let bounds = (
            x0.max(x as i32),
            y0.max(y as i32),
            x1.min(x.saturating_add(width) as i32),
            y1.min(y.saturating_add(height) as i32),
        );
        Canvas { pixels: &mut *self.pixels, width: self.width, height: self.height, bounds }
    }

    fn inside(&self, x: i32, y: i32) -> bool {
        let (x0, y0, x1, y1) = self.bounds;
        x >= x0 && x < x1 && y >= y0 && y < y1
    }

    fn clip(&self, x: i32, y: i32, width: u32, height: u32) -> Option<(usize, usize, usize, usize)> {
        let (bx0, by0, bx1, by1) = self.bounds;
        let x0 = x.max(bx0);
        let y0 = y.max(by0);
        let x1 = (x + width as i32).min(bx1);
        let y1 = (y + height as i32).min(by1);
        (x0 < x1 && y0 < y1).then_some((x0 as usize, y0 as usize, x1 as usize, y1 as usize))
    }

    pub fn fill(&mut self, x: i32, y: i32, width: u32, height: u32, color: u32) {
        let Some((x0, y0, x1, y1)) = self.clip(x, y, width, height) else { return };
        let stride = self.width as usize;
        for row in y0..y1 {
            self.pixels[row * stride + x0..row * stride + x1].fill(color);
        }
    }

    /// A one-pixel border inside the rectangle.
    pub fn outline(&mut self, x: i32, y: i32, width: u32, height: u32, color: u32) {
        self.fill(x, y, width, 1, color);
        self.fill(x, y + height as i32 - 1, width, 1, color);
        self.fill(x, y, 1, height, color);
        self.fill(x + width as i32 - 1, y, 1, height, color);
    }

    /// A vertical gradient from `top` to `bottom`.
    pub fn vertical_gradient(&mut self, x: i32, y: i32, width: u32, height: u32, top: u32, bottom: u32) {
        let Some((x0, y0, x1, y1)) = self.clip(x, y, width, height) else { return };
        let stride = self.width as usize;
        let span = height.max(2) - 1;
        for row in y0..y1 {
            let alpha = ((row as i32 - y) as u32 * 255) / span;
            let color = blend(top, bottom, alpha.min(255));
            self.pixels[row * stride + x0..row * stride + x1].fill(color);
        }
    }

    /// Draws `text` with its top-left corner at (x, y); returns the x after the last glyph.
    pub fn text(&mut self, x: i32, y: i32, text: &str, color: u32, weight: FontWeight, size: RasterHeight) -> i32 {
        let advance = get_raster_width(weight, size) as i32;
        let mut pen = x;
        for character in text.chars() {
            let glyph = get_raster(character, weight, size).or_else(|| get_raster('?', weight, size));
            if let Some(glyph) = glyph {
                for (row_index, row) in glyph.rows().enumerate() {
                    let py = y + row_index as i32;
                    for (column, coverage) in row.iter().enumerate() {
                        let px = pen + column as i32;
                        if *coverage == 0 || !self.inside(px, py) {
                            continue;
                        }
                        let index = py as usize * self.width as usize + px as usize;
                        self.pixels[index] = blend(self.pixels[index], color, u32::from(*coverage));
                    }
                }
            }
            pen += advance;
        }
        pen
    }

    /// Width in pixels of `text`.
    pub fn text_width(text: &str, weight: FontWeight, size: RasterHeight) -> u32 {
        text.chars().count() as u32 * get_raster_width(weight, size) as u32
    }

    /// Draws `text` centred in the rectangle.
    #[allow(clippy::too_many_arguments)] // a rectangle, the text and its style, like `text`
    pub fn text_centered(
        &mut self,
        x: i32,
        y: i32,
        width: u32,
        height: u32,
        text: &str,
        color: u32,
        weight: FontWeight,
        size: RasterHeight,
    ) {
        let text_width = Self::text_width(text, weight, size) as i32;
        let text_height = size.val() as i32;
        self.text(
            x + (width as i32 - text_width) / 2,
            y + (height as i32 - text_height) / 2,
            text,
            color,
            weight,
            size,
        );
    }
}

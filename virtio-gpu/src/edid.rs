//! The EDID (1.4, one 128-byte block) the device reports for its one display: the
//! configured size as the preferred and only detailed mode, at 60 Hz with reduced blanking.

/// Builds the EDID block for a `width` x `height` display (both at most 4095).
pub fn edid_for(width: u32, height: u32) -> [u8; 128] {
    let mut edid = [0u8; 128];
    edid[..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    // Manufacturer "CRL": three 5-bit letters, big endian.
    let id: u16 = (3 << 10) | (18 << 5) | 12;
    edid[8..10].copy_from_slice(&id.to_be_bytes());
    edid[10..12].copy_from_slice(&1u16.to_le_bytes());
    edid[17] = 34; // 2024
    edid[18] = 1;
    edid[19] = 4;
    edid[20] = 0xa0; // digital, 8 bits per colour
                     // Physical size at 96 dpi.
    let width_mm = width * 254 / 960;
    let height_mm = height * 254 / 960;
    edid[21] = (width_mm / 10).min(255) as u8;
    edid[22] = (height_mm / 10).min(255) as u8;
    edid[23] = 120; // gamma 2.2
    edid[24] = 0x06; // sRGB default, preferred timing is native
    edid[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    for slot in edid[38..54].chunks_exact_mut(2) {
        slot.copy_from_slice(&[0x01, 0x01]); // unused standard timing
    }
    edid[54..72].copy_from_slice(&detailed_timing(width, height, width_mm, height_mm));
    edid[72..90].copy_from_slice(&text_descriptor(0xfc, b"Carrel"));
    edid[90..108]
        .copy_from_slice(&[0, 0, 0, 0xfd, 0, 50, 75, 30, 160, 60, 0, 0x0a, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20]);
    edid[108..126].copy_from_slice(&[0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let sum = edid[..127].iter().fold(0u8, |sum, b| sum.wrapping_add(*b));
    edid[127] = 0u8.wrapping_sub(sum);
    edid
}

fn detailed_timing(width: u32, height: u32, width_mm: u32, height_mm: u32) -> [u8; 18] {
    let (hblank, hsync_offset, hsync_pulse) = (160u32, 48u32, 32u32);
    let (vblank, vsync_offset, vsync_pulse) = (30u32, 3u32, 6u32);
    let clock_10khz = ((width + hblank) as u64 * (height + vblank) as u64 * 60 / 10_000).min(u16::MAX as u64) as u16;
    let low = |v: u32| (v & 0xff) as u8;
    let high4 = |v: u32| ((v >> 8) & 0x0f) as u8;
    let clock = clock_10khz.to_le_bytes();
    [
        clock[0],
        clock[1],
        low(width),
        low(hblank),
        high4(width) << 4 | high4(hblank),
        low(height),
        low(vblank),
        high4(height) << 4 | high4(vblank),
        low(hsync_offset),
        low(hsync_pulse),
        ((vsync_offset & 0x0f) << 4 | (vsync_pulse & 0x0f)) as u8,
        (((hsync_offset >> 8) & 3) << 6
            | ((hsync_pulse >> 8) & 3) << 4
            | ((vsync_offset >> 4) & 3) << 2
            | ((vsync_pulse >> 4) & 3)) as u8,
        low(width_mm),
        low(height_mm),
        high4(width_mm) << 4 | high4(height_mm),
        0,
        0,
        0x1e, // digital separate sync, both polarities positive
    ]
}

fn text_descriptor(tag: u8, text: &[u8]) -> [u8; 18] {
    let mut out = [0u8; 18];
    out[3] = tag;
    let field = &mut out[5..];
    field.fill(0x20);
    let len = text.len().min(12);
    field[..len].copy_from_slice(&text[..len]);
    field[len] = 0x0a;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edid_checksum_is_zero_and_mode_matches_display() {
        let edid = edid_for(1280, 800);
        assert_eq!(edid.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)), 0);
        let width = edid[56] as u32 | ((edid[58] as u32 >> 4) << 8);
        let height = edid[59] as u32 | ((edid[61] as u32 >> 4) << 8);
        assert_eq!((width, height), (1280, 800));
    }

    #[test]
    fn edid_for_largest_display_fits_the_pixel_clock() {
        let edid = edid_for(3840, 2160);
        let clock = u16::from_le_bytes([edid[54], edid[55]]);
        assert!(clock > 50_000 && clock < u16::MAX);
        assert_eq!(edid[56] as u32 | ((edid[58] as u32 >> 4) << 8), 3840);
    }
}

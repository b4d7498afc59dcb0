//! The screen as the guest last showed it when a snapshot was taken, kept beside the
//! snapshot as a PNG (`screen.bin`): a screenshot of the hibernated VM, and the first ones
//! after a wake until the guest draws a new frame, are served from it without reading
//! the screen's pages out of `memory.bin` (its pixels are checked and copied in before a
//! restored VM's screen may view them).
//!
//! The file is a cache: magic, frame number, size, the blake3 digest of the PNG, the PNG.
//! One that is missing, torn or damaged is ignored and the screen is read from memory as
//! before; it is never trusted over the snapshot itself.

use std::path::Path;

use carrel_gpu::{Capture, CaptureError, CaptureFormat, CaptureOptions};

use crate::control::protocol::{ImageFormat, Screenshot, ScreenshotRequest};

/// The file in a snapshot directory.
pub const SCREEN_FILE: &str = "screen.bin";

const MAGIC: &[u8; 8] = b"CRLSCRN1";
/// Magic, frame, width, height, digest.
const HEADER: usize = 8 + 8 + 4 + 4 + 32;

/// A PNG of the scanout and the frame it shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    pub frame: u64,
    pub width: u32,
    pub height: u32,
    pub png: Vec<u8>,
}

impl Shown {
    /// A PNG of `raw`, a raw capture of the whole screen (taken while the VM was paused
    /// for its snapshot, encoded once it runs again).
    pub fn encode_raw(raw: &Capture) -> Result<Shown, CaptureError> {
        let png =
            carrel_gpu::capture::reencode(raw, &CaptureOptions { format: CaptureFormat::Png, ..Default::default() })?;
        Ok(Shown { frame: png.frame, width: png.width, height: png.height, png: png.bytes })
    }

    /// Whether `request` asks for what this image is (its wait is the caller's to meet).
    pub fn answers(&self, request: &ScreenshotRequest) -> bool {
        request.format == ImageFormat::Png && request.crop.is_none() && request.scale.is_none() && !request.cursor
    }

    pub fn screenshot(&self) -> Screenshot {
        Screenshot {
            format: ImageFormat::Png,
            width: self.width,
            height: self.height,
            stride: 0,
            pixel_format: String::new(),
            frame: self.frame,
            bytes: self.png.clone(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER + self.png.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&self.frame.to_le_bytes());
        bytes.extend_from_slice(&self.width.to_le_bytes());
        bytes.extend_from_slice(&self.height.to_le_bytes());
        let digest = digest(&bytes[8..24], &self.png);
        bytes.extend_from_slice(&digest);
        bytes.extend_from_slice(&self.png);
        bytes
    }

    /// The image in `bytes`, or why it is not one.
    pub fn decode(bytes: &[u8]) -> Result<Shown, &'static str> {
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err("not a screen file");
        }
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let frame = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let (width, height) = (word(16), word(20));
        let png = &bytes[HEADER..];
        if digest(&bytes[8..24], png)[..] != bytes[24..56] {
            return Err("it does not match its digest");
        }
        Ok(Shown { frame, width, height, png: png.to_vec() })
    }

    /// Keeps the image beside the snapshot in `dir` (written whole under another name,
    /// synced, renamed); a failure is said on stderr and leaves no file: screenshots of
    /// the snapshot are then drawn from its memory.
    pub fn keep(&self, dir: &Path) {
        let (path, temporary) = (dir.join(SCREEN_FILE), dir.join(format!(".{SCREEN_FILE}.partial")));
        let written = std::fs::File::create(&temporary)
            .and_then(|mut file| std::io::Write::write_all(&mut file, &self.encode()).and_then(|()| file.sync_all()))
            .and_then(|()| std::fs::rename(&temporary, &path));
        if let Err(err) = written {
            let _ = std::fs::remove_file(&temporary);
            eprintln!("carrel-vmm: the screen was not kept beside {}: {err}", dir.display());
        }
    }

    /// The image kept in snapshot directory `dir`; `None` when there is none or it is
    /// damaged (said on stderr): the screen is then read from the snapshot's memory.
    pub fn read(dir: &Path) -> Option<Shown> {
        let path = dir.join(SCREEN_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
            Err(err) => {
                eprintln!("carrel-vmm: {} not used: {err}", path.display());
                return None;
            }
        };
        Shown::decode(&bytes).map_err(|reason| eprintln!("carrel-vmm: {} not used: {reason}", path.display())).ok()
    }
}

/// blake3 over the frame and size fields, then the PNG.
fn digest(fields: &[u8], png: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(fields);
    hasher.update(png);
    *hasher.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown() -> Shown {
        Shown { frame: 42, width: 1280, height: 800, png: b"\x89PNG not really".to_vec() }
    }

    #[test]
    fn a_screen_file_round_trips_and_any_damage_is_refused() {
        let bytes = shown().encode();
        assert_eq!(Shown::decode(&bytes), Ok(shown()));
        for at in [0, 9, 20, 30, 60, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            assert!(Shown::decode(&damaged).is_err(), "byte {at} flipped");
        }
        assert!(Shown::decode(&bytes[..bytes.len() - 3]).is_err(), "torn");
        assert!(Shown::decode(&bytes[..10]).is_err(), "short");
    }

    #[test]
    fn only_a_whole_screen_png_without_cursor_is_answered() {
        let shown = shown();
        let png = ScreenshotRequest {
            format: ImageFormat::Png,
            crop: None,
            scale: None,
            cursor: false,
            wait: crate::control::protocol::Wait::FirstFrame,
            timeout_ms: 0,
        };
        assert!(shown.answers(&png));
        for request in [
            ScreenshotRequest { format: ImageFormat::Raw, ..png.clone() },
            ScreenshotRequest { crop: Some([0, 0, 10, 10]), ..png.clone() },
            ScreenshotRequest { scale: Some([640, 400]), ..png.clone() },
            ScreenshotRequest { cursor: true, ..png.clone() },
        ] {
            assert!(!shown.answers(&request), "{request:?}");
        }
    }
}

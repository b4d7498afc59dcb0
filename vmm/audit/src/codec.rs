//! Small text encodings the log's files and tools use: lowercase hex for hashes, keys and
//! signatures, and standard base64 for images embedded in the replay page.

use thiserror::Error;

/// Errors of decoding text.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("expected {expected} hex digits, found {actual}")]
    DecodeHexLength { expected: usize, actual: usize },
    #[error("'{0}' is not a hex digit")]
    DecodeHexDigit(char),
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(DIGITS[(byte >> 4) as usize] as char);
        text.push(DIGITS[(byte & 0xf) as usize] as char);
    }
    text
}

fn hex_value(c: char) -> Result<u8, CodecError> {
    c.to_digit(16).map(|digit| digit as u8).ok_or(CodecError::DecodeHexDigit(c))
}

/// Decodes exactly `N` bytes of hex (either case).
pub fn from_hex<const N: usize>(text: &str) -> Result<[u8; N], CodecError> {
    let text = text.trim();
    let chars: Vec<char> = text.chars().collect();
    if chars.len() != N * 2 {
        return Err(CodecError::DecodeHexLength { expected: N * 2, actual: chars.len() });
    }
    let mut bytes = [0u8; N];
    for (i, pair) in chars.chunks(2).enumerate() {
        bytes[i] = hex_value(pair[0])? << 4 | hex_value(pair[1])?;
    }
    Ok(bytes)
}

/// Standard base64 (RFC 4648, with padding) of `bytes`.
pub fn to_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let group = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                text.push(ALPHABET[((group >> shift) & 0x3f) as usize] as char);
            } else {
                text.push('=');
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_base64_of_rfc4648_vectors_matches() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(to_base64(plain.as_bytes()), encoded, "{plain:?}");
        }
    }

    #[test]
    fn from_hex_of_to_hex_round_trips() {
        let bytes: [u8; 4] = [0x00, 0x9f, 0xa0, 0xff];
        assert_eq!(to_hex(&bytes), "009fa0ff");
        assert_eq!(from_hex::<4>("009FA0ff").unwrap(), bytes);
    }

    #[test]
    fn from_hex_with_bad_digit_returns_error() {
        assert_eq!(from_hex::<1>("0g"), Err(CodecError::DecodeHexDigit('g')));
        assert!(matches!(from_hex::<2>("00"), Err(CodecError::DecodeHexLength { .. })));
    }
}

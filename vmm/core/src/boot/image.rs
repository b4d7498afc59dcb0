//! What kind of kernel a file is: a Desk ELF, a PVH ELF, a plain 64-bit ELF (vmlinux) or a
//! bzImage. Only headers and notes are read; the file is untrusted, every offset and size
//! is checked before use.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use carrel_firmware::{DESK_NOTE_NAME, DESK_NOTE_TYPE};

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Most program headers and note bytes read: more is not a kernel this VMM boots.
const MAX_PROGRAM_HEADERS: u16 = 64;
const MAX_NOTE_BYTES: u64 = 64 * 1024;
/// The bzImage setup header: "HdrS" at offset 0x202.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: u32 = 0x5372_6448;

/// Errors inspecting a kernel file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot open kernel {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("cannot read kernel {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("kernel {path} is neither an x86-64 ELF nor a bzImage (bad magic)")]
    UnknownFormat { path: String },
    #[error("kernel {path} is a malformed ELF: {reason}")]
    MalformedElf { path: String, reason: &'static str },
}

/// The facts about a kernel file that decide how it boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageKind {
    Elf {
        /// The Desk note's BootInfo version, when the image is a Desk kernel.
        desk_boot_info_version: Option<u32>,
        /// The PVH 32-bit entry point, when the image has the Xen PVH note.
        pvh_entry: Option<u32>,
        /// The image carries Linux's own ELF notes: it is a Linux kernel.
        linux: bool,
    },
    BzImage,
}

/// Reads the headers of the kernel at `path`.
pub fn inspect(path: &Path) -> Result<ImageKind, ImageError> {
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|source| ImageError::Open { path: name.clone(), source })?;
    let read_err = |source| ImageError::Read { path: name.clone(), source };
    let mut header = [0u8; 64];
    let len = read_up_to(&mut file, &mut header).map_err(read_err)?;
    if len >= 4 && header[..4] == ELF_MAGIC {
        return inspect_elf(&mut file, &header[..len], &name);
    }
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET)).map_err(read_err)?;
    if read_up_to(&mut file, &mut magic).map_err(read_err)? == 4 && u32::from_le_bytes(magic) == BZIMAGE_MAGIC {
        return Ok(ImageKind::BzImage);
    }
    Err(ImageError::UnknownFormat { path: name })
}

fn read_up_to(file: &mut File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([bytes[offset], bytes[offset + 1]])
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap_or([0; 4]))
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap_or([0; 8]))
}

fn inspect_elf(file: &mut File, header: &[u8], path: &str) -> Result<ImageKind, ImageError> {
    let malformed = |reason| ImageError::MalformedElf { path: path.to_string(), reason };
    if header.len() < 64 {
        return Err(malformed("file shorter than an ELF header"));
    }
    if header[4] != ELFCLASS64 || header[5] != ELFDATA2LSB || u16_at(header, 18) != EM_X86_64 {
        return Err(malformed("not a little-endian 64-bit x86-64 ELF"));
    }
    let phoff = u64_at(header, 32);
    let phentsize = u16_at(header, 54);
    let phnum = u16_at(header, 56);
    if phentsize != 56 || phnum == 0 || phnum > MAX_PROGRAM_HEADERS {
        return Err(malformed("unexpected program header size or count"));
    }
    let mut table = vec![0u8; usize::from(phnum) * 56];
    file.seek(SeekFrom::Start(phoff)).map_err(|_| malformed("program headers past end of file"))?;
    file.read_exact(&mut table).map_err(|_| malformed("program headers past end of file"))?;

    let mut desk_boot_info_version = None;
    let mut pvh_entry = None;
    let mut linux = false;
    for entry in table.chunks_exact(56) {
        if u32_at(entry, 0) != PT_NOTE {
            continue;
        }
        let offset = u64_at(entry, 8);
        let size = u64_at(entry, 32);
        if size > MAX_NOTE_BYTES {
            return Err(malformed("note segment too large"));
        }
        let mut notes = vec![0u8; size as usize];
        file.seek(SeekFrom::Start(offset)).map_err(|_| malformed("note segment past end of file"))?;
        file.read_exact(&mut notes).map_err(|_| malformed("note segment past end of file"))?;
        for note in parse_notes(&notes) {
            match (note.name, note.kind) {
                (b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY) if note.desc.len() >= 4 => pvh_entry = Some(u32_at(note.desc, 0)),
                (b"Linux\0", _) => linux = true,
                (name, DESK_NOTE_TYPE) if name == DESK_NOTE_NAME && note.desc.len() >= 4 => {
                    desk_boot_info_version = Some(u32_at(note.desc, 0))
                }
                _ => {}
            }
        }
    }
    Ok(ImageKind::Elf { desk_boot_info_version, pvh_entry, linux })
}

/// One ELF note.
#[derive(Debug, PartialEq, Eq)]
pub struct Note<'a> {
    pub name: &'a [u8],
    pub kind: u32,
    pub desc: &'a [u8],
}

/// The notes in a note segment; parsing stops at the first truncated note.
pub fn parse_notes(mut bytes: &[u8]) -> Vec<Note<'_>> {
    let align4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    let mut notes = Vec::new();
    while bytes.len() >= 12 {
        let name_size = u32_at(bytes, 0) as usize;
        let desc_size = u32_at(bytes, 4) as usize;
        let kind = u32_at(bytes, 8);
        let Some(name_end) = align4(name_size).and_then(|n| n.checked_add(12)) else {
            break;
        };
        let Some(desc_end) = align4(desc_size).and_then(|n| n.checked_add(name_end)) else {
            break;
        };
        if desc_end > bytes.len() || 12 + name_size > bytes.len() || name_end + desc_size > bytes.len() {
            break;
        }
        notes.push(Note { name: &bytes[12..12 + name_size], kind, desc: &bytes[name_end..name_end + desc_size] });
        bytes = &bytes[desc_end..];
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend((name.len() as u32).to_le_bytes());
        bytes.extend((desc.len() as u32).to_le_bytes());
        bytes.extend(kind.to_le_bytes());
        bytes.extend(name);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes.extend(desc);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes
    }

    #[test]
    fn parse_notes_reads_consecutive_notes() {
        let mut bytes = note(b"Xen\0", 18, &0x10_0000u32.to_le_bytes());
        bytes.extend(note(DESK_NOTE_NAME, DESK_NOTE_TYPE, &1u32.to_le_bytes()));
        let notes = parse_notes(&bytes);
        assert_eq!(notes.len(), 2);
        assert_eq!(notes[0].kind, 18);
        assert_eq!(notes[1].name, DESK_NOTE_NAME);
        assert_eq!(u32_at(notes[1].desc, 0), 1);
    }

    #[test]
    fn parse_notes_stops_at_truncated_or_huge_sizes() {
        let mut bytes = note(b"Xen\0", 18, &[1, 2, 3, 4]);
        bytes.truncate(bytes.len() - 2);
        assert!(parse_notes(&bytes).is_empty());
        let mut huge = vec![0u8; 12];
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_notes(&huge).is_empty());
    }

    #[test]
    fn inspect_rejects_unknown_format_and_short_elf() {
        let dir = std::env::temp_dir();
        let junk = dir.join(format!("carrel-image-junk-{}", std::process::id()));
        std::fs::write(&junk, vec![0u8; 1024]).unwrap();
        assert!(matches!(inspect(&junk), Err(ImageError::UnknownFormat { .. })));
        std::fs::write(&junk, b"\x7fELF\x02\x01").unwrap();
        assert!(matches!(inspect(&junk), Err(ImageError::MalformedElf { .. })));
        std::fs::remove_file(&junk).unwrap();
    }

    #[test]
    fn inspect_recognises_bzimage_magic() {
        let path = std::env::temp_dir().join(format!("carrel-image-bz-{}", std::process::id()));
        let mut bytes = vec![0u8; 0x400];
        bytes[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(inspect(&path).unwrap(), ImageKind::BzImage);
        std::fs::remove_file(&path).unwrap();
    }
}

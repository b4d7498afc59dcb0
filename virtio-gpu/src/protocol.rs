//! The virtio-gpu wire format (virtio 1.2, section 5.7.6): request parsing and response
//! encoding.
//!
//! Requests are parsed by hand from little-endian bytes, so every length and field the
//! guest sends is checked in this one place. [`parse_request`] is the fuzzed entry point:
//! it takes any bytes and returns a [`Request`] or a [`ProtocolError`], never panics.

/// Control queue: get the display modes.
pub const CMD_GET_DISPLAY_INFO: u32 = 0x0100;
pub const CMD_RESOURCE_CREATE_2D: u32 = 0x0101;
pub const CMD_RESOURCE_UNREF: u32 = 0x0102;
pub const CMD_SET_SCANOUT: u32 = 0x0103;
pub const CMD_RESOURCE_FLUSH: u32 = 0x0104;
pub const CMD_TRANSFER_TO_HOST_2D: u32 = 0x0105;
pub const CMD_RESOURCE_ATTACH_BACKING: u32 = 0x0106;
pub const CMD_RESOURCE_DETACH_BACKING: u32 = 0x0107;
pub const CMD_GET_CAPSET_INFO: u32 = 0x0108;
pub const CMD_GET_CAPSET: u32 = 0x0109;
pub const CMD_GET_EDID: u32 = 0x010a;
pub const CMD_RESOURCE_ASSIGN_UUID: u32 = 0x010b;
pub const CMD_RESOURCE_CREATE_BLOB: u32 = 0x010c;
pub const CMD_SET_SCANOUT_BLOB: u32 = 0x010d;
/// First 3D command (CTX_CREATE); 3D commands run up to `CMD_3D_LAST`.
pub const CMD_3D_FIRST: u32 = 0x0200;
pub const CMD_3D_LAST: u32 = 0x02ff;
/// Cursor queue: set the cursor image and position.
pub const CMD_UPDATE_CURSOR: u32 = 0x0300;
pub const CMD_MOVE_CURSOR: u32 = 0x0301;

pub const RESP_OK_NODATA: u32 = 0x1100;
pub const RESP_OK_DISPLAY_INFO: u32 = 0x1101;
pub const RESP_OK_EDID: u32 = 0x1104;
pub const RESP_ERR_UNSPEC: u32 = 0x1200;
pub const RESP_ERR_OUT_OF_MEMORY: u32 = 0x1201;
pub const RESP_ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
pub const RESP_ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
pub const RESP_ERR_INVALID_CONTEXT_ID: u32 = 0x1204;
pub const RESP_ERR_INVALID_PARAMETER: u32 = 0x1205;

/// Header flag: the driver wants the fence completed (we complete synchronously, so the
/// response itself is the completion).
pub const FLAG_FENCE: u32 = 1 << 0;
/// Header flag: `ring_idx` is valid.
pub const FLAG_INFO_RING_IDX: u32 = 1 << 1;

/// Size of `struct virtio_gpu_ctrl_hdr`.
pub const HEADER_SIZE: usize = 24;
/// Size of `struct virtio_gpu_mem_entry`.
pub const MEMORY_ENTRY_SIZE: usize = 16;
/// Most backing entries one ATTACH_BACKING may carry: 256 MiB of scattered 4 KiB pages.
pub const MAX_BACKING_ENTRIES: u32 = 65536;
/// Largest request the device reads from a chain; larger chains are cut here (and then
/// fail to parse if the cut part mattered).
pub const MAX_REQUEST_BYTES: usize = HEADER_SIZE + 8 + MAX_BACKING_ENTRIES as usize * MEMORY_ENTRY_SIZE;
/// Number of scanouts a display-info response always describes.
pub const MAX_SCANOUTS: usize = 16;
/// Size of the EDID blob in an EDID response.
pub const EDID_BLOB_SIZE: usize = 1024;

/// Errors parsing a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("request of {len} bytes is shorter than the {HEADER_SIZE}-byte header")]
    ReadHeader { len: usize },
    #[error("command {command:#06x} needs {needed} bytes, the request has {got}")]
    ReadBody { command: u32, needed: usize, got: usize },
    #[error("command {command:#06x} is not a virtio-gpu command")]
    DecodeCommand { command: u32 },
    #[error("ATTACH_BACKING with {count} entries (most accepted: {MAX_BACKING_ENTRIES})")]
    ReadBackingEntries { count: u32 },
}

impl ProtocolError {
    /// The response the guest gets for this error.
    pub fn response_code(&self) -> ErrorCode {
        match self {
            ProtocolError::ReadBackingEntries { .. } => ErrorCode::InvalidParameter,
            _ => ErrorCode::Unspec,
        }
    }
}

/// A rectangle in pixels, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    pub const fn new(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect { x, y, width, height }
    }

    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// Whether the rectangle lies inside a `width` x `height` area (no overflow: the
    /// edges are computed in u64).
    pub fn fits_in(&self, width: u32, height: u32) -> bool {
        self.x as u64 + self.width as u64 <= width as u64 && self.y as u64 + self.height as u64 <= height as u64
    }

    /// The overlap of two rectangles, `None` when they do not overlap.
    pub fn intersect(&self, other: &Rect) -> Option<Rect> {
        let left = self.x.max(other.x) as u64;
        let top = self.y.max(other.y) as u64;
        let right = (self.x as u64 + self.width as u64).min(other.x as u64 + other.width as u64);
        let bottom = (self.y as u64 + self.height as u64).min(other.y as u64 + other.height as u64);
        (right > left && bottom > top)
            .then(|| Rect::new(left as u32, top as u32, (right - left) as u32, (bottom - top) as u32))
    }

    /// The smallest rectangle holding both; an empty rectangle counts as nothing.
    pub fn union(&self, other: &Rect) -> Rect {
        if self.is_empty() {
            return *other;
        }
        if other.is_empty() {
            return *self;
        }
        let left = self.x.min(other.x);
        let top = self.y.min(other.y);
        let right = (self.x as u64 + self.width as u64).max(other.x as u64 + other.width as u64);
        let bottom = (self.y as u64 + self.height as u64).max(other.y as u64 + other.height as u64);
        Rect::new(
            left,
            top,
            (right - left as u64).min(u32::MAX as u64) as u32,
            (bottom - top as u64).min(u32::MAX as u64) as u32,
        )
    }
}

/// `struct virtio_gpu_ctrl_hdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub command: u32,
    pub flags: u32,
    pub fence_id: u64,
    pub context_id: u32,
    pub ring_index: u8,
}

impl Header {
    /// Parses the header at the start of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Header, ProtocolError> {
        if bytes.len() < HEADER_SIZE {
            return Err(ProtocolError::ReadHeader { len: bytes.len() });
        }
        let mut fields = Fields::new(bytes);
        let header = (|| {
            Some(Header {
                command: fields.u32()?,
                flags: fields.u32()?,
                fence_id: fields.u64()?,
                context_id: fields.u32()?,
                ring_index: fields.u8()?,
            })
        })();
        header.ok_or(ProtocolError::ReadHeader { len: bytes.len() })
    }

    /// The header of a response to `self`: fence and ring echoed when the request asked.
    pub fn response(&self, response_type: u32) -> Header {
        let flags = self.flags & (FLAG_FENCE | FLAG_INFO_RING_IDX);
        let fenced = flags & FLAG_FENCE != 0;
        Header {
            command: response_type,
            flags,
            fence_id: if fenced { self.fence_id } else { 0 },
            context_id: if fenced { self.context_id } else { 0 },
            ring_index: if flags & FLAG_INFO_RING_IDX != 0 { self.ring_index } else { 0 },
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.command.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.fence_id.to_le_bytes());
        out.extend_from_slice(&self.context_id.to_le_bytes());
        out.push(self.ring_index);
        out.extend_from_slice(&[0; 3]);
    }
}

/// `struct virtio_gpu_mem_entry`: one run of guest-physical backing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEntry {
    pub addr: u64,
    pub length: u32,
}

/// `struct virtio_gpu_cursor_pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CursorPosition {
    pub scanout_id: u32,
    pub x: u32,
    pub y: u32,
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    GetDisplayInfo,
    GetEdid {
        scanout_id: u32,
    },
    ResourceCreate2d {
        resource_id: u32,
        format: u32,
        width: u32,
        height: u32,
    },
    ResourceUnref {
        resource_id: u32,
    },
    SetScanout {
        rect: Rect,
        scanout_id: u32,
        resource_id: u32,
    },
    ResourceFlush {
        rect: Rect,
        resource_id: u32,
    },
    TransferToHost2d {
        rect: Rect,
        offset: u64,
        resource_id: u32,
    },
    ResourceAttachBacking {
        resource_id: u32,
        entries: Vec<MemoryEntry>,
    },
    ResourceDetachBacking {
        resource_id: u32,
    },
    UpdateCursor {
        position: CursorPosition,
        resource_id: u32,
        hot_x: u32,
        hot_y: u32,
    },
    MoveCursor {
        position: CursorPosition,
    },
    /// A real virtio-gpu command this device does not offer (3D, capsets, blobs, UUIDs):
    /// answered with ERR_UNSPEC.
    Unsupported {
        command: u32,
    },
}

impl Command {
    /// Whether the command belongs on the cursor queue (all others go on the control queue).
    pub fn is_cursor_command(&self) -> bool {
        matches!(self, Command::UpdateCursor { .. } | Command::MoveCursor { .. })
    }
}

/// A parsed request: header and command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub header: Header,
    pub command: Command,
}

/// Parses one request (header and body) from the bytes of a chain's readable part.
/// Bytes past the command's body are ignored, as the spec allows.
pub fn parse_request(bytes: &[u8]) -> Result<Request, ProtocolError> {
    let header = Header::parse(bytes)?;
    let body = &bytes[HEADER_SIZE..];
    let needed = |size: usize| {
        if body.len() < size {
            Err(ProtocolError::ReadBody { command: header.command, needed: HEADER_SIZE + size, got: bytes.len() })
        } else {
            Ok(Fields::new(body))
        }
    };
    let command = match header.command {
        CMD_GET_DISPLAY_INFO => Command::GetDisplayInfo,
        CMD_GET_EDID => {
            let mut f = needed(8)?;
            Command::GetEdid { scanout_id: f.u32_or_zero() }
        }
        CMD_RESOURCE_CREATE_2D => {
            let mut f = needed(16)?;
            Command::ResourceCreate2d {
                resource_id: f.u32_or_zero(),
                format: f.u32_or_zero(),
                width: f.u32_or_zero(),
                height: f.u32_or_zero(),
            }
        }
        CMD_RESOURCE_UNREF => Command::ResourceUnref { resource_id: needed(8)?.u32_or_zero() },
        CMD_SET_SCANOUT => {
            let mut f = needed(24)?;
            Command::SetScanout { rect: f.rect(), scanout_id: f.u32_or_zero(), resource_id: f.u32_or_zero() }
        }
        CMD_RESOURCE_FLUSH => {
            let mut f = needed(24)?;
            Command::ResourceFlush { rect: f.rect(), resource_id: f.u32_or_zero() }
        }
        CMD_TRANSFER_TO_HOST_2D => {
            let mut f = needed(32)?;
            let rect = f.rect();
            let offset = f.u64().unwrap_or(0);
            Command::TransferToHost2d { rect, offset, resource_id: f.u32_or_zero() }
        }
        CMD_RESOURCE_ATTACH_BACKING => {
            let mut f = needed(8)?;
            let resource_id = f.u32_or_zero();
            let count = f.u32_or_zero();
            if count > MAX_BACKING_ENTRIES {
                return Err(ProtocolError::ReadBackingEntries { count });
            }
            let mut f = needed(8 + count as usize * MEMORY_ENTRY_SIZE)?;
            f.skip(8);
            let entries = (0..count)
                .map(|_| {
                    let addr = f.u64().unwrap_or(0);
                    let length = f.u32_or_zero();
                    f.skip(4);
                    MemoryEntry { addr, length }
                })
                .collect();
            Command::ResourceAttachBacking { resource_id, entries }
        }
        CMD_RESOURCE_DETACH_BACKING => Command::ResourceDetachBacking { resource_id: needed(8)?.u32_or_zero() },
        CMD_UPDATE_CURSOR | CMD_MOVE_CURSOR => {
            let mut f = needed(32)?;
            let position = CursorPosition { scanout_id: f.u32_or_zero(), x: f.u32_or_zero(), y: f.u32_or_zero() };
            f.skip(4);
            if header.command == CMD_MOVE_CURSOR {
                Command::MoveCursor { position }
            } else {
                Command::UpdateCursor {
                    position,
                    resource_id: f.u32_or_zero(),
                    hot_x: f.u32_or_zero(),
                    hot_y: f.u32_or_zero(),
                }
            }
        }
        CMD_GET_CAPSET_INFO
        | CMD_GET_CAPSET
        | CMD_RESOURCE_ASSIGN_UUID
        | CMD_RESOURCE_CREATE_BLOB
        | CMD_SET_SCANOUT_BLOB
        | CMD_3D_FIRST..=CMD_3D_LAST => Command::Unsupported { command: header.command },
        command => return Err(ProtocolError::DecodeCommand { command }),
    };
    Ok(Request { header, command })
}

/// Error responses (`VIRTIO_GPU_RESP_ERR_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Unspec,
    OutOfMemory,
    InvalidScanoutId,
    InvalidResourceId,
    InvalidContextId,
    InvalidParameter,
}

impl ErrorCode {
    pub fn response_type(&self) -> u32 {
        match self {
            ErrorCode::Unspec => RESP_ERR_UNSPEC,
            ErrorCode::OutOfMemory => RESP_ERR_OUT_OF_MEMORY,
            ErrorCode::InvalidScanoutId => RESP_ERR_INVALID_SCANOUT_ID,
            ErrorCode::InvalidResourceId => RESP_ERR_INVALID_RESOURCE_ID,
            ErrorCode::InvalidContextId => RESP_ERR_INVALID_CONTEXT_ID,
            ErrorCode::InvalidParameter => RESP_ERR_INVALID_PARAMETER,
        }
    }
}

/// A response, before encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    OkNoData,
    /// One enabled scanout of this size (the rest of the 16 are disabled).
    OkDisplayInfo {
        width: u32,
        height: u32,
    },
    OkEdid {
        edid: Vec<u8>,
    },
    Error(ErrorCode),
}

impl Response {
    pub fn response_type(&self) -> u32 {
        match self {
            Response::OkNoData => RESP_OK_NODATA,
            Response::OkDisplayInfo { .. } => RESP_OK_DISPLAY_INFO,
            Response::OkEdid { .. } => RESP_OK_EDID,
            Response::Error(code) => code.response_type(),
        }
    }

    /// Encodes the response to `request_header` into `out` (cleared first).
    pub fn encode(&self, request_header: &Header, out: &mut Vec<u8>) {
        out.clear();
        request_header.response(self.response_type()).encode(out);
        match self {
            Response::OkNoData | Response::Error(_) => {}
            Response::OkDisplayInfo { width, height } => {
                for scanout in 0..MAX_SCANOUTS {
                    let (w, h, enabled) = if scanout == 0 { (*width, *height, 1u32) } else { (0, 0, 0) };
                    for field in [0, 0, w, h, enabled, 0] {
                        out.extend_from_slice(&u32::to_le_bytes(field));
                    }
                }
            }
            Response::OkEdid { edid } => {
                let size = edid.len().min(EDID_BLOB_SIZE);
                out.extend_from_slice(&(size as u32).to_le_bytes());
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(&edid[..size]);
                out.resize(HEADER_SIZE + 8 + EDID_BLOB_SIZE, 0);
            }
        }
    }
}

/// A little-endian field reader over a slice; reads past the end yield `None`.
struct Fields<'a> {
    bytes: &'a [u8],
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Fields<'a> {
        Fields { bytes }
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.bytes.split_first_chunk::<N>()?;
        self.bytes = rest;
        Some(*head)
    }

    fn skip(&mut self, count: usize) {
        self.bytes = self.bytes.get(count..).unwrap_or(&[]);
    }

    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    /// For fields whose presence the caller already checked with the body length.
    fn u32_or_zero(&mut self) -> u32 {
        self.u32().unwrap_or(0)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }

    fn rect(&mut self) -> Rect {
        Rect::new(self.u32_or_zero(), self.u32_or_zero(), self.u32_or_zero(), self.u32_or_zero())
    }
}

/// Test helpers that build requests the way a driver lays them out.
#[cfg(test)]
pub(crate) mod encode {
    use super::*;

    pub fn header(command: u32) -> Vec<u8> {
        fenced_header(command, 0, 0)
    }

    pub fn fenced_header(command: u32, flags: u32, fence_id: u64) -> Vec<u8> {
        let mut out = Vec::new();
        Header { command, flags, fence_id, context_id: 0, ring_index: 0 }.encode(&mut out);
        out
    }

    pub fn words(command: u32, words: &[u32]) -> Vec<u8> {
        let mut out = header(command);
        for word in words {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out
    }

    pub fn transfer(rect: Rect, offset: u64, resource_id: u32) -> Vec<u8> {
        let mut out = words(CMD_TRANSFER_TO_HOST_2D, &[rect.x, rect.y, rect.width, rect.height]);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&resource_id.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out
    }

    pub fn attach_backing(resource_id: u32, entries: &[(u64, u32)]) -> Vec<u8> {
        let mut out = words(CMD_RESOURCE_ATTACH_BACKING, &[resource_id, entries.len() as u32]);
        for (addr, length) in entries {
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&length.to_le_bytes());
            out.extend_from_slice(&[0; 4]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::encode::*;
    use super::*;

    #[test]
    fn parse_request_create_2d_reads_fields() {
        let bytes = words(CMD_RESOURCE_CREATE_2D, &[7, 2, 640, 480]);
        let request = parse_request(&bytes).unwrap();
        assert_eq!(request.command, Command::ResourceCreate2d { resource_id: 7, format: 2, width: 640, height: 480 });
    }

    #[test]
    fn parse_request_short_header_is_read_header_error() {
        assert_eq!(parse_request(&[0; 23]), Err(ProtocolError::ReadHeader { len: 23 }));
    }

    #[test]
    fn parse_request_short_body_is_read_body_error() {
        let bytes = words(CMD_RESOURCE_CREATE_2D, &[7, 2, 640]);
        assert!(matches!(parse_request(&bytes), Err(ProtocolError::ReadBody { needed: 40, got: 36, .. })));
    }

    #[test]
    fn parse_request_unknown_type_is_decode_error() {
        assert_eq!(parse_request(&header(0x4242)), Err(ProtocolError::DecodeCommand { command: 0x4242 }));
    }

    #[test]
    fn parse_request_3d_command_is_unsupported() {
        let request = parse_request(&header(0x0201)).unwrap();
        assert_eq!(request.command, Command::Unsupported { command: 0x0201 });
    }

    #[test]
    fn parse_request_attach_backing_reads_entries() {
        let bytes = attach_backing(3, &[(0x1000, 4096), (0x8000, 100)]);
        let request = parse_request(&bytes).unwrap();
        assert_eq!(
            request.command,
            Command::ResourceAttachBacking {
                resource_id: 3,
                entries: vec![MemoryEntry { addr: 0x1000, length: 4096 }, MemoryEntry { addr: 0x8000, length: 100 }]
            }
        );
    }

    #[test]
    fn parse_request_attach_backing_with_missing_entries_is_read_body_error() {
        let mut bytes = attach_backing(3, &[(0x1000, 4096)]);
        bytes[28..32].copy_from_slice(&5u32.to_le_bytes());
        assert!(matches!(parse_request(&bytes), Err(ProtocolError::ReadBody { .. })));
    }

    #[test]
    fn parse_request_attach_backing_with_huge_count_is_rejected_before_allocating() {
        let bytes = words(CMD_RESOURCE_ATTACH_BACKING, &[3, u32::MAX]);
        assert_eq!(parse_request(&bytes), Err(ProtocolError::ReadBackingEntries { count: u32::MAX }));
    }

    #[test]
    fn response_to_fenced_request_echoes_fence() {
        let request =
            Header { command: CMD_RESOURCE_FLUSH, flags: FLAG_FENCE, fence_id: 99, context_id: 0, ring_index: 0 };
        let mut out = Vec::new();
        Response::OkNoData.encode(&request, &mut out);
        assert_eq!(out.len(), HEADER_SIZE);
        let header = Header::parse(&out).unwrap();
        assert_eq!((header.command, header.flags, header.fence_id), (RESP_OK_NODATA, FLAG_FENCE, 99));
    }

    #[test]
    fn display_info_response_is_408_bytes() {
        let mut out = Vec::new();
        Response::OkDisplayInfo { width: 1280, height: 800 }.encode(&Header::default(), &mut out);
        assert_eq!(out.len(), 408);
        assert_eq!(u32::from_le_bytes(out[32..36].try_into().unwrap()), 1280);
        assert_eq!(u32::from_le_bytes(out[40..44].try_into().unwrap()), 1);
    }

    #[test]
    fn rect_fits_in_does_not_overflow() {
        assert!(!Rect::new(u32::MAX, 0, 2, 1).fits_in(u32::MAX, 1));
        assert!(Rect::new(10, 10, 10, 10).fits_in(20, 20));
    }

    #[test]
    fn rect_intersect_and_union() {
        let a = Rect::new(0, 0, 10, 10);
        let b = Rect::new(5, 5, 10, 10);
        assert_eq!(a.intersect(&b), Some(Rect::new(5, 5, 5, 5)));
        assert_eq!(a.union(&b), Rect::new(0, 0, 15, 15));
        assert_eq!(a.intersect(&Rect::new(10, 0, 5, 5)), None);
        assert_eq!(Rect::default().union(&b), b);
    }
}

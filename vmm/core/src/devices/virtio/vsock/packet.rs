//! The vsock packet header (virtio spec 5.10.6) and its validation. Guest headers are
//! hostile: every field is checked before the muxer acts on it.

use vm_memory::ByteValued;

pub const HEADER_SIZE: usize = 44;
/// Largest payload one packet may carry; guests use 4 KiB to 64 KiB buffers.
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// The only socket type: stream.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags.
pub const SHUTDOWN_RECEIVE: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// The header, little-endian on the wire, packed to 44 bytes.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

// SAFETY: PacketHeader is packed plain integers: every byte pattern is a valid value.
unsafe impl ByteValued for PacketHeader {}

/// Why a guest packet was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("packet from CID {found}, the guest is CID {expected}")]
    WrongSource { found: u64, expected: u64 },
    #[error("packet to CID {found}, only the host (2) is reachable")]
    WrongDestination { found: u64 },
    #[error("socket type {0} is not stream")]
    WrongType(u16),
    #[error("unknown operation {0}")]
    UnknownOp(u16),
    #[error("payload of {0} bytes is larger than allowed")]
    PayloadTooLarge(u32),
    #[error("payload on a packet that carries none (op {0})")]
    UnexpectedPayload(u16),
}

/// One line for traces: `RW 3:1024 -> 2:1073741824 len 13 flags 0 buf_alloc 262144 fwd_cnt 17`.
impl std::fmt::Display for PacketHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (src_cid, src_port, dst_cid, dst_port) = (self.src_cid, self.src_port, self.dst_cid, self.dst_port);
        let (len, flags, buf_alloc, fwd_cnt) = (self.len, self.flags, self.buf_alloc, self.fwd_cnt);
        match self.op {
            op::REQUEST => f.write_str("REQUEST")?,
            op::RESPONSE => f.write_str("RESPONSE")?,
            op::RST => f.write_str("RST")?,
            op::SHUTDOWN => f.write_str("SHUTDOWN")?,
            op::RW => f.write_str("RW")?,
            op::CREDIT_UPDATE => f.write_str("CREDIT_UPDATE")?,
            op::CREDIT_REQUEST => f.write_str("CREDIT_REQUEST")?,
            other => write!(f, "op {other}")?,
        }
        write!(
            f,
            " {src_cid}:{src_port} -> {dst_cid}:{dst_port} len {len} flags {flags} buf_alloc {buf_alloc} fwd_cnt {fwd_cnt}"
        )
    }
}

impl PacketHeader {
    /// Checks a header the guest sent.
    pub fn validate_from_guest(&self, guest_cid: u64) -> Result<(), PacketError> {
        let (src, dst, kind, op, len) = (self.src_cid, self.dst_cid, self.kind, self.op, self.len);
        if src != guest_cid {
            return Err(PacketError::WrongSource { found: src, expected: guest_cid });
        }
        if dst != super::HOST_CID {
            return Err(PacketError::WrongDestination { found: dst });
        }
        if kind != TYPE_STREAM {
            return Err(PacketError::WrongType(kind));
        }
        if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&op) {
            return Err(PacketError::UnknownOp(op));
        }
        if len > MAX_PAYLOAD {
            return Err(PacketError::PayloadTooLarge(len));
        }
        if op != op::RW && len != 0 {
            return Err(PacketError::UnexpectedPayload(op));
        }
        Ok(())
    }

    /// Parses a header from exactly [`HEADER_SIZE`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<PacketHeader> {
        PacketHeader::from_slice(bytes.get(..HEADER_SIZE)?).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(op: u16, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 1,
            len,
            kind: TYPE_STREAM,
            op,
            ..Default::default()
        }
    }

    #[test]
    fn a_header_reads_as_one_trace_line() {
        let mut rw = header(op::RW, 13);
        rw.fwd_cnt = 17;
        assert_eq!(rw.to_string(), "RW 3:1024 -> 2:1 len 13 flags 0 buf_alloc 0 fwd_cnt 17");
        assert!(header(99, 0).to_string().starts_with("op 99 3:1024"));
    }

    #[test]
    fn header_is_44_bytes() {
        assert_eq!(std::mem::size_of::<PacketHeader>(), HEADER_SIZE);
    }

    #[test]
    fn valid_rw_header_passes() {
        assert_eq!(header(op::RW, 100).validate_from_guest(3), Ok(()));
    }

    #[test]
    fn spoofed_source_cid_is_refused() {
        assert_eq!(header(op::RW, 0).validate_from_guest(4), Err(PacketError::WrongSource { found: 3, expected: 4 }));
    }

    #[test]
    fn header_to_other_cid_unknown_op_bad_type_and_huge_len_are_refused() {
        let mut to_other = header(op::RW, 0);
        to_other.dst_cid = 7;
        assert_eq!(to_other.validate_from_guest(3), Err(PacketError::WrongDestination { found: 7 }));
        assert_eq!(header(42, 0).validate_from_guest(3), Err(PacketError::UnknownOp(42)));
        let mut datagram = header(op::RW, 0);
        datagram.kind = 2;
        assert_eq!(datagram.validate_from_guest(3), Err(PacketError::WrongType(2)));
        assert_eq!(
            header(op::RW, MAX_PAYLOAD + 1).validate_from_guest(3),
            Err(PacketError::PayloadTooLarge(MAX_PAYLOAD + 1))
        );
        assert_eq!(header(op::REQUEST, 5).validate_from_guest(3), Err(PacketError::UnexpectedPayload(op::REQUEST)));
    }

    #[test]
    fn from_bytes_needs_a_whole_header() {
        assert!(PacketHeader::from_bytes(&[0u8; 43]).is_none());
        let parsed = PacketHeader::from_bytes(header(op::RW, 9).as_slice()).unwrap();
        assert_eq!({ parsed.len }, 9);
    }
}

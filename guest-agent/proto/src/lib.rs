//! Carrel guest agent protocol: the message types, the frame format and the flow-control
//! counters shared by the host client, the Linux guest agent and the Desk kernel's agent.
//!
//! The crate is `no_std` + `alloc` so the Desk kernel can use it as is; the `std` feature
//! adds blocking frame reading and writing over `std::io` ([`io`]).
//!
//! # Framing
//!
//! Every message travels in one frame:
//!
//! ```text
//! +-----------+-----------+----------+----------------------------+
//! | len: u32  | id: u32   | kind: u16| body: len - 6 bytes        |
//! +-----------+-----------+----------+----------------------------+
//!   all integers little-endian; len counts everything after itself
//! ```
//!
//! `len` is checked against [`MAX_FRAME_LEN`] before anything is allocated. The header is
//! fixed binary rather than a postcard envelope so that a receiver always learns the request
//! id and the kind of a frame it cannot use (too large, unknown kind, malformed body) and can
//! answer that request with an [`Message::Error`] instead of dropping the connection: an
//! oversized frame is skipped byte by byte by [`FrameDecoder`], an unknown kind or a body
//! that does not decode is an error for that one request. This is the version-tolerant
//! envelope: new message kinds can be added without breaking old peers, which answer
//! [`ErrorCode::UNKNOWN_KIND`].
//!
//! The body is postcard for structured messages. Bulk payloads (file data, exec stdout and
//! stderr) are raw bytes with no encoding, so a 64 KiB chunk is copied once, not serialized
//! byte by byte.
//!
//! # Requests and streams
//!
//! The host picks a non-zero request id for each request; every reply and every stream
//! frame belonging to that request carries the same id, so several requests (two execs, an
//! exec and a file transfer) can be in flight on one connection. Id 0 is for frames that
//! belong to no request: the guest's [`Message::Heartbeat`] and connection-level errors.
//!
//! | request (host -> guest)      | replies (guest -> host, same id)                        |
//! |------------------------------|---------------------------------------------------------|
//! | `Hello`                      | `Hello` (the agent's), or `Error(VERSION_MISMATCH)`     |
//! | `Ping`                       | `Pong` with the same nonce                              |
//! | `Exec`                       | `Stdout`/`Stderr` chunks ..., then `ExecExit`           |
//! | `Kill { target }`            | `Done`, or `Error(UNKNOWN_REQUEST)`                      |
//! | `PutFile` + `Data`.. + `End` | `Credit`..., then `Done` or `Error(DIGEST_MISMATCH)`    |
//! | `GetFile` (+ `Credit`s)      | `FileInfo`, `Data`..., `End { digest }`                 |
//! | `Stat`                       | `StatReply`                                             |
//! | `ListDir`                    | `DirEntries` ... (the last has `done: true`)            |
//! | `Remove`                     | `Done`                                                  |
//!
//! Any request may instead be answered with `Error { code, message }`, which ends it.
//! The guest sends `Heartbeat { seq, uptime_ms }` (id 0) as soon as a connection opens and
//! then every [`HEARTBEAT_INTERVAL_MS`]; the host's "agent ready" is the first heartbeat.
//!
//! # Flow control
//!
//! Exec output needs none beyond the transport: the agent writes each chunk with a blocking
//! write, so a host that stops reading stalls the pipe reader and then the command itself.
//!
//! File data is credit based ([`flow`]): the receiver of a file grants the sender credit in
//! chunks (`Credit { chunks }`, at most [`MAX_WINDOW`] outstanding); the sender may only send
//! a `Data` frame (at most [`MAX_CHUNK`] bytes) while it holds credit. For a put the guest
//! grants the first window when the file is open, so a rejected path costs no data; for a
//! get the host states its window in `GetFile`. Neither side ever holds more than one window
//! of a transfer in memory. The sender ends with `End { size, digest }`, the blake3 of the
//! whole file, which the receiver checks; a put whose digest does not match is discarded.
//!
//! # Versions
//!
//! `Hello` carries [`PROTOCOL_VERSION`]. The agent refuses a different version with
//! `Error(VERSION_MISMATCH)` whose message names both versions.
#![no_std]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod flow;
pub mod frame;
#[cfg(feature = "std")]
pub mod io;
pub mod message;

pub use flow::{FlowError, RecvCredit, SendCredit};
pub use frame::{encode_frame, encode_header, Frame, FrameDecoder, FrameError, FrameHeader};
pub use message::*;

/// The protocol version carried in `Hello`.
pub const PROTOCOL_VERSION: u16 = 1;
/// The vsock port the guest agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// Bytes in a frame header: length (4), request id (4), kind (2).
pub const HEADER_LEN: usize = 10;
/// Largest frame body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Largest value of the length field: id + kind + body.
pub const MAX_FRAME_LEN: u32 = (MAX_BODY + HEADER_LEN - 4) as u32;
/// Largest `Data`, `Stdout` or `Stderr` payload.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Largest credit window (chunks) a receiver may grant for one transfer.
pub const MAX_WINDOW: u32 = 64;
/// The window the host and the Linux agent use: 16 chunks = 1 MiB in flight.
pub const DEFAULT_WINDOW: u32 = 16;
/// How often the guest sends a heartbeat.
pub const HEARTBEAT_INTERVAL_MS: u64 = 1000;
/// Largest inline stdin of an `Exec` (the rest of the body is argv, env and cwd).
pub const MAX_STDIN: usize = 512 * 1024;

//! virtio-vsock (device id 19) with the host side as Unix sockets, Firecracker's hybrid
//! convention (there is no vhost-vsock on our machines, and a VMM-side device keeps the
//! guest's sockets inside this process anyway):
//!
//! - host to guest: connect to the VM's vsock socket, write `CONNECT <port>\n`, read
//!   `OK <host port>\n`, then the stream is the connection;
//! - guest to host: a guest connection to host port P is bridged to the Unix socket
//!   `<vsock socket>_P`.
//!
//! `packet` parses the wire header, `muxer` owns connections, credit and host sockets
//! (no queues), `handler` moves packets between the queues and the muxer, `device` wires
//! it to the transport.

mod device;
mod handler;
pub mod muxer;
mod packet;
mod persist;

pub use device::{Vsock, VsockConfig, VsockError};
pub use muxer::VsockMetrics;
pub use packet::{op, PacketHeader, HEADER_SIZE};
pub use persist::VsockState;

/// The host's CID, always 2.
pub const HOST_CID: u64 = 2;

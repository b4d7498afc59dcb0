//! Connections between guest vsock ports and host Unix sockets, with credit-based flow
//! control. No queues here: the handler gives the muxer guest packets and asks it for the
//! next packet for the guest.
//!
//! Buffers are bounded on both sides: the guest may send at most `BUFFER_SIZE` bytes that
//! the host has not taken yet (it is told so in every header), and the muxer reads from a
//! host socket only while the guest has credit for it, so a peer that stops reading stalls
//! its own connection and nothing else.
//!
//! With `CARREL_VSOCK_TRACE=1` in carrel-vmm's environment, every packet each way and
//! every connection the muxer drops (with why) is one stderr line: for finding out what a
//! guest's driver did when a connection ends that should not have.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{op, PacketHeader, MAX_PAYLOAD, SHUTDOWN_RECEIVE, SHUTDOWN_SEND, TYPE_STREAM};
use super::HOST_CID;

/// What each side may have in flight per connection.
pub const BUFFER_SIZE: u32 = 256 * 1024;
/// Host connections waiting for their `CONNECT` line or the guest's answer.
const MAX_PENDING: usize = 64;
/// Most connections at once.
const MAX_CONNECTIONS: usize = 1024;
/// Host ports the muxer hands out for host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_HANDSHAKE: usize = 32;

const LISTENER_TOKEN: u64 = u64::MAX;

/// Counters for developers.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    pub connections_opened: AtomicU64,
    pub connections_reset: AtomicU64,
    pub malformed_packets: AtomicU64,
    pub credit_violations: AtomicU64,
    pub bytes_to_host: AtomicU64,
    pub bytes_to_guest: AtomicU64,
}

/// (host port, guest port): one connection.
type Key = (u32, u32);

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host side connected, waiting for its `CONNECT <port>\n`.
    Handshake,
    /// REQUEST sent to the guest, waiting for RESPONSE.
    Requested,
    Established,
    /// SHUTDOWN sent to the guest; waiting for its RST.
    Closing,
}

#[derive(Debug)]
struct Connection {
    stream: UnixStream,
    state: State,
    /// Bytes from the guest not yet written to the host socket.
    to_host: VecDeque<u8>,
    /// Bytes read from the host socket not yet sent to the guest.
    to_guest: Vec<u8>,
    /// Bytes we forwarded to the host socket (our fwd_cnt).
    forwarded: u32,
    /// `forwarded` as last told to the guest.
    forwarded_told: u32,
    /// Bytes sent to the guest (our tx_cnt).
    sent: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    handshake: Vec<u8>,
    /// Interest currently registered in epoll.
    interest: EventSet,
}

impl Connection {
    fn new(stream: UnixStream, state: State) -> Connection {
        Connection {
            stream,
            state,
            to_host: VecDeque::new(),
            to_guest: Vec::new(),
            forwarded: 0,
            forwarded_told: 0,
            sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            handshake: Vec::new(),
            interest: EventSet::empty(),
        }
    }

    /// How many bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.sent.wrapping_sub(self.peer_fwd_cnt))
    }

    fn wanted_interest(&self) -> EventSet {
        let mut interest = EventSet::empty();
        let reading = match self.state {
            State::Handshake => true,
            State::Established => self.to_guest.is_empty() && self.peer_credit() > 0,
            State::Requested | State::Closing => false,
        };
        if reading {
            interest |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            interest |= EventSet::OUT;
        }
        interest
    }
}

/// A packet for the guest: a header and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutPacket {
    pub header: PacketHeader,
    pub payload: Vec<u8>,
}

/// The connection table and the host sockets.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    socket_path: PathBuf,
    epoll: Epoll,
    listener: UnixListener,
    /// Host connections not yet tied to a guest port, by token.
    pending: BTreeMap<u64, Connection>,
    connections: BTreeMap<Key, Connection>,
    /// Control packets (RESPONSE, RST, SHUTDOWN, CREDIT_UPDATE, REQUEST) for the guest.
    control: VecDeque<OutPacket>,
    next_host_port: u32,
    next_token: u64,
    /// Whether packets and resets are traced (`CARREL_VSOCK_TRACE`), and since when.
    trace: Option<std::time::Instant>,
    pub metrics: std::sync::Arc<VsockMetrics>,
}

/// Tokens: pending connections count up from 0; established ones use the key packed into
/// the upper bits, so both fit one epoll u64.
fn connection_token(key: Key) -> u64 {
    (1 << 63) | (u64::from(key.0) << 32) | u64::from(key.1)
}

fn token_key(token: u64) -> Option<Key> {
    (token & (1 << 63) != 0 && token != LISTENER_TOKEN).then_some((((token >> 32) as u32) & 0x7fff_ffff, token as u32))
}

impl Muxer {
    /// Listens on `socket_path` for host connections.
    pub fn new(guest_cid: u64, socket_path: &Path) -> std::io::Result<Muxer> {
        let _ = std::fs::remove_file(socket_path);
        let listener = crate::sockets::bind(socket_path)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, LISTENER_TOKEN))?;
        Ok(Muxer {
            guest_cid,
            socket_path: socket_path.to_path_buf(),
            epoll,
            listener,
            pending: BTreeMap::new(),
            connections: BTreeMap::new(),
            control: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
            next_token: 0,
            trace: crate::timeline::env_flag("CARREL_VSOCK_TRACE").then(std::time::Instant::now),
            metrics: Default::default(),
        })
    }

    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn header(&self, key: Key, op: u16, len: u32, forwarded: u32) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUFFER_SIZE,
            fwd_cnt: forwarded,
        }
    }

    /// One trace line, when tracing: seconds since the muxer started, then `what`.
    fn trace(&self, what: std::fmt::Arguments) {
        if let Some(started) = self.trace {
            crate::timeline::say(&format!("carrel-vmm: vsock {:.6} {what}", started.elapsed().as_secs_f64()));
        }
    }

    fn push_control(&mut self, key: Key, op: u16, flags: u32) {
        let forwarded = self.connections.get(&key).map_or(0, |c| c.forwarded);
        let mut header = self.header(key, op, 0, forwarded);
        header.flags = flags;
        if let Some(connection) = self.connections.get_mut(&key) {
            connection.forwarded_told = connection.forwarded;
        }
        self.control.push_back(OutPacket { header, payload: Vec::new() });
    }

    fn set_interest(epoll: &Epoll, token: u64, connection: &mut Connection) {
        let wanted = connection.wanted_interest();
        if wanted == connection.interest {
            return;
        }
        let fd = connection.stream.as_raw_fd();
        let result = if connection.interest.is_empty() {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(wanted, token))
        } else if wanted.is_empty() {
            epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
        } else {
            epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(wanted, token))
        };
        if result.is_ok() {
            connection.interest = wanted;
        }
    }

    fn refresh(&mut self, key: Key) {
        if let Some(connection) = self.connections.get_mut(&key) {
            Self::set_interest(&self.epoll, connection_token(key), connection);
        }
    }

    /// Drops connection `key` (host port, guest port), telling the guest with a RST when
    /// `tell_guest`; `why` is for the trace.
    fn reset(&mut self, key: Key, tell_guest: bool, why: &str) {
        self.trace(format_args!("drop {}:{} ({why})", key.0, key.1));
        if let Some(connection) = self.connections.remove(&key) {
            let _ = self.epoll.ctl(ControlOperation::Delete, connection.stream.as_raw_fd(), EpollEvent::default());
            self.metrics.connections_reset.fetch_add(1, Ordering::Relaxed);
        }
        if tell_guest {
            self.control.push_back(OutPacket { header: self.header(key, op::RST, 0, 0), payload: Vec::new() });
        }
    }

    /// Handles one packet the guest sent. `payload` is the RW data, if any.
    pub fn handle_guest_packet(&mut self, header: &PacketHeader, payload: &[u8]) {
        self.trace(format_args!("guest {header}"));
        if let Err(error) = header.validate_from_guest(self.guest_cid) {
            self.trace(format_args!("refused: {error}"));
            self.metrics.malformed_packets.fetch_add(1, Ordering::Relaxed);
            // Reply RST unless the packet was itself a RST (no RST storms).
            if header.op != op::RST && header.src_cid == self.guest_cid && header.dst_cid == HOST_CID {
                self.control.push_back(OutPacket {
                    header: self.header((header.dst_port, header.src_port), op::RST, 0, 0),
                    payload: Vec::new(),
                });
            }
            return;
        }
        let key: Key = (header.dst_port, header.src_port);
        if header.op == op::REQUEST {
            return self.connect_to_host(key, header);
        }
        let Some(connection) = self.connections.get_mut(&key) else {
            if header.op != op::RST {
                self.reset(key, true, "a packet for no connection");
            }
            return;
        };
        connection.peer_buf_alloc = header.buf_alloc;
        connection.peer_fwd_cnt = header.fwd_cnt;
        match header.op {
            op::RESPONSE if connection.state == State::Requested => {
                connection.state = State::Established;
                let line = format!("OK {}\n", key.0);
                // The Unix stream is fresh and empty: a short line always fits its buffer.
                if connection.stream.write_all(line.as_bytes()).is_err() {
                    return self.reset(key, true, "the host end is gone");
                }
            }
            op::RESPONSE => return self.reset(key, true, "a RESPONSE out of turn"),
            op::RST => return self.reset(key, false, "the guest's RST"),
            op::SHUTDOWN if header.flags & (SHUTDOWN_RECEIVE | SHUTDOWN_SEND) == (SHUTDOWN_RECEIVE | SHUTDOWN_SEND) => {
                // Flush what we can, then close; the guest expects our RST.
                let _ = Self::write_to_host(connection, &self.metrics);
                return self.reset(key, true, "the guest's SHUTDOWN");
            }
            op::RW => {
                if connection.state != State::Established {
                    return self.reset(key, true, "data on a connection not established");
                }
                let in_flight = connection.to_host.len() as u32 + payload.len() as u32;
                if in_flight > BUFFER_SIZE {
                    self.metrics.credit_violations.fetch_add(1, Ordering::Relaxed);
                    return self.reset(key, true, "the guest sent more than its credit");
                }
                connection.to_host.extend(payload);
                if Self::write_to_host(connection, &self.metrics).is_err() {
                    return self.reset(key, true, "writing to the host end failed");
                }
                // Tell the guest about freed space once a quarter of the buffer is free again.
                if connection.forwarded.wrapping_sub(connection.forwarded_told) >= BUFFER_SIZE / 4 {
                    self.push_control(key, op::CREDIT_UPDATE, 0);
                }
            }
            op::CREDIT_REQUEST => self.push_control(key, op::CREDIT_UPDATE, 0),
            // CREDIT_UPDATE only carries the new peer credit, taken above.
            _ => {}
        }
        self.refresh(key);
    }

    /// Writes buffered guest bytes to the host socket without blocking.
    fn write_to_host(connection: &mut Connection, metrics: &VsockMetrics) -> std::io::Result<()> {
        while !connection.to_host.is_empty() {
            let (front, _) = connection.to_host.as_slices();
            match connection.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(count) => {
                    connection.to_host.drain(..count);
                    connection.forwarded = connection.forwarded.wrapping_add(count as u32);
                    metrics.bytes_to_host.fetch_add(count as u64, Ordering::Relaxed);
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// A guest connection to host port `key.0`: bridged to `<socket>_<port>`.
    fn connect_to_host(&mut self, key: Key, header: &PacketHeader) {
        if self.connections.contains_key(&key) || self.connections.len() >= MAX_CONNECTIONS {
            return self.reset(key, true, "a REQUEST for a connection in use, or too many");
        }
        let path = format!("{}_{}", self.socket_path.display(), key.0);
        let stream = match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(stream) => stream,
            Err(_) => return self.reset(key, true, "nothing listens on the host port"),
        };
        let mut connection = Connection::new(stream, State::Established);
        connection.peer_buf_alloc = header.buf_alloc;
        connection.peer_fwd_cnt = header.fwd_cnt;
        self.connections.insert(key, connection);
        self.metrics.connections_opened.fetch_add(1, Ordering::Relaxed);
        self.push_control(key, op::RESPONSE, 0);
        self.refresh(key);
    }

    /// Handles ready host sockets. Returns whether packets for the guest may be waiting.
    pub fn process_host_events(&mut self) -> bool {
        let mut events = [EpollEvent::default(); 32];
        let count = self.epoll.wait(0, &mut events).unwrap_or(0);
        for event in &events[..count] {
            let token = event.data();
            if token == LISTENER_TOKEN {
                self.accept_host_connections();
            } else if let Some(key) = token_key(token) {
                self.service_connection(key, event.event_set());
            } else {
                self.service_handshake(token);
            }
        }
        self.has_packet()
    }

    fn accept_host_connections(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if self.pending.len() >= MAX_PENDING || stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.next_token;
            self.next_token = (self.next_token + 1) % (1 << 62);
            let mut connection = Connection::new(stream, State::Handshake);
            Self::set_interest(&self.epoll, token, &mut connection);
            self.pending.insert(token, connection);
        }
    }

    /// Reads the `CONNECT <port>\n` line of a host connection.
    fn service_handshake(&mut self, token: u64) {
        let Some(connection) = self.pending.get_mut(&token) else { return };
        let mut byte = [0u8; 1];
        loop {
            match connection.stream.read(&mut byte) {
                Ok(0) => return self.drop_pending(token),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if connection.handshake.len() < MAX_HANDSHAKE => connection.handshake.push(byte[0]),
                Ok(_) => return self.drop_pending(token),
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.drop_pending(token),
            }
        }
        let line = String::from_utf8_lossy(&connection.handshake).to_string();
        let port = line.strip_prefix("CONNECT ").and_then(|port| port.trim().parse::<u32>().ok());
        let Some(guest_port) = port else {
            let _ = connection.stream.write_all(b"ERROR expected CONNECT <port>\n");
            return self.drop_pending(token);
        };
        let Some(mut connection) = self.pending.remove(&token) else { return };
        let _ = self.epoll.ctl(ControlOperation::Delete, connection.stream.as_raw_fd(), EpollEvent::default());
        connection.interest = EventSet::empty();
        if self.connections.len() >= MAX_CONNECTIONS {
            return;
        }
        let host_port = self.allocate_host_port(guest_port);
        let key = (host_port, guest_port);
        connection.state = State::Requested;
        self.connections.insert(key, connection);
        self.metrics.connections_opened.fetch_add(1, Ordering::Relaxed);
        self.push_control(key, op::REQUEST, 0);
    }

    fn drop_pending(&mut self, token: u64) {
        if let Some(connection) = self.pending.remove(&token) {
            let _ = self.epoll.ctl(ControlOperation::Delete, connection.stream.as_raw_fd(), EpollEvent::default());
        }
    }

    fn allocate_host_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let port = self.next_host_port;
            self.next_host_port = if port >= 0x7fff_fffe { FIRST_HOST_PORT } else { port + 1 };
            if !self.connections.contains_key(&(port, guest_port)) {
                return port;
            }
        }
    }

    fn service_connection(&mut self, key: Key, events: EventSet) {
        let Some(connection) = self.connections.get_mut(&key) else { return };
        if events.contains(EventSet::OUT) && Self::write_to_host(connection, &self.metrics).is_err() {
            return self.reset(key, true, "writing to the host end failed");
        }
        if connection.forwarded.wrapping_sub(connection.forwarded_told) >= BUFFER_SIZE / 4 {
            self.push_control(key, op::CREDIT_UPDATE, 0);
        }
        let Some(connection) = self.connections.get_mut(&key) else { return };
        if events.contains(EventSet::IN) && connection.state == State::Established && connection.to_guest.is_empty() {
            let room = connection.peer_credit().min(MAX_PAYLOAD) as usize;
            if room > 0 {
                let mut buffer = vec![0u8; room];
                match connection.stream.read(&mut buffer) {
                    Ok(0) => {
                        // The host closed: tell the guest, then wait for its RST.
                        connection.state = State::Closing;
                        self.push_control(key, op::SHUTDOWN, SHUTDOWN_RECEIVE | SHUTDOWN_SEND);
                    }
                    Ok(count) => {
                        buffer.truncate(count);
                        connection.to_guest = buffer;
                    }
                    Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                    Err(_) => return self.reset(key, true, "reading the host end failed"),
                }
            }
        } else if events.contains(EventSet::HANG_UP)
            && connection.to_host.is_empty()
            && connection.state != State::Closing
        {
            connection.state = State::Closing;
            self.push_control(key, op::SHUTDOWN, SHUTDOWN_RECEIVE | SHUTDOWN_SEND);
        }
        self.refresh(key);
    }

    /// Whether [`next_packet`](Self::next_packet) has one.
    pub fn has_packet(&self) -> bool {
        !self.control.is_empty() || self.connections.values().any(|c| !c.to_guest.is_empty())
    }

    /// The next packet for the guest, if any: control packets first, then data.
    pub fn next_packet(&mut self) -> Option<OutPacket> {
        if let Some(packet) = self.control.pop_front() {
            self.trace(format_args!("host {}", packet.header));
            return Some(packet);
        }
        let key = *self.connections.iter().find(|(_, c)| !c.to_guest.is_empty())?.0;
        let connection = self.connections.get_mut(&key)?;
        let payload = std::mem::take(&mut connection.to_guest);
        connection.sent = connection.sent.wrapping_add(payload.len() as u32);
        connection.forwarded_told = connection.forwarded;
        let forwarded = connection.forwarded;
        self.metrics.bytes_to_guest.fetch_add(payload.len() as u64, Ordering::Relaxed);
        let header = self.header(key, op::RW, payload.len() as u32, forwarded);
        self.trace(format_args!("host {header}"));
        self.refresh(key);
        Some(OutPacket { header, payload })
    }

    /// Puts back a packet the guest had no room for. Its connection stops reading its
    /// host socket again until the packet is delivered ([`next_packet`](Self::next_packet)
    /// started reading it).
    pub fn unread_packet(&mut self, packet: OutPacket) {
        self.trace(format_args!("held back, no room: {}", packet.header));
        if packet.header.op == op::RW {
            let key = (packet.header.src_port, packet.header.dst_port);
            if let Some(connection) = self.connections.get_mut(&key) {
                connection.sent = connection.sent.wrapping_sub(packet.payload.len() as u32);
                connection.to_guest = packet.payload;
                self.refresh(key);
                return;
            }
        }
        self.control.push_front(packet);
    }

    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

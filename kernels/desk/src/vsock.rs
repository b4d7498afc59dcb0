//! virtio-vsock driver: stream connections the host opens to our listening port.
//!
//! RX buffers are posted ahead and polled on each wake (the device interrupt wakes the
//! CPU); TX packets go one at a time. Credit follows the spec: we never send the host more
//! than it advertised room for, and tell it how much we consumed.
//!
//! The event queue carries transport resets (the VMM posts one after a restore: the
//! host ends of every connection are gone and the CID may be new). A reset closes every
//! connection and re-reads the CID; listening goes on, so the host can connect again.

use alloc::vec::Vec;

use crate::virtio::{
    drain_used, empty_queue, Buffer, MmioDevice, SplitQueue, VirtioError, Virtqueue, DESC_F_WRITE, QUEUE_SIZE,
};
use crate::{phys, println, GuestCell};

const HEADER_SIZE: usize = 44;
const MAX_PAYLOAD: usize = 64 * 1024;
const RX_BUFFER_SIZE: usize = HEADER_SIZE + MAX_PAYLOAD;
const HOST_CID: u64 = 2;
const EVENT_QUEUE_INDEX: u32 = 2;
const TYPE_STREAM: u16 = 1;
/// What we let the host have in flight per connection.
const BUFFER_ALLOC: u32 = 1024 * 1024;
pub const MAX_CONNECTIONS: usize = 8;
/// Packets submitted per TX doorbell (two descriptors each).
const TX_BATCH: usize = QUEUE_SIZE as usize / 2;

mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

static RX_QUEUE: GuestCell<SplitQueue> = GuestCell::new(empty_queue());
static TX_QUEUE: GuestCell<SplitQueue> = GuestCell::new(empty_queue());
static EVENT_QUEUE: GuestCell<SplitQueue> = GuestCell::new(empty_queue());
/// `struct virtio_vsock_event { le32 id }`.
const EVENT_SIZE: usize = 4;
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
const EVENT_TRANSPORT_RESET: u32 = 0;
/// One buffer per event descriptor, so whatever id the device returns in the used ring
/// names a buffer we own.
static EVENT_BUFFERS: GuestCell<[[u8; EVENT_SIZE]; QUEUE_SIZE as usize]> =
    GuestCell::new([[0; EVENT_SIZE]; QUEUE_SIZE as usize]);

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    kind: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

/// One established stream.
pub struct Connection {
    pub local_port: u32,
    pub host_port: u32,
    /// Bytes received and not yet taken by the agent.
    pub inbox: Vec<u8>,
    sent: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    consumed: u32,
    consumed_told: u32,
}

impl Connection {
    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.sent.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// What happened on a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum VsockEvent {
    Connected(usize),
    Data(usize),
    Closed(usize),
}

#[allow(dead_code)] // fields are read through Debug in error lines
#[derive(Debug, Clone, Copy)]
pub enum VsockError {
    Virtio(VirtioError),
    OutOfMemory,
    NotConnected,
    NoCredit,
}

impl From<VirtioError> for VsockError {
    fn from(err: VirtioError) -> Self {
        VsockError::Virtio(err)
    }
}

pub struct Vsock {
    device: MmioDevice,
    tx: Virtqueue,
    _event: Virtqueue,
    rx_buffers: [u64; QUEUE_SIZE as usize],
    rx_seen: u16,
    event_seen: u16,
    pub cid: u64,
    listen_port: u32,
    pub connections: [Option<Connection>; MAX_CONNECTIONS],
    events: Vec<VsockEvent>,
    timeout_cycles: u64,
}

impl Vsock {
    pub fn new(base: u64, listen_port: u32, timeout_cycles: u64) -> Result<Vsock, VsockError> {
        let device = MmioDevice::negotiate(base, carrel_firmware::virtio_id::VSOCK, 0)?;
        let cid = read_cid(&device);
        let _rx = device.setup_queue(0, &RX_QUEUE)?;
        let tx = device.setup_queue(1, &TX_QUEUE)?;
        let event = device.setup_queue(EVENT_QUEUE_INDEX, &EVENT_QUEUE)?;
        let mut rx_buffers = [0u64; QUEUE_SIZE as usize];
        for buffer in rx_buffers.iter_mut() {
            *buffer = phys::allocate(RX_BUFFER_SIZE as u64).ok_or(VsockError::OutOfMemory)?;
        }
        post_all_events();
        let mut vsock = Vsock {
            device,
            tx,
            _event: event,
            rx_buffers,
            rx_seen: 0,
            event_seen: 0,
            cid,
            listen_port,
            connections: Default::default(),
            events: Vec::new(),
            timeout_cycles,
        };
        vsock.post_all_rx();
        vsock.device.activate();
        Ok(vsock)
    }

    /// Posts every RX buffer, descriptor i holding buffer i.
    fn post_all_rx(&mut self) {
        let ring = RX_QUEUE.get();
        for (index, buffer) in self.rx_buffers.iter().enumerate() {
            ring.descriptors[index] =
                crate::virtio::Descriptor { addr: *buffer, len: RX_BUFFER_SIZE as u32, flags: DESC_F_WRITE, next: 0 };
            ring.avail_ring[index] = index as u16;
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        ring.avail_idx = QUEUE_SIZE;
    }

    /// Handles every event and packet the device returned; what happened to connections
    /// is appended to `events`.
    pub fn poll(&mut self, events: &mut Vec<VsockEvent>) {
        events.append(&mut self.events);
        // Events first: packets that follow a reset belong to connections opened after it.
        self.process_event_queue();
        let buffers = self.rx_buffers;
        let mut seen = self.rx_seen;
        let reposted = drain_used(&RX_QUEUE, &mut seen, |slot, len| {
            let len = len.min(RX_BUFFER_SIZE);
            if len >= HEADER_SIZE {
                // SAFETY: the device wrote `len` bytes into our buffer of RX_BUFFER_SIZE.
                let bytes = unsafe { core::slice::from_raw_parts(buffers[slot] as *const u8, len) };
                // SAFETY: HEADER_SIZE bytes are there; Header is packed plain integers.
                let header = unsafe { core::ptr::read_unaligned(bytes.as_ptr() as *const Header) };
                self.handle_packet(&header, &bytes[HEADER_SIZE..]);
            }
        });
        self.rx_seen = seen;
        if reposted {
            // One doorbell for the whole batch.
            self.device.notify(0);
        }
        events.append(&mut self.events);
    }

    /// Acts on the events the device returned and gives their buffers back.
    fn process_event_queue(&mut self) {
        let mut seen = self.event_seen;
        let mut reset = false;
        let reposted = drain_used(&EVENT_QUEUE, &mut seen, |slot, len| {
            if len < EVENT_SIZE {
                return;
            }
            // SAFETY: `slot` is below QUEUE_SIZE (drain_used reduces the device's id) and
            // names our own buffer, which the device finished writing before it published
            // the used entry; read volatile because the device wrote it, not the program.
            let id = unsafe { core::ptr::read_volatile(&EVENT_BUFFERS.get()[slot]) };
            reset |= u32::from_le_bytes(id) == EVENT_TRANSPORT_RESET;
        });
        self.event_seen = seen;
        if reset {
            self.reset_transport();
        }
        if reposted {
            self.device.notify(EVENT_QUEUE_INDEX as u16);
        }
    }

    /// The host dropped every connection (virtio 1.2, 5.10.6.6): forget them without a
    /// reply, since their host ends no longer exist, and learn the CID again.
    fn reset_transport(&mut self) {
        for (slot, connection) in self.connections.iter_mut().enumerate() {
            if connection.take().is_some() {
                self.events.push(VsockEvent::Closed(slot));
            }
        }
        self.cid = read_cid(&self.device);
        println!("desk: vsock transport reset (cid {})", self.cid);
    }

    fn find(&self, local_port: u32, host_port: u32) -> Option<usize> {
        self.connections
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.local_port == local_port && c.host_port == host_port))
    }

    fn handle_packet(&mut self, header: &Header, payload: &[u8]) {
        let (src_cid, dst_cid, kind, op) = (header.src_cid, header.dst_cid, header.kind, header.op);
        if src_cid != HOST_CID || dst_cid != self.cid || kind != TYPE_STREAM {
            return;
        }
        let (local, host) = (header.dst_port, header.src_port);
        let slot = self.find(local, host);
        if op == op::REQUEST {
            let free = self.connections.iter().position(Option::is_none);
            match (slot, free) {
                (None, Some(free)) if local == self.listen_port => {
                    self.connections[free] = Some(Connection {
                        local_port: local,
                        host_port: host,
                        inbox: Vec::new(),
                        sent: 0,
                        peer_buf_alloc: header.buf_alloc,
                        peer_fwd_cnt: header.fwd_cnt,
                        consumed: 0,
                        consumed_told: 0,
                    });
                    let _ = self.send_control(free, op::RESPONSE, 0);
                    self.events.push(VsockEvent::Connected(free));
                }
                _ => self.send_rst(local, host),
            }
            return;
        }
        let Some(slot) = slot else {
            if op != op::RST {
                self.send_rst(local, host);
            }
            return;
        };
        if let Some(connection) = self.connections[slot].as_mut() {
            connection.peer_buf_alloc = header.buf_alloc;
            connection.peer_fwd_cnt = header.fwd_cnt;
        }
        match op {
            op::RW => {
                let len = (header.len as usize).min(payload.len());
                if let Some(connection) = self.connections[slot].as_mut() {
                    connection.inbox.extend_from_slice(&payload[..len]);
                }
                self.events.push(VsockEvent::Data(slot));
            }
            op::SHUTDOWN | op::RST => {
                if op == op::SHUTDOWN {
                    let _ = self.send_control(slot, op::RST, 0);
                }
                self.connections[slot] = None;
                self.events.push(VsockEvent::Closed(slot));
            }
            op::CREDIT_REQUEST => {
                let _ = self.send_control(slot, op::CREDIT_UPDATE, 0);
            }
            _ => {}
        }
    }

    fn header_for(&self, slot: usize, op: u16, len: u32) -> Option<Header> {
        let connection = self.connections[slot].as_ref()?;
        Some(Header {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: connection.local_port,
            dst_port: connection.host_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUFFER_ALLOC,
            fwd_cnt: connection.consumed,
        })
    }

    fn transmit(&mut self, header: &Header, payload: &[u8]) -> Result<(), VsockError> {
        let mut buffers = [Buffer::readable(header), Buffer { addr: 0, len: 0, writable: false }];
        let count = if payload.is_empty() {
            1
        } else {
            buffers[1] = Buffer { addr: payload.as_ptr() as u64, len: payload.len() as u32, writable: false };
            2
        };
        self.tx.submit_and_wait(&self.device, &buffers[..count], self.timeout_cycles)?;
        Ok(())
    }

    fn send_control(&mut self, slot: usize, op: u16, flags: u32) -> Result<(), VsockError> {
        let mut header = self.header_for(slot, op, 0).ok_or(VsockError::NotConnected)?;
        header.flags = flags;
        if let Some(connection) = self.connections[slot].as_mut() {
            connection.consumed_told = connection.consumed;
        }
        self.transmit(&header, &[])
    }

    fn send_rst(&mut self, local: u32, host: u32) {
        let header = Header {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: local,
            dst_port: host,
            kind: TYPE_STREAM,
            op: op::RST,
            ..Default::default()
        };
        let _ = self.transmit(&header, &[]);
    }

    /// Sends `bytes` on connection `slot`, waiting for host credit when needed. Up to
    /// [`TX_BATCH`] packets go out per doorbell, so a large write costs one round trip
    /// per batch, not per packet.
    pub fn send(&mut self, slot: usize, mut bytes: &[u8]) -> Result<(), VsockError> {
        while !bytes.is_empty() {
            let mut credit = self.connections[slot].as_ref().ok_or(VsockError::NotConnected)?.credit() as usize;
            if credit == 0 {
                self.wait_for_credit(slot)?;
                continue;
            }
            let mut headers = [Header::default(); TX_BATCH];
            let mut payloads: [&[u8]; TX_BATCH] = [&[]; TX_BATCH];
            let mut count = 0;
            while count < TX_BATCH && !bytes.is_empty() && credit > 0 {
                let size = bytes.len().min(MAX_PAYLOAD).min(credit);
                headers[count] = self.header_for(slot, op::RW, size as u32).ok_or(VsockError::NotConnected)?;
                payloads[count] = &bytes[..size];
                bytes = &bytes[size..];
                credit -= size;
                count += 1;
            }
            let chains: [[Buffer; 2]; TX_BATCH] = core::array::from_fn(|index| {
                [
                    Buffer::readable(&headers[index]),
                    Buffer {
                        addr: payloads[index].as_ptr() as u64,
                        len: payloads[index].len() as u32,
                        writable: false,
                    },
                ]
            });
            let chain_refs: [&[Buffer]; TX_BATCH] = core::array::from_fn(|index| &chains[index][..]);
            self.tx.submit_batch_and_wait(&self.device, &chain_refs[..count], self.timeout_cycles)?;
            let sent: usize = payloads[..count].iter().map(|payload| payload.len()).sum();
            if let Some(connection) = self.connections[slot].as_mut() {
                connection.sent = connection.sent.wrapping_add(sent as u32);
                connection.consumed_told = connection.consumed;
            }
        }
        Ok(())
    }

    /// Asks the host for credit and handles incoming packets until some arrives.
    fn wait_for_credit(&mut self, slot: usize) -> Result<(), VsockError> {
        self.send_control(slot, op::CREDIT_REQUEST, 0)?;
        let start = crate::rdtsc();
        loop {
            let mut events = Vec::new();
            self.poll(&mut events);
            self.events.extend(events);
            match self.connections[slot].as_ref() {
                None => return Err(VsockError::NotConnected),
                Some(connection) if connection.credit() > 0 => return Ok(()),
                Some(_) => {}
            }
            if crate::rdtsc().wrapping_sub(start) > self.timeout_cycles {
                return Err(VsockError::NoCredit);
            }
            core::hint::spin_loop();
        }
    }

    /// Takes the bytes received on `slot` and credits them back to the host.
    pub fn take_inbox(&mut self, slot: usize) -> Vec<u8> {
        let Some(connection) = self.connections[slot].as_mut() else { return Vec::new() };
        let bytes = core::mem::take(&mut connection.inbox);
        connection.consumed = connection.consumed.wrapping_add(bytes.len() as u32);
        if connection.consumed.wrapping_sub(connection.consumed_told) >= BUFFER_ALLOC / 4 {
            let _ = self.send_control(slot, op::CREDIT_UPDATE, 0);
        }
        bytes
    }
}

/// The guest CID from the device's configuration space (le64 at offset 0).
fn read_cid(device: &MmioDevice) -> u64 {
    u64::from(device.read_config(0)) | (u64::from(device.read_config(4)) << 32)
}

/// Posts every event buffer, descriptor i holding buffer i.
fn post_all_events() {
    let ring = EVENT_QUEUE.get();
    let buffers = EVENT_BUFFERS.get();
    for (index, buffer) in buffers.iter_mut().enumerate() {
        ring.descriptors[index] = crate::virtio::Descriptor {
            addr: buffer.as_mut_ptr() as u64,
            len: EVENT_SIZE as u32,
            flags: DESC_F_WRITE,
            next: 0,
        };
        ring.avail_ring[index] = index as u16;
    }
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    ring.avail_idx = QUEUE_SIZE;
}

//! Moving packets between the virtqueues and the muxer: no epoll, no KVM.
//!
//! TX chains carry a header and the payload in readable buffers; RX chains are writable
//! buffers the device fills with a header and payload. Malformed chains are completed
//! and counted, never trusted.

use std::io::{Read, Write};
use std::sync::atomic::Ordering;

use crate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::ByteValued;

use super::muxer::Muxer;
use super::packet::{PacketHeader, HEADER_SIZE, MAX_PAYLOAD};

/// Takes every packet the guest queued on the TX queue. Returns whether the used ring
/// needs an interrupt.
pub fn process_tx_queue(queue: &mut Queue, memory: &GuestMemoryMmap, muxer: &mut Muxer) -> bool {
    let mut used_any = false;
    while let Some(chain) = queue.pop_descriptor_chain(memory) {
        let head = chain.head_index();
        match chain.reader(memory) {
            Ok(mut reader) => {
                let mut header_bytes = [0u8; HEADER_SIZE];
                let header =
                    reader.read_exact(&mut header_bytes).ok().and_then(|()| PacketHeader::from_bytes(&header_bytes));
                match header {
                    Some(header) => {
                        let len = header.len.min(MAX_PAYLOAD) as usize;
                        let mut payload = vec![0u8; len.min(reader.available_bytes())];
                        if reader.read_exact(&mut payload).is_ok() && payload.len() == header.len as usize {
                            muxer.handle_guest_packet(&header, &payload);
                        } else if header.len as usize > MAX_PAYLOAD as usize || payload.len() != header.len as usize {
                            // A header that claims more than the chain holds: refuse it.
                            let mut refused = header;
                            refused.len = u32::MAX;
                            muxer.handle_guest_packet(&refused, &[]);
                        }
                    }
                    None => {
                        muxer.metrics.malformed_packets.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(_) => {
                muxer.metrics.malformed_packets.fetch_add(1, Ordering::Relaxed);
            }
        }
        if queue.add_used(memory, head, 0).is_err() {
            break;
        }
        used_any = true;
    }
    used_any && queue.needs_notification(memory).unwrap_or(true)
}

/// Fills the guest's RX buffers with the muxer's packets. Returns whether the used ring
/// needs an interrupt.
///
/// A packet is taken from the muxer only once a buffer is there for it: with none posted
/// the muxer is not touched at all, so the host sockets it stops reading stay unread until
/// the guest posts buffers again. With no packet waiting, guest memory is not read either
/// (after a restore it may not be loaded yet).
pub fn process_rx_queue(queue: &mut Queue, memory: &GuestMemoryMmap, muxer: &mut Muxer) -> bool {
    if !muxer.has_packet() {
        return false;
    }
    let mut used_any = false;
    while let Some(chain) = queue.pop_descriptor_chain(memory) {
        let Some(packet) = muxer.next_packet() else {
            // Nothing more to deliver: the buffer stays the guest's, for the next packet.
            queue.go_to_previous_position();
            break;
        };
        let head = chain.head_index();
        let written = match chain.writer(memory) {
            Ok(mut writer) if writer.available_bytes() >= HEADER_SIZE + packet.payload.len() => {
                let header_ok = writer.write_all(packet.header.as_slice()).is_ok();
                if header_ok && writer.write_all(&packet.payload).is_ok() {
                    (HEADER_SIZE + packet.payload.len()) as u32
                } else {
                    0
                }
            }
            // A buffer too small for the packet: the guest loses nothing, the packet waits
            // for a bigger buffer... but this one must be returned, empty.
            Ok(_) | Err(_) => {
                muxer.metrics.malformed_packets.fetch_add(1, Ordering::Relaxed);
                muxer.unread_packet(packet);
                if queue.add_used(memory, head, 0).is_err() {
                    break;
                }
                used_any = true;
                break;
            }
        };
        if queue.add_used(memory, head, written).is_err() {
            break;
        }
        used_any = true;
    }
    used_any && queue.needs_notification(memory).unwrap_or(true)
}

/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: the guest must drop every connection and read its
/// CID again (virtio 1.2, 5.10.6.6).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Puts a transport reset event in the driver's first event buffer. Returns `None` when
/// the driver has posted no buffer yet (try again when it does), else whether the used
/// ring needs an interrupt; a buffer too small or read-only is completed empty.
pub fn post_transport_reset(queue: &mut Queue, memory: &GuestMemoryMmap) -> Option<bool> {
    let chain = queue.pop_descriptor_chain(memory)?;
    let head = chain.head_index();
    let written = match chain.writer(memory) {
        Ok(mut writer) if writer.available_bytes() >= 4 => {
            writer.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).map_or(0, |()| 4)
        }
        _ => 0,
    };
    queue.add_used(memory, head, written).ok()?;
    Some(queue.needs_notification(memory).unwrap_or(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::packet::{op, TYPE_STREAM};
    use crate::devices::virtio::vsock::HOST_CID;
    use std::io::BufRead;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Duration;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const GUEST_CID: u64 = 3;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    fn socket_path(name: &str) -> std::path::PathBuf {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("carrel-vsock-{}-{n}-{name}.sock", std::process::id()))
    }

    fn guest_header(op: u16, src_port: u32, dst_port: u32, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    /// Puts one guest packet on a fresh TX queue and processes it.
    fn send_from_guest(memory: &GuestMemoryMmap, muxer: &mut Muxer, header: PacketHeader, payload: &[u8]) {
        let mock = MockSplitQueue::new(memory, 16);
        memory.write_slice(header.as_slice(), GuestAddress(0x10_0000)).unwrap();
        memory.write_slice(payload, GuestAddress(0x20_0000)).unwrap();
        let descriptors = if payload.is_empty() {
            vec![RawDescriptor::from(SplitDescriptor::new(0x10_0000, HEADER_SIZE as u32, 0, 0))]
        } else {
            vec![
                RawDescriptor::from(SplitDescriptor::new(0x10_0000, HEADER_SIZE as u32, NEXT, 1)),
                RawDescriptor::from(SplitDescriptor::new(0x20_0000, payload.len() as u32, 0, 0)),
            ]
        };
        mock.add_desc_chains(&descriptors, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        process_tx_queue(&mut queue, memory, muxer);
    }

    /// Offers `count` RX buffers of `size` bytes and returns the packets delivered into them.
    fn receive_in_guest(
        memory: &GuestMemoryMmap,
        muxer: &mut Muxer,
        count: u16,
        size: u32,
    ) -> Vec<(PacketHeader, Vec<u8>)> {
        let mock = MockSplitQueue::new(memory, 16);
        let descriptors: Vec<RawDescriptor> = (0..count)
            .map(|index| {
                RawDescriptor::from(SplitDescriptor::new(0x40_0000 + u64::from(index) * 0x2_0000, size, WRITE, 0))
            })
            .collect();
        mock.add_desc_chains(&descriptors, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        process_rx_queue(&mut queue, memory, muxer);
        let used = mock.used().idx().load();
        (0..used)
            .map(|index| mock.used().ring().ref_at(index as usize).unwrap().load())
            .filter(|element| element.len() > 0)
            .map(|element| {
                let addr = 0x40_0000 + u64::from(element.id()) * 0x2_0000;
                let mut bytes = vec![0u8; element.len() as usize];
                memory.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
                let header = PacketHeader::from_bytes(&bytes).unwrap();
                (header, bytes[HEADER_SIZE..].to_vec())
            })
            .collect()
    }

    fn wait_host_events(muxer: &mut Muxer) {
        for _ in 0..200 {
            if muxer.process_host_events() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A host end that asked for guest port 1024, as far as the guest's receiving the
    /// request: the muxer, the host's stream, and the request.
    fn host_connects(memory: &GuestMemoryMmap, name: &str) -> (Muxer, UnixStream, PacketHeader) {
        let path = socket_path(name);
        let mut muxer = Muxer::new(GUEST_CID, &path).unwrap();
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        wait_host_events(&mut muxer);
        let packets = receive_in_guest(memory, &mut muxer, 4, 4096);
        assert_eq!(packets.len(), 1);
        (muxer, host, packets[0].0)
    }

    /// The guest accepts `request`; the host end reads its `OK <port>` line.
    fn guest_accepts(memory: &GuestMemoryMmap, muxer: &mut Muxer, host: &UnixStream, request: &PacketHeader) {
        let host_port = request.src_port;
        send_from_guest(memory, muxer, guest_header(op::RESPONSE, 1024, host_port, 0), &[]);
        let mut line = String::new();
        std::io::BufReader::new(host.try_clone().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line, format!("OK {host_port}\n"));
    }

    #[test]
    fn host_connect_handshake_reaches_guest_as_request_and_ok_comes_back() {
        let memory = memory();
        let (mut muxer, mut host, request) = host_connects(&memory, "host");
        assert_eq!(({ request.op }, { request.dst_port }, { request.dst_cid }), (op::REQUEST, 1024, GUEST_CID));
        guest_accepts(&memory, &mut muxer, &host, &request);
        let host_port = request.src_port;

        // Data both ways.
        send_from_guest(&memory, &mut muxer, guest_header(op::RW, 1024, host_port, 5), b"hello");
        let mut received = [0u8; 5];
        host.read_exact(&mut received).unwrap();
        assert_eq!(&received, b"hello");
        host.write_all(b"world").unwrap();
        wait_host_events(&mut muxer);
        let packets = receive_in_guest(&memory, &mut muxer, 4, 4096);
        assert_eq!(packets.len(), 1);
        assert_eq!({ packets[0].0.op }, op::RW);
        assert_eq!(packets[0].1, b"world");
        assert_eq!(muxer.connection_count(), 1);
    }

    /// Whether the muxer's epoll has anything ready: what wakes the VMM's event loop.
    fn epoll_ready(muxer: &Muxer) -> bool {
        let mut poll = libc::pollfd { fd: muxer.epoll_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, a zero timeout.
        unsafe { libc::poll(&mut poll, 1, 0) == 1 }
    }

    /// A guest that posts no RX buffers (or one too small) while its host end keeps
    /// writing must not wake the event loop again and again: the connection stops reading
    /// its socket until a packet is delivered. (Before, each wake took the packet, found
    /// no buffer, put it back, and left the socket watched: the VMM spun a core.)
    #[test]
    fn a_guest_without_rx_buffers_leaves_the_event_loop_asleep() {
        let memory = memory();
        let (mut muxer, mut host, request) = host_connects(&memory, "full");
        guest_accepts(&memory, &mut muxer, &host, &request);

        host.write_all(b"first").unwrap();
        wait_host_events(&mut muxer);
        // More bytes wait in the socket behind the packet the muxer holds.
        host.write_all(b"second").unwrap();
        for buffers in [0, 1] {
            // No buffer at all, then one too small for a header.
            let mock = MockSplitQueue::new(&memory, 16);
            let descriptors = [RawDescriptor::from(SplitDescriptor::new(0x40_0000, 8, WRITE, 0))];
            mock.add_desc_chains(&descriptors[..buffers], 0).unwrap();
            let mut queue: Queue = mock.create_queue().unwrap();
            process_rx_queue(&mut queue, &memory, &mut muxer);
            assert!(!epoll_ready(&muxer), "the event loop would wake at once ({buffers} buffers)");
        }
        // Once buffers come, the held packet goes first, and reading resumes.
        let data = |packets: Vec<(PacketHeader, Vec<u8>)>| -> Vec<Vec<u8>> {
            packets.into_iter().filter(|(header, _)| { header.op } == op::RW).map(|(_, payload)| payload).collect()
        };
        assert_eq!(data(receive_in_guest(&memory, &mut muxer, 4, 4096)), [b"first".to_vec()]);
        wait_host_events(&mut muxer);
        assert_eq!(data(receive_in_guest(&memory, &mut muxer, 4, 4096)), [b"second".to_vec()]);
    }

    #[test]
    fn bad_handshake_line_is_answered_and_closed() {
        let path = socket_path("badline");
        let mut muxer = Muxer::new(GUEST_CID, &path).unwrap();
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"HELLO\n").unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for _ in 0..50 {
            muxer.process_host_events();
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut answer = String::new();
        host.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("ERROR"), "{answer}");
        assert_eq!(muxer.connection_count(), 0);
    }

    #[test]
    fn guest_connect_to_listening_host_port_is_bridged() {
        let memory = memory();
        let path = socket_path("guest");
        let listener = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
        let mut muxer = Muxer::new(GUEST_CID, &path).unwrap();
        send_from_guest(&memory, &mut muxer, guest_header(op::REQUEST, 2000, 5000, 0), &[]);
        let packets = receive_in_guest(&memory, &mut muxer, 2, 4096);
        assert_eq!({ packets[0].0.op }, op::RESPONSE);
        let (mut accepted, _) = listener.accept().unwrap();
        send_from_guest(&memory, &mut muxer, guest_header(op::RW, 2000, 5000, 3), b"abc");
        let mut bytes = [0u8; 3];
        accepted.read_exact(&mut bytes).unwrap();
        assert_eq!(&bytes, b"abc");
        std::fs::remove_file(format!("{}_5000", path.display())).unwrap();
    }

    #[test]
    fn guest_connect_to_absent_host_port_is_reset() {
        let memory = memory();
        let mut muxer = Muxer::new(GUEST_CID, &socket_path("absent")).unwrap();
        send_from_guest(&memory, &mut muxer, guest_header(op::REQUEST, 2000, 6000, 0), &[]);
        let packets = receive_in_guest(&memory, &mut muxer, 2, 4096);
        assert_eq!({ packets[0].0.op }, op::RST);
        assert_eq!(muxer.connection_count(), 0);
    }

    #[test]
    fn data_for_unknown_connection_gets_rst() {
        let memory = memory();
        let mut muxer = Muxer::new(GUEST_CID, &socket_path("unknown")).unwrap();
        send_from_guest(&memory, &mut muxer, guest_header(op::RW, 1, 2, 4), b"data");
        let packets = receive_in_guest(&memory, &mut muxer, 2, 4096);
        assert_eq!({ packets[0].0.op }, op::RST);
    }

    #[test]
    fn malformed_headers_are_counted_and_never_panic() {
        let memory = memory();
        let mut muxer = Muxer::new(GUEST_CID, &socket_path("malformed")).unwrap();
        let mut spoofed = guest_header(op::REQUEST, 1, 2, 0);
        spoofed.src_cid = 99;
        send_from_guest(&memory, &mut muxer, spoofed, &[]);
        send_from_guest(&memory, &mut muxer, guest_header(77, 1, 2, 0), &[]);
        // A header claiming a payload larger than the chain carries.
        send_from_guest(&memory, &mut muxer, guest_header(op::RW, 1, 2, 60_000), b"short");
        // A chain shorter than a header.
        let mock = MockSplitQueue::new(&memory, 16);
        mock.add_desc_chains(&[RawDescriptor::from(SplitDescriptor::new(0x10_0000, 10, 0, 0))], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        process_tx_queue(&mut queue, &memory, &mut muxer);
        // A chain pointing outside guest memory.
        let mock = MockSplitQueue::new(&memory, 16);
        mock.add_desc_chains(&[RawDescriptor::from(SplitDescriptor::new(0x4000_0000, 44, 0, 0))], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        process_tx_queue(&mut queue, &memory, &mut muxer);
        assert!(muxer.metrics.malformed_packets.load(Ordering::Relaxed) >= 4);
        assert_eq!(muxer.connection_count(), 0);
    }

    #[test]
    fn guest_exceeding_its_credit_is_reset() {
        let memory = memory();
        let path = socket_path("credit");
        let listener = UnixListener::bind(format!("{}_7000", path.display())).unwrap();
        let mut muxer = Muxer::new(GUEST_CID, &path).unwrap();
        send_from_guest(&memory, &mut muxer, guest_header(op::REQUEST, 2000, 7000, 0), &[]);
        let (_never_read, _) = listener.accept().unwrap();
        // The host never reads: the guest fills our buffer, then overruns it.
        let chunk = vec![7u8; 60_000];
        for _ in 0..40 {
            send_from_guest(&memory, &mut muxer, guest_header(op::RW, 2000, 7000, chunk.len() as u32), &chunk);
        }
        assert_eq!(muxer.metrics.credit_violations.load(Ordering::Relaxed), 1);
        assert_eq!(muxer.connection_count(), 0);
        std::fs::remove_file(format!("{}_7000", path.display())).unwrap();
    }

    #[test]
    fn rx_buffer_too_small_keeps_the_packet_for_later() {
        let memory = memory();
        let path = socket_path("small");
        let mut muxer = Muxer::new(GUEST_CID, &path).unwrap();
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 9\n").unwrap();
        wait_host_events(&mut muxer);
        assert!(receive_in_guest(&memory, &mut muxer, 1, 8).is_empty());
        assert_eq!(muxer.metrics.malformed_packets.load(Ordering::Relaxed), 1);
        let packets = receive_in_guest(&memory, &mut muxer, 1, 4096);
        assert_eq!({ packets[0].0.op }, op::REQUEST);
    }

    /// xorshift64: deterministic pseudo-random numbers for the hostile-input test.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn random_guest_packets_never_panic_and_stay_bounded() {
        let memory = memory();
        let path = socket_path("random");
        let _listener = UnixListener::bind(format!("{}_5", path.display())).unwrap();
        let mut muxer = Muxer::new(GUEST_CID, &path).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..3000 {
            let r = next(&mut state);
            // Mostly plausible headers (so connections open and carry data), some garbage.
            let plausible = r % 4 != 0;
            let mut header = guest_header((r >> 8) as u16 % 9, (r >> 16) as u32 % 4, (r >> 24) as u32 % 8, 0);
            if !plausible {
                header.src_cid = next(&mut state) % 5;
                header.dst_cid = next(&mut state) % 5;
                header.kind = (next(&mut state) % 3) as u16;
            }
            header.buf_alloc = (next(&mut state) % (1 << 20)) as u32;
            header.fwd_cnt = next(&mut state) as u32;
            header.flags = (next(&mut state) % 4) as u32;
            let payload_len = (next(&mut state) % 2048) as usize;
            let payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
            header.len = if next(&mut state) % 8 == 0 { next(&mut state) as u32 } else { payload_len as u32 };
            send_from_guest(&memory, &mut muxer, header, &payload);
            if r % 16 == 0 {
                receive_in_guest(&memory, &mut muxer, 8, 4096);
                muxer.process_host_events();
            }
        }
        assert!(muxer.metrics.malformed_packets.load(Ordering::Relaxed) > 0);
        assert!(muxer.connection_count() <= 32, "connections stay bounded by the ports used");
        std::fs::remove_file(format!("{}_5", path.display())).unwrap();
    }
}

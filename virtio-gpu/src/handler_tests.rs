//! Every command and its malformed cases, sent through a mock control or cursor queue.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::capture::{CaptureFormat, CaptureOptions};
use crate::device::{GpuConfig, CONFIG_SPACE_SIZE, EVENT_DISPLAY};
use crate::protocol::encode::{attach_backing, fenced_header, header, transfer, words};
use crate::protocol::*;
use crate::screen::ScreenError;
use crate::testing::*;

const B8G8R8X8: u32 = 2;
const B8G8R8A8: u32 = 1;

fn counter(value: &std::sync::atomic::AtomicU64) -> u64 {
    value.load(Ordering::Relaxed)
}

fn raw_pixel(harness: &Harness, x: u32, y: u32) -> [u8; 4] {
    let capture = harness.gpu.screen().capture(&CaptureOptions::default()).unwrap();
    let offset = y as usize * capture.stride + x as usize * 4;
    capture.bytes[offset..offset + 4].try_into().unwrap()
}

// GET_DISPLAY_INFO and GET_EDID

#[test]
fn get_display_info_reports_configured_size() {
    let memory = memfd_memory(&[(0, MEMORY_SIZE)]).0;
    let mut harness = Harness::with_config(memory, GpuConfig::new(1920, 1080).unwrap());
    let reply = harness.send(&header(CMD_GET_DISPLAY_INFO));
    assert_eq!(reply.response_type(), RESP_OK_DISPLAY_INFO);
    assert_eq!(reply.used_len, 408);
    let field = |i: usize| u32::from_le_bytes(reply.bytes[24 + i * 4..28 + i * 4].try_into().unwrap());
    assert_eq!((field(2), field(3), field(4)), (1920, 1080, 1));
    assert_eq!(field(6 + 4), 0, "second scanout disabled");
    assert!(reply.needs_interrupt);
}

#[test]
fn get_edid_returns_checksummed_block() {
    let mut harness = Harness::new();
    let reply = harness.send(&words(CMD_GET_EDID, &[0, 0]));
    assert_eq!(reply.response_type(), RESP_OK_EDID);
    assert_eq!(reply.used_len as usize, HEADER_SIZE + 8 + EDID_BLOB_SIZE);
    assert_eq!(u32::from_le_bytes(reply.bytes[24..28].try_into().unwrap()), 128);
    let block = &reply.bytes[32..160];
    assert_eq!(block.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
}

#[test]
fn get_edid_for_bad_scanout_returns_invalid_scanout_id() {
    let mut harness = Harness::new();
    let reply = harness.send(&words(CMD_GET_EDID, &[1, 0]));
    assert_eq!(reply.response_type(), RESP_ERR_INVALID_SCANOUT_ID);
    assert_eq!(counter(&harness.gpu.metrics().errors_invalid_scanout_id), 1);
}

// RESOURCE_CREATE_2D and RESOURCE_UNREF

#[test]
fn create_2d_then_unref_frees_its_memory() {
    let mut harness = Harness::new();
    harness.create(1, B8G8R8X8, 64, 32);
    assert_eq!(harness.gpu.resource_bytes(), 64 * 32 * 4);
    harness.ok(&words(CMD_RESOURCE_UNREF, &[1, 0]));
    assert_eq!(harness.gpu.resource_bytes(), 0);
}

#[test]
fn create_2d_accepts_every_32_bit_format() {
    let mut harness = Harness::new();
    for (id, format) in [1u32, 2, 3, 4, 67, 68, 121, 134].into_iter().enumerate() {
        harness.create(id as u32 + 1, format, 8, 8);
    }
}

#[test]
fn create_2d_with_zero_id_returns_invalid_resource_id() {
    let mut harness = Harness::new();
    let reply = harness.send(&words(CMD_RESOURCE_CREATE_2D, &[0, B8G8R8X8, 8, 8]));
    assert_eq!(reply.response_type(), RESP_ERR_INVALID_RESOURCE_ID);
}

#[test]
fn create_2d_with_existing_id_returns_invalid_resource_id() {
    let mut harness = Harness::new();
    harness.create(5, B8G8R8X8, 8, 8);
    let reply = harness.send(&words(CMD_RESOURCE_CREATE_2D, &[5, B8G8R8X8, 8, 8]));
    assert_eq!(reply.response_type(), RESP_ERR_INVALID_RESOURCE_ID);
    assert_eq!(counter(&harness.gpu.metrics().errors_invalid_resource_id), 1);
}

#[test]
fn create_2d_with_unknown_format_returns_invalid_parameter() {
    let mut harness = Harness::new();
    let reply = harness.send(&words(CMD_RESOURCE_CREATE_2D, &[1, 999, 8, 8]));
    assert_eq!(reply.response_type(), RESP_ERR_INVALID_PARAMETER);
}

#[test]
fn create_2d_with_zero_or_absurd_size_returns_invalid_parameter() {
    let mut harness = Harness::new();
    for (width, height) in [(0, 8), (8, 0), (u32::MAX, u32::MAX), (16385, 1)] {
        let reply = harness.send(&words(CMD_RESOURCE_CREATE_2D, &[1, B8G8R8X8, width, height]));
        assert_eq!(reply.response_type(), RESP_ERR_INVALID_PARAMETER, "{width}x{height}");
    }
    assert_eq!(harness.gpu.resource_bytes(), 0);
}

#[test]
fn create_2d_past_memory_cap_returns_out_of_memory() {
    let mut harness = Harness::new();
    // 16384 x 4096 x 4 = 256 MiB: exactly the default cap.
    harness.create(1, B8G8R8X8, 16384, 4096);
    let reply = harness.send(&words(CMD_RESOURCE_CREATE_2D, &[2, B8G8R8X8, 1, 1]));
    assert_eq!(reply.response_type(), RESP_ERR_OUT_OF_MEMORY);
    assert_eq!(counter(&harness.gpu.metrics().errors_out_of_memory), 1);
    harness.ok(&words(CMD_RESOURCE_UNREF, &[1, 0]));
    harness.create(2, B8G8R8X8, 1, 1);
}

#[test]
fn create_2d_past_resource_count_cap_returns_out_of_memory() {
    let mut harness = Harness::new();
    for id in 1..=crate::device::MAX_RESOURCES as u32 {
        assert_eq!(
            harness.gpu.execute(&Command::ResourceCreate2d { resource_id: id, format: 2, width: 1, height: 1 }),
            Response::OkNoData
        );
    }
    let reply = harness.send(&words(CMD_RESOURCE_CREATE_2D, &[u32::MAX, B8G8R8X8, 1, 1]));
    assert_eq!(reply.response_type(), RESP_ERR_OUT_OF_MEMORY);
}

#[test]
fn unref_unknown_resource_returns_invalid_resource_id() {
    let mut harness = Harness::new();
    assert_eq!(harness.send(&words(CMD_RESOURCE_UNREF, &[77, 0])).response_type(), RESP_ERR_INVALID_RESOURCE_ID);
}

#[test]
fn unref_scanout_resource_disables_scanout() {
    let mut harness = Harness::new();
    harness.show(1, 16, 16, PIXELS_ADDR);
    harness.ok(&words(CMD_RESOURCE_UNREF, &[1, 0]));
    let error = harness.gpu.screen().capture(&CaptureOptions::default()).unwrap_err();
    assert!(matches!(error, ScreenError::FindScanout), "{error}");
}

// RESOURCE_ATTACH_BACKING and RESOURCE_DETACH_BACKING

#[test]
fn attach_backing_in_memfd_ram_is_viewed_in_place() {
    let mut harness = Harness::new();
    harness.show(1, 64, 32, PIXELS_ADDR);
    let metrics = harness.gpu.metrics();
    assert_eq!((counter(&metrics.zero_copy_resources), counter(&metrics.copy_fallback_resources)), (1, 0));
    assert_eq!(harness.gpu.screen().scanout_is_zero_copy(), Some(true));
}

#[test]
fn attach_backing_outside_ram_returns_invalid_parameter() {
    let mut harness = Harness::new();
    harness.create(1, B8G8R8X8, 16, 16);
    for entries in [
        vec![(MEMORY_SIZE, 4096u32)],
        vec![(MEMORY_SIZE - 512, 1024)],
        vec![(PIXELS_ADDR, 512), (u64::MAX - 100, 1024)],
    ] {
        let reply = harness.send(&attach_backing(1, &entries));
        assert_eq!(reply.response_type(), RESP_ERR_INVALID_PARAMETER, "{entries:x?}");
    }
    // Nothing was attached: a valid backing still goes on.
    harness.ok(&attach_backing(1, &[(PIXELS_ADDR, 1024)]));
}

#[test]
fn attach_backing_smaller_than_resource_returns_invalid_parameter() {
    let mut harness = Harness::new();
    harness.create(1, B8G8R8X8, 16, 16);
    let reply = harness.send(&attach_backing(1, &[(PIXELS_ADDR, 1023)]));
    assert_eq!(reply.response_type(), RESP_ERR_INVALID_PARAMETER);
}

#[test]
fn attach_backing_twice_returns_unspec() {
    let mut harness = Harness::new();
    harness.create(1, B8G8R8X8, 16, 16);
    harness.ok(&attach_backing(1, &[(PIXELS_ADDR, 1024)]));
    assert_eq!(harness.send(&attach_backing(1, &[(PIXELS_ADDR, 1024)])).response_type(), RESP_ERR_UNSPEC);
}

#[test]
fn attach_backing_to_unknown_resource_returns_invalid_resource_id() {
    let mut harness = Harness::new();
    let reply = harness.send(&attach_backing(9, &[(PIXELS_ADDR, 1024)]));
    assert_eq!(reply.response_type(), RESP_ERR_INVALID_RESOURCE_ID);
}

#[test]
fn attach_backing_with_too_many_entries_returns_invalid_parameter() {
    let mut harness = Harness::new();
    harness.create(1, B8G8R8X8, 16, 16);
    let reply = harness.send(&words(CMD_RESOURCE_ATTACH_BACKING, &[1, MAX_BACKING_ENTRIES + 1]));
    assert_eq!(reply.response_type(), RESP_ERR_INVALID_PARAMETER);
}

#[test]
fn attach_backing_unaligned_falls_back_to_copy_and_counts_it() {
    let mut harness = Harness::new();
    harness.create(1, B8G8R8X8, 16, 16);
    harness.ok(&attach_backing(1, &[(PIXELS_ADDR + 64, 1024)]));
    harness.ok(&words(CMD_SET_SCANOUT, &[0, 0, 16, 16, 0, 1]));
    let metrics = harness.gpu.metrics();
    assert_eq!((counter(&metrics.zero_copy_resources), counter(&metrics.copy_fallback_resources)), (0, 1));
    assert_eq!(harness.gpu.screen().scanout_is_zero_copy(), Some(false));
}

#[test]
fn attach_backing_in_ram_without_a_file_falls_back_to_copy() {
    let mut harness = Harness::with_memory(anonymous_memory());
    harness.show(1, 16, 16, PIXELS_ADDR);
    assert_eq!(counter(&harness.gpu.metrics().copy_fallback_resources), 1);
}

#[test]
fn detach_backing_then_transfer_returns_unspec() {
    let mut harness = Harness::new();
    harness.show(1, 16, 16, PIXELS_ADDR);
    harness.ok(&words(CMD_RESOURCE_DETACH_BACKING, &[1, 0]));
    assert_eq!(harness.send(&transfer(Rect::new(0, 0, 16, 16), 0, 1)).response_type(), RESP_ERR_UNSPEC);
    let error = harness.gpu.screen().capture(&CaptureOptions::default()).unwrap_err();
    assert!(matches!(error, ScreenError::FindScanoutBacking), "{error}");
    // Re-attaching shows the resource again.
    harness.ok(&attach_backing(1, &[(PIXELS_ADDR, 1024)]));
    assert!(harness.gpu.screen().capture(&CaptureOptions::default()).is_ok());
}

#[test]
fn detach_backing_without_backing_returns_unspec() {
    let mut harness = Harness::new();
    harness.create(1, B8G8R8X8, 16, 16);
    assert_eq!(harness.send(&words(CMD_RESOURCE_DETACH_BACKING, &[1, 0])).response_type(), RESP_ERR_UNSPEC);
    assert_eq!(
        harness.send(&words(CMD_RESOURCE_DETACH_BACKING, &[2, 0])).response_type(),
        RESP_ERR_INVALID_RESOURCE_ID
    );
}

#[test]
fn detach_backing_while_pixels_are_lent_keeps_them_readable() {
    let mut harness = Harness::new();
    harness.show(1, 16, 16, PIXELS_ADDR);
    harness.paint(PIXELS_ADDR, 16, 16, pattern);
    let screen = harness.gpu.screen();
    screen
        .with_pixels(|pixels, _| {
            // The device detaches mid-read (from this thread here; the device thread in life).
            harness.gpu.execute(&Command::ResourceDetachBacking { resource_id: 1 });
            let mut row = [0u8; 64];
            pixels.read_row(3, &mut row);
            assert_eq!(&row[..3], &[(3 * 3) as u8, 3 * 13, 0], "b, g, r of pixel (0, 3)");
        })
        .unwrap();
}

// SET_SCANOUT

#[test]
fn set_scanout_with_bad_scanout_id_returns_invalid_scanout_id() {
    let mut harness = Harness::new();
    harness.create(1, B8G8R8X8, 16, 16);
    let reply = harness.send(&words(CMD_SET_SCANOUT, &[0, 0, 16, 16, 1, 1]));
    assert_eq!(reply.response_type(), RESP_ERR_INVALID_SCANOUT_ID);
}

#[test]
fn set_scanout_with_rect_outside_resource_returns_invalid_parameter() {
    let mut harness = Harness::new();
    harness.create(1, B8G8R8X8, 16, 16);
    for rect in [[0, 0, 17, 16], [8, 8, 16, 16], [u32::MAX, 0, 2, 2], [0, 0, 0, 0]] {
        let reply = harness.send(&words(CMD_SET_SCANOUT, &[rect[0], rect[1], rect[2], rect[3], 0, 1]));
        assert_eq!(reply.response_type(), RESP_ERR_INVALID_PARAMETER, "{rect:?}");
    }
}

#[test]
fn set_scanout_of_unknown_resource_returns_invalid_resource_id() {
    let mut harness = Harness::new();
    let reply = harness.send(&words(CMD_SET_SCANOUT, &[0, 0, 16, 16, 0, 3]));
    assert_eq!(reply.response_type(), RESP_ERR_INVALID_RESOURCE_ID);
}

#[test]
fn set_scanout_to_resource_zero_disables_scanout() {
    let mut harness = Harness::new();
    harness.show(1, 16, 16, PIXELS_ADDR);
    assert_eq!(harness.gpu.screen().scanout_size(), Some((16, 16)));
    harness.ok(&words(CMD_SET_SCANOUT, &[0, 0, 0, 0, 0, 0]));
    assert_eq!(harness.gpu.screen().scanout_size(), None);
}

#[test]
fn set_scanout_sub_rectangle_shows_that_part() {
    let mut harness = Harness::new();
    harness.create(1, B8G8R8X8, 32, 32);
    harness.ok(&attach_backing(1, &[(PIXELS_ADDR, 32 * 32 * 4)]));
    harness.paint(PIXELS_ADDR, 32, 32, pattern);
    harness.ok(&words(CMD_SET_SCANOUT, &[4, 8, 16, 16, 0, 1]));
    let [b, g, r, _] = raw_pixel(&harness, 1, 2);
    assert_eq!([r, g, b], pattern(5, 10));
}

// RESOURCE_FLUSH

#[test]
fn flush_of_scanout_resource_ends_frame_with_damage() {
    let mut harness = Harness::new();
    harness.show(1, 64, 32, PIXELS_ADDR);
    let screen = harness.gpu.screen();
    assert_eq!(screen.latest_frame(), None);
    harness.flush(1, Rect::new(2, 3, 10, 5));
    let frame = screen.latest_frame().unwrap();
    assert_eq!((frame.number, frame.damage), (1, Rect::new(2, 3, 10, 5)));
    harness.flush(1, Rect::new(0, 0, 64, 32));
    assert_eq!(screen.latest_frame().unwrap().number, 2);
    assert_eq!(counter(&harness.gpu.metrics().frames), 2);
}

#[test]
fn flush_of_other_resource_ends_no_frame() {
    let mut harness = Harness::new();
    harness.show(1, 16, 16, PIXELS_ADDR);
    harness.create(2, B8G8R8X8, 16, 16);
    harness.flush(2, Rect::new(0, 0, 16, 16));
    assert_eq!(harness.gpu.screen().latest_frame(), None);
}

#[test]
fn flush_with_rect_outside_resource_returns_invalid_parameter() {
    let mut harness = Harness::new();
    harness.show(1, 16, 16, PIXELS_ADDR);
    let reply = harness.send(&words(CMD_RESOURCE_FLUSH, &[10, 10, 10, 10, 1, 0]));
    assert_eq!(reply.response_type(), RESP_ERR_INVALID_PARAMETER);
    assert_eq!(harness.gpu.screen().latest_frame(), None);
}

#[test]
fn flush_of_unknown_resource_returns_invalid_resource_id() {
    let mut harness = Harness::new();
    let reply = harness.send(&words(CMD_RESOURCE_FLUSH, &[0, 0, 1, 1, 42, 0]));
    assert_eq!(reply.response_type(), RESP_ERR_INVALID_RESOURCE_ID);
}

// TRANSFER_TO_HOST_2D

#[test]
fn transfer_without_backing_returns_unspec() {
    let mut harness = Harness::new();
    harness.create(1, B8G8R8X8, 16, 16);
    assert_eq!(harness.send(&transfer(Rect::new(0, 0, 16, 16), 0, 1)).response_type(), RESP_ERR_UNSPEC);
}

#[test]
fn transfer_with_rect_outside_resource_returns_invalid_parameter() {
    let mut harness = Harness::new();
    harness.show(1, 16, 16, PIXELS_ADDR);
    for rect in [Rect::new(0, 0, 17, 1), Rect::new(15, 15, 2, 2), Rect::new(u32::MAX, u32::MAX, 2, 2)] {
        assert_eq!(harness.send(&transfer(rect, 0, 1)).response_type(), RESP_ERR_INVALID_PARAMETER, "{rect:?}");
    }
}

#[test]
fn transfer_with_offset_past_backing_returns_invalid_parameter() {
    let mut harness = Harness::new();
    harness.show(1, 16, 16, PIXELS_ADDR);
    for offset in [1024, 4, u64::MAX - 8] {
        let reply = harness.send(&transfer(Rect::new(0, 0, 16, 16), offset, 1));
        assert_eq!(reply.response_type(), RESP_ERR_INVALID_PARAMETER, "offset {offset}");
    }
}

#[test]
fn transfer_of_unknown_resource_returns_invalid_resource_id() {
    let mut harness = Harness::new();
    assert_eq!(harness.send(&transfer(Rect::new(0, 0, 1, 1), 0, 5)).response_type(), RESP_ERR_INVALID_RESOURCE_ID);
}

#[test]
fn transfer_to_copy_backed_resource_copies_only_the_rectangle() {
    let mut harness = Harness::with_memory(anonymous_memory());
    harness.show(1, 16, 16, PIXELS_ADDR);
    harness.paint(PIXELS_ADDR, 16, 16, pattern);
    assert_eq!(raw_pixel(&harness, 5, 5), [0, 0, 0, 0], "nothing transferred yet");
    let rect = Rect::new(4, 4, 4, 4);
    harness.ok(&transfer(rect, (4 * 16 + 4) * 4, 1));
    let [b, g, r, _] = raw_pixel(&harness, 5, 5);
    assert_eq!([r, g, b], pattern(5, 5));
    assert_eq!(raw_pixel(&harness, 3, 3), [0, 0, 0, 0], "outside the rectangle");
    assert_eq!(counter(&harness.gpu.metrics().transfer_copy_bytes), 64);
}

#[test]
fn transfer_to_scattered_copy_backed_resource_reads_across_entries() {
    let mut harness = Harness::with_memory(anonymous_memory());
    harness.create(1, B8G8R8X8, 16, 16);
    // Three uneven pieces, out of address order.
    let pieces = [(PIXELS_ADDR + 0x10_000, 300u32), (PIXELS_ADDR, 500), (PIXELS_ADDR + 0x20_000, 224)];
    harness.ok(&attach_backing(1, &pieces));
    harness.ok(&words(CMD_SET_SCANOUT, &[0, 0, 16, 16, 0, 1]));
    let mut image = Vec::new();
    for y in 0..16 {
        for x in 0..16 {
            let [r, g, b] = pattern(x, y);
            image.extend_from_slice(&[b, g, r, 0]);
        }
    }
    let mut start = 0usize;
    for (addr, len) in pieces {
        harness.memory.write_slice(&image[start..start + len as usize], GuestAddress(addr)).unwrap();
        start += len as usize;
    }
    harness.ok(&transfer(Rect::new(0, 0, 16, 16), 0, 1));
    let capture = harness.gpu.screen().capture(&CaptureOptions::default()).unwrap();
    assert_eq!(capture.bytes, image);
}

// Zero copy

#[test]
fn zero_copy_scanout_sees_guest_writes_without_transfer() {
    let mut harness = Harness::new();
    harness.show(1, 64, 32, PIXELS_ADDR);
    harness.paint(PIXELS_ADDR, 64, 32, pattern);
    let screen = harness.gpu.screen();
    let first = screen.capture(&CaptureOptions::default()).unwrap();
    // The guest writes a new pixel straight into its RAM; no TRANSFER_TO_HOST_2D follows.
    harness.memory.write_slice(&[1, 2, 3, 4], GuestAddress(PIXELS_ADDR + (7 * 64 + 9) * 4)).unwrap();
    let second = screen.capture(&CaptureOptions::default()).unwrap();
    let offset = (7 * 64 + 9) * 4;
    assert_ne!(&first.bytes[offset..offset + 4], &[1, 2, 3, 4]);
    assert_eq!(&second.bytes[offset..offset + 4], &[1, 2, 3, 4]);
    // And the lent view points at a host range distinct from the guest's own mapping:
    // the same bytes through a second mapping of the memfd, not a copy.
    let host_ram = harness.memory.get_host_address(GuestAddress(PIXELS_ADDR)).unwrap() as usize;
    let view = screen.with_pixels(|pixels, _| pixels.as_ptr() as usize).unwrap();
    assert_ne!(view, host_ram);
    assert_eq!(counter(&harness.gpu.metrics().transfer_copy_bytes), 0);
}

/// A painted 64x32 scanout whose views wait for the returned gate, and a screenshot of it
/// taken on another thread; the receiver hears when that is done.
fn deferred_capture(
) -> (Harness, crate::view::ViewGate, std::sync::mpsc::Receiver<()>, std::thread::JoinHandle<crate::Capture>) {
    let mut harness = Harness::new();
    let gate = crate::view::ViewGate::new();
    harness.gpu.defer_views(gate.clone());
    // 64x32x4: two pages at PIXELS_ADDR, which is that far into the memfd.
    harness.show(1, 64, 32, PIXELS_ADDR);
    harness.paint(PIXELS_ADDR, 64, 32, pattern);
    let screen = harness.gpu.screen();
    let (done, captured) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let capture = screen.capture(&CaptureOptions::default()).unwrap();
        done.send(()).unwrap();
        capture
    });
    (harness, gate, captured, reader)
}

#[test]
fn a_deferred_view_maps_nothing_until_its_gate_opens() {
    let (harness, gate, captured, reader) = deferred_capture();
    assert_eq!(harness.gpu.screen().scanout_is_zero_copy(), Some(true), "still viewed in place, later");
    assert!(captured.recv_timeout(std::time::Duration::from_millis(200)).is_err(), "a screenshot waits for the gate");
    gate.open(true);
    let capture = reader.join().unwrap();
    let mut plain = Harness::new();
    plain.show(1, 64, 32, PIXELS_ADDR);
    plain.paint(PIXELS_ADDR, 64, 32, pattern);
    let expected = plain.gpu.screen().capture(&CaptureOptions::default()).unwrap();
    assert_eq!(capture.bytes, expected.bytes, "the guest's pixels, once mapped");
}

#[test]
fn a_deferred_view_waits_only_for_the_ranges_under_its_own_backing() {
    let (_harness, gate, captured, reader) = deferred_capture();
    let wait = std::time::Duration::from_millis(200);
    gate.open_range(0, PIXELS_ADDR);
    assert!(captured.recv_timeout(wait).is_err(), "other pages loaded: still waiting");
    gate.open_range(PIXELS_ADDR, 4096);
    assert!(captured.recv_timeout(wait).is_err(), "half of its pages: still waiting");
    gate.open_range(PIXELS_ADDR, 8192);
    captured.recv_timeout(std::time::Duration::from_secs(5)).expect("its own pages are in: the screenshot goes on");
    let capture = reader.join().unwrap();
    assert!(capture.bytes.iter().any(|&byte| byte != 0), "the guest's pixels");
}

#[test]
fn a_raw_capture_encoded_later_is_the_png_taken_at_once() {
    let mut harness = Harness::new();
    harness.show(1, 64, 32, PIXELS_ADDR);
    harness.paint(PIXELS_ADDR, 64, 32, pattern);
    let screen = harness.gpu.screen();
    let raw = screen.capture(&CaptureOptions::default()).unwrap();
    let png = CaptureOptions { format: crate::CaptureFormat::Png, ..Default::default() };
    let later = crate::capture::reencode(&raw, &png).unwrap();
    assert_eq!(later, screen.capture(&png).unwrap());
    assert!(matches!(crate::capture::reencode(&later, &png), Err(crate::CaptureError::NotRaw)), "a PNG is not raw");
    let short = crate::Capture { bytes: raw.bytes[..100].to_vec(), ..raw };
    assert!(matches!(crate::capture::reencode(&short, &png), Err(crate::CaptureError::NotRaw)), "torn pixels");
}

#[test]
fn a_deferred_view_whose_pages_never_load_lends_no_pixels() {
    let mut harness = Harness::new();
    let gate = crate::view::ViewGate::new();
    harness.gpu.defer_views(gate.clone());
    harness.show(1, 64, 32, PIXELS_ADDR);
    gate.open(false);
    assert!(harness.gpu.screen().capture(&CaptureOptions::default()).is_err());
}

#[test]
fn zero_copy_view_maps_scattered_pages_in_backing_order() {
    let mut harness = Harness::new();
    // 32x128x4 = 4 pages, given in reverse address order.
    harness.create(1, B8G8R8X8, 32, 128);
    let pages: Vec<(u64, u32)> = (0..4).rev().map(|i| (PIXELS_ADDR + i * 0x1_0000, 4096)).collect();
    harness.ok(&attach_backing(1, &pages));
    harness.ok(&words(CMD_SET_SCANOUT, &[0, 0, 32, 128, 0, 1]));
    assert_eq!(harness.gpu.screen().scanout_is_zero_copy(), Some(true));
    // Each page holds 32 rows; mark every page's first pixel with its index in the list.
    for (index, (addr, _)) in pages.iter().enumerate() {
        harness.memory.write_slice(&[index as u8, 0xaa, 0xbb, 0], GuestAddress(*addr)).unwrap();
    }
    for index in 0..4u32 {
        assert_eq!(raw_pixel(&harness, 0, index * 32), [index as u8, 0xaa, 0xbb, 0]);
    }
}

#[test]
fn zero_copy_view_spans_two_ram_regions() {
    // Two regions adjacent in guest-physical space but at distant memfd offsets.
    let (memory, _memfd) = memfd_memory(&[(0, 0x80_0000), (0x80_0000, 0x80_0000)]);
    let mut harness = Harness::with_memory(memory);
    harness.create(1, B8G8R8X8, 32, 128);
    harness.ok(&attach_backing(1, &[(0x80_0000 - 8192, 16384)]));
    harness.ok(&words(CMD_SET_SCANOUT, &[0, 0, 32, 128, 0, 1]));
    assert_eq!(harness.gpu.screen().scanout_is_zero_copy(), Some(true));
    harness.memory.write_slice(&[9, 8, 7, 6], GuestAddress(0x80_0000)).unwrap();
    assert_eq!(raw_pixel(&harness, 0, 64), [9, 8, 7, 6], "8192 bytes in: row 64");
}

// Cursor queue

#[test]
fn update_cursor_on_control_queue_returns_unspec() {
    let mut harness = Harness::new();
    let reply = harness.send(&words(CMD_UPDATE_CURSOR, &[0, 0, 0, 0, 0, 0, 0, 0]));
    assert_eq!(reply.response_type(), RESP_ERR_UNSPEC);
    assert_eq!(counter(&harness.gpu.metrics().wrong_queue_commands), 1);
}

#[test]
fn control_command_on_cursor_queue_returns_unspec() {
    let mut harness = Harness::new();
    let reply = harness.send_cursor(&words(CMD_RESOURCE_CREATE_2D, &[1, B8G8R8X8, 8, 8]));
    assert_eq!(reply.response_type(), RESP_ERR_UNSPEC);
    assert_eq!(harness.gpu.resource_bytes(), 0, "nothing created");
}

#[test]
fn update_cursor_with_unknown_resource_returns_invalid_resource_id() {
    let mut harness = Harness::new();
    let reply = harness.send_cursor(&words(CMD_UPDATE_CURSOR, &[0, 5, 5, 0, 99, 0, 0, 0]));
    assert_eq!(reply.response_type(), RESP_ERR_INVALID_RESOURCE_ID);
}

#[test]
fn update_cursor_with_bad_scanout_returns_invalid_scanout_id() {
    let mut harness = Harness::new();
    let reply = harness.send_cursor(&words(CMD_MOVE_CURSOR, &[3, 5, 5, 0, 0, 0, 0, 0]));
    assert_eq!(reply.response_type(), RESP_ERR_INVALID_SCANOUT_ID);
}

#[test]
fn update_cursor_with_oversized_resource_returns_invalid_parameter() {
    let mut harness = Harness::new();
    harness.create(2, B8G8R8A8, 300, 10);
    harness.ok(&attach_backing(2, &[(PIXELS_ADDR, 300 * 10 * 4)]));
    let reply = harness.send_cursor(&words(CMD_UPDATE_CURSOR, &[0, 5, 5, 0, 2, 0, 0, 0]));
    assert_eq!(reply.response_type(), RESP_ERR_INVALID_PARAMETER);
}

#[test]
fn cursor_request_without_response_buffer_completes_empty() {
    let mut harness = Harness::new();
    let request = words(CMD_MOVE_CURSOR, &[0, 5, 5, 0, 0, 0, 0, 0]);
    harness.memory.write_slice(&request, GuestAddress(REQUEST_ADDR)).unwrap();
    let (used_len, needs_interrupt) = harness.run_chain(&[descriptor(REQUEST_ADDR, request.len() as u32, 0, 0)], true);
    assert_eq!((used_len, needs_interrupt), (0, true));
    assert_eq!(counter(&harness.gpu.metrics().malformed_chains), 0);
    assert_eq!(counter(&harness.gpu.metrics().cursor_commands), 1);
}

/// The first three bytes of the raw capture's pixel at (x, y).
fn pixel(capture: &crate::Capture, x: usize, y: usize) -> Vec<u8> {
    capture.bytes[y * capture.stride + x * 4..y * capture.stride + x * 4 + 3].to_vec()
}

fn show_with_cursor(harness: &mut Harness) {
    show_with_cursor_in(harness, B8G8R8A8);
}

/// A 4x4 cursor in a resource of `format`: opaque red top half, transparent bottom half
/// (alpha in the fourth byte, the padding byte of an X format).
fn show_with_cursor_in(harness: &mut Harness, format: u32) {
    harness.show(1, 64, 32, PIXELS_ADDR);
    harness.paint(PIXELS_ADDR, 64, 32, |_, _| [0, 0, 0]);
    const CURSOR_ADDR: u64 = PIXELS_ADDR + 0x10_0000;
    harness.create(2, format, 4, 4);
    harness.ok(&attach_backing(2, &[(CURSOR_ADDR, 64)]));
    let mut image = Vec::new();
    for y in 0..4 {
        for _ in 0..4 {
            image.extend_from_slice(if y < 2 { &[0, 0, 255, 255] } else { &[0, 0, 255, 0] });
        }
    }
    harness.memory.write_slice(&image, GuestAddress(CURSOR_ADDR)).unwrap();
    let reply = harness.send_cursor(&words(CMD_UPDATE_CURSOR, &[0, 10, 20, 0, 2, 1, 1, 0]));
    assert_eq!(reply.response_type(), RESP_OK_NODATA);
}

#[test]
fn update_cursor_is_composited_only_when_asked() {
    let mut harness = Harness::new();
    show_with_cursor(&mut harness);
    let screen = harness.gpu.screen();
    let with = screen.capture(&CaptureOptions { cursor: true, ..CaptureOptions::default() }).unwrap();
    let without = screen.capture(&CaptureOptions::default()).unwrap();
    // Hot spot (1, 1) at (10, 20): the image's top-left is at (9, 19).
    assert_eq!(pixel(&with, 9, 19), vec![0, 0, 255]);
    assert_eq!(pixel(&with, 12, 20), vec![0, 0, 255]);
    assert_eq!(pixel(&with, 9, 21), vec![0, 0, 0], "transparent half");
    assert_eq!(pixel(&with, 8, 19), vec![0, 0, 0], "left of the cursor");
    assert_eq!(pixel(&without, 9, 19), vec![0, 0, 0]);
}

#[test]
fn a_cursor_in_an_x_format_resource_keeps_its_alpha() {
    // Linux's virtio-gpu makes Xorg's cursor buffer B8G8R8X8 and draws ARGB into it.
    let mut harness = Harness::new();
    show_with_cursor_in(&mut harness, B8G8R8X8);
    let capture = harness.gpu.screen().capture(&CaptureOptions { cursor: true, ..CaptureOptions::default() }).unwrap();
    assert_eq!(pixel(&capture, 9, 19), vec![0, 0, 255], "the opaque half");
    assert_eq!(pixel(&capture, 9, 21), vec![0, 0, 0], "the transparent half shows the screen, not a black box");
}

#[test]
fn move_cursor_moves_the_composited_cursor() {
    let mut harness = Harness::new();
    show_with_cursor(&mut harness);
    let reply = harness.send_cursor(&words(CMD_MOVE_CURSOR, &[0, 40, 5, 0, 0, 0, 0, 0]));
    assert_eq!(reply.response_type(), RESP_OK_NODATA);
    let capture = harness.gpu.screen().capture(&CaptureOptions { cursor: true, ..CaptureOptions::default() }).unwrap();
    let red_at = |x: usize, y: usize| capture.bytes[y * capture.stride + x * 4 + 2] == 255;
    assert!(red_at(39, 4) && !red_at(9, 19));
}

#[test]
fn update_cursor_with_resource_zero_hides_it() {
    let mut harness = Harness::new();
    show_with_cursor(&mut harness);
    harness.send_cursor(&words(CMD_UPDATE_CURSOR, &[0, 10, 20, 0, 0, 0, 0, 0]));
    let capture = harness.gpu.screen().capture(&CaptureOptions { cursor: true, ..CaptureOptions::default() }).unwrap();
    assert!(capture.bytes.chunks_exact(4).all(|p| p[..3] == [0, 0, 0]));
}

#[test]
fn cursor_partly_off_screen_is_clipped() {
    let mut harness = Harness::new();
    show_with_cursor(&mut harness);
    harness.send_cursor(&words(CMD_MOVE_CURSOR, &[0, 0, 0, 0, 0, 0, 0, 0]));
    let capture = harness.gpu.screen().capture(&CaptureOptions { cursor: true, ..CaptureOptions::default() }).unwrap();
    // Image top-left at (-1, -1): its second row/column land on screen row/column 0.
    assert_eq!(capture.bytes[2], 255);
    assert_eq!(capture.bytes[3 * 4 + 2], 0, "x = 3 is past the cursor's last column (2)");
}

// Header, fences, malformed requests and chains

#[test]
fn fenced_request_response_echoes_fence_id() {
    let mut harness = Harness::new();
    let mut request = fenced_header(CMD_RESOURCE_CREATE_2D, FLAG_FENCE, 0xfeed_f00d);
    for word in [1u32, B8G8R8X8, 8, 8] {
        request.extend_from_slice(&word.to_le_bytes());
    }
    let reply = harness.send(&request);
    assert_eq!(reply.response_type(), RESP_OK_NODATA);
    assert_eq!((reply.header.flags & FLAG_FENCE, reply.header.fence_id), (FLAG_FENCE, 0xfeed_f00d));
    // Errors echo the fence too.
    let reply = harness.send(&request);
    assert_eq!((reply.response_type(), reply.header.fence_id), (RESP_ERR_INVALID_RESOURCE_ID, 0xfeed_f00d));
}

#[test]
fn unfenced_request_response_has_no_fence() {
    let mut harness = Harness::new();
    let reply = harness.send(&fenced_header(CMD_GET_DISPLAY_INFO, 0, 1234));
    assert_eq!((reply.header.flags, reply.header.fence_id), (0, 0));
}

#[test]
fn unknown_command_returns_unspec() {
    let mut harness = Harness::new();
    assert_eq!(harness.send(&header(0x0999)).response_type(), RESP_ERR_UNSPEC);
    assert_eq!(counter(&harness.gpu.metrics().errors_unspec), 1);
}

#[test]
fn unsupported_3d_and_blob_commands_return_unspec() {
    let mut harness = Harness::new();
    for command in [0x0200, 0x0207, CMD_GET_CAPSET_INFO, CMD_RESOURCE_CREATE_BLOB, CMD_SET_SCANOUT_BLOB] {
        assert_eq!(harness.send(&header(command)).response_type(), RESP_ERR_UNSPEC, "{command:#x}");
    }
}

#[test]
fn truncated_request_returns_unspec() {
    let mut harness = Harness::new();
    let full = words(CMD_RESOURCE_CREATE_2D, &[1, B8G8R8X8, 8, 8]);
    for len in [0, 10, 23, 24, 39] {
        let reply = harness.send(&full[..len]);
        assert_eq!(reply.response_type(), RESP_ERR_UNSPEC, "{len} bytes");
    }
    assert_eq!(harness.gpu.resource_bytes(), 0);
}

#[test]
fn request_split_across_descriptors_is_reassembled() {
    let mut harness = Harness::new();
    let request = words(CMD_RESOURCE_CREATE_2D, &[1, B8G8R8X8, 8, 8]);
    harness.memory.write_slice(&request[..10], GuestAddress(REQUEST_ADDR)).unwrap();
    harness.memory.write_slice(&request[10..], GuestAddress(REQUEST_ADDR + 0x1000)).unwrap();
    let chain = [
        descriptor(REQUEST_ADDR, 10, NEXT, 1),
        descriptor(REQUEST_ADDR + 0x1000, request.len() as u32 - 10, NEXT, 2),
        descriptor(RESPONSE_ADDR, 24, WRITE, 0),
    ];
    let (used_len, _) = harness.run_chain(&chain, false);
    assert_eq!(used_len, 24);
    assert_eq!(harness.gpu.resource_bytes(), 8 * 8 * 4);
}

#[test]
fn chain_without_response_buffer_runs_command_and_counts_malformed() {
    let mut harness = Harness::new();
    let request = words(CMD_RESOURCE_CREATE_2D, &[1, B8G8R8X8, 8, 8]);
    harness.memory.write_slice(&request, GuestAddress(REQUEST_ADDR)).unwrap();
    let (used_len, _) = harness.run_chain(&[descriptor(REQUEST_ADDR, request.len() as u32, 0, 0)], false);
    assert_eq!(used_len, 0);
    assert_eq!(counter(&harness.gpu.metrics().malformed_chains), 1);
}

#[test]
fn response_buffer_too_small_is_filled_and_counted() {
    let mut harness = Harness::new();
    let request = header(CMD_GET_DISPLAY_INFO);
    harness.memory.write_slice(&request, GuestAddress(REQUEST_ADDR)).unwrap();
    let chain = [descriptor(REQUEST_ADDR, 24, NEXT, 1), descriptor(RESPONSE_ADDR, 100, WRITE, 0)];
    let (used_len, _) = harness.run_chain(&chain, false);
    assert_eq!(used_len, 100);
    assert_eq!(counter(&harness.gpu.metrics().malformed_chains), 1);
    let mut after = [0u8; 4];
    harness.memory.read_slice(&mut after, GuestAddress(RESPONSE_ADDR + 100)).unwrap();
    assert_eq!(after, [0; 4], "nothing written past the buffer");
}

#[test]
fn chain_outside_memory_counts_malformed_without_panic() {
    let mut harness = Harness::new();
    let chain = [descriptor(MEMORY_SIZE + 0x1000, 64, NEXT, 1), descriptor(RESPONSE_ADDR, 64, WRITE, 0)];
    let (used_len, _) = harness.run_chain(&chain, false);
    assert_eq!(used_len, 0);
    let chain = [descriptor(REQUEST_ADDR, 64, NEXT, 1), descriptor(MEMORY_SIZE - 8, 64, WRITE, 0)];
    harness.run_chain(&chain, false);
    assert_eq!(counter(&harness.gpu.metrics().malformed_chains), 2);
}

#[test]
fn looping_chain_terminates() {
    let mut harness = Harness::new();
    harness.memory.write_slice(&header(CMD_GET_DISPLAY_INFO), GuestAddress(REQUEST_ADDR)).unwrap();
    let chain = [descriptor(REQUEST_ADDR, 24, NEXT, 1), descriptor(RESPONSE_ADDR, 512, WRITE | NEXT, 0)];
    let (used_len, _) = harness.run_chain(&chain, false);
    assert!(used_len <= 512 * 16);
}

#[test]
fn empty_queue_needs_no_interrupt() {
    let mut harness = Harness::new();
    let (_, needs_interrupt) = harness.run_chain(&[], false);
    assert!(!needs_interrupt);
}

// Config space, reset

#[test]
fn read_config_reports_one_scanout_and_no_capsets() {
    let harness = Harness::new();
    let mut config = [0xffu8; CONFIG_SPACE_SIZE + 4];
    harness.gpu.read_config(0, &mut config);
    assert_eq!(config[..CONFIG_SPACE_SIZE], [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(config[CONFIG_SPACE_SIZE..], [0; 4], "past the end reads zero");
    let mut high = [0xffu8; 4];
    harness.gpu.read_config(u64::MAX, &mut high);
    assert_eq!(high, [0; 4]);
}

#[test]
fn write_config_events_clear_clears_events_read() {
    let mut harness = Harness::new();
    harness.gpu.signal_display_event();
    let mut events = [0u8; 4];
    harness.gpu.read_config(0, &mut events);
    assert_eq!(u32::from_le_bytes(events), EVENT_DISPLAY);
    harness.gpu.write_config(0, &[0; 4]);
    harness.gpu.write_config(4, &EVENT_DISPLAY.to_le_bytes());
    harness.gpu.read_config(0, &mut events);
    assert_eq!(u32::from_le_bytes(events), 0);
}

#[test]
fn gpu_config_out_of_range_is_rejected() {
    for (width, height) in [(0, 800), (1280, 0), (3841, 2160), (3840, 2161)] {
        assert!(GpuConfig::new(width, height).is_err(), "{width}x{height}");
    }
    assert!(GpuConfig::new(3840, 2160).is_ok());
    let tiny_cap = GpuConfig { max_resource_bytes: 1024, ..GpuConfig::default() };
    assert!(crate::Gpu::new(tiny_cap, anonymous_memory()).is_err());
}

#[test]
fn reset_forgets_resources_and_scanout_but_not_frame_numbers() {
    let mut harness = Harness::new();
    harness.show(1, 16, 16, PIXELS_ADDR);
    harness.flush(1, Rect::new(0, 0, 16, 16));
    harness.gpu.reset();
    assert_eq!(harness.gpu.resource_bytes(), 0);
    assert_eq!(harness.gpu.screen().scanout_size(), None);
    harness.show(1, 16, 16, PIXELS_ADDR);
    harness.flush(1, Rect::new(0, 0, 16, 16));
    assert_eq!(harness.gpu.screen().latest_frame().unwrap().number, 2);
}

#[test]
fn png_capture_of_real_queue_session_decodes() {
    let mut harness = Harness::new();
    harness.show(1, 64, 32, PIXELS_ADDR);
    harness.paint(PIXELS_ADDR, 64, 32, pattern);
    harness.ok(&transfer(Rect::new(0, 0, 64, 32), 0, 1));
    harness.flush(1, Rect::new(0, 0, 64, 32));
    let capture = harness
        .gpu
        .screen()
        .capture(&CaptureOptions { format: CaptureFormat::Png, ..CaptureOptions::default() })
        .unwrap();
    assert_eq!((capture.width, capture.height, capture.frame), (64, 32, 1));
    assert_eq!(&capture.bytes[1..4], b"PNG");
}

// Hostile input at volume: the in-tree stand-in for the cargo-fuzz targets in fuzz/.

/// xorshift64*: deterministic, so a failure reproduces.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A value a guest might send: small, near a boundary, or anything.
    fn field(&mut self) -> u32 {
        match self.below(6) {
            0 => self.below(4) as u32,
            1 => 1 << self.below(32),
            2 => u32::MAX - self.below(4) as u32,
            3 => (PIXELS_ADDR as u32).wrapping_add(self.below(0x2000) as u32),
            4 => self.below(300) as u32,
            _ => self.next() as u32,
        }
    }
}

fn valid_requests() -> Vec<Vec<u8>> {
    vec![
        header(CMD_GET_DISPLAY_INFO),
        words(CMD_GET_EDID, &[0, 0]),
        words(CMD_RESOURCE_CREATE_2D, &[1, B8G8R8X8, 64, 32]),
        attach_backing(1, &[(PIXELS_ADDR, 8192)]),
        words(CMD_SET_SCANOUT, &[0, 0, 64, 32, 0, 1]),
        transfer(Rect::new(0, 0, 64, 32), 0, 1),
        words(CMD_RESOURCE_FLUSH, &[0, 0, 64, 32, 1, 0]),
        words(CMD_RESOURCE_CREATE_2D, &[2, B8G8R8A8, 4, 4]),
        attach_backing(2, &[(PIXELS_ADDR + 0x10_0000, 64)]),
        words(CMD_UPDATE_CURSOR, &[0, 3, 3, 0, 2, 1, 1, 0]),
        words(CMD_MOVE_CURSOR, &[0, 9, 9, 0, 0, 0, 0, 0]),
        words(CMD_RESOURCE_DETACH_BACKING, &[1, 0]),
        words(CMD_RESOURCE_UNREF, &[1, 0]),
    ]
}

fn mutate(random: &mut Random, template: &[u8]) -> Vec<u8> {
    let mut bytes = template.to_vec();
    for _ in 0..=random.below(4) {
        match random.below(5) {
            // Overwrite a body field (keeps the header's command, so the body is exercised).
            0 | 1 if bytes.len() >= HEADER_SIZE + 4 => {
                let words = (bytes.len() - HEADER_SIZE) / 4;
                let at = HEADER_SIZE + random.below(words as u64) as usize * 4;
                let value = random.field();
                bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
            }
            2 => bytes.truncate(random.below(bytes.len() as u64 + 1) as usize),
            3 => bytes.extend((0..random.below(64)).map(|_| random.next() as u8)),
            _ => {
                if let Some(byte) = bytes.get_mut(random.below(template.len() as u64) as usize) {
                    *byte ^= 1 << random.below(8);
                }
            }
        }
    }
    bytes
}

#[test]
fn parse_request_random_and_mutated_inputs_never_panic() {
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let templates = valid_requests();
    let mut parsed = 0;
    for round in 0..50_000 {
        let bytes = if round % 2 == 0 {
            let index = random.below(templates.len() as u64) as usize;
            mutate(&mut random, &templates[index])
        } else {
            (0..random.below(96)).map(|_| random.next() as u8).collect()
        };
        if let Ok(request) = parse_request(&bytes) {
            parsed += 1;
            // Whatever parses must survive the encoder too.
            let mut out = Vec::new();
            Response::Error(ErrorCode::Unspec).encode(&request.header, &mut out);
            assert_eq!(out.len(), HEADER_SIZE);
        }
    }
    assert!(parsed > 10_000, "the mutator should mostly keep requests parseable ({parsed})");
}

#[test]
fn device_survives_random_command_sequences() {
    let mut random = Random(0x1234_5678_9abc_def1);
    let templates = valid_requests();
    for session in 0..20 {
        let mut harness = Harness::new();
        for step in 0..400 {
            let template = &templates[random.below(templates.len() as u64) as usize];
            let bytes = if random.below(3) == 0 { template.clone() } else { mutate(&mut random, template) };
            // Mostly straight into the device (fast); every tenth through a real chain.
            if step % 10 == 0 {
                let reply = if random.below(4) == 0 { harness.send_cursor(&bytes) } else { harness.send(&bytes) };
                assert!(reply.used_len as usize >= HEADER_SIZE, "session {session} step {step}");
            } else if let Ok(request) = parse_request(&bytes) {
                harness.gpu.execute(&request.command);
            }
            if step % 50 == 0 {
                let screen = harness.gpu.screen();
                let options = CaptureOptions {
                    format: CaptureFormat::Qoi,
                    crop: (random.below(2) == 0)
                        .then(|| Rect::new(random.field(), random.field(), random.field(), random.field())),
                    scale: (random.below(2) == 0).then(|| (random.below(100) as u32, random.below(100) as u32)),
                    cursor: random.below(2) == 0,
                };
                let _ = screen.capture(&options);
            }
        }
        assert!(harness.gpu.resource_bytes() <= crate::device::DEFAULT_MAX_RESOURCE_BYTES);
    }
}

//! Screen benchmark: screenshots of a 1280x800 desktop-like frame in guest RAM.
//!
//! All in one run, on one frame held in a memfd-backed `GuestMemoryMmap` (built the way
//! carrel-vmm builds guest RAM):
//! - zero copy: a resource whose backing is viewed in place through carrel-gpu's scanout
//!   view: lending the raw pixels, copying them out, PNG, QOI, PNG scaled to 640x400;
//! - copy (the crosvm 2D path): the same pixels behind a resource whose backing cannot be
//!   viewed in place, so each capture first copies the guest pages into a host buffer
//!   (TRANSFER_TO_HOST_2D) and then encodes;
//! - Xvfb baseline (what agents use today): the same picture on an Xvfb screen, captured
//!   with `xwd -root` and converted with `xwdtopnm | pnmtopng`. Skipped with a note when
//!   Xvfb, xwd, xwud or netpbm are missing (Debian: xvfb x11-apps netpbm).
//!
//! `--runs N` scales the iteration counts (default 1 = 2000 lends, 50 PNGs, ...).

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use carrel_gpu::memory::{GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use carrel_gpu::protocol::{Command as GpuCommand, MemoryEntry, Rect, Response};
use carrel_gpu::{CaptureFormat, CaptureOptions, Gpu, GpuConfig};
use carrel_perf::{report, Summary};
use serde_json::{json, Value};
use vm_memory::{Bytes, FileOffset, GuestAddress};

const WIDTH: u32 = 1280;
const HEIGHT: u32 = 800;
const FRAME_BYTES: u64 = WIDTH as u64 * HEIGHT as u64 * 4;
const RAM_BYTES: u64 = 64 << 20;
/// Guest-physical address of the frame (page aligned).
const FRAME_GPA: u64 = 16 << 20;
const ZERO_COPY_RESOURCE: u32 = 1;
const COPY_RESOURCE: u32 = 2;
const B8G8R8X8: u32 = 2;

/// Guest RAM as carrel-vmm's memory.rs makes it: one memfd, mapped MAP_SHARED.
fn guest_ram() -> anyhow::Result<GuestMemoryMmap> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"carrel-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        bail!("memfd_create: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let memfd = unsafe { File::from_raw_fd(fd) };
    memfd.set_len(RAM_BYTES)?;
    let region = MmapRegion::from_file(FileOffset::new(memfd, 0), RAM_BYTES as usize)?;
    let region = GuestRegionMmap::new(region, GuestAddress(0)).context("guest region")?;
    Ok(GuestMemoryMmap::from_regions(vec![region])?)
}

/// A deterministic desktop-like picture as B8G8R8X8: gradient wallpaper, icons, three
/// windows with title bars and text-like glyph noise, a taskbar.
fn desktop_frame() -> Vec<u8> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (w, h) = (WIDTH as usize, HEIGHT as usize);
    let mut rgb = vec![[0u8; 3]; w * h];
    for y in 0..h {
        for x in 0..w {
            rgb[y * w + x] = [(20 + y * 60 / h) as u8, (60 + x * 40 / w) as u8, (120 + y * 100 / h) as u8];
        }
    }
    let fill = |rgb: &mut Vec<[u8; 3]>, x0: usize, y0: usize, fw: usize, fh: usize, colour: [u8; 3]| {
        for y in y0..(y0 + fh).min(h) {
            for x in x0..(x0 + fw).min(w) {
                rgb[y * w + x] = colour;
            }
        }
    };
    for icon in 0..6 {
        let colour = [(random() % 200) as u8 + 40, (random() % 200) as u8 + 40, (random() % 200) as u8 + 40];
        fill(&mut rgb, 24, 24 + icon * 90, 48, 48, colour);
    }
    for (x0, y0, ww, wh) in [(120, 60, 700, 480), (560, 240, 620, 420), (200, 420, 420, 300)] {
        fill(&mut rgb, x0, y0, ww, 28, [50, 90, 160]);
        fill(&mut rgb, x0, y0 + 28, ww, wh - 28, [246, 246, 246]);
        // Lines of "text": words of glyph-sized clusters of dark pixels.
        let mut line_y = y0 + 40;
        while line_y + 12 < y0 + wh {
            let mut x = x0 + 12;
            let line_end = x0 + ww - 12 - (random() % (ww as u64 / 3)) as usize;
            while x + 8 < line_end {
                for _ in 0..(3 + random() % 7) {
                    for dy in 0..12 {
                        let bits = random();
                        for dx in 0..7 {
                            if bits >> (dx * 3) & 7 < 2 && line_y + dy < h && x + dx < w {
                                rgb[(line_y + dy) * w + x + dx] = [30, 30, 30];
                            }
                        }
                    }
                    x += 8;
                }
                x += 8;
            }
            line_y += 18;
        }
    }
    fill(&mut rgb, 0, h - 40, w, 40, [32, 32, 36]);
    for button in 0..8 {
        fill(&mut rgb, 8 + button * 52, h - 34, 44, 28, [70, 70, 80]);
    }
    rgb.iter().flat_map(|&[r, g, b]| [b, g, r, 0]).collect()
}

fn run(gpu: &mut Gpu, command: GpuCommand) -> anyhow::Result<()> {
    match gpu.execute(&command) {
        Response::OkNoData => Ok(()),
        other => bail!("{command:?} answered {other:?}"),
    }
}

fn show(gpu: &mut Gpu, resource_id: u32) -> anyhow::Result<()> {
    run(gpu, GpuCommand::SetScanout { rect: Rect::new(0, 0, WIDTH, HEIGHT), scanout_id: 0, resource_id })
}

/// Times `iterations` calls of `f` after `warmup` untimed ones.
fn time(iterations: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Summary> {
    for _ in 0..(iterations / 10).max(1) {
        f()?;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        f()?;
        samples.push(start.elapsed());
    }
    Summary::of(&samples).context("no samples")
}

fn capture_with(gpu: &Gpu, options: CaptureOptions) -> anyhow::Result<usize> {
    Ok(gpu.screen().capture(&options)?.bytes.len())
}

const PNG: CaptureOptions = CaptureOptions { format: CaptureFormat::Png, crop: None, scale: None, cursor: false };
const QOI: CaptureOptions = CaptureOptions { format: CaptureFormat::Qoi, crop: None, scale: None, cursor: false };
const RAW: CaptureOptions = CaptureOptions { format: CaptureFormat::Raw, crop: None, scale: None, cursor: false };
const PNG_640: CaptureOptions =
    CaptureOptions { format: CaptureFormat::Png, crop: None, scale: Some((640, 400)), cursor: false };

/// An X server on a free display, ended on drop.
struct Xvfb {
    child: Child,
    display: String,
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Writes `frame` (B8G8R8X8) as an XWD file, the format xwud displays.
fn write_xwd(path: &std::path::Path, frame: &[u8]) -> anyhow::Result<()> {
    let name = b"carrel\0";
    let header_size = 100 + name.len() as u32;
    let fields: [u32; 25] = [
        header_size,
        7,
        2,
        24,
        WIDTH,
        HEIGHT,
        0,
        0,
        32,
        0,
        32,
        32,
        WIDTH * 4,
        4,
        0xff_0000,
        0xff00,
        0xff,
        8,
        256,
        0,
        WIDTH,
        HEIGHT,
        0,
        0,
        0,
    ];
    let mut file = std::io::BufWriter::new(File::create(path)?);
    for field in fields {
        file.write_all(&field.to_be_bytes())?;
    }
    file.write_all(name)?;
    file.write_all(frame)?;
    Ok(file.flush()?)
}

/// One `xwd -root | xwdtopnm | pnmtopng`; returns the PNG's size.
fn xwd_png(display: &str) -> anyhow::Result<usize> {
    let out = Command::new("sh")
        .args(["-c", &format!("xwd -root -silent -display {display} | xwdtopnm 2>/dev/null | pnmtopng 2>/dev/null")])
        .output()?;
    if !out.status.success() || out.stdout.len() < 8 {
        bail!("xwd | xwdtopnm | pnmtopng failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout.len())
}

/// The Xvfb rows, or the reason they were skipped.
fn xvfb_baseline(frame: &[u8], runs: usize) -> anyhow::Result<Value> {
    for tool in ["Xvfb", "xwd", "xwud", "xwdtopnm", "pnmtopng"] {
        if !have(tool) {
            return Ok(json!({ "skipped": format!("{tool} not installed (apt-get install xvfb x11-apps netpbm)") }));
        }
    }
    let dir = std::env::temp_dir().join(format!("carrel-screen-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let xwd_path = dir.join("frame.xwd");
    write_xwd(&xwd_path, frame)?;
    let display = format!(":{}", 90 + std::process::id() % 100);
    let child = Command::new("Xvfb")
        .args([&display, "-screen", "0", &format!("{WIDTH}x{HEIGHT}x24"), "-nolisten", "tcp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start Xvfb")?;
    let xvfb = Xvfb { child, display };
    // Wait (bounded) for the server, then show the same picture full screen with xwud.
    let deadline = Instant::now() + Duration::from_secs(10);
    while xwd_png(&xvfb.display).is_err() {
        if Instant::now() > deadline {
            return Ok(json!({ "skipped": "Xvfb did not come up within 10 s" }));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut viewer = Command::new("xwud")
        .args(["-in", &xwd_path.to_string_lossy(), "-display", &xvfb.display, "-noclick"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start xwud")?;
    // The picture is on screen once the PNG of the root window stops being tiny (the
    // empty root compresses to almost nothing).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut shown = false;
    while Instant::now() < deadline {
        if xwd_png(&xvfb.display)? > 20_000 {
            shown = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut png_bytes = 0;
    let summary = time(10 * runs, || {
        png_bytes = xwd_png(&xvfb.display)?;
        Ok(())
    });
    let _ = viewer.kill();
    let _ = viewer.wait();
    drop(xvfb);
    let _ = std::fs::remove_dir_all(&dir);
    let summary = summary?;
    Ok(json!({
        "command": "xwd -root | xwdtopnm | pnmtopng",
        "picture_shown": shown,
        "png_bytes": png_bytes,
        "time": summary.to_json_ms(),
        "median_ms": summary.median.as_secs_f64() * 1e3,
    }))
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut runs = 1usize;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            other => bail!("unknown argument {other} (usage: screen [--runs N])"),
        }
    }

    let memory = guest_ram()?;
    let frame = desktop_frame();
    memory.write_slice(&frame, GuestAddress(FRAME_GPA))?;
    let mut gpu = Gpu::new(GpuConfig::new(WIDTH, HEIGHT)?, memory.clone())?;
    let metrics = gpu.metrics();

    // Resource 1: one page-aligned run of guest RAM, viewed in place.
    run(
        &mut gpu,
        GpuCommand::ResourceCreate2d {
            resource_id: ZERO_COPY_RESOURCE,
            format: B8G8R8X8,
            width: WIDTH,
            height: HEIGHT,
        },
    )?;
    let entries = vec![MemoryEntry { addr: FRAME_GPA, length: FRAME_BYTES as u32 }];
    run(&mut gpu, GpuCommand::ResourceAttachBacking { resource_id: ZERO_COPY_RESOURCE, entries })?;
    // Resource 2: the same bytes, but the first entry ends mid-page, so the device cannot
    // view it in place and copies on each transfer (crosvm's 2D path).
    run(
        &mut gpu,
        GpuCommand::ResourceCreate2d { resource_id: COPY_RESOURCE, format: B8G8R8X8, width: WIDTH, height: HEIGHT },
    )?;
    let entries = vec![
        MemoryEntry { addr: FRAME_GPA, length: 2048 },
        MemoryEntry { addr: FRAME_GPA + 2048, length: FRAME_BYTES as u32 - 2048 },
    ];
    run(&mut gpu, GpuCommand::ResourceAttachBacking { resource_id: COPY_RESOURCE, entries })?;
    let zero_copy = metrics.zero_copy_resources.load(std::sync::atomic::Ordering::Relaxed);
    let copied = metrics.copy_fallback_resources.load(std::sync::atomic::Ordering::Relaxed);
    if (zero_copy, copied) != (1, 1) {
        bail!("expected one zero-copy and one copy resource, got {zero_copy} and {copied}");
    }
    let full = Rect::new(0, 0, WIDTH, HEIGHT);
    let transfer = GpuCommand::TransferToHost2d { rect: full, offset: 0, resource_id: COPY_RESOURCE };

    // Zero copy.
    show(&mut gpu, ZERO_COPY_RESOURCE)?;
    run(&mut gpu, GpuCommand::ResourceFlush { rect: full, resource_id: ZERO_COPY_RESOURCE })?;
    if gpu.screen().scanout_is_zero_copy() != Some(true) {
        bail!("the zero-copy resource is not viewed in place");
    }
    let screen = gpu.screen();
    let lend = time(2000 * runs, || {
        let (stride, pointer) = screen.with_pixels(|pixels, _| (pixels.stride(), pixels.as_ptr() as usize))?;
        std::hint::black_box((stride, pointer));
        Ok(())
    })?;
    let mut sizes = serde_json::Map::new();
    for (name, options) in [("png", PNG), ("qoi", QOI), ("png_640x400", PNG_640)] {
        sizes.insert(name.into(), json!(capture_with(&gpu, options)?));
    }
    let png_scaled = time(50 * runs, || capture_with(&gpu, PNG_640).map(drop))?;

    // Zero copy against the copy path (transfer: copy the guest pages into the host
    // buffer, then the same encoder), interleaved iteration by iteration so that other
    // load on the machine falls on both alike.
    show(&mut gpu, COPY_RESOURCE)?;
    run(&mut gpu, transfer.clone())?;
    let same = gpu.screen().capture(&RAW)?.bytes == frame;
    let transfer_only = time(50 * runs, || run(&mut gpu, transfer.clone()))?;
    let mut side_by_side = |options: CaptureOptions, iterations: usize| -> anyhow::Result<(Summary, Summary)> {
        let (mut zero, mut copy) = (Vec::new(), Vec::new());
        for iteration in 0..iterations + iterations / 10 {
            show(&mut gpu, ZERO_COPY_RESOURCE)?;
            let start = Instant::now();
            capture_with(&gpu, options)?;
            let zero_time = start.elapsed();
            show(&mut gpu, COPY_RESOURCE)?;
            let start = Instant::now();
            run(&mut gpu, transfer.clone())?;
            capture_with(&gpu, options)?;
            let copy_time = start.elapsed();
            // The first tenth warms caches and is not counted.
            if iteration >= iterations / 10 {
                zero.push(zero_time);
                copy.push(copy_time);
            }
        }
        Ok((Summary::of(&zero).context("no samples")?, Summary::of(&copy).context("no samples")?))
    };
    let (raw_copy, raw_copy_path) = side_by_side(RAW, 100 * runs)?;
    let (png_zero, png_copy) = side_by_side(PNG, 50 * runs)?;
    let (qoi_zero, qoi_copy) = side_by_side(QOI, 50 * runs)?;
    let zero_copy_rows = json!({
        "png": png_zero.to_json_ms(),
        "qoi": qoi_zero.to_json_ms(),
        "png_640x400": png_scaled.to_json_ms(),
    });

    let xvfb = xvfb_baseline(&frame, runs)?;

    let ms = |s: &Summary| s.median.as_secs_f64() * 1e3;
    let ratio = |a: f64, b: f64| if b > 0.0 { (a / b * 100.0).round() / 100.0 } else { 0.0 };
    let mut ratios = json!({
        "png_copy_path_over_zero_copy": ratio(ms(&png_copy), ms(&png_zero)),
        "qoi_copy_path_over_zero_copy": ratio(ms(&qoi_copy), ms(&qoi_zero)),
        "raw_copy_path_over_raw_view_lend": ratio(ms(&raw_copy_path), ms(&lend)),
        "raw_copy_path_over_raw_copy_out": ratio(ms(&raw_copy_path), ms(&raw_copy)),
        "png_over_qoi": ratio(ms(&png_zero), ms(&qoi_zero)),
    });
    if let Some(xvfb_ms) = xvfb.get("median_ms").and_then(Value::as_f64) {
        ratios["xvfb_xwd_png_over_zero_copy_png"] = json!(ratio(xvfb_ms, ms(&png_zero)));
        ratios["xvfb_xwd_png_over_zero_copy_qoi"] = json!(ratio(xvfb_ms, ms(&qoi_zero)));
    }
    let targets = json!({
        "raw_view_under_50us": lend.median < Duration::from_micros(50),
        "png_under_8ms": png_zero.median < Duration::from_millis(8),
        "qoi_under_3ms": qoi_zero.median < Duration::from_millis(3),
    });
    let path = report(
        "screen",
        json!({
            "frame": { "width": WIDTH, "height": HEIGHT, "format": "B8G8R8X8", "content": "desktop-like: gradient, icons, windows with glyph noise, taskbar" },
            "zero_copy": {
                "raw_view_lend": lend.to_json_us(),
                "raw_copy_out": raw_copy.to_json_us(),
                "by_format": zero_copy_rows,
                "encoded_bytes": sizes,
            },
            "copy_path": {
                "note": "TRANSFER_TO_HOST_2D of the full frame into a host buffer, then the same encoder; interleaved with the zero-copy rows",
                "copied_pixels_match": same,
                "transfer_only": transfer_only.to_json_us(),
                "transfer_then_raw": raw_copy_path.to_json_us(),
                "transfer_then_png": png_copy.to_json_ms(),
                "transfer_then_qoi": qoi_copy.to_json_ms(),
            },
            "xvfb_baseline": xvfb,
            "ratios": ratios,
            "targets_met": targets,
        }),
    )?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

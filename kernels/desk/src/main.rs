//! Desk: Carrel's own guest kernel. No std; runs native on the paravirtual kvm_pvm (VIF
//! page) and on hardware KVM alike.
//!
//! It prints a banner with the BootInfo summary, reads entropy from virtio-rng, starts the
//! LAPIC timer and says `desk: ready`. With `desk.exit=1` on the command line it counts
//! ten 1 kHz timer interrupts and powers off; otherwise it brings up the screen, input,
//! the disks (the file store on disk 0, see `disks`) and the guest agent and serves them
//! from one loop until the VMM stops it. The loop is woken by device interrupts and by a
//! one-shot timer set for its next deadline only (`time`), so an idle Desk costs the host
//! next to nothing; `desk.tick=periodic` wakes it every millisecond instead. A restored
//! VM goes on in that loop without booting again: the loop notices the restore count in
//! BootInfo change, draws fresh entropy and carries its uptime over.

#![no_std]
#![no_main]

extern crate alloc;

mod agent;
mod blk;
mod console;
mod desktop;
mod diskbench;
mod disks;
mod draw;
mod files;
mod gpu;
mod heap;
mod input;
mod interrupts;
mod ioapic;
mod lapic;
mod mem;
mod phys;
mod time;
mod ui;
mod virtio;
mod vsock;

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::Ordering;

use carrel_firmware::{ports, virtio_id, BootInfo, BOOT_INFO_VERSION, DESK_NOTE_TYPE};
use console::Hex;
use desktop::Desktop;
use interrupts::{Platform, TICKS, TIMER_VECTOR};
use time::{Clock, Timer, TimerMode};

const STACK_SIZE: usize = 64 * 1024;

global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
    _start:
        lea rsp, [rip + {stack} + {stack_size}]
        xor ebp, ebp
        call desk_main
    1:  hlt
        jmp 1b

    .section .note.carrel, "a"
    .balign 4
    .long 7
    .long 4
    .long {note_type}
    .asciz "Carrel"
    .balign 4
    .long {version}
    .balign 4
    "#,
    stack = sym STACK,
    stack_size = const STACK_SIZE,
    note_type = const DESK_NOTE_TYPE,
    version = const BOOT_INFO_VERSION,
);

#[repr(C, align(16))]
struct Stack([u8; STACK_SIZE]);

#[no_mangle]
static mut STACK: Stack = Stack([0; STACK_SIZE]);

/// A static the single-threaded kernel mutates: one vCPU, and interrupt handlers touch
/// only atomics, so there is never a second live reference.
pub struct GuestCell<T>(UnsafeCell<T>);

// SAFETY: Desk runs on one vCPU; see the type's comment.
unsafe impl<T> Sync for GuestCell<T> {}

impl<T> GuestCell<T> {
    pub const fn new(value: T) -> GuestCell<T> {
        GuestCell(UnsafeCell::new(value))
    }

    #[allow(clippy::mut_from_ref)]
    pub fn get(&self) -> &mut T {
        // SAFETY: single vCPU, and callers do not hold the reference across calls that
        // take it again (see the type's comment).
        unsafe { &mut *self.0.get() }
    }
}

static PLATFORM: GuestCell<Platform> = GuestCell::new(Platform::Hardware);

pub fn platform() -> Platform {
    *PLATFORM.get()
}

pub fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags)) };
    (u64::from(high) << 32) | u64::from(low)
}

/// Ends the VM: the byte written to the power port becomes the VMM's exit code.
pub fn power_off(code: u8) -> ! {
    console::flush();
    loop {
        // SAFETY: a port write to the VMM's power port; hlt in case the VMM is slow to act.
        unsafe {
            asm!("out dx, al", in("dx") ports::POWER, in("al") code, options(nomem, nostack, preserves_flags));
            asm!("hlt", options(nomem, nostack));
        }
    }
}

/// The prebuilt `alloc` for this target has unwinding landing pads that call this. Desk
/// panics by aborting (the panic handler powers off), so no unwind ever starts and this
/// is never reached; it exists so the kernel links.
#[no_mangle]
extern "C" fn _Unwind_Resume() -> ! {
    println!("desk: unexpected unwind");
    power_off(6)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("desk: panic: {info}");
    power_off(5)
}

fn cmdline(info: &BootInfo) -> &'static str {
    let len = (info.cmdline_len as usize).min(carrel_firmware::layout::CMDLINE_MAX);
    // SAFETY: the VMM wrote `cmdline_len` bytes at `cmdline_addr` in identity-mapped RAM
    // and never changes them.
    let bytes = unsafe { core::slice::from_raw_parts(info.cmdline_addr as *const u8, len) };
    core::str::from_utf8(bytes).unwrap_or("")
}

fn microseconds(cycles: u64, tsc_khz: u64) -> u64 {
    (cycles * 1000).checked_div(tsc_khz).unwrap_or(0)
}

#[no_mangle]
extern "C" fn desk_main(boot_info: u64) -> ! {
    let start = rdtsc();
    // SAFETY: rdi holds the BootInfo address the VMM wrote; checked for magic and version
    // before any other field is trusted.
    let info: &BootInfo = unsafe { &*(boot_info as *const BootInfo) };
    if !info.is_valid() {
        println!("desk: BootInfo at {boot_info:#x} is not version {BOOT_INFO_VERSION}; cannot boot");
        power_off(3);
    }
    let kind = info.platform_kind();
    *PLATFORM.get() = Platform::new(kind.unwrap_or(carrel_firmware::PlatformKind::Hardware), info.vif_addr);
    let platform = platform();
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };

    println!("desk: Carrel Desk kernel {} (BootInfo v{})", env!("CARGO_PKG_VERSION"), info.version);
    match kind {
        Some(carrel_firmware::PlatformKind::Pvm) => {
            println!("desk: platform pvm: running native (VIF page at {:#x}, cpl {})", info.vif_addr, cs & 3)
        }
        _ => println!("desk: platform hardware KVM (cpl {})", cs & 3),
    }
    let usable: u64 = info
        .memory_ranges()
        .iter()
        .filter(|range| range.kind == carrel_firmware::memory_kind::USABLE)
        .map(|range| range.size)
        .sum();
    println!(
        "desk: memory {} MiB usable in {} ranges; kernel ends at {:#x}; {} vCPU(s); TSC {} kHz",
        usable >> 20,
        info.memory_ranges().len(),
        info.kernel_end,
        info.vcpu_count,
        info.tsc_khz
    );
    for device in info.devices() {
        println!("desk: device virtio type {} at {:#x} irq {}", device.device_type, device.base, device.irq);
    }
    let cmdline = cmdline(info);
    println!("desk: cmdline \"{cmdline}\"");

    phys::init(info);
    interrupts::install_idt(info.idt_addr);
    lapic::enable(info.lapic_addr);

    let tsc_khz = match info.tsc_khz {
        0 => {
            let measured = lapic::measure_tsc_khz();
            println!("desk: the VMM gave no TSC rate; measured {measured} kHz against the APIC timer");
            measured
        }
        given => given,
    };
    let timeout = if tsc_khz == 0 { 5_000_000_000 } else { tsc_khz * 1000 };
    // The device is kept: every restore draws fresh bytes from it.
    let mut rng = start_rng(info);
    let mut random = None;
    if let Some(device) = rng.as_mut() {
        match device.draw(timeout) {
            Ok(bytes) => {
                println!("desk: rng {} bytes: {}", bytes.len(), Hex(&bytes));
                random = Some(bytes);
            }
            Err(err) => println!("desk: rng failed: {err:?}"),
        }
    }

    // `desk.exit=1` counts the ticks of the periodic timer, whatever else is asked.
    let exit_after_ticks = cmdline.split(' ').any(|argument| argument == "desk.exit=1");
    let mode = if exit_after_ticks { TimerMode::Periodic } else { TimerMode::from_cmdline(cmdline) };
    let mut clock = Clock::start(tsc_khz);
    let mut timer = Timer::start(mode, TIMER_VECTOR);
    platform.enable_interrupts();
    println!("desk: timer {}", timer.describe());
    println!("desk: ready ({} us since entry)", microseconds(rdtsc() - start, tsc_khz));

    let mut screen = start_screen(info, timeout);
    // Input devices come up before the first frame: a frame on screen means the desktop
    // takes clicks and keys.
    let mut inputs = start_inputs(info);
    let mut desktop = Desktop::new();
    if let Some(display) = screen.as_mut() {
        let full = display.full();
        let started = rdtsc();
        // Interrupts are on here (the loop below keeps them off while it works): this
        // first wait spins.
        let _ = draw_frame(display, &desktop, full, &mut || core::hint::spin_loop());
        let took = microseconds(rdtsc() - started, tsc_khz);
        println!("desk: screen {}x{} first frame drawn in {took} us", display.width, display.height);
    }

    let vsock = start_vsock(info, timeout);
    // Device buffers the host reads (framebuffers, vsock rings) are taken first and
    // nothing takes physical memory later, so the heap (agent messages, files, `fill`
    // buffers) gets the largest block left: nearly all of guest RAM. Its pages are only
    // touched when used, so an idle heap costs the host nothing.
    match phys::allocate_largest() {
        Some((start, size)) => heap::init(start, size),
        None => println!("desk: no memory for a heap"),
    }
    // The store needs the heap (its file table, the data of each put). The vsock device is
    // up already (it takes physical memory before the heap does); the agent is not.
    let (store, raw_disks) = disks::start(info, cmdline);
    let files = store.map_or_else(files::Files::in_memory, |store| files::Files::Disk(alloc::boxed::Box::new(store)));
    // Said only now, after the disk line: a host that connects on this line finds the
    // agent's files where they will stay.
    let mut agent_link = vsock.map(|vsock| {
        println!("desk: agent listening on vsock port {} (cid {})", carrel_agent_proto::AGENT_VSOCK_PORT, vsock.cid);
        (vsock, agent::Agent::new(random, files, raw_disks, tsc_khz))
    });
    let mut input_state = ui::InputState::default();
    let mut input_events = alloc::vec::Vec::new();

    if exit_after_ticks {
        count_ticks_and_power_off(platform, tsc_khz);
    }
    let mut events = alloc::vec::Vec::new();
    // A fresh boot is restore 0. Starting from 0 rather than from a read now also catches
    // a snapshot taken while Desk was still starting.
    let mut restores_seen = 0;
    // The uptime this loop last saw: where the clock goes on from after a restore.
    let mut last_ms = 0;
    loop {
        // Interrupts stay off while the loop works: handlers only count, and every device
        // is polled here. One that arrives meanwhile stays pending and ends the wait at
        // the bottom of the loop at once, so no wake is lost.
        platform.disable_interrupts();
        // Checked before the time is read and the agent runs, so this same wake already
        // has the carried-over uptime and the new entropy.
        let restores = read_restores(boot_info);
        if restores != restores_seen {
            restores_seen = restores;
            clock.resume_at(last_ms);
            timer.forget_armed();
            let random = draw_after_restore(rng.as_mut(), restores, timeout);
            if let Some((_, agent)) = agent_link.as_mut() {
                agent.set_random(random);
            }
        }
        let now_ms = clock.now_ms();
        last_ms = now_ms;
        if let Some((vsock, agent)) = agent_link.as_mut() {
            vsock.poll(&mut events);
            for event in events.drain(..) {
                agent.handle(event, vsock, now_ms);
            }
            agent.tick(vsock, now_ms);
        }
        let mut damage: Option<gpu::Rect> = None;
        if let Some(display) = screen.as_ref() {
            for device in inputs.iter_mut().flatten() {
                device.poll(&mut input_events);
            }
            for event in input_events.drain(..) {
                if let Some(rect) = input_state.apply(event, &mut desktop, display.width, display.height) {
                    damage = Some(union(damage, rect));
                }
            }
        }
        let seconds = now_ms / 1000;
        if seconds != desktop.uptime_seconds {
            desktop.uptime_seconds = seconds;
            if let Some(display) = screen.as_ref() {
                damage = Some(union(damage, desktop::clock_rect(display.width)));
            }
        }
        if let (Some(display), Some(damage)) = (screen.as_mut(), damage) {
            // The vCPU sleeps while the VMM draws: until the device's interrupt, or the
            // timer as a bound (the wait itself gives up after `timeout`).
            let mut sleep = || {
                timer.wake_within(DEVICE_WAIT_STEP_NANOSECONDS);
                platform.wait_for_interrupt();
                platform.disable_interrupts();
            };
            if !draw_frame(display, &desktop, damage, &mut sleep) {
                screen = None;
            }
        }
        // Everything else that can happen arrives as a device interrupt.
        let clock_deadline = screen.is_some().then(|| (seconds + 1) * 1000);
        let agent_deadline = agent_link.as_ref().and_then(|(_, agent)| agent.next_deadline_ms());
        timer.wake_at(&clock, time::earliest(clock_deadline, agent_deadline));
        platform.wait_for_interrupt();
    }
}

fn start_rng(info: &BootInfo) -> Option<virtio::Rng> {
    let Some(device) = info.devices().iter().find(|device| device.device_type == virtio_id::ENTROPY) else {
        println!("desk: no rng device");
        return None;
    };
    match virtio::Rng::new(device.base) {
        Ok(rng) => Some(rng),
        Err(err) => {
            println!("desk: rng failed: {err:?}");
            None
        }
    }
}

/// How many times this VM was restored, as the VMM last wrote it into BootInfo.
fn read_restores(boot_info: u64) -> u64 {
    let info = boot_info as *const BootInfo;
    // SAFETY: `boot_info` is the BootInfo block checked at entry, identity mapped for the
    // kernel's lifetime; the VMM rewrites `restores` behind the compiler's back (while the
    // vCPU is stopped), so it is read volatile through a raw pointer, never a reference.
    unsafe { core::ptr::addr_of!((*info).restores).read_volatile() }
}

/// Draws fresh entropy after a restore and says so on the console. A clone of a snapshot
/// must not repeat the bytes of its siblings, so when the draw fails the old bytes are
/// dropped too (`None`), never kept.
fn draw_after_restore(rng: Option<&mut virtio::Rng>, restores: u64, timeout: u64) -> Option<[u8; 32]> {
    let Some(rng) = rng else {
        println!("desk: restored (restore {restores}); rng failed: no rng device");
        return None;
    };
    match rng.draw(timeout) {
        Ok(bytes) => {
            println!("desk: restored (restore {restores}); rng {} bytes: {}", bytes.len(), Hex(&bytes));
            Some(bytes)
        }
        Err(err) => {
            println!("desk: restored (restore {restores}); rng failed: {err:?}");
            None
        }
    }
}

fn start_vsock(info: &BootInfo, timeout: u64) -> Option<vsock::Vsock> {
    let device = info.devices().iter().find(|device| device.device_type == virtio_id::VSOCK)?;
    match vsock::Vsock::new(device.base, carrel_agent_proto::AGENT_VSOCK_PORT, timeout) {
        Ok(vsock) => {
            ioapic::route(info.ioapic_addr, device.irq);
            Some(vsock)
        }
        Err(err) => {
            println!("desk: vsock failed: {err:?}");
            None
        }
    }
}

/// The bounding box of two rectangles.
fn union(a: Option<gpu::Rect>, b: gpu::Rect) -> gpu::Rect {
    a.map_or(b, |a| a.union(b))
}

fn start_inputs(info: &BootInfo) -> [Option<input::InputDevice>; input::MAX_INPUT_DEVICES] {
    let mut devices: [Option<input::InputDevice>; input::MAX_INPUT_DEVICES] = Default::default();
    let found = info.devices().iter().filter(|device| device.device_type == virtio_id::INPUT);
    for (index, device) in found.take(input::MAX_INPUT_DEVICES).enumerate() {
        match input::InputDevice::new(device.base, index) {
            Ok(input) => {
                ioapic::route(info.ioapic_addr, device.irq);
                devices[index] = Some(input);
            }
            Err(err) => println!("desk: input device {index} failed: {err:?}"),
        }
    }
    let count = devices.iter().flatten().count();
    if count > 0 {
        println!("desk: {count} input device(s)");
    }
    devices
}

/// How long a sleep waiting for a device lasts at most before the waiter looks again.
const DEVICE_WAIT_STEP_NANOSECONDS: u64 = 5_000_000;

fn start_screen(info: &BootInfo, timeout: u64) -> Option<gpu::Display> {
    let device = info.devices().iter().find(|device| device.device_type == virtio_id::GPU)?;
    match gpu::Display::new(device.base, timeout) {
        Ok(display) => {
            // Its answers wake the desktop's frames (see the main loop).
            ioapic::route(info.ioapic_addr, device.irq);
            Some(display)
        }
        Err(err) => {
            println!("desk: screen failed: {err:?}");
            None
        }
    }
}

/// Renders the desktop into the back buffer where it is out of date (this frame's damage
/// and the previous frame's) and shows it; `damage` is the part that differs from the
/// previous frame.
/// Returns whether the display still works: a device that stopped answering (its host
/// side went away) is given up rather than waited on for every later frame.
fn draw_frame(display: &mut gpu::Display, desktop: &Desktop, damage: gpu::Rect, idle: &mut dyn FnMut()) -> bool {
    let (width, height) = (display.width, display.height);
    let redraw = display.redraw(damage);
    let mut canvas =
        draw::Canvas::clipped(display.back_buffer(), width, height, redraw.x, redraw.y, redraw.width, redraw.height);
    desktop::render(&mut canvas, desktop);
    match display.present(damage, idle) {
        Ok(()) => true,
        Err(err) => {
            println!("desk: frame {} failed: {err:?}; the screen is given up", display.frames + 1);
            false
        }
    }
}

fn count_ticks_and_power_off(platform: Platform, tsc_khz: u64) -> ! {
    let first = TICKS.load(Ordering::Relaxed);
    let start = rdtsc();
    let mut seen = first;
    while seen < first + 10 {
        platform.wait_for_interrupt();
        // Two interrupts may land before this loop looks (a busy host): each is
        // counted and said, at the time it was seen.
        let now = TICKS.load(Ordering::Relaxed).min(first + 10);
        while seen < now {
            seen += 1;
            println!("desk: tick {} at {} us", seen - first, microseconds(rdtsc() - start, tsc_khz));
        }
    }
    platform.disable_interrupts();
    lapic::stop_timer();
    println!("desk: 10 ticks in {} us; powering off", microseconds(rdtsc() - start, tsc_khz));
    power_off(0)
}

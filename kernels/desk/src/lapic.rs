//! The local APIC (xAPIC MMIO at BootInfo.lapic_addr): enable, the timer (periodic, or
//! one-shot for the next deadline), EOI.

use core::sync::atomic::{AtomicU64, Ordering};

const SPURIOUS: usize = 0xf0;
const EOI: usize = 0xb0;
const LVT_TIMER: usize = 0x320;
const LVT_LINT0: usize = 0x350;
const LVT_LINT1: usize = 0x360;
const TIMER_INITIAL: usize = 0x380;
const TIMER_CURRENT: usize = 0x390;
const TIMER_DIVIDE: usize = 0x3e0;
const MASKED: u32 = 1 << 16;
const PERIODIC: u32 = 1 << 17;
/// Timer mode bits 17-18 clear: the count runs down once and stops.
const ONE_SHOT: u32 = 0;
const APIC_ENABLE: u32 = 1 << 8;
const DIVIDE_BY_16: u32 = 0x3;
/// KVM's in-kernel APIC timer counts at 1 GHz (on kvm_pvm and hardware KVM alike);
/// divided by 16, one count is 16 ns and 62 500 counts are 1 ms.
const NANOSECONDS_PER_COUNT: u64 = 16;
const COUNTS_PER_MS: u32 = (1_000_000 / NANOSECONDS_PER_COUNT) as u32;

static BASE: AtomicU64 = AtomicU64::new(0);

fn write(register: usize, value: u32) {
    let base = BASE.load(Ordering::Relaxed);
    // SAFETY: BASE is the identity-mapped LAPIC page from BootInfo; registers are 32-bit
    // and 16-byte aligned at the offsets used here.
    unsafe { ((base as usize + register) as *mut u32).write_volatile(value) };
}

fn read(register: usize) -> u32 {
    let base = BASE.load(Ordering::Relaxed);
    // SAFETY: as in `write`.
    unsafe { ((base as usize + register) as *const u32).read_volatile() }
}

/// Enables the LAPIC with LINT0/LINT1 masked (the 8259 is never initialised).
pub fn enable(base: u64) {
    BASE.store(base, Ordering::Relaxed);
    write(LVT_LINT0, MASKED);
    write(LVT_LINT1, MASKED);
    write(SPURIOUS, APIC_ENABLE | u32::from(crate::interrupts::SPURIOUS_VECTOR));
}

/// Starts the periodic timer at `hz` interrupts per second on `vector`.
pub fn start_periodic_timer(vector: u8, hz: u32) {
    write(TIMER_DIVIDE, DIVIDE_BY_16);
    write(LVT_TIMER, PERIODIC | u32::from(vector));
    write(TIMER_INITIAL, COUNTS_PER_MS * 1000 / hz);
}

/// Puts the timer in one-shot mode on `vector`, not yet counting: [`arm_one_shot`]
/// starts each count.
pub fn start_one_shot_timer(vector: u8) {
    write(TIMER_DIVIDE, DIVIDE_BY_16);
    write(LVT_TIMER, ONE_SHOT | u32::from(vector));
    write(TIMER_INITIAL, 0);
}

/// The longest one-shot wait [`arm_one_shot`] programs: the 32-bit count at 16 ns
/// holds 68 s, and a later deadline is reached by waking once more on the way.
pub const MAX_ONE_SHOT_NANOSECONDS: u64 = 60_000_000_000;

/// Interrupts once, `nanoseconds` from now (at least one count, at most
/// [`MAX_ONE_SHOT_NANOSECONDS`]), replacing any count in progress.
pub fn arm_one_shot(nanoseconds: u64) {
    let counts = nanoseconds.min(MAX_ONE_SHOT_NANOSECONDS).div_ceil(NANOSECONDS_PER_COUNT).max(1);
    write(TIMER_INITIAL, counts as u32);
}

/// Stops a one-shot count in progress: nothing is due.
pub fn disarm_one_shot() {
    write(TIMER_INITIAL, 0);
}

pub fn stop_timer() {
    write(LVT_TIMER, MASKED);
    write(TIMER_INITIAL, 0);
}

/// The TSC rate measured against the APIC timer's 1 GHz, for a VMM that could not say it
/// (BootInfo.tsc_khz 0). Runs a masked one-shot count of 10 ms and polls it: nothing is
/// set up to take the interrupt yet, and this runs once at boot.
pub fn measure_tsc_khz() -> u64 {
    const MEASURE_MS: u32 = 10;
    write(TIMER_DIVIDE, DIVIDE_BY_16);
    write(LVT_TIMER, MASKED | ONE_SHOT | u32::from(crate::interrupts::TIMER_VECTOR));
    let start = crate::rdtsc();
    write(TIMER_INITIAL, COUNTS_PER_MS * MEASURE_MS);
    while read(TIMER_CURRENT) != 0 {
        core::hint::spin_loop();
    }
    let cycles = crate::rdtsc() - start;
    write(TIMER_INITIAL, 0);
    cycles / u64::from(MEASURE_MS)
}

pub fn end_of_interrupt() {
    write(EOI, 0);
}

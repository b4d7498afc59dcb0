//! The local APIC (xAPIC MMIO at BootInfo.lapic_addr): enable, periodic timer, EOI.

use core::sync::atomic::{AtomicU64, Ordering};

const SPURIOUS: usize = 0xf0;
const EOI: usize = 0xb0;
const LVT_TIMER: usize = 0x320;
const LVT_LINT0: usize = 0x350;
const LVT_LINT1: usize = 0x360;
const TIMER_INITIAL: usize = 0x380;
const TIMER_DIVIDE: usize = 0x3e0;
const MASKED: u32 = 1 << 16;
const PERIODIC: u32 = 1 << 17;
const APIC_ENABLE: u32 = 1 << 8;
const DIVIDE_BY_16: u32 = 0x3;
/// KVM's APIC timer counts at 1 GHz; divided by 16, 62 500 counts are 1 ms. The kernel
/// measures the real period against the TSC and reports it.
const COUNTS_PER_MS: u32 = 1_000_000_000 / 16 / 1000;

static BASE: AtomicU64 = AtomicU64::new(0);

fn write(register: usize, value: u32) {
    let base = BASE.load(Ordering::Relaxed);
    // SAFETY: BASE is the identity-mapped LAPIC page from BootInfo; registers are 32-bit
    // and 16-byte aligned at the offsets used here.
    unsafe { ((base as usize + register) as *mut u32).write_volatile(value) };
}

/// Enables the LAPIC with LINT0/LINT1 masked (the 8259 is never initialised).
pub fn enable(base: u64) {
    BASE.store(base, Ordering::Relaxed);
    write(LVT_LINT0, MASKED);
    write(LVT_LINT1, MASKED);
    write(SPURIOUS, APIC_ENABLE | u32::from(crate::interrupts::SPURIOUS_VECTOR));
}

/// Starts the periodic timer at `hz` interrupts per second on `vector`.
pub fn start_timer(vector: u8, hz: u32) {
    write(TIMER_DIVIDE, DIVIDE_BY_16);
    write(LVT_TIMER, PERIODIC | u32::from(vector));
    write(TIMER_INITIAL, COUNTS_PER_MS * 1000 / hz);
}

pub fn stop_timer() {
    write(LVT_TIMER, MASKED);
    write(TIMER_INITIAL, 0);
}

pub fn end_of_interrupt() {
    write(EOI, 0);
}

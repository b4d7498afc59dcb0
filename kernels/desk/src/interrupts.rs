//! Interrupts: the IDT the VMM pointed IDTR at, the entry stubs, and interrupt enable,
//! which differs by platform: RFLAGS.IF on hardware KVM, the VIF page byte on PVM
//! (`cli`/`sti` would trap there, ~6 µs each).

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use carrel_firmware::{PlatformKind, VifPage};

use crate::{lapic, println};

/// Vector of the LAPIC timer.
pub const TIMER_VECTOR: u8 = 32;
/// Vector of LAPIC spurious interrupts.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Timer interrupts taken since the timer started.
pub static TICKS: AtomicU64 = AtomicU64::new(0);
/// Other device interrupts taken.
pub static OTHER_INTERRUPTS: AtomicU64 = AtomicU64::new(0);

global_asm!(
    r#"
    .section .text
    .irp vector, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    desk_exception_\vector:
        push 0
        push \vector
        jmp desk_exception_common
    .endr
    .irp vector, 8,10,11,12,13,14,17,21,29,30
    desk_exception_\vector:
        push \vector
        jmp desk_exception_common
    .endr

    desk_exception_common:
        mov rdi, rsp
        and rsp, -16
        call desk_exception
    2:  hlt
        jmp 2b

    .macro SAVE_AND_CALL handler
        push rax
        push rcx
        push rdx
        push rsi
        push rdi
        push r8
        push r9
        push r10
        push r11
        lea rdi, [rsp + 72]
        call \handler
        pop r11
        pop r10
        pop r9
        pop r8
        pop rdi
        pop rsi
        pop rdx
        pop rcx
        pop rax
        iretq
    .endm

    .global desk_timer_entry
    desk_timer_entry:
        SAVE_AND_CALL desk_timer_interrupt

    .global desk_device_entry
    desk_device_entry:
        SAVE_AND_CALL desk_device_interrupt

    .global desk_spurious_entry
    desk_spurious_entry:
        iretq

    .global desk_pvm_idle
    desk_pvm_idle:
        mov byte ptr [rdi], 1
    .global desk_pvm_idle_window
    desk_pvm_idle_window:
        cmp byte ptr [rdi + 1], 0
        je 3f
        xor eax, eax
        out 0x80, al
    3:  hlt
    .global desk_pvm_idle_end
    desk_pvm_idle_end:
        ret

    .section .rodata
    .balign 8
    .global DESK_EXCEPTION_STUBS
    DESK_EXCEPTION_STUBS:
    .irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad desk_exception_\vector
    .endr
    "#
);

extern "C" {
    static DESK_EXCEPTION_STUBS: [u64; 32];
    fn desk_timer_entry();
    fn desk_device_entry();
    fn desk_spurious_entry();
    /// Enables interrupts through the VIF page at `vif` and halts until one arrives.
    fn desk_pvm_idle(vif: *mut VifPage);
    /// From here up to `desk_pvm_idle_end` (the hlt included), an interrupt taken leaves
    /// nothing to wake the hlt that follows.
    static desk_pvm_idle_window: u8;
    static desk_pvm_idle_end: u8;
}

/// What the CPU pushed, plus the vector and error code the stub pushed.
#[repr(C)]
pub struct ExceptionFrame {
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "divide error",
        3 => "breakpoint",
        6 => "invalid opcode",
        8 => "double fault",
        13 => "general protection fault",
        14 => "page fault",
        _ => "exception",
    }
}

#[no_mangle]
extern "C" fn desk_exception(frame: &ExceptionFrame) -> ! {
    let cr2 = crate::platform().page_fault_address();
    println!(
        "desk: {} (vector {}) at rip={:#x} error={:#x} cr2={:#x} rsp={:#x} cs={:#x}",
        exception_name(frame.vector),
        frame.vector,
        frame.rip,
        frame.error_code,
        cr2,
        frame.rsp,
        frame.cs
    );
    crate::power_off(4)
}

/// On PVM, enabling interrupts (a byte in the VIF page) and `hlt` are two instructions:
/// an interrupt delivered between them would run its handler and then leave the vCPU
/// halted until the next interrupt, which for a tickless kernel may be a second or more
/// away. So a handler that interrupted that window returns past the `hlt` instead:
/// `return_rip` is the saved RIP of the interrupt frame.
fn skip_halt_after_wake(return_rip: &mut u64) {
    // Taking the address of an extern static reads nothing, so needs no unsafe.
    let window = core::ptr::addr_of!(desk_pvm_idle_window) as u64;
    let end = core::ptr::addr_of!(desk_pvm_idle_end) as u64;
    if (window..end).contains(return_rip) {
        *return_rip = end;
    }
}

/// `return_rip` points at the saved RIP of the interrupt frame (the entry stub passes it).
#[no_mangle]
extern "C" fn desk_timer_interrupt(return_rip: &mut u64) {
    TICKS.fetch_add(1, Ordering::Relaxed);
    skip_halt_after_wake(return_rip);
    lapic::end_of_interrupt();
}

/// As [`desk_timer_interrupt`].
#[no_mangle]
extern "C" fn desk_device_interrupt(return_rip: &mut u64) {
    OTHER_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    skip_halt_after_wake(return_rip);
    lapic::end_of_interrupt();
}

/// Fills the IDT page at `idt_addr`: exception stubs for 0..32, the timer, a generic
/// device handler for the rest, and the spurious vector.
pub fn install_idt(idt_addr: u64) {
    let idt = idt_addr as *mut [u64; 2];
    #[allow(clippy::needless_range_loop)] // every vector gets a gate; only 0..32 index the stubs
    for vector in 0..256usize {
        let handler = match vector {
            // SAFETY: DESK_EXCEPTION_STUBS is a 32-entry table defined in the asm above.
            0..=31 => unsafe { DESK_EXCEPTION_STUBS[vector] },
            v if v == TIMER_VECTOR as usize => desk_timer_entry as *const () as u64,
            v if v == SPURIOUS_VECTOR as usize => desk_spurious_entry as *const () as u64,
            _ => desk_device_entry as *const () as u64,
        };
        let low = (handler & 0xffff)
            | (u64::from(carrel_firmware::layout::selector::CODE64) << 16)
            | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate
            | ((handler >> 16) & 0xffff) << 48;
        let high = handler >> 32;
        // SAFETY: the VMM reserved this zeroed page for the IDT (BootInfo.idt_addr) and
        // identity-maps it; vector < 256 keeps the write inside the page.
        unsafe { idt.add(vector).write_volatile([low, high]) };
    }
}

/// How this kernel enables interrupts, chosen once from BootInfo.
#[derive(Clone, Copy)]
pub enum Platform {
    Hardware,
    Pvm { vif: *mut VifPage },
}

impl Platform {
    pub fn new(kind: PlatformKind, vif_addr: u64) -> Platform {
        match kind {
            PlatformKind::Pvm if vif_addr != 0 => Platform::Pvm { vif: vif_addr as *mut VifPage },
            _ => Platform::Hardware,
        }
    }

    pub fn is_native_pvm(self) -> bool {
        matches!(self, Platform::Pvm { .. })
    }

    pub fn enable_interrupts(self) {
        match self {
            // SAFETY: sti only changes RFLAGS.IF; the IDT is installed before this is called.
            Platform::Hardware => unsafe { asm!("sti", options(nomem, nostack)) },
            Platform::Pvm { vif } => {
                // SAFETY: the VIF page is the identity-mapped page the VMM registered.
                unsafe {
                    core::ptr::addr_of_mut!((*vif).enabled).write_volatile(1);
                    if core::ptr::addr_of!((*vif).pending).read_volatile() != 0 {
                        // The doorbell: the host delivers what is pending (PLATFORM.md).
                        asm!("out 0x80, al", in("al") 0u8, options(nomem, nostack, preserves_flags));
                    }
                }
            }
        }
    }

    pub fn disable_interrupts(self) {
        match self {
            // SAFETY: cli only changes RFLAGS.IF.
            Platform::Hardware => unsafe { asm!("cli", options(nomem, nostack)) },
            // SAFETY: as in enable_interrupts.
            Platform::Pvm { vif } => unsafe { core::ptr::addr_of_mut!((*vif).enabled).write_volatile(0) },
        }
    }

    /// Enables interrupts and halts until one arrives.
    pub fn wait_for_interrupt(self) {
        match self {
            // SAFETY: `sti; hlt` is atomic: an interrupt cannot slip between them.
            Platform::Hardware => unsafe { asm!("sti", "hlt", options(nomem, nostack)) },
            // SAFETY: `vif` is the identity-mapped VIF page the VMM registered; the
            // routine enables interrupts there and halts, and an interrupt that lands
            // before the hlt skips it (`skip_halt_after_wake`).
            Platform::Pvm { vif } => unsafe { desk_pvm_idle(vif) },
        }
    }

    /// CR2 of the last page fault: from the VIF page on PVM, the register otherwise.
    pub fn page_fault_address(self) -> u64 {
        match self {
            // SAFETY: as in enable_interrupts.
            Platform::Pvm { vif } => unsafe { core::ptr::addr_of!((*vif).cr2).read_volatile() },
            Platform::Hardware => {
                let cr2: u64;
                // SAFETY: reading CR2 has no side effects.
                unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
                cr2
            }
        }
    }
}

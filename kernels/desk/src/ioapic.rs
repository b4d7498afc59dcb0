//! The IOAPIC: routes a device's interrupt line (GSI) to a vector on the boot CPU.

/// First vector used for device interrupts; GSI n arrives as `DEVICE_VECTOR_BASE + n`.
pub const DEVICE_VECTOR_BASE: u8 = 0x40;

const REGISTER_SELECT: usize = 0x00;
const WINDOW: usize = 0x10;
const REDIRECTION_TABLE: u32 = 0x10;

/// Unmasks `gsi`: edge triggered (irqfd pulses the line), active high, fixed delivery to
/// APIC id 0.
pub fn route(ioapic_base: u64, gsi: u32) {
    let vector = u32::from(DEVICE_VECTOR_BASE) + gsi;
    write(ioapic_base, REDIRECTION_TABLE + gsi * 2 + 1, 0);
    write(ioapic_base, REDIRECTION_TABLE + gsi * 2, vector);
}

fn write(base: u64, register: u32, value: u32) {
    // SAFETY: the IOAPIC window from BootInfo, identity mapped; select then data.
    unsafe {
        ((base as usize + REGISTER_SELECT) as *mut u32).write_volatile(register);
        ((base as usize + WINDOW) as *mut u32).write_volatile(value);
    }
}

//! Guest-physical memory layout at power-on, shared by every boot path.
//!
//! ```text
//! 0x0000_0500  GDT (built by the VMM)
//! 0x0000_1000  IDT page: zeroed, IDTR points here; the Desk kernel fills its gates
//! 0x0000_5000  VIF page (PVM only)
//! 0x0000_6000  PVH memory map table
//! 0x0000_7000  BootInfo (Desk) | boot_params (Linux) | hvm_start_info (PVH)
//! 0x0000_8ff0  boot stack top (grows down into 0x8000)
//! 0x0000_9000  page tables: PML4, PDPT, then one PD per GiB mapped
//! 0x0002_0000  kernel command line
//! 0x000e_0000  ACPI tables (Linux and PVH guests): RSDP first, then XSDT, FADT, MADT, DSDT
//! 0x0010_0000  high memory: kernels load at or above 1 MiB
//! 0xc000_0000  start of the MMIO gap (RAM resumes at 4 GiB)
//! 0xd000_0000  virtio-mmio windows, one page each
//! 0xfec0_0000  IOAPIC
//! 0xfee0_0000  LAPIC
//! ```

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x1000;
pub const IDT_SIZE: u64 = 0x1000;
pub const VIF_ADDR: u64 = 0x5000;
pub const PVH_MEMMAP_ADDR: u64 = 0x6000;
pub const BOOT_INFO_ADDR: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PAGE_TABLES_ADDR: u64 = 0x9000;
/// Most GiB the boot page tables identity-map (one page directory each).
pub const PAGE_TABLES_MAX_GIB: u64 = 16;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Start of the legacy EBDA/BIOS hole Linux expects to stay out of RAM.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI tables of Linux and PVH guests: the legacy BIOS area, where a kernel that
/// is not told the RSDP's address (boot protocol before 2.14) searches for it. Reported
/// as ACPI data in the e820 map; the Desk kernel gets no tables.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_SIZE: u64 = 0x2_0000;
pub const HIMEM_START: u64 = 0x10_0000;
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// GSI of the serial console (COM1's ISA IRQ).
pub const SERIAL_IRQ: u32 = 4;
/// GSI of the first virtio-mmio device; the next ones follow.
pub const FIRST_DEVICE_IRQ: u32 = 5;
/// Last GSI usable for devices (the IOAPIC has 24 pins).
pub const LAST_DEVICE_IRQ: u32 = 23;
/// Where the Desk kernel is linked and loaded.
pub const DESK_KERNEL_ADDR: u64 = 0x20_0000;

/// GDT selectors of the boot GDT: null, code64, data, code32 (PVH).
pub mod selector {
    pub const CODE64: u16 = 0x08;
    pub const DATA: u16 = 0x10;
    pub const CODE32: u16 = 0x18;
}

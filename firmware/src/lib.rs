//! The power-on contract between the Carrel VMM and its guests.
//!
//! This crate is `no_std` and has no dependencies: the VMM (host) and the Desk kernel
//! (guest) compile the same definitions, so the layout of guest-physical memory at boot,
//! the `BootInfo` block, the device table and the page-table rules cannot drift apart.
//!
//! Linux guests do not read `BootInfo`: they get the Linux boot protocol (boot_params,
//! e820, command line) or PVH (`hvm_start_info`) instead, built by the VMM from the same
//! memory layout constants.

#![no_std]

pub mod layout;
pub mod page_tables;

/// Magic at the start of [`BootInfo`]: "CARRELBI" read as a little-endian u64.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"CARRELBI");

/// Version of the [`BootInfo`] layout. A guest refuses a version it does not know.
pub const BOOT_INFO_VERSION: u32 = 2;

/// Name of the ELF note that marks a Desk kernel (a kernel that reads [`BootInfo`]).
pub const DESK_NOTE_NAME: &[u8] = b"Carrel\0";
/// Type of the Desk ELF note; its descriptor is the [`BOOT_INFO_VERSION`] as a u32.
pub const DESK_NOTE_TYPE: u32 = 0x4b53_4544;

/// Most memory ranges [`BootInfo`] can describe.
pub const MAX_MEMORY_RANGES: usize = 8;

/// Most devices [`BootInfo`] can describe.
pub const MAX_DEVICES: usize = 16;

/// Which KVM the guest runs on; decides how the guest enables interrupts.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformKind {
    /// Hardware virtualization (VMX/SVM): RFLAGS.IF, `sti; hlt`.
    Hardware = 1,
    /// The paravirtual `kvm_pvm`: interrupt enable lives in the VIF page.
    Pvm = 2,
}

impl PlatformKind {
    /// Decodes the raw value stored in [`BootInfo::platform`].
    pub fn from_raw(raw: u32) -> Option<PlatformKind> {
        match raw {
            1 => Some(PlatformKind::Hardware),
            2 => Some(PlatformKind::Pvm),
            _ => None,
        }
    }

    /// A short name for logs and banners.
    pub fn name(self) -> &'static str {
        match self {
            PlatformKind::Hardware => "hardware",
            PlatformKind::Pvm => "pvm",
        }
    }
}

/// Kinds of [`MemoryRange`].
pub mod memory_kind {
    /// RAM the guest may use freely.
    pub const USABLE: u32 = 1;
    /// RAM holding boot structures and the kernel image: the guest must not reuse it.
    pub const RESERVED: u32 = 2;
}

/// One range of guest-physical memory.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryRange {
    pub base: u64,
    pub size: u64,
    /// One of [`memory_kind`].
    pub kind: u32,
    pub reserved: u32,
}

/// One virtio-mmio device.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceEntry {
    /// Guest-physical base of the device's MMIO window.
    pub base: u64,
    /// Size of the window in bytes.
    pub size: u64,
    /// The GSI (IOAPIC pin) the device interrupts on.
    pub irq: u32,
    /// The virtio device id (4 = entropy, 16 = gpu, 18 = input, 19 = vsock).
    pub device_type: u32,
}

/// What the VMM tells the Desk kernel at power-on. `rdi` holds its guest-physical address
/// at the first instruction.
///
/// The layout is `repr(C)` with explicit padding only, so it reads the same on both sides.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    pub magic: u64,
    pub version: u32,
    /// `size_of::<BootInfo>()` as the VMM compiled it.
    pub size: u32,
    /// A [`PlatformKind`] as u32.
    pub platform: u32,
    pub vcpu_count: u32,
    /// Guest-physical address of the VIF page on PVM; 0 on hardware KVM.
    pub vif_addr: u64,
    /// TSC frequency in kHz, 0 when unknown.
    pub tsc_khz: u64,
    pub cmdline_addr: u64,
    pub cmdline_len: u32,
    pub memory_range_count: u32,
    pub memory_ranges: [MemoryRange; MAX_MEMORY_RANGES],
    pub device_count: u32,
    pub reserved0: u32,
    pub devices: [DeviceEntry; MAX_DEVICES],
    /// Preferred screen size; 0 when the VM has no screen.
    pub framebuffer_width: u32,
    pub framebuffer_height: u32,
    pub lapic_addr: u64,
    pub ioapic_addr: u64,
    /// Guest-physical address of the zeroed IDT page IDTR points at; the guest fills it.
    pub idt_addr: u64,
    /// First byte past the loaded kernel image: free memory starts above it.
    pub kernel_end: u64,
    /// How many times this VM was restored from a snapshot: the VMM writes it into guest
    /// memory before the restored vCPUs run; the guest re-reads it to notice a restore.
    pub restores: u64,
}

impl BootInfo {
    /// An empty block with magic, version and size filled in.
    pub const fn new() -> BootInfo {
        BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            size: core::mem::size_of::<BootInfo>() as u32,
            platform: 0,
            vcpu_count: 0,
            vif_addr: 0,
            tsc_khz: 0,
            cmdline_addr: 0,
            cmdline_len: 0,
            memory_range_count: 0,
            memory_ranges: [MemoryRange { base: 0, size: 0, kind: 0, reserved: 0 }; MAX_MEMORY_RANGES],
            device_count: 0,
            reserved0: 0,
            devices: [DeviceEntry { base: 0, size: 0, irq: 0, device_type: 0 }; MAX_DEVICES],
            framebuffer_width: 0,
            framebuffer_height: 0,
            lapic_addr: 0,
            ioapic_addr: 0,
            idt_addr: 0,
            kernel_end: 0,
            restores: 0,
        }
    }

    /// Offset of [`BootInfo::restores`] in the block, for the VMM to write it in place.
    pub const RESTORES_OFFSET: u64 = core::mem::offset_of!(BootInfo, restores) as u64;

    /// Whether magic, version and size are the ones this build knows.
    pub fn is_valid(&self) -> bool {
        self.magic == BOOT_INFO_MAGIC
            && self.version == BOOT_INFO_VERSION
            && self.size as usize == core::mem::size_of::<BootInfo>()
            && self.memory_range_count as usize <= MAX_MEMORY_RANGES
            && self.device_count as usize <= MAX_DEVICES
    }

    /// The platform, if the raw value is known.
    pub fn platform_kind(&self) -> Option<PlatformKind> {
        PlatformKind::from_raw(self.platform)
    }

    /// The valid memory ranges.
    pub fn memory_ranges(&self) -> &[MemoryRange] {
        let count = (self.memory_range_count as usize).min(MAX_MEMORY_RANGES);
        &self.memory_ranges[..count]
    }

    /// The valid device entries.
    pub fn devices(&self) -> &[DeviceEntry] {
        let count = (self.device_count as usize).min(MAX_DEVICES);
        &self.devices[..count]
    }

    /// Appends a memory range; `false` when the table is full.
    pub fn push_memory_range(&mut self, range: MemoryRange) -> bool {
        let index = self.memory_range_count as usize;
        if index >= MAX_MEMORY_RANGES {
            return false;
        }
        self.memory_ranges[index] = range;
        self.memory_range_count += 1;
        true
    }

    /// Appends a device entry; `false` when the table is full.
    pub fn push_device(&mut self, device: DeviceEntry) -> bool {
        let index = self.device_count as usize;
        if index >= MAX_DEVICES {
            return false;
        }
        self.devices[index] = device;
        self.device_count += 1;
        true
    }

    /// The block as bytes, as the VMM writes it into guest memory.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: BootInfo is repr(C), Copy, made only of integers and arrays of repr(C)
        // integer structs, with every padding hole filled by an explicit field (checked by
        // the size test below), so all its bytes are initialized.
        unsafe { core::slice::from_raw_parts((self as *const BootInfo).cast::<u8>(), core::mem::size_of::<BootInfo>()) }
    }
}

impl Default for BootInfo {
    fn default() -> Self {
        BootInfo::new()
    }
}

/// The VIF page shared with `kvm_pvm` (PLATFORM.md): interrupt enable as a byte.
#[repr(C)]
#[derive(Debug)]
pub struct VifPage {
    /// 1 when the guest accepts interrupts.
    pub enabled: u8,
    /// Non-zero when an interrupt waits for `enabled`.
    pub pending: u8,
    pub pad: [u8; 6],
    /// CR2 of the last page fault delivered to the guest.
    pub cr2: u64,
}

/// I/O ports of the Carrel power-on contract, beyond the standard 16550 at 0x3f8.
pub mod ports {
    /// COM1, a 16550 UART: the serial console.
    pub const SERIAL_COM1: u16 = 0x3f8;
    /// The i8042 command port: writing 0xfe (CPU reset) ends the VM with exit code 0, as
    /// Linux does on `reboot` with `reboot=k`.
    pub const I8042_COMMAND: u16 = 0x64;
    /// The i8042 "pulse reset line" command.
    pub const I8042_RESET: u8 = 0xfe;
    /// Power port: a byte written here powers the VM off; the byte is the VMM's exit code
    /// (0 = clean power off).
    pub const POWER: u16 = 0x4f0;
    /// Console port: a 32-bit write of the guest-physical address of a [`super::ConsoleRecord`]
    /// hands the VMM a whole line of console text in one exit instead of one exit per byte.
    pub const CONSOLE: u16 = 0x4f4;
    /// ACPI sleep control register (the FADT's SLEEP_CONTROL_REG, hardware-reduced ACPI),
    /// one byte: SLP_EN with SLP_TYP [`ACPI_SLEEP_TYPE_S5`] (the DSDT's `\_S5_`), which is
    /// what Linux's `poweroff` writes, ends the VM with exit code 0.
    pub const ACPI_SLEEP_CONTROL: u16 = 0x4f8;
    /// ACPI sleep status register (SLEEP_STATUS_REG), one byte: reads as zero.
    pub const ACPI_SLEEP_STATUS: u16 = 0x4f9;
    /// ACPI reset register (the FADT's RESET_REG): writing [`ACPI_RESET_VALUE`] ends the
    /// VM with exit code 0, as the i8042 reset does.
    pub const ACPI_RESET: u16 = 0x4fa;
    pub const ACPI_RESET_VALUE: u8 = 0x01;
    /// SLP_TYP of the soft-off state S5, as the DSDT's `\_S5_` package names it.
    pub const ACPI_SLEEP_TYPE_S5: u8 = 5;
    /// SLP_EN in the sleep control register; SLP_TYP sits in bits 2-4.
    pub const ACPI_SLEEP_ENABLE: u8 = 1 << 5;
}

/// Most bytes one [`ConsoleRecord`] may carry.
pub const CONSOLE_RECORD_MAX: usize = 4096;

/// A batch of console text handed over through [`ports::CONSOLE`]: a little-endian u32
/// length followed by that many bytes, all below 4 GiB.
#[repr(C)]
#[derive(Debug)]
pub struct ConsoleRecord {
    pub len: u32,
    pub bytes: [u8; CONSOLE_RECORD_MAX],
}

/// Virtio device ids used in [`DeviceEntry::device_type`].
pub mod virtio_id {
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const ENTROPY: u32 = 4;
    pub const GPU: u32 = 16;
    pub const INPUT: u32 = 18;
    pub const VSOCK: u32 = 19;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_has_no_implicit_padding() {
        // Sum of the field sizes equals the struct size: no hidden padding bytes.
        let fields = 8
            + 4
            + 4
            + 4
            + 4
            + 8
            + 8
            + 8
            + 4
            + 4
            + MAX_MEMORY_RANGES * core::mem::size_of::<MemoryRange>()
            + 4
            + 4
            + MAX_DEVICES * core::mem::size_of::<DeviceEntry>()
            + 4
            + 4
            + 8
            + 8
            + 8
            + 8
            + 8;
        assert_eq!(core::mem::size_of::<BootInfo>(), fields);
        assert_eq!(core::mem::size_of::<MemoryRange>(), 24);
        assert_eq!(core::mem::size_of::<DeviceEntry>(), 24);
    }

    #[test]
    fn boot_info_new_is_valid_and_tables_fill_up() {
        let mut info = BootInfo::new();
        assert!(info.is_valid());
        for index in 0..MAX_DEVICES {
            assert!(info.push_device(DeviceEntry { irq: index as u32, ..Default::default() }));
        }
        assert!(!info.push_device(DeviceEntry::default()));
        assert_eq!(info.devices().len(), MAX_DEVICES);
        assert_eq!(info.devices()[3].irq, 3);
    }

    #[test]
    fn boot_info_with_wrong_version_is_invalid() {
        let mut info = BootInfo::new();
        info.version = 99;
        assert!(!info.is_valid());
    }

    #[test]
    fn platform_kind_round_trips_raw_values() {
        assert_eq!(PlatformKind::from_raw(PlatformKind::Pvm as u32), Some(PlatformKind::Pvm));
        assert_eq!(PlatformKind::from_raw(PlatformKind::Hardware as u32), Some(PlatformKind::Hardware));
        assert_eq!(PlatformKind::from_raw(0), None);
    }
}

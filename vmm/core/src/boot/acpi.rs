//! The ACPI tables of Linux and PVH guests, built with rust-vmm's `acpi_tables`: how a
//! stock kernel finds its CPUs, its interrupt controllers and Carrel's devices, and how
//! it powers the VM off.
//!
//! - RSDP at [`layout::ACPI_START`] (where old kernels search for it; newer ones are told
//!   its address in boot_params or hvm_start_info), pointing at the XSDT.
//! - XSDT: the FADT and the MADT.
//! - FADT: hardware-reduced ACPI (no PM timer, no SCI, no legacy PIC), boot flags saying
//!   there is no VGA, no i8042 and no CMOS RTC (so Linux skips probing them), the sleep
//!   control/status registers and a reset register on Carrel's ports.
//! - MADT: one local APIC per vCPU (APIC id = vCPU id, as CPUID reports it) and the
//!   IOAPIC with GSI base 0.
//! - DSDT: COM1 (`PNP0501`), each virtio-mmio transport as a `LNRO0005` device (its
//!   window and interrupt), and `\_S5_` for power-off.
//!
//! Interrupts are edge-triggered, active high: the VMM raises them through irqfds with no
//! resample fd, a pulse on the IOAPIC pin.
//!
//! The tables live in guest memory, so a snapshot carries them and a restore needs
//! nothing more. The Desk kernel gets none: it reads BootInfo.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags as FadtFlags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use carrel_firmware::layout::{self, ACPI_SIZE, ACPI_START};
use carrel_firmware::{ports, DeviceEntry};
use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"CARREL";
const OEM_TABLE_ID: [u8; 8] = *b"CARRELVM";
const OEM_REVISION: u32 = 1;
/// DSDT revision 2: integers in its AML are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// Tables start on 16-byte boundaries (the RSDP must; the rest follow suit).
const TABLE_ALIGN: u64 = 16;

/// IAPC_BOOT_ARCH flags (FADT offset 109). Left clear: LEGACY_DEVICES (no ISA devices to
/// enumerate) and 8042 (no keyboard controller: Linux's i8042 driver then gives up at
/// once instead of probing ports 0x60/0x64).
mod boot_arch {
    /// Probing for VGA is not safe: there is none.
    pub const NO_VGA: u16 = 1 << 2;
    /// No PCIe, so no ASPM to manage.
    pub const NO_ASPM: u16 = 1 << 4;
    /// No CMOS RTC: Linux registers no rtc_cmos device and does not probe ports 0x70/0x71.
    pub const NO_CMOS_RTC: u16 = 1 << 5;
}

/// The guest-physical address and bytes of each table, RSDP first.
#[derive(Debug)]
pub struct AcpiTables {
    pub rsdp_addr: u64,
    pub tables: Vec<(u64, Vec<u8>)>,
}

impl AcpiTables {
    /// Builds the tables for `vcpu_count` vCPUs and the virtio-mmio `devices`.
    pub fn build(vcpu_count: u8, devices: &[DeviceEntry]) -> Result<AcpiTables, BootError> {
        let dsdt = dsdt(devices)?;
        let madt = madt(vcpu_count);
        let rsdp_addr = ACPI_START;
        let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
        // Two entries: FADT and MADT (the DSDT is reached through the FADT).
        let xsdt_len = 36 + 2 * 8;
        let fadt_addr = align(xsdt_addr + xsdt_len);
        let madt_addr = align(fadt_addr + FADT::len() as u64);
        let dsdt_addr = align(madt_addr + madt.len() as u64);
        if dsdt_addr + dsdt.len() as u64 > ACPI_START + ACPI_SIZE {
            return Err(BootError::TableFull { what: "ACPI tables" });
        }
        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        xsdt.add_entry(fadt_addr);
        xsdt.add_entry(madt_addr);
        let xsdt = bytes_of(&xsdt);
        debug_assert_eq!(xsdt.len() as u64, xsdt_len);
        Ok(AcpiTables {
            rsdp_addr,
            tables: vec![
                (rsdp_addr, bytes_of(&Rsdp::new(OEM_ID, xsdt_addr))),
                (xsdt_addr, xsdt),
                (fadt_addr, bytes_of(&fadt(dsdt_addr))),
                (madt_addr, madt),
                (dsdt_addr, dsdt),
            ],
        })
    }

    /// Writes every table into guest memory.
    pub fn write(&self, memory: &GuestMemoryMmap) -> Result<(), BootError> {
        for (addr, bytes) in &self.tables {
            memory
                .write_slice(bytes, GuestAddress(*addr))
                .map_err(|source| BootError::WriteMemory { what: "the ACPI tables", source })?;
        }
        Ok(())
    }
}

/// Builds the tables and writes them into guest memory; returns the RSDP's address.
pub fn write_tables(memory: &GuestMemoryMmap, vcpu_count: u8, devices: &[DeviceEntry]) -> Result<u64, BootError> {
    let tables = AcpiTables::build(vcpu_count, devices)?;
    tables.write(memory)?;
    Ok(tables.rsdp_addr)
}

fn align(addr: u64) -> u64 {
    addr.next_multiple_of(TABLE_ALIGN)
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn io_register(port: u16) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(port))
}

fn fadt(dsdt_addr: u64) -> FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(FadtFlags::HwReducedAcpi)
        .flag(FadtFlags::ResetRegSup);
    fadt.iapc_boot_arch = (boot_arch::NO_VGA | boot_arch::NO_ASPM | boot_arch::NO_CMOS_RTC).into();
    fadt.reset_reg = io_register(ports::ACPI_RESET);
    fadt.reset_value = ports::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_register(ports::ACPI_SLEEP_CONTROL);
    fadt.sleep_status_reg = io_register(ports::ACPI_SLEEP_STATUS);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"Carrel\0\0").into();
    fadt.finalize()
}

fn madt(vcpu_count: u8) -> Vec<u8> {
    let mut madt =
        MADT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, LocalInterruptController::Address(layout::LAPIC_ADDR as u32));
    // KVM gives vCPU n the APIC id n, and CPUID reports the same (platform::adjust_cpuid).
    for id in 0..vcpu_count {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_ADDR as u32, 0));
    bytes_of(&madt)
}

/// An edge-triggered, active-high, exclusive interrupt the device consumes.
fn interrupt(gsi: u32) -> aml::Interrupt {
    aml::Interrupt::new(true, true, false, false, gsi)
}

/// A `Device` with `_HID`, `_UID` and a `_CRS` of `resources`, as AML.
fn device(name: &str, hid: &dyn Aml, uid: u32, resources: Vec<&dyn Aml>) -> Vec<u8> {
    bytes_of(&aml::Device::new(
        aml::Path::new(name),
        vec![
            &aml::Name::new("_HID".into(), hid),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(resources)),
        ],
    ))
}

fn dsdt(devices: &[DeviceEntry]) -> Result<Vec<u8>, BootError> {
    let mut body = device(
        "COM1",
        &aml::EISAName::new("PNP0501"),
        0,
        vec![&aml::IO::new(ports::SERIAL_COM1, ports::SERIAL_COM1, 1, 8), &interrupt(layout::SERIAL_IRQ)],
    );
    for (index, entry) in devices.iter().enumerate() {
        let (Ok(base), Ok(size)) = (u32::try_from(entry.base), u32::try_from(entry.size)) else {
            return Err(BootError::TableFull { what: "ACPI 32-bit device windows" });
        };
        let hid: &'static str = "LNRO0005";
        body.extend(device(
            &device_name(index),
            &hid,
            index as u32,
            vec![&aml::Memory32Fixed::new(true, base, size), &interrupt(entry.irq)],
        ));
    }
    let mut aml = aml::Scope::raw("\\_SB_".into(), body);
    // \_S5_: SLP_TYPa, SLP_TYPb of soft-off, written to the sleep control register.
    let s5_type = ports::ACPI_SLEEP_TYPE_S5;
    aml::Name::new("\\_S5_".into(), &aml::Package::new(vec![&s5_type, &aml::ZERO])).to_aml_bytes(&mut aml);

    let mut dsdt = Sdt::new(*b"DSDT", 36, DSDT_REVISION, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&aml);
    Ok(dsdt.as_slice().to_vec())
}

/// The DSDT name of virtio-mmio transport `index`: `V000`, `V001`, ...
fn device_name(index: usize) -> String {
    format!("V{index:03X}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use carrel_firmware::layout::{FIRST_DEVICE_IRQ, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};

    fn devices(count: usize) -> Vec<DeviceEntry> {
        (0..count)
            .map(|index| DeviceEntry {
                base: VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
                size: VIRTIO_MMIO_SIZE,
                irq: FIRST_DEVICE_IRQ + index as u32,
                device_type: 4,
            })
            .collect()
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, byte| acc.wrapping_add(*byte))
    }

    /// The table at `addr`, by its signature and header length, checksum checked.
    fn table_at(tables: &AcpiTables, addr: u64) -> &[u8] {
        let (_, bytes) = tables.tables.iter().find(|(at, _)| *at == addr).expect("no table at that address");
        assert_eq!(u32_at(bytes, 4) as usize, bytes.len(), "header length of {:?}", &bytes[..4]);
        assert_eq!(sum(bytes), 0, "checksum of {:?}", String::from_utf8_lossy(&bytes[..4]));
        bytes
    }

    #[test]
    fn rsdp_checksums_and_points_at_the_xsdt() {
        let tables = AcpiTables::build(2, &devices(3)).unwrap();
        assert_eq!(tables.rsdp_addr, ACPI_START);
        let (addr, rsdp) = &tables.tables[0];
        assert_eq!(*addr, ACPI_START);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp.len(), 36);
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP (has an XSDT)");
        assert_eq!(sum(&rsdp[..20]), 0, "the ACPI 1.0 checksum covers the first 20 bytes");
        assert_eq!(sum(rsdp), 0, "the extended checksum covers all of it");
        let xsdt = table_at(&tables, u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
    }

    #[test]
    fn xsdt_points_at_fadt_and_madt_and_fadt_at_the_dsdt() {
        let tables = AcpiTables::build(1, &devices(2)).unwrap();
        let xsdt = table_at(&tables, u64_at(&tables.tables[0].1, 24));
        let entries: Vec<u64> = (36..xsdt.len()).step_by(8).map(|offset| u64_at(xsdt, offset)).collect();
        let signatures: Vec<&[u8]> = entries.iter().map(|addr| &table_at(&tables, *addr)[..4]).collect();
        assert_eq!(signatures, [b"FACP", b"APIC"]);
        let fadt = table_at(&tables, entries[0]);
        assert_eq!(u32_at(fadt, 40), 0, "no 32-bit DSDT pointer");
        let dsdt = table_at(&tables, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        // Every table the XSDT names and the DSDT: all of them but the RSDP and XSDT.
        assert_eq!(tables.tables.len(), 2 + entries.len() + 1);
        let last = tables.tables.last().unwrap();
        assert!(last.0 + last.1.len() as u64 <= ACPI_START + ACPI_SIZE);
    }

    #[test]
    fn fadt_is_hardware_reduced_without_rtc_i8042_or_vga_and_names_carrel_ports() {
        let tables = AcpiTables::build(1, &[]).unwrap();
        let (_, fadt) = tables.tables.iter().find(|(_, bytes)| &bytes[..4] == b"FACP").unwrap();
        assert_eq!(fadt.len(), 276, "an ACPI 6.5 FADT");
        assert!(fadt[8] >= 5, "revision 5+ has the sleep registers");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & FadtFlags::HwReducedAcpi as u32, 0);
        assert_ne!(flags & FadtFlags::ResetRegSup as u32, 0);
        let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(boot_arch & 0b11, 0, "no legacy devices, no i8042");
        assert_ne!(boot_arch & boot_arch::NO_CMOS_RTC, 0);
        assert_ne!(boot_arch & boot_arch::NO_VGA, 0);
        // Generic address structures: space 1 (I/O), 8 bits wide, at the port.
        let gas = |offset: usize| (fadt[offset], fadt[offset + 1], u64_at(fadt, offset + 4));
        assert_eq!(gas(116), (1, 8, u64::from(ports::ACPI_RESET)), "RESET_REG");
        assert_eq!(fadt[128], ports::ACPI_RESET_VALUE);
        assert_eq!(gas(244), (1, 8, u64::from(ports::ACPI_SLEEP_CONTROL)), "SLEEP_CONTROL_REG");
        assert_eq!(gas(256), (1, 8, u64::from(ports::ACPI_SLEEP_STATUS)), "SLEEP_STATUS_REG");
    }

    #[test]
    fn madt_lists_one_enabled_lapic_per_vcpu_and_the_ioapic() {
        let tables = AcpiTables::build(3, &[]).unwrap();
        let (_, madt) = tables.tables.iter().find(|(_, bytes)| &bytes[..4] == b"APIC").unwrap();
        assert_eq!(sum(madt), 0);
        assert_eq!(u32_at(madt, 36), layout::LAPIC_ADDR as u32);
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        let mut offset = 44;
        while offset < madt.len() {
            let (kind, len) = (madt[offset], madt[offset + 1] as usize);
            let entry = &madt[offset..offset + len];
            match kind {
                0 => lapics.push((entry[2], entry[3], u32_at(entry, 4))),
                1 => ioapics.push((entry[2], u32_at(entry, 4), u32_at(entry, 8))),
                other => panic!("unexpected MADT entry type {other}"),
            }
            offset += len;
        }
        assert_eq!(offset, madt.len());
        assert_eq!(lapics, [(0, 0, 1), (1, 1, 1), (2, 2, 1)], "(uid, APIC id, enabled)");
        assert_eq!(ioapics, [(0, layout::IOAPIC_ADDR as u32, 0)], "(id, address, GSI base)");
    }

    /// The length a PkgLength at `bytes[0..]` encodes, and how many bytes it took.
    fn pkg_length(bytes: &[u8]) -> (usize, usize) {
        let extra = (bytes[0] >> 6) as usize;
        if extra == 0 {
            return ((bytes[0] & 0x3f) as usize, 1);
        }
        let mut length = (bytes[0] & 0x0f) as usize;
        for (index, byte) in bytes[1..=extra].iter().enumerate() {
            length |= (*byte as usize) << (4 + 8 * index);
        }
        (length, 1 + extra)
    }

    /// The body (after the name) of every `Device` in `aml`, by name.
    fn devices_in(aml: &[u8]) -> Vec<(String, &[u8])> {
        let mut found = Vec::new();
        let mut offset = 0;
        while offset + 1 < aml.len() {
            if aml[offset] == 0x5b && aml[offset + 1] == 0x82 {
                let (length, taken) = pkg_length(&aml[offset + 2..]);
                let start = offset + 2 + taken;
                let end = offset + 2 + length;
                let name = String::from_utf8(aml[start..start + 4].to_vec()).unwrap();
                found.push((name, &aml[start + 4..end]));
                offset = end;
            } else {
                offset += 1;
            }
        }
        found
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|window| window == needle)
    }

    #[test]
    fn dsdt_has_com1_and_one_lnro0005_device_per_transport_with_its_window_and_irq() {
        let devices = devices(5);
        let tables = AcpiTables::build(1, &devices).unwrap();
        let (_, dsdt) = tables.tables.iter().find(|(_, bytes)| &bytes[..4] == b"DSDT").unwrap();
        assert_eq!(sum(dsdt), 0);
        assert_eq!(u32_at(dsdt, 4) as usize, dsdt.len());
        let found = devices_in(&dsdt[36..]);
        assert_eq!(found.len(), 1 + devices.len());

        let (name, com1) = &found[0];
        assert_eq!(name, "COM1");
        assert!(contains(com1, &[0x0c, 0x41, 0xd0, 0x05, 0x01]), "_HID EISAID(PNP0501)");
        assert!(contains(com1, &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]), "IO 0x3f8, 8 ports");
        assert!(contains(com1, &[0x89, 0x06, 0x00, 0x03, 0x01, 4, 0, 0, 0]), "edge, high, IRQ 4");

        for (index, device) in devices.iter().enumerate() {
            let (name, body) = &found[1 + index];
            assert_eq!(name, &format!("V{index:03X}"));
            assert!(contains(body, b"_HID\x0dLNRO0005\x00"), "{name}: _HID");
            let mut window = vec![0x86, 0x09, 0x00, 0x01];
            window.extend((device.base as u32).to_le_bytes());
            window.extend((device.size as u32).to_le_bytes());
            assert!(contains(body, &window), "{name}: Memory32Fixed at {:#x}", device.base);
            let mut irq = vec![0x89, 0x06, 0x00, 0x03, 0x01];
            irq.extend(device.irq.to_le_bytes());
            assert!(contains(body, &irq), "{name}: edge-triggered interrupt {}", device.irq);
            let mut uid = b"_UID".to_vec();
            // AML integers: ZeroOp, OneOp, then BytePrefix and the byte.
            uid.extend(match index {
                0 | 1 => vec![index as u8],
                _ => vec![0x0a, index as u8],
            });
            assert!(contains(body, &uid), "{name}: _UID {index}");
        }
        // \_S5_ = Package { 5, 0 }: Name, root, "_S5_", Package op, length, 2 elements.
        assert!(contains(dsdt, &[0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x0a, 0x05, 0x00]));
    }

    #[test]
    fn every_device_the_builder_can_attach_fits_in_the_region() {
        let count = (layout::LAST_DEVICE_IRQ - FIRST_DEVICE_IRQ + 1) as usize;
        let tables = AcpiTables::build(u8::MAX, &devices(count)).unwrap();
        let last = tables.tables.last().unwrap();
        assert!(last.0 + last.1.len() as u64 <= ACPI_START + ACPI_SIZE);
        let (_, dsdt) = last;
        assert_eq!(devices_in(&dsdt[36..]).len(), count + 1);
    }

    #[test]
    fn tables_are_written_where_they_say() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let rsdp = write_tables(&memory, 2, &devices(1)).unwrap();
        let mut signature = [0u8; 8];
        memory.read_slice(&mut signature, GuestAddress(rsdp)).unwrap();
        assert_eq!(&signature, b"RSD PTR ");
    }
}

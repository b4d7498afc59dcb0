//! The register state a guest starts in: 64-bit long mode with the VMM's page tables
//! (Desk kernel, Linux 64-bit entry) or 32-bit protected mode without paging (PVH).

use crate::memory::GuestMemoryMmap;
use carrel_firmware::layout::{self, selector};
use carrel_firmware::page_tables;
use kvm_bindings::{kvm_fpu, kvm_mp_state, kvm_regs, kvm_segment, kvm_sregs, KVM_MP_STATE_UNINITIALIZED};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Errors writing boot state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("could not write the boot GDT into guest memory: {0}")]
    WriteGdt(#[source] vm_memory::GuestMemoryError),
    #[error("could not write the boot IDT page into guest memory: {0}")]
    WriteIdt(#[source] vm_memory::GuestMemoryError),
    #[error("could not build boot page tables: {0:?}")]
    BuildPageTables(page_tables::PageTableError),
    #[error("could not write boot page tables into guest memory: {0}")]
    WritePageTables(#[source] vm_memory::GuestMemoryError),
    #[error("KVM_GET_SREGS failed: {0}")]
    GetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_SREGS failed: {0}")]
    SetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_REGS failed: {0}")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_LAPIC/KVM_SET_LAPIC failed: {0}")]
    SetLapic(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MP_STATE failed: {0}")]
    SetMpState(#[source] kvm_ioctls::Error),
}

/// How the boot vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// 64-bit long mode, paging on with the VMM's identity map.
    Long64 { rip: u64, rsi: u64, rdi: u64, rsp: u64 },
    /// 32-bit protected mode, paging off (PVH: `ebx` = start_info).
    Protected32 { eip: u32, ebx: u32 },
}

/// GDT entries: null, 64-bit code, data, 32-bit code, then the TSS (two slots).
const GDT: [u64; 6] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
    0,
];
const TSS_SELECTOR: u16 = 0x20;

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
        | ((limit as u64 & 0xf_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The `kvm_segment` a GDT entry describes, as KVM wants it.
fn segment(selector: u16, entry: u64) -> kvm_segment {
    let flags = ((entry >> 40) & 0xf0ff) as u16;
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = (flags >> 15) & 1 == 1;
    kvm_segment {
        base,
        limit: if granular { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: granular as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT and a zeroed IDT page; the guest fills the IDT before it enables
/// interrupts. Exceptions before that end in a triple fault the VMM reports.
pub fn write_descriptor_tables(memory: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (index, entry) in GDT.iter().enumerate() {
        memory.write_obj(*entry, GuestAddress(layout::GDT_ADDR + index as u64 * 8)).map_err(RegsError::WriteGdt)?;
    }
    let zeroes = [0u8; layout::IDT_SIZE as usize];
    memory.write_slice(&zeroes, GuestAddress(layout::IDT_ADDR)).map_err(RegsError::WriteIdt)
}

/// Writes the identity map of the low `gib` GiB (at least 4, so the LAPIC and IOAPIC are
/// reachable) at [`layout::PAGE_TABLES_ADDR`].
pub fn write_page_tables(memory: &GuestMemoryMmap, gib: u64) -> Result<(), RegsError> {
    let mut tables = vec![0u64; page_tables::table_count(gib) * page_tables::ENTRIES];
    page_tables::build_identity_map(&mut tables, layout::PAGE_TABLES_ADDR, gib).map_err(RegsError::BuildPageTables)?;
    let bytes: Vec<u8> = tables.iter().flat_map(|entry| entry.to_le_bytes()).collect();
    memory.write_slice(&bytes, GuestAddress(layout::PAGE_TABLES_ADDR)).map_err(RegsError::WritePageTables)
}

/// Sets segment, control and general registers for `entry`.
pub fn set_entry_state(vcpu: &VcpuFd, entry: EntryState) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    let code64 = segment(selector::CODE64, GDT[1]);
    let data = segment(selector::DATA, GDT[2]);
    let code32 = segment(selector::CODE32, GDT[3]);
    let tss = segment(TSS_SELECTOR, GDT[4]);

    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_ADDR;
    sregs.idt.limit = (layout::IDT_SIZE - 1) as u16;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match entry {
        EntryState::Long64 { rip, rsi, rdi, rsp } => {
            sregs.cs = code64;
            sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
            sregs.cr3 = layout::PAGE_TABLES_ADDR;
            sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = rip;
            regs.rsi = rsi;
            regs.rdi = rdi;
            regs.rsp = rsp;
            regs.rbp = rsp;
        }
        EntryState::Protected32 { eip, ebx } => {
            sregs.cs = code32;
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = u64::from(eip);
            regs.rbx = u64::from(ebx);
        }
    }
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)?;
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

/// Leaves an application processor waiting for INIT and SIPI from the boot vCPU, as a PC
/// firmware leaves it: the in-kernel LAPIC then starts it at the SIPI vector in real mode
/// (how Linux brings up its other CPUs). KVM creates every vCPU but the first so already;
/// saying it here keeps a stale register state from ever being entered instead.
pub fn set_waiting_for_sipi(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let state = kvm_mp_state { mp_state: KVM_MP_STATE_UNINITIALIZED };
    vcpu.set_mp_state(state).map_err(RegsError::SetMpState)
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7 << 8;
const APIC_MODE_NMI: u32 = 0x4 << 8;
const APIC_LVT_MASKED: u32 = 1 << 16;

/// How the LAPIC's LINT pins start out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LintSetup {
    /// LINT0 = ExtINT (the 8259), LINT1 = NMI: what a PC BIOS leaves for a kernel that
    /// programs the 8259 itself.
    LegacyPic,
    /// Both masked: the uninitialised 8259 would otherwise deliver GSI 5 as vector 5. For
    /// Desk, and for Linux on hardware-reduced ACPI, which never touches the 8259 (a Linux
    /// without ACPI finds no IOAPIC and unmasks LINT0 itself for virtual wire mode).
    Masked,
}

/// Programs the LAPIC's LINT0/LINT1 entries.
pub fn set_lint(vcpu: &VcpuFd, setup: LintSetup) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(RegsError::SetLapic)?;
    let (lint0, lint1) = match setup {
        LintSetup::LegacyPic => (APIC_MODE_EXTINT, APIC_MODE_NMI),
        LintSetup::Masked => (APIC_LVT_MASKED, APIC_LVT_MASKED | APIC_MODE_NMI),
    };
    for (offset, value) in [(APIC_LVT_LINT0, lint0), (APIC_LVT_LINT1, lint1)] {
        let bytes = value.to_le_bytes();
        for (index, byte) in bytes.iter().enumerate() {
            lapic.regs[offset + index] = *byte as std::os::raw::c_char;
        }
    }
    vcpu.set_lapic(&lapic).map_err(RegsError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment_is_long_mode_ring0() {
        let cs = segment(selector::CODE64, GDT[1]);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.present, cs.s), (1, 0, 0, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
    }

    #[test]
    fn code32_segment_is_flat_32_bit() {
        let cs = segment(selector::CODE32, GDT[3]);
        assert_eq!((cs.l, cs.db, cs.g, cs.base), (0, 1, 1, 0));
    }

    #[test]
    fn tss_segment_is_busy_64_bit_tss() {
        let tr = segment(TSS_SELECTOR, GDT[4]);
        assert_eq!((tr.type_, tr.s, tr.present), (0xb, 0, 1));
    }
}

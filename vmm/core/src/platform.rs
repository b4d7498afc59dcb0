//! The one place where hardware KVM (VMX/SVM) and the paravirtual `kvm_pvm` differ.
//!
//! Detection, the VIF page MSR, and the CPUID a guest is shown all live here; the rest of
//! the VMM asks this module rather than testing the platform itself (shared/PLATFORM.md).

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use kvm_ioctls::VcpuFd;

pub use carrel_firmware::PlatformKind;

/// MSR that reads "PVM" on `kvm_pvm` and does not exist on hardware KVM.
pub const MSR_PVM_SIGNATURE: u32 = 0x4b56_4d11;
/// Value of [`MSR_PVM_SIGNATURE`] on `kvm_pvm`: "PVM" as a little-endian integer.
pub const PVM_SIGNATURE: u64 = 0x4d_5650;
/// MSR holding the guest-physical address of the VIF page, plus [`VIF_VALID`].
pub const MSR_PVM_VIF: u32 = 0x4b56_4d10;
/// Bit 10 of [`MSR_PVM_VIF`]: the address is valid.
pub const VIF_VALID: u64 = 1 << 10;

/// Errors from platform set-up.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("could not build the MSR list: {0}")]
    BuildMsrs(String),
    #[error("KVM_SET_MSRS of the VIF page MSR failed: {0}")]
    SetVifMsr(#[source] kvm_ioctls::Error),
    #[error("kvm_pvm refused the VIF page at {vif_addr:#x}")]
    VifRefused { vif_addr: u64 },
}

/// MSRs of this platform that KVM_GET_MSR_INDEX_LIST leaves out but a snapshot must keep:
/// on PVM the VIF page address (shared/PLATFORM.md).
pub fn unlisted_msrs(kind: PlatformKind) -> &'static [u32] {
    match kind {
        PlatformKind::Pvm => &[MSR_PVM_VIF],
        PlatformKind::Hardware => &[],
    }
}

/// Which KVM this is: asks a fresh vCPU for the PVM signature MSR, and falls back to
/// `/sys/module/kvm_pvm` when the MSR read itself fails.
pub fn detect(vcpu: &VcpuFd) -> PlatformKind {
    match read_msr(vcpu, MSR_PVM_SIGNATURE) {
        Some(PVM_SIGNATURE) => PlatformKind::Pvm,
        Some(_) => PlatformKind::Hardware,
        None if std::path::Path::new("/sys/module/kvm_pvm").exists() => PlatformKind::Pvm,
        None => PlatformKind::Hardware,
    }
}

fn read_msr(vcpu: &VcpuFd, index: u32) -> Option<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]).ok()?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => Some(msrs.as_slice()[0].data),
        _ => None,
    }
}

/// Registers the VIF page so a guest that knows the PVM rules runs native. On hardware
/// KVM the MSR does not exist and nothing is done.
pub fn register_vif_page(kind: PlatformKind, vcpu: &VcpuFd, vif_addr: u64) -> Result<(), PlatformError> {
    if kind != PlatformKind::Pvm {
        return Ok(());
    }
    let entry = kvm_msr_entry { index: MSR_PVM_VIF, data: vif_addr | VIF_VALID, ..Default::default() };
    let msrs = Msrs::from_entries(&[entry]).map_err(|err| PlatformError::BuildMsrs(format!("{err:?}")))?;
    match vcpu.set_msrs(&msrs) {
        Ok(1) => Ok(()),
        Ok(_) => Err(PlatformError::VifRefused { vif_addr }),
        Err(err) => Err(PlatformError::SetVifMsr(err)),
    }
}

/// What the guest is, for the CPUID it is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKind {
    /// Carrel's own kernel: follows the platform's native recipe.
    Desk,
    /// A stock kernel (Linux, PVH images): emulated on PVM.
    Stock,
}

// CPUID feature bits.
const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_X2APIC: u32 = 1 << 21;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF7_EBX_AVX2: u32 = 1 << 5;
const LEAF7_EBX_BMI1: u32 = 1 << 3;
const LEAF7_EBX_BMI2: u32 = 1 << 8;
const LEAF7_EBX_AVX512F: u32 = 1 << 16;

const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Extended topology level types (leaf 0xB/0x1F ECX bits 15..8).
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Adjusts the CPUID KVM supports into the one the guest sees: APIC ids and a topology
/// per vCPU, the hypervisor bit, and on PVM, for emulated stock kernels, no features the
/// instruction emulator lacks (XSAVE/AVX, BMI, CMPXCHG16B), so they get as far as they can.
pub fn adjust_cpuid(cpuid: &mut CpuId, kind: PlatformKind, guest: GuestKind, vcpu_id: u8, vcpu_count: u8) {
    set_topology(cpuid, vcpu_id, vcpu_count);
    let hide_for_emulator = kind == PlatformKind::Pvm && guest == GuestKind::Stock;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // Initial APIC id in bits 31..24, logical processor count in 23..16.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(vcpu_id) << 24) | (u32::from(vcpu_count) << 16);
                // The count above is meaningful only with HTT; it says one package.
                if vcpu_count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                }
                entry.ecx |= LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE;
                entry.ecx &= !LEAF1_ECX_X2APIC;
                if hide_for_emulator {
                    entry.ecx &= !(LEAF1_ECX_XSAVE | LEAF1_ECX_OSXSAVE | LEAF1_ECX_AVX | LEAF1_ECX_CX16);
                }
            }
            7 if entry.index == 0 && hide_for_emulator => {
                entry.ebx &= !(LEAF7_EBX_AVX2 | LEAF7_EBX_BMI1 | LEAF7_EBX_BMI2 | LEAF7_EBX_AVX512F);
            }
            0xd if hide_for_emulator => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
    }
}

/// Leaves 0xB (and 0x1F where KVM offers it) as one package of `vcpu_count` cores, one
/// thread each, the x2APIC id of this vCPU in EDX: what the MADT lists (the vCPU id is the
/// APIC id). KVM's own entries describe no topology (a guest then guesses from the host's
/// leaf 4), so they are replaced.
fn set_topology(cpuid: &mut CpuId, vcpu_id: u8, vcpu_count: u8) {
    let core_shift = u32::from(vcpu_count.max(1)).next_power_of_two().trailing_zeros();
    for function in [0xb, 0x1f] {
        if !cpuid.as_slice().iter().any(|entry| entry.function == function) {
            continue;
        }
        cpuid.retain(|entry| entry.function != function);
        let levels = [
            (0, TOPOLOGY_LEVEL_SMT, 1),
            (core_shift, TOPOLOGY_LEVEL_CORE, u32::from(vcpu_count)),
            // Level 2 of type 0 ends the list.
            (0, 0, 0),
        ];
        for (index, (shift, level_type, logical_processors)) in levels.into_iter().enumerate() {
            let entry = kvm_cpuid_entry2 {
                function,
                index: index as u32,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: shift,
                ebx: logical_processors,
                ecx: (level_type << 8) | index as u32,
                edx: u32::from(vcpu_id),
                ..Default::default()
            };
            // KVM's table has room to spare (KVM_MAX_CPUID_ENTRIES); a full one keeps
            // the entries it has.
            let _ = cpuid.push(entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpuid() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 { function: 1, ecx: LEAF1_ECX_XSAVE | LEAF1_ECX_AVX | 1, ..Default::default() },
            kvm_cpuid_entry2 { function: 7, index: 0, ebx: LEAF7_EBX_BMI2 | 1, ..Default::default() },
        ])
        .unwrap()
    }

    #[test]
    fn adjust_cpuid_for_stock_guest_on_pvm_hides_emulator_gaps() {
        let mut cpuid = cpuid();
        adjust_cpuid(&mut cpuid, PlatformKind::Pvm, GuestKind::Stock, 0, 1);
        let entries = cpuid.as_slice();
        assert_eq!(entries[0].ecx & (LEAF1_ECX_XSAVE | LEAF1_ECX_AVX), 0);
        assert_ne!(entries[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(entries[1].ebx, 1);
    }

    #[test]
    fn topology_leaf_describes_one_package_of_single_thread_cores_with_this_apic_id() {
        let mut cpuid = CpuId::from_entries(&[
            kvm_cpuid_entry2 { function: 1, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, index: 0, ..Default::default() },
        ])
        .unwrap();
        adjust_cpuid(&mut cpuid, PlatformKind::Hardware, GuestKind::Stock, 2, 3);
        let leaf: Vec<_> = cpuid
            .as_slice()
            .iter()
            .filter(|entry| entry.function == 0xb)
            .map(|entry| (entry.index, entry.eax, entry.ebx, entry.ecx, entry.edx, entry.flags))
            .collect();
        let indexed = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        assert_eq!(
            leaf,
            [(0, 0, 1, 0x100, 2, indexed), (1, 2, 3, 0x201, 2, indexed), (2, 0, 0, 0x2, 2, indexed)],
            "(subleaf, shift, logical processors, level, x2APIC id, flags)"
        );
        assert!(!cpuid.as_slice().iter().any(|entry| entry.function == 0x1f), "no leaf 0x1F is made up");
        assert_ne!(cpuid.as_slice()[0].edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn adjust_cpuid_on_hardware_keeps_features_and_sets_apic_id() {
        let mut cpuid = cpuid();
        adjust_cpuid(&mut cpuid, PlatformKind::Hardware, GuestKind::Stock, 3, 4);
        let entries = cpuid.as_slice();
        assert_ne!(entries[0].ecx & LEAF1_ECX_XSAVE, 0);
        assert_eq!(entries[0].ebx >> 24, 3);
        assert_eq!((entries[0].ebx >> 16) & 0xff, 4);
        assert_ne!(entries[1].ebx & LEAF7_EBX_BMI2, 0);
    }
}

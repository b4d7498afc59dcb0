//! The one place where hardware KVM (VMX/SVM) and the paravirtual `kvm_pvm` differ.
//!
//! Detection, the VIF page MSR, and the CPUID a guest is shown all live here; the rest of
//! the VMM asks this module rather than testing the platform itself (shared/PLATFORM.md).

use kvm_bindings::{kvm_msr_entry, CpuId, Msrs};
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

/// Adjusts the CPUID KVM supports into the one the guest sees: APIC ids per vCPU, the
/// hypervisor bit, and on PVM, for emulated stock kernels, no features the instruction
/// emulator lacks (XSAVE/AVX, BMI, CMPXCHG16B), so they get as far as they can.
pub fn adjust_cpuid(cpuid: &mut CpuId, kind: PlatformKind, guest: GuestKind, vcpu_id: u8, vcpu_count: u8) {
    let hide_for_emulator = kind == PlatformKind::Pvm && guest == GuestKind::Stock;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // Initial APIC id in bits 31..24, logical processor count in 23..16.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(vcpu_id) << 24) | (u32::from(vcpu_count) << 16);
                entry.ecx |= LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE;
                entry.ecx &= !LEAF1_ECX_X2APIC;
                if hide_for_emulator {
                    entry.ecx &= !(LEAF1_ECX_XSAVE | LEAF1_ECX_OSXSAVE | LEAF1_ECX_AVX | LEAF1_ECX_CX16);
                }
            }
            7 if entry.index == 0 && hide_for_emulator => {
                entry.ebx &= !(LEAF7_EBX_AVX2 | LEAF7_EBX_BMI1 | LEAF7_EBX_BMI2 | LEAF7_EBX_AVX512F);
            }
            0xb | 0x1f => entry.edx = u32::from(vcpu_id),
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

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

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

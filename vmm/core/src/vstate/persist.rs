//! Saved KVM state: every vCPU's registers and the VM's irqchip, PIT and clock, as plain
//! serde data (kvm-bindings' own serde forms). Saving happens only while the vCPUs are
//! paused (the vCPU state machine refuses it otherwise); restoring goes into a fresh VM
//! through [`restore_vcpu`] and [`restore_vm`], which check what KVM accepted.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// MSRs read or written in one ioctl.
const MSR_BATCH: usize = 64;

/// Errors saving or restoring KVM state; `what` names the ioctl.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{what} on vCPU {id} failed: {source}")]
    Vcpu { id: u8, what: &'static str, source: kvm_ioctls::Error },
    #[error("{what} on the VM failed: {source}")]
    Vm { what: &'static str, source: kvm_ioctls::Error },
    #[error("the saved state of vCPU {id} is malformed: {reason}")]
    Malformed { id: u8, reason: String },
}

/// One vCPU as saved.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
}

/// The VM-wide KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    /// Present when the VM emulates the i8254 PIT.
    pub pit: Option<kvm_pit_state2>,
    pub clock: kvm_clock_data,
}

/// The MSRs a vCPU has: KVM's index list plus the platform's own that the list omits.
pub fn saved_msr_indices(kvm: &kvm_ioctls::Kvm, extra: &[u32]) -> Result<Vec<u32>, PersistError> {
    let list =
        kvm.get_msr_index_list().map_err(|source| PersistError::Vm { what: "KVM_GET_MSR_INDEX_LIST", source })?;
    let mut indices: Vec<u32> = list.as_slice().to_vec();
    for index in extra {
        if !indices.contains(index) {
            indices.push(*index);
        }
    }
    Ok(indices)
}

/// Reads every MSR of `indices` KVM can read; one it cannot is left out (KVM_GET_MSRS
/// stops at the first it refuses, so the rest of the batch is read again after it).
fn read_msrs(vcpu: &VcpuFd, id: u8, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, PersistError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> =
            batch.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|err| PersistError::Malformed { id, reason: format!("MSR list: {err:?}") })?;
        let read =
            vcpu.get_msrs(&mut msrs).map_err(|source| PersistError::Vcpu { id, what: "KVM_GET_MSRS", source })?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // Skip the one KVM refused, if the batch stopped early.
        let consumed = if read < batch.len() { read + 1 } else { read };
        rest = &rest[consumed..];
    }
    Ok(saved)
}

/// Saves a paused vCPU.
pub fn save_vcpu(vcpu: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<VcpuState, PersistError> {
    let err = |what| move |source| PersistError::Vcpu { id, what, source };
    let cpuid =
        vcpu.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(err("KVM_GET_CPUID2"))?.as_slice().to_vec();
    Ok(VcpuState {
        id,
        cpuid,
        mp_state: vcpu.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?,
        regs: vcpu.get_regs().map_err(err("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(err("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(err("KVM_GET_XCRS"))?,
        debug_regs: vcpu.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?,
        msrs: read_msrs(vcpu, id, msr_indices)?,
        vcpu_events: vcpu.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?,
    })
}

/// Restores `state` into a fresh vCPU, in the order KVM needs (CPUID first, the LAPIC
/// before MSRs, events last). Returns how many saved MSRs KVM refused to take.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<usize, PersistError> {
    let id = state.id;
    let err = |what| move |source| PersistError::Vcpu { id, what, source };
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|e| PersistError::Malformed { id, reason: format!("CPUID table: {e:?}") })?;
    vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(state.mp_state).map_err(err("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs).map_err(err("KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs).map_err(err("KVM_SET_SREGS"))?;
    // SAFETY: the buffer is a whole kvm_xsave as KVM_GET_XSAVE produced it; KVM checks
    // its contents and refuses what the CPU would not load.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(err("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs).map_err(err("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debug_regs).map_err(err("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&state.lapic).map_err(err("KVM_SET_LAPIC"))?;
    let mut refused = 0;
    let mut rest = state.msrs.as_slice();
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let msrs = Msrs::from_entries(batch)
            .map_err(|e| PersistError::Malformed { id, reason: format!("MSR list: {e:?}") })?;
        let written = vcpu.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
        // KVM_SET_MSRS stops at the first MSR it rejects: skip it and go on.
        let consumed = if written < batch.len() {
            refused += 1;
            written + 1
        } else {
            written
        };
        rest = &rest[consumed..];
    }
    vcpu.set_vcpu_events(&state.vcpu_events).map_err(err("KVM_SET_VCPU_EVENTS"))?;
    Ok(refused)
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, PersistError> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut chip).map_err(|source| PersistError::Vm { what: "KVM_GET_IRQCHIP", source })?;
    Ok(chip)
}

/// Saves the VM-wide state while every vCPU is paused.
pub fn save_vm(vm: &VmFd, has_pit: bool) -> Result<VmState, PersistError> {
    let pit = match has_pit {
        true => Some(vm.get_pit2().map_err(|source| PersistError::Vm { what: "KVM_GET_PIT2", source })?),
        false => None,
    };
    let mut clock = vm.get_clock().map_err(|source| PersistError::Vm { what: "KVM_GET_CLOCK", source })?;
    // Only the value is restorable; the flags describe this host's clock source.
    clock.flags = 0;
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit,
        clock,
    })
}

/// Restores the VM-wide state into a fresh VM that has its irqchip (and PIT, if saved).
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), PersistError> {
    for (chip, expected) in [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != expected {
            return Err(PersistError::Malformed {
                id: 0,
                reason: format!("irqchip {} saved as {expected}", chip.chip_id),
            });
        }
        vm.set_irqchip(chip).map_err(|source| PersistError::Vm { what: "KVM_SET_IRQCHIP", source })?;
    }
    if let Some(pit) = &state.pit {
        vm.set_pit2(pit).map_err(|source| PersistError::Vm { what: "KVM_SET_PIT2", source })?;
    }
    vm.set_clock(&state.clock).map_err(|source| PersistError::Vm { what: "KVM_SET_CLOCK", source })
}

//! The KVM VM: memory slots, the in-kernel irqchip, irqfds and ioeventfds.

use crate::memory::{GuestMemoryMmap, MmapRegion};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use std::sync::atomic::{AtomicBool, Ordering};

use super::persist::{self, PersistError, VmState};
use crate::platform::PlatformKind;

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}. Is KVM loaded, and may this user use it? (scripts/provision-host.sh checks)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} at {gpa:#x} failed: {source}")]
    SetMemoryRegion { slot: u32, gpa: u64, source: kvm_ioctls::Error },
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed: {0}")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed: {0}")]
    CreatePit(#[source] kvm_ioctls::Error),
    #[error("KVM_IRQFD for GSI {gsi} failed: {source}")]
    RegisterIrqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("KVM_IOEVENTFD at {addr:#x} failed: {source}")]
    RegisterIoevent { addr: u64, source: kvm_ioctls::Error },
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    GetSupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_DIRTY_LOG for slot {slot} failed: {source}")]
    GetDirtyLog { slot: u32, source: kvm_ioctls::Error },
}

/// Where KVM's real-mode TSS goes on VMX: three pages just below the IOAPIC, inside the
/// MMIO gap where no RAM lives.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// A VM as KVM made it, before its memory and irqchip.
type MadeVm = Result<(Kvm, VmFd), VmError>;

/// This process's VM, being made ahead of its configuration (see [`make_ahead`]).
static AHEAD: std::sync::Mutex<Option<std::thread::JoinHandle<MadeVm>>> = std::sync::Mutex::new(None);

fn create() -> MadeVm {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
    Ok((kvm, fd))
}

/// Starts making this process's VM (KVM_CREATE_VM, 0.3-0.6 ms here) on a thread of its
/// own, before the VMM knows its configuration; [`Vm::new`] takes it. A process that
/// will not make a VM leaves it unused; one that forks first discards it. Without a
/// thread, [`Vm::new`] makes the VM itself.
pub fn make_ahead() {
    let mut slot = AHEAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if slot.is_none() {
        *slot = std::thread::Builder::new().name("make-vm-ahead".into()).spawn(create).ok();
    }
}

/// Drops the VM made ahead, once its thread is done: a process about to fork and close
/// its inherited fds (a jail) makes its VM afterwards.
pub fn discard_ahead() {
    drop(take_ahead());
}

fn take_ahead() -> Option<MadeVm> {
    let thread = AHEAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()?;
    Some(thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
}

/// A KVM VM with its in-kernel irqchip.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    /// Whether the i8254 PIT was created (its state is then part of a snapshot).
    has_pit: AtomicBool,
}

impl Vm {
    /// Opens /dev/kvm and creates a VM with `memory` and the in-kernel irqchip (IOAPIC,
    /// PIC, LAPICs).
    ///
    /// Memory goes in first: a memory slot added once the irqchip exists costs KVM
    /// milliseconds (6 ms for 256 MiB, 10 ms for 1 GiB on kvm_pvm, most of a restore),
    /// against 0.2-0.7 ms before it.
    ///
    /// The VM itself may have been made ahead ([`make_ahead`]); it is taken then.
    pub fn new(memory: &GuestMemoryMmap) -> Result<Vm, VmError> {
        let (kvm, fd) = match take_ahead() {
            Some(made) => made?,
            None => create()?,
        };
        let vm = Vm { kvm, fd, has_pit: AtomicBool::new(false) };
        vm.register_memory(memory)?;
        vm.fd.set_tss_address(TSS_ADDRESS).map_err(VmError::SetTssAddress)?;
        vm.fd.create_irq_chip().map_err(VmError::CreateIrqchip)?;
        Ok(vm)
    }

    /// Adds the i8254 PIT, which stock kernels calibrate against.
    pub fn create_pit(&self) -> Result<(), VmError> {
        let config = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        self.fd.create_pit2(config).map_err(VmError::CreatePit)?;
        self.has_pit.store(true, Ordering::Relaxed);
        Ok(())
    }

    pub fn has_pit(&self) -> bool {
        self.has_pit.load(Ordering::Relaxed)
    }

    /// The MSRs a snapshot saves of each vCPU: KVM's list plus the platform's own.
    pub fn saved_msr_indices(&self, platform: PlatformKind) -> Result<Vec<u32>, PersistError> {
        persist::saved_msr_indices(&self.kvm, crate::platform::unlisted_msrs(platform))
    }

    /// The VM-wide state (irqchip, PIT, clock); only while every vCPU is paused.
    pub fn save_state(&self) -> Result<VmState, PersistError> {
        persist::save_vm(&self.fd, self.has_pit())
    }

    /// Puts saved VM-wide state into this fresh VM, creating the PIT if it had one.
    pub fn restore_state(&self, state: &VmState) -> Result<(), crate::builder::BuildError> {
        if state.pit.is_some() && !self.has_pit() {
            self.create_pit()?;
        }
        persist::restore_vm(&self.fd, state)?;
        Ok(())
    }

    /// Gives every region of `memory` to KVM, one slot each, with KVM's dirty log on: the
    /// pages the vCPUs write are what a diff snapshot saves.
    fn register_memory(&self, memory: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in memory.iter().enumerate() {
            let slot = slot as u32;
            let gpa = region.start_addr().0;
            let host = region.as_ptr() as u64;
            let region = kvm_userspace_memory_region {
                slot,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: gpa,
                memory_size: region.len(),
                userspace_addr: host,
            };
            // SAFETY: the host range is a live mapping owned by `memory`, which the VMM
            // keeps alive (and never unmaps) for as long as the VM exists.
            unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| VmError::SetMemoryRegion {
                slot,
                gpa,
                source,
            })?;
        }
        Ok(())
    }

    /// The pages written since the last call, one bitmap per region of `memory` (bit `n`
    /// of word `n / 64` is the region's page `n`): the vCPUs' writes from KVM's dirty log
    /// and the devices' from the regions' bitmaps, both cleared by the call. Only while
    /// every vCPU is paused and no device runs, or a write may land between the two.
    pub fn take_dirty_pages(&self, memory: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, VmError> {
        memory
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                let slot = slot as u32;
                let mut pages = self
                    .fd
                    .get_dirty_log(slot, region.len() as usize)
                    .map_err(|source| VmError::GetDirtyLog { slot, source })?;
                let mapping: &MmapRegion = region;
                for (word, device) in pages.iter_mut().zip(mapping.bitmap().get_and_reset()) {
                    *word |= device;
                }
                Ok(pages)
            })
            .collect()
    }

    /// Routes writes of `eventfd` to interrupt line `gsi`.
    pub fn register_irqfd(&self, eventfd: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(eventfd, gsi).map_err(|source| VmError::RegisterIrqfd { gsi, source })
    }

    /// Makes a guest MMIO write of `value` at `addr` signal `eventfd` inside the kernel.
    pub fn register_mmio_ioevent(&self, eventfd: &EventFd, addr: u64, value: u32) -> Result<(), VmError> {
        self.fd
            .register_ioevent(eventfd, &IoEventAddress::Mmio(addr), value)
            .map_err(|source| VmError::RegisterIoevent { addr, source })
    }

    /// The CPUID table KVM can offer a guest.
    pub fn supported_cpuid(&self) -> Result<kvm_bindings::CpuId, VmError> {
        self.kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(VmError::GetSupportedCpuid)
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}

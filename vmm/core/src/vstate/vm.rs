//! The KVM VM: memory slots, the in-kernel irqchip, irqfds and ioeventfds.

use crate::memory::{GuestMemoryMmap, GuestRam, MemoryError, MmapRegion};
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

/// A VM as KVM made it; `ram_at`: set up with the RAM whose first region is mapped
/// there (its memory slots, TSS and irqchip), when it was made with its RAM.
struct Made {
    kvm: Kvm,
    fd: VmFd,
    ram_at: Option<usize>,
}

fn create() -> Result<Made, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
    Ok(Made { kvm, fd, ram_at: None })
}

/// Where `memory`'s first region is mapped: which RAM a VM made ahead was set up with.
fn first_mapping(memory: &GuestMemoryMmap) -> Option<usize> {
    memory.iter().next().map(|region| region.as_ptr() as usize)
}

/// A VM being made on a thread of its own, and its RAM when its size was known.
struct Ahead {
    vm: std::thread::JoinHandle<Result<Made, VmError>>,
    ram: Option<std::sync::mpsc::Receiver<Result<GuestRam, MemoryError>>>,
}

/// This process's VM, being made ahead of its configuration (see [`make_ahead`]).
static AHEAD: std::sync::Mutex<Option<Ahead>> = std::sync::Mutex::new(None);

fn ahead() -> std::sync::MutexGuard<'static, Option<Ahead>> {
    AHEAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts making this process's VM on a thread of its own, before the VMM knows its
/// configuration: KVM_CREATE_VM (0.3-0.6 ms here) and, given the size its command line
/// or snapshot says (`mem_mib`), its RAM, handed over at once ([`take_ram_ahead`]), then
/// its memory slots (about a millisecond per GiB on kvm_pvm), TSS and irqchip.
/// [`Vm::new`] takes the VM. A process that will not make a VM leaves it unused; one
/// that forks first discards it. Without a thread, [`Vm::new`] makes the VM itself.
pub fn make_ahead(mem_mib: Option<u64>) {
    let mut slot = ahead();
    if slot.is_none() {
        *slot = start(mem_mib);
    }
}

fn start(mem_mib: Option<u64>) -> Option<Ahead> {
    let (sender, ram) = match mem_mib {
        Some(_) => {
            let (sender, receiver) = std::sync::mpsc::sync_channel(1);
            (Some(sender), Some(receiver))
        }
        None => (None, None),
    };
    let parent = crate::sched::current_cpu();
    let make = move || {
        // Beside the thread that goes on reading the configuration and the snapshot, not
        // after it (this host's scheduler keeps a new thread on its busy parent's CPU).
        if let Some(cpu) = parent {
            crate::sched::avoid_cpu(cpu);
        }
        let ram = mem_mib.map(crate::memory::create_guest_ram);
        // The slots are set up on a handle of the same mappings; the builder owns RAM.
        let memory = ram.as_ref().and_then(|ram| ram.as_ref().ok()).map(|ram| ram.memory.clone());
        if let (Some(sender), Some(ram)) = (sender, ram) {
            let _ = sender.send(ram);
        }
        let mut made = create()?;
        if let Some(memory) = memory {
            set_up(&made.fd, &memory)?;
            made.ram_at = first_mapping(&memory);
        }
        Ok(made)
    };
    let vm = std::thread::Builder::new().name("make-vm-ahead".into()).spawn(make).ok()?;
    Some(Ahead { vm, ram })
}

/// The RAM made ahead, when it is of `mem_mib` MiB; `None` otherwise (none was made,
/// its size differs, or making it failed: the caller makes its own, and the VM set up
/// for that RAM is discarded first, so that no slot outlives its mapping).
pub fn take_ram_ahead(mem_mib: u64) -> Option<GuestRam> {
    take_ram(&mut ahead(), mem_mib)
}

fn take_ram(slot: &mut Option<Ahead>, mem_mib: u64) -> Option<GuestRam> {
    let receiver = slot.as_mut()?.ram.take()?;
    match receiver.recv() {
        Ok(Ok(ram)) if ram.size == mem_mib << 20 => Some(ram),
        unfit => {
            drop(finish(slot));
            drop(unfit);
            None
        }
    }
}

/// Drops the VM made ahead, once its thread is done: a process about to fork and close
/// its inherited fds (a jail) makes its VM afterwards.
pub fn discard_ahead() {
    drop(finish(&mut ahead()));
}

/// The VM of `slot` once made; `None` when none was started, or when it was set up for
/// RAM the builder never took.
fn finish(slot: &mut Option<Ahead>) -> Option<Result<Made, VmError>> {
    let Ahead { vm, ram } = slot.take()?;
    let made = vm.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    match (made, ram) {
        // Of no use: the VM goes first, so that no slot outlives its mapping.
        (Ok(made), Some(ram)) if made.ram_at.is_some() => {
            drop(made);
            drop(ram);
            None
        }
        (made, _) => Some(made),
    }
}

/// Gives `memory` to the VM `fd`, then its TSS and in-kernel irqchip (IOAPIC, PIC,
/// LAPICs).
///
/// Memory goes in first: a memory slot added once the irqchip exists costs KVM
/// milliseconds (6 ms for 256 MiB, 10 ms for 1 GiB on kvm_pvm, most of a restore),
/// against 0.2-0.7 ms before it.
fn set_up(fd: &VmFd, memory: &GuestMemoryMmap) -> Result<(), VmError> {
    register_memory(fd, memory)?;
    fd.set_tss_address(TSS_ADDRESS).map_err(VmError::SetTssAddress)?;
    fd.create_irq_chip().map_err(VmError::CreateIrqchip)
}

/// Gives every region of `memory` to KVM, one slot each, with KVM's dirty log on: the
/// pages the vCPUs write are what a diff snapshot saves.
fn register_memory(fd: &VmFd, memory: &GuestMemoryMmap) -> Result<(), VmError> {
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
        unsafe { fd.set_user_memory_region(region) }.map_err(|source| VmError::SetMemoryRegion {
            slot,
            gpa,
            source,
        })?;
    }
    Ok(())
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
    /// The VM may have been made ahead ([`make_ahead`]); it is taken then, already set up
    /// when it was made with this RAM.
    pub fn new(memory: &GuestMemoryMmap) -> Result<Vm, VmError> {
        let made = finish(&mut ahead());
        Vm::with(made, memory)
    }

    /// A VM for `memory` from `made` (made ahead, or `None`).
    fn with(made: Option<Result<Made, VmError>>, memory: &GuestMemoryMmap) -> Result<Vm, VmError> {
        let made = match made {
            // Set up for other RAM: of no use.
            Some(Ok(made)) if made.ram_at.is_some() && made.ram_at != first_mapping(memory) => create()?,
            Some(made) => made?,
            None => create()?,
        };
        if made.ram_at.is_none() {
            set_up(&made.fd, memory)?;
        }
        Ok(Vm { kvm: made.kvm, fd: made.fd, has_pit: AtomicBool::new(false) })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_ram;
    use std::os::fd::AsRawFd;

    /// A second irqchip is refused: the VM's was made.
    fn has_irqchip(vm: &Vm) -> bool {
        vm.fd.create_irq_chip().is_err()
    }

    #[test]
    fn ram_made_ahead_comes_with_a_vm_set_up_for_it() {
        let mut slot = start(Some(16));
        let ram = take_ram(&mut slot, 16).expect("RAM of the size asked for");
        let made = finish(&mut slot).expect("a VM").unwrap();
        assert_eq!(made.ram_at, first_mapping(&ram.memory));
        let made_fd = made.fd.as_raw_fd();
        let vm = Vm::with(Some(Ok(made)), &ram.memory).unwrap();
        assert_eq!(vm.fd.as_raw_fd(), made_fd, "the VM made ahead is the one used");
        assert!(has_irqchip(&vm));
        assert!(vm.take_dirty_pages(&ram.memory).is_ok(), "its slot logs dirty pages");
    }

    #[test]
    fn ram_of_another_size_is_not_taken_and_its_vm_goes_with_it() {
        let mut slot = start(Some(16));
        assert!(take_ram(&mut slot, 32).is_none());
        assert!(slot.is_none(), "the VM made for it is gone");
        assert!(take_ram(&mut slot, 16).is_none(), "and nothing is left to take");
    }

    #[test]
    fn a_vm_set_up_for_other_ram_is_not_used() {
        // RAM nobody took: its VM is dropped when the VM is asked for.
        let mut slot = start(Some(16));
        assert!(finish(&mut slot).is_none());
        // RAM taken, and a VM then asked for with other RAM: a fresh one is set up.
        let mut slot = start(Some(16));
        let ram = take_ram(&mut slot, 16).unwrap();
        let made = finish(&mut slot).unwrap().unwrap();
        let made_fd = made.fd.as_raw_fd();
        let other = create_guest_ram(16).unwrap();
        let vm = Vm::with(Some(Ok(made)), &other.memory).unwrap();
        assert_ne!(vm.fd.as_raw_fd(), made_fd);
        assert!(has_irqchip(&vm));
        drop((vm, ram));
    }

    #[test]
    fn without_a_size_the_vm_is_made_bare_and_set_up_when_taken() {
        let mut slot = start(None);
        assert!(take_ram(&mut slot, 16).is_none(), "no RAM was made");
        let made = finish(&mut slot).unwrap().unwrap();
        assert_eq!(made.ram_at, None);
        let ram = create_guest_ram(16).unwrap();
        let vm = Vm::with(Some(Ok(made)), &ram.memory).unwrap();
        assert!(has_irqchip(&vm));
        assert!(vm.take_dirty_pages(&ram.memory).is_ok());
    }
}

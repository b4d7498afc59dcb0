//! Kernel loading and the boot information each guest kind expects.
//!
//! - Desk kernel (ELF with the Carrel note): `BootInfo`, entered in long mode, native on PVM.
//! - Linux `vmlinux` (ELF) or `bzImage`: boot_params with the e820 map, 64-bit entry.
//! - PVH (ELF with XEN_ELFNOTE_PHYS32_ENTRY): `hvm_start_info`, 32-bit protected mode.
//!
//! Linux and PVH guests also get ACPI tables ([`acpi`]): CPUs, interrupt controllers,
//! the virtio-mmio devices and power-off, which stock kernels read. The devices are on
//! the command line too (`virtio_mmio.device=`), for kernels built without ACPI.

pub mod acpi;
pub mod image;

use std::fs::File;
use std::path::Path;

use crate::memory::GuestMemoryMmap;
use carrel_firmware::layout::{self, BOOT_INFO_ADDR, CMDLINE_ADDR, CMDLINE_MAX, EBDA_START, HIMEM_START};
use carrel_firmware::{memory_kind, BootInfo, DeviceEntry, MemoryRange, PlatformKind, BOOT_INFO_VERSION};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::ram_ranges;
use crate::platform::GuestKind;
use crate::vstate::regs::{EntryState, LintSetup};
use image::ImageKind;

/// Which boot protocol to use; `Auto` decides from the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// Desk note -> Desk; PVH note -> PVH; other ELF or bzImage -> Linux.
    #[default]
    Auto,
    Desk,
    Linux,
    Pvh,
}

impl std::str::FromStr for BootProtocol {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(BootProtocol::Auto),
            "desk" => Ok(BootProtocol::Desk),
            "linux" => Ok(BootProtocol::Linux),
            "pvh" => Ok(BootProtocol::Pvh),
            other => Err(format!("unknown boot protocol {other:?} (auto, desk, linux, pvh)")),
        }
    }
}

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Inspect(#[from] image::ImageError),
    #[error("cannot open {what} {path}: {source}")]
    Open { what: &'static str, path: String, source: std::io::Error },
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel { path: String, source: linux_loader::loader::Error },
    #[error("kernel {path} is not a Desk kernel (no Carrel ELF note); use --boot auto")]
    NotDesk { path: String },
    #[error("Desk kernel {path} speaks BootInfo version {found}, this VMM speaks {BOOT_INFO_VERSION}")]
    DeskVersion { path: String, found: u32 },
    #[error("kernel {path} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); use --boot linux or auto")]
    NoPvhEntry { path: String },
    #[error("command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("initrd {path} of {size} bytes does not fit below {limit:#x} in guest RAM; give the VM more memory")]
    InitrdTooLarge { path: String, size: u64, limit: u64 },
    #[error("cannot read initrd {path} into guest memory: {source}")]
    LoadInitrd { path: String, source: std::io::Error },
    #[error("cannot write {what} into guest memory: {source}")]
    WriteMemory { what: &'static str, source: vm_memory::GuestMemoryError },
    #[error("cannot write boot parameters: {0}")]
    WriteBootParams(#[source] linux_loader::configurator::Error),
    #[error("too many {what} for the boot tables")]
    TableFull { what: &'static str },
}

/// What the loader tells the builder about the guest it loaded.
#[derive(Debug, Clone, Copy)]
pub struct BootSetup {
    pub protocol: BootProtocol,
    pub entry: EntryState,
    pub guest: GuestKind,
    pub lint: LintSetup,
    /// Whether the guest gets the VIF page on PVM (only guests that know the PVM rules).
    pub wants_vif: bool,
    /// Whether to emulate the i8254 PIT (stock kernels calibrate against it).
    pub wants_pit: bool,
}

/// Everything a loader needs to know about the VM.
#[derive(Debug, Clone, Copy)]
pub struct BootRequest<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    /// The command line given; `None` takes the default of the guest kind. Linux guests
    /// get their virtio-mmio devices appended either way.
    pub cmdline: Option<&'a str>,
    pub protocol: BootProtocol,
    pub platform: PlatformKind,
    pub vcpu_count: u8,
    pub tsc_khz: u32,
    pub devices: &'a [DeviceEntry],
    pub framebuffer: (u32, u32),
}

/// Loads the kernel (and initrd) into `memory` and writes the boot information the chosen
/// protocol needs. Page tables and descriptor tables are the builder's business.
pub fn load(memory: &GuestMemoryMmap, ram_size: u64, request: &BootRequest<'_>) -> Result<BootSetup, BootError> {
    let path = request.kernel.display().to_string();
    let kind = image::inspect(request.kernel)?;
    let protocol = match (request.protocol, &kind) {
        (BootProtocol::Auto, ImageKind::Elf { desk_boot_info_version: Some(_), .. }) => BootProtocol::Desk,
        (BootProtocol::Auto, ImageKind::Elf { pvh_entry: Some(_), .. }) => BootProtocol::Pvh,
        (BootProtocol::Auto, _) => BootProtocol::Linux,
        (chosen, _) => chosen,
    };
    // Desk reads its devices from BootInfo; Linux learns them from the command line.
    let cmdline = match (protocol, request.cmdline) {
        (BootProtocol::Desk, given) => given.unwrap_or_default().to_string(),
        (_, given) => given.unwrap_or(DEFAULT_LINUX_CMDLINE).to_string() + &linux_device_args(request.devices),
    };
    let request = &BootRequest { cmdline: Some(&cmdline), ..*request };
    match protocol {
        BootProtocol::Desk => {
            let ImageKind::Elf { desk_boot_info_version: Some(version), .. } = kind else {
                return Err(BootError::NotDesk { path });
            };
            if version != BOOT_INFO_VERSION {
                return Err(BootError::DeskVersion { path, found: version });
            }
            load_desk(memory, ram_size, request)
        }
        BootProtocol::Pvh => {
            let ImageKind::Elf { pvh_entry: Some(entry), linux, .. } = kind else {
                return Err(BootError::NoPvhEntry { path });
            };
            load_pvh(memory, ram_size, request, entry, linux)
        }
        BootProtocol::Linux | BootProtocol::Auto => load_linux(memory, ram_size, request, kind == ImageKind::BzImage),
    }
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open { what, path: path.display().to_string(), source })
}

fn load_elf(memory: &GuestMemoryMmap, path: &Path) -> Result<linux_loader::loader::KernelLoaderResult, BootError> {
    let mut file = open("kernel", path)?;
    Elf::load(memory, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(|source| BootError::LoadKernel { path: path.display().to_string(), source })
}

fn write_cmdline(memory: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong { len: cmdline.len(), max: CMDLINE_MAX - 1 });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    memory
        .write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|source| BootError::WriteMemory { what: "the command line", source })
}

/// The RAM map every protocol reports: low RAM without the EBDA/BIOS hole, then RAM from
/// 1 MiB to the MMIO gap, then RAM above 4 GiB. (start, length).
pub fn ram_map(ram_size: u64) -> Vec<(u64, u64)> {
    let mut map = Vec::new();
    for (start, len) in ram_ranges(ram_size) {
        if start == 0 {
            map.push((0, EBDA_START.min(len)));
            if len > HIMEM_START {
                map.push((HIMEM_START, len - HIMEM_START));
            }
        } else {
            map.push((start, len));
        }
    }
    map
}

fn load_desk(memory: &GuestMemoryMmap, ram_size: u64, request: &BootRequest<'_>) -> Result<BootSetup, BootError> {
    let loaded = load_elf(memory, request.kernel)?;
    write_cmdline(memory, request.cmdline.unwrap_or_default())?;

    let mut info = BootInfo::new();
    info.platform = request.platform as u32;
    info.vcpu_count = u32::from(request.vcpu_count);
    info.vif_addr = if request.platform == PlatformKind::Pvm { layout::VIF_ADDR } else { 0 };
    info.tsc_khz = u64::from(request.tsc_khz);
    info.cmdline_addr = CMDLINE_ADDR;
    info.cmdline_len = request.cmdline.unwrap_or_default().len() as u32;
    info.lapic_addr = layout::LAPIC_ADDR;
    info.ioapic_addr = layout::IOAPIC_ADDR;
    info.idt_addr = layout::IDT_ADDR;
    info.kernel_end = loaded.kernel_end;
    info.framebuffer_width = request.framebuffer.0;
    info.framebuffer_height = request.framebuffer.1;
    // Boot structures below 1 MiB and the kernel image are reserved; the rest is free.
    let kernel_end = loaded.kernel_end.next_multiple_of(0x1000);
    let mut ranges = vec![MemoryRange { base: 0, size: HIMEM_START, kind: memory_kind::RESERVED, reserved: 0 }];
    for (start, len) in ram_map(ram_size).into_iter().filter(|(start, _)| *start >= HIMEM_START) {
        let end = start + len;
        if start < kernel_end && kernel_end < end {
            ranges.push(MemoryRange {
                base: start,
                size: kernel_end - start,
                kind: memory_kind::RESERVED,
                reserved: 0,
            });
            ranges.push(MemoryRange {
                base: kernel_end,
                size: end - kernel_end,
                kind: memory_kind::USABLE,
                reserved: 0,
            });
        } else {
            ranges.push(MemoryRange { base: start, size: len, kind: memory_kind::USABLE, reserved: 0 });
        }
    }
    for range in ranges {
        if !info.push_memory_range(range) {
            return Err(BootError::TableFull { what: "memory ranges" });
        }
    }
    for device in request.devices {
        if !info.push_device(*device) {
            return Err(BootError::TableFull { what: "devices" });
        }
    }
    memory
        .write_slice(info.as_bytes(), GuestAddress(BOOT_INFO_ADDR))
        .map_err(|source| BootError::WriteMemory { what: "BootInfo", source })?;
    Ok(BootSetup {
        protocol: BootProtocol::Desk,
        entry: EntryState::Long64 {
            rip: loaded.kernel_load.0,
            rsi: 0,
            rdi: BOOT_INFO_ADDR,
            rsp: layout::BOOT_STACK_TOP,
        },
        guest: GuestKind::Desk,
        lint: LintSetup::Masked,
        wants_vif: true,
        wants_pit: false,
    })
}

/// Loads the initrd at the top of low RAM (below `limit`), page aligned.
fn load_initrd(memory: &GuestMemoryMmap, ram_size: u64, path: &Path, limit: u64) -> Result<(u64, u64), BootError> {
    let name = path.display().to_string();
    let mut file = open("initrd", path)?;
    let size = file.metadata().map_err(|source| BootError::LoadInitrd { path: name.clone(), source })?.len();
    let top = ram_size.min(layout::MMIO_GAP_START).min(limit);
    let addr = top.checked_sub(size).map(|a| a & !0xfff).filter(|a| *a >= HIMEM_START);
    let Some(addr) = addr else {
        return Err(BootError::InitrdTooLarge { path: name, size, limit: top });
    };
    memory
        .read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|err| BootError::LoadInitrd { path: name, source: std::io::Error::other(err.to_string()) })?;
    Ok((addr, size))
}

const E820_RAM: u32 = 1;
/// ACPI tables: not RAM; the kernel reads them and leaves them be.
const E820_ACPI: u32 = 3;

/// The e820 map of a Linux or PVH guest: its RAM and the ACPI tables' region, in address
/// order. (start, length, e820 type: 1 RAM, 3 ACPI data).
pub fn linux_memory_map(ram_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map: Vec<(u64, u64, u32)> =
        ram_map(ram_size).into_iter().map(|(start, len)| (start, len, E820_RAM)).collect();
    map.push((layout::ACPI_START, layout::ACPI_SIZE, E820_ACPI));
    map.sort_by_key(|(start, ..)| *start);
    map
}
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Highest initrd address an old setup header allows when it does not say.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

fn load_linux(
    memory: &GuestMemoryMmap,
    ram_size: u64,
    request: &BootRequest<'_>,
    bzimage: bool,
) -> Result<BootSetup, BootError> {
    let path = request.kernel.display().to_string();
    let (loaded, entry) = if bzimage {
        let mut file = open("kernel", request.kernel)?;
        let loaded = BzImage::load(memory, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(|source| BootError::LoadKernel { path: path.clone(), source })?;
        // The 64-bit entry of a bzImage is 0x200 past the protected-mode code.
        let entry = loaded.kernel_load.0 + 0x200;
        (loaded, entry)
    } else {
        let loaded = load_elf(memory, request.kernel)?;
        let entry = loaded.kernel_load.0;
        (loaded, entry)
    };
    write_cmdline(memory, request.cmdline.unwrap_or_default())?;

    let mut params = boot_params::default();
    if let Some(header) = loaded.setup_header {
        params.hdr = header;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = request.cmdline.unwrap_or_default().len() as u32 + 1;
    if let Some(initrd) = request.initrd {
        let limit = match params.hdr.initrd_addr_max {
            0 => DEFAULT_INITRD_ADDR_MAX,
            max => u64::from(max),
        } + 1;
        let (addr, size) = load_initrd(memory, ram_size, initrd, limit)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (index, (start, len, kind)) in linux_memory_map(ram_size).into_iter().enumerate() {
        let Some(slot) = params.e820_table.get_mut(index) else {
            return Err(BootError::TableFull { what: "e820 entries" });
        };
        *slot = boot_e820_entry { addr: start, size: len, r#type: kind };
        params.e820_entries += 1;
    }
    params.acpi_rsdp_addr = acpi::write_tables(memory, request.vcpu_count, request.devices)?;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(BOOT_INFO_ADDR)), memory)
        .map_err(BootError::WriteBootParams)?;
    Ok(BootSetup {
        protocol: BootProtocol::Linux,
        entry: EntryState::Long64 { rip: entry, rsi: BOOT_INFO_ADDR, rdi: 0, rsp: layout::BOOT_STACK_TOP },
        guest: GuestKind::Stock,
        // Hardware-reduced ACPI: Linux leaves the 8259 alone, so it must not reach LINT0.
        lint: LintSetup::Masked,
        wants_vif: false,
        wants_pit: true,
    })
}

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// `linux`: the image is a Linux kernel, which gets the i8254 PIT it may calibrate
/// against; other PVH images (test images, unikernels) start without it, since creating
/// it costs milliseconds of VM start here.
fn load_pvh(
    memory: &GuestMemoryMmap,
    ram_size: u64,
    request: &BootRequest<'_>,
    entry: u32,
    linux: bool,
) -> Result<BootSetup, BootError> {
    load_elf(memory, request.kernel)?;
    write_cmdline(memory, request.cmdline.unwrap_or_default())?;
    let memmap: Vec<hvm_memmap_table_entry> = linux_memory_map(ram_size)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry { addr, size, type_, reserved: 0 })
        .collect();
    let rsdp_paddr = acpi::write_tables(memory, request.vcpu_count, request.devices)?;
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr,
        memmap_paddr: layout::PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(BOOT_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_ADDR));
    if let Some(initrd) = request.initrd {
        let (addr, size) = load_initrd(memory, ram_size, initrd, DEFAULT_INITRD_ADDR_MAX + 1)?;
        let module = hvm_modlist_entry { paddr: addr, size, ..Default::default() };
        let modlist_addr =
            layout::PVH_MEMMAP_ADDR + (memmap.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        start_info.nr_modules = 1;
        start_info.modlist_paddr = modlist_addr;
        params = BootParams::new(&start_info, GuestAddress(BOOT_INFO_ADDR));
        params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_ADDR));
        params.set_modules(&[module], GuestAddress(modlist_addr));
    }
    PvhBootConfigurator::write_bootparams(&params, memory).map_err(BootError::WriteBootParams)?;
    Ok(BootSetup {
        protocol: BootProtocol::Pvh,
        entry: EntryState::Protected32 { eip: entry, ebx: BOOT_INFO_ADDR as u32 },
        guest: GuestKind::Stock,
        // Linux reads the ACPI tables (see load_linux); other PVH images keep the 8259's
        // line as a PC leaves it.
        lint: if linux { LintSetup::Masked } else { LintSetup::LegacyPic },
        wants_vif: false,
        wants_pit: linux,
    })
}

/// The command line of a Linux guest when none is given.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// The `virtio_mmio.device=` arguments that describe `devices` to Linux.
pub fn linux_device_args(devices: &[DeviceEntry]) -> String {
    devices
        .iter()
        .map(|device| format!(" virtio_mmio.device={}K@{:#x}:{}", device.size >> 10, device.base, device.irq))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_map_skips_ebda_hole_and_mmio_gap() {
        assert_eq!(ram_map(128 << 20), vec![(0, EBDA_START), (HIMEM_START, (128 << 20) - HIMEM_START)]);
        let big = layout::MMIO_GAP_START + (2 << 30);
        let map = ram_map(big);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1], (HIMEM_START, layout::MMIO_GAP_START - HIMEM_START));
        assert_eq!(map[2], (layout::MMIO_GAP_END, 2 << 30));
    }

    #[test]
    fn linux_device_args_name_size_base_and_irq() {
        let devices = [DeviceEntry { base: 0xd000_0000, size: 0x1000, irq: 5, device_type: 4 }];
        assert_eq!(linux_device_args(&devices), " virtio_mmio.device=4K@0xd0000000:5");
    }

    #[test]
    fn boot_protocol_parses_known_names_only() {
        assert_eq!("pvh".parse::<BootProtocol>().unwrap(), BootProtocol::Pvh);
        assert!("bios".parse::<BootProtocol>().is_err());
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    /// A minimal bzImage: setup header with the magic, one setup sector, a few bytes of
    /// "protected-mode code".
    fn fake_bzimage() -> std::path::PathBuf {
        let mut bytes = vec![0u8; 2 * 512 + 64];
        bytes[0x1f1] = 1; // setup_sects
        bytes[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        bytes[0x202..0x206].copy_from_slice(b"HdrS");
        bytes[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version 2.15
        bytes[0x211] = 0x01; // loadflags: LOADED_HIGH
        bytes[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        bytes[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        bytes[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
        let path =
            std::env::temp_dir().join(format!("carrel-bz-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn request<'a>(kernel: &'a Path, initrd: Option<&'a Path>, cmdline: &'a str) -> BootRequest<'a> {
        BootRequest {
            kernel,
            initrd,
            cmdline: Some(cmdline),
            protocol: BootProtocol::Auto,
            platform: PlatformKind::Hardware,
            vcpu_count: 1,
            tsc_khz: 0,
            devices: &[],
            framebuffer: (0, 0),
        }
    }

    #[test]
    fn bzimage_loads_above_1mib_with_64_bit_entry_and_boot_params() {
        let kernel = fake_bzimage();
        let memory = memory();
        let setup = load(&memory, 64 << 20, &request(&kernel, None, "console=ttyS0")).unwrap();
        std::fs::remove_file(&kernel).unwrap();
        assert_eq!(setup.protocol, BootProtocol::Linux);
        let EntryState::Long64 { rip, rsi, .. } = setup.entry else { panic!("bzImage must enter in long mode") };
        assert_eq!(rip, HIMEM_START + 0x200);
        assert_eq!(rsi, BOOT_INFO_ADDR);
        let params: boot_params = memory.read_obj(GuestAddress(BOOT_INFO_ADDR)).unwrap();
        assert_eq!({ params.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ params.hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!(params.e820_entries, 3);
        assert_eq!({ params.e820_table[1].addr }, layout::ACPI_START);
        assert_eq!({ params.e820_table[1].r#type }, E820_ACPI);
        assert_eq!({ params.e820_table[2].addr }, HIMEM_START);
        assert_eq!({ params.acpi_rsdp_addr }, layout::ACPI_START);
        let mut signature = [0u8; 8];
        memory.read_slice(&mut signature, GuestAddress(layout::ACPI_START)).unwrap();
        assert_eq!(&signature, b"RSD PTR ");
        let mut cmdline = [0u8; 14];
        memory.read_slice(&mut cmdline, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&cmdline, b"console=ttyS0\0");
        // The protected-mode code (after the one setup sector) sits at 1 MiB.
        assert_eq!(memory.read_obj::<u8>(GuestAddress(HIMEM_START)).unwrap(), 0);
    }

    #[test]
    fn bzimage_initrd_lands_page_aligned_at_top_of_ram() {
        let kernel = fake_bzimage();
        let initrd = std::env::temp_dir().join(format!("carrel-initrd-{}", std::process::id()));
        std::fs::write(&initrd, vec![0x5a; 10_000]).unwrap();
        let memory = memory();
        load(&memory, 64 << 20, &request(&kernel, Some(&initrd), "")).unwrap();
        std::fs::remove_file(&kernel).unwrap();
        std::fs::remove_file(&initrd).unwrap();
        let params: boot_params = memory.read_obj(GuestAddress(BOOT_INFO_ADDR)).unwrap();
        let addr = u64::from(params.hdr.ramdisk_image);
        assert_eq!(addr % 0x1000, 0);
        assert!(addr + 10_000 <= 64 << 20);
        assert_eq!({ params.hdr.ramdisk_size }, 10_000);
        assert_eq!(memory.read_obj::<u8>(GuestAddress(addr + 9_999)).unwrap(), 0x5a);
    }

    #[test]
    fn cmdline_longer_than_limit_is_rejected() {
        let kernel = fake_bzimage();
        let long = "x".repeat(CMDLINE_MAX);
        let result = load(&memory(), 64 << 20, &request(&kernel, None, &long));
        std::fs::remove_file(&kernel).unwrap();
        assert!(matches!(result, Err(BootError::CmdlineTooLong { .. })));
    }
}

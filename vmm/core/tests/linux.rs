//! A stock Debian cloud kernel on carrel-vmm. On kvm_pvm it runs emulated and cannot
//! reach userspace (shared/PLATFORM.md), so these tests read its early boot messages:
//! the version banner, the exact command line, the e820 map the VMM built, the ACPI
//! tables it found and the CPUs its MADT gave it.

mod common;

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{workspace_root, RunningVm};

/// Emulated early boot takes ~20-60 s to the e820 map here; a VMX/SVM host takes ms.
const EARLY_BOOT_DEADLINE: Duration = Duration::from_secs(240);
const MEM_MIB: u64 = 256;
const CMDLINE: &str = "console=ttyS0 earlycon=uart8250,io,0x3f8 carrel.test=e820";

/// Fetches and extracts the kernel once (scripts/fetch-linux-kernel.sh is idempotent).
fn vmlinux() -> std::path::PathBuf {
    static FETCHED: OnceLock<()> = OnceLock::new();
    let root = workspace_root();
    FETCHED.get_or_init(|| {
        let status = Command::new("bash").arg(root.join("scripts/fetch-linux-kernel.sh")).status().unwrap();
        assert!(status.success(), "scripts/fetch-linux-kernel.sh failed");
    });
    root.join(".cache/linux/vmlinux")
}

/// vCPUs of the early-boot VMs: the MADT must list them all.
const CPUS: u8 = 2;

/// How Linux prints one e820 range of ours.
fn e820_line(start: u64, len: u64, kind: u32) -> String {
    let name = match kind {
        1 => "usable",
        3 => "ACPI data",
        other => panic!("the VMM writes no e820 type {other}"),
    };
    format!("BIOS-e820: [mem {:#018x}-{:#018x}] {name}", start, start + len - 1)
}

/// Size of the initrd handed to the early-boot tests; Linux reserves it before it looks
/// inside, so any bytes do.
const INITRD_BYTES: u64 = 3 << 20;

fn boot_and_check_early_messages(boot: &str) {
    let kernel = vmlinux();
    let mem = MEM_MIB.to_string();
    let cpus = CPUS.to_string();
    let initrd = common::scratch_path("initrd.bin");
    std::fs::write(&initrd, vec![0x5a; INITRD_BYTES as usize]).unwrap();
    let disk = common::scratch_path("linux-disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_flag = format!("{},readonly", disk.display());
    let started = Instant::now();
    let mut vm = RunningVm::start(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--boot",
        boot,
        "--mem",
        &mem,
        "--cpus",
        &cpus,
        "--cmdline",
        CMDLINE,
        "--initrd",
        initrd.to_str().unwrap(),
        "--disk",
        &disk_flag,
    ]);
    vm.wait_for_line("carrel-vmm:", EARLY_BOOT_DEADLINE);
    let version = vm.wait_for_line("Linux version", EARLY_BOOT_DEADLINE);
    let first_message = started.elapsed();
    let command_line = vm.wait_for_line("Command line:", EARLY_BOOT_DEADLINE);
    let given = command_line.split("Command line: ").nth(1).unwrap_or_default();
    assert!(given.starts_with(CMDLINE), "the kernel saw {given:?}, we gave {CMDLINE:?}");
    assert!(given.contains("virtio_mmio.device=4K@0xd0000000:5"), "the rng device is on the command line: {given}");
    // rng, gpu, keyboard, tablet, then the disk: the fifth window and line.
    assert!(given.contains("virtio_mmio.device=4K@0xd0004000:9"), "the disk is on the command line: {given}");
    for (start, len, kind) in carrel_vmm::boot::linux_memory_map(MEM_MIB << 20) {
        vm.wait_for_line(&e820_line(start, len, kind), EARLY_BOOT_DEADLINE);
    }
    let e820_seen = started.elapsed();
    // The VMM puts the initrd page-aligned at the top of low RAM.
    let initrd_start = ((MEM_MIB << 20) - INITRD_BYTES) & !0xfff;
    let ramdisk = format!("RAMDISK: [mem {:#010x}-{:#010x}]", initrd_start, (MEM_MIB << 20) - 1);
    vm.wait_for_line(&ramdisk, EARLY_BOOT_DEADLINE);
    std::fs::remove_file(&initrd).unwrap();
    std::fs::remove_file(&disk).unwrap();

    // The ACPI tables, as Linux lists them: the RSDP where the VMM put it, then the XSDT's
    // tables and the DSDT the FADT names, each with our OEM id (checksums are checked
    // later, when the tables are used).
    let rsdp = vm.wait_for_line("ACPI: RSDP ", EARLY_BOOT_DEADLINE);
    assert!(rsdp.contains(&format!("ACPI: RSDP 0x{:016X}", carrel_firmware::layout::ACPI_START)), "{rsdp}");
    for signature in ["XSDT", "FACP", "DSDT", "APIC"] {
        let line = vm.wait_for_line(&format!("ACPI: {signature} "), EARLY_BOOT_DEADLINE);
        assert!(line.contains("CARREL"), "{line}");
    }
    let ioapic = vm.wait_for_line("IOAPIC[0]:", EARLY_BOOT_DEADLINE);
    assert!(ioapic.contains("address 0xfec00000, GSI 0-23"), "{ioapic}");
    vm.wait_for_line("ACPI: Using ACPI (MADT) for SMP configuration information", EARLY_BOOT_DEADLINE);
    vm.wait_for_line(&format!("smpboot: Allowing {CPUS} CPUs, 0 hotplug CPUs"), EARLY_BOOT_DEADLINE);
    eprintln!(
        "{boot}: {version:?} after {first_message:?}; e820 after {e820_seen:?}; MADT's CPUs after {:?}",
        started.elapsed()
    );
}

#[test]
fn debian_vmlinux_via_pvh_prints_version_cmdline_e820_map_initrd_acpi_tables_and_cpus() {
    boot_and_check_early_messages("pvh");
}

#[test]
fn debian_vmlinux_via_64_bit_entry_prints_version_cmdline_e820_map_initrd_acpi_tables_and_cpus() {
    boot_and_check_early_messages("linux");
}

#[test]
fn debian_bzimage_loads_with_its_setup_header_and_64_bit_entry() {
    use carrel_vmm::boot::{load, BootProtocol, BootRequest};
    use carrel_vmm::vstate::regs::EntryState;
    use linux_loader::loader::bootparam::boot_params;
    use vm_memory::{Bytes, GuestAddress};

    vmlinux();
    let bzimage = workspace_root().join(".cache/linux/bzImage");
    let ram = carrel_vmm::memory::create_guest_ram(MEM_MIB).unwrap();
    let request = BootRequest {
        kernel: &bzimage,
        initrd: None,
        cmdline: Some(CMDLINE),
        protocol: BootProtocol::Auto,
        platform: carrel_firmware::PlatformKind::Hardware,
        vcpu_count: 1,
        tsc_khz: 0,
        devices: &[],
        framebuffer: (0, 0),
    };
    let setup = load(&ram.memory, ram.size, &request).unwrap();
    assert_eq!(setup.protocol, BootProtocol::Linux);
    let EntryState::Long64 { rip, rsi, .. } = setup.entry else { panic!("a bzImage enters in long mode") };
    assert_eq!(rip, 0x10_0000 + 0x200, "64-bit entry is startup_64 of the decompressor");
    let params: boot_params = ram.memory.read_obj(GuestAddress(rsi)).unwrap();
    assert_eq!({ params.hdr.header }, 0x5372_6448, "HdrS");
    assert!({ params.hdr.version } >= 0x020c, "a 64-bit capable boot protocol");
    assert_eq!(params.hdr.type_of_loader, 0xff);
    assert_eq!(usize::from(params.e820_entries), carrel_vmm::boot::linux_memory_map(MEM_MIB << 20).len());
    assert_eq!({ params.acpi_rsdp_addr }, carrel_firmware::layout::ACPI_START);
    // The compressed kernel now sits at 1 MiB: the same bytes as in the file past the setup.
    let setup_bytes = (usize::from(params.hdr.setup_sects) + 1) * 512;
    let file = std::fs::read(&bzimage).unwrap();
    let mut loaded = vec![0u8; 4096];
    ram.memory.read_slice(&mut loaded, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(&loaded[..], &file[setup_bytes..setup_bytes + 4096]);
}

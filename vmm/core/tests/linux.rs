//! A stock Debian cloud kernel on carrel-vmm. On kvm_pvm it runs emulated and cannot
//! reach userspace (shared/PLATFORM.md), so these tests read its early boot messages:
//! the version banner, the exact command line and the e820 map the VMM built.

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

/// How Linux prints one e820 range of ours.
fn e820_line(start: u64, len: u64) -> String {
    format!("BIOS-e820: [mem {:#018x}-{:#018x}] usable", start, start + len - 1)
}

fn boot_and_check_early_messages(boot: &str) {
    let kernel = vmlinux();
    let mem = MEM_MIB.to_string();
    let started = Instant::now();
    let mut vm = RunningVm::start(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--boot",
        boot,
        "--mem",
        &mem,
        "--cmdline",
        CMDLINE,
    ]);
    vm.wait_for_line("carrel-vmm:", EARLY_BOOT_DEADLINE);
    let version = vm.wait_for_line("Linux version", EARLY_BOOT_DEADLINE);
    let first_message = started.elapsed();
    let command_line = vm.wait_for_line("Command line:", EARLY_BOOT_DEADLINE);
    let given = command_line.split("Command line: ").nth(1).unwrap_or_default();
    assert!(given.starts_with(CMDLINE), "the kernel saw {given:?}, we gave {CMDLINE:?}");
    assert!(given.contains("virtio_mmio.device=4K@0xd0000000:5"), "the rng device is on the command line: {given}");
    for (start, len) in carrel_vmm::boot::ram_map(MEM_MIB << 20) {
        vm.wait_for_line(&e820_line(start, len), EARLY_BOOT_DEADLINE);
    }
    eprintln!("{boot}: {version:?} after {first_message:?}; e820 after {:?}", started.elapsed());
}

#[test]
fn debian_vmlinux_via_pvh_prints_version_cmdline_and_our_e820_map() {
    boot_and_check_early_messages("pvh");
}

#[test]
fn debian_vmlinux_via_64_bit_entry_prints_version_cmdline_and_our_e820_map() {
    boot_and_check_early_messages("linux");
}

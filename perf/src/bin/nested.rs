//! The nested benchmark: Linux on hardware KVM, carrel-vmm next to QEMU `-M microvm`.
//!
//! Runs inside the nested test machine (`scripts/nested-test.sh --perf`: QEMU TCG with an
//! emulated SVM CPU, kvm_amd inside), where a stock Linux kernel reaches userspace. In one
//! run, interleaved, N times each, on the same Debian generic `vmlinux` and initramfs
//! (the minimal initramfs with `/carrel-init`, scripts/nested/l2-init.sh):
//! - `carrel-vmm run`: process start to the `carrel-l2: init` console line;
//! - `qemu-system-x86_64 -M microvm -enable-kvm`: the same.
//! - with `--desktop DIR` (the Linux agent image, kernels/linux/build-image.sh): the same
//!   image in both, with a screen, keyboard, tablet, rng and its root disk (carrel-vmm: a
//!   fresh layer over `rootfs.ext4`; QEMU: `snapshot=on`), from process start to the
//!   console's `carrel-desktop: ready` (Xorg, openbox and the terminal are up, after the
//!   first frames of the desktop).
//! And, for reference, carrel-vmm with the Desk kernel: process start to `desk: ready`.
//!
//! Everything runs on an emulated CPU, so absolute times mean little; the ratio of the two
//! VMMs in the same run is the number to compare. The guest's own clock at `/init` (its
//! uptime) is recorded too, which separates the VMM's share from the kernel's.
//!
//!   nested --kernel VMLINUX --initrd INITRD [--vmm CARREL_VMM] [--runs N] [--mem MiB] [--desktop DIR]
//!
//! The result goes where `carrel_perf::report` puts it (CARREL_PERF_OUT in the harness).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use carrel_perf::{report, workspace_root, Summary};
use serde_json::{json, Value};

const INIT_LINE: &str = "carrel-l2: init at ";
const DESKTOP_LINE: &str = "carrel-desktop: ready";
const DESKTOP_MEM_MIB: &str = "1024";
const DEADLINE: Duration = Duration::from_secs(300);
const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 rdinit=/carrel-init";

struct Run {
    to_line: Duration,
    /// The guest's uptime when /init ran, from the line itself.
    guest_uptime: Option<f64>,
}

/// Starts `command`, waits for a stdout line containing `needle`, then kills and reaps it.
fn time_to_line(mut command: Command, needle: &str) -> anyhow::Result<Run> {
    command.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null());
    let started = Instant::now();
    let mut child = command.spawn().with_context(|| format!("spawning {command:?}"))?;
    let stdout = child.stdout.take().context("stdout")?;
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let found = loop {
        match lines.recv_timeout(DEADLINE.saturating_sub(started.elapsed())) {
            Ok((at, line)) if line.contains(needle) => break Some((at, line)),
            Ok((_, line)) => seen.push(line),
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let Some((at, line)) = found else {
        bail!("no {needle:?} within {DEADLINE:?} from {command:?}; output:\n{}", seen.join("\n"));
    };
    // `carrel-l2: init at SECONDS ...` or `carrel-desktop: ready: ... (uptime SECONDS s)`.
    let guest_uptime = [INIT_LINE, "(uptime "]
        .iter()
        .find_map(|marker| line.split(marker).nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|seconds| seconds.parse().ok());
    Ok(Run { to_line: at - started, guest_uptime })
}

fn summary(runs: &[Run]) -> Value {
    let mut value = Summary::of(&runs.iter().map(|run| run.to_line).collect::<Vec<_>>())
        .map(|summary| summary.to_json_ms())
        .unwrap_or_default();
    let mut uptimes: Vec<f64> = runs.iter().filter_map(|run| run.guest_uptime).collect();
    uptimes.sort_by(f64::total_cmp);
    if let (Value::Object(map), false) = (&mut value, uptimes.is_empty()) {
        map.insert("guest_uptime_at_line_median_s".into(), json!(uptimes[uptimes.len() / 2]));
    }
    value
}

fn median(runs: &[Run]) -> Option<f64> {
    Summary::of(&runs.iter().map(|run| run.to_line).collect::<Vec<_>>()).map(|s| s.median.as_secs_f64())
}

/// The median of `carrel` over the median of `qemu`; `null` without runs.
fn median_ratio(carrel: &[Run], qemu: &[Run]) -> Value {
    match (median(carrel), median(qemu)) {
        (Some(carrel), Some(qemu)) => json!(carrel / qemu),
        _ => Value::Null,
    }
}

/// The Linux agent image in `dir`: its kernel, initrd, root filesystem and command line.
struct Desktop {
    vmlinux: PathBuf,
    initrd: PathBuf,
    rootfs: PathBuf,
    cmdline: String,
}

impl Desktop {
    fn open(dir: &std::path::Path) -> anyhow::Result<Desktop> {
        let file = |name: &str| {
            let path = dir.join(name);
            anyhow::ensure!(
                path.is_file(),
                "{} is missing: build it with kernels/linux/build-image.sh",
                path.display()
            );
            Ok(path)
        };
        let cmdline = std::fs::read_to_string(file("cmdline")?)?.trim().to_string();
        Ok(Desktop { vmlinux: file("vmlinux")?, initrd: file("initrd.img")?, rootfs: file("rootfs.ext4")?, cmdline })
    }

    /// carrel-vmm with the image, its root a new layer at `layer`.
    fn carrel(&self, vmm: &std::path::Path, layer: &std::path::Path) -> Command {
        let _ = std::fs::remove_file(layer);
        let mut command = Command::new(vmm);
        command
            .args(["run", "--mem", DESKTOP_MEM_MIB, "--display", "1280x800", "--kernel"])
            .arg(&self.vmlinux)
            .arg("--initrd")
            .arg(&self.initrd)
            .args(["--cmdline", &self.cmdline, "--disk"])
            .arg(format!("{},base={}", layer.display(), self.rootfs.display()));
        command
    }

    /// QEMU microvm with ACPI and the same devices, writes to the root kept aside.
    fn qemu(&self) -> Command {
        let mut command = Command::new("qemu-system-x86_64");
        command
            .args(["-M", "microvm,acpi=on", "-enable-kvm", "-cpu", "host", "-m", DESKTOP_MEM_MIB])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"])
            // virtio-gpu needs virtio 1.
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .arg("-kernel")
            .arg(&self.vmlinux)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", &self.cmdline, "-drive"])
            .arg(format!("id=root,file={},format=raw,if=none,snapshot=on", self.rootfs.display()))
            .args(["-device", "virtio-blk-device,drive=root", "-device", "virtio-gpu-device"])
            .args([
                "-device",
                "virtio-keyboard-device",
                "-device",
                "virtio-tablet-device",
                "-device",
                "virtio-rng-device",
            ]);
        command
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|arg| arg == name).and_then(|index| args.get(index + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let kernel = PathBuf::from(flag(&args, "--kernel").context("--kernel VMLINUX is required")?);
    let initrd = PathBuf::from(flag(&args, "--initrd").context("--initrd INITRD is required")?);
    let root = workspace_root();
    let vmm = flag(&args, "--vmm").map(PathBuf::from).unwrap_or_else(|| root.join("target/release/carrel-vmm"));
    let runs: usize = flag(&args, "--runs").map(|runs| runs.parse()).transpose()?.unwrap_or(5);
    let mem = flag(&args, "--mem").unwrap_or_else(|| "512".into());
    let desk = root.join("target/guests/desk.elf");
    let desktop = flag(&args, "--desktop").map(|dir| Desktop::open(std::path::Path::new(&dir))).transpose()?;
    let layer = std::env::temp_dir().join(format!("carrel-nested-bench-{}.layer", std::process::id()));
    for path in [&kernel, &initrd, &vmm, &desk] {
        if !path.exists() {
            bail!("{} is missing: run it through scripts/nested-test.sh --perf, which builds it", path.display());
        }
    }

    let (mut carrel, mut qemu, mut desk_runs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut carrel_desktop, mut qemu_desktop) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let mut command = Command::new(&vmm);
        command.args(["run", "--mem", &mem, "--kernel"]).arg(&kernel).arg("--initrd").arg(&initrd);
        command.args(["--cmdline", CMDLINE]);
        carrel.push(time_to_line(command, INIT_LINE)?);

        let mut command = Command::new("qemu-system-x86_64");
        command
            .args(["-M", "microvm", "-enable-kvm", "-cpu", "host", "-m", &mem])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", CMDLINE]);
        qemu.push(time_to_line(command, INIT_LINE)?);

        let mut command = Command::new(&vmm);
        command.args(["run", "--mem", "128", "--kernel"]).arg(&desk).args(["--cmdline", "desk.exit=1"]);
        desk_runs.push(time_to_line(command, "desk: ready")?);
        eprintln!(
            "nested: run {run}/{runs}: /init after {:.2} s (carrel-vmm), {:.2} s (QEMU microvm); desk: ready after {:.3} s",
            carrel[run - 1].to_line.as_secs_f64(),
            qemu[run - 1].to_line.as_secs_f64(),
            desk_runs[run - 1].to_line.as_secs_f64()
        );
        if let Some(desktop) = &desktop {
            carrel_desktop.push(time_to_line(desktop.carrel(&vmm, &layer), DESKTOP_LINE)?);
            let _ = std::fs::remove_file(&layer);
            qemu_desktop.push(time_to_line(desktop.qemu(), DESKTOP_LINE)?);
            eprintln!(
                "nested: run {run}/{runs}: desktop ready after {:.2} s (carrel-vmm, guest uptime {:?} s), {:.2} s (QEMU microvm, {:?} s)",
                carrel_desktop[run - 1].to_line.as_secs_f64(),
                carrel_desktop[run - 1].guest_uptime,
                qemu_desktop[run - 1].to_line.as_secs_f64(),
                qemu_desktop[run - 1].guest_uptime,
            );
        }
    }
    let desktop_result = match &desktop {
        Some(desktop) => json!({
            "image_cmdline": desktop.cmdline,
            "mem_mib": DESKTOP_MEM_MIB,
            "start_to_desktop_ready_carrel_vmm": summary(&carrel_desktop),
            "start_to_desktop_ready_qemu_microvm": summary(&qemu_desktop),
            "median_ratio_carrel_over_qemu": median_ratio(&carrel_desktop, &qemu_desktop),
        }),
        None => json!("not measured: no --desktop DIR (the Linux agent image) given"),
    };

    let ratio = median_ratio(&carrel, &qemu);
    let platform = if std::path::Path::new("/sys/module/kvm_pvm").exists() { "pvm" } else { "hardware" };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    report(
        "nested",
        json!({
            "platform": platform,
            "where": "inside scripts/nested-test.sh: QEMU TCG, EPYC,-xsave (SVM), kvm_amd nested=1; TCG times, compare ratios",
            "l1_kernel": release.trim(),
            "l2_kernel": kernel.display().to_string(),
            "l2_cmdline": CMDLINE,
            "mem_mib": mem,
            "runs": runs,
            "linux_start_to_init_carrel_vmm": summary(&carrel),
            "linux_start_to_init_qemu_microvm": summary(&qemu),
            "linux_start_to_init_median_ratio_carrel_over_qemu": ratio,
            "desk_start_to_ready_carrel_vmm": summary(&desk_runs),
            "linux_desktop": desktop_result,
        }),
    )?;
    Ok(())
}

//! End-to-end boots on real KVM: the Desk kernel, the PVH test image (also on QEMU), the
//! control socket, and the errors a user meets first.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{guest, on_pvm, run_to_exit, scratch_path, vmm_binary, RunningVm};

const BOOT_DEADLINE: Duration = Duration::from_secs(30);

#[test]
fn desk_with_exit_flag_prints_banner_rng_ticks_and_powers_off_cleanly() {
    let kernel = guest("desk.elf");
    let (code, output) =
        run_to_exit(&["run", "--kernel", kernel.to_str().unwrap(), "--cmdline", "desk.exit=1"], BOOT_DEADLINE);
    assert_eq!(code, Some(0), "output:\n{output}");
    assert!(output.contains("desk: Carrel Desk kernel"), "banner missing:\n{output}");
    if on_pvm() {
        assert!(output.contains("platform pvm: running native"), "not native on PVM:\n{output}");
    } else {
        assert!(output.contains("platform hardware KVM"), "{output}");
    }
    let rng_line = output.lines().find(|line| line.contains("desk: rng 32 bytes: ")).expect("rng line");
    let hex = rng_line.rsplit(' ').next().unwrap();
    assert_eq!(hex.len(), 64, "32 bytes as hex: {rng_line}");
    assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(hex, "0".repeat(64), "entropy is not all zero");
    assert!(output.contains("desk: ready"), "{output}");
    for tick in 1..=10 {
        assert!(output.contains(&format!("desk: tick {tick} at ")), "tick {tick} missing:\n{output}");
    }
    assert!(output.contains("desk: 10 ticks in"), "{output}");
}

#[test]
fn desk_gets_fresh_entropy_each_boot() {
    let kernel = guest("desk.elf");
    let rng = || {
        let (code, output) =
            run_to_exit(&["run", "--kernel", kernel.to_str().unwrap(), "--cmdline", "desk.exit=1"], BOOT_DEADLINE);
        assert_eq!(code, Some(0), "{output}");
        output.lines().find(|line| line.contains("desk: rng")).unwrap().to_string()
    };
    assert_ne!(rng(), rng());
}

#[test]
fn desk_without_exit_flag_keeps_running_until_sigterm_then_exits_zero() {
    let log = scratch_path("console.log");
    let mut vm = RunningVm::start_desk(&["--console-log", log.to_str().unwrap()]);
    vm.wait_for_line("desk: ready", BOOT_DEADLINE);
    vm.signal(libc::SIGTERM);
    let status = vm.wait_for_exit(BOOT_DEADLINE);
    assert_eq!(status.code(), Some(0), "output:\n{}", vm.text());
    let logged = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    assert!(logged.contains("desk: ready"), "console log lacks the console output:\n{logged}");
    assert!(!logged.contains("tick 10"), "the timer must not power it off without desk.exit=1");
}

#[test]
fn desk_stops_cleanly_on_sigint() {
    let kernel = guest("desk.elf");
    let mut vm = RunningVm::start(&["run", "--kernel", kernel.to_str().unwrap()]);
    vm.wait_for_line("desk: ready", BOOT_DEADLINE);
    vm.signal(libc::SIGINT);
    assert_eq!(vm.wait_for_exit(BOOT_DEADLINE).code(), Some(0), "{}", vm.text());
}

#[test]
fn control_socket_reports_status_and_stops_the_vm() {
    let socket = scratch_path("vm.sock");
    let socket_arg = socket.to_str().unwrap();
    let mut vm = RunningVm::start_desk(&["--socket", socket_arg]);
    vm.wait_for_line("desk: ready", BOOT_DEADLINE);

    let status = Command::new(vmm_binary()).args(["status", "--socket", socket_arg, "--json"]).output().unwrap();
    assert!(status.status.success(), "{status:?}");
    let text = String::from_utf8(status.stdout).unwrap();
    let expected_platform = if on_pvm() { "\"platform\":\"pvm\"" } else { "\"platform\":\"hardware\"" };
    assert!(text.contains(expected_platform), "{text}");
    assert!(text.contains("\"boot_protocol\":\"desk\""), "{text}");
    assert!(text.contains(&format!("\"pid\":{}", vm.child.id())), "{text}");

    let stop = Command::new(vmm_binary()).args(["stop", "--socket", socket_arg]).output().unwrap();
    assert!(stop.status.success(), "{stop:?}");
    assert_eq!(vm.wait_for_exit(BOOT_DEADLINE).code(), Some(0), "{}", vm.text());
    assert!(!socket.exists(), "the control socket is removed on exit");
}

#[test]
fn a_standby_vmm_runs_the_command_line_it_is_handed_and_refuses_a_bad_one() {
    use std::io::Write;
    use std::process::Stdio;
    let socket = scratch_path("standby.sock");
    let log = scratch_path("standby.log");
    let kernel = guest("desk.elf");
    let standby = || {
        Command::new(vmm_binary())
            .arg("standby")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = standby();
    // It waits: nothing runs until the command line comes.
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "a standby waits for its command line");
    assert!(!socket.exists());
    let line = serde_json::json!({
        "args": ["run", "--kernel", kernel, "--socket", socket, "--cmdline", "desk.exit=1"],
        "stderr": log,
    });
    writeln!(child.stdin.take().unwrap(), "{line}").unwrap();
    let output = child.wait_with_output().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("vCPUs running"), "its stderr went to the named file:\n{text}");
    assert!(output.stderr.is_empty(), "nothing on the standby's own stderr after the hand-over");

    for (bad, expected, code) in [
        ("not json", "not what carrel-vmm reads", 1),
        ("{\"args\": [\"run\", \"--bogus\"]}", "unexpected argument '--bogus'", 2),
        ("{\"args\": [\"standby\"]}", "cannot be another standby", 1),
    ] {
        let mut child = standby();
        writeln!(child.stdin.take().unwrap(), "{bad}").unwrap();
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{bad}: {stderr}");
        assert!(stderr.contains(expected), "{bad}: {stderr}");
    }
    // A supervisor that goes away before handing over a command line ends its standby.
    let mut child = standby();
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("stdin closed"));
}

#[test]
fn status_without_a_running_vm_says_how_to_start_one() {
    let socket = scratch_path("absent.sock");
    let output = Command::new(vmm_binary()).args(["status", "--socket", socket.to_str().unwrap()]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("cannot connect to control socket") && stderr.contains("--socket"), "{stderr}");
}

#[test]
fn pvh_image_prints_ok_and_powers_off() {
    let kernel = guest("pvh-ok.elf");
    let (code, output) = run_to_exit(&["run", "--kernel", kernel.to_str().unwrap()], BOOT_DEADLINE);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.lines().any(|line| line == "OK"), "{output}");
    assert!(output.contains("pvh boot"), "{output}");
}

#[test]
fn pvh_image_runs_unchanged_on_qemu_microvm() {
    let kernel = guest("pvh-ok.elf");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-kernel"])
        .arg(&kernel)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 runs (scripts/provision-host.sh installs it)");
    let stdout = qemu.stdout.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let line = receiver.recv_timeout(BOOT_DEADLINE);
    // The image halts after OK; QEMU microvm has no i8042 to power off through.
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert_eq!(line.as_deref(), Ok("OK"));
}

/// Writes a minimal Desk-noted ELF whose code is `code`, loaded at 2 MiB.
fn desk_elf_with_code(code: &[u8]) -> std::path::PathBuf {
    use carrel_firmware::{BOOT_INFO_VERSION, DESK_NOTE_NAME, DESK_NOTE_TYPE};
    let load_offset = 0x1000u64;
    let note_offset = load_offset + code.len().next_multiple_of(4) as u64;
    let mut note = Vec::new();
    note.extend((DESK_NOTE_NAME.len() as u32).to_le_bytes());
    note.extend(4u32.to_le_bytes());
    note.extend(DESK_NOTE_TYPE.to_le_bytes());
    note.extend(DESK_NOTE_NAME);
    note.resize(note.len().next_multiple_of(4), 0);
    note.extend(BOOT_INFO_VERSION.to_le_bytes());

    let mut elf = vec![0u8; 64];
    elf[..8].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // entry
    elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    elf[52..54].copy_from_slice(&64u16.to_le_bytes());
    elf[54..56].copy_from_slice(&56u16.to_le_bytes());
    elf[56..58].copy_from_slice(&2u16.to_le_bytes());
    let program_header = |kind: u32, flags: u32, offset: u64, addr: u64, size: u64, align: u64| {
        let mut header = Vec::new();
        header.extend(kind.to_le_bytes());
        header.extend(flags.to_le_bytes());
        for value in [offset, addr, addr, size, size, align] {
            header.extend(value.to_le_bytes());
        }
        header
    };
    elf.extend(program_header(1, 7, load_offset, 0x20_0000, code.len() as u64, 0x1000));
    elf.extend(program_header(4, 4, note_offset, 0, note.len() as u64, 4));
    elf.resize(load_offset as usize, 0);
    elf.extend(code);
    elf.resize(note_offset as usize, 0);
    elf.extend(note);
    let path = scratch_path("fault.elf");
    std::fs::write(&path, elf).unwrap();
    path
}

#[test]
fn guest_triple_fault_exits_nonzero_with_registers() {
    // `ud2` with the VMM's zeroed IDT: #UD finds no gate, which escalates to a triple fault.
    let kernel = desk_elf_with_code(&[0x0f, 0x0b]);
    let (code, output) = run_to_exit(&["run", "--kernel", kernel.to_str().unwrap()], BOOT_DEADLINE);
    std::fs::remove_file(&kernel).unwrap();
    assert_eq!(code, Some(1), "{output}");
    let error = output.lines().find(|line| line.starts_with("carrel-vmm: error:")).expect("one error line");
    assert!(error.contains("triple fault"), "{error}");
    if on_pvm() || !host_is_amd() {
        assert!(error.contains("rip=0x200000"), "registers in the error: {error}");
    } else {
        // Hardware SVM: KVM resets the vCPU at the shutdown, so the guest's registers are
        // gone; the error says so instead of showing the reset vector's.
        assert!(error.contains("registers lost"), "{error}");
    }
}

/// Whether this machine's CPU is AMD's (SVM when KVM is hardware).
fn host_is_amd() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| info.contains("AuthenticAMD"))
}

#[test]
fn guest_power_port_code_becomes_exit_code() {
    // mov dx, 0x4f0; mov al, 7; out dx, al; hlt
    let kernel = desk_elf_with_code(&[0x66, 0xba, 0xf0, 0x04, 0xb0, 0x07, 0xee, 0xf4]);
    let (code, output) = run_to_exit(&["run", "--kernel", kernel.to_str().unwrap()], BOOT_DEADLINE);
    std::fs::remove_file(&kernel).unwrap();
    assert_eq!(code, Some(7), "{output}");
    assert!(output.contains("guest powered off with code 7"), "{output}");
}

fn single_error_line(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(vmm_binary()).args(args).output().unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    (output.status.code(), stderr)
}

#[test]
fn missing_kernel_file_is_one_clear_error() {
    let (code, stderr) = single_error_line(&["run", "--kernel", "/nonexistent/desk.elf"]);
    assert_eq!(code, Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("kernel /nonexistent/desk.elf does not exist"), "{stderr}");
}

#[test]
fn malformed_kernel_is_one_clear_error() {
    let junk = scratch_path("junk.bin");
    std::fs::write(&junk, vec![0x5a; 4096]).unwrap();
    let (code, stderr) = single_error_line(&["run", "--kernel", junk.to_str().unwrap()]);
    std::fs::remove_file(&junk).unwrap();
    assert_eq!(code, Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("neither an x86-64 ELF nor a bzImage"), "{stderr}");
}

#[test]
fn too_little_memory_is_one_clear_error() {
    let kernel = guest("desk.elf");
    let (code, stderr) = single_error_line(&["run", "--kernel", kernel.to_str().unwrap(), "--mem", "2"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("guest memory of 2 MiB is out of range"), "{stderr}");
}

#[test]
fn bad_arguments_exit_two_with_usage() {
    // In clap's words, since carrel-vmm parses its arguments with clap.
    let (code, stderr) = single_error_line(&["run", "--kernel"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("a value is required for '--kernel <PATH>'") && stderr.contains("--help"), "{stderr}");
    let (code, stderr) = single_error_line(&["run", "--mem", "lots"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("invalid value 'lots' for '--mem <MiB>'"), "{stderr}");
    let (code, stderr) = single_error_line(&["launch"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("unrecognized subcommand 'launch'") && stderr.contains("Usage:"), "{stderr}");
}

#[test]
fn config_file_boots_the_same_as_flags() {
    let kernel = guest("desk.elf");
    let config = scratch_path("vm.toml");
    std::fs::write(
        &config,
        format!("kernel = {:?}\ncmdline = \"desk.exit=1\"\nmem = 64\ncpus = 1\n", kernel.to_str().unwrap()),
    )
    .unwrap();
    let (code, output) = run_to_exit(&["run", "--config", config.to_str().unwrap()], BOOT_DEADLINE);
    std::fs::remove_file(&config).unwrap();
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("64 MiB") && output.contains("desk: 10 ticks in"), "{output}");
}

#[test]
fn malformed_config_file_is_a_clear_error() {
    let config = scratch_path("bad.toml");
    std::fs::write(&config, "kernel = \"x\"\nmemroy = 64\n").unwrap();
    let (code, stderr) = single_error_line(&["run", "--config", config.to_str().unwrap()]);
    std::fs::remove_file(&config).unwrap();
    assert_eq!(code, Some(2));
    assert!(stderr.contains("is not valid") && stderr.contains("memroy"), "{stderr}");
}

#[test]
fn audit_log_records_every_control_request_and_verifies_offline() {
    let socket = scratch_path("audited.sock");
    let audit = scratch_path("audit");
    let socket_arg = socket.to_str().unwrap();
    let mut vm =
        RunningVm::start_desk(&["--socket", socket_arg, "--audit", audit.to_str().unwrap(), "--name", "agent-7"]);
    vm.wait_for_line("desk: ready", BOOT_DEADLINE);
    for _ in 0..2 {
        let status = Command::new(vmm_binary()).args(["status", "--socket", socket_arg]).output().unwrap();
        assert!(status.status.success(), "{status:?}");
    }
    let stop = Command::new(vmm_binary()).args(["stop", "--socket", socket_arg]).output().unwrap();
    assert!(stop.status.success(), "{stop:?}");
    assert_eq!(vm.wait_for_exit(BOOT_DEADLINE).code(), Some(0), "{}", vm.text());

    let report = carrel_audit::verify_dir(&audit, &carrel_audit::VerifyOptions::default()).unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert_eq!(report.records, 5);
    assert_eq!(report.unsigned_records, 0, "the exit checkpoint covers every record");

    let mut events = Vec::new();
    carrel_audit::reader::for_each_event(&carrel_audit::layout::Layout::new(&audit).log(), 0, |event, _| {
        events.push(event.clone());
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    let actions: Vec<&str> = events.iter().map(|event| event.action.as_str()).collect();
    assert_eq!(actions, ["vm.start", "status", "status", "stop", "vm.exit"]);
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    assert!(events[1..4].iter().all(|event| event.actor.as_ref().is_some_and(|actor| actor.uid == uid)));
    assert!(events.iter().all(|event| event.vm == "agent-7"));
    std::fs::remove_dir_all(&audit).unwrap();
}

#[test]
fn missing_dev_kvm_is_one_clear_error() {
    // A private mount namespace whose /dev is an empty tmpfs: the host has no KVM there.
    let kernel = guest("desk.elf");
    let script =
        format!("mount -t tmpfs none /dev && exec {} run --kernel {}", vmm_binary().display(), kernel.display());
    let output =
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot open /dev/kvm") && stderr.contains("provision-host.sh"), "{stderr}");
}

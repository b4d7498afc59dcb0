//! The jail and the seccomp filters, end to end with the Desk kernel: a jailed VM still
//! boots, draws, takes input, serves its agent, snapshots and restores; from inside, the
//! host and other VMs are out of sight and forbidden calls end the process with the call
//! named (the probes are compiled only with the `test-probes` feature, which the test
//! suite turns on).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use carrel_vmm::control::{ControlClient, Wait};
use common::{decode_png, differences, guest, run_to_exit, screenshot, vmm_binary, RunningVm};

const DEADLINE: Duration = Duration::from_secs(30);

/// A jailed VM's directories on the host: its own (sockets, disk, audit, console) and
/// its snapshots', both owned by its uid; and the empty jail root.
struct JailedVm {
    _scratch: tempfile::TempDir,
    own: PathBuf,
    snapshots: PathBuf,
    root: PathBuf,
    uid: u32,
}

impl JailedVm {
    fn new(uid: u32) -> JailedVm {
        let scratch = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(scratch.path()).unwrap();
        let (own, snapshots, root) = (base.join("vm"), base.join("snapshots"), base.join("root"));
        for dir in [&own, &snapshots] {
            std::fs::create_dir(dir).unwrap();
            std::os::unix::fs::chown(dir, Some(uid), Some(uid)).unwrap();
        }
        JailedVm { _scratch: scratch, own, snapshots, root, uid }
    }

    fn socket(&self) -> PathBuf {
        self.own.join("control.sock")
    }

    fn jail_flags(&self) -> Vec<String> {
        vec![
            "--jail".into(),
            self.root.display().to_string(),
            "--uid".into(),
            self.uid.to_string(),
            "--gid".into(),
            self.uid.to_string(),
            "--jail-writable".into(),
            self.snapshots.display().to_string(),
            "--socket".into(),
            self.socket().display().to_string(),
            "--vsock".into(),
            self.own.join("vsock.sock").display().to_string(),
        ]
    }

    fn boot(&self, extra: &[&str]) -> RunningVm {
        let mut args = self.jail_flags();
        args.extend(["--audit".into(), self.own.join("audit").display().to_string()]);
        args.extend(["--disk".into(), format!("{},size=16M", self.own.join("disk.layer").display())]);
        args.extend(extra.iter().map(|flag| flag.to_string()));
        let mut vm = RunningVm::start_desk(&args.iter().map(String::as_str).collect::<Vec<_>>());
        vm.wait_for_line("agent listening", DEADLINE);
        vm
    }
}

fn cli(args: &[&str]) -> (bool, String) {
    let output = Command::new(vmm_binary()).args(args).output().expect("carrel-vmm runs");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

fn agent(socket: &Path, argv: &[&str]) -> String {
    let socket = socket.display().to_string();
    let mut args = vec!["agent", "--socket", &socket, "exec", "--"];
    args.extend_from_slice(argv);
    let (ok, text) = cli(&args);
    assert!(ok, "agent exec {argv:?} failed: {text}");
    text
}

/// The jailed VMM: the only child of the process that was started.
fn jailed_pid(vm: &RunningVm) -> u32 {
    let outer = vm.child.id();
    let children = std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children")).unwrap();
    children.split_whitespace().next().expect("the jailed VMM runs").parse().unwrap()
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with(field)).unwrap_or_else(|| panic!("{field} in status"));
    line[field.len()..].trim().to_string()
}

fn namespace(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

fn wait_for_socket(socket: &Path) {
    let end = Instant::now() + DEADLINE;
    while ControlClient::connect(socket).is_err() {
        assert!(Instant::now() < end, "{} never opened", socket.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_jailed_vm_runs_unprivileged_and_still_draws_types_serves_its_agent_snapshots_and_restores() {
    let jailed = JailedVm::new(61_001);
    let mut vm = jailed.boot(&[]);
    let pid = jailed_pid(&vm);
    assert_eq!(status_field(pid, "Uid:"), "61001\t61001\t61001\t61001");
    assert_eq!(status_field(pid, "Gid:"), "61001\t61001\t61001\t61001");
    assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(pid, "CapBnd:"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    assert_eq!(status_field(pid, "Seccomp:"), "2", "filters are on");
    for kind in ["mnt", "pid", "net", "ipc"] {
        assert_ne!(namespace("self", kind), namespace(&pid.to_string(), kind), "{kind} namespace is its own");
    }
    // The jail root stays empty on the host: the VM's tmpfs lives in its own namespace.
    assert!(std::fs::read_dir(&jailed.root).unwrap().next().is_none());

    // Draws and takes input.
    let socket = jailed.socket();
    let before = screenshot(&socket, Wait::FirstFrame);
    let socket_text = socket.display().to_string();
    let (ok, text) = cli(&["input", "--socket", &socket_text, "click", "640", "228"]);
    assert!(ok, "{text}");
    let (ok, text) = cli(&["input", "--socket", &socket_text, "type", "jailed"]);
    assert!(ok, "{text}");
    let after = screenshot(&socket, Wait::FirstFrame);
    assert!(after.frame > before.frame);
    let (_, _, before_pixels) = decode_png(&before.bytes);
    let (width, _, after_pixels) = decode_png(&after.bytes);
    assert!(differences(&before_pixels, &after_pixels, width).len() > 50, "typing shows on the screen");

    // Serves its agent, with files on its disk.
    assert_eq!(agent(&socket, &["echo", "hi"]), "hi\n");
    agent(&socket, &["write", "/kept", "before the snapshot"]);

    // Snapshots go under its writable directory only.
    let outside = jailed.own.parent().unwrap().join("elsewhere");
    let (ok, text) = cli(&["snapshot", "--socket", &socket_text, "--dir", &outside.display().to_string()]);
    assert!(!ok && text.contains("outside this VM's jail"), "{text}");
    assert!(!outside.exists());
    let snapshot = jailed.snapshots.join("one");
    let (ok, text) = cli(&["hibernate", "--socket", &socket_text, "--dir", &snapshot.display().to_string()]);
    assert!(ok, "{text}");
    assert!(vm.wait_for_exit(DEADLINE).success(), "{}", vm.text());
    assert_eq!(std::fs::metadata(snapshot.join("memory.bin")).unwrap().uid(), 61_001);

    // Restored in a jail of its own, it goes on where it was.
    let mut args = vec!["run".to_string(), "--restore".into(), snapshot.display().to_string()];
    args.extend(jailed.jail_flags());
    let mut restored = RunningVm::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    restored.wait_for_line("carrel-vmm: restored", DEADLINE);
    wait_for_socket(&socket);
    assert_eq!(status_field(jailed_pid(&restored), "Uid:"), "61001\t61001\t61001\t61001");
    assert_eq!(agent(&socket, &["cat", "/kept"]), "before the snapshot");
    let woken = screenshot(&socket, Wait::FirstFrame);
    assert!(woken.frame >= after.frame);
    let (ok, text) = cli(&["stop", "--socket", &socket_text]);
    assert!(ok, "{text}");
    assert!(restored.wait_for_exit(DEADLINE).success(), "{}", restored.text());
}

#[test]
fn jail_flags_are_checked_before_anything_runs() {
    let kernel = guest("desk.elf").display().to_string();
    let (code, text) = run_to_exit(&["run", "--kernel", &kernel, "--jail", "/tmp/x"], DEADLINE);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("go together"), "{text}");

    let jailed = JailedVm::new(61_002);
    let root = jailed.root.display().to_string();
    let (code, text) =
        run_to_exit(&["run", "--kernel", &kernel, "--jail", &root, "--uid", "0", "--gid", "0"], DEADLINE);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("unprivileged"), "{text}");

    // A writable directory the VM's uid does not own is refused, with what to do.
    let foreign = jailed.own.parent().unwrap().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    let socket = foreign.join("control.sock").display().to_string();
    let (code, text) = run_to_exit(
        &["run", "--kernel", &kernel, "--jail", &root, "--uid", "61002", "--gid", "61002", "--socket", &socket],
        DEADLINE,
    );
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("chown 61002:61002"), "{text}");
}

#[cfg(feature = "test-probes")]
#[test]
fn from_inside_a_jail_the_host_and_other_vms_are_out_of_sight() {
    let neighbour = JailedVm::new(61_003);
    let _other = neighbour.boot(&[]);
    let jailed = JailedVm::new(61_004);
    let neighbour_socket = format!("connect:{}", neighbour.socket().display());
    let neighbour_dir = format!("path:{}", neighbour.own.display());
    let mut vm = jailed.boot(&[
        "--jail-probe",
        "ids",
        "--jail-probe",
        "path:/etc/passwd",
        "--jail-probe",
        "path:/home",
        "--jail-probe",
        "path:/proc/1",
        "--jail-probe",
        &neighbour_dir,
        "--jail-probe",
        &neighbour_socket,
        "--jail-probe",
        &format!("path:{}", jailed.own.display()),
    ]);
    // The probes run as the VM starts, before its agent listens: their lines may be in
    // what the boot already read.
    let line = |vm: &mut RunningVm, probe: &str| {
        let needle = format!("jail-probe: {probe}:");
        match vm.output.iter().find(|line| line.contains(&needle)) {
            Some(line) => line.clone(),
            None => vm.wait_for_line(&needle, DEADLINE),
        }
    };
    assert!(line(&mut vm, "ids").ends_with("uid 61004 gid 61004 no capabilities"));
    for hidden in ["path:/etc/passwd", "path:/home", "path:/proc/1", &neighbour_dir] {
        let result = line(&mut vm, hidden);
        assert!(result.contains("absent"), "{result}");
    }
    let result = line(&mut vm, &neighbour_socket);
    assert!(result.contains("refused"), "{result}");
    let result = line(&mut vm, &format!("path:{}", jailed.own.display()));
    assert!(result.ends_with("visible"), "its own directory is there: {result}");
    // The VM runs on after its probes.
    assert_eq!(agent(&jailed.socket(), &["echo", "still"]), "still\n");
}

#[cfg(feature = "test-probes")]
#[test]
fn forbidden_calls_end_a_jailed_vmm_naming_the_syscall() {
    let jailed = JailedVm::new(61_005);
    let kernel = guest("desk.elf").display().to_string();
    let cases = [
        ("ptrace", libc::SYS_ptrace),
        ("mount", libc::SYS_mount),
        ("open_by_handle_at", libc::SYS_open_by_handle_at),
        ("kexec_load", libc::SYS_kexec_load),
        ("bpf", libc::SYS_bpf),
        ("ioctl", libc::SYS_ioctl),
        ("fork", libc::SYS_clone),
        ("execve", libc::SYS_execve),
    ];
    for (probe, syscall) in cases {
        let mut args = vec!["run".to_string(), "--kernel".into(), kernel.clone(), "--no-console".into()];
        args.extend(jailed.jail_flags());
        args.extend(["--jail-probe".into(), probe.into()]);
        let (code, text) = run_to_exit(&args.iter().map(String::as_str).collect::<Vec<_>>(), DEADLINE);
        assert_eq!(code, Some(carrel_vmm::seccomp::VIOLATION_EXIT_CODE), "{probe}: {text}");
        assert!(text.contains(&format!("seccomp violation: syscall {syscall} (event loop thread)")), "{probe}: {text}");
        assert!(!text.contains(&format!("jail-probe: {probe}:")), "{probe} returned: {text}");
    }
}

#[test]
fn a_kill_of_the_outer_process_ends_the_jailed_vmm_too() {
    let jailed = JailedVm::new(61_006);
    let mut vm = jailed.boot(&[]);
    let inner = jailed_pid(&vm);
    assert_eq!(status_field(inner, "Uid:").split_whitespace().next(), Some("61006"), "the VMM left root");
    // SAFETY: kill(2) on this test's own child.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGKILL) };
    vm.wait_for_exit(DEADLINE);
    let end = Instant::now() + DEADLINE;
    // Gone, or a zombie its new parent has yet to reap.
    while std::fs::read_to_string(format!("/proc/{inner}/stat"))
        .is_ok_and(|stat| !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])))
    {
        assert!(Instant::now() < end, "the jailed VMM {inner} outlived its outer process");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn one_snapshot_wakes_twice_side_by_side_in_jails_of_their_own_each_on_its_own_disk_top() {
    let first = JailedVm::new(61_007);
    let mut vm = first.boot(&[]);
    let socket = first.socket();
    agent(&socket, &["write", "/kept", "before the snapshot"]);
    // Beside the snapshot's own directory, only what the restores are given may be seen.
    let saved = first.snapshots.join("saved");
    std::fs::create_dir(&saved).unwrap();
    std::os::unix::fs::chown(&saved, Some(first.uid), Some(first.uid)).unwrap();
    let snapshot = saved.join("one");
    let socket_text = socket.display().to_string();
    let (ok, text) = cli(&["hibernate", "--socket", &socket_text, "--dir", &snapshot.display().to_string()]);
    assert!(ok, "{text}");
    assert!(vm.wait_for_exit(DEADLINE).success(), "{}", vm.text());
    let first_top = std::fs::read(first.own.join("disk.layer")).unwrap();

    // Two VMs from the one snapshot: each writes a top layer of its own, over the layer the
    // snapshot froze (in the first VM's directory, which each may read).
    let restore = |jailed: &JailedVm| {
        let mut args = vec!["run".to_string(), "--restore".into(), snapshot.display().to_string()];
        args.extend(jailed.jail_flags());
        args.extend(["--audit".into(), jailed.own.join("audit").display().to_string()]);
        args.extend(["--disk-top".into(), jailed.own.join("disk.layer").display().to_string()]);
        args.extend(["--jail-readable".into(), first.own.display().to_string()]);
        let mut restored = RunningVm::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
        restored.wait_for_line("carrel-vmm: restored", DEADLINE);
        wait_for_socket(&jailed.socket());
        restored
    };
    let copies = [JailedVm::new(61_008), JailedVm::new(61_009)];
    let mut running: Vec<RunningVm> = copies.iter().map(restore).collect();
    for (index, copy) in copies.iter().enumerate() {
        assert_eq!(agent(&copy.socket(), &["cat", "/kept"]), "before the snapshot");
        agent(&copy.socket(), &["write", "/mine", &format!("copy {index}")]);
        assert!(copy.own.join("disk.layer").exists(), "its own top layer");
    }
    for (index, copy) in copies.iter().enumerate() {
        assert_eq!(agent(&copy.socket(), &["cat", "/mine"]), format!("copy {index}"), "each on its own top");
        let (ok, text) = cli(&["stop", "--socket", &copy.socket().display().to_string()]);
        assert!(ok, "{text}");
    }
    for restored in &mut running {
        assert!(restored.wait_for_exit(DEADLINE).success(), "{}", restored.text());
    }
    assert_eq!(std::fs::read(first.own.join("disk.layer")).unwrap(), first_top, "the first VM's top is its own");

    // As many new tops as the snapshot has writable disks, no more.
    let top = copies[0].own.join("other.layer").display().to_string();
    let args = ["run", "--restore", snapshot.to_str().unwrap(), "--disk-top", &top, "--disk-top", &top];
    let (code, text) = run_to_exit(&args, DEADLINE);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("--disk-top was given 2 time(s), and the snapshot has 1 writable disk(s)"), "{text}");
}

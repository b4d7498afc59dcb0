//! Snapshots end to end with the Desk kernel: snapshot, hibernate, restore into fresh
//! processes, the screen of a hibernated VM, and every way a snapshot on disk can be bad.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use carrel_vmm::control::{ControlClient, ImageFormat, Screenshot, Wait};
use common::{
    decode_png, differences, inside, run_to_exit, scratch_path, screenshot, screenshot_as, vmm_binary, RunningVm,
};

const DEADLINE: Duration = Duration::from_secs(30);
const WIDTH: u32 = 1280;
/// The Desk clock: the only part of the screen that changes by itself.
const CLOCK: [u32; 4] = [WIDTH - 104, 0, 104, 32];
/// The Desk window's "Save (N)" button, which counts its clicks.
const SAVE_BUTTON: [u32; 4] = [284, 270, 120, 36];

/// A VM's paths, unique per test.
struct Paths {
    socket: PathBuf,
    vsock: PathBuf,
}

impl Paths {
    fn new(name: &str) -> Paths {
        Paths { socket: scratch_path(&format!("{name}.sock")), vsock: scratch_path(&format!("{name}.vsock")) }
    }

    fn flags(&self) -> Vec<String> {
        vec!["--socket".into(), self.socket.display().to_string(), "--vsock".into(), self.vsock.display().to_string()]
    }
}

fn boot(paths: &Paths) -> RunningVm {
    let flags = paths.flags();
    let mut vm = RunningVm::start_desk(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    // Desk draws its first frame, then starts its agent.
    vm.wait_for_line("first frame drawn", DEADLINE);
    vm.wait_for_line("agent listening", DEADLINE);
    vm
}

fn restore(dir: &Path, paths: &Paths) -> RunningVm {
    restore_with(dir, paths, &[])
}

/// Restores with extra flags (`--eager`, `--lazy`).
fn restore_with(dir: &Path, paths: &Paths, extra: &[&str]) -> RunningVm {
    let mut args = vec!["run".to_string(), "--restore".into(), dir.display().to_string()];
    args.extend(paths.flags());
    args.extend(extra.iter().map(|flag| flag.to_string()));
    let mut vm = RunningVm::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    vm.wait_for_line("carrel-vmm: restored", DEADLINE);
    // The control socket opens right after the restore is reported.
    let end = std::time::Instant::now() + DEADLINE;
    while ControlClient::connect(&paths.socket).is_err() {
        assert!(std::time::Instant::now() < end, "the restored VM's socket never opened: {}", vm.text());
        std::thread::sleep(Duration::from_millis(2));
    }
    vm
}

/// Runs a `carrel-vmm` client command; returns its stdout, panicking on failure.
fn cli(args: &[&str]) -> String {
    let output = Command::new(vmm_binary()).args(args).output().expect("carrel-vmm runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "carrel-vmm {args:?} failed: {text}{}", String::from_utf8_lossy(&output.stderr));
    text
}

/// Runs a client command that must fail; returns its stderr.
fn cli_fails(args: &[&str]) -> String {
    let output = Command::new(vmm_binary()).args(args).output().expect("carrel-vmm runs");
    assert!(!output.status.success(), "carrel-vmm {args:?} should fail");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn pixels(shot: &Screenshot) -> Vec<u8> {
    decode_png(&shot.bytes).2
}

/// Pixels that differ outside the clock.
fn differ_outside_clock(a: &[u8], b: &[u8]) -> usize {
    differences(a, b, WIDTH).into_iter().filter(|(x, y)| !inside(CLOCK, *x, *y)).count()
}

fn socket_arg(paths: &Paths) -> String {
    paths.socket.display().to_string()
}

fn agent_exec(paths: &Paths, argv: &[&str]) -> String {
    let socket = socket_arg(paths);
    let mut args = vec!["agent", "--socket", &socket, "exec", "--"];
    args.extend_from_slice(argv);
    cli(&args)
}

fn file_digest(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).unwrap())
}

/// Every file of a snapshot with its digest, to prove a restore changed none.
fn snapshot_digests(dir: &Path) -> Vec<(String, blake3::Hash)> {
    ["vm.json", "state.bin", "memory.bin"].iter().map(|name| (name.to_string(), file_digest(&dir.join(name)))).collect()
}

/// Boots Desk, types into its text field and puts a file, then snapshots it.
struct Prepared {
    before: Screenshot,
    input_file: PathBuf,
    snapshot: PathBuf,
}

fn prepare(name: &str, hibernate: bool) -> Prepared {
    let paths = Paths::new(name);
    let mut vm = boot(&paths);
    let socket = socket_arg(&paths);
    cli(&["input", "--socket", &socket, "click", "640", "228"]);
    cli(&["input", "--socket", &socket, "type", "state survives"]);
    let input_file = scratch_path(&format!("{name}-input.bin"));
    let data: Vec<u8> = (0..20_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&input_file, &data).unwrap();
    cli(&["agent", "--socket", &socket, "put", input_file.to_str().unwrap(), "/data/input.bin"]);
    let before = screenshot(&paths.socket, Wait::StillFor(50));
    let snapshot = scratch_path(&format!("{name}-snapshot"));
    let command = if hibernate { "hibernate" } else { "snapshot" };
    cli(&[command, "--socket", &socket, "--dir", snapshot.to_str().unwrap()]);
    if hibernate {
        assert!(vm.wait_for_exit(DEADLINE).success(), "a hibernated VM ends cleanly: {}", vm.text());
    } else {
        cli(&["stop", "--socket", &socket]);
        vm.wait_for_exit(DEADLINE);
    }
    Prepared { before, input_file, snapshot }
}

#[test]
fn restored_desk_continues_with_its_screen_text_and_files() {
    let prepared = prepare("continue", true);
    let untouched = snapshot_digests(&prepared.snapshot);

    // The hibernated VM's screen, straight from the files: the PNG the snapshot kept.
    let from_files = scratch_path("hibernated.png");
    cli(&["screenshot", "--snapshot", prepared.snapshot.to_str().unwrap(), "-o", from_files.to_str().unwrap()]);
    let before = pixels(&prepared.before);
    assert_eq!(differ_outside_clock(&decode_png(&std::fs::read(&from_files).unwrap()).2, &before), 0);
    // A damaged copy of that PNG is not used: the screen is drawn from memory instead.
    let damaged = scratch_path("continue-damaged-screen");
    std::fs::create_dir_all(&damaged).unwrap();
    for file in ["vm.json", "state.bin", "memory.bin", "screen.bin"] {
        std::fs::copy(prepared.snapshot.join(file), damaged.join(file)).unwrap();
    }
    let mut kept = std::fs::read(damaged.join("screen.bin")).unwrap();
    let last = kept.len() - 1;
    kept[last] ^= 0xff;
    std::fs::write(damaged.join("screen.bin"), kept).unwrap();
    let output = Command::new(vmm_binary())
        .args(["screenshot", "--snapshot", damaged.to_str().unwrap(), "-o", from_files.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("screen.bin not used"), "{output:?}");
    assert_eq!(differ_outside_clock(&decode_png(&std::fs::read(&from_files).unwrap()).2, &before), 0);

    let paths = Paths::new("continue-restored");
    let _vm = restore(&prepared.snapshot, &paths);
    // Raw pixels asked for at once: the lazy restore is still loading the screen's memory,
    // so they come from the snapshot's files (pages already in, from RAM), not zeros.
    let raw = screenshot_as(&paths.socket, ImageFormat::Raw, Wait::FirstFrame);
    assert_eq!((raw.width, raw.height, raw.pixel_format.as_str()), (WIDTH, 800, "B8G8R8X8"));
    let raw_rgb: Vec<u8> = raw.bytes.chunks_exact(4).flat_map(|bgrx| [bgrx[2], bgrx[1], bgrx[0]]).collect();
    assert_eq!(differ_outside_clock(&raw_rgb, &before), 0, "the raw screen is the snapshot's");
    let first = screenshot(&paths.socket, Wait::FirstFrame);
    assert_eq!(differ_outside_clock(&pixels(&first), &before), 0, "the same screen, typed text included");
    assert!(
        first.frame >= prepared.before.frame,
        "frame numbers continue: {} then {}",
        prepared.before.frame,
        first.frame
    );

    // The file the agent held comes back with the same digest.
    let back = scratch_path("continue-back.bin");
    let socket = socket_arg(&paths);
    cli(&["agent", "--socket", &socket, "get", "/data/input.bin", back.to_str().unwrap()]);
    assert_eq!(file_digest(&back), file_digest(&prepared.input_file));

    // The guest runs: the clock moves, and a click lands.
    let later = screenshot(&paths.socket, Wait::FrameAfter(first.frame));
    assert!(later.frame > first.frame);
    cli(&["input", "--socket", &socket, "click", "344", "288"]);
    let clicked = screenshot(&paths.socket, Wait::StillFor(50));
    let changed =
        differences(&pixels(&clicked), &before, WIDTH).into_iter().filter(|(x, y)| inside(SAVE_BUTTON, *x, *y)).count();
    assert!(changed > 0, "the Save button counts the click after the restore");
    assert_eq!(snapshot_digests(&prepared.snapshot), untouched, "a restore never modifies the snapshot");
}

#[test]
fn one_snapshot_restored_three_times_side_by_side_all_run_on_their_own() {
    let prepared = prepare("triplets", false);
    let mut vms = Vec::new();
    // Lazily (the default), lazily by request, and read whole.
    for (index, mode) in [&[][..], &["--lazy"], &["--eager"]].into_iter().enumerate() {
        let paths = Paths::new(&format!("triplet-{index}"));
        let mut vm = restore_with(&prepared.snapshot, &paths, mode);
        vm.wait_for_line("desk: restored (restore 1); rng 32 bytes", DEADLINE);
        vms.push((vm, paths));
    }
    // Each restored guest drew its own entropy.
    let random: Vec<String> = vms.iter().map(|(_, paths)| agent_exec(paths, &["random"])).collect();
    for value in &random {
        assert_eq!(value.trim().len(), 64, "32 bytes in hex: {value:?}");
    }
    assert!(random[0] != random[1] && random[1] != random[2] && random[0] != random[2], "{random:?}");
    for (index, (_, paths)) in vms.iter().enumerate() {
        let socket = socket_arg(paths);
        let name = format!("/data/own-{index}");
        agent_exec(paths, &["write", &name, "mine"]);
        assert_eq!(agent_exec(paths, &["cat", &name]), "mine");
        let shot = screenshot(&paths.socket, Wait::FirstFrame);
        assert!(screenshot(&paths.socket, Wait::FrameAfter(shot.frame)).frame > shot.frame, "VM {index} draws");
        let status = cli(&["status", "--socket", &socket, "--json"]);
        assert!(status.contains("\"state\":\"running\""), "{status}");
        assert!(
            status.contains("\"zero_copy_screen\":true"),
            "VM {index}: the restored screen is read in place: {status}"
        );
    }
    // Each VM's files are its own after the restore.
    assert!(agent_exec(&vms[1].1, &["ls", "/data"]).lines().all(|line| line != "own-0"));
}

#[test]
fn restore_continues_the_audit_log_across_hibernation() {
    let paths = Paths::new("audit");
    let audit = scratch_path("audit-log");
    let mut flags = paths.flags();
    flags.extend(["--audit".to_string(), audit.display().to_string(), "--name".into(), "agent-1".into()]);
    let mut vm = RunningVm::start_desk(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    vm.wait_for_line("first frame drawn", DEADLINE);
    let snapshot = scratch_path("audit-snapshot");
    cli(&["hibernate", "--socket", &socket_arg(&paths), "--dir", snapshot.to_str().unwrap()]);
    vm.wait_for_exit(DEADLINE);
    let restored_paths = Paths::new("audit-restored");
    let _restored = restore(&snapshot, &restored_paths);
    screenshot(&restored_paths.socket, Wait::FirstFrame);
    cli(&["stop", "--socket", &socket_arg(&restored_paths)]);
    let mut restored = _restored;
    restored.wait_for_exit(DEADLINE);
    let mut actions = Vec::new();
    carrel_audit::reader::for_each_event(&carrel_audit::layout::Layout::new(&audit).log(), 0, |event, _| {
        actions.push(event.action.clone());
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    for expected in ["vm.start", "hibernate", "vm.restore", "screenshot"] {
        assert!(actions.iter().any(|action| action == expected), "{expected} is on the log: {actions:?}");
    }
    let report = carrel_audit::verify_dir(&audit, &carrel_audit::VerifyOptions::default()).unwrap();
    assert!(report.ok(), "the whole history verifies: {report:?}");
}

/// Copies a snapshot directory so one copy can be damaged.
fn copy_snapshot(from: &Path, name: &str) -> PathBuf {
    let to = scratch_path(name);
    std::fs::create_dir(&to).unwrap();
    for file in ["vm.json", "state.bin", "memory.bin"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
    to
}

fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x5a], offset).unwrap();
}

/// Rewrites state.bin's header byte at `offset` and signs the file again, so the check
/// behind the digest is the one that refuses it.
fn rewrite_header(path: &Path, offset: usize, value: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] = value;
    let end = bytes.len() - 32;
    let digest = blake3::hash(&bytes[..end]);
    bytes[end..].copy_from_slice(digest.as_bytes());
    std::fs::write(path, bytes).unwrap();
}

fn restore_fails(dir: &Path) -> String {
    restore_fails_with(dir, &[])
}

fn restore_fails_with(dir: &Path, extra: &[&str]) -> String {
    let paths = Paths::new("refused");
    let mut args = vec!["run".to_string(), "--restore".into(), dir.display().to_string()];
    args.extend(paths.flags());
    args.extend(extra.iter().map(|flag| flag.to_string()));
    let (code, output) = run_to_exit(&args.iter().map(String::as_str).collect::<Vec<_>>(), DEADLINE);
    assert_eq!(code, Some(1), "a bad snapshot is refused: {output}");
    assert!(!paths.socket.exists(), "nothing half-restored is left listening: {output}");
    output
}

#[test]
fn damaged_snapshots_are_refused_with_one_clear_line() {
    let prepared = prepare("damaged", false);
    let good = &prepared.snapshot;
    let state_len = std::fs::metadata(good.join("state.bin")).unwrap().len();

    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        ("state-flip", Box::new(move |dir| flip_byte(&dir.join("state.bin"), state_len / 2)), "digest does not match"),
        (
            "state-truncated",
            Box::new(move |dir| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("state.bin"))
                    .unwrap()
                    .set_len(state_len - 7)
                    .unwrap()
            }),
            "truncated",
        ),
        ("state-version", Box::new(|dir| rewrite_header(&dir.join("state.bin"), 8, 99)), "format version 99"),
        (
            "state-platform",
            Box::new(|dir| rewrite_header(&dir.join("state.bin"), 12, carrel_firmware::PlatformKind::Hardware as u8)),
            "taken on hardware KVM",
        ),
        ("memory-flip", Box::new(|dir| flip_byte(&dir.join("memory.bin"), 0x7010)), "does not match its digest"),
        (
            "memory-flip-late",
            Box::new(|dir| flip_byte(&dir.join("memory.bin"), 0x20_0010)),
            "does not match its digest",
        ),
        (
            "memory-truncated",
            Box::new(|dir| {
                std::fs::OpenOptions::new().write(true).open(dir.join("memory.bin")).unwrap().set_len(64 << 20).unwrap()
            }),
            "truncated or not this VM's",
        ),
        ("config-garbage", Box::new(|dir| std::fs::write(dir.join("vm.json"), b"{ not json").unwrap()), "vm.json"),
        ("state-missing", Box::new(|dir| std::fs::remove_file(dir.join("state.bin")).unwrap()), "state.bin"),
    ];
    for (name, damage, expected) in cases {
        let dir = copy_snapshot(good, name);
        damage(&dir);
        // Lazily (the default: a damaged chunk ends the VM when it is loaded) and eagerly
        // (refused before the guest runs).
        for mode in [&[][..], &["--eager"]] {
            let output = restore_fails_with(&dir, mode);
            let error = output.lines().find(|line| line.contains("error")).unwrap_or_default();
            assert!(
                error.contains(expected),
                "{name} {mode:?}: expected {expected:?} in the error line, got:\n{output}"
            );
        }
    }
}

#[test]
fn snapshot_into_an_existing_or_full_place_is_refused_and_the_vm_runs_on() {
    let paths = Paths::new("refusals");
    let _vm = boot(&paths);
    let socket = socket_arg(&paths);
    let existing = scratch_path("existing");
    std::fs::create_dir(&existing).unwrap();
    let error = cli_fails(&["snapshot", "--socket", &socket, "--dir", existing.to_str().unwrap()]);
    assert!(error.contains("already exists"), "{error}");

    // A small tmpfs cannot hold the guest's memory.
    let mount = scratch_path("tiny-fs");
    std::fs::create_dir(&mount).unwrap();
    let mounted =
        Command::new("mount").args(["-t", "tmpfs", "-o", "size=2m", "tmpfs", mount.to_str().unwrap()]).status();
    if matches!(mounted, Ok(status) if status.success()) {
        let target = mount.join("snapshot");
        let error = cli_fails(&["snapshot", "--socket", &socket, "--dir", target.to_str().unwrap()]);
        assert!(error.contains("not enough disk space") && error.contains("bytes needed"), "{error}");
        assert_eq!(std::fs::read_dir(&mount).unwrap().count(), 0, "nothing is left on the full disk");
        let _ = Command::new("umount").arg(&mount).status();
    } else {
        eprintln!("no tmpfs mount here (not root?): the full-disk half of this test did not run");
    }
    assert!(cli(&["status", "--socket", &socket]).contains("running"), "the VM runs on");
    let shot = screenshot(&paths.socket, Wait::FirstFrame);
    let later = screenshot(&paths.socket, Wait::FrameAfter(shot.frame));
    assert!(later.frame > shot.frame, "and keeps drawing");
}

#[test]
fn killing_the_vmm_mid_snapshot_never_leaves_a_complete_looking_snapshot() {
    let prepared = prepare("killed", false);
    let good = snapshot_digests(&prepared.snapshot);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..10 {
        let paths = Paths::new(&format!("killed-{round}"));
        let mut vm = restore(&prepared.snapshot, &paths);
        let target = scratch_path(&format!("killed-{round}-snapshot"));
        let mut client = Command::new(vmm_binary())
            .args(["snapshot", "--socket", &socket_arg(&paths), "--dir", target.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_micros(seed % 15_000));
        vm.signal(libc::SIGKILL);
        vm.wait_for_exit(DEADLINE);
        let _ = client.wait();
        if target.exists() {
            // The rename is the commit point: a snapshot under its name is whole.
            carrel_vmm::snapshot::load_snapshot(&target).expect("a snapshot under its own name is complete");
        }
        assert_eq!(snapshot_digests(&prepared.snapshot), good, "the earlier snapshot is intact");
    }
}

/// Allocated bytes of a file (holes excluded).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn diff_snapshots_restore_merge_and_roll_back() {
    let paths = Paths::new("chain");
    let mut vm = boot(&paths);
    let socket = socket_arg(&paths);
    cli(&["input", "--socket", &socket, "click", "640", "228"]);
    cli(&["input", "--socket", &socket, "type", "first"]);
    assert_eq!(agent_exec(&paths, &["fill", "16", "5"]), "filled 16 MiB seed 5\n");
    let checksum = agent_exec(&paths, &["checksum"]);
    let first_screen = screenshot(&paths.socket, Wait::StillFor(50));
    let base = scratch_path("chain-base");
    cli(&["snapshot", "--socket", &socket, "--dir", base.to_str().unwrap()]);

    // A small change, then a diff over the full snapshot.
    cli(&["input", "--socket", &socket, "type", " and second"]);
    agent_exec(&paths, &["write", "/data/late", "after the base"]);
    let second_screen = screenshot(&paths.socket, Wait::StillFor(50));
    let diff = scratch_path("chain-diff");
    let said = cli(&["snapshot", "--socket", &socket, "--dir", diff.to_str().unwrap(), "--diff"]);
    assert!(said.contains("a diff over"), "{said}");
    // A diff over the diff, with the screen changed again: a chain of three.
    cli(&["input", "--socket", &socket, "type", " and third"]);
    let third_screen = screenshot(&paths.socket, Wait::StillFor(50));
    let diff2 = scratch_path("chain-diff2");
    cli(&["snapshot", "--socket", &socket, "--dir", diff2.to_str().unwrap(), "--diff"]);
    cli(&["stop", "--socket", &socket]);
    vm.wait_for_exit(DEADLINE);
    // Each link's screen, straight from the files of the chain up to it.
    // The PNG the snapshot kept, and (asked for a crop, which it does not answer) the
    // screen drawn from the chain's memory.
    for (dir, screen, name) in [(&diff, &second_screen, "diff"), (&diff2, &third_screen, "diff of a diff")] {
        for extra in [&[][..], &["--crop", "0,0,1280,800"][..]] {
            let shot = scratch_path("chain-from-files.png");
            let mut args = vec!["screenshot", "--snapshot", dir.to_str().unwrap(), "-o", shot.to_str().unwrap()];
            args.extend_from_slice(extra);
            cli(&args);
            let from_files = decode_png(&std::fs::read(&shot).unwrap()).2;
            assert_eq!(differ_outside_clock(&from_files, &pixels(screen)), 0, "{name} {extra:?}: its own screen");
        }
    }
    assert!(differ_outside_clock(&pixels(&third_screen), &pixels(&second_screen)) > 0, "the screen changed");
    let (base_bytes, diff_bytes) = (allocated(&base.join("memory.bin")), allocated(&diff.join("memory.bin")));
    assert!(diff_bytes * 2 < base_bytes, "the diff holds only what changed: {diff_bytes} vs {base_bytes} bytes");
    let untouched = [snapshot_digests(&base), snapshot_digests(&diff)];

    // Base + diff, then the merged snapshot: the later screen, files and memory.
    let merged = scratch_path("chain-merged");
    cli(&["snapshot", "merge", "--dir", diff.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
    for (name, dir, mode) in [("chain-from-diff", &diff, "--lazy"), ("chain-from-merged", &merged, "--eager")] {
        let restored = Paths::new(name);
        let _vm = restore_with(dir, &restored, &[mode]);
        let shot = screenshot(&restored.socket, Wait::FirstFrame);
        assert_eq!(differ_outside_clock(&pixels(&shot), &pixels(&second_screen)), 0, "{name}: the later screen");
        assert_eq!(agent_exec(&restored, &["cat", "/data/late"]), "after the base", "{name}");
        assert_eq!(agent_exec(&restored, &["checksum"]), checksum, "{name}: the filled memory is intact");
        let later = screenshot(&restored.socket, Wait::FrameAfter(shot.frame));
        assert!(later.frame > shot.frame, "{name}: the guest runs on");
    }
    let merged_state = carrel_vmm::snapshot::load_snapshot(&merged).unwrap();
    assert!(merged_state.state.memory.parent.is_none(), "a merged snapshot stands alone");

    // Rollback: the earlier snapshot shows the earlier screen, without the later file.
    let rolled = Paths::new("chain-rollback");
    let _vm = restore(&base, &rolled);
    let shot = screenshot(&rolled.socket, Wait::FirstFrame);
    assert_eq!(differ_outside_clock(&pixels(&shot), &pixels(&first_screen)), 0, "the earlier screen");
    assert!(differ_outside_clock(&pixels(&shot), &pixels(&second_screen)) > 0);
    let socket = socket_arg(&rolled);
    let missing = cli_fails(&["agent", "--socket", &socket, "exec", "--", "cat", "/data/late"]);
    assert!(missing.contains("no such file"), "the later file is not there: {missing}");
    assert_eq!(untouched, [snapshot_digests(&base), snapshot_digests(&diff)], "restores change no snapshot");

    // A diff whose parent is missing, or is another snapshot, is refused.
    let away = scratch_path("chain-base-away");
    std::fs::rename(&base, &away).unwrap();
    let output = restore_fails(&diff);
    assert!(output.contains("cannot be used"), "missing parent: {output}");
    std::fs::create_dir(&base).unwrap();
    for file in ["vm.json", "state.bin", "memory.bin"] {
        std::fs::copy(merged.join(file), base.join(file)).unwrap();
    }
    let output = restore_fails(&diff);
    assert!(output.contains("the diff was taken over"), "another parent: {output}");
}

#[test]
fn a_diff_needs_a_parent() {
    let paths = Paths::new("orphan");
    let _vm = boot(&paths);
    let target = scratch_path("orphan-diff");
    let error = cli_fails(&["snapshot", "--socket", &socket_arg(&paths), "--dir", target.to_str().unwrap(), "--diff"]);
    assert!(error.contains("take a full snapshot first"), "{error}");
    assert!(!target.exists());
    assert!(cli(&["status", "--socket", &socket_arg(&paths)]).contains("running"));
}

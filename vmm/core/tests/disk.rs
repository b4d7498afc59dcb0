//! The disk end to end with the Desk kernel: files that survive a power-off and a cold
//! boot, writes acknowledged before a `kill -9` that are all there afterwards, two VMs on
//! one base, and a snapshot whose memory and disk agree after a restore.

mod common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carrel_agent_client::{connect_vsock_uds, Client};
use carrel_vmm::control::{ControlClient, Request, Response, SnapshotRequest};
use common::{scratch_path, RunningVm};

const DEADLINE: Duration = Duration::from_secs(30);
/// The line Desk prints once its file store is mounted.
const STORE_MOUNTED: &str = "desk: disk:";

struct Vm {
    vm: RunningVm,
    vsock: PathBuf,
    socket: PathBuf,
}

fn boot(name: &str, disk: &str) -> Vm {
    let vsock = scratch_path(&format!("{name}.vsock"));
    let socket = scratch_path(&format!("{name}.sock"));
    let flags =
        ["--no-display", "--vsock", vsock.to_str().unwrap(), "--socket", socket.to_str().unwrap(), "--disk", disk];
    let mut vm = RunningVm::start_desk(&flags);
    vm.wait_for_line(STORE_MOUNTED, DEADLINE);
    vm.wait_for_line("agent listening", DEADLINE);
    Vm { vm, vsock, socket }
}

fn connect(vsock: &Path) -> Client<UnixStream> {
    let stream = connect_vsock_uds(vsock, carrel_agent_proto::AGENT_VSOCK_PORT).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut client = Client::new(stream);
    client.wait_ready(Duration::from_secs(10)).unwrap();
    client
}

fn content(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

fn put(client: &mut Client<UnixStream>, remote: &str, data: &[u8]) {
    let local = scratch_path("put.bin");
    std::fs::write(&local, data).unwrap();
    client.put_file(&local, remote, |_, _| {}).unwrap();
    std::fs::remove_file(&local).unwrap();
}

/// The file's bytes, or `None` when the agent says it is not there.
fn get(client: &mut Client<UnixStream>, remote: &str) -> Option<Vec<u8>> {
    let local = scratch_path("get.bin");
    let got = match client.get_file(remote, &local, |_, _| {}) {
        Ok(_) => Some(std::fs::read(&local).unwrap()),
        Err(err) => {
            eprintln!("get {remote}: {err}");
            None
        }
    };
    let _ = std::fs::remove_file(&local);
    got
}

fn digest(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).unwrap())
}

fn power_off(mut vm: Vm) {
    let mut control = ControlClient::connect(&vm.socket).unwrap();
    control.call(&Request::Stop, DEADLINE).unwrap();
    let status = vm.vm.wait_for_exit(DEADLINE);
    assert!(status.success(), "a stop ends the VM with exit 0: {status:?}\n{}", vm.vm.text());
}

#[test]
fn a_file_put_on_the_disk_survives_a_power_off_and_a_cold_boot() {
    let layer = scratch_path("persist.layer");
    let disk = format!("{},size=64M", layer.display());
    let data = content(1, 3 << 20);
    let vm = boot("persist-1", &disk);
    assert!(vm.vm.text().contains("formatted"), "a fresh disk is formatted: {}", vm.vm.text());
    let mut client = connect(&vm.vsock);
    put(&mut client, "/docs/report.bin", &data);
    drop(client);
    power_off(vm);

    let vm = boot("persist-2", &disk);
    assert!(!vm.vm.text().contains("formatted"), "{}", vm.vm.text());
    let mut client = connect(&vm.vsock);
    assert_eq!(get(&mut client, "/docs/report.bin").map(|bytes| blake3::hash(&bytes)), Some(blake3::hash(&data)));
    let entries = client.list_dir("/docs").unwrap();
    assert_eq!(entries.len(), 1);
    client.remove("/docs/report.bin", false).unwrap();
    drop(client);
    power_off(vm);
    let vm = boot("persist-3", &disk);
    let mut client = connect(&vm.vsock);
    assert_eq!(get(&mut client, "/docs/report.bin"), None, "a removed file stays removed");
    drop(client);
    power_off(vm);
    let _ = std::fs::remove_file(&layer);
}

/// What the guest may hold after a kill: every acknowledged file, and the one put in
/// flight (unacknowledged) as either its old or its new version.
#[derive(Default)]
struct Expected {
    acknowledged: Vec<(String, blake3::Hash)>,
    in_flight: Option<(String, blake3::Hash)>,
}

impl Expected {
    fn acknowledge(&mut self, name: String, hash: blake3::Hash) {
        self.acknowledged.retain(|(known, _)| *known != name);
        self.acknowledged.push((name, hash));
        self.in_flight = None;
    }

    /// Checks the guest's files and settles the put in flight by what the guest holds.
    fn check(&mut self, client: &mut Client<UnixStream>, round: u32) {
        if let Some((name, hash)) = self.in_flight.take() {
            let got = get(client, &name).map(|bytes| blake3::hash(&bytes));
            let old = self.acknowledged.iter().find(|(known, _)| *known == name).map(|(_, hash)| *hash);
            assert!(got == old || got == Some(hash), "round {round}: {name} is neither its old nor its new version");
            if got == Some(hash) {
                self.acknowledge(name, hash);
            }
        }
        for (name, hash) in &self.acknowledged {
            let got = get(client, name).unwrap_or_else(|| panic!("round {round}: {name} is gone"));
            assert_eq!(blake3::hash(&got), *hash, "round {round}: {name} changed");
        }
    }
}

#[test]
fn kill_9_during_a_stream_of_writes_loses_no_file_the_guest_acknowledged() {
    let layer = scratch_path("kill.layer");
    let disk = format!("{},size=64M", layer.display());
    let expected: Arc<Mutex<Expected>> = Arc::default();
    let mut puts = 0;
    for round in 0..12u32 {
        let vm = boot(&format!("kill-{round}"), &disk);
        let mut client = connect(&vm.vsock);
        expected.lock().unwrap().check(&mut client, round);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let expected = expected.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut acknowledged = 0;
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // Rewrites of a few names as well as new ones: each must be the old
                    // or the new version after the kill.
                    let name = format!("/r{}/f{}", round % 3, i % 6);
                    let data = content(round * 1000 + i, 20_000 + (i as usize * 7919) % 200_000);
                    expected.lock().unwrap().in_flight = Some((name.clone(), blake3::hash(&data)));
                    let local = scratch_path("stream.bin");
                    std::fs::write(&local, &data).unwrap();
                    let sent = client.put_file(&local, &name, |_, _| {});
                    let _ = std::fs::remove_file(&local);
                    if sent.is_err() {
                        break;
                    }
                    expected.lock().unwrap().acknowledge(name, blake3::hash(&data));
                    acknowledged += 1;
                }
                acknowledged
            })
        };
        std::thread::sleep(Duration::from_millis(40 + u64::from(round) * 23));
        vm.vm.signal(libc::SIGKILL);
        stop.store(true, Ordering::Relaxed);
        puts += writer.join().unwrap();
        drop(vm);
    }
    // One more boot checks the last round.
    let vm = boot("kill-final", &disk);
    let mut client = connect(&vm.vsock);
    expected.lock().unwrap().check(&mut client, 12);
    assert!(puts > 12, "the stream wrote files: {puts} acknowledged puts");
    drop(client);
    power_off(vm);
    let _ = std::fs::remove_file(&layer);
}

#[test]
fn two_vms_on_one_base_see_the_base_and_their_own_files_only() {
    // The base: a raw image with one file on it, made by a VM that wrote it in place.
    let base = scratch_path("base.raw");
    std::fs::write(&base, vec![0u8; 64 << 20]).unwrap();
    let vm = boot("base-maker", base.to_str().unwrap());
    let mut client = connect(&vm.vsock);
    put(&mut client, "/shared.txt", b"from the base");
    drop(client);
    power_off(vm);
    let base_digest = digest(&base);

    let a_layer = scratch_path("a.layer");
    let b_layer = scratch_path("b.layer");
    let a = boot("vm-a", &format!("{},base={}", a_layer.display(), base.display()));
    let b = boot("vm-b", &format!("{},base={}", b_layer.display(), base.display()));
    let mut a_client = connect(&a.vsock);
    let mut b_client = connect(&b.vsock);
    put(&mut a_client, "/mine.txt", b"a's file");
    put(&mut b_client, "/mine.txt", b"b's file");
    put(&mut b_client, "/only-b.txt", b"b alone");
    assert_eq!(get(&mut a_client, "/shared.txt").as_deref(), Some(&b"from the base"[..]));
    assert_eq!(get(&mut b_client, "/shared.txt").as_deref(), Some(&b"from the base"[..]));
    assert_eq!(get(&mut a_client, "/mine.txt").as_deref(), Some(&b"a's file"[..]));
    assert_eq!(get(&mut b_client, "/mine.txt").as_deref(), Some(&b"b's file"[..]));
    assert_eq!(get(&mut a_client, "/only-b.txt"), None);
    drop((a_client, b_client));
    power_off(a);
    power_off(b);
    assert_eq!(digest(&base), base_digest, "the base is never written");
    for path in [base, a_layer, b_layer] {
        let _ = std::fs::remove_file(path);
    }
}

#[test]
fn a_snapshot_and_restore_keep_memory_and_disk_consistent() {
    let layer = scratch_path("snap.layer");
    let dir = scratch_path("snap-dir");
    let disk = format!("{},size=64M", layer.display());
    let vm = boot("snap", &disk);
    let mut client = connect(&vm.vsock);
    put(&mut client, "/before.txt", b"written before the snapshot");
    let mut control = ControlClient::connect(&vm.socket).unwrap();
    let request = SnapshotRequest { dir: dir.clone(), hibernate: false, diff: false };
    match control.call(&Request::Snapshot(request), DEADLINE).unwrap() {
        Response::Snapshot(_) => {}
        other => panic!("snapshot: {other:?}"),
    }
    put(&mut client, "/after.txt", b"written after the snapshot");
    assert!(get(&mut client, "/after.txt").is_some());
    drop(client);
    power_off(vm);
    let frozen: Vec<PathBuf> = std::fs::read_dir(layer.parent().unwrap())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().starts_with(&format!("{}.frozen-", layer.display())))
        .collect();
    assert_eq!(frozen.len(), 1, "one frozen layer: {frozen:?}");
    let frozen_digest = digest(&frozen[0]);

    let vsock = scratch_path("snap-restored.vsock");
    let socket = scratch_path("snap-restored.sock");
    let args = [
        "run",
        "--restore",
        dir.to_str().unwrap(),
        "--vsock",
        vsock.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
    ];
    let mut restored = RunningVm::start(&args);
    restored.wait_for_line("carrel-vmm: restored", DEADLINE);
    let mut client = connect(&vsock);
    assert_eq!(get(&mut client, "/before.txt").as_deref(), Some(&b"written before the snapshot"[..]));
    assert_eq!(get(&mut client, "/after.txt"), None, "a file written after the snapshot is not in the restore");
    put(&mut client, "/restored.txt", b"the restored VM writes on");
    assert!(get(&mut client, "/restored.txt").is_some());
    drop(client);
    drop(restored);
    assert_eq!(digest(&frozen[0]), frozen_digest, "a frozen layer is never written");
    let _ = std::fs::remove_dir_all(&dir);
    for path in frozen.into_iter().chain([layer]) {
        let _ = std::fs::remove_file(path);
    }
}

#[test]
fn a_full_host_filesystem_fails_the_put_and_the_vm_and_its_flushed_files_go_on() {
    let mount = scratch_path("tiny-disk-fs");
    std::fs::create_dir(&mount).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs", mount.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(mounted.success(), "this test mounts a tmpfs and needs root (CI and the dev machines run as root)");
    let layer = mount.join("vda.layer");
    let disk = format!("{},size=64M", layer.display());
    let vm = boot("host-full", &disk);
    let mut client = connect(&vm.vsock);
    let kept = content(7, 1 << 20);
    put(&mut client, "/kept.bin", &kept);
    let mut refused = None;
    for i in 0..16 {
        let local = scratch_path("fill.bin");
        std::fs::write(&local, content(100 + i, 1 << 20)).unwrap();
        let sent = client.put_file(&local, &format!("/fill{i}.bin"), |_, _| {});
        std::fs::remove_file(&local).unwrap();
        if let Err(err) = sent {
            refused = Some(err.to_string());
            break;
        }
    }
    let refused = refused.expect("a 6 MiB filesystem does not take 17 MiB of files");
    assert!(refused.contains("I/O error"), "the guest heard of the host's full disk as an I/O error: {refused}");
    // The VM runs on and what was acknowledged reads back, now and after a cold boot.
    assert_eq!(get(&mut client, "/kept.bin").map(|bytes| blake3::hash(&bytes)), Some(blake3::hash(&kept)));
    assert!(client.ping().is_ok());
    drop(client);
    power_off(vm);
    let vm = boot("host-full-again", &disk);
    let mut client = connect(&vm.vsock);
    assert_eq!(get(&mut client, "/kept.bin").map(|bytes| blake3::hash(&bytes)), Some(blake3::hash(&kept)));
    drop(client);
    power_off(vm);
    let _ = std::process::Command::new("umount").arg(&mount).status();
    let _ = std::fs::remove_dir(&mount);
}

#[test]
fn disk_commands_create_describe_and_fold_layers_and_a_raw_disk_refuses_snapshots() {
    let base = scratch_path("cli-base.raw");
    std::fs::write(&base, vec![0u8; 8 << 20]).unwrap();
    let layer = scratch_path("cli.layer");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(common::vmm_binary()).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, text) = cli(&["disk", "create", layer.to_str().unwrap(), "--base", base.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("8 MiB, 1 layer(s)") && text.contains("over base"), "{text}");
    let (code, text) = cli(&["disk", "create", layer.to_str().unwrap(), "--size", "8M"]);
    assert_ne!(code, Some(0), "an existing layer is not made again: {text}");

    // A VM writes a file into the layer, a snapshot freezes it, the VM writes more.
    let spec = format!("{},base={}", layer.display(), base.display());
    let vm = boot("cli-vm", &spec);
    let mut client = connect(&vm.vsock);
    put(&mut client, "/one.txt", b"one");
    let mut control = ControlClient::connect(&vm.socket).unwrap();
    let dir = scratch_path("cli-snapshot");
    let request = SnapshotRequest { dir: dir.clone(), hibernate: false, diff: false };
    assert!(matches!(control.call(&Request::Snapshot(request), DEADLINE).unwrap(), Response::Snapshot(_)));
    put(&mut client, "/two.txt", b"two");
    let (code, text) = cli(&["disk", "commit", layer.to_str().unwrap()]);
    assert_ne!(code, Some(0), "a disk in use is not folded: {text}");
    assert!(text.contains("in use"), "{text}");
    drop(client);
    power_off(vm);

    let (code, text) = cli(&["disk", "info", layer.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("2 layer(s)") && text.contains(".frozen-"), "{text}");
    let (code, text) = cli(&["disk", "commit", layer.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{text}");
    let (_, text) = cli(&["disk", "info", layer.to_str().unwrap()]);
    assert!(text.contains("1 layer(s)"), "folded into one layer over the base: {text}");
    let vm = boot("cli-vm-folded", &spec);
    let mut client = connect(&vm.vsock);
    assert_eq!(get(&mut client, "/one.txt").as_deref(), Some(&b"one"[..]));
    assert_eq!(get(&mut client, "/two.txt").as_deref(), Some(&b"two"[..]));
    drop(client);
    power_off(vm);

    // A raw disk written in place cannot be frozen: the snapshot is refused, the VM runs on.
    let raw = scratch_path("cli-raw.img");
    std::fs::write(&raw, vec![0u8; 8 << 20]).unwrap();
    let vm = boot("cli-raw", raw.to_str().unwrap());
    let mut control = ControlClient::connect(&vm.socket).unwrap();
    let request = SnapshotRequest { dir: scratch_path("cli-raw-snapshot"), hibernate: false, diff: false };
    match control.call(&Request::Snapshot(request), DEADLINE).unwrap() {
        Response::Error(failure) => {
            assert!(failure.message.contains("raw image written in place"), "{failure}");
            assert_eq!(failure.kind, carrel_vmm::control::ErrorKind::FailedPrecondition);
        }
        other => panic!("a snapshot of a writable raw disk: {other:?}"),
    }
    let mut client = connect(&vm.vsock);
    assert!(client.ping().is_ok(), "the VM runs on");
    drop(client);
    power_off(vm);
    let _ = std::fs::remove_dir_all(&dir);
    for path in std::fs::read_dir(layer.parent().expect("a scratch path has a parent"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
    {
        if path.to_string_lossy().starts_with(&*layer.to_string_lossy()) {
            let _ = std::fs::remove_file(path);
        }
    }
    for path in [base, raw] {
        let _ = std::fs::remove_file(path);
    }
}

//! carreld end to end through its socket only: VMs created, looked at, acted on, crashed,
//! re-attached after a daemon restart, stopped and deleted, with nothing left behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use carrel_api::v1;
use tonic::transport::Channel;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A binary of another package of the workspace, brought up to date: Cargo builds those
/// for their own package's tests only.
fn workspace_binary(package: &str, binary: &str) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(workspace_root()).args(["build", "--quiet", "-p", package, "--bin", binary]);
    if package == "carrel-vmm" {
        // The suite's features (scripts/test.sh): a build without them would replace the
        // binary the VMM's own jail tests run next with one that lacks their probes.
        command.args(["--features", "test-probes"]);
    }
    let status = command.status().unwrap();
    assert!(status.success(), "building {binary} failed");
    Path::new(env!("CARGO_BIN_EXE_carreld")).with_file_name(binary)
}

fn vmm_binary() -> PathBuf {
    workspace_binary("carrel-vmm", "carrel-vmm")
}

fn desk_kernel() -> PathBuf {
    let kernel = workspace_root().join("target/guests/desk.elf");
    assert!(kernel.exists(), "run scripts/build-guests.sh first");
    kernel
}

struct Daemon {
    child: Child,
    state: PathBuf,
    /// The VMs' parent cgroup under this process's own, one per daemon's state dir, so
    /// tests running at once never share one.
    cgroup: String,
}

/// The cgroup name of a daemon whose state is `state` (a temporary directory).
fn cgroup_name(state: &Path) -> String {
    let dir = state.parent().unwrap().file_name().unwrap().to_string_lossy();
    format!("carrel-test-{}", dir.trim_start_matches('.'))
}

/// The directories named `name` under /sys/fs/cgroup: the VMs' parent group in each
/// hierarchy (one on cgroup v2).
fn cgroup_parents(name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, name: &str, depth: u32, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            if entry.file_name() == name {
                found.push(entry.path());
            } else if depth > 0 {
                walk(&entry.path(), name, depth - 1, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), name, 5, &mut found);
    found
}

/// The VMs' groups under the parents: subdirectories named after VMs.
fn cgroup_vm_dirs(name: &str) -> Vec<PathBuf> {
    cgroup_parents(name)
        .iter()
        .flat_map(|parent| std::fs::read_dir(parent).unwrap().flatten())
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        // The standby VMM's group is nobody's yet.
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
        .map(|entry| entry.path())
        .collect()
}

/// A carreld with a state directory of its own (kept while the `TempDir` lives).
fn started_daemon() -> (tempfile::TempDir, PathBuf, PathBuf, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let (socket, state) = (dir.path().join("carrel.sock"), dir.path().join("state"));
    let daemon = Daemon::start(&socket, &state, &vmm_binary());
    (dir, socket, state, daemon)
}

impl Daemon {
    fn start(socket: &Path, state: &Path, vmm: &Path) -> Daemon {
        Daemon::start_logged(socket, state, vmm, None)
    }

    /// With `log`, the daemon's messages go to that file.
    fn start_logged(socket: &Path, state: &Path, vmm: &Path, log: Option<&Path>) -> Daemon {
        let cgroup = cgroup_name(state);
        let mut command = Command::new(env!("CARGO_BIN_EXE_carreld"));
        command
            .args(["--socket", socket.to_str().unwrap(), "--state", state.to_str().unwrap()])
            .args(["--vmm", vmm.to_str().unwrap(), "--kernel", desk_kernel().to_str().unwrap()])
            .args(["--cgroup", &cgroup]);
        if let Some(log) = log {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
            command.stderr(file);
        }
        let child = command.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(Instant::now() < deadline, "carreld did not open its socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon { child, state: state.to_path_buf(), cgroup }
    }

    /// Ends the daemon with SIGTERM; its VMs run on.
    fn terminate(mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "carreld ends cleanly on SIGTERM: {status:?}");
        // Not a failure: the VMs stay for the next daemon.
        self.state = PathBuf::new();
    }
}

impl Drop for Daemon {
    /// A test that failed midway leaves no VMM behind: the VMMs outlive the daemon by
    /// design, so their pids are read from the registry and ended here.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for entry in std::fs::read_dir(self.state.join("vms")).into_iter().flatten().flatten() {
            let record = std::fs::read_to_string(entry.path().join("vm.json")).unwrap_or_default();
            let pid = serde_json::from_str::<serde_json::Value>(&record).ok().and_then(|record| record["pid"].as_u64());
            if let Some(pid) = pid {
                // SAFETY: kill(2) on a VMM this test's daemon started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        // The VMs' groups a failed test left (their VMMs were just killed), then the
        // parents, which carreld keeps for its next start. A group still in use (the
        // VMs of a daemon that ended cleanly mid-test) refuses rmdir and stays.
        let failed = !self.state.as_os_str().is_empty();
        for _ in 0..100 {
            let left = if failed { cgroup_vm_dirs(&self.cgroup) } else { Vec::new() };
            if left.iter().all(|dir| std::fs::remove_dir(dir).is_ok()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The standby VMM's group: its VMM ends as its stdin closes with the daemon.
        for parent in cgroup_parents(&self.cgroup) {
            let standby = parent.join(".standby");
            for _ in 0..100 {
                if !standby.exists() || std::fs::remove_dir(&standby).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = std::fs::remove_dir(parent);
        }
    }
}

async fn connect(socket: &Path) -> Channel {
    carrel_api::connect(socket).await.unwrap()
}

/// Whether `pid` runs; a zombie (ended, not yet reaped by whoever inherited it) does not.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// Input before the guest's drivers run is dropped (UNAVAILABLE): acts until it is taken.
async fn act_once_booted(
    input: &mut v1::input_client::InputClient<Channel>,
    request: v1::ActRequest,
) -> v1::ActResponse {
    let booted = Instant::now();
    loop {
        match input.act(request.clone()).await {
            Ok(done) => return done.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable && booted.elapsed().as_secs() < 10 => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(status) => panic!("{}: input failed: {status:?}", request.name),
        }
    }
}

async fn wait_state(vms: &mut v1::vms_client::VmsClient<Channel>, name: &str, state: v1::VmState) -> v1::Vm {
    wait_state_within(vms, name, state, Duration::from_secs(10)).await
}

async fn wait_state_within(
    vms: &mut v1::vms_client::VmsClient<Channel>,
    name: &str,
    state: v1::VmState,
    within: Duration,
) -> v1::Vm {
    let deadline = Instant::now() + within;
    loop {
        let vm = vms.get(v1::GetVmRequest { name: name.into() }).await.unwrap().into_inner();
        if vm.state == state as i32 {
            return vm;
        }
        assert!(Instant::now() < deadline, "{name} never reached {state:?}: {vm:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_are_created_used_crash_detected_reattached_and_deleted_through_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, state) = (dir.path().join("carrel.sock"), dir.path().join("state"));
    let vmm = vmm_binary();
    let daemon = Daemon::start(&socket, &state, &vmm);
    let channel = connect(&socket).await;
    let mut host = v1::host_client::HostClient::new(channel.clone());
    let mut vms = v1::vms_client::VmsClient::new(channel.clone());
    let mut screen = v1::screen_client::ScreenClient::new(channel.clone());
    let mut input = v1::input_client::InputClient::new(channel.clone());
    let mut agent = v1::agent_client::AgentClient::new(channel.clone());

    let info = host.info(v1::HostInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.vms, 0);
    assert!(info.platform == "pvm" || info.platform == "hardware", "{info:?}");

    for name in ["one", "two", "never"] {
        let config =
            (name == "never").then(|| v1::VmConfig { restart: v1::RestartPolicy::Never as i32, ..Default::default() });
        let vm = vms
            .create(v1::CreateVmRequest { name: name.into(), config, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(vm.state, v1::VmState::Running as i32, "{vm:?}");
        assert!(alive(vm.pid));
    }
    let duplicate =
        vms.create(v1::CreateVmRequest { name: "one".into(), config: None, ..Default::default() }).await.unwrap_err();
    assert_eq!(duplicate.code(), tonic::Code::AlreadyExists);
    let config = v1::VmConfig { memory_mib: 1 << 20, ..Default::default() };
    let invalid = vms
        .create(v1::CreateVmRequest { name: "big".into(), config: Some(config), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument, "{invalid:?}");
    let bad_name =
        vms.create(v1::CreateVmRequest { name: "../x".into(), config: None, ..Default::default() }).await.unwrap_err();
    assert_eq!(bad_name.code(), tonic::Code::InvalidArgument);
    let missing = vms.get(v1::GetVmRequest { name: "nobody".into() }).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert_eq!(vms.list(v1::ListVmsRequest {}).await.unwrap().into_inner().vms.len(), 3);

    // Each VMM runs in its own cgroup, and Vms.Get reports its use and limits.
    let one = vms.get(v1::GetVmRequest { name: "one".into() }).await.unwrap().into_inner();
    let own_groups = std::fs::read_to_string(format!("/proc/{}/cgroup", one.pid)).unwrap();
    assert!(own_groups.contains(&format!("/{}/one\n", daemon.cgroup)), "the VMM is in its group: {own_groups}");
    let usage = one.usage.clone().expect("a running VM reports its use");
    assert!(usage.cgroup_version == "v1" || usage.cgroup_version == "v2", "{usage:?}");
    // 128 MiB of RAM plus carreld's 32 MiB of VMM overhead.
    assert_eq!(usage.memory_limit_bytes, 160 << 20, "{usage:?}");
    assert!(usage.memory_current_bytes > 1 << 20 && usage.memory_peak_bytes >= usage.memory_current_bytes, "{usage:?}");
    assert!(usage.memory_current_bytes < usage.memory_limit_bytes, "{usage:?}");
    assert!(usage.cpu_usage_us > 0 && usage.cpu_quota_us == 150_000, "{usage:?}");
    assert!(usage.pids_current >= 3 && usage.pids_current < usage.pids_limit, "{usage:?}");
    assert_eq!(usage.oom_kills, 0);
    assert_eq!(cgroup_vm_dirs(&daemon.cgroup).len() % 3, 0, "one group per VM in each hierarchy");

    // Each VMM is jailed (the daemon runs as root here) as a uid of its own, filtered.
    let mut jail_uids = std::collections::BTreeSet::new();
    for vm in vms.list(v1::ListVmsRequest {}).await.unwrap().into_inner().vms {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", vm.pid)).unwrap();
        let jailed = children.split_whitespace().next().expect("the jailed VMM under its outer process");
        let status = std::fs::read_to_string(format!("/proc/{jailed}/status")).unwrap();
        let field = |name: &str| status.lines().find(|line| line.starts_with(name)).unwrap_or_default().to_string();
        let uid: u32 = field("Uid:").split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(uid >= 200_000, "{}: {}", vm.name, field("Uid:"));
        assert!(field("CapEff:").ends_with("0000000000000000") && field("Seccomp:").ends_with('2'), "{status}");
        jail_uids.insert(uid);
    }
    assert_eq!(jail_uids.len(), 3, "one uid per VM");

    // Look at "one", type into it, and see the typing in its screenshot.
    let still = v1::ScreenshotRequest { name: "one".into(), still_ms: 200, timeout_ms: 10_000, ..Default::default() };
    let before = screen.screenshot(still.clone()).await.unwrap().into_inner();
    assert_eq!((before.width, before.height), (1280, 800));
    assert_eq!(&before.image[..4], b"\x89PNG");
    let decoder = png::Decoder::new(std::io::Cursor::new(before.image.clone()));
    let header = decoder.read_info().unwrap().info().clone();
    assert_eq!((header.width, header.height), (1280, 800));
    let typed = input
        .act(v1::ActRequest {
            name: "one".into(),
            action: Some(v1::act_request::Action::TypeText("hello".into())),
            screenshot: true,
            timeout_ms: 5_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!typed.timed_out && typed.frame > before.frame, "typing drew a frame: {typed:?}");
    let after = typed.screenshot.expect("act-then-look returns the frame");
    assert_ne!(after.image, before.image, "the typed text is on the screen");

    // Exec in "two".
    let exec = v1::ExecRequest { name: "two".into(), argv: vec!["echo".into(), "hi".into()], ..Default::default() };
    let done = agent.exec(exec).await.unwrap().into_inner();
    assert_eq!((done.exit_code, done.stdout.as_slice()), (0, b"hi\n".as_slice()));

    // kill -9 "two"'s VMM: the daemon notices, keeps the reason and restarts it by policy.
    let two = vms.get(v1::GetVmRequest { name: "two".into() }).await.unwrap().into_inner();
    let killed_at = Instant::now();
    // SAFETY: kill(2) on the VMM the daemon started for this test.
    unsafe { libc::kill(two.pid as i32, libc::SIGKILL) };
    let restarted = loop {
        let vm = vms.get(v1::GetVmRequest { name: "two".into() }).await.unwrap().into_inner();
        if vm.state == v1::VmState::Running as i32 && vm.pid != two.pid {
            break vm;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(10), "never restarted: {vm:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let crash_to_running = killed_at.elapsed();
    assert_eq!(restarted.restarts, 1);
    assert!(restarted.exit_reason.contains("signal 9"), "{restarted:?}");
    eprintln!("crash to running again: {crash_to_running:?}");
    let exec = v1::ExecRequest { name: "two".into(), argv: vec!["echo".into(), "back".into()], ..Default::default() };
    assert_eq!(agent.exec(exec).await.unwrap().into_inner().stdout, b"back\n");

    // With restarts off, a crash stays a crash.
    let never = vms.get(v1::GetVmRequest { name: "never".into() }).await.unwrap().into_inner();
    // SAFETY: as above.
    unsafe { libc::kill(never.pid as i32, libc::SIGKILL) };
    let crashed = wait_state(&mut vms, "never", v1::VmState::Crashed).await;
    assert!(crashed.exit_reason.contains("signal 9"), "{crashed:?}");
    let refused = agent
        .exec(v1::ExecRequest { name: "never".into(), argv: vec!["echo".into()], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

    // Restart the daemon: "one" is found running, with the same VMM.
    let one = vms.get(v1::GetVmRequest { name: "one".into() }).await.unwrap().into_inner();
    drop((host, vms, screen, input, agent, channel));
    daemon.terminate();
    assert!(alive(one.pid), "the VMs outlive the daemon");
    let daemon = Daemon::start(&socket, &state, &vmm);
    let channel = connect(&socket).await;
    let mut vms = v1::vms_client::VmsClient::new(channel.clone());
    let again = vms.get(v1::GetVmRequest { name: "one".into() }).await.unwrap().into_inner();
    assert_eq!((again.state, again.pid), (v1::VmState::Running as i32, one.pid), "re-attached: {again:?}");
    let mut screen = v1::screen_client::ScreenClient::new(channel.clone());
    assert!(screen.screenshot(still).await.is_ok());
    let never = vms.get(v1::GetVmRequest { name: "never".into() }).await.unwrap().into_inner();
    assert_eq!(never.state, v1::VmState::Crashed as i32);
    let two = vms.get(v1::GetVmRequest { name: "two".into() }).await.unwrap().into_inner();
    assert_eq!((two.state, two.pid), (v1::VmState::Running as i32, restarted.pid), "re-attached: {two:?}");

    // A second carreld on the same socket is refused.
    let second = Command::new(env!("CARGO_BIN_EXE_carreld"))
        .args(["--socket", socket.to_str().unwrap(), "--state", state.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("another carreld"), "{second:?}");

    // The VM's audit log names the caller of each request carreld forwarded (this test's
    // process), not carreld.
    let export = |dir: PathBuf| {
        let out = Command::new(workspace_binary("carrel-audit", "carrel-audit"))
            .args(["export", dir.to_str().unwrap(), "--jsonl"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let me = format!(r#""pid":{}"#, std::process::id());
    let typed = export(state.join("vms/one/audit"));
    let input_line =
        typed.lines().find(|line| line.contains(r#""action":"input.type""#)).expect("the typing is audited");
    assert!(input_line.contains(&me) && input_line.contains(r#""uid":0"#), "{input_line}");

    let stopped = vms.stop(v1::VmName { name: "one".into() }).await.unwrap().into_inner();
    assert_eq!(stopped.state, v1::VmState::Stopped as i32);
    assert!(!alive(one.pid));
    for name in ["one", "two", "never"] {
        vms.delete(v1::VmName { name: name.into() }).await.unwrap();
    }
    assert!(!alive(two.pid), "deleting a running VM stops its VMM");
    assert!(vms.list(v1::ListVmsRequest {}).await.unwrap().into_inner().vms.is_empty());
    assert_eq!(std::fs::read_dir(state.join("vms")).unwrap().count(), 0, "nothing left in the state dir");
    // The host's audit log holds the VMs' creation, stop and deletion, by this caller,
    // and the refused duplicate create with its error.
    let host_log = export(state.join("audit"));
    for action in ["vm.create", "vm.stop", "vm.delete"] {
        let line = host_log.lines().find(|line| line.contains(&format!(r#""action":"{action}""#))).unwrap_or_default();
        assert!(line.contains(&me), "{action} in the host log: {host_log}");
    }
    assert!(host_log.contains("AlreadyExists"), "{host_log}");
    let verified = Command::new(workspace_binary("carrel-cli", "carrel"))
        .args(["audit", "verify", state.join("audit").to_str().unwrap()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&verified.stdout);
    assert!(verified.status.success() && !report.contains("no checkpoints"), "{report}");
    assert!(!cgroup_parents(&daemon.cgroup).is_empty(), "the VMs' parent groups are carreld's");
    assert_eq!(cgroup_vm_dirs(&daemon.cgroup), Vec::<PathBuf>::new(), "no VM's cgroup is left");
    drop((vms, screen, channel));
    daemon.terminate();
    assert!(!socket.exists(), "the socket goes with the daemon");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generic_python_client_uses_reflection_to_list_and_screenshot() {
    let (_dir, socket, _state, daemon) = started_daemon();
    let mut vms = v1::vms_client::VmsClient::new(connect(&socket).await);
    vms.create(v1::CreateVmRequest { name: "seen".into(), config: None, ..Default::default() }).await.unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/generic_client.py");
    let output = tokio::process::Command::new("python3").arg(&script).arg(&socket).arg("seen").output().await.unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout);
    let answer: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|err| panic!("{err}: {text}"));
    assert_eq!(answer["vms"], serde_json::json!(["seen"]));
    assert_eq!(answer["png"], serde_json::json!([1280, 800]), "the PNG decodes to the screen's size");
    assert_eq!(answer["reported"], answer["png"]);
    vms.delete(v1::VmName { name: "seen".into() }).await.unwrap();
    drop(vms);
    daemon.terminate();
}

fn cli_binary() -> PathBuf {
    workspace_binary("carrel-cli", "carrel")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_can_neither_see_nor_act_on_a_vm() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (socket, state) = (dir.path().join("carrel.sock"), dir.path().join("state"));
    let daemon = Daemon::start(&socket, &state, &vmm_binary());
    let cli = cli_binary();
    let carrel = |user: Option<u32>, args: &[&str]| {
        let mut command = match user {
            Some(uid) => {
                let mut command = Command::new("setpriv");
                command.args(["--reuid", &uid.to_string(), "--regid", &uid.to_string(), "--clear-groups"]).arg(&cli);
                command
            }
            None => Command::new(&cli),
        };
        let output = command.arg("--socket").arg(&socket).args(args).output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (code, text) = carrel(None, &["create", "private"]);
    assert_eq!(code, Some(0), "{text}");
    let nobody = Some(65534);
    let (code, text) = carrel(nobody, &["--json", "ls"]);
    assert_eq!((code, text.trim()), (Some(0), "[]"), "another user lists nothing: {text}");
    for args in [&["get", "private"][..], &["stop", "private"], &["rm", "private"], &["exec", "private", "--", "echo"]]
    {
        let (code, text) = carrel(nobody, args);
        assert_eq!(code, Some(17), "{args:?} as another user is PERMISSION_DENIED: {text}");
        assert!(text.contains("PermissionDenied"), "{text}");
    }
    let shot = dir.path().join("shot.png");
    let (code, _) = carrel(nobody, &["screenshot", "private", "-o", shot.to_str().unwrap()]);
    assert_eq!(code, Some(17));
    assert!(!shot.exists(), "no pixels for another user");
    let (code, text) = carrel(None, &["--json", "get", "private"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("\"state\":\"running\""), "the owner's VM runs on: {text}");
    let (code, text) = carrel(None, &["get", "nobody-has-this"]);
    assert_eq!(code, Some(15), "NOT_FOUND: {text}");
    let (code, text) = carrel(None, &["rm", "private"]);
    assert_eq!(code, Some(0), "{text}");
    daemon.terminate();
}

#[test]
fn provision_check_reports_the_host_and_carreld_unit_verifies() {
    let script = workspace_root().join("scripts/provision-host.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg("--check")
        .env("CARRELD", env!("CARGO_BIN_EXE_carreld"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "provision-host.sh --check found problems: {text}");
    assert!(text.contains("check: kvm: "), "{text}");
    assert!(text.contains("carreld unit: systemd-analyze verify passes"), "{text}");
    let unit = Command::new("bash").arg(&script).arg("--print-unit").output().unwrap();
    let unit = String::from_utf8_lossy(&unit.stdout);
    assert!(unit.contains("KillMode=process") && !unit.contains('@'), "the unit is filled in: {unit}");
}

/// Everything on a Desk screen but its top bar, whose clock moves by itself.
const BELOW_THE_CLOCK: [u32; 4] = [0, 32, 1280, 768];
/// The Desk window's "Save (N)" button, which counts its clicks.
const SAVE_BUTTON: [u32; 4] = [284, 270, 120, 36];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_vm_hibernates_shows_its_screen_asleep_wakes_on_a_click_and_survives_a_daemon_restart() {
    let (_dir, socket, state, daemon) = started_daemon();
    let channel = connect(&socket).await;
    let mut vms = v1::vms_client::VmsClient::new(channel.clone());
    let mut screen = v1::screen_client::ScreenClient::new(channel.clone());
    let mut input = v1::input_client::InputClient::new(channel.clone());
    let mut snapshots = v1::snapshots_client::SnapshotsClient::new(channel.clone());
    let config = v1::VmConfig { idle_hibernate_seconds: 2, ..Default::default() };
    let idle = vms
        .create(v1::CreateVmRequest { name: "idle".into(), config: Some(config), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    vms.create(v1::CreateVmRequest { name: "busy".into(), config: None, ..Default::default() }).await.unwrap();
    let act =
        |action| v1::ActRequest { name: "idle".into(), action: Some(action), timeout_ms: 5_000, ..Default::default() };
    let click = |x, y| act(v1::act_request::Action::Click(v1::Click { x, y }));
    // Calls keep it awake: the text field gets a line while the idle clock restarts.
    act_once_booted(&mut input, click(640, 228)).await;
    input.act(act(v1::act_request::Action::TypeText("sleepy".into()))).await.unwrap();
    let still = v1::ScreenshotRequest { name: "idle".into(), still_ms: 200, timeout_ms: 10_000, ..Default::default() };
    let awake = screen.screenshot(still.clone()).await.unwrap().into_inner();

    // Left alone, it hibernates: no VMM, its snapshot on disk.
    let asleep_state = wait_state_within(&mut vms, "idle", v1::VmState::Hibernated, Duration::from_secs(20)).await;
    assert_eq!(asleep_state.pid, 0);
    assert!(!alive(idle.pid), "its VMM ended");
    let saved = snapshots.list(v1::VmName { name: "idle".into() }).await.unwrap().into_inner().snapshots;
    let last = saved.last().expect("the hibernation's snapshot");
    assert!(state.join("vms/idle/snapshots").join(&last.id).join("memory.bin").exists(), "{saved:?}");

    // Its screen is served from the snapshot, the same pixels, and it stays asleep.
    let shot = screen.screenshot(v1::ScreenshotRequest { name: "idle".into(), ..Default::default() }).await.unwrap();
    let shot = shot.into_inner();
    assert!(crop(&shot.image, BELOW_THE_CLOCK) == crop(&awake.image, BELOW_THE_CLOCK), "the saved screen differs");
    let still_asleep = vms.get(v1::GetVmRequest { name: "idle".into() }).await.unwrap().into_inner();
    assert_eq!(still_asleep.state, v1::VmState::Hibernated as i32, "a screenshot does not wake it");

    // A click wakes it and lands: the Save button counts it.
    let (x, y) = (SAVE_BUTTON[0] + SAVE_BUTTON[2] / 2, SAVE_BUTTON[1] + SAVE_BUTTON[3] / 2);
    let clicked = input.act(v1::ActRequest { screenshot: true, ..click(x, y) }).await.unwrap().into_inner();
    let after = clicked.screenshot.expect("act-then-look").image;
    assert!(crop(&after, SAVE_BUTTON) != crop(&awake.image, SAVE_BUTTON), "the click did not land");
    let woken = vms.get(v1::GetVmRequest { name: "idle".into() }).await.unwrap().into_inner();
    assert_eq!((woken.state, woken.restarts), (v1::VmState::Running as i32, 0), "{woken:?}");

    // Hibernated again by request; the daemon restarts: one VM comes back asleep, the
    // other running as it was.
    snapshots.hibernate(v1::SnapshotRequest { name: "idle".into(), diff: true }).await.unwrap();
    let busy = vms.get(v1::GetVmRequest { name: "busy".into() }).await.unwrap().into_inner();
    drop((vms, screen, input, snapshots, channel));
    daemon.terminate();
    let daemon = Daemon::start(&socket, &state, &vmm_binary());
    let mut vms = v1::vms_client::VmsClient::new(connect(&socket).await);
    let idle = vms.get(v1::GetVmRequest { name: "idle".into() }).await.unwrap().into_inner();
    assert_eq!(idle.state, v1::VmState::Hibernated as i32, "{idle:?}");
    let again = vms.get(v1::GetVmRequest { name: "busy".into() }).await.unwrap().into_inner();
    assert_eq!((again.state, again.pid), (v1::VmState::Running as i32, busy.pid));
    let mut agent = v1::agent_client::AgentClient::new(connect(&socket).await);
    let exec = v1::ExecRequest { name: "idle".into(), argv: vec!["echo".into(), "up".into()], ..Default::default() };
    assert_eq!(agent.exec(exec).await.unwrap().into_inner().stdout, b"up\n", "an exec wakes it after the restart");
    for name in ["idle", "busy"] {
        vms.delete(v1::VmName { name: name.into() }).await.unwrap();
    }
    drop((vms, agent));
    daemon.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_vm_comes_back_from_its_last_checkpoint_and_rolls_back_to_a_snapshot() {
    let (_dir, socket, state, daemon) = started_daemon();
    let channel = connect(&socket).await;
    let mut vms = v1::vms_client::VmsClient::new(channel.clone());
    let mut agent = v1::agent_client::AgentClient::new(channel.clone());
    let mut snapshots = v1::snapshots_client::SnapshotsClient::new(channel.clone());
    let config = v1::VmConfig { checkpoint_seconds: 1, keep_checkpoints: 2, ..Default::default() };
    vms.create(v1::CreateVmRequest { name: "healer".into(), config: Some(config), ..Default::default() })
        .await
        .unwrap();
    let newest_checkpoint = |list: Vec<v1::SnapshotInfo>| list.into_iter().rev().find(|snapshot| snapshot.checkpoint);
    exec_once_up(&mut agent, "healer", &["write", "/kept", "before the checkpoint"]).await;
    let list = || v1::VmName { name: "healer".into() };
    let before = newest_checkpoint(snapshots.list(list()).await.unwrap().into_inner().snapshots).map(|s| s.id);
    // The next checkpoint is taken after the write (the write was a use of the VM).
    let deadline = Instant::now() + Duration::from_secs(15);
    let checkpoint = loop {
        let newest = newest_checkpoint(snapshots.list(list()).await.unwrap().into_inner().snapshots);
        if let Some(newest) = newest.filter(|newest| Some(&newest.id) != before.as_ref()) {
            break newest;
        }
        assert!(Instant::now() < deadline, "no checkpoint after the write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // A later change, then the VMM dies before the next checkpoint.
    exec_once_up(&mut agent, "healer", &["write", "/lost", "after the checkpoint"]).await;
    let crashed = vms.get(v1::GetVmRequest { name: "healer".into() }).await.unwrap().into_inner();
    // SAFETY: kill(2) on the VMM this test's daemon started.
    unsafe { libc::kill(crashed.pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let back = loop {
        let now = vms.get(v1::GetVmRequest { name: "healer".into() }).await.unwrap().into_inner();
        if now.state == v1::VmState::Running as i32 && now.pid != crashed.pid {
            break now;
        }
        assert!(Instant::now() < deadline, "not restarted: {now:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(back.exit_reason.contains("signal 9"), "{back:?}");
    assert!(back.exit_reason.contains(&format!("restarted from checkpoint {}", checkpoint.id)), "{back:?}");
    assert_eq!(exec_once_up(&mut agent, "healer", &["cat", "/kept"]).await, "before the checkpoint");
    let lost =
        v1::ExecRequest { name: "healer".into(), argv: vec!["cat".into(), "/lost".into()], ..Default::default() };
    assert_ne!(
        agent.exec(lost.clone()).await.unwrap().into_inner().exit_code,
        0,
        "the change after the checkpoint is gone"
    );

    // Rollback to a snapshot: what came after it is gone, what came before stays.
    exec_once_up(&mut agent, "healer", &["write", "/rollback", "in the snapshot"]).await;
    let saved =
        snapshots.snapshot(v1::SnapshotRequest { name: "healer".into(), diff: false }).await.unwrap().into_inner();
    exec_once_up(&mut agent, "healer", &["write", "/lost", "after the snapshot"]).await;
    let rolled = snapshots.rollback(v1::RollbackRequest { name: "healer".into(), id: saved.id.clone() }).await.unwrap();
    assert_eq!(rolled.into_inner().state, v1::VmState::Running as i32);
    assert_eq!(exec_once_up(&mut agent, "healer", &["cat", "/rollback"]).await, "in the snapshot");
    assert_ne!(agent.exec(lost).await.unwrap().into_inner().exit_code, 0, "the change after the snapshot is gone");
    let unknown = snapshots.rollback(v1::RollbackRequest { name: "healer".into(), id: "s999".into() }).await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);

    // Old checkpoints are pruned: the newest two stay (with a parent or two under them).
    tokio::time::sleep(Duration::from_secs(3)).await;
    exec_once_up(&mut agent, "healer", &["echo", "busy"]).await;
    let all = snapshots.list(list()).await.unwrap().into_inner().snapshots;
    let checkpoints = all.iter().filter(|snapshot| snapshot.checkpoint).count();
    assert!(checkpoints <= 3, "{all:?}");
    let on_disk = std::fs::read_dir(state.join("vms/healer/snapshots")).unwrap().count();
    assert_eq!(on_disk, all.len(), "a pruned checkpoint's directory is gone");

    // The host goes down with the VM running: the next daemon brings it back from its
    // last checkpoint.
    let running = vms.get(v1::GetVmRequest { name: "healer".into() }).await.unwrap().into_inner();
    drop((vms, agent, snapshots, channel));
    daemon.terminate();
    // SAFETY: kill(2) on the VMM this test's daemon started.
    unsafe { libc::kill(running.pid as i32, libc::SIGKILL) };
    while alive(running.pid) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let daemon = Daemon::start(&socket, &state, &vmm_binary());
    let mut vms = v1::vms_client::VmsClient::new(connect(&socket).await);
    let revived = wait_state(&mut vms, "healer", v1::VmState::Running).await;
    assert!(revived.exit_reason.contains("while carreld was not running; restarted from checkpoint"), "{revived:?}");
    let mut agent = v1::agent_client::AgentClient::new(connect(&socket).await);
    assert_eq!(exec_once_up(&mut agent, "healer", &["cat", "/kept"]).await, "before the checkpoint");
    vms.delete(v1::VmName { name: "healer".into() }).await.unwrap();
    drop((vms, agent));
    daemon.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_files_watch_reboot_and_audit_records_through_the_socket() {
    let (_dir, socket, _state, daemon) = started_daemon();
    let channel = connect(&socket).await;
    let mut vms = v1::vms_client::VmsClient::new(channel.clone());
    let mut agent = v1::agent_client::AgentClient::new(channel.clone());
    vms.create(v1::CreateVmRequest { name: "io".into(), ..Default::default() }).await.unwrap();
    let mut watch = vms.watch(v1::VmName { name: "io".into() }).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.state, v1::VmState::Running as i32, "{first:?}");

    // The console: its history holds the boot.
    let mut console = v1::console_client::ConsoleClient::new(channel.clone());
    let (typing, typed) = tokio::sync::mpsc::channel(4);
    typing.send(v1::ConsoleInput { name: "io".into(), data: Vec::new() }).await.unwrap();
    let mut output = console.attach(tokio_stream::wrappers::ReceiverStream::new(typed)).await.unwrap().into_inner();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("desk: ready") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), output.message()).await.unwrap().unwrap().unwrap();
        seen.extend(chunk.data);
    }
    // Typing goes to the guest's serial port (Desk does not read it; the VMM's audit log
    // records the input by its length).
    typing.send(v1::ConsoleInput { name: String::new(), data: b"ls\n".to_vec() }).await.unwrap();

    // A file in and out as byte streams: the daemon opens no path of the caller's.
    exec_once_up(&mut agent, "io", &["echo", "up"]).await;
    let bytes: Vec<u8> = (0..1_500_000u32).map(|index| (index.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let chunks: Vec<v1::PutChunk> = bytes
        .chunks(200_000)
        .enumerate()
        .map(|(index, data)| v1::PutChunk {
            name: if index == 0 { "io".into() } else { String::new() },
            path: if index == 0 { "/data.bin".into() } else { String::new() },
            size: bytes.len() as u64,
            mode: 0o644,
            data: data.to_vec(),
        })
        .collect();
    let put = agent.put(tokio_stream::iter(chunks)).await.unwrap().into_inner();
    assert_eq!(put.bytes, bytes.len() as u64);
    let mut got = Vec::new();
    let mut stream =
        agent.get(v1::GetRequest { name: "io".into(), path: "/data.bin".into() }).await.unwrap().into_inner();
    while let Some(chunk) = stream.message().await.unwrap() {
        got.extend(chunk.data);
    }
    assert!(got == bytes, "the file came back different ({} bytes)", got.len());
    let mut missing =
        agent.get(v1::GetRequest { name: "io".into(), path: "/nothing".into() }).await.unwrap().into_inner();
    let absent = missing.message().await.unwrap_err();
    assert_eq!(absent.code(), tonic::Code::NotFound, "{absent:?}");

    // A reboot: a new VMM, and the watch sees it go and come back.
    let before = vms.get(v1::GetVmRequest { name: "io".into() }).await.unwrap().into_inner();
    let rebooted = vms.reboot(v1::VmName { name: "io".into() }).await.unwrap().into_inner();
    assert_eq!(rebooted.state, v1::VmState::Running as i32);
    assert_ne!(rebooted.pid, before.pid);
    let mut states = Vec::new();
    while states.last() != Some(&(v1::VmState::Running as i32)) || states.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap().unwrap().unwrap();
        states.push(event.state);
    }
    assert!(states.contains(&(v1::VmState::Stopped as i32)), "{states:?}");

    // The VM's audit records, from the start and from an index on.
    let mut audit = v1::audit_client::AuditClient::new(channel.clone());
    let mut records = Vec::new();
    let mut stream = audit.records(v1::AuditRequest { name: "io".into(), from: 0 }).await.unwrap().into_inner();
    while let Some(record) = stream.message().await.unwrap() {
        records.push(record);
    }
    assert!(records.iter().enumerate().all(|(index, record)| record.index == index as u64));
    let actions: Vec<&str> = records.iter().map(|record| record.action.as_str()).collect();
    assert!(
        actions.contains(&"vm.start") && actions.contains(&"agent.put") && actions.contains(&"vm.exit"),
        "{actions:?}"
    );
    let later =
        audit.records(v1::AuditRequest { name: "io".into(), from: 3 }).await.unwrap().into_inner().message().await;
    assert_eq!(later.unwrap().unwrap().index, 3);
    vms.delete(v1::VmName { name: "io".into() }).await.unwrap();
    drop((vms, agent, console, audit, output, watch, typing, channel));
    daemon.terminate();
}

/// Runs `argv` in VM `name`, retrying while its agent is not up yet.
async fn exec_once_up(agent: &mut v1::agent_client::AgentClient<Channel>, name: &str, argv: &[&str]) -> String {
    let exec = v1::ExecRequest {
        name: name.into(),
        argv: argv.iter().map(|arg| arg.to_string()).collect(),
        ..Default::default()
    };
    let started = Instant::now();
    loop {
        match agent.exec(exec.clone()).await {
            Ok(done) => return String::from_utf8(done.into_inner().stdout).unwrap(),
            Err(status) if status.code() == tonic::Code::Unavailable && started.elapsed().as_secs() < 20 => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(status) => panic!("{name}: {argv:?} failed: {status:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_vms_from_one_template_run_with_their_own_entropy_and_files() {
    let (_dir, socket, _state, daemon) = started_daemon();
    let channel = connect(&socket).await;
    let mut vms = v1::vms_client::VmsClient::new(channel.clone());
    let mut agent = v1::agent_client::AgentClient::new(channel.clone());
    let mut templates = v1::templates_client::TemplatesClient::new(channel.clone());
    vms.create(v1::CreateVmRequest { name: "base".into(), ..Default::default() }).await.unwrap();
    exec_once_up(&mut agent, "base", &["write", "/shared", "from the template"]).await;
    let request = v1::CreateTemplateRequest { name: "desk".into(), from_vm: "base".into() };
    let template = templates.create(request.clone()).await.unwrap().into_inner();
    assert_eq!((template.memory_mib, template.cpus), (128, 1));
    assert_eq!(templates.create(request).await.unwrap_err().code(), tonic::Code::AlreadyExists);
    let bigger = v1::VmConfig { memory_mib: 256, ..Default::default() };
    let refused = vms
        .create(v1::CreateVmRequest { name: "big".into(), config: Some(bigger), template: "desk".into() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    let names: Vec<String> = (0..20).map(|index| format!("clone-{index}")).collect();
    for name in &names {
        let vm = vms
            .create(v1::CreateVmRequest { name: name.clone(), template: "desk".into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(vm.state, v1::VmState::Running as i32, "{vm:?}");
        assert_eq!(vm.config.unwrap().template, "desk");
    }
    let mut entropy = std::collections::BTreeSet::new();
    for name in &names {
        // Each starts where the template was, with its file, and draws its own entropy.
        assert_eq!(exec_once_up(&mut agent, name, &["cat", "/shared"]).await, "from the template");
        assert!(entropy.insert(exec_once_up(&mut agent, name, &["random"]).await), "{name} repeats another's entropy");
        exec_once_up(&mut agent, name, &["write", "/mine", name]).await;
    }
    for name in &names {
        assert_eq!(exec_once_up(&mut agent, name, &["cat", "/mine"]).await, *name, "each keeps its own files");
    }
    // Hibernated to a diff over the template's snapshot, which its jail reads on the wake.
    let mut snapshots = v1::snapshots_client::SnapshotsClient::new(channel.clone());
    snapshots.hibernate(v1::SnapshotRequest { name: names[0].clone(), diff: true }).await.unwrap();
    assert_eq!(exec_once_up(&mut agent, &names[0], &["cat", "/mine"]).await, names[0], "woken from its diff");
    let in_use = templates.delete(v1::TemplateName { name: "desk".into() }).await.unwrap_err();
    assert_eq!(in_use.code(), tonic::Code::FailedPrecondition, "{in_use:?}");
    for name in names.iter().map(String::as_str).chain(["base"]) {
        vms.delete(v1::VmName { name: name.into() }).await.unwrap();
    }
    templates.delete(v1::TemplateName { name: "desk".into() }).await.unwrap();
    assert!(templates.list(v1::ListTemplatesRequest {}).await.unwrap().into_inner().templates.is_empty());
    drop((vms, agent, templates, snapshots, channel));
    daemon.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_from_a_template_with_a_disk_each_write_their_own_layer_over_its_frozen_one() {
    let (_dir, socket, state, daemon) = started_daemon();
    let channel = connect(&socket).await;
    let mut vms = v1::vms_client::VmsClient::new(channel.clone());
    let mut agent = v1::agent_client::AgentClient::new(channel.clone());
    let mut templates = v1::templates_client::TemplatesClient::new(channel.clone());
    let mut snapshots = v1::snapshots_client::SnapshotsClient::new(channel.clone());
    let disk = v1::Disk { path: "data.layer".into(), size_bytes: 16 << 20, ..Default::default() };
    let config = v1::VmConfig { disks: vec![disk], ..Default::default() };
    vms.create(v1::CreateVmRequest { name: "base".into(), config: Some(config), ..Default::default() }).await.unwrap();
    assert!(
        exec_once_up(&mut agent, "base", &["disks"]).await.contains("store"),
        "the Desk keeps its files on the disk"
    );
    exec_once_up(&mut agent, "base", &["write", "/kept", "before the template"]).await;
    let request = v1::CreateTemplateRequest { name: "desk-disk".into(), from_vm: "base".into() };
    templates.create(request).await.unwrap();
    // What the template's VM writes later is its own.
    exec_once_up(&mut agent, "base", &["write", "/after", "base only"]).await;

    let with_disk = v1::VmConfig {
        disks: vec![v1::Disk { path: "mine.layer".into(), size_bytes: 16 << 20, ..Default::default() }],
        ..Default::default()
    };
    let refused = vms
        .create(v1::CreateVmRequest { name: "own".into(), config: Some(with_disk), template: "desk-disk".into() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "the template's disks, not others: {refused:?}");
    let names = ["copy-a", "copy-b"];
    for name in names {
        let request = v1::CreateVmRequest { name: name.into(), template: "desk-disk".into(), ..Default::default() };
        vms.create(request).await.unwrap();
    }
    for name in names {
        assert_eq!(exec_once_up(&mut agent, name, &["cat", "/kept"]).await, "before the template");
        let after =
            v1::ExecRequest { name: name.into(), argv: vec!["cat".into(), "/after".into()], ..Default::default() };
        let after = agent.exec(after).await.unwrap().into_inner();
        assert_ne!(after.exit_code, 0, "{name} sees a file written after the template: {after:?}");
        exec_once_up(&mut agent, name, &["write", "/mine", name]).await;
        let top = state.join("vms").join(name).join("disks/disk-0.layer");
        assert!(top.is_file(), "{name}'s own top layer: {}", top.display());
    }
    for name in names {
        assert_eq!(exec_once_up(&mut agent, name, &["cat", "/mine"]).await, name, "each writes its own layer");
    }
    // Asleep and awake again (its own snapshot now, over the template's layer), it keeps
    // its file.
    snapshots.hibernate(v1::SnapshotRequest { name: "copy-a".into(), diff: true }).await.unwrap();
    assert_eq!(exec_once_up(&mut agent, "copy-a", &["cat", "/mine"]).await, "copy-a");
    assert_eq!(exec_once_up(&mut agent, "base", &["cat", "/after"]).await, "base only");
    // The template's VMs read layers in the first VM's directory: it goes after them.
    let in_use = vms.delete(v1::VmName { name: "base".into() }).await.unwrap_err();
    assert_eq!(in_use.code(), tonic::Code::FailedPrecondition, "{in_use:?}");
    for name in names {
        vms.delete(v1::VmName { name: name.into() }).await.unwrap();
    }
    templates.delete(v1::TemplateName { name: "desk-disk".into() }).await.unwrap();
    vms.delete(v1::VmName { name: "base".into() }).await.unwrap();
    drop((vms, agent, templates, snapshots, channel));
    daemon.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_with_a_disk_of_its_own_hibernates_and_wakes_with_its_files() {
    let (_dir, socket, state, daemon) = started_daemon();
    let channel = connect(&socket).await;
    let mut vms = v1::vms_client::VmsClient::new(channel.clone());
    let mut agent = v1::agent_client::AgentClient::new(channel.clone());
    let mut snapshots = v1::snapshots_client::SnapshotsClient::new(channel.clone());
    let create = |path: &str| v1::CreateVmRequest {
        name: "keeper".into(),
        config: Some(v1::VmConfig {
            disks: vec![v1::Disk { path: path.into(), size_bytes: 16 << 20, ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    };
    for outside in ["../data.layer", "disks/data.layer", ".data.layer"] {
        let refused = vms.create(create(outside)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{outside}: {refused:?}");
    }
    vms.create(create("data.layer")).await.unwrap();
    let disk = state.join("vms/keeper/disks/data.layer");
    assert!(disk.is_file(), "the VM's own disk is in its directory: {}", disk.display());
    assert!(exec_once_up(&mut agent, "keeper", &["disks"]).await.contains("store"));
    exec_once_up(&mut agent, "keeper", &["write", "/kept", "on its own disk"]).await;
    // Its jailed VMM freezes the disk beside it for the snapshot, then ends.
    snapshots.hibernate(v1::SnapshotRequest { name: "keeper".into(), diff: false }).await.unwrap();
    let asleep = vms.get(v1::GetVmRequest { name: "keeper".into() }).await.unwrap().into_inner();
    assert_eq!(asleep.state, v1::VmState::Hibernated as i32, "{asleep:?}");
    assert_eq!(exec_once_up(&mut agent, "keeper", &["cat", "/kept"]).await, "on its own disk", "woken by the call");
    vms.delete(v1::VmName { name: "keeper".into() }).await.unwrap();
    assert!(!disk.exists(), "deleted with the VM");
    drop((vms, agent, snapshots, channel));
    daemon.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_limits_go_on_the_block_device_under_the_vms_disk() {
    use std::os::unix::fs::MetadataExt;
    let (_dir, socket, _state, daemon) = started_daemon();
    let mut vms = v1::vms_client::VmsClient::new(connect(&socket).await);
    let disk = v1::Disk {
        path: _dir.path().join("agent.layer").display().to_string(),
        size_bytes: 16 << 20,
        ..Default::default()
    };
    let too_low = v1::VmConfig { disks: vec![disk.clone()], disk_bytes_per_second: 4096, ..Default::default() };
    let refused = vms
        .create(v1::CreateVmRequest { name: "slow".into(), config: Some(too_low), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let config =
        v1::VmConfig { disks: vec![disk], disk_bytes_per_second: 8 << 20, disk_iops: 500, ..Default::default() };
    vms.create(v1::CreateVmRequest { name: "slow".into(), config: Some(config), ..Default::default() }).await.unwrap();
    // The whole disk the scratch directory lives on, if it is a block device at all.
    let device = std::fs::metadata(_dir.path()).unwrap().dev();
    let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", libc::major(device), libc::minor(device)));
    let whole = if sys.join("partition").exists() { sys.join("../dev") } else { sys.join("dev") };
    let parents = cgroup_parents(&daemon.cgroup);
    let io_parent = parents.iter().find(|parent| parent.starts_with("/sys/fs/cgroup/blkio"));
    match (std::fs::read_to_string(whole), io_parent) {
        (Ok(device), Some(parent)) => {
            let device = device.trim();
            let read = |file: &str| std::fs::read_to_string(parent.join("slow").join(file)).unwrap();
            assert_eq!(read("blkio.throttle.read_bps_device").trim(), format!("{device} 8388608"));
            assert_eq!(read("blkio.throttle.write_bps_device").trim(), format!("{device} 8388608"));
            assert_eq!(read("blkio.throttle.write_iops_device").trim(), format!("{device} 500"));
        }
        // cgroup v2 (io.max) or a scratch directory on tmpfs: nothing here to look at.
        (device, parent) => eprintln!("disk limits not checked here: device {device:?}, blkio group {parent:?}"),
    }
    // The VM runs with its limited disk.
    let mut agent = v1::agent_client::AgentClient::new(connect(&socket).await);
    let exec = v1::ExecRequest { name: "slow".into(), argv: vec!["disks".into()], ..Default::default() };
    let answer = loop {
        match agent.exec(exec.clone()).await {
            Ok(answer) => break answer.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(status) => panic!("{status:?}"),
        }
    };
    assert!(String::from_utf8_lossy(&answer.stdout).starts_with("disk 0 16777216 "), "{answer:?}");
    vms.delete(v1::VmName { name: "slow".into() }).await.unwrap();
    drop(vms);
    daemon.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_its_seccomp_filter_ends_is_recorded_with_the_syscall() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, state) = (dir.path().join("carrel.sock"), dir.path().join("state"));
    // A VMM that makes a forbidden call (ptrace) once it runs jailed and filtered: the
    // suite's test-probes build of carrel-vmm, with one probe added to carreld's flags.
    let wrapper = dir.path().join("carrel-vmm-ptrace");
    std::fs::write(&wrapper, format!("#!/bin/sh\nexec {} \"$@\" --jail-probe ptrace\n", vmm_binary().display()))
        .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let daemon = Daemon::start(&socket, &state, &wrapper);
    let mut vms = v1::vms_client::VmsClient::new(connect(&socket).await);
    let config = v1::VmConfig { restart: v1::RestartPolicy::Never as i32, ..Default::default() };
    let _ = vms.create(v1::CreateVmRequest { name: "bad".into(), config: Some(config), ..Default::default() }).await;
    let crashed = wait_state(&mut vms, "bad", v1::VmState::Crashed).await;
    assert!(
        crashed.exit_reason.contains(&format!("seccomp violation: syscall {} (event loop thread)", libc::SYS_ptrace)),
        "{crashed:?}"
    );
    assert!(crashed.exit_reason.contains("exit code 159"), "{crashed:?}");
    vms.delete(v1::VmName { name: "bad".into() }).await.unwrap();
    drop(vms);
    daemon.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_restarts_a_vm_whose_agent_goes_silent() {
    let (_dir, socket, state, daemon) = started_daemon();
    let mut vms = v1::vms_client::VmsClient::new(connect(&socket).await);
    let config = v1::VmConfig { watchdog_seconds: 2, ..Default::default() };
    let vm = vms
        .create(v1::CreateVmRequest { name: "hang".into(), config: Some(config), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    // Heartbeats flow for a while: no restart.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = vms.get(v1::GetVmRequest { name: "hang".into() }).await.unwrap().into_inner();
    assert_eq!((still.pid, still.restarts), (vm.pid, 0), "a live agent is left alone: {still:?}");
    // Pausing the vCPUs silences the guest's agent while the VMM runs on: a hang.
    let control = state.join("vms/hang/control.sock");
    let paused = tokio::task::spawn_blocking(move || {
        carrel_vmm::control::ControlClient::connect(&control)
            .unwrap()
            .call(&carrel_vmm::control::Request::Pause, Duration::from_secs(5))
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(paused, carrel_vmm::control::Response::Paused);
    let hung_at = Instant::now();
    let restarted = loop {
        let now = vms.get(v1::GetVmRequest { name: "hang".into() }).await.unwrap().into_inner();
        if now.state == v1::VmState::Running as i32 && now.pid != vm.pid {
            break now;
        }
        assert!(hung_at.elapsed() < Duration::from_secs(15), "the hung VM was not restarted: {now:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!("hang to running again: {:?} (watchdog 2 s)", hung_at.elapsed());
    assert!(restarted.exit_reason.contains("watchdog: no heartbeat"), "{restarted:?}");
    assert_eq!(restarted.restarts, 1);
    vms.delete(v1::VmName { name: "hang".into() }).await.unwrap();
    drop(vms);
    daemon.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_over_its_memory_limit_is_oom_killed_and_restarted_while_the_rest_runs_on() {
    let (_dir, socket, _state, daemon) = started_daemon();
    let channel = connect(&socket).await;
    let mut vms = v1::vms_client::VmsClient::new(channel.clone());
    let mut agent = v1::agent_client::AgentClient::new(channel.clone());

    let config = |memory_limit_mib| v1::VmConfig { memory_mib: 256, memory_limit_mib, ..Default::default() };
    let too_small =
        vms.create(v1::CreateVmRequest { name: "tiny".into(), config: Some(config(32)), ..Default::default() }).await;
    assert_eq!(too_small.unwrap_err().code(), tonic::Code::InvalidArgument, "a limit below the minimum is refused");
    let hog = vms
        .create(v1::CreateVmRequest { name: "hog".into(), config: Some(config(160)), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hog.config.as_ref().unwrap().memory_limit_mib, 160);
    assert_eq!(hog.usage.as_ref().unwrap().memory_limit_bytes, 160 << 20);
    let calm = vms
        .create(v1::CreateVmRequest { name: "calm".into(), config: None, ..Default::default() })
        .await
        .unwrap()
        .into_inner();

    // The guest touches 200 MiB of its 256 MiB: more than its VMM may hold.
    let fill = v1::ExecRequest { name: "hog".into(), argv: vec!["fill".into(), "200".into()], ..Default::default() };
    let filled = agent.exec(fill).await;
    assert!(filled.is_err(), "the VMM died under the exec: {filled:?}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let restarted = loop {
        let vm = vms.get(v1::GetVmRequest { name: "hog".into() }).await.unwrap().into_inner();
        if vm.state == v1::VmState::Running as i32 && vm.pid != hog.pid {
            break vm;
        }
        assert!(Instant::now() < deadline, "the OOM-killed VM did not come back: {vm:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        restarted.exit_reason.starts_with("killed by the OOM killer: over its memory limit of 160 MiB (signal 9)"),
        "{restarted:?}"
    );
    assert_eq!(restarted.restarts, 1);
    let usage = restarted.usage.expect("the new run has a fresh group");
    assert_eq!((usage.oom_kills, usage.memory_limit_bytes), (0, 160 << 20), "{usage:?}");

    // The new run works within its limit; the other VM and the daemon never noticed.
    let fill = v1::ExecRequest { name: "hog".into(), argv: vec!["fill".into(), "64".into()], ..Default::default() };
    assert_eq!(agent.exec(fill).await.unwrap().into_inner().stdout, b"filled 64 MiB seed 1\n");
    let peak = vms.get(v1::GetVmRequest { name: "hog".into() }).await.unwrap().into_inner().usage.unwrap();
    assert!(peak.memory_peak_bytes > 64 << 20 && peak.memory_peak_bytes <= 160 << 20, "{peak:?}");
    let exec = v1::ExecRequest { name: "calm".into(), argv: vec!["echo".into(), "fine".into()], ..Default::default() };
    assert_eq!(agent.exec(exec).await.unwrap().into_inner().stdout, b"fine\n");
    let calm_now = vms.get(v1::GetVmRequest { name: "calm".into() }).await.unwrap().into_inner();
    assert_eq!((calm_now.pid, calm_now.restarts, calm_now.exit_reason.as_str()), (calm.pid, 0, ""));
    let mut host = v1::host_client::HostClient::new(channel.clone());
    assert_eq!(host.info(v1::HostInfoRequest {}).await.unwrap().into_inner().vms, 2);

    for name in ["hog", "calm"] {
        vms.delete(v1::VmName { name: name.into() }).await.unwrap();
    }
    assert_eq!(cgroup_vm_dirs(&daemon.cgroup), Vec::<PathBuf>::new(), "no VM's cgroup is left");
    drop((vms, agent, host, channel));
    daemon.terminate();
}

/// A 1280x800 PNG screenshot's pixels in `rect` (x, y, width, height), RGB.
fn crop(png_bytes: &[u8], [x, y, width, height]: [u32; 4]) -> Vec<u8> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    let (stride, samples) = (info.width as usize, info.color_type.samples());
    (y..y + height)
        .flat_map(|row| (x..x + width).map(move |column| (row as usize * stride + column as usize) * samples))
        .flat_map(|offset| pixels[offset..offset + 3].to_vec())
        .collect()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            files.extend(files_under(&entry.path()));
        } else if kind.is_file() {
            files.push(entry.path());
        }
    }
    files
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_secret_reaches_the_screen_and_its_value_is_nowhere_else() {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    /// The Desk window's text field on the 1280x800 screen (desktop.rs `Layout`).
    const TEXT_FIELD: [u32; 4] = [284, 210, 712, 36];
    const VALUE: &str = "Xk9-Pq2-Zw7!";
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (socket, state, log) =
        (dir.path().join("carrel.sock"), dir.path().join("state"), dir.path().join("carreld.log"));
    let daemon = Daemon::start_logged(&socket, &state, &vmm_binary(), Some(&log));
    let cli = cli_binary();
    // Every answer the test receives, through the CLI or the API, to search at the end.
    let answers: std::cell::RefCell<Vec<Vec<u8>>> = Default::default();
    let carrel = |user: Option<u32>, args: &[&str], stdin: &[u8]| {
        let mut command = match user {
            Some(uid) => {
                let mut command = Command::new("setpriv");
                command.args(["--reuid", &uid.to_string(), "--regid", &uid.to_string(), "--clear-groups"]).arg(&cli);
                command
            }
            None => Command::new(&cli),
        };
        let mut child = command
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let output = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        answers.borrow_mut().push(text.clone().into_bytes());
        (output.status.code(), text)
    };

    // The owner keeps the secret (from stdin) and sees its name and length only.
    let (code, text) = carrel(None, &["secret", "set", "login-pw"], format!("{VALUE}\n").as_bytes());
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = carrel(None, &["--json", "secret", "ls"], b"");
    assert_eq!((code, text.trim()), (Some(0), r#"[{"length":12,"name":"login-pw"}]"#));
    let file = state.join("secrets/0/login-pw");
    assert_eq!(std::fs::read(&file).unwrap(), VALUE.as_bytes());
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&file), mode(file.parent().unwrap())), (0o600, 0o700));
    let (code, text) = carrel(None, &["secret", "set", "Bad/Name"], b"x");
    assert_eq!(code, Some(13), "an invalid name is INVALID_ARGUMENT: {text}");

    // Two VMs: the secret typed into one, the same characters as plain text into the other.
    let channel = connect(&socket).await;
    let mut vms = v1::vms_client::VmsClient::new(channel.clone());
    let mut screen = v1::screen_client::ScreenClient::new(channel.clone());
    let mut input = v1::input_client::InputClient::new(channel.clone());
    let mut fields = Vec::new();
    for (name, action) in [
        ("with-secret", v1::act_request::Action::TypeSecret("login-pw".into())),
        ("with-text", v1::act_request::Action::TypeText(VALUE.into())),
    ] {
        let vm = vms
            .create(v1::CreateVmRequest { name: name.into(), config: None, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        answers.borrow_mut().push(format!("{vm:?}").into_bytes());
        let act =
            |action| v1::ActRequest { name: name.into(), action: Some(action), screenshot: true, timeout_ms: 5_000 };
        let still =
            v1::ScreenshotRequest { name: name.into(), still_ms: 200, timeout_ms: 10_000, ..Default::default() };
        let clicked =
            act_once_booted(&mut input, act(v1::act_request::Action::Click(v1::Click { x: 640, y: 228 }))).await;
        answers.borrow_mut().push(format!("{clicked:?}").into_bytes());
        let before = screen.screenshot(still.clone()).await.unwrap().into_inner();
        let typed = input.act(act(action)).await.unwrap().into_inner();
        assert!(!typed.timed_out, "typing drew a frame: {typed:?}");
        answers.borrow_mut().push(format!("{typed:?}").into_bytes());
        let after = screen.screenshot(still).await.unwrap().into_inner();
        answers.borrow_mut().push(after.image.clone());
        assert_ne!(crop(&before.image, TEXT_FIELD), crop(&after.image, TEXT_FIELD), "{name}: the text field changed");
        fields.push(crop(&after.image, TEXT_FIELD));
    }
    assert!(fields[0] == fields[1], "the secret's value is what was typed: the text fields show the same");

    // The secret as an environment variable of a guest command.
    let (code, text) =
        carrel(None, &["exec", "with-secret", "--secret-env", "TOKEN=login-pw", "--", "echo", "ran"], b"");
    assert_eq!((code, text.as_str()), (Some(0), "ran\n"));
    let (code, text) = carrel(None, &["type", "with-secret", "--secret", "no-such-secret"], b"");
    assert_eq!(code, Some(15), "NOT_FOUND: {text}");

    // Another user: their list is empty, and the owner's secret is not found for them,
    // to type or as an environment variable, in a VM of their own.
    let nobody = Some(65534);
    let (code, text) = carrel(nobody, &["--json", "secret", "ls"], b"");
    assert_eq!((code, text.trim()), (Some(0), "[]"), "{text}");
    let (code, text) = carrel(nobody, &["create", "nobodys"], b"");
    assert_eq!(code, Some(0), "{text}");
    for args in [
        &["type", "nobodys", "--secret", "login-pw"][..],
        &["exec", "nobodys", "--secret-env", "T=login-pw", "--", "echo"],
        &["secret", "rm", "login-pw"],
    ] {
        let (code, text) = carrel(nobody, args, b"");
        assert_eq!(code, Some(15), "{args:?} as another user is NOT_FOUND: {text}");
    }
    let (code, text) = carrel(nobody, &["type", "with-secret", "--secret", "login-pw"], b"");
    assert_eq!(code, Some(17), "nor can they type into the owner's VM: {text}");
    // Their own secret of the same name is theirs alone.
    let (code, text) = carrel(nobody, &["secret", "set", "login-pw"], b"other");
    assert_eq!(code, Some(0), "{text}");
    let (_, text) = carrel(None, &["--json", "secret", "ls"], b"");
    assert_eq!(text.trim(), r#"[{"length":12,"name":"login-pw"}]"#, "the owner's secret is unchanged");

    // The audit log names the secret typed and its length, never its value.
    let audit = workspace_binary("carrel-audit", "carrel-audit");
    let export = Command::new(&audit)
        .args(["export", state.join("vms/with-secret/audit").to_str().unwrap(), "--jsonl"])
        .output()
        .unwrap();
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let records = String::from_utf8_lossy(&export.stdout).into_owned();
    assert!(records.contains("input.type") && records.contains("agent.exec"), "{records}");
    assert!(records.contains(r#""value":"secret login-pw""#), "the typing names its secret: {records}");
    answers.borrow_mut().push(export.stdout);

    // The value is nowhere: not in a file under the state dir but its own, the daemon's
    // log, nor any answer.
    let mut searched = 0;
    for path in files_under(&state).into_iter().chain([log.clone()]) {
        if path.starts_with(state.join("secrets")) {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        assert!(!contains(&bytes, VALUE.as_bytes()), "the secret's value is in {}", path.display());
        searched += 1;
    }
    for must in ["vms/with-secret/console.log", "vms/with-secret/vmm.log", "vms/with-secret/vm.json"] {
        assert!(state.join(must).exists(), "{must} was searched");
    }
    assert!(searched > 10, "{searched} files searched");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("types secret \"login-pw\" (12 bytes)"), "the daemon names what it typed: {logged}");
    for answer in answers.borrow().iter() {
        assert!(!contains(answer, VALUE.as_bytes()), "an answer holds the value: {}", String::from_utf8_lossy(answer));
    }

    let (code, _) = carrel(nobody, &["rm", "nobodys"], b"");
    assert_eq!(code, Some(0));
    for name in ["with-secret", "with-text"] {
        vms.delete(v1::VmName { name: name.into() }).await.unwrap();
    }
    let (code, _) = carrel(None, &["secret", "rm", "login-pw"], b"");
    assert_eq!(code, Some(0));
    let (_, text) = carrel(None, &["--json", "secret", "ls"], b"");
    assert_eq!(text.trim(), "[]");
    drop((vms, screen, input, channel));
    daemon.terminate();
}

/// `Snapshots.Save` streams how far the VMM is with the memory while it writes a snapshot
/// of a VM whose RAM is mostly data, then the snapshot's info; a hibernation does too,
/// and the unary Snapshot still answers. `carrel snapshot` on a terminal shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_snapshot_streams_its_memory_progress_then_its_info() {
    let (dir, socket, _state, daemon) = started_daemon();
    let channel = connect(&socket).await;
    let mut vms = v1::vms_client::VmsClient::new(channel.clone());
    let mut agent = v1::agent_client::AgentClient::new(channel.clone());
    let mut snapshots = v1::snapshots_client::SnapshotsClient::new(channel.clone());
    let config = v1::VmConfig { memory_mib: 512, ..Default::default() };
    vms.create(v1::CreateVmRequest { name: "big".into(), config: Some(config), ..Default::default() }).await.unwrap();
    assert_eq!(exec_once_up(&mut agent, "big", &["fill", "384"]).await, "filled 384 MiB seed 1\n");

    let save = |hibernate| v1::SaveRequest { name: "big".into(), diff: false, hibernate };
    for hibernate in [false, true] {
        let started = Instant::now();
        let mut events = snapshots.save(save(hibernate)).await.unwrap().into_inner();
        let mut progress = Vec::new();
        let info = loop {
            match events.message().await.unwrap().expect("the stream ends with the snapshot").event {
                Some(v1::save_event::Event::Progress(now)) => progress.push(now),
                Some(v1::save_event::Event::Done(info)) => break info,
                None => panic!("an empty event"),
            }
        };
        assert!(events.message().await.unwrap().is_none(), "nothing after the snapshot");
        let took = started.elapsed();
        assert!(info.memory_bytes >= 384 << 20, "{info:?}");
        assert!(!progress.is_empty(), "a save of {took:?} told no progress");
        let total = progress[0].total_bytes;
        assert!(total >= 384 << 20 && total <= 512 << 20, "the memory's data, not its holes: {progress:?}");
        assert!(
            progress.iter().all(|now| now.total_bytes == total && now.done_bytes <= total)
                && progress
                    .windows(2)
                    .all(|pair| pair[0].done_bytes <= pair[1].done_bytes && pair[0].elapsed_us < pair[1].elapsed_us),
            "{progress:?}"
        );
        eprintln!(
            "save (hibernate: {hibernate}) of {} MiB in {took:?}: {} progress messages",
            total >> 20,
            progress.len()
        );
        if !hibernate {
            // The unary call of older clients still answers.
            let request = v1::SnapshotRequest { name: "big".into(), diff: true };
            let diff = snapshots.snapshot(request).await.unwrap().into_inner();
            assert!(diff.diff && diff.id == "s2", "{diff:?}");
        }
    }
    wait_state(&mut vms, "big", v1::VmState::Hibernated).await;

    // The CLI on a terminal (a pseudo-terminal from script(1)): woken by the exec, then saved.
    assert_eq!(exec_once_up(&mut agent, "big", &["fill", "384"]).await, "filled 384 MiB seed 1\n");
    let command = format!("{} --socket {} snapshot big", cli_binary().display(), socket.display());
    let typescript = dir.path().join("typescript");
    let output = Command::new("script").args(["-qec", &command]).arg(&typescript).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!("carrel snapshot on a terminal: {text:?}");
    assert!(output.status.success() && text.contains("s4: ") && text.contains("KiB of memory"), "{text}");
    assert!(text.contains("carrel: saving... ") && text.contains(" MiB/s, "), "the memory's progress shows: {text}");

    vms.delete(v1::VmName { name: "big".into() }).await.unwrap();
    drop((vms, agent, snapshots, channel));
    daemon.terminate();
}

/// The `carrel-vmm standby` processes `daemon` has started that have said they are
/// ready (a VM's process keeps the command line it stood by with). A standby points its
/// stdout at /dev/null right after its `ready` line; one that has not yet is not in the
/// daemon's pool, and a VM created then starts in a process of its own.
fn standbys(daemon: &Daemon) -> Vec<u32> {
    let pid = daemon.child.id();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    // The daemon's other threads fork too (the standby starts on a blocking thread).
    let mut all: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .flat_map(|task| {
            std::fs::read_to_string(task.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .chain(children.split_whitespace().map(str::to_owned))
        .filter_map(|child| child.parse().ok())
        .collect();
    all.sort_unstable();
    all.dedup();
    all.retain(|child| {
        let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
        let stdout = std::fs::read_link(format!("/proc/{child}/fd/1")).unwrap_or_default();
        cmdline.split(|&byte| byte == 0).nth(1) == Some(b"standby".as_slice()) && stdout == Path::new("/dev/null")
    });
    all
}

/// The one ready standby of `daemon` other than the process `taken` (a VM now), within
/// 10 s. The daemon puts a standby in its pool once it has read its `ready` line, a
/// moment after the standby wrote it: the wait leaves it that moment (100 ms).
async fn ready_standby(daemon: &Daemon, taken: Option<u32>) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match standbys(daemon).into_iter().filter(|&pid| Some(pid) != taken).collect::<Vec<_>>()[..] {
            [one] => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                return one;
            }
            _ => {
                assert!(Instant::now() < deadline, "carreld keeps a standby VMM ready");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_starts_in_the_standby_vmm_and_its_group_and_a_new_standby_follows() {
    let (_dir, socket, _state, daemon) = started_daemon();
    let channel = connect(&socket).await;
    let mut vms = v1::vms_client::VmsClient::new(channel.clone());
    let standby = ready_standby(&daemon, None).await;
    let vm = vms.create(v1::CreateVmRequest { name: "first".into(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(vm.pid, standby, "the VM runs in the process that stood by");
    let groups = std::fs::read_to_string(format!("/proc/{}/cgroup", vm.pid)).unwrap();
    assert!(groups.contains(&format!("/{}/first\n", daemon.cgroup)), "in the VM's own group: {groups}");
    assert!(!groups.contains(".standby"), "{groups}");
    let usage = vm.usage.expect("its group reports its use");
    assert_eq!(usage.memory_limit_bytes, 160 << 20, "with the VM's limits: {usage:?}");
    // The next standby follows, and the next VM takes it.
    let next = ready_standby(&daemon, Some(vm.pid)).await;
    let second =
        vms.create(v1::CreateVmRequest { name: "second".into(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(second.pid, next);
    for name in ["first", "second"] {
        vms.delete(v1::VmName { name: name.into() }).await.unwrap();
    }
    drop((vms, channel));
    daemon.terminate();
}

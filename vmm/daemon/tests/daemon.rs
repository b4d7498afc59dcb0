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
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "--quiet", "-p", package, "--bin", binary])
        .status()
        .unwrap();
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
}

impl Daemon {
    fn start(socket: &Path, state: &Path, vmm: &Path) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_carreld"))
            .args(["--socket", socket.to_str().unwrap(), "--state", state.to_str().unwrap()])
            .args(["--vmm", vmm.to_str().unwrap(), "--kernel", desk_kernel().to_str().unwrap()])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(Instant::now() < deadline, "carreld did not open its socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon { child, state: state.to_path_buf() }
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

async fn wait_state(vms: &mut v1::vms_client::VmsClient<Channel>, name: &str, state: v1::VmState) -> v1::Vm {
    let deadline = Instant::now() + Duration::from_secs(10);
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
        let vm = vms.create(v1::CreateVmRequest { name: name.into(), config }).await.unwrap().into_inner();
        assert_eq!(vm.state, v1::VmState::Running as i32, "{vm:?}");
        assert!(alive(vm.pid));
    }
    let duplicate = vms.create(v1::CreateVmRequest { name: "one".into(), config: None }).await.unwrap_err();
    assert_eq!(duplicate.code(), tonic::Code::AlreadyExists);
    let config = v1::VmConfig { memory_mib: 1 << 20, ..Default::default() };
    let invalid = vms.create(v1::CreateVmRequest { name: "big".into(), config: Some(config) }).await.unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument, "{invalid:?}");
    let bad_name = vms.create(v1::CreateVmRequest { name: "../x".into(), config: None }).await.unwrap_err();
    assert_eq!(bad_name.code(), tonic::Code::InvalidArgument);
    let missing = vms.get(v1::GetVmRequest { name: "nobody".into() }).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert_eq!(vms.list(v1::ListVmsRequest {}).await.unwrap().into_inner().vms.len(), 3);

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

    let stopped = vms.stop(v1::VmName { name: "one".into() }).await.unwrap().into_inner();
    assert_eq!(stopped.state, v1::VmState::Stopped as i32);
    assert!(!alive(one.pid));
    for name in ["one", "two", "never"] {
        vms.delete(v1::VmName { name: name.into() }).await.unwrap();
    }
    assert!(!alive(two.pid), "deleting a running VM stops its VMM");
    assert!(vms.list(v1::ListVmsRequest {}).await.unwrap().into_inner().vms.is_empty());
    assert_eq!(std::fs::read_dir(state.join("vms")).unwrap().count(), 0, "nothing left in the state dir");
    drop((vms, screen, channel));
    daemon.terminate();
    assert!(!socket.exists(), "the socket goes with the daemon");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generic_python_client_uses_reflection_to_list_and_screenshot() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, state) = (dir.path().join("carrel.sock"), dir.path().join("state"));
    let daemon = Daemon::start(&socket, &state, &vmm_binary());
    let mut vms = v1::vms_client::VmsClient::new(connect(&socket).await);
    vms.create(v1::CreateVmRequest { name: "seen".into(), config: None }).await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_restarts_a_vm_whose_agent_goes_silent() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, state) = (dir.path().join("carrel.sock"), dir.path().join("state"));
    let daemon = Daemon::start(&socket, &state, &vmm_binary());
    let mut vms = v1::vms_client::VmsClient::new(connect(&socket).await);
    let config = v1::VmConfig { watchdog_seconds: 2, ..Default::default() };
    let vm = vms.create(v1::CreateVmRequest { name: "hang".into(), config: Some(config) }).await.unwrap().into_inner();
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

//! The guest agent in the Desk kernel, over virtio-vsock, through the host client library.

mod common;

use std::time::Duration;

use carrel_agent_client::connect_vsock_uds;
use carrel_agent_client::{Client, ExecRequest, OutputStream};
use common::{scratch_path, RunningVm};

const BOOT_DEADLINE: Duration = Duration::from_secs(30);

fn boot_with_agent(socket: &std::path::Path) -> RunningVm {
    let mut vm = RunningVm::start_desk(&["--mem", "256", "--vsock", socket.to_str().unwrap(), "--no-display"]);
    vm.wait_for_line("desk: agent listening", BOOT_DEADLINE);
    vm
}

fn connect(socket: &std::path::Path) -> Client<std::os::unix::net::UnixStream> {
    let stream = connect_vsock_uds(socket, carrel_agent_proto::AGENT_VSOCK_PORT).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut client = Client::new(stream);
    client.wait_ready(Duration::from_secs(10)).unwrap();
    client
}

#[test]
fn desk_agent_execs_echo_and_round_trips_a_16_mib_file() {
    let socket = scratch_path("agent.sock");
    let _vm = boot_with_agent(&socket);
    let mut client = connect(&socket);
    let hello = client.hello().unwrap();
    assert_eq!(hello.os, "Carrel Desk");
    assert!(client.ping().unwrap() < Duration::from_secs(1));

    let mut stdout = Vec::new();
    let status = client
        .exec(ExecRequest::new(["echo", "hello", "from", "desk"]), |stream, bytes| {
            assert_eq!(stream, OutputStream::Stdout);
            stdout.extend_from_slice(bytes);
        })
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(stdout, b"hello from desk\n");

    // 16 MiB of varied bytes: put, get back, compare digests.
    let local = scratch_path("put.bin");
    let data: Vec<u8> = (0..16u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&local, &data).unwrap();
    let sent = client.put_file(&local, "/data/input.bin", |_, _| {}).unwrap();
    assert_eq!(sent, data.len() as u64);
    let back = scratch_path("get.bin");
    let received = client.get_file("/data/input.bin", &back, |_, _| {}).unwrap();
    assert_eq!(received, data.len() as u64);
    assert_eq!(blake3::hash(&std::fs::read(&back).unwrap()), blake3::hash(&data));

    let entries = client.list_dir("/data").unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!((entries[0].name.as_str(), entries[0].size), ("input.bin", data.len() as u64));
    client.remove("/data/input.bin", false).unwrap();
    assert!(client.list_dir("/").unwrap().is_empty());
    assert!(client.stat("/data/input.bin").is_err());
    std::fs::remove_file(&local).unwrap();
    std::fs::remove_file(&back).unwrap();
}

#[test]
fn desk_agent_reports_unknown_commands_and_kills_a_sleep() {
    let socket = scratch_path("agent-kill.sock");
    let _vm = boot_with_agent(&socket);
    let mut client = connect(&socket);
    let mut stderr = Vec::new();
    let status = client.exec(ExecRequest::new(["frobnicate"]), |_, bytes| stderr.extend_from_slice(bytes)).unwrap();
    assert_eq!(status.code, Some(127));
    assert!(String::from_utf8_lossy(&stderr).contains("command not found"));

    let id = client.start_exec(ExecRequest::new(["sleep", "30"])).unwrap();
    client.send_kill(id).unwrap();
    let mut killed = false;
    for _ in 0..10 {
        let (reply_id, message) = client.next_message().unwrap();
        if reply_id == id {
            if let carrel_agent_proto::message::Message::ExecExit(exit) = message {
                assert_eq!(exit.signal, Some(9));
                killed = true;
                break;
            }
        }
    }
    assert!(killed, "the sleep ends killed, long before 30 s");
}

#[test]
fn desk_agent_refuses_paths_with_dot_dot_and_survives_a_garbage_frame() {
    let socket = scratch_path("agent-bad.sock");
    let _vm = boot_with_agent(&socket);
    let mut client = connect(&socket);
    let error = client.stat("/a/../../etc").unwrap_err();
    assert!(error.to_string().contains(".."), "{error}");

    // A frame that announces an absurd length: the agent answers and stays up.
    let mut raw = connect_vsock_uds(&socket, carrel_agent_proto::AGENT_VSOCK_PORT).unwrap();
    use std::io::Write;
    raw.write_all(&u32::MAX.to_le_bytes()).unwrap();
    raw.write_all(&[0u8; 64]).unwrap();
    drop(raw);
    let mut again = connect(&socket);
    assert!(again.ping().is_ok());
}

#[test]
fn agent_cli_on_control_socket_returns_exit_codes_and_is_audited() {
    use std::process::Command;
    let (control, vsock, audit) = (scratch_path("cli.sock"), scratch_path("cli-vsock.sock"), scratch_path("cli-audit"));
    let mut vm = RunningVm::start_desk(&[
        "--socket",
        control.to_str().unwrap(),
        "--vsock",
        vsock.to_str().unwrap(),
        "--audit",
        audit.to_str().unwrap(),
        "--no-display",
    ]);
    vm.wait_for_line("desk: agent listening", BOOT_DEADLINE);
    let agent = |args: &[&str]| {
        let mut command = Command::new(common::vmm_binary());
        command.args(["agent", "--socket", control.to_str().unwrap()]).args(args);
        command.output().unwrap()
    };
    let echo = agent(&["exec", "--", "echo", "audited"]);
    assert_eq!(echo.status.code(), Some(0));
    assert_eq!(echo.stdout, b"audited\n");
    assert_eq!(agent(&["exec", "--", "no-such-command"]).status.code(), Some(127));
    let local = scratch_path("cli.bin");
    std::fs::write(&local, b"some bytes").unwrap();
    assert!(agent(&["put", local.to_str().unwrap(), "/f"]).status.success());
    let listing = agent(&["ls", "/"]);
    assert!(String::from_utf8_lossy(&listing.stdout).contains("f"), "{listing:?}");
    let missing = agent(&["get", "/absent", local.to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such file"));
    assert_eq!(std::fs::read(&local).unwrap(), b"some bytes", "a failed get leaves the local file alone");
    let back = scratch_path("cli-back.bin");
    assert!(agent(&["get", "/f", back.to_str().unwrap()]).status.success());
    assert_eq!(std::fs::read(&back).unwrap(), b"some bytes");
    std::fs::remove_file(&back).unwrap();
    assert!(Command::new(common::vmm_binary())
        .args(["stop", "--socket", control.to_str().unwrap()])
        .status()
        .unwrap()
        .success());
    assert_eq!(vm.wait_for_exit(BOOT_DEADLINE).code(), Some(0));

    let mut actions = Vec::new();
    carrel_audit::reader::for_each_event(&carrel_audit::layout::Layout::new(&audit).log(), 0, |event, _| {
        actions.push((event.action.clone(), matches!(event.outcome, carrel_audit::Outcome::Ok)));
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    let names: Vec<&str> = actions.iter().map(|(action, _)| action.as_str()).collect();
    assert_eq!(
        names,
        [
            "vm.start",
            "agent.exec",
            "agent.exec",
            "agent.put",
            "agent.list",
            "agent.get",
            "agent.get",
            "stop",
            "vm.exit"
        ]
    );
    assert!(!actions[5].1, "the failed get is recorded as an error");
    let report = carrel_audit::verify_dir(&audit, &carrel_audit::VerifyOptions::default()).unwrap();
    assert!(report.findings.is_empty());
    std::fs::remove_file(&local).unwrap();
    std::fs::remove_dir_all(&audit).unwrap();
}

#[test]
fn files_stream_over_the_control_socket_and_a_broken_put_leaves_nothing() {
    use carrel_vmm::control::{AgentRequest, AgentResponse, ControlClient, Request, Response};
    let (control, vsock) = (scratch_path("stream.sock"), scratch_path("stream-vsock.sock"));
    let mut vm = RunningVm::start_desk(&[
        "--socket",
        control.to_str().unwrap(),
        "--vsock",
        vsock.to_str().unwrap(),
        "--no-display",
    ]);
    vm.wait_for_line("desk: agent listening", BOOT_DEADLINE);
    let timeout = Duration::from_secs(30);

    // 1.5 MiB: six data frames each way.
    let data: Vec<u8> = (0..3u32 << 19).map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8).collect();
    let digest = blake3::hash(&data).to_hex().to_string();
    let mut client = ControlClient::connect(&control).unwrap();
    let put = client.put(&mut &data[..], data.len() as u64, 0o600, "/streamed.bin", timeout).unwrap();
    assert_eq!(put, Response::Agent(AgentResponse::Done { bytes: data.len() as u64, digest: digest.clone() }));
    let mut back = Vec::new();
    let mut announced = None;
    let get = client
        .get(
            "/streamed.bin",
            |size, mode| {
                announced = Some((size, mode));
                Ok(&mut back as &mut dyn std::io::Write)
            },
            timeout,
        )
        .unwrap();
    assert_eq!(get, Response::Agent(AgentResponse::Done { bytes: data.len() as u64, digest }));
    assert_eq!(announced, Some((data.len() as u64, 0o600)));
    assert!(back == data, "the file came back the same");

    // The same connection goes on after a transfer; a data frame outside a put is refused.
    let stray = client.call(&Request::Agent(AgentRequest::Data(vec![1, 2, 3])), timeout).unwrap();
    assert!(
        matches!(&stray, Response::Error(failure) if failure.message.contains("outside a put")
        && failure.kind == carrel_vmm::control::ErrorKind::InvalidArgument),
        "{stray:?}"
    );
    // A guest file that is not there is NOT_FOUND, from the agent's own error code.
    let missing = client.call(&Request::Agent(AgentRequest::List { path: "/no/such/dir".into() }), timeout).unwrap();
    assert!(
        matches!(&missing, Response::Error(failure) if failure.kind == carrel_vmm::control::ErrorKind::NotFound),
        "{missing:?}"
    );

    // A put that announces 1000 bytes, sends 10 and hangs up: no file, and the VM serves on.
    {
        use std::io::Write;
        let mut raw = std::os::unix::net::UnixStream::connect(&control).unwrap();
        let put = Request::Agent(AgentRequest::Put { remote: "/broken.bin".into(), size: 1000, mode: 0o644 });
        carrel_vmm::control::write_frame(&mut raw, &put).unwrap();
        carrel_vmm::control::write_frame(&mut raw, &Request::Agent(AgentRequest::Data(vec![7; 10]))).unwrap();
        raw.flush().unwrap();
    }
    let mut client = ControlClient::connect(&control).unwrap();
    let listing = client.call(&Request::Agent(AgentRequest::List { path: "/".into() }), timeout).unwrap();
    let Response::Agent(AgentResponse::Entries(entries)) = listing else { panic!("{listing:?}") };
    let names: Vec<_> = entries.iter().map(|entry| entry.name.as_str()).collect();
    assert_eq!(names, ["streamed.bin"], "a put that never ended left no file");
    assert!(matches!(client.call(&Request::Status, timeout).unwrap(), Response::Status(_)));
}

//! The Linux guest agent binary on the host, driven over its Unix socket by
//! `carrel-agent-client`: exec streaming, exit codes, timeouts, kill, env and cwd, 100 MiB
//! put/get with digest checks, concurrent execs, confinement, and hostile input.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use carrel_agent_client::proto::io::write_raw_frame;
use carrel_agent_client::proto::{
    encode_header, kind, ErrorCode, FileKind, Hello, Message, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use carrel_agent_client::{connect_unix_ready, Client, ExecRequest, OutputStream};
use carrel_guest_agent::VsockStream;

const READY: Duration = Duration::from_secs(10);

/// An agent process serving a Unix socket in a temporary directory; killed on drop.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Agent {
    fn start(root: Option<&Path>) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let mut command = Command::new(env!("CARGO_BIN_EXE_carrel-guest-agent"));
        command.arg("--unix").arg(&socket).args(["--heartbeat-ms", "100"]).stdin(Stdio::null());
        if let Some(root) = root {
            command.arg("--root").arg(root);
        }
        let child = command.spawn().unwrap();
        Agent { child, dir, socket }
    }

    fn connect(&self) -> Client<UnixStream> {
        connect_unix_ready(&self.socket, READY).unwrap()
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run<S: Read + Write>(
    client: &mut Client<S>,
    request: ExecRequest,
) -> (Vec<u8>, Vec<u8>, carrel_agent_client::ExitStatus) {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = client
        .exec(request, |stream, bytes| match stream {
            OutputStream::Stdout => stdout.extend_from_slice(bytes),
            OutputStream::Stderr => stderr.extend_from_slice(bytes),
        })
        .unwrap();
    (stdout, stderr, status)
}

#[test]
fn hello_returns_agent_name_and_protocol_version() {
    let agent = Agent::start(None);
    let mut client = agent.connect();
    let hello = client.hello().unwrap();
    assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
    assert!(hello.name.starts_with("carrel-guest-agent"), "{}", hello.name);
    assert!(hello.os.starts_with("linux"), "{}", hello.os);
    assert!(client.ping().unwrap() > Duration::ZERO);
}

#[test]
fn hello_with_other_version_returns_version_mismatch() {
    let agent = Agent::start(None);
    let mut client = agent.connect();
    let hello = Hello { protocol_version: PROTOCOL_VERSION + 1, name: "future".into(), os: "host".into() };
    let id = client.send(&Message::Hello(hello)).unwrap();
    let (reply_id, reply) = client.next_message().unwrap();
    assert_eq!(reply_id, id);
    let Message::Error(error) = reply else { panic!("expected an error, got {reply:?}") };
    assert_eq!(error.code, ErrorCode::VERSION_MISMATCH);
    assert!(error.message.contains("v2") && error.message.contains("v1"), "{}", error.message);
    client.ping().unwrap();
}

#[test]
fn wait_ready_returns_first_heartbeat_and_more_follow() {
    let agent = Agent::start(None);
    let mut client = agent.connect();
    assert_eq!(client.wait_ready(READY).unwrap().seq, 0);
    // Heartbeats keep coming (every 100 ms here) while requests are served.
    while client.last_heartbeat().unwrap().seq < 2 {
        client.ping().unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exec_sh_streams_stdout_and_stderr_and_exit_code() {
    let agent = Agent::start(None);
    let mut client = agent.connect();
    let (stdout, stderr, status) = run(&mut client, ExecRequest::shell("echo out; echo err >&2; exit 3"));
    assert_eq!(stdout, b"out\n");
    assert_eq!(stderr, b"err\n");
    assert_eq!((status.code, status.signal, status.timed_out), (Some(3), None, false));
    let (_, _, status) = run(&mut client, ExecRequest::shell("true"));
    assert!(status.success());
}

#[test]
fn exec_with_large_output_delivers_every_byte_in_chunks() {
    let agent = Agent::start(None);
    let mut client = agent.connect();
    let mut total = 0usize;
    let mut chunks = 0usize;
    let status = client
        .exec(ExecRequest::shell("head -c 3000000 /dev/zero"), |_, bytes| {
            assert!(bytes.len() <= 64 * 1024);
            total += bytes.len();
            chunks += 1;
        })
        .unwrap();
    assert!(status.success());
    assert_eq!(total, 3_000_000);
    assert!(chunks >= 3_000_000 / (64 * 1024));
}

#[test]
fn exec_with_env_cwd_and_stdin_sees_all_three() {
    let agent = Agent::start(None);
    let mut client = agent.connect();
    let cwd = agent.dir.path().canonicalize().unwrap().display().to_string();
    let request = ExecRequest::shell("echo \"$GREETING\"; pwd; cat")
        .env("GREETING", "hello agent")
        .cwd(&cwd)
        .stdin(b"from stdin".to_vec());
    let (stdout, _, status) = run(&mut client, request);
    assert!(status.success());
    assert_eq!(String::from_utf8(stdout).unwrap(), format!("hello agent\n{cwd}\nfrom stdin"));

    let mut cleared = ExecRequest::new(["/usr/bin/env"]).env("ONLY", "1");
    cleared.clear_env = true;
    let (stdout, _, _) = run(&mut client, cleared);
    assert_eq!(stdout, b"ONLY=1\n");
}

#[test]
fn exec_with_timeout_kills_whole_process_group() {
    let agent = Agent::start(None);
    let mut client = agent.connect();
    // The background sleep keeps stdout open: only a group kill ends the exec.
    let request = ExecRequest::shell("sleep 30 & echo started; sleep 30").timeout(Duration::from_millis(300));
    let (stdout, _, status) = run(&mut client, request);
    assert_eq!(stdout, b"started\n");
    assert!(status.timed_out);
    assert_eq!(status.signal, Some(9));
    client.ping().unwrap();
}

#[test]
fn kill_running_exec_reports_sigkill() {
    let agent = Agent::start(None);
    let mut client = agent.connect();
    let exec_id = client.start_exec(ExecRequest::shell("echo ready; exec sleep 30")).unwrap();
    let mut kill_id = None;
    let mut kill_done = false;
    let exit = loop {
        let (id, message) = client.next_message().unwrap();
        match message {
            Message::Stdout(bytes) if id == exec_id => {
                assert_eq!(bytes, b"ready\n");
                kill_id = Some(client.send_kill(exec_id).unwrap());
            }
            Message::Done if Some(id) == kill_id => kill_done = true,
            Message::ExecExit(exit) if id == exec_id => break exit,
            other => panic!("unexpected {other:?} for {id}"),
        }
    };
    assert_eq!(exit.signal, Some(9));
    assert!(!exit.timed_out);
    if !kill_done {
        let (id, message) = client.next_message().unwrap();
        assert_eq!((Some(id), message), (kill_id, Message::Done));
    }
    let unknown = client.send_kill(exec_id).unwrap();
    let (id, message) = client.next_message().unwrap();
    assert_eq!(id, unknown);
    assert!(matches!(message, Message::Error(error) if error.code == ErrorCode::UNKNOWN_REQUEST));
}

#[test]
fn exec_of_missing_program_returns_not_found_and_connection_survives() {
    let agent = Agent::start(None);
    let mut client = agent.connect();
    let error = client.exec(ExecRequest::new(["carrel-no-such-program"]), |_, _| {}).unwrap_err();
    assert_eq!(error.agent_code(), Some(ErrorCode::NOT_FOUND), "{error}");
    client.ping().unwrap();
}

#[test]
fn two_concurrent_execs_on_one_connection_both_finish() {
    let agent = Agent::start(None);
    let mut client = agent.connect();
    let flag = agent.dir.path().join("flag");
    // The first waits for a file only the second creates: run one after the other, the
    // first would time out.
    let waiter = ExecRequest::shell(format!("while [ ! -e '{}' ]; do sleep 0.01; done; echo first", flag.display()))
        .timeout(Duration::from_secs(10));
    let maker = ExecRequest::shell(format!("sleep 0.05; touch '{}'; echo second", flag.display()));
    let mut outputs = [Vec::new(), Vec::new()];
    let statuses =
        client.exec_many(vec![waiter, maker], |index, _, bytes| outputs[index].extend_from_slice(bytes)).unwrap();
    assert!(statuses.iter().all(|status| status.success() && !status.timed_out), "{statuses:?}");
    assert_eq!(outputs, [b"first\n".to_vec(), b"second\n".to_vec()]);
}

#[test]
fn two_concurrent_execs_on_two_connections_both_finish() {
    let agent = Agent::start(None);
    let flag = agent.dir.path().join("flag2");
    let waiter = ExecRequest::shell(format!("while [ ! -e '{}' ]; do sleep 0.01; done; echo first", flag.display()))
        .timeout(Duration::from_secs(10));
    let mut first = agent.connect();
    let handle = std::thread::spawn(move || run(&mut first, waiter));
    let mut second = agent.connect();
    let (stdout, _, status) = run(&mut second, ExecRequest::shell(format!("touch '{}'; echo second", flag.display())));
    assert!(status.success());
    assert_eq!(stdout, b"second\n");
    let (stdout, _, status) = handle.join().unwrap();
    assert!(status.success() && !status.timed_out);
    assert_eq!(stdout, b"first\n");
}

/// A file of pseudo-random bytes (xorshift), so the digest covers real content.
fn write_random_file(path: &Path, size: usize) {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let take = left.min(block.len());
        file.write_all(&block[..take]).unwrap();
        left -= take;
    }
    file.flush().unwrap();
}

fn file_digest(path: &Path) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(path).unwrap()).unwrap();
    hasher.finalize()
}

#[test]
fn put_and_get_100_mib_round_trip_matches_digest() {
    let files = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let agent = Agent::start(Some(root.path()));
    let mut client = agent.connect();
    const SIZE: usize = 100 * 1024 * 1024;
    let source = files.path().join("source.bin");
    write_random_file(&source, SIZE);

    let mut last_progress = (0, 0);
    let sent = client.put_file(&source, "/upload.bin", |done, total| last_progress = (done, total)).unwrap();
    assert_eq!(sent, SIZE as u64);
    assert_eq!(last_progress, (SIZE as u64, SIZE as u64));
    let stat = client.stat("/upload.bin").unwrap();
    assert_eq!((stat.kind, stat.size), (FileKind::File, SIZE as u64));
    assert_eq!(file_digest(&root.path().join("upload.bin")), file_digest(&source));

    let copy = files.path().join("copy.bin");
    let mut progress_calls = 0;
    let received = client.get_file("/upload.bin", &copy, |_, _| progress_calls += 1).unwrap();
    assert_eq!(received, SIZE as u64);
    assert_eq!(progress_calls, SIZE / (64 * 1024));
    assert_eq!(file_digest(&copy), file_digest(&source));

    client.remove("/upload.bin", false).unwrap();
    assert_eq!(client.stat("/upload.bin").unwrap_err().agent_code(), Some(ErrorCode::NOT_FOUND));
    // Only the test's files were ever in the root: no temporary file is left behind.
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
}

#[test]
fn put_and_get_of_empty_file_round_trip() {
    let root = tempfile::tempdir().unwrap();
    let agent = Agent::start(Some(root.path()));
    let mut client = agent.connect();
    let empty = agent.dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(client.put_file(&empty, "/empty", |_, _| {}).unwrap(), 0);
    let copy = agent.dir.path().join("empty-copy");
    assert_eq!(client.get_file("/empty", &copy, |_, _| {}).unwrap(), 0);
    assert_eq!(std::fs::read(&copy).unwrap(), b"");
}

#[test]
fn file_requests_escaping_root_are_refused_and_connection_survives() {
    let root = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/etc", root.path().join("etc-link")).unwrap();
    let agent = Agent::start(Some(root.path()));
    let mut client = agent.connect();
    let local = agent.dir.path().join("payload");
    std::fs::write(&local, b"payload").unwrap();
    let escape = Some(ErrorCode::PATH_ESCAPES_ROOT);
    assert_eq!(client.put_file(&local, "/../escaped", |_, _| {}).unwrap_err().agent_code(), escape);
    assert_eq!(client.put_file(&local, "/etc-link/escaped", |_, _| {}).unwrap_err().agent_code(), escape);
    let copy = agent.dir.path().join("passwd");
    assert_eq!(client.get_file("/etc-link/passwd", &copy, |_, _| {}).unwrap_err().agent_code(), escape);
    assert!(!copy.exists());
    assert_eq!(client.list_dir("/etc-link").unwrap_err().agent_code(), escape);
    assert_eq!(client.remove("/../tmp", true).unwrap_err().agent_code(), escape);
    assert_eq!(client.remove("/", true).unwrap_err().agent_code(), Some(ErrorCode::INVALID_PATH));
    client.put_file(&local, "inside", |_, _| {}).unwrap();
    assert_eq!(std::fs::read(root.path().join("inside")).unwrap(), b"payload");
}

#[test]
fn stat_list_dir_and_remove_see_guest_tree() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("dir/nested")).unwrap();
    std::fs::write(root.path().join("dir/a.txt"), b"abc").unwrap();
    let agent = Agent::start(Some(root.path()));
    let mut client = agent.connect();
    let entries = client.list_dir("/dir").unwrap();
    let names: Vec<(&str, FileKind, u64)> = entries
        .iter()
        .map(|entry| (entry.name.as_str(), entry.kind, if entry.kind == FileKind::File { entry.size } else { 0 }))
        .collect();
    assert_eq!(names, [("a.txt", FileKind::File, 3), ("nested", FileKind::Dir, 0)]);
    assert_eq!(client.stat("/dir/a.txt").unwrap().size, 3);
    assert_eq!(client.remove("/dir", false).unwrap_err().agent_code(), Some(ErrorCode::DIRECTORY_NOT_EMPTY));
    client.remove("/dir", true).unwrap();
    assert!(client.list_dir("/").unwrap().is_empty());
}

#[test]
fn list_dir_of_large_directory_spans_several_frames() {
    let root = tempfile::tempdir().unwrap();
    for index in 0..1500 {
        std::fs::write(root.path().join(format!("f{index:04}")), b"").unwrap();
    }
    let agent = Agent::start(Some(root.path()));
    let mut client = agent.connect();
    let entries = client.list_dir("/").unwrap();
    assert_eq!(entries.len(), 1500);
    assert_eq!(entries[1499].name, "f1499");
}

/// A raw connection for sending bytes no client would.
fn raw_pair(agent: &Agent) -> (UnixStream, Client<UnixStream>) {
    let client = agent.connect();
    (client.stream().try_clone().unwrap(), client)
}

#[test]
fn oversized_frame_is_answered_with_error_and_connection_survives() {
    let agent = Agent::start(None);
    let (mut raw, mut client) = raw_pair(&agent);
    let len = MAX_FRAME_LEN + 1;
    let mut bytes = Vec::with_capacity(4 + len as usize);
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(&77u32.to_le_bytes());
    bytes.extend_from_slice(&kind::DATA.to_le_bytes());
    bytes.resize(4 + len as usize, 0x55);
    raw.write_all(&bytes).unwrap();
    let (id, message) = client.next_message().unwrap();
    assert_eq!(id, 77);
    assert!(matches!(message, Message::Error(error) if error.code == ErrorCode::TOO_LARGE));
    client.ping().unwrap();
}

#[test]
fn unknown_kind_and_malformed_body_are_answered_with_errors() {
    let agent = Agent::start(None);
    let (mut raw, mut client) = raw_pair(&agent);
    write_raw_frame(&mut raw, 5, 999, b"from the future").unwrap();
    let (id, message) = client.next_message().unwrap();
    assert_eq!(id, 5);
    assert!(matches!(message, Message::Error(error) if error.code == ErrorCode::UNKNOWN_KIND));
    write_raw_frame(&mut raw, 6, kind::EXEC, &[0xFF, 0xFF, 0xFF]).unwrap();
    let (id, message) = client.next_message().unwrap();
    assert_eq!(id, 6);
    assert!(matches!(message, Message::Error(error) if error.code == ErrorCode::MALFORMED));
    // A reply-only kind sent to the agent is refused, not obeyed.
    write_raw_frame(&mut raw, 7, kind::DONE, &[]).unwrap();
    let (id, message) = client.next_message().unwrap();
    assert_eq!(id, 7);
    assert!(matches!(message, Message::Error(error) if error.code == ErrorCode::UNEXPECTED));
    client.ping().unwrap();
}

#[test]
fn truncated_frame_then_close_leaves_agent_serving() {
    let agent = Agent::start(None);
    {
        let (mut raw, _client) = raw_pair(&agent);
        raw.write_all(&encode_header(1, kind::PING, 100)).unwrap();
        raw.write_all(&[1, 2, 3]).unwrap();
    }
    let mut client = agent.connect();
    client.ping().unwrap();
}

#[test]
fn host_that_stops_reading_stalls_command_without_agent_buffering() {
    let agent = Agent::start(None);
    let mut client = agent.connect();
    let before = agent.rss_kib();
    const SIZE: usize = 64 * 1024 * 1024;
    let id = client.start_exec(ExecRequest::shell(format!("head -c {SIZE} /dev/zero"))).unwrap();
    // Not reading: the command must stall on its pipe rather than the agent buffering its
    // output. Give it time to misbehave (there is no event for "did not happen").
    std::thread::sleep(Duration::from_millis(500));
    let stalled = agent.rss_kib();
    assert!(stalled < before + 16 * 1024, "agent grew from {before} KiB to {stalled} KiB");
    let mut total = 0;
    loop {
        match client.next_message().unwrap() {
            (from, Message::Stdout(bytes)) if from == id => total += bytes.len(),
            (from, Message::ExecExit(exit)) if from == id => {
                assert_eq!(exit.code, Some(0));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(total, SIZE);
}

/// Kills a child process on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agent_on_vsock_serves_over_loopback_or_reports_missing_support() {
    const VMADDR_CID_LOCAL: u32 = 1;
    let port = 40_000 + std::process::id() % 20_000;
    let child = Command::new(env!("CARGO_BIN_EXE_carrel-guest-agent"))
        .args(["--vsock-port", &port.to_string(), "--heartbeat-ms", "100"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut agent = KillOnDrop(child);
    let deadline = std::time::Instant::now() + READY;
    loop {
        match VsockStream::connect(VMADDR_CID_LOCAL, port) {
            Ok(stream) => {
                let mut client = Client::new(stream);
                assert!(client.hello().unwrap().name.starts_with("carrel-guest-agent"));
                let (stdout, _, status) = run(&mut client, ExecRequest::shell("echo over vsock"));
                assert!(status.success());
                assert_eq!(stdout, b"over vsock\n");
                return;
            }
            Err(error) => {
                if let Some(status) = agent.0.try_wait().unwrap() {
                    // No vsock here: the agent must have said so and exited.
                    let mut stderr = String::new();
                    agent.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
                    assert!(!status.success());
                    assert!(stderr.contains("AF_VSOCK is not supported"), "{stderr}");
                    return;
                }
                let not_bound_yet = matches!(error.raw_os_error(), Some(libc::ECONNREFUSED | libc::ECONNRESET));
                if !not_bound_yet || std::time::Instant::now() > deadline {
                    // The agent listens but this kernel has no loopback transport to reach it.
                    eprintln!("vsock loopback unavailable ({error}); the agent's vsock listener was not exercised");
                    return;
                }
                // The agent has not bound yet; there is no event to wait on.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[test]
fn agent_binary_with_unknown_argument_prints_usage_and_fails() {
    let output = Command::new(env!("CARGO_BIN_EXE_carrel-guest-agent")).arg("--bogus").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("usage"), "{stderr}");
}

#[test]
fn agent_as_pid1_mounts_proc_and_reaps_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("init.sock");
    // A fresh PID and mount namespace makes the agent PID 1 without a VM; its mounts stay in
    // that namespace. Without the privilege for it, there is nothing to test here.
    let spawned = Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "--mount", "--propagation", "private"])
        .arg(env!("CARGO_BIN_EXE_carrel-guest-agent"))
        .arg("--unix")
        .arg(&socket)
        .args(["--heartbeat-ms", "100"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(child) = spawned else {
        eprintln!("unshare is not available; PID-1 mode was not exercised");
        return;
    };
    let mut init = KillOnDrop(child);
    let deadline = std::time::Instant::now() + READY;
    while !socket.exists() {
        if init.0.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
            let mut stderr = String::new();
            init.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
            eprintln!("could not start the agent in a PID namespace ({stderr}); PID-1 mode was not exercised");
            return;
        }
        // No event announces the socket from inside the namespace.
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut client = connect_unix_ready(&socket, READY).unwrap();
    let (stdout, _, status) = run(&mut client, ExecRequest::shell("cat /proc/1/comm; test -d /sys/kernel && echo sys"));
    assert!(status.success());
    assert_eq!(String::from_utf8(stdout).unwrap(), "carrel-guest-ag\nsys\n");

    // The shell exits at once; its background sleep is re-parented to the agent (init),
    // which must reap it when it exits.
    let (stdout, _, status) = run(&mut client, ExecRequest::shell("sleep 0.2 >/dev/null 2>&1 & echo $!"));
    assert!(status.success());
    let orphan = String::from_utf8(stdout).unwrap().trim().to_string();
    let probe = format!("cut -d' ' -f3 /proc/{orphan}/stat 2>/dev/null || true");
    let deadline = std::time::Instant::now() + READY;
    loop {
        let (state, _, _) = run(&mut client, ExecRequest::shell(probe.clone()));
        if state.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "orphan {orphan} still in state {state:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

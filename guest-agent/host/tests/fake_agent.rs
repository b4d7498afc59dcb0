//! The client against a scripted fake agent on a socket pair: what a broken or hostile agent
//! can send must end in a clear error, never a panic, a hang or a wrong file left behind.

use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::Duration;

use carrel_agent_client::proto::io::{write_frame, write_raw_frame, FrameReader};
use carrel_agent_client::proto::{
    kind, End, ErrorCode, FileInfo, Heartbeat, Hello, Message, Ping, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use carrel_agent_client::{Client, ClientError, ExecRequest};

/// Runs `script` as the agent end of a socket pair; returns the client end.
fn fake_agent(
    script: impl FnOnce(&mut FrameReader<UnixStream>, &mut UnixStream) + Send + 'static,
) -> (Client<UnixStream>, JoinHandle<()>) {
    let (host, guest) = UnixStream::pair().unwrap();
    let handle = std::thread::spawn(move || {
        let mut writer = guest.try_clone().unwrap();
        let mut reader = FrameReader::new(guest);
        script(&mut reader, &mut writer);
    });
    (Client::new(host), handle)
}

#[test]
fn get_file_with_wrong_digest_removes_local_file() {
    let (mut client, agent) = fake_agent(|reader, writer| {
        let request = reader.read_frame().unwrap().unwrap();
        write_frame(writer, request.id, &Message::FileInfo(FileInfo { size: 5, mode: 0o644 })).unwrap();
        write_raw_frame(writer, request.id, kind::DATA, b"hello").unwrap();
        write_frame(writer, request.id, &Message::End(End { size: 5, digest: [0; 32] })).unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("copy");
    let error = client.get_file("/remote", &local, |_, _| {}).unwrap_err();
    assert!(matches!(error, ClientError::CheckDigest { .. }), "{error}");
    assert!(!local.exists());
    agent.join().unwrap();
}

#[test]
fn get_file_with_short_data_returns_size_error() {
    let (mut client, agent) = fake_agent(|reader, writer| {
        let request = reader.read_frame().unwrap().unwrap();
        write_frame(writer, request.id, &Message::FileInfo(FileInfo { size: 5, mode: 0o644 })).unwrap();
        write_raw_frame(writer, request.id, kind::DATA, b"hel").unwrap();
        let digest = *blake3::hash(b"hello").as_bytes();
        write_frame(writer, request.id, &Message::End(End { size: 5, digest })).unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let error = client.get_file("/remote", &dir.path().join("copy"), |_, _| {}).unwrap_err();
    assert!(matches!(error, ClientError::CheckSize { expected: 5, actual: 3, .. }), "{error}");
    agent.join().unwrap();
}

#[test]
fn hello_from_agent_with_other_version_returns_version_error() {
    let (mut client, agent) = fake_agent(|reader, writer| {
        let request = reader.read_frame().unwrap().unwrap();
        let hello = Hello { protocol_version: PROTOCOL_VERSION + 1, name: "future agent".into(), os: "desk".into() };
        write_frame(writer, request.id, &Message::Hello(hello)).unwrap();
    });
    let error = client.hello().unwrap_err();
    assert!(matches!(error, ClientError::CheckVersion { .. }), "{error}");
    assert!(error.to_string().contains("future agent"));
    agent.join().unwrap();
}

#[test]
fn wait_ready_without_heartbeat_returns_timeout_error() {
    let (mut client, agent) = fake_agent(|reader, _| {
        // Silent until the client gives up and closes.
        assert!(reader.read_frame().unwrap().is_none());
    });
    let error = client.wait_ready(Duration::from_millis(50)).unwrap_err();
    assert!(matches!(error, ClientError::WaitReady { .. }), "{error}");
    drop(client);
    agent.join().unwrap();
}

#[test]
fn wait_ready_skips_stray_frames_until_heartbeat() {
    let (mut client, agent) = fake_agent(|_, writer| {
        write_frame(writer, 99, &Message::Pong(Ping { nonce: 1 })).unwrap();
        write_frame(writer, 0, &Message::Heartbeat(Heartbeat { seq: 0, uptime_ms: 5 })).unwrap();
    });
    assert_eq!(client.wait_ready(Duration::from_secs(10)).unwrap().uptime_ms, 5);
    agent.join().unwrap();
}

#[test]
fn oversized_frame_from_agent_returns_error_and_next_frame_still_reads() {
    let (mut client, agent) = fake_agent(|reader, writer| {
        let request = reader.read_frame().unwrap().unwrap();
        let len = MAX_FRAME_LEN + 1;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&request.id.to_le_bytes());
        bytes.extend_from_slice(&kind::PONG.to_le_bytes());
        bytes.resize(4 + len as usize, 0);
        std::io::Write::write_all(writer, &bytes).unwrap();
        let ping = Message::decode(request.kind, request.body).unwrap();
        let Message::Ping(ping) = ping else { panic!("expected a ping") };
        write_frame(writer, request.id, &Message::Pong(ping)).unwrap();
    });
    let error = client.ping().unwrap_err();
    assert!(matches!(error, ClientError::Receive(_)), "{error}");
    // The oversized frame was skipped; the real answer follows (stale now: the ping failed).
    let (_, message) = client.next_message().unwrap();
    assert!(matches!(message, Message::Pong(_)));
    agent.join().unwrap();
}

#[test]
fn exec_refused_by_agent_returns_agent_error_with_code() {
    let (mut client, agent) = fake_agent(|reader, writer| {
        let request = reader.read_frame().unwrap().unwrap();
        write_frame(writer, request.id, &Message::error(ErrorCode::SPAWN_FAILED, "no fork for you")).unwrap();
    });
    let error = client.exec(ExecRequest::shell("true"), |_, _| {}).unwrap_err();
    assert_eq!(error.agent_code(), Some(ErrorCode::SPAWN_FAILED));
    assert!(error.to_string().contains("no fork for you"));
    agent.join().unwrap();
}

#[test]
fn agent_closing_mid_request_returns_closed_error() {
    // The agent end closes at once.
    let (mut client, agent) = fake_agent(|_, _| {});
    agent.join().unwrap();
    assert!(matches!(client.ping().unwrap_err(), ClientError::ReceiveClosed | ClientError::Send(_)));
}

#[test]
fn exec_request_with_empty_argv_or_huge_stdin_is_refused_locally() {
    let (mut client, agent) = fake_agent(|_, _| {});
    let error = client.exec(ExecRequest::default(), |_, _| {}).unwrap_err();
    assert!(matches!(error, ClientError::BuildExec { .. }));
    let error = client.exec(ExecRequest::shell("cat").stdin(vec![0u8; 1 << 20]), |_, _| {}).unwrap_err();
    assert!(matches!(error, ClientError::BuildExec { .. }));
    agent.join().unwrap();
}

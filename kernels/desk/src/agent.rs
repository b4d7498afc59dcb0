//! The Desk guest agent: the same protocol as the Linux agent (`carrel-agent-proto`) over
//! vsock port 1024, with built-in commands and files: in memory, or in the file store on
//! disk 0 when one is mounted ([`Files`]); a put to the store is acknowledged only once
//! it is durable.
//!
//! Requests are served in the main loop as frames arrive; work that waits (a `sleep`, a
//! file sent under the host's credit) is kept per request and resumed on later wakes, so
//! one slow request never holds up another connection. The only waits on time (the next
//! heartbeat, a `sleep` that ends) are told to the main loop by `next_deadline_ms`, so
//! it can arm its timer for them and for nothing else.
//!
//! Two kinds of state outlive connections: the entropy `random` prints (renewed by the
//! main loop after every restore) and the `fill` buffer, memory kept dirty on purpose so
//! snapshots can be tested against a known pattern (`checksum`).

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use carrel_agent_proto::flow::{RecvCredit, SendCredit};
use carrel_agent_proto::frame::{encode_frame, FrameDecoder};
use carrel_agent_proto::message::{
    DirEntries, DirEntry, End, ErrorCode, ExecExit, FileInfo, FileKind, FileStat, Heartbeat, Hello, Message,
};
use carrel_agent_proto::{MAX_CHUNK, PROTOCOL_VERSION};

use crate::blk::Block;
use crate::console::Hex;
use crate::files::Files;
use crate::vsock::{Vsock, VsockEvent, MAX_CONNECTIONS};

/// Longest a `sleep` may ask for.
const MAX_SLEEP_MS: u64 = 3_600_000;
const MIB: usize = 1 << 20;
/// Heap a `fill` leaves free for the agent's own messages and files: an allocation that
/// fails there would stop the kernel.
const FILL_RESERVE_MIB: usize = 8;
const WORDS_PER_MIB: usize = MIB / core::mem::size_of::<u64>();
/// What `diskbench` measures when not told: 256 MiB, or the whole disk when smaller.
const DISKBENCH_DEFAULT_MIB: u64 = 256;

/// Work a request still has to do.
enum Pending {
    Sleep { until_ms: u64 },
    Put { path: String, mode: u32, size: u64, data: Vec<u8>, credit: RecvCredit },
    Get { data: Rc<Vec<u8>>, digest: [u8; 32], offset: usize, credit: SendCredit },
}

#[derive(Default)]
struct Session {
    decoder: FrameDecoder,
    pending: BTreeMap<u32, Pending>,
    heartbeat_seq: u64,
}

/// The `fill` buffer: `mib` MiB of one seed's SplitMix64 words.
struct Fill {
    words: Vec<u64>,
    mib: usize,
}

pub struct Agent {
    files: Files,
    /// Disks without a store, for `diskbench`.
    raw_disks: Vec<Block>,
    tsc_khz: u64,
    sessions: [Option<Session>; MAX_CONNECTIONS],
    /// When the next heartbeat goes to every connection: on the whole seconds of uptime,
    /// the instants the clock on screen changes too, so one wake serves both.
    next_heartbeat_ms: u64,
    /// The 32 bytes last drawn from virtio-rng (at boot or after the last restore); `None`
    /// when there is no rng or its last draw failed.
    random: Option<[u8; 32]>,
    fill: Option<Fill>,
}

/// A path in the in-memory filesystem: absolute, no `.`/`..`, no empty components.
fn normalize(path: &str) -> Result<String, (ErrorCode, String)> {
    if !path.starts_with('/') {
        return Err((ErrorCode::INVALID_PATH, format!("{path}: paths are absolute")));
    }
    let mut parts = Vec::new();
    for part in path.split('/').filter(|part| !part.is_empty()) {
        if part == "." || part == ".." {
            return Err((ErrorCode::PATH_ESCAPES_ROOT, format!("{path}: no . or .. components")));
        }
        parts.push(part);
    }
    Ok(format!("/{}", parts.join("/")))
}

fn error(code: ErrorCode, message: impl Into<String>) -> Message {
    Message::error(code, message)
}

impl Agent {
    pub fn new(random: Option<[u8; 32]>, files: Files, raw_disks: Vec<Block>, tsc_khz: u64) -> Agent {
        Agent { files, raw_disks, tsc_khz, sessions: Default::default(), next_heartbeat_ms: 0, random, fill: None }
    }

    /// Replaces the entropy `random` prints (after a restore).
    pub fn set_random(&mut self, random: Option<[u8; 32]>) {
        self.random = random;
    }

    fn send(vsock: &mut Vsock, slot: usize, id: u32, message: &Message) {
        if let Ok(frame) = encode_frame(id, message) {
            // A failed send means the connection is gone; its session ends on Closed.
            let _ = vsock.send(slot, &frame);
        }
    }

    /// Handles a connection event.
    pub fn handle(&mut self, event: VsockEvent, vsock: &mut Vsock, now_ms: u64) {
        match event {
            VsockEvent::Connected(slot) => {
                self.sessions[slot] = Some(Session::default());
                self.heartbeat(slot, vsock, now_ms);
                // Nobody was listening for a while: the schedule resumes from now, not
                // with a second beat right after this one.
                if self.next_heartbeat_ms <= now_ms {
                    self.next_heartbeat_ms = next_heartbeat_after(now_ms);
                }
            }
            VsockEvent::Closed(slot) => self.sessions[slot] = None,
            VsockEvent::Data(slot) => {
                let bytes = vsock.take_inbox(slot);
                let mut input = bytes.as_slice();
                loop {
                    let Some(session) = self.sessions[slot].as_mut() else { return };
                    let Some(frame) = session.decoder.decode(&mut input) else { break };
                    match frame {
                        Ok(frame) => {
                            let id = frame.id;
                            match frame.into_message() {
                                Ok(message) => self.serve(slot, id, message, vsock, now_ms),
                                Err(err) => Self::send(vsock, slot, id, &error(err.code(), err.to_string())),
                            }
                        }
                        Err(err) => Self::send(vsock, slot, 0, &error(ErrorCode::TOO_LARGE, err.to_string())),
                    }
                }
                self.pump(slot, vsock, now_ms);
            }
        }
    }

    fn heartbeat(&mut self, slot: usize, vsock: &mut Vsock, now_ms: u64) {
        let Some(session) = self.sessions[slot].as_mut() else { return };
        session.heartbeat_seq += 1;
        let beat = Message::Heartbeat(Heartbeat { seq: session.heartbeat_seq, uptime_ms: now_ms });
        Self::send(vsock, slot, 0, &beat);
    }

    /// Work that is due by time: heartbeats every second, finished sleeps.
    pub fn tick(&mut self, vsock: &mut Vsock, now_ms: u64) {
        let beat = now_ms >= self.next_heartbeat_ms;
        if beat {
            self.next_heartbeat_ms = next_heartbeat_after(now_ms);
        }
        for slot in 0..MAX_CONNECTIONS {
            if self.sessions[slot].is_none() {
                continue;
            }
            if beat {
                self.heartbeat(slot, vsock, now_ms);
            }
            self.pump(slot, vsock, now_ms);
        }
    }

    /// The uptime at which [`Agent::tick`] next has work to do, if it ever has without a
    /// packet arriving first: the next heartbeat while anyone is connected, and the end
    /// of the earliest `sleep`. Transfers wait on packets from the host, not on time.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let sessions = || self.sessions.iter().flatten();
        let heartbeat = sessions().next().map(|_| self.next_heartbeat_ms);
        let sleep_end = sessions()
            .flat_map(|session| session.pending.values())
            .filter_map(|pending| match pending {
                Pending::Sleep { until_ms } => Some(*until_ms),
                _ => None,
            })
            .min();
        crate::time::earliest(heartbeat, sleep_end)
    }

    /// Resumes requests that can make progress.
    fn pump(&mut self, slot: usize, vsock: &mut Vsock, now_ms: u64) {
        let Some(session) = self.sessions[slot].as_mut() else { return };
        let mut finished = Vec::new();
        let mut outgoing: Vec<(u32, Message)> = Vec::new();
        for (id, pending) in session.pending.iter_mut() {
            match pending {
                Pending::Sleep { until_ms } if now_ms >= *until_ms => {
                    outgoing.push((*id, Message::ExecExit(ExecExit { code: Some(0), signal: None, timed_out: false })));
                    finished.push(*id);
                }
                Pending::Get { data, digest, offset, credit } => {
                    while *offset < data.len() && credit.try_take() {
                        let end = (*offset + MAX_CHUNK).min(data.len());
                        outgoing.push((*id, Message::Data(data[*offset..end].to_vec())));
                        *offset = end;
                    }
                    if *offset >= data.len() {
                        outgoing.push((*id, Message::End(End { size: data.len() as u64, digest: *digest })));
                        finished.push(*id);
                    }
                }
                _ => {}
            }
        }
        for id in finished {
            session.pending.remove(&id);
        }
        for (id, message) in outgoing {
            Self::send(vsock, slot, id, &message);
        }
    }

    fn serve(&mut self, slot: usize, id: u32, message: Message, vsock: &mut Vsock, now_ms: u64) {
        let reply = match message {
            Message::Hello(hello) if hello.protocol_version != PROTOCOL_VERSION => Some(error(
                ErrorCode::VERSION_MISMATCH,
                format!("host speaks protocol {}, Desk speaks {PROTOCOL_VERSION}", hello.protocol_version),
            )),
            Message::Hello(_) => Some(Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                name: "carrel-desk-agent".to_string(),
                os: "Carrel Desk".to_string(),
            })),
            Message::Ping(ping) => Some(Message::Pong(ping)),
            Message::Exec(exec) => self.exec(slot, id, exec.argv, &exec.stdin, vsock, now_ms),
            Message::Kill(kill) => {
                let session = self.sessions[slot].as_mut();
                match session.and_then(|session| session.pending.remove(&kill.target)) {
                    Some(Pending::Sleep { .. }) => {
                        let exit = ExecExit { code: None, signal: Some(9), timed_out: false };
                        Self::send(vsock, slot, kill.target, &Message::ExecExit(exit));
                        Some(Message::Done)
                    }
                    Some(other) => {
                        // Not an exec: put it back untouched.
                        if let Some(session) = self.sessions[slot].as_mut() {
                            session.pending.insert(kill.target, other);
                        }
                        Some(error(ErrorCode::UNKNOWN_REQUEST, format!("request {} is not a command", kill.target)))
                    }
                    None => Some(error(ErrorCode::UNKNOWN_REQUEST, format!("no command with id {}", kill.target))),
                }
            }
            Message::PutFile(put) => match normalize(&put.path) {
                Err((code, text)) => Some(error(code, text)),
                Ok(path) if path == "/" => Some(error(ErrorCode::IS_A_DIRECTORY, "/ is a directory")),
                Ok(path) => {
                    let free = crate::heap::free_bytes() as u64;
                    if put.size > free / 2 {
                        Some(error(ErrorCode::IO, format!("{} bytes do not fit in memory ({free} free)", put.size)))
                    } else if let Err((code, text)) = self.files.check_room(&path, put.size) {
                        Some(error(code, text))
                    } else {
                        let (credit, grant) = RecvCredit::new(carrel_agent_proto::DEFAULT_WINDOW);
                        let data = Vec::with_capacity(put.size as usize);
                        if let Some(session) = self.sessions[slot].as_mut() {
                            session
                                .pending
                                .insert(id, Pending::Put { path, mode: put.mode, size: put.size, data, credit });
                        }
                        Some(Message::Credit(carrel_agent_proto::message::Credit { chunks: grant }))
                    }
                }
            },
            Message::Data(chunk) => self.put_data(slot, id, chunk),
            Message::End(end) => self.put_end(slot, id, end),
            Message::GetFile(get) => match normalize(&get.path) {
                Err((code, text)) => Some(error(code, text)),
                Ok(path) => match self.files.read(&path) {
                    Err((code, text)) => Some(error(code, text)),
                    Ok(file) => {
                        let mut credit = SendCredit::new();
                        if credit.grant(get.window).is_err() {
                            Some(error(ErrorCode::FLOW_CONTROL, "window larger than allowed"))
                        } else {
                            Self::send(
                                vsock,
                                slot,
                                id,
                                &Message::FileInfo(FileInfo { size: file.data.len() as u64, mode: file.mode }),
                            );
                            let (data, digest) = (file.data, file.digest);
                            if let Some(session) = self.sessions[slot].as_mut() {
                                session.pending.insert(id, Pending::Get { data, digest, offset: 0, credit });
                            }
                            None
                        }
                    }
                },
            },
            Message::Credit(grant) => {
                let pending = self.sessions[slot].as_mut().and_then(|session| session.pending.get_mut(&id));
                match pending {
                    Some(Pending::Get { credit, .. }) => {
                        credit.grant(grant.chunks).err().map(|err| error(ErrorCode::FLOW_CONTROL, err.to_string()))
                    }
                    _ => Some(error(ErrorCode::UNKNOWN_REQUEST, "credit for no transfer")),
                }
            }
            Message::Stat(request) => Some(self.stat(&request.path)),
            Message::ListDir(request) => Some(self.list(&request.path)),
            Message::Remove(remove) => Some(match normalize(&remove.path) {
                Err((code, text)) => error(code, text),
                Ok(path) => {
                    let done = if self.files.stat(&path).is_some() {
                        self.files.remove(&path)
                    } else if self.files.is_dir(&path) && remove.recursive {
                        self.files.remove_dir(&path)
                    } else if self.files.is_dir(&path) {
                        Err((ErrorCode::DIRECTORY_NOT_EMPTY, format!("{path} is a directory")))
                    } else {
                        Err((ErrorCode::NOT_FOUND, format!("{path}: no such file")))
                    };
                    match done {
                        Ok(()) => Message::Done,
                        Err((code, text)) => error(code, text),
                    }
                }
            }),
            other => Some(error(ErrorCode::UNEXPECTED, format!("message kind {} is not a request", other.kind()))),
        };
        if let Some(reply) = reply {
            Self::send(vsock, slot, id, &reply);
        }
    }

    fn put_data(&mut self, slot: usize, id: u32, chunk: Vec<u8>) -> Option<Message> {
        let session = self.sessions[slot].as_mut()?;
        let Some(Pending::Put { data, size, credit, .. }) = session.pending.get_mut(&id) else {
            return Some(error(ErrorCode::UNKNOWN_REQUEST, "data for no transfer"));
        };
        if data.len() as u64 + chunk.len() as u64 > *size || chunk.len() > MAX_CHUNK {
            session.pending.remove(&id);
            return Some(error(ErrorCode::SIZE_MISMATCH, "more data than announced"));
        }
        if let Err(err) = credit.on_receive() {
            session.pending.remove(&id);
            return Some(error(ErrorCode::FLOW_CONTROL, err.to_string()));
        }
        // The chunk is consumed as soon as it is stored.
        data.extend_from_slice(&chunk);
        credit.on_consume().map(|chunks| Message::Credit(carrel_agent_proto::message::Credit { chunks }))
    }

    fn put_end(&mut self, slot: usize, id: u32, end: End) -> Option<Message> {
        let session = self.sessions[slot].as_mut()?;
        let Some(Pending::Put { path, mode, data, .. }) = session.pending.remove(&id) else {
            return Some(error(ErrorCode::UNKNOWN_REQUEST, "end of no transfer"));
        };
        if end.size != data.len() as u64 {
            return Some(error(
                ErrorCode::SIZE_MISMATCH,
                format!("got {} bytes, sender says {}", data.len(), end.size),
            ));
        }
        let digest = *blake3::hash(&data).as_bytes();
        if digest != end.digest {
            return Some(error(ErrorCode::DIGEST_MISMATCH, format!("{path}: blake3 of the received bytes differs")));
        }
        // On disk this returns after the commit's last flush: Done means durable.
        Some(match self.files.write(path, mode, data, digest) {
            Ok(()) => Message::Done,
            Err((code, text)) => error(code, text),
        })
    }

    fn stat(&self, path: &str) -> Message {
        let path = match normalize(path) {
            Ok(path) => path,
            Err((code, text)) => return error(code, text),
        };
        if let Some((size, mode)) = self.files.stat(&path) {
            return Message::StatReply(FileStat { kind: FileKind::File, size, mode, mtime_secs: 0 });
        }
        if self.files.is_dir(&path) {
            return Message::StatReply(FileStat { kind: FileKind::Dir, size: 0, mode: 0o755, mtime_secs: 0 });
        }
        error(ErrorCode::NOT_FOUND, format!("{path}: no such file"))
    }

    /// The direct children of a directory.
    fn children(&self, path: &str) -> Vec<DirEntry> {
        let prefix = if path == "/" { "/".to_string() } else { format!("{path}/") };
        let mut entries: BTreeMap<String, DirEntry> = BTreeMap::new();
        for (name, size) in self.files.under(path) {
            let Some(rest) = name.strip_prefix(&prefix) else { break };
            match rest.split_once('/') {
                Some((dir, _)) => {
                    entries.entry(dir.to_string()).or_insert(DirEntry {
                        name: dir.to_string(),
                        kind: FileKind::Dir,
                        size: 0,
                    });
                }
                None => {
                    entries.insert(rest.to_string(), DirEntry { name: rest.to_string(), kind: FileKind::File, size });
                }
            }
        }
        entries.into_values().collect()
    }

    fn list(&self, path: &str) -> Message {
        match normalize(path) {
            Err((code, text)) => error(code, text),
            Ok(path) if self.files.stat(&path).is_some() => {
                error(ErrorCode::NOT_A_DIRECTORY, format!("{path} is a file"))
            }
            Ok(path) if !self.files.is_dir(&path) => error(ErrorCode::NOT_FOUND, format!("{path}: no such directory")),
            Ok(path) => Message::DirEntries(DirEntries { entries: self.children(&path), done: true }),
        }
    }

    /// Runs a built-in command. Output goes out as one stdout or stderr chunk, then the exit.
    fn exec(
        &mut self,
        slot: usize,
        id: u32,
        argv: Vec<String>,
        stdin: &[u8],
        vsock: &mut Vsock,
        now_ms: u64,
    ) -> Option<Message> {
        let Some(command) = argv.first() else {
            return Some(error(ErrorCode::SPAWN_FAILED, "empty argv"));
        };
        let args = &argv[1..];
        let (stdout, stderr, code): (Vec<u8>, Vec<u8>, i32) = match command.as_str() {
            "echo" => (format!("{}\n", args.join(" ")).into_bytes(), Vec::new(), 0),
            "cat" if args.is_empty() => (stdin.to_vec(), Vec::new(), 0),
            "cat" => {
                let mut out = Vec::new();
                let mut err = Vec::new();
                for arg in args {
                    match normalize(arg).map(|path| self.files.read(&path)) {
                        Ok(Ok(file)) => out.extend_from_slice(&file.data),
                        Ok(Err((ErrorCode::NOT_FOUND, _))) | Err(_) => {
                            err.extend_from_slice(format!("cat: {arg}: no such file\n").as_bytes())
                        }
                        Ok(Err((_, text))) => err.extend_from_slice(format!("cat: {text}\n").as_bytes()),
                    }
                }
                let code = i32::from(!err.is_empty());
                (out, err, code)
            }
            "ls" => {
                let path = args.first().map(String::as_str).unwrap_or("/");
                match self.list(path) {
                    Message::DirEntries(list) => {
                        let text: String = list.entries.iter().map(|entry| format!("{}\n", entry.name)).collect();
                        (text.into_bytes(), Vec::new(), 0)
                    }
                    Message::Error(reply) => (Vec::new(), format!("ls: {}\n", reply.message).into_bytes(), 1),
                    _ => (Vec::new(), Vec::new(), 1),
                }
            }
            "write" if !args.is_empty() => match normalize(&args[0]) {
                Ok(path) => {
                    let mut data = args[1..].join(" ").into_bytes();
                    data.extend_from_slice(stdin);
                    let digest = *blake3::hash(&data).as_bytes();
                    match self.files.write(path, 0o644, data, digest) {
                        Ok(()) => (Vec::new(), Vec::new(), 0),
                        Err((_, text)) => (Vec::new(), format!("write: {text}\n").into_bytes(), 1),
                    }
                }
                Err((_, text)) => (Vec::new(), format!("write: {text}\n").into_bytes(), 1),
            },
            "rm" if !args.is_empty() => match normalize(&args[0]).map(|path| self.files.remove(&path)) {
                Ok(Ok(())) => (Vec::new(), Vec::new(), 0),
                Ok(Err((ErrorCode::NOT_FOUND, _))) | Err(_) => {
                    (Vec::new(), format!("rm: {}: no such file\n", args[0]).into_bytes(), 1)
                }
                Ok(Err((_, text))) => (Vec::new(), format!("rm: {text}\n").into_bytes(), 1),
            },
            "uptime" => (format!("up {}.{:03} s\n", now_ms / 1000, now_ms % 1000).into_bytes(), Vec::new(), 0),
            "meminfo" => {
                let (free, total) = (crate::heap::free_bytes(), crate::heap::size_bytes());
                let (count, bytes) = self.files.summary();
                let text = format!("heap_total {total}\nheap_free {free}\nfiles {count} ({bytes} bytes)\n");
                (text.into_bytes(), Vec::new(), 0)
            }
            "random" => match self.random {
                Some(bytes) => (format!("{}\n", Hex(&bytes)).into_bytes(), Vec::new(), 0),
                None => {
                    (Vec::new(), b"random: no entropy: the VM has no rng device or its last draw failed\n".to_vec(), 1)
                }
            },
            "fill" => match self.fill_memory(args) {
                Ok(text) => (text.into_bytes(), Vec::new(), 0),
                Err(text) => (Vec::new(), format!("fill: {text}\n").into_bytes(), 1),
            },
            "checksum" => match self.fill.as_ref() {
                Some(fill) => {
                    (format!("checksum {:016x} {} MiB\n", fnv1a(&fill.words), fill.mib).into_bytes(), Vec::new(), 0)
                }
                None => (Vec::new(), b"checksum: nothing filled\n".to_vec(), 1),
            },
            "disks" => (crate::disks::report(self.files.store(), &self.raw_disks).into_bytes(), Vec::new(), 0),
            "diskbench" => match self.diskbench(args) {
                Ok(text) => (text.into_bytes(), Vec::new(), 0),
                Err(text) => (Vec::new(), format!("diskbench: {text}\n").into_bytes(), 1),
            },
            "sleep" => match args.first().and_then(|arg| parse_seconds_ms(arg)) {
                Some(ms) if ms <= MAX_SLEEP_MS => {
                    if let Some(session) = self.sessions[slot].as_mut() {
                        session.pending.insert(id, Pending::Sleep { until_ms: now_ms + ms });
                    }
                    return None;
                }
                _ => (Vec::new(), b"sleep: give seconds, e.g. sleep 0.5\n".to_vec(), 2),
            },
            other => (
                Vec::new(),
                format!(
                    "{other}: command not found (built-ins: echo ls cat write rm uptime meminfo sleep random fill \
                     checksum disks diskbench)\n"
                )
                .into_bytes(),
                127,
            ),
        };
        for (bytes, is_stdout) in [(stdout, true), (stderr, false)] {
            for chunk in bytes.chunks(MAX_CHUNK) {
                let message = if is_stdout { Message::Stdout(chunk.to_vec()) } else { Message::Stderr(chunk.to_vec()) };
                Self::send(vsock, slot, id, &message);
            }
        }
        Some(Message::ExecExit(ExecExit { code: Some(code), signal: None, timed_out: false }))
    }

    /// `diskbench [DISK_INDEX] [MIB]`: measures a raw disk (the first one by default),
    /// never the one holding the file store nor any disk that holds a store.
    fn diskbench(&mut self, args: &[String]) -> Result<String, String> {
        if args.len() > 2 {
            return Err("too many arguments: diskbench [DISK_INDEX] [MIB]".to_string());
        }
        let store_disk = self.files.store().map(|store| store.device().index);
        let index = match args.first() {
            Some(text) => text.parse::<usize>().map_err(|_| format!("{text}: not a disk index"))?,
            None => match self.raw_disks.first() {
                Some(disk) => disk.index,
                None if store_disk.is_some() => {
                    return Err(
                        "no scratch disk: disk 0 holds the file store; attach a second disk to measure".to_string()
                    )
                }
                None => return Err("no disk: attach a scratch disk to measure".to_string()),
            },
        };
        if store_disk == Some(index) {
            return Err(format!(
                "disk {index} holds the file store: diskbench writes over the disk and would destroy its files; \
                 give the index of a scratch disk"
            ));
        }
        let Some(disk) = self.raw_disks.iter_mut().find(|disk| disk.index == index) else {
            return Err(format!("no disk {index}"));
        };
        match carrel_deskfs::inspect(disk) {
            Ok(carrel_deskfs::DiskContents::Store { generation }) => {
                return Err(format!(
                    "disk {index} holds a Carrel file store (generation {generation}): diskbench would destroy it"
                ))
            }
            Ok(carrel_deskfs::DiskContents::Damaged) => {
                return Err(format!("disk {index} holds a damaged Carrel file store: diskbench would destroy it"))
            }
            Ok(_) => {}
            Err(err) => return Err(format!("disk {index} cannot be read: {err}")),
        }
        let disk_mib = disk.capacity_bytes() / MIB as u64;
        let mib = match args.get(1) {
            Some(text) => text.parse::<u64>().map_err(|_| format!("{text}: not a size in MiB"))?,
            None => disk_mib.min(DISKBENCH_DEFAULT_MIB),
        };
        if mib == 0 || mib > disk_mib {
            return Err(format!("{mib} MiB: give 1 to {disk_mib} (the size of disk {index})"));
        }
        crate::diskbench::run(disk, mib, self.tsc_khz)
    }

    /// `fill MIB [SEED]`: keeps a buffer of MIB MiB filled with the pattern of SEED
    /// (default 1); `fill 0` frees it. Returns the line to print, or why not.
    fn fill_memory(&mut self, args: &[String]) -> Result<String, String> {
        let (Some(size), seed) = (args.first(), args.get(1)) else {
            return Err("give a size in MiB and an optional seed, e.g. fill 64 7".to_string());
        };
        if args.len() > 2 {
            return Err("too many arguments: fill MIB [SEED]".to_string());
        }
        let mib: usize = size.parse().map_err(|_| format!("{size}: not a size in MiB"))?;
        let seed: u64 = match seed {
            Some(seed) => seed.parse().map_err(|_| format!("{seed}: not a seed (a number up to 2^64-1)"))?,
            None => 1,
        };
        if mib == 0 {
            let freed = self.fill.take().map_or(0, |fill| fill.mib);
            return Ok(format!("freed {freed} MiB\n"));
        }
        let heap_mib = crate::heap::size_bytes() / MIB;
        if mib > heap_mib {
            return Err(format!("{mib} MiB is more than the whole heap ({heap_mib} MiB)"));
        }
        let mut state = seed;
        match self.fill.as_mut() {
            Some(fill) if fill.mib == mib => fill.words.iter_mut().for_each(|word| *word = splitmix64(&mut state)),
            _ => {
                // The old buffer goes first, so a new size may reuse its memory; when the
                // new one does not fit, nothing stays filled.
                self.fill = None;
                let free_mib = crate::heap::free_bytes() / MIB;
                let count = mib * WORDS_PER_MIB;
                let mut words = Vec::new();
                if mib + FILL_RESERVE_MIB > free_mib || words.try_reserve_exact(count).is_err() {
                    return Err(format!(
                        "{mib} MiB do not fit in the heap ({free_mib} MiB free of {heap_mib} MiB, \
                         {FILL_RESERVE_MIB} MiB kept for the agent)"
                    ));
                }
                words.extend((0..count).map(|_| splitmix64(&mut state)));
                self.fill = Some(Fill { words, mib });
            }
        }
        Ok(format!("filled {mib} MiB seed {seed}\n"))
    }
}

/// The first whole heartbeat interval of uptime after `now_ms`.
fn next_heartbeat_after(now_ms: u64) -> u64 {
    let interval = carrel_agent_proto::HEARTBEAT_INTERVAL_MS;
    (now_ms / interval + 1) * interval
}

/// The next word of SplitMix64 from `state`: any seed (0 too) gives a sequence of
/// well-mixed words, so a filled buffer neither compresses nor has zero pages.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut value = *state;
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

/// 64-bit FNV-1a taken a little-endian word at a time rather than a byte at a time:
/// eight times fewer multiplications over a buffer of hundreds of MiB.
fn fnv1a(words: &[u64]) -> u64 {
    words.iter().fold(0xcbf2_9ce4_8422_2325, |hash, word| (hash ^ word).wrapping_mul(0x0000_0100_0000_01b3))
}

/// "1", "0.25", "2.5" seconds as milliseconds.
fn parse_seconds_ms(text: &str) -> Option<u64> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let mut ms = whole.checked_mul(1000)?;
    let digits = fraction.get(..fraction.len().min(3))?;
    if !digits.is_empty() {
        let value: u64 = digits.parse().ok()?;
        ms += value * 10u64.pow(3 - digits.len() as u32);
    }
    Some(ms)
}

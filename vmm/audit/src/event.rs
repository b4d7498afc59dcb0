//! Audit events: what an agent saw and did, as the log records it.
//!
//! This module owns the record format (a postcard body that starts with a format version),
//! the event types the VMM fills in, and secret redaction. A record's bytes are the Merkle
//! leaf, so the encoding is part of the log format: change it only with a new
//! [`RECORD_VERSION`].

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The format version written as the first byte of every record body.
pub const RECORD_VERSION: u8 = 1;

/// Parameter values longer than this many bytes are cut (a file written by the agent is
/// not a parameter to keep whole in an audit record).
pub const MAX_PARAM_VALUE_LEN: usize = 4096;

/// What a redacted parameter value becomes.
pub const REDACTED: &str = "[redacted]";

/// Words that make a parameter key secret when they appear as a whole segment of the key
/// (segments are split at anything that is not a letter or digit, so `api_key`,
/// `X-Auth-Token` and `ssh.private.key` are secret while `keys` and `keyboard` are not).
const SECRET_KEY_WORDS: &[&str] = &[
    "password",
    "passwd",
    "passphrase",
    "token",
    "secret",
    "key",
    "apikey",
    "credential",
    "credentials",
    "authorization",
    "cookie",
];

/// Errors of encoding and decoding records.
#[derive(Debug, Error)]
pub enum EventError {
    #[error("cannot encode the event record")]
    EncodeRecord(#[source] postcard::Error),
    #[error("cannot decode the event record")]
    DecodeRecord(#[source] postcard::Error),
    #[error("the record has format version {0}, this build reads version {RECORD_VERSION}")]
    CheckVersion(u8),
    #[error("the record is empty")]
    CheckEmpty,
}

/// Who sent a request: the peer credentials of the control socket (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Actor {
    /// The peer credentials of a connected Unix stream socket.
    pub fn from_unix_stream(stream: &std::os::unix::net::UnixStream) -> std::io::Result<Actor> {
        use std::os::fd::AsRawFd;
        let mut credentials = libc::ucred { pid: 0, uid: 0, gid: 0 };
        let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: the fd is a live socket borrowed from `stream`; the out pointer and length
        // describe `credentials`, a properly sized and aligned ucred on our stack.
        let result = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut credentials as *mut libc::ucred).cast(),
                &mut length,
            )
        };
        if result != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Actor { pid: credentials.pid as u32, uid: credentials.uid, gid: credentials.gid })
    }
}

/// One request parameter, as recorded (already redacted when secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Param {
    pub key: String,
    pub value: String,
}

impl Param {
    /// A parameter; redacted on append when its key names a secret.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Param {
        Param { key: key.into(), value: value.into() }
    }

    /// A parameter whose value is secret whatever its key: recorded as `[redacted]`.
    pub fn secret(key: impl Into<String>) -> Param {
        Param { key: key.into(), value: REDACTED.to_string() }
    }
}

/// Whether `key` names a secret (see [`SECRET_KEY_WORDS`]).
pub fn is_secret_key(key: &str) -> bool {
    key.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|segment| !segment.is_empty())
        .any(|segment| SECRET_KEY_WORDS.iter().any(|word| segment.eq_ignore_ascii_case(word)))
}

/// Replaces the values of secret parameters with `[redacted]`.
pub fn redact(params: &mut [Param]) {
    for param in params {
        if is_secret_key(&param.key) {
            param.value = REDACTED.to_string();
        }
    }
}

/// Cuts a value longer than [`MAX_PARAM_VALUE_LEN`] at a character boundary and says how
/// much was cut.
fn cut_long_value(value: &mut String) {
    if value.len() <= MAX_PARAM_VALUE_LEN {
        return;
    }
    let mut end = MAX_PARAM_VALUE_LEN;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    let cut = value.len() - end;
    value.truncate(end);
    value.push_str(&format!("...[{cut} more bytes not recorded]"));
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Ok,
    Error(String),
}

/// An event as the VMM hands it to the log; the log adds the sequence number, the time
/// (unless given) and the VM, and redacts secret parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub actor: Option<Actor>,
    /// What was done: `screenshot`, `input.click`, `agent.exec`, `stop`, `status`, ...
    pub action: String,
    pub params: Vec<Param>,
    pub outcome: Outcome,
    /// blake3 of the screenshot (in the blob store) before the action, when it has one.
    pub screenshot_before: Option<[u8; 32]>,
    /// blake3 of the screenshot after the action, when it has one.
    pub screenshot_after: Option<[u8; 32]>,
    /// Unix time in nanoseconds; `None` takes the clock at append.
    pub time_unix_nanos: Option<u64>,
}

impl NewEvent {
    /// An event with no actor, parameters or screenshots that succeeded.
    pub fn new(action: impl Into<String>) -> NewEvent {
        NewEvent {
            actor: None,
            action: action.into(),
            params: Vec::new(),
            outcome: Outcome::Ok,
            screenshot_before: None,
            screenshot_after: None,
            time_unix_nanos: None,
        }
    }

    /// Adds a parameter (redacted on append when its key names a secret).
    pub fn param(mut self, key: impl Into<String>, value: impl Into<String>) -> NewEvent {
        self.params.push(Param::new(key, value));
        self
    }

    /// Adds a parameter whose value is never recorded.
    pub fn secret_param(mut self, key: impl Into<String>) -> NewEvent {
        self.params.push(Param::secret(key));
        self
    }

    /// Sets the actor.
    pub fn actor(mut self, actor: Actor) -> NewEvent {
        self.actor = Some(actor);
        self
    }

    /// Sets the outcome.
    pub fn outcome(mut self, outcome: Outcome) -> NewEvent {
        self.outcome = outcome;
        self
    }

    /// Sets the screenshot hashes.
    pub fn screenshots(mut self, before: Option<[u8; 32]>, after: Option<[u8; 32]>) -> NewEvent {
        self.screenshot_before = before;
        self.screenshot_after = after;
        self
    }
}

/// A recorded event: one leaf of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the log, from 0, equal to the leaf index.
    pub seq: u64,
    pub time_unix_nanos: u64,
    pub actor: Option<Actor>,
    pub vm: String,
    pub action: String,
    pub params: Vec<Param>,
    pub outcome: Outcome,
    pub screenshot_before: Option<[u8; 32]>,
    pub screenshot_after: Option<[u8; 32]>,
}

impl Event {
    /// The record for `new` at `seq` in the log of `vm`, with secrets redacted and long
    /// values cut.
    pub fn from_new(new: NewEvent, seq: u64, vm: &str, now_unix_nanos: u64) -> Event {
        let mut params = new.params;
        redact(&mut params);
        for param in &mut params {
            cut_long_value(&mut param.value);
        }
        Event {
            seq,
            time_unix_nanos: new.time_unix_nanos.unwrap_or(now_unix_nanos),
            actor: new.actor,
            vm: vm.to_string(),
            action: new.action,
            params,
            outcome: new.outcome,
            screenshot_before: new.screenshot_before,
            screenshot_after: new.screenshot_after,
        }
    }

    /// The record body: the version byte, then the postcard encoding.
    pub fn encode(&self) -> Result<Vec<u8>, EventError> {
        let body = vec![RECORD_VERSION];
        postcard::to_extend(self, body).map_err(EventError::EncodeRecord)
    }

    /// Parses a record body. Untrusted input: errors, never panics.
    pub fn decode(body: &[u8]) -> Result<Event, EventError> {
        let (&version, rest) = body.split_first().ok_or(EventError::CheckEmpty)?;
        if version != RECORD_VERSION {
            return Err(EventError::CheckVersion(version));
        }
        let (event, unused) = postcard::take_from_bytes::<Event>(rest).map_err(EventError::DecodeRecord)?;
        if !unused.is_empty() {
            return Err(EventError::DecodeRecord(postcard::Error::DeserializeBadEncoding));
        }
        Ok(event)
    }

    /// The screenshots this event names, with which one each is.
    pub fn screenshots(&self) -> impl Iterator<Item = (&'static str, [u8; 32])> + '_ {
        [("screenshot_before", self.screenshot_before), ("screenshot_after", self.screenshot_after)]
            .into_iter()
            .filter_map(|(name, hash)| hash.map(|hash| (name, hash)))
    }
}

/// The current Unix time in nanoseconds (0 if the clock is before 1970).
pub fn now_unix_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event {
        let new = NewEvent::new("agent.exec")
            .actor(Actor { pid: 42, uid: 1000, gid: 1000 })
            .param("command", "ls -l")
            .param("api_key", "sk-live-123")
            .secret_param("stdin")
            .outcome(Outcome::Error("exit status 2".into()))
            .screenshots(Some([1; 32]), None);
        Event::from_new(new, 7, "vm-a", 1_700_000_000_000_000_000)
    }

    #[test]
    fn decode_of_encode_round_trips() {
        let event = sample();
        let body = event.encode().unwrap();
        assert_eq!(body[0], RECORD_VERSION);
        assert_eq!(Event::decode(&body).unwrap(), event);
    }

    #[test]
    fn from_new_with_secret_keys_redacts_values() {
        let event = sample();
        assert_eq!(event.params[0], Param::new("command", "ls -l"));
        assert_eq!(event.params[1], Param::new("api_key", REDACTED));
        assert_eq!(event.params[2], Param::new("stdin", REDACTED));
    }

    #[test]
    fn is_secret_key_matches_whole_segments_only() {
        for key in ["password", "X-Auth-Token", "ssh.private.key", "SECRET", "key"] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in ["keys", "keyboard", "monkey", "text", "x", "command"] {
            assert!(!is_secret_key(key), "{key}");
        }
    }

    #[test]
    fn from_new_with_long_value_cuts_it_at_char_boundary() {
        let long = "é".repeat(MAX_PARAM_VALUE_LEN);
        let event = Event::from_new(NewEvent::new("agent.write").param("data", long), 0, "vm", 0);
        let value = &event.params[0].value;
        assert!(value.starts_with(&"é".repeat(MAX_PARAM_VALUE_LEN / 2)));
        assert!(value.ends_with(&format!("...[{} more bytes not recorded]", MAX_PARAM_VALUE_LEN)));
    }

    #[test]
    fn decode_with_unknown_version_returns_error() {
        let mut body = sample().encode().unwrap();
        body[0] = 9;
        assert!(matches!(Event::decode(&body), Err(EventError::CheckVersion(9))));
    }

    #[test]
    fn decode_of_truncated_body_returns_error() {
        let body = sample().encode().unwrap();
        for cut in 0..body.len() {
            assert!(Event::decode(&body[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn decode_with_trailing_bytes_returns_error() {
        let mut body = sample().encode().unwrap();
        body.push(0);
        assert!(matches!(Event::decode(&body), Err(EventError::DecodeRecord(_))));
    }
}

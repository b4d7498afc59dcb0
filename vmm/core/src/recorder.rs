//! The one place requests are put on the audit record, whichever thread serves them.

use carrel_audit::{error_chain, Actor, AuditLog, NewEvent, Outcome};

/// Records served requests in the VM's audit log, when it has one.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    log: Option<AuditLog>,
}

/// What a request did, for its record.
#[derive(Debug, Default)]
pub struct Record<'a> {
    pub action: &'a str,
    pub params: Vec<(&'static str, String)>,
    pub error: Option<String>,
    /// The screenshot the caller received, stored as a blob and named by its hash.
    pub screenshot_after: Option<&'a [u8]>,
}

impl Recorder {
    pub fn new(log: Option<AuditLog>) -> Recorder {
        Recorder { log }
    }

    pub fn log(&self) -> Option<&AuditLog> {
        self.log.as_ref()
    }

    /// Appends `record` durably; `Err` says why, and the request must then fail.
    pub fn record(&self, peer: Option<(i32, u32, u32)>, record: Record<'_>) -> Result<(), String> {
        let Some(log) = &self.log else { return Ok(()) };
        let after = match record.screenshot_after {
            Some(bytes) => Some(*log.put_blob(bytes).map_err(|err| error_chain(&err))?.as_bytes()),
            None => None,
        };
        let outcome = match record.error {
            Some(message) => Outcome::Error(message),
            None => Outcome::Ok,
        };
        let mut event = NewEvent::new(record.action).outcome(outcome).screenshots(None, after);
        for (key, value) in record.params {
            event = event.param(key, value);
        }
        if let Some((pid, uid, gid)) = peer {
            event = event.actor(Actor { pid: pid as u32, uid, gid });
        }
        log.append(event).map(|_| ()).map_err(|err| error_chain(&err))
    }
}

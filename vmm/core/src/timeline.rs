//! Marks along a VM's start, for finding where its milliseconds go: with
//! `CARREL_TIMELINE=1` in its environment, carrel-vmm prints one stderr line of marks
//! (milliseconds since the process's start) when its vCPUs first run. Off, a mark costs
//! one relaxed load.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

const UNKNOWN: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
static MARKS: Mutex<Vec<(&'static str, Instant)>> = Mutex::new(Vec::new());

fn on() -> bool {
    match STATE.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on = env_flag("CARREL_TIMELINE");
            STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
    }
}

/// Whether the developer switch `name` is on in the environment: set, and not to "0".
pub fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|value| value != "0")
}

/// Writes `line` and a newline to stderr in one write. `eprintln!` on unbuffered stderr
/// makes a write of each formatted piece: a dozen system calls for a line on the way to
/// the guest's first instruction.
pub fn say(line: &str) {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    // As with eprintln!, a closed stderr leaves nobody to tell.
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), &bytes);
}

/// Notes that the start reached `label` now.
pub fn mark(label: &'static str) {
    if on() {
        let now = Instant::now();
        MARKS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push((label, now));
    }
}

/// The marks so far as `label ms` pairs after `started`, or `None` when marks are off.
pub fn take(started: Instant) -> Option<String> {
    if !on() {
        return None;
    }
    let marks = std::mem::take(&mut *MARKS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    Some(
        marks
            .iter()
            .map(|(label, at)| format!("{label} {:.2}", at.saturating_duration_since(started).as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

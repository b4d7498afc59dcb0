//! The VM's listening sockets (control, vsock) and an abrupt end that leaves none behind.
//!
//! A failure found on a thread that cannot unwind the VM (the lazy restore's loader) ends
//! the process at once. Binding and that end take one lock, so a socket is never bound
//! after the end removed the VM's socket files, which would leave a file no one listens
//! on that looks like a live VM.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

static GATE: Mutex<()> = Mutex::new(());

/// Binds a listening socket at `path`; waits out (forever) a process that is ending.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let _gate = GATE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    UnixListener::bind(path)
}

/// Removes the socket files at `paths` and ends the process with exit code `code`.
pub fn remove_and_exit(paths: &[PathBuf], code: i32) -> ! {
    let _gate = GATE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for path in paths {
        let _ = std::fs::remove_file(path);
    }
    std::process::exit(code)
}

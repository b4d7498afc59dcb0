//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};

use carrel_audit::{Actor, NewEvent, Outcome};

/// A directory removed when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let unique = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("carrel-audit-it-{name}-{}-{unique}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test directory");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The event the tests append as number `i`: its parameter `i` says which it is.
pub fn numbered_event(i: u64) -> NewEvent {
    NewEvent::new(if i % 3 == 0 { "input.click" } else { "input.type" })
        .actor(Actor { pid: 1000 + i as u32, uid: 1000, gid: 1000 })
        .param("i", i.to_string())
        .param("x", (i * 7 % 1024).to_string())
        .param("token", "hunter2")
        .outcome(if i % 5 == 4 { Outcome::Error("timed out".into()) } else { Outcome::Ok })
}

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A random u64 from the kernel.
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut bytes).unwrap();
    u64::from_le_bytes(bytes)
}

/// The only segment file of a log (tests that tamper use one segment).
pub fn only_segment(dir: &Path) -> PathBuf {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    assert_eq!(segments.len(), 1, "expected one segment");
    segments.pop().unwrap()
}

/// Byte ranges `(start, end)` of every frame in a segment file.
pub fn frame_ranges(segment: &[u8]) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    let mut offset = carrel_audit::segment::HEADER_LEN;
    while offset + 12 <= segment.len() {
        let length = u32::from_le_bytes(segment[offset..offset + 4].try_into().unwrap()) as usize;
        let end = offset + 12 + length;
        if length == 0 || end > segment.len() {
            break;
        }
        ranges.push((offset, end));
        offset = end;
    }
    ranges
}

//! Random corruption: a valid log is copied and damaged at random (a flipped byte or a cut
//! in any of its files, many times over). `verify` must report every damage and never
//! panic; reopening the log for writing must not panic either.

mod common;

use std::path::{Path, PathBuf};

use carrel_audit::verify::{verify_dir, VerifyOptions};
use carrel_audit::AuditLog;
use common::{copy_dir, numbered_event, TempDir};

const ITERATIONS: usize = 100;

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// xorshift64, seeded per run so a failure can be replayed from the printed seed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn randomly_damaged_logs_are_reported_by_verify_and_never_panic() {
    let work = TempDir::new("corrupt");
    let original = work.join("original");
    let log = AuditLog::open(&original, "vm-c").unwrap();
    let blob = log.put_blob(b"\\x89PNG\\r\\n\\x1a\\nscreenshot").unwrap();
    for i in 0..40 {
        let mut event = numbered_event(i);
        if i % 5 == 0 {
            event = event.screenshots(None, Some(*blob.as_bytes()));
        }
        log.append(event).unwrap();
        if i % 13 == 12 {
            log.checkpoint().unwrap();
        }
    }
    log.checkpoint().unwrap();
    drop(log);
    let clean = verify_dir(&original, &VerifyOptions::default()).unwrap();
    assert!(clean.findings.is_empty(), "the undamaged log verifies: {:?}", clean.findings);

    // Files whose every byte is evidence, and the stored tree. The lock, the origin name,
    // the tree's sync mark (`tree/durable`) and the private key are the writer's own:
    // verify reads none of them.
    let targets: Vec<PathBuf> = files_under(&original)
        .into_iter()
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            !name.contains("lock")
                && !name.contains("origin")
                && name != "durable"
                && name != "host.key"
                && std::fs::metadata(path).unwrap().len() > 0
        })
        .collect();
    assert!(targets.len() >= 4, "segment, tree, checkpoints, blob: {targets:?}");

    let mut seed = common::random_u64() | 1;
    eprintln!("seed {seed:#x}");
    for iteration in 0..ITERATIONS {
        let copy = work.join(&format!("copy-{iteration}"));
        copy_dir(&original, &copy);
        let target = &targets[(next(&mut seed) as usize) % targets.len()];
        let damaged = copy.join(target.strip_prefix(&original).unwrap());
        let mut bytes = std::fs::read(&damaged).unwrap();
        let before = bytes.clone();
        let what = if next(&mut seed) % 4 == 0 {
            let cut = (next(&mut seed) as usize) % bytes.len();
            bytes.truncate(cut);
            format!("cut to {cut} bytes")
        } else {
            let index = (next(&mut seed) as usize) % bytes.len();
            bytes[index] ^= (next(&mut seed) as u8) | 1;
            format!("byte {index} flipped")
        };
        std::fs::write(&damaged, &bytes).unwrap();
        // Cutting off only a text file's trailing newline (host.pub is hex and a newline)
        // leaves its content whole: nothing to find.
        if bytes.trim_ascii_end() == before.trim_ascii_end() {
            continue;
        }

        // Damage to evidence is a finding. The stored tree is a cache verify never trusts:
        // a changed hash is a finding, missing hashes are at least a warning.
        let in_tree_cache = damaged.parent().is_some_and(|dir| dir.ends_with("tree"));
        match verify_dir(&copy, &VerifyOptions::default()) {
            Err(_) => {}
            Ok(report) => assert!(
                !report.findings.is_empty() || (in_tree_cache && !report.warnings.is_empty()),
                "{} {what}: verify found nothing (seed {seed:#x})",
                damaged.display()
            ),
        }
        // Opening for writing either recovers (cutting a torn tail) or refuses; it never
        // panics and never claims damage it cannot see.
        let _ = AuditLog::open(&copy, "vm-c");
        std::fs::remove_dir_all(&copy).unwrap();
    }
}

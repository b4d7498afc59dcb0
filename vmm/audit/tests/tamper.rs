//! Tamper tests: a log is changed the ways an attacker (or a lying host) would change it,
//! and `verify` must fail and name what was changed.

mod common;

use std::path::PathBuf;
use std::process::Command;

use carrel_audit::checkpoint::{HostKey, SignedCheckpoint};
use carrel_audit::segment::{encode_frame, encode_header};
use carrel_audit::tree::leaf_hash;
use carrel_audit::verify::{verify_dir, Finding, VerifyOptions, VerifyReport};
use carrel_audit::{AuditLog, Event};
use common::{frame_ranges, numbered_event, only_segment, TempDir};

const RECORDS: u64 = 20;

/// A log of 20 events (events 3, 7 and 11 with screenshots), checkpoints at 10 and 20, and
/// a copy of the size-10 checkpoint kept outside, as an auditor would.
struct Fixture {
    dir: TempDir,
    external_checkpoint: PathBuf,
    screenshot: [u8; 32],
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir = TempDir::new(name);
        let log_dir = dir.join("log-dir");
        let log = AuditLog::open(&log_dir, "vm-t").unwrap();
        let shots =
            [log.put_blob(b"\x89PNG\r\n\x1a\nscreen a").unwrap(), log.put_blob(b"\x89PNG\r\n\x1a\nscreen b").unwrap()];
        let external_checkpoint = dir.join("kept.ckpt");
        for i in 0..RECORDS {
            let mut event = numbered_event(i);
            if i % 4 == 3 {
                event = event.screenshots(Some(*shots[0].as_bytes()), Some(*shots[1].as_bytes()));
            }
            log.append(event).unwrap();
            if i == 9 {
                let kept = log.checkpoint().unwrap();
                std::fs::write(&external_checkpoint, kept.to_text()).unwrap();
            }
        }
        log.checkpoint().unwrap();
        drop(log);
        Fixture { dir, external_checkpoint, screenshot: *shots[1].as_bytes() }
    }

    fn log_dir(&self) -> PathBuf {
        self.dir.join("log-dir")
    }

    fn verify(&self) -> VerifyReport {
        verify_dir(&self.log_dir(), &VerifyOptions { key: None, checkpoints: vec![self.external_checkpoint.clone()] })
            .unwrap()
    }

    /// Record bodies of the (only) segment.
    fn bodies(&self) -> Vec<Vec<u8>> {
        let bytes = std::fs::read(only_segment(&self.log_dir())).unwrap();
        frame_ranges(&bytes).into_iter().map(|(start, end)| bytes[start + 12..end].to_vec()).collect()
    }

    /// Rewrites the segment from bodies with valid frames, as an attacker who knows the
    /// format would.
    fn write_bodies(&self, bodies: &[Vec<u8>]) {
        let mut bytes = encode_header(0).to_vec();
        for body in bodies {
            encode_frame(body, &leaf_hash(body), &mut bytes);
        }
        std::fs::write(only_segment(&self.log_dir()), bytes).unwrap();
    }
}

fn run_cli(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_carrel-audit")).args(args).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_finding(report: &VerifyReport, wanted: impl Fn(&Finding) -> bool, what: &str) {
    assert!(!report.ok(), "verify passed a log with {what}");
    assert!(report.findings.iter().any(wanted), "no finding names {what}:\n{}", report.lines(None).join("\n"));
}

#[test]
fn verify_of_untouched_log_passes_with_cli_ok() {
    let fixture = Fixture::new("tamper-none");
    let report = fixture.verify();
    assert!(report.ok(), "{}", report.lines(None).join("\n"));
    assert_eq!(report.records, RECORDS);
    assert_eq!(report.checkpoints.len(), 3);
    assert!(report.checkpoints.iter().all(|c| c.ok));
    assert_eq!(report.blobs_checked, 2);
    let log_dir = fixture.log_dir();
    let checkpoint = fixture.external_checkpoint.to_str().unwrap();
    let (code, stdout, _) = run_cli(&["verify", log_dir.to_str().unwrap(), "--checkpoint", checkpoint]);
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(stdout.lines().last(), Some("OK"));
}

#[test]
fn verify_after_one_byte_changed_in_record_names_record() {
    let fixture = Fixture::new("tamper-byte");
    let segment = only_segment(&fixture.log_dir());
    let mut bytes = std::fs::read(&segment).unwrap();
    let (start, end) = frame_ranges(&bytes)[7];
    bytes[(start + end) / 2] ^= 0x01;
    std::fs::write(&segment, &bytes).unwrap();
    let report = fixture.verify();
    assert_finding(&report, |f| matches!(f, Finding::RecordCheck { index: 7, .. }), "record 7");
    let log_dir = fixture.log_dir();
    let (code, stdout, _) = run_cli(&["verify", log_dir.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stdout.contains("FAIL record 7 ("), "{stdout}");
}

#[test]
fn verify_after_record_rewritten_with_valid_frame_names_record_and_checkpoints() {
    let fixture = Fixture::new("tamper-rewrite");
    let mut bodies = fixture.bodies();
    let mut event = Event::decode(&bodies[7]).unwrap();
    event.action = "input.nothing_to_see".into();
    bodies[7] = event.encode().unwrap();
    fixture.write_bodies(&bodies);
    let report = fixture.verify();
    assert_finding(&report, |f| matches!(f, Finding::StoredTreeNode { level: 0, index: 7 }), "record 7's leaf");
    assert_finding(&report, |f| matches!(f, Finding::CheckpointRoot { size: 10, .. }), "checkpoint at 10");
    assert_finding(&report, |f| matches!(f, Finding::CheckpointRoot { size: 20, .. }), "checkpoint at 20");
    assert!(report.lines(None).iter().any(|line| line.starts_with("FAIL record 7: its leaf hash differs")));
}

#[test]
fn verify_after_record_and_stored_tree_rewritten_names_checkpoints() {
    let fixture = Fixture::new("tamper-rewrite-tree");
    let mut bodies = fixture.bodies();
    let mut event = Event::decode(&bodies[12]).unwrap();
    event.params.clear();
    bodies[12] = event.encode().unwrap();
    fixture.write_bodies(&bodies);
    std::fs::remove_dir_all(fixture.log_dir().join("tree")).unwrap();
    let report = fixture.verify();
    assert_finding(
        &report,
        |f| matches!(f, Finding::CheckpointRoot { size: 20, last_good_size: Some(10), .. }),
        "the checkpoint at 20 with the change after record 10",
    );
    assert!(report.checkpoints.iter().filter(|c| c.size == 10).all(|c| c.ok));
}

#[test]
fn verify_after_two_records_swapped_names_both() {
    let fixture = Fixture::new("tamper-swap");
    let mut bodies = fixture.bodies();
    bodies.swap(4, 5);
    fixture.write_bodies(&bodies);
    let report = fixture.verify();
    assert_finding(&report, |f| matches!(f, Finding::RecordSequence { index: 4, seq: 5, .. }), "record 4");
    assert_finding(&report, |f| matches!(f, Finding::RecordSequence { index: 5, seq: 4, .. }), "record 5");
}

#[test]
fn verify_after_last_record_dropped_names_checkpoint() {
    let fixture = Fixture::new("tamper-drop");
    let mut bodies = fixture.bodies();
    bodies.pop();
    fixture.write_bodies(&bodies);
    let report = fixture.verify();
    assert_finding(
        &report,
        |f| matches!(f, Finding::CheckpointBeyondLog { size: 20, records: 19, .. }),
        "the checkpoint that covers the dropped record",
    );
}

#[test]
fn verify_after_screenshot_blob_replaced_names_blob_and_record() {
    let fixture = Fixture::new("tamper-blob");
    let store = carrel_audit::blob::BlobStore::at(&fixture.log_dir().join("blobs"));
    std::fs::write(store.path(&fixture.screenshot), b"\x89PNG\r\n\x1a\na nicer screen").unwrap();
    let report = fixture.verify();
    assert_finding(
        &report,
        |f| matches!(f, Finding::BlobContent { referenced_by: Some(3), .. }),
        "the replaced screenshot of record 3",
    );
}

#[test]
fn verify_after_screenshot_blob_deleted_names_record() {
    let fixture = Fixture::new("tamper-blob-gone");
    let store = carrel_audit::blob::BlobStore::at(&fixture.log_dir().join("blobs"));
    std::fs::remove_file(store.path(&fixture.screenshot)).unwrap();
    let report = fixture.verify();
    assert_finding(
        &report,
        |f| matches!(f, Finding::BlobMissing { index: 3, field: "screenshot_after", .. }),
        "the missing screenshot of record 3",
    );
}

#[test]
fn verify_of_forged_checkpoint_names_it() {
    let fixture = Fixture::new("tamper-forge");
    let path = fixture.log_dir().join("checkpoints").join("00000000000000000020.ckpt");
    let text = std::fs::read_to_string(&path).unwrap();
    let forged = text.replace("size 20", "size 19");
    assert_ne!(forged, text);
    std::fs::write(&path, forged).unwrap();
    let report = fixture.verify();
    assert_finding(
        &report,
        |f| matches!(f, Finding::CheckpointSignature { path: p, .. } if *p == path),
        "the forged checkpoint",
    );
    let log_dir = fixture.log_dir();
    let (code, stdout, _) = run_cli(&["verify", log_dir.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stdout.contains("00000000000000000020.ckpt: the checkpoint signature does not verify"), "{stdout}");
}

#[test]
fn verify_with_pinned_key_rejects_log_resigned_with_other_key() {
    let fixture = Fixture::new("tamper-other-key");
    let log_dir = fixture.log_dir();
    let real_key = carrel_audit::checkpoint::read_public_key(&log_dir.join("host.pub")).unwrap();
    // The attacker replaces the key and re-signs every checkpoint with it.
    let forger = HostKey::load_or_create(&fixture.dir.join("forger.key")).unwrap();
    for entry in std::fs::read_dir(log_dir.join("checkpoints")).unwrap() {
        let path = entry.unwrap().path();
        let signed = SignedCheckpoint::read(&path).unwrap();
        std::fs::write(&path, forger.sign(signed.checkpoint).to_text()).unwrap();
    }
    carrel_audit::checkpoint::write_public_key(&log_dir.join("host.pub"), &forger.public_key()).unwrap();
    let report = verify_dir(&log_dir, &VerifyOptions { key: Some(real_key), checkpoints: vec![] }).unwrap();
    assert_finding(&report, |f| matches!(f, Finding::CheckpointSignature { .. }), "the re-signed checkpoints");
}

#[test]
fn verify_with_kept_checkpoint_after_history_rewritten_fails() {
    let fixture = Fixture::new("tamper-history");
    let log_dir = fixture.log_dir();
    // The host rewrites record 3, throws away its tree and checkpoints, and signs anew with
    // its real key: the log is self-consistent, but not with what the auditor kept.
    let mut bodies = fixture.bodies();
    let mut event = Event::decode(&bodies[3]).unwrap();
    event.screenshot_after = None;
    bodies[3] = event.encode().unwrap();
    fixture.write_bodies(&bodies);
    std::fs::remove_dir_all(log_dir.join("tree")).unwrap();
    std::fs::remove_dir_all(log_dir.join("checkpoints")).unwrap();
    let log = AuditLog::open(&log_dir, "vm-t").unwrap();
    log.checkpoint().unwrap();
    drop(log);
    let own = verify_dir(&log_dir, &VerifyOptions::default()).unwrap();
    assert!(own.ok(), "the rewritten log is self-consistent:\n{}", own.lines(None).join("\n"));
    let report = fixture.verify();
    assert_finding(
        &report,
        |f| matches!(f, Finding::CheckpointRoot { path, size: 10, .. } if *path == fixture.external_checkpoint),
        "the kept checkpoint",
    );
}

#[test]
fn verify_with_kept_checkpoint_of_grown_log_passes() {
    let fixture = Fixture::new("tamper-grown");
    let log = AuditLog::open(&fixture.log_dir(), "vm-t").unwrap();
    for i in RECORDS..RECORDS + 15 {
        log.append(numbered_event(i)).unwrap();
    }
    drop(log);
    let report = fixture.verify();
    assert!(report.ok(), "{}", report.lines(None).join("\n"));
    assert!(report.checkpoints.iter().any(|c| c.external && c.ok && c.size == 10));
    assert_eq!(report.unsigned_records, 15);
}

#[test]
fn verify_of_copy_with_torn_tail_reports_it() {
    let fixture = Fixture::new("tamper-torn");
    let segment = only_segment(&fixture.log_dir());
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3]);
    std::fs::write(&segment, &bytes).unwrap();
    let report = fixture.verify();
    assert_finding(&report, |f| matches!(f, Finding::TornTail { after_record: 20, .. }), "the torn tail");
}

#[test]
fn verify_of_missing_directory_returns_error() {
    let dir = TempDir::new("tamper-missing");
    assert!(verify_dir(&dir.join("nothing"), &VerifyOptions::default()).is_err());
    let (code, _, stderr) = run_cli(&["verify", dir.join("nothing").to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is not a log directory"), "{stderr}");
}

#[test]
fn verify_after_stored_tree_node_changed_names_that_node_only() {
    let fixture = Fixture::new("tamper-tree-node");
    let level = fixture.log_dir().join("tree").join("level-02.hashes");
    let mut bytes = std::fs::read(&level).unwrap();
    bytes[32 * 3] ^= 0x40; // node (2, 3): records 12..16
    std::fs::write(&level, &bytes).unwrap();
    let report = fixture.verify();
    let tree_findings: Vec<&Finding> =
        report.findings.iter().filter(|f| matches!(f, Finding::StoredTreeNode { .. })).collect();
    assert_eq!(
        tree_findings,
        vec![&Finding::StoredTreeNode { level: 2, index: 3 }],
        "{}",
        report.lines(None).join("\n")
    );
    assert!(report.checkpoints.iter().all(|c| c.ok), "the records still match every checkpoint");
}

//! The writer through its public API: appends, group commit, reopen, recovery, proofs,
//! checkpoints, blobs, and the tools that read a log (export, replay, verify).

mod common;

use std::sync::Arc;

use carrel_audit::audit::DEFAULT_SEGMENT_BYTES;
use carrel_audit::reader::for_each_event;
use carrel_audit::tree;
use carrel_audit::{verify_dir, AuditConfig, AuditError, AuditLog, Event, NewEvent, Param, VerifyOptions};
use common::{frame_ranges, numbered_event, only_segment, TempDir};

fn events(dir: &std::path::Path) -> Vec<Event> {
    let mut all = Vec::new();
    for_each_event(&dir.join("log"), 0, |event, _| {
        all.push(event.clone());
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    all
}

fn assert_verifies(dir: &std::path::Path) {
    let report = verify_dir(dir, &VerifyOptions::default()).unwrap();
    assert!(report.ok(), "{}", report.lines(None).join("\n"));
}

#[test]
fn append_returns_consecutive_sequence_numbers_and_redacts() {
    let dir = TempDir::new("append-seq");
    let log = AuditLog::open(dir.path(), "vm-1").unwrap();
    for i in 0..10 {
        assert_eq!(log.append(numbered_event(i)).unwrap(), i);
    }
    assert_eq!(log.size(), 10);
    drop(log);
    let all = events(dir.path());
    assert_eq!(all.len(), 10);
    assert_eq!(all[3].params[0], Param::new("i", "3"));
    assert_eq!(all[3].params[2], Param::new("token", "[redacted]"));
    assert_eq!(all[3].vm, "vm-1");
    assert_verifies(dir.path());
}

#[test]
fn append_from_many_threads_shares_fsyncs() {
    let dir = TempDir::new("group-commit");
    let log = AuditLog::open(dir.path(), "vm-1").unwrap();
    let threads = 8;
    let per_thread = 200;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..per_thread).map(|i| log.append(numbered_event(t * 1000 + i)).unwrap()).collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..threads * per_thread).collect::<Vec<_>>());
    assert!(
        log.commits() < threads * per_thread,
        "{} commits for {} appends: no group commit",
        log.commits(),
        threads * per_thread
    );
    drop(log);
    assert_verifies(dir.path());
}

#[test]
fn append_buffered_is_durable_after_sync() {
    let dir = TempDir::new("buffered");
    let log = AuditLog::open(dir.path(), "vm-1").unwrap();
    for i in 0..100 {
        log.append_buffered(numbered_event(i)).unwrap();
    }
    assert_eq!(log.size(), 0);
    assert_eq!(log.sync().unwrap(), 100);
    assert_eq!(log.commits(), 1);
    assert_eq!(events(dir.path()).len(), 100);
}

#[test]
fn drop_of_last_handle_writes_buffered_events() {
    let dir = TempDir::new("drop-flush");
    {
        let log = AuditLog::open(dir.path(), "vm-1").unwrap();
        log.append_buffered(numbered_event(0)).unwrap();
        log.append_buffered(numbered_event(1)).unwrap();
    }
    let log = AuditLog::open(dir.path(), "vm-1").unwrap();
    assert_eq!(log.size(), 2);
}

#[test]
fn reopen_continues_sequence_and_tree() {
    let dir = TempDir::new("reopen");
    let first_root;
    {
        let log = AuditLog::open(dir.path(), "vm-1").unwrap();
        for i in 0..5 {
            log.append(numbered_event(i)).unwrap();
        }
        first_root = log.root(5).unwrap();
    }
    let log = AuditLog::open(dir.path(), "vm-1").unwrap();
    assert!(!log.recovery().repaired());
    assert_eq!(log.append(numbered_event(5)).unwrap(), 5);
    assert_eq!(log.root(5).unwrap(), first_root);
    let proof = log.consistency_proof(5, 6).unwrap();
    tree::verify_consistency(5, 6, &first_root, &log.root(6).unwrap(), &proof).unwrap();
}

#[test]
fn open_while_another_writer_holds_log_returns_lock_error() {
    let dir = TempDir::new("lock");
    let _log = AuditLog::open(dir.path(), "vm-1").unwrap();
    assert!(matches!(AuditLog::open(dir.path(), "vm-1"), Err(AuditError::LockLog { .. })));
}

#[test]
fn open_with_other_vm_returns_origin_error() {
    let dir = TempDir::new("origin");
    drop(AuditLog::open(dir.path(), "vm-1").unwrap());
    assert!(matches!(AuditLog::open(dir.path(), "vm-2"), Err(AuditError::CheckOrigin { .. })));
}

#[test]
fn open_with_bad_vm_id_returns_error() {
    let dir = TempDir::new("bad-vm");
    assert!(matches!(AuditLog::open(dir.path(), "vm 1\n"), Err(AuditError::CheckVm { .. })));
}

#[test]
fn checkpoint_signs_root_that_proofs_verify_against() {
    let dir = TempDir::new("checkpoint-proofs");
    let log = AuditLog::open(dir.path(), "vm-1").unwrap();
    for i in 0..37 {
        log.append(numbered_event(i)).unwrap();
    }
    let early = log.checkpoint().unwrap();
    for i in 37..100 {
        log.append(numbered_event(i)).unwrap();
    }
    let late = log.checkpoint().unwrap();
    late.verify(&log.public_key()).unwrap();
    assert_eq!(late.checkpoint.tree_size, 100);
    for index in [0, 36, 37, 99] {
        let proof = log.inclusion_proof(index, 100).unwrap();
        let leaf = log.leaf_hash(index).unwrap();
        tree::verify_inclusion(&leaf, index, 100, &proof, &late.checkpoint.root).unwrap();
    }
    let proof = log.consistency_proof(37, 100).unwrap();
    tree::verify_consistency(37, 100, &early.checkpoint.root, &late.checkpoint.root, &proof).unwrap();
    assert!(matches!(log.inclusion_proof(0, 101), Err(AuditError::CheckTreeSize { .. })));
    drop(log);
    assert_verifies(dir.path());
}

#[test]
fn segments_rotate_and_verify_across_them() {
    let dir = TempDir::new("rotate");
    let config = AuditConfig { segment_bytes: 2048, ..AuditConfig::new("vm-1") };
    let log = AuditLog::open_with(dir.path(), config.clone()).unwrap();
    for i in 0..200 {
        log.append(numbered_event(i)).unwrap();
    }
    log.checkpoint().unwrap();
    drop(log);
    let segments = std::fs::read_dir(dir.join("log")).unwrap().count();
    assert!(segments > 5, "{segments} segments");
    let log = AuditLog::open_with(dir.path(), config).unwrap();
    assert_eq!(log.size(), 200);
    drop(log);
    assert_eq!(events(dir.path()).len(), 200);
    assert_verifies(dir.path());
}

#[test]
fn open_after_torn_tail_cuts_it_and_keeps_it_aside() {
    let dir = TempDir::new("torn-tail");
    {
        let log = AuditLog::open(dir.path(), "vm-1").unwrap();
        for i in 0..10 {
            log.append(numbered_event(i)).unwrap();
        }
    }
    let segment = only_segment(dir.path());
    let mut bytes = std::fs::read(&segment).unwrap();
    let whole = bytes.len();
    // Half of a record that was being written when the host died.
    let (start, end) = frame_ranges(&bytes)[9];
    let half: Vec<u8> = bytes[start..start + (end - start) / 2].to_vec();
    bytes.extend_from_slice(&half);
    std::fs::write(&segment, &bytes).unwrap();

    let log = AuditLog::open(dir.path(), "vm-1").unwrap();
    let cut = log.recovery().cut_tail.clone().expect("a cut tail");
    assert_eq!(cut.offset, whole as u64);
    assert_eq!(std::fs::read(&cut.saved_to).unwrap(), half);
    assert_eq!(log.size(), 10);
    assert_eq!(log.append(numbered_event(10)).unwrap(), 10);
    drop(log);
    assert_verifies(dir.path());
}

#[test]
fn open_after_garbage_tail_with_bad_check_cuts_it() {
    let dir = TempDir::new("garbage-tail");
    {
        let log = AuditLog::open(dir.path(), "vm-1").unwrap();
        for i in 0..4 {
            log.append(numbered_event(i)).unwrap();
        }
    }
    let segment = only_segment(dir.path());
    let mut bytes = std::fs::read(&segment).unwrap();
    let whole = bytes.len();
    // A complete-looking frame whose body was not fully written (zeros).
    let (start, end) = frame_ranges(&bytes)[3];
    let mut torn = bytes[start..end].to_vec();
    let body_start = 12 + (end - start) / 2;
    torn[body_start..].fill(0);
    bytes.extend_from_slice(&torn);
    std::fs::write(&segment, &bytes).unwrap();

    let log = AuditLog::open(dir.path(), "vm-1").unwrap();
    let cut = log.recovery().cut_tail.clone().expect("a cut tail");
    assert_eq!(cut.offset, whole as u64);
    assert_eq!(log.size(), 4);
}

#[test]
fn open_with_damage_before_checkpoint_refuses() {
    let dir = TempDir::new("damage-before-checkpoint");
    {
        let log = AuditLog::open(dir.path(), "vm-1").unwrap();
        for i in 0..6 {
            log.append(numbered_event(i)).unwrap();
        }
        log.checkpoint().unwrap();
    }
    let segment = only_segment(dir.path());
    let mut bytes = std::fs::read(&segment).unwrap();
    let (start, _) = frame_ranges(&bytes)[2];
    bytes[start + 14] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();
    let error = AuditLog::open(dir.path(), "vm-1").unwrap_err();
    assert!(matches!(error, AuditError::RecoverSegment { .. }), "{error}");
    // Nothing was cut.
    assert_eq!(std::fs::read(&segment).unwrap(), bytes);
}

#[test]
fn open_after_lost_tree_rebuilds_it_from_records() {
    let dir = TempDir::new("lost-tree");
    let root;
    {
        let log = AuditLog::open(dir.path(), "vm-1").unwrap();
        for i in 0..50 {
            log.append(numbered_event(i)).unwrap();
        }
        root = log.checkpoint().unwrap().checkpoint.root;
    }
    std::fs::remove_dir_all(dir.join("tree")).unwrap();
    let log = AuditLog::open(dir.path(), "vm-1").unwrap();
    assert_eq!(log.recovery().tree_rebuilt_from, Some(0));
    assert_eq!(log.root(50).unwrap(), root);
}

#[test]
fn open_after_tree_disagrees_with_checkpoint_rebuilds_it() {
    let dir = TempDir::new("bad-tree");
    let root;
    {
        let log = AuditLog::open(dir.path(), "vm-1").unwrap();
        for i in 0..16 {
            log.append(numbered_event(i)).unwrap();
        }
        root = log.checkpoint().unwrap().checkpoint.root;
    }
    let level = dir.join("tree").join("level-04.hashes");
    std::fs::write(&level, [0u8; 32]).unwrap();
    let log = AuditLog::open(dir.path(), "vm-1").unwrap();
    assert_eq!(log.recovery().tree_rebuilt_from, Some(0));
    assert_eq!(log.root(16).unwrap(), root);
}

#[test]
fn open_after_cut_short_rotation_removes_empty_segment() {
    let dir = TempDir::new("cut-rotation");
    let config = AuditConfig { segment_bytes: 1024, ..AuditConfig::new("vm-1") };
    {
        let log = AuditLog::open_with(dir.path(), config.clone()).unwrap();
        for i in 0..20 {
            log.append(numbered_event(i)).unwrap();
        }
    }
    let size = events(dir.path()).len() as u64;
    let name = carrel_audit::segment::segment_file_name(size);
    std::fs::write(dir.join("log").join(name), b"CRLAU").unwrap();
    let log = AuditLog::open_with(dir.path(), config).unwrap();
    assert_eq!(log.recovery().removed_segments.len(), 1);
    assert_eq!(log.append(numbered_event(20)).unwrap(), 20);
    drop(log);
    assert_verifies(dir.path());
}

#[test]
fn append_of_huge_event_is_cut_not_refused() {
    let dir = TempDir::new("huge");
    let log = AuditLog::open(dir.path(), "vm-1").unwrap();
    let event = NewEvent::new("agent.write_file").param("contents", "x".repeat(10 << 20));
    log.append(event).unwrap();
    drop(log);
    let recorded = &events(dir.path())[0].params[0].value;
    assert!(recorded.len() < 5000, "{} bytes recorded", recorded.len());
}

#[test]
fn put_blob_deduplicates_and_verify_checks_it() {
    let dir = TempDir::new("blob-log");
    let log = AuditLog::open(dir.path(), "vm-1").unwrap();
    let first = log.put_blob(b"\x89PNG\r\n\x1a\nscreen one").unwrap();
    let again = log.put_blob(b"\x89PNG\r\n\x1a\nscreen one").unwrap();
    assert_eq!(first, again);
    log.append(NewEvent::new("screenshot").screenshots(None, Some(*first.as_bytes()))).unwrap();
    log.checkpoint().unwrap();
    drop(log);
    let report = verify_dir(dir.path(), &VerifyOptions::default()).unwrap();
    assert!(report.ok(), "{}", report.lines(None).join("\n"));
    assert_eq!(report.blobs_checked, 1);
}

#[test]
fn log_handle_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync + Clone>(_: &T) {}
    let dir = TempDir::new("send-sync");
    let log = Arc::new(AuditLog::open(dir.path(), "vm-1").unwrap());
    assert_send_sync(&*log);
    assert_eq!(DEFAULT_SEGMENT_BYTES, 32 << 20);
}

#[test]
fn export_jsonl_writes_one_line_per_record_with_leaf_hash() {
    let dir = TempDir::new("export");
    let log = AuditLog::open(dir.path(), "vm-1").unwrap();
    for i in 0..7 {
        log.append(numbered_event(i)).unwrap();
    }
    let leaf3 = log.leaf_hash(3).unwrap();
    drop(log);
    let mut out = Vec::new();
    carrel_audit::export::export_jsonl(dir.path(), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(lines.len(), 7);
    assert_eq!(lines[3]["seq"], 3);
    assert_eq!(lines[3]["leaf_hash"], carrel_audit::codec::to_hex(&leaf3));
    assert_eq!(lines[4]["result"], "error");
    assert_eq!(lines[4]["params"][2]["value"], "[redacted]");
}

#[test]
fn replay_embeds_screenshots_and_escapes_markup() {
    let dir = TempDir::new("replay");
    let log = AuditLog::open(dir.path(), "vm-1").unwrap();
    let png = b"\x89PNG\r\n\x1a\nnot really a png";
    let shot = log.put_blob(png).unwrap();
    log.append(
        NewEvent::new("input.type")
            .param("text", "</script><script>alert(1)</script>")
            .screenshots(Some(*shot.as_bytes()), Some(*shot.as_bytes())),
    )
    .unwrap();
    drop(log);
    let mut page = Vec::new();
    let summary = carrel_audit::replay::write_replay(dir.path(), &mut page).unwrap();
    let page = String::from_utf8(page).unwrap();
    assert_eq!(summary.events, 1);
    assert_eq!(summary.screenshots, 1);
    assert_eq!(page.matches("data:image/png;base64,").count(), 1);
    assert!(!page.contains("<script>alert(1)"));
    assert_eq!(page.matches("</script>").count(), 2, "only the page's own script ends");
}

#[test]
fn replay_with_replaced_blob_shows_it_altered_not_as_image() {
    let dir = TempDir::new("replay-altered");
    let log = AuditLog::open(dir.path(), "vm-1").unwrap();
    let shot = log.put_blob(b"\x89PNG\r\n\x1a\nthe real screen").unwrap();
    log.append(NewEvent::new("screenshot").screenshots(None, Some(*shot.as_bytes()))).unwrap();
    drop(log);
    let store = carrel_audit::blob::BlobStore::at(&dir.join("blobs"));
    std::fs::write(store.path(shot.as_bytes()), b"\x89PNG\r\n\x1a\na fake screen").unwrap();
    let mut page = Vec::new();
    let summary = carrel_audit::replay::write_replay(dir.path(), &mut page).unwrap();
    let page = String::from_utf8(page).unwrap();
    assert_eq!(summary.bad_screenshots, 1);
    assert!(!page.contains("data:image/png"));
    assert!(page.contains("ALTERED"));
}

//! The store against simulated disks: round trips, limits, and crashes at every point.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use crate::testing::{CrashDisk, PowerLoss, Rng};
use crate::{inspect, DiskContents, Store, StoreError, BLOCK_SIZE};

/// Path -> (mode, content): what the store should show.
type Model = BTreeMap<String, (u32, Vec<u8>)>;

const SMALL_DISK: u64 = 256;

fn formatted(blocks: u64) -> Store<CrashDisk> {
    Store::format(CrashDisk::new(blocks)).expect("a blank disk formats")
}

fn remount(store: Store<CrashDisk>) -> Store<CrashDisk> {
    Store::mount(store.into_device()).expect("the store mounts")
}

/// Everything the store shows, content read back from the disk.
fn contents(store: &mut Store<CrashDisk>) -> Model {
    let listing: Vec<(String, u32)> = store.files().iter().map(|(path, entry)| (path.clone(), entry.mode)).collect();
    listing
        .into_iter()
        .map(|(path, mode)| {
            let data = store.get(&path).unwrap_or_else(|err| panic!("{path}: {err}"));
            (path, (mode, data))
        })
        .collect()
}

#[test]
fn put_get_round_trips_across_a_remount() {
    let mut store = formatted(SMALL_DISK);
    assert_eq!(store.generation(), 1);
    let sizes = [0usize, 1, 4095, 4096, 4097, 3 * BLOCK_SIZE + 17];
    let mut rng = Rng::new(1);
    let mut model = Model::new();
    for (index, size) in sizes.iter().enumerate() {
        let path = format!("/dir/file{index}");
        let data = rng.bytes(*size);
        store.put(&path, 0o600 + index as u32, &data).unwrap();
        model.insert(path, (0o600 + index as u32, data));
    }
    assert_eq!(store.generation(), 1 + sizes.len() as u64);
    assert_eq!(contents(&mut store), model);
    let mut store = remount(store);
    assert_eq!(store.generation(), 1 + sizes.len() as u64);
    assert_eq!(contents(&mut store), model);
    assert_eq!(store.stat("/dir/file3").map(|entry| entry.size), Some(4096));
    assert_eq!(
        store.stat("/dir/file3").map(|entry| entry.digest),
        Some(*blake3::hash(&model["/dir/file3"].1).as_bytes())
    );
}

#[test]
fn many_files_survive_a_remount() {
    let mut store = formatted(4096);
    let mut model = Model::new();
    for index in 0..600u32 {
        let path = format!("/many/{:04}/name-that-takes-some-room-{index}", index % 37);
        let data = format!("file {index}").into_bytes();
        store.put(&path, 0o644, &data).unwrap();
        model.insert(path, (0o644, data));
    }
    let mut store = remount(store);
    assert_eq!(store.files().len(), 600);
    assert_eq!(contents(&mut store), model);
}

#[test]
fn overwrite_replaces_content_and_frees_the_old_blocks() {
    let mut store = formatted(SMALL_DISK);
    let free_at_start = store.free_bytes();
    store.put("/f", 0o644, &[1; 40_000]).unwrap();
    store.put("/f", 0o600, b"short").unwrap();
    assert_eq!(store.get("/f").unwrap(), b"short");
    assert_eq!(store.stat("/f").unwrap().mode, 0o600);
    // One block of data, the same one block of file table as before.
    assert_eq!(store.free_bytes(), free_at_start - BLOCK_SIZE as u64);
    let mut store = remount(store);
    assert_eq!(store.get("/f").unwrap(), b"short");
    assert_eq!(store.free_bytes(), free_at_start - BLOCK_SIZE as u64);
}

#[test]
fn remove_and_remove_prefix_forget_files() {
    let mut store = formatted(SMALL_DISK);
    for path in ["/a", "/d/x", "/d/y/z", "/dz"] {
        store.put(path, 0o644, path.as_bytes()).unwrap();
    }
    store.remove("/a").unwrap();
    assert!(matches!(store.remove("/a"), Err(StoreError::NotFound { .. })));
    assert!(matches!(store.get("/a"), Err(StoreError::NotFound { .. })));
    assert_eq!(store.remove_prefix("/d/").unwrap(), 2);
    let generation = store.generation();
    assert_eq!(store.remove_prefix("/nothing/").unwrap(), 0);
    assert_eq!(store.generation(), generation, "removing nothing commits nothing");
    let store = remount(store);
    assert_eq!(store.files().keys().collect::<Vec<_>>(), ["/dz"]);
}

#[test]
fn full_disk_refuses_the_put_and_keeps_the_old_state() {
    let mut store = formatted(SMALL_DISK);
    let mut model = Model::new();
    let mut index = 0;
    let err = loop {
        let path = format!("/fill/{index}");
        let data = vec![index as u8; 100_000];
        match store.put(&path, 0o644, &data) {
            Ok(()) => {
                model.insert(path, (0o644, data));
                index += 1;
            }
            Err(err) => break err,
        }
    };
    assert!(index > 3, "some files fit before the disk is full");
    match &err {
        StoreError::NoSpace { needed, free } => assert!(needed > free, "{err}"),
        other => panic!("expected NoSpace, got {other}"),
    }
    assert!(err.to_string().contains("the disk is full"), "{err}");
    let generation = store.generation();
    // Overwriting the largest file needs room for the new copy beside the old one.
    assert!(matches!(store.put("/fill/0", 0o644, &[9; 200_000]), Err(StoreError::NoSpace { .. })));
    assert_eq!(store.generation(), generation);
    assert_eq!(contents(&mut store), model);
    let mut store = remount(store);
    assert_eq!(contents(&mut store), model);
    // Room made by a remove is usable again.
    store.remove("/fill/0").unwrap();
    store.put("/after", 0o644, &[7; 90_000]).unwrap();
}

#[test]
fn read_only_disk_mounts_and_refuses_changes() {
    let mut store = formatted(SMALL_DISK);
    store.put("/kept", 0o644, b"kept").unwrap();
    let disk = store.into_device();
    disk.set_read_only(true);
    let mut store = Store::mount(disk).unwrap();
    assert!(store.is_read_only());
    assert_eq!(store.get("/kept").unwrap(), b"kept");
    assert!(matches!(store.put("/new", 0o644, b"x"), Err(StoreError::ReadOnly)));
    assert!(matches!(store.remove("/kept"), Err(StoreError::ReadOnly)));
    assert!(matches!(store.remove_prefix("/"), Err(StoreError::ReadOnly)));
}

#[test]
fn blank_disk_is_blank_and_mount_says_so() {
    let mut disk = CrashDisk::new(SMALL_DISK);
    assert_eq!(inspect(&mut disk).unwrap(), DiskContents::Blank);
    assert!(matches!(Store::mount(disk), Err(StoreError::Blank)));
}

#[test]
fn foreign_disk_is_never_formatted() {
    for offset in [0, 1024, 5 * BLOCK_SIZE + 3, 16 * BLOCK_SIZE - 1] {
        let disk = CrashDisk::new(SMALL_DISK);
        disk.poke(offset, &[0x53]);
        assert_eq!(inspect(&mut disk.share()).unwrap(), DiskContents::Foreign, "byte at {offset}");
        let image = disk.peek(0, SMALL_DISK as usize * BLOCK_SIZE);
        assert!(matches!(Store::format(disk.share()), Err(StoreError::Unrecognized)));
        assert!(matches!(Store::mount(disk.share()), Err(StoreError::Unrecognized)));
        assert_eq!(disk.peek(0, image.len()), image, "nothing written");
    }
}

#[test]
fn damaged_superblocks_are_never_formatted() {
    // A store of a later generation whose superblocks both fail their digest.
    let store = formatted(SMALL_DISK);
    let disk = store.into_device();
    let mut superblock = crate::layout::Superblock::decode(&disk.peek(0, BLOCK_SIZE)).unwrap();
    superblock.generation = 7;
    let mut block = superblock.encode();
    block[20] ^= 1;
    disk.poke(0, &block);
    disk.poke(BLOCK_SIZE, &block);
    assert_eq!(inspect(&mut disk.share()).unwrap(), DiskContents::Damaged);
    assert!(matches!(Store::format(disk.share()), Err(StoreError::Damaged { .. })));
    assert!(matches!(Store::mount(disk), Err(StoreError::Damaged { .. })));
}

#[test]
fn pieces_of_an_interrupted_format_count_as_blank() {
    let block = formatted(SMALL_DISK).into_device().peek(0, BLOCK_SIZE);
    for cut in [3, 8, 100, 479, 500] {
        let disk = CrashDisk::new(SMALL_DISK);
        disk.poke(0, &block[..cut]);
        assert_eq!(inspect(&mut disk.share()).unwrap(), DiskContents::Blank, "first {cut} bytes");
        Store::format(disk).unwrap();
    }
    // The same bytes on a disk of another size are not the format of this one.
    let other = CrashDisk::new(SMALL_DISK * 2);
    other.poke(0, &block[..100]);
    assert_eq!(inspect(&mut other.share()).unwrap(), DiskContents::Damaged);
}

#[test]
fn formatted_store_is_refused_by_format() {
    let disk = formatted(SMALL_DISK).into_device();
    assert!(matches!(Store::format(disk), Err(StoreError::Damaged { .. })));
}

#[test]
fn too_small_disk_is_refused() {
    assert!(matches!(Store::format(CrashDisk::new(100)), Err(StoreError::TooSmall { blocks: 100 })));
}

#[test]
fn damaged_file_data_is_reported_not_returned() {
    let mut store = formatted(SMALL_DISK);
    store.put("/f", 0o644, &[5; 10_000]).unwrap();
    let block = store.files()["/f"].extents[0].start;
    let disk = store.into_device();
    disk.poke(block as usize * BLOCK_SIZE + 100, &[6]);
    let mut store = Store::mount(disk).unwrap();
    assert!(matches!(store.get("/f"), Err(StoreError::ContentMismatch { .. })));
}

#[test]
fn newest_version_with_a_damaged_file_table_falls_back_to_the_one_before() {
    let mut store = formatted(SMALL_DISK);
    store.put("/old", 0o644, b"old").unwrap();
    store.put("/new", 0o644, b"new").unwrap();
    let table = store.metadata_extents[0].start;
    let disk = store.into_device();
    disk.poke(table as usize * BLOCK_SIZE + 2, &[0xee]);
    let store = Store::mount(disk).unwrap();
    assert_eq!(store.files().keys().collect::<Vec<_>>(), ["/old"]);
}

#[test]
fn disk_smaller_than_the_store_is_refused() {
    let disk = formatted(SMALL_DISK * 2).into_device();
    let shrunk = CrashDisk::new(SMALL_DISK);
    shrunk.poke(0, &disk.peek(0, SMALL_DISK as usize * BLOCK_SIZE));
    assert!(matches!(Store::mount(shrunk), Err(StoreError::DiskShrank { .. })));
}

/// One change to the store.
#[derive(Clone)]
enum Op {
    Put(String, u32, Vec<u8>),
    Remove(String),
    RemovePrefix(String),
}

impl core::fmt::Debug for Op {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Op::Put(path, mode, data) => write!(f, "put {path} {mode:o} ({} bytes)", data.len()),
            Op::Remove(path) => write!(f, "remove {path}"),
            Op::RemovePrefix(prefix) => write!(f, "remove {prefix}*"),
        }
    }
}

const PATHS: [&str; 6] = ["/a", "/b", "/d/x", "/d/y", "/d/z/w", "/e"];
const SIZES: [usize; 8] = [0, 1, 100, 4095, 4096, 4097, 9000, 20_000];

fn random_op(rng: &mut Rng) -> Op {
    let path = PATHS[rng.below(PATHS.len() as u64) as usize].to_string();
    match rng.below(8) {
        0 | 1 => Op::Remove(path),
        2 => Op::RemovePrefix("/d/".to_string()),
        _ => {
            let size = SIZES[rng.below(SIZES.len() as u64) as usize];
            Op::Put(path, 0o600 + rng.below(0o100) as u32, rng.bytes(size))
        }
    }
}

fn apply(model: &mut Model, op: &Op) {
    match op {
        Op::Put(path, mode, data) => {
            model.insert(path.clone(), (*mode, data.clone()));
        }
        Op::Remove(path) => {
            model.remove(path);
        }
        Op::RemovePrefix(prefix) => model.retain(|path, _| !path.starts_with(prefix.as_str())),
    }
}

fn run(store: &mut Store<CrashDisk>, op: &Op) -> Result<(), StoreError> {
    match op {
        Op::Put(path, mode, data) => store.put(path, *mode, data),
        Op::Remove(path) => store.remove(path),
        Op::RemovePrefix(prefix) => store.remove_prefix(prefix).map(|_| ()),
    }
}

/// Runs `ops` on `store` and `model` until the disk crashes. Returns the states the
/// disk may show afterwards: (before, after) the operation that was cut short, or the
/// final state twice when none was.
fn run_until_crash(store: &mut Store<CrashDisk>, model: &mut Model, ops: &[Op]) -> (Model, Model) {
    for op in ops {
        let before = model.clone();
        let mut after = model.clone();
        apply(&mut after, op);
        match run(store, op) {
            Ok(()) => *model = after,
            Err(_) if store.device().crashed() => return (before, after),
            // A remove of a path that is not there, a put that does not fit: nothing
            // changes.
            Err(StoreError::NotFound { .. }) => assert_eq!(before, after),
            Err(StoreError::NoSpace { .. }) => {}
            Err(err) => panic!("{op:?} failed: {err}"),
        }
    }
    (model.clone(), model.clone())
}

fn assert_old_or_new(found: &Model, before: &Model, after: &Model, context: &str) {
    // Each file exactly one of its versions ...
    for path in found.keys().chain(before.keys()).chain(after.keys()) {
        let (have, old, new) = (found.get(path), before.get(path), after.get(path));
        assert!(have == old || have == new, "{context}: {path} is neither its old nor its new version");
    }
    // ... and the operation whole: one commit is one version.
    assert!(found == before || found == after, "{context}: the store shows a mix of versions");
}

/// Device operations the whole of `ops` takes on a copy of `store`'s disk.
fn operations_for(disk: &CrashDisk, model: &Model, ops: &[Op]) -> usize {
    let mut store = Store::mount(disk.fork()).unwrap();
    let start = store.device().operations();
    let mut model = model.clone();
    run_until_crash(&mut store, &mut model, ops);
    store.device().operations() - start
}

/// A disk with a few files on it already, and the model of them.
fn seeded_disk(rng: &mut Rng) -> (CrashDisk, Model) {
    let mut store = formatted(SMALL_DISK);
    let mut model = Model::new();
    for _ in 0..4 {
        let op = random_op(rng);
        if let Op::Put(..) = op {
            run(&mut store, &op).unwrap();
            apply(&mut model, &op);
        }
    }
    (store.into_device(), model)
}

const MODES: [PowerLoss; 4] = [PowerLoss::Subset, PowerLoss::TornPrefix, PowerLoss::TornHalf, PowerLoss::TornBytes];

#[test]
fn power_loss_at_every_point_leaves_each_file_old_or_new_and_the_store_mounts() {
    for seed in 0..48 {
        let mut rng = Rng::new(seed);
        let (disk, model) = seeded_disk(&mut rng);
        let ops: Vec<Op> = (0..10).map(|_| random_op(&mut rng)).collect();
        let total = operations_for(&disk, &model, &ops);
        for crash_at in 0..=total {
            let context = format!("seed {seed}, crash after {crash_at} of {total} operations");
            let mut store = Store::mount(disk.fork()).unwrap();
            store.device().crash_after(crash_at);
            let mut model = model.clone();
            let (before, after) = run_until_crash(&mut store, &mut model, &ops);
            let disk = store.into_device();
            let mode = MODES[rng.below(MODES.len() as u64) as usize];
            disk.power_loss(&mut rng, mode);
            let mut store = Store::mount(disk).unwrap_or_else(|err| panic!("{context}: mount failed: {err}"));
            let mut found = contents(&mut store);
            assert_old_or_new(&found, &before, &after, &context);
            // The recovered store goes on working: its free map spares the live files.
            for _ in 0..3 {
                let op = Op::Put(PATHS[rng.below(6) as usize].to_string(), 0o644, rng.bytes(5000));
                run(&mut store, &op).unwrap_or_else(|err| panic!("{context}: {err}"));
                apply(&mut found, &op);
            }
            let mut store = remount(store);
            assert_eq!(contents(&mut store), found, "{context}: after more puts");
        }
    }
}

#[test]
fn power_loss_after_a_crash_and_a_remount_still_leaves_old_or_new() {
    // The guest crashes (the host keeps every write, flushed or not), boots again,
    // goes on, and then the power goes: writes of the first boot that were never flushed
    // must not decide what the disk shows.
    for seed in 100..132 {
        let mut rng = Rng::new(seed);
        let (disk, model) = seeded_disk(&mut rng);
        let first: Vec<Op> = (0..4).map(|_| random_op(&mut rng)).collect();
        let second: Vec<Op> = (0..4).map(|_| random_op(&mut rng)).collect();
        let total = operations_for(&disk, &model, &first);
        for crash_at in 0..=total {
            let context = format!("seed {seed}, first crash after {crash_at} of {total}");
            let mut store = Store::mount(disk.fork()).unwrap();
            store.device().crash_after(crash_at);
            let mut model = model.clone();
            let (before, after) = run_until_crash(&mut store, &mut model, &first);
            let disk = store.into_device();
            disk.restart();
            let mut store = Store::mount(disk).unwrap_or_else(|err| panic!("{context}: mount failed: {err}"));
            let mut model = contents(&mut store);
            assert_old_or_new(&model, &before, &after, &context);
            let second_total = operations_for(store.device(), &model, &second);
            let second_crash = rng.below(second_total as u64 + 1) as usize;
            store.device().crash_after(second_crash);
            let (before, after) = run_until_crash(&mut store, &mut model, &second);
            let disk = store.into_device();
            let mode = MODES[rng.below(MODES.len() as u64) as usize];
            disk.power_loss(&mut rng, mode);
            let context = format!("{context}, second after {second_crash} of {second_total}");
            let mut store = Store::mount(disk).unwrap_or_else(|err| panic!("{context}: mount failed: {err}"));
            assert_old_or_new(&contents(&mut store), &before, &after, &context);
        }
    }
}

#[test]
fn transient_device_error_mid_commit_loses_nothing_later() {
    // A commit that fails at any point (the superblock written but not flushed, say)
    // leaves the store working; the commits after it keep every live file intact.
    for seed in 200..216 {
        let mut rng = Rng::new(seed);
        let (disk, model) = seeded_disk(&mut rng);
        let ops: Vec<Op> = (0..30).map(|_| random_op(&mut rng)).collect();
        let total = operations_for(&disk, &model, &ops[..1]);
        for fail_at in 0..total {
            let context = format!("seed {seed}, operation {fail_at} of the first commit fails");
            let mut store = Store::mount(disk.fork()).unwrap();
            store.device().fail_once_after(fail_at);
            let mut model = model.clone();
            for op in &ops {
                match run(&mut store, op) {
                    Ok(()) => apply(&mut model, op),
                    Err(StoreError::NotFound { .. }) => {}
                    Err(StoreError::WriteBlock { .. } | StoreError::Flush { .. }) => {}
                    Err(err) => panic!("{context}: {op:?}: {err}"),
                }
            }
            let last = Op::Put("/last".to_string(), 0o644, rng.bytes(3000));
            run(&mut store, &last).unwrap();
            apply(&mut model, &last);
            assert_eq!(contents(&mut store), model, "{context}: before the remount");
            let mut store = remount(store);
            assert_eq!(contents(&mut store), model, "{context}: after the remount");
        }
    }
}

#[test]
fn power_loss_after_a_transient_error_leaves_a_version_that_was_written() {
    // After a commit fails, the version it tried to write may still be on disk (its
    // superblock written, the flush failed) until a later commit supersedes it; a power
    // loss then shows that version, the one before, or the next: never a broken one.
    // The disk is nearly full so the allocator wraps around and would reuse any block
    // given back too early.
    for seed in 300..340 {
        let mut rng = Rng::new(seed);
        let mut store = formatted(SMALL_DISK);
        let big = 200 + rng.below(30) as usize;
        store.put("/big", 0o644, &rng.bytes(big * BLOCK_SIZE)).unwrap();
        let disk = store.into_device();
        let model = contents(&mut Store::mount(disk.fork()).unwrap());
        let ops: Vec<Op> = (0..12).map(|_| random_op(&mut rng)).collect();
        let first_commit = operations_for(&disk, &model, &ops[..1]);
        let total = operations_for(&disk, &model, &ops);
        for fail_at in 0..first_commit {
            let crash_at = fail_at + 1 + rng.below((total - fail_at) as u64) as usize;
            let context = format!("seed {seed}, operation {fail_at} fails, crash after {crash_at}");
            let mut store = Store::mount(disk.fork()).unwrap();
            store.device().fail_once_after(fail_at);
            store.device().crash_after(crash_at);
            let mut model = model.clone();
            // The version a failed commit may have left on disk, until one succeeds.
            let mut uncertain: Option<Model> = None;
            let mut outcome = None;
            for op in &ops {
                let mut after = model.clone();
                apply(&mut after, op);
                let generation = store.generation();
                match run(&mut store, op) {
                    Ok(()) => {
                        model = after;
                        if store.generation() != generation {
                            uncertain = None;
                        }
                    }
                    Err(_) if store.device().crashed() => {
                        outcome = Some((model.clone(), after));
                        break;
                    }
                    Err(StoreError::NotFound { .. } | StoreError::NoSpace { .. }) => {}
                    Err(StoreError::WriteBlock { .. } | StoreError::Flush { .. }) => uncertain = Some(after),
                    Err(err) => panic!("{context}: {op:?}: {err}"),
                }
            }
            let (before, after) = outcome.unwrap_or_else(|| (model.clone(), model.clone()));
            let disk = store.into_device();
            let mode = MODES[rng.below(MODES.len() as u64) as usize];
            disk.power_loss(&mut rng, mode);
            let mut store = Store::mount(disk).unwrap_or_else(|err| panic!("{context}: mount failed: {err}"));
            let found = contents(&mut store);
            let allowed = found == before || found == after || uncertain.as_ref() == Some(&found);
            assert!(allowed, "{context} ({mode:?}): the store shows a version never written");
        }
    }
}

#[test]
fn blocks_of_a_commit_whose_superblock_may_be_on_disk_are_not_reused() {
    let mut rng = Rng::new(5);
    let mut store = formatted(SMALL_DISK);
    store.put("/big", 0o644, &rng.bytes(200 * BLOCK_SIZE)).unwrap();
    // The rest of the disk, less one block for the file table.
    let blocks = (store.free_bytes() / BLOCK_SIZE as u64 - 1) as usize;
    let x = rng.bytes(blocks * BLOCK_SIZE);
    // Data, file table, flush, superblock: the flush after the superblock fails.
    store.device().fail_once_after(blocks + 3);
    assert!(matches!(store.put("/x", 0o644, &x), Err(StoreError::Flush { .. })));
    // The superblock of /x may be on disk: its blocks must not take new data now.
    assert!(matches!(store.put("/y", 0o644, &rng.bytes(20 * BLOCK_SIZE)), Err(StoreError::NoSpace { .. })));
    let disk = store.into_device();
    disk.restart();
    let mut store = Store::mount(disk).unwrap();
    assert_eq!(store.get("/x").unwrap(), x, "the version the failed commit left on disk is whole");
}

#[test]
fn power_loss_during_format_leaves_a_blank_disk_or_an_empty_store() {
    let total = formatted(SMALL_DISK).device().operations();
    let mut rng = Rng::new(7);
    for crash_at in 0..=total {
        for mode in MODES {
            let disk = CrashDisk::new(SMALL_DISK);
            disk.crash_after(crash_at);
            let _ = Store::format(disk.share());
            disk.power_loss(&mut rng, mode);
            match inspect(&mut disk.share()).unwrap() {
                DiskContents::Blank => {
                    Store::format(disk).expect("a disk left blank formats");
                }
                DiskContents::Store { generation: 1 } => {
                    assert!(Store::mount(disk).unwrap().files().is_empty());
                }
                other => panic!("crash after {crash_at} ({mode:?}) left {other:?}"),
            }
        }
    }
}

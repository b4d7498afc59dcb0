//! Disk chains on real files: reads through layers, copy-up, freezes, restores, folds,
//! locks, and the promise that a base or a frozen layer is never written.

use super::*;

fn digest(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).unwrap())
}

fn spec(text: String) -> DiskSpec {
    text.parse().unwrap()
}

/// A 1 MiB raw base whose byte at offset `i` is `i / 4096` (one value per block).
fn base(dir: &Path) -> PathBuf {
    let path = dir.join("base.raw");
    let bytes: Vec<u8> = (0..1 << 20).map(|i: u32| (i / 4096) as u8).collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn read(disk: &Disk, offset: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    disk.read_at(&mut bytes, offset).unwrap();
    bytes
}

fn write(disk: &mut Disk, offset: u64, bytes: &[u8]) {
    let (file, at) = disk.prepare_write(offset, bytes.len() as u64).unwrap();
    file.write_all_at(bytes, at).unwrap();
    disk.written(offset, bytes.len() as u64);
}

#[test]
fn spec_parses_options_and_refuses_unknown_ones() {
    let parsed = spec("a.layer,base=b.raw,readonly".into());
    assert_eq!(parsed, DiskSpec { path: "a.layer".into(), readonly: true, base: Some("b.raw".into()), size: None });
    assert_eq!(spec("x,size=64M".into()).size, Some(64 << 20));
    assert!("".parse::<DiskSpec>().is_err());
    assert!("x,colour=red".parse::<DiskSpec>().is_err());
    assert!("x,size=lots".parse::<DiskSpec>().is_err());
    assert_eq!(parse_size("2G"), Some(2 << 30));
    assert_eq!(parse_size("99999999999999999999G"), None);
}

#[test]
fn a_layer_over_a_base_reads_the_base_until_written_and_never_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    let before = digest(&base);
    let top = dir.path().join("top.layer");
    let mut disk = Disk::open(&spec(format!("{},base={}", top.display(), base.display()))).unwrap();
    assert_eq!(disk.capacity(), 1 << 20);
    assert_eq!(read(&disk, 3 * 4096, 4), vec![3; 4]);
    // A partial write copies the rest of its block up from the base.
    write(&mut disk, 5 * 4096 + 512, &[0xee; 512]);
    let block = read(&disk, 5 * 4096, 4096);
    assert!(block[..512].iter().all(|byte| *byte == 5));
    assert!(block[512..1024].iter().all(|byte| *byte == 0xee));
    assert!(block[1024..].iter().all(|byte| *byte == 5));
    let plan = disk.plan_read(4 * 4096, 3 * 4096);
    assert_eq!(
        plan.iter().map(|extent| extent.source).collect::<Vec<_>>(),
        [Source::Base, Source::Layer(0), Source::Base]
    );
    disk.flush().unwrap();
    drop(disk);
    assert_eq!(digest(&base), before, "the base is never written");
    let disk = Disk::open(&spec(format!("{},base={}", top.display(), base.display()))).unwrap();
    assert_eq!(read(&disk, 5 * 4096 + 512, 2), vec![0xee; 2], "a flushed write survives a reopen");
}

#[test]
fn a_write_not_flushed_is_lost_on_reopen_but_the_disk_opens_whole() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("top.layer");
    let mut disk = Disk::open(&spec(format!("{},size=1M", top.display()))).unwrap();
    write(&mut disk, 0, &[1; 4096]);
    disk.flush().unwrap();
    write(&mut disk, 4096, &[2; 4096]);
    drop(disk);
    let disk = Disk::open(&spec(top.display().to_string())).unwrap();
    assert_eq!(read(&disk, 0, 4096), vec![1; 4096]);
    assert_eq!(read(&disk, 4096, 4096), vec![0; 4096], "an unflushed block is not in the index");
}

#[test]
fn freeze_keeps_the_snapshot_view_and_a_restore_goes_back_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    let top = dir.path().join("vda.layer");
    let config = spec(format!("{},base={}", top.display(), base.display()));
    let mut disk = Disk::open(&config).unwrap();
    write(&mut disk, 0, &[0xaa; 4096]);
    let state = disk.freeze().unwrap();
    assert_eq!(state.layers.len(), 1);
    let frozen = state.layers[0].0.clone();
    let frozen_digest = digest(&frozen);
    assert!(std::fs::metadata(&frozen).unwrap().permissions().readonly());
    // Written after the snapshot: only in the new top.
    write(&mut disk, 0, &[0xbb; 4096]);
    write(&mut disk, 8192, &[0xcc; 4096]);
    disk.flush().unwrap();
    assert_eq!(read(&disk, 0, 1), [0xbb]);
    drop(disk);
    assert_eq!(digest(&frozen), frozen_digest, "a frozen layer is never written");

    let restored = Disk::restore(&config, &state).unwrap();
    assert_eq!(read(&restored, 0, 1), [0xaa], "the restore sees the disk as it was at the snapshot");
    assert_eq!(read(&restored, 8192, 1), [2], "a block written after the snapshot is gone");
    assert_eq!(restored.state(), state);
    drop(restored);
    assert_eq!(digest(&frozen), frozen_digest);
}

#[test]
fn a_restore_refuses_layers_that_changed_and_a_disk_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("vda.layer");
    let config = spec(format!("{},size=1M", top.display()));
    let mut disk = Disk::open(&config).unwrap();
    let state = disk.freeze().unwrap();
    let err = Disk::restore(&config, &state).unwrap_err();
    assert!(matches!(err, DiskError::InUse { .. }), "{err}");
    drop(disk);
    let mut other = state.clone();
    other.layers[0].1[0] ^= 1;
    assert!(Disk::restore(&config, &other).is_err(), "a layer with another id is not the one saved");
    assert!(Disk::restore(&config, &state).is_ok());
}

#[test]
fn two_vms_on_one_base_see_their_own_writes_and_one_layer_is_not_opened_twice() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    let first = spec(format!("{},base={}", dir.path().join("a.layer").display(), base.display()));
    let second = spec(format!("{},base={}", dir.path().join("b.layer").display(), base.display()));
    let mut a = Disk::open(&first).unwrap();
    let mut b = Disk::open(&second).unwrap();
    write(&mut a, 0, &[0xa; 4096]);
    write(&mut b, 0, &[0xb; 4096]);
    assert_eq!((read(&a, 0, 1), read(&b, 0, 1)), (vec![0xa], vec![0xb]));
    assert!(matches!(Disk::open(&first), Err(DiskError::InUse { .. })));
    // Nobody may write the base while VMs read it.
    assert!(matches!(Disk::open(&spec(base.display().to_string())), Err(DiskError::InUse { .. })));
}

#[test]
fn a_layer_over_another_base_or_a_changed_base_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    let top = dir.path().join("top.layer");
    drop(Disk::open(&spec(format!("{},base={}", top.display(), base.display()))).unwrap());
    let other = dir.path().join("other.raw");
    std::fs::write(&other, [0u8; 4096]).unwrap();
    let err = Disk::open(&spec(format!("{},base={}", top.display(), other.display()))).unwrap_err();
    assert!(matches!(err, DiskError::WrongBase { .. }), "{err}");
    std::fs::OpenOptions::new().append(true).open(&base).unwrap().write_all_at(&[1], 1 << 20).unwrap();
    let err = Disk::open(&spec(top.display().to_string())).unwrap_err();
    assert!(err.to_string().contains("the base changed"), "{err}");
}

#[test]
fn write_zeroes_reads_back_zeros_over_a_base_and_frees_space() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    let top = dir.path().join("top.layer");
    let mut disk = Disk::open(&spec(format!("{},base={}", top.display(), base.display()))).unwrap();
    write(&mut disk, 0, &[9; 65536]);
    disk.write_zeroes(512, 3 * 4096).unwrap();
    assert_eq!(read(&disk, 0, 512), vec![9; 512]);
    assert!(read(&disk, 512, 3 * 4096).iter().all(|byte| *byte == 0));
    assert_eq!(read(&disk, 512 + 3 * 4096, 1), [9]);
    // Over the base too: zeros, not the base's bytes.
    disk.write_zeroes(20 * 4096, 4096).unwrap();
    assert_eq!(read(&disk, 20 * 4096, 4096), vec![0; 4096]);
    assert_eq!(read(&disk, 21 * 4096, 1), [21]);
}

#[test]
fn a_writable_raw_disk_works_in_place_but_cannot_be_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let raw = base(dir.path());
    let mut disk = Disk::open(&spec(raw.display().to_string())).unwrap();
    write(&mut disk, 4096, &[0x42; 4096]);
    disk.flush().unwrap();
    assert!(matches!(disk.freeze(), Err(DiskError::RawSnapshot { .. })));
    drop(disk);
    assert_eq!(std::fs::read(&raw).unwrap()[4096], 0x42);
    let mut readonly = Disk::open(&spec(format!("{},readonly", raw.display()))).unwrap();
    assert!(readonly.prepare_write(0, 512).is_err());
    assert!(readonly.freeze().is_ok(), "a read-only disk is frozen already");
}

#[test]
fn commit_folds_the_chain_into_one_layer_without_touching_the_frozen_ones() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    let top = dir.path().join("vda.layer");
    let config = spec(format!("{},base={}", top.display(), base.display()));
    let mut disk = Disk::open(&config).unwrap();
    write(&mut disk, 0, &[1; 4096]);
    let first = disk.freeze().unwrap();
    write(&mut disk, 4096, &[2; 4096]);
    let second = disk.freeze().unwrap();
    write(&mut disk, 0, &[3; 4096]);
    disk.flush().unwrap();
    let expected = read(&disk, 0, 1 << 20);
    assert!(matches!(commit(&top, None), Err(DiskError::InUse { .. })), "a disk in use is not folded");
    drop(disk);
    let frozen: Vec<_> = second.layers.iter().map(|(path, _)| (path.clone(), digest(path))).collect();
    let out = dir.path().join("folded.layer");
    assert_eq!(commit(&top, Some(&out)).unwrap(), 2);
    let folded = Disk::open(&spec(format!("{},readonly", out.display()))).unwrap();
    assert_eq!(folded.state().layers.len(), 1, "one layer over the base");
    assert_eq!(read(&folded, 0, 1 << 20), expected);
    drop(folded);
    assert_eq!(commit(&top, None).unwrap(), 2);
    let in_place = Disk::open(&config).unwrap();
    assert_eq!(read(&in_place, 0, 1 << 20), expected);
    assert_eq!(in_place.state().layers.len(), 0, "nothing frozen under the folded top");
    for (path, before) in frozen {
        assert_eq!(digest(&path), before, "{} was written", path.display());
    }
    assert_eq!(first.layers.len(), 1);
}

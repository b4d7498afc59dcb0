//! The disks Desk finds at boot and what it does with them. Disk 0 (the first block
//! device in BootInfo) holds the file store: mounted when it has one, formatted when it
//! is blank (all zero where the store keeps its superblocks), left alone when it holds
//! anything else. Every other disk stays raw, for `diskbench`; `desk.store=none` on the
//! command line leaves disk 0 raw too.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use carrel_deskfs::{inspect, DiskContents, Store};
use carrel_firmware::{virtio_id, BootInfo};

use crate::blk::{Block, MAX_DISKS};
use crate::println;

/// How long one request may take: a flush of a large write cache on a slow host disk
/// can take seconds.
const REQUEST_TIMEOUT_SECONDS: u64 = 30;

/// "64 MiB", or KiB for a disk under 1 MiB.
pub fn size_text(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// One line about a disk's device: size, block size, features, id.
fn describe_device(disk: &mut Block) -> String {
    let mut line =
        format!("{}, block size {}, seg_max {}", size_text(disk.capacity_bytes()), disk.block_size, disk.seg_max);
    if disk.is_read_only() {
        line.push_str(", read-only");
    }
    for name in disk.feature_names() {
        line.push_str(", ");
        line.push_str(name);
    }
    match disk.id() {
        Ok(Some(id)) => line.push_str(&format!(", id \"{id}\"")),
        Ok(None) => {}
        Err(err) => line.push_str(&format!(", id unreadable ({err})")),
    }
    line
}

/// Drives every block device and opens the store on disk 0; returns the store (if
/// one is mounted) and the raw disks.
pub fn start(info: &BootInfo, cmdline: &str) -> (Option<Store<Block>>, Vec<Block>) {
    let timeout = REQUEST_TIMEOUT_SECONDS * 1000 * if info.tsc_khz == 0 { 5_000_000 } else { info.tsc_khz };
    let mut disks = Vec::new();
    let found = info.devices().iter().filter(|device| device.device_type == virtio_id::BLOCK);
    for (index, device) in found.enumerate() {
        if index >= MAX_DISKS {
            println!("desk: disk {index}: ignored (Desk drives at most {MAX_DISKS} disks)");
            continue;
        }
        match Block::new(device.base, index, timeout) {
            Ok(mut disk) => {
                println!("desk: disk {index}: {}", describe_device(&mut disk));
                disks.push(disk);
            }
            Err(err) => println!("desk: disk {index}: failed: {err}"),
        }
    }
    let store_wanted = !cmdline.split(' ').any(|argument| argument == "desk.store=none");
    let mut store = None;
    if store_wanted && disks.first().is_some_and(|disk| disk.index == 0) {
        let disk = disks.remove(0);
        store = open_store(disk, &mut disks);
    }
    for disk in &disks {
        println!("desk: disk {}: raw, not mounted (for diskbench)", disk.index);
    }
    (store, disks)
}

/// Mounts or formats the store on `disk`, saying so in one line; a disk that ends up
/// without a store goes back to `raw`.
fn open_store(mut disk: Block, raw: &mut Vec<Block>) -> Option<Store<Block>> {
    let size = size_text(disk.capacity_bytes());
    let memory = "files stay in memory";
    match inspect(&mut disk) {
        Ok(DiskContents::Store { .. }) => match Store::mount(disk) {
            Ok(store) => {
                let read_only = if store.is_read_only() { ", read-only" } else { "" };
                println!(
                    "desk: disk: {size}, store generation {}, {} files{read_only}",
                    store.generation(),
                    store.files().len()
                );
                Some(store)
            }
            Err(err) => {
                println!("desk: disk: {size}, the store cannot be mounted: {err}; {memory}");
                None
            }
        },
        Ok(DiskContents::Blank) if disk.is_read_only() => {
            println!("desk: disk: {size}, blank and read-only: no store; {memory}");
            raw.insert(0, disk);
            None
        }
        Ok(DiskContents::Blank) => match Store::format(disk) {
            Ok(store) => {
                println!("desk: disk: {size}, formatted, store generation {}, 0 files", store.generation());
                Some(store)
            }
            Err(err) => {
                println!("desk: disk: {size}, formatting failed: {err}; {memory}");
                None
            }
        },
        Ok(DiskContents::Damaged) => {
            println!(
                "desk: disk: {size}, holds a damaged Carrel store (no valid superblock): left as it is, not \
                 formatted; {memory}"
            );
            raw.insert(0, disk);
            None
        }
        Ok(DiskContents::Foreign) => {
            println!(
                "desk: disk: {size}, holds something that is not a Carrel store (its first 64 KiB are not \
                 zero): left as it is, not formatted; {memory}"
            );
            raw.insert(0, disk);
            None
        }
        Err(err) => {
            println!("desk: disk: {size}, cannot be read: {err}; {memory}");
            None
        }
    }
}

/// The `disks` built-in: one line per disk.
pub fn report(store: Option<&Store<Block>>, raw: &[Block]) -> String {
    let mut lines: Vec<(usize, String)> = Vec::new();
    if let Some(store) = store {
        let disk = store.device();
        lines.push((
            disk.index,
            format!(
                "disk {} {} store generation {} files {} free_bytes {}{}\n",
                disk.index,
                disk.capacity_bytes(),
                store.generation(),
                store.files().len(),
                store.free_bytes(),
                if store.is_read_only() { " read_only" } else { "" }
            ),
        ));
    }
    for disk in raw {
        let read_only = if disk.is_read_only() { " read_only" } else { "" };
        lines.push((disk.index, format!("disk {} {} raw{read_only}\n", disk.index, disk.capacity_bytes())));
    }
    lines.sort_by_key(|(index, _)| *index);
    lines.into_iter().map(|(_, line)| line).collect()
}

//! `diskbench`: the raw speed of a scratch disk measured from inside the guest, timed
//! with the TSC. It writes over the first MIB MiB of the disk, so the agent runs it only
//! on a disk that holds no file store.
//!
//! Phases, in order: a check that the disk returns what was written (and zeros after
//! write-zeroes, when offered); sequential write (128 KiB requests, 8 in flight, then a
//! flush, all timed); sequential read; 4 KiB random reads at queue depth 1 and 32;
//! 4 KiB random writes at depth 1 and 32, each phase ending with one flush inside its
//! timing (how long that flush took is reported too, `flush_ms_<phase>`). Random
//! phases run for one second each. At the end the region is discarded
//! when the device offers it, so a sparse scratch file gives its space back.
//!
//! Output: one `key value` line each; MB/s are 10^6 bytes per second.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use core::fmt::Write;

use crate::agent::splitmix64;
use crate::blk::{Block, PooledRequest, MAX_IN_FLIGHT, SECTOR_SIZE};

const MIB: u64 = 1 << 20;
/// The same as perf/disk's host loop, so the two compare like with like.
const SEQUENTIAL_REQUEST: usize = 128 << 10;
const SEQUENTIAL_DEPTH: usize = 8;
const RANDOM_REQUEST: usize = 4096;
const RANDOM_PHASE_MS: u64 = 1000;
const RANDOM_MAX_REQUESTS: u64 = 2_000_000;
const VERIFY_BYTES: usize = 1 << 20;
const ZEROES_BYTES: usize = 64 << 10;

/// Runs every phase over the first `mib` MiB of `disk`; returns the report or what
/// went wrong.
pub fn run(disk: &mut Block, mib: u64, tsc_khz: u64) -> Result<String, String> {
    if tsc_khz == 0 {
        return Err(String::from("the TSC frequency is unknown (BootInfo has no TSC kHz): nothing can be timed"));
    }
    let region = mib * MIB;
    if region < VERIFY_BYTES as u64 || region > disk.capacity_bytes() {
        return Err(format!("{mib} MiB does not fit the disk ({} MiB)", disk.capacity_bytes() / MIB));
    }
    let read_only = disk.is_read_only();
    let mut out = String::new();
    let _ = writeln!(out, "disk {}", disk.index);
    let _ = writeln!(out, "region_mib {mib}");
    let _ = writeln!(out, "seq_request_kib {}", SEQUENTIAL_REQUEST >> 10);
    let _ = writeln!(out, "seq_depth {SEQUENTIAL_DEPTH}");
    let _ = writeln!(out, "rand_request_kib {}", RANDOM_REQUEST >> 10);
    if read_only {
        let _ = writeln!(out, "read_only 1");
    } else {
        verify(disk, region)?;
        let _ = writeln!(out, "verify ok");
    }

    let mut pool = vec![0u8; SEQUENTIAL_DEPTH * SEQUENTIAL_REQUEST];
    let mut state = disk.index as u64 + 1;
    pool.chunks_mut(8).for_each(|word| word.copy_from_slice(&splitmix64(&mut state).to_le_bytes()));
    let requests = region / SEQUENTIAL_REQUEST as u64;
    let step = (SEQUENTIAL_REQUEST / SECTOR_SIZE) as u64;
    if !read_only {
        let start = crate::rdtsc();
        let writes = (0..requests).map(|index| PooledRequest::Write { sector: index * step });
        disk.run_pooled(&mut pool, SEQUENTIAL_REQUEST, writes, SEQUENTIAL_DEPTH).map_err(|err| format!("{err}"))?;
        let flush_start = crate::rdtsc();
        disk.flush().map_err(|err| format!("flush: {err}"))?;
        let end = crate::rdtsc();
        let _ = writeln!(out, "seq_write_mbps {}", megabytes_per_second(region, end - start, tsc_khz));
        let _ = writeln!(out, "flush_ms_seq_write {}", milliseconds(end - flush_start, tsc_khz));
    }
    let start = crate::rdtsc();
    let reads = (0..requests).map(|index| PooledRequest::Read { sector: index * step });
    disk.run_pooled(&mut pool, SEQUENTIAL_REQUEST, reads, SEQUENTIAL_DEPTH).map_err(|err| format!("{err}"))?;
    let _ = writeln!(out, "seq_read_mbps {}", megabytes_per_second(region, crate::rdtsc() - start, tsc_khz));

    let blocks = region / RANDOM_REQUEST as u64;
    let phases = [
        ("rand_read_iops_qd1", false, 1),
        ("rand_read_iops_qd32", false, MAX_IN_FLIGHT),
        ("rand_write_iops_qd1", true, 1),
        ("rand_write_iops_qd32", true, MAX_IN_FLIGHT),
    ];
    for (name, write, depth) in phases {
        if write && read_only {
            continue;
        }
        let deadline_cycles = RANDOM_PHASE_MS * tsc_khz;
        let mut done: u64 = 0;
        let start = crate::rdtsc();
        let requests = (0..RANDOM_MAX_REQUESTS).map_while(|_| {
            if crate::rdtsc() - start > deadline_cycles {
                return None;
            }
            done += 1;
            let sector = splitmix64(&mut state) % blocks * (RANDOM_REQUEST / SECTOR_SIZE) as u64;
            Some(if write { PooledRequest::Write { sector } } else { PooledRequest::Read { sector } })
        });
        disk.run_pooled(&mut pool, RANDOM_REQUEST, requests, depth).map_err(|err| format!("{name}: {err}"))?;
        let flush_start = crate::rdtsc();
        if write {
            disk.flush().map_err(|err| format!("{name}: flush: {err}"))?;
        }
        let end = crate::rdtsc();
        let cycles = end - start;
        let _ = writeln!(out, "{name} {}", (u128::from(done) * u128::from(tsc_khz) * 1000 / u128::from(cycles.max(1))));
        if write {
            let _ = writeln!(out, "flush_ms_rand_write_qd{depth} {}", milliseconds(end - flush_start, tsc_khz));
        }
    }

    if !read_only && disk.feature_names().any(|name| name == "discard") {
        let sectors = region / SECTOR_SIZE as u64;
        // One discard segment covers at most u32::MAX sectors; the region is far smaller.
        match u32::try_from(sectors).map(|sectors| disk.discard(0, sectors)) {
            Ok(Ok(())) => {
                let _ = writeln!(out, "discarded 1");
            }
            _ => {
                let _ = writeln!(out, "discarded 0");
            }
        }
    }
    Ok(out)
}

/// Writes a pattern and reads it back; zeroes the end of the region and reads zeros
/// back when the device offers write-zeroes. The numbers mean nothing from a disk that
/// does not keep what it is given.
fn verify(disk: &mut Block, region: u64) -> Result<(), String> {
    let mut state = 0x5eed;
    let mut pattern = vec![0u8; VERIFY_BYTES];
    pattern.chunks_mut(8).for_each(|word| word.copy_from_slice(&splitmix64(&mut state).to_le_bytes()));
    disk.write(0, &pattern, SEQUENTIAL_REQUEST, SEQUENTIAL_DEPTH).map_err(|err| format!("verify: {err}"))?;
    let mut back = vec![0u8; VERIFY_BYTES];
    disk.read(0, &mut back, SEQUENTIAL_REQUEST, SEQUENTIAL_DEPTH).map_err(|err| format!("verify: {err}"))?;
    if back != pattern {
        return Err(String::from("verify: the disk did not return what was written to it"));
    }
    if disk.feature_names().any(|name| name == "write-zeroes") {
        let sector = (region - ZEROES_BYTES as u64) / SECTOR_SIZE as u64;
        let mut tail = vec![0xa5u8; ZEROES_BYTES];
        disk.write(sector, &tail, ZEROES_BYTES, 1).map_err(|err| format!("verify: {err}"))?;
        disk.write_zeroes(sector, (ZEROES_BYTES / SECTOR_SIZE) as u32).map_err(|err| format!("verify: {err}"))?;
        disk.read(sector, &mut tail, ZEROES_BYTES, 1).map_err(|err| format!("verify: {err}"))?;
        if tail.iter().any(|&byte| byte != 0) {
            return Err(String::from("verify: write-zeroes left bytes that are not zero"));
        }
    }
    Ok(())
}

/// `cycles` as milliseconds with one decimal.
fn milliseconds(cycles: u64, tsc_khz: u64) -> String {
    let tenths = u128::from(cycles) * 10 / u128::from(tsc_khz.max(1));
    format!("{}.{}", tenths / 10, tenths % 10)
}

/// `bytes` in `cycles` as MB/s (10^6 bytes) with one decimal.
fn megabytes_per_second(bytes: u64, cycles: u64, tsc_khz: u64) -> String {
    // bytes / (cycles / (tsc_khz * 1000)) / 10^6, times 10 for the decimal.
    let tenths = u128::from(bytes) * u128::from(tsc_khz) / (u128::from(cycles.max(1)) * 100);
    format!("{}.{}", tenths / 10, tenths % 10)
}

//! Address-range buses for port I/O and MMIO exits.
//!
//! vCPU threads look the exit address up here and call the device with the offset into
//! its range. A bus is built once by the builder and shared read-only; devices sit behind
//! their own mutex because the event loop thread reaches them too.

use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("bus range at {base:#x} has zero length")]
    Empty { base: u64 },
}

#[derive(Clone)]
struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges, each served by one device.
#[derive(Clone, Default)]
pub struct Bus {
    /// Sorted by `base`.
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.entries.iter().map(|e| (e.base, e.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty { base });
        }
        let end = base.saturating_add(len);
        if let Some(other) = self.entries.iter().find(|e| base < e.base + e.len && e.base < end) {
            return Err(BusError::Overlap { base, len, other: other.base });
        }
        let position = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(position, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let index = self.entries.partition_point(|e| e.base <= addr).checked_sub(1)?;
        let entry = &self.entries[index];
        let offset = addr - entry.base;
        (offset < entry.len).then_some((entry, offset))
    }

    /// Reads from the device at `addr`; `false` when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; `false` when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((entry, offset)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering it if a thread panicked while holding it: device state is
/// plain data and the VM is stopped on any vCPU error anyway.
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn bus_routes_accesses_by_offset_within_range() {
        let device = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(device.clone(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data[0], 2);
        assert!(bus.write(0x3ff, &[7]));
        assert!(!bus.write(0x400, &[7]));
        assert!(!bus.read(0x3f7, &mut data));
        assert_eq!(device.lock().unwrap().writes, vec![(7, vec![7])]);
    }

    #[test]
    fn bus_insert_rejects_overlap_and_empty_range() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x1000, 0x1000).unwrap();
        let overlapping = bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x1800, 0x1000);
        assert!(matches!(overlapping, Err(BusError::Overlap { other: 0x1000, .. })));
        let empty = bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x5000, 0);
        assert!(matches!(empty, Err(BusError::Empty { base: 0x5000 })));
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x2000, 0x1000).unwrap();
    }
}

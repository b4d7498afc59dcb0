//! A simulated disk for tests: it remembers what is durable and what was written since
//! the last flush, can stop working after a number of operations (the crash), and on a
//! power loss keeps only some of the unflushed writes, possibly torn at sector borders.

use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use crate::{BlockDevice, DeviceError, BLOCK_SIZE, SECTOR_SIZE};

const SECTORS_PER_BLOCK: usize = BLOCK_SIZE / SECTOR_SIZE;

/// SplitMix64: small, seedable, good enough to pick crash outcomes.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut value = self.0;
        value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        value ^ (value >> 31)
    }

    /// A number in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// How a power loss treats the writes since the last flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerLoss {
    /// Each write independently reached the disk or not.
    Subset,
    /// The writes up to a point reached the disk, the next one torn.
    TornPrefix,
    /// Every write reached the disk but one, which is torn in half.
    TornHalf,
    /// The writes up to a point reached the disk, the next one torn at any byte: a
    /// device that does not even write a sector atomically.
    TornBytes,
}

/// A simulated disk. Handles made by [`CrashDisk::share`] are the same disk (a test
/// keeps one while the store owns another, and sees the writes of a store that failed);
/// [`CrashDisk::fork`] makes an independent copy.
#[derive(Debug)]
pub struct CrashDisk(Rc<RefCell<State>>);

#[derive(Debug, Clone)]
struct State {
    /// What survives a power loss for certain.
    durable: Vec<u8>,
    /// What reads see: `durable` with `pending` applied.
    current: Vec<u8>,
    /// Block writes since the last flush, in order.
    pending: Vec<(u64, Vec<u8>)>,
    /// Operations (block writes and flushes) left before the device stops answering.
    budget: Option<usize>,
    /// Operations left before one fails on its own (the device works on after it).
    fail_in: Option<usize>,
    /// Block writes and flushes done.
    operations: usize,
    read_only: bool,
}

impl CrashDisk {
    pub fn new(blocks: u64) -> CrashDisk {
        let bytes = vec![0u8; blocks as usize * BLOCK_SIZE];
        CrashDisk(Rc::new(RefCell::new(State {
            durable: bytes.clone(),
            current: bytes,
            pending: Vec::new(),
            budget: None,
            fail_in: None,
            operations: 0,
            read_only: false,
        })))
    }

    /// Another handle on the same disk.
    pub fn share(&self) -> CrashDisk {
        CrashDisk(Rc::clone(&self.0))
    }

    /// An independent copy of the disk as it is now.
    pub fn fork(&self) -> CrashDisk {
        CrashDisk(Rc::new(RefCell::new(self.0.borrow().clone())))
    }

    pub fn operations(&self) -> usize {
        self.0.borrow().operations
    }

    pub fn set_read_only(&self, read_only: bool) {
        self.0.borrow_mut().read_only = read_only;
    }

    /// The device does `operations` more operations, then fails every request: the
    /// moment the machine crashed.
    pub fn crash_after(&self, operations: usize) {
        self.0.borrow_mut().budget = Some(operations);
    }

    /// The operation after the next `operations` ones fails once, without any effect
    /// (a transient device error); the ones after it work.
    pub fn fail_once_after(&self, operations: usize) {
        self.0.borrow_mut().fail_in = Some(operations);
    }

    pub fn crashed(&self) -> bool {
        self.0.borrow().budget == Some(0)
    }

    /// The guest died but the host kept every write it completed: the device works
    /// again, nothing is lost.
    pub fn restart(&self) {
        self.0.borrow_mut().budget = None;
    }

    /// Power is lost: of the writes since the last flush, only what `mode` picks
    /// reaches the disk. The device works again afterwards.
    pub fn power_loss(&self, rng: &mut Rng, mode: PowerLoss) {
        let mut state = self.0.borrow_mut();
        let pending = core::mem::take(&mut state.pending);
        let count = pending.len();
        let (keep_until, torn) = match mode {
            PowerLoss::Subset => (count, None),
            PowerLoss::TornPrefix | PowerLoss::TornBytes => {
                let cut = rng.below(count as u64 + 1) as usize;
                (cut, (cut < count).then_some(cut))
            }
            PowerLoss::TornHalf => (count, (count > 0).then(|| rng.below(count as u64) as usize)),
        };
        for (index, (block, data)) in pending.into_iter().enumerate() {
            let at = block as usize * BLOCK_SIZE;
            if torn == Some(index) && mode == PowerLoss::TornBytes {
                let cut = rng.below(BLOCK_SIZE as u64) as usize;
                state.durable[at..at + cut].copy_from_slice(&data[..cut]);
                continue;
            }
            if torn == Some(index) {
                // The first half of the sectors, or any subset of them.
                let half = rng.below(2) == 0;
                for sector in 0..SECTORS_PER_BLOCK {
                    let written = if half { sector < SECTORS_PER_BLOCK / 2 } else { rng.below(2) == 0 };
                    if written {
                        let range = sector * SECTOR_SIZE..(sector + 1) * SECTOR_SIZE;
                        state.durable[at + range.start..at + range.end].copy_from_slice(&data[range]);
                    }
                }
                continue;
            }
            let kept = index < keep_until && (mode != PowerLoss::Subset || rng.below(2) == 0);
            if kept {
                state.durable[at..at + BLOCK_SIZE].copy_from_slice(&data);
            }
        }
        state.current = state.durable.clone();
        state.budget = None;
    }

    /// Overwrites bytes behind the store's back (damage, foreign data), durably.
    pub fn poke(&self, offset: usize, bytes: &[u8]) {
        let mut state = self.0.borrow_mut();
        state.durable[offset..offset + bytes.len()].copy_from_slice(bytes);
        state.current[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// Reads bytes as the device shows them.
    pub fn peek(&self, offset: usize, len: usize) -> Vec<u8> {
        self.0.borrow().current[offset..offset + len].to_vec()
    }
}

fn crash() -> DeviceError {
    DeviceError(String::from("simulated crash"))
}

impl State {
    fn spend(&mut self) -> Result<(), DeviceError> {
        match self.fail_in.as_mut() {
            Some(0) => {
                self.fail_in = None;
                return Err(DeviceError(String::from("simulated transient error")));
            }
            Some(left) => *left -= 1,
            None => {}
        }
        match self.budget.as_mut() {
            Some(0) => return Err(crash()),
            Some(left) => *left -= 1,
            None => {}
        }
        self.operations += 1;
        Ok(())
    }

    fn check(&self, block: u64, len: usize) {
        assert!(len > 0 && len % BLOCK_SIZE == 0, "length {len} is not whole blocks");
        assert!(block as usize * BLOCK_SIZE + len <= self.current.len(), "block {block} + {len} bytes past the end");
    }
}

impl BlockDevice for CrashDisk {
    fn block_count(&self) -> u64 {
        (self.0.borrow().current.len() / BLOCK_SIZE) as u64
    }

    fn read(&mut self, block: u64, buffer: &mut [u8]) -> Result<(), DeviceError> {
        let state = self.0.borrow();
        state.check(block, buffer.len());
        if state.budget == Some(0) {
            return Err(crash());
        }
        let at = block as usize * BLOCK_SIZE;
        buffer.copy_from_slice(&state.current[at..at + buffer.len()]);
        Ok(())
    }

    fn write(&mut self, block: u64, data: &[u8]) -> Result<(), DeviceError> {
        let mut state = self.0.borrow_mut();
        state.check(block, data.len());
        assert!(!state.read_only, "the store wrote to a read-only disk");
        for (index, chunk) in data.chunks(BLOCK_SIZE).enumerate() {
            state.spend()?;
            let block = block + index as u64;
            let at = block as usize * BLOCK_SIZE;
            state.current[at..at + BLOCK_SIZE].copy_from_slice(chunk);
            state.pending.push((block, chunk.to_vec()));
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DeviceError> {
        let mut state = self.0.borrow_mut();
        state.spend()?;
        let pending = core::mem::take(&mut state.pending);
        for (block, data) in pending {
            let at = block as usize * BLOCK_SIZE;
            state.durable[at..at + BLOCK_SIZE].copy_from_slice(&data);
        }
        Ok(())
    }

    fn read_only(&self) -> bool {
        self.0.borrow().read_only
    }
}

//! Which blocks are in use: a bitmap rebuilt at mount from the live file table, never
//! stored. Allocation is next fit from where the last one ended, so blocks a commit just
//! freed are the last to be reused.

use alloc::vec;
use alloc::vec::Vec;

use crate::Extent;

#[derive(Debug, Clone)]
pub struct FreeMap {
    /// Bit `b % 64` of word `b / 64` is set when block `b` is in use.
    words: Vec<u64>,
    blocks: u64,
    free: u64,
    cursor: u64,
}

impl FreeMap {
    /// All `blocks` free.
    pub fn new(blocks: u64) -> FreeMap {
        FreeMap { words: vec![0; blocks.div_ceil(64) as usize], blocks, free: blocks, cursor: 0 }
    }

    pub fn free_blocks(&self) -> u64 {
        self.free
    }

    fn is_used(&self, block: u64) -> bool {
        self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn set(&mut self, block: u64, used: bool) {
        let word = &mut self.words[(block / 64) as usize];
        if used {
            *word |= 1 << (block % 64);
        } else {
            *word &= !(1 << (block % 64));
        }
    }

    /// Marks `extent` used; `false` (and nothing marked) when it leaves the disk or
    /// overlaps a block already in use.
    pub fn claim(&mut self, extent: Extent) -> bool {
        let Some(end) = extent.start.checked_add(extent.len) else { return false };
        if end > self.blocks || (extent.start..end).any(|block| self.is_used(block)) {
            return false;
        }
        (extent.start..end).for_each(|block| self.set(block, true));
        self.free -= extent.len;
        true
    }

    /// Marks `extent`, which is in use, free again.
    pub fn release(&mut self, extent: Extent) {
        for block in extent.start..extent.end() {
            debug_assert!(self.is_used(block), "block {block} released twice");
            self.set(block, false);
        }
        self.free += extent.len;
    }

    /// The free run starting at the first free block at or after `from` (below `limit`),
    /// as long as it goes but at most `limit`.
    fn next_free_run(&self, from: u64, limit: u64) -> Option<Extent> {
        let mut block = from;
        while block < limit {
            let word = self.words[(block / 64) as usize];
            if block % 64 == 0 && word == u64::MAX {
                block += 64;
                continue;
            }
            if !self.is_used(block) {
                break;
            }
            block += 1;
        }
        if block >= limit {
            return None;
        }
        let start = block;
        while block < limit {
            let word = self.words[(block / 64) as usize];
            if block % 64 == 0 && word == 0 && block + 64 <= limit {
                block += 64;
                continue;
            }
            if self.is_used(block) {
                break;
            }
            block += 1;
        }
        Some(Extent { start, len: block - start })
    }

    /// Free runs in disk order starting at the cursor and wrapping once.
    fn runs(&self) -> impl Iterator<Item = Extent> + '_ {
        let cursor = self.cursor.min(self.blocks);
        let mut position = cursor;
        let mut wrapped = false;
        core::iter::from_fn(move || loop {
            let limit = if wrapped { cursor } else { self.blocks };
            match self.next_free_run(position, limit) {
                Some(run) => {
                    position = run.end();
                    return Some(run);
                }
                None if wrapped => return None,
                None => {
                    wrapped = true;
                    position = 0;
                }
            }
        })
    }

    /// Takes `count` free blocks in at most `max_extents` extents, marking them used:
    /// one run that holds them all when there is one, else the runs from the cursor on.
    /// `None` (and nothing taken) when they do not fit.
    pub fn allocate(&mut self, count: u64, max_extents: usize) -> Option<Vec<Extent>> {
        if count == 0 {
            return Some(Vec::new());
        }
        if count > self.free || max_extents == 0 {
            return None;
        }
        let extents = match self.runs().find(|run| run.len >= count) {
            Some(run) => vec![Extent { start: run.start, len: count }],
            None => {
                let mut extents = Vec::new();
                let mut left = count;
                for run in self.runs() {
                    if extents.len() == max_extents {
                        return None;
                    }
                    let take = run.len.min(left);
                    extents.push(Extent { start: run.start, len: take });
                    left -= take;
                    if left == 0 {
                        break;
                    }
                }
                if left > 0 {
                    return None;
                }
                extents
            }
        };
        for extent in &extents {
            let claimed = self.claim(*extent);
            debug_assert!(claimed, "allocated a block in use");
        }
        self.cursor = extents.last().map_or(self.cursor, Extent::end);
        Some(extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(extents: &[Extent]) -> u64 {
        extents.iter().map(|extent| extent.len).sum()
    }

    #[test]
    fn allocate_takes_one_run_when_one_fits() {
        let mut map = FreeMap::new(1000);
        assert!(map.claim(Extent { start: 0, len: 16 }));
        let extents = map.allocate(100, 1).unwrap();
        assert_eq!(extents, vec![Extent { start: 16, len: 100 }]);
        assert_eq!(map.free_blocks(), 1000 - 116);
    }

    #[test]
    fn allocate_spreads_over_runs_and_respects_the_extent_limit() {
        let mut map = FreeMap::new(200);
        // Every other 10-block run in use.
        for start in (0..200).step_by(20) {
            assert!(map.claim(Extent { start, len: 10 }));
        }
        assert_eq!(map.allocate(35, 3), None);
        assert_eq!(map.free_blocks(), 100);
        let extents = map.allocate(35, 4).unwrap();
        assert_eq!(total(&extents), 35);
        assert_eq!(extents.len(), 4);
        assert_eq!(map.free_blocks(), 65);
    }

    #[test]
    fn allocate_refuses_more_than_free_and_wraps_around() {
        let mut map = FreeMap::new(130);
        let first = map.allocate(100, 1).unwrap();
        assert_eq!(map.allocate(31, 8), None);
        map.release(first[0]);
        // The cursor is at 100: the run 100..130 comes first, then 0..100 after the wrap.
        let extents = map.allocate(120, 8).unwrap();
        assert_eq!(extents, vec![Extent { start: 100, len: 30 }, Extent { start: 0, len: 90 }]);
    }

    #[test]
    fn claim_refuses_overlaps_and_extents_past_the_end() {
        let mut map = FreeMap::new(100);
        assert!(map.claim(Extent { start: 10, len: 10 }));
        assert!(!map.claim(Extent { start: 19, len: 2 }));
        assert!(!map.claim(Extent { start: 95, len: 6 }));
        assert!(!map.claim(Extent { start: u64::MAX, len: 2 }));
        assert_eq!(map.free_blocks(), 90);
    }
}

//! Boot page tables: an identity map of the low GiBs with 2 MiB pages.
//!
//! Rules from the platform (shared/PLATFORM.md): every present entry at every level has
//! U/S=1, or a paravirtual vCPU spins on spurious faults; PML4 slot 256 is never used, the
//! host owns it. The same tables work on hardware KVM (the VMM keeps SMEP/SMAP off).

/// Entries in one 4 KiB table.
pub const ENTRIES: usize = 512;
pub const PRESENT: u64 = 1 << 0;
pub const WRITABLE: u64 = 1 << 1;
pub const USER: u64 = 1 << 2;
pub const HUGE: u64 = 1 << 7;
/// The PML4 slot the PVM host reserves (`0xffff800000000000`).
pub const RESERVED_PML4_SLOT: usize = 256;

const GIB: u64 = 1 << 30;
const TWO_MIB: u64 = 2 << 20;
const FLAGS: u64 = PRESENT | WRITABLE | USER;

/// Why tables could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageTableError {
    /// `gib` was 0 or more than one PDPT's worth of page directories.
    BadSize { gib: u64 },
    /// The buffer holds fewer than the `2 + gib` tables needed.
    BufferTooSmall { needed: usize, got: usize },
    /// `tables_addr` is not page aligned.
    Unaligned { tables_addr: u64 },
}

/// Number of 4 KiB tables [`build_identity_map`] writes for `gib` GiB.
pub const fn table_count(gib: u64) -> usize {
    2 + gib as usize
}

/// Fills `tables`, laid out as consecutive 512-entry tables at guest-physical `tables_addr`
/// (PML4, PDPT, then one PD per GiB), with an identity map of `[0, gib GiB)`.
pub fn build_identity_map(tables: &mut [u64], tables_addr: u64, gib: u64) -> Result<(), PageTableError> {
    if gib == 0 || gib > ENTRIES as u64 {
        return Err(PageTableError::BadSize { gib });
    }
    if tables_addr % 0x1000 != 0 {
        return Err(PageTableError::Unaligned { tables_addr });
    }
    let needed = table_count(gib) * ENTRIES;
    if tables.len() < needed {
        return Err(PageTableError::BufferTooSmall { needed, got: tables.len() });
    }
    tables[..needed].fill(0);
    let table_addr = |index: usize| tables_addr + (index as u64) * 0x1000;

    // PML4 slot 0 -> PDPT; nothing else, so slot 256 stays empty.
    tables[0] = table_addr(1) | FLAGS;
    for gib_index in 0..gib as usize {
        tables[ENTRIES + gib_index] = table_addr(2 + gib_index) | FLAGS;
        let pd = &mut tables[(2 + gib_index) * ENTRIES..(3 + gib_index) * ENTRIES];
        for (entry_index, entry) in pd.iter_mut().enumerate() {
            let physical = gib_index as u64 * GIB + entry_index as u64 * TWO_MIB;
            *entry = physical | FLAGS | HUGE;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;

    const BASE: u64 = 0x9000;

    fn build(gib: u64) -> std::vec::Vec<u64> {
        let mut tables = vec![0u64; table_count(gib) * ENTRIES];
        build_identity_map(&mut tables, BASE, gib).unwrap();
        tables
    }

    /// Walks the tables like the MMU does and returns the physical address of `virt`.
    fn translate(tables: &[u64], virt: u64) -> Option<u64> {
        let index = |level_shift: u32| ((virt >> level_shift) & 0x1ff) as usize;
        let table = |addr: u64| ((addr & !0xfff) - BASE) as usize / 8;
        let pml4e = tables[index(39)];
        if pml4e & PRESENT == 0 {
            return None;
        }
        let pdpte = tables[table(pml4e) + index(30)];
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pde = tables[table(pdpte) + index(21)];
        if pde & PRESENT == 0 {
            return None;
        }
        assert!(pde & HUGE != 0);
        Some((pde & !0x1f_ffff & 0x000f_ffff_ffff_f000) | (virt & 0x1f_ffff))
    }

    #[test]
    fn identity_map_translates_low_addresses_to_themselves() {
        let tables = build(4);
        for addr in [0u64, 0x7000, 0x20_0000, 0xfee0_0350, 0xffff_ffff, 3 * GIB + 12345] {
            assert_eq!(translate(&tables, addr), Some(addr), "addr {addr:#x}");
        }
        assert_eq!(translate(&tables, 4 * GIB), None);
    }

    #[test]
    fn every_present_entry_has_user_bit() {
        let tables = build(4);
        let present = tables.iter().filter(|entry| *entry & PRESENT != 0);
        let mut count = 0;
        for entry in present {
            assert_ne!(entry & USER, 0, "entry {entry:#x} lacks U/S");
            count += 1;
        }
        assert_eq!(count, 1 + 4 + 4 * ENTRIES);
    }

    #[test]
    fn pml4_slot_256_stays_empty() {
        let tables = build(16);
        assert_eq!(tables[RESERVED_PML4_SLOT], 0);
        assert_eq!(translate(&tables, 0xffff_8000_0000_0000), None);
    }

    #[test]
    fn build_rejects_zero_size_small_buffer_and_unaligned_base() {
        let mut tables = vec![0u64; 3 * ENTRIES];
        assert_eq!(build_identity_map(&mut tables, BASE, 0), Err(PageTableError::BadSize { gib: 0 }));
        assert_eq!(
            build_identity_map(&mut tables, BASE, 2),
            Err(PageTableError::BufferTooSmall { needed: 4 * ENTRIES, got: 3 * ENTRIES })
        );
        assert_eq!(
            build_identity_map(&mut tables, BASE + 8, 1),
            Err(PageTableError::Unaligned { tables_addr: BASE + 8 })
        );
    }
}

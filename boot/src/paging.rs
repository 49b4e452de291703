//! Identity-mapping page tables for the 64-bit entry: the first 4 GiB mapped with 2 MiB pages
//! (Intel SDM vol. 3A section 4.5, "4-Level Paging"), so the kernel, the zero page, the command
//! line and the MMIO devices below 4 GiB are all reachable at their physical addresses. Linux's
//! 64-bit boot protocol requires identity mapping of at least the kernel, the zero page and the
//! command line.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const PAGE_SIZE_2M: u64 = 1 << 7;
const ENTRIES: u64 = 512;
/// Page directories: one per GiB.
const DIRECTORIES: u64 = 4;

fn page() -> Vec<u8> {
    vec![0u8; (ENTRIES * 8) as usize]
}

/// Writes PML4, PDPT and page directories; returns the value for CR3.
pub fn write_identity_map<M: GuestMemoryBackend>(
    mem: &M,
) -> Result<u64, vm_memory::GuestMemoryError> {
    // Whole pages, so entries left from an earlier boot cannot survive.
    let mut pml4 = page();
    pml4[..8].copy_from_slice(&(layout::PDPT_START | PRESENT | WRITABLE).to_le_bytes());
    mem.write_slice(&pml4, GuestAddress(layout::PML4_START))?;

    let mut pdpt = page();
    for (i, entry) in pdpt
        .chunks_exact_mut(8)
        .take(DIRECTORIES as usize)
        .enumerate()
    {
        let value = (layout::PD_START + i as u64 * 0x1000) | PRESENT | WRITABLE;
        entry.copy_from_slice(&value.to_le_bytes());
    }
    mem.write_slice(&pdpt, GuestAddress(layout::PDPT_START))?;

    let mut directories = vec![0u8; (DIRECTORIES * ENTRIES * 8) as usize];
    for (i, entry) in directories.chunks_exact_mut(8).enumerate() {
        let value = ((i as u64) << 21) | PRESENT | WRITABLE | PAGE_SIZE_2M;
        entry.copy_from_slice(&value.to_le_bytes());
    }
    mem.write_slice(&directories, GuestAddress(layout::PD_START))?;
    Ok(layout::PML4_START)
}

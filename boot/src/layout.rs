//! The guest physical memory map, in one place.
//!
//! Everything Ember puts in guest memory or exposes on the guest's buses has its address here, so
//! the boot code, the device wiring and the tables that describe them to the guest cannot disagree.

/// Real-mode IVT and BIOS data area end; the first E820 RAM range starts at 0.
pub const GDT_START: u64 = 0x500;
/// An IDT with limit 0: a fault before the guest installs its own triple-faults (a clean reset).
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map entries.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// PVH module list (the initramfs), after room for 82 memory map entries.
pub const PVH_MODLIST_START: u64 = 0x6800;
/// The Linux zero page (`boot_params`); RSI points here at the 64-bit entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity-mapping page tables for the 64-bit entry: PML4, PDPT, then four page directories of
/// 2 MiB pages (the first 4 GiB, covering RAM below the hole and the MMIO devices).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Kernel command line. Linux's x86 `COMMAND_LINE_SIZE` is 2048 bytes including the NUL.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Initial stack for guests entered at a plain 64-bit ELF entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Extended BIOS data area: from here to 1 MiB is reserved in the E820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP floating pointer and configuration table live at the start of the EBDA.
pub const MPTABLE_START: u64 = EBDA_START;
/// RSDP where Linux scans for it (0xe0000-0xfffff); the other ACPI tables follow it.
pub const RSDP_START: u64 = 0xe0000;
pub const ACPI_TABLES_END: u64 = 0x10_0000;
/// Kernels load at 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole: RAM stops at 3 GiB and continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices: one 4 KiB window each from here, IRQs from `VIRTIO_IRQ_BASE` up.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// The last IRQ line a virtio device may take (the IOAPIC has 24 pins).
pub const VIRTIO_IRQ_MAX: u32 = 23;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages below 4 GiB for the TSS and one for the EPT identity map (Intel).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Legacy port I/O.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
/// The CMOS real-time clock: index at 0x70, data at 0x71; its century byte at CMOS index 0x32
/// (the FADT's CENTURY field).
pub const CMOS_PORT: u16 = 0x70;
pub const CMOS_CENTURY_INDEX: u8 = 0x32;
/// The pvpanic device's port (QEMU's default), `QEMU0001` in the DSDT.
pub const PVPANIC_PORT: u16 = 0x505;
/// ACPI hardware-reduced sleep control and status registers (FADT `SLEEP_CONTROL_REG`,
/// `SLEEP_STATUS_REG`), one byte each.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// The `SLP_TYP` value the DSDT's `\_S5_` package names, so a write of it with `SLP_EN` is a
/// poweroff.
pub const ACPI_S5_SLP_TYP: u8 = 5;

/// Guest RAM ranges for `mem_size` bytes: one range below the MMIO hole, and the rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_size - MMIO_HOLE_START),
        ]
    }
}

/// A virtio-mmio device's place on the bus, as the DSDT and the kernel command line describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    pub addr: u64,
    pub len: u64,
    pub irq: u32,
}

impl MmioDeviceInfo {
    /// The `index`th virtio-mmio slot, or `None` when the IOAPIC has no IRQ line left for it.
    pub fn virtio_slot(index: u32) -> Option<Self> {
        let irq = VIRTIO_IRQ_BASE.checked_add(index)?;
        if irq > VIRTIO_IRQ_MAX {
            return None;
        }
        Some(MmioDeviceInfo {
            addr: VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SIZE,
            len: VIRTIO_MMIO_SIZE,
            irq,
        })
    }

    /// The `virtio_mmio.device=` word Linux parses when built with
    /// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`.
    pub fn cmdline_word(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.len / 1024,
            self.addr,
            self.irq
        )
    }
}

/// A device as the guest's firmware tables describe it. The VMM's device manager lists what it
/// attached, with the resources its allocator gave out, and the DSDT is written from that list: the
/// tables describe exactly the devices on the buses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestDevice {
    /// A 16550 UART (`PNP0501`): eight ports and an IRQ line.
    Serial { port: u16, irq: u32 },
    /// The pvpanic port (`QEMU0001`), one byte.
    PvPanic { port: u16 },
    /// A virtio-mmio device (`LNRO0005`).
    VirtioMmio(MmioDeviceInfo),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), 4 << 30);
    }

    #[test]
    fn virtio_slots_stay_in_ioapic_range() {
        let s = MmioDeviceInfo::virtio_slot(1).unwrap();
        assert_eq!(s.addr, 0xd000_1000);
        assert_eq!(s.irq, 6);
        assert_eq!(s.cmdline_word(), "virtio_mmio.device=4K@0xd0001000:6");
        assert!(MmioDeviceInfo::virtio_slot(VIRTIO_IRQ_MAX - VIRTIO_IRQ_BASE).is_some());
        assert!(MmioDeviceInfo::virtio_slot(VIRTIO_IRQ_MAX - VIRTIO_IRQ_BASE + 1).is_none());
    }
}

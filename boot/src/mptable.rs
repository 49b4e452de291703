//! The MP table, as the Intel MultiProcessor Specification 1.4 (May 1997) defines it: the MP
//! floating pointer structure (section 4.1), the MP configuration table header (4.2) and its base
//! entries (4.3: processor, bus, I/O APIC, I/O interrupt and local interrupt assignment).
//!
//! Kernels built without ACPI (or with `acpi=off`) find CPUs and the I/O APIC here. Ember's ACPI
//! MADT says the same things: one processor per vCPU with APIC ids 0..N, one I/O APIC with id N.
//! Linux looks for the floating pointer in the last KiB of base memory, which is where
//! `layout::MPTABLE_START` is.

use std::mem::size_of;

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout;

const SPEC_REVISION: u8 = 4;
/// The APIC version KVM's in-kernel local APIC and I/O APIC report.
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// The last I/O APIC input: KVM's I/O APIC has 24 pins.
const IOAPIC_MAX_PIN: u8 = 23;
/// APIC ids are 8 bits and the I/O APIC takes the id after the last CPU, and 0xff means
/// "broadcast" in local interrupt entries.
pub const MAX_CPUS: u8 = 254;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
const IOAPIC_ENABLED: u8 = 1 << 0;

/// Interrupt types (table 4-8).
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger "conform to the bus": edge, active high on ISA.
const INT_FLAGS_CONFORMING: u16 = 0;
const ISA_BUS_ID: u8 = 0;
const ALL_LOCAL_APICS: u8 = 0xff;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs cannot be described in an MP table (1 to {MAX_CPUS})")]
    CpuCount(u8),
    #[error("the MP table ({0} bytes) does not fit below the ACPI tables")]
    TooLarge(usize),
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct FloatingPointer {
    signature: [u8; 4],
    physptr: u32,
    length: u8,
    spec_rev: u8,
    checksum: u8,
    feature1: u8,
    feature2: u8,
    feature3: [u8; 3],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct ConfigHeader {
    signature: [u8; 4],
    base_table_length: u16,
    spec_rev: u8,
    checksum: u8,
    oem_id: [u8; 8],
    product_id: [u8; 12],
    oem_table_pointer: u32,
    oem_table_size: u16,
    entry_count: u16,
    lapic_address: u32,
    extended_table_length: u16,
    extended_table_checksum: u8,
    reserved: u8,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct ProcessorEntry {
    entry_type: u8,
    lapic_id: u8,
    lapic_version: u8,
    cpu_flags: u8,
    cpu_signature: u32,
    feature_flags: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct BusEntry {
    entry_type: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct IoApicEntry {
    entry_type: u8,
    ioapic_id: u8,
    ioapic_version: u8,
    flags: u8,
    address: u32,
}

/// Shared by I/O interrupt (type 3) and local interrupt (type 4) assignment entries: for the
/// latter, `dest_id` is a local APIC id and `dest_pin` a LINTIN pin.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct InterruptEntry {
    entry_type: u8,
    int_type: u8,
    flags: u16,
    source_bus_id: u8,
    source_bus_irq: u8,
    dest_id: u8,
    dest_pin: u8,
}

// SAFETY: all are packed structs of plain integers: every byte pattern is valid, no padding.
unsafe impl ByteValued for FloatingPointer {}
// SAFETY: as above.
unsafe impl ByteValued for ConfigHeader {}
// SAFETY: as above.
unsafe impl ByteValued for ProcessorEntry {}
// SAFETY: as above.
unsafe impl ByteValued for BusEntry {}
// SAFETY: as above.
unsafe impl ByteValued for IoApicEntry {}
// SAFETY: as above.
unsafe impl ByteValued for InterruptEntry {}

const _: () = assert!(size_of::<FloatingPointer>() == 16);
const _: () = assert!(size_of::<ConfigHeader>() == 44);
const _: () = assert!(size_of::<ProcessorEntry>() == 20);
const _: () = assert!(size_of::<BusEntry>() == 8);
const _: () = assert!(size_of::<IoApicEntry>() == 8);
const _: () = assert!(size_of::<InterruptEntry>() == 8);

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The configuration table's base entries, in the order the spec requires (by entry type).
fn base_entries(cpus: u8) -> (Vec<u8>, u16) {
    let mut bytes = Vec::new();
    let mut count = 0u16;
    let mut push = |entry: &[u8]| {
        bytes.extend_from_slice(entry);
        count += 1;
    };
    for id in 0..cpus {
        let cpu = ProcessorEntry {
            entry_type: ENTRY_PROCESSOR,
            lapic_id: id,
            lapic_version: LAPIC_VERSION,
            cpu_flags: CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 },
            // Family 6 signature, FPU and APIC feature bits: what Linux expects of any x86_64.
            cpu_signature: 0x600,
            feature_flags: (1 << 0) | (1 << 9),
            reserved: [0; 2],
        };
        push(cpu.as_slice());
    }
    let bus = BusEntry {
        entry_type: ENTRY_BUS,
        bus_id: ISA_BUS_ID,
        bus_type: *b"ISA   ",
    };
    push(bus.as_slice());
    let ioapic_id = cpus;
    let ioapic = IoApicEntry {
        entry_type: ENTRY_IOAPIC,
        ioapic_id,
        ioapic_version: IOAPIC_VERSION,
        flags: IOAPIC_ENABLED,
        address: layout::IOAPIC_START as u32,
    };
    push(ioapic.as_slice());
    // ISA IRQ n is I/O APIC pin n for the legacy IRQs and for the virtio IRQs above them: KVM's
    // default GSI routing is the identity.
    for irq in 0..=IOAPIC_MAX_PIN {
        let io = InterruptEntry {
            entry_type: ENTRY_IO_INTERRUPT,
            int_type: INT_TYPE_INT,
            flags: INT_FLAGS_CONFORMING,
            source_bus_id: ISA_BUS_ID,
            source_bus_irq: irq,
            dest_id: ioapic_id,
            dest_pin: irq,
        };
        push(io.as_slice());
    }
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        let local = InterruptEntry {
            entry_type: ENTRY_LOCAL_INTERRUPT,
            int_type,
            flags: INT_FLAGS_CONFORMING,
            source_bus_id: ISA_BUS_ID,
            source_bus_irq: 0,
            dest_id: ALL_LOCAL_APICS,
            dest_pin: lint,
        };
        push(local.as_slice());
    }
    (bytes, count)
}

/// The floating pointer and the configuration table for `cpus` processors, as placed at `base`.
fn build(cpus: u8, base: u64) -> Vec<u8> {
    let table_addr = base + size_of::<FloatingPointer>() as u64;
    let mut fp = FloatingPointer {
        signature: *b"_MP_",
        physptr: table_addr as u32,
        length: 1, // in 16-byte units
        spec_rev: SPEC_REVISION,
        ..Default::default()
    };
    fp.checksum = checksum(fp.as_slice());

    let (entries, entry_count) = base_entries(cpus);
    let mut header = ConfigHeader {
        signature: *b"PCMP",
        base_table_length: (size_of::<ConfigHeader>() + entries.len()) as u16,
        spec_rev: SPEC_REVISION,
        oem_id: *b"EMBER   ",
        product_id: *b"EMBER VM    ",
        entry_count,
        lapic_address: layout::APIC_START as u32,
        ..Default::default()
    };
    let mut table = header.as_slice().to_vec();
    table.extend_from_slice(&entries);
    header.checksum = checksum(&table);
    table[..size_of::<ConfigHeader>()].copy_from_slice(header.as_slice());

    let mut out = fp.as_slice().to_vec();
    out.extend_from_slice(&table);
    out
}

/// Writes the MP floating pointer and configuration table at `layout::MPTABLE_START`.
pub fn setup_mptable<M: GuestMemoryBackend>(mem: &M, cpus: u8) -> Result<(), MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::CpuCount(cpus));
    }
    let bytes = build(cpus, layout::MPTABLE_START);
    if layout::MPTABLE_START + bytes.len() as u64 > layout::RSDP_START {
        return Err(MptableError::TooLarge(bytes.len()));
    }
    mem.write_slice(&bytes, GuestAddress(layout::MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::guest_memory;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// Reads the table back from guest memory and returns its entries as (type, bytes).
    fn parse(cpus: u8) -> Vec<(u8, Vec<u8>)> {
        let mem = guest_memory(128 << 20);
        setup_mptable(&mem, cpus).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(layout::MPTABLE_START))
            .unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(sum(&fp), 0, "floating pointer checksum");
        assert_eq!(fp[9], SPEC_REVISION);
        let table_addr = u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64;

        let mut header = [0u8; 44];
        mem.read_slice(&mut header, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(&header[..4], b"PCMP");
        let len = u16::from_le_bytes([header[4], header[5]]) as usize;
        let count = u16::from_le_bytes([header[34], header[35]]) as usize;
        let lapic = u32::from_le_bytes(header[36..40].try_into().unwrap());
        assert_eq!(u64::from(lapic), layout::APIC_START);
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(sum(&table), 0, "configuration table checksum");

        let mut entries = Vec::new();
        let mut at = 44;
        while at < len {
            let size = if table[at] == ENTRY_PROCESSOR { 20 } else { 8 };
            entries.push((table[at], table[at..at + size].to_vec()));
            at += size;
        }
        assert_eq!(at, len);
        assert_eq!(entries.len(), count);
        entries
    }

    #[test]
    fn one_processor_entry_per_cpu_bsp_first() {
        for cpus in [1u8, 2, 4, MAX_CPUS] {
            let entries = parse(cpus);
            let cpus_seen: Vec<&Vec<u8>> = entries
                .iter()
                .filter(|(t, _)| *t == ENTRY_PROCESSOR)
                .map(|(_, e)| e)
                .collect();
            assert_eq!(cpus_seen.len(), cpus as usize);
            for (i, e) in cpus_seen.iter().enumerate() {
                assert_eq!(e[1] as usize, i, "APIC id");
                let expected = if i == 0 {
                    CPU_ENABLED | CPU_BOOTSTRAP
                } else {
                    CPU_ENABLED
                };
                assert_eq!(e[3], expected);
            }
            // Entries are sorted by type, as the spec requires.
            assert!(entries.windows(2).all(|w| w[0].0 <= w[1].0));
        }
    }

    #[test]
    fn ioapic_follows_the_cpus_and_every_pin_is_wired() {
        let cpus = 4;
        let entries = parse(cpus);
        let ioapic: Vec<_> = entries.iter().filter(|(t, _)| *t == ENTRY_IOAPIC).collect();
        assert_eq!(ioapic.len(), 1);
        let e = &ioapic[0].1;
        assert_eq!(e[1], cpus);
        assert_eq!(
            u32::from_le_bytes(e[4..8].try_into().unwrap()) as u64,
            layout::IOAPIC_START
        );
        let pins: Vec<(u8, u8)> = entries
            .iter()
            .filter(|(t, _)| *t == ENTRY_IO_INTERRUPT)
            .map(|(_, e)| (e[5], e[7]))
            .collect();
        let expected: Vec<(u8, u8)> = (0..=IOAPIC_MAX_PIN).map(|i| (i, i)).collect();
        assert_eq!(pins, expected);
        assert!(u32::from(IOAPIC_MAX_PIN) >= layout::VIRTIO_IRQ_MAX);
        let locals: Vec<(u8, u8)> = entries
            .iter()
            .filter(|(t, _)| *t == ENTRY_LOCAL_INTERRUPT)
            .map(|(_, e)| (e[1], e[7]))
            .collect();
        assert_eq!(locals, vec![(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)]);
    }

    #[test]
    fn impossible_cpu_counts_are_refused() {
        let mem = guest_memory(128 << 20);
        assert!(matches!(
            setup_mptable(&mem, 0),
            Err(MptableError::CpuCount(0))
        ));
        assert!(matches!(
            setup_mptable(&mem, 255),
            Err(MptableError::CpuCount(255))
        ));
    }
}

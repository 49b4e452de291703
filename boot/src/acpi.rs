//! ACPI tables (ACPI 6.5 specification), built with the `acpi_tables` crate:
//!
//! - RSDP revision 2 (section 5.2.5) at `layout::RSDP_START`, where Linux scans for it;
//! - XSDT (5.2.8) listing the FADT and the MADT;
//! - FADT (5.2.9) for a hardware-reduced platform (4.1): no PM timer, no GPEs, no SCI; sleep goes
//!   through the sleep control/status registers (4.8.3.7), which are Ember's one-byte ports
//!   `ACPI_SLEEP_CONTROL_PORT` and `ACPI_SLEEP_STATUS_PORT`; reset through the i8042;
//! - MADT (5.2.12): one enabled local APIC per vCPU (APIC ids 0..N) and one I/O APIC (id N,
//!   GSI base 0). No interrupt source overrides: KVM routes ISA IRQ n to I/O APIC pin n, as
//!   Firecracker's MADT also assumes;
//! - DSDT (5.2.11.1): COM1 (`PNP0501`), one `LNRO0005` device per virtio-mmio slot (the id Linux's
//!   virtio_mmio driver matches), and `\_S5_` whose SLP_TYP is `layout::ACPI_S5_SLP_TYP`.
//!
//! Everything lives between `RSDP_START` and `ACPI_TABLES_END`, inside the E820 reserved range.

use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, Scope,
    IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{self, GuestDevice, MmioDeviceInfo};
use crate::mptable::MAX_CPUS;

pub const OEM_ID: [u8; 6] = *b"EMBER ";
const OEM_REVISION: u32 = 1;
/// DSDT revision 2+: AML integers are 64-bit.
const DSDT_REVISION: u8 = 6;
/// IAPC_BOOT_ARCH (5.2.9.3): an 8042 is present (bit 1), no VGA (bit 2).
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
/// The i8042 command port and its "pulse reset line" command: a reset Ember turns into an exit.
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET_COMMAND: u8 = 0xfe;
/// The FADT's "hypervisor vendor identity" (5.2.9), as little-endian bytes.
const HYPERVISOR_VENDOR: [u8; 8] = *b"EMBER\0\0\0";
const TABLE_ALIGN: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("{0} vCPUs cannot be described in the MADT (1 to {MAX_CPUS})")]
    CpuCount(u8),
    #[error("virtio-mmio device at {addr:#x} is outside the 32-bit range the DSDT describes")]
    DeviceOutOfRange { addr: u64 },
    #[error("the ACPI tables end at {end:#x}, past {limit:#x}")]
    TooLarge { end: u64, limit: u64 },
    #[error("cannot write the ACPI tables to guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Already-encoded AML, so that devices built in a loop can sit in one `Scope`.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn table_id(suffix: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"EMBER   ";
    id[4..].copy_from_slice(suffix);
    id
}

fn serial_device(index: usize, port: u16, irq: u32) -> Vec<u8> {
    let io = IO::new(port, port, 1, 8);
    let irq = Interrupt::new(true, true, false, false, irq);
    let uid = index as u32;
    let name = format!("COM{}", index + 1);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    to_bytes(&Device::new(
        name.as_str().into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &uid),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// The pvpanic port, as QEMU describes its ISA pvpanic device: Linux's pvpanic driver binds to
/// `QEMU0001`.
fn pvpanic_device(port: u16) -> Vec<u8> {
    let io = IO::new(port, port, 1, 1);
    let crs = ResourceTemplate::new(vec![&io]);
    to_bytes(&Device::new(
        "PEVT".into(),
        vec![
            &Name::new("_HID".into(), &"QEMU0001"),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

fn virtio_device(index: usize, dev: &MmioDeviceInfo) -> Result<Vec<u8>, AcpiError> {
    let out_of_range = AcpiError::DeviceOutOfRange { addr: dev.addr };
    let base =
        u32::try_from(dev.addr).map_err(|_| AcpiError::DeviceOutOfRange { addr: dev.addr })?;
    let len = u32::try_from(dev.len).map_err(|_| out_of_range)?;
    let uid = index as u32;
    // Edge-triggered, active high, exclusive: how Firecracker and Cloud Hypervisor describe
    // virtio-mmio interrupts, which Ember raises through irqfds.
    let window = Memory32Fixed::new(true, base, len);
    let irq = Interrupt::new(true, true, false, false, dev.irq);
    let crs = ResourceTemplate::new(vec![&window, &irq]);
    let name = format!("V{index:03X}");
    Ok(to_bytes(&Device::new(
        name.as_str().into(),
        vec![
            &Name::new("_HID".into(), &"LNRO0005"),
            &Name::new("_UID".into(), &uid),
            &Name::new("_CRS".into(), &crs),
        ],
    )))
}

fn dsdt(guest_devices: &[GuestDevice]) -> Result<Vec<u8>, AcpiError> {
    let mut devices = Vec::new();
    let (mut serials, mut virtio) = (0, 0);
    for dev in guest_devices {
        match dev {
            GuestDevice::Serial { port, irq } => {
                devices.extend(serial_device(serials, *port, *irq));
                serials += 1;
            }
            GuestDevice::PvPanic { port } => devices.extend(pvpanic_device(*port)),
            GuestDevice::VirtioMmio(info) => {
                devices.extend(virtio_device(virtio, info)?);
                virtio += 1;
            }
        }
    }
    let devices = RawAml(devices);
    let sb = Scope::new("\\_SB_".into(), vec![&devices]);
    let slp_typ = layout::ACPI_S5_SLP_TYP;
    // SLP_TYPa, SLP_TYPb, reserved, reserved; hardware-reduced sleep only uses SLP_TYPa.
    let s5 = Name::new(
        Path::new("\\_S5_"),
        &Package::new(vec![&slp_typ, &slp_typ, &aml::ZERO, &aml::ZERO]),
    );
    let mut table = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        table_id(b"DSDT"),
        OEM_REVISION,
    );
    table.append_slice(&to_bytes(&sb));
    table.append_slice(&to_bytes(&s5));
    Ok(table.as_slice().to_vec())
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, table_id(b"FACP"), OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_NO_VGA).into();
    // A CMOS RTC is present (IAPC_BOOT_ARCH bit 5, "CMOS RTC not present", stays clear) and keeps
    // the century: Linux reads the full year from it.
    fadt.century = layout::CMOS_CENTURY_INDEX;
    fadt.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        I8042_COMMAND_PORT.into(),
    );
    fadt.reset_value = I8042_RESET_COMMAND;
    fadt.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        layout::ACPI_SLEEP_CONTROL_PORT.into(),
    );
    fadt.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        layout::ACPI_SLEEP_STATUS_PORT.into(),
    );
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    to_bytes(&fadt.finalize())
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        table_id(b"APIC"),
        OEM_REVISION,
        LocalInterruptController::Address(layout::APIC_START as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(cpus, layout::IOAPIC_START as u32, 0));
    to_bytes(&madt)
}

/// The tables and where each goes, RSDP first.
pub(crate) fn build_tables(
    cpus: u8,
    devices: &[GuestDevice],
) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(AcpiError::CpuCount(cpus));
    }
    let mut next = layout::RSDP_START + Rsdp::len() as u64;
    let mut place = |len: usize| {
        let at = next.next_multiple_of(TABLE_ALIGN);
        next = at + len as u64;
        at
    };
    let dsdt = dsdt(devices)?;
    let dsdt_addr = place(dsdt.len());
    let fadt = fadt(dsdt_addr);
    let fadt_addr = place(fadt.len());
    let madt = madt(cpus);
    let madt_addr = place(madt.len());
    let mut xsdt = XSDT::new(OEM_ID, table_id(b"XSDT"), OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    let xsdt_addr = place(xsdt.len());
    if next > layout::ACPI_TABLES_END {
        return Err(AcpiError::TooLarge {
            end: next,
            limit: layout::ACPI_TABLES_END,
        });
    }
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(vec![
        (layout::RSDP_START, rsdp),
        (xsdt_addr, xsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (dsdt_addr, dsdt),
    ])
}

/// Writes the ACPI tables and returns the RSDP's address.
pub fn create_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    cpus: u8,
    devices: &[GuestDevice],
) -> Result<GuestAddress, AcpiError> {
    for (addr, bytes) in build_tables(cpus, devices)? {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(GuestAddress(layout::RSDP_START))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{guest_memory, Mem};
    use std::path::PathBuf;
    use std::process::Command;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// A table read back from guest memory, its length taken from its header.
    fn read_table(mem: &Mem, addr: u64) -> Vec<u8> {
        let mut header = [0u8; 36];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        let mut table = vec![0u8; u32_at(&header, 4) as usize];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        assert!(addr + table.len() as u64 <= layout::ACPI_TABLES_END);
        assert_eq!(
            sum(&table),
            0,
            "{} checksum",
            String::from_utf8_lossy(&table[..4])
        );
        table
    }

    struct Tables {
        xsdt: Vec<u8>,
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
    }

    /// Writes the tables and finds them again the way a guest does: RSDP -> XSDT -> FADT -> DSDT.
    fn tables(cpus: u8, devices: &[GuestDevice]) -> Tables {
        let mem = guest_memory(128 << 20);
        let rsdp_addr = create_acpi_tables(&mem, cpus, devices).unwrap();
        assert_eq!(rsdp_addr.0, layout::RSDP_START);
        let mut rsdp = vec![0u8; Rsdp::len()];
        mem.read_slice(&mut rsdp, rsdp_addr).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        let xsdt = read_table(&mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let mut fadt = None;
        let mut madt = None;
        for i in 0..(xsdt.len() - 36) / 8 {
            let table = read_table(&mem, u64_at(&xsdt, 36 + i * 8));
            match &table[..4] {
                b"FACP" => fadt = Some(table),
                b"APIC" => madt = Some(table),
                other => panic!("unexpected table {other:?}"),
            }
        }
        let fadt = fadt.expect("FADT");
        let dsdt = read_table(&mem, u64_at(&fadt, 140)); // X_DSDT
        assert_eq!(&dsdt[..4], b"DSDT");
        Tables {
            xsdt,
            fadt,
            madt: madt.expect("MADT"),
            dsdt,
        }
    }

    /// COM1, the pvpanic port and `n` virtio devices, as Ember's device manager lists them.
    fn slots(n: u32) -> Vec<GuestDevice> {
        let mut devices = vec![
            GuestDevice::Serial {
                port: layout::COM1_PORT,
                irq: layout::COM1_IRQ,
            },
            GuestDevice::PvPanic {
                port: layout::PVPANIC_PORT,
            },
        ];
        devices.extend(
            (0..n).map(|i| GuestDevice::VirtioMmio(MmioDeviceInfo::virtio_slot(i).unwrap())),
        );
        devices
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    #[test]
    fn madt_lists_one_enabled_lapic_per_cpu_and_the_ioapic() {
        for cpus in [1u8, 2, 4] {
            let madt = tables(cpus, &[]).madt;
            assert_eq!(u64::from(u32_at(&madt, 36)), layout::APIC_START);
            let mut lapics = Vec::new();
            let mut ioapics = Vec::new();
            let mut at = 44;
            while at < madt.len() {
                let (kind, len) = (madt[at], madt[at + 1] as usize);
                match kind {
                    0 => lapics.push((madt[at + 3], u32_at(&madt, at + 4))),
                    1 => ioapics.push((madt[at + 2], u32_at(&madt, at + 4), u32_at(&madt, at + 8))),
                    other => panic!("unexpected MADT entry type {other}"),
                }
                at += len;
            }
            let expected: Vec<(u8, u32)> = (0..cpus).map(|id| (id, 1)).collect();
            assert_eq!(lapics, expected, "{cpus} cpus");
            assert_eq!(ioapics, vec![(cpus, layout::IOAPIC_START as u32, 0)]);
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_registers() {
        let fadt = tables(1, &[]).fadt;
        assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        let iapc = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(iapc, IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_NO_VGA);
        assert_eq!(
            fadt[108],
            layout::CMOS_CENTURY_INDEX,
            "CENTURY names the CMOS byte"
        );
        // SLEEP_CONTROL_REG and SLEEP_STATUS_REG: GAS at 244 and 256 (space, width, offset,
        // access size, address).
        assert_eq!(&fadt[244..248], &[1, 8, 0, 1]);
        assert_eq!(
            u64_at(&fadt, 248),
            u64::from(layout::ACPI_SLEEP_CONTROL_PORT)
        );
        assert_eq!(&fadt[256..260], &[1, 8, 0, 1]);
        assert_eq!(
            u64_at(&fadt, 260),
            u64::from(layout::ACPI_SLEEP_STATUS_PORT)
        );
        assert_eq!(&fadt[10..16], b"EMBER ");
    }

    #[test]
    fn dsdt_has_com1_s5_and_one_virtio_device_per_slot() {
        for n in [
            0u32,
            1,
            3,
            layout::VIRTIO_IRQ_MAX - layout::VIRTIO_IRQ_BASE + 1,
        ] {
            let dsdt = tables(1, &slots(n)).dsdt;
            assert_eq!(count(&dsdt, b"LNRO0005"), n as usize, "{n} devices");
            assert_eq!(count(&dsdt, b"_S5_"), 1);
            assert_eq!(count(&dsdt, b"QEMU0001"), 1, "the pvpanic device");
        }
        // Only what the list names: no devices, no COM1, no pvpanic.
        let bare = tables(1, &[]).dsdt;
        assert_eq!(count(&bare, b"QEMU0001") + count(&bare, b"LNRO0005"), 0);
        assert_eq!(count(&bare, b"COM1"), 0);
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        let mem = guest_memory(128 << 20);
        assert!(matches!(
            create_acpi_tables(&mem, 0, &[]),
            Err(AcpiError::CpuCount(0))
        ));
        assert!(create_acpi_tables(&mem, MAX_CPUS, &slots(19)).is_ok());
    }

    /// Disassembles `table` with ACPICA's iasl and returns the listing.
    fn iasl(name: &str, table: &[u8]) -> String {
        let dir: PathBuf = std::env::temp_dir().join(format!(
            "ember-acpi-{}-{name}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let dat = dir.join(format!("{name}.dat"));
        std::fs::write(&dat, table).unwrap();
        let output = match Command::new("iasl").arg("-d").arg(&dat).output() {
            Ok(output) => output,
            Err(e) => panic!(
                "cannot run iasl ({e}): install ACPICA's tools (`apt-get install acpica-tools`); \
                 the ACPI tables are checked with its disassembler"
            ),
        };
        let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl")));
        if std::env::var_os("EMBER_SHOW_ACPI").is_some() {
            eprintln!("{}", dsl.as_deref().unwrap_or(""));
        }
        let _ = std::fs::remove_dir_all(&dir);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "iasl -d {name} failed:\n{stdout}\n{stderr}"
        );
        dsl.unwrap_or_else(|e| panic!("iasl wrote no {name}.dsl ({e}):\n{stdout}\n{stderr}"))
    }

    #[test]
    fn iasl_disassembles_every_table() {
        let t = tables(2, &slots(2));
        let dsdt = iasl("dsdt", &t.dsdt);
        for expected in [
            "PNP0501",
            "LNRO0005",
            "Name (\\_S5, Package (0x04)",
            "IO (Decode16,",
            "0x03F8,",
            "Memory32Fixed (ReadWrite,",
            "0xD0000000,",
            "0xD0001000,",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
        ] {
            assert!(dsdt.contains(expected), "DSDT lacks {expected:?}:\n{dsdt}");
        }
        let fadt = iasl("facp", &t.fadt);
        for expected in [
            "Hardware Reduced (V5) : 1",
            "8042 Present on ports 60/64 (V2) : 1",
            "VGA Not Present (V4) : 1",
            "Address : 0000000000000600",
            "Address : 0000000000000601",
        ] {
            assert!(fadt.contains(expected), "FADT lacks {expected:?}:\n{fadt}");
        }
        let madt = iasl("apic", &t.madt);
        assert_eq!(
            madt.matches("Subtable Type : 00 [Processor Local APIC]")
                .count(),
            2,
            "{madt}"
        );
        assert!(madt.contains("Subtable Type : 01 [I/O APIC]"), "{madt}");
        let xsdt = iasl("xsdt", &t.xsdt);
        assert!(xsdt.contains("ACPI Table Address   0 :"), "{xsdt}");
        // iasl cannot take a lone RSDP (it has no table header); its checksums are checked in
        // `tables`.
    }
}

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

use crate::layout::{self, MmioDeviceInfo};
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

fn com1_device() -> Vec<u8> {
    let port = layout::COM1_PORT;
    let io = IO::new(port, port, 1, 8);
    let irq = Interrupt::new(true, true, false, false, layout::COM1_IRQ);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    to_bytes(&Device::new(
        "COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &aml::ZERO),
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

fn dsdt(virtio_devices: &[MmioDeviceInfo]) -> Result<Vec<u8>, AcpiError> {
    let mut devices = com1_device();
    for (i, dev) in virtio_devices.iter().enumerate() {
        devices.extend(virtio_device(i, dev)?);
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
    virtio_devices: &[MmioDeviceInfo],
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
    let dsdt = dsdt(virtio_devices)?;
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
    virtio_devices: &[MmioDeviceInfo],
) -> Result<GuestAddress, AcpiError> {
    for (addr, bytes) in build_tables(cpus, virtio_devices)? {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(GuestAddress(layout::RSDP_START))
}

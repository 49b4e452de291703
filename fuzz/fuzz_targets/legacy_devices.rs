//! What a guest does to the legacy devices: arbitrary port reads and writes of any width (and
//! console input) on a port bus holding COM1, the i8042, the ACPI sleep registers, the CMOS RTC
//! and the pvpanic port, placed as Ember places them. Besides not panicking: the VM-ending events fire exactly when the guest
//! sent the one command that means them.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use ember_boot::layout;
use ember_devices::acpi_pm::{AcpiPm, ACPI_PM_PORT_LEN};
use ember_devices::cmos::{Cmos, CMOS_PORT_LEN};
use ember_devices::pvpanic::{PvPanic, PVPANIC_PANICKED, PVPANIC_PORT_LEN};
use ember_devices::i8042::{I8042, I8042_PORT_LEN};
use ember_devices::serial::SerialDevice;
use ember_devices::{Bus, BusDevice, EventFdTrigger};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    /// `port` is relative to one of the devices (`device` picks it), so most accesses land near
    /// a device; `raw` accesses anywhere.
    Read {
        device: u8,
        port: u8,
        width: u8,
    },
    Write {
        device: u8,
        port: u8,
        data: Vec<u8>,
    },
    RawRead {
        port: u16,
        width: u8,
    },
    RawWrite {
        port: u16,
        data: Vec<u8>,
    },
    Input(Vec<u8>),
    /// Straight to a device, bypassing the bus's range check: any offset.
    DirectRead {
        device: u8,
        offset: u64,
        width: u8,
    },
    DirectWrite {
        device: u8,
        offset: u64,
        data: Vec<u8>,
    },
}

const BASES: [u16; 5] = [
    layout::COM1_PORT,
    layout::I8042_PORT,
    layout::ACPI_SLEEP_CONTROL_PORT,
    layout::CMOS_PORT,
    layout::PVPANIC_PORT,
];
const I8042_COMMAND: u64 = layout::I8042_PORT as u64 + 4;
const I8042_RESET: u8 = 0xfe;
const SLP_EN: u8 = 1 << 5;

fuzz_target!(|ops: Vec<Op>| {
    let serial_irq = EventFdTrigger::new().unwrap();
    let reset = EventFdTrigger::new().unwrap();
    let poweroff = EventFdTrigger::new().unwrap();
    let panicked = EventFdTrigger::new().unwrap();
    let serial = Arc::new(Mutex::new(
        SerialDevice::new(serial_irq.try_clone().unwrap(), Box::new(std::io::sink())).unwrap(),
    ));
    let mut bus = Bus::new();
    let devices: [(u16, u64, Arc<Mutex<dyn BusDevice>>); 5] = [
        (layout::COM1_PORT, 8, serial.clone()),
        (
            layout::I8042_PORT,
            I8042_PORT_LEN,
            Arc::new(Mutex::new(I8042::new(reset.try_clone().unwrap()))),
        ),
        (
            layout::ACPI_SLEEP_CONTROL_PORT,
            ACPI_PM_PORT_LEN,
            Arc::new(Mutex::new(AcpiPm::new(
                poweroff.try_clone().unwrap(),
                layout::ACPI_S5_SLP_TYP,
            ))),
        ),
        (layout::CMOS_PORT, CMOS_PORT_LEN, Arc::new(Mutex::new(Cmos::new()))),
        (
            layout::PVPANIC_PORT,
            PVPANIC_PORT_LEN,
            Arc::new(Mutex::new(PvPanic::new(panicked.try_clone().unwrap()))),
        ),
    ];
    let direct: Vec<Arc<Mutex<dyn BusDevice>>> = devices.iter().map(|d| d.2.clone()).collect();
    for (port, len, dev) in devices {
        bus.insert(u64::from(port), len, dev).unwrap();
    }

    let (mut resets, mut poweroffs, mut panics) = (0u64, 0u64, 0u64);
    let mut write = |port: u64, data: &[u8]| {
        bus.write(port, data);
        if port == I8042_COMMAND && data == [I8042_RESET] {
            resets += 1;
        }
        if port == u64::from(layout::ACPI_SLEEP_CONTROL_PORT)
            && data.len() == 1
            && data[0] & SLP_EN != 0
            && (data[0] >> 2) & 7 == layout::ACPI_S5_SLP_TYP
        {
            poweroffs += 1;
        }
        // The port is one byte wide: the bus refuses a wider access.
        if port == u64::from(layout::PVPANIC_PORT)
            && data.len() == 1
            && data[0] & PVPANIC_PANICKED != 0
        {
            panics += 1;
        }
    };
    for op in ops {
        match op {
            Op::Read {
                device,
                port,
                width,
            } => {
                let mut buf = vec![0u8; usize::from(width % 9)];
                let port = u64::from(BASES[usize::from(device) % BASES.len()]) + u64::from(port % 16);
                bus.read(port.saturating_sub(4), &mut buf);
            }
            Op::Write { device, port, data } => {
                let port = u64::from(BASES[usize::from(device) % BASES.len()]) + u64::from(port % 16);
                write(port.saturating_sub(4), &data[..data.len().min(8)]);
            }
            Op::RawRead { port, width } => {
                let mut buf = vec![0u8; usize::from(width % 9)];
                bus.read(u64::from(port), &mut buf);
            }
            Op::RawWrite { port, data } => write(u64::from(port), &data[..data.len().min(8)]),
            Op::DirectRead {
                device,
                offset,
                width,
            } => {
                let mut buf = vec![0u8; usize::from(width % 9)];
                direct[usize::from(device) % BASES.len()]
                    .lock()
                    .unwrap()
                    .read(offset, &mut buf);
            }
            Op::DirectWrite {
                device,
                offset,
                data,
            } => {
                // Not the reset or S5 command (the bus-level counts above track those): only
                // the offsets differ from what a bus would hand over.
                let data = &data[..data.len().min(8)];
                let dev = usize::from(device) % BASES.len();
                let is_command = (dev == 1 && offset == 4 && data == [I8042_RESET])
                    || (dev == 2 && offset == 0 && data.len() == 1 && data[0] & SLP_EN != 0)
                    || (dev == 4 && data.first().is_some_and(|b| b & PVPANIC_PANICKED != 0));
                if !is_command {
                    direct[dev].lock().unwrap().write(offset, data);
                }
            }
            Op::Input(bytes) => {
                let mut s = serial.lock().unwrap();
                let room = s.input_room();
                let taken = s.enqueue_input(&bytes).unwrap();
                assert!(taken <= room && taken <= bytes.len());
            }
        }
    }
    // An eventfd counter reads as the sum of the writes; a never-written one would block (EAGAIN).
    assert_eq!(reset.read().unwrap_or(0), resets, "i8042 resets");
    assert_eq!(poweroff.read().unwrap_or(0), poweroffs, "ACPI S5 poweroffs");
    assert_eq!(panicked.read().unwrap_or(0), panics, "pvpanic panics");
});

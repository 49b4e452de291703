//! COM1: a 16550A UART (vm-superio does the registers) with its interrupt on an irqfd.
//!
//! Output goes to whatever writer the VMM gives (stdout, a file, nothing). Input is pushed by the
//! VMM's event loop with `enqueue_input`; the UART's FIFO holds 64 bytes, so when it is full the
//! loop stops reading its source until the guest drains the FIFO, which `fifo_drained` signals.

use std::io::{self, Write};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState as UartState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;
use crate::guest_log::GuestLog;
use crate::state::Persist;
use crate::trigger::EventFdTrigger;

/// The 16550A's receive FIFO, as vm-superio sizes it.
pub const SERIAL_FIFO_SIZE: usize = 64;

/// Raised when the guest has read every byte of input: the event loop may read more.
pub struct FifoEvents {
    drained: EventFd,
}

impl SerialEvents for FifoEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    // The failed write also comes back from `Serial::write`, which logs it.
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // A failed eventfd write only delays more input until the next drain.
        let _ = self.drained.write(1);
    }
}

impl FifoEvents {
    fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(FifoEvents {
            drained: EventFd::new(EFD_NONBLOCK)?,
        }))
    }
}

pub struct SerialDevice {
    uart: Serial<EventFdTrigger, Arc<FifoEvents>, Box<dyn Write + Send>>,
    events: Arc<FifoEvents>,
    log: GuestLog,
}

impl SerialDevice {
    /// `interrupt` is registered by the VMM as the irqfd of COM1's IRQ line.
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> io::Result<Self> {
        let events = FifoEvents::new()?;
        Ok(SerialDevice {
            uart: Serial::with_events(interrupt, events.clone(), out),
            events,
            log: GuestLog::new("serial"),
        })
    }

    /// The eventfd raised when the guest has drained the input FIFO.
    pub fn fifo_drained(&self) -> &EventFd {
        &self.events.drained
    }

    /// How many more input bytes the FIFO takes now.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues `input` for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, input: &[u8]) -> io::Result<usize> {
        let room = self.uart.fifo_capacity().min(input.len());
        if room == 0 {
            return Ok(0);
        }
        self.uart
            .enqueue_raw_bytes(&input[..room])
            .map_err(|e| io::Error::other(format!("serial input: {e:?}")))
    }
}

/// The UART's registers and the input the guest has not read yet (vm-superio's own state
/// struct). Output has no state: each byte goes to the sink as the guest writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState(#[serde(with = "UartStateDef")] pub UartState);

/// vm-superio's state struct has no serde derives: this is its field list for serde's remote
/// derive, which checks that the fields match.
#[derive(Serialize, Deserialize)]
#[serde(remote = "UartState")]
struct UartStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    /// Received bytes, oldest first (at most [`SERIAL_FIFO_SIZE`]).
    in_buffer: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot create the serial's input-drained eventfd: {0}")]
    Eventfd(io::Error),
    #[error("saved serial input of {len} bytes does not fit the {SERIAL_FIFO_SIZE}-byte FIFO")]
    FifoOverflow { len: usize },
    #[error("cannot raise the restored serial's pending interrupt: {0}")]
    Interrupt(io::Error),
}

impl Persist for SerialDevice {
    type State = SerialState;
    /// The same interrupt and output sink [`SerialDevice::new`] takes.
    type Args = (EventFdTrigger, Box<dyn Write + Send>);
    type Error = SerialError;

    fn save(&self) -> Result<SerialState, SerialError> {
        Ok(SerialState(self.uart.state()))
    }

    fn restore((interrupt, out): Self::Args, state: &SerialState) -> Result<Self, SerialError> {
        // vm-superio checks this too, but its error does not say how much there was.
        let len = state.0.in_buffer.len();
        if len > SERIAL_FIFO_SIZE {
            return Err(SerialError::FifoOverflow { len });
        }
        let events = FifoEvents::new().map_err(SerialError::Eventfd)?;
        // An interrupt that was pending (data or transmit-empty, enabled) is raised again: the
        // irqfd is edge-triggered, so without it a guest waiting for that interrupt would wait on.
        let uart =
            Serial::from_state(&state.0, interrupt, events.clone(), out).map_err(|e| match e {
                vm_superio::serial::Error::Trigger(e) => SerialError::Interrupt(e),
                // from_state writes nothing to the sink; the variant exists all the same.
                vm_superio::serial::Error::IOError(e) => SerialError::Interrupt(e),
                vm_superio::serial::Error::FullFifo => SerialError::FifoOverflow { len },
            })?;
        Ok(SerialDevice {
            uart,
            events,
            log: GuestLog::new("serial"),
        })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(reg), [b]) => *b = self.uart.read(reg),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(reg), [b]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(reg, *b) {
                // Once per byte while the output sink fails: limited.
                self.log.warn(format_args!(
                    "register {reg} write failed (guest output is lost): {e:?}"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_sink_and_input_the_guest() {
        let sink = Sink::default();
        let irq = EventFdTrigger::new().unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone())).unwrap();
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");

        // Enable the received-data interrupt, then input raises it.
        dev.write(1, &[0x01]);
        assert_eq!(dev.enqueue_input(b"ab").unwrap(), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'a');
        dev.read(0, &mut b);
        assert_eq!(b[0], b'b');
        assert_eq!(dev.fifo_drained().read().unwrap(), 1);
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failing_output_sink_cannot_flood_the_log() {
        crate::test_log::start();
        let irq = EventFdTrigger::new().unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(Broken)).unwrap();
        // Transmit-empty interrupts keep coming, so the guest goes on writing.
        dev.write(1, &[0x02]);
        for _ in 0..200 {
            dev.write(0, b"x");
        }
        assert!(irq.read().unwrap() >= 1);
        let logged = crate::test_log::warnings();
        assert!(
            !logged.is_empty() && logged.len() <= GuestLog::LIMIT as usize,
            "{logged:#?}"
        );
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let mut dev =
            SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(io::sink())).unwrap();
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.write(0, &[1, 2, 3, 4]);
        dev.write(u64::MAX, &[1]);
    }

    /// Registers set through the port interface and input waiting: the restored UART must
    /// export the same bytes, hand the guest the rest of its input, and raise the interrupt that
    /// was pending.
    #[test]
    fn state_round_trips_through_a_fresh_device() {
        use crate::state::{from_bytes, to_bytes};
        let mut dev =
            SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(io::sink())).unwrap();
        // DLAB on, divisor 0x0c01, then 7 data bits, 2 stop bits, no DLAB.
        dev.write(3, &[0x80]);
        dev.write(0, &[0x01]);
        dev.write(1, &[0x0c]);
        dev.write(3, &[0x06]);
        dev.write(1, &[0x01]); // received-data interrupt
        dev.write(4, &[0x0b]); // DTR, RTS, OUT2
        dev.write(7, &[0x5a]); // scratch
                               // Read one byte of a first input, then more input raises the data interrupt again.
        assert_eq!(dev.enqueue_input(b"w").unwrap(), 1);
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'w');
        assert_eq!(dev.enqueue_input(b"yz").unwrap(), 2);

        let saved = to_bytes(&dev.save().unwrap()).unwrap();
        let state: SerialState = from_bytes(&saved).unwrap();
        assert_eq!(state.0.in_buffer, b"yz");
        let irq = EventFdTrigger::new().unwrap();
        let sink = Sink::default();
        let mut restored =
            SerialDevice::restore((irq.try_clone().unwrap(), Box::new(sink.clone())), &state)
                .unwrap();
        assert_eq!(to_bytes(&restored.save().unwrap()).unwrap(), saved);
        assert_eq!(irq.read().unwrap(), 1, "the pending data interrupt again");
        for (reg, want) in [(7, 0x5a), (4, 0x0b), (3, 0x06)] {
            restored.read(reg, &mut b);
            assert_eq!(b[0], want, "register {reg}");
        }
        restored.read(0, &mut b);
        assert_eq!(b[0], b'y');
        restored.read(0, &mut b);
        assert_eq!(b[0], b'z');
        restored.write(0, b"!");
        assert_eq!(&*sink.0.lock().unwrap(), b"!");
    }

    #[test]
    fn a_saved_fifo_larger_than_the_uart_is_refused() {
        let dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(io::sink())).unwrap();
        let mut state = dev.save().unwrap();
        state.0.in_buffer = vec![b'x'; SERIAL_FIFO_SIZE + 1];
        let err = SerialDevice::restore(
            (EventFdTrigger::new().unwrap(), Box::new(io::sink())),
            &state,
        )
        .err()
        .unwrap();
        assert!(
            matches!(err, SerialError::FifoOverflow { len: 65 }),
            "{err}"
        );
    }

    #[test]
    fn a_full_fifo_takes_no_more() {
        let mut dev =
            SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(io::sink())).unwrap();
        let big = [b'x'; 200];
        let n = dev.enqueue_input(&big).unwrap();
        assert!(n > 0 && n < 200);
        assert_eq!(dev.enqueue_input(&big).unwrap(), 0);
    }
}

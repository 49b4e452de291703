//! COM1: a 16550A UART (vm-superio does the registers) with its interrupt on an irqfd.
//!
//! Output goes to whatever writer the VMM gives (stdout, a file, nothing). Input is pushed by the
//! VMM's event loop with `enqueue_input`; the UART's FIFO holds 64 bytes, so when it is full the
//! loop stops reading its source until the guest drains the FIFO, which `fifo_drained` signals.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;
use crate::guest_log::GuestLog;
use crate::trigger::EventFdTrigger;

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

pub struct SerialDevice {
    uart: Serial<EventFdTrigger, Arc<FifoEvents>, Box<dyn Write + Send>>,
    events: Arc<FifoEvents>,
    log: GuestLog,
}

impl SerialDevice {
    /// `interrupt` is registered by the VMM as the irqfd of COM1's IRQ line.
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> io::Result<Self> {
        let events = Arc::new(FifoEvents {
            drained: EventFd::new(EFD_NONBLOCK)?,
        });
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

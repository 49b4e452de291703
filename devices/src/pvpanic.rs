//! The pvpanic device: one I/O port through which a guest kernel tells its VMM that it panicked,
//! so that a crashed guest is not mistaken for one that rebooted (Linux's `panic=1` reboots a
//! second after a panic). It follows QEMU's pvpanic specification (docs/specs/pvpanic.rst): a
//! read returns the events the device supports, a write reports events; bit 0 "panicked", bit 1
//! "crash loaded" (a kdump kernel takes over). The DSDT describes it as `QEMU0001`, which Linux's
//! pvpanic driver binds to.

use std::convert::Infallible;

use crate::bus::BusDevice;
use crate::state::{NoState, Persist};
use crate::trigger::EventFdTrigger;

pub const PVPANIC_PANICKED: u8 = 1 << 0;
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;
pub const PVPANIC_PORT_LEN: u64 = 1;

pub struct PvPanic {
    panicked: EventFdTrigger,
}

impl PvPanic {
    pub fn new(panicked: EventFdTrigger) -> Self {
        PvPanic { panicked }
    }
}

/// The port keeps nothing between accesses: reads always return the supported events.
pub type PvPanicState = NoState;

impl Persist for PvPanic {
    type State = PvPanicState;
    /// The panic event [`PvPanic::new`] takes.
    type Args = EventFdTrigger;
    type Error = Infallible;

    fn save(&self) -> Result<PvPanicState, Infallible> {
        Ok(NoState {})
    }

    fn restore(panicked: EventFdTrigger, _state: &PvPanicState) -> Result<Self, Infallible> {
        Ok(PvPanic::new(panicked))
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&events) = data.first() else {
            return;
        };
        if events & PVPANIC_PANICKED != 0 {
            if let Err(e) = self.panicked.write(1) {
                log::error!("pvpanic: could not signal the guest's panic: {e}");
            }
        } else if events & PVPANIC_CRASH_LOADED != 0 {
            // The guest goes on into its crash kernel; the panic itself comes later or never.
            log::warn!("pvpanic: the guest crashed and loaded its crash kernel");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_capabilities_and_a_panic_raises_the_event() {
        let evt = EventFdTrigger::new().unwrap();
        let mut dev = PvPanic::new(evt.try_clone().unwrap());
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], PVPANIC_PANICKED | PVPANIC_CRASH_LOADED);
        dev.write(0, &[PVPANIC_CRASH_LOADED]);
        dev.write(0, &[]);
        dev.write(0, &[0]);
        assert!(evt.read().is_err(), "no panic yet");
        dev.write(0, &[PVPANIC_PANICKED | 0x80]);
        assert_eq!(evt.read().unwrap(), 1);
        let mut wide = [0xaau8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [3, 0, 0, 0]);
    }

    #[test]
    fn a_restored_device_reports_panics_on_its_new_event() {
        let saved =
            crate::state::to_bytes(&PvPanic::new(EventFdTrigger::new().unwrap()).save().unwrap())
                .unwrap();
        let evt = EventFdTrigger::new().unwrap();
        let mut dev = PvPanic::restore(
            evt.try_clone().unwrap(),
            &crate::state::from_bytes(&saved).unwrap(),
        )
        .unwrap();
        assert_eq!(crate::state::to_bytes(&dev.save().unwrap()).unwrap(), saved);
        dev.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}

//! The i8042 keyboard controller, only for what a microVM guest uses it for: the CPU reset command
//! (0xFE to port 0x64), which Linux sends on `reboot` with `reboot=k`. vm-superio decodes it and
//! raises the reset eventfd; the VMM ends the VM.

use std::convert::Infallible;

use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::state::{NoState, Persist};
use crate::trigger::EventFdTrigger;

/// Covers ports 0x60 (data) to 0x64 (command); 0x61-0x63 read as zero.
pub const I8042_PORT_LEN: u64 = 5;

pub struct I8042(I8042Device<EventFdTrigger>);

impl I8042 {
    pub fn new(reset: EventFdTrigger) -> Self {
        I8042(I8042Device::new(reset))
    }
}

/// vm-superio's i8042 keeps no register state (every read is zero; only the reset command acts).
pub type I8042State = NoState;

impl Persist for I8042 {
    type State = I8042State;
    /// The reset event [`I8042::new`] takes.
    type Args = EventFdTrigger;
    type Error = Infallible;

    fn save(&self) -> Result<I8042State, Infallible> {
        Ok(NoState {})
    }

    fn restore(reset: EventFdTrigger, _state: &I8042State) -> Result<Self, Infallible> {
        Ok(I8042::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(reg), [b]) => *b = self.0.read(reg),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(reg), [b]) = (u8::try_from(offset), data) {
            if let Err(e) = self.0.write(reg, *b) {
                log::error!("i8042: could not signal the reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_raises_the_event_and_nothing_else_does() {
        let evt = EventFdTrigger::new().unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xaa]);
        dev.write(4, &[0xfe, 0xfe]);
        assert!(evt.read().is_err(), "no reset yet");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn a_restored_device_resets_through_its_new_event() {
        use crate::state::{from_bytes, to_bytes};
        let mut dev = I8042::new(EventFdTrigger::new().unwrap());
        dev.write(4, &[0xaa]);
        let saved = to_bytes(&dev.save().unwrap()).unwrap();
        let evt = EventFdTrigger::new().unwrap();
        let mut restored =
            I8042::restore(evt.try_clone().unwrap(), &from_bytes(&saved).unwrap()).unwrap();
        assert_eq!(to_bytes(&restored.save().unwrap()).unwrap(), saved);
        restored.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}

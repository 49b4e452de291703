//! The i8042 keyboard controller, only for what a microVM guest uses it for: the CPU reset command
//! (0xFE to port 0x64), which Linux sends on `reboot` with `reboot=k`. vm-superio decodes it and
//! raises the reset eventfd; the VMM ends the VM.

use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// Covers ports 0x60 (data) to 0x64 (command); 0x61-0x63 read as zero.
pub const I8042_PORT_LEN: u64 = 5;

pub struct I8042(I8042Device<EventFdTrigger>);

impl I8042 {
    pub fn new(reset: EventFdTrigger) -> Self {
        I8042(I8042Device::new(reset))
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
}

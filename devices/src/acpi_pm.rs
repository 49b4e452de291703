//! The sleep control and status registers of a hardware-reduced ACPI machine (ACPI 6.4, 4.8.3.7):
//! the FADT points the guest at them, the DSDT's `\_S5_` names the sleep type, and a guest
//! `poweroff` writes `SLP_TYP << 2 | SLP_EN`. A write of the S5 type ends the VM; other sleep
//! states are not supported and are ignored, which to the guest looks like a sleep that returned.

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::state::Persist;
use crate::trigger::EventFdTrigger;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;

/// Two one-byte registers: control at offset 0, status at offset 1.
pub const ACPI_PM_PORT_LEN: u64 = 2;

pub struct AcpiPm {
    poweroff: EventFdTrigger,
    s5_slp_typ: u8,
}

impl AcpiPm {
    pub fn new(poweroff: EventFdTrigger, s5_slp_typ: u8) -> Self {
        AcpiPm {
            poweroff,
            s5_slp_typ,
        }
    }
}

/// The registers read as zero and keep nothing; what the device must keep is the S5 sleep type,
/// because the restored guest's DSDT (in its memory) still names the one it was booted with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    pub s5_slp_typ: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiPmError {
    #[error("saved S5 sleep type {0} does not fit the 3-bit SLP_TYP field")]
    SleepType(u8),
}

impl Persist for AcpiPm {
    type State = AcpiPmState;
    /// The poweroff event [`AcpiPm::new`] takes.
    type Args = EventFdTrigger;
    type Error = AcpiPmError;

    fn save(&self) -> Result<AcpiPmState, AcpiPmError> {
        Ok(AcpiPmState {
            s5_slp_typ: self.s5_slp_typ,
        })
    }

    fn restore(poweroff: EventFdTrigger, state: &AcpiPmState) -> Result<Self, AcpiPmError> {
        if state.s5_slp_typ & !SLP_TYP_MASK != 0 {
            return Err(AcpiPmError::SleepType(state.s5_slp_typ));
        }
        Ok(AcpiPm::new(poweroff, state.s5_slp_typ))
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: no wake event pending; control reads back as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, [value]) = (offset, data) else {
            return;
        };
        let slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if value & SLP_EN == 0 {
            return;
        }
        if slp_typ == self.s5_slp_typ {
            if let Err(e) = vm_superio::Trigger::trigger(&self.poweroff) {
                log::error!("acpi: could not signal the poweroff: {e}");
            }
        } else {
            log::info!("acpi: guest asked for sleep type {slp_typ}, which Ember does not support");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_s5_with_slp_en_powers_off() {
        let evt = EventFdTrigger::new().unwrap();
        let mut pm = AcpiPm::new(evt.try_clone().unwrap(), 5);
        pm.write(0, &[5 << 2]); // no SLP_EN
        pm.write(0, &[(3 << 2) | SLP_EN]); // S3
        pm.write(1, &[(5 << 2) | SLP_EN]); // status register
        pm.write(0, &[(5 << 2) | SLP_EN, 0]); // wrong width
        assert!(evt.read().is_err());
        pm.write(0, &[(5 << 2) | SLP_EN]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn a_restored_device_keeps_the_guest_s_s5_type() {
        use crate::state::{from_bytes, to_bytes};
        let pm = AcpiPm::new(EventFdTrigger::new().unwrap(), 3);
        let saved = to_bytes(&pm.save().unwrap()).unwrap();
        let evt = EventFdTrigger::new().unwrap();
        let mut restored =
            AcpiPm::restore(evt.try_clone().unwrap(), &from_bytes(&saved).unwrap()).unwrap();
        assert_eq!(to_bytes(&restored.save().unwrap()).unwrap(), saved);
        restored.write(0, &[(5 << 2) | SLP_EN]);
        assert!(evt.read().is_err(), "5 is not this guest's S5");
        restored.write(0, &[(3 << 2) | SLP_EN]);
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(
            AcpiPm::restore(evt, &AcpiPmState { s5_slp_typ: 8 }).err(),
            Some(AcpiPmError::SleepType(8))
        );
    }
}

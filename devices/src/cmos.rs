//! The CMOS real-time clock (MC146818) at ports 0x70 (index) and 0x71 (data): the host's wall-clock
//! time (UTC) for the guest, and 128 bytes of CMOS RAM. Linux reads its boot time here; without the
//! device it polls the update-in-progress flag of a clock that is not there for a second, twice.
//!
//! Only what a guest reads the time with: the time and date registers (BCD or binary and 12- or
//! 24-hour as status register B says), the century at 0x32 (the FADT points there), status
//! registers A-D with no update ever in progress. No alarm, periodic or update interrupts, and no
//! setting the clock: writes to the time registers are ignored, since the guest's clock is the
//! host's. Everything else is plain RAM the guest may use.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::state::Persist;

/// Ports 0x70-0x71.
pub const CMOS_PORT_LEN: u64 = 2;
/// The century register, as the FADT's CENTURY field names it.
pub const CMOS_CENTURY: u8 = 0x32;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;

/// Status A: the 32.768 kHz time base and a 1024 Hz rate, as firmware leaves it; UIP (bit 7) is
/// never set.
const STATUS_A_DEFAULT: u8 = 0x26;
/// Status B bits the guest may choose: binary (not BCD) values, 24-hour clock.
const STATUS_B_BINARY: u8 = 1 << 2;
const STATUS_B_24H: u8 = 1 << 1;
/// Status D: the RAM and time are valid (the battery is good).
const STATUS_D_VALID: u8 = 1 << 7;
/// Bit 7 of the index port masks NMIs on a PC; it is not part of the index.
const INDEX_MASK: u8 = 0x7f;
/// The 12-hour clock marks PM hours in bit 7 of the hours register.
const HOURS_PM: u8 = 1 << 7;

/// A calendar date and time of day, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: u32,
    pub month: u8,
    pub day: u8,
    /// 1 = Sunday, as the RTC counts.
    pub weekday: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

impl DateTime {
    /// The UTC date and time `secs` seconds after 1970-01-01 (the days-to-civil algorithm over
    /// 400-year eras).
    pub fn from_unix(secs: u64) -> Self {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        // 1970-01-01 was a Thursday (weekday 5 counting Sunday as 1).
        let weekday = ((days + 4) % 7 + 1) as u8;
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z % 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = (yoe + era * 400 + u64::from(month <= 2)) as u32;
        DateTime {
            year,
            month,
            day,
            weekday,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }
}

/// Where the device reads the time: the host's clock, or a fixed one in tests.
pub type Clock = Box<dyn Fn() -> u64 + Send>;

/// The host's wall-clock time in seconds since the epoch (0 if the host clock is before it).
pub fn host_clock() -> Clock {
    Box::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    })
}

const RAM_LEN: usize = 128;

pub struct Cmos {
    index: u8,
    ram: [u8; RAM_LEN],
    clock: Clock,
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmos {
    /// A CMOS clock that reads the host's wall-clock time.
    pub fn new() -> Self {
        Self::with_clock(host_clock())
    }

    pub fn with_clock(clock: Clock) -> Self {
        let mut ram = [0u8; RAM_LEN];
        ram[usize::from(STATUS_A)] = STATUS_A_DEFAULT;
        ram[usize::from(STATUS_B)] = STATUS_B_24H;
        ram[usize::from(STATUS_D)] = STATUS_D_VALID;
        Cmos {
            index: 0,
            ram,
            clock,
        }
    }

    fn encode(&self, v: u8) -> u8 {
        if self.ram[usize::from(STATUS_B)] & STATUS_B_BINARY != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn hours(&self, hour: u8) -> u8 {
        if self.ram[usize::from(STATUS_B)] & STATUS_B_24H != 0 {
            return self.encode(hour);
        }
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        let pm = if hour >= 12 { HOURS_PM } else { 0 };
        self.encode(h12) | pm
    }

    fn read_register(&mut self, reg: u8) -> u8 {
        let time_register = matches!(
            reg,
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CMOS_CENTURY
        );
        if !time_register {
            let v = self.ram[usize::from(reg)];
            if reg == STATUS_C {
                // Reading C acknowledges the interrupt flags; none are ever raised.
                self.ram[usize::from(STATUS_C)] = 0;
            }
            return v;
        }
        let t = DateTime::from_unix((self.clock)());
        match reg {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS => self.hours(t.hour),
            WEEKDAY => self.encode(t.weekday),
            DAY => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode((t.year % 100) as u8),
            _ => self.encode((t.year / 100 % 100) as u8),
        }
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        match reg {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CMOS_CENTURY => {
                log::debug!("cmos: the guest set time register {reg:#x}; its clock is the host's");
            }
            // UIP and the divider chain are the device's own; the rate bits are kept.
            STATUS_A => {
                self.ram[usize::from(STATUS_A)] = (value & 0x0f) | (STATUS_A_DEFAULT & 0x70)
            }
            // Read-only.
            STATUS_C | STATUS_D => {}
            _ => self.ram[usize::from(reg)] = value,
        }
    }
}

/// The index register and the CMOS RAM, status registers included. The time is not state: the
/// clock registers read the host's time whenever the guest asks, before and after a restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    pub index: u8,
    /// All 128 bytes; the bytes of the time registers are unused (always zero).
    pub ram: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmosError {
    #[error("saved CMOS RAM has {0} bytes, not {RAM_LEN}")]
    RamSize(usize),
    #[error("saved CMOS index {0:#x} is past the {RAM_LEN} bytes of RAM")]
    Index(u8),
    #[error("saved CMOS status register {register} is {value:#x}, which this RTC never holds")]
    Status { register: char, value: u8 },
}

impl Persist for Cmos {
    type State = CmosState;
    /// The clock [`Cmos::with_clock`] takes ([`host_clock`] for a VM).
    type Args = Clock;
    type Error = CmosError;

    fn save(&self) -> Result<CmosState, CmosError> {
        Ok(CmosState {
            index: self.index,
            ram: self.ram.to_vec(),
        })
    }

    fn restore(clock: Clock, state: &CmosState) -> Result<Self, CmosError> {
        let ram: [u8; RAM_LEN] = state
            .ram
            .as_slice()
            .try_into()
            .map_err(|_| CmosError::RamSize(state.ram.len()))?;
        // Registers are read at `index` without a further check.
        if state.index & !INDEX_MASK != 0 {
            return Err(CmosError::Index(state.index));
        }
        // What the register writes can leave there, and nothing else: no update ever in
        // progress, no interrupt flags, a valid battery.
        let status = |register, reg: u8, ok: &dyn Fn(u8) -> bool| {
            let value = ram[usize::from(reg)];
            if ok(value) {
                Ok(())
            } else {
                Err(CmosError::Status { register, value })
            }
        };
        status('A', STATUS_A, &|v| v & 0xf0 == STATUS_A_DEFAULT & 0x70)?;
        status('C', STATUS_C, &|v| v == 0)?;
        status('D', STATUS_D, &|v| v == STATUS_D_VALID)?;
        Ok(Cmos {
            index: state.index,
            ram,
            clock,
        })
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data) {
            (0, [b]) => *b = self.index,
            (1, [b]) => *b = self.read_register(self.index),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [b]) => self.index = b & INDEX_MASK,
            (1, [b]) => self.write_register(self.index, *b),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-01 07:45:09 UTC, a Tuesday.
    const T: u64 = 1_796_111_109;

    fn read(dev: &mut Cmos, reg: u8) -> u8 {
        dev.write(0, &[reg]);
        let mut b = [0u8];
        dev.read(1, &mut b);
        b[0]
    }

    fn fixed() -> Cmos {
        Cmos::with_clock(Box::new(|| T))
    }

    #[test]
    fn unix_time_to_calendar() {
        let t = DateTime::from_unix(T);
        assert_eq!((t.year, t.month, t.day), (2026, 12, 1));
        assert_eq!((t.hour, t.minute, t.second), (7, 45, 9));
        assert_eq!(t.weekday, 3, "Tuesday");
        let epoch = DateTime::from_unix(0);
        assert_eq!(
            (epoch.year, epoch.month, epoch.day, epoch.weekday),
            (1970, 1, 1, 5)
        );
        // A leap day, and the day after.
        assert_eq!(
            (
                DateTime::from_unix(951_782_400).month,
                DateTime::from_unix(951_782_400).day
            ),
            (2, 29)
        );
        assert_eq!(DateTime::from_unix(951_868_800).month, 3);
    }

    #[test]
    fn bcd_24_hour_by_default() {
        let mut dev = fixed();
        assert_eq!(read(&mut dev, SECONDS), 0x09);
        assert_eq!(read(&mut dev, MINUTES), 0x45);
        assert_eq!(read(&mut dev, HOURS), 0x07);
        assert_eq!(read(&mut dev, DAY), 0x01);
        assert_eq!(read(&mut dev, MONTH), 0x12);
        assert_eq!(read(&mut dev, YEAR), 0x26);
        assert_eq!(read(&mut dev, CMOS_CENTURY), 0x20);
        assert_eq!(read(&mut dev, WEEKDAY), 0x03);
        assert_eq!(
            read(&mut dev, STATUS_A) & 0x80,
            0,
            "never an update in progress"
        );
        assert_eq!(read(&mut dev, STATUS_D), STATUS_D_VALID);
    }

    #[test]
    fn binary_and_12_hour_modes_follow_status_b() {
        let mut dev = Cmos::with_clock(Box::new(|| T + 12 * 3600));
        dev.write(0, &[STATUS_B]);
        dev.write(1, &[STATUS_B_BINARY]);
        assert_eq!(read(&mut dev, MINUTES), 45);
        assert_eq!(read(&mut dev, HOURS), 7 | HOURS_PM, "19:45 is 7 PM");
        assert_eq!(read(&mut dev, MONTH), 12);
    }

    #[test]
    fn ram_keeps_what_the_guest_wrote_and_the_clock_ignores_writes() {
        let mut dev = fixed();
        dev.write(0, &[0x80 | 0x40]);
        dev.write(1, &[0x5a]);
        assert_eq!(
            read(&mut dev, 0x40),
            0x5a,
            "the NMI mask bit is not part of the index"
        );
        dev.write(0, &[HOURS]);
        dev.write(1, &[0x23]);
        assert_eq!(read(&mut dev, HOURS), 0x07);
        dev.write(0, &[STATUS_D]);
        dev.write(1, &[0]);
        assert_eq!(read(&mut dev, STATUS_D), STATUS_D_VALID);
        dev.write(0, &[STATUS_A]);
        dev.write(1, &[0xff]);
        assert_eq!(read(&mut dev, STATUS_A) & 0x80, 0);
    }

    #[test]
    fn state_round_trips_and_the_clock_stays_the_host_s() {
        use crate::state::{from_bytes, to_bytes};
        let mut dev = fixed();
        dev.write(0, &[STATUS_B]);
        dev.write(1, &[STATUS_B_BINARY | STATUS_B_24H]);
        dev.write(0, &[STATUS_A]);
        dev.write(1, &[0x0a]);
        dev.write(0, &[0x40]);
        dev.write(1, &[0xa5]);
        // The index stays where the guest left it: at a RAM byte, with the NMI mask bit set.
        dev.write(0, &[0x80 | 0x41]);
        dev.write(1, &[0x3c]);

        let saved = to_bytes(&dev.save().unwrap()).unwrap();
        let later = Box::new(|| T + 3600);
        let mut restored = Cmos::restore(later, &from_bytes(&saved).unwrap()).unwrap();
        assert_eq!(to_bytes(&restored.save().unwrap()).unwrap(), saved);
        let mut b = [0u8];
        restored.read(1, &mut b);
        assert_eq!(b[0], 0x3c, "reads at the restored index");
        assert_eq!(read(&mut restored, 0x40), 0xa5);
        assert_eq!(read(&mut restored, STATUS_A), 0x2a);
        assert_eq!(
            read(&mut restored, HOURS),
            8,
            "binary, and the new clock's hour"
        );
    }

    #[test]
    fn impossible_saved_states_are_refused() {
        let good = fixed().save().unwrap();
        let restore = |state: &CmosState| Cmos::restore(Box::new(|| T), state).err();
        assert_eq!(restore(&good), None);
        let mut s = good.clone();
        s.ram.pop();
        assert_eq!(restore(&s), Some(CmosError::RamSize(127)));
        let mut s = good.clone();
        s.index = 0x80;
        assert_eq!(restore(&s), Some(CmosError::Index(0x80)));
        for (reg, value, name) in [
            (STATUS_A, 0xa6, 'A'),
            (STATUS_C, 0x80, 'C'),
            (STATUS_D, 0, 'D'),
        ] {
            let mut s = good.clone();
            s.ram[usize::from(reg)] = value;
            assert_eq!(
                restore(&s),
                Some(CmosError::Status {
                    register: name,
                    value
                })
            );
        }
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let mut dev = fixed();
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.write(5, &[1]);
        dev.write(0, &[]);
        for reg in 0..=255u8 {
            dev.write(0, &[reg]);
            let mut b = [0u8];
            dev.read(1, &mut b);
            dev.write(1, &[reg]);
        }
    }
}

//! Port I/O and MMIO buses: guest physical ranges mapped to the devices that serve them.
//!
//! vCPU threads look an exit's address up here and hand the access to the device with the offset
//! into its range. An access that hits no device is reported to the caller, which logs and ignores
//! it (reads of nothing return all ones, as on real hardware).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the range the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap { base: u64, len: u64 },
}

#[derive(Clone)]
struct Range {
    len: u64,
    device: SharedDevice,
}

/// A device as the buses hold it: shared with the event loop that also drives it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A set of non-overlapping ranges. Cloning shares the devices (one bus per vCPU thread is fine).
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        let overlaps_prev = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(b, r)| b + r.len > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Range)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the device's range.
        (offset.checked_add(size as u64)? <= range.len).then_some((offset, range))
    }

    /// Returns false when no device covers the access; `data` is then left to the caller.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, range)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, range)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A poisoned device lock means another thread panicked mid-access; the device state is still the
/// best we have, and refusing every later access would only turn one failure into a hang.
fn lock<'a>(
    device: &'a Mutex<dyn BusDevice>,
) -> std::sync::MutexGuard<'a, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_offset() {
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(7, vec![7])]);
        assert!(!bus.read(0x3f7, &mut b));
        assert!(!bus.read(0x400, &mut b));
        // Straddling the end of a range is not an access to the device.
        assert!(!bus.write(0x3ff, &[1, 2]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x100, dev.clone()).unwrap();
        assert!(bus.insert(0x10ff, 1, dev.clone()).is_err());
        assert!(bus.insert(0xf01, 0x100, dev.clone()).is_err());
        assert!(bus.insert(0x2000, 0, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        bus.insert(0x1100, 0x100, dev).unwrap();
    }
}

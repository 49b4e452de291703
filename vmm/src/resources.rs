//! The machine's resources, handed out from one place: MMIO windows in the 32-bit hole, IRQ lines
//! on the IOAPIC, and port I/O ranges. The device manager takes every device's resources from
//! here, so no two devices can be given the same window, line or port, and what the bus, the DSDT
//! and the kernel command line say about a device all comes from the one grant.
//!
//! Dynamic devices (virtio) take the next free window and line; the legacy devices, whose places
//! guests expect at fixed PC addresses, claim exactly those, and a clash is an error instead of a
//! silent overlap.

use std::collections::{BTreeMap, BTreeSet};

use ember_boot::layout;
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    #[error("no {what} left: the machine has {total} and every one is taken")]
    Exhausted { what: &'static str, total: u64 },
    #[error(
        "{what} {start:#x}+{len:#x} is taken by another device or outside the machine's range"
    )]
    Unavailable {
        what: &'static str,
        start: u64,
        len: u64,
    },
    #[error("the {what} allocator refused a request: {source}")]
    Allocator {
        what: &'static str,
        #[source]
        source: vm_allocator::Error,
    },
}

/// One virtio-mmio window's size, and its alignment (a page: the guest maps it).
pub const MMIO_WINDOW: u64 = layout::VIRTIO_MMIO_SIZE;

pub struct ResourceAllocator {
    mmio: AddressAllocator,
    /// Claimed port ranges, start -> end (exclusive). Kept here rather than in an
    /// `AddressAllocator`: vm-allocator 0.1.4 grants an `ExactMatch` inside a range it already
    /// handed out (0x3fc after 0x3f8+8), which would let two devices share a port.
    pio: BTreeMap<u32, u32>,
    irqs: IdAllocator,
    /// Lines outside the dynamic pool that a legacy device claimed by number.
    fixed_irqs: BTreeSet<u32>,
}

impl ResourceAllocator {
    /// The PC's resources: MMIO from the virtio base to the IOAPIC, IRQs 5-23 for dynamic
    /// devices (0-4 are the PIT, keyboard, cascade and serial lines), ports 0-0xffff.
    pub fn new() -> Result<Self, ResourceError> {
        Self::with_ranges(
            (
                layout::VIRTIO_MMIO_START,
                layout::IOAPIC_START - layout::VIRTIO_MMIO_START,
            ),
            (layout::VIRTIO_IRQ_BASE, layout::VIRTIO_IRQ_MAX),
        )
    }

    fn with_ranges(mmio: (u64, u64), irqs: (u32, u32)) -> Result<Self, ResourceError> {
        let err = |what| move |source| ResourceError::Allocator { what, source };
        Ok(ResourceAllocator {
            mmio: AddressAllocator::new(mmio.0, mmio.1).map_err(err("MMIO"))?,
            pio: BTreeMap::new(),
            irqs: IdAllocator::new(irqs.0, irqs.1).map_err(err("IRQ"))?,
            fixed_irqs: BTreeSet::new(),
        })
    }

    /// The next free MMIO window of `len` bytes, page-aligned.
    pub fn allocate_mmio(&mut self, len: u64) -> Result<u64, ResourceError> {
        match self
            .mmio
            .allocate(len, MMIO_WINDOW, AllocPolicy::FirstMatch)
        {
            Ok(range) => Ok(range.start()),
            Err(vm_allocator::Error::ResourceNotAvailable) => Err(ResourceError::Exhausted {
                what: "MMIO window",
                total: (self.mmio.end() - self.mmio.base() + 1) / MMIO_WINDOW,
            }),
            Err(source) => Err(ResourceError::Allocator {
                what: "MMIO",
                source,
            }),
        }
    }

    /// The next free IRQ line from the dynamic pool.
    pub fn allocate_irq(&mut self) -> Result<u32, ResourceError> {
        match self.irqs.allocate_id() {
            Ok(irq) => Ok(irq),
            Err(vm_allocator::Error::ResourceNotAvailable | vm_allocator::Error::Overflow) => {
                Err(ResourceError::Exhausted {
                    what: "IRQ line for a virtio device",
                    total: u64::from(layout::VIRTIO_IRQ_MAX - layout::VIRTIO_IRQ_BASE + 1),
                })
            }
            Err(source) => Err(ResourceError::Allocator {
                what: "IRQ",
                source,
            }),
        }
    }

    /// Claims a legacy device's fixed IRQ line; refuses one in the dynamic pool or claimed before.
    pub fn claim_irq(&mut self, irq: u32) -> Result<(), ResourceError> {
        let in_pool = (layout::VIRTIO_IRQ_BASE..=layout::VIRTIO_IRQ_MAX).contains(&irq);
        if in_pool || irq > layout::VIRTIO_IRQ_MAX || !self.fixed_irqs.insert(irq) {
            return Err(ResourceError::Unavailable {
                what: "IRQ",
                start: u64::from(irq),
                len: 1,
            });
        }
        Ok(())
    }

    /// Claims exactly `len` ports at `port`.
    pub fn claim_pio(&mut self, port: u16, len: u64) -> Result<(), ResourceError> {
        let unavailable = ResourceError::Unavailable {
            what: "port range",
            start: u64::from(port),
            len,
        };
        let start = u32::from(port);
        let end = u32::try_from(len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .filter(|&end| end > start && end <= 0x1_0000)
            .ok_or(unavailable.clone())?;
        let before = self.pio.range(..end).next_back();
        if before.is_some_and(|(_, &prev_end)| prev_end > start) {
            return Err(unavailable);
        }
        self.pio.insert(start, end);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_lines_never_repeat_until_they_run_out() {
        let mut a = ResourceAllocator::new().unwrap();
        let mut windows = Vec::new();
        let mut irqs = Vec::new();
        loop {
            match a.allocate_irq() {
                Ok(irq) => irqs.push(irq),
                Err(e) => {
                    assert_eq!(
                        e,
                        ResourceError::Exhausted {
                            what: "IRQ line for a virtio device",
                            total: 19
                        }
                    );
                    assert!(e
                        .to_string()
                        .contains("no IRQ line for a virtio device left"));
                    break;
                }
            }
            windows.push(a.allocate_mmio(MMIO_WINDOW).unwrap());
        }
        assert_eq!(irqs, (5..=23).collect::<Vec<_>>());
        // The first windows are where the guest kernel's virtio_mmio words have always put them.
        assert_eq!(windows[0], 0xd000_0000);
        assert_eq!(windows[1], 0xd000_1000);
        let mut sorted = windows.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), windows.len(), "no window given twice");
        assert!(windows
            .iter()
            .all(|w| w % MMIO_WINDOW == 0 && w + MMIO_WINDOW <= layout::IOAPIC_START));
    }

    #[test]
    fn mmio_exhaustion_is_a_clear_error() {
        let mut a =
            ResourceAllocator::with_ranges((0xd000_0000, 2 * MMIO_WINDOW), (5, 23)).unwrap();
        a.allocate_mmio(MMIO_WINDOW).unwrap();
        a.allocate_mmio(MMIO_WINDOW).unwrap();
        let e = a.allocate_mmio(MMIO_WINDOW).unwrap_err();
        assert_eq!(
            e,
            ResourceError::Exhausted {
                what: "MMIO window",
                total: 2
            }
        );
    }

    #[test]
    fn fixed_claims_refuse_overlaps_and_the_dynamic_pool() {
        let mut a = ResourceAllocator::new().unwrap();
        a.claim_pio(0x3f8, 8).unwrap();
        a.claim_pio(0x70, 2).unwrap();
        assert!(a.claim_pio(0x3fc, 1).is_err(), "inside COM1");
        assert!(a.claim_pio(0x3f0, 9).is_err(), "straddles COM1's start");
        assert!(a.claim_pio(0xffff, 2).is_err(), "past the last port");
        a.claim_pio(0x400, 1).unwrap();
        a.claim_irq(4).unwrap();
        assert!(a.claim_irq(4).is_err(), "claimed twice");
        assert!(a.claim_irq(5).is_err(), "belongs to the dynamic pool");
        assert!(a.claim_irq(24).is_err(), "the IOAPIC has 24 pins");
    }
}

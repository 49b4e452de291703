//! Ember's emulated devices. Each module is one device; register work is done by vm-superio and
//! virtio-queue where they can, and every value a guest writes is checked before it is acted on.

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
mod guest_log;
pub mod i8042;
pub mod pvpanic;
pub mod serial;
pub mod state;
pub mod trigger;
pub mod virtio;

pub use bus::{Bus, BusDevice, SharedDevice};
pub use state::{Persist, StateError, STATE_FORMAT_VERSION};
pub use trigger::EventFdTrigger;

#[cfg(test)]
mod test_log;

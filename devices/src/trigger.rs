//! An `EventFd` as a vm-superio `Trigger`: the serial raises its interrupt through an irqfd, and
//! the i8042 signals a reset, without the vCPU thread calling into KVM or the event loop.

use std::io;
use std::ops::Deref;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new() -> io::Result<Self> {
        Ok(EventFdTrigger(EventFd::new(EFD_NONBLOCK)?))
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(EventFdTrigger(self.0.try_clone()?))
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl Deref for EventFdTrigger {
    type Target = EventFd;

    fn deref(&self) -> &EventFd {
        &self.0
    }
}

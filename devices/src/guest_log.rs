//! Warnings whose number a guest controls, limited: a guest must not be able to flood the host's
//! log.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

/// Logs what a guest did wrong (or what failed as often as the guest asks), but only the first
/// few times; the rest go to debug level.
pub(crate) struct GuestLog {
    device: &'static str,
    left: AtomicU32,
}

impl GuestLog {
    pub(crate) const LIMIT: u32 = 20;

    pub(crate) fn new(device: &'static str) -> Self {
        GuestLog {
            device,
            left: AtomicU32::new(Self::LIMIT),
        }
    }

    /// Takes `&self` so that callbacks that only get a shared reference can use it too.
    pub(crate) fn warn(&self, msg: fmt::Arguments<'_>) {
        let left = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .unwrap_or(0);
        match left {
            0 => log::debug!("{}: {msg}", self.device),
            1 => {
                log::warn!(
                    "{}: {msg} (further guest errors logged at debug level)",
                    self.device
                )
            }
            _ => log::warn!("{}: {msg}", self.device),
        }
    }
}

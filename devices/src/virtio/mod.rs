//! virtio devices (virtio 1.2, OASIS spec) on the virtio-mmio transport.
//!
//! A device model implements [`VirtioDevice`]: its type, the features it offers, its config space,
//! and what it does with its queues once the driver has set it up. [`MmioTransport`] is the
//! register file the guest programs (spec 4.2.2); it owns the queue configuration until the driver
//! writes DRIVER_OK, then hands ready queues to the device. Requests are never served on a vCPU
//! thread: queue notifications arrive as ioeventfds and are served on the event loop, and
//! interrupts leave through an irqfd.

pub mod block;
pub mod mmio;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::{fmt, io};

use event_manager::MutEventSubscriber;

use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::state::StateError;

pub use block::{Block, BlockState, DiskConfig, OverlayConfig};
pub use mmio::{MmioState, MmioStateError, MmioTransport, VirtqueueState};
pub use vsock::{Vsock, VsockConfig};

pub use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

pub(crate) use crate::guest_log::GuestLog;

/// Why a device refused the queues the driver set up.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the device needs {expected} queues, the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
}

/// A virtio device model behind a transport.
pub trait VirtioDevice: Send {
    /// `VIRTIO_ID_*`.
    fn device_type(&self) -> u32;
    /// One entry per queue: the largest size the device accepts (a power of two).
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers, transport bits (VERSION_1, EVENT_IDX) included.
    fn features(&self) -> u64;
    /// Reads from the device-specific config space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving `queues` (already checked ready and inside `mem`) with `acked_features`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: std::sync::Arc<Interrupt>,
        acked_features: u64,
    ) -> Result<(), ActivateError>;
    /// The driver notified queue `index`: serve what it made available.
    fn process_queue(&mut self, index: usize);
    /// Whether the device stopped serving until the driver resets it (the driver broke a queue);
    /// the transport then tells the driver with DEVICE_NEEDS_RESET.
    fn needs_reset(&self) -> bool {
        false
    }
    /// Drops the queues and any in-flight state: the device is as it was before activation.
    fn reset(&mut self);
    /// The device's request side, to serve its queues on a thread of their own without the
    /// transport (see `MmioTransport::queue_handler`).
    fn queue_server(&self) -> Arc<dyn QueueServer>;
    /// Event sources the device serves beside its queues (a TAP, a Unix socket, an I/O
    /// completion eventfd): the VMM adds each to the event loop of the device's I/O thread,
    /// where the queue handler runs too. Asked once, when the device is attached.
    fn io_subscribers(&self) -> Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>> {
        Vec::new()
    }
    /// The device's own state (features, config space, flags), encoded with
    /// [`crate::state::to_bytes`]; the transport's state carries it, and the VMM rebuilds the
    /// device from it (the device type says which kind of device) before the transport over it.
    /// A device that cannot be saved says so: a snapshot without it would not restore.
    fn save_device_state(&self) -> Result<Vec<u8>, StateError> {
        Err(StateError::Unsupported {
            what: "virtio device",
            reason: "it has no saved form",
        })
    }
    /// Where the snapshot about to be taken keeps files of the device's own, named
    /// `<prefix>.<what>` (a copy of a disk's tmp overlay); asked before `save_device_state`.
    fn snapshot_files(&self, _prefix: &std::path::Path) {}
    /// The queues as the device serves them now, in order: since activation their ring positions
    /// have moved on from the transport's copies. None before activation, or where the device
    /// cannot tell (then an active transport cannot be saved).
    fn queue_states(&self) -> Option<Vec<QueueState>> {
        None
    }
}

/// A device's request side: serves a queue the driver notified, taking only the device's own
/// request state (never the transport's), so register accesses do not wait behind its I/O.
pub trait QueueServer: Send + Sync {
    /// The driver notified queue `index`: serve one turn of what it made available (a bounded
    /// number of requests). Returns whether more is waiting: the caller serves another turn.
    /// Does nothing before activation or after a reset.
    fn serve(&self, index: usize) -> bool;
    /// Whether the driver broke a queue and the device waits for a reset.
    fn needs_reset(&self) -> bool;
}

/// The device's interrupt line: the ISR bits the guest reads from InterruptStatus, and the irqfd
/// KVM injects the IRQ from.
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interrupt")
            .field("status", &self.status.load(Ordering::Relaxed))
            .finish()
    }
}

impl Interrupt {
    pub fn new() -> io::Result<Self> {
        Ok(Interrupt {
            status: AtomicU32::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The eventfd to register as the device's irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Raises `VIRTIO_MMIO_INT_VRING` or `VIRTIO_MMIO_INT_CONFIG`.
    pub fn trigger(&self, cause: u32) {
        self.status.fetch_or(cause, Ordering::SeqCst);
        // A full eventfd counter (2^64-2 unread signals) is the only failure, and the guest has an
        // interrupt pending in that case anyway.
        if let Err(e) = self.evt.write(1) {
            log::warn!("virtio: cannot signal interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Sets the ISR bits a restored device had pending, without signalling: the irqchip's own
    /// restored state already says whether the interrupt was delivered.
    fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// Fills `data` from a device's config space at `offset`; bytes past its end read as zero.
pub(crate) fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// Whether the driver wants an interrupt for the buffers just put in `queue`'s used ring: with
/// EVENT_IDX as its used_event says; without, unless it set VRING_AVAIL_F_NO_INTERRUPT, which
/// virtio-queue does not look at (a driver polling the used ring sets it; spec 2.7.7.2).
pub(crate) fn needs_interrupt(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem);
    }
    let flags: u16 = mem
        .read_obj(GuestAddress(queue.avail_ring()))
        .map_err(virtio_queue::Error::GuestMemory)?;
    Ok(u16::from_le(flags) & virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
}

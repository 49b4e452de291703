//! The virtio-mmio transport, version 2 (virtio 1.2 section 4.2.2).
//!
//! The guest programs the registers from vCPU threads; this never serves a request there. Queue
//! notifications are ioeventfds the VMM registers at QueueNotify with the queue index as datamatch
//! (a notify that still reaches us, e.g. without KVM, is forwarded to the same eventfd). The event
//! loop owns the other half: [`MutEventSubscriber`] registers an "activate" eventfd at init; when
//! the driver writes DRIVER_OK the transport hands the queues to the device and signals it, and
//! the event loop then starts watching the queue eventfds. Interrupts go out through the device's
//! irqfd.

use std::io;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{GuestLog, Interrupt, QueueServer, VirtioDevice, VIRTIO_MMIO_INT_CONFIG};
use crate::state::{Persist, StateError};
use crate::BusDevice;

/// "virt", little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
pub const MMIO_VERSION: u32 = 2;
/// "EMBR".
pub const VENDOR_ID: u32 = 0x5242_4d45;
/// Offset of QueueNotify, where the VMM registers the queue ioeventfds.
pub const NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
const CONFIG_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;
/// Event-loop token of the activate eventfd; queue eventfds use their index.
const ACTIVATE_TOKEN: u32 = u32::MAX;
const LOW_HALF: u64 = 0xffff_ffff;
/// Each step of driver initialization needs the one before it (spec 3.1.1): (bit, prerequisite).
const STATUS_STEPS: [(u32, u32); 3] = [
    (VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE),
    (VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER),
    (VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK),
];

pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    activate_evt: EventFd,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    active: bool,
    /// Whether the event loop watches the queue eventfds (they stay registered across resets).
    queue_evts_watched: bool,
    log: GuestLog,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(mem: GuestMemoryMmap, device: D) -> io::Result<Self> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| {
                Queue::new(max).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("invalid queue size {max}: {e}"),
                    )
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let queue_evts = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new()?),
            queues,
            queue_evts,
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            active: false,
            queue_evts_watched: false,
            log: GuestLog::new("virtio-mmio"),
        })
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// The eventfd to register as the device's irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        self.interrupt.eventfd()
    }

    /// Signals the interrupt again if the driver has causes it has not acknowledged. For a VM
    /// being restored: a device may serve its queues (and interrupt) before the vCPUs' state is
    /// set, and the restored local APICs then replace what KVM had delivered to them.
    pub fn resignal(&self) {
        if self.interrupt.status() != 0 {
            if let Err(e) = self.interrupt.eventfd().write(1) {
                log::warn!("virtio: cannot signal interrupt: {e}");
            }
        }
    }

    /// One eventfd per queue, in queue order: register each as an ioeventfd at
    /// `base + NOTIFY_OFFSET` with its index as datamatch.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// What serves this transport's queues on an event loop of the caller's (a disk's own
    /// thread) in place of the transport itself: it takes only the device's request side, so
    /// a vCPU reading a register never waits for a request's I/O.
    pub fn queue_handler(&self) -> io::Result<QueueHandler> {
        Ok(QueueHandler {
            server: self.device.queue_server(),
            queue_evts: self
                .queue_evts
                .iter()
                .map(EventFd::try_clone)
                .collect::<io::Result<_>>()?,
            activate_evt: self.activate_evt.try_clone()?,
            interrupt: self.interrupt.clone(),
            reported_reset: false,
        })
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            // A queue the driver broke while the disk's thread served it shows here at once.
            VIRTIO_MMIO_STATUS if self.active && self.device.needs_reset() => {
                self.status | VIRTIO_CONFIG_S_NEEDS_RESET
            }
            VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: their length and base read as all ones.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            // The config space never changes under the driver.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & VIRTIO_CONFIG_S_DRIVER == 0
                    || self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
                {
                    self.log.warn(format_args!(
                        "driver features written in status {:#x}; ignored",
                        self.status
                    ));
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    sel => self.log.warn(format_args!(
                        "driver features word {sel} does not exist; ignored"
                    )),
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_reg(offset, value),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => self.log.warn(format_args!(
                "write of {value:#x} to read-only or unknown register {offset:#x}; ignored"
            )),
        }
    }

    fn write_queue_reg(&mut self, offset: u32, value: u32) {
        // Linux's vm_del_vq writes QueueReady = 0 after it has reset the device: already so, and
        // not a guest error.
        if offset == VIRTIO_MMIO_QUEUE_READY
            && value == 0
            && self.selected_queue().is_some_and(|q| !q.ready())
        {
            return;
        }
        // Queues are set up after FEATURES_OK and frozen once the device is live (spec 3.1.1).
        let settable = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        let sel = self.queue_sel;
        let Some(q) = self.queues.get_mut(sel as usize).filter(|_| settable) else {
            self.log.warn(format_args!(
                "queue {sel} register {offset:#x} written in status {:#x}; ignored",
                self.status
            ));
            return;
        };
        // virtio-queue's setters log every refused value at error level; a guest must not be able
        // to fill the host's log, so refusals are checked and logged here.
        let (low, high) = (u64::from(value), u64::from(value) << 32);
        let result = match offset {
            // Sizes must be powers of two up to the maximum.
            VIRTIO_MMIO_QUEUE_NUM => u16::try_from(value)
                .map_err(|_| virtio_queue::Error::InvalidSize)
                .and_then(|size| q.try_set_size(size)),
            VIRTIO_MMIO_QUEUE_READY => {
                q.set_ready(value == 1);
                Ok(())
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                q.try_set_desc_table_address(GuestAddress(q.desc_table() & !LOW_HALF | low))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                q.try_set_desc_table_address(GuestAddress(q.desc_table() & LOW_HALF | high))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                q.try_set_avail_ring_address(GuestAddress(q.avail_ring() & !LOW_HALF | low))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                q.try_set_avail_ring_address(GuestAddress(q.avail_ring() & LOW_HALF | high))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                q.try_set_used_ring_address(GuestAddress(q.used_ring() & !LOW_HALF | low))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                q.try_set_used_ring_address(GuestAddress(q.used_ring() & LOW_HALF | high))
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            self.log.warn(format_args!(
                "queue {sel} register {offset:#x} value {value:#x} refused ({e}); ignored"
            ));
        }
    }

    /// Only reached when no ioeventfd caught the write (a queue index nothing is registered
    /// for, or no KVM): hand it to the event loop the same way.
    fn notify(&mut self, index: u32) {
        match self.queue_evts.get(index as usize) {
            Some(evt) if self.active => {
                if let Err(e) = evt.write(1) {
                    log::warn!("virtio-mmio: cannot forward queue notification: {e}");
                }
            }
            _ => self.log.warn(format_args!(
                "notification for queue {index} while the device is not live; ignored"
            )),
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & old != old {
            self.log.warn(format_args!(
                "status {old:#x} -> {value:#x} clears bits without a reset; ignored"
            ));
            return;
        }
        let added = value & !old;
        let mut new = value;
        // Refused features are settled before the ordering checks, so that a DRIVER_OK written in
        // the same access as a refused FEATURES_OK is refused with it.
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let unknown = self.driver_features & !offered;
            if unknown != 0 || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                // Left clear, FEATURES_OK tells the driver its feature set was refused.
                self.log.warn(format_args!(
                    "driver features {:#x} refused (offered {offered:#x}, VERSION_1 required)",
                    self.driver_features
                ));
                new &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        for (bit, prerequisite) in STATUS_STEPS {
            if added & bit != 0 && new & prerequisite == 0 {
                self.log.warn(format_args!(
                    "status bit {bit:#x} set before {prerequisite:#x}; ignored"
                ));
                new &= !bit;
            }
        }
        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            log::info!("virtio-mmio: the driver gave up on the device (status FAILED)");
        }
        let activating = added & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && new & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && !self.active;
        self.status = new;
        if activating {
            if let Err(reason) = self.activate() {
                self.log
                    .warn(format_args!("cannot start the device: {reason}"));
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG);
            }
        }
    }

    fn activate(&mut self) -> Result<(), String> {
        let event_idx = self.driver_features
            & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
            != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                return Err(format!("queue {i} is not ready"));
            }
            self.check_rings(q).map_err(|e| format!("queue {i}: {e}"))?;
            let mut q = Queue::try_from(q.state()).map_err(|e| format!("queue {i}: {e}"))?;
            q.set_event_idx(event_idx);
            queues.push(q);
        }
        self.device
            .activate(
                self.mem.clone(),
                queues,
                self.interrupt.clone(),
                self.driver_features,
            )
            .map_err(|e| e.to_string())?;
        self.active = true;
        self.activate_evt
            .write(1)
            .map_err(|e| format!("cannot signal the event loop: {e}"))
    }

    /// What virtio-queue's `is_valid` checks, without its error-level log lines, which a guest
    /// could otherwise repeat without limit (reset, set up bad rings, DRIVER_OK, again).
    fn check_rings(&self, q: &Queue) -> Result<(), String> {
        let size = u64::from(q.size());
        let parts = [
            (
                "descriptor table",
                q.desc_table(),
                16 * size,
                Permissions::Read,
            ),
            (
                "available ring",
                q.avail_ring(),
                6 + 2 * size,
                Permissions::Read,
            ),
            ("used ring", q.used_ring(), 6 + 8 * size, Permissions::Write),
        ];
        for (name, addr, len, access) in parts {
            // At most 16 * 2^15 bytes: fits in usize.
            if !self
                .mem
                .check_range(GuestAddress(addr), len as usize, access)
            {
                return Err(format!("{name} {addr:#x}+{len:#x} is not in guest memory"));
            }
        }
        // virtio-queue takes an available ring at 0 for a queue that was never set up and serves
        // nothing from it: refuse it now, where the driver sees NEEDS_RESET.
        if q.avail_ring() == 0 {
            return Err("an available ring at address 0 is not supported".into());
        }
        Ok(())
    }

    /// Back to the state before the driver found the device (spec 2.4).
    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.clear();
    }
}

/// One queue's configuration and ring positions (virtio-queue's own state struct).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState(#[serde(with = "QueueStateDef")] pub QueueState);

/// virtio-queue's state struct has no serde derives: this is its field list for serde's remote
/// derive, which checks that the fields match.
#[derive(Serialize, Deserialize)]
#[serde(remote = "QueueState")]
struct QueueStateDef {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

/// Everything the driver has set up through the registers, and the device's own state. The
/// config generation is not here: the config space never changes, so it always reads 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// `VIRTIO_ID_*` of the device below: the VMM picks the device kind to rebuild by it.
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    /// Whether the device was serving its queues (DRIVER_OK accepted).
    pub active: bool,
    /// InterruptStatus bits the driver had not acknowledged.
    pub interrupt_status: u32,
    /// Once active, as the device served them: the ring positions are the device's.
    pub queues: Vec<VirtqueueState>,
    /// The device's own state ([`VirtioDevice::save_device_state`]).
    pub device: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum MmioStateError {
    #[error("cannot save the virtio device's state: {0}")]
    Device(#[source] StateError),
    #[error("the active device reported {got} queues, the transport has {expected}")]
    DeviceQueues { expected: usize, got: usize },
    #[error("saved state is for virtio device type {saved}, the device given is type {device}")]
    DeviceType { saved: u32, device: u32 },
    #[error("saved state has {saved} queues, the device has {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("saved queue {index} has maximum size {saved}, the device's is {device}")]
    QueueMaxSize {
        index: usize,
        saved: u16,
        device: u16,
    },
    #[error("saved queue {index} is not valid: {source}")]
    Queue {
        index: usize,
        source: virtio_queue::Error,
    },
    #[error("saved status {status:#x} is not one the transport can be in ({reason})")]
    Status { status: u32, reason: &'static str },
    #[error("cannot create the restored transport: {0}")]
    Create(#[source] io::Error),
    #[error("cannot start the restored device again: {0}")]
    Activate(String),
}

/// Every status bit the transport keeps.
const STATUS_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_NEEDS_RESET
    | VIRTIO_CONFIG_S_FAILED;

impl MmioState {
    /// What `set_status` and activation can leave, and nothing else.
    fn check_status(&self, offered: u64) -> Result<(), MmioStateError> {
        let status = self.status;
        let bad = |reason| Err(MmioStateError::Status { status, reason });
        if status & !STATUS_BITS != 0 {
            return bad("unknown bits");
        }
        if STATUS_STEPS
            .iter()
            .any(|&(bit, prerequisite)| status & bit != 0 && status & prerequisite == 0)
        {
            return bad("a step without the one before it");
        }
        if status & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.driver_features & !offered != 0 {
            return bad("accepted features the device does not offer");
        }
        if self.active && status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            return bad("active without DRIVER_OK");
        }
        Ok(())
    }
}

impl<D: VirtioDevice> Persist for MmioTransport<D> {
    type State = MmioState;
    /// What [`MmioTransport::new`] takes; the device already rebuilt from [`MmioState::device`].
    type Args = (GuestMemoryMmap, D);
    type Error = MmioStateError;

    fn save(&self) -> Result<MmioState, MmioStateError> {
        let queues = if self.active {
            let live = self.device.queue_states().ok_or(MmioStateError::Device(
                StateError::Unsupported {
                    what: "virtio device",
                    reason: "it cannot report the queues it serves",
                },
            ))?;
            if live.len() != self.queues.len() {
                return Err(MmioStateError::DeviceQueues {
                    expected: self.queues.len(),
                    got: live.len(),
                });
            }
            live
        } else {
            self.queues.iter().map(Queue::state).collect()
        };
        Ok(MmioState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            active: self.active,
            interrupt_status: self.interrupt.status(),
            queues: queues.into_iter().map(VirtqueueState).collect(),
            device: self
                .device
                .save_device_state()
                .map_err(MmioStateError::Device)?,
        })
    }

    /// An active device is started again over the saved queues, as DRIVER_OK started it, with
    /// no handshake from the driver; the event loop then finds its activation event and each
    /// queue notified once, so chains the driver made available before the snapshot are served.
    fn restore((mem, device): Self::Args, state: &MmioState) -> Result<Self, MmioStateError> {
        if state.device_type != device.device_type() {
            return Err(MmioStateError::DeviceType {
                saved: state.device_type,
                device: device.device_type(),
            });
        }
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(MmioStateError::QueueCount {
                saved: state.queues.len(),
                device: max_sizes.len(),
            });
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (index, (saved, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
            if saved.0.max_size != max {
                return Err(MmioStateError::QueueMaxSize {
                    index,
                    saved: saved.0.max_size,
                    device: max,
                });
            }
            queues.push(
                Queue::try_from(saved.0)
                    .map_err(|source| MmioStateError::Queue { index, source })?,
            );
        }
        state.check_status(device.features())?;
        let mut transport = MmioTransport::new(mem, device).map_err(MmioStateError::Create)?;
        transport.queues = queues;
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.driver_features = state.driver_features;
        transport.queue_sel = state.queue_sel;
        transport.status = state.status;
        if state.active {
            transport.activate().map_err(MmioStateError::Activate)?;
            for evt in &transport.queue_evts {
                evt.write(1).map_err(|e| {
                    MmioStateError::Activate(format!("cannot notify a restored queue: {e}"))
                })?;
            }
        }
        transport.interrupt.restore_status(state.interrupt_status);
        Ok(transport)
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        // Registers below the config space are 32-bit and aligned (spec 4.2.2.2).
        match (u32::try_from(offset), <&mut [u8; 4]>::try_from(&mut *data)) {
            (Ok(reg), Ok(out)) if reg % 4 == 0 => *out = self.read_reg(reg).to_le_bytes(),
            _ => {
                self.log.warn(format_args!(
                    "{}-byte read at register offset {offset:#x}; reads as zero",
                    data.len()
                ));
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        match (u32::try_from(offset), <[u8; 4]>::try_from(data)) {
            (Ok(reg), Ok(bytes)) if reg % 4 == 0 => self.write_reg(reg, u32::from_le_bytes(bytes)),
            _ => self.log.warn(format_args!(
                "{}-byte write at register offset {offset:#x}; ignored",
                data.len()
            )),
        }
    }
}

impl<D: VirtioDevice> MutEventSubscriber for MmioTransport<D> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            ACTIVATE_TOKEN,
            EventSet::IN,
        )) {
            log::error!("virtio-mmio: cannot watch the activate eventfd: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == ACTIVATE_TOKEN {
            let _ = self.activate_evt.read();
            if !self.queue_evts_watched {
                for (i, evt) in self.queue_evts.iter().enumerate() {
                    // Notifications sent before this point are counted in the eventfd, so
                    // epoll reports them right away.
                    if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                        log::error!("virtio-mmio: cannot watch queue {i}'s eventfd: {e:?}");
                    }
                }
                self.queue_evts_watched = true;
            }
            return;
        }
        let Some(index) = take_queue_event(&self.queue_evts, token) else {
            return;
        };
        if self.active {
            self.device.process_queue(index);
            // Spec 2.1.2: set DEVICE_NEEDS_RESET, and with DRIVER_OK set, say so with a
            // configuration change notification.
            if self.device.needs_reset() && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG);
            }
        }
    }
}

/// The queue a notification event's token names, its eventfd drained; None (logged) for a token
/// that names none.
fn take_queue_event(queue_evts: &[EventFd], token: u32) -> Option<usize> {
    let index = token as usize;
    let Some(evt) = queue_evts.get(index) else {
        log::warn!("virtio-mmio: event for unknown token {token}");
        return None;
    };
    // Non-blocking: an empty counter (already drained) is not an error worth reporting.
    let _ = evt.read();
    Some(index)
}

/// Serves a transport's queues apart from it: see `MmioTransport::queue_handler`. Register it
/// on an event loop instead of the transport.
pub struct QueueHandler {
    server: Arc<dyn QueueServer>,
    queue_evts: Vec<EventFd>,
    activate_evt: EventFd,
    interrupt: Arc<Interrupt>,
    /// Whether the driver has been told (config interrupt) that a queue it broke needs a reset.
    reported_reset: bool,
}

impl QueueHandler {
    fn serve(&mut self, index: usize) {
        // A turn at a time, letting go of the request side in between.
        while self.server.serve(index) {}
        // Spec 2.1.2: DEVICE_NEEDS_RESET (the transport's Status shows it) with a configuration
        // change notification, once per breakage.
        let broken = self.server.needs_reset();
        if broken && !self.reported_reset {
            self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG);
        }
        self.reported_reset = broken;
    }
}

impl MutEventSubscriber for QueueHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            ACTIVATE_TOKEN,
            EventSet::IN,
        )) {
            log::error!("virtio-mmio: cannot watch the activation eventfd: {e:?}");
        }
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                log::error!("virtio-mmio: cannot watch queue {i}'s eventfd: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let token = events.data();
        if token == ACTIVATE_TOKEN {
            let _ = self.activate_evt.read();
            // Notifications before activation found nothing to serve: serve every queue now.
            for i in 0..self.queue_evts.len() {
                self.serve(i);
            }
            return;
        }
        if let Some(index) = take_queue_event(&self.queue_evts, token) {
            self.serve(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::state::{from_bytes, to_bytes};
    use crate::virtio::{Block, BlockState, DiskConfig};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const HDR: u64 = 0x8000;
    const STATUS: u64 = 0x9000;
    const DATA: u64 = 0x1_0000;
    const QSIZE: u32 = 16;
    const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH);

    type Shared = Arc<Mutex<MmioTransport<Block>>>;

    struct Guest {
        mem: GuestMemoryMmap,
        dev: Shared,
        em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
        image: TempFile,
        avail_idx: u16,
    }

    impl Guest {
        /// The transport serves its queues on the event loop itself.
        fn new() -> Self {
            Self::with(false)
        }

        /// As Ember runs a disk: the queue handler serves the queues on the event loop, the
        /// transport only answers register accesses.
        fn with_queue_handler() -> Self {
            Self::with(true)
        }

        fn with(queue_handler: bool) -> Self {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
            let image = TempFile::new_with_prefix("/tmp/ember-mmio-test").unwrap();
            let bytes: Vec<u8> = (0..64 * 512).map(|i| (i * 7 % 251) as u8).collect();
            image.as_file().write_all_at(&bytes, 0).unwrap();
            let block = Block::new(&DiskConfig {
                path: image.as_path().to_path_buf(),
                readonly: false,
                id: None,
                overlay: None,
            })
            .unwrap();
            let transport = MmioTransport::new(mem.clone(), block).unwrap();
            Self::around(mem, image, transport, queue_handler, 0)
        }

        /// A guest driving `transport`, whose driver has made `avail_idx` chains available.
        fn around(
            mem: GuestMemoryMmap,
            image: TempFile,
            transport: MmioTransport<Block>,
            queue_handler: bool,
            avail_idx: u16,
        ) -> Self {
            let dev = Arc::new(Mutex::new(transport));
            let mut em = EventManager::new().unwrap();
            if queue_handler {
                let handler = dev.lock().unwrap().queue_handler().unwrap();
                em.add_subscriber(
                    Arc::new(Mutex::new(handler)) as Arc<Mutex<dyn MutEventSubscriber + Send>>
                );
            } else {
                em.add_subscriber(dev.clone() as Arc<Mutex<dyn MutEventSubscriber + Send>>);
            }
            Guest {
                mem,
                dev,
                em,
                image,
                avail_idx,
            }
        }

        fn read(&self, offset: u32) -> u32 {
            let mut b = [0u8; 4];
            self.dev.lock().unwrap().read(u64::from(offset), &mut b);
            u32::from_le_bytes(b)
        }

        fn write(&self, offset: u32, value: u32) {
            self.dev
                .lock()
                .unwrap()
                .write(u64::from(offset), &value.to_le_bytes());
        }

        fn status(&self) -> u32 {
            self.read(VIRTIO_MMIO_STATUS)
        }

        fn negotiate(&self, features: u64) {
            self.write(VIRTIO_MMIO_STATUS, 0);
            self.write(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
            self.write(
                VIRTIO_MMIO_STATUS,
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
            );
            for sel in 0..2 {
                self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
                self.write(VIRTIO_MMIO_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
            }
            self.write(
                VIRTIO_MMIO_STATUS,
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
            );
        }

        fn setup_queue(&mut self) {
            self.mem
                .write_slice(&[0u8; 0x3000], GuestAddress(DESC))
                .unwrap();
            self.avail_idx = 0;
            self.write(VIRTIO_MMIO_QUEUE_SEL, 0);
            self.write(VIRTIO_MMIO_QUEUE_NUM, QSIZE);
            self.write(VIRTIO_MMIO_QUEUE_DESC_LOW, DESC as u32);
            self.write(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
            self.write(VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
            self.write(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
            self.write(VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
            self.write(VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
            self.write(VIRTIO_MMIO_QUEUE_READY, 1);
        }

        fn driver_ok(&mut self) {
            let s = self.status();
            self.write(VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
            // The event loop picks up the activation and starts watching the queue.
            self.em.run_with_timeout(0).unwrap();
        }

        fn init(&mut self) {
            self.negotiate(FEATURES);
            self.setup_queue();
            self.driver_ok();
            assert!(self.dev.lock().unwrap().is_active());
        }

        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
        }

        /// Makes more new entries available than the queue holds, notifies, and lets the event
        /// loop find the queue broken.
        fn break_queue(&mut self) {
            self.mem
                .write_obj(QSIZE as u16 + 1, GuestAddress(AVAIL + 2))
                .unwrap();
            self.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
            self.em.run_with_timeout(0).unwrap();
        }

        /// Queues a one-sector read of `sector` into DATA and notifies the device.
        fn submit_read(&mut self, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let next = VRING_DESC_F_NEXT as u16;
            let w = VRING_DESC_F_WRITE as u16;
            for (i, d) in [
                Descriptor::new(HDR, 16, next, 1),
                Descriptor::new(DATA, 512, w | next, 2),
                Descriptor::new(STATUS, 1, w, 0),
            ]
            .into_iter()
            .enumerate()
            {
                self.mem
                    .write_obj(RawDescriptor::from(d), GuestAddress(DESC + 16 * i as u64))
                    .unwrap();
            }
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE as u16);
            self.mem.write_obj(0u16, GuestAddress(slot)).unwrap();
            self.avail_idx += 1;
            self.mem
                .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
            self.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        }
    }

    /// The 512 bytes the test image holds at `sector`.
    fn sector_bytes(sector: u64) -> Vec<u8> {
        let start = sector as usize * 512;
        (start..start + 512).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Saves `g`'s transport, ends it (closing the image, so its lock goes as when the saved
    /// Ember ends), and restores it with the block device over the same image.
    fn save_end_restore(g: Guest, queue_handler: bool) -> (Vec<u8>, Guest) {
        let saved = to_bytes(&g.dev.lock().unwrap().save().unwrap()).unwrap();
        let Guest {
            mem,
            dev,
            em,
            image,
            avail_idx,
        } = g;
        drop(em);
        drop(dev);
        let state: MmioState = from_bytes(&saved).unwrap();
        let block = Block::restore((), &from_bytes(&state.device).unwrap()).unwrap();
        let transport = MmioTransport::restore((mem.clone(), block), &state).unwrap();
        let g = Guest::around(mem, image, transport, queue_handler, avail_idx);
        (saved, g)
    }

    #[test]
    fn a_restored_transport_serves_on_without_a_handshake() {
        restored_transport_serves_on(false);
    }

    #[test]
    fn a_restored_transport_serves_on_under_the_queue_handler() {
        restored_transport_serves_on(true);
    }

    /// One read served (its interrupt not yet acknowledged), a second one made available and
    /// notified but not yet served when the state is saved: the restored device exports the same bytes, serves the
    /// second read (and not the first again), and goes on with the next, while the driver sees
    /// every register as it left it.
    fn restored_transport_serves_on(queue_handler: bool) {
        let mut g = Guest::with(queue_handler);
        g.init();
        g.submit_read(3);
        g.em.run_with_timeout(0).unwrap();
        assert_eq!(g.used_idx(), 1);
        g.submit_read(4);
        g.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        g.write(VIRTIO_MMIO_QUEUE_SEL, 1);
        let offered = g.dev.lock().unwrap().device().features();

        let (saved, mut g) = save_end_restore(g, queue_handler);
        assert_eq!(
            to_bytes(&g.dev.lock().unwrap().save().unwrap()).unwrap(),
            saved
        );
        let queue = from_bytes::<MmioState>(&saved).unwrap().queues[0].0;
        assert_eq!(
            (queue.next_avail, queue.next_used),
            (1, 1),
            "the device's positions, not the transport's copy"
        );
        assert_ne!(g.status() & VIRTIO_CONFIG_S_DRIVER_OK, 0);
        assert_eq!(g.read(VIRTIO_MMIO_DEVICE_FEATURES), (offered >> 32) as u32);
        assert_eq!(g.read(VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "queue 1 selected");
        g.write(VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(g.read(VIRTIO_MMIO_QUEUE_READY), 1);
        assert_eq!(g.dev.lock().unwrap().driver_features, FEATURES);
        assert_eq!(
            g.read(VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING,
            "not acknowledged before the snapshot"
        );
        g.write(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);

        // The activation, then the queue notified on restore.
        g.em.run_with_timeout(0).unwrap();
        g.em.run_with_timeout(0).unwrap();
        assert_eq!(g.used_idx(), 2, "the pending read, and not the first again");
        let mut got = [0u8; 512];
        g.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got.to_vec(), sector_bytes(4));
        assert_eq!(g.read(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        g.submit_read(5);
        g.em.run_with_timeout(0).unwrap();
        assert_eq!(g.used_idx(), 3);
        g.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got.to_vec(), sector_bytes(5));
    }

    #[test]
    fn a_restored_transport_keeps_a_broken_queue_broken() {
        let mut g = Guest::with_queue_handler();
        g.init();
        g.break_queue();
        assert_ne!(g.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        let (saved, mut g) = save_end_restore(g, true);
        assert!(
            from_bytes::<BlockState>(&from_bytes::<MmioState>(&saved).unwrap().device)
                .unwrap()
                .broken
        );
        assert_ne!(g.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        // Until the driver resets it.
        g.init();
        g.submit_read(2);
        g.em.run_with_timeout(0).unwrap();
        assert_eq!(g.used_idx(), 1);
    }

    #[test]
    fn a_transport_that_never_started_restores_as_it_was() {
        let g = Guest::new();
        g.negotiate(FEATURES);
        g.write(VIRTIO_MMIO_QUEUE_NUM, 8);
        let (saved, g) = save_end_restore(g, false);
        assert_eq!(
            to_bytes(&g.dev.lock().unwrap().save().unwrap()).unwrap(),
            saved
        );
        assert!(!g.dev.lock().unwrap().is_active());
        assert_ne!(g.status() & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    }

    #[test]
    fn corrupt_or_mismatched_state_is_refused() {
        let mut g = Guest::new();
        g.init();
        let (saved, g) = save_end_restore(g, false);
        let Guest {
            mem,
            dev,
            em,
            image,
            ..
        } = g;
        drop(em);
        drop(dev);
        for len in 0..saved.len() {
            assert!(
                from_bytes::<MmioState>(&saved[..len]).is_err(),
                "{len} bytes"
            );
        }
        let good: MmioState = from_bytes(&saved).unwrap();
        let restore = |state: &MmioState| {
            let block = Block::restore((), &from_bytes(&good.device).unwrap()).unwrap();
            match MmioTransport::restore((mem.clone(), block), state) {
                Ok(_) => panic!("restored from {state:?}"),
                Err(e) => e,
            }
        };
        let mut s = good.clone();
        s.device_type = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
        assert!(matches!(
            restore(&s),
            MmioStateError::DeviceType {
                saved: 1,
                device: 2
            }
        ));
        let mut s = good.clone();
        s.queues.clear();
        assert!(matches!(
            restore(&s),
            MmioStateError::QueueCount {
                saved: 0,
                device: 1
            }
        ));
        let mut s = good.clone();
        s.queues[0].0.max_size = 512;
        assert!(matches!(restore(&s), MmioStateError::QueueMaxSize { .. }));
        let mut s = good.clone();
        s.queues[0].0.size = 3;
        assert!(matches!(
            restore(&s),
            MmioStateError::Queue { index: 0, .. }
        ));
        let mut s = good.clone();
        s.status &= !VIRTIO_CONFIG_S_FEATURES_OK;
        assert!(matches!(restore(&s), MmioStateError::Status { .. }));
        let mut s = good.clone();
        s.driver_features |= 1 << 50;
        assert!(matches!(restore(&s), MmioStateError::Status { .. }));
        let mut s = good.clone();
        s.queues[0].0.used_ring = 0xfff0_0000;
        let err = restore(&s);
        assert!(matches!(err, MmioStateError::Activate(_)), "{err}");

        // The image changed size since the snapshot.
        image.as_file().set_len(128 * 512).unwrap();
        let err = Block::restore((), &from_bytes(&good.device).unwrap())
            .err()
            .unwrap();
        assert!(
            matches!(
                err,
                crate::virtio::block::BlockStateError::ImageSize {
                    saved: 64,
                    now: 128,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err
            .to_string()
            .contains(&image.as_path().display().to_string()));
    }

    #[test]
    fn identifies_as_a_version_2_block_device() {
        let g = Guest::new();
        assert_eq!(g.read(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(g.read(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(g.read(VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_BLOCK);
        assert_eq!(g.read(VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        let offered = g.dev.lock().unwrap().device().features();
        g.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = g.read(VIRTIO_MMIO_DEVICE_FEATURES);
        g.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = g.read(VIRTIO_MMIO_DEVICE_FEATURES);
        assert_eq!(u64::from(low) | (u64::from(high) << 32), offered);
        assert_ne!(high & 1, 0, "VIRTIO_F_VERSION_1");
        g.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(g.read(VIRTIO_MMIO_DEVICE_FEATURES), 0);
        assert_eq!(g.read(VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        g.write(VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(g.read(VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "only one queue");
        // Capacity, 64-bit, at the start of the config space.
        assert_eq!(g.read(0x100), 64);
        assert_eq!(g.read(0x104), 0);
        // A 2-byte or unaligned register read gets zeros, and nothing breaks.
        let mut b = [0xffu8; 2];
        g.dev.lock().unwrap().read(0, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(g.read(0x2), 0);
        g.dev.lock().unwrap().write(0x70, &[1]);
        assert_eq!(g.status(), 0);
    }

    #[test]
    fn requests_are_served_on_the_event_loop_and_interrupt() {
        requests_are_served_and_interrupt(Guest::new());
    }

    #[test]
    fn the_queue_handler_serves_requests_and_interrupts_without_the_transport() {
        requests_are_served_and_interrupt(Guest::with_queue_handler());
    }

    /// A vCPU reading a register while the disk's thread is in the middle of a request (here:
    /// holds the request side's lock, as a long FLUSH does) gets its answer at once.
    #[test]
    fn register_reads_do_not_wait_for_a_request_in_flight() {
        let mut g = Guest::with_queue_handler();
        g.init();
        let server = g.dev.lock().unwrap().device().server_for_tests();
        let in_flight = server.lock();
        let dev = g.dev.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut b = [0u8; 4];
            dev.lock()
                .unwrap()
                .read(u64::from(VIRTIO_MMIO_INTERRUPT_STATUS), &mut b);
            dev.lock()
                .unwrap()
                .read(u64::from(VIRTIO_MMIO_STATUS), &mut b);
            let _ = tx.send(u32::from_le_bytes(b));
        });
        let status = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("a register read waited for the request in flight");
        assert_ne!(status & VIRTIO_CONFIG_S_DRIVER_OK, 0);
        drop(in_flight);
    }

    fn requests_are_served_and_interrupt(mut g: Guest) {
        g.init();
        g.submit_read(3);
        // The vCPU side only forwarded the notification.
        assert_eq!(g.used_idx(), 0);
        g.em.run_with_timeout(0).unwrap();
        assert_eq!(g.used_idx(), 1);
        assert_eq!(
            g.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
        let mut got = [0u8; 512];
        g.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        let want: Vec<u8> = (3 * 512..4 * 512).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(got.to_vec(), want);
        assert_eq!(g.read(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert_eq!(g.dev.lock().unwrap().irq_evt().read().unwrap(), 1);
        g.write(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(g.read(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn features_outside_the_offer_or_without_version_1_are_refused() {
        let g = Guest::new();
        g.negotiate(FEATURES | (1 << 50));
        assert_eq!(g.status() & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        g.negotiate(1 << VIRTIO_BLK_F_FLUSH);
        assert_eq!(g.status() & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        g.negotiate(FEATURES);
        assert_ne!(g.status() & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        // Features are frozen once accepted.
        g.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        g.write(VIRTIO_MMIO_DRIVER_FEATURES, 0);
        assert_eq!(g.dev.lock().unwrap().driver_features, FEATURES);
    }

    #[test]
    fn driver_ok_written_with_refused_features_does_not_stick() {
        let g = Guest::new();
        g.write(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        g.write(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        // No VERSION_1: refused.
        g.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        g.write(VIRTIO_MMIO_DRIVER_FEATURES, 1 << VIRTIO_BLK_F_FLUSH);
        g.write(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_eq!(
            g.status(),
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
        );
        assert!(!g.dev.lock().unwrap().is_active());
        // The driver may still fix its features and carry on.
        g.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        g.write(VIRTIO_MMIO_DRIVER_FEATURES, 1);
        let ok = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        g.write(VIRTIO_MMIO_STATUS, ok);
        assert_eq!(g.status(), ok);
    }

    #[test]
    fn refused_queue_values_are_ignored_and_cannot_flood_the_log() {
        crate::test_log::start();
        let mut g = Guest::new();
        g.negotiate(FEATURES);
        g.setup_queue();
        for _ in 0..100 {
            for (reg, bad) in [
                (VIRTIO_MMIO_QUEUE_NUM, 3),
                (VIRTIO_MMIO_QUEUE_NUM, 0),
                (VIRTIO_MMIO_QUEUE_NUM, 512),
                (VIRTIO_MMIO_QUEUE_NUM, 0x1_0000),
                (VIRTIO_MMIO_QUEUE_DESC_LOW, DESC as u32 + 8),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32 + 1),
                (VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32 + 2),
            ] {
                g.write(reg, bad);
            }
        }
        // The good values stay: the queue works as set up.
        g.driver_ok();
        assert!(g.dev.lock().unwrap().is_active());
        g.submit_read(3);
        g.em.run_with_timeout(0).unwrap();
        assert_eq!(g.used_idx(), 1);
        assert_eq!(
            g.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
        // Rings outside guest memory, again and again: each attempt needs a reset.
        for _ in 0..50 {
            g.negotiate(FEATURES);
            g.setup_queue();
            g.write(VIRTIO_MMIO_QUEUE_USED_LOW, 0xfff0_0000);
            g.driver_ok();
            assert_ne!(g.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        }
        let logged = crate::test_log::warnings();
        assert!(logged.len() <= GuestLog::LIMIT as usize, "{logged:#?}");
    }

    #[test]
    fn an_available_ring_at_address_0_needs_reset() {
        let mut g = Guest::new();
        g.negotiate(FEATURES);
        g.setup_queue();
        g.write(VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0);
        g.driver_ok();
        assert!(!g.dev.lock().unwrap().is_active());
        assert_ne!(g.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn driver_ok_without_a_ready_queue_needs_reset() {
        let mut g = Guest::new();
        g.negotiate(FEATURES);
        g.driver_ok();
        assert!(!g.dev.lock().unwrap().is_active());
        assert_ne!(g.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(g.read(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        // Rings outside guest memory are refused the same way.
        g.negotiate(FEATURES);
        g.setup_queue();
        g.write(VIRTIO_MMIO_QUEUE_USED_LOW, 0xfff0_0000);
        g.driver_ok();
        assert!(!g.dev.lock().unwrap().is_active());
        assert_ne!(g.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn status_steps_must_come_in_order() {
        let mut g = Guest::new();
        g.write(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_eq!(g.status(), VIRTIO_CONFIG_S_ACKNOWLEDGE);
        // Queue registers are not writable before FEATURES_OK.
        g.write(VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(g.read(VIRTIO_MMIO_QUEUE_READY), 0);
        g.init();
        // Clearing bits without a reset is ignored; queues are frozen while live.
        g.write(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_ne!(g.status() & VIRTIO_CONFIG_S_DRIVER_OK, 0);
        g.write(VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(g.read(VIRTIO_MMIO_QUEUE_READY), 1);
    }

    #[test]
    fn reset_stops_service_and_the_device_can_start_again() {
        let mut g = Guest::new();
        g.init();
        g.submit_read(1);
        g.em.run_with_timeout(0).unwrap();
        assert_eq!(g.used_idx(), 1);

        g.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        g.write(VIRTIO_MMIO_QUEUE_SEL, 5);
        g.write(VIRTIO_MMIO_STATUS, 0);
        assert_eq!(g.status(), 0);
        assert!(!g.dev.lock().unwrap().is_active());
        // Selectors and the accepted features are back to their initial values too.
        let offered = g.dev.lock().unwrap().device().features();
        assert_eq!(g.read(VIRTIO_MMIO_DEVICE_FEATURES), offered as u32);
        assert_eq!(g.read(VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        assert_eq!(g.dev.lock().unwrap().driver_features, 0);
        assert!(!g.dev.lock().unwrap().device().is_active());
        assert_eq!(g.read(VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(g.read(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // A request queued after the reset is not served.
        g.submit_read(2);
        g.dev.lock().unwrap().queue_evts()[0].write(1).unwrap();
        g.em.run_with_timeout(0).unwrap();
        assert_eq!(g.used_idx(), 1);

        // The driver starts over; the event loop already watches the queue.
        g.init();
        g.submit_read(2);
        g.em.run_with_timeout(0).unwrap();
        assert_eq!(g.used_idx(), 1, "a fresh used ring with one entry");
        assert_eq!(
            g.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
    }

    #[test]
    fn a_queue_the_driver_broke_is_reported_as_needs_reset() {
        broken_queue_is_reported_as_needs_reset(Guest::new());
    }

    #[test]
    fn a_queue_broken_under_the_queue_handler_is_reported_as_needs_reset() {
        broken_queue_is_reported_as_needs_reset(Guest::with_queue_handler());
    }

    fn broken_queue_is_reported_as_needs_reset(mut g: Guest) {
        g.init();
        g.break_queue();
        assert_eq!(g.used_idx(), 0);
        assert_ne!(g.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(g.read(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        // Once: a later notification does not raise it again.
        g.write(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
        g.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        g.em.run_with_timeout(0).unwrap();
        assert_eq!(g.read(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // A reset clears it and the device serves again.
        g.init();
        g.submit_read(2);
        g.em.run_with_timeout(0).unwrap();
        assert_eq!(g.used_idx(), 1);
        assert_eq!(g.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn linux_removing_the_device_is_not_a_guest_error() {
        let mut g = Guest::new();
        g.init();
        crate::test_log::start();
        // virtio_reset_device, then vm_del_vq for each queue.
        g.write(VIRTIO_MMIO_STATUS, 0);
        g.write(VIRTIO_MMIO_QUEUE_SEL, 0);
        g.write(VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(g.read(VIRTIO_MMIO_QUEUE_READY), 0);
        let logged = crate::test_log::warnings();
        assert!(logged.is_empty(), "{logged:#?}");
        // Still refused where it would change something.
        g.write(VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(g.read(VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn writes_through_the_transport_reach_theimage() {
        let mut g = Guest::new();
        g.init();
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..16].copy_from_slice(&9u64.to_le_bytes());
        g.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        g.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        let next = VRING_DESC_F_NEXT as u16;
        for (i, d) in [
            Descriptor::new(HDR, 16, next, 1),
            Descriptor::new(DATA, 512, next, 2),
            Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        ]
        .into_iter()
        .enumerate()
        {
            g.mem
                .write_obj(RawDescriptor::from(d), GuestAddress(DESC + 16 * i as u64))
                .unwrap();
        }
        g.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        g.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        g.em.run_with_timeout(0).unwrap();
        assert_eq!(g.used_idx(), 1);
        let mut got = [0u8; 512];
        g.image.as_file().read_exact_at(&mut got, 9 * 512).unwrap();
        assert_eq!(got, [0x5a; 512]);
    }
}

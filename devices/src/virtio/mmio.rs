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
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{GuestLog, Interrupt, VirtioDevice, VIRTIO_MMIO_INT_CONFIG};
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

    /// One eventfd per queue, in queue order: register each as an ioeventfd at
    /// `base + NOTIFY_OFFSET` with its index as datamatch.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    pub fn is_active(&self) -> bool {
        self.active
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
        match offset {
            VIRTIO_MMIO_QUEUE_NUM => match u16::try_from(value) {
                // virtio-queue refuses sizes that are not a power of two up to the maximum.
                Ok(size) => q.set_size(size),
                Err(_) => self.log.warn(format_args!(
                    "queue {sel} size {value} is too large; ignored"
                )),
            },
            VIRTIO_MMIO_QUEUE_READY => q.set_ready(value == 1),
            VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(value)),
            VIRTIO_MMIO_QUEUE_USED_LOW => q.set_used_ring_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
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
        // Each step of driver initialization needs the ones before it (spec 3.1.1).
        let needs = [
            (VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE),
            (VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER),
            (VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK),
        ];
        for (bit, prerequisite) in needs {
            if added & bit != 0 && new & prerequisite == 0 {
                self.log.warn(format_args!(
                    "status bit {bit:#x} set before {prerequisite:#x}; ignored"
                ));
                new &= !bit;
            }
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && new & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
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
            if !q.is_valid(&self.mem) {
                return Err(format!("queue {i}'s rings are not in guest memory"));
            }
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
        let index = token as usize;
        let Some(evt) = self.queue_evts.get(index) else {
            log::warn!("virtio-mmio: event for unknown token {token}");
            return;
        };
        // Non-blocking: an empty counter (already drained) is not an error worth reporting.
        let _ = evt.read();
        if self.active {
            self.device.process_queue(index);
        }
    }
}

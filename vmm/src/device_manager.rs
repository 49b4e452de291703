//! The device manager: every device the guest sees is attached here, with the resources the
//! allocator grants it (ports, an MMIO window, an IRQ line), placed on the port I/O or MMIO bus,
//! wired to KVM (irqfd, ioeventfds), and listed for the guest's firmware tables and command line.
//! The bus, the DSDT and the `virtio_mmio.device=` words are all written from the same grants.
//!
//! Adding a virtio device type is one call to [`DeviceManager::attach_virtio`] with a
//! `VirtioDevice`; the manager gives it a window and a line, registers its queue notifications,
//! and starts an I/O thread (`ember-<name>`, own event loop and seccomp filter) that serves its
//! queues and any event sources of its own (`VirtioDevice::io_subscribers`). Device I/O never runs
//! on the main event loop, so a guest that keeps a device busy cannot delay signals, the console
//! or Ctrl-A x.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ember_boot::layout::{self, GuestDevice, MmioDeviceInfo};
use ember_devices::acpi_pm::{AcpiPm, ACPI_PM_PORT_LEN};
use ember_devices::cmos::{Cmos, CMOS_PORT_LEN};
use ember_devices::i8042::{I8042, I8042_PORT_LEN};
use ember_devices::pvpanic::{PvPanic, PVPANIC_PORT_LEN};
use ember_devices::serial::SerialDevice;
use ember_devices::state::Persist;
use ember_devices::virtio::mmio::NOTIFY_OFFSET;
use ember_devices::virtio::vsock::{ListenerFile, VsockState};
use ember_devices::virtio::{
    Block, BlockState, MmioState, MmioStateError, MmioTransport, VirtioDevice, Vsock,
};
use ember_devices::{Bus, BusDevice, EventFdTrigger, SharedDevice};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::resources::{ResourceAllocator, ResourceError, MMIO_WINDOW};
use crate::snapshot::{DevicesSnapshot, VirtioSnapshot};
use crate::vcpu::{ExitReason, VmControl};

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{device}: {source}")]
    Resources {
        device: String,
        #[source]
        source: ResourceError,
    },
    #[error("{device}: cannot create its {what}: {source}")]
    Create {
        device: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{device}: {what} failed: {source}")]
    Kvm {
        device: String,
        what: &'static str,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    #[error("{device}: {source}")]
    Bus {
        device: String,
        #[source]
        source: ember_devices::bus::BusError,
    },
    #[error("{device}: cannot save its state: {reason}")]
    Save { device: String, reason: String },
    #[error("{device}: cannot restore its state: {reason}")]
    Restore { device: String, reason: String },
    #[error(
        "{device}: the snapshot has it at {saved:#x} (IRQ {saved_irq}), this machine would put it at \
         {given:#x} (IRQ {given_irq})"
    )]
    Moved {
        device: String,
        saved: u64,
        saved_irq: u32,
        given: u64,
        given_irq: u32,
    },
}

fn restore_err(device: &str) -> impl Fn(&dyn std::fmt::Display) -> DeviceError + '_ {
    move |e| DeviceError::Restore {
        device: device.into(),
        reason: e.to_string(),
    }
}

/// The eventfds the legacy devices raise to end the VM; the main event loop watches them.
pub struct ExitEvents {
    pub reset: EventFd,
    pub poweroff: EventFd,
    pub panicked: EventFd,
}

/// The legacy devices, kept by type so their state can be read and the console fed.
pub struct LegacyDevices {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub cmos: Arc<Mutex<Cmos>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub acpi_pm: Arc<Mutex<AcpiPm>>,
    pub pvpanic: Arc<Mutex<PvPanic>>,
}

/// A virtio transport's state, whatever device is behind it.
pub trait SaveTransport: Send {
    /// `files`: where the snapshot keeps files of the device's own (`<files>.<what>`).
    fn save_state(&self, files: &Path) -> Result<MmioState, MmioStateError>;
    /// See `MmioTransport::resignal`.
    fn resignal(&self);
}

impl<D: VirtioDevice> SaveTransport for MmioTransport<D> {
    fn save_state(&self, files: &Path) -> Result<MmioState, MmioStateError> {
        self.device().snapshot_files(files);
        Persist::save(self)
    }

    fn resignal(&self) {
        MmioTransport::resignal(self)
    }
}

/// A virtio device as attached: its place, and its transport (the register file on the bus).
pub struct VirtioSlot {
    pub name: String,
    pub info: MmioDeviceInfo,
    pub transport: Arc<Mutex<dyn SaveTransport>>,
}

pub struct DeviceManager {
    resources: ResourceAllocator,
    pub pio: Bus,
    pub mmio: Bus,
    guest_devices: Vec<GuestDevice>,
    virtio: Vec<VirtioSlot>,
    seccomp: bool,
}

impl DeviceManager {
    pub fn new(seccomp: bool) -> Result<Self, DeviceError> {
        Ok(DeviceManager {
            resources: ResourceAllocator::new().map_err(|source| DeviceError::Resources {
                device: "the machine".into(),
                source,
            })?,
            pio: Bus::new(),
            mmio: Bus::new(),
            guest_devices: Vec::new(),
            virtio: Vec::new(),
            seccomp,
        })
    }

    /// The devices the guest's firmware tables describe, in the order they were attached.
    pub fn guest_devices(&self) -> &[GuestDevice] {
        &self.guest_devices
    }

    pub fn virtio_devices(&self) -> &[VirtioSlot] {
        &self.virtio
    }

    /// The kernel command-line words that tell Linux where the virtio-mmio devices are.
    pub fn cmdline_words(&self) -> Vec<String> {
        self.virtio.iter().map(|v| v.info.cmdline_word()).collect()
    }

    /// Puts `dev` on the port I/O bus at its fixed PC address.
    fn attach_pio(
        &mut self,
        name: &str,
        port: u16,
        len: u64,
        dev: SharedDevice,
    ) -> Result<(), DeviceError> {
        self.resources
            .claim_pio(port, len)
            .map_err(|source| DeviceError::Resources {
                device: name.into(),
                source,
            })?;
        self.pio
            .insert(u64::from(port), len, dev)
            .map_err(|source| DeviceError::Bus {
                device: name.into(),
                source,
            })
    }

    /// The PC's legacy devices: COM1 (its output to `console`), the CMOS RTC, the i8042 (reset),
    /// the ACPI PM registers (poweroff) and the pvpanic port; new, or as `saved` has them.
    pub fn attach_legacy(
        &mut self,
        vm: &VmFd,
        console: Box<dyn Write + Send>,
        saved: Option<&DevicesSnapshot>,
    ) -> Result<(LegacyDevices, ExitEvents), DeviceError> {
        let create = |device: &str, what, source| DeviceError::Create {
            device: device.into(),
            what,
            source,
        };
        let serial_irq = EventFdTrigger::new().map_err(|e| create("COM1", "irqfd", e))?;
        self.resources
            .claim_irq(layout::COM1_IRQ)
            .map_err(|source| DeviceError::Resources {
                device: "COM1".into(),
                source,
            })?;
        vm.register_irqfd(&serial_irq, layout::COM1_IRQ)
            .map_err(|source| DeviceError::Kvm {
                device: "COM1".into(),
                what: "KVM_IRQFD",
                source,
            })?;
        let reset = EventFdTrigger::new().map_err(|e| create("i8042", "reset eventfd", e))?;
        let poweroff = EventFdTrigger::new().map_err(|e| create("ACPI PM", "eventfd", e))?;
        let panicked = EventFdTrigger::new().map_err(|e| create("pvpanic", "eventfd", e))?;
        // The event loop watches the same eventfds the devices raise.
        let exits = ExitEvents {
            reset: EventFd::try_clone(&reset).map_err(|e| create("i8042", "eventfd", e))?,
            poweroff: EventFd::try_clone(&poweroff).map_err(|e| create("ACPI PM", "eventfd", e))?,
            panicked: EventFd::try_clone(&panicked).map_err(|e| create("pvpanic", "eventfd", e))?,
        };
        let legacy = match saved {
            None => LegacyDevices {
                serial: Arc::new(Mutex::new(
                    SerialDevice::new(serial_irq, console)
                        .map_err(|e| create("COM1", "UART", e))?,
                )),
                cmos: Arc::new(Mutex::new(Cmos::new())),
                i8042: Arc::new(Mutex::new(I8042::new(reset))),
                acpi_pm: Arc::new(Mutex::new(AcpiPm::new(poweroff, layout::ACPI_S5_SLP_TYP))),
                pvpanic: Arc::new(Mutex::new(PvPanic::new(panicked))),
            },
            Some(s) => LegacyDevices {
                serial: Arc::new(Mutex::new(
                    SerialDevice::restore((serial_irq, console), &s.serial)
                        .map_err(|e| restore_err("COM1")(&e))?,
                )),
                cmos: Arc::new(Mutex::new(
                    Cmos::restore(ember_devices::cmos::host_clock(), &s.cmos)
                        .map_err(|e| restore_err("CMOS RTC")(&e))?,
                )),
                i8042: Arc::new(Mutex::new(
                    I8042::restore(reset, &s.i8042).map_err(|e| restore_err("i8042")(&e))?,
                )),
                acpi_pm: Arc::new(Mutex::new(
                    AcpiPm::restore(poweroff, &s.acpi_pm)
                        .map_err(|e| restore_err("ACPI PM")(&e))?,
                )),
                pvpanic: Arc::new(Mutex::new(
                    PvPanic::restore(panicked, &s.pvpanic)
                        .map_err(|e| restore_err("pvpanic")(&e))?,
                )),
            },
        };
        let devices: [(&str, u16, u64, SharedDevice); 5] = [
            ("COM1", layout::COM1_PORT, 8, legacy.serial.clone()),
            (
                "CMOS RTC",
                layout::CMOS_PORT,
                CMOS_PORT_LEN,
                legacy.cmos.clone(),
            ),
            (
                "i8042",
                layout::I8042_PORT,
                I8042_PORT_LEN,
                legacy.i8042.clone(),
            ),
            (
                "ACPI PM",
                layout::ACPI_SLEEP_CONTROL_PORT,
                ACPI_PM_PORT_LEN,
                legacy.acpi_pm.clone(),
            ),
            (
                "pvpanic",
                layout::PVPANIC_PORT,
                PVPANIC_PORT_LEN,
                legacy.pvpanic.clone(),
            ),
        ];
        for (name, port, len, dev) in devices {
            self.attach_pio(name, port, len, dev)?;
        }
        self.guest_devices.push(GuestDevice::Serial {
            port: layout::COM1_PORT,
            irq: layout::COM1_IRQ,
        });
        self.guest_devices.push(GuestDevice::PvPanic {
            port: layout::PVPANIC_PORT,
        });
        Ok((legacy, exits))
    }

    /// Attaches a virtio device on virtio-mmio: the next window and IRQ line, an irqfd, one
    /// ioeventfd per queue at QueueNotify (datamatch = queue index), the transport on the MMIO
    /// bus, and the device's I/O thread. `name` names the thread (`ember-<name>`) and errors.
    pub fn attach_virtio<D: VirtioDevice + 'static>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        name: &str,
        device: D,
        ctl: &Arc<VmControl>,
    ) -> Result<MmioDeviceInfo, DeviceError> {
        let transport =
            MmioTransport::new(mem.clone(), device).map_err(|source| DeviceError::Create {
                device: name.into(),
                what: "virtio-mmio transport",
                source,
            })?;
        self.attach_transport(vm, name, transport, None, ctl)
    }

    /// Attaches the virtio devices of a snapshot, each rebuilt by its type from its state, at
    /// the places they had. `dir` is the state file's directory (a disk's captured overlay is
    /// there); `vsock_uds` is where the vsock device listens instead of its saved path. Returns
    /// the vsock device's socket file guard.
    pub fn restore_virtio(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        saved: &[VirtioSnapshot],
        ctl: &Arc<VmControl>,
        dir: &Path,
        vsock_uds: Option<PathBuf>,
    ) -> Result<Option<ListenerFile>, DeviceError> {
        use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_VSOCK};
        let mut vsock_file = None;
        let mut vsock_uds = Some(vsock_uds);
        for dev in saved {
            let err = restore_err(&dev.name);
            let place = MmioDeviceInfo {
                addr: dev.addr,
                len: dev.len,
                irq: dev.irq,
            };
            match dev.transport.device_type {
                VIRTIO_ID_BLOCK => {
                    let mut state: BlockState =
                        ember_devices::state::from_bytes(&dev.transport.device)
                            .map_err(|e| err(&e))?;
                    // Only a file name: the capture is wherever the snapshot is now.
                    if let Some(name) = &state.captured {
                        if name.components().count() != 1 {
                            return Err(err(&format!(
                                "the captured overlay {} is not a file name",
                                name.display()
                            )));
                        }
                        state.captured = Some(dir.join(name));
                    }
                    let block = Block::restore((), &state).map_err(|e| err(&e))?;
                    let transport = MmioTransport::restore((mem.clone(), block), &dev.transport)
                        .map_err(|e| err(&e))?;
                    self.attach_transport(vm, &dev.name, transport, Some(place), ctl)?;
                }
                VIRTIO_ID_VSOCK => {
                    let Some(uds) = vsock_uds.take() else {
                        return Err(err(&"a second vsock device; a machine has one at most"));
                    };
                    let state: VsockState = ember_devices::state::from_bytes(&dev.transport.device)
                        .map_err(|e| err(&e))?;
                    let mut vsock = Vsock::restore(uds, &state).map_err(|e| err(&e))?;
                    vsock_file = vsock.take_listener_file();
                    let transport = MmioTransport::restore((mem.clone(), vsock), &dev.transport)
                        .map_err(|e| err(&e))?;
                    self.attach_transport(vm, &dev.name, transport, Some(place), ctl)?;
                }
                other => {
                    return Err(err(&format!(
                        "virtio device type {other} is not one Ember has"
                    )))
                }
            }
        }
        Ok(vsock_file)
    }

    fn attach_transport<D: VirtioDevice + 'static>(
        &mut self,
        vm: &VmFd,
        name: &str,
        transport: MmioTransport<D>,
        expected: Option<MmioDeviceInfo>,
        ctl: &Arc<VmControl>,
    ) -> Result<MmioDeviceInfo, DeviceError> {
        let resources = |source| DeviceError::Resources {
            device: name.into(),
            source,
        };
        let irq = self.resources.allocate_irq().map_err(resources)?;
        let addr = self
            .resources
            .allocate_mmio(MMIO_WINDOW)
            .map_err(resources)?;
        let info = MmioDeviceInfo {
            addr,
            len: MMIO_WINDOW,
            irq,
        };
        // A restored guest's drivers know their devices where they were: the same grants in the
        // same order give the same places, and anything else is refused.
        if let Some(saved) = expected {
            if saved != info {
                return Err(DeviceError::Moved {
                    device: name.into(),
                    saved: saved.addr,
                    saved_irq: saved.irq,
                    given: info.addr,
                    given_irq: info.irq,
                });
            }
        }
        let kvm = |what, source| DeviceError::Kvm {
            device: name.into(),
            what,
            source,
        };
        let create = |what, source| DeviceError::Create {
            device: name.into(),
            what,
            source,
        };
        let extra = transport.device().io_subscribers();
        // Each device's thread is filtered to what its kind of I/O needs.
        let kind = match transport.device().device_type() {
            virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK => crate::seccomp::ThreadKind::Vsock,
            _ => crate::seccomp::ThreadKind::Disk,
        };
        vm.register_irqfd(transport.irq_evt(), irq)
            .map_err(|e| kvm("KVM_IRQFD", e))?;
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(addr + NOTIFY_OFFSET),
                queue as u32,
            )
            .map_err(|e| kvm("KVM_IOEVENTFD", e))?;
        }
        // Requests are served by the queue handler on the device's thread; the transport on the
        // bus only answers register accesses, which therefore never wait for the device's I/O.
        let handler = transport
            .queue_handler()
            .map_err(|e| create("queue handler", e))?;
        let transport = Arc::new(Mutex::new(transport));
        let on_bus: Arc<Mutex<dyn BusDevice>> = transport.clone();
        self.mmio
            .insert(addr, MMIO_WINDOW, on_bus)
            .map_err(|source| DeviceError::Bus {
                device: name.into(),
                source,
            })?;
        let mut subscribers: Vec<Subscriber> = vec![Arc::new(Mutex::new(handler))];
        subscribers.extend(extra);
        spawn_io_thread(name, subscribers, ctl.clone(), self.seccomp, kind)
            .map_err(|e| create("I/O thread", e))?;
        self.guest_devices.push(GuestDevice::VirtioMmio(info));
        self.virtio.push(VirtioSlot {
            name: name.into(),
            info,
            transport,
        });
        Ok(info)
    }

    /// Every device's state, for a snapshot of a paused VM. A virtio device's state is taken
    /// under its request side's lock, so no request is half done in it. Files of a device's own
    /// (a disk's captured tmp overlay) go to `<files>.<device name>.<what>`; see
    /// [`DeviceManager::own_files`].
    pub fn save(
        &self,
        legacy: &LegacyDevices,
        files: &Path,
    ) -> Result<DevicesSnapshot, DeviceError> {
        fn save<T: Persist>(name: &str, dev: &Mutex<T>) -> Result<T::State, DeviceError> {
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .save()
                .map_err(|e| DeviceError::Save {
                    device: name.into(),
                    reason: e.to_string(),
                })
        }
        let mut virtio = Vec::with_capacity(self.virtio.len());
        for v in &self.virtio {
            let transport = v
                .transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save_state(&device_files(files, &v.name))
                .map_err(|e| DeviceError::Save {
                    device: v.name.clone(),
                    reason: e.to_string(),
                })?;
            virtio.push(VirtioSnapshot {
                name: v.name.clone(),
                addr: v.info.addr,
                len: v.info.len,
                irq: v.info.irq,
                transport,
            });
        }
        Ok(DevicesSnapshot {
            serial: save("COM1", &legacy.serial)?,
            cmos: save("CMOS RTC", &legacy.cmos)?,
            i8042: save("i8042", &legacy.i8042)?,
            acpi_pm: save("ACPI PM", &legacy.acpi_pm)?,
            pvpanic: save("pvpanic", &legacy.pvpanic)?,
            virtio,
        })
    }
}

impl DeviceManager {
    /// For a restored VM, once its vCPUs' state is set: interrupts its virtio devices raised
    /// before then (and that the restored local APICs dropped) are raised again.
    pub fn resignal_virtio(&self) {
        for v in &self.virtio {
            v.transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .resignal();
        }
    }

    /// The files a snapshot at `files` may have made for its devices (whether it did or not),
    /// to remove them when the snapshot fails.
    pub fn own_files(&self, files: &Path) -> Vec<PathBuf> {
        self.virtio
            .iter()
            .map(|v| {
                let mut p = device_files(files, &v.name).into_os_string();
                p.push(".overlay");
                p.into()
            })
            .collect()
    }
}

fn device_files(files: &Path, device: &str) -> PathBuf {
    let mut p = files.as_os_str().to_owned();
    p.push(format!(".{device}"));
    p.into()
}

/// A device's own event loop, on its own thread: queue notifications and the device's other
/// event sources in, requests served, interrupts raised. Ends with the process.
fn spawn_io_thread(
    name: &str,
    subscribers: Vec<Subscriber>,
    ctl: Arc<VmControl>,
    seccomp: bool,
    kind: crate::seccomp::ThreadKind,
) -> std::io::Result<()> {
    let mut em: EventManager<Subscriber> =
        EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    for s in subscribers {
        em.add_subscriber(s);
    }
    let what = name.to_string();
    std::thread::Builder::new()
        .name(format!("ember-{name}"))
        .spawn(move || {
            crate::signals::block_in_this_thread();
            if seccomp {
                if let Err(e) = crate::seccomp::install(kind) {
                    ctl.request_exit(ExitReason::VcpuFailed(format!("{what}: {e}")));
                    return;
                }
            }
            loop {
                if let Err(e) = em.run() {
                    ctl.request_exit(ExitReason::VcpuFailed(format!("{what}: event loop: {e:?}")));
                    return;
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use ember_devices::virtio::{ActivateError, Interrupt, QueueServer};
    use event_manager::{EventOps, EventSet, Events};
    use kvm_ioctls::Kvm;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::disks::DiskError;

    fn vm_with_memory() -> (VmFd, GuestMemoryMmap) {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        (vm, mem)
    }

    fn disks(n: usize) -> (Vec<TempFile>, Vec<ember_devices::virtio::DiskConfig>) {
        let files: Vec<TempFile> = (0..n)
            .map(|_| {
                let f = TempFile::new().unwrap();
                f.as_file().set_len(1 << 20).unwrap();
                f
            })
            .collect();
        let configs = files
            .iter()
            .map(|f| ember_devices::virtio::DiskConfig {
                path: f.as_path().to_path_buf(),
                readonly: false,
                id: None,
                overlay: None,
            })
            .collect();
        (files, configs)
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// The DSDT the guest would read for this device manager's devices.
    fn dsdt_of(dm: &DeviceManager) -> Vec<u8> {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = ember_boot::acpi::create_acpi_tables(&mem, 1, dm.guest_devices()).unwrap();
        let read = |addr: u64, len: usize| {
            let mut b = vec![0u8; len];
            mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            b
        };
        let rsdp = read(rsdp.0, 36);
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = read(xsdt_addr, u32_at(&read(xsdt_addr, 8), 4) as usize);
        let fadt_addr = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let fadt = read(fadt_addr, 148);
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        read(dsdt_addr, u32_at(&read(dsdt_addr, 8), 4) as usize)
    }

    /// ACPI's Memory32Fixed descriptor (read-write) for a window, as the DSDT encodes it.
    fn memory32_fixed(addr: u64, len: u64) -> Vec<u8> {
        let mut d = vec![0x86, 9, 0, 1];
        d.extend((addr as u32).to_le_bytes());
        d.extend((len as u32).to_le_bytes());
        d
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn the_dsdt_the_command_line_and_the_bus_describe_the_same_devices() {
        let (vm, mem) = vm_with_memory();
        let ctl = Arc::new(VmControl::new().unwrap());
        let mut dm = DeviceManager::new(false).unwrap();
        dm.attach_legacy(&vm, Box::new(std::io::sink()), None)
            .unwrap();
        let (_files, configs) = disks(3);
        crate::disks::attach_disks(&mut dm, &vm, &mem, &configs, &ctl).unwrap();

        let dsdt = dsdt_of(&dm);
        let slots: Vec<MmioDeviceInfo> = dm.virtio_devices().iter().map(|v| v.info).collect();
        assert_eq!(slots.len(), 3);
        let words = dm.cmdline_words();
        for (i, slot) in slots.iter().enumerate() {
            // Each window and line is given once.
            for other in &slots[i + 1..] {
                assert!(slot.addr + slot.len <= other.addr || other.addr + other.len <= slot.addr);
                assert_ne!(slot.irq, other.irq);
            }
            assert!(
                contains(&dsdt, &memory32_fixed(slot.addr, slot.len)),
                "the DSDT lacks {slot:?}"
            );
            assert_eq!(words[i], slot.cmdline_word());
            // The bus answers at the window with a virtio-mmio block device: "virt", version 2,
            // device ID 2.
            let mut reg = [0u8; 4];
            assert!(dm.mmio.read(slot.addr, &mut reg));
            assert_eq!(u32::from_le_bytes(reg), 0x7472_6976);
            assert!(dm.mmio.read(slot.addr + 8, &mut reg));
            assert_eq!(u32::from_le_bytes(reg), 2);
        }
        // Nothing answers past the last window.
        let mut reg = [0u8; 4];
        let end = slots.iter().map(|s| s.addr + s.len).max().unwrap();
        assert!(!dm.mmio.read(end, &mut reg));
        // The UART the DSDT names is on the port bus (its scratch register keeps a byte).
        assert!(contains(&dsdt, b"PNP0501") || contains(&dsdt, &[0x41, 0xd0, 0x05, 0x01]));
        assert!(dm.pio.write(u64::from(layout::COM1_PORT) + 7, &[0x5a]));
        let mut b = [0u8; 1];
        assert!(dm.pio.read(u64::from(layout::COM1_PORT) + 7, &mut b));
        assert_eq!(b[0], 0x5a);
        assert_eq!(
            dm.guest_devices().len(),
            2 + slots.len(),
            "COM1, pvpanic and the disks"
        );
    }

    #[test]
    fn the_twentieth_disk_is_refused_with_a_clear_error() {
        let (vm, mem) = vm_with_memory();
        let ctl = Arc::new(VmControl::new().unwrap());
        let mut dm = DeviceManager::new(false).unwrap();
        let (_files, configs) = disks(20);
        let err = crate::disks::attach_disks(&mut dm, &vm, &mem, &configs, &ctl).unwrap_err();
        let DiskError::Attach { path, .. } = &err else {
            panic!("unexpected error {err:?}");
        };
        assert_eq!(path, &configs[19].path);
        let text = crate::error_line(&err);
        assert!(
            text.contains("no IRQ line for a virtio device left: the machine has 19"),
            "{text}"
        );
        assert_eq!(dm.virtio_devices().len(), 19);
    }

    /// A virtio device type with an event source of its own, to show what the device manager
    /// gives one: its events are served on the device's I/O thread.
    struct Pinger {
        evt: EventFd,
        seen: Arc<AtomicUsize>,
    }

    struct PingSource {
        evt: EventFd,
        seen: Arc<AtomicUsize>,
    }

    impl MutEventSubscriber for PingSource {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.evt.read();
            self.seen.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct NoQueues;
    impl QueueServer for NoQueues {
        fn serve(&self, _: usize) -> bool {
            false
        }
        fn needs_reset(&self) -> bool {
            false
        }
    }

    impl VirtioDevice for Pinger {
        fn device_type(&self) -> u32 {
            // VIRTIO_ID_ENTROPY, any type will do.
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            1 << 32
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            _: Vec<Queue>,
            _: Arc<Interrupt>,
            _: u64,
        ) -> Result<(), ActivateError> {
            Ok(())
        }
        fn process_queue(&mut self, _: usize) {}
        fn reset(&mut self) {}
        fn queue_server(&self) -> Arc<dyn QueueServer> {
            Arc::new(NoQueues)
        }
        fn io_subscribers(&self) -> Vec<Subscriber> {
            vec![Arc::new(Mutex::new(PingSource {
                evt: self.evt.try_clone().unwrap(),
                seen: self.seen.clone(),
            }))]
        }
    }

    #[test]
    fn a_device_type_is_one_attach_call_and_its_event_sources_are_served() {
        let (vm, mem) = vm_with_memory();
        let ctl = Arc::new(VmControl::new().unwrap());
        let mut dm = DeviceManager::new(false).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let device = Pinger {
            evt: evt.try_clone().unwrap(),
            seen: seen.clone(),
        };
        let info = dm.attach_virtio(&vm, &mem, "pinger", device, &ctl).unwrap();
        assert_eq!(info.addr, layout::VIRTIO_MMIO_START);
        assert_eq!(dm.guest_devices(), &[GuestDevice::VirtioMmio(info)]);
        let mut reg = [0u8; 4];
        assert!(dm.mmio.read(info.addr + 8, &mut reg));
        assert_eq!(u32::from_le_bytes(reg), 4);
        evt.write(1).unwrap();
        let start = std::time::Instant::now();
        while seen.load(Ordering::SeqCst) == 0 {
            assert!(start.elapsed() < std::time::Duration::from_secs(5));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

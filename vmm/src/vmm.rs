//! Building a microVM, in boot order: check KVM, create the VM and its irqchip, map guest memory,
//! load the kernel, attach devices, describe the machine to the guest, create the vCPUs; then run
//! until the guest resets or powers off (or a signal or the console escape ends it).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_boot::kernel::{self, KernelError, LoadedKernel};
use ember_boot::layout::{self, MmioDeviceInfo};
use ember_boot::params::{self, BootSetup};
use ember_devices::acpi_pm::{AcpiPm, ACPI_PM_PORT_LEN};
use ember_devices::cmos::{Cmos, CMOS_PORT_LEN};
use ember_devices::i8042::{I8042, I8042_PORT_LEN};
use ember_devices::pvpanic::{PvPanic, PVPANIC_PORT_LEN};
use ember_devices::serial::SerialDevice;
use ember_devices::{Bus, EventFdTrigger, SharedDevice};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{self, SerialMode, VmConfig};
use crate::console::{ConsoleOut, OutputDrain, RawTerminal};
use crate::event_loop::{ConsoleInput, ExitWatcher};
use crate::host::{self, HostKind};
use crate::timeline::{self, Phase};
use crate::vcpu::{self, ExitReason, VcpuThread, VmControl};

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and do you have access to it?)")]
    OpenKvm(#[source] vmm_sys_util::errno::Error),
    #[error("/dev/kvm lacks a capability Ember needs: {0}")]
    MissingCap(&'static str),
    #[error("--cpus {asked}: this host's KVM allows at most {max} vCPUs")]
    TooManyCpus { asked: u8, max: usize },
    #[error("--memory {asked} MiB: more than this host's {host} MiB of RAM")]
    MemoryTooLarge { asked: u64, host: u64 },
    #[error("cannot create the VM: {0}")]
    CreateVm(#[source] vmm_sys_util::errno::Error),
    #[error("KVM set-up failed at {0}: {1}")]
    KvmSetup(&'static str, #[source] vmm_sys_util::errno::Error),
    #[error("cannot allocate {size} MiB of guest memory: {source}")]
    GuestMemory {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel {}: {source}", path.display())]
    Kernel {
        path: PathBuf,
        #[source]
        source: KernelError,
    },
    #[error("initramfs {}: {source}", path.display())]
    Initramfs {
        path: PathBuf,
        #[source]
        source: KernelError,
    },
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("setting up the guest's boot state: {0}")]
    Boot(#[source] params::BootError),
    #[error("setting up vCPU {0}: {1}")]
    VcpuSetup(u8, #[source] ember_boot::cpu::CpuError),
    #[error("{0}")]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Disk(#[from] crate::disks::DiskError),
    #[error("device set-up: {0}")]
    Devices(String),
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
    #[error("the guest stopped: {0}")]
    GuestFailed(String),
    #[error(transparent)]
    Seccomp(crate::seccomp::SeccompError),
}

type Result<T> = std::result::Result<T, VmmError>;

/// Capabilities Ember's set-up uses, with the name a user can look up.
const REQUIRED_CAPS: [(Cap, &str); 7] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

/// Checks /dev/kvm before anything else, so a host that cannot run Ember says so first.
pub fn open_kvm() -> Result<Kvm> {
    let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(VmmError::MissingCap(name));
        }
    }
    if HostKind::detect() == HostKind::Pvm {
        eprintln!(
            "ember: warning: /dev/kvm is kvm_pvm (KVM in software, no hardware virtualization): \
             guest kernel (ring-0) code is emulated, thousands of times slower; guest user \
             (ring-3) code runs at native speed. Ember adds the kernel words this host needs \
             (EMBER_LOG=info lists them)"
        );
    }
    Ok(kvm)
}

fn host_ram() -> Option<u64> {
    // SAFETY: sysinfo fills the struct it is given.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    (unsafe { libc::sysinfo(&mut info) } == 0).then(|| info.totalram * u64::from(info.mem_unit))
}

fn create_vm(kvm: &Kvm) -> Result<VmFd> {
    let vm = kvm.create_vm().map_err(VmmError::CreateVm)?;
    vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(|e| VmmError::KvmSetup("KVM_SET_TSS_ADDR", e))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
        .map_err(|e| VmmError::KvmSetup("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    Ok(vm)
}

/// The in-kernel PIC/IOAPIC/LAPIC and PIT. Created after the memory slots: a slot added once
/// they exist waits for an SRCU grace period (kvm_swap_active_memslots), which on a loaded
/// kvm_pvm host cost 4-8 ms per start; Firecracker uses the same order.
fn create_irqchip(vm: &VmFd) -> Result<()> {
    vm.create_irq_chip()
        .map_err(|e| VmmError::KvmSetup("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmmError::KvmSetup("KVM_CREATE_PIT2", e))?;
    Ok(())
}

fn create_memory(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(size)
        .into_iter()
        .map(|(base, len)| (GuestAddress(base), len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| VmmError::GuestMemory {
        size: size >> 20,
        source,
    })?;
    for (slot, region) in GuestMemoryBackend::iter(&mem).enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmmError::Devices(format!("guest memory region: {e}")))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region stays mapped for the life of the VM: `mem` outlives every vCPU.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| VmmError::KvmSetup("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(mem)
}

fn open_read(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, so that a FIFO is refused below instead of blocking the open until a writer
    // comes; reads of regular files and block devices ignore the flag.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| VmmError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let kind = f
        .metadata()
        .ok()
        .and_then(|m| crate::disks::unusable_file_kind(m.file_type()));
    if let Some(kind) = kind {
        return Err(VmmError::Open {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, format!("is {kind}")),
        });
    }
    Ok(f)
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    cfg: &VmConfig,
) -> Result<(LoadedKernel, Option<kernel::InitrdInfo>)> {
    let mut kfile = open_read(&cfg.kernel)?;
    let loaded = kernel::load_kernel(mem, &mut kfile).map_err(|source| VmmError::Kernel {
        path: cfg.kernel.clone(),
        source,
    })?;
    let initrd = match &cfg.initramfs {
        Some(path) => {
            let mut f = open_read(path)?;
            Some(
                kernel::load_initramfs(mem, &mut f, &loaded, cfg.memory).map_err(|source| {
                    VmmError::Initramfs {
                        path: path.clone(),
                        source,
                    }
                })?,
            )
        }
        None => None,
    };
    Ok((loaded, initrd))
}

fn serial_sink(
    cfg: &VmConfig,
    ctl: &Arc<VmControl>,
) -> Result<(Box<dyn Write + Send>, OutputDrain)> {
    let sink: Box<dyn Write + Send> = match &cfg.serial {
        SerialMode::Stdio => Box::new(ConsoleOut::stdout().map_err(|source| VmmError::Open {
            path: "stdout".into(),
            source,
        })?),
        SerialMode::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmmError::Open {
                    path: path.clone(),
                    source,
                })?,
        ),
        SerialMode::Null => Box::new(io::sink()),
    };
    let (out, drain) = ConsoleOut::new(sink, cfg.ready_marker.as_deref(), ctl.clone(), cfg.seccomp)
        .map_err(|e| VmmError::Devices(format!("console output thread: {e}")))?;
    Ok((Box::new(out), drain))
}

/// How long Ember waits at exit for a stalled console reader to take the guest's last output
/// when a signal stopped it (the user wants it gone); a guest that ended by itself gets its
/// output written for as long as the reader takes, until a signal comes.
const OUTPUT_DRAIN_ON_SIGNAL: Duration = Duration::from_millis(300);

// The FADT's CENTURY field and the device must name the same CMOS byte.
const _: () = assert!(layout::CMOS_CENTURY_INDEX == ember_devices::cmos::CMOS_CENTURY);

/// Legacy devices on the port I/O bus; returns the serial (the event loop feeds it input) and the
/// eventfds that end the VM.
struct LegacyDevices {
    serial: Arc<Mutex<SerialDevice>>,
    reset: EventFd,
    poweroff: EventFd,
    panicked: EventFd,
    output: OutputDrain,
}

fn setup_legacy_devices(
    vm: &VmFd,
    pio: &mut Bus,
    cfg: &VmConfig,
    ctl: &Arc<VmControl>,
) -> Result<LegacyDevices> {
    let err = |what: &str, e: &dyn std::fmt::Display| VmmError::Devices(format!("{what}: {e}"));
    let serial_irq = EventFdTrigger::new().map_err(|e| err("serial eventfd", &e))?;
    vm.register_irqfd(&serial_irq, layout::COM1_IRQ)
        .map_err(|e| VmmError::KvmSetup("KVM_IRQFD (COM1)", e))?;
    let (sink, output) = serial_sink(cfg, ctl)?;
    let serial = Arc::new(Mutex::new(
        SerialDevice::new(serial_irq, sink).map_err(|e| err("serial", &e))?,
    ));
    let reset = EventFdTrigger::new().map_err(|e| err("reset eventfd", &e))?;
    let poweroff = EventFdTrigger::new().map_err(|e| err("poweroff eventfd", &e))?;
    let panicked = EventFdTrigger::new().map_err(|e| err("pvpanic eventfd", &e))?;
    // The event loop watches the same eventfds the devices raise.
    let reset_watch = EventFd::try_clone(&reset).map_err(|e| err("reset eventfd", &e))?;
    let poweroff_watch = EventFd::try_clone(&poweroff).map_err(|e| err("poweroff eventfd", &e))?;
    let panicked_watch = EventFd::try_clone(&panicked).map_err(|e| err("pvpanic eventfd", &e))?;

    let devices: [(u16, u64, SharedDevice); 5] = [
        (layout::COM1_PORT, 8, serial.clone()),
        (
            layout::CMOS_PORT,
            CMOS_PORT_LEN,
            Arc::new(Mutex::new(Cmos::new())),
        ),
        (
            layout::I8042_PORT,
            I8042_PORT_LEN,
            Arc::new(Mutex::new(I8042::new(reset))),
        ),
        (
            layout::ACPI_SLEEP_CONTROL_PORT,
            ACPI_PM_PORT_LEN,
            Arc::new(Mutex::new(AcpiPm::new(poweroff, layout::ACPI_S5_SLP_TYP))),
        ),
        (
            layout::PVPANIC_PORT,
            PVPANIC_PORT_LEN,
            Arc::new(Mutex::new(PvPanic::new(panicked))),
        ),
    ];
    for (port, len, dev) in devices {
        pio.insert(u64::from(port), len, dev)
            .map_err(|e| err("port I/O bus", &e))?;
    }
    Ok(LegacyDevices {
        serial,
        reset: reset_watch,
        poweroff: poweroff_watch,
        panicked: panicked_watch,
        output,
    })
}

/// The kernel words this host needs that the user's command line does not set already.
fn host_words(user_cmdline: &str, vcpu: Option<&kvm_ioctls::VcpuFd>) -> Vec<String> {
    if HostKind::detect() == HostKind::HardwareKvm {
        return Vec::new();
    }
    let tsc_khz = vcpu.and_then(|v| v.get_tsc_khz().ok());
    host::kernel_words(HostKind::Pvm, tsc_khz)
        .into_iter()
        .filter(|w| {
            let theirs = config::has_param(user_cmdline, w.key());
            if theirs {
                log::info!(
                    "kvm_pvm: the command line sets {} already; not adding {}",
                    w.key(),
                    w.word
                );
            } else {
                log::info!("kvm_pvm: adding {}: {}", w.word, w.why);
            }
            !theirs
        })
        .map(|w| w.word)
        .collect()
}

/// Builds the VM from `cfg` and runs it to the end. Returns why the guest stopped.
pub fn run(cfg: &VmConfig) -> Result<ExitReason> {
    let kvm = open_kvm()?;
    let max_cpus = kvm.get_max_vcpus();
    if usize::from(cfg.cpus) > max_cpus {
        return Err(VmmError::TooManyCpus {
            asked: cfg.cpus,
            max: max_cpus,
        });
    }
    if let Some(host) = host_ram() {
        if cfg.memory > host {
            return Err(VmmError::MemoryTooLarge {
                asked: cfg.memory >> 20,
                host: host >> 20,
            });
        }
    }
    let vm = create_vm(&kvm)?;
    {
        use std::os::fd::AsRawFd;
        // Not fatal: without the reaper Ember only exits later.
        if let Err(e) = crate::reaper::spawn(vm.as_raw_fd(), cfg.seccomp) {
            log::warn!("VM teardown will delay Ember's exit: cannot fork the reaper: {e}");
        }
    }
    timeline::mark(Phase::VmCreated);

    let mem = create_memory(&vm, cfg.memory)?;
    create_irqchip(&vm)?;
    timeline::mark(Phase::MemoryMapped);

    let (loaded, initrd) = load_kernel(&mem, cfg)?;
    timeline::mark(Phase::KernelLoaded);

    let ctl = Arc::new(VmControl::new().map_err(|e| VmmError::Devices(e.to_string()))?);
    let mut event_manager: EventManager<Subscriber> =
        EventManager::new().map_err(VmmError::EventLoop)?;
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let legacy = setup_legacy_devices(&vm, &mut pio, cfg, &ctl)?;
    let virtio = crate::disks::attach_disks(&vm, &mut mmio, &mem, &cfg.disks, &ctl, cfg.seccomp)?;

    // vCPUs exist before the command line is written: the TSC frequency comes from one.
    let mut vcpus = Vec::with_capacity(usize::from(cfg.cpus));
    for id in 0..cfg.cpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| VmmError::KvmSetup("KVM_CREATE_VCPU", e))?;
        vcpus.push(fd);
    }
    let mut words = host_words(&cfg.cmdline, vcpus.first());
    words.extend(virtio.iter().map(MmioDeviceInfo::cmdline_word));
    let cmdline = config::full_cmdline(&cfg.cmdline, &words)?;
    let setup = BootSetup {
        mem_size: cfg.memory,
        cmdline: &cmdline,
        initrd,
        cpus: cfg.cpus,
        virtio_devices: &virtio,
    };
    params::configure_system(&mem, &loaded, &setup).map_err(VmmError::Boot)?;

    let signal_evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Devices(e.to_string()))?;
    crate::signals::install(&signal_evt);
    let watcher = ExitWatcher::new(
        ctl.clone(),
        legacy.reset,
        legacy.poweroff,
        legacy.panicked,
        signal_evt,
    );
    event_manager.add_subscriber(Arc::new(Mutex::new(watcher)));

    let terminal = match cfg.serial {
        SerialMode::Stdio => RawTerminal::enter().unwrap_or(None),
        _ => None,
    };
    if cfg.serial == SerialMode::Stdio {
        let input = ConsoleInput::new(legacy.serial.clone(), ctl.clone(), terminal.is_some())
            .map_err(|e| VmmError::Devices(format!("console: {e}")))?;
        event_manager.add_subscriber(Arc::new(Mutex::new(input)));
    }

    let host_cpu = ember_boot::cpu::HostCpu::query(&kvm).map_err(|e| VmmError::VcpuSetup(0, e))?;
    let policy = ember_boot::cpu::CpuidPolicy {
        hypercalls: HostKind::detect() == HostKind::HardwareKvm,
        tsc_deadline: host_cpu.tsc_deadline,
    };
    for (id, fd) in (0..cfg.cpus).zip(&vcpus) {
        ember_boot::cpu::configure_vcpu(&host_cpu, fd, id, cfg.cpus, &loaded, &mem, policy)
            .map_err(|e| VmmError::VcpuSetup(id, e))?;
    }
    timeline::mark(Phase::DevicesReady);

    vcpu::install_kick_handler()?;
    let mut threads = Vec::with_capacity(vcpus.len());
    for (id, fd) in vcpus.into_iter().enumerate() {
        threads.push(VcpuThread::spawn(
            id as u8,
            fd,
            pio.clone(),
            mmio.clone(),
            ctl.clone(),
            cfg.seccomp,
        )?);
    }

    // The main thread's filter goes on before the event loop serves anything the guest controls.
    let mut seccomp_error = if cfg.seccomp {
        crate::seccomp::install(crate::seccomp::ThreadKind::Main).err()
    } else {
        None
    };
    let result = loop {
        if let Some(e) = seccomp_error.take() {
            break Err(VmmError::Seccomp(e));
        }
        if let Some(reason) = ctl.reason() {
            break Ok(reason);
        }
        if let Err(e) = event_manager.run() {
            break Err(VmmError::EventLoop(e));
        }
    };
    if result.is_err() {
        ctl.request_exit(ExitReason::VcpuFailed("event loop failed".into()));
    }
    for t in threads {
        t.stop(Duration::from_secs(1));
    }
    let stopped_by_signal = matches!(result, Ok(ExitReason::Signal(_)));
    let limit = if stopped_by_signal {
        OUTPUT_DRAIN_ON_SIGNAL
    } else {
        Duration::MAX
    };
    let signalled = || crate::signals::first().is_some();
    if !legacy.output.wait(limit, signalled) {
        log::info!("console: the guest's last output was not all written (the reader stalled)");
    }
    let dropped = legacy.output.dropped();
    if dropped > 0 {
        log::warn!(
            "console: {dropped} bytes of guest output were dropped: the reader did not keep up"
        );
    }
    if let Some(t) = &terminal {
        t.restore();
    }
    match result? {
        ExitReason::VcpuFailed(what) => Err(VmmError::GuestFailed(what)),
        other => Ok(other),
    }
}

//! Building a microVM, in boot order: check KVM, create the VM and its irqchip, map guest memory,
//! load the kernel, attach devices, describe the machine to the guest, create the vCPUs; then run
//! until the guest resets or powers off (or a signal or the console escape ends it).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ember_boot::kernel::{self, KernelError, LoadedKernel};
use ember_boot::layout;
use ember_boot::params::{self, BootSetup};
use event_manager::{EventManager, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{self, RunOptions, SerialMode, VmConfig};
use crate::console::{ConsoleOut, OutputDrain, RawTerminal};
pub use crate::device_manager::Subscriber;
use crate::device_manager::{DeviceManager, ExitEvents, LegacyDevices};
use crate::event_loop::{ConsoleInput, ExitWatcher};
use crate::host::{self, HostKind};
use crate::snapshot::{Machine, Snapshot};
use crate::timeline::{self, Phase};
use crate::vcpu::{self, ExitReason, PendingVcpu, VcpuThread, VmControl};
use crate::vstate::{SaveContext, VcpuState, VmState};

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
    #[error("{0}")]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Disk(#[from] crate::disks::DiskError),
    #[error(transparent)]
    Device(#[from] crate::device_manager::DeviceError),
    #[error(transparent)]
    Vsock(#[from] ember_devices::virtio::vsock::VsockError),
    #[error("device set-up: {0}")]
    Devices(String),
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
    #[error("the guest stopped: {0}")]
    GuestFailed(String),
    #[error(transparent)]
    Seccomp(crate::seccomp::SeccompError),
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    #[error(transparent)]
    SnapshotFile(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    MemoryFile(#[from] crate::memory_file::MemoryFileError),
    #[error("cannot restore the snapshot: {0}")]
    Restore(String),
    #[error("cannot take the snapshot: {0}")]
    Snapshot(String),
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
    warn_about_host();
    Ok(kvm)
}

/// Says once per process what kind of KVM this is, when it is not hardware KVM. A process that
/// forks a VM's builder calls it first, so the child inherits "said" and one run warns once.
pub fn warn_about_host() {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        if HostKind::detect() == HostKind::Pvm {
            eprintln!(
                "ember: warning: /dev/kvm is kvm_pvm (KVM in software, no hardware \
                 virtualization): guest kernel (ring-0) code is emulated, thousands of times \
                 slower; guest user (ring-3) code runs at native speed. Ember adds the kernel \
                 words this host needs (EMBER_LOG=info lists them)"
            );
        }
    });
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

/// The in-kernel PIC/IOAPIC/LAPIC. Created after the memory slots: a slot added once they exist
/// waits for an SRCU grace period (kvm_swap_active_memslots), which on a loaded kvm_pvm host cost
/// 4-8 ms per start; Firecracker uses the same order. The vCPUs come after it (KVM refuses an
/// irqchip once a vCPU exists).
fn create_irqchip(vm: &VmFd) -> Result<()> {
    vm.create_irq_chip()
        .map_err(|e| VmmError::KvmSetup("KVM_CREATE_IRQCHIP", e))
}

/// The in-kernel PIT, which needs the irqchip but not to come before the vCPUs: a boot creates
/// it while the vCPU threads configure their vCPUs (it starts a kernel thread and waits for an
/// SRCU grace period, ~0.1-0.3 ms on a kvm_pvm host).
fn create_pit(vm: &VmFd) -> Result<()> {
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmmError::KvmSetup("KVM_CREATE_PIT2", e))?;
    Ok(())
}

/// Guest RAM as Ember's process maps it; KVM learns of it in `register_memory`.
fn map_memory(size: u64) -> Result<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(size)
        .into_iter()
        .map(|(base, len)| (GuestAddress(base), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| VmmError::GuestMemory {
        size: size >> 20,
        source,
    })
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in GuestMemoryBackend::iter(mem).enumerate() {
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
    Ok(())
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

/// The kernel and initramfs, opened before the VM is created: a wrong path is refused without
/// creating (and tearing down) a VM for nothing.
struct BootFiles {
    kernel: File,
    initramfs: Option<File>,
}

fn open_boot_files(cfg: &VmConfig) -> Result<BootFiles> {
    Ok(BootFiles {
        kernel: open_read(&cfg.kernel)?,
        initramfs: cfg.initramfs.as_deref().map(open_read).transpose()?,
    })
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    cfg: &VmConfig,
    files: BootFiles,
) -> Result<(LoadedKernel, Option<kernel::InitrdInfo>)> {
    let BootFiles {
        kernel: mut kfile,
        initramfs,
    } = files;
    let loaded = kernel::load_kernel(mem, &mut kfile).map_err(|source| VmmError::Kernel {
        path: cfg.kernel.clone(),
        source,
    })?;
    let initrd = initramfs
        .zip(cfg.initramfs.as_ref())
        .map(|(mut f, path)| {
            kernel::load_initramfs(mem, &mut f, &loaded, cfg.memory).map_err(|source| {
                VmmError::Initramfs {
                    path: path.clone(),
                    source,
                }
            })
        })
        .transpose()?;
    Ok((loaded, initrd))
}

fn serial_sink(
    opts: &RunOptions,
    ctl: &Arc<VmControl>,
) -> Result<(Box<dyn Write + Send>, OutputDrain)> {
    let sink: Box<dyn crate::console::Sink> = match &opts.serial {
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
    let (out, drain) = ConsoleOut::new(
        sink,
        opts.ready_marker.as_deref(),
        ctl.clone(),
        opts.seccomp,
    )
    .map_err(|e| VmmError::Devices(format!("console output thread: {e}")))?;
    Ok((Box::new(out), drain))
}

/// How long Ember waits at exit for a stalled console reader to take the guest's last output
/// when a signal stopped it (the user wants it gone); a guest that ended by itself gets its
/// output written for as long as the reader takes, until a signal comes.
const OUTPUT_DRAIN_ON_SIGNAL: Duration = Duration::from_millis(300);

// The FADT's CENTURY field and the device must name the same CMOS byte.
const _: () = assert!(layout::CMOS_CENTURY_INDEX == ember_devices::cmos::CMOS_CENTURY);

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

/// A microVM: the KVM VM, its guest memory, its devices and its vCPUs, built from a checked
/// `VmConfig` in boot order. The caller drives it: [`Vmm::run`] serves its devices until the guest
/// ends (on the calling thread), and a [`VmmController`] taken beforehand pauses, resumes or stops
/// it from any other thread.
pub struct Vmm {
    opts: RunOptions,
    machine: Machine,
    kvm: Kvm,
    vm: VmFd,
    /// What saving a vCPU needs to know about the host; asked for before the filters go on.
    save_ctx: Option<SaveContext>,
    mem: GuestMemoryMmap,
    devices: DeviceManager,
    legacy: LegacyDevices,
    /// Threads that set up their own vCPUs and wait to run them; emptied by `start`.
    pending_vcpus: Vec<PendingVcpu>,
    vcpus: Vec<VcpuThread>,
    ctl: Arc<VmControl>,
    event_manager: EventManager<Subscriber>,
    exits: Option<ExitEvents>,
    signal_evt: Option<EventFd>,
    output: OutputDrain,
    terminal: Option<RawTerminal>,
    api: Option<crate::api::ApiChannel>,
    /// The `--vsock` listener's socket file, removed when the VM is dropped.
    vsock_file: Option<ember_devices::virtio::vsock::ListenerFile>,
    /// `defer_teardown` was asked for: `run` starts the reaper.
    teardown_deferred: bool,
}

/// Drives a `Vmm` from another thread (an API, a test): pause, resume, stop.
#[derive(Clone)]
pub struct VmmController {
    ctl: Arc<VmControl>,
}

/// How long a pause waits for every vCPU to leave the guest.
pub const PAUSE_PATIENCE: Duration = Duration::from_secs(2);

impl VmmController {
    /// Returns once no vCPU runs guest code; see `VmControl::pause`.
    pub fn pause(&self) -> std::result::Result<(), vcpu::VcpuError> {
        self.ctl.pause(PAUSE_PATIENCE)
    }

    pub fn resume(&self) {
        self.ctl.resume();
    }

    pub fn is_paused(&self) -> bool {
        self.ctl.is_paused()
    }

    /// Ends the VM: `Vmm::run` returns `ExitReason::Stopped` (unless the guest ended first).
    pub fn stop(&self) {
        self.ctl.request_exit(ExitReason::Stopped);
    }

    /// Why the VM ended, once it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.ctl.reason()
    }
}

/// A vCPU's saved state as its thread left it: none yet, or what saving gave.
type SavedVcpu = Option<std::result::Result<VcpuState, String>>;

/// What a booted or a restored VM is made of, before it becomes a `Vmm`.
struct Parts {
    opts: RunOptions,
    machine: Machine,
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
    devices: DeviceManager,
    legacy: LegacyDevices,
    exits: ExitEvents,
    pending_vcpus: Vec<PendingVcpu>,
    ctl: Arc<VmControl>,
    output: OutputDrain,
}

/// vCPU threads, started before the VM exists so that they are running by the time their vCPUs
/// do (a new thread took 0.05-0.5 ms to start on a 2-CPU kvm_pvm host).
fn spawn_vcpu_threads(cpus: u8, ctl: &Arc<VmControl>, seccomp: bool) -> Result<Vec<PendingVcpu>> {
    (0..cpus)
        .map(|id| PendingVcpu::spawn(id, ctl.clone(), seccomp).map_err(VmmError::from))
        .collect()
}

/// KVM's answer to what every vCPU may be offered, shared by the vCPU threads.
type HostCpuQuery =
    std::result::Result<ember_boot::cpu::HostCpu, Arc<dyn std::error::Error + Send + Sync>>;

fn query_host_cpu() -> HostCpuQuery {
    let kvm = Kvm::new().map_err(|e| Arc::new(VmmError::OpenKvm(e)) as Arc<_>)?;
    ember_boot::cpu::HostCpu::query(&kvm).map_err(|e| Arc::new(e) as Arc<_>)
}

fn create_vcpus(vm: &VmFd, cpus: u8) -> Result<Vec<VcpuFd>> {
    (0..cpus)
        .map(|id| {
            vm.create_vcpu(u64::from(id))
                .map_err(|e| VmmError::KvmSetup("KVM_CREATE_VCPU", e))
        })
        .collect()
}

impl Vmm {
    /// Builds the VM from `cfg`: start the vCPU threads, check KVM, create the VM, map guest
    /// memory and load the kernel, register the memory with KVM, create the irqchip and the vCPUs
    /// (each then configured on its own thread), attach the devices, write the boot structures
    /// and tables. Nothing runs yet.
    pub fn build(cfg: &VmConfig) -> Result<Vmm> {
        // vCPU 0's thread asks KVM what CPUID and MSRs the host offers (~0.3 ms on kvm_pvm)
        // while this one checks KVM, creates the VM, maps guest memory and loads the kernel: none
        // of that waits for KVM's answer, where a memory slot or the irqchip created meanwhile
        // did (0.3 ms instead of 0.1).
        let ctl = Arc::new(VmControl::new().map_err(|e| VmmError::Devices(e.to_string()))?);
        let pending_vcpus = spawn_vcpu_threads(cfg.cpus, &ctl, cfg.seccomp)?;
        let host_cpu: Arc<OnceLock<HostCpuQuery>> = Arc::new(OnceLock::new());
        if let Some(first) = pending_vcpus.first() {
            let host_cpu = host_cpu.clone();
            first.run(Box::new(move || {
                host_cpu.get_or_init(query_host_cpu);
            }))?;
        }
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
        // Listening first, as for the API socket: a path in use is refused before anything else.
        let vsock = cfg
            .vsock
            .as_ref()
            .map(ember_devices::virtio::Vsock::new)
            .transpose()?;
        let boot_files = open_boot_files(cfg)?;
        let vm = create_vm(&kvm)?;
        timeline::mark(Phase::VmCreated);

        let mem = map_memory(cfg.memory)?;
        timeline::mark(Phase::MemoryMapped);
        let (loaded, initrd) = load_kernel(&mem, cfg, boot_files)?;
        timeline::mark(Phase::KernelLoaded);
        register_memory(&vm, &mem)?;
        create_irqchip(&vm)?;

        // vCPUs exist before the command line is written: the TSC frequency comes from one. Each
        // is configured on its own thread while this one attaches the devices.
        let vcpu_fds = create_vcpus(&vm, cfg.cpus)?;
        let mut words = host_words(&cfg.cmdline, vcpu_fds.first());
        let hypercalls = HostKind::detect() == HostKind::HardwareKvm;
        for ((id, fd), thread) in (0..cfg.cpus).zip(vcpu_fds).zip(&pending_vcpus) {
            let (host_cpu, mem, loaded, cpus) = (host_cpu.clone(), mem.clone(), loaded, cfg.cpus);
            thread.setup(
                fd,
                Box::new(move |fd| {
                    // Asked already on vCPU 0's thread; the others wait for its answer here.
                    let host_cpu = host_cpu
                        .get_or_init(query_host_cpu)
                        .as_ref()
                        .map_err(Arc::clone)?;
                    let policy = ember_boot::cpu::CpuidPolicy {
                        hypercalls,
                        tsc_deadline: host_cpu.tsc_deadline,
                    };
                    ember_boot::cpu::configure_vcpu(host_cpu, fd, id, cpus, &loaded, &mem, policy)
                        .map_err(Into::into)
                }),
            )?;
        }
        create_pit(&vm)?;

        let opts = cfg.run_options();
        let mut devices = DeviceManager::new(cfg.seccomp)?;
        // Started here, the console thread's start and filter overlap the vCPUs' set-up; started
        // before the memory slot, they delayed it (the slot waited for them on this CPU).
        let (console, output) = serial_sink(&opts, &ctl)?;
        let (legacy, exits) = devices.attach_legacy(&vm, console, None)?;
        crate::disks::attach_disks(&mut devices, &vm, &mem, &cfg.disks, &ctl)?;
        let vsock_file = match vsock {
            Some((device, file)) => {
                devices.attach_virtio(&vm, &mem, "vsock", device, &ctl)?;
                Some(file)
            }
            None => None,
        };

        words.extend(devices.cmdline_words());
        let cmdline = config::full_cmdline(&cfg.cmdline, &words)?;
        let setup = BootSetup {
            mem_size: cfg.memory,
            cmdline: &cmdline,
            initrd,
            cpus: cfg.cpus,
            devices: devices.guest_devices(),
        };
        params::configure_system(&mem, &loaded, &setup).map_err(VmmError::Boot)?;
        let machine = Machine {
            cpus: cfg.cpus,
            memory: cfg.memory,
        };
        let mut vmm = Vmm::assemble(Parts {
            opts,
            machine,
            kvm,
            vm,
            mem,
            devices,
            legacy,
            exits,
            pending_vcpus,
            ctl,
            output,
        })?;
        vmm.vsock_file = vsock_file;
        Ok(vmm)
    }

    /// A VM as a snapshot has it (see `snapshot` and `memory_file`): the same machine, its RAM
    /// mapped privately from `mem_path`, every device and vCPU as it was. It goes on from its next
    /// instruction when run; nothing is booted.
    ///
    /// `vsock_uds` is where a vsock device listens instead of the path it had (each VM restored
    /// from one snapshot needs its own); its guest gets a TRANSPORT_RESET, since the connections
    /// it had ended with the Ember that had their host sockets.
    pub fn restore(
        snapshot_path: &Path,
        mem_path: &Path,
        opts: &RunOptions,
        prefault: bool,
        vsock_uds: Option<PathBuf>,
    ) -> Result<Vmm> {
        let snapshot = Snapshot::read(snapshot_path)?;
        let machine = snapshot.machine.clone();
        if snapshot.vcpus.len() != usize::from(machine.cpus) {
            return Err(VmmError::Restore(format!(
                "the snapshot has {} vCPU states for {} vCPUs",
                snapshot.vcpus.len(),
                machine.cpus
            )));
        }
        if snapshot.memory.total() != machine.memory {
            return Err(VmmError::Restore(format!(
                "the snapshot's memory layout has {} bytes for a {}-byte guest",
                snapshot.memory.total(),
                machine.memory
            )));
        }
        let ctl = Arc::new(VmControl::new().map_err(|e| VmmError::Devices(e.to_string()))?);
        let mut pending_vcpus = spawn_vcpu_threads(machine.cpus, &ctl, opts.seccomp)?;
        let kvm = open_kvm()?;
        let vm = create_vm(&kvm)?;
        timeline::mark(Phase::VmCreated);
        let mem = crate::memory_file::map(mem_path, &snapshot.memory, prefault)?;
        register_memory(&vm, &mem)?;
        create_irqchip(&vm)?;
        create_pit(&vm)?;
        snapshot
            .vm
            .restore(&vm)
            .map_err(|e| VmmError::Restore(e.to_string()))?;
        timeline::mark(Phase::MemoryMapped);

        // Each vCPU gets its saved state on its own thread, before it first runs, while this one
        // restores the devices.
        let vcpu_fds = create_vcpus(&vm, machine.cpus)?;
        let ctx = SaveContext::query(&kvm, &vm).map_err(|e| VmmError::Restore(e.to_string()))?;
        for ((fd, state), thread) in vcpu_fds
            .into_iter()
            .zip(snapshot.vcpus.iter().cloned())
            .zip(&pending_vcpus)
        {
            let ctx = ctx.clone();
            thread.setup(
                fd,
                Box::new(move |fd| state.restore(fd, &ctx).map_err(Into::into)),
            )?;
        }
        let mut devices = DeviceManager::new(opts.seccomp)?;
        let (console, output) = serial_sink(opts, &ctl)?;
        let (legacy, exits) = devices.attach_legacy(&vm, console, Some(&snapshot.devices))?;
        let dir = match snapshot_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let vsock_file =
            devices.restore_virtio(&vm, &mem, &snapshot.devices.virtio, &ctl, dir, vsock_uds)?;
        // A snapshot load is answered only once every vCPU has taken its state: a state KVM
        // refuses fails the load, and nothing runs.
        for thread in &mut pending_vcpus {
            thread.check().map_err(|e| match e {
                vcpu::VcpuError::Setup(id, e) => VmmError::Restore(format!("vCPU {id}: {e}")),
                e => VmmError::Vcpu(e),
            })?;
        }
        devices.resignal_virtio();
        let mut vmm = Vmm::assemble(Parts {
            opts: opts.clone(),
            machine,
            kvm,
            vm,
            mem,
            devices,
            legacy,
            exits,
            pending_vcpus,
            ctl,
            output,
        })?;
        vmm.save_ctx = Some(ctx);
        vmm.vsock_file = vsock_file;
        Ok(vmm)
    }

    fn assemble(p: Parts) -> Result<Vmm> {
        let terminal = match p.opts.serial {
            SerialMode::Stdio => RawTerminal::enter().unwrap_or(None),
            _ => None,
        };
        let event_manager: EventManager<Subscriber> =
            EventManager::new().map_err(VmmError::EventLoop)?;
        let mut vmm = Vmm {
            opts: p.opts,
            machine: p.machine,
            kvm: p.kvm,
            vm: p.vm,
            save_ctx: None,
            mem: p.mem,
            devices: p.devices,
            legacy: p.legacy,
            pending_vcpus: p.pending_vcpus,
            vcpus: Vec::new(),
            ctl: p.ctl,
            event_manager,
            exits: Some(p.exits),
            signal_evt: None,
            output: p.output,
            terminal,
            api: None,
            vsock_file: None,
            teardown_deferred: false,
        };
        if vmm.opts.serial == SerialMode::Stdio {
            let input = ConsoleInput::new(
                vmm.legacy.serial.clone(),
                vmm.ctl.clone(),
                vmm.terminal.is_some(),
            )
            .map_err(|e| VmmError::Devices(format!("console: {e}")))?;
            vmm.event_manager
                .add_subscriber(Arc::new(Mutex::new(input)));
        }
        timeline::mark(Phase::DevicesReady);
        Ok(vmm)
    }

    /// Writes a snapshot of the paused VM: its state to `snapshot_path` and its RAM to
    /// `mem_path` (neither may exist yet). The VM stays paused; on failure neither file is left.
    pub fn snapshot(&self, snapshot_path: &Path, mem_path: &Path) -> Result<()> {
        if !self.ctl.is_paused() {
            return Err(VmmError::Snapshot("pause the VM first".into()));
        }
        for path in [snapshot_path, mem_path] {
            if path.symlink_metadata().is_ok() {
                return Err(VmmError::Snapshot(format!(
                    "{} exists already; a snapshot never overwrites a file (clones may map it)",
                    path.display()
                )));
            }
        }
        let ctx = match &self.save_ctx {
            Some(ctx) => ctx.clone(),
            None => SaveContext::query(&self.kvm, &self.vm)
                .map_err(|e| VmmError::Snapshot(e.to_string()))?,
        };
        let count = usize::from(self.machine.cpus);
        let saved: Arc<Mutex<Vec<SavedVcpu>>> = Arc::new(Mutex::new(vec![None; count]));
        let slots = saved.clone();
        let job: vcpu::VcpuJob = Arc::new(move |id, fd| {
            let state = VcpuState::save(fd, &ctx).map_err(|e| e.to_string());
            let mut slots = slots.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = slots.get_mut(usize::from(id)) {
                *slot = Some(state);
            }
        });
        self.ctl.on_each_parked_vcpu(job, PAUSE_PATIENCE)?;
        let vcpus = std::mem::take(&mut *saved.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .enumerate()
            .map(|(id, s)| match s {
                Some(Ok(state)) => Ok(state),
                Some(Err(e)) => Err(VmmError::Snapshot(format!("vCPU {id}: {e}"))),
                None => Err(VmmError::Snapshot(format!("vCPU {id} saved nothing"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let vm = VmState::save(&self.vm).map_err(|e| VmmError::Snapshot(e.to_string()))?;
        let written = self
            .devices
            .save(&self.legacy, snapshot_path)
            .map_err(VmmError::from)
            .and_then(|devices| {
                let memory = crate::memory_file::write(&self.mem, mem_path)?;
                let snapshot = Snapshot {
                    machine: self.machine.clone(),
                    memory,
                    vm,
                    vcpus,
                    devices,
                };
                snapshot.write(snapshot_path).map_err(VmmError::from)
            });
        if written.is_err() {
            let mut made = self.devices.own_files(snapshot_path);
            made.extend([mem_path.to_path_buf(), snapshot_path.to_path_buf()]);
            for path in made {
                let _ = std::fs::remove_file(path);
            }
        }
        written
    }

    /// Lets the process's stop signals (SIGINT, SIGTERM, SIGHUP, ...) end the VM with
    /// `ExitReason::Signal`; the `ember` command wants this, a library caller may not.
    pub fn watch_signals(&mut self) -> Result<()> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Devices(e.to_string()))?;
        crate::signals::install(&evt);
        self.signal_evt = Some(evt);
        Ok(())
    }

    /// Hands the VM's teardown to a reaper process so that Ember's exit does not wait for it
    /// (see `reaper`); for a process that exits when the VM ends. The reaper starts in `run`,
    /// once the vCPUs run: started here it delayed the guest's first instruction by its clone
    /// and its filter (~0.06-0.13 ms on a kvm_pvm host).
    pub fn defer_teardown(&mut self) {
        self.teardown_deferred = true;
    }

    fn spawn_reaper(&self) {
        use std::os::fd::AsRawFd;
        // Not fatal: without the reaper Ember only exits later.
        if let Err(e) = crate::reaper::spawn(self.vm.as_raw_fd(), self.opts.seccomp) {
            log::warn!("VM teardown will delay Ember's exit: cannot fork the reaper: {e}");
        }
    }

    /// Answers the API socket's requests (see `api::serve`) while the VM runs; the socket file
    /// is removed when the VM ends.
    pub fn attach_api(&mut self, channel: crate::api::ApiChannel) -> Result<()> {
        // A snapshot asks KVM about the host's MSRs and XSAVE size: done now, before the main
        // thread's filter allows no such ioctl.
        if self.save_ctx.is_none() {
            self.save_ctx = Some(
                SaveContext::query(&self.kvm, &self.vm)
                    .map_err(|e| VmmError::Snapshot(e.to_string()))?,
            );
        }
        let wake = channel
            .wake
            .try_clone()
            .map_err(|e| VmmError::Devices(format!("API wake-up eventfd: {e}")))?;
        self.event_manager
            .add_subscriber(Arc::new(Mutex::new(crate::event_loop::Drain::new(wake))));
        self.api = Some(channel);
        Ok(())
    }

    /// Carries out the API requests waiting, on the thread that runs the VM.
    fn answer_api(&self) {
        let Some(api) = &self.api else { return };
        while let Ok(req) = api.requests.try_recv() {
            let reply = match req.action {
                crate::api::Action::Describe => crate::api::Reply::ok(crate::api::InstanceInfo {
                    app_name: "Ember".into(),
                    id: format!("ember-{}", std::process::id()),
                    state: if self.ctl.is_paused() {
                        "Paused"
                    } else {
                        "Running"
                    }
                    .into(),
                    vmm_version: env!("CARGO_PKG_VERSION").into(),
                }),
                crate::api::Action::Pause => match self.ctl.pause(PAUSE_PATIENCE) {
                    Ok(()) => crate::api::Reply::no_content(),
                    Err(e) => crate::api::Reply::fault(500, e.to_string()),
                },
                crate::api::Action::Resume => {
                    self.ctl.resume();
                    crate::api::Reply::no_content()
                }
                crate::api::Action::SnapshotCreate {
                    snapshot_path,
                    mem_file_path,
                } => match self.snapshot(&snapshot_path, &mem_file_path) {
                    Ok(()) => crate::api::Reply::no_content(),
                    Err(e) => {
                        let status = match e {
                            VmmError::Snapshot(_) => 400,
                            _ => 500,
                        };
                        crate::api::Reply::fault(status, crate::error_line(&e))
                    }
                },
                crate::api::Action::SnapshotLoad { .. } => crate::api::Reply::fault(
                    400,
                    "a VM runs here already; load a snapshot into an Ember started with only \
                     --api-sock",
                ),
            };
            let _ = req.reply.send(reply);
        }
    }

    pub fn controller(&self) -> VmmController {
        VmmController {
            ctl: self.ctl.clone(),
        }
    }

    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// Starts the VM paused when it runs: its vCPUs park before their first instruction, until
    /// a resume.
    pub fn start_paused(&self) {
        self.ctl.request_pause();
    }

    /// Starts the vCPU threads; the guest runs from here.
    fn start(&mut self) -> Result<()> {
        for pending in std::mem::take(&mut self.pending_vcpus) {
            self.vcpus
                .push(pending.start(self.devices.pio.clone(), self.devices.mmio.clone())?);
        }
        vcpu::register_threads(&self.ctl, &self.vcpus);
        Ok(())
    }

    /// Runs the guest until it resets, powers off or panics, the controller stops it, or (with
    /// `watch_signals`) a signal or the console escape ends it. Serves the device event loop on
    /// the calling thread, which with seccomp on gets the main thread's filter first.
    pub fn run(mut self) -> Result<ExitReason> {
        let Some(exits) = self.exits.take() else {
            return Err(VmmError::Devices("the VM has run already".into()));
        };
        let watcher = ExitWatcher::new(
            self.ctl.clone(),
            exits.reset,
            exits.poweroff,
            exits.panicked,
            self.signal_evt.take(),
        );
        self.event_manager
            .add_subscriber(Arc::new(Mutex::new(watcher)));
        let started = self.start();
        if started.is_ok() && self.teardown_deferred {
            self.spawn_reaper();
        }
        // The main thread's filter goes on before the event loop serves anything the guest
        // controls.
        let mut failure = match started {
            Err(e) => Some(e),
            Ok(()) if self.opts.seccomp => {
                let kind = if self.api.is_some() {
                    crate::seccomp::ThreadKind::MainWithApi
                } else if self.vsock_file.is_some() {
                    crate::seccomp::ThreadKind::MainWithVsock
                } else {
                    crate::seccomp::ThreadKind::Main
                };
                crate::seccomp::install(kind).err().map(VmmError::Seccomp)
            }
            Ok(()) => None,
        };
        let result = loop {
            if let Some(e) = failure.take() {
                break Err(e);
            }
            if let Some(reason) = self.ctl.reason() {
                break Ok(reason);
            }
            if let Err(e) = self.event_manager.run() {
                break Err(VmmError::EventLoop(e));
            }
            self.answer_api();
        };
        if result.is_err() {
            self.ctl
                .request_exit(ExitReason::VcpuFailed("event loop failed".into()));
        }
        vcpu::unregister_threads(&self.ctl);
        for t in std::mem::take(&mut self.vcpus) {
            t.stop(Duration::from_secs(1));
        }
        let stopped_by_signal = matches!(result, Ok(ExitReason::Signal(_)));
        let limit = if stopped_by_signal {
            OUTPUT_DRAIN_ON_SIGNAL
        } else {
            Duration::MAX
        };
        let signalled = || crate::signals::first().is_some();
        if !self.output.wait(limit, signalled) {
            log::info!("console: the guest's last output was not all written (the reader stalled)");
        }
        let dropped = self.output.dropped();
        if dropped > 0 {
            log::warn!(
                "console: {dropped} bytes of guest output were dropped: the reader did not keep up"
            );
        }
        if let Some(t) = &self.terminal {
            t.restore();
        }
        match result? {
            ExitReason::VcpuFailed(what) => Err(VmmError::GuestFailed(what)),
            other => Ok(other),
        }
    }
}

/// How `ember run` gets its VM.
pub enum Start {
    /// Boot a kernel.
    Boot(VmConfig),
    /// Restore a snapshot and run it at once.
    Restore {
        snapshot: PathBuf,
        mem: PathBuf,
        opts: RunOptions,
        prefault: bool,
        /// Where the vsock device listens instead of its saved path.
        vsock_uds: Option<PathBuf>,
    },
    /// Wait on the API socket for `PUT /snapshot/load`.
    AwaitLoad(RunOptions),
}

/// What `ember run` does: gets the VM (boots, restores, or waits to be told what to restore),
/// runs it to the end, ended also by the process's signals. Returns why the guest stopped.
pub fn run(start: Start, api_sock: Option<&Path>) -> Result<ExitReason> {
    let seccomp = match &start {
        Start::Boot(cfg) => cfg.seccomp,
        Start::Restore { opts, .. } | Start::AwaitLoad(opts) => opts.seccomp,
    };
    // The socket first: a path in use is refused before anything is built.
    let api = api_sock
        .map(|path| crate::api::serve(path, seccomp))
        .transpose()?;
    let mut vmm = match start {
        Start::Boot(cfg) => Vmm::build(&cfg)?,
        Start::Restore {
            snapshot,
            mem,
            opts,
            prefault,
            vsock_uds,
        } => Vmm::restore(&snapshot, &mem, &opts, prefault, vsock_uds)?,
        Start::AwaitLoad(opts) => {
            let Some(api) = api.as_ref() else {
                return Err(VmmError::Restore(
                    "nothing to run: give --kernel, --restore or --api-sock".into(),
                ));
            };
            match await_load(api, &opts)? {
                Loaded::Vmm(vmm) => *vmm,
                Loaded::Signal(signo) => return Ok(ExitReason::Signal(signo)),
            }
        }
    };
    vmm.defer_teardown();
    vmm.watch_signals()?;
    if let Some(api) = api {
        vmm.attach_api(api)?;
    }
    vmm.run()
}

enum Loaded {
    Vmm(Box<Vmm>),
    Signal(i32),
}

/// Answers the API until a `PUT /snapshot/load` restores a VM (or a signal ends Ember). A load
/// that fails is answered with its error and leaves nothing behind: the next may succeed.
fn await_load(api: &crate::api::ApiChannel, opts: &RunOptions) -> Result<Loaded> {
    use crate::api::{Action, InstanceInfo, Reply};
    let signal_evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Devices(e.to_string()))?;
    crate::signals::install(&signal_evt);
    loop {
        if let Some(signo) = crate::signals::first() {
            return Ok(Loaded::Signal(signo));
        }
        let req = match api.requests.recv_timeout(Duration::from_millis(20)) {
            Ok(req) => req,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(VmmError::Restore("the API thread stopped".into()))
            }
        };
        let reply = match req.action {
            Action::Describe => Reply::ok(InstanceInfo {
                app_name: "Ember".into(),
                id: format!("ember-{}", std::process::id()),
                state: "Not started".into(),
                vmm_version: env!("CARGO_PKG_VERSION").into(),
            }),
            Action::SnapshotLoad {
                snapshot_path,
                mem_file_path,
                resume_vm,
            } => match Vmm::restore(&snapshot_path, &mem_file_path, opts, false, None) {
                Ok(vmm) => {
                    if !resume_vm {
                        vmm.start_paused();
                    }
                    let _ = req.reply.send(Reply::no_content());
                    return Ok(Loaded::Vmm(Box::new(vmm)));
                }
                Err(e) => Reply::fault(400, crate::error_line(&e)),
            },
            _ => Reply::fault(400, "no VM yet: load a snapshot first (PUT /snapshot/load)"),
        };
        let _ = req.reply.send(reply);
    }
}

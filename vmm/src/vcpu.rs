//! One thread per vCPU: `KVM_RUN` in a loop, port and MMIO exits dispatched to the buses, and the
//! exits that end the VM reported to the main thread. Nothing else runs here: virtio queues are
//! served by the event loop, which the guest reaches through ioeventfds without an exit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_devices::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::timeline::{self, Phase};

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 reset, or KVM's reset event).
    Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN): on a PC that resets the machine, but a guest
    /// only gets there by crashing (or by `reboot=t`).
    TripleFault,
    /// The guest kernel reported a panic through the pvpanic device.
    GuestPanic,
    /// The guest powered off (ACPI S5).
    Poweroff,
    /// The user typed the console escape sequence.
    UserQuit,
    /// Ember was sent this signal.
    Signal(i32),
    /// The program driving the `Vmm` asked it to stop.
    Stopped,
    /// A vCPU stopped in a way the guest cannot recover from.
    VcpuFailed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
    #[error("cannot start the thread for vCPU {0}: {1}")]
    Spawn(u8, std::io::Error),
    #[error("setting up vCPU {0}: {1}")]
    Setup(u8, #[source] SetupError),
    #[error("vCPU {0}: {1}")]
    Seccomp(u8, #[source] crate::seccomp::SeccompError),
    #[error("the thread for vCPU {0} ended before the guest started")]
    ThreadGone(u8),
    #[error("the VM is not running")]
    NotRunning,
    #[error("the VM must be paused first")]
    NotPaused,
    #[error("{done} of {total} vCPUs did their part within {waited:?}")]
    JobTimeout {
        done: usize,
        total: usize,
        waited: Duration,
    },
    #[error("{parked} of {total} vCPUs stopped within {waited:?}; the VM was left running")]
    PauseTimeout {
        parked: usize,
        total: usize,
        waited: Duration,
    },
}

/// Where the vCPUs stand with a pause: whether one is asked for, and how many vCPU threads have
/// stopped for it. The threads' pthread ids are kept here, under the same lock, so that a pause
/// never kicks a thread that has already been joined.
#[derive(Default)]
struct PauseState {
    requested: bool,
    parked: usize,
    threads: Vec<libc::pthread_t>,
    /// Work for every parked vCPU thread, with its own vCPU (saving or loading its state): the
    /// job's number, and how many threads have done it.
    job: Option<(u64, VcpuJob)>,
    jobs_done: usize,
}

/// What `VmControl::on_each_parked_vcpu` runs on each vCPU thread: its id and its vCPU.
pub type VcpuJob = Arc<dyn Fn(u8, &mut VcpuFd) + Send + Sync>;

/// State shared by the vCPU threads and the main thread.
pub struct VmControl {
    stop: AtomicBool,
    reason: Mutex<Option<ExitReason>>,
    /// Written when `reason` is first set, so the event loop wakes up.
    pub exit_evt: EventFd,
    pause: Mutex<PauseState>,
    /// Signalled whenever `pause` changes: a vCPU parks or leaves, a pause is lifted, or the VM
    /// ends (a parked vCPU must not keep a stop waiting).
    pause_changed: Condvar,
}

impl VmControl {
    pub fn new() -> std::io::Result<Self> {
        Ok(VmControl {
            stop: AtomicBool::new(false),
            reason: Mutex::new(None),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            pause: Mutex::new(PauseState::default()),
            pause_changed: Condvar::new(),
        })
    }

    fn pause_state(&self) -> MutexGuard<'_, PauseState> {
        self.pause.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the running vCPU threads, which a pause kicks out of `KVM_RUN`.
    fn set_vcpu_threads(&self, threads: Vec<libc::pthread_t>) {
        self.pause_state().threads = threads;
    }

    /// Forgets the vCPU threads before they are joined.
    fn clear_vcpu_threads(&self) {
        self.pause_state().threads.clear();
        self.pause_changed.notify_all();
    }

    /// Stops every vCPU outside `KVM_RUN` and returns once all of them are parked. Guest time
    /// goes on meanwhile (KVM's clock is not stopped), devices finish what is in flight. Fails
    /// when the VM has no vCPU threads running or they do not all stop within `patience`; the
    /// pause is then lifted again.
    pub fn pause(&self, patience: Duration) -> Result<(), VcpuError> {
        const REKICK: Duration = Duration::from_micros(200);
        let deadline = Instant::now() + patience;
        let mut state = self.pause_state();
        if state.threads.is_empty() || self.stopping() {
            return Err(VcpuError::NotRunning);
        }
        state.requested = true;
        loop {
            let total = state.threads.len();
            if state.parked >= total && total > 0 {
                return Ok(());
            }
            if total == 0 || self.stopping() {
                state.requested = false;
                self.pause_changed.notify_all();
                return Err(VcpuError::NotRunning);
            }
            if Instant::now() >= deadline {
                let parked = state.parked;
                state.requested = false;
                self.pause_changed.notify_all();
                return Err(VcpuError::PauseTimeout {
                    parked,
                    total,
                    waited: patience,
                });
            }
            // A kick can land just before a thread enters KVM_RUN and be lost: repeat it.
            for &t in &state.threads {
                // SAFETY: the ids are of threads not yet joined (cleared under this lock first).
                unsafe { libc::pthread_kill(t, kick_signal()) };
            }
            state = self
                .pause_changed
                .wait_timeout(state, REKICK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Asks for a pause before the vCPU threads exist: each parks before its first `KVM_RUN`.
    pub fn request_pause(&self) {
        self.pause_state().requested = true;
    }

    /// Lets paused vCPUs run again; does nothing when none is paused.
    pub fn resume(&self) {
        self.pause_state().requested = false;
        self.pause_changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.pause_state().requested
    }

    /// Runs `job` on every vCPU thread, with its vCPU, while the VM is paused; returns once all
    /// have run it. vCPU ioctls that read or write a vCPU's state belong on its own thread, which
    /// owns the vCPU and is parked outside `KVM_RUN` meanwhile.
    pub fn on_each_parked_vcpu(&self, job: VcpuJob, patience: Duration) -> Result<(), VcpuError> {
        let deadline = Instant::now() + patience;
        let mut state = self.pause_state();
        let total = state.threads.len();
        if !state.requested || state.parked < total || total == 0 {
            return Err(VcpuError::NotPaused);
        }
        let number = state.job.as_ref().map_or(1, |(n, _)| n + 1);
        state.job = Some((number, job));
        state.jobs_done = 0;
        self.pause_changed.notify_all();
        while state.jobs_done < total {
            let now = Instant::now();
            if self.stopping() || now >= deadline {
                let done = state.jobs_done;
                state.job = None;
                return Err(VcpuError::JobTimeout {
                    done,
                    total,
                    waited: patience,
                });
            }
            state = self
                .pause_changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.job = None;
        Ok(())
    }

    /// Called by a vCPU thread between runs: parks it while a pause is asked for, doing the jobs
    /// posted meanwhile.
    fn park_if_paused(&self, id: u8, vcpu: &mut VcpuFd) {
        if !self.pause_state().requested {
            return;
        }
        // An I/O or MMIO exit is completed by the next KVM_RUN (a read's value goes into the
        // guest's register then). Parked before it, the vCPU's saved state would be that of a
        // half-done instruction, and a guest restored from it hung in its interrupt handler.
        // With immediate_exit KVM completes it and returns before running guest code.
        vcpu.set_kvm_immediate_exit(1);
        let _ = vcpu.run();
        vcpu.set_kvm_immediate_exit(0);
        let mut state = self.pause_state();
        if !state.requested {
            return;
        }
        state.parked += 1;
        self.pause_changed.notify_all();
        let mut last_job = state.job.as_ref().map_or(0, |(n, _)| *n);
        while state.requested && !self.stopping() {
            if let Some((number, job)) = state.job.as_ref().map(|(n, j)| (*n, j.clone())) {
                if number != last_job {
                    last_job = number;
                    // Without the lock: the other vCPUs do theirs at the same time.
                    drop(state);
                    job(id, vcpu);
                    state = self.pause_state();
                    state.jobs_done += 1;
                    self.pause_changed.notify_all();
                    continue;
                }
            }
            state = self
                .pause_changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        state.parked -= 1;
        self.pause_changed.notify_all();
    }

    /// Records why the VM ends; the first reason wins.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            timeline::mark(Phase::GuestExit);
            *r = Some(reason);
            self.stop.store(true, Ordering::SeqCst);
            let _ = self.exit_evt.write(1);
            drop(r);
            // Parked vCPUs wake and see the stop; taking the lock orders this after any park.
            drop(self.pause_state());
            self.pause_changed.notify_all();
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

pub fn install_kick_handler() -> Result<(), VcpuError> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), noop).map_err(VcpuError::SignalHandler)
}

/// Tells `ctl` which threads run the vCPUs, so that a pause can kick them.
pub fn register_threads(ctl: &VmControl, threads: &[VcpuThread]) {
    use std::os::unix::thread::JoinHandleExt;
    ctl.set_vcpu_threads(threads.iter().map(|t| t.handle.as_pthread_t()).collect());
}

/// Forgets the vCPU threads (before `VcpuThread::stop` joins them).
pub fn unregister_threads(ctl: &VmControl) {
    ctl.clear_vcpu_threads();
}

pub struct VcpuThread {
    handle: JoinHandle<()>,
    /// Disconnects when the thread's loop returns: `stop` wakes at once instead of polling.
    done: mpsc::Receiver<()>,
}

impl VcpuThread {
    /// Kicks the thread out of `KVM_RUN` until it has seen the stop flag and ended. A kick can
    /// land just before the thread enters `KVM_RUN`, so it is repeated; a thread that does not end
    /// within `patience` is left behind (the process is about to exit anyway).
    pub fn stop(self, patience: Duration) {
        const REKICK: Duration = Duration::from_micros(200);
        let deadline = Instant::now() + patience;
        loop {
            let _ = self.handle.kill(kick_signal());
            match self.done.recv_timeout(REKICK) {
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) => {
                    log::warn!("a vCPU thread did not stop in {patience:?}");
                    return;
                }
                // The loop has returned; what is left is the thread's own exit.
                Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = self.handle.join();
    }
}

/// Why a [`VcpuPrepare`] failed.
pub type SetupError = Box<dyn std::error::Error + Send + Sync>;

/// What a vCPU's own thread does to the vCPU before the guest first runs on it (a boot's CPUID,
/// MSRs and registers, or a snapshot's saved state), while the main thread finishes the VM.
pub type VcpuPrepare = Box<dyn FnOnce(&VcpuFd) -> Result<(), SetupError> + Send>;

enum ToThread {
    Run(Box<dyn FnOnce() + Send>),
    Setup(VcpuFd, VcpuPrepare),
    Go { pio: Bus, mmio: Bus },
}

/// A vCPU thread started before its vCPU exists. Starting a thread, building and installing its
/// system call filter (the kernel compiles it: ~0.1 ms) and configuring a vCPU (~0.2 ms) all took
/// time the main thread spent between the end of the VM's set-up and the guest's first
/// instruction; done here, they overlap that set-up.
pub struct PendingVcpu {
    id: u8,
    to_thread: mpsc::Sender<ToThread>,
    ready: mpsc::Receiver<Result<(), VcpuError>>,
    /// The set-up's report has been taken already (by `check`): `start` does not wait again.
    checked: bool,
    thread: VcpuThread,
}

impl PendingVcpu {
    /// Starts vCPU `id`'s thread, which waits for [`PendingVcpu::setup`]. With `seccomp`, its
    /// filter goes on once the vCPU is set up, before the guest runs.
    pub fn spawn(id: u8, ctl: Arc<VmControl>, seccomp: bool) -> Result<Self, VcpuError> {
        // Before the thread exists: a kick (a stop, a pause) may come as soon as it does, and
        // the kick signal's default action would end the whole process.
        install_kick_handler()?;
        let (done_tx, done) = mpsc::channel();
        let (to_thread, from_main) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        // SAFETY: sched_getcpu has no preconditions.
        let spawner_cpu = unsafe { libc::sched_getcpu() };
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let _done = done_tx;
                move_off_cpu(spawner_cpu);
                crate::signals::block_in_this_thread();
                let Some(vcpu) = prepare(id, seccomp, &from_main, &ready_tx) else {
                    return;
                };
                // The owner has dropped its end if the VM is not to run after all.
                let Ok(ToThread::Go { pio, mmio }) = from_main.recv() else {
                    return;
                };
                run_loop(id, vcpu, &pio, &mmio, &ctl);
            })
            .map_err(|e| VcpuError::Spawn(id, e))?;
        // The scheduler often queued the new thread on this CPU, where it waited until this one
        // blocked (the VM's set-up keeps it busy inside KVM): yielding once lets it start now and
        // move itself (`move_off_cpu`). With the thread elsewhere this returns at once.
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
        Ok(PendingVcpu {
            id,
            to_thread,
            ready,
            checked: false,
            thread: VcpuThread { handle, done },
        })
    }

    /// Has the thread run `work` while it waits for its vCPU (so before [`PendingVcpu::setup`]):
    /// set-up work for the VM that needs no vCPU. Returns at once.
    pub fn run(&self, work: Box<dyn FnOnce() + Send>) -> Result<(), VcpuError> {
        self.to_thread
            .send(ToThread::Run(work))
            .map_err(|_| VcpuError::ThreadGone(self.id))
    }

    /// Hands the thread its vCPU and what to do to it before the guest runs. Returns at once.
    pub fn setup(&self, vcpu: VcpuFd, prepare: VcpuPrepare) -> Result<(), VcpuError> {
        self.to_thread
            .send(ToThread::Setup(vcpu, prepare))
            .map_err(|_| VcpuError::ThreadGone(self.id))
    }

    /// Waits until the thread has set its vCPU up and put its filter on, or says why it could
    /// not: for a caller that must know before it answers anyone (a snapshot load).
    pub fn check(&mut self) -> Result<(), VcpuError> {
        self.checked = true;
        self.ready
            .recv()
            .map_err(|_| VcpuError::ThreadGone(self.id))?
    }

    /// Lets the guest run on the vCPU, with these buses, as soon as the thread has set it up and
    /// put its filter on; returns once it has, or why it could not. Go is sent first so that the
    /// thread, finishing, finds it waiting instead of being woken for it.
    pub fn start(self, pio: Bus, mmio: Bus) -> Result<VcpuThread, VcpuError> {
        // A thread that failed its set-up has gone, and its report says why.
        let _ = self.to_thread.send(ToThread::Go { pio, mmio });
        if !self.checked {
            self.ready
                .recv()
                .map_err(|_| VcpuError::ThreadGone(self.id))??;
        }
        Ok(self.thread)
    }
}

/// Moves the calling thread to a CPU other than `cpu` when it may run on one, then lets it run
/// wherever it may again (its own mask, as the user or a cgroup set it): a hint, not a pin. Left
/// next to the thread that started it, a vCPU thread's set-up waited for that thread instead of
/// overlapping its work.
fn move_off_cpu(cpu: libc::c_int) {
    if cpu < 0 {
        return;
    }
    // SAFETY: cpu_set_t is plain data; the calls read and write the calling thread's mask.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, size, &mut allowed) != 0 {
            return;
        }
        let mut elsewhere = allowed;
        libc::CPU_CLR(cpu as usize, &mut elsewhere);
        if libc::CPU_COUNT(&elsewhere) == 0 {
            return;
        }
        if libc::sched_setaffinity(0, size, &elsewhere) == 0 {
            libc::sched_setaffinity(0, size, &allowed);
        }
    }
}

/// A pending vCPU thread's set-up: runs the work it is given, takes its vCPU and prepares it,
/// then puts its filter on (compiled at build time: nothing to build here). Returns the vCPU once
/// it may run; every failure is reported on `ready` instead.
fn prepare(
    id: u8,
    seccomp: bool,
    from_main: &mpsc::Receiver<ToThread>,
    ready: &mpsc::Sender<Result<(), VcpuError>>,
) -> Option<VcpuFd> {
    let result = (|| {
        let (vcpu, prepare) = loop {
            match from_main.recv().map_err(|_| VcpuError::ThreadGone(id))? {
                ToThread::Run(work) => work(),
                ToThread::Setup(vcpu, prepare) => break (vcpu, prepare),
                ToThread::Go { .. } => return Err(VcpuError::ThreadGone(id)),
            }
        };
        prepare(&vcpu).map_err(|e| VcpuError::Setup(id, e))?;
        if seccomp {
            crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu)
                .map_err(|e| VcpuError::Seccomp(id, e))?;
        }
        Ok(vcpu)
    })();
    match result {
        Ok(vcpu) => {
            let _ = ready.send(Ok(()));
            Some(vcpu)
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            None
        }
    }
}

/// The guest's side of the thread; its filter is on already (`prepare`), as the guest drives
/// the thread from the first instruction.
fn run_loop(id: u8, mut vcpu: VcpuFd, pio: &Bus, mmio: &Bus, ctl: &VmControl) {
    if id == 0 {
        timeline::mark(Phase::FirstKvmRun);
    }
    // A string OUT (`rep outsb`) arrives as one exit with `count` items of `size` bytes; it is
    // copied here and handed to the device an item at a time once KVM's exit record can be read.
    let mut string_out = [0u8; 4096];
    while !ctl.stopping() {
        ctl.park_if_paused(id, &mut vcpu);
        if ctl.stopping() {
            break;
        }
        let mut pending_string_out = None;
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) if data.len() > 1 => {
                let n = data.len().min(string_out.len());
                string_out[..n].copy_from_slice(&data[..n]);
                pending_string_out = Some((port, n));
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !pio.write(u64::from(port), data) {
                    log::debug!("vcpu{id}: write to unclaimed port {port:#x} ignored");
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if !pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !mmio.write(addr, data) {
                    log::debug!("vcpu{id}: MMIO write to unclaimed {addr:#x} ignored");
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            // A triple fault: on a PC that resets the machine, which for a microVM is its end;
            // reported apart from a clean reset, since only a crashing guest gets here.
            Ok(VcpuExit::Shutdown) => ctl.request_exit(ExitReason::TripleFault),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ctl.request_exit(ExitReason::Poweroff),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => ctl.request_exit(ExitReason::Reset),
                other => ctl.request_exit(ExitReason::VcpuFailed(format!(
                    "vCPU {id}: unexpected KVM system event {other}"
                ))),
            },
            // Without an in-kernel irqchip a halt would exit here; with it, KVM only reports a
            // halt the guest can never leave.
            Ok(VcpuExit::Hlt) => {
                log::info!("vcpu{id}: halted");
                ctl.request_exit(ExitReason::Poweroff)
            }
            Ok(VcpuExit::InternalError) => {
                let run = vcpu.get_kvm_run();
                // SAFETY: KVM filled the `internal` member for KVM_EXIT_INTERNAL_ERROR.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                let what = if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                    "KVM could not emulate a guest instruction".to_string()
                } else {
                    format!("KVM internal error (suberror {suberror})")
                };
                ctl.request_exit(ExitReason::VcpuFailed(format!("vCPU {id}: {what}")));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => ctl.request_exit(ExitReason::VcpuFailed(
                format!("vCPU {id}: KVM could not enter the guest (reason {reason:#x}, cpu {cpu})"),
            )),
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                log::warn!("vcpu{id}: unhandled exit {other:?}");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                ctl.request_exit(ExitReason::VcpuFailed(format!("vCPU {id}: KVM_RUN: {e}")));
            }
        }
        if let Some((port, n)) = pending_string_out {
            // SAFETY: the exit just handled was KVM_EXIT_IO, for which KVM filled `io`.
            let size = usize::from(unsafe { vcpu.get_kvm_run().__bindgen_anon_1.io.size });
            for item in string_out[..n].chunks(size.max(1)) {
                if !pio.write(u64::from(port), item) {
                    log::debug!("vcpu{id}: write to unclaimed port {port:#x} ignored");
                }
            }
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VmFd};

    /// A VM with 64 KiB of memory holding real-mode `code` at 0x1000.
    fn vm_with_code(code: &[u8]) -> (Kvm, VmFd) {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let size = 64 << 10;
        // SAFETY: a fresh anonymous mapping, left mapped for the rest of the test process.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED);
        // SAFETY: the mapping is `size` bytes and nothing else uses it yet.
        let guest = unsafe { std::slice::from_raw_parts_mut(mem.cast::<u8>(), size) };
        guest[0x1000..0x1000 + code.len()].copy_from_slice(code);
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: size as u64,
            userspace_addr: mem as u64,
        };
        // SAFETY: the region stays mapped for the life of the process.
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        (kvm, vm)
    }

    fn real_mode_at_0x1000(vcpu: &VcpuFd) -> Result<(), SetupError> {
        let mut sregs = vcpu.get_sregs()?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs)?;
        let mut regs = vcpu.get_regs()?;
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs)?;
        Ok(())
    }

    struct Port(Arc<Mutex<Vec<u8>>>);
    impl ember_devices::BusDevice for Port {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.0.lock().unwrap().extend_from_slice(data);
        }
    }

    #[test]
    fn a_pending_vcpu_runs_the_guest_once_set_up_and_started() {
        // mov dx, 0x3f8; mov al, 'A'; out dx, al; hlt
        let (_kvm, vm) = vm_with_code(&[0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee, 0xf4]);
        let ctl = Arc::new(VmControl::new().unwrap());
        let pending = PendingVcpu::spawn(0, ctl.clone(), false).unwrap();
        pending
            .setup(vm.create_vcpu(0).unwrap(), Box::new(real_mode_at_0x1000))
            .unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut pio = Bus::new();
        pio.insert(0x3f8, 8, Arc::new(Mutex::new(Port(out.clone()))))
            .unwrap();
        let thread = pending.start(pio, Bus::new()).unwrap();
        // Without an irqchip the halt comes back to the thread, which ends the VM.
        assert_eq!(wait_for_end(&ctl), Some(ExitReason::Poweroff));
        thread.stop(Duration::from_secs(1));
        assert_eq!(*out.lock().unwrap(), b"A");
    }

    /// Waits up to 10 s for the VM to end.
    fn wait_for_end(ctl: &VmControl) -> Option<ExitReason> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while ctl.reason().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        ctl.reason()
    }

    #[test]
    fn a_pending_vcpu_started_paused_runs_nothing_until_resumed() {
        // mov dx, 0x3f8; mov al, 'A'; out dx, al; hlt
        let (_kvm, vm) = vm_with_code(&[0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee, 0xf4]);
        let ctl = Arc::new(VmControl::new().unwrap());
        let mut pending = PendingVcpu::spawn(0, ctl.clone(), false).unwrap();
        pending
            .setup(vm.create_vcpu(0).unwrap(), Box::new(real_mode_at_0x1000))
            .unwrap();
        pending.check().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut pio = Bus::new();
        pio.insert(0x3f8, 8, Arc::new(Mutex::new(Port(out.clone()))))
            .unwrap();
        // As a snapshot loaded without resume_vm: parked before its first instruction.
        ctl.request_pause();
        let thread = pending.start(pio, Bus::new()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ctl.pause_state().parked == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(ctl.pause_state().parked, 1);
        assert!(out.lock().unwrap().is_empty());
        ctl.resume();
        assert_eq!(wait_for_end(&ctl), Some(ExitReason::Poweroff));
        thread.stop(Duration::from_secs(1));
        assert_eq!(*out.lock().unwrap(), b"A");
    }

    #[test]
    fn a_failed_set_up_is_reported_by_check_before_anything_starts() {
        let (_kvm, vm) = vm_with_code(&[0xf4]);
        let ctl = Arc::new(VmControl::new().unwrap());
        let mut pending = PendingVcpu::spawn(1, ctl.clone(), false).unwrap();
        pending
            .setup(
                vm.create_vcpu(0).unwrap(),
                Box::new(|_| Err("the saved LAPIC does not fit".into())),
            )
            .unwrap();
        let err = pending.check().unwrap_err();
        assert_eq!(
            err.to_string(),
            "setting up vCPU 1: the saved LAPIC does not fit"
        );
        assert_eq!(ctl.reason(), None);
    }

    #[test]
    fn a_failed_set_up_is_reported_by_start_and_the_guest_never_runs() {
        let (_kvm, vm) = vm_with_code(&[0xf4]);
        let ctl = Arc::new(VmControl::new().unwrap());
        let pending = PendingVcpu::spawn(3, ctl.clone(), false).unwrap();
        pending
            .setup(
                vm.create_vcpu(0).unwrap(),
                Box::new(|_| Err("no CPUID for this vCPU".into())),
            )
            .unwrap();
        let err = pending.start(Bus::new(), Bus::new()).err().unwrap();
        assert!(matches!(err, VcpuError::Setup(3, _)), "{err:?}");
        assert_eq!(err.to_string(), "setting up vCPU 3: no CPUID for this vCPU");
        assert_eq!(ctl.reason(), None);
    }

    #[test]
    fn a_pending_vcpu_never_set_up_ends_with_its_owner() {
        let ctl = Arc::new(VmControl::new().unwrap());
        let pending = PendingVcpu::spawn(0, ctl, false).unwrap();
        let PendingVcpu {
            thread,
            to_thread,
            ready,
            ..
        } = pending;
        drop((to_thread, ready));
        // Its channel from the main thread is gone: the thread returns without a vCPU.
        assert!(matches!(
            thread.done.recv_timeout(Duration::from_secs(10)),
            Err(RecvTimeoutError::Disconnected)
        ));
        thread.handle.join().unwrap();
    }
}

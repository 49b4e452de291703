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
    pub fn spawn(
        id: u8,
        vcpu: VcpuFd,
        pio: Bus,
        mmio: Bus,
        ctl: Arc<VmControl>,
        seccomp: bool,
    ) -> Result<Self, VcpuError> {
        let (done_tx, done) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let _done = done_tx;
                run_loop(id, vcpu, &pio, &mmio, &ctl, seccomp);
            })
            .map_err(|e| VcpuError::Spawn(id, e))?;
        Ok(VcpuThread { handle, done })
    }

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

fn run_loop(id: u8, mut vcpu: VcpuFd, pio: &Bus, mmio: &Bus, ctl: &VmControl, seccomp: bool) {
    crate::signals::block_in_this_thread();
    // Before the first guest instruction: from here on the guest drives this thread.
    if seccomp {
        if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
            ctl.request_exit(ExitReason::VcpuFailed(format!("vCPU {id}: {e}")));
            return;
        }
    }
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

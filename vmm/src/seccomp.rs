//! System call filters (seccomp-bpf), one per kind of Ember thread, installed before the guest
//! can reach the thread: a vCPU thread installs its filter before its first `KVM_RUN`, the main
//! thread right before it starts the device event loop. Each filter allows only what that thread
//! does from then on; the lists come from `strace -f` of real boots (test guests, a virtio-blk
//! guest, a Linux kernel) and from reading the code paths they take.
//!
//! A forbidden call is trapped rather than silently killed, so the user learns which call and
//! which thread: the SIGSYS handler writes one line to stderr and then makes a second forbidden
//! call; with SIGSYS blocked inside its own handler, the kernel then kills the whole process with
//! SIGSYS (exactly as SECCOMP_RET_KILL_PROCESS would, but after the explanation). Nothing else
//! runs on that path, so a terminal in raw mode stays raw (`reset` restores it): a violation is a
//! bug or an attack, not an exit path. `--seccomp off` skips all of this, for debugging.

use std::cell::Cell;
use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread: `KVM_RUN` and the register accesses it dispatches to devices.
    Vcpu,
    /// The main thread once set-up is over: the device event loop (console, virtio queues, exit
    /// events), then stopping the vCPUs, restoring the terminal and exiting.
    Main,
    /// The console output thread: writes queued guest output to stdout or a file.
    Console,
    /// A disk's I/O thread: its event loop (queue notifications), requests on its image.
    Disk,
    /// The main thread of an Ember serving an API socket: `Main`, plus removing the socket file
    /// at exit.
    MainWithApi,
    /// The API thread: accepts connections on the API socket, reads requests, writes replies.
    Api,
    /// The vsock device's I/O thread: its event loop, the host's Unix sockets (accepting,
    /// connecting to `<uds>_<port>`, reading and writing, shutting down).
    Vsock,
    /// The main thread of an Ember with a vsock device: `Main`, plus removing the listener's
    /// socket file at exit.
    MainWithVsock,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Main => "main (event loop)",
            ThreadKind::Console => "console output",
            ThreadKind::Disk => "disk I/O",
            ThreadKind::MainWithApi => "main (event loop, API)",
            ThreadKind::Api => "API",
            ThreadKind::Vsock => "vsock I/O",
            ThreadKind::MainWithVsock => "main (event loop, vsock)",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0} thread's system call filter: {1}")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot install the {0} thread's system call filter: {1} (try --seccomp off)")]
    Install(&'static str, #[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler for the system call filters: {0}")]
    SignalHandler(#[source] std::io::Error),
}

// ioctl requests, from <linux/kvm.h> and <asm-generic/ioctls.h>.
const KVM_RUN: u64 = 0xae80;

/// The reads a snapshot makes of a paused VM: each vCPU's state on its own thread, the
/// irqchip, PIT and clock on the main thread.
mod snapshot_ioctls {
    #![allow(non_snake_case)]
    use kvm_bindings::{
        kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
        kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
        kvm_xsave,
    };
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

    const KVMIO: u32 = 0xae;
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);

    pub fn vcpu() -> Vec<u64> {
        vec![
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_MSRS(),
            KVM_GET_FPU(),
            KVM_GET_LAPIC(),
            KVM_GET_CPUID2(),
            KVM_GET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_TSC_KHZ(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
            KVM_GET_XSAVE2(),
        ]
    }

    pub fn vm() -> Vec<u64> {
        vec![KVM_GET_IRQCHIP(), KVM_GET_CLOCK(), KVM_GET_PIT2()]
    }
}
const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;

/// Made by the SIGSYS handler to have the process killed; never allowed by any filter (a unit
/// test checks).
const DEATH_SYSCALL: i64 = libc::SYS_getppid;

/// System calls a thread of `kind` may make without conditions on their arguments.
fn plain_syscalls(kind: ThreadKind) -> Vec<i64> {
    // Both kinds: memory management for the allocator (no executable mappings, see
    // `conditional_rules`), locks, the vCPU kick signal and the stop signals (whose handler writes
    // an eventfd on whichever thread it lands), logging to stderr, thread and process exit, and
    // what `abort` needs should Ember ever panic.
    let mut calls = vec![
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_clock_gettime,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_exit,
        libc::SYS_exit_group,
        // std seeds a thread's first HashMap from getrandom (falling back to opening
        // /dev/urandom, which no filter allows); nothing Ember runs after set-up is known to,
        // but a dependency may.
        libc::SYS_getrandom,
    ];
    match kind {
        // Port and MMIO exits run device code here: serial output goes to its sink (stdout or a
        // file; to a pipe or socket with RWF_NOWAIT, see `console`), interrupts and notifications
        // are eventfd writes. Closing the vCPU fd at the end.
        ThreadKind::Vcpu => calls.push(libc::SYS_pwritev2),
        ThreadKind::Console => {}
        ThreadKind::Main | ThreadKind::MainWithApi | ThreadKind::MainWithVsock => {
            calls.extend([
                // The event loop and its eventfds, stdin.
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
                libc::SYS_read,
                // Stopping the vCPU threads: kick, wait, join.
                libc::SYS_clock_nanosleep,
                libc::SYS_nanosleep,
            ]);
            if kind == ThreadKind::MainWithVsock {
                // The vsock listener's socket file goes when Ember does.
                calls.extend([libc::SYS_unlink, libc::SYS_unlinkat]);
            }
            if kind == ThreadKind::MainWithApi {
                calls.extend([
                    // The API socket's file (and a vsock listener's) goes when Ember does.
                    libc::SYS_unlink,
                    libc::SYS_unlinkat,
                    // Snapshots: the state and memory files are created and written.
                    libc::SYS_openat,
                    libc::SYS_pwrite64,
                    libc::SYS_ftruncate,
                    libc::SYS_fsync,
                    libc::SYS_fdatasync,
                    libc::SYS_statx,
                    libc::SYS_newfstatat,
                    libc::SYS_fstat,
                    libc::SYS_lseek,
                    // A tmp overlay captured into the snapshot: the base's fingerprint is read,
                    // the written blocks copied (copy_file_range, or reads and writes), and a
                    // relative base path made absolute for the capture's header.
                    libc::SYS_pread64,
                    libc::SYS_copy_file_range,
                    libc::SYS_getcwd,
                ]);
            }
        }
        ThreadKind::Api => calls.extend([
            // One connection at a time: accept, its read timeout, requests in, replies out.
            libc::SYS_accept4,
            libc::SYS_accept,
            libc::SYS_setsockopt,
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_writev,
        ]),
        ThreadKind::Disk => calls.extend([
            // Its event loop and the queue eventfds.
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_read,
            // virtio-blk requests on the image.
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_fdatasync,
            libc::SYS_fsync,
            libc::SYS_fallocate,
        ]),
        ThreadKind::Vsock => calls.extend([
            // Its event loop, the queue eventfds and the host sockets' own epoll set.
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_read,
            // Host clients on the listener; the guest's connections to `<uds>_<port>` (the
            // socket itself is allowed for AF_UNIX only, see `conditional_rules`).
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_shutdown,
        ]),
    }
    calls
}

fn cond(
    arg: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
}

/// Calls allowed only with certain arguments.
fn conditional_rules(
    kind: ThreadKind,
) -> Result<Vec<(i64, Vec<SeccompRule>)>, seccompiler::BackendError> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u64;
    let no_exec = || cond(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0);
    let ioctl_requests: Vec<u64> = match kind {
        // KVM_RUN, and reading the vCPU's state for a snapshot while the VM is paused.
        ThreadKind::Vcpu => [KVM_RUN]
            .into_iter()
            .chain(snapshot_ioctls::vcpu())
            .collect(),
        ThreadKind::Console | ThreadKind::Disk | ThreadKind::Api | ThreadKind::Vsock => Vec::new(),
        // Restoring the terminal on exit.
        ThreadKind::Main | ThreadKind::MainWithVsock => vec![TCGETS, TCSETS],
        // And a snapshot's irqchip, PIT and clock.
        ThreadKind::MainWithApi => [TCGETS, TCSETS]
            .into_iter()
            .chain(snapshot_ioctls::vm())
            .collect(),
    };
    let mut rules = vec![
        // The allocator maps memory; nothing in Ember maps code after start-up.
        (libc::SYS_mmap, vec![SeccompRule::new(vec![no_exec()?])?]),
        (
            libc::SYS_mprotect,
            vec![SeccompRule::new(vec![no_exec()?])?],
        ),
        (
            libc::SYS_ioctl,
            ioctl_requests
                .iter()
                .map(|&r| SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, r)?]))
                .collect::<Result<_, _>>()?,
        ),
        // Debug builds of std check a descriptor with F_GETFD before closing it.
        (
            libc::SYS_fcntl,
            vec![SeccompRule::new(vec![cond(
                1,
                SeccompCmpOp::Eq,
                libc::F_GETFD as u64,
            )?])?],
        ),
        // Signals only to Ember's own threads (the vCPU kick; abort).
        (
            libc::SYS_tgkill,
            vec![SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, pid)?])?],
        ),
    ];
    if kind == ThreadKind::Vsock {
        // Unix sockets only: no network socket, whatever a compromised device thread wants.
        rules.push((
            libc::SYS_socket,
            vec![SeccompRule::new(vec![cond(
                0,
                SeccompCmpOp::Eq,
                libc::AF_UNIX as u64,
            )?])?],
        ));
    }
    // To seccompiler a call with no rules is allowed whatever its arguments: a thread that may
    // make no ioctl at all must not get the entry.
    rules.retain(|(_, r)| !r.is_empty());
    Ok(rules)
}

/// The reaper's filter (reaper.rs): what it does after its first instruction, and nothing else.
/// A refused call kills the reaper alone (it is a process of its own), which only makes Ember's
/// exit slower; there is no SIGSYS handler to run in it.
pub fn reaper_filter() -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build("reaper", e);
    let rules: BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_close_range,
        libc::SYS_prctl,
        libc::SYS_poll,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
    ]
    .into_iter()
    .map(|nr| (nr, Vec::new()))
    .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// The BPF program for a thread of `kind`. Built before forking in tests, since building
/// allocates.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build(kind.name(), e);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = plain_syscalls(kind)
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    rules.extend(conditional_rules(kind).map_err(build)?);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// Installs `program` (from [`filter`]) on the calling thread. Does not allocate, so a test may
/// call it in a forked child.
pub fn apply(kind: ThreadKind, program: &BpfProgram) -> Result<(), SeccompError> {
    install_sigsys_handler()?;
    THREAD_KIND.with(|k| k.set(Some(kind)));
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(kind.name(), e))
}

/// Restricts the calling thread to the system calls a thread of `kind` needs.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let program = filter(kind)?;
    apply(kind, &program)?;
    log::debug!("seccomp: {} thread filter installed", kind.name());
    Ok(())
}

thread_local! {
    static THREAD_KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; the handler only calls async-signal-safe functions.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::SignalHandler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// `si_syscall` of a SIGSYS siginfo (the libc crate has no accessor): after si_signo, si_errno,
/// si_code and padding (16 bytes) comes `_sigsys { void *_call_addr; int _syscall; ... }`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo; the offset is inside it (128 bytes).
    let nr = unsafe {
        (info as *const u8)
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    // A const-initialised thread local without a destructor: a plain TLS read.
    let kind = THREAD_KIND
        .with(|k| k.get())
        .map_or("an Ember", ThreadKind::name);
    let mut line = LineBuf::new();
    line.push(b"ember: error: seccomp: the ");
    line.push(kind.as_bytes());
    line.push(b" thread made system call ");
    line.push_num(nr as i64);
    if let Some(name) = syscall_name(nr as i64) {
        line.push(b" (");
        line.push(name.as_bytes());
        line.push(b")");
    }
    line.push(b", which its filter forbids; Ember stops (--seccomp off disables the filters)\n");
    // SAFETY: write(2) is async-signal-safe and allowed by every filter; the buffer is ours.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        // SIGSYS is blocked while this handler runs, so this second forbidden call makes the
        // kernel kill the process with SIGSYS.
        libc::syscall(DEATH_SYSCALL);
        // Only reached if the filter somehow allowed it: still do not return into the
        // forbidden call's caller.
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// A fixed buffer for the handler's line: no allocation in a signal handler.
struct LineBuf {
    buf: [u8; 256],
    len: usize,
}

impl LineBuf {
    fn new() -> Self {
        LineBuf {
            buf: [0; 256],
            len: 0,
        }
    }

    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, v: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut u = v.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (u % 10) as u8;
            u /= 10;
            if u == 0 {
                break;
            }
        }
        if v < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

/// Names of the calls a compromised or buggy thread is most likely to try.
fn syscall_name(nr: i64) -> Option<&'static str> {
    Some(match nr {
        libc::SYS_read => "read",
        libc::SYS_open => "open",
        libc::SYS_openat => "openat",
        libc::SYS_ioctl => "ioctl",
        libc::SYS_mmap => "mmap",
        libc::SYS_mprotect => "mprotect",
        libc::SYS_socket => "socket",
        libc::SYS_connect => "connect",
        libc::SYS_bind => "bind",
        libc::SYS_accept4 => "accept4",
        libc::SYS_shutdown => "shutdown",
        libc::SYS_unlink => "unlink",
        libc::SYS_clone => "clone",
        libc::SYS_clone3 => "clone3",
        libc::SYS_fork => "fork",
        libc::SYS_vfork => "vfork",
        libc::SYS_execve => "execve",
        libc::SYS_execveat => "execveat",
        libc::SYS_kill => "kill",
        libc::SYS_tgkill => "tgkill",
        libc::SYS_ptrace => "ptrace",
        libc::SYS_rt_sigaction => "rt_sigaction",
        libc::SYS_epoll_wait => "epoll_wait",
        libc::SYS_epoll_ctl => "epoll_ctl",
        libc::SYS_pread64 => "pread64",
        libc::SYS_pwrite64 => "pwrite64",
        libc::SYS_fdatasync => "fdatasync",
        libc::SYS_fallocate => "fallocate",
        libc::SYS_lseek => "lseek",
        libc::SYS_newfstatat => "newfstatat",
        libc::SYS_statx => "statx",
        libc::SYS_clock_nanosleep => "clock_nanosleep",
        libc::SYS_getppid => "getppid",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    /// Forks; the child installs `kind`'s filter, runs `body` and exits 0 if `body` returns.
    /// Returns the child's wait status and what it wrote to stderr.
    fn in_filtered_child(kind: ThreadKind, body: fn()) -> (libc::c_int, String) {
        let program = filter(kind).unwrap();
        let mut fds = [0; 2];
        // SAFETY: plain pipe/fork/dup2/waitpid; the child only makes system calls and does not
        // allocate (the program was built before the fork).
        unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::dup2(fds[1], 2);
                libc::close(fds[0]);
                if apply(kind, &program).is_err() {
                    libc::_exit(99);
                }
                body();
                libc::_exit(0);
            }
            libc::close(fds[1]);
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            let mut err = String::new();
            std::fs::File::from_raw_fd(fds[0])
                .read_to_string(&mut err)
                .unwrap();
            (status, err)
        }
    }

    fn killed_by_sigsys(status: libc::c_int) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    #[test]
    fn vcpu_thread_cannot_open_a_socket() {
        let (status, err) = in_filtered_child(ThreadKind::Vcpu, || unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        });
        assert!(
            killed_by_sigsys(status),
            "wait status {status:#x}, stderr: {err}"
        );
        assert!(
            err.contains("ember: error: seccomp: the vCPU thread made system call")
                && err.contains("(socket)")
                && err.contains("--seccomp off"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    #[test]
    fn vcpu_thread_cannot_exec_or_read_files() {
        let (status, _) = in_filtered_child(ThreadKind::Vcpu, || unsafe {
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), std::ptr::null());
        });
        assert!(killed_by_sigsys(status), "{status:#x}");
        let (status, err) = in_filtered_child(ThreadKind::Vcpu, || unsafe {
            libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY);
        });
        assert!(killed_by_sigsys(status), "{status:#x} {err}");
    }

    #[test]
    fn vcpu_thread_may_only_run_the_vcpu_ioctl() {
        // TCGETS on stdin is harmless but not something a vCPU does.
        let (status, err) = in_filtered_child(ThreadKind::Vcpu, || unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            libc::ioctl(0, libc::TCGETS, &mut t);
        });
        assert!(killed_by_sigsys(status), "{status:#x}");
        assert!(err.contains("(ioctl)"), "{err}");
        // KVM_RUN itself passes the filter (and fails on a non-KVM fd with an error, not a kill).
        let (status, err) = in_filtered_child(ThreadKind::Vcpu, || unsafe {
            libc::ioctl(0, KVM_RUN as _, 0);
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x} {err}"
        );
    }

    #[test]
    fn the_console_thread_writes_and_may_make_no_ioctl() {
        let (status, err) = in_filtered_child(ThreadKind::Console, || unsafe {
            let msg = b"guest output\n";
            libc::write(2, msg.as_ptr().cast(), msg.len());
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x} {err}"
        );
        let (status, err) = in_filtered_child(ThreadKind::Console, || unsafe {
            libc::ioctl(0, KVM_RUN as _, 0);
        });
        assert!(killed_by_sigsys(status), "KVM_RUN: {status:#x} {err}");
        let (status, err) = in_filtered_child(ThreadKind::Console, || unsafe {
            libc::ioctl(0, TCSETS as _, 0);
        });
        assert!(killed_by_sigsys(status), "TCSETS: {status:#x} {err}");
        let (status, _) = in_filtered_child(ThreadKind::Console, || unsafe {
            libc::read(0, std::ptr::null_mut(), 0);
        });
        assert!(killed_by_sigsys(status), "{status:#x}");
    }

    #[test]
    fn filtered_threads_can_do_their_work() {
        // Creating eventfds is set-up work, done before any filter.
        let (status, err) = in_filtered_child(ThreadKind::Vcpu, || unsafe {
            libc::eventfd(0, 0);
        });
        assert!(killed_by_sigsys(status), "{status:#x} {err}");

        // What a vCPU thread does on a serial write, and what its allocator does.
        let (status, err) = in_filtered_child(ThreadKind::Vcpu, || unsafe {
            let msg = b"serial byte\n";
            libc::write(2, msg.as_ptr().cast(), msg.len());
            let p = libc::mmap(
                std::ptr::null_mut(),
                1 << 20,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            libc::munmap(p, 1 << 20);
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x} {err}"
        );
        assert_eq!(err, "serial byte\n");

        // Console output written straight to a pipe, never waiting (console.rs).
        let (status, err) = in_filtered_child(ThreadKind::Vcpu, || unsafe {
            let msg = b"no wait\n";
            let iov = libc::iovec {
                iov_base: msg.as_ptr() as *mut libc::c_void,
                iov_len: msg.len(),
            };
            libc::pwritev2(2, &iov, 1, -1, libc::RWF_NOWAIT);
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x} {err}"
        );
        assert_eq!(err, "no wait\n");

        let (status, err) = in_filtered_child(ThreadKind::Disk, || unsafe {
            let ep = 0; // not an epoll fd: EBADF/EINVAL, but allowed
            let mut ev: [libc::epoll_event; 1] = std::mem::zeroed();
            libc::epoll_wait(ep, ev.as_mut_ptr(), 1, 0);
            let mut b = [0u8; 1];
            libc::pread64(0, b.as_mut_ptr().cast(), 1, 0);
            libc::fdatasync(0);
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x} {err}"
        );
        // Disk I/O is the disk threads' alone.
        let (status, _) = in_filtered_child(ThreadKind::Main, || unsafe {
            libc::fdatasync(0);
        });
        assert!(killed_by_sigsys(status), "{status:#x}");

        let (status, err) = in_filtered_child(ThreadKind::Main, || unsafe {
            let ep = 0; // not an epoll fd: EBADF/EINVAL, but allowed
            let mut ev: [libc::epoll_event; 1] = std::mem::zeroed();
            libc::epoll_wait(ep, ev.as_mut_ptr(), 1, 0);
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 1000,
            };
            libc::nanosleep(&ts, std::ptr::null_mut());
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x} {err}"
        );
    }

    #[test]
    fn main_thread_cannot_map_code_or_signal_other_processes() {
        let (status, err) = in_filtered_child(ThreadKind::Main, || unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
        });
        assert!(killed_by_sigsys(status), "{status:#x}");
        assert!(
            err.contains("the main (event loop) thread") && err.contains("(mmap)"),
            "{err}"
        );
        let (status, err) = in_filtered_child(ThreadKind::Main, || unsafe {
            // pid 1's thread 1: another process.
            libc::syscall(libc::SYS_tgkill, 1, 1, 0);
        });
        assert!(killed_by_sigsys(status), "{status:#x} {err}");
        let (status, err) = in_filtered_child(ThreadKind::Main, || unsafe {
            libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        });
        assert!(killed_by_sigsys(status), "{status:#x} {err}");
    }

    #[test]
    fn the_vsock_thread_makes_unix_sockets_only_and_no_disk_io() {
        let (status, err) = in_filtered_child(ThreadKind::Vsock, || unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
            let addr: libc::sockaddr_un = std::mem::zeroed();
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            );
            libc::accept4(fd, std::ptr::null_mut(), std::ptr::null_mut(), 0);
            let mut b = [0u8; 1];
            libc::recv(fd, b.as_mut_ptr().cast(), 1, 0);
            libc::send(fd, b.as_ptr().cast(), 1, 0);
            libc::shutdown(fd, libc::SHUT_WR);
            libc::close(fd);
            let mut ev: [libc::epoll_event; 1] = std::mem::zeroed();
            libc::epoll_wait(0, ev.as_mut_ptr(), 1, 0);
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x} {err}"
        );
        let (status, err) = in_filtered_child(ThreadKind::Vsock, || unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        });
        assert!(killed_by_sigsys(status), "{status:#x} {err}");
        assert!(
            err.contains("the vsock I/O thread") && err.contains("(socket)"),
            "{err}"
        );
        let (status, _) = in_filtered_child(ThreadKind::Vsock, || unsafe {
            let mut b = [0u8; 1];
            libc::pread64(0, b.as_mut_ptr().cast(), 1, 0);
        });
        assert!(killed_by_sigsys(status), "{status:#x}");
        let (status, _) = in_filtered_child(ThreadKind::Vsock, || unsafe {
            libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY);
        });
        assert!(killed_by_sigsys(status), "{status:#x}");
        // The main thread removes the listener's file at exit, and opens nothing.
        let (status, err) = in_filtered_child(ThreadKind::MainWithVsock, || unsafe {
            libc::unlink(c"/nonexistent/ember-vsock".as_ptr());
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x} {err}"
        );
        let (status, _) = in_filtered_child(ThreadKind::MainWithVsock, || unsafe {
            libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY);
        });
        assert!(killed_by_sigsys(status), "{status:#x}");
        let (status, _) = in_filtered_child(ThreadKind::Main, || unsafe {
            libc::unlink(c"/nonexistent/ember-vsock".as_ptr());
        });
        assert!(killed_by_sigsys(status), "{status:#x}");
    }

    #[test]
    fn the_death_call_is_forbidden_everywhere() {
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::Main,
            ThreadKind::Vsock,
            ThreadKind::MainWithVsock,
        ] {
            assert!(!plain_syscalls(kind).contains(&DEATH_SYSCALL));
            assert!(conditional_rules(kind)
                .unwrap()
                .iter()
                .all(|(nr, _)| *nr != DEATH_SYSCALL));
        }
    }

    #[test]
    fn handler_line_formats_numbers() {
        let mut l = LineBuf::new();
        l.push_num(0);
        l.push(b" ");
        l.push_num(-41);
        l.push(b" ");
        l.push_num(i64::MAX);
        assert_eq!(&l.buf[..l.len], b"0 -41 9223372036854775807");
    }
}

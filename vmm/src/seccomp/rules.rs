//! The rules of Ember's system call filters: which calls each kind of thread may make, and with
//! which arguments. The build script compiles them into BPF (so no filter is built at start-up),
//! and a unit test checks that what it compiled is what these rules give, so the two cannot drift.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::ThreadKind;

// ioctl requests, from <linux/kvm.h> and <asm-generic/ioctls.h>.
pub(crate) const KVM_RUN: u64 = 0xae80;

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
pub(crate) const TCGETS: u64 = 0x5401;
pub(crate) const TCSETS: u64 = 0x5402;

/// System calls a thread of `kind` may make without conditions on their arguments.
pub(crate) fn plain_syscalls(kind: ThreadKind) -> Vec<i64> {
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

/// The kernel reads every argument the rules look at as 32 bits (an ioctl's request, fcntl's
/// command, a pid, a socket family) or only a low bit of it (PROT_EXEC in `prot`), so comparing
/// the lower half of the register is exactly its view, in half the instructions of a 64-bit
/// compare: the vCPU thread's program went from 240 to 202, and the kernel's work to install a
/// filter, which the vCPU thread does just before the guest's first instruction, grows with it.
fn cond(
    arg: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

/// Calls allowed only with certain arguments; `pid` is Ember's process, the only one its threads
/// may signal.
pub(crate) fn conditional_rules(
    kind: ThreadKind,
    pid: u64,
) -> Result<Vec<(i64, Vec<SeccompRule>)>, seccompiler::BackendError> {
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
pub(crate) fn reaper_program() -> Result<BpfProgram, seccompiler::BackendError> {
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
    )?;
    BpfProgram::try_from(filter)
}

/// The BPF program for a thread of `kind` in process `pid`: a forbidden call traps (SIGSYS).
pub(crate) fn program(kind: ThreadKind, pid: u64) -> Result<BpfProgram, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = plain_syscalls(kind)
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    rules.extend(conditional_rules(kind, pid)?);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    BpfProgram::try_from(filter)
}

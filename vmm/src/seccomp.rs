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

use seccompiler::{sock_filter, BpfProgram};

mod kind;
#[cfg(test)]
mod rules;

pub use kind::ThreadKind;

// The programs build.rs compiled from rules.rs: `compiled(kind)` and `REAPER`.
include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));

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
    #[error("cannot install the {0} thread's system call filter: {1} (try --seccomp off)")]
    Install(&'static str, #[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler for the system call filters: {0}")]
    SignalHandler(#[source] std::io::Error),
}

/// Made by the SIGSYS handler to have the process killed; never allowed by any filter (a unit
/// test checks).
const DEATH_SYSCALL: i64 = libc::SYS_getppid;

/// The reaper's filter (reaper.rs, rules.rs): a refused call kills the reaper alone.
pub fn reaper_filter() -> &'static [sock_filter] {
    &REAPER
}

/// The BPF program for a thread of `kind`: the compiled one with this process's pid put in.
pub fn filter(kind: ThreadKind) -> BpfProgram {
    with_pid(kind, std::process::id())
}

fn with_pid(kind: ThreadKind, pid: u32) -> BpfProgram {
    let (compiled, pid_at) = compiled(kind);
    let mut program = compiled.to_vec();
    for &i in pid_at {
        program[i].k = pid;
    }
    program
}

/// Installs `program` (from [`filter`]) on the calling thread. Does not allocate, so a test may
/// call it in a forked child.
pub fn apply(kind: ThreadKind, program: &[sock_filter]) -> Result<(), SeccompError> {
    install_sigsys_handler()?;
    THREAD_KIND.with(|k| k.set(Some(kind)));
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(kind.name(), e))
}

/// Restricts the calling thread to the system calls a thread of `kind` needs.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    apply(kind, &filter(kind))?;
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
    use super::rules::{conditional_rules, plain_syscalls, KVM_RUN, TCSETS};
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    /// Forks; the child installs `kind`'s filter, runs `body` and exits 0 if `body` returns.
    /// Returns the child's wait status and what it wrote to stderr.
    fn in_filtered_child(kind: ThreadKind, body: fn()) -> (libc::c_int, String) {
        let program = filter(kind);
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
        // The filter reads the request as the kernel does, from the lower 32 bits: junk above
        // them changes nothing either way.
        let (status, _) = in_filtered_child(ThreadKind::Vcpu, || unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            libc::syscall(libc::SYS_ioctl, 0, (1u64 << 32) | libc::TCGETS, &mut t);
        });
        assert!(killed_by_sigsys(status), "{status:#x}");
        let (status, err) = in_filtered_child(ThreadKind::Vcpu, || unsafe {
            libc::syscall(libc::SYS_ioctl, 0, (7u64 << 32) | KVM_RUN, 0);
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x} {err}"
        );
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
        for kind in kind::ALL {
            assert!(!plain_syscalls(kind).contains(&DEATH_SYSCALL));
            assert!(conditional_rules(kind, u64::from(std::process::id()))
                .unwrap()
                .iter()
                .all(|(nr, _)| *nr != DEATH_SYSCALL));
        }
    }

    #[test]
    fn the_compiled_filters_are_what_the_rules_give() {
        // Any pid, including the largest Linux allows, lands where the rules put it.
        for pid in [std::process::id(), 1, (1 << 22) - 1] {
            for kind in kind::ALL {
                assert_eq!(
                    with_pid(kind, pid),
                    rules::program(kind, u64::from(pid)).unwrap(),
                    "{kind:?}, pid {pid}"
                );
            }
        }
        assert_eq!(
            filter(ThreadKind::Vcpu),
            with_pid(ThreadKind::Vcpu, std::process::id())
        );
        assert_eq!(reaper_filter(), rules::reaper_program().unwrap().as_slice());
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

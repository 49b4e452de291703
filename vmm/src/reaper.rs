//! Deferred VM teardown.
//!
//! When the last reference to a KVM VM goes, the kernel unregisters each in-kernel device (PIC,
//! IOAPIC, PIT, ...) and waits for an SRCU grace period after each; when the last user of the
//! address space that holds guest memory goes, KVM's MMU notifier flushes the shadow pages and
//! waits for another grace period. On a `kvm_pvm` host each costs 5-25 ms, several times the
//! whole run of a small guest, and a process is not reported as exited before both are done.
//!
//! So once the VM's vCPUs run Ember starts a reaper: a process that shares Ember's address
//! space (`CLONE_VM`, not a thread) and holds one more reference to the VM and nothing else.
//! Ember then exits as soon as the guest is gone, as neither the VM nor the address space ends
//! with it. The reaper waits on a pidfd until Ember's exit is complete and then exits itself, and
//! the kernel does both teardowns in the reaper. If Ember is killed, its pidfd says so all the
//! same.
//!
//! Whoever lets go of the VM or the address space last pays for its teardown. A forked reaper
//! (its own address space) left Ember's to KVM's `kvm-nx-lpage-recovery` worker, a thread of
//! Ember's, and a pipe's EOF reaches the reaper while Ember's threads are still exiting: each
//! lost the race about 1 exit in 12 (10-20 ms instead of ~4.5). A pidfd is readable only once
//! every thread of Ember is gone.

use std::io;
use std::os::fd::RawFd;

/// The reaper's stack; it runs in Ember's address space, so it cannot use Ember's.
const STACK_SIZE: usize = 64 * 1024;

/// What the reaper needs to start: its descriptors and, with `--seccomp on`, its filter.
#[repr(C)]
struct Start {
    vm_fd: RawFd,
    ember: RawFd,
    /// A `sock_fprog` for seccomp(2), or null.
    filter: *const libc::sock_fprog,
}

const _: () = assert!(
    std::mem::size_of::<seccompiler::sock_filter>() == std::mem::size_of::<libc::sock_filter>()
        && std::mem::align_of::<seccompiler::sock_filter>()
            == std::mem::align_of::<libc::sock_filter>()
);

/// Starts the reaper. Ember calls it once the vCPUs run; the reaper makes only raw system calls
/// and closes every descriptor but its two, so the other threads cannot disturb it. With
/// `seccomp`, its first act is to put itself under `seccomp::reaper_filter()`.
pub fn spawn(vm_fd: RawFd, seccomp: bool) -> io::Result<()> {
    // Built here, where allocating is fine, and never freed: the reaper reads it from memory it
    // shares with Ember, possibly after Ember has moved on. The program itself is static.
    let filter: *const libc::sock_fprog = if seccomp {
        let program = crate::seccomp::reaper_filter();
        Box::leak(Box::new(libc::sock_fprog {
            len: u16::try_from(program.len()).map_err(io::Error::other)?,
            // seccompiler's sock_filter is the kernel's struct, as libc's is (asserted below).
            filter: program.as_ptr().cast::<libc::sock_filter>().cast_mut(),
        }))
    } else {
        std::ptr::null()
    };
    // SAFETY: pidfd_open on our own pid; it returns a new descriptor or -1.
    let ember = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if ember < 0 {
        return Err(io::Error::last_os_error());
    }
    let ember = ember as RawFd;
    // Never unmapped: the reaper may use it until it exits, after Ember.
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        let err = io::Error::last_os_error();
        // SAFETY: the descriptor is ours.
        unsafe { libc::close(ember) };
        return Err(err);
    }
    let start: &'static Start = Box::leak(Box::new(Start {
        vm_fd,
        ember,
        filter,
    }));
    // SAFETY: the child runs `reaper` on its own stack (the top of the mapping above) and makes
    // only raw system calls, never touching memory Ember uses (errno included); `start` and the
    // filter it points to are never freed.
    let pid = unsafe {
        libc::clone(
            reaper,
            stack.cast::<u8>().add(STACK_SIZE).cast(),
            libc::CLONE_VM | libc::SIGCHLD,
            start as *const Start as *mut libc::c_void,
        )
    };
    let err = io::Error::last_os_error();
    // SAFETY: our copy of the pidfd; the reaper has its own.
    unsafe { libc::close(ember) };
    if pid < 0 {
        // SAFETY: no reaper runs on the stack.
        unsafe { libc::munmap(stack, STACK_SIZE) };
        return Err(err);
    }
    Ok(())
}

/// The reaper's whole life. It shares Ember's memory but not its descriptor table, so it keeps
/// the VM and Ember's pidfd and closes the rest (the terminal, pipes a caller waits on for EOF,
/// /dev/kvm).
extern "C" fn reaper(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `spawn` passes a leaked, never-freed `Start`.
    let start = unsafe { &*(arg as *const Start) };
    if !start.filter.is_null() {
        // Before anything else. No new privileges is what seccomp(2) asks of an unprivileged
        // caller; a reaper that cannot be filtered exits (Ember's exit is only slower).
        let filtered = raw_syscall(libc::SYS_prctl, [libc::PR_SET_NO_NEW_PRIVS as usize, 1, 0])
            == 0
            && raw_syscall(
                libc::SYS_seccomp,
                [
                    libc::SECCOMP_SET_MODE_FILTER as usize,
                    0,
                    start.filter as usize,
                ],
            ) == 0;
        if !filtered {
            raw_syscall(libc::SYS_exit, [1, 0, 0]);
        }
    }
    let vm_fd = start.vm_fd as u32 as usize;
    let ember = start.ember as u32 as usize;
    let keep = [vm_fd.min(ember), vm_fd.max(ember)];
    let mut from = 0usize;
    for k in keep {
        if k > from {
            raw_syscall(libc::SYS_close_range, [from, k - 1, 0]);
        }
        from = k + 1;
    }
    raw_syscall(libc::SYS_close_range, [from, u32::MAX as usize, 0]);
    let name = c"ember-reaper";
    raw_syscall(
        libc::SYS_prctl,
        [libc::PR_SET_NAME as usize, name.as_ptr() as usize, 0],
    );
    let mut pfd = libc::pollfd {
        fd: ember as libc::c_int,
        events: libc::POLLIN,
        revents: 0,
    };
    // POLLIN: Ember has exited. A signal wakes the poll with EINTR: wait again. Any other error
    // ends the reaper, which only makes Ember's exit slower, never unsafe.
    loop {
        let n = raw_syscall(
            libc::SYS_poll,
            [&mut pfd as *mut libc::pollfd as usize, 1, -1isize as usize],
        );
        if n != -(libc::EINTR as isize) {
            break;
        }
    }
    raw_syscall(libc::SYS_exit, [0, 0, 0]);
    0
}

/// A system call that returns -errno instead of writing errno: the reaper shares Ember's
/// thread-local storage, and glibc's wrappers would write Ember's main thread's errno. The
/// fourth and fifth arguments are zero (prctl checks them).
fn raw_syscall(nr: libc::c_long, args: [usize; 3]) -> isize {
    let ret: isize;
    // SAFETY: the x86_64 system call ABI: number in rax, arguments in rdi, rsi, rdx, r10, r8;
    // rcx and r11 are clobbered. Callers pass valid arguments for `nr`.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") args[0],
            in("rsi") args[1],
            in("rdx") args[2],
            in("r10") 0usize,
            in("r8") 0usize,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

//! Deferred VM teardown.
//!
//! When the last reference to a KVM VM goes, the kernel unregisters each in-kernel device (PIC,
//! IOAPIC, PIT, ...) and waits for an SRCU grace period after each. On a `kvm_pvm` host that adds
//! up to ~25 ms, several times the whole run of a small guest, and a process cannot exit before
//! its descriptors are closed. So right after creating the VM Ember forks a reaper that holds
//! one more reference to the VM and nothing else. Ember then exits as soon as the guest is gone;
//! the reaper sees Ember's end of a pipe close and exits, and the kernel finishes the teardown
//! in the background. If Ember is killed, the pipe closes all the same.

use std::io;
use std::os::fd::RawFd;

/// Forks the reaper. Call before any other thread starts; the child only makes async-signal-safe
/// system calls.
pub fn spawn(vm_fd: RawFd) -> io::Result<()> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let [read_end, write_end] = fds;
    // SAFETY: the child below makes only async-signal-safe calls and ends with _exit.
    match unsafe { libc::fork() } {
        -1 => {
            let err = io::Error::last_os_error();
            // SAFETY: both descriptors are ours.
            unsafe {
                libc::close(read_end);
                libc::close(write_end);
            }
            Err(err)
        }
        0 => {
            // SAFETY: only close, prctl, read and _exit, on descriptors this process owns.
            unsafe {
                // Keep the VM and the pipe's read end, drop everything else (the terminal,
                // pipes a caller waits on for EOF, /dev/kvm).
                let keep = [vm_fd.min(read_end), vm_fd.max(read_end)];
                let mut from: libc::c_uint = 0;
                for k in keep {
                    if k as libc::c_uint > from {
                        libc::syscall(libc::SYS_close_range, from, k as libc::c_uint - 1, 0);
                    }
                    from = k as libc::c_uint + 1;
                }
                libc::syscall(libc::SYS_close_range, from, libc::c_uint::MAX, 0);
                libc::prctl(libc::PR_SET_NAME, c"ember-reaper".as_ptr());
                let mut b = 0u8;
                while libc::read(read_end, &mut b as *mut u8 as *mut libc::c_void, 1) < 0 {}
                libc::_exit(0);
            }
        }
        _ => {
            // The write end stays open, unused, until Ember exits.
            // SAFETY: the read end belongs to the child now.
            unsafe { libc::close(read_end) };
            Ok(())
        }
    }
}

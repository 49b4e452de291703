//! SIGINT, SIGTERM and SIGHUP stop the VM: the handler records which signal came first and wakes
//! the event loop through an eventfd, which then ends the VM with that signal's status (128+N).
//!
//! The signal number travels apart from the wake-up: an eventfd adds what is written to it, so
//! two signals in a row once read back as their sum (SIGHUP then SIGTERM exited 144). Later
//! signals only wake the loop again; the first one decides the status.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// The eventfd the handler writes to; -1 until installed.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// The first stop signal received; 0 until then.
static FIRST: AtomicI32 = AtomicI32::new(0);

pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn on_stop_signal(signo: libc::c_int) {
    let _ = FIRST.compare_exchange(0, signo, Ordering::SeqCst, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) is async-signal-safe; `one` lives for the call.
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

/// Routes the stop signals to `wake`. The eventfd must outlive the process's use of signals
/// (Ember keeps it until exit).
pub fn install(wake: &EventFd) {
    WAKE_FD.store(wake.as_raw_fd(), Ordering::SeqCst);
    for sig in STOP_SIGNALS {
        // SAFETY: a plain handler that only uses atomics and write(2).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            // The other stop signals wait while one is handled: delivered at once, the later
            // one's handler would run on top of the first and record itself first.
            libc::sigemptyset(&mut sa.sa_mask);
            for other in STOP_SIGNALS {
                libc::sigaddset(&mut sa.sa_mask, other);
            }
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Keeps the stop signals away from the calling thread, so that they all go to the main thread,
/// one at a time and in the order the kernel delivers them (a handler running on two threads at
/// once let the later signal win). Every thread Ember starts calls this first.
pub fn block_in_this_thread() {
    // SAFETY: a sigset filled by sigemptyset/sigaddset, and pthread_sigmask on the calling
    // thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in STOP_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// The first stop signal received, if any.
pub fn first() -> Option<i32> {
    match FIRST.load(Ordering::SeqCst) {
        0 => None,
        n => Some(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_two_signals_is_kept_and_the_loop_is_woken() {
        let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        install(&wake);
        assert_eq!(first(), None);
        on_stop_signal(libc::SIGHUP);
        on_stop_signal(libc::SIGTERM);
        assert_eq!(first(), Some(libc::SIGHUP));
        assert!(wake.read().unwrap() >= 1);
    }
}

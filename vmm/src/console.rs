//! Where the guest's serial output goes, and the terminal it comes from.
//!
//! Output is written through unbuffered: a UART emits a byte at a time and a user watching a
//! console expects to see each one. The writer also feeds the boot timeline (first byte, ready
//! marker).
//!
//! When the console's reader goes away (`ember run ... | head -1`, a closed terminal), nobody can
//! see the guest any more: Ember ends the VM and exits 141, as a pipeline stage killed by SIGPIPE
//! does, instead of running a guest whose output is thrown away.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use crate::timeline::{self, Phase};
use crate::vcpu::{ExitReason, VmControl};

pub struct ConsoleOut {
    sink: Box<dyn Write + Send>,
    marker: Option<MarkerScan>,
    ctl: Arc<VmControl>,
    reader_gone: bool,
}

impl ConsoleOut {
    pub fn new(
        sink: Box<dyn Write + Send>,
        ready_marker: Option<&str>,
        ctl: Arc<VmControl>,
    ) -> Self {
        ConsoleOut {
            sink,
            marker: ready_marker
                .filter(|m| !m.is_empty())
                .map(|m| MarkerScan::new(m.as_bytes())),
            ctl,
            reader_gone: false,
        }
    }

    /// Standard output as an unbuffered file, so each guest byte reaches the terminal at once.
    pub fn stdout() -> io::Result<File> {
        // SAFETY: dup returns a new descriptor that the File then owns alone.
        let fd = unsafe { libc::dup(io::stdout().as_raw_fd()) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor from dup, owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !buf.is_empty() {
            timeline::mark(Phase::FirstSerialByte);
        }
        if let Some(m) = &mut self.marker {
            if m.feed(buf) {
                timeline::mark(Phase::ReadyMarker);
                self.marker = None;
            }
        }
        if self.reader_gone {
            // The VM is stopping; what the guest writes meanwhile has no reader.
            return Ok(buf.len());
        }
        match self.sink.write_all(buf) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                log::debug!("console: the reader of the guest's output has gone; stopping");
                self.reader_gone = true;
                self.ctl.request_exit(ExitReason::Signal(libc::SIGPIPE));
                Ok(buf.len())
            }
            r => r.map(|()| buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.reader_gone {
            return Ok(());
        }
        self.sink.flush()
    }
}

/// Finds a marker in a byte stream that arrives a byte at a time.
struct MarkerScan {
    marker: Vec<u8>,
    window: Vec<u8>,
}

impl MarkerScan {
    fn new(marker: &[u8]) -> Self {
        MarkerScan {
            marker: marker.to_vec(),
            window: Vec::with_capacity(marker.len()),
        }
    }

    fn feed(&mut self, buf: &[u8]) -> bool {
        for &b in buf {
            if self.window.len() == self.marker.len() {
                self.window.remove(0);
            }
            self.window.push(b);
            if self.window == self.marker {
                return true;
            }
        }
        false
    }
}

/// Puts a terminal on stdin into raw mode for the life of the guest, so keys (Ctrl-C included)
/// reach the guest; restores it when dropped. Ember also restores it explicitly before exiting,
/// since a process exit skips nothing else.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Returns None when stdin is not a terminal.
    pub fn enter() -> io::Result<Option<Self>> {
        let fd = libc::STDIN_FILENO;
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data, filled in by tcgetattr.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and pointer.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: raw is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output processing: the host side of the console still wants \n -> \r\n for
        // Ember's own messages.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: valid fd and pointer.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(RawTerminal { saved }))
    }

    pub fn restore(&self) {
        // SAFETY: valid fd and the termios saved at entry.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        self.restore();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_found_across_writes() {
        let mut m = MarkerScan::new(b"ready");
        assert!(!m.feed(b"xxre"));
        assert!(!m.feed(b"a"));
        assert!(m.feed(b"dy\n"));
        let mut m = MarkerScan::new(b"aab");
        assert!(m.feed(b"aaab"));
    }

    struct ClosedPipe;
    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn a_closed_reader_ends_the_vm_as_sigpipe_would() {
        let ctl = Arc::new(VmControl::new().unwrap());
        let mut out = ConsoleOut::new(Box::new(ClosedPipe), None, ctl.clone());
        assert_eq!(out.write(b"x").unwrap(), 1);
        assert!(matches!(
            ctl.reason(),
            Some(ExitReason::Signal(libc::SIGPIPE))
        ));
        // Output while the VM stops is dropped quietly, not reported per byte.
        assert_eq!(out.write(b"yz").unwrap(), 2);
        assert!(out.flush().is_ok());
    }

    #[test]
    fn other_write_errors_reach_the_device() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let ctl = Arc::new(VmControl::new().unwrap());
        let mut out = ConsoleOut::new(Box::new(Full), None, ctl.clone());
        assert!(out.write(b"x").is_err());
        assert!(ctl.reason().is_none());
    }
}

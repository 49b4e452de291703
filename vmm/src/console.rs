//! Where the guest's serial output goes, and the terminal it comes from.
//!
//! Output is written through unbuffered: a UART emits a byte at a time and a user watching a
//! console expects to see each one. The writer also feeds the boot timeline (first byte, ready
//! marker).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};

use crate::timeline::{self, Phase};

pub struct ConsoleOut {
    sink: Box<dyn Write + Send>,
    marker: Option<MarkerScan>,
}

impl ConsoleOut {
    pub fn new(sink: Box<dyn Write + Send>, ready_marker: Option<&str>) -> Self {
        ConsoleOut {
            sink,
            marker: ready_marker
                .filter(|m| !m.is_empty())
                .map(|m| MarkerScan::new(m.as_bytes())),
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
        self.sink.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
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
}

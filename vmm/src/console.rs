//! Where the guest's serial output goes, and the terminal it comes from.
//!
//! The guest's UART writes into a bounded queue and a thread of its own (`ember-console`) writes
//! the queue to the sink (stdout, a file). A vCPU thread never waits for the reader: a paused
//! pager, `| sleep 30` or a full pipe only fill the queue, and stopping Ember (a signal, Ctrl-A x)
//! never waits behind a blocked write. When [`OUTPUT_QUEUE_BYTES`] are waiting, newer guest output
//! is dropped and counted (one warning says so), as a UART without flow control loses bytes.
//! Bytes still reach a reader that keeps up as they come: the writer wakes for each one.
//!
//! The queue and its thread are the slow path. When nothing is queued and the sink is a pipe or a
//! socket (a program reading the console, `ember bench`), the vCPU thread writes the bytes itself
//! with a write that fails instead of waiting (`RWF_NOWAIT`); only what that write cannot take
//! goes to the queue. Waking the writer thread for every byte put a thread hand-off, and the
//! scheduling delays of a second thread, between the guest's output and its reader. The thread
//! does not yield its CPU after such a write: on a busy host each yield gave the CPU away for a
//! time slice, and the null guest's ready line came 35-50 ms after spawn instead of ~8.
//!
//! When the console's reader goes away (`ember run ... | head -1`, a closed terminal), nobody can
//! see the guest any more: Ember ends the VM and exits 141, as a pipeline stage killed by SIGPIPE
//! does, instead of running a guest whose output is thrown away.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::timeline::{self, Phase};
use crate::vcpu::{ExitReason, VmControl};

/// Guest output that may wait for a slow reader.
pub const OUTPUT_QUEUE_BYTES: usize = 1 << 20;
/// The most the writer thread takes from the queue for one write.
const WRITE_CHUNK: usize = 64 << 10;

#[derive(Default)]
struct QueueState {
    bytes: VecDeque<u8>,
    /// Bytes dropped because the queue was full.
    dropped: u64,
    /// The writer holds bytes it took from the queue and has not written yet.
    writing: bool,
    /// The writer has stopped: the reader is gone or the sink failed.
    stopped: bool,
}

struct Queue {
    state: Mutex<QueueState>,
    /// Bytes arrived, for the writer.
    more: Condvar,
    /// The writer finished a write, for `drain`.
    wrote: Condvar,
    reader_gone: AtomicBool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A handle that waits for queued guest output to be written, at the end of a VM.
#[derive(Clone)]
pub struct OutputDrain(Arc<Queue>);

impl OutputDrain {
    /// Waits until every queued byte is written, the writer stops, `give_up()` says to stop
    /// waiting (checked every 20 ms), or `limit` passes. Returns whether everything was written
    /// (false once the writer has stopped: its reader went away or the sink failed).
    pub fn wait(&self, limit: Duration, give_up: impl Fn() -> bool) -> bool {
        // No end when `limit` is too far for the clock.
        let end = Instant::now().checked_add(limit);
        let mut st = self.0.lock();
        loop {
            if st.stopped {
                return false;
            }
            if st.bytes.is_empty() && !st.writing {
                return true;
            }
            let now = Instant::now();
            if end.is_some_and(|end| now >= end) || give_up() {
                return false;
            }
            let step = end
                .map_or(Duration::MAX, |end| end - now)
                .min(Duration::from_millis(20));
            st = self
                .0
                .wrote
                .wait_timeout(st, step)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Bytes dropped so far because the reader did not keep up.
    pub fn dropped(&self) -> u64 {
        self.0.lock().dropped
    }
}

/// Where the guest's output goes.
pub trait Sink: Write + Send {
    /// A descriptor the vCPU thread may write to with `RWF_NOWAIT`, while nothing is queued.
    fn nowait_fd(&self) -> Option<RawFd> {
        None
    }
}

impl Sink for File {
    fn nowait_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

impl Sink for io::Sink {}

pub struct ConsoleOut {
    queue: Arc<Queue>,
    marker: Option<MarkerScan>,
    /// The sink's descriptor while writes to it that never wait work (see the module comment);
    /// it belongs to the sink, which the writer thread keeps until the process exits.
    nowait: Option<RawFd>,
}

impl ConsoleOut {
    /// Starts the writer thread for `sink`. With `seccomp`, the thread runs under its own filter
    /// from its first instruction.
    pub fn new(
        sink: Box<dyn Sink>,
        ready_marker: Option<&str>,
        ctl: Arc<VmControl>,
        seccomp: bool,
    ) -> io::Result<(Self, OutputDrain)> {
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            more: Condvar::new(),
            wrote: Condvar::new(),
            reader_gone: AtomicBool::new(false),
        });
        let q = queue.clone();
        let nowait = sink.nowait_fd();
        std::thread::Builder::new()
            .name("ember-console".into())
            .spawn(move || writer(&q, sink, &ctl, seccomp))?;
        let out = ConsoleOut {
            queue: queue.clone(),
            marker: ready_marker
                .filter(|m| !m.is_empty())
                .map(|m| MarkerScan::new(m.as_bytes())),
            nowait,
        };
        Ok((out, OutputDrain(queue)))
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

/// The writer thread: queue to sink, one chunk at a time, blocking only itself.
fn writer(queue: &Queue, mut sink: Box<dyn Sink>, ctl: &VmControl, seccomp: bool) {
    crate::signals::block_in_this_thread();
    if seccomp {
        if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Console) {
            ctl.request_exit(ExitReason::VcpuFailed(format!("console output: {e}")));
            queue.lock().stopped = true;
            return;
        }
    }
    let mut chunk = Vec::with_capacity(WRITE_CHUNK);
    loop {
        {
            let mut st = queue.lock();
            st.writing = false;
            queue.wrote.notify_all();
            while st.bytes.is_empty() {
                st = queue.more.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            let n = st.bytes.len().min(WRITE_CHUNK);
            chunk.clear();
            chunk.extend(st.bytes.drain(..n));
            st.writing = true;
        }
        let result = sink.write_all(&chunk).and_then(|()| sink.flush());
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                log::debug!("console: the reader of the guest's output has gone; stopping");
                queue.reader_gone.store(true, Ordering::SeqCst);
                ctl.request_exit(ExitReason::Signal(libc::SIGPIPE));
                break;
            }
            Err(e) => {
                log::warn!(
                    "console: writing the guest's output failed, it is dropped from now on: {e}"
                );
                break;
            }
        }
    }
    let mut st = queue.lock();
    st.stopped = true;
    st.writing = false;
    st.bytes.clear();
    queue.wrote.notify_all();
}

impl Write for ConsoleOut {
    /// Never blocks: the bytes are written without waiting or queued for the writer thread.
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
        let mut st = self.queue.lock();
        if st.stopped {
            // The reader is gone (the VM is stopping) or the sink failed.
            return Ok(buf.len());
        }
        let mut rest = buf;
        // Under the lock, with nothing queued and no chunk in the writer's hands: the bytes
        // cannot overtake earlier output.
        if let Some(fd) = self.nowait.filter(|_| st.bytes.is_empty() && !st.writing) {
            match write_nowait(fd, rest) {
                Ok(n) => rest = &rest[n..],
                // Full: the rest waits in the queue, and the next write tries again.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {}
                // No such writes here (EOPNOTSUPP: a terminal, a file, an older kernel), or the
                // reader is gone: from now on the writer thread meets the sink, and handles it.
                Err(_) => self.nowait = None,
            }
        }
        if !rest.is_empty() {
            let room = OUTPUT_QUEUE_BYTES.saturating_sub(st.bytes.len());
            let take = room.min(rest.len());
            st.bytes.extend(&rest[..take]);
            if take < rest.len() {
                if st.dropped == 0 {
                    log::warn!(
                        "console: the reader of the guest's output is not keeping up; {} KiB \
                         are waiting, newer output is dropped until it catches up",
                        OUTPUT_QUEUE_BYTES >> 10
                    );
                }
                st.dropped += (rest.len() - take) as u64;
            }
        }
        drop(st);
        if !rest.is_empty() {
            self.queue.more.notify_one();
        }
        Ok(buf.len())
    }

    /// Nothing to do: the UART flushes after every byte, and waiting for the reader is what the
    /// queue is there to avoid. [`OutputDrain::wait`] waits at the end of the VM.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One write to `fd` that returns EAGAIN instead of waiting, whatever the descriptor's own flags
/// (which a terminal or pipe shared with other processes must keep).
fn write_nowait(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: one iovec over `buf`, which outlives the call; offset -1 is the file position.
    let n = unsafe { libc::pwritev2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
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
        // Output processing off too (cfmakeraw clears OPOST): the guest's own tty already turns
        // \n into \r\n, and a second translation here broke what full-screen programs draw
        // (a bare line feed became a carriage return as well).
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
    impl Sink for ClosedPipe {}
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
        let (mut out, drain) =
            ConsoleOut::new(Box::new(ClosedPipe), None, ctl.clone(), false).unwrap();
        assert_eq!(out.write(b"x").unwrap(), 1);
        assert!(
            !drain.wait(Duration::from_secs(5), || false),
            "x was not written"
        );
        assert!(matches!(
            ctl.reason(),
            Some(ExitReason::Signal(libc::SIGPIPE))
        ));
        // Output while the VM stops is dropped quietly, not reported per byte.
        assert_eq!(out.write(b"yz").unwrap(), 2);
        assert!(out.flush().is_ok());
    }

    #[test]
    fn other_write_errors_drop_the_output_and_the_vm_goes_on() {
        struct Full;
        impl Sink for Full {}
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let ctl = Arc::new(VmControl::new().unwrap());
        let (mut out, drain) = ConsoleOut::new(Box::new(Full), None, ctl.clone(), false).unwrap();
        assert_eq!(out.write(b"x").unwrap(), 1);
        drain.wait(Duration::from_secs(5), || false);
        assert_eq!(out.write(b"y").unwrap(), 1);
        assert!(ctl.reason().is_none());
    }

    /// A sink whose writes block until the test lets them go, like a pipe nobody reads.
    struct Stalled(std::sync::mpsc::Receiver<()>, Arc<Mutex<Vec<u8>>>);
    impl Sink for Stalled {}
    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            self.1.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_reader_never_blocks_the_guest_and_excess_output_is_dropped() {
        let ctl = Arc::new(VmControl::new().unwrap());
        let (go, wait) = std::sync::mpsc::channel();
        let got = Arc::new(Mutex::new(Vec::new()));
        let (mut out, drain) =
            ConsoleOut::new(Box::new(Stalled(wait, got.clone())), None, ctl, false).unwrap();
        let start = Instant::now();
        let line = [b'a'; 1024];
        for _ in 0..(2 * OUTPUT_QUEUE_BYTES / line.len()) {
            assert_eq!(out.write(&line).unwrap(), line.len());
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        // The writer holds at most one chunk; the queue holds the rest up to its bound.
        assert!(drain.dropped() >= (OUTPUT_QUEUE_BYTES - WRITE_CHUNK) as u64);
        let t = Instant::now();
        assert!(!drain.wait(Duration::from_millis(100), || false));
        assert!(t.elapsed() < Duration::from_secs(1));
        // Once the reader reads, what was queued arrives.
        drop(go);
        assert!(drain.wait(Duration::from_secs(5), || false));
        let n = got.lock().unwrap().len() as u64;
        assert_eq!(n + drain.dropped(), 2 * OUTPUT_QUEUE_BYTES as u64);
    }

    #[test]
    fn a_reader_that_keeps_up_gets_every_byte_in_order() {
        struct Collect(Arc<Mutex<Vec<u8>>>);
        impl Sink for Collect {}
        impl Write for Collect {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let got = Arc::new(Mutex::new(Vec::new()));
        let ctl = Arc::new(VmControl::new().unwrap());
        let (mut out, drain) =
            ConsoleOut::new(Box::new(Collect(got.clone())), None, ctl, false).unwrap();
        let want: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for b in &want {
            out.write_all(std::slice::from_ref(b)).unwrap();
        }
        assert!(drain.wait(Duration::from_secs(5), || false));
        assert_eq!(*got.lock().unwrap(), want);
        assert_eq!(drain.dropped(), 0);
    }

    /// A pipe as the console's reader sees it: the read end, and the write end as a sink.
    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills both descriptors, which the Files then own alone.
        unsafe {
            assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        }
    }

    #[test]
    fn output_to_a_pipe_keeps_its_order_when_the_pipe_fills_and_the_queue_takes_over() {
        use std::io::Read;
        let (mut reader, sink) = pipe();
        let ctl = Arc::new(VmControl::new().unwrap());
        let (mut out, drain) = ConsoleOut::new(Box::new(sink), None, ctl, false).unwrap();
        assert!(out.nowait.is_some());
        // Three pipes' worth with nobody reading: the first part goes straight in, the rest
        // waits in the queue behind it, and later bytes never overtake earlier ones.
        let want: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        for chunk in want.chunks(1000) {
            assert_eq!(out.write(chunk).unwrap(), chunk.len());
        }
        let mut got = vec![0u8; want.len()];
        reader.read_exact(&mut got).unwrap();
        assert!(got == want, "bytes reordered or lost");
        assert!(drain.wait(Duration::from_secs(5), || false));
        assert_eq!(drain.dropped(), 0);
        // With the reader keeping up, a byte at a time.
        for b in b"ember-guest: ready\n" {
            out.write_all(std::slice::from_ref(b)).unwrap();
        }
        let mut line = [0u8; 19];
        reader.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"ember-guest: ready\n");
    }

    #[test]
    fn a_write_larger_than_the_pipe_is_taken_whole_part_direct_part_queued() {
        use std::io::Read;
        let (mut reader, sink) = pipe();
        let ctl = Arc::new(VmControl::new().unwrap());
        let (mut out, drain) = ConsoleOut::new(Box::new(sink), None, ctl, false).unwrap();
        let want: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        assert_eq!(out.write(&want).unwrap(), want.len());
        let mut got = vec![0u8; want.len()];
        reader.read_exact(&mut got).unwrap();
        assert!(got == want, "bytes reordered, lost or repeated");
        assert!(drain.wait(Duration::from_secs(5), || false));
        // Nothing more: no byte was written twice.
        // SAFETY: fcntl on a descriptor this test owns.
        unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let err = reader.read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_pipe_whose_reader_left_ends_the_vm_as_sigpipe_would() {
        let (reader, sink) = pipe();
        drop(reader);
        let ctl = Arc::new(VmControl::new().unwrap());
        let (mut out, drain) = ConsoleOut::new(Box::new(sink), None, ctl.clone(), false).unwrap();
        assert_eq!(out.write(b"x").unwrap(), 1);
        assert!(!drain.wait(Duration::from_secs(5), || false));
        assert!(matches!(
            ctl.reason(),
            Some(ExitReason::Signal(libc::SIGPIPE))
        ));
    }
}

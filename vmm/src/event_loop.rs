//! The device event loop (event-manager on the main thread): console input, the events that end
//! the VM, and the virtio devices' queue and activation events.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use ember_devices::serial::SerialDevice;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::{ExitReason, VmControl};

/// Console escape: Ctrl-A then `x` quits; Ctrl-A twice sends one Ctrl-A to the guest.
pub const ESCAPE_BYTE: u8 = 0x01;
pub const ESCAPE_QUIT: u8 = b'x';

/// Watches the events that end the VM.
pub struct ExitWatcher {
    ctl: Arc<VmControl>,
    reset: EventFd,
    poweroff: EventFd,
    panicked: EventFd,
    /// Written by Ember's signal handlers, when the process's signals end the VM.
    signal: Option<EventFd>,
}

const DATA_EXIT: u32 = 0;
const DATA_RESET: u32 = 1;
const DATA_POWEROFF: u32 = 2;
const DATA_SIGNAL: u32 = 3;
const DATA_PANICKED: u32 = 4;

impl ExitWatcher {
    pub fn new(
        ctl: Arc<VmControl>,
        reset: EventFd,
        poweroff: EventFd,
        panicked: EventFd,
        signal: Option<EventFd>,
    ) -> Self {
        ExitWatcher {
            ctl,
            reset,
            poweroff,
            panicked,
            signal,
        }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        let events = [
            (Some(&self.ctl.exit_evt), DATA_EXIT),
            (Some(&self.reset), DATA_RESET),
            (Some(&self.poweroff), DATA_POWEROFF),
            (self.signal.as_ref(), DATA_SIGNAL),
            (Some(&self.panicked), DATA_PANICKED),
        ];
        for (fd, data) in events {
            let Some(fd) = fd else { continue };
            if let Err(e) = ops.add(Events::with_data(fd, data, EventSet::IN)) {
                log::error!("event loop: cannot watch exit event {data}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            DATA_RESET => {
                let _ = self.reset.read();
                self.ctl.request_exit(ExitReason::Reset);
            }
            DATA_POWEROFF => {
                let _ = self.poweroff.read();
                self.ctl.request_exit(ExitReason::Poweroff);
            }
            DATA_PANICKED => {
                let _ = self.panicked.read();
                self.ctl.request_exit(ExitReason::GuestPanic);
            }
            DATA_SIGNAL => {
                if let Some(signal) = &self.signal {
                    let _ = signal.read();
                }
                if let Some(signo) = crate::signals::first() {
                    self.ctl.request_exit(ExitReason::Signal(signo));
                }
            }
            _ => {
                let _ = self.ctl.exit_evt.read();
            }
        }
    }
}

/// Feeds standard input to the guest's UART, no faster than the guest drains its FIFO.
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    drained: EventFd,
    ctl: Arc<VmControl>,
    /// Whether stdin can be watched by epoll (pipes, terminals) or must be read when there is
    /// room (regular files, /dev/null).
    pollable: bool,
    watching_stdin: bool,
    eof: bool,
    /// A terminal gets the escape sequence; a pipe is forwarded byte for byte.
    tty: bool,
    escape_pending: bool,
    pending: Vec<u8>,
}

const DATA_STDIN: u32 = 0;
const DATA_DRAINED: u32 = 1;

impl ConsoleInput {
    pub fn new(
        serial: Arc<Mutex<SerialDevice>>,
        ctl: Arc<VmControl>,
        tty: bool,
    ) -> std::io::Result<Self> {
        let drained = lock(&serial).fifo_drained().try_clone()?;
        Ok(ConsoleInput {
            serial,
            drained,
            ctl,
            pollable: true,
            watching_stdin: false,
            eof: false,
            tty,
            escape_pending: false,
            pending: Vec::new(),
        })
    }

    fn stdin_fd() -> RawFd {
        std::io::stdin().as_raw_fd()
    }

    /// Reads what stdin has into `pending`, straight from the file descriptor: std's `Stdin`
    /// buffers, and bytes held in its buffer are invisible to epoll, so input beyond the first
    /// read waited for the next keystroke (a pasted 201-byte line arrived seconds late). While
    /// `pending` is not empty stdin is not watched, so this never runs ahead of the guest by more
    /// than one read.
    fn read_stdin(&mut self) {
        let mut buf = [0u8; 4096];
        // SAFETY: read(2) into a buffer of the length given.
        let n = unsafe { libc::read(Self::stdin_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let result = usize::try_from(n).map_err(|_| std::io::Error::last_os_error());
        match result {
            Ok(0) => self.eof = true,
            Ok(n) => self.take_input(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => {
                log::warn!("console: reading stdin failed, input stops: {e}");
                self.eof = true;
            }
        }
    }

    fn take_input(&mut self, bytes: &[u8]) {
        if !self.tty {
            self.pending.extend_from_slice(bytes);
            return;
        }
        for &b in bytes {
            if self.escape_pending {
                self.escape_pending = false;
                match b {
                    ESCAPE_QUIT => {
                        self.ctl.request_exit(ExitReason::UserQuit);
                        return;
                    }
                    ESCAPE_BYTE => self.pending.push(ESCAPE_BYTE),
                    other => self.pending.extend_from_slice(&[ESCAPE_BYTE, other]),
                }
            } else if b == ESCAPE_BYTE {
                self.escape_pending = true;
            } else {
                self.pending.push(b);
            }
        }
    }

    /// Moves pending input into the FIFO; returns true when everything pending went in.
    fn flush_pending(&mut self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        match lock(&self.serial).enqueue_input(&self.pending) {
            Ok(n) => {
                self.pending.drain(..n);
            }
            Err(e) => log::warn!("console: {e}"),
        }
        self.pending.is_empty()
    }

    /// Watches stdin only while there is somewhere to put its bytes; otherwise waits for the
    /// guest to drain the FIFO.
    fn pump(&mut self, ops: &mut EventOps) {
        loop {
            let all_in = self.flush_pending();
            if self.eof || !all_in {
                break;
            }
            if self.pollable {
                break;
            }
            // A regular file never blocks: read it as the FIFO makes room.
            if lock(&self.serial).input_room() == 0 {
                break;
            }
            self.read_stdin();
            if self.pending.is_empty() {
                break;
            }
        }
        let want = self.pollable && !self.eof && self.pending.is_empty();
        let stdin = Events::with_data_raw(Self::stdin_fd(), DATA_STDIN, EventSet::IN);
        if want && !self.watching_stdin {
            self.watching_stdin = ops.add(stdin).is_ok();
        } else if !want && self.watching_stdin {
            let _ = ops.remove(stdin);
            self.watching_stdin = false;
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.drained, DATA_DRAINED, EventSet::IN)) {
            log::error!("console: cannot watch the UART FIFO: {e:?}");
        }
        let stdin = Events::with_data_raw(Self::stdin_fd(), DATA_STDIN, EventSet::IN);
        match ops.add(stdin) {
            Ok(()) => self.watching_stdin = true,
            // epoll refuses regular files and /dev/null: they are always readable anyway.
            Err(_) => {
                self.pollable = false;
                self.pump(ops);
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            DATA_DRAINED => {
                let _ = self.drained.read();
            }
            _ => {
                if events.event_set().intersects(EventSet::IN) {
                    self.read_stdin();
                } else {
                    // Hang-up or error without data: the other end is gone.
                    self.eof = true;
                }
            }
        }
        self.pump(ops);
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads an eventfd whose only job is to wake the event loop (the API's requests are then taken
/// from their channel by the loop's owner).
pub struct Drain {
    evt: EventFd,
}

impl Drain {
    pub fn new(evt: EventFd) -> Self {
        Drain { evt }
    }
}

impl MutEventSubscriber for Drain {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("event loop: cannot watch a wake-up eventfd: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
    }
}

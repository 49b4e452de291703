//! One measured launch: spawn a command, time its ready line on stdout and its exit, and read
//! its peak RSS from the kernel's accounting when it is reaped.
//!
//! The clock starts just before `spawn` (fork + exec are part of every system's start-up) and
//! stops when bytes completing the ready marker come out of the pipe, and when the process's
//! pidfd reports its exit. One thread polls stdout, stderr and the pidfd together, so no timing
//! depends on a sleep interval.
//!
//! Peak RSS is `ru_maxrss` from `wait4`: the largest resident set of the child *or of any
//! descendant it waited for* (a maximum over processes, not a sum). For a VMM that is the VMM
//! process (guest memory it touched included); for `runc run` / `crun run` it is the runtime
//! (its re-executed init and the container process are smaller); for podman it is the podman
//! process (conmon daemonizes, so it is not counted).

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What to launch and what to wait for.
#[derive(Debug, Clone)]
pub struct Spec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// The ready line's text (a substring of stdout); empty: none is waited for (`ready` stays
    /// None), for a command judged by its exit alone.
    pub marker: String,
    /// Kill the process group and give up after this long.
    pub timeout: Duration,
    /// Stop the process once the ready line came (SIGTERM, then SIGKILL to its group after
    /// a second): for guests that never exit by themselves. The run then counts as good
    /// whatever its exit status.
    pub stop_at_ready: bool,
    /// Written to the child's stdin right after spawn (stdin is then a pipe, kept open until
    /// the child exits): input a restored guest answers as soon as it runs.
    pub input: Vec<u8>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::Code(c) => write!(f, "exit status {c}"),
            Ending::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// What one launch showed.
#[derive(Debug, Clone)]
pub struct Trial {
    /// Spawn to the ready marker on stdout; None if it never came.
    pub ready: Option<Duration>,
    /// Spawn to the process's exit.
    pub exit: Duration,
    pub ending: Ending,
    /// wait4's ru_maxrss (KiB).
    pub max_rss_kib: u64,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The benchmark stopped the process at its ready line (Spec::stop_at_ready).
    pub stopped: bool,
}

impl Trial {
    /// A good run: the marker came and the process exited with status 0 (or was stopped by
    /// us after the marker).
    pub fn ok(&self) -> bool {
        self.ready.is_some() && (self.stopped || self.ending == Ending::Code(0))
    }

    /// One line saying why a run was not good, for the report.
    pub fn failure(&self) -> String {
        let line = telling_line(&self.stderr);
        let what = if self.ready.is_none() {
            "no ready line"
        } else {
            "ready line seen"
        };
        if line.is_empty() {
            format!("{what}, {}", self.ending)
        } else {
            format!("{what}, {}: {}", self.ending, clip(&line, 160))
        }
    }
}

/// The stderr line that says most about a failure: a tool's own error line, else its last words
/// (empty when it said nothing).
pub(crate) fn telling_line(stderr: &[u8]) -> String {
    let err = String::from_utf8_lossy(stderr);
    err.lines()
        .find(|l| l.contains("error"))
        .or_else(|| err.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("")
        .trim()
        .to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no exit within {} s ({}); killed", timeout.as_secs_f64(), if *ready { "ready line seen" } else { "no ready line" })]
    Timeout {
        timeout: Duration,
        ready: bool,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
    },
}

/// Called once when the ready marker has been seen, with the child's pid; the bytes it returns
/// are written to the child's stdin (which is a pipe only when a hook is given).
pub type ReadyHook<'a> = &'a mut dyn FnMut(u32) -> Vec<u8>;

/// Called once right after spawn, with the child's pid, before the clock's first poll: for work
/// that goes with the launch (a request to the VMM's API socket, from a thread of its own so
/// that the output is still timed as it comes).
pub type SpawnHook<'a> = &'a mut dyn FnMut(u32);

/// Launches `spec` once and measures it.
pub fn run(spec: &Spec) -> Result<Trial, TrialError> {
    run_with_hooks(spec, None, None)
}

pub fn run_with_hook(spec: &Spec, hook: Option<ReadyHook<'_>>) -> Result<Trial, TrialError> {
    run_with_hooks(spec, None, hook)
}

pub fn run_with_hooks(
    spec: &Spec,
    on_spawn: Option<SpawnHook<'_>>,
    mut hook: Option<ReadyHook<'_>>,
) -> Result<Trial, TrialError> {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .stdin(if hook.is_some() || !spec.input.is_empty() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: on a timeout the whole tree (runtimes fork) is killed at once.
        .process_group(0);
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|source| TrialError::Spawn {
        program: spec.program.display().to_string(),
        source,
    })?;
    let pid = child.id() as libc::pid_t;
    let mut stdin = child.stdin.take();
    if let Some(w) = stdin.as_mut().filter(|_| !spec.input.is_empty()) {
        // A pipe takes this much without blocking; a child that is already gone shows that by
        // its exit, which is what the report tells.
        let _ = w.write_all(&spec.input).and_then(|_| w.flush());
    }
    if let Some(h) = on_spawn {
        h(pid as u32);
    }
    let stdout: OwnedFd = child.stdout.take().map(Into::into).ok_or(TrialError::Sys {
        what: "stdout pipe",
        source: io::Error::other("missing"),
    })?;
    let stderr: OwnedFd = child.stderr.take().map(Into::into).ok_or(TrialError::Sys {
        what: "stderr pipe",
        source: io::Error::other("missing"),
    })?;
    // The child is not reaped until we call wait4, so the pid cannot be reused in between.
    let pidfd = pidfd_open(pid).inspect_err(|_| kill_group(pid))?;
    let mut watch = Watch {
        t0,
        marker: spec.marker.as_bytes(),
        out: Pipe::new(stdout)?,
        err: Pipe::new(stderr)?,
        ready: None,
    };

    let mut deadline = t0 + spec.timeout;
    let mut exited: Option<Duration> = None;
    let mut stopped = false;
    let mut escalated = false;
    loop {
        let now = Instant::now();
        if stopped && !escalated && now >= deadline {
            // It ignored SIGTERM for a second.
            kill_group(pid);
            escalated = true;
            deadline = now + Duration::from_secs(5);
            continue;
        }
        if now >= deadline {
            kill_group(pid);
            let _ = wait4(pid);
            return Err(TrialError::Timeout {
                timeout: spec.timeout,
                ready: watch.ready.is_some(),
                stdout: watch.out.buf,
                stderr: watch.err.buf,
            });
        }
        let mut fds = [
            pollfd(watch.out.fd(), true),
            pollfd(watch.err.fd(), true),
            pollfd(pidfd.as_raw_fd(), exited.is_none()),
        ];
        let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: fds is a valid array of pollfd for its whole length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            kill_group(pid);
            let _ = wait4(pid);
            return Err(TrialError::Sys {
                what: "poll",
                source: e,
            });
        }
        // Output first: data and exit seen in the same poll means the data came first.
        if fds[0].revents != 0 {
            let was_ready = watch.ready.is_some();
            watch.read_out();
            if !was_ready && watch.ready.is_some() {
                // The hook first: it may read /proc of a process the stop below ends.
                if let Some(h) = hook.as_mut() {
                    let bytes = h(pid as u32);
                    if let Some(w) = stdin.as_mut() {
                        // A child that already exited cannot take input; its exit tells the rest.
                        let _ = w.write_all(&bytes).and_then(|_| w.flush());
                    }
                }
            }
            if !was_ready && watch.ready.is_some() && spec.stop_at_ready {
                // SIGTERM first: a VMM that stops cleanly still reports its timings.
                // SAFETY: pid is our unreaped child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                stopped = true;
                deadline = Instant::now() + Duration::from_secs(1);
            }
        }
        if fds[1].revents != 0 {
            watch.err.read_available();
        }
        if fds[2].revents != 0 && exited.is_none() {
            exited = Some(t0.elapsed());
            if stopped {
                // What it left behind in its group goes too.
                kill_group(pid);
            }
        }
        if exited.is_some() {
            break;
        }
    }
    let exit = exited.unwrap_or_default();
    let (ending, max_rss_kib) = wait4(pid).map_err(|source| TrialError::Sys {
        what: "wait4",
        source,
    })?;
    drop(stdin);
    // What the process wrote before exiting is still in the pipes; a descendant that outlives
    // it (a daemonized monitor) may hold them open, so drain with a short grace, not to EOF.
    let grace = Instant::now() + Duration::from_millis(500);
    while !(watch.out.eof && watch.err.eof) && Instant::now() < grace {
        let mut fds = [pollfd(watch.out.fd(), true), pollfd(watch.err.fd(), true)];
        // SAFETY: as above.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 50) };
        if n <= 0 {
            if n == 0 {
                break;
            }
            continue;
        }
        if fds[0].revents != 0 {
            watch.read_out();
        }
        if fds[1].revents != 0 {
            watch.err.read_available();
        }
    }
    Ok(Trial {
        ready: watch.ready,
        exit,
        ending,
        max_rss_kib,
        stdout: watch.out.buf,
        stderr: watch.err.buf,
        stopped,
    })
}

struct Watch<'a> {
    t0: Instant,
    marker: &'a [u8],
    out: Pipe,
    err: Pipe,
    ready: Option<Duration>,
}

impl Watch<'_> {
    fn read_out(&mut self) {
        let before = self.out.buf.len();
        self.out.read_available();
        if self.ready.is_none()
            && !self.marker.is_empty()
            && contains_from(&self.out.buf, self.marker, before)
        {
            self.ready = Some(self.t0.elapsed());
        }
    }
}

/// True when `needle` occurs in `hay` in a match that ends after `new_from` (new bytes only).
pub(crate) fn contains_from(hay: &[u8], needle: &[u8], new_from: usize) -> bool {
    if needle.is_empty() {
        return true;
    }
    let start = new_from.saturating_sub(needle.len() - 1);
    hay.get(start..)
        .is_some_and(|h| h.windows(needle.len()).any(|w| w == needle))
}

/// A non-blocking pipe end and what came out of it.
pub(crate) struct Pipe {
    file: std::fs::File,
    pub(crate) buf: Vec<u8>,
    pub(crate) eof: bool,
}

impl Pipe {
    pub(crate) fn new(fd: OwnedFd) -> Result<Pipe, TrialError> {
        let raw = fd.as_fd().as_raw_fd();
        // SAFETY: raw is an open descriptor we own; fcntl only changes its flags.
        let ok = unsafe {
            let flags = libc::fcntl(raw, libc::F_GETFL);
            flags >= 0 && libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if !ok {
            return Err(TrialError::Sys {
                what: "fcntl(O_NONBLOCK)",
                source: io::Error::last_os_error(),
            });
        }
        Ok(Pipe {
            file: std::fs::File::from(fd),
            buf: Vec::new(),
            eof: false,
        })
    }

    /// -1 once at EOF: poll ignores negative descriptors.
    pub(crate) fn fd(&self) -> RawFd {
        if self.eof {
            -1
        } else {
            self.file.as_raw_fd()
        }
    }

    pub(crate) fn read_available(&mut self) {
        let mut chunk = [0u8; 16384];
        loop {
            match self.file.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    return;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.eof = true;
                    return;
                }
            }
        }
    }
}

pub(crate) fn pollfd(fd: RawFd, wanted: bool) -> libc::pollfd {
    libc::pollfd {
        fd: if wanted { fd } else { -1 },
        events: libc::POLLIN,
        revents: 0,
    }
}

pub(crate) fn pidfd_open(pid: libc::pid_t) -> Result<OwnedFd, TrialError> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(TrialError::Sys {
            what: "pidfd_open",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Reaps `pid` and returns how it ended and its ru_maxrss (KiB).
pub(crate) fn wait4(pid: libc::pid_t) -> io::Result<(Ending, u64)> {
    let mut status = 0;
    // SAFETY: rusage is plain old data; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to a status int and a rusage.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if r < 0 && e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let ending = if libc::WIFEXITED(status) {
        Ending::Code(libc::WEXITSTATUS(status))
    } else {
        Ending::Signal(libc::WTERMSIG(status))
    };
    Ok((ending, ru.ru_maxrss.max(0) as u64))
}

pub(crate) fn kill_group(pid: libc::pid_t) {
    // SAFETY: kill with a negative pid signals the process group the child leads.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// At most `max` characters of `s`, with an ellipsis when cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, marker: &str, timeout_ms: u64) -> Spec {
        Spec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            marker: marker.into(),
            timeout: Duration::from_millis(timeout_ms),
            stop_at_ready: false,
            input: Vec::new(),
        }
    }

    #[test]
    fn marker_split_across_reads_is_found_once_complete() {
        assert!(!contains_from(b"abc: rea", b"abc: ready", 0));
        assert!(contains_from(b"abc: ready", b"abc: ready", 8));
        // Already complete before the new bytes: not a new match.
        assert!(!contains_from(b"abc: ready\nmore", b"abc: ready", 11));
    }

    #[test]
    fn ready_comes_before_exit_and_status_is_kept() {
        let t = run(&sh(
            "echo hi; echo 'x: ready'; sleep 0.2; exit 3",
            "x: ready",
            10_000,
        ))
        .unwrap();
        let ready = t.ready.expect("ready line seen");
        assert!(ready < t.exit, "{ready:?} !< {:?}", t.exit);
        assert!(t.exit >= Duration::from_millis(200));
        assert_eq!(t.ending, Ending::Code(3));
        assert!(!t.ok());
        assert!(t.max_rss_kib > 0);
        assert_eq!(String::from_utf8_lossy(&t.stdout), "hi\nx: ready\n");
    }

    #[test]
    fn stderr_is_collected_and_missing_marker_is_reported() {
        let t = run(&sh("echo 'sh: error: boom' >&2", "never", 10_000)).unwrap();
        assert_eq!(t.ready, None);
        assert_eq!(t.ending, Ending::Code(0));
        assert_eq!(t.failure(), "no ready line, exit status 0: sh: error: boom");
    }

    #[test]
    fn an_empty_marker_waits_for_no_line() {
        let t = run(&sh("echo anything", "", 10_000)).unwrap();
        assert_eq!(t.ready, None);
        assert_eq!(t.ending, Ending::Code(0));
        assert_eq!(String::from_utf8_lossy(&t.stdout), "anything\n");
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        // The grandchild would keep the pipe open for 30 s if the group survived.
        let start = Instant::now();
        let e = run(&sh("sleep 30 & echo 'x: ready'; wait", "x: ready", 300)).unwrap_err();
        assert!(matches!(e, TrialError::Timeout { ready: true, .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn stop_at_ready_terminates_and_counts_as_good() {
        let mut spec = sh("echo 'x: ready'; sleep 30", "x: ready", 10_000);
        spec.stop_at_ready = true;
        let start = Instant::now();
        let t = run(&spec).unwrap();
        assert!(t.ok() && t.stopped);
        assert_eq!(t.ending, Ending::Signal(libc::SIGTERM));
        assert!(start.elapsed() < Duration::from_secs(5));
        // One that ignores SIGTERM is killed a second later.
        let mut spec = sh(
            "trap '' TERM; echo 'x: ready'; sleep 30",
            "x: ready",
            10_000,
        );
        spec.stop_at_ready = true;
        let t = run(&spec).unwrap();
        assert!(t.ok());
        assert!(t.exit >= Duration::from_secs(1) && t.exit < Duration::from_secs(5));
    }

    #[test]
    fn hook_sees_the_pid_and_feeds_stdin() {
        let mut seen = 0;
        let mut hook = |pid: u32| {
            seen = pid;
            b"bye\n".to_vec()
        };
        let t = run_with_hook(
            &sh(
                "echo 'x: ready'; read line; echo \"got $line\"",
                "x: ready",
                10_000,
            ),
            Some(&mut hook),
        )
        .unwrap();
        assert!(seen > 0);
        assert!(t.ok());
        assert!(String::from_utf8_lossy(&t.stdout).contains("got bye"));
    }

    #[test]
    fn input_goes_in_at_spawn_and_the_spawn_hook_sees_the_pid() {
        let mut spec = sh("read line; echo \"x: $line\"", "x: hello", 10_000);
        spec.input = b"hello\n".to_vec();
        let mut seen = 0;
        let mut on_spawn = |pid: u32| seen = pid;
        let t = run_with_hooks(&spec, Some(&mut on_spawn), None).unwrap();
        assert!(t.ok(), "{}", t.failure());
        assert!(seen > 0);
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let spec = Spec {
            program: "/nonexistent/ember-bench-test".into(),
            args: vec![],
            marker: "x".into(),
            timeout: Duration::from_secs(1),
            stop_at_ready: false,
            input: Vec::new(),
        };
        assert!(matches!(run(&spec), Err(TrialError::Spawn { .. })));
    }
}

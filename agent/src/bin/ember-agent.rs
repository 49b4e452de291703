//! `ember-agent`: the guest side of `ember exec`. As the guest's init (PID 1, from the initramfs
//! `ember exec` builds) it mounts the root disk the kernel command line names
//! (`ember.agent.root=/dev/vda`) and the usual filesystems in it, enters it, listens on vsock port
//! 52, connects to the host's port 52 once (where `ember exec` waits for it), runs the one command
//! it is sent on either, streams its output back as it comes, reports how it ended, and powers
//! the VM off. Pings are answered and connections that break before their
//! request (as every connection does when the VM is restored from a snapshot) are dropped; the
//! agent goes on listening for the command. `--listen-unix PATH` serves one request on a Unix socket instead,
//! without touching the system (how its tests run it on the host).
//!
//! Console mode, for a VMM without vsock (how `ember bench --guest exec` runs the same guest under
//! QEMU): with `ember.agent.console` on the kernel command line the command is what follows `--`
//! there, run with `ember exec`'s default environment in `/`; its
//! output goes to the console and [`ember_agent::outcome_line`] reports how it ended before the
//! poweroff. `--console CMD...` does the same on the host, without touching the system.

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use ember_agent::{
    Incoming, Outcome, Request, AGENT_PORT, CONSOLE_FLAG, FRAME_STDERR, FRAME_STDOUT,
};

fn log(msg: &str) {
    // The console: the kernel gives PID 1 /dev/console as stdout.
    let _ = writeln!(io::stdout(), "ember-agent: {msg}");
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (cstr(source)?, cstr(target)?, cstr(fstype)?);
    // SAFETY: valid NUL-terminated strings; no data argument.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, std::ptr::null()) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("mount {fstype} {source} on {target}: {e}"),
        ));
    }
    Ok(())
}

/// The value of `key=` on the kernel command line.
fn kernel_param(key: &str) -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

/// As init: the kernel's filesystems, the root disk, and into it.
fn become_init() -> io::Result<()> {
    mount("proc", "/proc", "proc", 0)?;
    let root = kernel_param("ember.agent.root");
    let base = if root.is_some() { "/newroot" } else { "" };
    if let Some(dev) = &root {
        mount("devtmpfs", "/dev", "devtmpfs", 0)?;
        mount(dev, "/newroot", "ext4", 0)?;
    }
    mount("proc", &format!("{base}/proc"), "proc", 0)?;
    mount("sysfs", &format!("{base}/sys"), "sysfs", 0)?;
    mount("devtmpfs", &format!("{base}/dev"), "devtmpfs", 0)?;
    mount("tmpfs", &format!("{base}/tmp"), "tmpfs", 0)?;
    if root.is_some() {
        let dir = cstr("/newroot")?;
        // SAFETY: a valid path; chroot and chdir take no other arguments.
        if unsafe { libc::chroot(dir.as_ptr()) } != 0 || unsafe { libc::chdir(c"/".as_ptr()) } != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn check(r: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(r)
}

/// A new AF_VSOCK stream socket, and the address of port `AGENT_PORT` at `cid`.
fn vsock_socket(cid: u32) -> io::Result<(OwnedFd, libc::sockaddr_vm)> {
    // SAFETY: socket takes no pointers; the descriptor it returns is ours.
    let fd = check(
        unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) },
        "socket(AF_VSOCK)",
    )?;
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = AGENT_PORT;
    addr.svm_cid = cid;
    Ok((sock, addr))
}

const VSOCK_ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// A listening AF_VSOCK socket on port `AGENT_PORT`.
fn listen_vsock() -> io::Result<OwnedFd> {
    let (listener, addr) = vsock_socket(libc::VMADDR_CID_ANY)?;
    let at = (&addr as *const libc::sockaddr_vm).cast();
    // SAFETY: `at` points at `addr`, VSOCK_ADDR_LEN long, alive for the call.
    check(
        unsafe { libc::bind(listener.as_raw_fd(), at, VSOCK_ADDR_LEN) },
        "bind",
    )?;
    // SAFETY: listen takes no pointers.
    check(unsafe { libc::listen(listener.as_raw_fd(), 4) }, "listen")?;
    log(&format!("listening on vsock port {AGENT_PORT}"));
    Ok(listener)
}

/// One connection to the host's port `AGENT_PORT`, made as soon as the agent listens: `ember
/// exec` waits there, so it learns the agent is up without trying to reach it while the guest
/// boots (each host attempt costs the guest kernel an interrupt, a packet and a reset: ~25 ms of
/// it where the guest kernel is emulated). Refused when nothing listens there (`ember run
/// --vsock` without a listener on `<uds>_52`); the agent then only listens.
fn dial_host() -> io::Result<std::fs::File> {
    let (conn, addr) = vsock_socket(libc::VMADDR_CID_HOST)?;
    let at = (&addr as *const libc::sockaddr_vm).cast();
    // SAFETY: `at` points at `addr`, VSOCK_ADDR_LEN long, alive for the call.
    check(
        unsafe { libc::connect(conn.as_raw_fd(), at, VSOCK_ADDR_LEN) },
        "connect to the host",
    )?;
    Ok(std::fs::File::from(conn))
}

fn accept(listener: &OwnedFd) -> io::Result<std::fs::File> {
    // SAFETY: accept4 on a listening socket this function borrows; the new descriptor is ours.
    unsafe {
        let conn = check(
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            ),
            "accept",
        )?;
        Ok(std::fs::File::from(OwnedFd::from_raw_fd(conn)))
    }
}

/// Where `program` is: itself when it names a path, else the first executable of that name on
/// the command's own PATH (not the agent's).
fn resolve(program: &str, env: &[(String, String)]) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Some(program.into());
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/bin:/bin");
    let found = path
        .split(':')
        .map(|d| std::path::Path::new(d).join(program));
    let mut first = None;
    for candidate in found {
        let Ok(meta) = std::fs::metadata(&candidate) else {
            continue;
        };
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            return Some(candidate);
        }
        // Found but not executable: execve says why, as a shell would.
        first.get_or_insert(candidate);
    }
    first
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    check(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
        "pipe2",
    )?;
    // SAFETY: both descriptors are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Forks and execs the command with its stdout and stderr on pipes, stdin on /dev/null. Done by
/// hand rather than with `std::process::Command`: the guest kernel may have no AF_UNIX sockets,
/// which std's spawn path can need. Returns the child and the read ends, or how it failed.
fn spawn(
    req: &Request,
    path: &std::path::Path,
) -> Result<(libc::pid_t, OwnedFd, OwnedFd), Outcome> {
    use std::os::unix::ffi::OsStrExt;
    let fail = |what: String| Outcome::Failed(what);
    let c = |s: &[u8]| CString::new(s).map_err(|_| fail("a NUL byte in the command".into()));
    let prog = c(path.as_os_str().as_bytes())?;
    let argv: Vec<CString> = req
        .argv
        .iter()
        .map(|a| c(a.as_bytes()))
        .collect::<Result<_, _>>()?;
    let envp: Vec<CString> = req
        .env
        .iter()
        .map(|(k, v)| c(format!("{k}={v}").as_bytes()))
        .collect::<Result<_, _>>()?;
    let cwd = c(req.cwd.as_bytes())?;
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    let io_fail = |e: io::Error| fail(e.to_string());
    let (out_r, out_w) = pipe().map_err(io_fail)?;
    let (err_r, err_w) = pipe().map_err(io_fail)?;
    let (status_r, status_w) = pipe().map_err(io_fail)?;
    // SAFETY: the child only makes async-signal-safe calls (dup2, open, chdir, execve, write,
    // _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(fail(format!("fork: {}", io::Error::last_os_error())));
    }
    if pid == 0 {
        // SAFETY: see above; every pointer outlives the child's use of it.
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
            libc::dup2(null, 0);
            libc::dup2(out_w.as_raw_fd(), 1);
            libc::dup2(err_w.as_raw_fd(), 2);
            let errno = if libc::chdir(cwd.as_ptr()) != 0 {
                *libc::__errno_location()
            } else {
                libc::execve(prog.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr());
                *libc::__errno_location()
            };
            let bytes = errno.to_le_bytes();
            libc::write(status_w.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127);
        }
    }
    drop((out_w, err_w, status_w));
    // The status pipe closes at a successful execve (close-on-exec) or carries its errno.
    let mut errno = [0u8; 4];
    let mut status = std::fs::File::from(status_r);
    if status.read_exact(&mut errno).is_ok() {
        let mut ws = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, &mut ws, 0) };
        let errno = i32::from_le_bytes(errno);
        let what = format!("{}: {}", req.argv[0], io::Error::from_raw_os_error(errno));
        return Err(match errno {
            libc::ENOENT => Outcome::NotFound(req.argv[0].clone()),
            libc::EACCES | libc::ENOEXEC | libc::EISDIR => Outcome::NotExecutable(what),
            _ => Outcome::Failed(what),
        });
    }
    Ok((pid, out_r, err_r))
}

/// Runs `req`, handing its output to `out` (stream kind, bytes) as it comes; returns how it ended.
fn run(
    req: &Request,
    out: &mut impl FnMut(u8, &[u8]) -> Result<(), ember_agent::ProtoError>,
) -> Result<Outcome, ember_agent::ProtoError> {
    let Some(program) = req.argv.first() else {
        return Ok(Outcome::Failed("no command given".into()));
    };
    if !std::path::Path::new(&req.cwd).is_dir() {
        return Ok(Outcome::Failed(format!("no directory {}", req.cwd)));
    }
    let Some(path) = resolve(program, &req.env) else {
        return Ok(Outcome::NotFound(program.clone()));
    };
    let (pid, stdout, stderr) = match spawn(req, &path) {
        Ok(child) => child,
        Err(outcome) => return Ok(outcome),
    };
    let mut streams: Vec<(RawFd, u8, std::fs::File)> = vec![
        (
            stdout.as_raw_fd(),
            FRAME_STDOUT,
            std::fs::File::from(stdout),
        ),
        (
            stderr.as_raw_fd(),
            FRAME_STDERR,
            std::fs::File::from(stderr),
        ),
    ];
    let mut buf = vec![0u8; ember_agent::MAX_FRAME];
    while !streams.is_empty() {
        let mut fds: Vec<libc::pollfd> = streams
            .iter()
            .map(|(fd, _, _)| libc::pollfd {
                fd: *fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd of the length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        let mut closed = Vec::new();
        for (i, p) in fds.iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            let (_, kind, reader) = &mut streams[i];
            match reader.read(&mut buf) {
                Ok(0) => closed.push(i),
                Ok(n) => out(*kind, &buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => closed.push(i),
            }
        }
        for i in closed.into_iter().rev() {
            streams.remove(i);
        }
    }
    let mut ws = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut ws, 0) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Ok(Outcome::Failed(format!("waitpid: {e}")));
        }
    }
    Ok(if libc::WIFEXITED(ws) {
        Outcome::Exited(libc::WEXITSTATUS(ws))
    } else if libc::WIFSIGNALED(ws) {
        Outcome::Signalled(libc::WTERMSIG(ws))
    } else {
        Outcome::Failed(format!("ended with wait status {ws:#x}"))
    })
}

/// Serves connections from `next` until one brings a command, and runs it. Pings are answered;
/// a connection that breaks before its request is only logged.
fn serve<C: Read + Write>(
    mut next: impl FnMut() -> io::Result<C>,
) -> Result<(), ember_agent::ProtoError> {
    loop {
        let mut conn = next()?;
        match ember_agent::read_incoming(&mut conn) {
            Ok(ping @ (Incoming::Ping | Incoming::Warm)) => {
                if ping == Incoming::Warm {
                    match run(&ember_agent::warm_request(), &mut |_, _| Ok(())) {
                        Ok(Outcome::Exited(0)) => {}
                        Ok(other) => log(&format!("the warm-up ended as {other:?}")),
                        Err(e) => log(&format!("the warm-up failed: {e}")),
                    }
                }
                if let Err(e) = ember_agent::write_ready(&mut conn) {
                    log(&format!("a ping's answer failed: {e}"));
                }
            }
            Ok(Incoming::Run(req)) => {
                let outcome = run(&req, &mut |kind, data| {
                    ember_agent::write_output(&mut conn, kind, data)
                })?;
                return ember_agent::write_exit(&mut conn, &outcome);
            }
            Err(e) => log(&format!("a connection ended before its request: {e}")),
        }
    }
}

/// Console mode: `argv` run as `ember exec` would run it, its output on our own stdout and
/// stderr (the console, as PID 1), then the outcome line on stdout.
fn run_on_console(argv: &[String]) -> Result<Outcome, ember_agent::ProtoError> {
    let req = Request {
        argv: argv.to_vec(),
        env: ember_agent::default_env(),
        cwd: "/".into(),
    };
    let outcome = run(&req, &mut |kind, data| {
        if kind == FRAME_STDERR {
            let mut e = io::stderr().lock();
            e.write_all(data)?;
            e.flush()?;
        } else {
            let mut o = io::stdout().lock();
            o.write_all(data)?;
            o.flush()?;
        }
        Ok(())
    })?;
    let mut o = io::stdout().lock();
    writeln!(o, "{}", ember_agent::outcome_line(&outcome))?;
    o.flush()?;
    Ok(outcome)
}

fn poweroff() -> ! {
    // SAFETY: sync and reboot take no pointers; reboot does not return on success.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // Only if the kernel refused: an init that exits panics the kernel, which ends the VM too.
    std::process::exit(1)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, path] = args.as_slice() {
        if flag == "--listen-unix" {
            let code = match serve_unix(path) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("ember-agent: {e}");
                    1
                }
            };
            std::process::exit(code);
        }
    }
    if args.get(1).is_some_and(|a| a == "--console") {
        let code = match run_on_console(&args[2..]) {
            Ok(_) => 0,
            Err(e) => {
                eprintln!("ember-agent: {e}");
                1
            }
        };
        std::process::exit(code);
    }
    // SAFETY: getpid has no preconditions.
    let pid1 = unsafe { libc::getpid() } == 1;
    if !pid1 {
        eprintln!(
            "ember-agent: runs as a microVM's init (or on the host, for tests: --listen-unix PATH, \
             or --console CMD...)"
        );
        std::process::exit(2);
    }
    if let Err(e) = become_init() {
        log(&format!("cannot set up the guest: {e}"));
        poweroff();
    }
    // /proc is the initramfs's or the root's own: become_init mounted both.
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == CONSOLE_FLAG) {
        if let Err(e) = run_on_console(&ember_agent::command_after_dashes(&cmdline)) {
            log(&format!("the command's report failed: {e}"));
        }
        poweroff();
    }
    // Linux makes the boot's ID at its first read: read now, it names this boot, which every VM
    // restored from a snapshot of this one goes on with (as `ember exec --snapshot` runs do).
    let _ = std::fs::read("/proc/sys/kernel/random/boot_id");
    match listen_vsock() {
        Ok(listener) => {
            // Listening first: a host that hears from the agent may connect at once (a
            // snapshot's restored copies do).
            let mut dialed = match dial_host() {
                Ok(c) => Some(c),
                Err(e) => {
                    log(&format!("no host listener, only listening: {e}"));
                    None
                }
            };
            let next = || match dialed.take() {
                Some(c) => Ok(c),
                None => accept(&listener),
            };
            if let Err(e) = serve(next) {
                log(&format!("the request failed: {e}"));
            }
        }
        Err(e) => log(&format!("cannot listen: {e}")),
    }
    poweroff();
}

fn serve_unix(path: &str) -> io::Result<()> {
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    serve(|| listener.accept().map(|(c, _)| c)).map_err(|e| io::Error::other(e.to_string()))
}

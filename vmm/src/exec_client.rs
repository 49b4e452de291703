//! The host side of `ember exec`'s conversation with the guest agent: take the connection the
//! agent makes when it starts (a booted VM), or reach it through the vsock device's Unix socket
//! (`CONNECT 52` / `OK <port>`, a restored one), send the command, copy its output to
//! Ember's stdout and stderr as frames arrive, and turn how it ended into Ember's exit status.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use ember_agent::{Frame, Outcome, Request, AGENT_PORT};

/// `ember exec`'s own statuses, beside the command's: the same numbers `timeout(1)` and shells use
/// for the same cases.
pub const EXIT_TIMEOUT: u8 = 124;
pub const EXIT_NO_AGENT: u8 = 125;
pub const EXIT_NOT_EXECUTABLE: u8 = 126;
pub const EXIT_NOT_FOUND: u8 = 127;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the guest never reached its agent within {0:?}")]
    NoAgent(Duration),
    #[error("the agent's connection broke: {0}")]
    Proto(#[from] ember_agent::ProtoError),
    #[error("the vsock device answered {0:?} to CONNECT")]
    Refused(String),
    #[error("writing the command's output: {0}")]
    Output(#[source] io::Error),
}

/// The status `ember exec` exits with for the command's outcome.
pub fn exit_code(outcome: &Outcome) -> u8 {
    match outcome {
        Outcome::Exited(code) => (*code & 0xff) as u8,
        Outcome::Signalled(sig) => 128u8.saturating_add(*sig as u8),
        Outcome::NotFound(_) => EXIT_NOT_FOUND,
        Outcome::NotExecutable(_) => EXIT_NOT_EXECUTABLE,
        Outcome::Failed(_) => EXIT_NO_AGENT,
    }
}

/// One attempt at `CONNECT`: the stream once the agent accepted, or why not (the guest may not
/// be listening yet: the device then closes or resets the connection).
fn connect_once(uds: &Path) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: what follows the reply line is the agent's.
    while line.len() < 64 {
        match s.read(&mut byte)? {
            0 => return Err(io::ErrorKind::ConnectionReset.into()),
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    if !line.starts_with("OK ") {
        return Err(io::Error::new(io::ErrorKind::ConnectionRefused, line));
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// Where the agent's own connection arrives: the vsock device hands a guest's connection to
/// host port P to `<uds>_P`. Bound before the VM runs, so the agent never finds it missing.
pub fn agent_listener(uds: &Path) -> io::Result<UnixListener> {
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{AGENT_PORT}"));
    UnixListener::bind(path)
}

/// Waits for the agent's connection on `listener` (it connects as soon as it listens), for up
/// to `patience` and while `alive` says the VM runs. The wait costs the guest nothing: the host
/// tries nothing while the guest boots.
pub fn accept_agent(
    listener: &UnixListener,
    patience: Duration,
    alive: impl Fn() -> bool,
) -> Result<UnixStream, ClientError> {
    let start = Instant::now();
    let gave_up = |start: Instant| ClientError::NoAgent(start.elapsed());
    listener.set_nonblocking(true).map_err(|_| gave_up(start))?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .map_err(ember_agent::ProtoError::Io)?;
                return Ok(s);
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                if start.elapsed() >= patience || !alive() {
                    return Err(gave_up(start));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return Err(gave_up(start)),
        }
    }
}

/// Connects to the agent, retrying until `deadline` while the guest boots; `alive` says whether
/// the VM still runs (no point waiting for a guest that ended).
pub fn connect(
    uds: &Path,
    patience: Duration,
    alive: impl Fn() -> bool,
) -> Result<UnixStream, ClientError> {
    let start = Instant::now();
    loop {
        match connect_once(uds) {
            Ok(s) => return Ok(s),
            Err(_) if start.elapsed() < patience && alive() => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(_) => return Err(ClientError::NoAgent(start.elapsed())),
        }
    }
}

/// Asks the agent on `conn` to warm up (run the root's shell once, so that a snapshot made next
/// holds it in the guest's page cache) and waits for its answer and until it has closed the
/// connection (it then listens and will accept the next, and nothing of this one is still on
/// its way: a VM snapshotted now has no packet of it left to send after a restore); returns
/// the agent's version.
pub fn warm_up(mut conn: UnixStream, patience: Duration) -> Result<String, ClientError> {
    conn.set_read_timeout(Some(patience.max(Duration::from_secs(1))))
        .map_err(ember_agent::ProtoError::Io)?;
    ember_agent::write_warm(&mut conn)?;
    let version = match ember_agent::read_frame(&mut conn)? {
        Some(Frame::Ready(version)) => version,
        Some(_) => return Err(ember_agent::ProtoError::UnknownKind(0).into()),
        None => {
            return Err(ember_agent::ProtoError::Io(io::ErrorKind::UnexpectedEof.into()).into())
        }
    };
    match ember_agent::read_frame(&mut conn)? {
        None => Ok(version),
        Some(_) => Err(ember_agent::ProtoError::UnknownKind(0).into()),
    }
}

/// Sends `req` and copies the output until the outcome arrives.
pub fn run(
    conn: UnixStream,
    req: &Request,
    stdout: &mut impl Write,
    stderr: &mut impl Write,
) -> Result<Outcome, ClientError> {
    let mut w = conn.try_clone().map_err(ember_agent::ProtoError::Io)?;
    ember_agent::write_request(&mut w, req)?;
    let mut r = BufReader::with_capacity(ember_agent::MAX_FRAME + 5, conn);
    loop {
        match ember_agent::read_frame(&mut r)? {
            Some(Frame::Stdout(d)) => {
                stdout.write_all(&d).map_err(ClientError::Output)?;
                stdout.flush().map_err(ClientError::Output)?;
            }
            Some(Frame::Stderr(d)) => {
                stderr.write_all(&d).map_err(ClientError::Output)?;
                stderr.flush().map_err(ClientError::Output)?;
            }
            Some(Frame::Exit(outcome)) => return Ok(outcome),
            Some(Frame::Ready(_)) => {
                return Err(ember_agent::ProtoError::UnknownKind(ember_agent::FRAME_READY).into())
            }
            None => {
                return Err(ember_agent::ProtoError::Io(io::ErrorKind::UnexpectedEof.into()).into())
            }
        }
    }
}

/// For tests: whether `r` starts with a `CONNECT` line (the device's side of the handshake).
pub fn read_connect_line(r: &mut impl BufRead) -> io::Result<Option<u32>> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    Ok(line
        .trim_end()
        .strip_prefix("CONNECT ")
        .and_then(|p| p.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn statuses_follow_the_shell_conventions() {
        assert_eq!(exit_code(&Outcome::Exited(0)), 0);
        assert_eq!(exit_code(&Outcome::Exited(42)), 42);
        assert_eq!(exit_code(&Outcome::Exited(256 + 3)), 3);
        assert_eq!(exit_code(&Outcome::Signalled(9)), 137);
        assert_eq!(exit_code(&Outcome::NotFound("x".into())), 127);
        assert_eq!(exit_code(&Outcome::NotExecutable("x".into())), 126);
        assert_eq!(exit_code(&Outcome::Failed("x".into())), 125);
    }

    /// A stand-in for the vsock device and the agent behind it: answers CONNECT, then the
    /// request with two frames and an outcome.
    #[test]
    fn the_client_handshakes_sends_the_request_and_copies_the_frames() {
        let path = std::env::temp_dir().join(format!("ember-exec-client-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let device = std::thread::spawn(move || {
            // The first try is refused, as a device does before the guest listens.
            let (first, _) = listener.accept().unwrap();
            drop(first);
            let (conn, _) = listener.accept().unwrap();
            let mut r = BufReader::new(conn.try_clone().unwrap());
            assert_eq!(read_connect_line(&mut r).unwrap(), Some(AGENT_PORT));
            let mut w = conn;
            w.write_all(b"OK 1024\n").unwrap();
            let req = ember_agent::read_request(&mut r).unwrap();
            ember_agent::write_output(&mut w, ember_agent::FRAME_STDOUT, b"out\n").unwrap();
            ember_agent::write_output(&mut w, ember_agent::FRAME_STDERR, b"err\n").unwrap();
            ember_agent::write_exit(&mut w, &Outcome::Exited(7)).unwrap();
            req
        });
        let conn = connect(&path, Duration::from_secs(5), || true).unwrap();
        let req = Request {
            argv: vec!["x".into()],
            env: vec![],
            cwd: "/".into(),
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(
            run(conn, &req, &mut out, &mut err).unwrap(),
            Outcome::Exited(7)
        );
        assert_eq!(
            (out.as_slice(), err.as_slice()),
            (&b"out\n"[..], &b"err\n"[..])
        );
        assert_eq!(device.join().unwrap(), req);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn no_agent_is_its_own_error() {
        let path = std::env::temp_dir().join(format!("ember-exec-none-{}", std::process::id()));
        let e = connect(&path, Duration::from_millis(50), || true).unwrap_err();
        assert!(matches!(e, ClientError::NoAgent(_)), "{e}");
        // A VM that ended is not waited for.
        let start = Instant::now();
        let e = connect(&path, Duration::from_secs(30), || false).unwrap_err();
        assert!(matches!(e, ClientError::NoAgent(_)));
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}

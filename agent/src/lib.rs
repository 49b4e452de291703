//! The protocol between `ember exec` (on the host) and `ember-agent` (in the guest), over one
//! stream connection (virtio-vsock):
//!
//! 1. the host sends one [`Request`] as a JSON line;
//! 2. the agent answers with frames, each `kind: u8`, `len: u32` (little-endian), `len` bytes:
//!    [`FRAME_STDOUT`] and [`FRAME_STDERR`] carry the command's output as it comes, in order per
//!    stream; one [`FRAME_EXIT`] carries an [`Outcome`] as JSON and is the last frame.
//!
//! Or, to learn whether the agent is up without running anything, the host sends the line
//! `PING`; the agent answers with one [`FRAME_READY`] frame (its version), closes the
//! connection and waits for the next. `WARM` ([`WARM`]) is a ping that first runs `sh -c true`
//! once; `ember exec --snapshot` sends it before it snapshots a VM: the answer says the agent
//! listens on its port and will accept the next connection, and the shell is in the guest's
//! page cache.
//!
//! Who connects: the agent, as soon as it listens, connects once to the host's port
//! [`AGENT_PORT`] (the vsock device hands that to `<uds>_52` on the host, where `ember exec`
//! waits), and the host sends its request or ping on that connection; any later connection is
//! the host's (`CONNECT 52`), as after a restore from a snapshot, whose guest went on from
//! listening.
//!
//! Frames are at most [`MAX_FRAME`] bytes, so a reader never has to hold more than that.
//!
//! Without vsock (console mode, [`CONSOLE_FLAG`]) the outcome travels as one console line,
//! [`outcome_line`], which [`parse_outcome_line`] finds again in what the console carried.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The guest port the agent listens on, and the host port it connects to when it starts.
pub const AGENT_PORT: u32 = 52;
pub const FRAME_STDOUT: u8 = 1;
pub const FRAME_STDERR: u8 = 2;
pub const FRAME_EXIT: u8 = 3;
pub const FRAME_READY: u8 = 4;
/// The line that asks for [`FRAME_READY`].
pub const PING: &[u8] = b"PING";
/// The line that asks the agent to run `sh -c true` once and then answer as to a [`PING`]: a
/// snapshot made after it holds the root's shell in the guest's page cache, so that a restored
/// run's command need not load it from the disk (the first run of a program from the disk is
/// seconds where the guest kernel is emulated).
pub const WARM: &[u8] = b"WARM";
pub const MAX_FRAME: usize = 64 * 1024;
/// A request is a few arguments and variables; a longer line is refused.
pub const MAX_REQUEST: usize = 1 << 20;

/// The kernel command line word that puts the agent in console mode: the command is what follows
/// `--` on the command line ([`command_after_dashes`]); its output and [`outcome_line`] go to the
/// console.
pub const CONSOLE_FLAG: &str = "ember.agent.console";
/// How the outcome line starts; JSON of the [`Outcome`] follows on the same line.
pub const OUTCOME_PREFIX: &str = "ember-agent: outcome ";

/// The environment `ember exec` gives a command unless told otherwise (and console mode always).
pub fn default_env() -> Vec<(String, String)> {
    [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("HOME", "/root"),
        ("TERM", "dumb"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec()
}

/// The command in a kernel command line: the words after its standalone `--`, a double-quoted
/// stretch being one word (the kernel's own rule). Not init's argv: the kernel also puts there
/// every word it does not know that has no `=` or `.` (`noxsave` on a kernel that lacks it).
pub fn command_after_dashes(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let (mut quoted, mut started, mut after) = (false, false, false);
    for c in cmdline.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            quoted = !quoted;
            started = true;
        } else if c.is_whitespace() && !quoted {
            if started {
                if after {
                    words.push(std::mem::take(&mut word));
                } else {
                    after = word == "--";
                    word.clear();
                }
            }
            started = false;
        } else {
            word.push(c);
            started = true;
        }
    }
    words
}

/// The console line that reports `outcome` (no newline).
pub fn outcome_line(outcome: &Outcome) -> String {
    // An Outcome always encodes: it is an enum of integers and strings.
    let json = serde_json::to_string(outcome).unwrap_or_else(|_| "null".into());
    format!("{OUTCOME_PREFIX}{json}")
}

/// The outcome a console's text reports: its last outcome line that parses (a console also
/// carries the kernel's lines and the command's own output, which may end without a newline).
pub fn parse_outcome_line(console: &str) -> Option<Outcome> {
    console.lines().rev().find_map(|l| {
        let at = l.find(OUTCOME_PREFIX)?;
        serde_json::from_str(l[at + OUTCOME_PREFIX.len()..].trim()).ok()
    })
}

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub argv: Vec<String>,
    /// The whole environment of the command (nothing is inherited from the agent).
    pub env: Vec<(String, String)>,
    pub cwd: String,
}

/// How the command ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// It exited with this status.
    Exited(i32),
    /// A signal ended it.
    Signalled(i32),
    /// `argv[0]` was not found (on PATH, or as a path).
    NotFound(String),
    /// It was found but could not be executed (permissions, format).
    NotExecutable(String),
    /// The agent could not run it at all (a bad request, a directory that does not exist, ...).
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("the connection broke: {0}")]
    Io(#[from] io::Error),
    #[error("frame of unknown kind {0}")]
    UnknownKind(u8),
    #[error("frame of {0} bytes (at most {MAX_FRAME})")]
    TooLong(usize),
    #[error("bad request or outcome: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the request line is longer than {MAX_REQUEST} bytes")]
    RequestTooLong,
}

/// A frame as read.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(Outcome),
    /// The answer to a ping: the agent's version.
    Ready(String),
}

/// What the host asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Ping,
    Warm,
    Run(Request),
}

pub fn write_request(w: &mut impl Write, req: &Request) -> Result<(), ProtoError> {
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line)?;
    Ok(())
}

pub fn write_ping(w: &mut impl Write) -> Result<(), ProtoError> {
    w.write_all(PING)?;
    w.write_all(b"\n")?;
    Ok(())
}

pub fn write_warm(w: &mut impl Write) -> Result<(), ProtoError> {
    w.write_all(WARM)?;
    w.write_all(b"\n")?;
    Ok(())
}

/// What [`WARM`] runs.
pub fn warm_request() -> Request {
    Request {
        argv: ["sh", "-c", "true"].map(String::from).to_vec(),
        env: default_env(),
        cwd: "/".into(),
    }
}

pub fn write_ready(w: &mut impl Write) -> Result<(), ProtoError> {
    write_output(w, FRAME_READY, env!("CARGO_PKG_VERSION").as_bytes())?;
    w.flush()?;
    Ok(())
}

/// Reads a request line, a ping or a warm-up.
pub fn read_incoming(r: &mut impl Read) -> Result<Incoming, ProtoError> {
    let line = read_line(r)?;
    if line == PING {
        return Ok(Incoming::Ping);
    }
    if line == WARM {
        return Ok(Incoming::Warm);
    }
    Ok(Incoming::Run(serde_json::from_slice(&line)?))
}

/// Reads the request line, one byte at a time so that nothing after it is consumed.
pub fn read_request(r: &mut impl Read) -> Result<Request, ProtoError> {
    Ok(serde_json::from_slice(&read_line(r)?)?)
}

fn read_line(r: &mut impl Read) -> Result<Vec<u8>, ProtoError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        r.read_exact(&mut byte)?;
        if byte[0] == b'\n' {
            break;
        }
        if line.len() >= MAX_REQUEST {
            return Err(ProtoError::RequestTooLong);
        }
        line.push(byte[0]);
    }
    Ok(line)
}

/// Writes `data` as frames of `kind` (split at `MAX_FRAME`).
pub fn write_output(w: &mut impl Write, kind: u8, data: &[u8]) -> Result<(), ProtoError> {
    for chunk in data.chunks(MAX_FRAME) {
        let mut head = [0u8; 5];
        head[0] = kind;
        head[1..].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
        w.write_all(&head)?;
        w.write_all(chunk)?;
    }
    Ok(())
}

pub fn write_exit(w: &mut impl Write, outcome: &Outcome) -> Result<(), ProtoError> {
    let body = serde_json::to_vec(outcome)?;
    write_output(w, FRAME_EXIT, &body)?;
    w.flush()?;
    Ok(())
}

/// Reads the next frame; `None` at a clean end of the stream between frames.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, ProtoError> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLong(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(match head[0] {
        FRAME_STDOUT => Frame::Stdout(body),
        FRAME_STDERR => Frame::Stderr(body),
        FRAME_EXIT => Frame::Exit(serde_json::from_slice(&body)?),
        FRAME_READY => Frame::Ready(String::from_utf8_lossy(&body).into_owned()),
        other => return Err(ProtoError::UnknownKind(other)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_frames_round_trip() {
        let req = Request {
            argv: vec!["sh".into(), "-c".into(), "echo hi\nexit 3".into()],
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "/tmp".into(),
        };
        let mut wire = Vec::new();
        write_request(&mut wire, &req).unwrap();
        write_output(&mut wire, FRAME_STDOUT, &vec![7u8; MAX_FRAME + 10]).unwrap();
        write_output(&mut wire, FRAME_STDERR, b"oops").unwrap();
        write_exit(&mut wire, &Outcome::Signalled(9)).unwrap();
        let mut r = wire.as_slice();
        assert_eq!(read_request(&mut r).unwrap(), req);
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some(Frame::Stdout(vec![7; MAX_FRAME]))
        );
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some(Frame::Stdout(vec![7; 10]))
        );
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some(Frame::Stderr(b"oops".to_vec()))
        );
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some(Frame::Exit(Outcome::Signalled(9)))
        );
        assert_eq!(read_frame(&mut r).unwrap(), None);
    }

    #[test]
    fn the_command_is_what_follows_the_dashes() {
        let w = |s: &str| command_after_dashes(s);
        assert_eq!(w("console=ttyS0 noxsave -- true"), ["true"]);
        assert_eq!(
            w("quiet -- sh -c \"echo a  b; exit 3\" x\n"),
            ["sh", "-c", "echo a  b; exit 3", "x"]
        );
        assert_eq!(w("a=\"-- x\" -- \"\" y"), ["", "y"]);
        assert!(w("console=ttyS0 noxsave").is_empty());
        assert!(w("-- ").is_empty());
        // Only the first `--` separates; a later one is the command's.
        assert_eq!(w("-- echo --"), ["echo", "--"]);
    }

    #[test]
    fn outcome_lines_are_found_in_console_text() {
        let line = outcome_line(&Outcome::Exited(3));
        assert_eq!(line, r#"ember-agent: outcome {"Exited":3}"#);
        // Output without a final newline runs into the line; a serial console adds \r.
        let console = format!("[ 1.0] booting\r\npartial{line}\r\n");
        assert_eq!(parse_outcome_line(&console), Some(Outcome::Exited(3)));
        let nf = outcome_line(&Outcome::NotFound("x y".into()));
        assert_eq!(
            parse_outcome_line(&nf),
            Some(Outcome::NotFound("x y".into()))
        );
        assert_eq!(parse_outcome_line("ember-agent: outcome {\"Exi"), None);
        assert_eq!(parse_outcome_line("no such line"), None);
    }

    #[test]
    fn a_ping_and_a_warm_up_are_told_from_a_request_and_answered_with_the_version() {
        let mut wire = Vec::new();
        write_ping(&mut wire).unwrap();
        write_request(
            &mut wire,
            &Request {
                argv: vec!["PING".into()],
                env: vec![],
                cwd: "/".into(),
            },
        )
        .unwrap();
        write_warm(&mut wire).unwrap();
        let mut r = wire.as_slice();
        assert_eq!(read_incoming(&mut r).unwrap(), Incoming::Ping);
        assert!(
            matches!(read_incoming(&mut r).unwrap(), Incoming::Run(req) if req.argv == ["PING"])
        );
        assert_eq!(read_incoming(&mut r).unwrap(), Incoming::Warm);
        let mut answer = Vec::new();
        write_ready(&mut answer).unwrap();
        assert_eq!(
            read_frame(&mut answer.as_slice()).unwrap(),
            Some(Frame::Ready(env!("CARGO_PKG_VERSION").into()))
        );
        assert!(read_incoming(&mut &b"PONG\n"[..]).is_err());
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut r: &[u8] = &[9, 0, 0, 0, 0];
        assert!(matches!(
            read_frame(&mut r),
            Err(ProtoError::UnknownKind(9))
        ));
        let mut r: &[u8] = &[1, 0xff, 0xff, 0xff, 0x7f];
        assert!(matches!(read_frame(&mut r), Err(ProtoError::TooLong(_))));
        let mut r: &[u8] = &[1, 5, 0];
        assert!(read_frame(&mut r).is_err());
        let mut r: &[u8] = &[1, 4, 0, 0, 0, b'a'];
        assert!(read_frame(&mut r).is_err(), "cut short");
    }
}

//! The protocol between `ember exec` (on the host) and `ember-agent` (in the guest), over one
//! stream connection (virtio-vsock):
//!
//! 1. the host sends one [`Request`] as a JSON line;
//! 2. the agent answers with frames, each `kind: u8`, `len: u32` (little-endian), `len` bytes:
//!    [`FRAME_STDOUT`] and [`FRAME_STDERR`] carry the command's output as it comes, in order per
//!    stream; one [`FRAME_EXIT`] carries an [`Outcome`] as JSON and is the last frame.
//!
//! Frames are at most [`MAX_FRAME`] bytes, so a reader never has to hold more than that.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The guest port the agent listens on.
pub const AGENT_PORT: u32 = 52;
pub const FRAME_STDOUT: u8 = 1;
pub const FRAME_STDERR: u8 = 2;
pub const FRAME_EXIT: u8 = 3;
pub const MAX_FRAME: usize = 64 * 1024;
/// A request is a few arguments and variables; a longer line is refused.
pub const MAX_REQUEST: usize = 1 << 20;

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
}

pub fn write_request(w: &mut impl Write, req: &Request) -> Result<(), ProtoError> {
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line)?;
    Ok(())
}

/// Reads the request line, one byte at a time so that nothing after it is consumed.
pub fn read_request(r: &mut impl Read) -> Result<Request, ProtoError> {
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
    Ok(serde_json::from_slice(&line)?)
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

//! A small HTTP/1.1 client over a Unix socket, for the VMMs' API sockets (Ember's, and
//! Firecracker's where it is installed): one request per connection, JSON bodies.
//!
//! The restore mode needs a handful of requests and no concurrency; an HTTP crate would bring an
//! async runtime along for what is a write and a read here.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect to the API socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{request} on {}: {source}", path.display())]
    Io {
        request: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{request} on {}: not an HTTP reply: {head:?}", path.display())]
    BadReply {
        request: String,
        path: PathBuf,
        head: String,
    },
    #[error("{request}: {status}: {message}")]
    Refused {
        request: String,
        status: u16,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// A header block larger than this is not an API reply.
const MAX_HEAD: usize = 64 * 1024;

/// Connects to `path`, retrying until `deadline` while the socket is not there yet or nobody
/// listens on it: a VMM just spawned creates its socket a moment later.
pub fn connect(path: &Path, deadline: Instant) -> Result<UnixStream, HttpError> {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                // Short: this wait is part of what a launch-then-load restore costs.
                std::thread::sleep(Duration::from_micros(100));
            }
            Err(source) => {
                return Err(HttpError::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Sends one request on `stream` and reads its reply. `Connection: close` is asked for, but the
/// reply is read by its Content-Length, so a server that keeps the connection open anyway does
/// not make this wait for EOF.
pub fn send(
    mut stream: UnixStream,
    path: &Path,
    method: &str,
    uri: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<Reply, HttpError> {
    let request = format!("{method} {uri}");
    let io_err = |source| HttpError::Io {
        request: request.clone(),
        path: path.to_path_buf(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut text = format!(
        "{method} {uri} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if !body.is_empty() {
        text.push_str("Content-Type: application/json\r\n");
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(text.as_bytes()).map_err(io_err)?;

    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let bad = |head: &[u8]| HttpError::BadReply {
        request: request.clone(),
        path: path.to_path_buf(),
        head: String::from_utf8_lossy(&head[..head.len().min(200)]).into_owned(),
    };
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(bad(&buf));
        }
        let n = read(&mut stream, &mut chunk).map_err(io_err)?;
        if n == 0 {
            return Err(bad(&buf));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = parse_status(&head).ok_or_else(|| bad(&buf))?;
    let length = content_length(&head);
    // No length: a reply without a body by its status, else one that ends at EOF.
    let no_body = status == 204 || status == 304 || (100..200).contains(&status);
    loop {
        let have = buf.len() - head_end;
        match length {
            Some(len) if have >= len => {
                buf.truncate(head_end + len);
                break;
            }
            None if no_body => break,
            _ => {}
        }
        let n = read(&mut stream, &mut chunk).map_err(io_err)?;
        if n == 0 {
            if length.is_some() {
                return Err(io_err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the reply's body was cut short",
                )));
            }
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&buf[head_end..]).into_owned(),
    })
}

/// Connects (waiting for the socket until `deadline`) and sends one request.
pub fn request(
    path: &Path,
    method: &str,
    uri: &str,
    body: Option<&serde_json::Value>,
    deadline: Instant,
) -> Result<Reply, HttpError> {
    let stream = connect(path, deadline)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    send(stream, path, method, uri, body, left)
}

/// `reply` when its status is 2xx; else the server's `fault_message` (or its body) as the error.
pub fn success(request: &str, reply: Reply) -> Result<Reply, HttpError> {
    if (200..300).contains(&reply.status) {
        return Ok(reply);
    }
    let message = serde_json::from_str::<serde_json::Value>(&reply.body)
        .ok()
        .and_then(|v| v.get("fault_message")?.as_str().map(str::to_string))
        .unwrap_or_else(|| reply.body.trim().to_string());
    Err(HttpError::Refused {
        request: request.to_string(),
        status: reply.status,
        message,
    })
}

fn read(stream: &mut UnixStream, chunk: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(chunk) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_status(head: &str) -> Option<u16> {
    let line = head.lines().next()?;
    let mut w = line.split_whitespace();
    if !w.next()?.starts_with("HTTP/1.") {
        return None;
    }
    w.next()?.parse().ok()
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().skip(1).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn temp_sock(name: &str) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("ember-bench-http-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// A server that answers one connection with `reply` and hands back what it was sent.
    fn serve_once(path: &Path, reply: &'static [u8]) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 1024];
            // Head, then the body by its length.
            loop {
                let n = s.read(&mut chunk).unwrap();
                got.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&got).into_owned();
                if let Some(i) = text.find("\r\n\r\n") {
                    let len = content_length(&text[..i + 4]).unwrap_or(0);
                    if got.len() >= i + 4 + len {
                        break;
                    }
                }
            }
            s.write_all(reply).unwrap();
            // Kept open: the client must stop at the reply's length, not wait for EOF.
            std::thread::sleep(Duration::from_millis(300));
            String::from_utf8(got).unwrap()
        })
    }

    #[test]
    fn sends_json_and_reads_a_reply_by_its_length() {
        let p = temp_sock("json");
        let server = serve_once(
            &p,
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 29\r\n\r\n{\"fault_message\":\"not now\"}\n\n",
        );
        let body = serde_json::json!({"state": "Paused"});
        let start = Instant::now();
        let reply = request(
            &p,
            "PATCH",
            "/vm",
            Some(&body),
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        assert!(
            start.elapsed() < Duration::from_millis(250),
            "waited for EOF"
        );
        assert_eq!(reply.status, 400);
        let sent = server.join().unwrap();
        assert!(sent.starts_with("PATCH /vm HTTP/1.1\r\n"), "{sent}");
        assert!(sent.ends_with("\r\n\r\n{\"state\":\"Paused\"}"), "{sent}");
        let e = success("PATCH /vm", reply).unwrap_err();
        assert_eq!(e.to_string(), "PATCH /vm: 400: not now");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_204_has_no_body_and_the_socket_may_come_late() {
        let p = temp_sock("late");
        let p2 = p.clone();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            serve_once(&p2, b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n")
                .join()
                .unwrap()
        });
        let reply = request(
            &p,
            "PUT",
            "/snapshot/create",
            None,
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(
            reply,
            Reply {
                status: 204,
                body: String::new()
            }
        );
        assert!(server.join().unwrap().contains("Content-Length: 0\r\n"));
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn no_socket_and_garbage_are_errors() {
        let p = temp_sock("none");
        let e = request(&p, "GET", "/", None, Instant::now()).unwrap_err();
        assert!(matches!(e, HttpError::Connect { .. }), "{e}");
        let server = serve_once(&p, b"SSH-2.0-x\r\n\r\n");
        let e = request(
            &p,
            "GET",
            "/",
            None,
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(e, HttpError::BadReply { .. }), "{e}");
        server.join().unwrap();
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn status_and_length_parsing() {
        assert_eq!(parse_status("HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(parse_status("HTTP/2 200\r\n"), None);
        assert_eq!(
            content_length("HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n"),
            Some(12)
        );
        assert_eq!(content_length("HTTP/1.1 200 OK\r\n\r\n"), None);
    }
}

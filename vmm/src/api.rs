//! The API socket (`--api-sock PATH`): HTTP/1.1 with JSON bodies on a Unix socket, its endpoints
//! shaped like Firecracker's so that tools written for it can drive Ember:
//!
//! | request | what it does |
//! |---|---|
//! | `GET /` | `{"app_name":"Ember","id":...,"state":"Running"|"Paused","vmm_version":...}` |
//! | `PATCH /vm {"state":"Paused"}` | parks every vCPU; 204 once none runs guest code |
//! | `PATCH /vm {"state":"Resumed"}` | lets them run again; 204 |
//! | `PUT /snapshot/create {"snapshot_type":"Full","snapshot_path":P,"mem_file_path":M}` | writes a snapshot of the paused VM; 204 |
//! | `PUT /snapshot/load {"snapshot_path":P,"mem_backend":{"backend_type":"File","backend_path":M},"resume_vm":true}` | on an Ember started with only `--api-sock`: restores the VM, paused unless `resume_vm`; 204 |
//!
//! Errors are `{"fault_message": "..."}` with a 4xx status for a bad request and 5xx when Ember
//! could not do what was asked.
//!
//! The socket is served on a thread of its own (`ember-api`, its own seccomp filter), one
//! connection at a time, which parses requests (httparse), checks them, and hands each to the
//! thread that runs the VM's event loop through a channel; that thread answers it with the VM at
//! hand. A client that stalls mid-request is dropped after `READ_TIMEOUT`, so it cannot keep the
//! socket from the next one; nothing a client sends can reach the guest except through these
//! requests.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("--api-sock {}: the path exists already (another Ember's socket, or a stale one to remove)", .0.display())]
    Exists(PathBuf),
    #[error("--api-sock {}: cannot listen there: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the API thread: {0}")]
    Thread(#[source] io::Error),
}

/// A request the VM's thread carries out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Describe,
    Pause,
    Resume,
    SnapshotCreate {
        snapshot_path: PathBuf,
        mem_file_path: PathBuf,
    },
    SnapshotLoad {
        snapshot_path: PathBuf,
        mem_file_path: PathBuf,
        resume_vm: bool,
    },
}

/// The answer: an HTTP status and, unless 204, a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Option<serde_json::Value>,
}

impl Reply {
    pub fn ok(body: impl Serialize) -> Self {
        Reply {
            status: 200,
            body: serde_json::to_value(body).ok(),
        }
    }

    pub fn no_content() -> Self {
        Reply {
            status: 204,
            body: None,
        }
    }

    pub fn fault(status: u16, message: impl Into<String>) -> Self {
        Reply {
            status,
            body: Some(serde_json::json!({ "fault_message": message.into() })),
        }
    }
}

/// `GET /`'s body.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    pub state: String,
    pub vmm_version: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: VmStateName,
}

#[derive(Deserialize)]
enum VmStateName {
    Paused,
    Resumed,
}

#[derive(Deserialize)]
enum SnapshotType {
    Full,
    Diff,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotCreateBody {
    #[serde(default)]
    snapshot_type: Option<SnapshotType>,
    snapshot_path: PathBuf,
    mem_file_path: PathBuf,
    /// Firecracker's snapshot format version; Ember's files carry their own.
    #[serde(default)]
    #[allow(dead_code)]
    version: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemBackend {
    backend_type: BackendType,
    backend_path: PathBuf,
}

#[derive(Deserialize)]
enum BackendType {
    File,
    Uffd,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotLoadBody {
    snapshot_path: PathBuf,
    #[serde(default)]
    mem_backend: Option<MemBackend>,
    /// The older spelling of `mem_backend` with a file.
    #[serde(default)]
    mem_file_path: Option<PathBuf>,
    #[serde(default)]
    resume_vm: bool,
    #[serde(default)]
    enable_diff_snapshots: bool,
}

/// One request in flight to the VM's thread, with where its reply goes.
pub struct Request {
    pub action: Action,
    pub reply: mpsc::SyncSender<Reply>,
}

/// The VM's side of the API: requests arrive here, and `wake` is readable when there are some.
pub struct ApiChannel {
    pub requests: mpsc::Receiver<Request>,
    pub wake: EventFd,
    /// The socket file, removed with the channel; None for an in-process channel.
    path: Option<PathBuf>,
}

impl Drop for ApiChannel {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The caller's end of an in-process channel: the same requests as the socket's, from Ember
/// itself (`ember exec` pauses and snapshots the VM it booted through one).
pub struct ApiHandle {
    tx: mpsc::Sender<Request>,
    wake: EventFd,
}

impl ApiHandle {
    /// Carries out `action` on the VM's thread and returns its reply; a 503 once the VM ended.
    pub fn call(&self, action: Action) -> Reply {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        if self
            .tx
            .send(Request {
                action,
                reply: reply_tx,
            })
            .is_err()
        {
            return Reply::fault(503, "the VM has ended");
        }
        let _ = self.wake.write(1);
        reply_rx
            .recv()
            .unwrap_or_else(|_| Reply::fault(503, "the VM has ended"))
    }
}

/// A channel with no socket: the VM's end for `Vmm::attach_api`, and the caller's.
pub fn in_process() -> Result<(ApiChannel, ApiHandle), ApiError> {
    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(ApiError::Thread)?;
    let handle_wake = wake.try_clone().map_err(ApiError::Thread)?;
    let (tx, rx) = mpsc::channel();
    Ok((
        ApiChannel {
            requests: rx,
            wake,
            path: None,
        },
        ApiHandle {
            tx,
            wake: handle_wake,
        },
    ))
}

/// How long a client may take to send a whole request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests are small JSON documents; anything larger is refused before it is read.
const MAX_HEADERS: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;

/// Listens on `path` and starts the API thread. The socket file is removed when the returned
/// channel is dropped.
pub fn serve(path: &Path, seccomp: bool) -> Result<ApiChannel, ApiError> {
    if path.symlink_metadata().is_ok() {
        return Err(ApiError::Exists(path.to_path_buf()));
    }
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(ApiError::Thread)?;
    let thread_wake = wake.try_clone().map_err(ApiError::Thread)?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("ember-api".into())
        .spawn(move || {
            crate::signals::block_in_this_thread();
            if seccomp {
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Api) {
                    log::error!("api: {e}; the API socket is not served");
                    return;
                }
            }
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if !serve_connection(stream, &tx, &thread_wake) {
                            return;
                        }
                    }
                    Err(e) => log::warn!("api: accept failed: {e}"),
                }
            }
        })
        .map_err(ApiError::Thread)?;
    Ok(ApiChannel {
        requests: rx,
        wake,
        path: Some(path.to_path_buf()),
    })
}

/// Serves one connection's requests in turn; false once the VM's side is gone.
fn serve_connection(mut stream: UnixStream, tx: &mpsc::Sender<Request>, wake: &EventFd) -> bool {
    if let Err(e) = stream.set_read_timeout(Some(READ_TIMEOUT)) {
        log::warn!("api: {e}");
        return true;
    }
    let mut buf = Vec::new();
    loop {
        let (reply, keep_alive) = match read_request(&mut stream, &mut buf) {
            Ok(None) => return true,
            Ok(Some(parsed)) => match route(&parsed) {
                Ok(action) => {
                    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
                    let sent = tx.send(Request {
                        action,
                        reply: reply_tx,
                    });
                    if sent.is_err() {
                        return false;
                    }
                    let _ = wake.write(1);
                    match reply_rx.recv() {
                        Ok(reply) => (reply, parsed.keep_alive),
                        Err(_) => (Reply::fault(503, "the VM has ended"), false),
                    }
                }
                Err(reply) => (reply, parsed.keep_alive),
            },
            Err(reply) => (reply, false),
        };
        if write_reply(&mut stream, &reply, keep_alive).is_err() || !keep_alive {
            return true;
        }
    }
}

#[derive(Debug)]
struct Parsed {
    method: String,
    path: String,
    body: Vec<u8>,
    keep_alive: bool,
}

/// Reads one request; `None` when the client closed the connection between requests. `buf`
/// keeps bytes the client sent past this request (pipelining).
fn read_request(stream: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<Parsed>, Reply> {
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = req.method.unwrap_or_default().to_string();
                let path = req.path.unwrap_or_default().to_string();
                let http10 = req.version == Some(0);
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
                };
                if header("transfer-encoding").is_some() {
                    return Err(Reply::fault(
                        411,
                        "send the body with a Content-Length, not chunked",
                    ));
                }
                let len = match header("content-length") {
                    None => 0,
                    Some(v) => v
                        .parse::<usize>()
                        .map_err(|_| Reply::fault(400, format!("bad Content-Length {v:?}")))?,
                };
                if len > MAX_BODY {
                    return Err(Reply::fault(
                        413,
                        format!("the body is {len} bytes; at most {MAX_BODY} are accepted"),
                    ));
                }
                let keep_alive = match header("connection").as_deref() {
                    Some("close") => false,
                    Some("keep-alive") => true,
                    _ => !http10,
                };
                while buf.len() < head_len + len {
                    let n = read_some(stream, &mut chunk)?;
                    if n == 0 {
                        return Err(Reply::fault(400, "the body ended early"));
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = buf[head_len..head_len + len].to_vec();
                buf.drain(..head_len + len);
                return Ok(Some(Parsed {
                    method,
                    path,
                    body,
                    keep_alive,
                }));
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEADERS {
                    return Err(Reply::fault(431, "the request's headers are too large"));
                }
            }
            Err(e) => return Err(Reply::fault(400, format!("not an HTTP request: {e}"))),
        }
        let n = read_some(stream, &mut chunk)?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(Reply::fault(400, "the request ended early"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn read_some(stream: &mut impl Read, chunk: &mut [u8]) -> Result<usize, Reply> {
    loop {
        match stream.read(chunk) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Reply::fault(408, "the request did not arrive in time"))
            }
            Err(e) => return Err(Reply::fault(400, format!("reading the request: {e}"))),
        }
    }
}

/// The request's JSON body as a `T`, or a 400 that says what the endpoint wants.
fn json_body<T: serde::de::DeserializeOwned>(req: &Parsed, wants: &str) -> Result<T, Reply> {
    serde_json::from_slice(&req.body).map_err(|e| {
        Reply::fault(
            400,
            format!("{} {} wants {wants}: {e}", req.method, req.path),
        )
    })
}

/// The action a request asks for, or the reply that refuses it.
fn route(req: &Parsed) -> Result<Action, Reply> {
    let path = req.path.split('?').next().unwrap_or_default();
    match (req.method.as_str(), path) {
        ("GET", "/") => Ok(Action::Describe),
        ("PATCH", "/vm") => {
            let body: VmStateBody = json_body(req, r#"{"state": "Paused"|"Resumed"}"#)?;
            Ok(match body.state {
                VmStateName::Paused => Action::Pause,
                VmStateName::Resumed => Action::Resume,
            })
        }
        ("PUT", "/snapshot/create") => {
            let body: SnapshotCreateBody =
                json_body(req, r#"{"snapshot_path": ..., "mem_file_path": ...}"#)?;
            if matches!(body.snapshot_type, Some(SnapshotType::Diff)) {
                return Err(Reply::fault(
                    400,
                    "diff snapshots are not supported; use \"snapshot_type\": \"Full\"",
                ));
            }
            Ok(Action::SnapshotCreate {
                snapshot_path: body.snapshot_path,
                mem_file_path: body.mem_file_path,
            })
        }
        ("PUT", "/snapshot/load") => {
            let body: SnapshotLoadBody = json_body(
                req,
                r#"{"snapshot_path": ..., "mem_backend": {"backend_type": "File", "backend_path": ...}}"#,
            )?;
            if body.enable_diff_snapshots {
                return Err(Reply::fault(400, "diff snapshots are not supported"));
            }
            let mem_file_path = match (body.mem_backend, body.mem_file_path) {
                (Some(_), Some(_)) => {
                    return Err(Reply::fault(
                        400,
                        "give mem_backend or mem_file_path, not both",
                    ))
                }
                (
                    Some(MemBackend {
                        backend_type: BackendType::File,
                        backend_path,
                    }),
                    None,
                ) => backend_path,
                (
                    Some(MemBackend {
                        backend_type: BackendType::Uffd,
                        ..
                    }),
                    None,
                ) => {
                    return Err(Reply::fault(
                        400,
                        "the Uffd memory backend is not supported; use File",
                    ))
                }
                (None, Some(path)) => path,
                (None, None) => {
                    return Err(Reply::fault(400, "mem_backend is missing"));
                }
            };
            Ok(Action::SnapshotLoad {
                snapshot_path: body.snapshot_path,
                mem_file_path,
                resume_vm: body.resume_vm,
            })
        }
        (_, "/" | "/vm" | "/snapshot/create" | "/snapshot/load") => Err(Reply::fault(
            405,
            format!("{} is not allowed on {path}", req.method),
        )),
        _ => Err(Reply::fault(404, format!("no endpoint {path}"))),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ if status >= 500 => "Internal Server Error",
        _ => "Bad Request",
    }
}

fn write_reply(stream: &mut impl Write, reply: &Reply, keep_alive: bool) -> io::Result<()> {
    let body = reply
        .body
        .as_ref()
        .map(|b| b.to_string())
        .unwrap_or_default();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nServer: Ember\r\n",
        reply.status,
        reason(reply.status)
    );
    if !keep_alive {
        head.push_str("Connection: close\r\n");
    }
    if reply.status != 204 {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    head.push_str(&body);
    stream.write_all(head.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<Parsed>, Reply> {
        let mut buf = Vec::new();
        read_request(&mut raw.as_bytes(), &mut buf)
    }

    fn route_raw(raw: &str) -> Result<Action, Reply> {
        route(&parse(raw).unwrap().unwrap())
    }

    #[test]
    fn routes_firecracker_shaped_requests() {
        assert_eq!(route_raw("GET / HTTP/1.1\r\n\r\n"), Ok(Action::Describe));
        let pause = "PATCH /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}";
        assert_eq!(route_raw(pause), Ok(Action::Pause));
        // The body is exactly Content-Length bytes: what follows is the next request's.
        let resume = "PATCH /vm HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"state\":\"Resumed\"}\r\n";
        assert_eq!(route_raw(resume), Ok(Action::Resume));
        let body = r#"{"snapshot_type":"Full","snapshot_path":"/s","mem_file_path":"/m"}"#;
        let create = format!(
            "PUT /snapshot/create HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(
            route_raw(&create),
            Ok(Action::SnapshotCreate {
                snapshot_path: "/s".into(),
                mem_file_path: "/m".into()
            })
        );
        let body = r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"File","backend_path":"/m"},"resume_vm":true}"#;
        let load = format!(
            "PUT /snapshot/load HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(
            route_raw(&load),
            Ok(Action::SnapshotLoad {
                snapshot_path: "/s".into(),
                mem_file_path: "/m".into(),
                resume_vm: true
            })
        );
        for bad in [
            r#"{"snapshot_type":"Diff","snapshot_path":"/s","mem_file_path":"/m"}"#,
            r#"{"snapshot_path":"/s"}"#,
        ] {
            let req = format!(
                "PUT /snapshot/create HTTP/1.1\r\nContent-Length: {}\r\n\r\n{bad}",
                bad.len()
            );
            assert_eq!(route_raw(&req).unwrap_err().status, 400, "{bad}");
        }
        let uffd =
            r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"Uffd","backend_path":"/u"}}"#;
        let req = format!(
            "PUT /snapshot/load HTTP/1.1\r\nContent-Length: {}\r\n\r\n{uffd}",
            uffd.len()
        );
        assert_eq!(route_raw(&req).unwrap_err().status, 400);
    }

    #[test]
    fn refuses_what_it_cannot_do_with_a_fault_message() {
        let status = |raw: &str| match parse(raw) {
            Ok(Some(p)) => route(&p).unwrap_err().status,
            Ok(None) => 0,
            Err(r) => r.status,
        };
        assert_eq!(status("GET /nothing HTTP/1.1\r\n\r\n"), 404);
        assert_eq!(status("DELETE /vm HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(
            status("PATCH /vm HTTP/1.1\r\nContent-Length: 17\r\n\r\n{\"state\":\"Gone\"}"),
            400
        );
        assert_eq!(
            status("PATCH /vm HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"),
            400
        );
        assert_eq!(
            status("PATCH /vm HTTP/1.1\r\nContent-Length: 99\r\n\r\n{}"),
            400
        );
        assert_eq!(
            status("PATCH /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(
            status("PATCH /vm HTTP/1.1\r\nContent-Length: 999999\r\n\r\n"),
            413
        );
        assert_eq!(status("\x01\x02 garbage\r\n\r\n"), 400);
        let huge = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEADERS + 10));
        assert_eq!(status(&huge), 431);
        let fault = route_raw("GET /x HTTP/1.1\r\n\r\n").unwrap_err();
        assert!(fault.body.unwrap()["fault_message"]
            .as_str()
            .unwrap()
            .contains("/x"));
    }

    #[test]
    fn keeps_the_connection_as_http_1_1_does() {
        assert!(parse("GET / HTTP/1.1\r\n\r\n").unwrap().unwrap().keep_alive);
        assert!(
            !parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .unwrap()
                .unwrap()
                .keep_alive
        );
        assert!(!parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().keep_alive);
        // Two pipelined requests come out one at a time.
        let mut buf = Vec::new();
        let mut two = "GET / HTTP/1.1\r\n\r\nPATCH /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}".as_bytes();
        let first = read_request(&mut two, &mut buf).unwrap().unwrap();
        assert_eq!(first.method, "GET");
        let second = read_request(&mut two, &mut buf).unwrap().unwrap();
        assert_eq!(route(&second), Ok(Action::Pause));
        assert!(read_request(&mut two, &mut buf).unwrap().is_none());
    }

    #[test]
    fn replies_are_http_with_json() {
        let mut out = Vec::new();
        write_reply(&mut out, &Reply::fault(400, "no"), true).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\n{\"fault_message\":\"no\"}"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 22\r\n"), "{text}");
        let mut out = Vec::new();
        write_reply(&mut out, &Reply::no_content(), false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 204 No Content\r\nServer: Ember\r\nConnection: close\r\n\r\n"
        );
    }
}

//! Shared helpers: the ember binary, the test guests, the guest kit, and running Ember with a
//! deadline so a hung guest fails its test instead of hanging the suite.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn ember() -> &'static str {
    env!("CARGO_BIN_EXE_ember")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds every test guest once per test run (make is incremental) and returns the path of
/// `NAME.elf`.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let out = BUILT.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guests");
        let status = Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(repo_root().join("tests/guests"))
            .arg(format!("OUT={}", out.display()))
            .status()
            .expect("make is installed (scripts/deps.sh)");
        assert!(status.success(), "building the test guests failed");
        out
    });
    let p = out.join(format!("{name}.elf"));
    assert!(p.exists(), "test guest {} was not built", p.display());
    p
}

/// What the host's /dev/kvm is: tests that need guest userspace skip, loudly, on `kvm_pvm`.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum KvmKind {
    Hardware,
    Pvm,
}

pub fn kvm_kind() -> KvmKind {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: Ember's boot tests need KVM"
    );
    if Path::new("/sys/module/kvm_pvm").exists() {
        KvmKind::Pvm
    } else {
        KvmKind::Hardware
    }
}

/// Says loudly that a test did not run here and why; returns true when the caller should return.
pub fn skip_unless_hardware_kvm(test: &str, why: &str) -> bool {
    if kvm_kind() == KvmKind::Pvm {
        // Written to stderr directly: libtest captures eprintln! of passing tests, and a skip
        // must be seen in the suite's output.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: this host's /dev/kvm is kvm_pvm (KVM in software): {why}. The test \
             runs on hardware KVM."
        );
        return true;
    }
    false
}

/// Says loudly that a test runs a smaller case here than on hardware KVM, and which; the test
/// command counts these lines beside the skips.
pub fn reduced_on_pvm(test: &str, what: &str) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "REDUCED {test}: this host's /dev/kvm is kvm_pvm (KVM in software): {what}. The full \
         case runs on hardware KVM."
    );
}

/// A file of Ember's microVM kernel (scripts/microvm-kernel.sh builds it).
pub fn microvm_kernel(name: &str) -> PathBuf {
    let dir = std::env::var_os("EMBER_MICROVM_KERNEL").map_or_else(
        || {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/ember/microvm-kernel")
        },
        PathBuf::from,
    );
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/microvm-kernel.sh",
        p.display()
    );
    p
}

/// The guest kit's directory (scripts/kit.sh builds it).
pub fn kit_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EMBER_KIT") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/ember/kit")
}

pub fn kit_file(name: &str) -> PathBuf {
    let p = kit_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the guest kit with scripts/kit.sh",
        p.display()
    );
    p
}

pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `ember` with `args`, stdin from `stdin`, killing it after `deadline`.
pub fn run_ember(args: &[&str], stdin: &[u8], deadline: Duration) -> Run {
    let mut cmd = Command::new(ember());
    cmd.args(args);
    run_command(cmd, stdin, deadline)
}

pub fn run_command(mut cmd: Command, stdin: &[u8], deadline: Duration) -> Run {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ember");
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = input.write_all(&stdin);
    });
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let status = wait_deadline(&mut child, deadline);
    let elapsed = start.elapsed();
    let _ = writer.join();
    let stdout = out.join().unwrap();
    let stderr = err.join().unwrap();
    let status = status.unwrap_or_else(|| {
        panic!("timed out after {deadline:?}\nstdout:\n{stdout}\nstderr:\n{stderr}")
    });
    Run {
        status,
        stdout,
        stderr,
        elapsed,
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

/// The lines `child` writes to its (piped) stdout, each with its time since `start`, as they
/// come.
pub fn console_lines(
    child: &mut Child,
    start: Instant,
) -> std::sync::mpsc::Receiver<(Duration, String)> {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            if tx.send((start.elapsed(), line)).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for `child`, killing it at the deadline (then returns None).
pub fn wait_deadline(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return Some(s);
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Stops a running Ember the way a user would (SIGTERM), so that it still stops its guest and
/// writes its boot log; kills it if it has not exited within 5 s.
pub fn stop(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = wait_deadline(child, Duration::from_secs(5));
}

impl Run {
    /// Asserts a clean exit and returns stdout.
    pub fn ok(&self) -> &str {
        assert!(
            self.status.success(),
            "ember failed: {:?}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        &self.stdout
    }

    /// Asserts the user-error contract: non-zero status, exactly one `ember: error:` line, no panic.
    pub fn user_error(&self) -> &str {
        assert!(
            !self.status.success() && self.status.code().is_some(),
            "expected an error exit, got {:?}\nstderr:\n{}",
            self.status,
            self.stderr
        );
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("ember: error:"))
            .collect();
        assert_eq!(lines.len(), 1, "one error line expected:\n{}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        assert!(!self.stderr.contains("RUST_BACKTRACE"), "{}", self.stderr);
        lines[0]
    }
}

/// One HTTP request on the API socket; returns the status and the body.
pub fn http(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("the API socket answers");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("a whole reply");
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {reply:?}"));
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Runs `cmd` with stdin at EOF and returns its status, its stdout as bytes (for byte-exact
/// checks) and its stderr; kills it at `deadline`.
pub fn run_command_bytes(mut cmd: Command, deadline: Duration) -> (ExitStatus, Vec<u8>, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err = drain(child.stderr.take().unwrap());
    let status = wait_deadline(&mut child, deadline);
    let stdout = reader.join().unwrap();
    let stderr = err.join().unwrap();
    let status =
        status.unwrap_or_else(|| panic!("timed out after {deadline:?}\nstderr:\n{stderr}"));
    (status, stdout, stderr)
}

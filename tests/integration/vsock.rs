//! `--vsock`: the command line, the listener's socket file, and Linux on the other end.
//!
//! The Linux test boots Ember's microVM kernel (CONFIG_VIRTIO_VSOCKETS) with the kit's
//! `initramfs-reboot.cpio` and, appended to it, `tests/linux/vsock-peer.c` built static with
//! gcc and run as init (`rdinit=/vsock-peer`). The guest's driver must find the device
//! (`/dev/vsock`, virtio device 0x0013, the CID given); then a host-initiated connection
//! (`CONNECT 52` on the listener) and a guest-initiated one (the guest to host port 53, which
//! Ember connects to `<uds>_53`) each carry a patterned stream each way, checked byte for byte
//! and by FNV-1a hash on both ends; then the guest accepts a third connection and never reads
//! it, and while the host pushes at it, the host sees backpressure and Ember's resident memory
//! stays flat. Stopped with SIGTERM, Ember removes its listener's socket file.
//!
//! 64 MiB each way on hardware KVM. On kvm_pvm, where the guest kernel is emulated, vsock moved
//! 0.28 MB/s host to guest and 0.45 MB/s guest to host (2026-12-01, 4 MiB runs; Ember's own
//! share is negligible, see the device model's figure in the README): 64 MiB each way on both
//! connections would take about 13 minutes, so the test moves 4 MiB there (~1 minute).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::{self, kit_file, microvm_kernel, KvmKind};

const HOST_TO_GUEST_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const GUEST_TO_HOST_SEED: u64 = 0xd1b5_4a32_d192_ed03;
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;
const CID: u32 = 7;
/// Ember's default command line (config.rs).
const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// The byte stream vsock-peer.c checks and sends: xorshift64 words, little-endian.
struct Pattern {
    state: u64,
    word: u64,
    left: u32,
}

impl Pattern {
    fn new(seed: u64) -> Self {
        Pattern {
            state: seed,
            word: 0,
            left: 0,
        }
    }

    fn next(&mut self) -> u8 {
        if self.left == 0 {
            let mut x = self.state;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.state = x;
            self.word = x;
            self.left = 8;
        }
        let b = self.word as u8;
        self.word >>= 8;
        self.left -= 1;
        b
    }
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn bytes_each_way() -> u64 {
    match common::kvm_kind() {
        KvmKind::Hardware => 64 << 20,
        KvmKind::Pvm => 4 << 20,
    }
}

/// The kit's reboot initramfs with vsock-peer appended (the kernel unpacks concatenated
/// archives in turn), built once per test run.
fn peer_initramfs() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vsock-peer");
            std::fs::create_dir_all(&dir).unwrap();
            let exe = dir.join("vsock-peer");
            let src = common::repo_root().join("tests/linux/vsock-peer.c");
            let out = Command::new("gcc")
                .args(["-O2", "-static", "-s", "-Wall", "-Wextra", "-Werror", "-o"])
                .arg(&exe)
                .arg(&src)
                .output()
                .expect("gcc is installed (scripts/deps.sh)");
            assert!(
                out.status.success(),
                "building {}: {}",
                src.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let mut archive = std::fs::read(kit_file("initramfs-reboot.cpio")).unwrap();
            let mut ours = Vec::new();
            newc_entry(
                &mut ours,
                "vsock-peer",
                0o100755,
                &std::fs::read(&exe).unwrap(),
            );
            newc_entry(&mut ours, "TRAILER!!!", 0, &[]);
            // Each archive starts on a 4-byte boundary; the kit's ends on one already.
            while !archive.len().is_multiple_of(4) {
                archive.push(0);
            }
            archive.extend(ours);
            let path = dir.join("initramfs-vsock.cpio");
            std::fs::write(&path, archive).unwrap();
            path
        })
        .clone()
}

/// One file of a newc ("070701") cpio archive.
fn newc_entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    let fields = [
        1,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A scratch directory for the sockets, removed after.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ember-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn vsock_specs_are_checked_before_anything_starts() {
    let dir = Scratch::new("vsock-cli");
    let hello = common::guest("hello");
    let hello = hello.to_str().unwrap();
    let uds = dir.0.join("v.sock");
    let uds = uds.to_str().unwrap();
    for (spec, want) in [
        (format!("cid=2,uds={uds}"), "reserved"),
        (format!("cid=4294967295,uds={uds}"), "from 3 to 4294967294"),
        ("cid=3".to_string(), "both cid=N and uds=PATH are required"),
        (format!("cid=3,uds={uds},x=1"), "unknown key"),
    ] {
        let run = common::run_ember(
            &["run", "--kernel", hello, "--vsock", &spec],
            b"",
            Duration::from_secs(20),
        );
        let line = run.user_error();
        assert!(line.contains(want), "{spec}: {line}");
        assert!(!Path::new(uds).exists());
    }
    // A path in use is refused and left alone.
    std::fs::write(uds, b"not a socket").unwrap();
    let run = common::run_ember(
        &[
            "run",
            "--kernel",
            hello,
            "--vsock",
            &format!("cid=3,uds={uds}"),
        ],
        b"",
        Duration::from_secs(20),
    );
    assert!(
        run.user_error().contains("exists already"),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read(uds).unwrap(), b"not a socket");
    // The snapshot fixes the machine: a restore may move the socket, not change the CID.
    let run = common::run_ember(
        &[
            "run",
            "--restore",
            "s",
            "--mem",
            "m",
            "--vsock",
            "cid=3,uds=x",
        ],
        b"",
        Duration::from_secs(20),
    );
    assert!(run.user_error().contains("keeps the CID"), "{}", run.stderr);
}

/// Stops Ember as a user would and checks it ended by that signal; returns its stderr.
fn stop_with_sigterm(child: &mut Child) -> String {
    common::stop(child);
    let status = child.wait().unwrap();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert_eq!(status.code(), Some(143), "{err}");
    err
}

/// The listener's file exists while the guest runs and is gone when Ember exits, under the
/// seccomp filters (the main thread may remove it, and nothing else).
#[test]
fn the_listener_socket_file_is_removed_when_ember_exits() {
    let dir = Scratch::new("vsock-file");
    let uds = dir.0.join("v.sock");
    let echo = common::guest("echo");
    let mut child = Command::new(common::ember())
        .args(["run", "--kernel", echo.to_str().unwrap(), "--vsock"])
        .arg(format!("cid=3,uds={}", uds.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The guest runs (and Ember's signal handling is in place) once it says so.
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(ready.contains("echo: ready"), "{ready:?}");
    assert!(uds.exists(), "no listener");
    // A host client before the guest has a driver: closed, not hung.
    let mut c = UnixStream::connect(&uds).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"CONNECT 52\n").unwrap();
    let mut buf = Vec::new();
    assert_eq!(c.read_to_end(&mut buf).unwrap(), 0);
    let err = stop_with_sigterm(&mut child);
    assert!(!uds.exists(), "the socket file is left behind\n{err}");
}

/// A VM with vsock is snapshotted (its connections would not survive: the restored guest is
/// told so with a transport reset). A clone restored while the first Ember still holds the saved
/// path is refused with the reason; with `--vsock uds=PATH` it listens there, and under the
/// seccomp filters every socket file goes at exit.
#[test]
fn a_vm_with_vsock_is_snapshotted_and_a_clone_listens_where_it_is_told() {
    let dir = Scratch::new("vsock-snap");
    let api = dir.0.join("api.sock");
    let uds = dir.0.join("v.sock");
    let counter = common::guest("counter");
    let mut child = Command::new(common::ember());
    child
        .args([
            "run",
            "--kernel",
            counter.to_str().unwrap(),
            "--serial",
            "null",
        ])
        .arg("--api-sock")
        .arg(&api)
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()));
    let mut child = spawn_quiet(child);
    let start = Instant::now();
    // The VM runs once its API answers "Running".
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the API never answered"
        );
        if UnixStream::connect(&api).is_ok()
            && common::http(&api, "GET", "/", None).1.contains("Running")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(uds.exists());
    let (status, _) = common::http(&api, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    assert_eq!(status, 204);
    let (snap, mem) = (dir.0.join("snap"), dir.0.join("mem"));
    let body = format!(
        r#"{{"snapshot_path":"{}","mem_file_path":"{}"}}"#,
        snap.display(),
        mem.display()
    );
    let (status, reply) = common::http(&api, "PUT", "/snapshot/create", Some(&body));
    assert_eq!(status, 204, "{reply}");
    let restore = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--restore",
            snap.to_str().unwrap(),
            "--mem",
            mem.to_str().unwrap(),
            "--serial",
            "null",
        ];
        args.extend_from_slice(extra);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    // The first Ember listens on the saved path still.
    let args = restore(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = common::run_ember(&args, b"", Duration::from_secs(20));
    assert!(
        run.user_error().contains("exists already"),
        "{}",
        run.stderr
    );
    let clone_uds = dir.0.join("clone.sock");
    let rebind = format!("uds={}", clone_uds.display());
    let mut clone = Command::new(common::ember());
    clone.args(restore(&["--vsock", &rebind]));
    let mut clone = spawn_quiet(clone);
    let start = Instant::now();
    while !clone_uds.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the clone never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = stop_with_sigterm(&mut clone);
    assert!(
        !clone_uds.exists(),
        "the clone's socket file is left\n{err}"
    );
    let err = stop_with_sigterm(&mut child);
    assert!(
        !api.exists() && !uds.exists(),
        "a socket file is left behind\n{err}"
    );
}

/// Ember with no input or output, its stderr kept for the report.
fn spawn_quiet(mut cmd: Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Ember running the vsock peer guest, its console lines arriving on a channel.
struct Guest {
    child: Child,
    lines: Receiver<(Duration, String)>,
    seen: Vec<(Duration, String)>,
    start: Instant,
    deadline: Duration,
}

impl Guest {
    /// Waits for a console line containing `needle`; returns it.
    fn wait_for(&mut self, needle: &str) -> String {
        if let Some((_, l)) = self.seen.iter().find(|(_, l)| l.contains(needle)) {
            return l.clone();
        }
        loop {
            let left = self.deadline.saturating_sub(self.start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok((t, line)) => {
                    self.seen.push((t, line.clone()));
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no console line with {needle:?} within {:?}\n{}",
                    self.deadline,
                    self.transcript()
                ),
            }
        }
    }

    fn transcript(&self) -> String {
        self.seen
            .iter()
            .map(|(t, l)| format!("[{:7.2}] {l}\n", t.as_secs_f64()))
            .collect()
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

/// Sends `n` bytes of the host's pattern, then ends its side; receives the guest's stream to
/// its end. Returns (bytes sent, seconds, fnv) and (bytes received, seconds, fnv), checking
/// every received byte against the guest's pattern.
fn exchange(s: &mut UnixStream, n: u64, what: &str) -> ((u64, f64, u64), (u64, f64, u64)) {
    let mut pattern = Pattern::new(HOST_TO_GUEST_SEED);
    let mut chunk = vec![0u8; 64 << 10];
    let mut sent = 0u64;
    let mut h = FNV_START;
    let t0 = Instant::now();
    while sent < n {
        let len = (n - sent).min(chunk.len() as u64) as usize;
        for b in &mut chunk[..len] {
            *b = pattern.next();
        }
        h = fnv(h, &chunk[..len]);
        s.write_all(&chunk[..len])
            .unwrap_or_else(|e| panic!("{what}: write after {sent} bytes: {e}"));
        sent += len as u64;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let up = (sent, t0.elapsed().as_secs_f64(), h);
    let mut want = Pattern::new(GUEST_TO_HOST_SEED);
    let mut got = 0u64;
    let mut h = FNV_START;
    let mut first = None;
    loop {
        let len = match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(len) => len,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("{what}: read after {got} bytes: {e}"),
        };
        first.get_or_insert_with(Instant::now);
        for (i, b) in chunk[..len].iter().enumerate() {
            assert_eq!(
                *b,
                want.next(),
                "{what}: byte {} from the guest",
                got + i as u64
            );
        }
        h = fnv(h, &chunk[..len]);
        got += len as u64;
    }
    let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    (up, (got, secs, h))
}

fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9) / 1e6
}

/// The guest's report for one connection matches what the host sent and got.
fn check_guest_report(g: &mut Guest, what: &str, up: (u64, f64, u64), down: (u64, f64, u64)) {
    let received = g.wait_for(&format!("vsock-peer: {what} received"));
    assert!(
        received.contains(&format!("received {} bytes ok fnv {:016x}", up.0, up.2)),
        "{what}: the guest got other bytes than were sent: {received}\n{}",
        g.transcript()
    );
    let sent = g.wait_for(&format!("vsock-peer: {what} sent"));
    assert!(
        sent.contains(&format!("sent {} bytes fnv {:016x}", down.0, down.2)),
        "{what}: the host got other bytes than the guest sent: {sent}"
    );
}

#[test]
fn linux_carries_streams_both_ways_on_host_and_guest_initiated_connections() {
    const TEST: &str = "linux_carries_streams_both_ways_on_host_and_guest_initiated_connections";
    let n = bytes_each_way();
    if n < 64 << 20 {
        common::reduced_on_pvm(
            TEST,
            &format!(
                "{} MiB each way, not 64 (the emulated guest kernel moves ~0.5 MB/s)",
                n >> 20
            ),
        );
    }
    let kernel = microvm_kernel("vmlinux");
    let config = std::fs::read_to_string(microvm_kernel("config")).unwrap();
    assert!(
        config.contains("\nCONFIG_VIRTIO_VSOCKETS=y\n"),
        "{TEST}: {} has no vsock driver: it predates the config fragment's vsock lines; \
         rebuild it with scripts/microvm-kernel.sh",
        kernel.display()
    );
    let initramfs = peer_initramfs();
    let dir = Scratch::new("vsock-linux");
    let uds = dir.0.join("v.sock");
    let guest_port_listener =
        UnixListener::bind(format!("{}_53", uds.display())).expect("a listener for port 53");
    guest_port_listener.set_nonblocking(true).unwrap();
    let cmdline = format!(
        "{DEFAULT_CMDLINE} rdinit=/vsock-peer vsock.bytes={n} vsock.listen=52 vsock.connect=53 \
         vsock.stall=54"
    );
    let _one = crate::kernels::ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let start = Instant::now();
    let mut child = Command::new(common::ember())
        .args(["run", "--kernel", kernel.to_str().unwrap(), "--initramfs"])
        .arg(&initramfs)
        .args(["--cmdline", &cmdline, "--vsock"])
        .arg(format!("cid={CID},uds={}", uds.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ember");
    let rx = common::console_lines(&mut child, start);
    // Boot ~25 s and 4 MiB each way on two connections ~1 min on kvm_pvm; far less elsewhere.
    let mut g = Guest {
        child,
        lines: rx,
        seen: Vec::new(),
        start,
        deadline: Duration::from_secs(900),
    };

    g.wait_for("vsock-peer: dev-vsock yes");
    g.wait_for("device 0x0013");
    g.wait_for(&format!("vsock-peer: cid {CID}"));

    // Host-initiated: CONNECT on the listener, once the guest listens.
    g.wait_for("vsock-peer: listening 52");
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    let mut ok = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        ok.push(b[0]);
    }
    let ok = String::from_utf8(ok).unwrap();
    let port: u32 = ok
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{TEST}: {ok:?} is no OK line\n{}", g.transcript()));
    assert!(port >= 1 << 30, "{ok}");
    let (up, down) = exchange(&mut s, n, "host-initiated");
    assert_eq!((up.0, down.0), (n, n));
    check_guest_report(&mut g, "host-initiated", up, down);
    let host_initiated = (mb_per_s(up.0, up.1), mb_per_s(down.0, down.1));

    // Guest-initiated: Ember connects to <uds>_53.
    let accept_by = Instant::now() + Duration::from_secs(300);
    let mut c = loop {
        match guest_port_listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < accept_by => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{TEST}: no connection on port 53: {e}\n{}", g.transcript()),
        }
    };
    c.set_nonblocking(false).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
    let (up, down) = exchange(&mut c, n, "guest-initiated");
    assert_eq!((up.0, down.0), (n, n));
    check_guest_report(&mut g, "guest-initiated", up, down);
    let guest_initiated = (mb_per_s(up.0, up.1), mb_per_s(down.0, down.1));
    eprintln!(
        "{TEST}: {n} bytes each way; host->guest {:.2} / {:.2} MB/s, guest->host {:.2} / {:.2} \
         MB/s (host-initiated / guest-initiated)",
        host_initiated.0, guest_initiated.0, host_initiated.1, guest_initiated.1
    );

    // A guest that accepts and never reads: the host is held back, Ember does not grow.
    g.wait_for("vsock-peer: listening 54");
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    s.write_all(b"CONNECT 54\n").unwrap();
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {}
    g.wait_for("vsock-peer: stalling accepted");
    s.set_nonblocking(true).unwrap();
    let rss_before = g.rss_kib();
    let chunk = vec![0xa5u8; 64 << 10];
    let (mut pushed, mut last_progress) = (0u64, Instant::now());
    // Until nothing more has gone in for 3 s (the emulated guest kernel takes its buffer's
    // worth slowly), or 64 MiB went in (no backpressure at all).
    while last_progress.elapsed() < Duration::from_secs(3) && pushed < 64 << 20 {
        match s.write(&chunk) {
            Ok(k) => {
                pushed += k as u64;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("{TEST}: pushing at a stalled guest: {e}"),
        }
    }
    let rss_after = g.rss_kib();
    eprintln!(
        "{TEST}: a guest that does not read took {pushed} bytes before the host was held back; \
         Ember's RSS {rss_before} -> {rss_after} KiB"
    );
    // The guest's socket buffer (256 KiB), the packets in its receive queue and the host's own
    // socket buffers; never the 64 MiB offered.
    assert!(
        pushed < 8 << 20,
        "{TEST}: no backpressure: {pushed} bytes taken"
    );
    assert!(
        rss_after < rss_before + 4096,
        "{TEST}: Ember grew from {rss_before} to {rss_after} KiB"
    );

    common::stop(&mut g.child);
    let status = g.child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{}", g.transcript());
    assert!(!uds.exists(), "{TEST}: the listener's file is left behind");
}

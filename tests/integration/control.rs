//! Driving a `Vmm` through its public API, as an API server or a test harness does: pause,
//! resume and stop a running guest from another thread.

use std::path::Path;
use std::time::{Duration, Instant};

use ember_vmm::config::{SerialMode, VmConfig, DEFAULT_CMDLINE};
use ember_vmm::vcpu::ExitReason;
use ember_vmm::vmm::Vmm;

use crate::common;

fn counter_config(console: &Path) -> VmConfig {
    VmConfig {
        kernel: common::guest("counter"),
        initramfs: None,
        cmdline: format!("{DEFAULT_CMDLINE} counter.tsc=4000000"),
        cpus: 1,
        memory: 32 << 20,
        serial: SerialMode::File(console.to_path_buf()),
        disks: Vec::new(),
        vsock: None,
        timings: None,
        ready_marker: None,
        seccomp: false,
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The counter guest's numbered lines, checked to carry one nonce and to count up from 0 without
/// a gap; returns the last number.
fn check_counting(console: &str) -> u64 {
    let mut nonce = None;
    let mut next = 0u64;
    // Only whole lines: one the guest is still writing ("n=1" of "n=11") is checked next time.
    let whole = console
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(str::trim_end);
    for line in whole.filter(|l| l.contains(" n=")) {
        let (left, n) = line.rsplit_once(" n=").unwrap();
        let this_nonce = left.trim_start_matches("counter: nonce=");
        assert_eq!(
            *nonce.get_or_insert(this_nonce.to_string()),
            this_nonce,
            "the nonce changed (the guest rebooted?):\n{console}"
        );
        let n: u64 = n
            .parse()
            .unwrap_or_else(|_| panic!("not a count: {line:?}\n{console}"));
        assert_eq!(n, next, "a line is missing or repeated:\n{console}");
        next += 1;
    }
    assert!(next > 0, "the guest printed no count:\n{console}");
    next - 1
}

fn wait_for(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_paused_guest_prints_nothing_and_resumes_where_it_stopped() {
    let dir = tempfile_dir("pause");
    let console = dir.join("console");
    let vmm = Vmm::build(&counter_config(&console)).expect("the VM builds");
    let ctl = vmm.controller();
    let runner = std::thread::spawn(move || vmm.run());
    wait_for("the counter to reach 5", Duration::from_secs(20), || {
        read(&console).contains(" n=5\n")
    });

    ctl.pause().expect("the vCPU stops");
    assert!(ctl.is_paused());
    // What the vCPU wrote before it stopped may still be on its way to the file.
    std::thread::sleep(Duration::from_millis(100));
    let at_pause = read(&console);
    std::thread::sleep(Duration::from_millis(500));
    let later = read(&console);
    assert_eq!(at_pause, later, "the guest printed while paused");
    let last = check_counting(&at_pause);

    ctl.resume();
    assert!(!ctl.is_paused());
    let want = format!(" n={}\n", last + 5);
    wait_for(
        "the count to go on after resume",
        Duration::from_secs(20),
        || read(&console).contains(&want),
    );
    let after = read(&console);
    assert!(after.starts_with(&at_pause));
    assert!(check_counting(&after) >= last + 5);

    // Pausing twice is one pause; a stop ends a paused VM at once.
    ctl.pause().expect("the vCPU stops again");
    ctl.pause().expect("a second pause is a no-op");
    let stop_at = Instant::now();
    ctl.stop();
    let reason = runner.join().expect("run does not panic");
    assert_eq!(reason.expect("the VM ran"), ExitReason::Stopped);
    assert!(
        stop_at.elapsed() < Duration::from_secs(2),
        "stopping a paused VM took {:?}",
        stop_at.elapsed()
    );
    assert!(ctl.pause().is_err(), "a VM that ended cannot be paused");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_guest_ending_by_itself_is_what_run_returns() {
    let dir = tempfile_dir("ends");
    let console = dir.join("console");
    let mut cfg = counter_config(&console);
    cfg.kernel = common::guest("hello");
    cfg.cmdline = format!("{DEFAULT_CMDLINE} exit=acpi");
    let vmm = Vmm::build(&cfg).expect("the VM builds");
    assert_eq!(vmm.run().expect("the VM ran"), ExitReason::Poweroff);
    assert!(read(&console).contains("exit: acpi"), "{}", read(&console));
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir(what: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("control-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_api_socket_pauses_and_resumes_a_running_guest() {
    let dir = tempfile_dir("api");
    let console = dir.join("console");
    let sock = dir.join("api.sock");
    let mut child = std::process::Command::new(common::ember())
        .args(["run", "--kernel"])
        .arg(common::guest("counter"))
        .arg(format!("--serial=file={}", console.display()))
        .arg("--api-sock")
        .arg(&sock)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the counter to reach 3", Duration::from_secs(20), || {
        read(&console).contains(" n=3\n")
    });
    let (status, body) = common::http(&sock, "GET", "/", None);
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["app_name"], "Ember");
    assert_eq!(info["state"], "Running");

    assert_eq!(
        common::http(&sock, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).0,
        204
    );
    std::thread::sleep(Duration::from_millis(100));
    let at_pause = read(&console);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(read(&console), at_pause, "the guest printed while paused");
    let (_, body) = common::http(&sock, "GET", "/", None);
    assert!(body.contains(r#""state":"Paused""#), "{body}");

    // A client that sends half a request and stalls does not keep the API from the next one.
    let mut stalled = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::io::Write::write_all(&mut stalled, b"PATCH /vm HTTP/1.1\r\nContent-Le").unwrap();

    assert_eq!(
        common::http(&sock, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#)).0,
        204
    );
    let last = check_counting(&at_pause);
    let want = format!(" n={}\n", last + 3);
    wait_for("the count to go on", Duration::from_secs(20), || {
        read(&console).contains(&want)
    });
    check_counting(&read(&console));

    let (status, body) = common::http(&sock, "PATCH", "/vm", Some(r#"{"state":"Sleeping"}"#));
    assert_eq!(status, 400);
    assert!(body.contains("fault_message"), "{body}");
    assert_eq!(common::http(&sock, "PUT", "/nothing", Some("{}")).0, 404);

    // SIGTERM ends it as ever; the socket file goes with it.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = common::wait_deadline(&mut child, Duration::from_secs(5)).expect("Ember exits");
    assert_eq!(status.code(), Some(143));
    assert!(!sock.exists(), "the API socket was left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_api_socket_path_in_use_is_one_clear_error() {
    let dir = tempfile_dir("api-exists");
    let sock = dir.join("api.sock");
    std::fs::write(&sock, b"precious").unwrap();
    let run = common::run_ember(
        &[
            "run",
            "--kernel",
            common::guest("hello").to_str().unwrap(),
            "--serial=null",
            "--api-sock",
            sock.to_str().unwrap(),
        ],
        b"",
        Duration::from_secs(20),
    );
    let err = run.user_error();
    assert!(
        err.contains("--api-sock") && err.contains("exists"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&sock).unwrap(),
        b"precious",
        "the file was touched"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

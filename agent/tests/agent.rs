//! The agent on the host (`--listen-unix`): the same request handling it does in a microVM, checked
//! against what `ember exec` promises: exit statuses, signals, streams complete and in order,
//! binary output byte-exact, and the not-found / not-executable cases.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ember_agent::{Frame, Outcome, Request};

struct Agent {
    child: Child,
    sock: PathBuf,
}

fn start() -> Agent {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let sock = std::env::temp_dir().join(format!("ember-agent-{}-{n}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(env!("CARGO_BIN_EXE_ember-agent"))
        .arg("--listen-unix")
        .arg(&sock)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the agent did not listen"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    Agent { child, sock }
}

/// Runs `argv` through the agent; returns stdout, stderr and the outcome.
fn exec(argv: &[&str]) -> (Vec<u8>, Vec<u8>, Outcome) {
    exec_in(argv, "/")
}

fn exec_in(argv: &[&str], cwd: &str) -> (Vec<u8>, Vec<u8>, Outcome) {
    let mut agent = start();
    let mut conn = UnixStream::connect(&agent.sock).unwrap();
    let req = Request {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: cwd.into(),
    };
    ember_agent::write_request(&mut conn, &req).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let outcome = loop {
        match ember_agent::read_frame(&mut conn).unwrap() {
            Some(Frame::Stdout(d)) => out.extend(d),
            Some(Frame::Stderr(d)) => err.extend(d),
            Some(Frame::Exit(o)) => break o,
            None => panic!("the agent closed without an outcome"),
            Some(Frame::Ready(v)) => panic!("a ready frame ({v}) to a request"),
        }
    };
    assert!(agent.child.wait().unwrap().success());
    let _ = std::fs::remove_file(&agent.sock);
    (out, err, outcome)
}

#[test]
fn exit_statuses_and_signals_come_back() {
    assert_eq!(exec(&["true"]).2, Outcome::Exited(0));
    assert_eq!(exec(&["false"]).2, Outcome::Exited(1));
    assert_eq!(exec(&["sh", "-c", "exit 42"]).2, Outcome::Exited(42));
    assert_eq!(exec(&["sh", "-c", "kill -9 $$"]).2, Outcome::Signalled(9));
}

#[test]
fn ten_thousand_lines_arrive_complete_and_in_order_per_stream() {
    let script = "i=1; while [ $i -le 10000 ]; do echo out $i; if [ $((i % 100)) = 0 ]; then echo err $i >&2; fi; i=$((i+1)); done";
    let (out, err, outcome) = exec(&["sh", "-c", script]);
    assert_eq!(outcome, Outcome::Exited(0));
    let want: String = (1..=10000).map(|i| format!("out {i}\n")).collect();
    assert_eq!(String::from_utf8(out).unwrap(), want);
    let want_err: String = (1..=100).map(|i| format!("err {}\n", i * 100)).collect();
    assert_eq!(String::from_utf8(err).unwrap(), want_err);
}

#[test]
fn binary_output_is_byte_exact() {
    let dir = std::env::temp_dir().join(format!("ember-agent-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let file = dir.join("blob");
    std::fs::write(&file, &data).unwrap();
    let (out, _, outcome) = exec(&["cat", file.to_str().unwrap()]);
    assert_eq!(outcome, Outcome::Exited(0));
    assert!(
        out == data,
        "cat's output differs ({} bytes vs {})",
        out.len(),
        data.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_and_unrunnable_commands_are_told_apart() {
    assert!(matches!(
        exec(&["no-such-command-ember"]).2,
        Outcome::NotFound(_)
    ));
    let dir = std::env::temp_dir().join(format!("ember-agent-noexec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("script");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    assert!(matches!(
        exec(&[script.to_str().unwrap()]).2,
        Outcome::NotExecutable(_)
    ));
    assert!(matches!(
        exec_in(&["true"], "/no/such/dir").2,
        Outcome::Failed(_)
    ));
    assert!(matches!(exec(&[]).2, Outcome::Failed(_)));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Console mode on the host: the command's output and then the outcome line on stdout, with
/// the status, signal or missing command the line reports.
#[test]
fn console_mode_prints_the_output_then_the_outcome_line() {
    let console = |argv: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ember-agent"))
            .arg("--console")
            .args(argv)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (out, err) = console(&["sh", "-c", "echo to-out; echo to-err >&2; exit 3"]);
    assert_eq!(out, "to-out\nember-agent: outcome {\"Exited\":3}\n");
    assert_eq!(err, "to-err\n");
    assert_eq!(
        ember_agent::parse_outcome_line(&out),
        Some(Outcome::Exited(3))
    );
    let (out, _) = console(&["true"]);
    assert_eq!(
        ember_agent::parse_outcome_line(&out),
        Some(Outcome::Exited(0))
    );
    let (out, _) = console(&["sh", "-c", "kill -9 $$"]);
    assert_eq!(
        ember_agent::parse_outcome_line(&out),
        Some(Outcome::Signalled(9))
    );
    let (out, _) = console(&["no-such-command-ember"]);
    assert!(matches!(
        ember_agent::parse_outcome_line(&out),
        Some(Outcome::NotFound(_))
    ));
    // The environment is exec's default one, not the agent's.
    let (out, _) = console(&["sh", "-c", "echo \"$HOME $TERM\""]);
    assert!(out.starts_with("/root dumb\n"), "{out}");
}

/// Pings, and a connection that breaks before its request (as each does when the VM is restored
/// from a snapshot), leave the agent waiting for its command, which it then runs.
#[test]
fn pings_and_broken_connections_leave_the_agent_listening_for_the_command() {
    let mut agent = start();
    for _ in 0..2 {
        let mut conn = UnixStream::connect(&agent.sock).unwrap();
        ember_agent::write_ping(&mut conn).unwrap();
        assert_eq!(
            ember_agent::read_frame(&mut conn).unwrap(),
            Some(Frame::Ready(env!("CARGO_PKG_VERSION").into()))
        );
        assert_eq!(
            ember_agent::read_frame(&mut conn).unwrap(),
            None,
            "then it closes"
        );
    }
    // Half a request, then gone.
    let mut conn = UnixStream::connect(&agent.sock).unwrap();
    std::io::Write::write_all(&mut conn, b"{\"argv\":").unwrap();
    drop(conn);
    let mut conn = UnixStream::connect(&agent.sock).unwrap();
    let req = Request {
        argv: vec!["sh".into(), "-c".into(), "echo ran; exit 3".into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: "/".into(),
    };
    ember_agent::write_request(&mut conn, &req).unwrap();
    assert_eq!(
        ember_agent::read_frame(&mut conn).unwrap(),
        Some(Frame::Stdout(b"ran\n".to_vec()))
    );
    assert_eq!(
        ember_agent::read_frame(&mut conn).unwrap(),
        Some(Frame::Exit(Outcome::Exited(3)))
    );
    assert!(agent.child.wait().unwrap().success());
    let _ = std::fs::remove_file(&agent.sock);
}

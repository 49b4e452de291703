//! The console on a real terminal: raw mode, the Ctrl-A escape, and the terminal restored on every
//! exit path. `script` (util-linux) gives Ember a pseudo-terminal; the shell inside it prints the
//! terminal settings before and after Ember so the test can compare them.

use std::process::Command;
use std::time::Duration;

use crate::common::{self, run_command};

/// Runs `body` (a shell snippet where `$EMBER` and `$GUEST` are set) on a fresh pty, typing each
/// of `keys` (printf strings) with a pause before it, as a person would: Ember is up and in raw
/// mode before the first, and the guest has answered one before the next.
fn on_a_terminal(body: &str, keys: &[&str]) -> String {
    on_a_terminal_with("echo", body, keys)
}

fn on_a_terminal_with(guest: &str, body: &str, keys: &[&str]) -> String {
    common::kvm_kind();
    let guest = common::guest(guest);
    let script = format!(
        "EMBER='{}'; GUEST='{}'; echo \"before=$(stty -g)\"; {body}; echo \"after=$(stty -g)\"",
        common::ember(),
        guest.display()
    );
    let typing: String = keys
        .iter()
        .map(|k| format!("sleep 0.4; printf '{k}'; "))
        .collect();
    let feeder = format!("{typing}sleep 2");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("({feeder}) | script -qec \"$0\" /dev/null",));
    cmd.arg(script);
    let run = run_command(cmd, b"", Duration::from_secs(30));
    run.stdout.replace('\r', "")
}

fn setting(out: &str, key: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} line in:\n{out}"))
        .to_string()
}

#[test]
fn typed_line_reaches_the_guest_and_ctrl_a_x_quits_with_0() {
    let out = on_a_terminal(
        "$EMBER run --kernel $GUEST; echo \"status=$?\"",
        &["marmalade\\r", "\\001\\001z\\r", "\\001x"],
    );
    assert!(out.contains("echo: ready"), "{out}");
    // Enter on a raw terminal is \r, and the guest sees it as typed.
    assert!(out.contains("echo: marmalade\n"), "{out}");
    // Ctrl-A Ctrl-A sends one Ctrl-A.
    assert!(out.contains("echo: \u{1}z\n"), "{out}");
    assert!(out.contains("status=0"), "{out}");
    assert_eq!(
        setting(&out, "before="),
        setting(&out, "after="),
        "terminal not restored:\n{out}"
    );
}

#[test]
fn sigterm_stops_the_guest_with_143_and_restores_the_terminal() {
    // A background job's stdin would be /dev/null; give it the terminal explicitly.
    let out = on_a_terminal(
        "$EMBER run --kernel $GUEST </dev/tty & pid=$!; sleep 0.3; \
         echo \"mid=$(stty -g </dev/tty)\"; echo \"midflags=$(stty -a </dev/tty | tr '\\n' ' ')\"; \
         kill -TERM $pid; wait $pid; echo \"status=$?\"",
        &[],
    );
    assert!(out.contains("status=143"), "{out}");
    assert_ne!(
        setting(&out, "before="),
        setting(&out, "mid="),
        "Ember did not enter raw mode:\n{out}"
    );
    // Fully raw, output too: the guest's tty translates its own line ends.
    let flags = setting(&out, "midflags=");
    assert!(
        flags.split_whitespace().any(|f| f == "-opost"),
        "output processing still on: {flags}"
    );
    assert_eq!(
        setting(&out, "before="),
        setting(&out, "after="),
        "terminal not restored:\n{out}"
    );
}

/// A guest that prints without end while nobody reads Ember's output (a paused pager, `| sleep
/// 30`): SIGTERM still ends Ember at once with 143 and the terminal is restored. Ember's vCPU once
/// blocked writing to the full pipe while holding the serial port, and the stop path waited for
/// it for ever.
#[test]
fn sigterm_ends_ember_promptly_while_nobody_reads_its_output() {
    let out = on_a_terminal_with(
        "flood",
        "d=$(mktemp -d); mkfifo \"$d/out\"; exec 3<>\"$d/out\"; \
         $EMBER run --kernel $GUEST </dev/tty >\"$d/out\" & pid=$!; sleep 1.5; \
         echo \"mid=$(stty -g </dev/tty)\"; t0=$(date +%s%N); kill -TERM $pid; wait $pid; s=$?; \
         t1=$(date +%s%N); echo \"status=$s took_ms=$(( (t1 - t0) / 1000000 ))\"; \
         exec 3>&-; rm -r \"$d\"",
        &[],
    );
    assert!(out.contains("status=143"), "{out}");
    let took: u64 = setting(&out, "status=143 took_ms=").trim().parse().unwrap();
    assert!(took < 2000, "SIGTERM took {took} ms to end Ember:\n{out}");
    assert_ne!(
        setting(&out, "before="),
        setting(&out, "mid="),
        "Ember did not enter raw mode:\n{out}"
    );
    assert_eq!(
        setting(&out, "before="),
        setting(&out, "after="),
        "terminal not restored:\n{out}"
    );
}

#[test]
fn a_console_reader_that_goes_away_ends_ember_with_141_quietly() {
    common::kvm_kind();
    let guest = common::guest("echo");
    // `head` leaves after the ready line; the guest's next echo then meets a closed pipe.
    let script = format!(
        "(sleep 0.3; echo one; sleep 0.3; echo two; sleep 2) | '{}' run --kernel '{}' 2>err | head -n 1; \
         echo \"status=${{PIPESTATUS[1]}}\"; cat err",
        common::ember(),
        guest.display()
    );
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(script);
    let dir = std::env::temp_dir().join(format!("ember-console-closed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    cmd.current_dir(&dir);
    let run = run_command(cmd, b"", Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
    let out = run.stdout;
    assert!(out.starts_with("echo: ready"), "{out}");
    assert!(out.contains("status=141"), "{out}");
    // Only the kvm_pvm notice may be on stderr: no per-byte write errors, no `ember: error`.
    for line in out.lines().skip(2) {
        assert!(
            line.starts_with("ember: warning: /dev/kvm is kvm_pvm"),
            "{out}"
        );
    }
}

//! Bad user input: each ends Ember with a non-zero status and exactly one `ember: error:` line that
//! names what was wrong, never a panic.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::{self, Run};

/// Input errors are found before a vCPU runs; a hang is a bug.
const DEADLINE: Duration = Duration::from_secs(30);

fn ember(args: &[&str]) -> Run {
    let run = common::run_ember(args, b"", DEADLINE);
    eprintln!("ember {}: {:?}\n{}", args.join(" "), run.status, run.stderr);
    run
}

/// `ember run --kernel KERNEL` plus `extra`, with a good kernel unless one is given.
fn run_with(kernel: Option<&str>, extra: &[&str]) -> Run {
    let hello = common::guest("hello");
    let mut args = vec!["run", "--kernel", kernel.unwrap_or(hello.to_str().unwrap())];
    args.extend_from_slice(extra);
    ember(&args)
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-scratch");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{}-{name}", std::process::id()))
}

#[test]
fn missing_kernel_file() {
    let path = "/nonexistent/ember-test/vmlinux";
    let run = run_with(Some(path), &[]);
    let line = run.user_error();
    assert!(line.contains(path), "{line}");
}

#[test]
fn text_file_as_kernel() {
    let path = scratch("notes.txt");
    std::fs::write(
        &path,
        "this is not a kernel, it is a shopping list\n".repeat(64),
    )
    .unwrap();
    let run = run_with(Some(path.to_str().unwrap()), &[]);
    let line = run.user_error();
    assert!(line.contains(path.to_str().unwrap()), "{line}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn truncated_kernel() {
    let elf = std::fs::read(common::guest("hello")).unwrap();
    let path = scratch("half-hello.elf");
    std::fs::write(&path, &elf[..elf.len() / 2]).unwrap();
    let run = run_with(Some(path.to_str().unwrap()), &[]);
    let line = run.user_error();
    assert!(line.contains(path.to_str().unwrap()), "{line}");
    // Nothing of the guest ran.
    assert!(!run.stdout.contains("ember-guest"), "{}", run.stdout);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn zero_memory() {
    let run = run_with(None, &["--memory", "0"]);
    let line = run.user_error();
    assert!(line.contains("--memory") && line.contains('0'), "{line}");
}

#[test]
fn zero_cpus() {
    let run = run_with(None, &["--cpus", "0"]);
    let line = run.user_error();
    assert!(line.contains("--cpus") && line.contains('0'), "{line}");
}

#[test]
fn initramfs_is_a_directory() {
    let dir = scratch("initramfs.d");
    std::fs::create_dir_all(&dir).unwrap();
    let run = run_with(None, &["--initramfs", dir.to_str().unwrap()]);
    let line = run.user_error();
    assert!(line.contains(dir.to_str().unwrap()), "{line}");
    assert!(!run.stdout.contains("ember-guest"), "{}", run.stdout);
    let _ = std::fs::remove_dir(&dir);
}

#[test]
fn initramfs_missing() {
    let path = "/nonexistent/ember-test/initramfs.cpio";
    let run = run_with(None, &["--initramfs", path]);
    let line = run.user_error();
    assert!(line.contains(path), "{line}");
}

#[test]
fn unknown_option() {
    let run = run_with(None, &["--frobnicate", "yes"]);
    let line = run.user_error();
    assert!(line.contains("--frobnicate"), "{line}");
}

/// `EMBER_BOOT_LOG` (what scripts/test.sh counts boots with): one timeline line per run, with
/// `first_serial_byte` set only when the guest wrote to its console; a log that cannot be opened
/// does not stop the VM.
#[test]
fn boot_log_records_each_run_and_whether_the_guest_wrote() {
    let log = scratch("boots.jsonl");
    let _ = std::fs::remove_file(&log);
    let with_log = |kernel: &str, log: &std::path::Path| {
        let mut cmd = std::process::Command::new(common::ember());
        cmd.args(["run", "--kernel", kernel, "--serial", "null"])
            .env("EMBER_BOOT_LOG", log);
        common::run_command(cmd, b"", DEADLINE)
    };
    let hello = common::guest("hello");
    with_log(hello.to_str().unwrap(), &log).ok();
    let bad = with_log("/nonexistent/ember-test/vmlinux", &log);
    assert_eq!(bad.status.code(), Some(1), "{}", bad.stderr);

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("\"first_serial_byte\":")
            && !lines[0].contains("\"first_serial_byte\":null"),
        "{text}"
    );
    assert!(lines[0].contains("\"guest_exit\":"), "{text}");
    assert!(lines[1].contains("\"first_serial_byte\":null"), "{text}");
    let _ = std::fs::remove_file(&log);

    let nowhere = PathBuf::from("/nonexistent/ember-test/boots.jsonl");
    with_log(hello.to_str().unwrap(), &nowhere).ok();
}

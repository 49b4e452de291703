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

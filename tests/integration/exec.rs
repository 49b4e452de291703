//! `ember exec`: a command in a throwaway microVM (Ember's microVM kernel, the agent, the root
//! image under a tmp overlay, vsock), with what a CI user checks: the exit status, the output
//! complete and in order, a file from the host's directory, writes that do not reach the base,
//! the time limit, a missing command.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common;

/// The guest boots in ~20 s on kvm_pvm (more when the machine is busy).
const DEADLINE: Duration = Duration::from_secs(240);

struct Exec {
    status: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
    elapsed: Duration,
}

fn exec(extra: &[&str], command: &[&str]) -> Exec {
    let _one = crate::kernels::ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    exec_unlocked(extra, command)
}

/// `exec` for a caller that holds `ONE_AT_A_TIME` already.
fn exec_unlocked(extra: &[&str], command: &[&str]) -> Exec {
    let mut cmd = Command::new(common::ember());
    cmd.arg("exec").args(extra).arg("--").args(command);
    let start = Instant::now();
    let run = common::run_command_bytes(cmd, DEADLINE);
    Exec {
        status: run.0.code(),
        stdout: run.1,
        stderr: run.2,
        elapsed: start.elapsed(),
    }
}

fn kernel_ready() -> bool {
    common::microvm_kernel("vmlinux").exists()
}

#[test]
fn exit_statuses_signals_and_missing_commands_come_back() {
    assert!(kernel_ready());
    for (command, want) in [
        (&["true"][..], 0),
        (&["false"][..], 1),
        (&["sh", "-c", "exit 42"][..], 42),
        (&["sh", "-c", "kill -9 $$"][..], 128 + 9),
        (&["no-such-command-in-the-guest"][..], 127),
    ] {
        let r = exec(&[], command);
        assert_eq!(
            r.status,
            Some(want),
            "{command:?}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&r.stdout),
            r.stderr
        );
        if want == 127 {
            assert!(r.stderr.contains("command not found"), "{}", r.stderr);
        }
    }
}

#[test]
fn ten_thousand_lines_and_stderr_arrive_complete_and_in_order() {
    let script = "i=1; while [ $i -le 10000 ]; do echo line $i; \
                  if [ $((i % 1000)) = 0 ]; then echo err $i >&2; fi; i=$((i+1)); done";
    let r = exec(&[], &["sh", "-c", script]);
    assert_eq!(r.status, Some(0), "{}", r.stderr);
    let want: String = (1..=10000).map(|i| format!("line {i}\n")).collect();
    assert!(
        r.stdout == want.as_bytes(),
        "stdout differs: {} bytes, want {}",
        r.stdout.len(),
        want.len()
    );
    let errs: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with("err ")).collect();
    let want_err: Vec<String> = (1..=10).map(|i| format!("err {}", i * 1000)).collect();
    assert_eq!(errs, want_err);
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// A host directory as the root filesystem: the command reads a binary file the test put there
/// (byte-exact on stdout), writes another; the write is in the run's overlay only: the base image
/// is unchanged and the next run does not see it.
#[test]
fn a_host_directory_as_rootfs_is_read_and_its_image_never_written() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("exec-rootfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kit_root = common::kit_dir().join("rootfs");
    let root = dir.join("root");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(&kit_root)
        .arg(&root)
        .status()
        .unwrap();
    assert!(cp.success());
    let blob: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::write(root.join("data/blob"), &blob).unwrap();
    let rootfs = root.to_str().unwrap();
    let r = exec(
        &["--rootfs", rootfs],
        &["sh", "-c", "cat /data/blob; echo written >/data/new; sync"],
    );
    assert_eq!(r.status, Some(0), "{}", r.stderr);
    assert!(
        r.stdout == blob,
        "the blob came back as {} bytes",
        r.stdout.len()
    );
    let cache = PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/ember/exec");
    let images: Vec<PathBuf> = std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ext4"))
        .collect();
    let before: Vec<(PathBuf, String)> = images.iter().map(|p| (p.clone(), sha256(p))).collect();
    let again = exec(&["--rootfs", rootfs], &["cat", "/data/new"]);
    assert_eq!(
        again.status,
        Some(1),
        "the first run's write leaked: {:?}",
        again.stdout
    );
    for (p, sum) in before {
        assert_eq!(sha256(&p), sum, "{} changed", p.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_time_limit_stops_the_vm_with_status_124() {
    let r = exec(&["--timeout", "2s"], &["sleep", "60"]);
    assert_eq!(r.status, Some(124), "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(15), "took {:?}", r.elapsed);
    assert!(r.stderr.contains("time limit"), "{}", r.stderr);
}

#[test]
fn bad_exec_input_is_one_clear_error() {
    let run = common::run_ember(
        &["exec", "--kernel", "/no/such/kernel", "--", "true"],
        b"",
        Duration::from_secs(20),
    );
    let err = run.user_error();
    assert!(err.contains("/no/such/kernel"), "{err}");
    let run = common::run_ember(
        &["exec", "--timeout", "soon", "--", "true"],
        b"",
        Duration::from_secs(20),
    );
    assert!(run.user_error().contains("--timeout"), "{}", run.stderr);
    let run = common::run_ember(&["exec"], b"", Duration::from_secs(20));
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
}

fn boot_id(r: &Exec) -> String {
    assert_eq!(r.status, Some(0), "{}", r.stderr);
    let id = String::from_utf8_lossy(&r.stdout).trim().to_string();
    assert_eq!(id.len(), 36, "{id:?}");
    id
}

fn rootfs_images() -> Vec<(PathBuf, String)> {
    let cache = PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/ember/exec");
    std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ext4"))
        .map(|p| (p.clone(), sha256(&p)))
        .collect()
}

/// `--snapshot DIR`: the first run makes the snapshot and runs its command; later runs restore
/// it (the same boot ID each time, another than a booted run's), with the command's statuses, a
/// file one run writes unseen by the next, the base image unchanged, two runs at once, and the
/// time limit. A snapshot of another VM and a damaged one are refused with one line each, and
/// `ember run --restore --vsock uds=PATH` of the snapshot answers the agent's protocol.
#[test]
fn exec_from_a_snapshot_restores_the_booted_agent() {
    assert!(kernel_ready());
    let _one = crate::kernels::ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let scratch =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("exec-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let dir = scratch.join("snap");
    let d = dir.to_str().unwrap();
    let boot_id_cmd = ["cat", "/proc/sys/kernel/random/boot_id"];
    let first = exec_unlocked(&["--snapshot", d], &boot_id_cmd);
    let id = boot_id(&first);
    // The boot happens in a child process: the host's notice still comes once.
    assert!(
        first.stderr.matches("ember: warning: /dev/kvm").count() <= 1,
        "{}",
        first.stderr
    );
    assert!(dir.join("snapshot/manifest.json").is_file());
    assert!(dir.join("snapshot/vm.state.disk0.overlay").is_file());
    let images = rootfs_images();

    let write = exec_unlocked(
        &["--snapshot", d],
        &[
            "sh",
            "-c",
            "cat /proc/sys/kernel/random/boot_id; echo mine >/written; sync",
        ],
    );
    assert_eq!(boot_id(&write), id, "not restored from the snapshot");
    eprintln!("restored run: {:?}", write.elapsed);
    let read = exec_unlocked(&["--snapshot", d], &["cat", "/written"]);
    assert_eq!(
        read.status,
        Some(1),
        "one run's write reached the next: {:?}",
        read.stdout
    );
    for (command, want) in [(&["false"][..], 1), (&["sh", "-c", "exit 42"][..], 42)] {
        let r = exec_unlocked(&["--snapshot", d], command);
        assert_eq!(r.status, Some(want), "{command:?}: {}", r.stderr);
    }
    let slow = exec_unlocked(&["--snapshot", d, "--timeout", "3s"], &["sleep", "60"]);
    assert_eq!(slow.status, Some(124), "{}", slow.stderr);
    assert!(
        slow.elapsed < Duration::from_secs(20),
        "took {:?}",
        slow.elapsed
    );

    // Two at once from one directory, each with its own output.
    let runs: Vec<_> = ["one", "two"]
        .into_iter()
        .map(|word| {
            let d = d.to_string();
            std::thread::spawn(move || {
                exec_unlocked(&["--snapshot", &d], &["sh", "-c", &format!("echo {word}")])
            })
        })
        .collect();
    for (run, word) in runs.into_iter().zip(["one", "two"]) {
        let r = run.join().unwrap();
        assert_eq!(r.status, Some(0), "{}", r.stderr);
        assert_eq!(String::from_utf8_lossy(&r.stdout), format!("{word}\n"));
    }
    // Images that other runs add to the cache meanwhile are theirs; each one here before is
    // unchanged.
    for (p, sum) in images {
        assert_eq!(sha256(&p), sum, "{} changed", p.display());
    }

    // `ember run --restore` with the snapshot, its vsock on a path of this test's.
    let uds = scratch.join("run.sock");
    let mut child = Command::new(common::ember())
        .arg("run")
        .arg("--restore")
        .arg(dir.join("snapshot/vm.state"))
        .arg("--mem")
        .arg(dir.join("snapshot/vm.mem"))
        .arg("--vsock")
        .arg(format!("uds={}", uds.display()))
        .args(["--serial", "null"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let conn = ember_vmm::exec_client::connect(&uds, Duration::from_secs(120), || true).unwrap();
    let req = ember_agent::Request {
        argv: boot_id_cmd.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/bin:/usr/bin".into())],
        cwd: "/".into(),
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let outcome = ember_vmm::exec_client::run(conn, &req, &mut out, &mut err).unwrap();
    assert_eq!(outcome, ember_agent::Outcome::Exited(0));
    assert_eq!(String::from_utf8_lossy(&out).trim(), id);
    // The agent powers the guest off.
    assert!(child.wait().unwrap().success());
    assert!(!uds.exists());

    // Another VM's snapshot: refused, saying what differs.
    let other = exec_unlocked(&["--snapshot", d, "--memory", "128M"], &["true"]);
    assert_eq!(other.status, Some(125), "{}", other.stderr);
    assert!(
        other.stderr.contains("another VM") && other.stderr.contains("MiB of memory"),
        "{}",
        other.stderr
    );
    // A damaged one (a copy with its state file cut short): refused, and left as it is.
    let broken = scratch.join("broken");
    let cp = Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(&dir)
        .arg(&broken)
        .status()
        .unwrap();
    assert!(cp.success());
    let state = broken.join("snapshot/vm.state");
    let len = std::fs::metadata(&state).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let r = exec_unlocked(&["--snapshot", broken.to_str().unwrap()], &["true"]);
    assert_eq!(r.status, Some(125), "{}", r.stderr);
    assert!(r.stderr.contains("damaged"), "{}", r.stderr);
    assert_eq!(std::fs::metadata(&state).unwrap().len(), len / 2);

    // A booted run is another boot.
    let booted = exec_unlocked(&[], &boot_id_cmd);
    assert_ne!(boot_id(&booted), id);
    let _ = std::fs::remove_dir_all(&scratch);
}

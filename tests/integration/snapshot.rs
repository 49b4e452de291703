//! Snapshots: a running guest saved through the API socket, then resumed in new Ember processes
//! (`--restore`, or `PUT /snapshot/load`), alone or as several clones at once; and every kind of
//! bad snapshot input refused with one clear line.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common;

fn scratch(what: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("snapshot-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An Ember whose console is piped: lines come out on a channel, input goes in on stdin.
struct Console {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Each line as read, with its newline; the last one without, if the output ends mid-line.
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// Everything the console printed so far, byte for byte.
    raw: String,
}

impl Console {
    fn spawn(args: &[&str]) -> Console {
        let mut child = Command::new(common::ember())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ember");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if tx.send(String::from_utf8_lossy(&buf).into_owned()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Console {
            child,
            stdin,
            lines,
            seen: Vec::new(),
            raw: String::new(),
        }
    }

    fn take(&mut self, chunk: String) -> String {
        self.raw.push_str(&chunk);
        let line = chunk.trim_end_matches(['\r', '\n']).to_string();
        self.seen.push(line.clone());
        line
    }

    /// Takes what has arrived without waiting.
    fn drain(&mut self) {
        while let Ok(chunk) = self.lines.try_recv() {
            self.take(chunk);
        }
    }

    /// Waits for a line `want` accepts and returns it; fails the test with the transcript at
    /// the deadline or when Ember ends first.
    fn wait_for(&mut self, what: &str, deadline: Duration, want: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(chunk) => {
                    let line = self.take(chunk);
                    if want(&line) {
                        return line;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let out = self.child.wait_with_output_now();
                    panic!(
                        "no {what} within {deadline:?}\nconsole:\n{}\nstderr:\n{out}",
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    fn type_in(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let status = common::wait_deadline(&mut self.child, deadline);
        status.unwrap_or_else(|| {
            panic!(
                "ember did not exit within {deadline:?}\nconsole:\n{}",
                self.seen.join("\n")
            )
        })
    }
}

trait StderrNow {
    fn wait_with_output_now(&mut self) -> String;
}

impl StderrNow for Child {
    fn wait_with_output_now(&mut self) -> String {
        use std::io::Read;
        let _ = self.wait();
        let mut err = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }
}

/// `counter: nonce=0x... n=N` as (nonce, N).
fn count_line(line: &str) -> Option<(String, u64)> {
    let rest = line.strip_prefix("counter: nonce=")?;
    let (nonce, n) = rest.split_once(" n=")?;
    Some((nonce.to_string(), n.trim().parse().ok()?))
}

/// Checks that `text` (the counter guest's console, across any number of restores) counts from 0
/// without a gap or a repeat under one nonce; returns the nonce and the last count.
fn check_counting(text: &str) -> (String, u64) {
    let mut nonce: Option<String> = None;
    let mut next = 0;
    for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let Some((this, n)) = count_line(line.trim_end()) else {
            continue;
        };
        assert_eq!(
            nonce.get_or_insert_with(|| this.clone()),
            &this,
            "another nonce: the guest booted again\n{text}"
        );
        assert_eq!(n, next, "a count is missing or repeated\n{text}");
        next += 1;
    }
    (nonce.expect("a count"), next - 1)
}

/// Runs the counter guest with an API socket until it has counted a little, pauses it, takes a
/// snapshot into `dir`, and ends that Ember. Returns everything the guest printed, which may end
/// mid-line: the guest goes on from there when restored.
fn snapshot_of_counter(dir: &Path, extra: &[&str]) -> String {
    let sock = dir.join("api.sock");
    let guest = common::guest("counter");
    let mut args = vec![
        "run",
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 counter.tsc=4000000",
        "--api-sock",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut vm = Console::spawn(&args);
    vm.wait_for("the count", Duration::from_secs(20), |l| {
        count_line(l).is_some_and(|(_, n)| n >= 3)
    });
    assert_eq!(
        common::http(&sock, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).0,
        204
    );
    let body = format!(
        r#"{{"snapshot_type":"Full","snapshot_path":"{}","mem_file_path":"{}"}}"#,
        dir.join("snap").display(),
        dir.join("mem").display()
    );
    let (status, reply) = common::http(&sock, "PUT", "/snapshot/create", Some(&body));
    assert_eq!(status, 204, "{reply}");
    common::stop(&mut vm.child);
    // Everything the guest printed before it was paused (the pipe is at EOF now).
    while let Ok(chunk) = vm.lines.recv_timeout(Duration::from_secs(5)) {
        vm.take(chunk);
    }
    vm.raw
}

fn restore_args<'a>(dir: &'a Path, snap: &'a str, mem: &'a str) -> Vec<String> {
    vec![
        "run".into(),
        "--restore".into(),
        dir.join(snap).display().to_string(),
        "--mem".into(),
        dir.join(mem).display().to_string(),
    ]
}

#[test]
fn a_restored_guest_goes_on_counting_with_its_nonce_and_takes_input() {
    let dir = scratch("counter");
    let before = snapshot_of_counter(&dir, &[]);
    let (_, last) = check_counting(&before);
    let args = restore_args(&dir, "snap", "mem");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut clone = Console::spawn(&args);
    clone.wait_for("a count", Duration::from_secs(10), |l| {
        count_line(l).is_some_and(|(_, n)| n > last + 1)
    });
    // Across the snapshot, one guest counting without a gap: the same nonce, the same count.
    check_counting(&(before.clone() + &clone.raw));
    clone.type_in("x");
    clone.wait_for("the answer to input", Duration::from_secs(10), |l| {
        l == "counter: got x"
    });
    clone.type_in("q");
    clone.wait_for("the guest's last line", Duration::from_secs(10), |l| {
        l == "counter: quit"
    });
    assert_eq!(clone.wait_exit(Duration::from_secs(10)).code(), Some(0));
    clone.drain();
    let text: String = (before + &clone.raw)
        .split_inclusive('\n')
        .filter(|l| !l.starts_with("counter: got") && !l.starts_with("counter: quit"))
        .collect();
    check_counting(&text);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Proportional set size of a process, in KiB.
fn pss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field("Pss:")
}

fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn three_clones_of_one_snapshot_run_at_once_and_share_its_memory() {
    let dir = scratch("clones");
    let (nonce, _) = check_counting(&snapshot_of_counter(&dir, &[]));
    let mut args = restore_args(&dir, "snap", "mem");
    // Every page mapped up front: each clone's RSS then counts the whole 128 MiB guest, and PSS
    // shows how much of it is shared.
    args.push("--prefault".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut clones: Vec<Console> = (0..3).map(|_| Console::spawn(&args)).collect();
    for (clone, name) in clones.iter_mut().zip(["a", "b", "c"]) {
        clone.wait_for("a count", Duration::from_secs(10), |l| {
            count_line(l).is_some_and(|(n, _)| n == nonce)
        });
        clone.type_in(name);
    }
    for (clone, name) in clones.iter_mut().zip(["a", "b", "c"]) {
        let want = format!("counter: got {name}");
        clone.wait_for(&want, Duration::from_secs(10), |l| l == want);
        assert!(
            !clone
                .seen
                .iter()
                .any(|l| l.starts_with("counter: got") && *l != want),
            "a clone saw another's input: {:?}",
            clone.seen
        );
    }
    let guest_kib = 128 * 1024;
    let rss: Vec<u64> = clones.iter().map(|c| rss_kib(c.child.id())).collect();
    let pss: Vec<u64> = clones.iter().map(|c| pss_kib(c.child.id())).collect();
    eprintln!("clones: RSS {rss:?} KiB, PSS {pss:?} KiB (guest RAM {guest_kib} KiB each)");
    assert!(
        rss.iter().all(|&r| r >= guest_kib),
        "prefaulted clones map all guest RAM: RSS {rss:?}"
    );
    assert!(
        pss.iter().sum::<u64>() < 2 * guest_kib,
        "three clones cost {} KiB of PSS: the memory file's pages are not shared",
        pss.iter().sum::<u64>()
    );
    for clone in &mut clones {
        clone.type_in("q");
    }
    for clone in &mut clones {
        assert_eq!(clone.wait_exit(Duration::from_secs(10)).code(), Some(0));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_ember_with_only_an_api_socket_loads_a_snapshot_paused_then_resumes() {
    let dir = scratch("load");
    let before = snapshot_of_counter(&dir, &[]);
    let (_, last) = check_counting(&before);
    let sock = dir.join("load.sock");
    let mut vm = Console::spawn(&["run", "--api-sock", sock.to_str().unwrap()]);
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(5), "no API socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (_, body) = common::http(&sock, "GET", "/", None);
    assert!(body.contains(r#""state":"Not started""#), "{body}");
    assert_eq!(
        common::http(&sock, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).0,
        400,
        "nothing to pause yet"
    );
    // A load that fails leaves the Ember waiting for a good one.
    let bad = format!(
        r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}}}}"#,
        dir.join("nothing").display(),
        dir.join("mem").display()
    );
    let (status, reply) = common::http(&sock, "PUT", "/snapshot/load", Some(&bad));
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("nothing"), "{reply}");
    let load = format!(
        r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}},"resume_vm":false}}"#,
        dir.join("snap").display(),
        dir.join("mem").display()
    );
    assert_eq!(
        common::http(&sock, "PUT", "/snapshot/load", Some(&load)).0,
        204
    );
    let (_, body) = common::http(&sock, "GET", "/", None);
    assert!(body.contains(r#""state":"Paused""#), "{body}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        vm.lines.try_recv().is_err(),
        "a VM loaded with resume_vm false ran"
    );
    assert_eq!(
        common::http(&sock, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#)).0,
        204
    );
    vm.wait_for("a count", Duration::from_secs(10), |l| {
        count_line(l).is_some_and(|(_, n)| n > last + 1)
    });
    check_counting(&(before + &vm.raw));
    vm.type_in("q");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_snapshot_input_is_one_clear_error_each() {
    let dir = scratch("bad");
    snapshot_of_counter(&dir, &[]);
    let snap = std::fs::read(dir.join("snap")).unwrap();
    let mem_len = std::fs::metadata(dir.join("mem")).unwrap().len();
    std::fs::write(dir.join("truncated"), &snap[..snap.len() / 2]).unwrap();
    let mut corrupt = snap.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x40;
    std::fs::write(dir.join("corrupt"), &corrupt).unwrap();
    std::fs::copy(common::guest("counter"), dir.join("foreign")).unwrap();
    let short_mem = std::fs::File::create(dir.join("short-mem")).unwrap();
    short_mem.set_len(mem_len / 2).unwrap();
    let cases = [
        ("truncated", "mem", "cut short"),
        ("corrupt", "mem", "damaged"),
        ("foreign", "mem", "is not an Ember snapshot"),
        ("snap", "short-mem", "the snapshot's guest has 134217728"),
        ("snap", "no-such-mem", "No such file"),
        ("no-such-snap", "mem", "No such file"),
    ];
    for (snap, mem, want) in cases {
        let args = restore_args(&dir, snap, mem);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = common::run_ember(&args, b"", Duration::from_secs(20));
        let err = run.user_error();
        assert!(err.contains(want), "{snap} + {mem}: {err}");
        assert_eq!(run.status.code(), Some(1));
        assert!(
            run.stdout.is_empty(),
            "{snap}: the guest ran: {}",
            run.stdout
        );
    }
    // The snapshot fixes the machine: a restore that asks for another is refused.
    let mut args = restore_args(&dir, "snap", "mem");
    args.extend(["--cpus".into(), "2".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = common::run_ember(&args, b"", Duration::from_secs(20));
    assert!(run.user_error().contains("--cpus"), "{}", run.stderr);
    assert_eq!(run.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_snapshot_never_overwrites_a_file_and_needs_a_paused_vm() {
    let dir = scratch("overwrite");
    let sock = dir.join("api.sock");
    let guest = common::guest("counter");
    let mut vm = Console::spawn(&[
        "run",
        "--kernel",
        guest.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    vm.wait_for("the count", Duration::from_secs(20), |l| {
        count_line(l).is_some()
    });
    std::fs::write(dir.join("precious"), b"keep me").unwrap();
    let body = |snap: &str| {
        format!(
            r#"{{"snapshot_path":"{}","mem_file_path":"{}"}}"#,
            dir.join(snap).display(),
            dir.join("mem").display()
        )
    };
    let (status, reply) = common::http(&sock, "PUT", "/snapshot/create", Some(&body("snap")));
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("pause the VM first"), "{reply}");
    assert_eq!(
        common::http(&sock, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).0,
        204
    );
    let (status, reply) = common::http(&sock, "PUT", "/snapshot/create", Some(&body("precious")));
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("exists already"), "{reply}");
    assert_eq!(std::fs::read(dir.join("precious")).unwrap(), b"keep me");
    assert!(!dir.join("mem").exists(), "a memory file was left behind");
    common::stop(&mut vm.child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A line the guest printed itself, not the terminal's echo of the command that printed it.
fn printed(line: &str, text: &str) -> bool {
    line.trim() == text
}

/// Ember's microVM kernel at its shell prompt, with an ext4 disk it wrote to: snapshotted, ended,
/// restored in a new process, where the shell answers what is typed, writes a second file and
/// powers off. The host then finds both files in the image and e2fsck finds it clean.
#[test]
fn a_linux_guest_snapshotted_at_its_shell_answers_after_restore_and_its_disk_is_consistent() {
    const TEST: &str =
        "a_linux_guest_snapshotted_at_its_shell_answers_after_restore_and_its_disk_is_consistent";
    let _one = crate::kernels::ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let dir = scratch("linux");
    let img = dir.join("disk.ext4");
    std::fs::copy(common::kit_file("rootfs.ext4"), &img).unwrap();
    let sock = dir.join("api.sock");
    let kernel = common::microvm_kernel("vmlinux");
    let initramfs = common::kit_file("initramfs.cpio");
    let disk = format!("path={}", img.display());
    let token = std::process::id();
    let mut vm = Console::spawn(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initramfs",
        initramfs.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 reboot=k panic=1 pci=off",
        "--disk",
        &disk,
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    let boot = Duration::from_secs(180);
    vm.wait_for("the disk mounted", boot, |l| {
        l.contains("ember-kit: mounted vda")
    });
    vm.type_in(&format!(
        "echo before-{token} >/mnt/before.txt; sync; echo ember-snap-before-done\n"
    ));
    vm.wait_for("the first write", Duration::from_secs(60), |l| {
        printed(l, "ember-snap-before-done")
    });
    // The shell is back at its prompt, waiting for input.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        common::http(&sock, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).0,
        204
    );
    let body = format!(
        r#"{{"snapshot_type":"Full","snapshot_path":"{}","mem_file_path":"{}"}}"#,
        dir.join("snap").display(),
        dir.join("mem").display()
    );
    let (status, reply) = common::http(&sock, "PUT", "/snapshot/create", Some(&body));
    assert_eq!(status, 204, "{TEST}: {reply}");
    common::stop(&mut vm.child);

    let restored_at = Instant::now();
    let args = restore_args(&dir, "snap", "mem");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut clone = Console::spawn(&args);
    clone.type_in("echo ember-snap-answer $((6*7))\n");
    clone.wait_for("the shell's answer", Duration::from_secs(60), |l| {
        printed(l, "ember-snap-answer 42")
    });
    let answered = restored_at.elapsed();
    clone.type_in(&format!(
        "echo after-{token} >/mnt/after.txt; sync; umount /mnt; echo ember-snap-after-done\n"
    ));
    clone.wait_for("the second write", Duration::from_secs(60), |l| {
        printed(l, "ember-snap-after-done")
    });
    clone.type_in("poweroff -f\n");
    let status = clone.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{TEST}: {:?}", clone.seen);
    eprintln!(
        "{TEST}: restored shell answered {:.2} s after spawn",
        answered.as_secs_f64()
    );

    for (file, want) in [("/before.txt", "before"), ("/after.txt", "after")] {
        let out = Command::new("debugfs")
            .args(["-R", &format!("cat {file}")])
            .arg(&img)
            .output()
            .expect("debugfs (e2fsprogs)");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{want}-{token}\n"),
            "{TEST}: {file} in the image"
        );
    }
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .expect("e2fsck (e2fsprogs)");
    assert_eq!(
        fsck.status.code(),
        Some(0),
        "{TEST}: e2fsck -fn is not clean\n{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Restores a clone with `args`, then a second one while it runs: the second is refused with
/// the lock error naming `locked`. Then the first quits.
fn second_clone_gets_the_lock_error(args: &[&str], locked: &Path) {
    let mut first = Console::spawn(args);
    first.wait_for("a count", Duration::from_secs(10), |l| {
        count_line(l).is_some()
    });
    let second = common::run_ember(args, b"", Duration::from_secs(20));
    let err = second.user_error();
    assert!(err.contains(&locked.display().to_string()), "{err}");
    assert!(err.contains("in use"), "{err}");
    first.type_in("q");
    assert_eq!(first.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// A read-write disk is locked by the first Ember that opens it; a clone of a snapshot with that
/// disk is refused while another clone runs, with the lock error, and nothing starts.
#[test]
fn a_second_clone_of_a_snapshot_with_a_read_write_disk_is_refused_with_the_lock_error() {
    let dir = scratch("disk-lock");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let disk = format!("path={}", img.display());
    snapshot_of_counter(&dir, &["--disk", &disk]);
    let args = restore_args(&dir, "snap", "mem");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    second_clone_gets_the_lock_error(&args, &img);
    // With the first gone, the disk is free again: and a missing disk is one clear error.
    std::fs::remove_file(&img).unwrap();
    let gone = common::run_ember(&args, b"", Duration::from_secs(20));
    assert!(
        gone.user_error().contains("No such file"),
        "{}",
        gone.stderr
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy-on-write disk is saved with its overlay's path: the restored clone reopens (and locks)
/// that overlay over the same base, and a missing overlay is refused rather than made anew. A tmp
/// overlay is captured into the snapshot, and clones restore over copies of their own.
#[test]
fn a_copy_on_write_disk_snapshots_with_its_overlay_and_a_tmp_one_is_captured() {
    let dir = scratch("overlay");
    let base = dir.join("base.img");
    std::fs::write(&base, vec![0x5a; 1 << 20]).unwrap();
    let ov = dir.join("disk.ovl");
    let disk = format!("path={},overlay={}", base.display(), ov.display());
    snapshot_of_counter(&dir, &["--disk", &disk]);
    assert_eq!(&std::fs::read(&ov).unwrap()[..8], b"EMBEROVL");

    let args = restore_args(&dir, "snap", "mem");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    second_clone_gets_the_lock_error(&args, &ov);

    let moved = dir.join("moved.ovl");
    std::fs::rename(&ov, &moved).unwrap();
    let gone = common::run_ember(&args, b"", Duration::from_secs(20));
    let err = gone.user_error();
    assert!(err.contains("missing or empty"), "{err}");
    assert!(
        !ov.exists(),
        "a new overlay was made for the restored guest"
    );
    assert_eq!(std::fs::read(&base).unwrap(), vec![0x5a; 1 << 20]);

    // overlay=tmp: the snapshot captures the overlay beside its state file, and each clone
    // restores over a tmp copy of its own: two at once, neither locked out, the capture and the
    // base never written.
    let tmp_dir = dir.join("tmp");
    std::fs::create_dir_all(&tmp_dir).unwrap();
    let tmp_disk = format!("path={},overlay=tmp", base.display());
    snapshot_of_counter(&tmp_dir, &["--disk", &tmp_disk]);
    let captured = tmp_dir.join("snap.disk0.overlay");
    let capture = std::fs::read(&captured).unwrap();
    assert_eq!(&capture[..8], b"EMBEROVL");
    let args = restore_args(&tmp_dir, "snap", "mem");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut clones: Vec<Console> = (0..2).map(|_| Console::spawn(&args)).collect();
    for vm in &mut clones {
        vm.wait_for("the count", Duration::from_secs(20), |l| {
            count_line(l).is_some()
        });
    }
    for mut vm in clones {
        common::stop(&mut vm.child);
    }
    assert_eq!(std::fs::read(&captured).unwrap(), capture);
    assert_eq!(std::fs::read(&base).unwrap(), vec![0x5a; 1 << 20]);
    let _ = std::fs::remove_dir_all(&dir);
}

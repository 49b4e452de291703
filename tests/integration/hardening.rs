//! Hardening: the seccomp filters are on in a running Ember, bad input of every kind ends in one
//! clear error line without touching the user's files, signals stop the VM with 128+signo, and a
//! guest that throws garbage at every device does not bring Ember down.
//!
//! The basic bad-input cases (missing or text kernel, truncated kernel, zero memory or CPUs,
//! initramfs missing or a directory, an unknown option) are in cli.rs, and the disk ones that
//! need a virtio-blk guest (missing image, odd size, image locked by another Ember) in blk.rs;
//! this is the rest of the matrix.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common;

/// Input errors are found before a vCPU runs; a hang is a bug.
const DEADLINE: Duration = Duration::from_secs(30);

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hardening-scratch");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{}-{name}", std::process::id()))
}

fn hello() -> String {
    common::guest("hello").to_str().unwrap().to_string()
}

/// Contents of the files a case must not change (directories and missing paths have none).
fn snapshot(paths: &[&Path]) -> Vec<Option<Vec<u8>>> {
    paths.iter().map(|p| std::fs::read(p).ok()).collect()
}

/// Runs `ember` with `args`, which must fail the user-error way (non-zero status, exactly one
/// `ember: error:` line, no panic), leave every file in `untouched` as it was, and print an error
/// line containing each of `expect`. Returns the error line.
fn bad_input(args: &[&str], untouched: &[&Path], expect: &[&str]) -> String {
    let before = snapshot(untouched);
    let run = common::run_ember(args, b"", DEADLINE);
    eprintln!("ember {}: {:?}\n{}", args.join(" "), run.status, run.stderr);
    let line = run.user_error().to_string();
    for want in expect {
        assert!(line.contains(want), "{want:?} missing from: {line}");
    }
    assert!(
        !run.stdout.contains("ember-guest"),
        "the guest ran: {}",
        run.stdout
    );
    assert_eq!(snapshot(untouched), before, "a file changed");
    line
}

fn write_file(name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

// ---- kernels ----

#[test]
fn empty_kernel() {
    let k = write_file("empty.elf", b"");
    bad_input(
        &["run", "--kernel", k.to_str().unwrap()],
        &[&k],
        &[k.to_str().unwrap(), "empty"],
    );
}

#[test]
fn binary_garbage_kernel() {
    // Deterministic noise that is neither ELF nor bzImage.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let bytes: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let k = write_file("noise.bin", &bytes);
    bad_input(
        &["run", "--kernel", k.to_str().unwrap()],
        &[&k],
        &[k.to_str().unwrap()],
    );
}

#[test]
fn elf_header_cut_short() {
    let elf = std::fs::read(common::guest("hello")).unwrap();
    let k = write_file("ehdr-cut.elf", &elf[..40]);
    bad_input(
        &["run", "--kernel", k.to_str().unwrap()],
        &[&k],
        &[k.to_str().unwrap(), "truncated"],
    );
}

#[test]
fn elf_program_headers_point_past_the_end() {
    let mut elf = std::fs::read(common::guest("hello")).unwrap();
    // e_phoff (offset 32, 8 bytes) far beyond the file.
    elf[32..40].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let k = write_file("phoff.elf", &elf);
    bad_input(
        &["run", "--kernel", k.to_str().unwrap()],
        &[&k],
        &[k.to_str().unwrap()],
    );
}

#[test]
fn elf_for_aarch64() {
    let mut elf = std::fs::read(common::guest("hello")).unwrap();
    // e_machine = EM_AARCH64 (183).
    elf[18..20].copy_from_slice(&183u16.to_le_bytes());
    let k = write_file("aarch64.elf", &elf);
    bad_input(
        &["run", "--kernel", k.to_str().unwrap()],
        &[&k],
        &[k.to_str().unwrap(), "aarch64"],
    );
}

#[test]
fn elf_for_i386_built_by_the_assembler() {
    let src = write_file("i386.S", b".globl _start\n_start:\n\thlt\n\tjmp _start\n");
    let obj = scratch("i386.o");
    let elf = scratch("i386.elf");
    let ok = Command::new("as")
        .args(["--32", "-o"])
        .arg(&obj)
        .arg(&src)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("ld")
            .args(["-m", "elf_i386", "-Ttext=0x100000", "-o"])
            .arg(&elf)
            .arg(&obj)
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        ok,
        "binutils (as, ld) could not build an i386 ELF: scripts/deps.sh installs them"
    );
    bad_input(
        &["run", "--kernel", elf.to_str().unwrap()],
        &[&elf],
        &[elf.to_str().unwrap(), "32-bit"],
    );
}

/// A tiny x86_64 ELF kernel (one segment, `-N`) linked by `ld` with `ld_args`.
fn elf64_linked_with(name: &str, ld_args: &[&str]) -> PathBuf {
    let src = write_file(
        &format!("{name}.S"),
        b".globl _start\n_start:\n\tmov $0xfe, %al\n\toutb %al, $0x64\n\thlt\n",
    );
    let obj = scratch(&format!("{name}.o"));
    let elf = scratch(&format!("{name}.elf"));
    let ok = Command::new("as")
        .args(["--64", "-o"])
        .arg(&obj)
        .arg(&src)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("ld")
            .args(["-m", "elf_x86_64", "-N", "--no-warn-rwx-segments"])
            .args(ld_args)
            .arg("-o")
            .arg(&elf)
            .arg(&obj)
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        ok,
        "binutils (as, ld) could not build an x86_64 ELF: scripts/deps.sh installs them"
    );
    elf
}

#[test]
fn elf_entry_point_outside_its_code() {
    // In RAM but past the code (the vCPU ran zeroes forever), and past the 4 GiB the boot page
    // tables map (a page fault, then a triple fault that looked like a clean reset).
    for (name, entry) in [("entry-112m", "0x7000000"), ("entry-32g", "0x800000000")] {
        let elf = elf64_linked_with(name, &["-Ttext=0x100000", "-e", entry]);
        bad_input(
            &["run", "--kernel", elf.to_str().unwrap()],
            &[&elf],
            &[elf.to_str().unwrap(), "entry point", entry],
        );
    }
}

#[test]
fn elf_linked_at_3_5_gib() {
    // With little memory or a lot, the segment is in the MMIO hole, never in RAM.
    let elf = elf64_linked_with("at-3.5g", &["-Ttext=0xe0000000"]);
    for memory in ["128M", "6G"] {
        let line = bad_input(
            &["run", "--kernel", elf.to_str().unwrap(), "--memory", memory],
            &[&elf],
            &[elf.to_str().unwrap(), "0xe0000000", "MMIO hole"],
        );
        assert!(!line.contains("more memory"), "{line}");
    }
}

#[test]
fn bzimage_cut_after_its_setup_header() {
    let bz = std::fs::read(common::kit_file("bzImage")).unwrap();
    let k = write_file("bzImage-cut", &bz[..16 * 1024]);
    bad_input(
        &["run", "--kernel", k.to_str().unwrap()],
        &[&k],
        &[k.to_str().unwrap()],
    );
}

/// A named pipe nobody writes to.
fn fifo(name: &str) -> PathBuf {
    let p = scratch(name);
    let _ = std::fs::remove_file(&p);
    assert!(Command::new("mkfifo")
        .arg(&p)
        .status()
        .is_ok_and(|s| s.success()));
    p
}

#[test]
fn kernel_or_initramfs_that_is_a_fifo() {
    // Ember hung in open(2), waiting for a writer.
    let f = fifo("kernel.fifo");
    let f_s = f.to_str().unwrap();
    let h = hello();
    bad_input(&["run", "--kernel", f_s], &[], &[f_s, "FIFO"]);
    bad_input(
        &["run", "--kernel", &h, "--initramfs", f_s],
        &[Path::new(&h)],
        &[f_s, "FIFO"],
    );
    let _ = std::fs::remove_file(&f);
}

#[test]
fn kernel_is_a_directory() {
    let d = scratch("kernel.d");
    std::fs::create_dir_all(&d).unwrap();
    bad_input(
        &["run", "--kernel", d.to_str().unwrap()],
        &[],
        &[d.to_str().unwrap(), "directory"],
    );
}

// ---- initramfs ----

#[test]
fn empty_initramfs() {
    let i = write_file("empty.cpio", b"");
    let h = hello();
    bad_input(
        &["run", "--kernel", &h, "--initramfs", i.to_str().unwrap()],
        &[&i, Path::new(&h)],
        &[i.to_str().unwrap(), "empty"],
    );
}

#[test]
fn initramfs_larger_than_guest_memory() {
    // Sparse: 200 MiB that take no disk space.
    let i = scratch("huge.cpio");
    std::fs::File::create(&i)
        .unwrap()
        .set_len(200 << 20)
        .unwrap();
    let h = hello();
    bad_input(
        &[
            "run",
            "--kernel",
            &h,
            "--memory",
            "64M",
            "--initramfs",
            i.to_str().unwrap(),
        ],
        &[Path::new(&h)],
        &[i.to_str().unwrap(), "does not fit"],
    );
    let _ = std::fs::remove_file(&i);
}

// ---- sizes and counts ----

#[test]
fn memory_beyond_the_host() {
    let h = hello();
    bad_input(
        &["run", "--kernel", &h, "--memory", "100000G"],
        &[Path::new(&h)],
        &["--memory"],
    );
}

#[test]
fn memory_that_does_not_parse() {
    let h = hello();
    for bad in [
        "1.5G",
        "-1G",
        "12Q",
        "G",
        "",
        "99999999999999999999G",
        "17179869184T",
        "1M",
    ] {
        bad_input(
            // `--memory=VALUE`: a value starting with '-' is not taken for an option.
            &["run", "--kernel", &h, &format!("--memory={bad}")],
            &[Path::new(&h)],
            &["--memory"],
        );
    }
}

#[test]
fn memory_that_is_not_whole_pages() {
    // KVM refused these memory slots with a bare "Invalid argument".
    let h = hello();
    for odd in ["132097K", "3145729K", "4194305"] {
        bad_input(
            &["run", "--kernel", &h, "--memory", odd],
            &[Path::new(&h)],
            &["--memory", odd, "4K"],
        );
    }
}

#[test]
fn cpus_beyond_what_kvm_and_the_tables_allow() {
    let h = hello();
    for bad in ["255", "300", "-1", "two", "1.5", ""] {
        bad_input(
            &["run", "--kernel", &h, &format!("--cpus={bad}")],
            &[Path::new(&h)],
            &["--cpus"],
        );
    }
}

#[test]
fn cmdline_longer_than_the_boot_protocol_allows() {
    let h = hello();
    let long = "x".repeat(3000);
    bad_input(
        &["run", "--kernel", &h, "--cmdline", &long],
        &[Path::new(&h)],
        &["command line", "2047"],
    );
}

#[test]
fn cmdline_that_only_fits_without_the_device_words() {
    // 2040 bytes fit alone, but not with the virtio_mmio.device= word a disk adds.
    let h = hello();
    let disk = write_file("cmdline-disk.img", &[0u8; 4096]);
    let long = "y".repeat(2040);
    bad_input(
        &[
            "run",
            "--kernel",
            &h,
            "--cmdline",
            &long,
            "--disk",
            disk.to_str().unwrap(),
        ],
        &[Path::new(&h), &disk],
        &["command line"],
    );
}

// ---- disks ----

#[test]
fn disk_is_a_directory() {
    let d = scratch("disk.d");
    std::fs::create_dir_all(&d).unwrap();
    let h = hello();
    bad_input(
        &["run", "--kernel", &h, "--disk", d.to_str().unwrap()],
        &[Path::new(&h)],
        &[d.to_str().unwrap()],
    );
}

#[test]
fn disk_that_is_a_fifo_or_a_character_device() {
    // A read-only FIFO blocked Ember in open(2) until a writer came; /dev/null was a disk of
    // zero sectors.
    let fifo = fifo("disk.fifo");
    let h = hello();
    for (path, kind) in [
        (fifo.as_path(), "FIFO"),
        (Path::new("/dev/null"), "character device"),
    ] {
        for ro in ["on", "off"] {
            bad_input(
                &[
                    "run",
                    "--kernel",
                    &h,
                    "--disk",
                    &format!("path={},readonly={ro}", path.display()),
                ],
                &[Path::new(&h)],
                &[path.to_str().unwrap(), kind],
            );
        }
    }
    let _ = std::fs::remove_file(&fifo);
}

#[test]
fn same_disk_image_given_twice() {
    // The image lock refused the second open, as if another process held the image.
    let h = hello();
    let img = write_file("twice.img", &[7u8; 4096]);
    let link = scratch("twice-link.img");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let (img_s, link_s) = (img.to_str().unwrap(), link.to_str().unwrap());
    for (first, second) in [
        (format!("path={img_s}"), format!("path={img_s}")),
        (
            format!("path={img_s},readonly=on"),
            format!("path={link_s}"),
        ),
        (
            format!("path={img_s}"),
            format!("path={link_s},readonly=on"),
        ),
    ] {
        let line = bad_input(
            &["run", "--kernel", &h, "--disk", &first, "--disk", &second],
            &[Path::new(&h), &img],
            &["twice"],
        );
        assert!(!line.contains("another process"), "{line}");
    }
    // Read-only twice is fine: neither writes.
    let run = common::run_ember(
        &[
            "run",
            "--kernel",
            &h,
            "--disk",
            &format!("path={img_s},readonly=on"),
            "--disk",
            &format!("path={link_s},readonly=on"),
        ],
        b"",
        DEADLINE,
    );
    run.ok();
    let _ = std::fs::remove_file(&link);
}

#[test]
fn disk_without_write_permission() {
    // Tests run as root, which ignores mode bits on ordinary files; a read-only sysfs attribute
    // refuses a read-write open even to root.
    let p = Path::new("/sys/devices/system/cpu/online");
    if !p.exists() {
        eprintln!(
            "SKIPPED disk_without_write_permission: {} is missing",
            p.display()
        );
        return;
    }
    let h = hello();
    bad_input(
        &["run", "--kernel", &h, "--disk", p.to_str().unwrap()],
        &[Path::new(&h), p],
        &[p.to_str().unwrap(), "denied"],
    );
}

#[test]
fn disk_specs_that_do_not_parse() {
    let h = hello();
    let img = write_file("spec.img", &[0u8; 4096]);
    let img = img.to_str().unwrap();
    for (spec, want) in [
        (format!("path={img},readonly=maybe"), "readonly"),
        (format!("path={img},colour=red"), "colour"),
        (format!("path={img},id="), "id"),
        (format!("path={img},id={}", "z".repeat(21)), "id"),
        (format!("path={img},readonly=on,readonly=off"), "twice"),
        (format!("path={img},path=/nonexistent/other.img"), "twice"),
        ("readonly=on".to_string(), "path"),
        ("path=".to_string(), "path"),
        (String::new(), "--disk"),
    ] {
        bad_input(
            &["run", "--kernel", &h, "--disk", &spec],
            &[Path::new(&h), Path::new(img)],
            &["--disk", want],
        );
    }
}

#[test]
fn more_disks_than_virtio_irqs() {
    let h = hello();
    let img = write_file("many.img", &[0u8; 4096]);
    let spec = format!("path={},readonly=on", img.display());
    let mut args = vec!["run", "--kernel", &h];
    for _ in 0..40 {
        args.extend(["--disk", &spec]);
    }
    bad_input(&args, &[Path::new(&h), &img], &["disk"]);
}

// ---- other options ----

#[test]
fn serial_file_in_a_missing_directory() {
    let h = hello();
    let out = "/nonexistent/ember-test/serial.log";
    bad_input(
        &["run", "--kernel", &h, "--serial", &format!("file={out}")],
        &[Path::new(&h)],
        &[out],
    );
}

#[test]
fn option_values_and_words_ember_does_not_know() {
    let h = hello();
    for (args, want) in [
        (vec!["run", "--kernel", &h, "--serial", "tty"], "--serial"),
        (vec!["run", "--kernel", &h, "--serial", "file="], "--serial"),
        (vec!["run", "--kernel", &h, "--timings=xml"], "--timings"),
        (
            vec!["run", "--kernel", &h, "--seccomp", "maybe"],
            "--seccomp",
        ),
        (vec!["run", "--kernel", &h, "--cpus"], "--cpus"),
        (vec!["run"], "--kernel"),
        (vec!["fly", "--kernel", &h], "fly"),
        (vec!["run", "--kernel", &h, "extra-word"], "extra-word"),
    ] {
        bad_input(&args, &[Path::new(&h)], &[want]);
    }
}

// ---- seccomp ----

/// An Ember whose guest waits for input, with its stdout read line by line.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn spawn(args: &[&str]) -> Running {
        Self::spawn_command(Command::new(common::ember()).args(args))
    }

    fn spawn_command(cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ember");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // A terminal ends lines with \r\n.
                if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Returns the first line from now on that contains `want`.
    fn wait_for(&mut self, want: &str) -> String {
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if l.contains(want) => return l,
                Ok(l) => self.seen.push(l),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!("never saw {want:?}; output so far: {:?}", self.seen);
    }

    fn next_line(&mut self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("no more output ({e}); so far: {:?}", self.seen))
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the exit and returns its code, with stderr for messages.
    fn finish(mut self, deadline: Duration) -> (Option<i32>, Duration, String) {
        let start = Instant::now();
        let status = common::wait_deadline(&mut self.child, deadline)
            .unwrap_or_else(|| panic!("ember did not exit within {deadline:?}"));
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        (status.code(), start.elapsed(), err)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A failed test must not leave its VM behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `Seccomp:` of every thread of `pid` (2 = filter mode).
fn seccomp_modes(pid: i32) -> Vec<(String, u32)> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
        };
        if let (Some(name), Some(mode)) = (field("Name:"), field("Seccomp:")) {
            modes.push((name, mode.parse().unwrap()));
        }
    }
    modes
}

fn check_filters(extra: &[&str], want_mode: u32) {
    let echo = common::guest("echo");
    // A disk, so that its I/O thread is there to check too.
    let disk = write_file(&format!("filters-{want_mode}.img"), &[0u8; 64 * 512]);
    let spec = format!("path={}", disk.display());
    let mut args = vec![
        "run",
        "--kernel",
        echo.to_str().unwrap(),
        "--cpus",
        "2",
        "--disk",
        &spec,
    ];
    args.extend_from_slice(extra);
    let mut vm = Running::spawn(&args);
    vm.wait_for("echo: ready");
    // vCPU 0 can print before vCPU 1's thread has its name, and the main thread installs its
    // filter right after starting the vCPUs; give both a moment.
    let end = Instant::now() + Duration::from_secs(5);
    let modes = loop {
        let modes = seccomp_modes(vm.pid());
        let settled = ["vcpu1", "ember-console", "ember-disk0"]
            .iter()
            .all(|t| modes.iter().any(|(n, _)| n == t))
            && modes.iter().all(|(_, m)| *m == want_mode);
        if settled || Instant::now() > end {
            break modes;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        modes.len() >= 3,
        "main thread and two vCPU threads expected: {modes:?}"
    );
    for thread in ["vcpu1", "ember-console", "ember-disk0"] {
        assert!(
            modes.iter().any(|(n, _)| n == thread),
            "no {thread}: {modes:?}"
        );
    }
    for (name, mode) in &modes {
        assert_eq!(*mode, want_mode, "thread {name}: {modes:?}");
    }
    // The filtered VM still works: input goes in, the guest answers, then ends cleanly.
    let mut stdin = vm.child.stdin.take().unwrap();
    stdin.write_all(b"still here\nquit\n").unwrap();
    vm.wait_for("echo: still here");
    let (code, _, err) = vm.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("seccomp"), "{err}");
}

#[test]
fn seccomp_filters_are_on_by_default_in_every_thread() {
    check_filters(&[], 2);
}

#[test]
fn seccomp_off_leaves_threads_unfiltered() {
    check_filters(&["--seccomp", "off"], 0);
}

// ---- signals ----

fn stopped_by(signal: i32, expect_code: i32) {
    let echo = common::guest("echo");
    let disk = write_file(&format!("signal-{signal}.img"), &[0x11; 64 * 512]);
    let spec = format!("path={}", disk.display());
    let mut vm = Running::spawn(&["run", "--kernel", echo.to_str().unwrap(), "--disk", &spec]);
    vm.wait_for("echo: ready");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(vm.pid(), signal) }, 0);
    let (code, took, err) = vm.finish(Duration::from_secs(10));
    assert_eq!(code, Some(expect_code), "stderr: {err}");
    assert!(took < Duration::from_secs(3), "took {took:?} to stop");
    assert!(!err.contains("panicked"), "{err}");
    // The image is closed and unlocked: another Ember can take it read-write at once.
    let h = hello();
    let run = common::run_ember(&["run", "--kernel", &h, "--disk", &spec], b"", DEADLINE);
    run.ok();
    assert_eq!(std::fs::read(&disk).unwrap(), vec![0x11; 64 * 512]);
}

#[test]
fn sigterm_stops_the_vm_with_status_143() {
    stopped_by(libc::SIGTERM, 143);
}

#[test]
fn sigint_stops_the_vm_with_status_130() {
    stopped_by(libc::SIGINT, 130);
}

#[test]
fn sighup_stops_the_vm_with_status_129() {
    // The terminal Ember ran on went away (ssh dropped, window closed).
    stopped_by(libc::SIGHUP, 129);
}

/// A guest that keeps its disk's queue full of 1 MiB writes and flushes (the `blk` guest's flood
/// mode) while SIGTERM comes: Ember stops at once (its own stop, from its timeline) and exits 143.
/// With the disk served on the main event loop it never stopped: the guest refilled the queue
/// faster than the loop got back to the signal (still running after 60 s).
#[test]
fn sigterm_stops_a_guest_that_keeps_its_disk_busy() {
    let blk = common::guest("blk");
    let disk = write_file("flood.img", &[]);
    std::fs::File::options()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let spec = format!("path={}", disk.display());
    let spawned = Instant::now();
    let mut vm = Running::spawn(&[
        "run",
        "--timings=json",
        "--kernel",
        blk.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 blk.mode=flood",
        "--disk",
        &spec,
    ]);
    vm.wait_for("blk: flooding");
    std::thread::sleep(Duration::from_secs(1));
    let signalled = spawned.elapsed();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(vm.pid(), libc::SIGTERM) }, 0);
    // The process itself may outlive Ember's stop by a sync of the image in flight.
    let (code, _, err) = vm.finish(Duration::from_secs(20));
    assert_eq!(code, Some(143), "{err}");
    let timeline = err
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no timeline on stderr: {err}"));
    let guest_exit_us: u64 = timeline
        .split("\"guest_exit\":")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{timeline}"));
    let stop = Duration::from_micros(guest_exit_us).saturating_sub(signalled);
    assert!(
        stop < Duration::from_secs(2),
        "Ember took {stop:?} after SIGTERM to stop its VM: {timeline}"
    );
    std::fs::remove_file(&disk).unwrap();
}

/// Two stop signals back to back (a CI runner's SIGHUP as the job's terminal goes, then its
/// SIGTERM): the first one decides the status. They were once added up (SIGHUP + SIGTERM = 144).
#[test]
fn two_signals_in_a_row_give_the_first_ones_status() {
    let echo = common::guest("echo");
    let mut vm = Running::spawn(&["run", "--kernel", echo.to_str().unwrap()]);
    vm.wait_for("echo: ready");
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        assert_eq!(libc::kill(vm.pid(), libc::SIGHUP), 0);
        assert_eq!(libc::kill(vm.pid(), libc::SIGTERM), 0);
    }
    let (code, _, err) = vm.finish(Duration::from_secs(10));
    assert_eq!(code, Some(129), "SIGHUP came first; stderr: {err}");
}

// ---- the reaper (deferred VM teardown) ----

/// Processes named `ember-reaper` whose command line (Ember's, as they share its memory) names
/// `token`.
fn reapers_of(token: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().map_while(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        if comm.trim() == "ember-reaper"
            && !zombie
            && String::from_utf8_lossy(&cmdline).contains(token)
        {
            found.push(pid);
        }
    }
    found
}

#[test]
fn the_reaper_shares_embers_memory_holds_only_the_vm_and_leaves_after_ember() {
    let echo = common::guest("echo");
    let disk = write_file("reaper.img", &[0x22; 64 * 512]);
    let token = disk.display().to_string();
    let spec = format!("path={token}");
    let mut vm = Running::spawn(&["run", "--kernel", echo.to_str().unwrap(), "--disk", &spec]);
    vm.wait_for("echo: ready");

    // Ember forks the reaper once its vCPUs run, so the guest may print before it exists.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut reapers = reapers_of(&token);
    while reapers.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        reapers = reapers_of(&token);
    }
    assert_eq!(reapers.len(), 1, "reapers for this Ember: {reapers:?}");
    let reaper = reapers[0];
    // Same address space: Ember's exit then leaves both the VM and the guest memory teardown to
    // the reaper.
    // SAFETY: kcmp only compares two processes' resources.
    let same_vm = unsafe {
        libc::syscall(libc::SYS_kcmp, vm.pid(), reaper, 1 /* KCMP_VM */, 0, 0)
    };
    assert_eq!(
        same_vm, 0,
        "the reaper does not share Ember's address space"
    );
    // Nothing but the VM and Ember's pidfd: not the disk (its lock must end with Ember), not
    // Ember's stdout (a caller waits for its EOF), not /dev/kvm.
    let mut held: Vec<String> = std::fs::read_dir(format!("/proc/{reaper}/fd"))
        .unwrap()
        .map_while(Result::ok)
        .map(|e| std::fs::read_link(e.path()).unwrap().display().to_string())
        .collect();
    held.sort();
    assert_eq!(
        held,
        ["anon_inode:[pidfd]", "anon_inode:kvm-vm"],
        "{held:?}"
    );
    // Under its own system call filter, like every thread of Ember's.
    let status = std::fs::read_to_string(format!("/proc/{reaper}/status")).unwrap();
    let mode = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(str::trim);
    assert_eq!(mode, Some("2"), "the reaper runs unfiltered:\n{status}");

    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(vm.pid(), libc::SIGTERM) }, 0);
    let (code, _, err) = vm.finish(Duration::from_secs(10));
    assert_eq!(code, Some(143), "{err}");
    let end = Instant::now() + Duration::from_secs(10);
    while !reapers_of(&token).is_empty() {
        assert!(Instant::now() < end, "the reaper outlived Ember by 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_restores_the_terminal() {
    // A real terminal: `script` runs a shell on a pseudo-terminal, which records the terminal
    // mode (`stty -g`), starts Ember on it, waits, and records the mode again. Ember puts the
    // terminal in raw mode while the guest runs; after SIGTERM it must be as it was.
    let echo = common::guest("echo");
    let shell = format!(
        "stty -g; exec 3<&0; {} run --kernel {} <&3 & echo PID $!; wait $!; echo STATUS $?; stty -g",
        common::ember(),
        echo.display()
    );
    let mut vm = Running::spawn_command(Command::new("script").args(["-qec", &shell, "/dev/null"]));
    let before = vm.next_line();
    let pid: i32 = vm
        .wait_for("PID ")
        .trim_start_matches("PID ")
        .parse()
        .unwrap();
    vm.wait_for("echo: ready");
    let tty = std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap();
    let during = Command::new("stty")
        .arg("-F")
        .arg(&tty)
        .arg("-g")
        .output()
        .unwrap();
    let during = String::from_utf8_lossy(&during.stdout).trim().to_string();
    assert_ne!(
        during,
        before,
        "Ember did not put {} in raw mode",
        tty.display()
    );
    // SAFETY: kill(2) on the Ember the shell started for this test.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(vm.wait_for("STATUS "), "STATUS 143");
    let after = vm.next_line();
    assert_eq!(after, before, "the terminal mode was not restored");
    let (code, _, err) = vm.finish(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
}

// ---- a hostile guest ----

#[test]
fn guest_attacking_every_device_does_not_bring_ember_down() {
    let attack = common::guest("g_attack");
    let disk = write_file("attack.img", &[0u8; 64 * 512]);
    let spec = format!("path={}", disk.display());
    let run = common::run_ember(
        &["run", "--kernel", attack.to_str().unwrap(), "--disk", &spec],
        b"",
        Duration::from_secs(120),
    );
    let out = run.ok();
    for want in [
        "attack: serial done",
        "attack: i8042 done",
        "attack: acpi done",
        "attack: virtio slot 0 magic 0x74726976",
        "attack: virtio slot 0 status after reset 0x0",
        "attack: virtio slot 1 magic 0xffffffff",
        "attack: unclaimed port read 0xffffffff mmio read 0xffffffffffffffff",
        "attack: survived",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert!(!run.stderr.contains("ember: error"), "{}", run.stderr);
}

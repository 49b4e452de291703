//! Real kernels: Debian 12's cloud kernel from the guest kit (scripts/kit.sh), as an ELF vmlinux
//! (PVH entry) and as a bzImage (64-bit entry), and the kit's busybox initramfs.
//!
//! Every KVM: the kernel's own log must show what a user checks first: the banner, our command
//! line, the memory map, the ACPI MADT and the CPU count. On kvm_pvm (software nested
//! virtualization) this takes tens of seconds and Debian's kernel never reaches userspace (it
//! stops at XRSTOR), so its initramfs tests run on hardware KVM only and skip loudly elsewhere.
//! Linux userspace (the shell on the console, SMP, interrupts, ext4 on virtio-blk, read-only
//! disks, reboot and poweroff) is tested everywhere on Ember's microVM kernel
//! (scripts/microvm-kernel.sh), which boots to userspace on both kinds of host.
//!
//! Ember's stdout is read line by line as it comes, Ember is stopped (SIGTERM) as soon as every
//! expected line has been seen, and each expected line's arrival time is printed (`--nocapture`
//! shows it).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::{self, kit_file};

/// Linux on kvm_pvm needs ~17 s to its banner and ~50 s to `Memory:`; leave room for a loaded
/// machine. On hardware KVM all of this takes about a second.
const DEADLINE: Duration = Duration::from_secs(180);
/// A bzImage decompresses itself (53 MB of LZ4) in guest code: on kvm_pvm its banner came after
/// 137-210 s (measured 2026-11, 2-core VM, other builds running).
const BZIMAGE_DEADLINE: Duration = Duration::from_secs(480);

/// The kernel's command line for these tests: Ember's defaults plus an early console, so the
/// first lines come before the 8250 driver is up.
fn cmdline(marker: &str) -> String {
    format!("console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 pci=off {marker}")
}

/// Real-kernel boots are CPU-bound for tens of seconds on slow hosts; two at once on a 2-core
/// machine only make each slower and their timings meaningless.
pub(crate) static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// One expected console line: every needle must appear on the same line.
struct Expect {
    name: &'static str,
    needles: Vec<String>,
}

impl Expect {
    fn new(name: &'static str, needles: &[&str]) -> Self {
        Expect {
            name,
            needles: needles.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn matches(&self, line: &str) -> bool {
        self.needles.iter().all(|n| line.contains(n.as_str()))
    }
}

/// What a boot showed: every console line with its arrival time, when each expectation was met,
/// and how Ember ended (None: still running when all lines were seen, or at the deadline, and
/// stopped).
struct Boot {
    lines: Vec<(Duration, String)>,
    seen: Vec<Option<Duration>>,
    status: Option<ExitStatus>,
    stderr: String,
    elapsed: Duration,
    deadline: Duration,
}

impl Boot {
    /// The first console line meeting expectation `i`.
    fn line(&self, i: usize, expect: &[Expect]) -> &str {
        self.lines
            .iter()
            .map(|(_, l)| l.as_str())
            .find(|l| expect[i].matches(l))
            .unwrap_or("")
    }

    fn transcript(&self) -> String {
        let mut s = String::new();
        for (t, l) in &self.lines {
            s.push_str(&format!("[{:7.2}] {l}\n", t.as_secs_f64()));
        }
        format!(
            "ember ended with {:?} after {:.1} s\nstdout:\n{s}stderr:\n{}",
            self.status,
            self.elapsed.as_secs_f64(),
            self.stderr
        )
    }

    /// Fails the test, with the whole console, unless every expectation was met.
    fn assert_all_seen(&self, test: &str, expect: &[Expect]) {
        for (e, t) in expect.iter().zip(&self.seen) {
            match t {
                Some(t) => eprintln!("{test}: {:>9.2} s  {}", t.as_secs_f64(), e.name),
                None => eprintln!("{test}:     never  {}", e.name),
            }
        }
        let missing: Vec<&str> = expect
            .iter()
            .zip(&self.seen)
            .filter(|(_, t)| t.is_none())
            .map(|(e, _)| e.name)
            .collect();
        assert!(
            missing.is_empty(),
            "{test}: never saw {missing:?} (deadline {:?})\n{}",
            self.deadline,
            self.transcript()
        );
    }
}

/// When to stop watching the console.
#[derive(Clone, Copy, PartialEq)]
enum Until {
    /// Stop Ember (SIGTERM) as soon as every expected line has been seen.
    AllSeen,
    /// Let Ember exit by itself (the guest reboots or powers off).
    Exit,
}

/// What to type on the guest's console, and after which console line: steps in order, each
/// waiting for a line that `after` accepts (seen after the previous step was typed).
type Input<'a> = &'a [(&'a dyn Fn(&str) -> bool, &'a str)];

/// Runs Ember with `args`, watching its stdout for `expect`, typing `input` on its stdin as the
/// lines it waits for arrive. Ember is stopped at `deadline` at the latest.
fn boot(args: &[&str], expect: &[Expect], until: Until, input: Input, deadline: Duration) -> Boot {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let start = Instant::now();
    let mut child = Command::new(common::ember())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ember");
    // Held open for the whole boot: EOF on the console would end a guest shell.
    let mut stdin: Option<ChildStdin> = child.stdin.take();

    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .to_string();
                    if tx.send((start.elapsed(), line)).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    });

    let mut lines = Vec::new();
    let mut seen: Vec<Option<Duration>> = vec![None; expect.len()];
    let mut pending_input = input.iter();
    let mut next_input = pending_input.next();
    let end = start + deadline;
    let mut status = None;
    loop {
        if until == Until::AllSeen && seen.iter().all(Option::is_some) {
            break;
        }
        let now = Instant::now();
        if now >= end {
            break;
        }
        match rx.recv_timeout((end - now).min(Duration::from_millis(200))) {
            Ok((t, line)) => {
                for (e, s) in expect.iter().zip(seen.iter_mut()) {
                    if s.is_none() && e.matches(&line) {
                        *s = Some(t);
                    }
                }
                if let Some((after, text)) = next_input {
                    if after(&line) {
                        if let Some(w) = stdin.as_mut() {
                            w.write_all(text.as_bytes())
                                .expect("write to ember's stdin");
                            w.flush().expect("flush ember's stdin");
                        }
                        next_input = pending_input.next();
                    }
                }
                lines.push((t, line));
            }
            Err(RecvTimeoutError::Timeout) => {}
            // stdout closed: Ember has exited (or closed it); its status follows.
            Err(RecvTimeoutError::Disconnected) => {
                status = common::wait_deadline(
                    &mut child,
                    end.saturating_duration_since(Instant::now()),
                );
                break;
            }
        }
    }
    if status.is_none() {
        if let Ok(Some(s)) = child.try_wait() {
            status = Some(s);
        } else {
            common::stop(&mut child);
        }
    }
    let elapsed = start.elapsed();
    drop(stdin.take());
    // Drain what the reader saw between the last recv and the kill.
    let _ = reader.join();
    for (t, line) in rx.try_iter() {
        for (e, s) in expect.iter().zip(seen.iter_mut()) {
            if s.is_none() && e.matches(&line) {
                *s = Some(t);
            }
        }
        lines.push((t, line));
    }
    Boot {
        lines,
        seen,
        status,
        stderr: stderr_reader.join().unwrap(),
        elapsed,
        deadline,
    }
}

fn kernel_version() -> String {
    std::fs::read_to_string(kit_file("version"))
        .unwrap()
        .trim()
        .to_string()
}

/// Parses `BIOS-e820: [mem 0xSTART-0xEND] usable` into the number of bytes it covers.
fn e820_usable_bytes(line: &str) -> Option<u64> {
    let rest = line.split("[mem ").nth(1)?;
    let (range, kind) = rest.split_once(']')?;
    if kind.trim() != "usable" {
        return None;
    }
    let (a, b) = range.split_once('-')?;
    let a = u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()?;
    let b = u64::from_str_radix(b.trim_start_matches("0x"), 16).ok()?;
    Some(b - a + 1)
}

/// The total in `Memory: 480000K/523896K available (...)`, in KiB.
fn memory_line_total_kib(line: &str) -> Option<u64> {
    let rest = line.split("Memory: ").nth(1)?;
    let total = rest.split('/').nth(1)?.split('K').next()?;
    total.parse().ok()
}

/// The banner and the command line: the two lines that prove Ember loaded this kernel, entered
/// it, handed it our command line and gave it a working serial console.
fn banner_and_cmdline(test: &str, kernel: &str, marker: &str, deadline: Duration) {
    let version = kernel_version();
    let kernel = kit_file(kernel);
    let cmdline = cmdline(marker);
    let expect = [
        Expect::new("Linux version", &[&format!("Linux version {version} ")]),
        Expect::new("Command line", &["Command line:", marker]),
    ];
    let b = boot(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            &cmdline,
        ],
        &expect,
        Until::AllSeen,
        &[],
        deadline,
    );
    b.assert_all_seen(test, &expect);
    // The kernel got our whole command line, not just the marker word.
    let line = b.line(1, &expect);
    assert!(
        line.contains(&cmdline),
        "{test}: the kernel's command line lacks ours ({cmdline:?}): {line}\n{}",
        b.transcript()
    );
    assert!(
        !b.stderr.contains("panicked"),
        "{test}: ember panicked\n{}",
        b.transcript()
    );
}

#[test]
fn vmlinux_pvh_prints_banner_and_our_cmdline() {
    banner_and_cmdline(
        "vmlinux_pvh_prints_banner_and_our_cmdline",
        "vmlinux",
        "ember.test=vmlinux42",
        DEADLINE,
    );
}

#[test]
fn bzimage_prints_banner_and_our_cmdline() {
    banner_and_cmdline(
        "bzimage_prints_banner_and_our_cmdline",
        "bzImage",
        "ember.test=bzimage42",
        BZIMAGE_DEADLINE,
    );
}

/// What Linux learns from Ember's boot tables: the E820 map adds up to the memory asked for, the
/// MADT is found and lists both CPUs, and the memory total matches.
#[test]
fn vmlinux_sees_e820_acpi_two_cpus_and_memory() {
    const TEST: &str = "vmlinux_sees_e820_acpi_two_cpus_and_memory";
    const MIB: u64 = 1 << 20;
    let kernel = kit_file("vmlinux");
    let cmdline = cmdline("ember.test=tables42");
    let expect = [
        Expect::new("BIOS-e820 usable", &["BIOS-e820: [mem ", "usable"]),
        Expect::new("ACPI: APIC", &["ACPI: APIC"]),
        Expect::new("Allowing 2 CPUs", &["Allowing 2 CPUs"]),
        Expect::new("Memory: total", &["Memory: ", "K available"]),
    ];
    let b = boot(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--cpus",
            "2",
            "--memory",
            "512M",
        ],
        &expect,
        Until::AllSeen,
        &[],
        DEADLINE,
    );
    b.assert_all_seen(TEST, &expect);

    // E820 comes first in the log; by the time `Memory:` is printed the map is complete.
    let usable: u64 = b
        .lines
        .iter()
        .filter(|(_, l)| l.contains("BIOS-e820:"))
        .filter_map(|(_, l)| e820_usable_bytes(l))
        .sum();
    assert!(
        usable > 500 * MIB && usable <= 512 * MIB,
        "{TEST}: E820 usable RAM is {usable:#x} bytes, want a little under 512 MiB\n{}",
        b.transcript()
    );
    let total = memory_line_total_kib(b.line(3, &expect));
    assert!(
        matches!(total, Some(k) if k > 500 * 1024 && k <= 512 * 1024),
        "{TEST}: `Memory:` total {total:?} KiB, want a little under 512 MiB\n{}",
        b.transcript()
    );
}

/// Boots `kernel` with a kit initramfs and returns the console and status.
fn boot_initramfs(
    kernel: &std::path::Path,
    initramfs: &str,
    cpus: &str,
    memory: &str,
    expect: &[Expect],
    until: Until,
    input: Input,
) -> Boot {
    let initramfs = kit_file(initramfs);
    let cmdline = cmdline("ember.test=initramfs42");
    boot(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initramfs.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--cpus",
            cpus,
            "--memory",
            memory,
        ],
        expect,
        until,
        input,
        DEADLINE,
    )
}

/// `ember-kit: memtotal KB` from the console, checked against the memory given to the guest: the
/// kernel keeps a few percent for itself, never more than the guest has.
pub(crate) fn assert_memtotal(test: &str, transcript: &str, line: &str, mib: u64) {
    let kb: u64 = line
        .trim()
        .strip_prefix("ember-kit: memtotal ")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("{test}: bad memtotal line {line:?}\n{transcript}"));
    let asked = mib * 1024;
    assert!(
        kb > asked * 80 / 100 && kb <= asked,
        "{test}: guest MemTotal {kb} kB for {mib} MiB\n{transcript}"
    );
}

/// The interrupt counts in a `/proc/interrupts` line (after `IRQ:`, before the chip name), one
/// per CPU.
fn irq_counts(line: &str) -> Vec<u64> {
    let after_irq = line.split_once(':').map_or("", |(_, rest)| rest);
    after_irq
        .split_whitespace()
        .map_while(|w| w.parse().ok())
        .collect()
}

/// A line the guest printed itself, `PREFIX ...`, not the tty's echo of the command that prints
/// it (which follows the shell prompt and still holds `$`).
fn printed(line: &str, prefix: &str) -> bool {
    line.starts_with(prefix) && !line.contains('$')
}

/// Issue 10's shell test, on Ember's microVM kernel (it boots to userspace on hardware KVM and on
/// kvm_pvm alike): the initramfs shell reads what is typed on Ember's stdin through the 8250's
/// interrupts, both vCPUs are online and run processes, and `reboot -f` ends Ember with 0.
#[test]
fn initramfs_shell_sees_cpus_memory_and_answers_on_the_console() {
    const TEST: &str = "initramfs_shell_sees_cpus_memory_and_answers_on_the_console";
    let kernel = common::microvm_kernel("vmlinux");
    let expect = [
        Expect::new("ember-kit: cpus 2", &["ember-kit: cpus 2"]),
        Expect::new("ember-kit: memtotal", &["ember-kit: memtotal "]),
        Expect::new("ember-kit: ready", &["ember-kit: ready"]),
        // The shell's answer, not the echo of the command (which shows `$((6*7))`).
        Expect::new("shell answer", &["ember-kit-echo 42"]),
        Expect::new("a process on CPU 1", &["ember-kit-on-cpu 1"]),
        Expect::new("serial interrupts", &["ember-kit-irq", "ttyS"]),
        Expect::new("the guest's date", &["ember-kit-date-"]),
        Expect::new("reboot: Restarting system", &["reboot: Restarting system"]),
    ];
    let ready = |l: &str| l.contains("ember-kit: ready");
    let answered = |l: &str| l.contains("ember-kit-echo 42");
    let on_cpu = |l: &str| printed(l, "ember-kit-on-cpu");
    let irq = |l: &str| printed(l, "ember-kit-irq") && l.contains("ttyS");
    let dated = |l: &str| printed(l, "ember-kit-date-");
    let input: Input = &[
        (&ready, "echo ember-kit-echo $((6*7))\n"),
        // Field 39 of /proc/self/stat is the CPU the process last ran on.
        (
            &answered,
            "taskset -c 1 sh -c 'read -r s </proc/self/stat; set -- $s; echo ember-kit-on-cpu ${39}'\n",
        ),
        (
            &on_cpu,
            "while read -r l; do case \"$l\" in *ttyS*) echo \"ember-kit-irq $l\";; esac; done </proc/interrupts\n",
        ),
        // The guest's clock comes from Ember's CMOS RTC: the host's date.
        (&irq, "date -u +ember-kit-date-%Y-%m-%d\n"),
        (&dated, "reboot -f\n"),
    ];
    let b = boot_initramfs(
        &kernel,
        "initramfs.cpio",
        "2",
        "256M",
        &expect,
        Until::Exit,
        input,
    );
    b.assert_all_seen(TEST, &expect);
    assert_memtotal(TEST, &b.transcript(), b.line(1, &expect), 256);
    let irq_line = b
        .lines
        .iter()
        .map(|(_, l)| l.as_str())
        .find(|l| irq(l))
        .unwrap_or("");
    let counts = irq_counts(irq_line.trim_start_matches("ember-kit-irq"));
    assert!(
        counts.len() == 2 && counts.iter().sum::<u64>() > 0,
        "{TEST}: the serial port's interrupt line should count interrupts on 2 CPUs: \
         {irq_line:?}\n{}",
        b.transcript()
    );
    assert!(
        matches!(b.status, Some(s) if s.success()),
        "{TEST}: ember should exit 0 when the guest reboots\n{}",
        b.transcript()
    );
    let host_date = || {
        let out = Command::new("date")
            .args(["-u", "+ember-kit-date-%Y-%m-%d"])
            .output()
            .expect("date (coreutils)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let guest_date = b
        .lines
        .iter()
        .map(|(_, l)| l.trim())
        .find(|l| dated(l))
        .unwrap_or("");
    assert_eq!(
        guest_date,
        host_date(),
        "{TEST}: the guest's date is not the host's\n{}",
        b.transcript()
    );
    let (Some(asked), Some(done)) = (b.seen[6], b.seen[7]) else {
        unreachable!("all seen")
    };
    eprintln!(
        "{TEST}: reboot -f typed at {:.2} s, restart line after {:.2} s, ember gone after {:.2} s",
        asked.as_secs_f64(),
        (done - asked).as_secs_f64(),
        b.elapsed.as_secs_f64()
    );
}

/// Debian's own kernel to its initramfs: it needs hardware KVM (on kvm_pvm it stops at XRSTOR in
/// `fpu__init_system_xstate`; Ember's microVM kernel covers userspace there).
fn debian_kernel_to_userspace(test: &str, initramfs: &str, cpus: &str, mib: u64, last: &str) {
    let why = "Debian's unmodified kernel stops at XRSTOR (fpu__init_system_xstate) here; \
               Ember's microVM kernel is tested to userspace instead";
    if common::skip_unless_hardware_kvm(test, why) {
        return;
    }
    let expect = [
        Expect::new("ember-kit: cpus", &[&format!("ember-kit: cpus {cpus}")]),
        Expect::new("ember-kit: memtotal", &["ember-kit: memtotal "]),
        Expect::new("ember-kit: ready", &["ember-kit: ready"]),
        Expect::new("last kernel line", &[last]),
    ];
    let b = boot_initramfs(
        &kit_file("vmlinux"),
        initramfs,
        cpus,
        &format!("{mib}M"),
        &expect,
        Until::Exit,
        &[],
    );
    b.assert_all_seen(test, &expect);
    assert_memtotal(test, &b.transcript(), b.line(1, &expect), mib);
    assert!(
        matches!(b.status, Some(s) if s.success()),
        "{test}: ember should exit 0\n{}",
        b.transcript()
    );
}

#[test]
fn debian_kernel_initramfs_reboot_makes_ember_exit_0() {
    debian_kernel_to_userspace(
        "debian_kernel_initramfs_reboot_makes_ember_exit_0",
        "initramfs-reboot.cpio",
        "1",
        256,
        "reboot: Restarting system",
    );
}

#[test]
fn debian_kernel_initramfs_poweroff_makes_ember_exit_0() {
    debian_kernel_to_userspace(
        "debian_kernel_initramfs_poweroff_makes_ember_exit_0",
        "initramfs-poweroff.cpio",
        "2",
        512,
        "reboot: Power down",
    );
}

fn sha256(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum (coreutils)");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// ext4 on virtio-blk, on Ember's microVM kernel: Linux mounts a copy of the kit's ext4 image
/// read-write, verifies hello.txt against hello.sha256, writes a file, syncs, unmounts; a second
/// disk attached `readonly=on` is read-only to the kernel and a raw write to it fails; the disks'
/// interrupts are counted; then `poweroff -f` ends Ember with 0. The host finds the file with
/// debugfs, e2fsck finds the filesystem clean, and the read-only image is unchanged. The guest side
/// is scripts/kit/init's `ember.kit=disktest`.
#[test]
fn ext4_disk_checksum_write_sync_poweroff_then_host_reads_it_and_fsck_is_clean() {
    const TEST: &str =
        "ext4_disk_checksum_write_sync_poweroff_then_host_reads_it_and_fsck_is_clean";
    // Copies: the kit's image must stay as kit.sh built it.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernels-scratch");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join(format!("{}-disktest.ext4", std::process::id()));
    let ro_img = dir.join(format!("{}-disktest-ro.ext4", std::process::id()));
    std::fs::copy(kit_file("rootfs.ext4"), &img).unwrap();
    std::fs::copy(kit_file("rootfs.ext4"), &ro_img).unwrap();
    let ro_before = sha256(&ro_img);
    // Unique per run, so the file the host finds can only have been written by this boot.
    let token = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let kernel = common::microvm_kernel("vmlinux");
    let initramfs = kit_file("initramfs.cpio");
    let cmdline = cmdline(&format!("ember.kit=disktest ember.kit.token={token}"));
    let disk = format!("path={}", img.display());
    let ro_disk = format!("path={},readonly=on", ro_img.display());
    let expect = [
        Expect::new("ember-kit: ready", &["ember-kit: ready"]),
        Expect::new("ember-kit: mounted vda rw", &["ember-kit: mounted vda rw"]),
        Expect::new("ember-kit: sha ok", &["ember-kit: sha ok"]),
        Expect::new("ember-kit: disk done", &["ember-kit: disk done"]),
        Expect::new("ember-kit: vdb ro 1", &["ember-kit: vdb ro 1"]),
        Expect::new(
            "ember-kit: vdb write refused",
            &["ember-kit: vdb write refused"],
        ),
        Expect::new("virtio interrupts", &["ember-kit: irq", "virtio"]),
        Expect::new("reboot: Power down", &["reboot: Power down"]),
    ];
    let b = boot(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initramfs.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--memory",
            "256M",
            "--disk",
            &disk,
            "--disk",
            &ro_disk,
        ],
        &expect,
        Until::Exit,
        &[],
        DEADLINE,
    );
    b.assert_all_seen(TEST, &expect);
    for bad in [
        "ember-kit: sha bad",
        "ember-kit: disktest failed",
        "ember-kit: vdb write succeeded",
    ] {
        assert!(
            !b.lines.iter().any(|(_, l)| l.contains(bad)),
            "{TEST}: the guest printed {bad:?}\n{}",
            b.transcript()
        );
    }
    // Both disks raised interrupts: the guest's virtio driver is interrupt-driven, not polling.
    let virtio_irqs: Vec<u64> = b
        .lines
        .iter()
        .filter(|(_, l)| l.starts_with("ember-kit: irq") && l.contains("virtio"))
        .map(|(_, l)| {
            irq_counts(l.trim_start_matches("ember-kit: irq"))
                .iter()
                .sum()
        })
        .collect();
    assert!(
        virtio_irqs.len() == 2 && virtio_irqs.iter().all(|n| *n > 0),
        "{TEST}: want two virtio interrupt lines with counts, got {virtio_irqs:?}\n{}",
        b.transcript()
    );
    assert!(
        matches!(b.status, Some(s) if s.success()),
        "{TEST}: ember should exit 0 when the guest powers off\n{}",
        b.transcript()
    );
    assert_eq!(
        sha256(&ro_img),
        ro_before,
        "{TEST}: the readonly=on image changed"
    );

    // The host's view of the image Ember has closed. Both tools come with e2fsprogs
    // (scripts/deps.sh); the image is kept for inspection when an assertion fails.
    let debugfs = Command::new("debugfs")
        .args(["-R", "cat /written.txt"])
        .arg(&img)
        .output()
        .expect("debugfs is installed (e2fsprogs, scripts/deps.sh)");
    let written = String::from_utf8_lossy(&debugfs.stdout);
    assert!(
        debugfs.status.success() && written == format!("ember-kit disktest {token}\n"),
        "{TEST}: debugfs -R 'cat /written.txt' {} gave {:?} (stdout {written:?}, stderr {:?}), \
         want the line the guest wrote with token {token}",
        img.display(),
        debugfs.status,
        String::from_utf8_lossy(&debugfs.stderr)
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .expect("e2fsck is installed (e2fsprogs, scripts/deps.sh)");
    assert_eq!(
        fsck.status.code(),
        Some(0),
        "{TEST}: e2fsck -fn {} is not clean\nstdout:\n{}\nstderr:\n{}",
        img.display(),
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    std::fs::remove_file(&img).unwrap();
    std::fs::remove_file(&ro_img).unwrap();
}

#[test]
fn irq_counts_reads_per_cpu_columns() {
    assert_eq!(
        irq_counts("  4:        120          3   IO-APIC   4-edge      ttyS0"),
        vec![120, 3]
    );
    assert_eq!(irq_counts(" 24:  7  IO-APIC  5-edge  virtio0"), vec![7]);
    assert!(irq_counts("garbage").is_empty());
}

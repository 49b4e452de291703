//! Boots the freestanding test guests (tests/guests) and checks what Ember hands a guest: the
//! command line, the E820 map, the MP and ACPI tables, PVH start info, the serial console in both
//! directions, and each way a guest can end the VM.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ember_boot::layout;

use crate::common::{self, Run};

/// Far beyond what any of these guests needs, even on a slow shared machine; only a hang hits it.
const DEADLINE: Duration = Duration::from_secs(60);
/// For the exit tests: generous, because timing on shared machines is noisy.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);

/// The bytes below 1 MiB that Ember's E820 map reserves (EBDA_START .. 1 MiB: MP and ACPI tables),
/// per `e820_map` in boot/src/params.rs.
const E820_RESERVED_BELOW_1M: u64 = 0x10_0000 - 0x9_fc00;

/// Boots test guest `name` with `args` after `--kernel`.
fn boot(name: &str, args: &[&str]) -> Run {
    boot_with_deadline(name, args, DEADLINE)
}

fn boot_with_deadline(name: &str, args: &[&str], deadline: Duration) -> Run {
    common::kvm_kind();
    let kernel = common::guest(name);
    let mut all = vec!["run", "--kernel", kernel.to_str().unwrap()];
    all.extend_from_slice(args);
    let run = common::run_ember(&all, b"", deadline);
    eprintln!(
        "ember {}: {:?}, {:?}\n{}",
        all.join(" "),
        run.status,
        run.elapsed,
        run.stderr
    );
    run
}

/// The guest lines starting with `prefix`, prefix removed.
fn lines_after<'a>(out: &'a str, prefix: &str) -> Vec<&'a str> {
    out.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|l| l.trim_end_matches('\r'))
        .collect()
}

/// The one line starting with `prefix`, prefix removed.
fn line_after<'a>(out: &'a str, prefix: &str) -> &'a str {
    let found = lines_after(out, prefix);
    assert_eq!(found.len(), 1, "one `{prefix}` line expected in:\n{out}");
    found[0]
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("hex: {s:?}"))
}

/// A path in the test's scratch directory, unique per test.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guests-scratch");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn hello_prints_ready_first_and_exits_cleanly() {
    let run = boot("hello", &[]);
    let out = run.ok();
    assert_eq!(
        out.lines().next(),
        Some("ember-guest: ready"),
        "the ready line must be the guest's first output:\n{out}"
    );
    assert!(out.contains("exit: i8042 reset"), "{out}");
    assert!(!out.contains("ignored"), "{out}");
}

#[test]
fn cmdline_given_arrives_whole() {
    let given = "console=ttyS0 ember.word=marmalade";
    let run = boot("cmdline", &["--cmdline", given]);
    let line = line_after(run.ok(), "cmdline: ");
    // Ember may append words its devices need, never drop or reorder the user's.
    assert!(line.starts_with(given), "{line:?}");
    assert!(line.contains("marmalade"), "{line:?}");
}

#[test]
fn cmdline_default_has_reboot_k() {
    let run = boot("cmdline", &[]);
    let line = line_after(run.ok(), "cmdline: ");
    let words: Vec<&str> = line.split_whitespace().collect();
    for w in ["console=ttyS0", "reboot=k", "panic=1"] {
        assert!(words.contains(&w), "default cmdline lacks {w}: {line:?}");
    }
}

struct E820 {
    entries: Vec<(u64, u64, u32)>,
    total: u64,
    highest: u64,
}

fn e820(memory: &str) -> E820 {
    let run = boot("e820", &["--memory", memory]);
    let out = run.ok();
    let entries: Vec<(u64, u64, u32)> = lines_after(out, "e820: ")
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "{l:?}");
            (hex(f[0]), hex(f[1]), f[2].parse().unwrap())
        })
        .collect();
    assert!(!entries.is_empty(), "no E820 entries:\n{out}");
    let total = line_after(out, "e820 ram total: ").parse().unwrap();
    let highest = hex(line_after(out, "e820 highest: "));
    // The guest's own sum must agree with the entries it printed.
    let ram: Vec<_> = entries.iter().filter(|e| e.2 == 1).collect();
    assert_eq!(total, ram.iter().map(|e| e.1).sum::<u64>());
    // Sorted, no overlaps.
    for w in entries.windows(2) {
        assert!(
            w[0].0 + w[0].1 <= w[1].0,
            "overlap or disorder: {entries:x?}"
        );
    }
    E820 {
        entries,
        total,
        highest,
    }
}

fn assert_ram(memory: &str, bytes: u64) -> E820 {
    let map = e820(memory);
    assert_eq!(
        map.total,
        bytes - E820_RESERVED_BELOW_1M,
        "--memory {memory}: {:x?}",
        map.entries
    );
    // The kernel loads at 1 MiB: that must be RAM.
    assert!(
        map.entries
            .iter()
            .any(|&(a, s, t)| t == 1 && a <= 0x10_0000 && a + s > 0x10_0000),
        "{:x?}",
        map.entries
    );
    map
}

#[test]
fn e820_128m() {
    let map = assert_ram("128M", 128 << 20);
    assert_eq!(map.highest, 128 << 20);
}

#[test]
fn e820_512m() {
    let map = assert_ram("512M", 512 << 20);
    assert_eq!(map.highest, 512 << 20);
}

#[test]
fn e820_4g_skips_the_mmio_hole() {
    let map = assert_ram("4G", 4 << 30);
    assert_eq!(map.highest, 0x1_4000_0000);
    for &(a, s, t) in &map.entries {
        if t == 1 {
            assert!(
                a + s <= 0xc000_0000 || a >= 0x1_0000_0000,
                "RAM in the MMIO hole: {a:#x}+{s:#x}"
            );
        }
    }
}

fn tables(cpus: u32) {
    let n = cpus.to_string();
    let run = boot("tables", &["--cpus", &n]);
    let out = run.ok();
    assert_eq!(line_after(out, "mptable cpus: "), n, "{out}");
    assert_eq!(line_after(out, "madt cpus: "), n, "{out}");
    assert!(out.lines().any(|l| l == "acpi checksums: ok"), "{out}");
    assert!(out.lines().any(|l| l == "fadt: hw-reduced"), "{out}");
    let tables = line_after(out, "acpi tables: ");
    for sig in ["XSDT", "FACP", "APIC", "DSDT"] {
        assert!(tables.split(' ').any(|t| t == sig), "no {sig}: {tables}");
    }
}

#[test]
fn tables_1_cpu() {
    tables(1);
}

#[test]
fn tables_2_cpus() {
    tables(2);
}

#[test]
fn tables_4_cpus() {
    tables(4);
}

#[test]
fn pvh_start_info() {
    let run = boot(
        "pvh",
        &[
            "--cmdline",
            "console=ttyS0 ember.word=quince",
            "--memory",
            "256M",
        ],
    );
    let out = run.ok();
    assert!(out.lines().any(|l| l == "pvh: magic ok"), "{out}");
    let cmdline = line_after(out, "pvh: cmdline ");
    assert!(
        cmdline.starts_with("console=ttyS0 ember.word=quince"),
        "{cmdline:?}"
    );
    let entries: u32 = line_after(out, "pvh: memmap entries ").parse().unwrap();
    assert!(entries > 0, "{out}");
    // The PVH memory map describes the same RAM as the E820 map.
    let map = lines_after(out, "pvh: memmap 0x");
    assert_eq!(map.len(), entries as usize, "{out}");
    let ram: u64 = map
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f[2] == "1")
        .map(|f| hex(f[1]))
        .sum();
    assert_eq!(ram, (256 << 20) - E820_RESERVED_BELOW_1M, "{out}");
    assert_eq!(line_after(out, "pvh: rsdp "), "yes", "{out}");
}

#[test]
fn serial_to_file_not_stdout() {
    let path = scratch("serial.log");
    let arg = format!("file={}", path.display());
    let run = boot("hello", &["--serial", &arg]);
    let out = run.ok();
    assert!(
        !out.contains("ember-guest"),
        "guest output on stdout:\n{out}"
    );
    let log = std::fs::read_to_string(&path).unwrap();
    assert_eq!(log.lines().next(), Some("ember-guest: ready"), "{log}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn serial_null_prints_nothing_of_the_guest() {
    let run = boot("hello", &["--serial", "null"]);
    let out = run.ok();
    assert!(!out.contains("ember-guest"), "{out}");
    assert!(!out.contains("exit:"), "{out}");
}

/// Reads stdout lines into a channel so the test can wait for one with a deadline.
fn line_reader(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(rx: &mpsc::Receiver<String>, want: &str, until: Instant, seen: &mut Vec<String>) {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = l.trim_end_matches('\r') == want;
                seen.push(l);
                if hit {
                    return;
                }
            }
            Err(_) => panic!("no {want:?} line; guest printed:\n{}", seen.join("\n")),
        }
    }
}

/// Kills Ember if the test fails while the guest still runs, so no VM outlives its test.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The echo guest under Ember with piped stdin and stdout: the running Ember (killed if the test
/// fails), its console lines as they come, and its stdin.
fn spawn_echo() -> (
    KillOnDrop,
    std::sync::mpsc::Receiver<String>,
    std::process::ChildStdin,
) {
    common::kvm_kind();
    let kernel = common::guest("echo");
    let mut child = KillOnDrop(
        Command::new(common::ember())
            .args(["run", "--kernel", kernel.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let rx = line_reader(child.0.stdout.take().unwrap());
    let stdin = child.0.stdin.take().unwrap();
    (child, rx, stdin)
}

#[test]
fn echo_stdin_reaches_the_guest_line_by_line() {
    let (mut child, rx, mut stdin) = spawn_echo();
    let until = Instant::now() + DEADLINE;
    let mut seen = Vec::new();

    // Each line is sent only after the guest has answered the previous one, so the bytes cross
    // the UART while the guest is polling it, as a person typing would.
    wait_line(&rx, "echo: ready", until, &mut seen);
    stdin.write_all(b"marmalade on toast\n").unwrap();
    wait_line(&rx, "echo: marmalade on toast", until, &mut seen);
    stdin.write_all(b"second line\n").unwrap();
    wait_line(&rx, "echo: second line", until, &mut seen);
    stdin.write_all(b"quit\n").unwrap();
    wait_line(&rx, "echo: quit", until, &mut seen);

    let left = until.saturating_duration_since(Instant::now());
    let status = common::wait_deadline(&mut child.0, left)
        .unwrap_or_else(|| panic!("ember did not exit after quit:\n{}", seen.join("\n")));
    assert!(status.success(), "{status:?}\n{}", seen.join("\n"));
}

/// `rep outsb` to the UART: every byte of the string reaches the console (it was once dropped,
/// as a multi-byte write the UART did not take).
#[test]
fn a_string_out_to_the_uart_reaches_the_console_whole() {
    let run = boot("outsb", &[]);
    let out = run.ok();
    assert!(
        out.contains("outsb: this line came in one rep outsb\n") && out.contains("outsb: done"),
        "{out}"
    );
}

/// A 4 KiB line written at once (a paste) reaches the guest whole without waiting for more
/// input: stdin stays open and nothing else is written until the guest has echoed it. Ember once
/// read stdin through std's buffer, which epoll cannot see, and the rest of such a line waited for
/// the next write.
#[test]
fn a_pasted_4k_line_reaches_the_guest_whole_and_at_once() {
    let (mut child, rx, mut stdin) = spawn_echo();
    let until = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    wait_line(&rx, "echo: ready", until, &mut seen);
    let line: String = (0..4096u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let sent = Instant::now();
    stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
    wait_line(&rx, &format!("echo: {line}"), until, &mut seen);
    eprintln!("a 4 KiB line came back after {:?}", sent.elapsed());
    stdin.write_all(b"quit\n").unwrap();
    wait_line(&rx, "echo: quit", until, &mut seen);
    let left = until.saturating_duration_since(Instant::now());
    let status = common::wait_deadline(&mut child.0, left).expect("ember exits after quit");
    assert!(status.success(), "{status:?}");
}

#[test]
fn echo_piped_stdin_all_at_once() {
    common::kvm_kind();
    let kernel = common::guest("echo");
    let run = common::run_ember(
        &["run", "--kernel", kernel.to_str().unwrap()],
        b"one\ntwo three\nquit\n",
        DEADLINE,
    );
    let out = run.ok();
    assert_eq!(
        lines_after(out, "echo: "),
        ["ready", "one", "two three", "quit"],
        "{out}"
    );
}

/// Boots the null guest with `exit={how}` and checks Ember's status: 0 for a clean exit, or the
/// documented status for a crash.
fn exit_by_with(how: &str, code: i32) -> Run {
    let cmdline = format!("console=ttyS0 exit={how}");
    let run = boot_with_deadline("hello", &["--cmdline", &cmdline], EXIT_DEADLINE);
    eprintln!("exit={how}: ember ended after {:?}", run.elapsed);
    assert_eq!(
        run.status.code(),
        Some(code),
        "exit={how}\nstdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    let out = run.stdout.as_str();
    assert_eq!(out.lines().next(), Some("ember-guest: ready"), "{out}");
    // The guest says so when the VMM ignored its request or it could not make one.
    assert!(!out.contains("ignored"), "{out}");
    assert!(!out.contains("failed"), "{out}");
    assert!(!run.stderr.contains("panicked at"), "{}", run.stderr);
    run
}

fn exit_by(how: &str) -> Run {
    exit_by_with(how, 0)
}

#[test]
fn exit_i8042_reset() {
    let run = exit_by("i8042");
    assert!(run.stdout.contains("exit: i8042 reset"), "{}", run.stdout);
}

/// A triple fault is a crash, not a reboot: status 4, said on stderr.
#[test]
fn exit_triple_fault() {
    let run = exit_by_with("triple", 4);
    assert!(run.stdout.contains("exit: triple fault"), "{}", run.stdout);
    assert!(run.stderr.contains("triple-faulted"), "{}", run.stderr);
}

/// A guest kernel that reports a panic through the pvpanic device: status 3, said on stderr.
#[test]
fn exit_pvpanic_is_a_guest_panic() {
    let run = exit_by_with("pvpanic", 3);
    assert!(
        run.stdout.contains("exit: pvpanic capability 0x3"),
        "the device offers panicked and crash-loaded: {}",
        run.stdout
    );
    assert!(
        run.stderr.contains("guest kernel panicked"),
        "{}",
        run.stderr
    );
}

#[test]
fn exit_acpi_poweroff() {
    let run = exit_by("acpi");
    let line = line_after(&run.stdout, "exit: acpi poweroff ");
    // The FADT's sleep register is Ember's port, written with SLP_TYP from the DSDT's \_S5_.
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.len(), 4, "{line}");
    assert_eq!(f[0], "io", "{line}");
    assert_eq!(
        hex(f[1]),
        u64::from(layout::ACPI_SLEEP_CONTROL_PORT),
        "{line}"
    );
    assert_eq!(
        hex(f[3]),
        (u64::from(layout::ACPI_S5_SLP_TYP) << 2) | 0x20,
        "{line}"
    );
}

//! Ember's minimal microVM kernel (scripts/microvm-kernel.sh: tinyconfig + scripts/microvm.config)
//! booted as an ELF vmlinux (PVH entry) and as a bzImage (64-bit entry, LZ4 payload unpacked by
//! the guest). Every KVM: the kernel's banner and our command line (with a marker word) must
//! come out on the serial console, and with no `--cmdline` at all the kit's initramfs reaches
//! userspace and the guest's `reboot -f` ends Ember with status 0 (kernels.rs tests the rest of
//! userspace on this kernel).

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::{self, kit_file, microvm_kernel};

/// On kvm_pvm the banner comes in about a second, `Memory:` within a minute; leave room for a
/// loaded machine.
const DEADLINE: Duration = Duration::from_secs(180);

/// Two kernel boots at once on a 2-core machine only slow both down.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs Ember with `args` until a console line contains each of `needles` (in any order; each
/// needle list must match within one line), Ember exits, or the deadline passes. Returns the
/// console lines with their arrival times, and Ember's exit status if it exited by itself.
fn watch(
    args: &[&str],
    needles: &[&[&str]],
) -> (Vec<(Duration, String)>, Option<std::process::ExitStatus>) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let start = Instant::now();
    let mut child = Command::new(common::ember())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ember");
    let rx = common::console_lines(&mut child, start);
    let mut lines = Vec::new();
    let mut seen = vec![false; needles.len()];
    let mut status = None;
    while !seen.iter().all(|s| *s) {
        let left = DEADLINE.saturating_sub(start.elapsed());
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok((t, line)) => {
                for (n, s) in needles.iter().zip(seen.iter_mut()) {
                    *s |= n.iter().all(|w| line.contains(w));
                }
                lines.push((t, line));
            }
            Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                status =
                    common::wait_deadline(&mut child, DEADLINE.saturating_sub(start.elapsed()));
                break;
            }
        }
    }
    if status.is_none() {
        common::stop(&mut child);
    }
    // Reaps a killed Ember; for one that exited, returns the status wait_deadline already got.
    let _ = child.wait();
    (lines, status)
}

fn transcript(lines: &[(Duration, String)]) -> String {
    lines
        .iter()
        .map(|(t, l)| format!("[{:7.2}] {l}\n", t.as_secs_f64()))
        .collect()
}

fn boots_to_banner(file: &str, marker: &str) {
    let kernel = microvm_kernel(file);
    let cmdline =
        format!("console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 pci=off {marker}");
    let (lines, status) = watch(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            &cmdline,
        ],
        &[&["Linux version"], &["Command line:", marker]],
    );
    let find = |needles: &[&str]| {
        lines
            .iter()
            .find(|(_, l)| needles.iter().all(|n| l.contains(n)))
            .map(|(t, l)| (*t, l.clone()))
    };
    let banner = find(&["Linux version"]);
    let cmd = find(&["Command line:"]);
    let (Some((tb, banner)), Some((tc, cmd))) = (banner, cmd) else {
        panic!(
            "{file}: no banner and command line within {DEADLINE:?} (ember {status:?})\n{}",
            transcript(&lines)
        );
    };
    eprintln!(
        "{file}: banner after {:.2} s, command line after {:.2} s",
        tb.as_secs_f64(),
        tc.as_secs_f64()
    );
    // The banner is the kernel this script built, not some other one.
    let version = std::fs::read_to_string(microvm_kernel("version")).unwrap();
    assert!(
        banner.contains(&format!("Linux version {}", version.trim())),
        "{banner}"
    );
    assert!(
        cmd.contains(marker),
        "our command line did not reach the kernel: {cmd}"
    );
    assert!(cmd.contains("console=ttyS0"), "{cmd}");
}

#[test]
fn microvm_vmlinux_boots_to_its_banner() {
    boots_to_banner("vmlinux", "ember.test=microvm-vmlinux");
}

#[test]
fn microvm_bzimage_boots_to_its_banner() {
    boots_to_banner("bzImage", "ember.test=microvm-bzimage");
}

/// What a user on any host types: no `--cmdline` at all. Ember's default command line and the
/// words the host needs (on kvm_pvm: the TSC frequency, noxsave, ...) bring the microVM kernel to
/// the initramfs, which sees the default 1 vCPU and 128 MiB, and its `reboot -f` ends Ember with 0.
#[test]
fn microvm_kernel_reaches_userspace_with_no_cmdline_and_reboots() {
    const TEST: &str = "microvm_kernel_reaches_userspace_with_no_cmdline_and_reboots";
    let kernel = microvm_kernel("vmlinux");
    let initramfs = kit_file("initramfs-reboot.cpio");
    let (lines, status) = watch(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initramfs.to_str().unwrap(),
        ],
        // Never all seen: we wait for Ember to exit after the guest's reboot.
        &[&["ember-kit: ready"], &["never printed by the guest"]],
    );
    let find = |needle: &str| lines.iter().find(|(_, l)| l.contains(needle));
    assert!(
        find("ember-kit: ready").is_some(),
        "{TEST}: no ready line\n{}",
        transcript(&lines)
    );
    assert!(
        find("ember-kit: cpus 1").is_some(),
        "{TEST}: want 1 CPU\n{}",
        transcript(&lines)
    );
    let mem = find("ember-kit: memtotal").map_or("", |(_, l)| l.as_str());
    crate::kernels::assert_memtotal(TEST, &transcript(&lines), mem, 128);
    if let Some((t, _)) = find("ember-kit: ready") {
        eprintln!("{TEST}: ready line after {:.2} s", t.as_secs_f64());
    }
    let status =
        status.unwrap_or_else(|| panic!("{TEST}: ember did not exit\n{}", transcript(&lines)));
    assert!(
        status.success(),
        "{TEST}: {status:?}\n{}",
        transcript(&lines)
    );
}

/// A guest kernel panic is a crash, not a reboot: with no initramfs and no disk the microVM
/// kernel cannot mount a root filesystem and panics; its pvpanic driver (bound to the DSDT's
/// `QEMU0001`) tells Ember, which exits with status 3 before `panic=1` would reboot it.
#[test]
fn microvm_kernel_panic_ends_ember_with_status_3() {
    const TEST: &str = "microvm_kernel_panic_ends_ember_with_status_3";
    let kernel = microvm_kernel("vmlinux");
    let (lines, status) = watch(
        &["run", "--kernel", kernel.to_str().unwrap()],
        &[&["never printed by the guest"]],
    );
    assert!(
        lines.iter().any(|(_, l)| l.contains("Kernel panic")),
        "{TEST}: no panic\n{}",
        transcript(&lines)
    );
    let status =
        status.unwrap_or_else(|| panic!("{TEST}: ember did not exit\n{}", transcript(&lines)));
    assert_eq!(
        status.code(),
        Some(3),
        "{TEST}: {status:?}\n{}",
        transcript(&lines)
    );
}

//! virtio-blk end to end: the `blk` test guest (tests/guests/blk.c) drives Ember's virtio-mmio
//! block device by polling, and the host checks what it read against the image, and what it wrote
//! in the image after Ember is gone. Also the user errors a `--disk` can produce.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::{self, Run};

/// These guests finish in well under a second; only a hang reaches this.
const DEADLINE: Duration = Duration::from_secs(60);
const SECTORS: u64 = 128;
/// What the guest reads and checksums: its first READ_SECTORS sectors.
const READ_BYTES: usize = 16 * 512;

/// A fresh image in the test's scratch directory, filled with bytes that differ per image.
fn image(name: &str, sectors: u64, seed: u64) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("blk-scratch");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}-{name}.img", std::process::id()));
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let bytes: Vec<u8> = (0..sectors * 512)
        .map(|_| {
            // xorshift64: cheap bytes that no two sectors share.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What the guest's rw mode writes to the last sector (write_pattern() in blk.c).
fn write_pattern() -> Vec<u8> {
    let mut p: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
    let marker = b"ember blk write\n";
    p[..marker.len()].copy_from_slice(marker);
    p
}

fn disk_arg(path: &Path, extra: &str) -> String {
    format!("path={}{extra}", path.display())
}

fn run_blk(mode: &str, disks: &[String], more_cmdline: &str) -> Run {
    common::kvm_kind();
    let kernel = common::guest("blk");
    let cmdline = format!("console=ttyS0 blk.mode={mode} {more_cmdline}");
    let mut args = vec![
        "run".to_string(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--cmdline".into(),
        cmdline,
    ];
    for d in disks {
        args.push("--disk".into());
        args.push(d.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = common::run_ember(&args, b"", DEADLINE);
    eprintln!(
        "ember {}: {:?}, {:?}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        run.status,
        run.elapsed,
        run.stdout,
        run.stderr
    );
    run
}

/// The guest's `blk: ` lines, prefix removed.
fn blk_lines(out: &str) -> Vec<&str> {
    out.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("blk: "))
        .collect()
}

fn line_value<'a>(out: &'a str, key: &str) -> &'a str {
    let found: Vec<&str> = blk_lines(out)
        .into_iter()
        .filter_map(|l| l.strip_prefix(key))
        .collect();
    assert_eq!(found.len(), 1, "one `blk: {key}` line expected:\n{out}");
    found[0]
}

fn checksum_of(out: &str) -> u64 {
    let v = line_value(out, "checksum ");
    u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
}

fn assert_no_guest_error(out: &str) {
    assert!(
        !blk_lines(out).iter().any(|l| l.starts_with("error")),
        "the guest driver failed:\n{out}"
    );
    assert!(
        blk_lines(out).contains(&"done"),
        "the guest did not finish:\n{out}"
    );
}

#[test]
fn blk_read_checksum_matches_and_the_flushed_write_is_in_the_image() {
    let img = image("rw", SECTORS, 1);
    let before = std::fs::read(&img).unwrap();
    let run = run_blk("rw", &[disk_arg(&img, "")], "");
    let out = run.ok();
    assert_no_guest_error(out);
    assert_eq!(line_value(out, "capacity "), SECTORS.to_string());
    assert_eq!(
        line_value(out, "read status "),
        format!("0 len {}", READ_BYTES + 1)
    );
    assert_eq!(checksum_of(out), fnv1a(&before[..READ_BYTES]));
    // GET_ID defaults to the image's file name (at most 20 bytes).
    let name = img.file_name().unwrap().to_str().unwrap();
    assert_eq!(line_value(out, "id "), &name[..name.len().min(20)]);
    for l in ["write ok", "flush ok", "readback ok"] {
        assert!(blk_lines(out).contains(&l), "no `blk: {l}`:\n{out}");
    }

    let after = std::fs::read(&img).unwrap();
    let last = after.len() - 512;
    assert_eq!(after.len(), before.len());
    assert_eq!(after[last..], write_pattern()[..], "the written sector");
    assert_eq!(after[..last], before[..last], "other sectors changed");
}

#[test]
fn blk_read_only_disk_refuses_the_write_and_keeps_its_bytes() {
    let img = image("ro", SECTORS, 2);
    let before = std::fs::read(&img).unwrap();
    let mtime = std::fs::metadata(&img).unwrap().modified().unwrap();
    let run = run_blk("ro", &[disk_arg(&img, ",readonly=on")], "");
    let out = run.ok();
    assert_no_guest_error(out);
    assert_eq!(checksum_of(out), fnv1a(&before[..READ_BYTES]));
    // VIRTIO_BLK_S_IOERR, and VIRTIO_BLK_F_RO (bit 5) among the features the driver accepted.
    assert_eq!(line_value(out, "write status "), "1");
    let features =
        u64::from_str_radix(line_value(out, "features ").trim_start_matches("0x"), 16).unwrap();
    assert_ne!(features & (1 << 5), 0, "VIRTIO_BLK_F_RO not offered");
    // Byte for byte (stronger than comparing digests), and not even touched.
    assert_eq!(std::fs::read(&img).unwrap(), before);
    assert_eq!(std::fs::metadata(&img).unwrap().modified().unwrap(), mtime);
}

#[test]
fn blk_hostile_chains_get_errors_and_ember_keeps_serving() {
    let img = image("hostile", SECTORS, 3);
    let before = std::fs::read(&img).unwrap();
    let run = run_blk("hostile", &[disk_arg(&img, "")], "");
    let out = run.ok();
    assert_no_guest_error(out);
    // 1 = VIRTIO_BLK_S_IOERR, 2 = UNSUPP; 255 = the chain came back without a status byte
    // written (there was nowhere to write one) and no data moved.
    let want = [
        ("outside-ram", "1 len 1"),
        ("writable-header", "1 len 1"),
        ("readonly-status", "255 len 0"),
        ("readonly-in-buffer", "1 len 1"),
        ("short-header", "1 len 1"),
        ("empty-status", "255 len 0"),
        ("absurd-length", "1 len 1"),
        ("past-end", "1 len 1"),
        ("unaligned-length", "1 len 1"),
        ("unknown-type", "2 len 1"),
        ("loop", "255 len 0"),
        ("bad-next", "255 len 0"),
    ];
    for (name, status) in want {
        assert_eq!(
            line_value(out, &format!("hostile {name} status ")),
            status,
            "{name}"
        );
    }
    // The valid request after all of them.
    assert_eq!(
        line_value(out, "valid-read status "),
        format!("0 len {}", READ_BYTES + 1)
    );
    assert_eq!(checksum_of(out), fnv1a(&before[..READ_BYTES]));
    assert_eq!(std::fs::read(&img).unwrap(), before);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

#[test]
fn blk_second_disk_is_the_second_slot() {
    let a = image("vda", SECTORS, 4);
    let b = image("vdb", 2 * SECTORS, 5);
    let b_bytes = std::fs::read(&b).unwrap();
    let run = run_blk(
        "ro",
        &[
            disk_arg(&a, ""),
            disk_arg(&b, ",readonly=on,id=second-disk"),
        ],
        "blk.dev=1",
    );
    let out = run.ok();
    assert_no_guest_error(out);
    assert_eq!(line_value(out, "capacity "), (2 * SECTORS).to_string());
    assert_eq!(line_value(out, "id "), "second-disk");
    assert_eq!(checksum_of(out), fnv1a(&b_bytes[..READ_BYTES]));
    assert_eq!(
        line_value(out, "write status "),
        "1",
        "vdb is the read-only one"
    );
}

/// Lines of a running Ember's stdout, as they come.
fn line_reader(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for(rx: &mpsc::Receiver<String>, want: &str, seen: &mut Vec<String>) {
    let until = Instant::now() + DEADLINE;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(want);
                seen.push(line);
                if hit {
                    return;
                }
            }
            Err(_) => panic!(
                "no {want:?} from the guest; it printed:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// Kills a running Ember when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_ember(kernel: &Path, cmdline: &str, disk: &str) -> Running {
    let child = Command::new(common::ember())
        .args(["run", "--kernel"])
        .arg(kernel)
        .args(["--cmdline", cmdline, "--disk", disk])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Running(child)
}

#[test]
fn blk_flushed_write_survives_kill_9() {
    let img = image("kill9", SECTORS, 6);
    let kernel = common::guest("blk");
    let mut ember = spawn_ember(&kernel, "console=ttyS0 blk.mode=rw", &disk_arg(&img, ""));
    let rx = line_reader(&mut ember.0);
    let mut seen = Vec::new();
    wait_for(&rx, "blk: flush ok", &mut seen);
    // SIGKILL: no destructors, no exit path; only what reached the file before counts.
    ember.0.kill().unwrap();
    ember.0.wait().unwrap();
    let mut last = vec![0u8; 512];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut last, (SECTORS - 1) * 512)
        .unwrap();
    assert_eq!(last, write_pattern());
}

/// Starts the echo guest holding `disk`; returns once the guest runs (the disk is open by then).
fn hold_disk(disk: &str) -> (Running, mpsc::Receiver<String>) {
    let kernel = common::guest("echo");
    let mut ember = spawn_ember(&kernel, "console=ttyS0", disk);
    let rx = line_reader(&mut ember.0);
    wait_for(&rx, "echo: ready", &mut Vec::new());
    (ember, rx)
}

fn release(mut held: Running) {
    let mut stdin = held.0.stdin.take().unwrap();
    stdin.write_all(b"quit\n").unwrap();
    drop(stdin);
    let status = common::wait_deadline(&mut held.0, DEADLINE).expect("holder did not exit");
    assert!(status.success(), "the first ember failed: {status:?}");
}

#[test]
fn blk_disk_in_use_read_write_is_refused_with_a_lock_error() {
    let img = image("locked", SECTORS, 7);
    let (held, _rx) = hold_disk(&disk_arg(&img, ""));
    for extra in ["", ",readonly=on"] {
        let run = run_blk("ro", &[disk_arg(&img, extra)], "");
        let line = run.user_error();
        assert!(line.contains("in use by another process"), "{line}");
        assert!(line.contains(&img.display().to_string()), "{line}");
    }
    release(held);
    // Free again once the first VM is gone.
    run_blk("ro", &[disk_arg(&img, ",readonly=on")], "").ok();
}

#[test]
fn blk_read_only_disk_can_be_shared() {
    let img = image("shared", SECTORS, 8);
    let before = std::fs::read(&img).unwrap();
    let (held, _rx) = hold_disk(&disk_arg(&img, ",readonly=on"));
    let run = run_blk("ro", &[disk_arg(&img, ",readonly=on")], "");
    assert_eq!(checksum_of(run.ok()), fnv1a(&before[..READ_BYTES]));
    // A writer is still kept out while a reader holds it.
    let line = run_blk("rw", &[disk_arg(&img, "")], "")
        .user_error()
        .to_string();
    assert!(line.contains("in use by another process"), "{line}");
    release(held);
}

#[test]
fn blk_size_not_a_multiple_of_512_is_a_clear_error() {
    let img = image("odd", SECTORS, 9);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(SECTORS * 512 + 100)
        .unwrap();
    let run = run_blk("rw", &[disk_arg(&img, "")], "");
    let line = run.user_error();
    assert!(line.contains(&img.display().to_string()), "{line}");
    assert!(line.contains("multiple of 512"), "{line}");
    assert!(
        run.stdout.is_empty(),
        "the guest must not have run:\n{}",
        run.stdout
    );
}

#[test]
fn blk_missing_disk_is_a_clear_error() {
    let img = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("blk-no-such-disk.img");
    let run = run_blk("rw", &[disk_arg(&img, "")], "");
    let line = run.user_error();
    assert!(line.contains(&img.display().to_string()), "{line}");
    assert!(!img.exists(), "ember created the missing image");
}

//! virtio-blk end to end: the `blk` test guest (tests/guests/blk.c) drives Ember's virtio-mmio
//! block device by polling, and the host checks what it read against the image, and what it wrote
//! in the image after Ember is gone. Also the user errors a `--disk` can produce, and copy-on-write
//! disks (`overlay=`): what the guest reads and writes, what the base and overlay files hold.

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
    tagged_pattern(0)
}

/// What the rw mode writes with `blk.tag=TAG`.
fn tagged_pattern(tag: u32) -> Vec<u8> {
    let mut p: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3 + tag) as u8).collect();
    let marker = b"ember blk write\n";
    p[..marker.len()].copy_from_slice(marker);
    p
}

fn disk_arg(path: &Path, extra: &str) -> String {
    format!("path={}{extra}", path.display())
}

fn run_blk(mode: &str, disks: &[String], more_cmdline: &str) -> Run {
    run_blk_env(mode, disks, more_cmdline, &[])
}

fn run_blk_env(mode: &str, disks: &[String], more_cmdline: &str, env: &[(&str, &Path)]) -> Run {
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
    let mut cmd = Command::new(common::ember());
    cmd.args(&args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let run = common::run_command(cmd, b"", DEADLINE);
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

// ---- copy-on-write disks ------------------------------------------------------------------

/// A path in the scratch directory for an overlay (or anything else), nothing there yet.
fn scratch_file(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("blk-scratch");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

fn overlay_arg(base: &Path, overlay: &Path) -> String {
    format!("path={},overlay={}", base.display(), overlay.display())
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `base` with each (sector, tag) written by the rw mode.
fn with_writes(base: &[u8], writes: &[(u64, u32)]) -> Vec<u8> {
    let mut v = base.to_vec();
    for &(sector, tag) in writes {
        let at = sector as usize * 512;
        v[at..at + 512].copy_from_slice(&tagged_pattern(tag));
    }
    v
}

/// The guest's rw mode over `disk`, writing `sector` with `tag`; checks it wrote, flushed and
/// read back, and returns the checksum of what it read (before writing).
fn rw_run(disk: &str, sector: u64, tag: u32) -> u64 {
    let run = run_blk(
        "rw",
        &[disk.to_string()],
        &format!("blk.sector={sector} blk.tag={tag}"),
    );
    let out = run.ok();
    assert_no_guest_error(out);
    for l in ["write ok", "flush ok", "readback ok"] {
        assert!(blk_lines(out).contains(&l), "no `blk: {l}`:\n{out}");
    }
    assert_eq!(line_value(out, "capacity "), SECTORS.to_string());
    checksum_of(out)
}

/// The overlay's bytes for disk sector `sector`, where its header says its data starts.
fn overlay_sector(overlay: &Path, sector: u64) -> Vec<u8> {
    let f = std::fs::File::open(overlay).unwrap();
    let mut header = [0u8; 48];
    f.read_exact_at(&mut header, 0).unwrap();
    assert_eq!(
        &header[..8],
        b"EMBEROVL",
        "{} is an overlay",
        overlay.display()
    );
    let data_offset = u64::from_le_bytes(header[40..48].try_into().unwrap());
    let mut v = vec![0u8; 512];
    f.read_exact_at(&mut v, data_offset + sector * 512).unwrap();
    v
}

#[test]
fn blk_overlay_takes_the_writes_and_the_base_never_changes() {
    let base = image("ov-base", SECTORS, 11);
    let before = std::fs::read(&base).unwrap();
    let (sha, mtime) = (
        sha256(&base),
        std::fs::metadata(&base).unwrap().modified().unwrap(),
    );
    let ov = scratch_file("ov-one.ovl");
    let disk = overlay_arg(&base, &ov);

    // A sector inside the first 4 KiB block: the rest of the block is copied up from the base.
    assert_eq!(rw_run(&disk, 3, 1), fnv1a(&before[..READ_BYTES]));
    assert_eq!(overlay_sector(&ov, 3), tagged_pattern(1));
    // A second run over the same overlay reads the first run's write, and the base around it.
    let first = with_writes(&before, &[(3, 1)]);
    assert_eq!(rw_run(&disk, 5, 2), fnv1a(&first[..READ_BYTES]));
    assert_eq!(overlay_sector(&ov, 5), tagged_pattern(2));
    let both = with_writes(&before, &[(3, 1), (5, 2)]);
    assert_eq!(rw_run(&disk, SECTORS - 1, 3), fnv1a(&both[..READ_BYTES]));

    assert_eq!(sha256(&base), sha, "the base's sha256 changed");
    assert_eq!(std::fs::read(&base).unwrap(), before);
    assert_eq!(std::fs::metadata(&base).unwrap().modified().unwrap(), mtime);
    let _ = std::fs::remove_file(&ov);
}

#[test]
fn blk_two_overlays_over_one_base_see_only_their_own_writes() {
    let base = image("ov-shared", SECTORS, 12);
    let before = std::fs::read(&base).unwrap();
    let sha = sha256(&base);
    let (a, b, h) = (
        scratch_file("ov-a.ovl"),
        scratch_file("ov-b.ovl"),
        scratch_file("ov-held.ovl"),
    );
    // A third VM holds the base (shared) all along.
    let (held, _rx) = hold_disk(&overlay_arg(&base, &h));
    // Two VMs at once, each writing its own bytes to the same sector.
    let (da, db) = (overlay_arg(&base, &a), overlay_arg(&base, &b));
    std::thread::scope(|s| {
        let ta = s.spawn(|| rw_run(&da, 3, 1));
        let tb = s.spawn(|| rw_run(&db, 3, 2));
        let want = fnv1a(&before[..READ_BYTES]);
        assert_eq!(ta.join().unwrap(), want);
        assert_eq!(tb.join().unwrap(), want);
    });
    // A disk that would write the base is kept out while overlays share it.
    let line = run_blk("ro", &[disk_arg(&base, "")], "")
        .user_error()
        .to_string();
    assert!(line.contains("in use by another process"), "{line}");
    release(held);

    for (disk, tag) in [(&da, 1), (&db, 2)] {
        let mine = with_writes(&before, &[(3, tag)]);
        assert_eq!(
            rw_run(disk, 9, tag),
            fnv1a(&mine[..READ_BYTES]),
            "tag {tag}"
        );
    }
    assert_eq!(sha256(&base), sha, "the base's sha256 changed");
    assert_eq!(std::fs::read(&base).unwrap(), before);
    for p in [a, b, h] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn blk_overlay_flushed_write_survives_kill_9() {
    let base = image("ov-kill9", SECTORS, 13);
    let before = std::fs::read(&base).unwrap();
    let ov = scratch_file("ov-kill9.ovl");
    let disk = overlay_arg(&base, &ov);
    let kernel = common::guest("blk");
    let mut ember = spawn_ember(
        &kernel,
        "console=ttyS0 blk.mode=rw blk.sector=3 blk.tag=4",
        &disk,
    );
    let rx = line_reader(&mut ember.0);
    wait_for(&rx, "blk: flush ok", &mut Vec::new());
    ember.0.kill().unwrap();
    ember.0.wait().unwrap();
    drop(ember);
    let flushed = with_writes(&before, &[(3, 4)]);
    assert_eq!(rw_run(&disk, 5, 5), fnv1a(&flushed[..READ_BYTES]));
    assert_eq!(std::fs::read(&base).unwrap(), before);
    let _ = std::fs::remove_file(&ov);
}

#[test]
fn blk_overlay_tmp_leaves_nothing_behind() {
    let base = image("ov-tmp", SECTORS, 14);
    let before = std::fs::read(&base).unwrap();
    let tmpdir = scratch_file("tmpdir");
    let _ = std::fs::remove_dir_all(&tmpdir);
    std::fs::create_dir_all(&tmpdir).unwrap();
    let disk = format!("path={},overlay=tmp", base.display());
    for sector in [3, 5] {
        let run = run_blk_env(
            "rw",
            std::slice::from_ref(&disk),
            &format!("blk.sector={sector} blk.tag=6"),
            &[("TMPDIR", &tmpdir)],
        );
        let out = run.ok();
        assert_no_guest_error(out);
        assert!(blk_lines(out).contains(&"readback ok"), "{out}");
        // Each run starts from the base: the last one's write went with it.
        assert_eq!(checksum_of(out), fnv1a(&before[..READ_BYTES]));
        let left: Vec<_> = std::fs::read_dir(&tmpdir).unwrap().flatten().collect();
        assert!(left.is_empty(), "left in $TMPDIR: {left:?}");
    }
    assert_eq!(std::fs::read(&base).unwrap(), before);
    let _ = std::fs::remove_dir_all(&tmpdir);
}

#[test]
fn blk_overlay_user_errors_are_one_line_each() {
    let base = image("ov-errors", SECTORS, 15);
    let ov = scratch_file("ov-errors.ovl");
    let refused = |disk: &str, want: &[&str]| {
        let run = run_blk("rw", &[disk.to_string()], "");
        let line = run.user_error().to_string();
        assert_eq!(run.status.code(), Some(1), "{line}");
        for w in want {
            assert!(line.contains(w), "no {w:?} in: {line}");
        }
        assert!(run.stdout.is_empty(), "the guest ran:\n{}", run.stdout);
    };

    let missing = scratch_file("ov-no-such-base.img");
    refused(
        &overlay_arg(&missing, &ov),
        &[&missing.display().to_string(), "No such file"],
    );
    assert!(!ov.exists(), "an overlay was made without a base");

    refused(
        &format!("{},readonly=on", overlay_arg(&base, &ov)),
        &["readonly=on", "overlay="],
    );
    assert!(!ov.exists());

    // Made over one base, given with another of the same size.
    rw_run(&overlay_arg(&base, &ov), 3, 7);
    let other = image("ov-other", SECTORS, 16);
    refused(
        &overlay_arg(&other, &ov),
        &[
            &ov.display().to_string(),
            &base.display().to_string(),
            "another base",
        ],
    );

    // In use by another Ember.
    let (held, _rx) = hold_disk(&overlay_arg(&base, &ov));
    refused(
        &overlay_arg(&base, &ov),
        &[&ov.display().to_string(), "in use by another process"],
    );
    release(held);

    let text = scratch_file("ov-notes.txt");
    std::fs::write(&text, "not an overlay\n".repeat(500)).unwrap();
    refused(
        &overlay_arg(&base, &text),
        &[&text.display().to_string(), "not an Ember overlay"],
    );
    assert_eq!(
        std::fs::read(&text).unwrap(),
        "not an overlay\n".repeat(500).as_bytes()
    );
    for p in [ov, text, other] {
        let _ = std::fs::remove_file(p);
    }
}

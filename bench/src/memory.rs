//! A VMM's own memory: its peak RSS minus the part of guest RAM the guest touched.
//!
//! A VMM's RSS includes every guest page that was touched (loaded kernel, page tables, boot
//! tables, the guest's own writes), which says nothing about the VMM. So the probe boots an
//! interactive guest, and once it is ready (the VMM stopped doing start-up work) reads
//! /proc/PID/smaps: the resident size of the guest RAM mapping (a booted guest's: the largest
//! anonymous mapping at least as large as the guest memory; a restored guest's: the mappings of
//! the snapshot's memory file) and the process's RssAnon / RssFile. Then the guest is told to
//! quit and the peak RSS (ru_maxrss) is read when it is reaped.
//! own = peak RSS - guest RAM resident. File-backed pages (the binary, libc) count as Ember's:
//! that is what a second VM would not share with anything but other Embers.

use std::path::Path;

use crate::trial::{self, Spec};

/// Probe results, KiB.
#[derive(Debug, Clone, Default)]
pub struct VmmMemory {
    pub peak_rss: u64,
    pub guest_rss: u64,
    pub own: u64,
    pub rss_anon: u64,
    pub rss_file: u64,
    /// Proportional set size at the ready line minus guest RAM resident: shared library pages
    /// count for their share only (the RSS figure counts them whole).
    pub own_pss: u64,
    /// The mapping found as guest RAM, for the report (size in KiB).
    pub guest_mapping_kib: u64,
    pub runs: usize,
}

/// One snapshot of /proc/PID.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub guest_rss: u64,
    /// The guest RAM mappings' PSS: a memory file's pages split among the processes mapping
    /// them; anonymous guest RAM is nobody else's, so there it is its RSS.
    pub guest_pss: u64,
    pub guest_mapping_kib: u64,
    pub rss_anon: u64,
    pub rss_file: u64,
    /// VmRSS: the whole resident set (anonymous, file and shared memory).
    pub rss: u64,
    pub pss: u64,
}

/// Where a VMM keeps guest RAM.
#[derive(Debug, Clone, Copy)]
pub enum GuestRam<'a> {
    /// Anonymous memory of at least this many bytes (a booted guest).
    Anonymous(u64),
    /// Private mappings of this file (a guest restored from a snapshot's memory file): pages the
    /// guest only read are the page cache's, pages it wrote its own, both counted.
    File(&'a Path),
}

/// Runs `spec` `runs` times (each writing `quit` to the guest console once ready) and keeps the
/// run with the median own memory.
pub fn probe(
    spec: &Spec,
    ram: GuestRam<'_>,
    quit: &[u8],
    runs: usize,
) -> Result<VmmMemory, String> {
    let mut results = Vec::new();
    for _ in 0..runs.max(1) {
        let mut snap: Option<Result<Snapshot, String>> = None;
        let mut hook = |pid: u32| {
            snap = Some(snapshot(pid, ram));
            quit.to_vec()
        };
        let t = trial::run_with_hook(spec, Some(&mut hook)).map_err(|e| e.to_string())?;
        if !t.ok() {
            return Err(t.failure());
        }
        let s = snap.ok_or("the ready line came only after the VMM exited")??;
        results.push(VmmMemory {
            peak_rss: t.max_rss_kib,
            guest_rss: s.guest_rss,
            own: t.max_rss_kib.saturating_sub(s.guest_rss),
            rss_anon: s.rss_anon,
            rss_file: s.rss_file,
            own_pss: s.pss.saturating_sub(s.guest_pss),
            guest_mapping_kib: s.guest_mapping_kib,
            runs: 0,
        });
    }
    let owns: Vec<f64> = results.iter().map(|r| r.own as f64).collect();
    let i = crate::stats::median_index(&owns).unwrap_or(0);
    let n = results.len();
    let mut m = results.swap_remove(i);
    m.runs = n;
    Ok(m)
}

pub fn snapshot(pid: u32, ram: GuestRam<'_>) -> Result<Snapshot, String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| format!("/proc/{pid}/smaps: {e}"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    // smaps_rollup: the kernel sums Pss for us (its absence only loses the PSS figure).
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let (guest_mapping_kib, guest_rss, guest_pss) = match ram {
        GuestRam::Anonymous(bytes) => guest_mapping(&smaps, bytes)
            .map(|(size, rss)| (size, rss, rss))
            .ok_or_else(|| format!("no anonymous mapping of {} KiB or more", bytes / 1024))?,
        GuestRam::File(path) => file_mappings(&smaps, path)
            .ok_or_else(|| format!("no mapping of {}", path.display()))?,
    };
    Ok(Snapshot {
        guest_rss,
        guest_pss,
        guest_mapping_kib,
        rss_anon: status_kib(&status, "RssAnon:").unwrap_or(0),
        rss_file: status_kib(&status, "RssFile:").unwrap_or(0),
        rss: status_kib(&status, "VmRSS:").unwrap_or(0),
        pss: status_kib(&rollup, "Pss:").unwrap_or(0),
    })
}

/// One mapping of an smaps text.
#[derive(Debug, Clone, PartialEq)]
struct Mapping {
    size: u64,
    /// No path, or a bracketed pseudo-name other than the stack or heap, or a memfd.
    anonymous: bool,
    path: String,
    rss_kib: u64,
    pss_kib: u64,
}

fn mappings(smaps: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        if let Some(m) = mapping_header(line) {
            out.push(m);
            continue;
        }
        let Some(m) = out.last_mut() else {
            continue;
        };
        // `Pss:` only: `Pss_Anon:` and the like are parts of it.
        let field = |key: &str| {
            line.strip_prefix(key)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        };
        if let Some(v) = field("Rss:") {
            m.rss_kib = v;
        } else if let Some(v) = field("Pss:") {
            m.pss_kib = v;
        }
    }
    out
}

/// (size KiB, Rss KiB) of the largest anonymous mapping of at least `min_bytes` in an smaps
/// text.
pub fn guest_mapping(smaps: &str, min_bytes: u64) -> Option<(u64, u64)> {
    mappings(smaps)
        .into_iter()
        .filter(|m| m.anonymous && m.size >= min_bytes)
        .max_by_key(|m| m.size)
        .map(|m| (m.size / 1024, m.rss_kib))
}

/// (size KiB, Rss KiB, Pss KiB) summed over the mappings of `file` (guest RAM below and above
/// the 32-bit hole are mapped apart).
pub fn file_mappings(smaps: &str, file: &Path) -> Option<(u64, u64, u64)> {
    let want = file.to_string_lossy();
    let found: Vec<Mapping> = mappings(smaps)
        .into_iter()
        .filter(|m| m.path == want)
        .collect();
    if found.is_empty() {
        return None;
    }
    Some(found.iter().fold((0, 0, 0), |(s, r, p), m| {
        (s + m.size / 1024, r + m.rss_kib, p + m.pss_kib)
    }))
}

/// The mapping an smaps header line opens; None when the line is not a header.
fn mapping_header(line: &str) -> Option<Mapping> {
    let mut f = line.split_whitespace();
    let range = f.next()?;
    let (a, b) = range.split_once('-')?;
    let a = u64::from_str_radix(a, 16).ok()?;
    let b = u64::from_str_radix(b, 16).ok()?;
    // perms, offset, dev, inode must follow for a header.
    let perms = f.next()?;
    if perms.len() != 4 {
        return None;
    }
    let _offset = f.next()?;
    let _dev = f.next()?;
    let inode = f.next()?;
    let path = f.collect::<Vec<_>>().join(" ");
    let anonymous = inode == "0"
        && (path.is_empty()
            || (path.starts_with('[') && path != "[stack]" && path != "[heap]")
            || path.starts_with("/memfd:"));
    Some(Mapping {
        size: b.saturating_sub(a),
        anonymous,
        path,
        rss_kib: 0,
        pss_kib: 0,
    })
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fe:01 1234   /usr/bin/ember
Size:               1024 kB
Rss:                 900 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:                  60 kB
7f1000000000-7f1000200000 rw-p 00000000 00:00 0 
Size:               2048 kB
Rss:                 500 kB
7ffd00000000-7ffd10000000 rw-p 00000000 00:00 0      [stack]
Size:             262144 kB
Rss:                  12 kB
7f2000000000-7f2008000000 rw-p 00000000 fe:01 777    /tmp/snap dir/mem
Size:             131072 kB
Rss:                2048 kB
Pss:                 512 kB
Pss_Anon:            100 kB
7f2100000000-7f2100100000 rw-p 08000000 fe:01 777    /tmp/snap dir/mem
Size:               1024 kB
Rss:                   8 kB
Pss:                   4 kB
";

    #[test]
    fn finds_the_guest_ram_mapping() {
        assert_eq!(guest_mapping(SMAPS, 128 << 20), Some((131072, 60)));
        // A smaller threshold still picks the largest anonymous one, never the stack.
        assert_eq!(guest_mapping(SMAPS, 1 << 20), Some((131072, 60)));
        assert_eq!(guest_mapping(SMAPS, 256 << 20), None);
    }

    #[test]
    fn finds_a_memory_files_mappings_and_sums_them() {
        assert_eq!(
            file_mappings(SMAPS, Path::new("/tmp/snap dir/mem")),
            Some((132096, 2056, 516))
        );
        assert_eq!(file_mappings(SMAPS, Path::new("/tmp/snap dir/me")), None);
    }

    #[test]
    fn reads_status_fields() {
        let s = "Name:\tember\nRssAnon:\t    1200 kB\nRssFile:\t    1500 kB\n";
        assert_eq!(status_kib(s, "RssAnon:"), Some(1200));
        assert_eq!(status_kib(s, "RssFile:"), Some(1500));
        assert_eq!(status_kib(s, "RssShmem:"), None);
    }

    #[test]
    fn probes_a_live_process() {
        // A shell that maps nothing big: no guest mapping, and the probe says so.
        let spec = Spec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "echo 'x: ready'; read q".into()],
            marker: "x: ready".into(),
            timeout: Duration::from_secs(10),
            stop_at_ready: false,
            input: Vec::new(),
        };
        let e = probe(&spec, GuestRam::Anonymous(1 << 40), b"quit\n", 1).unwrap_err();
        assert!(e.contains("no anonymous mapping"), "{e}");
    }
}

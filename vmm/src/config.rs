//! Everything the user hands Ember is parsed and checked here, before any VM exists: sizes, counts,
//! the serial mode and `--disk` specs. The CLI layer (main.rs) only collects strings.

use std::path::PathBuf;

use ember_boot::layout::CMDLINE_MAX_SIZE;
use ember_devices::virtio::vsock::{MAX_GUEST_CID, MAX_UDS_PATH, MIN_GUEST_CID};
pub use ember_devices::virtio::VsockConfig;
pub use ember_devices::virtio::{DiskConfig, OverlayConfig};

/// What a microVM wants: the console on COM1, reboot through the i8042 (which ends the VM), no
/// PCI probing. Ember appends the words its own devices need.
/// The i8042 words keep Linux from probing for a mouse port, a multiplexer and PnP ids the
/// controller does not have (it only implements the reset command).
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";
pub const DEFAULT_MEMORY: u64 = 128 << 20;
/// KVM's own limit is checked against the host at start; this bounds what the MP table and MADT
/// (one byte APIC ids, IOAPIC id = cpus) can describe.
pub const MAX_CPUS: u8 = 254;
/// Below this a kernel has no room for itself next to the tables in low memory.
pub const MIN_MEMORY: u64 = 2 << 20;
/// KVM maps guest memory in whole pages: a slot of any other size fails with a bare EINVAL.
const MEMORY_ALIGN: u64 = 4 << 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--memory {0:?}: expected a size such as 256M or 4G")]
    BadSize(String),
    #[error("--memory {0}: at least 2M is needed")]
    MemoryTooSmall(String),
    #[error("--memory {0}: must be a whole number of 4K pages")]
    MemoryNotPageAligned(String),
    #[error("--cpus {0:?}: expected a number from 1 to {MAX_CPUS}")]
    BadCpus(String),
    #[error("--serial {0:?}: expected stdio, null or file=PATH")]
    BadSerial(String),
    #[error("--disk {spec:?}: {reason}")]
    BadDisk { spec: String, reason: String },
    #[error("--vsock {spec:?}: {reason}")]
    BadVsock { spec: String, reason: String },
    #[error("--timings {0:?}: expected table or json")]
    BadTimings(String),
    #[error("--timeout {0:?}: expected a duration such as 30s, 500ms, 2m or 1h")]
    BadDuration(String),
    #[error("--env {0:?}: expected KEY=VALUE")]
    BadEnv(String),
    #[error("--seccomp {0:?}: expected on or off")]
    BadSeccomp(String),
    #[error("the kernel command line is {len} bytes; the boot protocol allows {max}")]
    CmdlineTooLong { len: usize, max: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialMode {
    Stdio,
    File(PathBuf),
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimingsFormat {
    Table,
    Json,
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    /// The user's command line (or the default), before Ember's device words are appended.
    pub cmdline: String,
    pub cpus: u8,
    pub memory: u64,
    pub serial: SerialMode,
    pub disks: Vec<DiskConfig>,
    /// At most one virtio-vsock device.
    pub vsock: Option<VsockConfig>,
    pub timings: Option<TimingsFormat>,
    pub ready_marker: Option<String>,
    pub seccomp: bool,
}

/// What a VM's console and threads are given, whether it boots or is restored from a snapshot.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub serial: SerialMode,
    pub ready_marker: Option<String>,
    pub seccomp: bool,
}

impl VmConfig {
    pub fn run_options(&self) -> RunOptions {
        RunOptions {
            serial: self.serial.clone(),
            ready_marker: self.ready_marker.clone(),
            seccomp: self.seccomp,
        }
    }
}

/// `256M`, `4G`, `1024K`, `65536` (bytes); binary units.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

pub fn parse_memory(s: &str) -> Result<u64, ConfigError> {
    let size = parse_size(s)?;
    if size < MIN_MEMORY {
        return Err(ConfigError::MemoryTooSmall(s.to_string()));
    }
    if size % MEMORY_ALIGN != 0 {
        return Err(ConfigError::MemoryNotPageAligned(s.to_string()));
    }
    Ok(size)
}

pub fn parse_cpus(s: &str) -> Result<u8, ConfigError> {
    match s.trim().parse::<u8>() {
        Ok(n) if (1..=MAX_CPUS).contains(&n) => Ok(n),
        _ => Err(ConfigError::BadCpus(s.to_string())),
    }
}

pub fn parse_serial(s: &str) -> Result<SerialMode, ConfigError> {
    match s {
        "stdio" => Ok(SerialMode::Stdio),
        "null" => Ok(SerialMode::Null),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
            _ => Err(ConfigError::BadSerial(s.to_string())),
        },
    }
}

/// `path=IMG[,readonly=on|off][,id=NAME][,overlay=FILE|tmp]`; a bare `IMG` is taken as the path.
/// `overlay=tmp` is the anonymous overlay; a file named tmp is `overlay=./tmp`.
pub fn parse_disk(spec: &str) -> Result<DiskConfig, ConfigError> {
    let bad = |reason: &str| ConfigError::BadDisk {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let mut path = None;
    let mut readonly = false;
    let mut id = None;
    let mut overlay = None;
    // The last of two values silently won: `readonly=on,readonly=off` gave a writable disk.
    let mut seen: Vec<&str> = Vec::new();
    for (i, part) in spec.split(',').enumerate() {
        let key = match part.split_once('=') {
            Some(("ro", _)) => Some("readonly"),
            Some((k @ ("path" | "readonly" | "id" | "overlay"), _)) => Some(k),
            None if i == 0 => Some("path"),
            // Unknown keys are refused below.
            _ => None,
        };
        if let Some(key) = key {
            if seen.contains(&key) {
                return Err(bad(&format!("{key} is given twice")));
            }
            seen.push(key);
        }
        match part.split_once('=') {
            Some(("path", v)) => path = Some(v),
            Some(("readonly" | "ro", v)) => {
                readonly = match v {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => return Err(bad("readonly takes on or off")),
                }
            }
            Some(("id", v)) => {
                if v.is_empty() || v.len() > 20 {
                    return Err(bad("id must be 1 to 20 bytes (the virtio-blk serial)"));
                }
                id = Some(v.to_string())
            }
            Some(("overlay", v)) => {
                overlay = Some(match v {
                    "" => return Err(bad("overlay takes a file, or tmp")),
                    "tmp" => OverlayConfig::Tmp,
                    file => OverlayConfig::File(PathBuf::from(file)),
                })
            }
            None if i == 0 => path = Some(part),
            _ => return Err(bad(&format!("unknown key in {part:?}"))),
        }
    }
    if readonly && overlay.is_some() {
        return Err(bad(
            "readonly=on cannot go with overlay=: the overlay takes the guest's writes and the \
             base is never written either way (drop readonly=on for a copy-on-write disk, or \
             overlay= for a disk the guest cannot write)",
        ));
    }
    match path {
        Some(p) if !p.is_empty() => Ok(DiskConfig {
            path: PathBuf::from(p),
            readonly,
            id,
            overlay,
        }),
        _ => Err(bad("path=IMG is required")),
    }
}

/// `cid=N,uds=PATH`: the guest's CID (3 to 2^32-2) and the Unix socket Ember listens on for
/// host clients (it must not exist yet; that is checked when the device is created).
pub fn parse_vsock(spec: &str) -> Result<VsockConfig, ConfigError> {
    match vsock_parts(spec)? {
        (Some(cid), Some(uds)) => Ok(VsockConfig { cid, uds }),
        _ => Err(bad_vsock(
            spec,
            "both cid=N and uds=PATH are required".into(),
        )),
    }
}

/// `uds=PATH` with `--restore`: where the restored VM's vsock device listens instead of the
/// snapshotted VM's path (which that VM, or another clone, may still hold). The CID is the
/// snapshot's: the guest knows itself by it.
pub fn parse_vsock_rebind(spec: &str) -> Result<PathBuf, ConfigError> {
    match vsock_parts(spec)? {
        (None, Some(uds)) => Ok(uds),
        (Some(_), _) => Err(bad_vsock(
            spec,
            "with --restore only uds=PATH is given: the guest keeps the CID of its snapshot".into(),
        )),
        (None, None) => Err(bad_vsock(spec, "uds=PATH is required".into())),
    }
}

fn bad_vsock(spec: &str, reason: String) -> ConfigError {
    ConfigError::BadVsock {
        spec: spec.to_string(),
        reason,
    }
}

fn vsock_parts(spec: &str) -> Result<(Option<u64>, Option<PathBuf>), ConfigError> {
    let bad = |reason: String| bad_vsock(spec, reason);
    let (mut cid, mut uds) = (None, None);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("cid", v)) if cid.is_none() => {
                let n = v
                    .parse::<u64>()
                    .ok()
                    .filter(|n| (MIN_GUEST_CID..=MAX_GUEST_CID).contains(n))
                    .ok_or_else(|| {
                        bad(format!(
                            "cid must be a number from {MIN_GUEST_CID} to {MAX_GUEST_CID} (0-2 \
                             are reserved for the hypervisor, loopback and the host)"
                        ))
                    })?;
                cid = Some(n);
            }
            Some(("uds", v)) if uds.is_none() => {
                if v.is_empty() {
                    return Err(bad("uds needs a path".into()));
                }
                if v.len() > MAX_UDS_PATH {
                    return Err(bad(format!(
                        "uds is {} bytes; at most {MAX_UDS_PATH}, so that <uds>_<port> fits a \
                         Unix socket address",
                        v.len()
                    )));
                }
                uds = Some(PathBuf::from(v));
            }
            Some((k @ ("cid" | "uds"), _)) => return Err(bad(format!("{k} is given twice"))),
            _ => return Err(bad(format!("unknown key in {part:?}"))),
        }
    }
    Ok((cid, uds))
}

pub fn parse_timings(s: &str) -> Result<TimingsFormat, ConfigError> {
    match s {
        "" | "table" => Ok(TimingsFormat::Table),
        "json" => Ok(TimingsFormat::Json),
        _ => Err(ConfigError::BadTimings(s.to_string())),
    }
}

/// `30s`, `500ms`, `2m`, `1h`, or a plain number of seconds; more than zero.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, ConfigError> {
    let bad = || ConfigError::BadDuration(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }
    .filter(|&ms| ms > 0)
    .ok_or_else(bad)?;
    Ok(std::time::Duration::from_millis(ms))
}

/// `KEY=VALUE` for the command's environment.
pub fn parse_env(s: &str) -> Result<(String, String), ConfigError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(ConfigError::BadEnv(s.to_string())),
    }
}

pub fn parse_seccomp(s: &str) -> Result<bool, ConfigError> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(ConfigError::BadSeccomp(s.to_string())),
    }
}

/// Splits a kernel command line at its first standalone `--` (outside double quotes): the
/// kernel's parameters before it, and what the kernel hands to init after it (with the `--`).
pub fn split_init_args(line: &str) -> (&str, Option<&str>) {
    let bytes = line.as_bytes();
    let mut quoted = false;
    let mut word_start = 0;
    for i in 0..=bytes.len() {
        let c = bytes.get(i).copied();
        match c {
            Some(b'"') => quoted = !quoted,
            Some(b' ' | b'\t' | b'\n') | None if !quoted => {
                if &line[word_start..i] == "--" {
                    return (line[..word_start].trim_end(), Some(&line[word_start..]));
                }
                word_start = i + 1;
            }
            _ => {}
        }
    }
    (line, None)
}

/// Whether the kernel part of `line` sets parameter `key` (as `key` or `key=...`).
pub fn has_param(line: &str, key: &str) -> bool {
    let (kernel, _) = split_init_args(line);
    kernel
        .split_whitespace()
        .any(|w| w.split('=').next() == Some(key))
}

/// The final command line: the user's (or the default) kernel parameters, then Ember's words
/// (for the host and the devices), then the user's `-- init args` if any, so that Ember's words
/// reach the kernel and not init's argv.
pub fn full_cmdline(base: &str, ember_words: &[String]) -> Result<String, ConfigError> {
    let (kernel, init) = split_init_args(base.trim());
    let mut line = kernel.trim().to_string();
    for w in ember_words {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(w);
    }
    if let Some(init) = init {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(init);
    }
    // The boot protocol counts the terminating NUL.
    if line.len() >= CMDLINE_MAX_SIZE {
        return Err(ConfigError::CmdlineTooLong {
            len: line.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_environment_words() {
        use std::time::Duration;
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        for bad in [
            "",
            "0",
            "0s",
            "s",
            "2x",
            "-1s",
            "1.5s",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_env("EMPTY=").unwrap(), ("EMPTY".into(), "".into()));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("NOEQUALS").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("4g").unwrap(), 4 << 30);
        assert_eq!(parse_size("1024K").unwrap(), 1 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in [
            "",
            "M",
            "-1G",
            "1.5G",
            "12Q",
            "99999999999999999999G",
            "1 G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_memory("0").is_err());
        assert!(parse_memory("1M").is_err());
        assert_eq!(parse_memory("2M").unwrap(), 2 << 20);
        // Below and above the MMIO hole, KVM takes only whole pages.
        assert_eq!(parse_memory("132100K").unwrap(), 132100 << 10);
        for odd in ["132097K", "3145729K", "4194305", "3221225473"] {
            assert_eq!(
                parse_memory(odd),
                Err(ConfigError::MemoryNotPageAligned(odd.to_string()))
            );
        }
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("4").unwrap(), 4);
        for bad in ["0", "-1", "255", "x", ""] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serial() {
        assert_eq!(parse_serial("stdio").unwrap(), SerialMode::Stdio);
        assert_eq!(parse_serial("null").unwrap(), SerialMode::Null);
        assert_eq!(
            parse_serial("file=/tmp/x").unwrap(),
            SerialMode::File("/tmp/x".into())
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("tty").is_err());
    }

    #[test]
    fn disks() {
        let d = parse_disk("path=a.img,readonly=on,id=root").unwrap();
        assert_eq!(d.path, PathBuf::from("a.img"));
        assert!(d.readonly);
        assert_eq!(d.id.as_deref(), Some("root"));
        assert_eq!(parse_disk("b.img").unwrap().path, PathBuf::from("b.img"));
        assert!(!parse_disk("b.img").unwrap().readonly);
        for bad in [
            "",
            "readonly=on",
            "path=",
            "path=a,readonly=maybe",
            "path=a,colour=red",
        ] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
        assert!(parse_disk("path=a,id=aaaaaaaaaaaaaaaaaaaaa").is_err());
        let d = parse_disk("path=base.img,overlay=vm1.ovl").unwrap();
        assert_eq!(d.overlay, Some(OverlayConfig::File("vm1.ovl".into())));
        assert!(!d.readonly);
        assert_eq!(
            parse_disk("base.img,overlay=tmp").unwrap().overlay,
            Some(OverlayConfig::Tmp)
        );
        assert_eq!(
            parse_disk("base.img,overlay=./tmp").unwrap().overlay,
            Some(OverlayConfig::File("./tmp".into()))
        );
        assert_eq!(parse_disk("base.img").unwrap().overlay, None);
        assert!(parse_disk("base.img,overlay=").is_err());
        for both in ["path=a,readonly=on,overlay=b", "a,overlay=tmp,ro=on"] {
            assert!(
                matches!(parse_disk(both), Err(ConfigError::BadDisk { reason, .. }) if reason.contains("readonly=on cannot go with overlay=")),
                "{both}"
            );
        }
        // readonly=off says what an overlay does anyway.
        assert!(parse_disk("a,readonly=off,overlay=b").is_ok());
        assert!(
            matches!(parse_disk("path=a,foo"), Err(ConfigError::BadDisk { reason, .. }) if reason.contains("unknown key")),
        );
        for twice in [
            "path=a,readonly=on,readonly=off",
            "path=a,ro=on,readonly=off",
            "path=a,path=b",
            "a,path=b",
            "path=a,id=x,id=y",
            "path=a,overlay=b,overlay=c",
        ] {
            assert!(
                matches!(parse_disk(twice), Err(ConfigError::BadDisk { reason, .. }) if reason.contains("twice")),
                "{twice}"
            );
        }
    }

    #[test]
    fn vsock_rebind_takes_a_path_only() {
        assert_eq!(
            parse_vsock_rebind("uds=/tmp/c.sock").unwrap(),
            PathBuf::from("/tmp/c.sock")
        );
        for bad in ["cid=3,uds=/tmp/c.sock", "cid=3", "", "uds=", "path=x"] {
            assert!(parse_vsock_rebind(bad).is_err(), "{bad:?}");
        }
        let e = parse_vsock_rebind("cid=4,uds=x").unwrap_err().to_string();
        assert!(e.contains("keeps the CID"), "{e}");
    }

    #[test]
    fn vsock() {
        let v = parse_vsock("cid=3,uds=/tmp/v.sock").unwrap();
        assert_eq!((v.cid, v.uds), (3, PathBuf::from("/tmp/v.sock")));
        let v = parse_vsock("uds=v,cid=4294967294").unwrap();
        assert_eq!(v.cid, u64::from(u32::MAX) - 1);
        let long = format!("cid=3,uds=/{}", "x".repeat(MAX_UDS_PATH));
        for (bad, why) in [
            ("", "unknown key"),
            ("cid=3", "required"),
            ("uds=/tmp/v", "required"),
            ("cid=2,uds=v", "reserved"),
            ("cid=0,uds=v", "reserved"),
            ("cid=4294967295,uds=v", "from 3"),
            ("cid=-1,uds=v", "from 3"),
            ("cid=x,uds=v", "from 3"),
            ("cid=3,uds=", "needs a path"),
            ("cid=3,cid=4,uds=v", "twice"),
            ("cid=3,uds=a,uds=b", "twice"),
            ("cid=3,uds=v,port=5", "unknown key"),
            (long.as_str(), "at most"),
        ] {
            match parse_vsock(bad) {
                Err(ConfigError::BadVsock { reason, .. }) => {
                    assert!(reason.contains(why), "{bad}: {reason}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn cmdline_gets_device_words_and_a_bound() {
        let words = vec!["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        assert_eq!(
            full_cmdline("console=ttyS0", &words).unwrap(),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(full_cmdline("", &[]).unwrap(), "");
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            full_cmdline(&long, &[]),
            Err(ConfigError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn ember_words_go_before_a_standalone_double_dash() {
        let words = vec![
            "noxsave".to_string(),
            "virtio_mmio.device=4K@0xd0000000:5".to_string(),
        ];
        assert_eq!(
            full_cmdline("console=ttyS0 -- -s single", &words).unwrap(),
            "console=ttyS0 noxsave virtio_mmio.device=4K@0xd0000000:5 -- -s single"
        );
        // Only a word that is exactly `--`, outside quotes, ends the kernel's part.
        assert_eq!(
            full_cmdline("a=\"x -- y\" b=--c", &words[..1]).unwrap(),
            "a=\"x -- y\" b=--c noxsave"
        );
        assert_eq!(
            full_cmdline("-- init", &words[..1]).unwrap(),
            "noxsave -- init"
        );
        assert_eq!(split_init_args("a -- b -- c"), ("a", Some("-- b -- c")));
        assert_eq!(split_init_args("a --"), ("a", Some("--")));
    }

    #[test]
    fn has_param_looks_only_at_the_kernels_part() {
        let line = "console=ttyS0 noxsave tsc=unstable -- tsc_early_khz=1";
        assert!(has_param(line, "console"));
        assert!(has_param(line, "noxsave"));
        assert!(has_param(line, "tsc"));
        assert!(
            !has_param(line, "tsc_early_khz"),
            "init's argument, not the kernel's"
        );
        assert!(!has_param(line, "consol"));
    }
}

//! What the benchmark ran on: every report states the kind of KVM, because figures from a
//! software-virtualized /dev/kvm and from hardware KVM are not comparable.

use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// /dev/kvm backed by hardware virtualization (VMX/SVM).
    Hardware,
    /// The `kvm_pvm` module: KVM done in software inside a VM. Guest kernel code is emulated
    /// (thousands of times slower), guest user code runs natively.
    Pvm,
    /// No /dev/kvm at all.
    None,
}

impl KvmKind {
    pub fn detect() -> KvmKind {
        if !Path::new("/dev/kvm").exists() {
            KvmKind::None
        } else if ember_vmm::host::HostKind::detect() == ember_vmm::host::HostKind::Pvm {
            KvmKind::Pvm
        } else {
            KvmKind::Hardware
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            KvmKind::Hardware => "hardware KVM",
            KvmKind::Pvm => {
                "kvm_pvm (KVM in software: guest kernel code emulated, thousands of times \
                 slower; guest user code native)"
            }
            KvmKind::None => "no /dev/kvm",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            KvmKind::Hardware => "hardware",
            KvmKind::Pvm => "kvm_pvm",
            KvmKind::None => "none",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Host {
    pub kvm: KvmKind,
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_mib: u64,
    /// UTC, `YYYY-MM-DD HH:MM`.
    pub date: String,
}

impl Host {
    pub fn detect() -> Host {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown CPU".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_mib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024);
        Host {
            kvm: KvmKind::detect(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            memory_mib,
            date: utc_now(),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{}; {} CPUs ({}), {} MiB, Linux {}",
            self.kvm.describe(),
            self.cpus,
            self.cpu_model,
            self.memory_mib,
            self.kernel
        )
    }
}

fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs)
}

/// `YYYY-MM-DD HH:MM UTC` for seconds since the epoch (proleptic Gregorian calendar).
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14 22:13 UTC");
        // A leap day.
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00 UTC");
    }
}

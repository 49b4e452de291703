//! What kind of KVM this host has, and what a Linux guest must be told to boot on it.
//!
//! On hardware KVM a guest needs nothing. On a `kvm_pvm` host (KVM done in software inside a cloud
//! VM without nested virtualization) guest ring-0 code is emulated, thousands of times slower,
//! ring-3 code runs natively, and a few instructions stop the guest. Ember then adds the kernel
//! command-line words below, so that an unchanged `ember run --kernel K --initramfs I` boots;
//! a word whose key the user's own `--cmdline` already has is left out, so the user's wins.

use std::path::Path;
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    HardwareKvm,
    /// `/dev/kvm` is the `kvm_pvm` module.
    Pvm,
}

impl HostKind {
    /// Asked of the host once per process; every caller (the warning, the kernel words, the
    /// CPUID policy, the benchmark) gets the same answer.
    pub fn detect() -> Self {
        static KIND: OnceLock<HostKind> = OnceLock::new();
        *KIND.get_or_init(|| {
            if Path::new("/sys/module/kvm_pvm").exists() {
                HostKind::Pvm
            } else {
                HostKind::HardwareKvm
            }
        })
    }
}

/// One word for the guest kernel and why this host needs it (shown with `EMBER_LOG=info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostWord {
    pub word: String,
    pub why: &'static str,
}

impl HostWord {
    /// The parameter's name: the part before `=`.
    pub fn key(&self) -> &str {
        self.word.split('=').next().unwrap_or(&self.word)
    }
}

/// The words a Linux guest needs on `kind`, given the vCPUs' TSC frequency (from KVM).
pub fn kernel_words(kind: HostKind, tsc_khz: Option<u32>) -> Vec<HostWord> {
    if kind == HostKind::HardwareKvm {
        return Vec::new();
    }
    let mut words = Vec::new();
    if let Some(khz) = tsc_khz {
        words.push(HostWord {
            word: format!("tsc_early_khz={khz}"),
            why: "the TSC frequency from KVM: Linux's PIT calibration loop runs too slowly when \
                  emulated, marks the TSC unstable and stalls the boot for minutes",
        });
    }
    let fixed: [(&str, &'static str); 8] = [
        (
            "tsc=reliable",
            "no TSC watchdog against the emulated, slower clocksources",
        ),
        (
            "no_timer_check",
            "no IO-APIC timer check (a timer tick takes milliseconds of emulated code)",
        ),
        (
            "noxsave",
            "XRSTOR in ring 0 stops the guest (emulation failure): FXSAVE state only",
        ),
        (
            "clearcpuid=popcnt,smap,smep,fsgsbase,rdpid,pku,umip,avx,avx2,avx512f",
            "CPU features whose instructions ring-0 emulation cannot run (POPCNT, CLAC/STAC) \
             or whose state needs XSAVE",
        ),
        (
            "noreplace-smp",
            "no runtime code patching when CPUs come up: it plants INT3, which stops the guest",
        ),
        (
            "mitigations=off",
            "no speculation mitigations: the guest's kernel is emulated, not speculated; page-table \
             isolation alone doubles the emulated work per system call",
        ),
        (
            "rodata=off",
            "the kernel keeps its large-page mappings (protecting rodata splits them, page by \
             emulated page)",
        ),
        (
            "percpu_alloc=page",
            "per-CPU areas from single pages (the default embedding allocator's large mappings \
             cost more emulated work)",
        ),
    ];
    words.extend(fixed.into_iter().map(|(word, why)| HostWord {
        word: word.to_string(),
        why,
    }));
    words
}

/// The TSC frequency KVM gives a new vCPU on this host, for peers that do not ask KVM
/// themselves (the benchmark passes the same words to QEMU).
pub fn tsc_khz() -> Option<u32> {
    let kvm = kvm_ioctls::Kvm::new().ok()?;
    let vm = kvm.create_vm().ok()?;
    let vcpu = vm.create_vcpu(0).ok()?;
    vcpu.get_tsc_khz().ok()
}

/// The words a Linux guest needs on this host, as Ember adds them.
pub fn kernel_words_here() -> Vec<HostWord> {
    match HostKind::detect() {
        HostKind::HardwareKvm => Vec::new(),
        kind => kernel_words(kind, tsc_khz()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_kvm_needs_no_words() {
        assert!(kernel_words(HostKind::HardwareKvm, Some(2_000_000)).is_empty());
    }

    #[test]
    fn kvm_pvm_gets_the_tsc_frequency_and_the_cpu_words() {
        let words = kernel_words(HostKind::Pvm, Some(2_445_406));
        let text: Vec<&str> = words.iter().map(|w| w.word.as_str()).collect();
        assert_eq!(text[0], "tsc_early_khz=2445406");
        assert!(text.contains(&"noxsave"));
        assert!(text
            .iter()
            .any(|w| w.starts_with("clearcpuid=") && w.contains("popcnt")));
        assert_eq!(words[0].key(), "tsc_early_khz");
        assert_eq!(words[1].key(), "tsc");
        // Without a frequency from KVM there is nothing true to say about the TSC.
        assert!(!kernel_words(HostKind::Pvm, None)
            .iter()
            .any(|w| w.key() == "tsc_early_khz"));
    }
}

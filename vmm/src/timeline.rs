//! The boot timeline: when each phase of start-up was reached, in microseconds since Ember's
//! `main` began. `--timings` prints it at exit; the benchmark reads the JSON form.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Phase {
    ArgsParsed,
    VmCreated,
    MemoryMapped,
    KernelLoaded,
    DevicesReady,
    FirstKvmRun,
    FirstSerialByte,
    ReadyMarker,
    GuestExit,
}

const PHASES: [(Phase, &str); 9] = [
    (Phase::ArgsParsed, "args_parsed"),
    (Phase::VmCreated, "vm_created"),
    (Phase::MemoryMapped, "memory_mapped"),
    (Phase::KernelLoaded, "kernel_loaded"),
    (Phase::DevicesReady, "devices_ready"),
    (Phase::FirstKvmRun, "first_kvm_run"),
    (Phase::FirstSerialByte, "first_serial_byte"),
    (Phase::ReadyMarker, "ready_marker"),
    (Phase::GuestExit, "guest_exit"),
];

static START: OnceLock<Instant> = OnceLock::new();
// 0 means "not reached"; a reached phase stores its time + 1 so that t = 0 is representable.
static MARKS: [AtomicU64; 9] = [const { AtomicU64::new(0) }; 9];

/// Call first thing in `main`.
pub fn start() {
    START.get_or_init(Instant::now);
}

/// Records the first time `phase` is reached; later calls are ignored (cheap enough for the
/// serial output path: one relaxed load once the phase is set).
pub fn mark(phase: Phase) {
    let slot = &MARKS[phase as usize];
    if slot.load(Ordering::Relaxed) != 0 {
        return;
    }
    let us = START.get_or_init(Instant::now).elapsed().as_micros() as u64;
    let _ = slot.compare_exchange(0, us + 1, Ordering::Relaxed, Ordering::Relaxed);
}

pub fn get(phase: Phase) -> Option<u64> {
    match MARKS[phase as usize].load(Ordering::Relaxed) {
        0 => None,
        v => Some(v - 1),
    }
}

pub fn table() -> String {
    let mut out = String::from("ember timings (microseconds since start)\n");
    let mut prev = 0;
    for (phase, name) in PHASES {
        match get(phase) {
            Some(us) => {
                let _ = writeln!(out, "  {name:<18} {us:>10}  (+{})", us.saturating_sub(prev));
                prev = us;
            }
            None => {
                let _ = writeln!(out, "  {name:<18} {:>10}", "-");
            }
        }
    }
    out
}

pub fn json() -> String {
    let fields: Vec<String> = PHASES
        .iter()
        .map(|(phase, name)| match get(*phase) {
            Some(us) => format!("\"{name}\":{us}"),
            None => format!("\"{name}\":null"),
        })
        .collect();
    format!("{{\"unit\":\"us\",{}}}", fields.join(","))
}

//! A small report for the unit tests of what is made from one (JSON, chart).

use crate::host::{Host, KvmKind};
use crate::memory::VmmMemory;
use crate::phases::Timeline;
use crate::systems::{Kind, Skipped};
use crate::{Mode, ModeResult, Report, SystemResult};

fn system(kind: Kind, ready: &[f64], exit: &[f64]) -> SystemResult {
    SystemResult {
        kind,
        command: format!("{} run", kind.name()),
        note: None,
        ready_ms: ready.to_vec(),
        exit_ms: exit.to_vec(),
        rss_kib: vec![2048.0; ready.len()],
        timelines: vec![],
        failures: vec![],
    }
}

/// A null-mode report with every kind of entry: Ember with timelines, a peer with a failure,
/// a system not run, one memory probe measured and one not.
pub fn report() -> Report {
    let mut ember = system(Kind::Ember, &[3.0001, 2.0, 4.0], &[5.0, 4.0, 6.0]);
    // Every phase up to the ready line; a run stopped there has no guest_exit.
    let mut timeline = Timeline([100, 400, 700, 750, 1400, 1700, 1900, 2000, 0].map(Some));
    timeline.0[8] = None;
    ember.timelines = vec![timeline; 3];
    let mut floor = system(Kind::Floor, &[1.5, 1.5, 1.5], &[2.0, 2.0, 2.0]);
    floor.failures.push("no ready line, exit status 1".into());
    Report {
        host: Host {
            kvm: KvmKind::Pvm,
            cpus: 2,
            cpu_model: "a \"quoted\" CPU".into(),
            kernel: "6.1".into(),
            memory_mib: 1024,
            date: "2026-12-01 10:00 UTC".into(),
        },
        command: "ember bench --guest null".into(),
        modes: vec![ModeResult {
            mode: Mode::Null,
            guest: "hello.elf (no initramfs)".into(),
            marker: "ember-guest: ready".into(),
            rounds: 3,
            systems: vec![ember, floor],
            skipped: vec![Skipped {
                kind: Kind::Docker,
                reason: "docker is not installed".into(),
            }],
            memory: vec![
                (
                    Kind::Ember,
                    Ok(VmmMemory {
                        peak_rss: 2048,
                        guest_rss: 64,
                        own: 1984,
                        guest_mapping_kib: 131072,
                        runs: 3,
                        ..VmmMemory::default()
                    }),
                ),
                (Kind::Qemu, Err("echo-pvh.elf is missing".into())),
            ],
        }],
        notes: vec!["a note with <markup> & an ampersand".into()],
    }
}

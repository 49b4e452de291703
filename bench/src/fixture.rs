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
        restore: vec![],
        exec: None,
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

/// A restore-mode result with every kind of entry: the three Ember rows (one with load times),
/// the reference boot and crun, Firecracker not run, a memory probe, density with and without
/// prefault.
pub fn restore_result() -> crate::restore::RestoreResult {
    use crate::restore::{self, Density, RestoreResult, Row, SetUp};
    let row = |label: &str, kind: Kind, ready: &[f64], marker: &str| Row {
        label: label.into(),
        marker: marker.into(),
        result: system(kind, ready, &[20.0, 20.0, 20.0]),
        load_ms: vec![],
    };
    let marker = "counter: got r";
    let mut api = row(restore::API_LOAD, Kind::Ember, &[7.0, 8.0, 9.0], marker);
    api.load_ms = vec![1.5, 2.5, 2.0];
    let density = |prefault: bool, pss: f64| Density {
        prefault,
        clones: 2,
        all_ready_ms: vec![30.0, 40.0],
        clone_ready_ms: vec![10.0, 20.0, 11.0, 21.0],
        pss_kib: vec![pss; 4],
        rss_kib: vec![2048.0; 4],
        guest_pss_kib: vec![64.0; 4],
        guest_rss_kib: vec![128.0; 4],
        total_pss_kib: vec![2.0 * pss; 2],
        failures: vec![],
    };
    RestoreResult {
        guest: "counter.elf, command line `console=ttyS0`".into(),
        guest_name: "counter",
        guest_bytes: 128 << 20,
        rounds: 3,
        trigger: "r".into(),
        marker: marker.into(),
        ended_by: "typed \"q\"".into(),
        setup: SetUp {
            boot_ms: 60.0,
            pause_ms: 0.5,
            create_ms: 45.0,
            state_bytes: 9728,
            state_disk_bytes: 12288,
            mem_bytes: 128 << 20,
            mem_disk_bytes: 53248,
        },
        rows: vec![
            row(restore::RESTORE, Kind::Ember, &[10.0, 9.0, 11.0], marker),
            row(
                restore::RESTORE_PREFAULT,
                Kind::Ember,
                &[12.0, 12.0, 12.0],
                marker,
            ),
            api,
            row(
                restore::EMBER_BOOT,
                Kind::Ember,
                &[3.0, 3.0, 3.0],
                "ember-guest: ready",
            ),
            row(
                "crun",
                Kind::Crun,
                &[20.0, 20.0, 20.0],
                "ember-guest: ready",
            ),
        ],
        skipped: vec![Skipped {
            kind: Kind::Firecracker,
            reason: "not found on PATH".into(),
        }],
        memory: vec![(
            restore::RESTORE.into(),
            Ok(VmmMemory {
                peak_rss: 2560,
                guest_rss: 128,
                own: 2432,
                guest_mapping_kib: 131072,
                runs: 3,
                ..VmmMemory::default()
            }),
        )],
        density: vec![density(false, 1024.0), density(true, 33792.0)],
        notes: vec![],
    }
}

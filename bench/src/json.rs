//! `--json FILE`: every figure and sample of the report, written with serde_json. The structs
//! here are the file's schema, field for field; the report's own types stay free to change.
//!
//! Figures are rounded as the text report shows them finer: times and MiB to 3 decimals (a
//! microsecond, a KiB), so the file carries no float noise.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde::Serialize as DeriveSerialize;

use crate::memory::VmmMemory;
use crate::phases::{Timeline, PHASES};
use crate::report::{median_ratio, mib};
use crate::restore::{self, Density, RestoreResult, Row};
use crate::stats::Summary;
use crate::systems::{Kind, Skipped};
use crate::{ModeResult, Report, SystemResult};

#[derive(DeriveSerialize)]
struct File<'a> {
    date: &'a str,
    command: &'a str,
    host: Host<'a>,
    notes: &'a [String],
    modes: Vec<Mode<'a>>,
    /// The restore mode, one entry per guest snapshotted (empty when it did not run).
    restore: Vec<Restore<'a>>,
    /// The exec mode (null when it did not run).
    exec: Option<crate::exec::Json<'a>>,
}

#[derive(DeriveSerialize)]
struct Host<'a> {
    kvm: &'static str,
    description: &'static str,
    cpus: usize,
    cpu_model: &'a str,
    kernel: &'a str,
    memory_mib: u64,
}

#[derive(DeriveSerialize)]
struct Mode<'a> {
    mode: &'static str,
    guest: &'a str,
    marker: &'a str,
    rounds: u32,
    systems: Vec<System<'a>>,
    not_run: Vec<NotRun<'a>>,
    own_memory: Vec<OwnMemory<'a>>,
}

#[derive(DeriveSerialize)]
struct System<'a> {
    system: &'static str,
    command: &'a str,
    note: Option<&'a str>,
    good_runs: usize,
    runs: usize,
    ready_ms: Option<Figures>,
    exit_ms: Option<Figures>,
    peak_rss_mib: Option<Figures>,
    /// None for Ember itself.
    peer_over_ember: Option<Ratios>,
    samples: Samples,
    failures: &'a [String],
    /// Ember only, as are the timelines.
    #[serde(skip_serializing_if = "Option::is_none")]
    phase_median_ms: Option<Steps>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timelines_us: Option<&'a [Timeline]>,
}

#[derive(DeriveSerialize)]
struct Figures {
    min: f64,
    median: f64,
    p90: f64,
    max: f64,
}

#[derive(DeriveSerialize)]
struct Ratios {
    ready: Option<f64>,
    exit: Option<f64>,
    rss: Option<f64>,
}

#[derive(DeriveSerialize)]
struct Samples {
    ready_ms: Vec<f64>,
    exit_ms: Vec<f64>,
    peak_rss_kib: Vec<u64>,
}

#[derive(DeriveSerialize)]
struct NotRun<'a> {
    system: &'static str,
    reason: &'a str,
}

#[derive(DeriveSerialize)]
#[serde(untagged)]
enum OwnMemory<'a> {
    Measured {
        system: &'static str,
        own_mib: f64,
        peak_rss_mib: f64,
        guest_ram_resident_mib: f64,
        rss_anon_mib: f64,
        rss_file_mib: f64,
        own_pss_mib: f64,
        guest_mapping_mib: f64,
        runs: usize,
    },
    NotMeasured {
        system: &'static str,
        error: &'a str,
    },
}

#[derive(DeriveSerialize)]
struct Restore<'a> {
    guest: &'a str,
    guest_name: &'static str,
    guest_ram_mib: f64,
    rounds: u32,
    /// Typed into each restored guest at spawn; `marker` is its answer, the ready line.
    typed_at_spawn: &'a str,
    marker: &'a str,
    ended_by: &'a str,
    setup: SetUp,
    rows: Vec<RestoreRow<'a>>,
    not_run: Vec<NotRun<'a>>,
    own_memory: Vec<RestoreMemory<'a>>,
    density: Vec<DensityFigures<'a>>,
    /// Median ready time of each Ember restore row over each reference's (null: not measured).
    ratios: Vec<RestoreRatios>,
    goals: Goals,
    notes: &'a [String],
}

#[derive(DeriveSerialize)]
struct SetUp {
    boot_ms: f64,
    pause_ms: f64,
    snapshot_create_ms: f64,
    state_file_bytes: u64,
    state_file_disk_bytes: u64,
    memory_file_bytes: u64,
    memory_file_disk_bytes: u64,
}

#[derive(DeriveSerialize)]
struct RestoreRow<'a> {
    label: &'a str,
    marker: &'a str,
    #[serde(flatten)]
    figures: System<'a>,
    /// Rows that load through an API socket: `PUT /snapshot/load` sent to its 204.
    #[serde(skip_serializing_if = "Option::is_none")]
    load_request_ms: Option<Figures>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    load_request_samples_ms: Vec<f64>,
}

#[derive(DeriveSerialize)]
struct RestoreMemory<'a> {
    label: &'a str,
    #[serde(flatten)]
    memory: OwnMemory<'a>,
}

#[derive(DeriveSerialize)]
struct DensityFigures<'a> {
    label: &'static str,
    prefault: bool,
    clones: usize,
    good_rounds: usize,
    all_ready_ms: Option<Figures>,
    clone_ready_ms: Option<Figures>,
    pss_per_clone_mib: Option<Figures>,
    rss_per_clone_mib: Option<Figures>,
    guest_ram_pss_per_clone_mib: Option<Figures>,
    guest_ram_rss_per_clone_mib: Option<Figures>,
    total_pss_mib: Option<Figures>,
    /// N x guest RAM, what N booted guests that touched all their RAM would take.
    n_x_guest_ram_mib: f64,
    /// The clones' median total PSS over N x guest RAM.
    total_pss_over_n_x_guest_ram: Option<f64>,
    failures: &'a [String],
}

#[derive(DeriveSerialize)]
struct RestoreRatios {
    row: &'static str,
    over_crun: Option<f64>,
    over_ember_boot: Option<f64>,
    over_firecracker: Option<f64>,
}

#[derive(DeriveSerialize)]
struct Goals {
    /// `ember restore` faster than a crun container start (null: not measured).
    faster_than_crun: Option<bool>,
    /// `ember restore` in at most half of Firecracker's restore (null: not measured here).
    at_most_half_of_firecracker: Option<bool>,
}

/// Ember's median per phase step, as a map in boot order (a derived map would sort its keys).
struct Steps(Vec<(String, f64)>);

impl Serialize for Steps {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (step, ms) in &self.0 {
            m.serialize_entry(step, ms)?;
        }
        m.end()
    }
}

/// One run's timeline as Ember's own `--timings=json` line has it: phase -> microseconds (null:
/// not reached), in boot order, without the unit.
impl Serialize for Timeline {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(PHASES.len()))?;
        for (phase, us) in PHASES.iter().zip(self.0.iter()) {
            m.serialize_entry(phase, us)?;
        }
        m.end()
    }
}

/// To `places` decimals.
fn round(x: f64, places: i32) -> f64 {
    let k = 10f64.powi(places);
    (x * k).round() / k
}

fn figures(s: Option<Summary>, unit: impl Fn(f64) -> f64) -> Option<Figures> {
    s.map(|s| Figures {
        min: round(unit(s.min), 3),
        median: round(unit(s.median), 3),
        p90: round(unit(s.p90), 3),
        max: round(unit(s.max), 3),
    })
}

fn system<'a>(s: &'a SystemResult, ember: Option<&SystemResult>) -> System<'a> {
    let (good, all) = s.good();
    let is_ember = s.kind == Kind::Ember;
    let ms = |v: &[f64]| v.iter().map(|x| round(*x, 3)).collect();
    System {
        system: s.kind.name(),
        command: &s.command,
        note: s.note.as_deref(),
        good_runs: good,
        runs: all,
        ready_ms: figures(s.ready(), |x| x),
        exit_ms: figures(s.exit(), |x| x),
        peak_rss_mib: figures(s.rss(), mib),
        peer_over_ember: ember.filter(|_| !is_ember).map(|e| {
            let r = |p, e| median_ratio(p, e).map(|r| round(r, 3));
            Ratios {
                ready: r(s.ready(), e.ready()),
                exit: r(s.exit(), e.exit()),
                rss: r(s.rss(), e.rss()),
            }
        }),
        samples: Samples {
            ready_ms: ms(&s.ready_ms),
            exit_ms: ms(&s.exit_ms),
            // Whole KiB as the kernel counts them (stored as f64 for the statistics only).
            peak_rss_kib: s.rss_kib.iter().map(|k| *k as u64).collect(),
        },
        failures: &s.failures,
        phase_median_ms: is_ember.then(|| {
            Steps(
                s.phase_medians()
                    .into_iter()
                    .map(|(step, ms)| (step, round(ms, 3)))
                    .collect(),
            )
        }),
        timelines_us: is_ember.then_some(&s.timelines[..]),
    }
}

fn not_run(skipped: &[Skipped]) -> Vec<NotRun<'_>> {
    skipped
        .iter()
        .map(|s| NotRun {
            system: s.kind.name(),
            reason: &s.reason,
        })
        .collect()
}

fn mib3(kib: u64) -> f64 {
    round(mib(kib as f64), 3)
}

fn own_memory<'a>(system: &'static str, v: &'a Result<VmmMemory, String>) -> OwnMemory<'a> {
    match v {
        Ok(v) => OwnMemory::Measured {
            system,
            own_mib: mib3(v.own),
            peak_rss_mib: mib3(v.peak_rss),
            guest_ram_resident_mib: mib3(v.guest_rss),
            rss_anon_mib: mib3(v.rss_anon),
            rss_file_mib: mib3(v.rss_file),
            own_pss_mib: mib3(v.own_pss),
            guest_mapping_mib: round(mib(v.guest_mapping_kib as f64), 1),
            runs: v.runs,
        },
        Err(e) => OwnMemory::NotMeasured { system, error: e },
    }
}

fn restore_row<'a>(r: &'a Row) -> RestoreRow<'a> {
    let mut figures = system(&r.result, None);
    // A row's peers are the references in `ratios`, not Ember.
    figures.peer_over_ember = None;
    RestoreRow {
        label: &r.label,
        marker: &r.marker,
        figures,
        load_request_ms: figures_of(&r.load_ms, |x| x),
        load_request_samples_ms: r.load_ms.iter().map(|x| round(*x, 3)).collect(),
    }
}

fn figures_of(v: &[f64], unit: impl Fn(f64) -> f64) -> Option<Figures> {
    figures(Summary::of(v), unit)
}

fn density(d: &Density, guest_bytes: u64) -> DensityFigures<'_> {
    let n_x = (d.clones as u64 * guest_bytes) as f64 / 1024.0;
    DensityFigures {
        label: d.label(),
        prefault: d.prefault,
        clones: d.clones,
        good_rounds: d.all_ready_ms.len(),
        all_ready_ms: figures_of(&d.all_ready_ms, |x| x),
        clone_ready_ms: figures_of(&d.clone_ready_ms, |x| x),
        pss_per_clone_mib: figures_of(&d.pss_kib, mib),
        rss_per_clone_mib: figures_of(&d.rss_kib, mib),
        guest_ram_pss_per_clone_mib: figures_of(&d.guest_pss_kib, mib),
        guest_ram_rss_per_clone_mib: figures_of(&d.guest_rss_kib, mib),
        total_pss_mib: figures_of(&d.total_pss_kib, mib),
        n_x_guest_ram_mib: round(mib(n_x), 1),
        total_pss_over_n_x_guest_ram: Summary::of(&d.total_pss_kib)
            .filter(|_| n_x > 0.0)
            .map(|s| round(s.median / n_x, 4)),
        failures: &d.failures,
    }
}

fn restore(r: &RestoreResult) -> Restore<'_> {
    let s = &r.setup;
    let ratio = |l, base| r.ready_ratio(l, base).map(|x| round(x, 3));
    Restore {
        guest: &r.guest,
        guest_name: r.guest_name,
        guest_ram_mib: round(r.guest_bytes as f64 / f64::from(1 << 20), 1),
        rounds: r.rounds,
        typed_at_spawn: &r.trigger,
        marker: &r.marker,
        ended_by: &r.ended_by,
        setup: SetUp {
            boot_ms: round(s.boot_ms, 3),
            pause_ms: round(s.pause_ms, 3),
            snapshot_create_ms: round(s.create_ms, 3),
            state_file_bytes: s.state_bytes,
            state_file_disk_bytes: s.state_disk_bytes,
            memory_file_bytes: s.mem_bytes,
            memory_file_disk_bytes: s.mem_disk_bytes,
        },
        rows: r.rows.iter().map(restore_row).collect(),
        not_run: not_run(&r.skipped),
        own_memory: r
            .memory
            .iter()
            .map(|(label, v)| RestoreMemory {
                label,
                memory: own_memory("ember", v),
            })
            .collect(),
        density: r
            .density
            .iter()
            .map(|d| density(d, r.guest_bytes))
            .collect(),
        ratios: [
            restore::RESTORE,
            restore::RESTORE_PREFAULT,
            restore::API_LOAD,
        ]
        .into_iter()
        .filter(|l| r.row(l).is_some())
        .map(|l| RestoreRatios {
            row: l,
            over_crun: ratio(l, "crun"),
            over_ember_boot: ratio(l, restore::EMBER_BOOT),
            over_firecracker: ratio(l, restore::FIRECRACKER_LOAD),
        })
        .collect(),
        goals: Goals {
            faster_than_crun: r.faster_than_crun(),
            at_most_half_of_firecracker: r.half_of_firecracker(),
        },
        notes: &r.notes,
    }
}

fn mode(m: &ModeResult) -> Mode<'_> {
    let ember = m.ember();
    Mode {
        mode: m.mode.name(),
        guest: &m.guest,
        marker: &m.marker,
        rounds: m.rounds,
        systems: m.systems.iter().map(|s| system(s, ember)).collect(),
        not_run: not_run(&m.skipped),
        own_memory: m
            .memory
            .iter()
            .map(|(k, v)| own_memory(k.name(), v))
            .collect(),
    }
}

/// The whole report as JSON: host, command, and per mode every system's summary, samples and
/// (Ember) timelines.
pub fn to_string(r: &Report) -> Result<String, serde_json::Error> {
    let h = &r.host;
    let file = File {
        date: &h.date,
        command: &r.command,
        host: Host {
            kvm: h.kvm.short(),
            description: h.kvm.describe(),
            cpus: h.cpus,
            cpu_model: &h.cpu_model,
            kernel: &h.kernel,
            memory_mib: h.memory_mib,
        },
        notes: &r.notes,
        modes: r.modes.iter().map(mode).collect(),
        restore: r.restore.iter().map(restore).collect(),
        exec: r.exec.as_ref().map(crate::exec::json),
    };
    let mut text = serde_json::to_string_pretty(&file)?;
    text.push('\n');
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::report;
    use serde_json::{json, Value};

    #[test]
    fn the_file_has_every_figure_under_its_name() {
        let j: Value = serde_json::from_str(&to_string(&report()).unwrap()).unwrap();
        assert_eq!(j["host"]["kvm"], "kvm_pvm");
        assert_eq!(j["host"]["cpu_model"], "a \"quoted\" CPU");
        let m = &j["modes"][0];
        assert_eq!(m["mode"], "null");
        let ember = &m["systems"][0];
        assert_eq!(ember["system"], "ember");
        assert_eq!(
            (&ember["good_runs"], &ember["runs"]),
            (&json!(3), &json!(3))
        );
        assert_eq!(ember["ready_ms"]["median"], 3.0);
        // Samples to the microsecond, RSS in whole KiB.
        assert_eq!(ember["samples"]["ready_ms"], json!([3.0, 2.0, 4.0]));
        assert_eq!(ember["samples"]["peak_rss_kib"], json!([2048, 2048, 2048]));
        assert_eq!(ember["peak_rss_mib"]["median"], 2.0);
        assert_eq!(ember["peer_over_ember"], Value::Null);
        assert_eq!(ember["phase_median_ms"]["args_parsed..vm_created"], 0.3);
        assert_eq!(ember["timelines_us"][0]["ready_marker"], 2000);
        assert_eq!(ember["timelines_us"][0]["guest_exit"], Value::Null);

        let floor = &m["systems"][1];
        assert_eq!(floor["peer_over_ember"]["ready"], 0.5);
        assert_eq!(floor["failures"][0], "no ready line, exit status 1");
        assert!(floor.get("timelines_us").is_none(), "{floor}");
        assert_eq!(m["not_run"][0]["system"], "docker");
        assert_eq!(m["own_memory"][0]["own_mib"], 1.938);
        assert_eq!(m["own_memory"][0]["guest_mapping_mib"], 128.0);
        assert_eq!(m["own_memory"][1]["error"], "echo-pvh.elf is missing");
    }

    #[test]
    fn the_restore_section_has_its_rows_density_and_goals() {
        let mut r = report();
        r.restore.push(crate::fixture::restore_result());
        let j: Value = serde_json::from_str(&to_string(&r).unwrap()).unwrap();
        let x = &j["restore"][0];
        assert_eq!(x["guest_name"], "counter");
        assert_eq!(x["guest_ram_mib"], 128.0);
        assert_eq!(x["typed_at_spawn"], "r");
        assert_eq!(x["setup"]["snapshot_create_ms"], 45.0);
        assert_eq!(x["setup"]["memory_file_bytes"], 134217728);
        assert_eq!(x["setup"]["memory_file_disk_bytes"], 53248);
        let row = &x["rows"][0];
        assert_eq!(row["label"], "ember restore");
        assert_eq!(row["system"], "ember");
        assert_eq!(row["ready_ms"]["median"], 10.0);
        assert_eq!(row["samples"]["ready_ms"], json!([10.0, 9.0, 11.0]));
        assert!(row.get("load_request_ms").is_none(), "{row}");
        assert_eq!(x["rows"][2]["load_request_ms"]["median"], 2.0);
        assert_eq!(x["rows"][4]["label"], "crun");
        assert_eq!(x["not_run"][0]["system"], "firecracker");
        assert_eq!(x["own_memory"][0]["label"], "ember restore");
        assert_eq!(x["own_memory"][0]["own_mib"], 2.375);
        let d = &x["density"];
        assert_eq!(d[0]["prefault"], false);
        assert_eq!(d[1]["label"], "ember restore --prefault");
        assert_eq!(d[0]["all_ready_ms"]["median"], 35.0);
        assert_eq!(d[0]["pss_per_clone_mib"]["median"], 1.0);
        assert_eq!(d[1]["total_pss_mib"]["median"], 66.0);
        assert_eq!(d[1]["n_x_guest_ram_mib"], 256.0);
        assert_eq!(d[1]["total_pss_over_n_x_guest_ram"], 0.2578);
        assert_eq!(x["ratios"][0]["row"], "ember restore");
        assert_eq!(x["ratios"][0]["over_crun"], 0.5);
        assert_eq!(x["ratios"][0]["over_ember_boot"], 3.333);
        assert_eq!(x["ratios"][0]["over_firecracker"], Value::Null);
        assert_eq!(x["goals"]["faster_than_crun"], true);
        assert_eq!(x["goals"]["at_most_half_of_firecracker"], Value::Null);
        // The other modes are as they were.
        assert_eq!(j["modes"][0]["mode"], "null");
    }

    #[test]
    fn phases_keep_boot_order() {
        let text = to_string(&report()).unwrap();
        let timeline = text.split("\"timelines_us\"").nth(1).unwrap();
        let at = |p: &str| timeline.find(&format!("\"{p}\"")).unwrap();
        assert!(PHASES.windows(2).all(|w| at(w[0]) < at(w[1])), "{timeline}");
        let steps = text.split("\"phase_median_ms\"").nth(1).unwrap();
        let at = |s: &str| steps.find(s).unwrap();
        assert!(at("args_parsed..vm_created") < at("first_serial_byte..ready_marker"));
        // The steps' map is in boot order, where a sorted one would start with `args_parsed`
        // and follow with `devices_ready`.
        assert!(at("memory_mapped..kernel_loaded") < at("kernel_loaded..devices_ready"));
        assert!(at("vm_created..memory_mapped") < at("devices_ready..first_kvm_run"));
    }
}

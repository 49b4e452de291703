//! `--json FILE`: every figure and sample of the report, written with serde_json. The structs
//! here are the file's schema, field for field; the report's own types stay free to change.
//!
//! Figures are rounded as the text report shows them finer: times and MiB to 3 decimals (a
//! microsecond, a KiB), so the file carries no float noise.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde::Serialize as DeriveSerialize;

use crate::phases::{Timeline, PHASES};
use crate::report::{median_ratio, mib};
use crate::stats::Summary;
use crate::systems::Kind;
use crate::{ModeResult, Report, SystemResult};

#[derive(DeriveSerialize)]
struct File<'a> {
    date: &'a str,
    command: &'a str,
    host: Host<'a>,
    notes: &'a [String],
    modes: Vec<Mode<'a>>,
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

fn mode(m: &ModeResult) -> Mode<'_> {
    let ember = m.ember();
    let mib3 = |kib: u64| round(mib(kib as f64), 3);
    Mode {
        mode: m.mode.name(),
        guest: &m.guest,
        marker: &m.marker,
        rounds: m.rounds,
        systems: m.systems.iter().map(|s| system(s, ember)).collect(),
        not_run: m
            .skipped
            .iter()
            .map(|s| NotRun {
                system: s.kind.name(),
                reason: &s.reason,
            })
            .collect(),
        own_memory: m
            .memory
            .iter()
            .map(|(k, v)| match v {
                Ok(v) => OwnMemory::Measured {
                    system: k.name(),
                    own_mib: mib3(v.own),
                    peak_rss_mib: mib3(v.peak_rss),
                    guest_ram_resident_mib: mib3(v.guest_rss),
                    rss_anon_mib: mib3(v.rss_anon),
                    rss_file_mib: mib3(v.rss_file),
                    own_pss_mib: mib3(v.own_pss),
                    guest_mapping_mib: round(mib(v.guest_mapping_kib as f64), 1),
                    runs: v.runs,
                },
                Err(e) => OwnMemory::NotMeasured {
                    system: k.name(),
                    error: e,
                },
            })
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

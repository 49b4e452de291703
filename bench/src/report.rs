//! The benchmark's figures as text (stdout); json.rs writes the same for `--json`.

use std::fmt::Write as _;

use crate::phases::{self, PHASES};
use crate::stats::{median_index, Summary};
use crate::systems::Kind;
use crate::{Mode, ModeResult, SystemResult};

/// The targets for the null guest (medians; own memory from the probe).
pub const TARGET_READY_MS: f64 = 5.0;
pub const TARGET_EXIT_MS: f64 = 7.0;
pub const TARGET_OWN_MIB: f64 = 3.0;

pub fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

impl SystemResult {
    pub fn ready(&self) -> Option<Summary> {
        Summary::of(&self.ready_ms)
    }

    pub fn exit(&self) -> Option<Summary> {
        Summary::of(&self.exit_ms)
    }

    pub fn rss(&self) -> Option<Summary> {
        Summary::of(&self.rss_kib)
    }

    /// The good runs out of all runs.
    pub fn good(&self) -> (usize, usize) {
        let good = self.ready_ms.len();
        (good, good + self.failures.len())
    }

    /// The median per phase step over all runs (ms), in boot order: `(step, ms)`, where step is
    /// `previous..phase`. Only for Ember.
    pub fn phase_medians(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for w in PHASES.windows(2) {
            let d: Vec<f64> = self
                .timelines
                .iter()
                .filter_map(|t| Some((t.get(w[1])? as f64 - t.get(w[0])? as f64) / 1000.0))
                .collect();
            if let Some(s) = Summary::of(&d) {
                out.push((format!("{}..{}", w[0], w[1]), s.median));
            }
        }
        out
    }

    /// The run with the median ready time, split into the chart's segments.
    pub fn median_segments(&self) -> Option<Vec<(&'static str, f64)>> {
        let i = median_index(&self.ready_ms)?;
        phases::segments(
            self.timelines.get(i)?,
            self.ready_ms[i],
            self.exit_ms.get(i).copied(),
        )
    }
}

impl ModeResult {
    pub fn ember(&self) -> Option<&SystemResult> {
        self.systems.iter().find(|s| s.kind == Kind::Ember)
    }
}

fn fmt_summary(s: Option<Summary>) -> String {
    match s {
        Some(s) => format!(
            "{:>7.1} {:>7.1} {:>7.1} {:>7.1}",
            s.min, s.median, s.p90, s.max
        ),
        None => format!("{:>7} {:>7} {:>7} {:>7}", "-", "-", "-", "-"),
    }
}

/// `peer`'s median over `base`'s, when both were measured.
pub fn median_ratio(peer: Option<Summary>, base: Option<Summary>) -> Option<f64> {
    match (peer, base) {
        (Some(p), Some(b)) if b.median > 0.0 => Some(p.median / b.median),
        _ => None,
    }
}

fn ratio(peer: Option<Summary>, base: Option<Summary>) -> String {
    median_ratio(peer, base).map_or("-".into(), |r| format!("{r:.2}x"))
}

/// One mode's figures as a text table with its notes.
pub fn text(r: &ModeResult) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "== {}: {} rounds, ready line `{}`",
        r.mode.title(),
        r.rounds,
        r.marker
    );
    let _ = writeln!(o, "guest: {}", r.guest);
    let _ = writeln!(
        o,
        "{:<7} {:>5}  {:^31}  {:^31}  {:>8}  {:^22}",
        "",
        "good",
        "launch -> ready (ms)",
        "launch -> exit (ms)",
        "peak RSS",
        "peer / ember (median)"
    );
    let _ = writeln!(
        o,
        "{:<7} {:>5}  {:>7} {:>7} {:>7} {:>7}  {:>7} {:>7} {:>7} {:>7}  {:>8}  {:>6} {:>6} {:>6}",
        "system",
        "runs",
        "min",
        "median",
        "p90",
        "max",
        "min",
        "median",
        "p90",
        "max",
        "MiB",
        "ready",
        "exit",
        "RSS"
    );
    let ember = r.ember();
    for s in &r.systems {
        let (good, all) = s.good();
        let rss = s
            .rss()
            .map_or("-".into(), |x| format!("{:.1}", mib(x.median)));
        let ratios = if s.kind == Kind::Ember {
            String::new()
        } else {
            let e = ember;
            format!(
                "{:>6} {:>6} {:>6}",
                ratio(s.ready(), e.and_then(|e| e.ready())),
                ratio(s.exit(), e.and_then(|e| e.exit())),
                ratio(s.rss(), e.and_then(|e| e.rss()))
            )
        };
        let _ = writeln!(
            o,
            "{:<7} {:>5}  {}  {}  {:>8}  {}",
            s.kind.name(),
            format!("{good}/{all}"),
            fmt_summary(s.ready()),
            fmt_summary(s.exit()),
            rss,
            ratios
        );
    }
    for s in &r.systems {
        if let Some(n) = &s.note {
            let _ = writeln!(o, "  {}: {n}", s.kind.name());
        }
        if let Some(f) = s.failures.first() {
            let _ = writeln!(
                o,
                "  {}: {} failed run(s), first: {f}",
                s.kind.name(),
                s.failures.len()
            );
        }
    }
    for sk in &r.skipped {
        let _ = writeln!(o, "  {}: not run: {}", sk.kind.name(), sk.reason);
    }
    if let Some(e) = ember {
        let steps = e.phase_medians();
        if !steps.is_empty() {
            let _ = writeln!(o, "ember phases (median ms, Ember's own clock from main):");
            for (name, v) in steps {
                let _ = writeln!(o, "  {name:<36} {v:>8.2}");
            }
        }
        if let Some(seg) = e.median_segments() {
            let parts: Vec<String> = seg.iter().map(|(n, v)| format!("{n} {v:.2}")).collect();
            let _ = writeln!(o, "ember median run (ms from spawn): {}", parts.join(" | "));
        }
    }
    for (kind, m) in &r.memory {
        match m {
            Ok(m) => {
                let _ = writeln!(
                    o,
                    "{} own memory: {:.2} MiB = peak RSS {:.2} MiB - guest RAM resident {:.2} MiB \
                     (at the ready line: RssAnon {:.2} MiB incl. guest RAM, RssFile {:.2} MiB, \
                     PSS without guest RAM {:.2} MiB; interactive probe guest, median of {})",
                    kind.name(),
                    mib(m.own as f64),
                    mib(m.peak_rss as f64),
                    mib(m.guest_rss as f64),
                    mib(m.rss_anon as f64),
                    mib(m.rss_file as f64),
                    mib(m.own_pss as f64),
                    m.runs
                );
            }
            Err(e) => {
                let _ = writeln!(o, "{} own memory: not measured: {e}", kind.name());
            }
        }
    }
    if r.mode == Mode::Null {
        let floor = r.systems.iter().find(|s| s.kind == Kind::Floor);
        if let (Some(e), Some(f)) = (ember, floor) {
            let _ = writeln!(
                o,
                "ember / floor (the least a KVM VMM can do on this host): ready {}, exit {}",
                ratio(e.ready(), f.ready()),
                ratio(e.exit(), f.exit())
            );
        }
        if let Some(e) = ember {
            let own = r
                .memory
                .iter()
                .find(|(k, _)| *k == Kind::Ember)
                .and_then(|(_, m)| m.as_ref().ok())
                .map(|m| mib(m.own as f64));
            let _ = writeln!(
                o,
                "targets: {}; {}; {}",
                target(
                    "launch->ready",
                    e.ready().map(|s| s.median),
                    TARGET_READY_MS,
                    "ms"
                ),
                target(
                    "launch->exit",
                    e.exit().map(|s| s.median),
                    TARGET_EXIT_MS,
                    "ms"
                ),
                target("own memory", own, TARGET_OWN_MIB, "MiB")
            );
        }
    }
    o
}

fn target(what: &str, v: Option<f64>, limit: f64, unit: &str) -> String {
    match v {
        Some(v) if v < limit => format!("{what} {v:.2} {unit} < {limit} {unit}: met"),
        Some(v) => format!("{what} {v:.2} {unit} >= {limit} {unit}: MISSED"),
        None => format!("{what}: not measured"),
    }
}

//! The benchmark's figures as text (stdout); json.rs writes the same for `--json`.

use std::fmt::Write as _;

use crate::phases::{self, PHASES};
use crate::restore::{self, Density, RestoreResult, Row};
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
    /// `previous..phase`. Phases no run reached are left out, so that a restore (which loads no
    /// kernel) has a step from memory_mapped to devices_ready. Only for Ember.
    pub fn phase_medians(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        let reached: Vec<&str> = PHASES
            .into_iter()
            .filter(|p| self.timelines.iter().any(|t| t.get(p).is_some()))
            .collect();
        for w in reached.windows(2) {
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

/// The second header line of a figures table: the first column `w` wide, then the runs, the
/// two min/median/p90/max groups, the RSS column and the ratio columns.
fn column_heads(first: &str, w: usize, ratios: &[&str]) -> String {
    let mut line = format!("{first:<w$} {:>5} ", "runs");
    for _ in 0..2 {
        for h in ["min", "median", "p90", "max"] {
            line.push_str(&format!(" {h:>7}"));
        }
        line.push(' ');
    }
    line.push_str(&format!(" {:>8} ", "MiB"));
    for r in ratios {
        line.push_str(&format!(" {r:>6}"));
    }
    line
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
        "{}",
        column_heads("system", 7, &["ready", "exit", "RSS"])
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

impl RestoreResult {
    pub fn row(&self, label: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.label == label)
    }

    fn ready(&self, label: &str) -> Option<Summary> {
        self.row(label).and_then(|r| r.result.ready())
    }

    /// `label`'s median ready time over `base`'s.
    pub fn ready_ratio(&self, label: &str, base: &str) -> Option<f64> {
        median_ratio(self.ready(label), self.ready(base))
    }

    /// Issue 12's goal against a crun container start: Some(met) when both were measured.
    pub fn faster_than_crun(&self) -> Option<bool> {
        self.ready_ratio(restore::RESTORE, "crun").map(|r| r < 1.0)
    }

    /// Issue 12's goal against Firecracker's restore (at most half its time), where measured.
    pub fn half_of_firecracker(&self) -> Option<bool> {
        self.ready_ratio(restore::RESTORE, restore::FIRECRACKER_LOAD)
            .map(|r| r <= 0.5)
    }
}

impl Density {
    pub fn label(&self) -> &'static str {
        if self.prefault {
            restore::RESTORE_PREFAULT
        } else {
            restore::RESTORE
        }
    }
}

fn kib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0
}

/// A byte count the way a person reads it.
pub fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes < 1 << 20 {
        format!("{:.1} KiB", b / 1024.0)
    } else if bytes < 1 << 30 {
        format!("{:.1} MiB", b / f64::from(1 << 20))
    } else {
        format!("{:.2} GiB", b / f64::from(1 << 30))
    }
}

fn med(v: &[f64]) -> Option<f64> {
    Summary::of(v).map(|s| s.median)
}

fn fmt_opt(v: Option<f64>, unit: &str, places: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.places$}{unit}"))
}

/// The restore mode's figures for one guest.
pub fn restore_text(r: &RestoreResult) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "== {}, {} guest: {} rounds; each restored guest is typed {:?} at spawn, and its answer \
         `{}` is its ready line",
        Mode::Restore.title(),
        r.guest_name,
        r.rounds,
        r.trigger,
        r.marker
    );
    let _ = writeln!(
        o,
        "guest: {}; {} of RAM; ended by {} (the exit column)",
        r.guest,
        size(r.guest_bytes),
        r.ended_by
    );
    let s = &r.setup;
    let _ = writeln!(
        o,
        "set-up (once; not start-up): boot to the snapshot point {:.1} ms; pause {:.2} ms; \
         snapshot create {:.1} ms (each request sent -> 204)",
        s.boot_ms, s.pause_ms, s.create_ms
    );
    let _ = writeln!(
        o,
        "snapshot files: state {} ({} on disk); memory {} ({} on disk: the file is sparse)",
        size(s.state_bytes),
        size(s.state_disk_bytes),
        size(s.mem_bytes),
        size(s.mem_disk_bytes)
    );
    let w = r
        .rows
        .iter()
        .map(|x| x.label.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let _ = writeln!(
        o,
        "{:<w$} {:>5}  {:^31}  {:^31}  {:>8}  {:^13}",
        "", "good", "launch -> ready (ms)", "launch -> exit (ms)", "peak RSS", "row / crun"
    );
    let _ = writeln!(o, "{}", column_heads("row", w, &["ready", "exit"]));
    let crun = r.row("crun").map(|c| &c.result);
    for row in &r.rows {
        let x = &row.result;
        let (good, all) = x.good();
        let rss = x
            .rss()
            .map_or("-".into(), |v| format!("{:.1}", mib(v.median)));
        let ratios = if x.kind == Kind::Crun {
            String::new()
        } else {
            format!(
                "{:>6} {:>6}",
                ratio(x.ready(), crun.and_then(|c| c.ready())),
                ratio(x.exit(), crun.and_then(|c| c.exit()))
            )
        };
        let _ = writeln!(
            o,
            "{:<w$} {:>5}  {}  {}  {:>8}  {}",
            row.label,
            format!("{good}/{all}"),
            fmt_summary(x.ready()),
            fmt_summary(x.exit()),
            rss,
            ratios
        );
    }
    for row in &r.rows {
        let x = &row.result;
        if row.marker != r.marker {
            let _ = writeln!(o, "  {}: ready line `{}`", row.label, row.marker);
        }
        if let Some(n) = &x.note {
            let _ = writeln!(o, "  {}: {n}", row.label);
        }
        if let Some(l) = Summary::of(&row.load_ms) {
            let _ = writeln!(
                o,
                "  {}: PUT /snapshot/load sent -> 204: median {:.2} ms (min {:.2}, max {:.2})",
                row.label, l.median, l.min, l.max
            );
        }
        if let Some(f) = x.failures.first() {
            let _ = writeln!(
                o,
                "  {}: {} failed run(s), first: {f}",
                row.label,
                x.failures.len()
            );
        }
    }
    for sk in &r.skipped {
        let _ = writeln!(o, "  {}: not run: {}", sk.kind.name(), sk.reason);
    }
    for row in r.rows.iter().filter(|x| x.result.kind == Kind::Ember) {
        let steps = row.result.phase_medians();
        if steps.is_empty() || row.label == restore::EMBER_BOOT {
            continue;
        }
        let parts: Vec<String> = steps
            .iter()
            .map(|(step, v)| {
                let to = step.split("..").nth(1).unwrap_or(step);
                format!("{to} +{v:.2}")
            })
            .collect();
        let _ = writeln!(
            o,
            "{} phases (median ms, each from the one before, Ember's own clock from main): {}",
            row.label,
            parts.join(" | ")
        );
    }
    for (label, m) in &r.memory {
        match m {
            Ok(m) => {
                let _ = writeln!(
                    o,
                    "{label} own memory: {:.2} MiB = peak RSS {:.2} MiB - guest RAM resident {:.2} \
                     MiB (the memory file's pages it mapped; at the ready line: PSS without \
                     guest RAM {:.2} MiB; median of {})",
                    mib(m.own as f64),
                    mib(m.peak_rss as f64),
                    mib(m.guest_rss as f64),
                    mib(m.own_pss as f64),
                    m.runs
                );
            }
            Err(e) => {
                let _ = writeln!(o, "{label} own memory: not measured: {e}");
            }
        }
    }
    let against = |base: &str| {
        [
            restore::RESTORE,
            restore::RESTORE_PREFAULT,
            restore::API_LOAD,
        ]
        .into_iter()
        .filter_map(|l| Some(format!("{l} {:.2}x", r.ready_ratio(l, base)?)))
        .collect::<Vec<_>>()
    };
    for (base, what) in [
        ("crun", "a crun container start"),
        (restore::EMBER_BOOT, "Ember's null-guest boot"),
        (restore::FIRECRACKER_LOAD, "Firecracker's snapshot load"),
    ] {
        let parts = against(base);
        if !parts.is_empty() {
            let _ = writeln!(
                o,
                "launch -> ready over {what} (medians): {}",
                parts.join("; ")
            );
        }
    }
    let crun_goal = match (
        r.faster_than_crun(),
        r.ready(restore::RESTORE),
        r.ready("crun"),
    ) {
        (Some(met), Some(e), Some(c)) => format!(
            "faster than a crun container start: {} ({:.2} ms {} crun's {:.2} ms)",
            if met { "met" } else { "MISSED" },
            e.median,
            if met { "<" } else { ">=" },
            c.median
        ),
        _ => "faster than a crun container start: not measured (no crun row)".into(),
    };
    let fc_goal = match r.half_of_firecracker() {
        Some(met) => format!(
            "at most 0.5x Firecracker's restore: {} ({})",
            if met { "met" } else { "MISSED" },
            fmt_opt(
                r.ready_ratio(restore::RESTORE, restore::FIRECRACKER_LOAD),
                "x",
                2
            )
        ),
        None => {
            let why = r
                .skipped
                .iter()
                .find(|s| s.kind == Kind::Firecracker)
                .map_or("not run", |s| s.reason.as_str());
            format!("at most 0.5x Firecracker's restore: not measurable here (firecracker: {why})")
        }
    };
    let _ = writeln!(o, "goals (issue 12): {crun_goal}; {fc_goal}");
    for d in &r.density {
        density_text(&mut o, d, r.guest_bytes, r.rounds);
    }
    for n in &r.notes {
        let _ = writeln!(o, "note: {n}");
    }
    o
}

fn density_text(o: &mut String, d: &Density, guest_bytes: u64, rounds: u32) {
    let n = d.clones;
    let all = n as u64 * guest_bytes;
    let total = med(&d.total_pss_kib);
    let _ = writeln!(
        o,
        "density, {}: {n} clones restored at once from the one snapshot, {}/{rounds} rounds good \
         (medians): all {n} answered {} ms after the first spawn (each {} ms from its own); per \
         clone PSS {} (guest RAM's share {}), RSS {} (guest RAM {}); the {n} clones' PSS {} = \
         {} of {n} x guest RAM ({})",
        d.label(),
        d.all_ready_ms.len(),
        fmt_opt(med(&d.all_ready_ms), "", 1),
        fmt_opt(med(&d.clone_ready_ms), "", 1),
        fmt_opt(med(&d.pss_kib).map(mib), " MiB", 2),
        fmt_opt(med(&d.guest_pss_kib).map(mib), " MiB", 2),
        fmt_opt(med(&d.rss_kib).map(mib), " MiB", 2),
        fmt_opt(med(&d.guest_rss_kib).map(mib), " MiB", 2),
        fmt_opt(total.map(mib), " MiB", 1),
        fmt_opt(total.map(|t| 100.0 * t / kib(all)), "%", 1),
        size(all)
    );
    if let Some(f) = d.failures.first() {
        let _ = writeln!(o, "  {} failed round(s), first: {f}", d.failures.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::restore_result;

    #[test]
    fn the_restore_report_has_its_rows_ratios_goals_and_density() {
        let t = restore_text(&restore_result());
        let row = |label: &str| {
            t.lines()
                .find(|l| l.starts_with(label) && l[label.len()..].starts_with("  "))
                .unwrap_or_else(|| panic!("no {label} row:\n{t}"))
                .to_string()
        };
        let r = row("ember restore ");
        assert!(
            r.contains(" 3/3 ") && r.contains("10.0") && r.contains("0.50x"),
            "{r}"
        );
        assert!(row("ember restore --prefault").contains("0.60x"), "{t}");
        assert!(row("crun").contains(" 20.0 "), "{t}");
        for want in [
            "snapshot create 45.0 ms",
            "memory 128.0 MiB (52.0 KiB on disk",
            "PUT /snapshot/load sent -> 204: median 2.00 ms",
            "firecracker: not run: not found on PATH",
            "over a crun container start (medians): ember restore 0.50x",
            "faster than a crun container start: met (10.00 ms < crun's 20.00 ms)",
            "at most 0.5x Firecracker's restore: not measurable here",
            "ember restore own memory: 2.38 MiB",
            "density, ember restore --prefault: 2 clones",
            "per clone PSS 33.00 MiB",
            "PSS 66.0 MiB = 25.8% of 2 x guest RAM (256.0 MiB)",
        ] {
            assert!(t.contains(want), "no {want:?} in\n{t}");
        }
    }

    #[test]
    fn column_heads_line_up_with_the_rows() {
        assert_eq!(
            column_heads("system", 7, &["ready", "exit", "RSS"]),
            format!(
                "{:<7} {:>5}  {:>7} {:>7} {:>7} {:>7}  {:>7} {:>7} {:>7} {:>7}  {:>8}  {:>6} {:>6} {:>6}",
                "system", "runs", "min", "median", "p90", "max", "min", "median", "p90", "max",
                "MiB", "ready", "exit", "RSS"
            )
        );
    }

    #[test]
    fn phase_steps_bridge_what_a_restore_does_not_do() {
        let mut r = restore_result().rows.remove(0).result;
        // A restore loads no kernel: memory_mapped is followed by devices_ready.
        let t = crate::phases::Timeline([
            Some(100),
            Some(400),
            Some(900),
            None,
            Some(1300),
            Some(1500),
            Some(1600),
            Some(2000),
            Some(5000),
        ]);
        r.timelines = vec![t];
        let steps: Vec<String> = r.phase_medians().into_iter().map(|(s, _)| s).collect();
        assert!(
            steps.contains(&"memory_mapped..devices_ready".to_string()),
            "{steps:?}"
        );
        assert_eq!(steps.len(), 7, "{steps:?}");
    }
}

//! `--chart FILE`: the figures as a standalone SVG (hand-written; any browser opens it).
//!
//! Per mode: one bar per system to its median launch-to-ready time, continued in a lighter
//! shade to the median launch-to-exit time; Ember's ready part is stacked by boot phase (from
//! the run with the median ready time, scaled to the median). Below, Ember's phases once more on
//! their own scale, with their values, since next to a container runtime they are thin. The
//! restore mode gets a panel of its own per guest: a bar per row (restores, the API load, the
//! reference boot and containers), then its set-up, density and crun ratio as text.

use std::fmt::Write as _;

use crate::report::{mib, size};
use crate::restore::RestoreResult;
use crate::stats::Summary;
use crate::systems::Kind;
use crate::{ModeResult, Report, SystemResult};

const W: f64 = 960.0;
const LABEL_W: f64 = 96.0;
const VALUE_W: f64 = 300.0;
const BAR_H: f64 = 20.0;
const ROW_H: f64 = 32.0;
const PHASE_COLORS: [&str; 8] = [
    "#8d99ae", "#e76f51", "#f4a261", "#e9c46a", "#2a9d8f", "#264653", "#d62828", "#bcb8b1",
];

fn system_color(k: Kind) -> &'static str {
    match k {
        Kind::Ember => "#e8590c",
        Kind::Floor => "#868e96",
        Kind::Qemu => "#7048e8",
        Kind::Podman => "#1971c2",
        Kind::Docker => "#1c7ed6",
        Kind::Runc => "#2f9e44",
        Kind::Crun => "#0c8599",
        Kind::Firecracker => "#c2255c",
    }
}

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round axis step for values up to `max`: 1, 2 or 5 times a power of ten, ~5 ticks.
pub fn tick_step(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / 5.0;
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p)
}

fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Splits `text` into lines of at most `max` characters at spaces (a longer word stays whole).
pub fn wrap(text: &str, max: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split(' ') {
        if !cur.is_empty() && cur.chars().count() + 1 + word.chars().count() > max {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

/// Writes `text` wrapped, one <text> per line, from baseline `y`; returns the last baseline.
fn lines(o: &mut String, x: f64, mut y: f64, size: u32, fill: &str, text: &str) -> f64 {
    // ~0.55 em per character in Helvetica at these sizes.
    let max = ((W - x - 16.0) / (f64::from(size) * 0.55)) as usize;
    for (i, l) in wrap(text, max.max(20)).iter().enumerate() {
        if i > 0 {
            y += f64::from(size) + 3.0;
        }
        let _ = writeln!(
            o,
            r##"<text x="{x}" y="{y}" font-size="{size}" fill="{fill}">{}</text>"##,
            esc(l)
        );
    }
    y
}

/// Whether Ember's segments end with the ready-to-exit part (not when it was stopped).
fn has_exit(seg: &[(&'static str, f64)]) -> bool {
    seg.last().is_some_and(|(n, _)| *n == "ready line to exit")
}

/// Segment `i`'s colour in the phase-by-phase strip: the ready-to-exit part is grey, as the
/// lighter continuation of the bars above is.
fn segment_color(seg: &[(&'static str, f64)], i: usize) -> &'static str {
    if has_exit(seg) && i == seg.len() - 1 {
        "#dee2e6"
    } else {
        PHASE_COLORS[i % PHASE_COLORS.len()]
    }
}

fn ready_part<'a>(seg: &'a [(&'static str, f64)]) -> &'a [(&'static str, f64)] {
    if has_exit(seg) {
        &seg[..seg.len() - 1]
    } else {
        seg
    }
}

/// An axis label: tick steps are 1, 2 or 5 times a power of ten, so no rounding is needed,
/// only the float noise of repeated addition removed.
fn fmt_tick(t: f64) -> String {
    let s = format!("{t:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

pub fn svg(r: &Report) -> String {
    let mut body = String::new();
    let mut y = 36.0;
    let _ = writeln!(
        body,
        r##"<text x="16" y="{y}" font-size="18" font-weight="bold">Ember start-up benchmark</text>"##
    );
    y += 20.0;
    y = lines(
        &mut body,
        16.0,
        y,
        12,
        "#444",
        &format!("{} · {}", r.host.date, r.host.describe()),
    );
    y += 2.0;
    for n in &r.notes {
        y = lines(&mut body, 16.0, y + 16.0, 11, "#a61e4d", n);
    }
    for m in &r.modes {
        y = mode_panel(&mut body, m, y + 28.0);
    }
    for x in &r.restore {
        y = restore_panel(&mut body, x, y + 28.0);
    }
    y += 24.0;
    y = lines(&mut body, 16.0, y, 11, "#666", &r.command);
    let h = y + 16.0;
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" viewBox=\"0 0 {W} {h}\" font-family=\"Helvetica, Arial, sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n"
    )
}

/// One bar of a panel.
struct Bar<'a> {
    label: &'a str,
    bold: bool,
    result: &'a SystemResult,
    /// Ember's ready part stacked by boot phase.
    stacked: bool,
}

/// Draws `rows` as bars from `y` (labels right-aligned in the first `label_w` pixels, the axis
/// in ms) and returns the y of the axis labels.
fn bar_rows(o: &mut String, rows: &[Bar<'_>], y: f64, label_w: f64) -> f64 {
    let mut y = y;
    let x0 = label_w;
    let span = W - label_w - VALUE_W - 16.0;
    let max = rows
        .iter()
        .flat_map(|b| [b.result.ready(), b.result.exit()])
        .flatten()
        .map(|x| x.median)
        .fold(0.0, f64::max);
    let step = tick_step(max);
    let top = (max / step).ceil().max(1.0) * step;
    let scale = span / top;
    let n = rows.len() as f64;
    // Grid and axis labels.
    let grid_bottom = y + 8.0 + n * ROW_H;
    let mut t = 0.0;
    while t <= top + step / 2.0 {
        let x = x0 + t * scale;
        let _ = writeln!(
            o,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{grid_bottom:.1}" stroke="#e9ecef"/><text x="{x:.1}" y="{:.1}" font-size="10" fill="#666" text-anchor="middle">{} ms</text>"##,
            y + 4.0,
            grid_bottom + 12.0,
            fmt_tick(t)
        );
        t += step;
    }
    y += 8.0;
    for bar in rows {
        let s = bar.result;
        let Some(ready) = s.ready() else {
            continue;
        };
        let exit = s.exit();
        let by = y + (ROW_H - BAR_H) / 2.0;
        let color = system_color(s.kind);
        let weight = if bar.bold { "bold" } else { "normal" };
        let _ = writeln!(
            o,
            r##"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="end" font-weight="{weight}">{}</text>"##,
            x0 - 8.0,
            by + 15.0,
            esc(bar.label)
        );
        let wr = ready.median * scale;
        let we = exit.map_or(wr, |e| (e.median * scale).max(wr));
        let _ = writeln!(
            o,
            r##"<rect x="{x0:.1}" y="{by:.1}" width="{we:.1}" height="{BAR_H}" fill="{color}" fill-opacity="0.3"/>"##
        );
        match s.median_segments().filter(|_| bar.stacked) {
            Some(seg) => {
                let seg = ready_part(&seg);
                let run_ready: f64 = seg.iter().map(|(_, v)| v).sum();
                let k = if run_ready > 0.0 {
                    ready.median / run_ready
                } else {
                    1.0
                };
                let mut x = x0;
                for (i, (name, v)) in seg.iter().enumerate() {
                    let w = v * k * scale;
                    let _ = writeln!(
                        o,
                        r##"<rect x="{x:.2}" y="{by:.1}" width="{w:.2}" height="{BAR_H}" fill="{}"><title>{} {:.2} ms</title></rect>"##,
                        PHASE_COLORS[i % PHASE_COLORS.len()],
                        esc(name),
                        v
                    );
                    x += w;
                }
            }
            None => {
                let _ = writeln!(
                    o,
                    r##"<rect x="{x0:.1}" y="{by:.1}" width="{wr:.1}" height="{BAR_H}" fill="{color}"/>"##
                );
            }
        }
        let rss = s
            .rss()
            .map_or(String::new(), |r| format!(" · {:.1} MiB", mib(r.median)));
        let exit = exit.map_or(String::new(), |e| {
            format!(" · exit {} ms", fmt_ms(e.median))
        });
        let _ = writeln!(
            o,
            r##"<text x="{:.1}" y="{:.1}" font-size="12">ready {} ms{exit}{rss}</text>"##,
            W - VALUE_W,
            by + 15.0,
            fmt_ms(ready.median),
        );
        y += ROW_H;
    }
    grid_bottom
}

/// A panel's title and the line under it, from `y`; returns the y below them.
fn heading(o: &mut String, y: f64, title: &str, subtitle: &str) -> f64 {
    let _ = writeln!(
        o,
        r##"<text x="16" y="{y}" font-size="15" font-weight="bold">{}</text>"##,
        esc(title)
    );
    let y = y + 18.0;
    let _ = writeln!(
        o,
        r##"<text x="16" y="{y}" font-size="11" fill="#444">{}</text>"##,
        esc(subtitle)
    );
    y + 14.0
}

/// The restore mode's labels are longer than a system's name.
const RESTORE_LABEL_W: f64 = 200.0;

/// Draws the restore mode for one guest from `y`: a bar per row, then the set-up, density and
/// goals as lines of text; returns the y below it.
fn restore_panel(o: &mut String, r: &RestoreResult, mut y: f64) -> f64 {
    y = heading(
        o,
        y,
        &format!(
            "Snapshot restore, {} guest — median of {} rounds",
            r.guest_name, r.rounds
        ),
        &format!(
            "launch → the restored guest's answer `{}` (solid), → exit (light); the references \
             to their own ready line; peak RSS",
            r.marker
        ),
    );
    let bars: Vec<Bar> = r
        .rows
        .iter()
        .map(|row| Bar {
            label: &row.label,
            bold: row.label.starts_with("ember restore"),
            result: &row.result,
            stacked: false,
        })
        .collect();
    y = bar_rows(o, &bars, y, RESTORE_LABEL_W) + 20.0;
    for sk in &r.skipped {
        y = lines(
            o,
            RESTORE_LABEL_W,
            y + 14.0,
            11,
            "#666",
            &format!("{} not run: {}", sk.kind.name(), sk.reason),
        );
    }
    let s = &r.setup;
    let mut text = vec![format!(
        "Set-up, once: boot {:.1} ms, pause {:.2} ms, snapshot create {:.1} ms; memory file {} ({} on disk), state {}.",
        s.boot_ms,
        s.pause_ms,
        s.create_ms,
        size(s.mem_bytes),
        size(s.mem_disk_bytes),
        size(s.state_bytes)
    )];
    for d in &r.density {
        let med = |v: &[f64]| Summary::of(v).map(|x| x.median);
        if let (Some(all), Some(pss), Some(total)) =
            (med(&d.all_ready_ms), med(&d.pss_kib), med(&d.total_pss_kib))
        {
            text.push(format!(
                "{} clones at once ({}): all answered in {} ms; PSS {:.2} MiB per clone, {:.1} MiB in all ({:.1}% of {} x guest RAM).",
                d.clones,
                d.label(),
                fmt_ms(all),
                mib(pss),
                mib(total),
                100.0 * total / (d.clones as f64 * r.guest_bytes as f64 / 1024.0),
                d.clones
            ));
        }
    }
    if let Some(x) = r.ready_ratio(crate::restore::RESTORE, "crun") {
        text.push(format!("ember restore / crun container start: {x:.2}x."));
    }
    for t in text {
        y = lines(o, 16.0, y + 16.0, 12, "#222", &t);
    }
    y
}

/// Draws one mode from `y`; returns the y below it.
fn mode_panel(o: &mut String, m: &ModeResult, mut y: f64) -> f64 {
    let tail = if m.systems.iter().any(|s| s.exit().is_some()) {
        ", → exit (light)"
    } else {
        " (stopped there)"
    };
    y = heading(
        o,
        y,
        &format!("{} — median of {} rounds", m.mode.title(), m.rounds),
        &format!(
            "launch → ready line `{}` (solid){tail}; peak RSS of the launched process",
            m.marker
        ),
    );
    let bars: Vec<Bar> = m
        .systems
        .iter()
        .map(|s| Bar {
            label: s.kind.name(),
            bold: s.kind == Kind::Ember,
            result: s,
            stacked: s.kind == Kind::Ember,
        })
        .collect();
    let x0 = LABEL_W;
    y = bar_rows(o, &bars, y, LABEL_W) + 20.0;
    for sk in &m.skipped {
        y = lines(
            o,
            x0,
            y + 14.0,
            11,
            "#666",
            &format!("{} not run: {}", sk.kind.name(), sk.reason),
        );
    }
    // Ember's phases on their own scale.
    if let Some(seg) = m.ember().and_then(|e| e.median_segments()) {
        y += 30.0;
        let total: f64 = seg.iter().map(|(_, v)| v).sum();
        let to = if has_exit(&seg) { "exit" } else { "ready" };
        let _ = writeln!(
            o,
            r##"<text x="16" y="{y}" font-size="13" font-weight="bold">Ember, phase by phase (the run with the median ready time: {} ms to {to})</text>"##,
            fmt_ms(total)
        );
        y += 10.0;
        let span = W - 32.0;
        let mut x = 16.0;
        for (i, (name, v)) in seg.iter().enumerate() {
            let w = if total > 0.0 { v / total * span } else { 0.0 };
            let color = segment_color(&seg, i);
            let _ = writeln!(
                o,
                r##"<rect x="{x:.2}" y="{y:.1}" width="{w:.2}" height="{BAR_H}" fill="{color}"><title>{} {:.2} ms</title></rect>"##,
                esc(name),
                v
            );
            x += w;
        }
        y += BAR_H + 8.0;
        // Legend: two columns.
        for (i, (name, v)) in seg.iter().enumerate() {
            let col = (i % 2) as f64;
            let lx = 16.0 + col * 460.0;
            let ly = y + (i / 2) as f64 * 16.0 + 10.0;
            let color = segment_color(&seg, i);
            let _ = writeln!(
                o,
                r##"<rect x="{lx}" y="{:.1}" width="10" height="10" fill="{color}"/><text x="{:.1}" y="{ly:.1}" font-size="11">{} — {} ms</text>"##,
                ly - 9.0,
                lx + 14.0,
                esc(name),
                fmt_ms(*v)
            );
        }
        y += seg.len().div_ceil(2) as f64 * 16.0 + 4.0;
    }
    for (k, mem) in &m.memory {
        if let Ok(mem) = mem {
            y += 16.0;
            let _ = writeln!(
                o,
                r##"<text x="16" y="{y}" font-size="12">{} own memory: {:.2} MiB (peak RSS {:.2} MiB − guest RAM resident {:.2} MiB; PSS {:.2} MiB)</text>"##,
                k.name(),
                mib(mem.own as f64),
                mib(mem.peak_rss as f64),
                mib(mem.guest_rss as f64),
                mib(mem.own_pss as f64)
            );
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(10.0), 2.0);
        assert_eq!(tick_step(42.0), 10.0);
        assert_eq!(tick_step(400.0), 100.0);
        assert_eq!(tick_step(0.0), 1.0);
    }

    #[test]
    fn wrapping_keeps_words_and_limits() {
        assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
        assert_eq!(wrap("averylongword x", 4), vec!["averylongword", "x"]);
        assert!(wrap("", 10).is_empty());
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(fmt_tick(50.0), "50");
        assert_eq!(fmt_tick(0.0), "0");
        assert_eq!(fmt_tick(0.1 + 0.2), "0.3");
        assert_eq!(fmt_tick(2.5), "2.5");
    }

    #[test]
    fn the_chart_has_every_system_and_ember_phase_by_phase() {
        let s = svg(&crate::fixture::report());
        assert!(
            s.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
            "{s}"
        );
        assert!(s.trim_end().ends_with("</svg>"), "{s}");
        assert!(
            s.contains(">ember</text>") && s.contains(">floor</text>"),
            "{s}"
        );
        // Each phase's value is in its tooltip and in the legend.
        assert!(s.contains("<title>create VM 0.30 ms</title>"), "{s}");
        assert!(s.contains("create VM — 0.30 ms</text>"), "{s}");
        // The run went on to exit: the strip ends in the grey ready-to-exit part.
        assert!(
            s.contains("fill=\"#dee2e6\"><title>ready line to exit "),
            "{s}"
        );
        assert!(
            s.contains(">docker not run: docker is not installed</text>"),
            "{s}"
        );
        assert!(s.contains("with &lt;markup&gt; &amp; an ampersand"), "{s}");
        assert!(s.contains("ember own memory: 1.94 MiB"), "{s}");
        assert!(!s.contains("Snapshot restore"), "no restore mode ran: {s}");
    }

    #[test]
    fn the_restore_mode_has_its_panel() {
        let mut r = crate::fixture::report();
        r.restore.push(crate::fixture::restore_result());
        let s = svg(&r);
        assert!(
            s.contains("Snapshot restore, counter guest — median of 3 rounds"),
            "{s}"
        );
        assert!(
            s.contains(">ember restore --prefault</text>") && s.contains(">crun</text>"),
            "{s}"
        );
        assert!(
            s.contains(">firecracker not run: not found on PATH</text>"),
            "{s}"
        );
        assert!(
            s.contains("2 clones at once (ember restore): all answered in 35.0 ms"),
            "{s}"
        );
        assert!(
            s.contains("ember restore / crun container start: 0.50x."),
            "{s}"
        );
        assert!(s.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(esc("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
    }
}

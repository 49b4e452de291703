//! Ember's boot timeline (`ember run --timings=json`), as the benchmark reads it.

use std::collections::HashMap;

/// Ember's phase names, in boot order, as the JSON line spells them.
pub const PHASES: [&str; 9] = [
    "args_parsed",
    "vm_created",
    "memory_mapped",
    "kernel_loaded",
    "devices_ready",
    "first_kvm_run",
    "first_serial_byte",
    "ready_marker",
    "guest_exit",
];

/// One run's timeline: microseconds since Ember's `main` began, per phase (None: not reached).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Timeline(pub [Option<u64>; 9]);

impl Timeline {
    pub fn get(&self, phase: &str) -> Option<u64> {
        PHASES
            .iter()
            .position(|p| *p == phase)
            .and_then(|i| self.0[i])
    }
}

/// Finds the `{"unit":"us",...}` line in Ember's stderr and reads it. A phase this benchmark
/// does not know (added to Ember later) is ignored rather than losing the run; a known phase
/// must be a whole number of microseconds or null, and the unit must be `us`.
pub fn parse(stderr: &[u8]) -> Option<Timeline> {
    #[derive(serde::Deserialize)]
    struct Line {
        unit: String,
        #[serde(flatten)]
        phases: HashMap<String, serde_json::Value>,
    }
    let text = String::from_utf8_lossy(stderr);
    // Ember's other stderr lines are words; the last one that is a JSON object with a unit is
    // the timeline.
    let line = text
        .lines()
        .rev()
        .filter(|l| l.trim_start().starts_with('{'))
        .find_map(|l| serde_json::from_str::<Line>(l.trim()).ok())?;
    if line.unit != "us" {
        return None;
    }
    let mut t = Timeline::default();
    for (slot, phase) in t.0.iter_mut().zip(PHASES) {
        *slot = match line.phases.get(phase) {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(v.as_u64()?),
        };
    }
    Some(t)
}

/// The parts of one Ember launch as the chart stacks them, in ms: from spawn (the benchmark's
/// clock) to the ready line, then to exit. `ready_ms` / `exit_ms` are the benchmark's figures;
/// Ember's own clock starts in `main`, so the first part is exec, the dynamic loader and Rust's
/// start-up plus argument parsing, found as the ready time minus Ember's ready_marker mark.
pub fn segments(
    t: &Timeline,
    ready_ms: f64,
    exit_ms: Option<f64>,
) -> Option<Vec<(&'static str, f64)>> {
    let us = |p: &str| t.get(p).map(|v| v as f64 / 1000.0);
    let ready_mark = us("ready_marker")?;
    let start = ready_ms - ready_mark;
    let marks = [
        ("exec + argument parsing", us("args_parsed")?),
        ("create VM", us("vm_created")?),
        ("map guest memory", us("memory_mapped")?),
        ("load kernel", us("kernel_loaded")?),
        ("devices", us("devices_ready")?),
        ("start vCPU", us("first_kvm_run")?),
        ("guest to ready line", ready_mark),
    ];
    let mut out = Vec::new();
    let mut prev = -start;
    for (name, at) in marks {
        out.push((name, (at - prev).max(0.0)));
        prev = at;
    }
    if let Some(exit_ms) = exit_ms {
        out.push(("ready line to exit", (exit_ms - ready_ms).max(0.0)));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "ember: warning: kvm_pvm\n{\"unit\":\"us\",\"args_parsed\":150,\"vm_created\":5600,\"memory_mapped\":12700,\"kernel_loaded\":12800,\"devices_ready\":13400,\"first_kvm_run\":13600,\"first_serial_byte\":13800,\"ready_marker\":14300,\"guest_exit\":null}\n";

    #[test]
    fn parses_the_timings_line() {
        let t = parse(LINE.as_bytes()).unwrap();
        assert_eq!(t.get("args_parsed"), Some(150));
        assert_eq!(t.get("ready_marker"), Some(14300));
        assert_eq!(t.get("guest_exit"), None);
    }

    #[test]
    fn rejects_what_is_not_the_timings_line() {
        assert_eq!(parse(b"ember: error: no kernel\n"), None);
        assert_eq!(parse(b"{\"unit\":\"ms\",\"args_parsed\":1}\n"), None);
        assert_eq!(parse(b"{\"unit\":\"us\",\"args_parsed\":x}\n"), None);
        assert_eq!(parse(b"{\"unit\":\"us\",\"args_parsed\":-1}\n"), None);
        assert_eq!(parse(b"{\"unit\":\"us\",\"args_parsed\":\"1\"}\n"), None);
    }

    #[test]
    fn phases_added_to_ember_later_are_ignored() {
        let t =
            parse(b"{\"unit\":\"us\",\"args_parsed\":7,\"snapshot_loaded\":{\"at\":1}}\n").unwrap();
        assert_eq!(t.get("args_parsed"), Some(7));
        assert_eq!(t.get("vm_created"), None);
    }

    #[test]
    fn segments_add_up_to_the_measured_times() {
        let t = parse(LINE.as_bytes()).unwrap();
        let s = segments(&t, 15.0, Some(16.5)).unwrap();
        let ready: f64 = s[..s.len() - 1].iter().map(|(_, v)| v).sum();
        assert!((ready - 15.0).abs() < 1e-9, "{ready}");
        assert_eq!(s[0].0, "exec + argument parsing");
        assert!((s[0].1 - (15.0 - 14.3 + 0.15)).abs() < 1e-9);
        assert!((s.last().unwrap().1 - 1.5).abs() < 1e-9);
        // A VMM stopped at its ready line has no exit part.
        assert_eq!(segments(&t, 15.0, None).unwrap().len(), s.len() - 1);
    }
}

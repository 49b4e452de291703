//! `startup-ab`: launch -> ready line of several Ember builds (and the floor) on the null guest,
//! side by side, for before/after figures on a shared, noisy machine.
//!
//! Each round runs every system once, in an order that rotates from round to round, and each
//! launch waits until the machine has been idle for a moment (both the CPU time the kernel
//! counts as idle over a short window, and no runnable task besides us), so that another
//! build's burst lands in no system's sample more than in another's. It prints medians, p75
//! and p90 of launch -> ready and launch -> exit, each system's median over the floor's, and
//! the median of Ember's own timeline per phase.
//!
//! ```text
//! cargo run --release -p ember-bench --example startup-ab -- --rounds 200 \
//!     --guest tests/guests/build/hello.elf --floor target/x86_64-unknown-linux-gnu/release/ember-floor \
//!     before=/path/to/old/ember this=target/x86_64-unknown-linux-gnu/release/ember
//! ```

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ember_bench::phases;
use ember_bench::stats::Summary;
use ember_bench::trial::{self, Spec};

const MARKER: &str = "ember-guest: ready";

#[derive(Debug, thiserror::Error)]
enum AbError {
    #[error("{0}")]
    Usage(String),
    #[error("{system}: {what}")]
    Launch { system: String, what: String },
}

struct System {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    ember: bool,
    ready_ms: Vec<f64>,
    exit_ms: Vec<f64>,
    timelines: Vec<phases::Timeline>,
    failures: usize,
}

struct Options {
    rounds: usize,
    idle_wait: Duration,
    systems: Vec<System>,
    floor: Option<usize>,
}

const USAGE: &str = "usage: startup-ab [--rounds N] [--idle-wait MS] --guest ELF [--memory SIZE] \
                     [--floor PATH] NAME=EMBER...";

fn parse_args() -> Result<Options, AbError> {
    let mut rounds = 100;
    let mut idle_wait = Duration::from_millis(2000);
    let mut guest: Option<String> = None;
    let mut memory = "128M".to_string();
    let mut floor = None;
    let mut embers = Vec::new();
    let mut args = std::env::args().skip(1);
    let value = |args: &mut dyn Iterator<Item = String>, flag: &str| {
        args.next()
            .ok_or_else(|| AbError::Usage(format!("{flag} needs a value; {USAGE}")))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => {
                rounds = value(&mut args, "--rounds")?
                    .parse()
                    .map_err(|e| AbError::Usage(format!("--rounds: {e}")))?
            }
            "--idle-wait" => {
                let ms: u64 = value(&mut args, "--idle-wait")?
                    .parse()
                    .map_err(|e| AbError::Usage(format!("--idle-wait: {e}")))?;
                idle_wait = Duration::from_millis(ms);
            }
            "--guest" => guest = Some(value(&mut args, "--guest")?),
            "--memory" => memory = value(&mut args, "--memory")?,
            "--floor" => floor = Some(PathBuf::from(value(&mut args, "--floor")?)),
            "-h" | "--help" => return Err(AbError::Usage(USAGE.into())),
            other => match other.split_once('=') {
                Some((name, path)) if !name.is_empty() && !path.is_empty() => {
                    embers.push((name.to_string(), PathBuf::from(path)))
                }
                _ => return Err(AbError::Usage(format!("`{other}`: {USAGE}"))),
            },
        }
    }
    let guest = guest.ok_or_else(|| AbError::Usage(format!("--guest is required; {USAGE}")))?;
    if embers.is_empty() || rounds == 0 {
        return Err(AbError::Usage(USAGE.into()));
    }
    let mut systems: Vec<System> = embers
        .into_iter()
        .map(|(name, program)| System {
            name,
            program,
            args: [
                "run",
                "--kernel",
                &guest,
                "--memory",
                &memory,
                "--serial",
                "stdio",
                "--ready-marker",
                MARKER,
                "--timings=json",
            ]
            .map(OsString::from)
            .to_vec(),
            ember: true,
            ready_ms: vec![],
            exit_ms: vec![],
            timelines: vec![],
            failures: 0,
        })
        .collect();
    let floor = floor.map(|program| {
        systems.push(System {
            name: "floor".into(),
            program,
            args: vec![MARKER.into()],
            ember: false,
            ready_ms: vec![],
            exit_ms: vec![],
            timelines: vec![],
            failures: 0,
        });
        systems.len() - 1
    });
    Ok(Options {
        rounds,
        idle_wait,
        systems,
        floor,
    })
}

/// (busy, total) jiffies over all CPUs, from /proc/stat's first line.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    Some((total - idle, total))
}

/// Runnable tasks right now (/proc/loadavg's fourth field counts the reader itself).
fn runnable() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    s.split_whitespace().nth(3)?.split('/').next()?.parse().ok()
}

/// Waits until the machine was idle over one 30 ms window (under 5% busy, nothing else
/// runnable), for at most `patience`. Returns whether it was.
fn wait_idle(patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        let Some((b0, t0)) = cpu_jiffies() else {
            return false;
        };
        std::thread::sleep(Duration::from_millis(30));
        let Some((b1, t1)) = cpu_jiffies() else {
            return false;
        };
        let busy = (b1 - b0) as f64 / (t1 - t0).max(1) as f64;
        if busy < 0.05 && runnable().is_some_and(|r| r <= 1) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// The median as the benchmark reports it; other percentiles by nearest rank.
fn percentile(sample: &[f64], p: f64) -> f64 {
    if p == 50.0 {
        return Summary::of(sample).map_or(f64::NAN, |s| s.median);
    }
    let mut v = sample.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn run(mut o: Options) -> Result<(), AbError> {
    // One launch each first: a system that does not run here is an error before 100s of rounds,
    // and the binaries and the guest are in the page cache for every measured launch.
    for s in &o.systems {
        launch(s)?;
    }
    let n = o.systems.len();
    let mut not_idle = 0;
    let started = Instant::now();
    for round in 0..o.rounds {
        for k in 0..n {
            let i = (k + round) % n;
            if !wait_idle(o.idle_wait) {
                not_idle += 1;
            }
            let s = &mut o.systems[i];
            match launch(s) {
                Ok(t) => {
                    s.ready_ms.push(ms(t.ready.unwrap_or_default()));
                    s.exit_ms.push(ms(t.exit));
                    if let Some(tl) = phases::parse(&t.stderr).filter(|_| s.ember) {
                        s.timelines.push(tl);
                    }
                }
                Err(_) => s.failures += 1,
            }
        }
        if (round + 1) % 20 == 0 {
            eprintln!("startup-ab: round {}/{}", round + 1, o.rounds);
        }
    }
    println!(
        "startup-ab: {} rounds in {:.0} s, {} of {} launches started without an idle window",
        o.rounds,
        started.elapsed().as_secs_f64(),
        not_idle,
        o.rounds * n
    );
    let floor_median = o.floor.map(|f| percentile(&o.systems[f].ready_ms, 50.0));
    println!(
        "{:<10} {:>4} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "system", "n", "ready p50", "p75", "p90", "exit p50", "/floor"
    );
    for s in &o.systems {
        let median = percentile(&s.ready_ms, 50.0);
        let ratio = floor_median.map_or(String::from("-"), |f| format!("{:.2}x", median / f));
        println!(
            "{:<10} {:>4} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>8}{}",
            s.name,
            s.ready_ms.len(),
            median,
            percentile(&s.ready_ms, 75.0),
            percentile(&s.ready_ms, 90.0),
            percentile(&s.exit_ms, 50.0),
            ratio,
            if s.failures > 0 {
                format!("  ({} failed)", s.failures)
            } else {
                String::new()
            }
        );
    }
    println!(
        "Ember's timeline, medians (us since main; launch->main is ready minus ready_marker):"
    );
    print!("{:<10}", "system");
    for p in phases::PHASES {
        print!(" {:>8}", &p[..p.len().min(8)]);
    }
    println!(" {:>8}", "pre-main");
    for s in o.systems.iter().filter(|s| s.ember) {
        print!("{:<10}", s.name);
        for p in phases::PHASES {
            let v: Vec<f64> = s
                .timelines
                .iter()
                .filter_map(|t| t.get(p))
                .map(|us| us as f64)
                .collect();
            print!(" {:>8.0}", percentile(&v, 50.0));
        }
        let pre: Vec<f64> = s
            .timelines
            .iter()
            .zip(&s.ready_ms)
            .filter_map(|(t, r)| Some(r * 1000.0 - t.get("ready_marker")? as f64))
            .collect();
        println!(" {:>8.0}", percentile(&pre, 50.0));
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn launch(s: &System) -> Result<trial::Trial, AbError> {
    let spec = Spec {
        program: s.program.clone(),
        args: s.args.clone(),
        marker: MARKER.into(),
        timeout: Duration::from_secs(30),
        stop_at_ready: false,
        input: Vec::new(),
    };
    let failed = |what: String| AbError::Launch {
        system: s.name.clone(),
        what,
    };
    let t = trial::run(&spec).map_err(|e| failed(e.to_string()))?;
    if !t.ok() {
        return Err(failed(t.failure()));
    }
    Ok(t)
}

fn main() -> ExitCode {
    match parse_args().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("startup-ab: error: {e}");
            ExitCode::from(1)
        }
    }
}

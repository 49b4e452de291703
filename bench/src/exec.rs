//! `--guest exec`: one command (`true`) in a fresh machine, timed from spawn to the process's exit
//! with the command's status checked, the way a CI job sees `ember exec`.
//!
//! Rows, every one booting the same kernel (Ember's microVM kernel), the same initramfs (the
//! agent's, as `ember exec` builds it) and the same root image (`ember exec`'s ext4 image of the
//! root directory) under a throwaway copy-on-write layer, with the same memory and one vCPU:
//!
//! - `ember exec -- true`: the agent listens on vsock, Ember connects, sends the command and
//!   reads its status back; Ember exits with it (checked: 0).
//! - `ember run`, console agent: the same guest without vsock. The kernel command line carries
//!   `ember.agent.console` and the command (after `--`); the agent runs it, prints its outcome
//!   line on the console and powers off (checked: exit 0 and the line says `{"Exited":0}`).
//!   Against the row above it shows what the vsock round trip and exec's own set-up cost; against
//!   QEMU's row, the VMMs alone.
//! - QEMU `-M microvm`, console agent: the same, with the root image as a `snapshot=on` drive
//!   (QEMU's temporary overlay) and the words a kvm_pvm host needs that Ember adds to its own
//!   guests. QEMU cannot offer vsock here (no /dev/vhost-vsock), hence the console mode.
//! - `crun run` of `true` in a copy of the same root directory (checked: exit 0).
//!
//! - `ember exec --snapshot DIR -- true`: the same as the first row, resumed from a snapshot of
//!   the booted agent instead of booting. DIR is the run's own; the warm-up run boots the guest
//!   and makes the snapshot, so every timed run restores it (checked: 0).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use ember_agent::{Outcome, CONSOLE_FLAG, OUTCOME_PREFIX};

use crate::host::KvmKind;
use crate::restore::Scratch;
use crate::stats::{percentile, Summary};
use crate::systems::{self, shell_quote, Bundle, Kind, Skipped, System};
use crate::trial::{self, Ending, Trial};
use crate::{ms, require, run_rounds, with_host_words, BenchError, Inputs, Progress, Rounds};

/// Row labels: the report, the JSON and the tests find the rows by them.
pub const EXEC: &str = "ember exec";
pub const EXEC_SNAPSHOT: &str = "ember exec --snapshot";
pub const EMBER_CONSOLE: &str = "ember run, console agent";
pub const QEMU_CONSOLE: &str = "qemu, console agent";
pub const CRUN: &str = "crun";

/// The command every row runs.
pub const COMMAND: &[&str] = &["true"];

/// How a run is judged good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The process exited 0 (for `ember exec`, the command's own status).
    ExitZero,
    /// The process exited 0 and the console's outcome line says the command exited 0.
    ConsoleOutcome,
}

impl Check {
    pub fn describe(self) -> &'static str {
        match self {
            Check::ExitZero => "exit status 0",
            Check::ConsoleOutcome => {
                "exit status 0 and the console's `ember-agent: outcome \
                                      {\"Exited\":0}` line"
            }
        }
    }

    /// Why `t` is not a good run, if it is not.
    fn judge(self, t: &Trial) -> Result<(), String> {
        if t.ending != Ending::Code(0) {
            return Err(t.failure());
        }
        if self == Check::ConsoleOutcome {
            let console = String::from_utf8_lossy(&t.stdout);
            match ember_agent::parse_outcome_line(&console) {
                Some(Outcome::Exited(0)) => {}
                Some(other) => return Err(format!("the agent reported {other:?}")),
                None => {
                    let last = console.lines().rev().find(|l| !l.trim().is_empty());
                    return Err(format!(
                        "no outcome line on the console (last line: {:?})",
                        trial::clip(last.unwrap_or("").trim(), 120)
                    ));
                }
            }
        }
        Ok(())
    }

    /// The stdout text whose arrival is timed: the outcome line for console rows.
    fn marker(self) -> &'static str {
        match self {
            Check::ExitZero => "",
            Check::ConsoleOutcome => OUTCOME_PREFIX,
        }
    }
}

/// One row: what is launched and how its runs are judged.
struct Plan {
    label: String,
    system: System,
    check: Check,
}

/// One row's figures.
#[derive(Debug, Clone)]
pub struct Row {
    pub label: String,
    pub kind: Kind,
    pub command: String,
    pub note: Option<String>,
    pub check: Check,
    /// Console rows: spawn to the outcome line, per good run.
    pub line_ms: Vec<f64>,
    /// Spawn to exit, per good run.
    pub exit_ms: Vec<f64>,
    pub rss_kib: Vec<f64>,
    pub failures: Vec<String>,
}

impl Row {
    pub fn exit(&self) -> Option<Summary> {
        Summary::of(&self.exit_ms)
    }

    pub fn exit_p75(&self) -> Option<f64> {
        percentile(&self.exit_ms, 0.75)
    }

    pub fn good(&self) -> (usize, usize) {
        (self.exit_ms.len(), self.exit_ms.len() + self.failures.len())
    }
}

/// The exec mode's results.
#[derive(Debug, Clone)]
pub struct ExecResult {
    pub command: Vec<String>,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub root_image: PathBuf,
    pub rootfs: PathBuf,
    pub memory: String,
    pub rounds: u32,
    pub rows: Vec<Row>,
    pub skipped: Vec<Skipped>,
    pub notes: Vec<String>,
}

impl ExecResult {
    pub fn row(&self, label: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.label == label)
    }

    /// `label`'s median exit time over `base`'s, when both were measured.
    pub fn ratio(&self, label: &str, base: &str) -> Option<f64> {
        let (a, b) = (self.row(label)?.exit()?, self.row(base)?.exit()?);
        (b.median > 0.0).then(|| a.median / b.median)
    }

    /// `label`'s median exit time minus `base`'s (ms).
    pub fn difference(&self, label: &str, base: &str) -> Option<f64> {
        Some(self.row(label)?.exit()?.median - self.row(base)?.exit()?.median)
    }
}

pub(crate) struct Params<'a> {
    pub inputs: &'a Inputs,
    pub kernel: Option<&'a Path>,
    pub wanted: &'a [Kind],
    pub rounds: u32,
    pub memory: &'a str,
    pub timeout: Duration,
    pub kvm: KvmKind,
    pub quiet: bool,
}

/// What every VM row boots.
struct Files {
    kernel: PathBuf,
    initramfs: PathBuf,
    image: PathBuf,
}

fn files(p: &Params<'_>) -> Result<Files, BenchError> {
    // `ember exec` needs vsock, which only Ember's microVM kernel is built with.
    let kernel = match p.kernel {
        Some(k) => require(k.to_path_buf(), "the kernel", "pass an existing --kernel")?,
        None => require(
            crate::cache_dir("EMBER_MICROVM_KERNEL", "microvm-kernel").join("vmlinux"),
            "Ember's microVM kernel (ember exec boots it)",
            "build it with scripts/microvm-kernel.sh",
        )?,
    };
    let agent = require(
        p.inputs.ember.with_file_name("ember-agent"),
        "ember-agent next to ember",
        "build it with `cargo build --release`",
    )?;
    let image_err = |e: ember_vmm::exec_image::ImageError| BenchError::Input(e.to_string());
    // The same cached files `ember exec` makes and boots (named by their contents).
    let cache = ember_vmm::exec_image::cache_dir();
    let initramfs = ember_vmm::exec_image::agent_initramfs(&agent, &cache).map_err(image_err)?;
    let image = ember_vmm::exec_image::rootfs_image(&p.inputs.rootfs, &cache).map_err(image_err)?;
    Ok(Files {
        kernel,
        initramfs,
        image,
    })
}

/// `ember exec ... -- COMMAND`, with `extra` options (e.g. `--snapshot DIR`) before the `--`.
fn ember_exec(label: &str, p: &Params<'_>, f: &Files, extra: &[String]) -> Plan {
    let mut argv: Vec<String> = vec![
        "exec".into(),
        "--kernel".into(),
        f.kernel.display().to_string(),
        "--rootfs".into(),
        p.inputs.rootfs.display().to_string(),
        "--memory".into(),
        p.memory.into(),
    ];
    argv.extend(extra.iter().cloned());
    argv.push("--".into());
    argv.extend(COMMAND.iter().map(|w| w.to_string()));
    Plan {
        label: label.into(),
        system: System::new(Kind::Ember, p.inputs.ember.clone(), argv, None),
        check: Check::ExitZero,
    }
}

/// The agent's command line in console mode: `ember exec`'s own, the flag, then the command.
fn console_cmdline() -> String {
    format!(
        "{} {CONSOLE_FLAG} -- {}",
        ember_vmm::exec::GUEST_CMDLINE,
        COMMAND.join(" ")
    )
}

fn ember_console(p: &Params<'_>, f: &Files) -> Plan {
    let argv = vec![
        "run".into(),
        "--kernel".into(),
        f.kernel.display().to_string(),
        "--initramfs".into(),
        f.initramfs.display().to_string(),
        // As `ember exec` attaches it.
        "--disk".into(),
        format!("path={},overlay=tmp,id=ember-root", f.image.display()),
        "--memory".into(),
        p.memory.into(),
        "--serial".into(),
        "stdio".into(),
        "--cmdline".into(),
        console_cmdline(),
    ];
    Plan {
        label: EMBER_CONSOLE.into(),
        system: System::new(
            Kind::Ember,
            p.inputs.ember.clone(),
            argv,
            Some(
                "`ember exec`'s guest without vsock: the command and its status travel on the \
                  kernel command line and the console"
                    .into(),
            ),
        ),
        check: Check::ConsoleOutcome,
    }
}

fn qemu_console(p: &Params<'_>, f: &Files) -> Result<Plan, String> {
    let program = systems::qemu_program()?;
    let mut argv = systems::qemu_microvm_args(
        p.memory,
        &f.kernel,
        Some(&f.initramfs),
        &with_host_words(&console_cmdline()),
    );
    // snapshot=on: the guest's writes go to a temporary file QEMU deletes, the image is only
    // read: QEMU's counterpart of `overlay=tmp`. file.locking=off: QEMU's image locks refuse
    // an image any Ember holds at the time ("Failed to get \"consistent read\" lock"), as every
    // `ember exec` of the same root does; an image only read needs no lock.
    argv.extend([
        "-drive".into(),
        format!(
            "id=root,file={},format=raw,if=none,snapshot=on,file.locking=off",
            f.image.display()
        ),
        "-device".into(),
        "virtio-blk-device,drive=root".into(),
    ]);
    Ok(Plan {
        label: QEMU_CONSOLE.into(),
        system: System::new(
            Kind::Qemu,
            program,
            argv,
            Some(
                "QEMU has no vsock on this host, so it runs the console agent; the root \
                  image is a snapshot=on drive (its writes go to a temporary file)"
                    .into(),
            ),
        ),
        check: Check::ConsoleOutcome,
    })
}

fn run_once(plan: &Plan, id: &str, timeout: Duration) -> Result<Trial, String> {
    let spec = plan.system.spec(id, plan.check.marker(), timeout, false);
    let t = trial::run(&spec).map_err(|e| e.to_string())?;
    plan.check.judge(&t).map(|()| t)
}

pub(crate) fn run(p: &Params<'_>) -> Result<ExecResult, BenchError> {
    let fails = |reason: String| BenchError::EmberFails {
        mode: "exec",
        reason,
    };
    let mut progress = Progress::new(!p.quiet);
    progress.say("exec: preparing the agent's initramfs and the root image");
    let f = files(p)?;
    let mut skipped = Vec::new();
    // The snapshot row's DIR, made by its warm-up run and removed with the run's other files.
    let snapshot_dir = Scratch::new("exec-snapshot")?;
    let mut candidates: Vec<Result<Plan, Skipped>> = vec![
        Ok(ember_exec(EXEC, p, &f, &[])),
        Ok(ember_exec(
            EXEC_SNAPSHOT,
            p,
            &f,
            &["--snapshot".into(), snapshot_dir.0.display().to_string()],
        )),
        Ok(ember_console(p, &f)),
    ];
    if p.wanted.contains(&Kind::Qemu) {
        candidates.push(qemu_console(p, &f).map_err(|reason| Skipped {
            kind: Kind::Qemu,
            reason,
        }));
    }
    let command: Vec<String> = COMMAND.iter().map(|w| w.to_string()).collect();
    let bundle = Bundle::running(&p.inputs.rootfs, &command)?;
    if p.wanted.contains(&Kind::Crun) {
        candidates.push(
            systems::oci_runtime(Kind::Crun, &bundle)
                .map(|system| Plan {
                    label: CRUN.into(),
                    system,
                    check: Check::ExitZero,
                })
                .map_err(|reason| Skipped {
                    kind: Kind::Crun,
                    reason,
                }),
        );
    }

    // Warm-up: caches filled, and each row shown to work before it is timed.
    let mut plans = Vec::new();
    for c in candidates {
        let plan = match c {
            Ok(plan) => plan,
            Err(s) => {
                skipped.push(s);
                continue;
            }
        };
        progress.say(&format!("exec: warming up {}", plan.label));
        let Plan {
            label,
            system,
            check,
        } = plan;
        let kind = system.kind;
        let warmed = systems::warm_up_by(system, |s, id| {
            let probe = Plan {
                label: label.clone(),
                system: s.clone(),
                check,
            };
            let id = format!("{}-{id}", std::process::id());
            run_once(&probe, &id, p.timeout)
                .map(|_| ())
                .inspect_err(|_| s.cleanup(&id))
        });
        match warmed {
            Ok(system) => plans.push(Plan {
                label,
                system,
                check,
            }),
            Err(reason) if kind == Kind::Ember => {
                progress.done();
                return Err(fails(format!("{label}: {reason}")));
            }
            Err(reason) => skipped.push(Skipped { kind, reason }),
        }
    }

    let mut rows: Vec<Row> = plans
        .iter()
        .map(|pl| Row {
            label: pl.label.clone(),
            kind: pl.system.kind,
            command: pl.system.command_line(),
            note: pl.system.note.clone(),
            check: pl.check,
            line_ms: vec![],
            exit_ms: vec![],
            rss_kib: vec![],
            failures: vec![],
        })
        .collect();
    let each = Rounds {
        what: "exec round",
        tag: "x",
        rounds: p.rounds,
    };
    run_rounds(
        &mut progress,
        each,
        &plans,
        &mut rows,
        |pl| pl.label.clone(),
        |plan, row, id| match run_once(plan, id, p.timeout) {
            Ok(t) => {
                if let Some(r) = t.ready {
                    row.line_ms.push(ms(r));
                }
                row.exit_ms.push(ms(t.exit));
                row.rss_kib.push(t.max_rss_kib as f64);
            }
            Err(reason) => {
                plan.system.cleanup(id);
                row.failures.push(reason);
            }
        },
    );
    progress.done();
    drop(bundle);

    let mut notes = vec![
        "vmtest and virtme-ng are not rows here: both boot a kernel on QEMU's PCI machine with \
         a 9p (or virtiofs) root shared from the host and a virtio-serial channel for the \
         command, none of which Ember's microVM kernel has (README, `ember exec`)"
            .to_string(),
    ];
    if p.kvm == KvmKind::Pvm {
        notes.push(
            "kvm_pvm host: the guest kernel's boot (emulated ring-0 code) is nearly all of each VM \
             row, the same for both VMMs; crun runs no kernel"
                .into(),
        );
        notes.push(
            "kvm_pvm host: a guest reads the host's own TSC (KVM cannot offset it here); the \
             exec guest keeps time by kvm-clock, which a restore sets back, so the --snapshot \
             row does not grow with the snapshot's age"
                .into(),
        );
    }
    Ok(ExecResult {
        command,
        kernel: f.kernel,
        initramfs: f.initramfs,
        root_image: f.image,
        rootfs: p.inputs.rootfs.clone(),
        memory: p.memory.into(),
        rounds: p.rounds,
        rows,
        skipped,
        notes,
    })
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

fn fmt_ratio(v: Option<f64>) -> String {
    match v {
        // A container over a Linux boot: two places would print 0.00x.
        Some(v) if v < 0.1 => format!("{v:.4}x"),
        Some(v) => format!("{v:.2}x"),
        None => "-".into(),
    }
}

/// The exec mode's figures as text.
pub fn text(r: &ExecResult) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let cmd = r
        .command
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ");
    let _ = writeln!(
        o,
        "== exec: `{cmd}` in a fresh machine, spawn -> exit with its status checked: {} rounds",
        r.rounds
    );
    let _ = writeln!(
        o,
        "guest: {} + {} (ember-agent), root {} (an image of {}) under a throwaway overlay, \
         {}, 1 vCPU",
        r.kernel.display(),
        r.initramfs.display(),
        r.root_image.display(),
        r.rootfs.display(),
        r.memory
    );
    let w = r
        .rows
        .iter()
        .map(|row| row.label.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(
        o,
        "{:<w$} {:>5}  {:>9} {:>9} {:>9} {:>9}  {:>9}  {:>8}  {:>7} {:>7}",
        "system", "good", "min", "median", "p75", "max", "line", "RSS MiB", "/crun", "/qemu"
    );
    let _ = writeln!(
        o,
        "{:<w$} {:>5}  {:^39}  {:>9}  {:>8}  {:^15}",
        "", "", "launch -> exit (ms)", "(median)", "(median)", "exit, medians"
    );
    for row in &r.rows {
        let (good, all) = row.good();
        let e = row.exit();
        let rss = Summary::of(&row.rss_kib).map(|s| s.median / 1024.0);
        let _ = writeln!(
            o,
            "{:<w$} {:>5}  {:>9} {:>9} {:>9} {:>9}  {:>9}  {:>8}  {:>7} {:>7}",
            row.label,
            format!("{good}/{all}"),
            fmt_ms(e.map(|s| s.min)),
            fmt_ms(e.map(|s| s.median)),
            fmt_ms(row.exit_p75()),
            fmt_ms(e.map(|s| s.max)),
            fmt_ms(Summary::of(&row.line_ms).map(|s| s.median)),
            rss.map_or("-".into(), |v| format!("{v:.1}")),
            fmt_ratio(r.ratio(&row.label, CRUN).filter(|_| row.label != CRUN)),
            fmt_ratio(
                r.ratio(&row.label, QEMU_CONSOLE)
                    .filter(|_| row.label != QEMU_CONSOLE)
            ),
        );
    }
    let _ = writeln!(
        o,
        "  line: spawn -> the agent's outcome line on the console (console rows)"
    );
    for row in &r.rows {
        let _ = writeln!(o, "  {}: checked: {}", row.label, row.check.describe());
        if let Some(n) = &row.note {
            let _ = writeln!(o, "  {}: {n}", row.label);
        }
        if let Some(f) = row.failures.first() {
            let _ = writeln!(
                o,
                "  {}: {} failed run(s), first: {f}",
                row.label,
                row.failures.len()
            );
        }
    }
    for s in &r.skipped {
        let _ = writeln!(o, "  {}: not run: {}", s.kind.name(), s.reason);
    }
    if let Some(d) = r.difference(EXEC, EMBER_CONSOLE) {
        let _ = writeln!(
            o,
            "ember exec - ember console agent: {d:+.1} ms (medians): the vsock device, the \
             agent's connection and the request, and exec's own set-up"
        );
    }
    if let Some(x) = r.ratio(EXEC_SNAPSHOT, EXEC) {
        let _ = writeln!(
            o,
            "ember exec --snapshot / ember exec: {x:.2}x (medians): a resumed agent against a boot"
        );
    }
    if let Some(x) = r.ratio(QEMU_CONSOLE, EMBER_CONSOLE) {
        let _ = writeln!(
            o,
            "qemu / ember, both console agent: {x:.2}x (medians): the VMMs on the same guest"
        );
    }
    for n in &r.notes {
        let _ = writeln!(o, "note: {n}");
    }
    o
}

/// The exec mode in `--json`'s file.
#[derive(Serialize)]
pub struct Json<'a> {
    command: &'a [String],
    kernel: String,
    initramfs: String,
    root_image: String,
    rootfs: String,
    memory: &'a str,
    rounds: u32,
    rows: Vec<JsonRow<'a>>,
    not_run: Vec<JsonNotRun<'a>>,
    /// Median exit of `ember exec` minus that of Ember's console-agent row (ms).
    exec_minus_console_ms: Option<f64>,
    /// QEMU's console-agent median exit over Ember's.
    qemu_over_ember_console: Option<f64>,
    /// `ember exec --snapshot`'s median exit over a booted `ember exec`'s.
    snapshot_over_exec: Option<f64>,
    notes: &'a [String],
}

#[derive(Serialize)]
struct JsonRow<'a> {
    label: &'a str,
    system: &'static str,
    command: &'a str,
    note: Option<&'a str>,
    checked: &'static str,
    good_runs: usize,
    runs: usize,
    exit_ms: Option<JsonFigures>,
    outcome_line_ms: Option<JsonFigures>,
    peak_rss_mib: Option<JsonFigures>,
    over_crun: Option<f64>,
    over_qemu: Option<f64>,
    exit_samples_ms: Vec<f64>,
    outcome_line_samples_ms: Vec<f64>,
    failures: &'a [String],
}

#[derive(Serialize)]
struct JsonFigures {
    min: f64,
    median: f64,
    p75: f64,
    p90: f64,
    max: f64,
}

#[derive(Serialize)]
struct JsonNotRun<'a> {
    system: &'static str,
    reason: &'a str,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn json_figures(v: &[f64], unit: f64) -> Option<JsonFigures> {
    let s = Summary::of(v)?;
    Some(JsonFigures {
        min: round3(s.min / unit),
        median: round3(s.median / unit),
        p75: round3(percentile(v, 0.75)? / unit),
        p90: round3(s.p90 / unit),
        max: round3(s.max / unit),
    })
}

pub fn json(r: &ExecResult) -> Json<'_> {
    let ratio = |label: &str, base: &str| {
        (label != base)
            .then(|| r.ratio(label, base))
            .flatten()
            .map(round3)
    };
    Json {
        command: &r.command,
        kernel: r.kernel.display().to_string(),
        initramfs: r.initramfs.display().to_string(),
        root_image: r.root_image.display().to_string(),
        rootfs: r.rootfs.display().to_string(),
        memory: &r.memory,
        rounds: r.rounds,
        rows: r
            .rows
            .iter()
            .map(|row| {
                let (good, all) = row.good();
                JsonRow {
                    label: &row.label,
                    system: row.kind.name(),
                    command: &row.command,
                    note: row.note.as_deref(),
                    checked: row.check.describe(),
                    good_runs: good,
                    runs: all,
                    exit_ms: json_figures(&row.exit_ms, 1.0),
                    outcome_line_ms: json_figures(&row.line_ms, 1.0),
                    peak_rss_mib: json_figures(&row.rss_kib, 1024.0),
                    over_crun: ratio(&row.label, CRUN),
                    over_qemu: ratio(&row.label, QEMU_CONSOLE),
                    exit_samples_ms: row.exit_ms.iter().map(|x| round3(*x)).collect(),
                    outcome_line_samples_ms: row.line_ms.iter().map(|x| round3(*x)).collect(),
                    failures: &row.failures,
                }
            })
            .collect(),
        not_run: r
            .skipped
            .iter()
            .map(|s| JsonNotRun {
                system: s.kind.name(),
                reason: &s.reason,
            })
            .collect(),
        exec_minus_console_ms: r.difference(EXEC, EMBER_CONSOLE).map(round3),
        snapshot_over_exec: r.ratio(EXEC_SNAPSHOT, EXEC).map(round3),
        qemu_over_ember_console: r.ratio(QEMU_CONSOLE, EMBER_CONSOLE).map(round3),
        notes: &r.notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(code: i32, stdout: &str) -> Trial {
        Trial {
            ready: None,
            exit: Duration::from_millis(5),
            ending: Ending::Code(code),
            max_rss_kib: 1024,
            stdout: stdout.as_bytes().to_vec(),
            stderr: Vec::new(),
            stopped: false,
        }
    }

    #[test]
    fn a_run_counts_only_with_the_right_status() {
        assert!(Check::ExitZero.judge(&trial(0, "")).is_ok());
        assert!(Check::ExitZero.judge(&trial(1, "")).is_err());
        let good = "[ 1.0] x\r\nember-agent: outcome {\"Exited\":0}\r\n";
        assert!(Check::ConsoleOutcome.judge(&trial(0, good)).is_ok());
        // The VMM exiting 0 is not enough: the command's own status must be 0 too.
        let e = Check::ConsoleOutcome
            .judge(&trial(0, "ember-agent: outcome {\"Exited\":1}\n"))
            .unwrap_err();
        assert!(e.contains("Exited(1)"), "{e}");
        let e = Check::ConsoleOutcome
            .judge(&trial(0, "Kernel panic\n"))
            .unwrap_err();
        assert!(
            e.contains("no outcome line") && e.contains("Kernel panic"),
            "{e}"
        );
        assert!(Check::ConsoleOutcome.judge(&trial(3, good)).is_err());
    }

    fn row(label: &str, kind: Kind, exit: &[f64]) -> Row {
        Row {
            label: label.into(),
            kind,
            command: format!("{label} run"),
            note: None,
            check: Check::ExitZero,
            line_ms: vec![],
            exit_ms: exit.to_vec(),
            rss_kib: vec![2048.0; exit.len()],
            failures: vec![],
        }
    }

    fn result() -> ExecResult {
        let mut console = row(EMBER_CONSOLE, Kind::Ember, &[900.0, 1000.0, 1100.0]);
        console.check = Check::ConsoleOutcome;
        console.line_ms = vec![800.0, 850.0, 900.0];
        let mut crun = row(CRUN, Kind::Crun, &[20.0, 20.0]);
        crun.failures.push("exit status 1: boom".into());
        ExecResult {
            command: vec!["true".into()],
            kernel: "vmlinux".into(),
            initramfs: "agent.cpio".into(),
            root_image: "rootfs.ext4".into(),
            rootfs: "rootfs".into(),
            memory: "128M".into(),
            rounds: 3,
            rows: vec![
                row(EXEC, Kind::Ember, &[1000.0, 1200.0, 1400.0]),
                console,
                row(QEMU_CONSOLE, Kind::Qemu, &[1500.0, 1500.0, 1500.0]),
                crun,
                row(EXEC_SNAPSHOT, Kind::Ember, &[300.0, 300.0, 600.0]),
            ],
            skipped: vec![Skipped {
                kind: Kind::Qemu,
                reason: "not installed".into(),
            }],
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn the_report_has_every_row_its_checks_and_ratios() {
        let r = result();
        let t = text(&r);
        assert!(t.contains("== exec: `true` in a fresh machine"), "{t}");
        let line = |label: &str| {
            t.lines()
                .find(|l| l.starts_with(label) && l[label.len()..].starts_with(' '))
                .unwrap_or_else(|| panic!("no {label} row:\n{t}"))
                .split_whitespace()
                .skip(label.split_whitespace().count())
                .map(String::from)
                .collect::<Vec<_>>()
        };
        // good, min, median, p75, max, line, RSS, /crun, /qemu
        assert_eq!(
            line(EXEC),
            ["3/3", "1000.0", "1200.0", "1400.0", "1400.0", "-", "2.0", "60.00x", "0.80x"]
        );
        assert_eq!(line(EMBER_CONSOLE)[5], "850.0");
        assert_eq!(line(QEMU_CONSOLE)[8], "-");
        assert_eq!(line(CRUN)[0], "2/3");
        // 20 ms over 1500 ms: small ratios keep their digits.
        assert_eq!(line(CRUN)[8], "0.0133x");
        assert!(
            t.contains("ember exec - ember console agent: +200.0 ms"),
            "{t}"
        );
        assert!(t.contains("qemu / ember, both console agent: 1.50x"), "{t}");
        assert!(
            t.contains("ember exec --snapshot / ember exec: 0.25x"),
            "{t}"
        );
        assert_eq!(line(EXEC_SNAPSHOT)[2], "300.0");
        assert!(
            t.contains("crun: 1 failed run(s), first: exit status 1: boom"),
            "{t}"
        );
        assert!(t.contains("qemu: not run: not installed"), "{t}");
        assert!(
            t.contains(&format!("{EMBER_CONSOLE}: checked: exit status 0 and")),
            "{t}"
        );
    }

    #[test]
    fn the_json_has_rows_samples_and_differences() {
        let r = result();
        let v = serde_json::to_value(json(&r)).unwrap();
        assert_eq!(v["rows"][0]["label"], EXEC);
        assert_eq!(v["rows"][0]["exit_ms"]["median"], 1200.0);
        assert_eq!(v["rows"][0]["exit_ms"]["p75"], 1400.0);
        assert_eq!(v["rows"][0]["over_crun"], 60.0);
        assert_eq!(v["rows"][0]["over_qemu"], 0.8);
        assert_eq!(v["rows"][1]["outcome_line_ms"]["median"], 850.0);
        assert_eq!(v["rows"][2]["over_qemu"], serde_json::Value::Null);
        assert_eq!(v["rows"][3]["good_runs"], 2);
        assert_eq!(v["rows"][3]["runs"], 3);
        assert_eq!(v["exec_minus_console_ms"], 200.0);
        assert_eq!(v["qemu_over_ember_console"], 1.5);
        assert_eq!(v["snapshot_over_exec"], 0.25);
        assert_eq!(v["not_run"][0]["system"], "qemu");
    }
}

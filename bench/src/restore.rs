//! `--guest restore`: a guest resumed from a snapshot instead of booted.
//!
//! Set-up (once, reported but not timed as start-up): Ember boots the guest with an API socket,
//! the benchmark pauses it and has it write a snapshot (`PUT /snapshot/create`) into a scratch
//! directory, and that Ember ends. Then, per round, every row once in rotating order: Ember
//! restoring it (`ember run --restore`, with and without `--prefault`), Ember started with only
//! its API socket and sent `PUT /snapshot/load` (the way Firecracker restores, which has no
//! restore option on its command line), Firecracker the same way when it is installed, and for
//! reference Ember booting the null guest and the containers of the other modes starting their
//! ready command. Then density: N clones restored from the one snapshot at once.
//!
//! A restored guest is shown to run by its next console line. Each restored guest is typed a
//! byte (or a command) at spawn, and its answer is that line: a guest that resumes mid-wait
//! with its clock carried over would otherwise print its next line after whatever was left of
//! its wait, a random part of its period, which says nothing about the VMM. So the counter guest
//! is snapshotted with a period of days: it prints nothing more by itself, and its first poll
//! of the serial port after the restore answers `counter: got r`.

use std::ffi::OsString;
use std::io::Write as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::http;
use crate::memory::{self, GuestRam, VmmMemory};
use crate::phases;
use crate::systems::{self, Bundle, Guest, Kind, Skipped, System};
use crate::trial::{self, Ending, Pipe, Spec, Trial};
use crate::{ms, run_rounds, BenchError, Inputs, Progress, Rounds, SystemResult};

/// Row labels: the report, the JSON and the tests find the rows by them.
pub const RESTORE: &str = "ember restore";
pub const RESTORE_PREFAULT: &str = "ember restore --prefault";
pub const API_LOAD: &str = "ember API load";
pub const FIRECRACKER_LOAD: &str = "firecracker load";
pub const EMBER_BOOT: &str = "ember boot (null guest)";

/// What is snapshotted, and how a restored copy is shown to run and ended.
#[derive(Debug, Clone)]
pub struct RestoreGuest {
    /// `counter` or `linux` (`--restore-guest`).
    pub name: &'static str,
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    /// The console line that says the booted guest is up.
    pub booted: &'static str,
    /// Typed once booted, with the answer awaited, before the snapshot: the guest is then idle
    /// at its prompt rather than still starting up.
    pub prime: Option<(&'static str, &'static str)>,
    /// Typed into every restored guest at spawn; `marker` is its answer, the guest's next line.
    pub trigger: &'static str,
    pub marker: &'static str,
    /// Typed once the answer came: the guest ends and its VMM exits 0. None: the VMM is sent
    /// SIGTERM at the answer instead (a guest whose own shutdown is slow here).
    pub quit: Option<&'static str>,
    pub boot_timeout: Duration,
    pub timeout: Duration,
}

impl RestoreGuest {
    /// The counter test guest (tests/guests/counter.c). Its period is days, so that after the
    /// snapshot it prints only what it is typed (see the module comment).
    pub fn counter(kernel: PathBuf) -> RestoreGuest {
        RestoreGuest {
            name: "counter",
            kernel,
            initramfs: None,
            cmdline: "console=ttyS0 counter.tsc=1000000000000000".into(),
            booted: "counter: nonce=",
            prime: None,
            trigger: "r",
            marker: "counter: got r",
            quit: Some("q"),
            boot_timeout: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
        }
    }

    /// A Linux kernel with the kit's shell initramfs, snapshotted at its shell prompt. The
    /// answer's text is not in the command typed, so the terminal's echo of it does not count.
    pub fn linux(kernel: PathBuf, initramfs: PathBuf, pvm: bool) -> RestoreGuest {
        RestoreGuest {
            name: "linux",
            kernel,
            initramfs: Some(initramfs),
            cmdline: "console=ttyS0 panic=1 pci=off quiet".into(),
            booted: "ember-kit: ready",
            prime: Some(("echo ember-bench-$((2+3))\n", "ember-bench-5")),
            trigger: "echo ember-bench-$((6*7))\n",
            marker: "ember-bench-42",
            // `reboot -f` takes Linux seconds to minutes under kvm_pvm's emulated kernel code,
            // two clones at once more than 100 s: that is the guest's time, not the VMM's.
            quit: None,
            boot_timeout: Duration::from_secs(if pvm { 600 } else { 120 }),
            timeout: Duration::from_secs(if pvm { 120 } else { 30 }),
        }
    }

    pub fn describe(&self) -> String {
        let files = match &self.initramfs {
            Some(i) => format!("{} + {}", self.kernel.display(), i.display()),
            None => self.kernel.display().to_string(),
        };
        format!("{files}, command line `{}`", self.cmdline)
    }
}

/// The set-up: boot, pause, snapshot; and what the snapshot's files take.
#[derive(Debug, Clone, Default)]
pub struct SetUp {
    /// Spawn to the `booted` line (and the primed answer, if any).
    pub boot_ms: f64,
    /// `PATCH /vm {"state":"Paused"}` sent to its 204.
    pub pause_ms: f64,
    /// `PUT /snapshot/create` sent to its 204.
    pub create_ms: f64,
    pub state_bytes: u64,
    pub state_disk_bytes: u64,
    /// The memory file's length (guest RAM) and the blocks it holds (it is sparse).
    pub mem_bytes: u64,
    pub mem_disk_bytes: u64,
}

/// One row: a way of getting the guest (or, for reference, a container) to its line.
#[derive(Debug, Clone)]
pub struct Row {
    pub label: String,
    pub marker: String,
    pub result: SystemResult,
    /// Rows that load through an API socket: the load request, sent to its 204, per good run.
    pub load_ms: Vec<f64>,
}

/// N clones restored at once, per round.
#[derive(Debug, Clone, Default)]
pub struct Density {
    pub prefault: bool,
    pub clones: usize,
    /// First spawn to the last clone's line, per good round.
    pub all_ready_ms: Vec<f64>,
    /// Each clone's spawn to its line, every clone of every good round.
    pub clone_ready_ms: Vec<f64>,
    /// Per clone (every clone of every good round), KiB, read once every clone had its line.
    pub pss_kib: Vec<f64>,
    pub rss_kib: Vec<f64>,
    /// The part of PSS / RSS that is the memory file's mappings (guest RAM).
    pub guest_pss_kib: Vec<f64>,
    pub guest_rss_kib: Vec<f64>,
    /// The clones' PSS added up, per good round.
    pub total_pss_kib: Vec<f64>,
    pub failures: Vec<String>,
}

/// The restore mode's results for one guest.
#[derive(Debug, Clone)]
pub struct RestoreResult {
    pub guest: String,
    pub guest_name: &'static str,
    pub guest_bytes: u64,
    pub rounds: u32,
    /// What the restored guests are typed and answer.
    pub trigger: String,
    pub marker: String,
    /// How a restored guest is ended once it answered.
    pub ended_by: String,
    pub setup: SetUp,
    pub rows: Vec<Row>,
    pub skipped: Vec<Skipped>,
    /// Own memory of Ember's restore rows, by label.
    pub memory: Vec<(String, Result<VmmMemory, String>)>,
    pub density: Vec<Density>,
    pub notes: Vec<String>,
}

/// A directory removed on drop: the snapshots (a memory file is as large as guest RAM, if
/// sparse) and the API sockets.
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Scratch {
    /// `$TMPDIR/ember-bench-NAME-PID`, empty.
    pub(crate) fn new(name: &str) -> Result<Scratch, BenchError> {
        let dir = std::env::temp_dir().join(format!("ember-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| BenchError::Io {
            what: "create",
            path: dir.clone(),
            source: e,
        })?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A snapshot's two files.
#[derive(Debug, Clone)]
pub struct Snap {
    pub state: PathBuf,
    pub mem: PathBuf,
}

impl Snap {
    fn load_body(&self) -> serde_json::Value {
        serde_json::json!({
            "snapshot_path": self.state,
            "mem_backend": { "backend_type": "File", "backend_path": self.mem },
            "resume_vm": true
        })
    }
}

/// How a row launches.
enum Launch {
    /// `ember run --restore`.
    Restore { prefault: bool },
    /// The VMM with only its API socket, then `PUT /snapshot/load`.
    ApiLoad { snap: Snap },
    /// A system of the other modes, launched as there.
    Peer(System),
}

struct Plan {
    label: String,
    kind: Kind,
    program: PathBuf,
    launch: Launch,
    marker: String,
    note: Option<String>,
}

/// What the rows share.
struct Ctx<'a> {
    ember: &'a Path,
    snap: &'a Snap,
    guest: &'a RestoreGuest,
    dir: &'a Path,
}

pub(crate) struct Params<'a> {
    pub inputs: &'a Inputs,
    /// The null guest, for the reference boot and the containers' ready line.
    pub null_guest: &'a Guest,
    pub wanted: &'a [Kind],
    pub rounds: u32,
    pub clones: usize,
    pub guest_bytes: u64,
    pub memory: &'a str,
    pub quiet: bool,
}

pub(crate) fn run(guest: &RestoreGuest, p: &Params<'_>) -> Result<RestoreResult, BenchError> {
    let fails = |reason: String| BenchError::EmberFails {
        mode: "restore",
        reason,
    };
    let mut progress = Progress::new(!p.quiet);
    let scratch = Scratch::new(&format!("restore-{}", guest.name))?;
    let dir = scratch.0.as_path();
    progress.say(&format!(
        "restore ({}): booting and snapshotting",
        guest.name
    ));
    let snap = Snap {
        state: dir.join("snap"),
        mem: dir.join("mem"),
    };
    let setup = ember_snapshot(&p.inputs.ember, guest, p.memory, dir, &snap).map_err(|e| {
        progress.done();
        fails(format!("set-up: {e}"))
    })?;
    let ctx = Ctx {
        ember: &p.inputs.ember,
        snap: &snap,
        guest,
        dir,
    };
    let mut notes = Vec::new();
    let mut skipped = Vec::new();
    let mut plans = vec![
        Plan {
            label: RESTORE.into(),
            kind: Kind::Ember,
            program: p.inputs.ember.clone(),
            launch: Launch::Restore { prefault: false },
            marker: guest.marker.into(),
            note: None,
        },
        Plan {
            label: RESTORE_PREFAULT.into(),
            kind: Kind::Ember,
            program: p.inputs.ember.clone(),
            launch: Launch::Restore { prefault: true },
            marker: guest.marker.into(),
            note: None,
        },
        Plan {
            label: API_LOAD.into(),
            kind: Kind::Ember,
            program: p.inputs.ember.clone(),
            launch: Launch::ApiLoad { snap: snap.clone() },
            marker: guest.marker.into(),
            note: Some(
                "`ember run --api-sock S` alone, then `PUT /snapshot/load` on S as soon as it \
                 answers: the way a Firecracker snapshot is restored"
                    .into(),
            ),
        },
    ];
    if !p.wanted.contains(&Kind::Firecracker) {
        skipped.push(Skipped {
            kind: Kind::Firecracker,
            reason: "not in --systems".into(),
        });
    } else {
        match systems::which("firecracker") {
            None => skipped.push(Skipped {
                kind: Kind::Firecracker,
                reason: "not found on PATH (not packaged in Debian): no Firecracker figures \
                         in this run"
                    .into(),
            }),
            Some(fc) => {
                progress.say(&format!(
                    "restore ({}): snapshotting under firecracker",
                    guest.name
                ));
                let fc_snap = Snap {
                    state: dir.join("fc-snap"),
                    mem: dir.join("fc-mem"),
                };
                match firecracker_snapshot(&fc, guest, p.guest_bytes, dir, &fc_snap) {
                    Ok(()) => plans.push(Plan {
                        label: FIRECRACKER_LOAD.into(),
                        kind: Kind::Firecracker,
                        program: fc,
                        launch: Launch::ApiLoad { snap: fc_snap },
                        marker: guest.marker.into(),
                        note: Some(
                            "`firecracker --api-sock S`, then `PUT /snapshot/load` of its own \
                             snapshot of the same guest; stopped at the line (SIGTERM)"
                                .into(),
                        ),
                    }),
                    Err(reason) => skipped.push(Skipped {
                        kind: Kind::Firecracker,
                        reason: format!("its snapshot of the guest failed: {reason}"),
                    }),
                }
            }
        }
    }

    // The references: Ember booting the null guest, and the containers of the other modes.
    let mut bundle = Bundle::create(&p.inputs.rootfs, &p.null_guest.marker)?;
    let null_timeout = Duration::from_secs(30);
    for &kind in p.wanted {
        let peer = matches!(
            kind,
            Kind::Ember | Kind::Crun | Kind::Runc | Kind::Podman | Kind::Docker
        );
        if !peer {
            continue;
        }
        progress.say(&format!(
            "restore ({}): warming up {}",
            guest.name,
            kind.name()
        ));
        let found = systems::candidate(kind, &p.inputs.ember, p.null_guest, Some(&mut bundle))
            .and_then(|s| systems::warm_up(s, p.null_guest, null_timeout));
        match found {
            Ok(s) => plans.push(Plan {
                label: if kind == Kind::Ember {
                    EMBER_BOOT.into()
                } else {
                    kind.name().into()
                },
                kind,
                program: s.program.clone(),
                marker: p.null_guest.marker.clone(),
                note: s.note.clone(),
                launch: Launch::Peer(s),
            }),
            Err(reason) if kind == Kind::Ember => {
                progress.done();
                return Err(fails(format!("booting the null guest: {reason}")));
            }
            Err(reason) => skipped.push(Skipped { kind, reason }),
        }
    }

    // Warm-up of the restore rows: the memory file's pages into the page cache (the first
    // prefaulted restore reads all of it), and a check that each works.
    let mut kept = Vec::new();
    for plan in plans {
        if matches!(plan.launch, Launch::Peer(_)) {
            kept.push(plan);
            continue;
        }
        progress.say(&format!(
            "restore ({}): warming up {}",
            guest.name, plan.label
        ));
        match run_once(&plan, &ctx, "warmup").and_then(|o| good(&plan, &o).map(|_| ())) {
            Ok(()) => kept.push(plan),
            Err(reason) if plan.kind == Kind::Ember => {
                progress.done();
                return Err(fails(format!("{}: {reason}", plan.label)));
            }
            Err(reason) => skipped.push(Skipped {
                kind: plan.kind,
                reason,
            }),
        }
    }
    let plans = kept;

    let mut rows: Vec<Row> = plans
        .iter()
        .map(|pl| Row {
            label: pl.label.clone(),
            marker: pl.marker.clone(),
            result: SystemResult {
                kind: pl.kind,
                command: command_line(pl, &ctx),
                note: pl.note.clone(),
                ready_ms: vec![],
                exit_ms: vec![],
                rss_kib: vec![],
                timelines: vec![],
                failures: vec![],
            },
            load_ms: vec![],
        })
        .collect();
    let each = Rounds {
        what: "restore round",
        tag: "r",
        rounds: p.rounds,
    };
    run_rounds(
        &mut progress,
        each,
        &plans,
        &mut rows,
        |pl| pl.label.clone(),
        |plan, row, id| {
            match run_once(plan, &ctx, id).and_then(|o| good(plan, &o).map(|tl| (o, tl))) {
                Ok((o, timeline)) => {
                    let res = &mut row.result;
                    res.ready_ms.push(ms(o.trial.ready.unwrap_or_default()));
                    // Stopped at the line (SIGTERM), the exit is still Ember's own way out.
                    res.exit_ms.push(ms(o.trial.exit));
                    res.rss_kib.push(o.trial.max_rss_kib as f64);
                    if let Some(tl) = timeline {
                        res.timelines.push(tl);
                    }
                    if let Some(l) = o.load_ms {
                        row.load_ms.push(l);
                    }
                }
                Err(reason) => {
                    if let Launch::Peer(s) = &plan.launch {
                        s.cleanup(id);
                    }
                    row.result.failures.push(reason);
                }
            }
        },
    );

    let mut mem = Vec::new();
    for plan in &plans {
        let Launch::Restore { prefault } = plan.launch else {
            continue;
        };
        progress.say(&format!(
            "restore ({}): memory probe {}",
            guest.name, plan.label
        ));
        let mut spec = restore_spec(&ctx, prefault, &plan.marker);
        spec.input = guest.trigger.as_bytes().to_vec();
        mem.push((
            plan.label.clone(),
            memory::probe(&spec, GuestRam::File(&snap.mem), quit_bytes(guest), 3),
        ));
    }

    let mut density = Vec::new();
    for prefault in [false, true] {
        let mut d = Density {
            prefault,
            clones: p.clones,
            ..Density::default()
        };
        for round in 0..p.rounds {
            progress.say(&format!(
                "restore ({}): {} clones{}, round {}/{}",
                guest.name,
                p.clones,
                if prefault { " --prefault" } else { "" },
                round + 1,
                p.rounds
            ));
            match clones_round(&ctx, p.clones, prefault) {
                Ok(c) => {
                    d.all_ready_ms.push(c.all_ready_ms);
                    d.clone_ready_ms.extend(c.ready_ms);
                    d.total_pss_kib
                        .push(c.mem.iter().map(|m| m.pss as f64).sum());
                    for m in &c.mem {
                        d.pss_kib.push(m.pss as f64);
                        d.rss_kib.push(m.rss as f64);
                        d.guest_pss_kib.push(m.guest_pss as f64);
                        d.guest_rss_kib.push(m.guest_rss as f64);
                    }
                }
                Err(e) => d.failures.push(e),
            }
        }
        density.push(d);
    }
    progress.done();
    drop(bundle);

    if systems::which("firecracker").is_none() {
        notes.push(
            "issue 12's goal of a restore in at most half of Firecracker's time cannot be \
             checked here: Firecracker is not installed on this host"
                .into(),
        );
    }
    Ok(RestoreResult {
        guest: guest.describe(),
        guest_name: guest.name,
        guest_bytes: p.guest_bytes,
        rounds: p.rounds,
        trigger: guest.trigger.into(),
        marker: guest.marker.into(),
        ended_by: match guest.quit {
            Some(q) => format!("typed {q:?} (the guest ends, Ember exits 0)"),
            None => "SIGTERM to the VMM at the answer".into(),
        },
        setup,
        rows,
        skipped,
        memory: mem,
        density,
        notes,
    })
}

/// What one launch of a row showed.
struct Outcome {
    trial: Trial,
    load_ms: Option<f64>,
    /// The API load failed: why (the VMM was killed).
    load_error: Option<String>,
}

/// A good run's timeline (Ember rows), or why the run does not count.
fn good(plan: &Plan, o: &Outcome) -> Result<Option<phases::Timeline>, String> {
    if let Some(e) = &o.load_error {
        return Err(format!("PUT /snapshot/load: {e}"));
    }
    if !o.trial.ok() {
        return Err(o.trial.failure());
    }
    if plan.kind != Kind::Ember {
        return Ok(None);
    }
    match phases::parse(&o.trial.stderr) {
        Some(t) => Ok(Some(t)),
        None => Err("no --timings=json line on stderr".into()),
    }
}

fn restore_args(ctx: &Ctx<'_>, prefault: bool, marker: Option<&str>) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "run".into(),
        "--restore".into(),
        ctx.snap.state.clone().into(),
        "--mem".into(),
        ctx.snap.mem.clone().into(),
    ];
    if prefault {
        a.push("--prefault".into());
    }
    a.extend(["--serial".into(), "stdio".into()]);
    if let Some(m) = marker {
        a.extend(["--ready-marker".into(), m.into(), "--timings=json".into()]);
    }
    a
}

fn restore_spec(ctx: &Ctx<'_>, prefault: bool, marker: &str) -> Spec {
    Spec {
        program: ctx.ember.to_path_buf(),
        args: restore_args(ctx, prefault, Some(marker)),
        marker: marker.into(),
        timeout: ctx.guest.timeout,
        stop_at_ready: ctx.guest.quit.is_none(),
        input: Vec::new(),
    }
}

/// What is typed at the answer: the quit command, or nothing when the VMM is stopped instead.
fn quit_bytes(guest: &RestoreGuest) -> &'static [u8] {
    guest.quit.map_or(&[][..], str::as_bytes)
}

fn api_args(plan: &Plan, sock: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    if plan.kind == Kind::Ember {
        a.push("run".into());
    }
    a.extend(["--api-sock".into(), sock.as_os_str().to_owned()]);
    if plan.kind == Kind::Ember {
        a.extend([
            "--serial".into(),
            "stdio".into(),
            "--ready-marker".into(),
            plan.marker.clone().into(),
            "--timings=json".into(),
        ]);
    }
    a
}

fn command_line(plan: &Plan, ctx: &Ctx<'_>) -> String {
    let words = |program: &Path, args: Vec<OsString>| {
        std::iter::once(program.display().to_string())
            .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
            .map(|w| systems::shell_quote(&w))
            .collect::<Vec<_>>()
            .join(" ")
    };
    match &plan.launch {
        Launch::Restore { prefault } => words(
            &plan.program,
            restore_args(ctx, *prefault, Some(&plan.marker)),
        ),
        Launch::ApiLoad { snap } => format!(
            "{} + PUT /snapshot/load {}",
            words(
                &plan.program,
                api_args(plan, &ctx.dir.join("api-{id}.sock"))
            ),
            snap.load_body()
        ),
        Launch::Peer(s) => s.command_line(),
    }
}

fn run_once(plan: &Plan, ctx: &Ctx<'_>, id: &str) -> Result<Outcome, String> {
    let guest = ctx.guest;
    let mut quit = |_pid: u32| quit_bytes(guest).to_vec();
    match &plan.launch {
        Launch::Restore { prefault } => {
            let mut spec = restore_spec(ctx, *prefault, &plan.marker);
            spec.input = guest.trigger.as_bytes().to_vec();
            let trial = trial::run_with_hook(&spec, Some(&mut quit)).map_err(|e| e.to_string())?;
            Ok(Outcome {
                trial,
                load_ms: None,
                load_error: None,
            })
        }
        Launch::ApiLoad { snap } => {
            let sock = ctx.dir.join(format!("api-{id}.sock"));
            let _ = std::fs::remove_file(&sock);
            // Firecracker is stopped at the line: whether and how it exits on the guest's
            // reset is not what is compared.
            let stop = plan.kind != Kind::Ember || guest.quit.is_none();
            let spec = Spec {
                program: plan.program.clone(),
                args: api_args(plan, &sock),
                marker: plan.marker.clone(),
                timeout: guest.timeout,
                stop_at_ready: stop,
                input: guest.trigger.as_bytes().to_vec(),
            };
            let mut loader = None;
            let mut on_spawn = |pid: u32| {
                loader = Some(spawn_loader(pid, &sock, snap, guest.timeout));
            };
            let quit_hook: Option<trial::ReadyHook<'_>> = if stop { None } else { Some(&mut quit) };
            let trial = trial::run_with_hooks(&spec, Some(&mut on_spawn), quit_hook);
            let load = loader.map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("the loading thread panicked".into()))
            });
            let _ = std::fs::remove_file(&sock);
            let trial = trial.map_err(|e| e.to_string())?;
            let (load_ms, load_error) = match load {
                Some(Ok(v)) => (Some(v), None),
                Some(Err(e)) => (None, Some(e)),
                None => (None, Some("not sent".into())),
            };
            Ok(Outcome {
                trial,
                load_ms,
                load_error,
            })
        }
        Launch::Peer(s) => {
            let trial = trial::run(&s.spec(id, &plan.marker, Duration::from_secs(30), false))
                .map_err(|e| e.to_string())?;
            Ok(Outcome {
                trial,
                load_ms: None,
                load_error: None,
            })
        }
    }
}

/// Sends `PUT /snapshot/load` to the VMM `pid` just spawned, from a thread of its own (the
/// trial goes on timing its output meanwhile). Returns the request's time, sent to 204; on a
/// failure the VMM is killed so that the run ends now rather than at its timeout.
fn spawn_loader(
    pid: u32,
    sock: &Path,
    snap: &Snap,
    timeout: Duration,
) -> std::thread::JoinHandle<Result<f64, String>> {
    // A pidfd, not the pid: the kill below cannot hit another process if this one is gone.
    let pidfd = trial::pidfd_open(pid as libc::pid_t).ok();
    let sock = sock.to_path_buf();
    let body = snap.load_body();
    std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        let result = http::connect(&sock, deadline)
            .and_then(|stream| {
                let sent = Instant::now();
                let reply =
                    http::send(stream, &sock, "PUT", "/snapshot/load", Some(&body), timeout)?;
                http::success("PUT /snapshot/load", reply)?;
                Ok(ms(sent.elapsed()))
            })
            .map_err(|e| e.to_string());
        if result.is_err() {
            if let Some(fd) = &pidfd {
                pidfd_kill(fd);
            }
        }
        result
    })
}

fn pidfd_kill(fd: &OwnedFd) {
    // SAFETY: pidfd_send_signal takes a pidfd we own, a signal number and no siginfo.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

/// Boots `guest` under Ember with an API socket, pauses it, snapshots it into `snap`, ends it.
fn ember_snapshot(
    ember: &Path,
    guest: &RestoreGuest,
    memory: &str,
    dir: &Path,
    snap: &Snap,
) -> Result<SetUp, String> {
    let sock = dir.join("setup.sock");
    let mut args: Vec<OsString> =
        vec!["run".into(), "--kernel".into(), guest.kernel.clone().into()];
    if let Some(i) = &guest.initramfs {
        args.extend(["--initramfs".into(), i.clone().into()]);
    }
    args.extend([
        "--cmdline".into(),
        guest.cmdline.clone().into(),
        "--memory".into(),
        memory.into(),
        "--serial".into(),
        "stdio".into(),
        "--api-sock".into(),
        sock.clone().into(),
    ]);
    let mut vm = Console::spawn(ember, &args)?;
    let deadline = vm.spawned + guest.boot_timeout;
    boot_and_prime(&mut vm, guest, deadline)?;
    let boot_ms = ms(vm.spawned.elapsed());
    let (pause_ms, create_ms) = pause_and_snapshot(&sock, snap)?;
    vm.stop();
    let size = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| (m.len(), m.blocks() * 512))
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let (state_bytes, state_disk_bytes) = size(&snap.state)?;
    let (mem_bytes, mem_disk_bytes) = size(&snap.mem)?;
    Ok(SetUp {
        boot_ms,
        pause_ms,
        create_ms,
        state_bytes,
        state_disk_bytes,
        mem_bytes,
        mem_disk_bytes,
    })
}

fn boot_and_prime(vm: &mut Console, guest: &RestoreGuest, deadline: Instant) -> Result<(), String> {
    vm.wait_for(guest.booted, deadline)?;
    if let Some((command, answer)) = guest.prime {
        vm.type_in(command.as_bytes())?;
        vm.wait_for(answer, deadline)?;
    }
    // The rest of the line (and a shell's prompt) out before the pause.
    std::thread::sleep(Duration::from_millis(if guest.prime.is_some() {
        500
    } else {
        50
    }));
    Ok(())
}

/// Pauses the VM behind `sock` and has it write `snap`: (pause ms, create ms), each from the
/// request sent to its 204.
fn pause_and_snapshot(sock: &Path, snap: &Snap) -> Result<(f64, f64), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let timed = |method: &str, uri: &str, body: serde_json::Value| -> Result<f64, String> {
        let what = format!("{method} {uri}");
        let stream = http::connect(sock, deadline).map_err(|e| e.to_string())?;
        let sent = Instant::now();
        let reply = http::send(
            stream,
            sock,
            method,
            uri,
            Some(&body),
            Duration::from_secs(120),
        )
        .and_then(|r| http::success(&what, r))
        .map_err(|e| e.to_string())?;
        drop(reply);
        Ok(ms(sent.elapsed()))
    };
    let pause = timed("PATCH", "/vm", serde_json::json!({ "state": "Paused" }))?;
    let create = timed(
        "PUT",
        "/snapshot/create",
        serde_json::json!({
            "snapshot_type": "Full",
            "snapshot_path": snap.state,
            "mem_file_path": snap.mem
        }),
    )?;
    Ok((pause, create))
}

/// The same guest booted under Firecracker through its API and snapshotted the same way.
fn firecracker_snapshot(
    fc: &Path,
    guest: &RestoreGuest,
    guest_bytes: u64,
    dir: &Path,
    snap: &Snap,
) -> Result<(), String> {
    let sock = dir.join("fc-setup.sock");
    let mut vm = Console::spawn(fc, &["--api-sock".into(), sock.clone().into()])?;
    let deadline = vm.spawned + guest.boot_timeout;
    let put = |uri: &str, body: serde_json::Value| -> Result<(), String> {
        let what = format!("PUT {uri}");
        http::request(&sock, "PUT", uri, Some(&body), deadline)
            .and_then(|r| http::success(&what, r))
            .map(drop)
            .map_err(|e| e.to_string())
    };
    // Firecracker adds nothing to a command line for this host: give it Ember's words.
    let mut boot = serde_json::json!({
        "kernel_image_path": guest.kernel,
        "boot_args": crate::with_host_words(&guest.cmdline)
    });
    if let Some(i) = &guest.initramfs {
        boot["initrd_path"] = serde_json::json!(i);
    }
    put("/boot-source", boot)?;
    put(
        "/machine-config",
        serde_json::json!({ "vcpu_count": 1, "mem_size_mib": guest_bytes >> 20 }),
    )?;
    put(
        "/actions",
        serde_json::json!({ "action_type": "InstanceStart" }),
    )?;
    boot_and_prime(&mut vm, guest, deadline)?;
    pause_and_snapshot(&sock, snap)?;
    vm.stop();
    Ok(())
}

/// One density round's figures.
struct CloneRound {
    all_ready_ms: f64,
    ready_ms: Vec<f64>,
    mem: Vec<memory::Snapshot>,
}

/// `n` clones restored from the one snapshot, spawned back to back; each is typed the trigger
/// at its spawn. Once every clone has its line, their memory is read; then each is ended.
fn clones_round(ctx: &Ctx<'_>, n: usize, prefault: bool) -> Result<CloneRound, String> {
    let guest = ctx.guest;
    let args = restore_args(ctx, prefault, None);
    let t0 = Instant::now();
    let mut vms: Vec<Console> = Vec::with_capacity(n);
    for _ in 0..n {
        let mut vm = Console::spawn(ctx.ember, &args)?;
        vm.type_in(guest.trigger.as_bytes())?;
        vms.push(vm);
    }
    let at = wait_all(&mut vms, guest.marker, t0 + guest.timeout)?;
    let all_ready_ms = at
        .iter()
        .map(|t| ms(t.duration_since(t0)))
        .fold(0.0, f64::max);
    let ready_ms = vms
        .iter()
        .zip(&at)
        .map(|(vm, t)| ms(t.duration_since(vm.spawned)))
        .collect();
    let mem = vms
        .iter()
        .map(|vm| memory::snapshot(vm.pid as u32, GuestRam::File(&ctx.snap.mem)))
        .collect::<Result<Vec<_>, _>>()?;
    for vm in &mut vms {
        match guest.quit {
            Some(q) => vm.type_in(q.as_bytes())?,
            // SAFETY: kill(2) on our own unreaped child.
            None => unsafe {
                libc::kill(vm.pid, libc::SIGTERM);
            },
        }
    }
    let deadline = Instant::now() + guest.timeout;
    for vm in &mut vms {
        match (vm.wait_exit(deadline)?, guest.quit) {
            (Ending::Code(0), _) => {}
            // Ember ends on SIGTERM with 128 + 15.
            (Ending::Code(143), None) => {}
            (other, _) => return Err(format!("a clone ended with {other}: {}", vm.last_words())),
        }
    }
    Ok(CloneRound {
        all_ready_ms,
        ready_ms,
        mem,
    })
}

/// A VMM whose console is piped: the set-up's and the clones' (a measured row uses trial.rs).
/// Dropped before it was reaped, its process group is killed.
struct Console {
    pid: libc::pid_t,
    stdin: Option<ChildStdin>,
    out: Pipe,
    err: Pipe,
    pidfd: OwnedFd,
    spawned: Instant,
    /// Where the next wait_for looks from in `out`.
    mark: usize,
    ended: Option<Ending>,
}

impl Console {
    fn spawn(program: &Path, args: &[OsString]) -> Result<Console, String> {
        let spawned = Instant::now();
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let pid = child.id() as libc::pid_t;
        let pipes = (|| {
            let out = child.stdout.take().ok_or("no stdout pipe")?;
            let err = child.stderr.take().ok_or("no stderr pipe")?;
            let out = Pipe::new(out.into()).map_err(|e| e.to_string())?;
            let err = Pipe::new(err.into()).map_err(|e| e.to_string())?;
            let pidfd = trial::pidfd_open(pid).map_err(|e| e.to_string())?;
            Ok::<_, String>((out, err, pidfd))
        })();
        let (out, err, pidfd) = match pipes {
            Ok(p) => p,
            Err(e) => {
                trial::kill_group(pid);
                let _ = trial::wait4(pid);
                return Err(e);
            }
        };
        Ok(Console {
            pid,
            stdin: child.stdin.take(),
            out,
            err,
            pidfd,
            spawned,
            mark: 0,
            ended: None,
        })
    }

    fn type_in(&mut self, bytes: &[u8]) -> Result<(), String> {
        let w = self.stdin.as_mut().ok_or("no stdin pipe")?;
        w.write_all(bytes)
            .and_then(|_| w.flush())
            .map_err(|e| format!("typing into the guest's console: {e}"))
    }

    /// The line that best says why it stopped: an error line on stderr, else its last one.
    fn last_words(&self) -> String {
        let line = trial::telling_line(&self.err.buf);
        if line.is_empty() {
            let out = String::from_utf8_lossy(&self.out.buf);
            let last = out
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            format!("console ended with {:?}", trial::clip(last.trim(), 120))
        } else {
            trial::clip(&line, 160)
        }
    }

    /// True once `needle` is in the output past `mark` (then moved past it).
    fn found(&mut self, needle: &str) -> bool {
        let hay = &self.out.buf[self.mark.min(self.out.buf.len())..];
        match hay
            .windows(needle.len().max(1))
            .position(|w| w == needle.as_bytes())
        {
            Some(i) => {
                self.mark += i + needle.len();
                true
            }
            None => false,
        }
    }

    fn wait_for(&mut self, needle: &str, deadline: Instant) -> Result<Instant, String> {
        let at = wait_all(std::slice::from_mut(self), needle, deadline)?;
        at.first().copied().ok_or_else(|| "no console".into())
    }

    /// Waits for the exit (reaping it) until `deadline`, then kills its group.
    fn wait_exit(&mut self, deadline: Instant) -> Result<Ending, String> {
        if let Some(e) = self.ended {
            return Ok(e);
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [
                trial::pollfd(self.out.fd(), true),
                trial::pollfd(self.err.fd(), true),
                trial::pollfd(self.pidfd.as_raw_fd(), true),
            ];
            let ms = left.as_millis().clamp(0, i32::MAX as u128) as i32;
            // SAFETY: fds is a valid array of pollfd for its whole length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, ms) };
            if n == 0 || (left.is_zero() && fds[2].revents == 0) {
                trial::kill_group(self.pid);
                let e = trial::wait4(self.pid).map(|(e, _)| e).ok();
                self.ended = e;
                return Err(format!(
                    "no exit within {:.0} s; killed",
                    (deadline - self.spawned).as_secs_f64()
                ));
            }
            if fds[0].revents != 0 {
                self.out.read_available();
            }
            if fds[1].revents != 0 {
                self.err.read_available();
            }
            if fds[2].revents != 0 {
                let (e, _) = trial::wait4(self.pid).map_err(|e| format!("wait4: {e}"))?;
                self.ended = Some(e);
                // What it printed last is wanted for a failure's line.
                self.out.read_available();
                self.err.read_available();
                return Ok(e);
            }
        }
    }

    /// SIGTERM, then SIGKILL to its group if it has not exited within 5 s.
    fn stop(&mut self) {
        if self.ended.is_some() {
            return;
        }
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let _ = self.wait_exit(Instant::now() + Duration::from_secs(5));
        // Its reaper or anything else it left in its group goes too.
        trial::kill_group(self.pid);
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if self.ended.is_none() {
            trial::kill_group(self.pid);
            let _ = trial::wait4(self.pid);
        }
    }
}

/// Waits until every console printed `needle` (after its mark); returns when each did.
fn wait_all(vms: &mut [Console], needle: &str, deadline: Instant) -> Result<Vec<Instant>, String> {
    let mut at: Vec<Option<Instant>> = vms
        .iter_mut()
        .map(|vm| vm.found(needle).then(Instant::now))
        .collect();
    while at.iter().any(Option::is_none) {
        if let Some(i) = (0..vms.len()).find(|&i| at[i].is_none() && vms[i].out.eof) {
            let vm = &mut vms[i];
            let _ = vm.wait_exit(Instant::now() + Duration::from_secs(1));
            return Err(format!(
                "the console ended before `{needle}`: {}",
                vm.last_words()
            ));
        }
        let now = Instant::now();
        if now >= deadline {
            let i = at.iter().position(Option::is_none).unwrap_or(0);
            return Err(format!(
                "no `{needle}` within {:.0} s ({})",
                (deadline - vms[i].spawned).as_secs_f64(),
                vms[i].last_words()
            ));
        }
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(vms.len() * 2);
        for (vm, a) in vms.iter().zip(&at) {
            fds.push(trial::pollfd(vm.out.fd(), a.is_none()));
            fds.push(trial::pollfd(vm.err.fd(), true));
        }
        let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: fds is a valid array of pollfd for its whole length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        for (i, vm) in vms.iter_mut().enumerate() {
            if fds[2 * i + 1].revents != 0 {
                vm.err.read_available();
            }
            if fds[2 * i].revents == 0 {
                continue;
            }
            vm.out.read_available();
            if at[i].is_none() && vm.found(needle) {
                at[i] = Some(Instant::now());
            }
        }
    }
    Ok(at.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consoles_wait_sees_a_needle_split_across_writes_once() {
        let mut c = Console::spawn(
            Path::new("/bin/sh"),
            &[
                "-c".into(),
                "printf 'a: re'; sleep 0.1; printf 'ady\\n'; read x; echo \"got $x\"".into(),
            ],
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        c.wait_for("a: ready", deadline).unwrap();
        c.type_in(b"q\n").unwrap();
        c.wait_for("got q", deadline).unwrap();
        assert_eq!(c.wait_exit(deadline).unwrap(), Ending::Code(0));
        // Looked for again, an old line is not found twice.
        let e = c.wait_for("a: ready", deadline).unwrap_err();
        assert!(e.contains("ended before"), "{e}");
    }

    #[test]
    fn a_console_that_ends_early_says_why_and_a_slow_one_is_killed() {
        let mut c = Console::spawn(
            Path::new("/bin/sh"),
            &["-c".into(), "echo 'sh: error: no guest' >&2".into()],
        )
        .unwrap();
        let e = c
            .wait_for("never", Instant::now() + Duration::from_secs(10))
            .unwrap_err();
        assert!(e.contains("sh: error: no guest"), "{e}");
        let start = Instant::now();
        let mut c =
            Console::spawn(Path::new("/bin/sh"), &["-c".into(), "sleep 30".into()]).unwrap();
        let e = c
            .wait_exit(Instant::now() + Duration::from_millis(200))
            .unwrap_err();
        assert!(e.contains("killed"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn the_load_request_is_firecracker_shaped() {
        let snap = Snap {
            state: "/s/snap".into(),
            mem: "/s/mem".into(),
        };
        assert_eq!(
            snap.load_body(),
            serde_json::json!({
                "snapshot_path": "/s/snap",
                "mem_backend": { "backend_type": "File", "backend_path": "/s/mem" },
                "resume_vm": true
            })
        );
    }

    #[test]
    fn the_restored_guests_answer_is_not_in_what_is_typed() {
        // A terminal echoes the typed command: the marker must not match that echo.
        let linux = RestoreGuest::linux("k".into(), "i".into(), true);
        for g in [RestoreGuest::counter("c".into()), linux] {
            assert!(!g.trigger.contains(g.marker), "{}", g.name);
            if let Some((typed, answer)) = g.prime {
                assert!(!typed.contains(answer), "{}", g.name);
            }
        }
    }
}

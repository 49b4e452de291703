//! `ember bench`: microVM start-up against container start-up (and QEMU's microvm machine) on
//! the same machine, the same root filesystem and the same ready line. The `ember` CLI execs the
//! `ember-bench` binary next to it for this subcommand; the benchmark drives Ember only by
//! spawning `ember run`, as it drives every other system, and uses ember-vmm's library for what
//! must match Ember exactly (the kind of host, the words a kvm_pvm host adds to a command line,
//! how a memory size is spelled).
//!
//! Four modes. `null`: Ember boots the null test guest (prints its ready line, then resets),
//! which measures the VMM itself. `linux`: Ember and QEMU boot a Linux kernel with the guest
//! kit's initramfs (ready line from /init, then `reboot -f`). The containers run `/bin/sh -c
//! 'echo MARKER'` from the same root filesystem in both. `banner`: Ember and QEMU boot the same
//! kernel without userspace to its `Linux version` line and are stopped there: the VMM peers
//! compared where Linux cannot reach userspace (kvm_pvm hosts). `restore` (restore.rs): a
//! snapshot of a booted guest resumed in new Ember processes, one at a time and as N clones at
//! once, next to a container start and Ember's null-guest boot. Every system is warmed up once,
//! then each round runs every system once, the order rotating from round to round so that
//! machine drift falls on all of them alike.

pub mod chart;
pub mod exec;
#[cfg(test)]
mod fixture;
pub mod host;
pub mod http;
pub mod json;
pub mod memory;
pub mod phases;
pub mod report;
pub mod restore;
pub mod stats;
pub mod systems;
pub mod trial;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ember_vmm::config;
use host::{Host, KvmKind};
use systems::{Bundle, Guest, Kind, QemuGuest, Skipped, System};

#[derive(Debug, clap::Parser)]
#[command(
    name = "ember bench",
    bin_name = "ember bench",
    version,
    about = "Measure microVM start-up against containers (and peers) on the same root filesystem"
)]
pub struct BenchArgs {
    /// Rounds; each runs every system once, in rotating order [default: 20 null, 10 banner,
    /// 10 linux (3 on kvm_pvm, where a boot takes ~30 s), 10 exec].
    #[arg(long, value_name = "N")]
    pub rounds: Option<u32>,
    /// Modes, comma-separated: null (the null test guest: VMM overhead), linux (a kernel and
    /// the kit's initramfs to userspace), banner (a kernel to its `Linux version` line; VMMs
    /// only), restore (a snapshot of a booted guest resumed, one and N clones at once, next to
    /// a container start), exec (`ember exec -- true` end to end, next to Ember and QEMU running
    /// the same guest with its console agent and to `crun run` of `true`; not in auto: three
    /// Linux boots a round), or auto: null,linux,restore on hardware KVM; null,banner,linux,
    /// restore on kvm_pvm (where guest kernel code is emulated: the banner mode shows the VMMs'
    /// part of a kernel boot).
    #[arg(long, value_name = "MODES", default_value = "auto")]
    pub guest: String,
    /// Kernel for the linux, banner and exec modes [default: the microVM kernel's vmlinux from
    /// scripts/microvm-kernel.sh when built, else (not for exec) the kit's vmlinux].
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs for the linux mode; it must print the ready marker and then power off
    /// [default: the kit's initramfs-poweroff.cpio].
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// The null test guest [default: tests/guests/build/hello.elf near the ember binary or in
    /// the current directory]. Its sibling echo.elf is used for the memory probe.
    #[arg(long, value_name = "PATH")]
    pub null_guest: Option<PathBuf>,
    /// Root filesystem directory the containers run from (copied once; left untouched), and
    /// the exec mode's root (its image, as `ember exec --rootfs DIR` makes it) [default: the
    /// kit's rootfs/].
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
    /// Systems to run, comma-separated, from ember, floor, crun, runc, podman, docker, qemu,
    /// firecracker (restore mode only, where installed) [default: all; ember always runs].
    #[arg(long, value_name = "LIST")]
    pub systems: Option<String>,
    /// Guest memory for the microVMs.
    #[arg(long, value_name = "SIZE", default_value = "128M")]
    pub memory: String,
    /// Seconds one launch may take before it is killed and counted as failed
    /// [default: 30 null, 60 banner, 120 linux and exec, 240 linux and exec on kvm_pvm;
    /// restore: 30, a restored Linux guest 120 on kvm_pvm].
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Write every figure and sample as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write an SVG chart to FILE.
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,
    /// Restore mode: the clones restored at once from one snapshot.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub clones: usize,
    /// Restore mode: the guests snapshotted, comma-separated: counter (the counter test guest),
    /// linux (the kernel of the linux mode with the kit's shell initramfs, snapshotted at its
    /// prompt; its set-up boot takes ~17-25 s on kvm_pvm).
    #[arg(long, value_name = "LIST", default_value = "counter")]
    pub restore_guest: String,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Input(String),
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is missing ({}): {hint}", path.display())]
    Missing {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("Ember itself does not run the {mode} guest here: {reason}")]
    EmberFails { mode: &'static str, reason: String },
    #[error("cannot encode the report as JSON: {0}")]
    Json(#[source] serde_json::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Null,
    Linux,
    Banner,
    Restore,
    Exec,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Null => "null",
            Mode::Linux => "linux",
            Mode::Banner => "banner",
            Mode::Restore => "restore",
            Mode::Exec => "exec",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Mode::Null => "null guest (VMM overhead)",
            Mode::Linux => "Linux guest (kernel + initramfs to userspace)",
            Mode::Banner => "Linux kernel to its banner (VMMs only; stopped there)",
            Mode::Restore => "snapshot restore",
            Mode::Exec => "one command in a fresh machine",
        }
    }
}

/// Everything measured for one system in one mode.
#[derive(Debug, Clone)]
pub struct SystemResult {
    pub kind: Kind,
    pub command: String,
    pub note: Option<String>,
    pub ready_ms: Vec<f64>,
    pub exit_ms: Vec<f64>,
    pub rss_kib: Vec<f64>,
    /// Ember only: its timeline per good run (same order as the samples).
    pub timelines: Vec<phases::Timeline>,
    pub failures: Vec<String>,
}

/// One mode's results.
#[derive(Debug, Clone)]
pub struct ModeResult {
    pub mode: Mode,
    pub guest: String,
    pub marker: String,
    pub rounds: u32,
    pub systems: Vec<SystemResult>,
    pub skipped: Vec<Skipped>,
    /// Own-memory probes (Ember, and QEMU in linux mode), or why there is none.
    pub memory: Vec<(Kind, Result<memory::VmmMemory, String>)>,
}

/// The whole benchmark: what `--json` writes and the chart draws.
#[derive(Debug, Clone)]
pub struct Report {
    pub host: Host,
    pub command: String,
    pub modes: Vec<ModeResult>,
    /// The restore mode, one per guest snapshotted.
    pub restore: Vec<restore::RestoreResult>,
    pub exec: Option<exec::ExecResult>,
    /// Modes not run, with the reason.
    pub notes: Vec<String>,
}

/// The paths the benchmark reads, resolved once.
pub(crate) struct Inputs {
    pub(crate) ember: PathBuf,
    pub(crate) kit: PathBuf,
    pub(crate) rootfs: PathBuf,
}

pub fn run(args: BenchArgs) -> Result<(), BenchError> {
    let host = Host::detect();
    let command = command_line();
    if host.kvm == KvmKind::None {
        return Err(BenchError::Input(
            "/dev/kvm is missing: the microVMs need KVM".into(),
        ));
    }
    let guest_bytes = config::parse_memory(&args.memory)
        .map_err(|e| BenchError::Input(format!("--memory: {e}")))?;
    let wanted = wanted_systems(args.systems.as_deref())?;
    let (modes, mut notes) = modes(&args, host.kvm)?;
    restore_guest_names(&args.restore_guest)?;
    if args.clones == 0 || args.clones > 256 {
        return Err(BenchError::Input(format!(
            "--clones: {} is not between 1 and 256",
            args.clones
        )));
    }
    let ember = ember_binary()?;
    let kit = kit_dir();
    let inputs = Inputs {
        rootfs: args.rootfs.clone().unwrap_or_else(|| kit.join("rootfs")),
        ember,
        kit,
    };
    if !inputs.rootfs.is_dir() {
        return Err(BenchError::Missing {
            what: "the containers' root filesystem",
            path: inputs.rootfs.clone(),
            hint: "build the guest kit with scripts/kit.sh, or pass --rootfs DIR",
        });
    }

    let mut out = std::io::stdout();
    let _ = writeln!(out, "ember bench: {}", host.date);
    let _ = writeln!(out, "host: {}", host.describe());
    let _ = writeln!(out, "command: {command}");
    for n in &notes {
        let _ = writeln!(out, "note: {n}");
    }

    let mut results = Vec::new();
    let mut restored = Vec::new();
    let mut executed = None;
    for mode in modes {
        if mode == Mode::Exec {
            let r = run_exec(&args, &inputs, &wanted, host.kvm)?;
            let _ = write!(out, "\n{}", exec::text(&r));
            executed = Some(r);
            continue;
        }
        if mode == Mode::Restore {
            for g in restore_guests(&args, &inputs, host.kvm)? {
                let r = run_restore(g, &args, &inputs, &wanted, host.kvm, guest_bytes)?;
                let _ = write!(out, "\n{}", report::restore_text(&r));
                restored.push(r);
            }
            continue;
        }
        let guest = guest_for(mode, &args, &inputs)?;
        let r = run_mode(mode, &guest, &args, &inputs, &wanted, host.kvm, guest_bytes)?;
        let _ = write!(out, "\n{}", report::text(&r));
        results.push(r);
    }
    if results.is_empty() && restored.is_empty() && executed.is_none() {
        notes.push("no mode ran".into());
    }
    let report = Report {
        host,
        command,
        modes: results,
        restore: restored,
        exec: executed,
        notes,
    };
    if let Some(path) = &args.json {
        let text = json::to_string(&report).map_err(BenchError::Json)?;
        std::fs::write(path, text).map_err(|e| BenchError::Io {
            what: "write",
            path: path.clone(),
            source: e,
        })?;
        let _ = writeln!(out, "\njson: {}", path.display());
    }
    if let Some(path) = &args.chart {
        std::fs::write(path, chart::svg(&report)).map_err(|e| BenchError::Io {
            what: "write",
            path: path.clone(),
            source: e,
        })?;
        let _ = writeln!(out, "chart: {}", path.display());
    }
    Ok(())
}

fn wanted_systems(list: Option<&str>) -> Result<Vec<Kind>, BenchError> {
    let Some(list) = list else {
        return Ok(Kind::ALL.to_vec());
    };
    let mut v = vec![Kind::Ember];
    for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let k = Kind::parse(word).ok_or_else(|| {
            BenchError::Input(format!(
                "--systems: unknown system `{word}` (ember, floor, crun, runc, podman, docker, qemu, \
                 firecracker)"
            ))
        })?;
        if !v.contains(&k) {
            v.push(k);
        }
    }
    Ok(v)
}

/// The modes to run, and notes about how to read them on this host.
fn modes(args: &BenchArgs, kvm: KvmKind) -> Result<(Vec<Mode>, Vec<String>), BenchError> {
    let mut notes = Vec::new();
    let mut out = Vec::new();
    for word in args.guest.split(',').map(str::trim) {
        let add: &[Mode] = match word {
            "auto" if kvm == KvmKind::Pvm => {
                &[Mode::Null, Mode::Banner, Mode::Linux, Mode::Restore]
            }
            "auto" => &[Mode::Null, Mode::Linux, Mode::Restore],
            "null" => &[Mode::Null],
            "banner" => &[Mode::Banner],
            "linux" => &[Mode::Linux],
            "restore" => &[Mode::Restore],
            "exec" => &[Mode::Exec],
            other => {
                return Err(BenchError::Input(format!(
                    "--guest: `{other}` is not null, linux, banner, restore, exec or auto"
                )))
            }
        };
        for m in add {
            if !out.contains(m) {
                out.push(*m);
            }
        }
    }
    // The exec mode says its own (exec.rs).
    if kvm == KvmKind::Pvm && out.iter().any(|m| matches!(m, Mode::Linux | Mode::Banner)) {
        notes.push(
            "kvm_pvm host: the guest's kernel (ring-0) code is emulated, thousands of times \
             slower than on hardware, while its user (ring-3) code runs natively; a Linux boot \
             here is almost all emulated kernel time, the same for every VMM. The null guest \
             measures the VMM itself; the linux mode compares the VMMs on the same kernel, \
             initramfs and command line (Ember's kvm_pvm words given to QEMU too)"
                .to_string(),
        );
    }
    Ok((out, notes))
}

/// The `ember` next to this binary: `ember bench` execs us from there, and cargo builds both
/// into the same directory, so the Ember measured is the one the user ran.
fn ember_binary() -> Result<PathBuf, BenchError> {
    let me = std::env::current_exe().map_err(|e| BenchError::Io {
        what: "locate",
        path: "the ember-bench binary".into(),
        source: e,
    })?;
    require(
        me.with_file_name("ember"),
        "the ember binary next to ember-bench",
        "build both with `cargo build --release`",
    )
}

fn kit_dir() -> PathBuf {
    cache_dir("EMBER_KIT", "kit")
}

pub(crate) fn cache_dir(var: &str, name: &str) -> PathBuf {
    if let Some(d) = std::env::var_os(var) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/ember").join(name)
}

pub(crate) fn require(
    path: PathBuf,
    what: &'static str,
    hint: &'static str,
) -> Result<PathBuf, BenchError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(BenchError::Missing { what, path, hint })
    }
}

/// tests/guests/build/NAME near the binary (target/<triple>/<profile>/ember sits three levels
/// below the repository) or under the current directory.
pub(crate) fn find_test_guest(ember: &Path, name: &str) -> PathBuf {
    let rel = Path::new("tests/guests/build").join(name);
    ember
        .ancestors()
        .skip(1)
        .map(|d| d.join(&rel))
        .chain(std::iter::once(rel.clone()))
        .find(|p| p.is_file())
        .unwrap_or(rel)
}

fn guest_for(mode: Mode, args: &BenchArgs, inputs: &Inputs) -> Result<Guest, BenchError> {
    match mode {
        // The restore mode boots the null guest for reference, as the null mode does.
        Mode::Null | Mode::Restore => {
            let kernel = match &args.null_guest {
                Some(p) => require(p.clone(), "the null guest", "pass an existing --null-guest")?,
                None => require(
                    find_test_guest(&inputs.ember, "hello.elf"),
                    "the null test guest",
                    "build it with `make -C tests/guests`, or pass --null-guest",
                )?,
            };
            // The null guest has a 64-bit ELF entry only; QEMU's microvm boots an ELF through
            // its PVH note. A PVH build of the same program next to it is used when present.
            let pvh = kernel.with_file_name("hello-pvh.elf");
            let qemu = if pvh.is_file() {
                Ok(QemuGuest {
                    kernel: pvh,
                    cmdline: "exit=triple".into(),
                })
            } else {
                Err(format!(
                    "QEMU's microvm boots an ELF only through a PVH note, and {} has none \
                     (no hello-pvh.elf next to it)",
                    kernel.display()
                ))
            };
            Ok(Guest {
                kernel,
                initramfs: None,
                cmdline: None,
                qemu,
                marker: "ember-guest: ready".into(),
                memory: args.memory.clone(),
                stop_at_ready: false,
            })
        }
        Mode::Banner => {
            let kernel = linux_kernel(args, inputs)?;
            // earlyprintk: the banner comes out as soon as the early console is up, not once
            // the 8250 driver is.
            let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=1 pci=off";
            Ok(Guest {
                kernel: kernel.clone(),
                initramfs: None,
                cmdline: Some(cmdline.into()),
                qemu: Ok(QemuGuest {
                    kernel,
                    cmdline: with_host_words(cmdline),
                }),
                marker: "Linux version".into(),
                memory: args.memory.clone(),
                stop_at_ready: true,
            })
        }
        Mode::Exec => Err(BenchError::Input(
            "the exec mode boots `ember exec`'s own guest (exec.rs)".into(),
        )),
        Mode::Linux => {
            let kernel = linux_kernel(args, inputs)?;
            let initramfs = match &args.initramfs {
                Some(i) => require(i.clone(), "the initramfs", "pass an existing --initramfs")?,
                None => require(
                    inputs.kit.join("initramfs-poweroff.cpio"),
                    "the kit's initramfs-poweroff.cpio",
                    "build the guest kit with scripts/kit.sh",
                )?,
            };
            // `quiet`: the console's speed is not what is compared. The guest powers off
            // through ACPI, which both VMMs implement (QEMU's microvm has no i8042 for reboot=k,
            // and reboot=t's triple fault runs INT3, which stops the guest on kvm_pvm).
            let cmdline = "console=ttyS0 panic=1 pci=off quiet";
            Ok(Guest {
                kernel: kernel.clone(),
                initramfs: Some(initramfs),
                cmdline: Some(cmdline.into()),
                qemu: Ok(QemuGuest {
                    kernel,
                    cmdline: with_host_words(cmdline),
                }),
                marker: "ember-kit: ready".into(),
                memory: args.memory.clone(),
                stop_at_ready: false,
            })
        }
    }
}

/// `cmdline` with the words this host needs that Ember adds to its own guests' command line
/// (none on hardware KVM), so that peers boot the same kernel the same way.
pub(crate) fn with_host_words(cmdline: &str) -> String {
    let words: Vec<String> = ember_vmm::host::kernel_words_here()
        .into_iter()
        .map(|w| w.word)
        .collect();
    config::full_cmdline(cmdline, &words).unwrap_or_else(|_| cmdline.to_string())
}

/// The kernel for the linux and banner modes.
pub(crate) fn linux_kernel(args: &BenchArgs, inputs: &Inputs) -> Result<PathBuf, BenchError> {
    if let Some(k) = &args.kernel {
        return require(k.clone(), "the kernel", "pass an existing --kernel");
    }
    let microvm = cache_dir("EMBER_MICROVM_KERNEL", "microvm-kernel").join("vmlinux");
    if microvm.is_file() {
        return Ok(microvm);
    }
    require(
        inputs.kit.join("vmlinux"),
        "the kit's vmlinux",
        "build the guest kit with scripts/kit.sh (or the microVM kernel with \
         scripts/microvm-kernel.sh)",
    )
}

fn run_mode(
    mode: Mode,
    guest: &Guest,
    args: &BenchArgs,
    inputs: &Inputs,
    wanted: &[Kind],
    kvm: KvmKind,
    guest_bytes: u64,
) -> Result<ModeResult, BenchError> {
    let rounds = rounds_for(mode, args, kvm)?;
    let timeout = timeout_for(mode, args, kvm);
    let mut progress = Progress::new(!args.quiet);
    let mut bundle = Bundle::create(&inputs.rootfs, &guest.marker)?;

    // Detect and warm up every system.
    let mut systems: Vec<System> = Vec::new();
    let mut skipped = Vec::new();
    for &kind in wanted {
        if mode == Mode::Banner && !kind.is_vm() {
            // A container has no kernel of its own to boot.
            continue;
        }
        if kind == Kind::Floor && mode != Mode::Null {
            // The floor runs no kernel: it is the null guest's reference only.
            continue;
        }
        if kind == Kind::Firecracker {
            // Its snapshot load is what the restore mode compares; it boots nothing here.
            continue;
        }
        progress.say(&format!("{}: warming up {}", mode.name(), kind.name()));
        let found = systems::candidate(kind, &inputs.ember, guest, Some(&mut bundle))
            .and_then(|s| systems::warm_up(s, guest, timeout));
        match found {
            Ok(s) => systems.push(s),
            Err(reason) if kind == Kind::Ember => {
                progress.done();
                return Err(BenchError::EmberFails {
                    mode: mode.name(),
                    reason,
                });
            }
            Err(reason) => skipped.push(Skipped { kind, reason }),
        }
    }

    let mut results: Vec<SystemResult> = systems
        .iter()
        .map(|s| SystemResult {
            kind: s.kind,
            command: s.command_line(),
            note: s.note.clone(),
            ready_ms: vec![],
            exit_ms: vec![],
            rss_kib: vec![],
            timelines: vec![],
            failures: vec![],
        })
        .collect();
    let each = Rounds {
        what: "round",
        tag: "",
        rounds,
    };
    run_rounds(
        &mut progress,
        each,
        &systems,
        &mut results,
        |s| s.name().to_string(),
        |sys, res, id| {
            match trial::run(&sys.spec(id, &guest.marker, timeout, guest.stop_at_ready)) {
                Ok(t) if t.ok() => {
                    let timeline = phases::parse(&t.stderr);
                    if sys.kind == Kind::Ember && timeline.is_none() {
                        res.failures.push("no --timings=json line on stderr".into());
                    } else {
                        res.ready_ms.push(ms(t.ready.unwrap_or_default()));
                        // A VMM we stopped has no exit time of its own.
                        if !t.stopped {
                            res.exit_ms.push(ms(t.exit));
                        }
                        res.rss_kib.push(t.max_rss_kib as f64);
                        if let Some(tl) = timeline.filter(|_| sys.kind == Kind::Ember) {
                            res.timelines.push(tl);
                        }
                    }
                }
                Ok(t) => {
                    sys.cleanup(id);
                    res.failures.push(t.failure());
                }
                Err(e) => {
                    sys.cleanup(id);
                    res.failures.push(e.to_string());
                }
            }
        },
    );

    // Own memory of the VMMs, from an interactive guest (see memory.rs).
    let mut mem = Vec::new();
    for sys in &systems {
        if !sys.kind.is_vm() || mode == Mode::Banner {
            continue;
        }
        progress.say(&format!("{}: memory probe {}", mode.name(), sys.name()));
        mem.push((
            sys.kind,
            memory_probe(mode, sys, guest, inputs, timeout, guest_bytes),
        ));
    }
    progress.done();
    drop(bundle);

    Ok(ModeResult {
        mode,
        guest: describe_guest(mode, guest),
        marker: guest.marker.clone(),
        rounds,
        systems: results,
        skipped,
        memory: mem,
    })
}

fn describe_guest(mode: Mode, g: &Guest) -> String {
    match mode {
        Mode::Null | Mode::Banner | Mode::Restore => {
            format!("{} (no initramfs)", g.kernel.display())
        }
        Mode::Linux | Mode::Exec => format!(
            "{} + {}",
            g.kernel.display(),
            g.initramfs
                .as_ref()
                .map_or("-".into(), |i| i.display().to_string())
        ),
    }
}

fn timeout_for(mode: Mode, args: &BenchArgs, kvm: KvmKind) -> Duration {
    Duration::from_secs(args.timeout.unwrap_or(match (mode, kvm) {
        (Mode::Null | Mode::Restore, _) => 30,
        (Mode::Banner, _) => 60,
        (Mode::Linux | Mode::Exec, KvmKind::Pvm) => 240,
        (Mode::Linux | Mode::Exec, _) => 120,
    }))
}

fn rounds_for(mode: Mode, args: &BenchArgs, kvm: KvmKind) -> Result<u32, BenchError> {
    let rounds = args.rounds.unwrap_or(match mode {
        Mode::Null | Mode::Restore => 20,
        Mode::Linux if kvm == KvmKind::Pvm => 3,
        Mode::Linux | Mode::Banner | Mode::Exec => 10,
    });
    if rounds == 0 || rounds > 10_000 {
        return Err(BenchError::Input(format!(
            "--rounds: {rounds} is not between 1 and 10000"
        )));
    }
    Ok(rounds)
}

/// The guests `--restore-guest` names.
fn restore_guests(
    args: &BenchArgs,
    inputs: &Inputs,
    kvm: KvmKind,
) -> Result<Vec<restore::RestoreGuest>, BenchError> {
    let mut out: Vec<restore::RestoreGuest> = Vec::new();
    for word in restore_guest_names(&args.restore_guest)? {
        let g = match word {
            RestoreGuestName::Counter => {
                // Next to the null guest when one is given, as the memory probe's echo.elf is.
                let path = match &args.null_guest {
                    Some(p) => p.with_file_name("counter.elf"),
                    None => find_test_guest(&inputs.ember, "counter.elf"),
                };
                restore::RestoreGuest::counter(require(
                    path,
                    "the counter test guest",
                    "build it with `make -C tests/guests`",
                )?)
            }
            RestoreGuestName::Linux => restore::RestoreGuest::linux(
                linux_kernel(args, inputs)?,
                require(
                    inputs.kit.join("initramfs.cpio"),
                    "the kit's shell initramfs.cpio",
                    "build the guest kit with scripts/kit.sh",
                )?,
                kvm == KvmKind::Pvm,
            ),
        };
        out.push(g);
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RestoreGuestName {
    Counter,
    Linux,
}

/// `--restore-guest`'s words, each once, in order; checked before anything is launched.
fn restore_guest_names(list: &str) -> Result<Vec<RestoreGuestName>, BenchError> {
    let mut out = Vec::new();
    for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let name = match word {
            "counter" => RestoreGuestName::Counter,
            "linux" => RestoreGuestName::Linux,
            other => {
                return Err(BenchError::Input(format!(
                    "--restore-guest: `{other}` is not counter or linux"
                )))
            }
        };
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}

fn run_exec(
    args: &BenchArgs,
    inputs: &Inputs,
    wanted: &[Kind],
    kvm: KvmKind,
) -> Result<exec::ExecResult, BenchError> {
    let timeout = timeout_for(Mode::Exec, args, kvm);
    exec::run(&exec::Params {
        inputs,
        kernel: args.kernel.as_deref(),
        wanted,
        rounds: rounds_for(Mode::Exec, args, kvm)?,
        memory: &args.memory,
        timeout,
        kvm,
        quiet: args.quiet,
    })
}

fn run_restore(
    mut guest: restore::RestoreGuest,
    args: &BenchArgs,
    inputs: &Inputs,
    wanted: &[Kind],
    kvm: KvmKind,
    guest_bytes: u64,
) -> Result<restore::RestoreResult, BenchError> {
    if let Some(t) = args.timeout {
        guest.timeout = Duration::from_secs(t);
    }
    let null_guest = guest_for(Mode::Restore, args, inputs)?;
    restore::run(
        &guest,
        &restore::Params {
            inputs,
            null_guest: &null_guest,
            wanted,
            rounds: rounds_for(Mode::Restore, args, kvm)?,
            clones: args.clones,
            guest_bytes,
            memory: &args.memory,
            quiet: args.quiet,
        },
    )
}

/// Probes a VMM's own memory with an interactive guest that waits on its console: the echo test
/// guest (null mode) or the kit's shell initramfs (linux mode).
fn memory_probe(
    mode: Mode,
    sys: &System,
    guest: &Guest,
    inputs: &Inputs,
    timeout: Duration,
    guest_bytes: u64,
) -> Result<memory::VmmMemory, String> {
    let (probe_guest, marker, quit) = match mode {
        Mode::Null => {
            let echo = guest.kernel.with_file_name("echo.elf");
            if !echo.is_file() {
                return Err(format!(
                    "{} is missing (make -C tests/guests)",
                    echo.display()
                ));
            }
            // QEMU boots the same program built with a PVH note, as in the null mode itself.
            let echo_pvh = echo.with_file_name("echo-pvh.elf");
            let mut g = guest.clone();
            g.kernel = echo;
            g.qemu = if echo_pvh.is_file() {
                Ok(QemuGuest {
                    kernel: echo_pvh,
                    cmdline: "exit=triple".into(),
                })
            } else {
                Err(format!(
                    "{} is missing (make -C tests/guests)",
                    echo_pvh.display()
                ))
            };
            g.marker = "echo: ready".into();
            (g, "echo: ready", &b"quit\n"[..])
        }
        Mode::Banner | Mode::Restore | Mode::Exec => {
            return Err(format!("no memory probe in the {} mode", mode.name()))
        }
        Mode::Linux => {
            let shell = inputs.kit.join("initramfs.cpio");
            if !shell.is_file() {
                return Err(format!("{} is missing (scripts/kit.sh)", shell.display()));
            }
            let mut g = guest.clone();
            g.initramfs = Some(shell);
            g.marker = "ember-kit: ready".into();
            (g, "ember-kit: ready", &b"reboot -f\n"[..])
        }
    };
    let s = systems::candidate(sys.kind, &inputs.ember, &probe_guest, None)?;
    let spec = s.spec("probe", marker, timeout, false);
    memory::probe(&spec, memory::GuestRam::Anonymous(guest_bytes), quit, 3)
}

/// `(run number, round, system index)` for `rounds` rounds over `n` systems: every system once a
/// round, each round's order rotated by one from the last, so that drift in the machine's speed
/// falls on every system alike.
pub(crate) fn rotation(rounds: u32, n: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..rounds as usize)
        .flat_map(move |round| (0..n).map(move |k| (round, (k + round) % n)))
        .enumerate()
        .map(|(done, (round, i))| (done, round, i))
}

/// A mode's timed rounds: `what` names them on the progress line, `tag` keeps their run ids
/// apart from other modes'.
pub(crate) struct Rounds<'a> {
    pub what: &'a str,
    pub tag: &'a str,
    pub rounds: u32,
}

/// Runs `r.rounds` rounds over `plans` in [`rotation`]'s order, with the progress bar:
/// `run(plan, result, id)` runs one plan once and records how it went in its result
/// (`results[i]` is `plans[i]`'s).
pub(crate) fn run_rounds<P, R>(
    progress: &mut Progress,
    r: Rounds<'_>,
    plans: &[P],
    results: &mut [R],
    name: impl Fn(&P) -> String,
    mut run: impl FnMut(&P, &mut R, &str),
) {
    let total = r.rounds as usize * plans.len();
    for (done, round, i) in rotation(r.rounds, plans.len()) {
        let plan = &plans[i];
        progress.bar(
            done,
            total,
            &format!("{} {}/{}: {}", r.what, round + 1, r.rounds, name(plan)),
        );
        let id = format!("{}-{}{round}-{i}", std::process::id(), r.tag);
        run(plan, &mut results[i], &id);
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The command line that reproduces this benchmark, quoted for a shell: `ember bench` and our
/// arguments (ember passes its own after `bench` through unchanged).
fn command_line() -> String {
    ["ember".to_string(), "bench".to_string()]
        .into_iter()
        .chain(std::env::args().skip(1).map(|w| systems::shell_quote(&w)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One progress line on stderr, rewritten in place with `\r`.
pub(crate) struct Progress {
    on: bool,
    width: usize,
}

impl Progress {
    pub(crate) fn new(on: bool) -> Progress {
        Progress { on, width: 0 }
    }

    pub(crate) fn say(&mut self, text: &str) {
        if !self.on {
            return;
        }
        let pad = self.width.saturating_sub(text.chars().count());
        eprint!("\r{text}{}", " ".repeat(pad));
        self.width = text.chars().count();
        let _ = std::io::stderr().flush();
    }

    pub(crate) fn bar(&mut self, done: usize, total: usize, what: &str) {
        const W: usize = 24;
        let filled = (done * W).checked_div(total).unwrap_or(0);
        let text = format!(
            "[{}{}] {done}/{total} {what}",
            "#".repeat(filled),
            "-".repeat(W - filled)
        );
        self.say(&text);
    }

    pub(crate) fn done(&mut self) {
        if self.on && self.width > 0 {
            eprint!("\r{}\r", " ".repeat(self.width));
            let _ = std::io::stderr().flush();
            self.width = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(guest: &str) -> BenchArgs {
        BenchArgs {
            rounds: None,
            guest: guest.into(),
            kernel: None,
            initramfs: None,
            null_guest: None,
            rootfs: None,
            systems: None,
            memory: "128M".into(),
            timeout: None,
            json: None,
            chart: None,
            clones: 8,
            restore_guest: "counter".into(),
            quiet: true,
        }
    }

    #[test]
    fn pvm_hosts_run_every_mode_and_say_what_is_emulated() {
        let (m, notes) = modes(&args("auto"), KvmKind::Pvm).unwrap();
        assert_eq!(
            m,
            vec![Mode::Null, Mode::Banner, Mode::Linux, Mode::Restore]
        );
        assert!(notes[0].contains("kvm_pvm") && notes[0].contains("emulated"));
        let (m, _) = modes(&args("linux"), KvmKind::Pvm).unwrap();
        assert_eq!(m, vec![Mode::Linux]);
        let (m, notes) = modes(&args("null"), KvmKind::Pvm).unwrap();
        assert_eq!(m, vec![Mode::Null]);
        assert!(notes.is_empty(), "the null guest's figures need no caveat");
        let (m, notes) = modes(&args("auto"), KvmKind::Hardware).unwrap();
        assert_eq!(m, vec![Mode::Null, Mode::Linux, Mode::Restore]);
        assert!(notes.is_empty());
        let (m, notes) = modes(&args("restore"), KvmKind::Pvm).unwrap();
        assert_eq!(m, vec![Mode::Restore]);
        assert!(notes.is_empty(), "no Linux kernel is booted: no caveat");
        let (m, notes) = modes(&args("exec"), KvmKind::Pvm).unwrap();
        assert_eq!(m, vec![Mode::Exec]);
        assert!(notes.is_empty(), "the exec report has its own note");
        let (m, _) = modes(&args("banner,null,banner"), KvmKind::Pvm).unwrap();
        assert_eq!(m, vec![Mode::Banner, Mode::Null]);
        assert!(modes(&args("xen"), KvmKind::Hardware).is_err());
    }

    #[test]
    fn rounds_rotate_and_run_every_system_once_each() {
        let order: Vec<_> = rotation(3, 3).collect();
        assert_eq!(
            order,
            [
                (0, 0, 0),
                (1, 0, 1),
                (2, 0, 2),
                (3, 1, 1),
                (4, 1, 2),
                (5, 1, 0),
                (6, 2, 2),
                (7, 2, 0),
                (8, 2, 1)
            ]
        );
        assert_eq!(rotation(2, 0).count(), 0);
    }

    #[test]
    fn systems_list() {
        assert_eq!(
            wanted_systems(Some("runc, qemu,runc")).unwrap(),
            vec![Kind::Ember, Kind::Runc, Kind::Qemu]
        );
        assert_eq!(wanted_systems(None).unwrap(), Kind::ALL.to_vec());
        assert!(wanted_systems(Some("lxc")).is_err());
    }

    #[test]
    fn restore_guests_list() {
        assert_eq!(
            restore_guest_names("linux, counter,linux").unwrap(),
            vec![RestoreGuestName::Linux, RestoreGuestName::Counter]
        );
        assert!(restore_guest_names("windows").is_err());
    }
}

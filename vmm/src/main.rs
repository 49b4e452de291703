//! The `ember` command: parse the command line, run the VM, turn the outcome into an exit status.
//! Errors end as one line, `ember: error: ...`, and status 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgMatches, Args, FromArgMatches, Parser, Subcommand};

use ember_vmm::config::{self, RunOptions, VmConfig};
use ember_vmm::error_line;
use ember_vmm::timeline::{self, Phase};
use ember_vmm::vcpu::ExitReason;
use ember_vmm::vmm::Start;

#[derive(Parser)]
#[command(
    name = "ember",
    version,
    about = "A lightweight KVM virtual machine monitor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// One value, parsed once: boxing the larger variant would save nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Boot a kernel in a new microVM; Ember exits when the guest resets or powers off.
    Run(Deferred<RunArgs>),
    /// Run a command in a throwaway microVM over a read-only root image, and exit with its
    /// status (124 timeout, 125 the VM or its agent failed, 126 not executable, 127 not found,
    /// 128+N killed by signal N).
    Exec(Deferred<ExecArgs>),
    /// Measure microVM start-up against containers (and peers) on the same root filesystem.
    // The benchmark is its own crate and binary (`ember-bench`); everything after `bench`,
    // `--help` included, is its to parse.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<std::ffi::OsString>,
    },
}

/// A subcommand's arguments, defined only once that subcommand is the one being parsed (or its
/// help shown): `ember run` does not build `exec`'s arguments, nor `exec` `run`'s. Building every
/// subcommand's arguments was most of the parse's allocations, and its page faults, at every
/// start. Parsing, help and errors are the wrapped type's own.
struct Deferred<T>(T);

impl<T: Args> Args for Deferred<T> {
    fn group_id() -> Option<clap::Id> {
        T::group_id()
    }

    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.defer(T::augment_args)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        cmd.defer(T::augment_args_for_update)
    }
}

impl<T: FromArgMatches> FromArgMatches for Deferred<T> {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        T::from_arg_matches(matches).map(Deferred)
    }

    fn from_arg_matches_mut(matches: &mut ArgMatches) -> Result<Self, clap::Error> {
        T::from_arg_matches_mut(matches).map(Deferred)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches(matches)
    }

    fn update_from_arg_matches_mut(&mut self, matches: &mut ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches_mut(matches)
    }
}

#[derive(Args)]
struct RunArgs {
    /// Kernel: an ELF vmlinux (PVH entry when it has the note), a bzImage, or a static x86_64 ELF.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["restore", "api_sock"])]
    kernel: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed as the kernel supports).
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Kernel command line; replaces the default. Ember appends the words its devices need.
    #[arg(long, value_name = "STRING", default_value = config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value = "1")]
    cpus: String,
    /// Guest memory, e.g. 256M or 4G.
    #[arg(long, value_name = "SIZE", default_value = "128M")]
    memory: String,
    /// Resume the VM of a snapshot (its state file) instead of booting; needs --mem. The snapshot
    /// fixes the machine: no --kernel, --initramfs, --cmdline, --cpus, --memory or --disk
    /// (--vsock uds=PATH moves its vsock socket).
    #[arg(
        long,
        value_name = "PATH",
        requires = "mem",
        conflicts_with_all = ["kernel", "initramfs", "cmdline", "cpus", "memory", "disk"]
    )]
    restore: Option<PathBuf>,
    /// The snapshot's guest memory file, mapped copy-on-write (with --restore).
    #[arg(long, value_name = "PATH", requires = "restore")]
    mem: Option<PathBuf>,
    /// With --restore: map all of the guest's memory before it runs (shared page-cache pages)
    /// instead of at its first touch of each page.
    #[arg(long, requires = "restore")]
    prefault: bool,
    /// Guest console: stdio (the terminal; Ctrl-A x quits), file=PATH, or null.
    #[arg(long, value_name = "MODE", default_value = "stdio")]
    serial: String,
    /// A virtio block device: path=IMG[,readonly=on][,id=NAME][,overlay=FILE|tmp]; repeat for
    /// vdb, vdc, ... With overlay= the image is a read-only base and the writes go to FILE.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// A virtio-vsock device: the guest's CID, and the Unix socket Ember listens on for host
    /// clients (`CONNECT <port>`); the guest's connections to host port P go to PATH_P. With
    /// --restore, `uds=PATH` only: where the restored VM's vsock device listens.
    #[arg(long, value_name = "cid=N,uds=PATH")]
    vsock: Option<String>,
    /// Print the boot timeline at exit on stderr: as a table, or `--timings=json`.
    #[arg(long, value_name = "FORMAT", num_args = 0..=1, default_missing_value = "table", require_equals = true)]
    timings: Option<String>,
    /// Record when the guest's console first prints TEXT (shown by --timings).
    #[arg(long, value_name = "TEXT")]
    ready_marker: Option<String>,
    /// System call filters for Ember's threads: on (default) or off (for debugging).
    #[arg(long, value_name = "on|off", default_value = "on")]
    seccomp: String,
    /// Serve the HTTP API (JSON; pause, resume, snapshots) on a Unix socket at PATH. Alone, with
    /// no --kernel or --restore, Ember waits there for a snapshot to load.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
}

#[derive(Args)]
struct ExecArgs {
    /// Kernel (default: Ember's microVM kernel, ~/.cache/ember/microvm-kernel/vmlinux).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Root filesystem: an ext4 image, or a directory (packed into a cached image). Default:
    /// the guest kit's busybox root. It is only read: writes go to a throwaway overlay.
    #[arg(long, value_name = "IMG|DIR")]
    rootfs: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value = "1")]
    cpus: String,
    /// Guest memory.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    memory: String,
    /// More virtio block devices (vdb, ...), as for `ember run`.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// Stop the VM and exit 124 after this long (30s, 2m, ...), boot included.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// The command's environment, KEY=VALUE (repeat); PATH, HOME and TERM have defaults.
    #[arg(long, value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The command's working directory in the guest.
    #[arg(long, value_name = "DIR", default_value = "/")]
    cwd: String,
    /// Write the guest's console (kernel messages) to PATH.
    #[arg(long, value_name = "PATH")]
    console: Option<PathBuf>,
    /// System call filters for Ember's threads: on (default) or off.
    #[arg(long, value_name = "on|off", default_value = "on")]
    seccomp: String,
    /// Resume a booted agent from the snapshot in DIR instead of booting; a DIR without one
    /// gets one first (boot, snapshot when the agent is ready, then run from it).
    #[arg(long, value_name = "DIR")]
    snapshot: Option<PathBuf>,
    /// The command and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

impl ExecArgs {
    fn to_options(&self) -> Result<ember_vmm::exec::ExecOptions, config::ConfigError> {
        let mut env = ember_agent::default_env();
        for word in &self.env {
            let (k, v) = config::parse_env(word)?;
            env.retain(|(key, _)| *key != k);
            env.push((k, v));
        }
        Ok(ember_vmm::exec::ExecOptions {
            kernel: self.kernel.clone(),
            rootfs: self.rootfs.clone(),
            cpus: config::parse_cpus(&self.cpus)?,
            memory: config::parse_memory(&self.memory)?,
            disks: self
                .disk
                .iter()
                .map(|d| config::parse_disk(d))
                .collect::<Result<_, _>>()?,
            timeout: self
                .timeout
                .as_deref()
                .map(config::parse_duration)
                .transpose()?,
            console: self.console.clone(),
            seccomp: config::parse_seccomp(&self.seccomp)?,
            argv: self.command.clone(),
            env,
            cwd: self.cwd.clone(),
            snapshot: self.snapshot.clone(),
        })
    }
}

impl RunArgs {
    fn run_options(&self) -> Result<RunOptions, config::ConfigError> {
        Ok(RunOptions {
            serial: config::parse_serial(&self.serial)?,
            ready_marker: self.ready_marker.clone(),
            seccomp: config::parse_seccomp(&self.seccomp)?,
        })
    }

    fn to_start(&self) -> Result<Start, config::ConfigError> {
        match (&self.kernel, &self.restore, &self.mem) {
            (Some(kernel), _, _) => Ok(Start::Boot(self.to_config(kernel)?)),
            (None, Some(snapshot), Some(mem)) => Ok(Start::Restore {
                snapshot: snapshot.clone(),
                mem: mem.clone(),
                opts: self.run_options()?,
                prefault: self.prefault,
                vsock_uds: self
                    .vsock
                    .as_deref()
                    .map(config::parse_vsock_rebind)
                    .transpose()?,
            }),
            (None, None, _) if self.vsock.is_some() => Err(config::ConfigError::BadVsock {
                spec: self.vsock.clone().unwrap_or_default(),
                reason: "a vsock device needs --kernel (or --restore, to move one)".into(),
            }),
            // clap has made sure --api-sock is there.
            _ => Ok(Start::AwaitLoad(self.run_options()?)),
        }
    }

    fn timings(&self) -> Result<Option<config::TimingsFormat>, config::ConfigError> {
        self.timings
            .as_deref()
            .map(config::parse_timings)
            .transpose()
    }

    fn to_config(&self, kernel: &std::path::Path) -> Result<VmConfig, config::ConfigError> {
        Ok(VmConfig {
            kernel: kernel.to_path_buf(),
            initramfs: self.initramfs.clone(),
            cmdline: self.cmdline.clone(),
            cpus: config::parse_cpus(&self.cpus)?,
            memory: config::parse_memory(&self.memory)?,
            serial: config::parse_serial(&self.serial)?,
            disks: self
                .disk
                .iter()
                .map(|d| config::parse_disk(d))
                .collect::<Result<_, _>>()?,
            vsock: self.vsock.as_deref().map(config::parse_vsock).transpose()?,
            timings: self.timings()?,
            ready_marker: self.ready_marker.clone(),
            seccomp: config::parse_seccomp(&self.seccomp)?,
        })
    }
}

/// `EMBER_BOOT_LOG=PATH`: every `ember run` appends its boot timeline (the `--timings=json`
/// line) to PATH. Test suites and CI use it to count the guests that really booted (a non-null
/// `first_serial_byte`) and to keep each run's timings. A file that cannot be opened is only
/// logged: it must not stop a VM.
fn boot_log() -> Option<std::fs::File> {
    let path = std::env::var_os("EMBER_BOOT_LOG")?;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .map_err(|e| log::warn!("EMBER_BOOT_LOG {}: {e}", PathBuf::from(&path).display()))
        .ok()
}

/// Replaces this process with the `ember-bench` next to it, so that its output, exit status and
/// the signals sent to `ember bench` are the benchmark's own. Returns only if it cannot start.
fn exec_bench(args: Vec<std::ffi::OsString>) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let bench = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name("ember-bench"),
        Err(e) => {
            eprintln!("ember: error: cannot locate the ember binary to find ember-bench: {e}");
            return ExitCode::from(1);
        }
    };
    if !bench.is_file() {
        eprintln!(
            "ember: error: `ember bench` runs {}, which is missing: build it with `cargo build \
             --release -p ember-bench`",
            bench.display()
        );
        return ExitCode::from(1);
    }
    let e = std::process::Command::new(&bench).args(args).exec();
    eprintln!("ember: error: cannot run {}: {e}", bench.display());
    ExitCode::from(1)
}

/// The guest kernel reported a panic (pvpanic): a crash, not a reboot.
const EXIT_GUEST_PANIC: u8 = 3;
/// A vCPU triple-faulted: the guest crashed past its own exception handlers.
const EXIT_TRIPLE_FAULT: u8 = 4;

fn main() -> ExitCode {
    timeline::start();
    // One malloc arena for every thread: a thread's first allocation otherwise maps an arena of
    // its own and faults in fresh pages for it, where the main arena has pages to reuse (what
    // parsing the command line freed). Ember's threads allocate little once they run, so they
    // do not contend for it. Set before any thread starts; glibc ignores a refusal harmlessly.
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("EMBER_LOG", "warn"))
        .format_timestamp(None)
        .init();

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // clap's own report spans several lines; users get its first paragraph on one line
            // (a missing argument is named on the indented line after the first).
            let text = e.render().to_string();
            let first: Vec<&str> = text
                .lines()
                .skip_while(|l| l.trim().is_empty())
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = match first.join(" ") {
                s if s.is_empty() => "invalid arguments".to_string(),
                s => s.trim_start_matches("error: ").to_string(),
            };
            eprintln!("ember: error: {first} (see `ember --help`)");
            return ExitCode::from(2);
        }
    };

    match cli.command {
        Command::Bench { args } => exec_bench(args),
        Command::Exec(Deferred(args)) => {
            let outcome = args
                .to_options()
                .map_err(|e| error_line(&e))
                .and_then(|opts| ember_vmm::exec::exec(opts).map_err(|e| error_line(&e)));
            match outcome {
                Ok(code) => ExitCode::from(code),
                Err(line) => {
                    eprintln!("ember: error: {line}");
                    ExitCode::from(ember_vmm::exec_client::EXIT_NO_AGENT)
                }
            }
        }
        Command::Run(Deferred(args)) => {
            let (start, timings) = match args.to_start().and_then(|s| Ok((s, args.timings()?))) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ember: error: {}", error_line(&e));
                    return ExitCode::from(1);
                }
            };
            timeline::mark(Phase::ArgsParsed);
            // Opened now: the seccomp filters on from the first guest instruction allow no open.
            let boot_log = boot_log();
            let outcome = ember_vmm::vmm::run(start, args.api_sock.as_deref());
            if timeline::get(Phase::GuestExit).is_none() {
                timeline::mark(Phase::GuestExit);
            }
            match timings {
                Some(config::TimingsFormat::Table) => eprint!("{}", timeline::table()),
                Some(config::TimingsFormat::Json) => eprintln!("{}", timeline::json()),
                None => {}
            }
            if let Some(mut log) = boot_log {
                use std::io::Write;
                // One write of one line, so that Embers running at once never interleave.
                let _ = log.write_all(format!("{}\n", timeline::json()).as_bytes());
            }
            match outcome {
                Ok(ExitReason::Signal(sig)) => ExitCode::from(128u8.saturating_add(sig as u8)),
                Ok(ExitReason::GuestPanic) => {
                    eprintln!("ember: the guest kernel panicked (pvpanic)");
                    ExitCode::from(EXIT_GUEST_PANIC)
                }
                Ok(ExitReason::TripleFault) => {
                    eprintln!("ember: the guest triple-faulted (a vCPU shut down)");
                    ExitCode::from(EXIT_TRIPLE_FAULT)
                }
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ember: error: {}", error_line(&e));
                    ExitCode::from(1)
                }
            }
        }
    }
}

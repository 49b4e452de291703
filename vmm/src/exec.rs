//! `ember exec`: one command in a throwaway microVM. The VM boots Ember's microVM kernel with the
//! agent's initramfs (`exec_image`), its root filesystem the base image under a temporary
//! copy-on-write overlay (the base is only read, so any number of runs share it; the overlay goes
//! when the run ends), and a vsock device through which the host reaches the agent
//! (`exec_client`). The command's output comes back on Ember's stdout and stderr as it is
//! written, and Ember exits with the command's status (or one of `exec_client`'s own).

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_agent::{Outcome, Request};

use crate::config::{self, SerialMode, VmConfig};
use crate::exec_client::{self, ClientError, EXIT_NO_AGENT, EXIT_TIMEOUT};
use crate::vcpu::ExitReason;
use crate::vmm::{Vmm, VmmError};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(
        "no kernel at {}: build Ember's microVM kernel with scripts/microvm-kernel.sh, or give \
         --kernel",
        .0.display()
    )]
    NoKernel(PathBuf),
    #[error(
        "no root filesystem at {}: build the guest kit with scripts/kit.sh, or give --rootfs",
        .0.display()
    )]
    NoRootfs(PathBuf),
    #[error("--rootfs {}: {source}", path.display())]
    Rootfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no ember-agent next to ember at {}: build it with cargo build --release -p ember-agent",
        .0.display()
    )]
    NoAgent(PathBuf),
    #[error(transparent)]
    Image(#[from] crate::exec_image::ImageError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("scratch directory {}: {source}", path.display())]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Snapshot(#[from] crate::exec_snapshot::SnapshotDirError),
}

/// The guest's kernel command line (Ember adds its device and host words). `quiet`: on a host
/// where the guest kernel is emulated, each console line costs. `clocksource=kvm-clock`: a VM
/// restored from a snapshot gets its clock back from the saved kvm-clock, where the TSC may not
/// follow (kvm_pvm gives guests the host's TSC unchanged), and a guest timing itself by the TSC
/// would find its clock leapt by the snapshot's age and catch up on every timer it missed.
pub const GUEST_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off quiet clocksource=kvm-clock ember.agent.root=/dev/vda";

pub struct ExecOptions {
    pub kernel: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
    pub cpus: u8,
    pub memory: u64,
    /// More disks, as `--disk` takes them (vdb, vdc, ...).
    pub disks: Vec<config::DiskConfig>,
    pub timeout: Option<Duration>,
    /// The guest's console (kernel messages) goes here; nowhere by default.
    pub console: Option<PathBuf>,
    pub seccomp: bool,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    /// `--snapshot DIR`: restore the agent's VM from DIR (made there first if missing).
    pub snapshot: Option<PathBuf>,
}

fn cache_base() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/ember")
}

/// What the VM is made from: the kernel, the root filesystem's image and the agent's
/// initramfs.
pub(crate) struct Inputs {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub initramfs: PathBuf,
}

/// The kernel and base image to boot, made or found.
fn inputs(opts: &ExecOptions) -> Result<Inputs, ExecError> {
    let kernel = opts
        .kernel
        .clone()
        .unwrap_or_else(|| cache_base().join("microvm-kernel/vmlinux"));
    if !kernel.is_file() {
        return Err(ExecError::NoKernel(kernel));
    }
    let cache = crate::exec_image::cache_dir();
    let rootfs = match &opts.rootfs {
        Some(path) => {
            let meta = std::fs::metadata(path).map_err(|source| ExecError::Rootfs {
                path: path.clone(),
                source,
            })?;
            if meta.is_dir() {
                crate::exec_image::rootfs_image(path, &cache)?
            } else {
                path.clone()
            }
        }
        None => {
            let dir = cache_base().join("kit/rootfs");
            if !dir.is_dir() {
                return Err(ExecError::NoRootfs(dir));
            }
            crate::exec_image::rootfs_image(&dir, &cache)?
        }
    };
    let agent = std::env::current_exe()
        .map(|exe| exe.with_file_name("ember-agent"))
        .unwrap_or_else(|_| PathBuf::from("ember-agent"));
    if !agent.is_file() {
        return Err(ExecError::NoAgent(agent));
    }
    let initramfs = crate::exec_image::agent_initramfs(&agent, &cache)?;
    Ok(Inputs {
        kernel,
        rootfs,
        initramfs,
    })
}

/// A directory for this run's vsock socket, removed with it.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    pub(crate) fn new() -> Result<Self, ExecError> {
        let dir = std::env::temp_dir().join(format!("ember-exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| ExecError::Scratch {
            path: dir.clone(),
            source,
        })?;
        Ok(Scratch(dir))
    }

    pub(crate) fn uds(&self) -> PathBuf {
        self.0.join("vsock")
    }

    /// Where a booted agent's own connection arrives, bound before the VM runs.
    pub(crate) fn agent_listener(&self) -> Result<UnixListener, ExecError> {
        exec_client::agent_listener(&self.uds()).map_err(|source| ExecError::Scratch {
            path: self.0.clone(),
            source,
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest's console: a file with `--console`, else nowhere.
pub(crate) fn console(opts: &ExecOptions) -> SerialMode {
    match &opts.console {
        Some(path) => SerialMode::File(path.clone()),
        None => SerialMode::Null,
    }
}

/// The microVM `ember exec` boots: the kernel with the agent's initramfs, the base image under a
/// tmp overlay as vda, the user's disks after it, vsock with its socket at `uds`.
pub(crate) fn boot_config(
    opts: &ExecOptions,
    inputs: &Inputs,
    uds: &std::path::Path,
) -> Result<VmConfig, ExecError> {
    let mut disks = vec![config::parse_disk(&format!(
        "path={},overlay=tmp,id=ember-root",
        inputs.rootfs.display()
    ))?];
    disks.extend(opts.disks.iter().cloned());
    Ok(VmConfig {
        kernel: inputs.kernel.clone(),
        initramfs: Some(inputs.initramfs.clone()),
        cmdline: GUEST_CMDLINE.into(),
        cpus: opts.cpus,
        memory: opts.memory,
        serial: console(opts),
        disks,
        vsock: Some(config::parse_vsock(&format!(
            "cid=3,uds={}",
            uds.display()
        ))?),
        timings: None,
        ready_marker: None,
        seccomp: opts.seccomp,
    })
}

/// Runs the command; returns the status `ember exec` exits with.
pub fn exec(opts: ExecOptions) -> Result<u8, ExecError> {
    // The time limit counts from here: boot (or restore) included.
    let deadline = opts.timeout.map(|t| Instant::now() + t);
    let inputs = inputs(&opts)?;
    if let Some(dir) = &opts.snapshot {
        return crate::exec_snapshot::exec(dir, &opts, &inputs, deadline);
    }
    let scratch = Scratch::new()?;
    let listener = scratch.agent_listener()?;
    let cfg = boot_config(&opts, &inputs, &scratch.uds())?;
    drive(
        Vmm::build(&cfg)?,
        &scratch.uds(),
        Agent::Dials(listener),
        &opts,
        deadline,
    )
}

/// How [`drive`] reaches the agent.
pub(crate) enum Agent {
    /// A booted VM's agent connects here when it starts listening.
    Dials(UnixListener),
    /// A restored VM's agent has been listening since before the snapshot: `CONNECT 52`.
    Listens,
}

/// Runs the VM (booted or restored), sends the command to its agent through the vsock socket
/// at `uds`, copies the output, and turns how it all ended into `ember exec`'s status.
pub(crate) fn drive(
    mut vmm: Vmm,
    uds: &std::path::Path,
    agent: Agent,
    opts: &ExecOptions,
    deadline: Option<Instant>,
) -> Result<u8, ExecError> {
    vmm.defer_teardown();
    vmm.watch_signals()?;
    let ctl = vmm.controller();
    let vm = std::thread::Builder::new()
        .name("ember-vm".into())
        .spawn(move || vmm.run())
        .map_err(|e| VmmError::Devices(format!("cannot start the VM's thread: {e}")))?;

    // The time limit stops the VM; the connection then ends and the client returns.
    let timed_out = Arc::new(AtomicBool::new(false));
    if let Some(deadline) = deadline {
        let (ctl, timed_out) = (ctl.clone(), timed_out.clone());
        std::thread::spawn(move || {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            timed_out.store(true, Ordering::SeqCst);
            ctl.stop();
        });
    }
    let alive = || ctl.exit_reason().is_none();
    let patience = deadline.map_or(Duration::from_secs(600), |d| {
        d.saturating_duration_since(Instant::now())
    });
    let req = Request {
        argv: opts.argv.clone(),
        env: opts.env.clone(),
        cwd: opts.cwd.clone(),
    };
    let conn = match &agent {
        Agent::Dials(listener) => exec_client::accept_agent(listener, patience, alive),
        Agent::Listens => exec_client::connect(uds, patience, alive),
    };
    let outcome = conn.and_then(|conn| {
        // When the VM ends (time limit, signal, crash), nothing more comes: stop reading.
        let watch = conn.try_clone().ok();
        let ctl = ctl.clone();
        std::thread::spawn(move || {
            while ctl.exit_reason().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(w) = watch {
                let _ = w.shutdown(std::net::Shutdown::Both);
            }
        });
        let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
        exec_client::run(conn, &req, &mut out, &mut err)
    });
    // The agent powers the guest off after its report; a guest that does not is stopped.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while ctl.exit_reason().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    ctl.stop();
    let ended = vm.join();
    if timed_out.load(Ordering::SeqCst) {
        eprintln!("ember: exec: the time limit ran out; the VM was stopped");
        return Ok(EXIT_TIMEOUT);
    }
    match outcome {
        Ok(outcome) => {
            match &outcome {
                Outcome::NotFound(what) => eprintln!("ember: exec: {what}: command not found"),
                Outcome::NotExecutable(what) => eprintln!("ember: exec: {what}"),
                Outcome::Failed(what) => {
                    eprintln!("ember: exec: the agent could not run it: {what}")
                }
                _ => {}
            }
            Ok(exec_client::exit_code(&outcome))
        }
        Err(e) => {
            if let Ok(Ok(ExitReason::Signal(sig))) = ended {
                return Ok(128u8.saturating_add(sig as u8));
            }
            let why = match (&e, &ended) {
                (_, Ok(Err(vm_err))) => format!("{e} (the VM: {})", crate::error_line(vm_err)),
                (ClientError::NoAgent(_), Ok(Ok(reason))) => {
                    format!("{e}: the guest ended first ({reason:?})")
                }
                _ => e.to_string(),
            };
            eprintln!("ember: exec: {why}");
            Ok(EXIT_NO_AGENT)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_kernel_says_how_to_build_one() {
        let opts = ExecOptions {
            kernel: Some("/no/such/vmlinux".into()),
            rootfs: None,
            cpus: 1,
            memory: 128 << 20,
            disks: Vec::new(),
            timeout: None,
            console: None,
            seccomp: true,
            argv: vec!["true".into()],
            env: Vec::new(),
            cwd: "/".into(),
            snapshot: None,
        };
        let e = exec(opts).unwrap_err();
        assert!(e.to_string().contains("scripts/microvm-kernel.sh"), "{e}");
    }
}

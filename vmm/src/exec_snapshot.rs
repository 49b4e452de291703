//! `ember exec --snapshot DIR`: resume a booted agent instead of booting one.
//!
//! DIR holds at most one snapshot, in `DIR/snapshot/`: `vm.state` and `vm.mem` (see `snapshot`
//! and `memory_file`), `vm.state.disk0.overlay` (the root disk's tmp overlay as it was, captured
//! by the snapshot), and `manifest.json`, what the VM was made from (kernel, root image, agent
//! initramfs, CPUs, memory, command line, Ember's state format).
//!
//! A run that finds no snapshot makes one: it takes `DIR/lock` (an exclusive `flock`; other
//! runs wait there, within their time limit), boots the VM as a plain `ember exec` does in a
//! child process, takes the agent's connection and asks it to warm up (it runs `sh -c true`
//! once, then listens on its port and will accept the next connection), pauses the VM, snapshots it into `DIR/.new-<pid>/`,
//! stops it, writes the manifest, and renames that directory to `DIR/snapshot`. The rename is
//! the only step that makes a snapshot visible, so an interrupted or failed creation leaves
//! only a `.new-*` directory, which the next creator (holding the lock, so no other creator is
//! at work) removes.
//!
//! Every run then restores `DIR/snapshot`: the guest's RAM mapped privately from `vm.mem`, the
//! root disk over a tmp copy of the captured overlay (so runs never see each other's writes, and
//! nothing in DIR or the base image is written), the vsock device listening on this run's own
//! socket, the guest told by a transport reset that the connections it had are gone. The agent,
//! still listening, takes the command as after a boot. Any number of runs restore one DIR at
//! once.
//!
//! A snapshot whose manifest does not match the run (another kernel, image, agent build, CPU
//! count, memory size) is an error naming what differs: DIR is never replaced under runs that
//! may be restoring from it; the user removes it (or uses another DIR) to make a new one.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::RunOptions;
use crate::exec::{Agent, ExecError, ExecOptions, Inputs, Scratch};
use crate::exec_client::{self, EXIT_NO_AGENT, EXIT_TIMEOUT};
use crate::vmm::Vmm;

/// The manifest's own layout; a manifest of another is a mismatch.
const MANIFEST_FORMAT: u32 = 1;
const CURRENT: &str = "snapshot";
const STATE: &str = "vm.state";
const MEM: &str = "vm.mem";
const MANIFEST: &str = "manifest.json";
/// Whether a restore maps all of guest RAM before the guest runs. Measured for `-- true`
/// (README, `ember exec`): mapping pages at first touch was the faster.
const PREFAULT: bool = false;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotDirError {
    #[error("--snapshot {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--snapshot {}: it holds a snapshot of another VM ({what}); remove it to make a new \
         one, or give another directory",
        dir.display()
    )]
    Mismatch { dir: PathBuf, what: String },
    #[error(
        "--snapshot {}: the snapshot there is damaged ({reason}); remove it to make a new one",
        dir.display()
    )]
    Damaged { dir: PathBuf, reason: String },
    #[error("--snapshot cannot be used with --disk: a snapshot's disks are the root disk only")]
    Disks,
    #[error("--snapshot {}: could not snapshot the booted agent: {reason}", dir.display())]
    Create { dir: PathBuf, reason: String },
}

/// A file as the manifest identifies it: by path, size and modification time (the exec cache
/// names the agent's initramfs and a directory's image by their contents already).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FileId {
    path: String,
    size: u64,
    mtime_s: i64,
    mtime_ns: i64,
}

impl FileId {
    fn of(path: &Path) -> Result<Self, SnapshotDirError> {
        let meta = std::fs::metadata(path).map_err(|source| SnapshotDirError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(FileId {
            path: path.to_string_lossy().into_owned(),
            size: meta.len(),
            mtime_s: meta.mtime(),
            mtime_ns: meta.mtime_nsec(),
        })
    }
}

/// What a snapshot's VM was made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    state_format: u32,
    kernel: FileId,
    rootfs: FileId,
    agent: FileId,
    cpus: u8,
    memory: u64,
    cmdline: String,
}

impl Manifest {
    fn of(opts: &ExecOptions, inputs: &Inputs) -> Result<Self, SnapshotDirError> {
        Ok(Manifest {
            format: MANIFEST_FORMAT,
            state_format: ember_devices::state::STATE_FORMAT_VERSION,
            kernel: FileId::of(&inputs.kernel)?,
            rootfs: FileId::of(&inputs.rootfs)?,
            agent: FileId::of(&inputs.initramfs)?,
            cpus: opts.cpus,
            memory: opts.memory,
            cmdline: crate::exec::GUEST_CMDLINE.into(),
        })
    }

    /// What differs between the snapshot's (`self`) and the run's, in words.
    fn differences(&self, want: &Manifest) -> Vec<String> {
        let file = |what: &str, a: &FileId, b: &FileId| {
            (a != b).then(|| {
                if a.path == b.path {
                    format!("{what} {} has changed since", b.path)
                } else {
                    format!("{what} {}, not {}", a.path, b.path)
                }
            })
        };
        [
            (self.format != want.format || self.state_format != want.state_format)
                .then(|| "made by another version of Ember".to_string()),
            file("kernel", &self.kernel, &want.kernel),
            file("root image", &self.rootfs, &want.rootfs),
            file("agent", &self.agent, &want.agent),
            (self.cpus != want.cpus).then(|| format!("{} vCPUs, not {}", self.cpus, want.cpus)),
            (self.memory != want.memory).then(|| {
                format!(
                    "{} MiB of memory, not {}",
                    self.memory >> 20,
                    want.memory >> 20
                )
            }),
            (self.cmdline != want.cmdline).then(|| "another kernel command line".to_string()),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotDirError + '_ {
    move |source| SnapshotDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `ember exec --snapshot DIR`: makes the snapshot if DIR has none, then runs the command in a
/// VM restored from it.
pub(crate) fn exec(
    dir: &Path,
    opts: &ExecOptions,
    inputs: &Inputs,
    deadline: Option<Instant>,
) -> Result<u8, ExecError> {
    if !opts.disks.is_empty() {
        return Err(SnapshotDirError::Disks.into());
    }
    let want = Manifest::of(opts, inputs)?;
    let current = dir.join(CURRENT);
    if !current.exists() {
        if let Some(code) = create(dir, &want, opts, inputs, deadline)? {
            return Ok(code);
        }
    }
    let have = read_manifest(dir, &current)?;
    let differences = have.differences(&want);
    if !differences.is_empty() {
        return Err(SnapshotDirError::Mismatch {
            dir: dir.to_path_buf(),
            what: differences.join(", "),
        }
        .into());
    }
    let scratch = Scratch::new()?;
    let run = RunOptions {
        serial: crate::exec::console(opts),
        ready_marker: None,
        seccomp: opts.seccomp,
    };
    let vmm = Vmm::restore(
        &current.join(STATE),
        &current.join(MEM),
        &run,
        PREFAULT,
        Some(scratch.uds()),
    )
    .map_err(|e| SnapshotDirError::Damaged {
        dir: dir.to_path_buf(),
        reason: crate::error_line(&e),
    })?;
    crate::exec::drive(vmm, &scratch.uds(), Agent::Listens, opts, deadline)
}

fn read_manifest(dir: &Path, current: &Path) -> Result<Manifest, SnapshotDirError> {
    let path = current.join(MANIFEST);
    let damaged = |reason: String| SnapshotDirError::Damaged {
        dir: dir.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(&path).map_err(|e| damaged(format!("{}: {e}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| damaged(format!("{}: {e}", path.display())))
}

/// Holds `DIR/lock` exclusively until dropped (closing the file lets go of it).
struct DirLock(#[allow(dead_code)] File);

/// Waits for `DIR/lock`; None if the time limit ran out first.
fn lock(dir: &Path, deadline: Option<Instant>) -> Result<Option<DirLock>, SnapshotDirError> {
    let path = dir.join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    loop {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(DirLock(file)));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io_err(&path)(e));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotDirError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Makes `DIR/snapshot` unless another run made it first. Returns the status to end with when
/// the run cannot go on (the time limit ran out; the booted VM failed, which the child said).
fn create(
    dir: &Path,
    want: &Manifest,
    opts: &ExecOptions,
    inputs: &Inputs,
    deadline: Option<Instant>,
) -> Result<Option<u8>, ExecError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let Some(_lock) = lock(dir, deadline)? else {
        eprintln!("ember: exec: the time limit ran out while another run made the snapshot");
        return Ok(Some(EXIT_TIMEOUT));
    };
    let current = dir.join(CURRENT);
    if current.exists() {
        return Ok(None);
    }
    // With the lock held no creator is at work: anything half made is left from one that was
    // interrupted.
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".new-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let staging = dir.join(format!(".new-{}", std::process::id()));
    std::fs::create_dir(&staging).map_err(io_err(&staging))?;
    let made = boot_in_child(&staging, opts, inputs, deadline).and_then(|code| {
        if code.is_some() {
            return Ok(code);
        }
        let path = staging.join(MANIFEST);
        let mut bytes = serde_json::to_vec_pretty(want).map_err(|e| SnapshotDirError::Create {
            dir: dir.to_path_buf(),
            reason: format!("manifest: {e}"),
        })?;
        bytes.push(b'\n');
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.write_all(&bytes).map_err(io_err(&path))?;
        file.sync_all().map_err(io_err(&path))?;
        sync_dir(&staging)?;
        std::fs::rename(&staging, &current).map_err(io_err(&current))?;
        sync_dir(dir)?;
        log::info!("exec: made a snapshot in {}", current.display());
        Ok(None)
    });
    if !matches!(made, Ok(None)) {
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok(made?)
}

/// Boots the agent's VM and snapshots it into `staging`, in a child process, so that this
/// process restores from the snapshot with nothing of the booted VM left in it (its device
/// threads, signal handling, guest memory). The child dies with this process.
fn boot_in_child(
    staging: &Path,
    opts: &ExecOptions,
    inputs: &Inputs,
    deadline: Option<Instant>,
) -> Result<Option<u8>, SnapshotDirError> {
    crate::vmm::warn_about_host();
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `ember exec` has started no thread yet, so the child is a whole copy of this one.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io_err(staging)(std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: prctl with plain integer arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        let code = match boot_and_snapshot(staging, opts, inputs, deadline) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("ember: error: {}", crate::error_line(&e));
                1
            }
        };
        std::process::exit(code);
    }
    loop {
        let mut status = 0;
        // SAFETY: polling our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Ok(
                match libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                    true => None,
                    false => Some(EXIT_NO_AGENT),
                },
            );
        }
        if r < 0 {
            return Err(io_err(staging)(std::io::Error::last_os_error()));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            // SAFETY: our own child, not yet reaped.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            eprintln!("ember: exec: the time limit ran out; the VM was stopped");
            return Ok(Some(EXIT_TIMEOUT));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The child's work: boot as `ember exec` does, wait for the agent's answer to a warm-up, pause,
/// snapshot, stop.
fn boot_and_snapshot(
    staging: &Path,
    opts: &ExecOptions,
    inputs: &Inputs,
    deadline: Option<Instant>,
) -> Result<(), ExecError> {
    use crate::api::{Action, Reply};
    let failed = |reason: String| SnapshotDirError::Create {
        dir: staging.parent().unwrap_or(staging).to_path_buf(),
        reason,
    };
    let scratch = Scratch::new()?;
    let listener = scratch.agent_listener()?;
    let cfg = crate::exec::boot_config(opts, inputs, &scratch.uds())?;
    let mut vmm = Vmm::build(&cfg)?;
    vmm.defer_teardown();
    let (channel, api) = crate::api::in_process().map_err(crate::vmm::VmmError::from)?;
    vmm.attach_api(channel)?;
    let ctl = vmm.controller();
    let vm = std::thread::Builder::new()
        .name("ember-vm".into())
        .spawn(move || vmm.run())
        .map_err(|e| failed(format!("cannot start the VM's thread: {e}")))?;
    let patience = deadline.map_or(Duration::from_secs(600), |d| {
        d.saturating_duration_since(Instant::now())
    });
    let fault = |r: &Reply| {
        r.body
            .as_ref()
            .and_then(|b| b.get("fault_message"))
            .and_then(|m| m.as_str())
            .unwrap_or("no reason given")
            .to_string()
    };
    let start = Instant::now();
    let result = exec_client::accept_agent(&listener, patience, || ctl.exit_reason().is_none())
        .and_then(|conn| exec_client::warm_up(conn, patience.saturating_sub(start.elapsed())))
        .map_err(|e| failed(format!("the agent never answered: {e}")))
        .and_then(|_version| {
            let paused = api.call(Action::Pause);
            if paused.status != 204 {
                return Err(failed(format!("pausing it: {}", fault(&paused))));
            }
            let made = api.call(Action::SnapshotCreate {
                snapshot_path: staging.join(STATE),
                mem_file_path: staging.join(MEM),
            });
            if made.status != 204 {
                return Err(failed(fault(&made)));
            }
            Ok(())
        });
    ctl.stop();
    let _ = vm.join();
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let file = |p: &str| FileId {
            path: p.into(),
            size: 10,
            mtime_s: 1,
            mtime_ns: 2,
        };
        Manifest {
            format: MANIFEST_FORMAT,
            state_format: 3,
            kernel: file("/k"),
            rootfs: file("/r"),
            agent: file("/a"),
            cpus: 1,
            memory: 256 << 20,
            cmdline: "x".into(),
        }
    }

    #[test]
    fn a_manifest_names_what_differs() {
        let m = manifest();
        assert!(m.differences(&m).is_empty());
        let mut other = m.clone();
        other.kernel.mtime_ns = 3;
        other.rootfs.path = "/other".into();
        other.memory = 128 << 20;
        assert_eq!(
            m.differences(&other),
            [
                "kernel /k has changed since",
                "root image /r, not /other",
                "256 MiB of memory, not 128"
            ]
        );
        let round: Manifest = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(round, m);
    }
}

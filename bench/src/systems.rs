//! The systems the benchmark launches: Ember, OCI runtimes and QEMU, each as a command line that
//! prints the ready marker and exits. A system that is missing or does not work here is reported
//! with a one-line reason instead of stopping the benchmark.

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::trial::{self, clip, Spec};
use crate::BenchError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ember,
    /// `ember-floor`: the least a KVM VMM can do (null mode only), the reference Ember's
    /// start-up is measured against.
    Floor,
    Crun,
    Runc,
    Podman,
    Docker,
    Qemu,
    /// Restore mode only, and only where it is installed: its snapshot load.
    Firecracker,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Ember,
        Kind::Floor,
        Kind::Crun,
        Kind::Runc,
        Kind::Podman,
        Kind::Docker,
        Kind::Qemu,
        Kind::Firecracker,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Ember => "ember",
            Kind::Floor => "floor",
            Kind::Crun => "crun",
            Kind::Runc => "runc",
            Kind::Podman => "podman",
            Kind::Docker => "docker",
            Kind::Qemu => "qemu",
            Kind::Firecracker => "firecracker",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    pub fn is_vm(self) -> bool {
        matches!(self, Kind::Ember | Kind::Qemu | Kind::Firecracker)
    }
}

/// What the microVMs boot in one benchmark mode.
#[derive(Debug, Clone)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    /// Kernel command line for Ember (None: Ember's default).
    pub cmdline: Option<String>,
    /// Kernel for QEMU, or why QEMU cannot boot this guest.
    pub qemu: Result<QemuGuest, String>,
    pub marker: String,
    /// Guest memory, as `ember run --memory` takes it.
    pub memory: String,
    /// The guest does not end by itself: stop the VMM at the ready line.
    pub stop_at_ready: bool,
}

#[derive(Debug, Clone)]
pub struct QemuGuest {
    pub kernel: PathBuf,
    pub cmdline: String,
}

/// A system that passed its warm-up run.
#[derive(Debug, Clone)]
pub struct System {
    pub kind: Kind,
    pub program: PathBuf,
    /// Arguments; `{id}` is replaced by a name unique to each run.
    argv: Vec<String>,
    /// How this system is run here when that is not the obvious way (one line).
    pub note: Option<String>,
    /// Program and arguments run after a failed or killed run (a container left behind).
    cleanup: Option<Vec<String>>,
}

impl System {
    /// A system run as `program argv...` (`{id}` in an argument becomes a name unique to each
    /// run), with nothing to clean up after a failed run.
    pub fn new(kind: Kind, program: PathBuf, argv: Vec<String>, note: Option<String>) -> System {
        System {
            kind,
            program,
            argv,
            note,
            cleanup: None,
        }
    }

    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    pub fn spec(&self, id: &str, marker: &str, timeout: Duration, stop_at_ready: bool) -> Spec {
        Spec {
            program: self.program.clone(),
            args: self
                .argv
                .iter()
                .map(|a| OsString::from(a.replace("{id}", id)))
                .collect(),
            marker: marker.to_string(),
            timeout,
            stop_at_ready,
            input: Vec::new(),
        }
    }

    pub fn cleanup(&self, id: &str) {
        if let Some((program, args)) = self.cleanup.as_ref().and_then(|c| c.split_first()) {
            let _ = Command::new(program)
                .args(args.iter().map(|a| a.replace("{id}", id)))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// The command line of one run, for the report (`{id}` left as is).
    pub fn command_line(&self) -> String {
        std::iter::once(self.program.display().to_string())
            .chain(self.argv.iter().cloned())
            .map(|a| shell_quote(&a))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A system that was asked for but does not run here.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub kind: Kind,
    pub reason: String,
}

/// An OCI bundle (config.json + a private copy of the root filesystem) in a temporary
/// directory, removed on drop. The copy keeps the user's directory untouched: runtimes create
/// mount points and podman writes /etc/hosts and /run/.containerenv into the root it is given.
pub struct Bundle {
    pub dir: PathBuf,
    pub rootfs: PathBuf,
    docker_image: Option<String>,
}

impl Bundle {
    pub fn create(source: &Path, marker: &str) -> Result<Bundle, BenchError> {
        let args = ["/bin/sh", "-c", "echo \"$1\"", "sh", marker].map(String::from);
        Bundle::running(source, &args)
    }

    /// A bundle whose process is `args` (the first looked up on the container's PATH).
    pub fn running(source: &Path, args: &[String]) -> Result<Bundle, BenchError> {
        if !source.join("bin/sh").exists() {
            return Err(BenchError::Input(format!(
                "{} has no bin/sh: the containers run `/bin/sh -c 'echo MARKER'` in it",
                source.display()
            )));
        }
        let dir = std::env::temp_dir().join(format!("ember-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, "create", e))?;
        let bundle = Bundle {
            rootfs: dir.join("rootfs"),
            dir,
            docker_image: None,
        };
        // cp -a keeps symlinks, modes and device nodes; std has no recursive copy that does.
        let out = Command::new("cp")
            .arg("-a")
            .arg(source)
            .arg(&bundle.rootfs)
            .output()
            .map_err(|e| io_err(source, "copy (cp -a)", e))?;
        if !out.status.success() {
            return Err(BenchError::Input(format!(
                "copying {} failed: {}",
                source.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let path = bundle.dir.join("config.json");
        std::fs::write(&path, oci_config(args).to_string())
            .map_err(|e| io_err(&path, "write", e))?;
        Ok(bundle)
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        if let Some(image) = &self.docker_image {
            let _ = Command::new("docker")
                .args(["rmi", "-f", image])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn io_err(path: &Path, what: &'static str, source: io::Error) -> BenchError {
    BenchError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The OCI runtime config: `runc spec`'s defaults (pid, ipc, uts, mount namespaces, the usual
/// /proc, /dev, /sys mounts, a default capability set, a read-only root), with no network
/// namespace: neither side of the comparison gets networking, and creating an empty netns is
/// work the microVM does not do either. The process prints the marker with the shell's
/// builtin echo and exits (the other modes), or is the command the exec mode times.
pub fn oci_config(args: &[String]) -> serde_json::Value {
    let caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
                "ambient": caps
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true
        },
        "root": { "path": "rootfs", "readonly": true },
        "hostname": "ember-bench",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
              "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
              "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["nosuid", "noexec", "nodev", "ro"] }
        ],
        "linux": {
            "namespaces": [{ "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// Quotes a word for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `name` on $PATH (plus the sbin directories, where Debian puts runc), if executable.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The containers' name; `{id}` makes it unique to each run.
const CONTAINER: &str = "ember-bench-{id}";

/// `program VERB -f NAME`: removes the container a failed or killed run left behind.
fn remove_container(program: &Path, verb: &str) -> Vec<String> {
    [&program.display().to_string(), verb, "-f", CONTAINER]
        .map(String::from)
        .to_vec()
}

/// Builds the command line of `kind`, or says why it cannot run here before trying.
pub fn candidate(
    kind: Kind,
    ember: &Path,
    guest: &Guest,
    bundle: Option<&mut Bundle>,
) -> Result<System, String> {
    // Only the containers use the bundle; the VMMs are probed without one.
    let no_bundle = || format!("{} needs an OCI bundle", kind.name());
    match kind {
        Kind::Firecracker => {
            Err("Firecracker is benchmarked in the restore mode only (its snapshot load)".into())
        }
        Kind::Floor => {
            let program = ember
                .parent()
                .map(|d| d.join("ember-floor"))
                .filter(|p| is_executable(p))
                .ok_or(
                    "ember-floor is not next to the ember binary (cargo build --release builds it)",
                )?;
            Ok(System {
                kind,
                program,
                argv: vec![guest.marker.clone()],
                note: Some(
                    "the least a KVM VMM can do: a VM, 64 KiB, one vCPU, a few real-mode \
                     instructions writing the ready line to a port, halt"
                        .into(),
                ),
                cleanup: None,
            })
        }
        Kind::Ember => {
            let mut argv = vec![
                "run".to_string(),
                "--kernel".into(),
                guest.kernel.display().to_string(),
            ];
            if let Some(i) = &guest.initramfs {
                argv.extend(["--initramfs".into(), i.display().to_string()]);
            }
            if let Some(c) = &guest.cmdline {
                argv.extend(["--cmdline".into(), c.clone()]);
            }
            argv.extend([
                "--memory".into(),
                guest.memory.clone(),
                "--serial".into(),
                "stdio".into(),
                "--ready-marker".into(),
                guest.marker.clone(),
                "--timings=json".into(),
            ]);
            Ok(System {
                kind,
                program: ember.to_path_buf(),
                argv,
                note: None,
                cleanup: None,
            })
        }
        Kind::Runc | Kind::Crun => oci_runtime(kind, bundle.ok_or_else(no_bundle)?),
        Kind::Podman => {
            let program = which("podman").ok_or("podman is not installed")?;
            let bundle = bundle.ok_or_else(no_bundle)?;
            let cleanup = remove_container(&program, "rm");
            Ok(System {
                kind,
                program,
                argv: [
                    "run",
                    "--rm",
                    "--name",
                    CONTAINER,
                    // Rootful podman's defaults fail on this kind of host (hybrid cgroups, no
                    // systemd, huge nofile limits); these are the documented knobs.
                    "--cgroup-manager=cgroupfs",
                    "--runtime",
                    "runc",
                    "--ulimit",
                    "nofile=1024:1024",
                    "--ulimit",
                    "nproc=1024:1024",
                    "--network",
                    "host",
                    "--rootfs",
                    &bundle.rootfs.display().to_string(),
                    "/bin/sh",
                    "-c",
                    "echo \"$1\"",
                    "sh",
                    &guest.marker,
                ]
                .map(String::from)
                .to_vec(),
                note: Some(
                    "podman run --rootfs (an image is not needed); conmon + runc underneath".into(),
                ),
                cleanup: Some(cleanup),
            })
        }
        Kind::Docker => {
            let program = which("docker").ok_or("docker is not installed")?;
            let bundle = bundle.ok_or_else(no_bundle)?;
            let cleanup = remove_container(&program, "rm");
            let info = Command::new(&program)
                .arg("info")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("docker info: {e}"))?;
            if !info.status.success() {
                let err = String::from_utf8_lossy(&info.stderr);
                let line = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                return Err(format!(
                    "no Docker daemon (docker info: {})",
                    clip(line.trim(), 120)
                ));
            }
            let image = format!("ember-bench:{}", std::process::id());
            docker_import(&program, &bundle.rootfs, &image)?;
            bundle.docker_image = Some(image.clone());
            Ok(System {
                kind,
                program,
                argv: [
                    "run",
                    "--rm",
                    "--name",
                    CONTAINER,
                    "--network",
                    "host",
                    &image,
                    "/bin/sh",
                    "-c",
                    "echo \"$1\"",
                    "sh",
                    &guest.marker,
                ]
                .map(String::from)
                .to_vec(),
                note: Some("docker run of an image imported from the same directory".into()),
                cleanup: Some(cleanup),
            })
        }
        Kind::Qemu => {
            let program = qemu_program()?;
            let q = guest.qemu.as_ref().map_err(|why| why.clone())?;
            let argv = qemu_microvm_args(
                &guest.memory,
                &q.kernel,
                guest.initramfs.as_deref(),
                &q.cmdline,
            );
            Ok(System {
                kind,
                program,
                argv,
                note: None,
                cleanup: None,
            })
        }
    }
}

pub fn qemu_program() -> Result<PathBuf, String> {
    which("qemu-system-x86_64").ok_or_else(|| {
        "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".into()
    })
}

/// QEMU's microvm machine with one vCPU, `memory`, the serial console on stdio, and the kernel
/// booted directly, as Ember boots it.
pub fn qemu_microvm_args(
    memory: &str,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
) -> Vec<String> {
    let mut argv: Vec<String> = [
        "-M",
        "microvm",
        "-enable-kvm",
        // Without -arch-capabilities QEMU 7.2 aborts on kvm_pvm hosts (MSR 0x10a); on
        // hardware the flag only hides a feature the guest does not need.
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        memory,
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        // A guest reset ends QEMU, as it ends Ember.
        "-no-reboot",
        "-kernel",
        &kernel.display().to_string(),
        "-append",
        cmdline,
    ]
    .map(String::from)
    .to_vec();
    if let Some(i) = initramfs {
        argv.extend(["-initrd".into(), i.display().to_string()]);
    }
    argv
}

/// `runc run` or `crun run` of `bundle`.
pub fn oci_runtime(kind: Kind, bundle: &Bundle) -> Result<System, String> {
    let name = kind.name();
    let program = which(name).ok_or_else(|| format!("{name} is not installed"))?;
    let cleanup = remove_container(&program, "delete");
    Ok(System {
        kind,
        program,
        argv: vec![
            "run".into(),
            "--bundle".into(),
            bundle.dir.display().to_string(),
            CONTAINER.into(),
        ],
        note: None,
        cleanup: Some(cleanup),
    })
}

fn docker_import(docker: &Path, rootfs: &Path, image: &str) -> Result<(), String> {
    let tar = Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .args(["-c", "."])
        .output()
        .map_err(|e| format!("tar of the root filesystem: {e}"))?;
    if !tar.status.success() {
        return Err("tar of the root filesystem failed".into());
    }
    let mut child = Command::new(docker)
        .args(["import", "-", image])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("docker import: {e}"))?;
    if let Some(mut w) = child.stdin.take() {
        w.write_all(&tar.stdout)
            .map_err(|e| format!("docker import: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("docker import: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "docker import failed: {}",
            clip(String::from_utf8_lossy(&out.stderr).trim(), 120)
        ));
    }
    Ok(())
}

/// Runs `system` once, unmeasured (caches warm, one-time set-up done), and checks it works.
/// crun gets a second chance inside a private mount namespace without the cgroup2 hierarchy
/// when its plain run fails on a hybrid cgroup layout.
pub fn warm_up(system: System, guest: &Guest, timeout: Duration) -> Result<System, String> {
    warm_up_by(system, |s, id| attempt(s, id, guest, timeout))
}

/// `warm_up` with the caller's own run and judgement of it (`attempt(system, id)`).
pub fn warm_up_by(
    system: System,
    attempt: impl Fn(&System, &str) -> Result<(), String>,
) -> Result<System, String> {
    match attempt(&system, "warmup") {
        Ok(()) => Ok(system),
        Err(why) if system.kind == Kind::Crun && why.contains("hybrid mode") => {
            let wrapped = crun_unshared(&system).ok_or_else(|| why.clone())?;
            attempt(&wrapped, "warmup2")
                .map(|()| wrapped)
                .map_err(|e| format!("{why}; and under unshare: {e}"))
        }
        Err(why) => Err(why),
    }
}

fn attempt(system: &System, id: &str, guest: &Guest, timeout: Duration) -> Result<(), String> {
    let id = format!("{}-{id}", std::process::id());
    let result = trial::run(&system.spec(&id, &guest.marker, timeout, guest.stop_at_ready));
    match result {
        Ok(t) if t.ok() => Ok(()),
        Ok(t) => {
            system.cleanup(&id);
            Err(t.failure())
        }
        Err(e) => {
            system.cleanup(&id);
            Err(e.to_string())
        }
    }
}

/// `crun run` inside `unshare -m`: the cgroup2 mount of a hybrid layout is unmounted in that
/// private namespace only, so crun sees a pure cgroup v1 host.
fn crun_unshared(crun: &System) -> Option<System> {
    let unshare = which("unshare")?;
    let inner = std::iter::once(crun.program.display().to_string())
        .chain(crun.argv.iter().cloned())
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    Some(System {
        kind: Kind::Crun,
        program: unshare,
        argv: vec![
            "-m".into(),
            "--propagation".into(),
            "private".into(),
            "sh".into(),
            "-c".into(),
            format!("umount /sys/fs/cgroup/unified 2>/dev/null; exec {inner}"),
        ],
        note: Some(
            "plain `crun run` fails here (cgroups in hybrid mode not supported): run inside \
             `unshare -m` with /sys/fs/cgroup/unified unmounted"
                .into(),
        ),
        cleanup: crun.cleanup.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("run"), "run");
        assert_eq!(shell_quote("ember-guest: ready"), "'ember-guest: ready'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn oci_config_prints_the_marker_without_a_network_namespace() {
        let c = oci_config(&["/bin/sh", "-c", "echo \"$1\"", "sh", "say \"hi\""].map(String::from));
        assert_eq!(
            c["process"]["args"],
            serde_json::json!(["/bin/sh", "-c", "echo \"$1\"", "sh", "say \"hi\""])
        );
        let namespaces = c["linux"]["namespaces"].as_array().unwrap();
        assert_eq!(namespaces.len(), 4);
        assert!(namespaces.iter().all(|n| n["type"] != "network"));
        assert_eq!(c["root"]["readonly"], true);
        // What a runtime reads back is what we meant, quotes and all.
        let text = c.to_string();
        assert!(!text.contains("network"), "{text}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), c);
    }
}

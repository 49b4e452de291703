//! `ember bench` end to end, small: the null-guest mode with Ember only (plus a peer that cannot
//! run here), the restore mode with crun where it is installed, and the exec mode with every
//! system it has (one round), checking what a user reads: the report, the JSON figures and the
//! SVG chart. Also the agent's console mode that the exec mode's rows run, under Ember.

use std::time::Duration;

use crate::common::{self, run_ember};

/// `ember bench` execs the ember-bench next to ember, and the floor is found there too. Cargo
/// builds both for `cargo test --workspace` and `--test integration` (bench/Cargo.toml says how);
/// a run that has them missing is broken, not a reason to skip.
fn require_bench_binaries() {
    for name in ["ember-bench", "ember-floor"] {
        let p = std::path::Path::new(common::ember()).with_file_name(name);
        assert!(
            p.is_file(),
            "{} is missing: build it with `cargo build --release -p ember-bench`",
            p.display()
        );
    }
}

#[test]
fn bench_null_guest_reports_figures_json_and_chart() {
    require_bench_binaries();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-e2e");
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let svg = dir.join("bench.svg");
    let _ = std::fs::remove_file(&json);
    let _ = std::fs::remove_file(&svg);
    let hello = common::guest("hello");
    let run = run_ember(
        &[
            "bench",
            "--guest",
            "null",
            "--null-guest",
            hello.to_str().unwrap(),
            // No such runtime on purpose next to a real one: it must be reported, not fatal.
            "--systems",
            "ember,docker",
            "--rounds",
            "3",
            "--quiet",
            "--json",
            json.to_str().unwrap(),
            "--chart",
            svg.to_str().unwrap(),
        ],
        b"",
        Duration::from_secs(120),
    );
    let out = run.ok();
    let host = if common::kvm_kind() == common::KvmKind::Pvm {
        "kvm_pvm"
    } else {
        "hardware KVM"
    };
    assert!(out.contains(&format!("host: {host}")), "{out}");
    assert!(out.contains("command: ember bench --guest null"), "{out}");
    // The table row: `ember  GOOD/ALL  min median ...`.
    let ember = out
        .lines()
        .find(|l| {
            let mut w = l.split_whitespace();
            w.next() == Some("ember") && w.next().is_some_and(|g| g.contains('/'))
        })
        .unwrap_or_else(|| panic!("no ember row:\n{out}"));
    assert!(ember.contains(" 3/3 "), "{ember}");
    assert!(out.contains("docker: not run: "), "{out}");
    assert!(out.contains("ember own memory: "), "{out}");

    let j = compact_json(&std::fs::read_to_string(&json).unwrap());
    assert!(j.contains("\"system\":\"ember\""), "{j}");
    assert!(j.contains("\"good_runs\":3,\"runs\":3"), "{j}");
    // The three ready times are real measurements: positive and under the per-run timeout.
    let samples = j
        .split("\"ready_ms\":[")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .unwrap();
    let ready: Vec<f64> = samples.split(',').map(|v| v.parse().unwrap()).collect();
    assert_eq!(ready.len(), 3, "{samples}");
    assert!(ready.iter().all(|r| *r > 0.0 && *r < 30_000.0), "{ready:?}");

    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(s.trim_end().ends_with("</svg>"));
    assert!(s.contains(">ember</text>"), "no ember bar");
}

/// `json` without the whitespace between its tokens, so that the checks above read the figures
/// whatever the file's layout (strings are kept as they are).
fn compact_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c.is_whitespace() {
            continue;
        } else {
            in_string = c == '"';
        }
        out.push(c);
    }
    out
}

/// The floor (`ember-floor`, the least a KVM VMM can do) prints the ready line it is given and
/// exits 0, and the benchmark reports Ember's start-up as a ratio to it.
#[test]
fn the_floor_runs_and_the_report_gives_ember_as_a_ratio_to_it() {
    common::kvm_kind();
    require_bench_binaries();
    let floor = std::path::Path::new(common::ember()).with_file_name("ember-floor");
    let run = common::run_command(
        {
            let mut c = std::process::Command::new(&floor);
            c.arg("floor: ready");
            c
        },
        b"",
        Duration::from_secs(30),
    );
    assert_eq!(run.ok(), "floor: ready\n");

    let hello = common::guest("hello");
    let run = run_ember(
        &[
            "bench",
            "--guest",
            "null",
            "--null-guest",
            hello.to_str().unwrap(),
            "--systems",
            "floor",
            "--rounds",
            "3",
            "--quiet",
        ],
        b"",
        Duration::from_secs(120),
    );
    let out = run.ok();
    let row = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some("floor"))
        .unwrap_or_else(|| panic!("no floor row:\n{out}"));
    assert!(row.contains(" 3/3 "), "{row}");
    let ratio = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("ember / floor (the least a KVM VMM can do on this host): ready ")
        })
        .unwrap_or_else(|| panic!("no ember / floor line:\n{out}"));
    let ready: f64 = ratio
        .split('x')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{ratio}"));
    assert!(ready > 0.0, "{ratio}");
}

/// The restore mode, small: two rounds, two clones. Every row it reports has its figures, the
/// JSON has the set-up, the rows, the density and the goals, and crun (where it is installed)
/// is the container it is compared with.
#[test]
fn bench_restore_mode_reports_restore_rows_density_and_json() {
    require_bench_binaries();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-restore-e2e");
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let _ = std::fs::remove_file(&json);
    // The counter guest is found next to the null guest.
    let hello = common::guest("hello");
    let crun = ["/usr/bin/crun", "/usr/local/bin/crun", "/usr/sbin/crun"]
        .iter()
        .any(|p| std::path::Path::new(p).is_file());
    let systems = if crun { "ember,crun" } else { "ember" };
    let run = run_ember(
        &[
            "bench",
            "--guest",
            "restore",
            "--null-guest",
            hello.to_str().unwrap(),
            "--systems",
            systems,
            "--rounds",
            "2",
            "--clones",
            "2",
            "--quiet",
            "--json",
            json.to_str().unwrap(),
        ],
        b"",
        Duration::from_secs(180),
    );
    let out = run.ok();
    assert!(
        out.contains("== snapshot restore, counter guest: 2 rounds"),
        "{out}"
    );
    assert!(out.contains("snapshot create "), "{out}");
    // `LABEL  2/2  min median p90 max ...`: every row ran both rounds, with numbers.
    let mut labels = vec![
        "ember restore",
        "ember restore --prefault",
        "ember API load",
        "ember boot (null guest)",
    ];
    if crun {
        labels.push("crun");
    }
    for label in &labels {
        let row = out
            .lines()
            .find_map(|l| {
                let rest = l.strip_prefix(label)?;
                let mut w = rest.split_whitespace();
                (rest.starts_with("  ") && w.next() == Some("2/2")).then(|| w.next())
            })
            .flatten()
            .unwrap_or_else(|| panic!("no `{label}` row with 2/2 good runs:\n{out}"));
        let min: f64 = row.parse().unwrap_or_else(|_| panic!("{label}: {row}"));
        assert!(min > 0.0 && min < 30_000.0, "{label}: {min}");
    }
    assert!(out.contains("firecracker: not run: "), "{out}");
    assert!(out.contains("ember restore own memory: "), "{out}");
    assert!(out.contains("density, ember restore: 2 clones"), "{out}");
    assert!(
        out.contains("density, ember restore --prefault: 2 clones"),
        "{out}"
    );
    assert!(out.contains("goals (issue 12): "), "{out}");
    if crun {
        assert!(
            out.contains("launch -> ready over a crun container start (medians): ember restore "),
            "{out}"
        );
    }

    let j = compact_json(&std::fs::read_to_string(&json).unwrap());
    let restore = j
        .split("\"restore\":[{")
        .nth(1)
        .unwrap_or_else(|| panic!("no restore section: {j}"));
    for field in [
        "\"guest_name\":\"counter\"",
        "\"snapshot_create_ms\":",
        "\"memory_file_bytes\":134217728",
        "\"memory_file_disk_bytes\":",
        "\"label\":\"ember restore\",\"marker\":\"counter: got r\",\"system\":\"ember\"",
        "\"label\":\"ember restore --prefault\"",
        "\"load_request_ms\":{",
        "\"good_runs\":2,\"runs\":2",
        "\"density\":[{\"label\":\"ember restore\",\"prefault\":false,\"clones\":2,\"good_rounds\":2",
        "\"pss_per_clone_mib\":{",
        "\"total_pss_over_n_x_guest_ram\":",
        "\"goals\":{\"faster_than_crun\":",
    ] {
        assert!(restore.contains(field), "no {field} in {restore}");
    }
    if crun {
        assert!(restore.contains("\"label\":\"crun\""), "{restore}");
        assert!(!restore.contains("\"faster_than_crun\":null"), "{restore}");
    }
}

/// The agent's console mode (what the exec mode's Ember and QEMU rows boot): the command after
/// `--` on the kernel command line runs from the root image (the initramfs has no shell), its
/// output and the outcome line with its status reach the console, and the guest powers off. On
/// kvm_pvm the kernel hands `noxsave` to init's arguments too: the command must not be those.
#[test]
fn the_console_agent_runs_the_command_line_and_reports_its_status() {
    let kernel = common::microvm_kernel("vmlinux");
    let _one = crate::kernels::ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let agent = std::path::Path::new(common::ember()).with_file_name("ember-agent");
    let cache = ember_vmm::exec_image::cache_dir();
    let initramfs = ember_vmm::exec_image::agent_initramfs(&agent, &cache).unwrap();
    let image =
        ember_vmm::exec_image::rootfs_image(&common::kit_dir().join("rootfs"), &cache).unwrap();
    let cmdline = format!(
        "{} {} -- sh -c \"echo from-the-root $((6*7)); exit 3\"",
        ember_vmm::exec::GUEST_CMDLINE,
        ember_agent::CONSOLE_FLAG
    );
    let disk = format!("path={},overlay=tmp", image.display());
    let run = run_ember(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initramfs.to_str().unwrap(),
            "--disk",
            &disk,
            "--memory",
            "128M",
            "--cmdline",
            &cmdline,
        ],
        b"",
        Duration::from_secs(300),
    );
    // The guest powered off (status 0) after reporting the command's own status, 3.
    let out = run.ok();
    assert!(out.contains("from-the-root 42"), "{out}");
    assert_eq!(
        ember_agent::parse_outcome_line(out),
        Some(ember_agent::Outcome::Exited(3)),
        "{out}"
    );
}

/// The exec mode, one round: `ember exec -- true`, Ember and QEMU with the console agent, and
/// crun, each shown to have run with the right status in the report and the JSON (deps.sh
/// installs QEMU and crun, so both are expected here). About six Linux boots.
#[test]
fn bench_exec_mode_runs_every_system_with_the_right_status() {
    require_bench_binaries();
    assert!(common::microvm_kernel("vmlinux").exists());
    let _one = crate::kernels::ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-exec-e2e");
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let _ = std::fs::remove_file(&json);
    let run = run_ember(
        &[
            "bench",
            "--guest",
            "exec",
            "--systems",
            "ember,qemu,crun",
            "--rounds",
            "1",
            "--quiet",
            "--json",
            json.to_str().unwrap(),
        ],
        b"",
        Duration::from_secs(1500),
    );
    let out = run.ok();
    assert!(
        out.contains(
            "== exec: `true` in a fresh machine, spawn -> exit with its status checked: 1 rounds"
        ),
        "{out}"
    );
    let labels = [
        "ember exec",
        "ember exec --snapshot",
        "ember run, console agent",
        "qemu, console agent",
        "crun",
    ];
    for label in labels {
        let row = out
            .lines()
            .find_map(|l| {
                let rest = l.strip_prefix(label)?;
                let mut w = rest.split_whitespace();
                (rest.starts_with(' ') && w.next() == Some("1/1")).then(|| w.next())
            })
            .flatten()
            .unwrap_or_else(|| panic!("no `{label}` row with 1/1 good runs:\n{out}"));
        let min: f64 = row.parse().unwrap_or_else(|_| panic!("{label}: {row}"));
        assert!(min > 0.0, "{label}: {min}");
        assert!(
            out.contains(&format!("  {label}: checked: exit status 0")),
            "{out}"
        );
    }
    assert!(!out.contains("not run:"), "{out}");
    assert!(out.contains("ember exec - ember console agent: "), "{out}");
    assert!(out.contains("qemu / ember, both console agent: "), "{out}");
    assert!(
        out.contains("ember exec --snapshot / ember exec: "),
        "{out}"
    );

    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = j["exec"]["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("{j}"));
    assert_eq!(rows.len(), labels.len(), "{j}");
    for row in rows {
        assert_eq!(row["good_runs"], 1, "{row}");
        assert_eq!(row["runs"], 1, "{row}");
        assert_eq!(row["exit_samples_ms"].as_array().unwrap().len(), 1, "{row}");
        // The console rows saw the agent's outcome line, before their VMM exited.
        let console = row["label"].as_str().unwrap().ends_with("console agent");
        let lines = row["outcome_line_samples_ms"].as_array().unwrap();
        assert_eq!(lines.len(), usize::from(console), "{row}");
        if console {
            assert!(
                row["checked"].as_str().unwrap().contains("{\"Exited\":0}"),
                "{row}"
            );
            assert!(
                lines[0].as_f64().unwrap() < row["exit_samples_ms"][0].as_f64().unwrap(),
                "{row}"
            );
        }
    }
    assert_eq!(j["exec"]["command"], serde_json::json!(["true"]));
    assert!(j["exec"]["exec_minus_console_ms"].is_number(), "{j}");
}

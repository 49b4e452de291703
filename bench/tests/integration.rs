//! `ember-bench`'s command line: help and bad input, as a user meets them through `ember bench`
//! (the end-to-end runs are ember's tests/integration/bench.rs, which go through the `ember` CLI).

// One module, so that scripts/test.sh counts these with the other integration tests.
mod bench_cli {
    use std::process::{Command, Output};

    fn bench(args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ember-bench"))
            .args(args)
            .output()
            .expect("ember-bench runs")
    }

    fn stderr(o: &Output) -> String {
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    #[test]
    fn help_is_the_benchmarks_own_under_its_user_facing_name() {
        let o = bench(&["--help"]);
        assert!(o.status.success(), "{o:?}");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("Usage: ember bench [OPTIONS]"), "{out}");
        assert!(out.contains("--systems <LIST>"), "{out}");
    }

    #[test]
    fn a_command_line_that_does_not_parse_is_one_error_line_and_status_2() {
        for args in [&["--bogus"][..], &["--rounds", "x"], &["stray"]] {
            let o = bench(args);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(err.starts_with("ember: error: "), "{args:?}: {err}");
            assert!(
                err.contains("(see `ember bench --help`)"),
                "{args:?}: {err}"
            );
        }
    }

    #[test]
    fn input_the_benchmark_rejects_is_one_error_line_and_status_1() {
        // Checked before anything is launched; without /dev/kvm the KVM check answers first, which
        // is the same kind of line.
        for (args, says) in [
            (&["--systems", "lxc"][..], "unknown system `lxc`"),
            (
                &["--guest", "xen"],
                "`xen` is not null, linux, banner, restore, exec or auto",
            ),
            (
                &["--guest", "restore", "--clones", "0"],
                "--clones: 0 is not",
            ),
            (
                &["--restore-guest", "windows"],
                "`windows` is not counter or linux",
            ),
            (&["--memory", "12"], "--memory: "),
        ] {
            let o = bench(args);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(err.starts_with("ember: error: "), "{args:?}: {err}");
            if std::path::Path::new("/dev/kvm").exists() {
                assert!(err.contains(says), "{args:?}: {err}");
            }
        }
    }
}

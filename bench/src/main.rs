//! `ember-bench`: what `ember bench` runs (the `ember` CLI execs this binary with the arguments
//! after `bench`). Errors are one line, `ember: error: ...`, as for every other `ember` command:
//! status 2 for a command line that does not parse, 1 for a benchmark that cannot run.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

use ember_bench::BenchArgs;

fn main() -> ExitCode {
    let args = match BenchArgs::try_parse() {
        Ok(a) => a,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's report is several paragraphs; its first line names the problem (the bench
            // has no required arguments, so no argument list follows on later lines).
            let text = e.render().to_string();
            let line = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map_or("invalid arguments", |l| l.trim_start_matches("error: "));
            eprintln!("ember: error: {line} (see `ember bench --help`)");
            return ExitCode::from(2);
        }
    };
    match ember_bench::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every BenchError message already carries its source.
            eprintln!("ember: error: {}", e.to_string().replace('\n', " "));
            ExitCode::from(1)
        }
    }
}

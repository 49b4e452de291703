//! What the user types: every `ember run` value parser and the command-line assembly, on
//! arbitrary strings. Besides not panicking, each accepted value must satisfy what the rest of
//! Ember relies on.
#![no_main]

use arbitrary::Arbitrary;
use ember_boot::layout::CMDLINE_MAX_SIZE;
use ember_vmm::config::{self, SerialMode, MAX_CPUS, MIN_MEMORY};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    size: String,
    cpus: String,
    disk: String,
    serial: String,
    timings: String,
    seccomp: String,
    base: String,
    words: Vec<String>,
}

fuzz_target!(|input: Input| {
    match config::parse_size(&input.size) {
        Ok(n) => {
            let t = input.size.trim();
            let shift = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
                Some('K') => 10,
                Some('M') => 20,
                Some('G') => 30,
                Some('T') => 40,
                _ => 0,
            };
            assert_eq!(n % (1u64 << shift), 0, "{:?} -> {n}", input.size);
            let digits = if shift == 0 { t } else { &t[..t.len() - 1] };
            assert_eq!(digits.parse::<u64>().ok().map(|d| d << shift), Some(n));
        }
        Err(e) => drop(e.to_string()),
    }
    match config::parse_memory(&input.size) {
        Ok(n) => {
            assert!(n >= MIN_MEMORY);
            assert_eq!(config::parse_size(&input.size), Ok(n));
        }
        Err(e) => drop(e.to_string()),
    }
    match config::parse_cpus(&input.cpus) {
        Ok(n) => assert!((1..=MAX_CPUS).contains(&n), "{n}"),
        Err(e) => drop(e.to_string()),
    }
    match config::parse_disk(&input.disk) {
        Ok(d) => {
            let path = d.path.to_str().expect("a path taken from a str");
            assert!(!path.is_empty());
            assert!(input.disk.contains(path));
            if let Some(id) = &d.id {
                assert!((1..=20).contains(&id.len()), "{id:?}");
            }
        }
        Err(e) => drop(e.to_string()),
    }
    match config::parse_serial(&input.serial) {
        Ok(SerialMode::File(p)) => assert!(!p.as_os_str().is_empty()),
        Ok(_) => {}
        Err(e) => drop(e.to_string()),
    }
    if let Err(e) = config::parse_timings(&input.timings) {
        drop(e.to_string());
    }
    match config::parse_seccomp(&input.seccomp) {
        Ok(on) => assert_eq!(input.seccomp, if on { "on" } else { "off" }),
        Err(e) => drop(e.to_string()),
    }
    match config::full_cmdline(&input.base, &input.words) {
        Ok(line) => {
            // The boot protocol's limit counts the NUL the loader adds.
            assert!(line.len() < CMDLINE_MAX_SIZE, "{}", line.len());
            for w in &input.words {
                assert!(line.contains(w.as_str()));
            }
        }
        Err(e) => drop(e.to_string()),
    }
});

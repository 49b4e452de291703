//! Ember's VMM core: configuration, VM assembly, vCPU threads and the device event loop. The
//! `ember` binary (main.rs) is a thin CLI over it.

pub mod api;
pub mod config;
pub mod console;
pub mod device_manager;
pub mod disks;
pub mod event_loop;
pub mod exec;
pub mod exec_client;
pub mod exec_image;
pub mod exec_snapshot;
pub mod host;
pub mod memory_file;
pub mod reaper;
pub mod resources;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod timeline;
pub mod vcpu;
pub mod vmm;
pub mod vstate;

/// An error and its sources as one line, for the `ember: error: ...` report.
pub fn error_line(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        // thiserror messages often already embed their source; do not repeat it.
        if !line.contains(&s_text) {
            line.push_str(": ");
            line.push_str(&s_text);
        }
        source = s.source();
    }
    line.replace('\n', " ")
}

//! Ember's VMM core: configuration, VM assembly, vCPU threads and the device event loop. The
//! `ember` binary (main.rs) is a thin CLI over it.

pub mod config;
pub mod console;
pub mod disks;
pub mod event_loop;
pub mod host;
pub mod reaper;
pub mod seccomp;
pub mod signals;
pub mod timeline;
pub mod vcpu;
pub mod vmm;

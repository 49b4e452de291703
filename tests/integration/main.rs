//! Integration tests: they run the `ember` binary on test guests (tests/guests) and real kernels
//! (the guest kit from scripts/kit.sh) and check what a user would see.

mod common;

mod bench;
mod blk;
mod cli;
mod console;
mod control;
mod exec;
mod guests;
mod hardening;
mod kernels;
mod microvm_kernel;
mod snapshot;
mod vsock;

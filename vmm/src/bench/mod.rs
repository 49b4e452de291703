//! `ember bench`: VM start-up against container start-up on the same root filesystem.

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Number of rounds (each round runs every system once, in alternating order).
    #[arg(long, default_value = "10")]
    pub rounds: u32,
    /// Kernel for the microVM (default: the kit's kernel).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Root filesystem directory shared by the microVM and the containers (default: the kit's).
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("the benchmark is not built yet")]
    NotBuilt,
}

pub fn run(_args: BenchArgs) -> Result<(), BenchError> {
    Err(BenchError::NotBuilt)
}

//! virtio-blk (virtio 1.2 section 5.2) backed by a raw disk image file.
//!
//! `backend` opens and locks the image and does the file I/O, `request` parses a descriptor chain
//! into a checked [`Request`] (everything the guest controls is validated there), and `device`
//! serves the queue: parse, execute, write the status byte, complete the chain.

mod backend;
mod device;
mod request;

use std::path::PathBuf;

pub use backend::{BlockError, DiskImage, DISK_ID_LEN, SECTOR_SIZE};
pub use device::{Block, BlockState, BlockStateError, QUEUE_SIZE};
pub use request::{
    collect_chain, collect_chain_into, parse_descriptors, ChainError, DiskLimits, ParseError,
    Rejection, Request, RequestKind, SectorRange, Segment,
};

/// One `--disk` as the user gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// What GET_ID returns (at most 20 bytes); the image's file name when not given.
    pub id: Option<String>,
}

#[cfg(test)]
mod tests;

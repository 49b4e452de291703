//! virtio-blk (virtio 1.2 section 5.2) backed by a raw disk image file, or by a read-only base
//! image under a copy-on-write overlay.
//!
//! `backend` opens and locks the image and does the file I/O, `overlay` is the copy-on-write
//! layer and its file format, `request` parses a descriptor chain
//! into a checked [`Request`] (everything the guest controls is validated there), and `device`
//! serves the queue: parse, execute, write the status byte, complete the chain.

mod backend;
mod device;
pub mod overlay;
mod request;

use std::path::PathBuf;

pub use backend::{BlockError, Direction, DiskImage, DISK_ID_LEN, SECTOR_SIZE};
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
    /// Writes go here, and `path` is only read: a copy-on-write disk.
    pub overlay: Option<OverlayConfig>,
}

/// Where a copy-on-write disk's writes go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OverlayConfig {
    /// An overlay file, created if missing, reopened (and gone on with) if it exists.
    File(PathBuf),
    /// An unnamed file in `$TMPDIR`, gone when Ember is.
    Tmp,
    /// An unnamed file in `$TMPDIR` that starts as a copy of this overlay file, which is only
    /// read: how a VM restored from a snapshot gets its own copy of the overlay captured in it.
    Captured(PathBuf),
}

#[cfg(test)]
mod tests;

//! virtio-vsock (virtio 1.2 section 5.10): stream sockets between guest and host, the host side
//! on Unix sockets the way Firecracker's tools expect.
//!
//! Ember listens on the Unix socket `uds`. A host process connects there and writes
//! `CONNECT <port>\n`; Ember asks the guest for a connection to that port and, once the guest
//! accepts, answers `OK <host port>\n` (the port the guest sees the connection come from); from
//! then on the socket is the stream. A guest connecting to host port P makes Ember connect to
//! `<uds>_P`, where a host process listens. Either way, a refused connection is a closed socket
//! on the host and RST in the guest.
//!
//! `packet` checks what the guest sends, `conn` is one connection and its credit, `muxer` the
//! table of connections and the host sockets, `device` the virtio device around them. Everything
//! runs on the device's I/O thread; no host socket ever blocks it, and what it holds for slow
//! peers is bounded (see `muxer`).

mod conn;
mod device;
mod muxer;
pub mod packet;

use std::path::PathBuf;

pub use conn::BUF_ALLOC;
pub use device::{ListenerFile, Vsock, VsockError, VsockState, VsockStateError, QUEUE_SIZE};
pub use muxer::VIRTIO_VSOCK_EVENT_TRANSPORT_RESET;
pub use muxer::{MAX_CONNECTIONS, MAX_HANDSHAKES, MAX_RESETS};

/// CIDs 0-2 are reserved (hypervisor, local, host) and the upper 32 bits of the config field
/// are reserved and zero (spec 5.10.4); u32::MAX is VMADDR_CID_ANY.
pub const MIN_GUEST_CID: u64 = 3;
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;
/// `<uds>_<port>` must fit in a Unix socket address (107 bytes and a NUL) for every port.
pub const MAX_UDS_PATH: usize = 107 - 11;

/// One `--vsock` as the user gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    pub cid: u64,
    pub uds: PathBuf,
}

#[cfg(test)]
mod tests;

//! A snapshot's state file: everything a paused VM needs to go on elsewhere except its RAM (which
//! is in its own file, see `memory_file`). Laid out as
//!
//! | bytes | what |
//! |---|---|
//! | 8 | `EMBERSNP` |
//! | 8 | payload length, little-endian |
//! | 4 | CRC-32 of the payload, little-endian |
//! | n | payload: `STATE_FORMAT_VERSION` then `Snapshot`, postcard-encoded (`ember_devices::state`) |
//!
//! so that a file that is not a snapshot, is cut short, or was damaged is refused as such before
//! any of it is believed.

use std::io::Write;
use std::path::{Path, PathBuf};

use ember_devices::acpi_pm::AcpiPmState;
use ember_devices::cmos::CmosState;
use ember_devices::i8042::I8042State;
use ember_devices::pvpanic::PvPanicState;
use ember_devices::serial::SerialState;
use ember_devices::state::StateError;
use ember_devices::virtio::MmioState;
use serde::{Deserialize, Serialize};

use crate::memory_file::MemoryLayout;
use crate::vstate::{VcpuState, VmState};

const MAGIC: &[u8; 8] = b"EMBERSNP";
const HEADER: usize = 8 + 8 + 4;
/// Far above any real snapshot's state (a few tens of KiB per vCPU), far below what could
/// exhaust memory when a corrupt length is believed.
const MAX_PAYLOAD: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not an Ember snapshot", .0.display())]
    Foreign(PathBuf),
    #[error("snapshot {} is cut short: {found} bytes, the header says {expected}", path.display())]
    Truncated {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("snapshot {} is damaged (its checksum does not match)", .0.display())]
    Corrupt(PathBuf),
    #[error("snapshot {}: {source}", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: StateError,
    },
}

/// The machine a snapshot was taken of: a restore builds the same one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: u8,
    pub memory: u64,
}

/// One virtio device: where it was, and its transport's state (the device's own inside).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VirtioSnapshot {
    pub name: String,
    pub addr: u64,
    pub len: u64,
    pub irq: u32,
    pub transport: MmioState,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevicesSnapshot {
    pub serial: SerialState,
    pub cmos: CmosState,
    pub i8042: I8042State,
    pub acpi_pm: AcpiPmState,
    pub pvpanic: PvPanicState,
    pub virtio: Vec<VirtioSnapshot>,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub machine: Machine,
    pub memory: MemoryLayout,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesSnapshot,
}

impl Snapshot {
    /// Writes the state file at `path`, which must not exist yet.
    pub fn write(&self, path: &Path) -> Result<(), SnapshotError> {
        let state = |source| SnapshotError::State {
            path: path.to_path_buf(),
            source,
        };
        let io = |source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        };
        let payload = ember_devices::state::to_versioned_bytes(self).map_err(state)?;
        let mut bytes = Vec::with_capacity(HEADER + payload.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let mut file = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        Ok(())
    }

    pub fn read(path: &Path) -> Result<Snapshot, SnapshotError> {
        let bytes = std::fs::read(path).map_err(|source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_file_bytes(path, &bytes)
    }

    fn from_file_bytes(path: &Path, bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(SnapshotError::Foreign(path.to_path_buf()));
        }
        let found = bytes.len() as u64;
        if bytes.len() < HEADER {
            return Err(SnapshotError::Truncated {
                path: path.to_path_buf(),
                found,
                expected: HEADER as u64,
            });
        }
        let len = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(bytes[16..20].try_into().unwrap_or_default());
        let expected = (HEADER as u64).saturating_add(len);
        if len > MAX_PAYLOAD || found != expected {
            if found < expected {
                return Err(SnapshotError::Truncated {
                    path: path.to_path_buf(),
                    found,
                    expected,
                });
            }
            return Err(SnapshotError::Corrupt(path.to_path_buf()));
        }
        let payload = &bytes[HEADER..];
        if crc32fast::hash(payload) != crc {
            return Err(SnapshotError::Corrupt(path.to_path_buf()));
        }
        ember_devices::state::from_versioned_bytes(payload).map_err(|source| SnapshotError::State {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The container checks, with a payload that is not a `Snapshot` (the real thing is tested
    /// end to end with a running guest).
    fn file_with(payload: &[u8]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend((payload.len() as u64).to_le_bytes());
        b.extend(crc32fast::hash(payload).to_le_bytes());
        b.extend(payload);
        b
    }

    fn err(bytes: &[u8]) -> String {
        match Snapshot::from_file_bytes(Path::new("snap"), bytes) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn foreign_truncated_and_damaged_files_are_told_apart() {
        assert_eq!(err(b"\x7fELF\x02\x01\x01"), "snap is not an Ember snapshot");
        assert_eq!(err(b""), "snap is not an Ember snapshot");
        let good = file_with(b"0123456789");
        assert!(err(&good[..good.len() - 3]).contains("cut short: 27 bytes, the header says 30"));
        assert!(err(&good[..12]).contains("cut short"));
        let mut damaged = good.clone();
        damaged[25] ^= 1;
        assert!(err(&damaged).contains("damaged"));
        let mut longer = good.clone();
        longer.push(0);
        assert!(err(&longer).contains("damaged"));
        // A sound container whose payload is not a snapshot of this version.
        let e = err(&good);
        assert!(e.contains("state format version"), "{e}");
    }
}

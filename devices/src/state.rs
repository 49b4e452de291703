//! Device state as plain data, for snapshots: what each device exports and imports again, and the
//! one encoding every part of Ember's state uses (devices here, vCPUs and the VM in the VMM).
//!
//! The encoding is postcard (serde's data model in a compact, documented binary format that is
//! stable across postcard 1.x). It is not self-describing: a state is read back only by the
//! struct that wrote it, so a change to any state struct's fields changes the format and must
//! bump [`STATE_FORMAT_VERSION`].

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The version of the state encoding: every `*State` struct's fields, in order. A snapshot
/// records it, and a restore refuses any other version rather than misread the bytes.
/// 2: `BlockState` has the disk's overlay. 3: `BlockState` has a captured tmp overlay, and
/// virtio-vsock has a state (`VsockState`).
pub const STATE_FORMAT_VERSION: u32 = 3;

/// How every device saves and restores its state; one pattern for all of them.
///
/// `save` exports what the guest can observe of the device (registers, buffered data, queue
/// positions, negotiated features) as a plain struct that serde can encode ([`to_bytes`]).
/// `restore` builds a new device from such a struct and the host-side resources the device's
/// normal constructor takes (`Args`: interrupt eventfds, output sinks, guest memory, a clock):
/// those are not state, the VMM that restores makes them anew. For the guest the restored device
/// is the saved one.
///
/// A state may come from a corrupt or foreign file: `restore` checks it and refuses values the
/// device could never have had, with an error rather than a panic or a device that misbehaves
/// later.
pub trait Persist: Sized {
    type State: Serialize + DeserializeOwned;
    /// What the device's constructor takes besides its state.
    type Args;
    type Error: std::error::Error;

    fn save(&self) -> Result<Self::State, Self::Error>;
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: postcard::Error,
    },
    #[error("cannot decode {what} ({len} bytes): {source}")]
    Decode {
        what: &'static str,
        len: usize,
        source: postcard::Error,
    },
    #[error("{what} is followed by {extra} bytes that are part of nothing")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error(
        "state format version {found}, but this Ember reads version {STATE_FORMAT_VERSION} only"
    )]
    Version { found: u32 },
    #[error("{what} cannot save its state: {reason}")]
    Unsupported {
        what: &'static str,
        reason: &'static str,
    },
    #[error("{what} cannot save its state: {reason}")]
    Failed { what: &'static str, reason: String },
}

/// The last part of a type's path, to name it in errors.
fn short_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    // Generic arguments would contain "::" too: cut them off first.
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base)
}

/// Encodes `state`.
pub fn to_bytes<T: Serialize>(state: &T) -> Result<Vec<u8>, StateError> {
    postcard::to_stdvec(state).map_err(|source| StateError::Encode {
        what: short_name::<T>(),
        source,
    })
}

/// Decodes a `T` that must take all of `bytes`: anything left over means the bytes were not
/// written as a `T`.
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateError> {
    let what = short_name::<T>();
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|source| StateError::Decode {
        what,
        len: bytes.len(),
        source,
    })?;
    if !rest.is_empty() {
        return Err(StateError::TrailingBytes {
            what,
            extra: rest.len(),
        });
    }
    Ok(value)
}

/// Encodes `state` after [`STATE_FORMAT_VERSION`], for a state that is stored on its own.
pub fn to_versioned_bytes<T: Serialize>(state: &T) -> Result<Vec<u8>, StateError> {
    postcard::to_stdvec(&(STATE_FORMAT_VERSION, state)).map_err(|source| StateError::Encode {
        what: short_name::<T>(),
        source,
    })
}

/// Decodes what [`to_versioned_bytes`] wrote; the version is checked before anything else is
/// read, so bytes of another version fail as such and not as some confusing field error.
pub fn from_versioned_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateError> {
    let (found, rest): (u32, _) =
        postcard::take_from_bytes(bytes).map_err(|source| StateError::Decode {
            what: "state format version",
            len: bytes.len(),
            source,
        })?;
    if found != STATE_FORMAT_VERSION {
        return Err(StateError::Version { found });
    }
    from_bytes(rest)
}

/// For devices that hold no state of their own beyond their host-side resources (the i8042's
/// reset line, the pvpanic port): an empty struct still gives them a place in a snapshot, and
/// fields to grow into.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoState {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        a: u8,
        b: u64,
        bytes: Vec<u8>,
    }

    fn sample() -> Sample {
        Sample {
            a: 7,
            b: u64::MAX,
            bytes: vec![1, 2, 3],
        }
    }

    #[test]
    fn round_trips_and_refuses_trailing_or_missing_bytes() {
        let bytes = to_bytes(&sample()).unwrap();
        assert_eq!(from_bytes::<Sample>(&bytes).unwrap(), sample());
        let mut longer = bytes.clone();
        longer.push(0);
        let err = from_bytes::<Sample>(&longer).unwrap_err();
        assert!(
            matches!(err, StateError::TrailingBytes { extra: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("Sample"), "{err}");
        for len in 0..bytes.len() {
            let err = from_bytes::<Sample>(&bytes[..len]).unwrap_err();
            assert!(matches!(err, StateError::Decode { .. }), "{len}: {err}");
        }
    }

    #[test]
    fn versioned_bytes_name_a_foreign_version() {
        let bytes = to_versioned_bytes(&sample()).unwrap();
        assert_eq!(from_versioned_bytes::<Sample>(&bytes).unwrap(), sample());
        let mut other = to_bytes(&(STATE_FORMAT_VERSION + 1)).unwrap();
        other.extend_from_slice(&to_bytes(&sample()).unwrap());
        let err = from_versioned_bytes::<Sample>(&other).unwrap_err();
        assert!(matches!(err, StateError::Version { found } if found == STATE_FORMAT_VERSION + 1));
        assert!(from_versioned_bytes::<Sample>(&[]).is_err());
    }

    /// Every prefix of a real device state, and bytes of another state, fail to decode.
    fn refuses_truncated_and_foreign<T: Serialize + DeserializeOwned>(state: &T) {
        let bytes = to_bytes(state).unwrap();
        for len in 0..bytes.len() {
            assert!(from_bytes::<T>(&bytes[..len]).is_err(), "{len} bytes");
        }
        let mut longer = bytes;
        longer.extend_from_slice(&[0xff; 3]);
        assert!(from_bytes::<T>(&longer).is_err());
    }

    #[test]
    fn legacy_device_states_refuse_truncated_or_extended_bytes() {
        use crate::trigger::EventFdTrigger;
        let serial = crate::serial::SerialDevice::new(
            EventFdTrigger::new().unwrap(),
            Box::new(std::io::sink()),
        )
        .unwrap();
        refuses_truncated_and_foreign(&serial.save().unwrap());
        refuses_truncated_and_foreign(&crate::cmos::Cmos::new().save().unwrap());
        let pm = crate::acpi_pm::AcpiPm::new(EventFdTrigger::new().unwrap(), 5);
        refuses_truncated_and_foreign(&pm.save().unwrap());
        refuses_truncated_and_foreign(&NoState {});
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        // A length prefix far past the end, and bytes that are no varint at all.
        for garbage in [&[0xff; 16][..], &[0x80; 3], &[5, 1, 2]] {
            assert!(from_bytes::<Sample>(garbage).is_err());
            assert!(from_versioned_bytes::<Sample>(garbage).is_err());
        }
    }
}

//! `--disk` images as virtio-blk devices: the checks a disk needs before it is opened (what kind of
//! file, the same image or overlay given twice), then one `Block` per disk, attached by the device manager
//! (which gives it its window, IRQ line and I/O thread, `ember-disk<N>`). Disk I/O (preadv,
//! pwritev, fdatasync, punching holes) runs only on that thread, served through the transport's
//! queue handler: a vCPU reading the device's registers never waits for a request in flight, and a
//! guest that keeps a queue full of large requests, or a slow FLUSH, cannot delay signals, the
//! console or Ctrl-A x.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use ember_devices::virtio::block::BlockError;
use ember_devices::virtio::{Block, DiskConfig, OverlayConfig};
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use crate::device_manager::{DeviceError, DeviceManager};
use crate::vcpu::VmControl;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Image(#[from] BlockError),
    #[error(
        "disk image {} is given twice (also as {}); only read-only disks and overlay bases may \
         share an image",
        path.display(),
        first.display()
    )]
    GivenTwice {
        path: std::path::PathBuf,
        first: std::path::PathBuf,
    },
    #[error(
        "overlay {} is also given as {what} ({}); an overlay takes one disk's writes and is no \
         other disk's file",
        path.display(),
        other.display()
    )]
    OverlayGivenTwice {
        path: std::path::PathBuf,
        other: std::path::PathBuf,
        what: &'static str,
    },
    #[error("overlay {} is {kind}, not a regular file", path.display())]
    OverlayNotAFile {
        path: std::path::PathBuf,
        kind: &'static str,
    },
    #[error("disk image {} is {kind}, not a file or a block device", path.display())]
    NotAnImage {
        path: std::path::PathBuf,
        kind: &'static str,
    },
    #[error("disk {}: {source}", path.display())]
    Attach {
        path: std::path::PathBuf,
        #[source]
        source: DeviceError,
    },
}

/// What a file that cannot serve as an image (a disk, a kernel, an initramfs) is, for the error:
/// opening a FIFO read-only blocks until a writer comes, and a directory or a character device
/// has no size to offer. `None` for a regular file or a block device.
pub(crate) fn unusable_file_kind(t: std::fs::FileType) -> Option<&'static str> {
    if t.is_file() || t.is_block_device() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("a special file")
    }
}

/// Refuses what cannot back a disk before it is opened (a read-only FIFO hung Ember in open).
/// A path Ember cannot stat is left to the open, which reports why.
fn check_image_kind(path: &Path) -> Result<(), DiskError> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    match unusable_file_kind(meta.file_type()) {
        None => Ok(()),
        Some(kind) => Err(DiskError::NotAnImage {
            path: path.to_path_buf(),
            kind,
        }),
    }
}

/// A file that exists by what it is, one that does not yet (an overlay Ember is to create) by its
/// absolute path.
#[derive(Clone, PartialEq, Eq)]
enum Identity {
    File((bool, u64, u64)),
    New(std::path::PathBuf),
}

fn identity(path: &Path) -> Identity {
    match image_identity(path) {
        Some(id) => Identity::File(id),
        None => Identity::New(std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())),
    }
}

/// Which image a path names: the same file through another path or a symlink, or the same block
/// device through another device node, is the same image.
fn image_identity(path: &Path) -> Option<(bool, u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some(if meta.file_type().is_block_device() {
        (true, meta.rdev(), 0)
    } else {
        (false, meta.dev(), meta.ino())
    })
}

/// An overlay must be a regular file if it exists (a missing one is created): Ember sizes it and
/// punches holes in it, which a block device or anything else cannot take.
fn check_overlay_kind(path: &Path) -> Result<(), DiskError> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let t = meta.file_type();
    let kind = match unusable_file_kind(t) {
        None if t.is_file() => return Ok(()),
        None => "a block device",
        Some(kind) => kind,
    };
    Err(DiskError::OverlayNotAFile {
        path: path.to_path_buf(),
        kind,
    })
}

/// One file a disk opens: its image (or base), or its overlay.
struct Opened<'a> {
    path: &'a Path,
    identity: Identity,
    overlay: bool,
    /// Opened for writing (an overlay, or an image without one that is not readonly=on).
    writes: bool,
}

/// The image lock would refuse a second writer too, but as "in use by another process", which
/// sends the user looking for a process that does not exist.
fn check_not_given_twice(disks: &[DiskConfig]) -> Result<(), DiskError> {
    let mut files: Vec<Opened> = Vec::new();
    for disk in disks {
        let mut own = vec![Opened {
            path: &disk.path,
            identity: identity(&disk.path),
            overlay: false,
            writes: !disk.readonly && disk.overlay.is_none(),
        }];
        if let Some(OverlayConfig::File(ov)) = &disk.overlay {
            own.push(Opened {
                path: ov,
                identity: identity(ov),
                overlay: true,
                writes: true,
            });
        }
        for file in own {
            let clash = files
                .iter()
                .find(|f| f.identity == file.identity && (f.writes || file.writes));
            match clash {
                None => {}
                Some(first) if !first.overlay && !file.overlay => {
                    return Err(DiskError::GivenTwice {
                        path: file.path.to_path_buf(),
                        first: first.path.to_path_buf(),
                    })
                }
                Some(first) => {
                    let (overlay, other) = if file.overlay {
                        (&file, first)
                    } else {
                        (first, &file)
                    };
                    return Err(DiskError::OverlayGivenTwice {
                        path: overlay.path.to_path_buf(),
                        other: other.path.to_path_buf(),
                        what: if other.overlay {
                            "the overlay of another disk"
                        } else {
                            "a disk image"
                        },
                    });
                }
            }
            files.push(file);
        }
    }
    Ok(())
}

/// Creates one virtio-blk device per disk, in order (the first is the guest's vda), each attached
/// by the device manager as `disk<N>` (its I/O thread is `ember-disk<N>`).
pub fn attach_disks(
    devices: &mut DeviceManager,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    disks: &[DiskConfig],
    ctl: &Arc<VmControl>,
) -> Result<(), DiskError> {
    check_not_given_twice(disks)?;
    for (i, disk) in disks.iter().enumerate() {
        check_image_kind(&disk.path)?;
        if let Some(OverlayConfig::File(ov)) = &disk.overlay {
            check_overlay_kind(ov)?;
        }
        let block = Block::new(disk)?;
        devices
            .attach_virtio(vm, mem, &format!("disk{i}"), block, ctl)
            .map_err(|source| DiskError::Attach {
                path: disk.path.clone(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(path: &Path, readonly: bool, overlay: Option<OverlayConfig>) -> DiskConfig {
        DiskConfig {
            path: path.to_path_buf(),
            readonly,
            id: None,
            overlay,
        }
    }

    #[test]
    fn overlays_and_their_bases_are_checked_for_double_use() {
        let dir = std::env::temp_dir().join(format!("ember-disks-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.img");
        std::fs::write(&base, [0u8; 512]).unwrap();
        let ov = |n: &str| Some(OverlayConfig::File(dir.join(n)));
        // One base under any number of overlays, and beside read-only disks.
        check_not_given_twice(&[
            disk(&base, false, ov("a.ovl")),
            disk(&base, false, ov("b.ovl")),
            disk(&base, true, None),
            disk(&base, false, Some(OverlayConfig::Tmp)),
        ])
        .unwrap();
        // But not beside a disk that writes it.
        let err =
            check_not_given_twice(&[disk(&base, false, ov("a.ovl")), disk(&base, false, None)])
                .unwrap_err();
        assert!(matches!(err, DiskError::GivenTwice { .. }), "{err}");
        // One overlay for two disks, even before it exists; an overlay that is its own base.
        let err = check_not_given_twice(&[
            disk(&base, false, ov("a.ovl")),
            disk(&base, false, ov("a.ovl")),
        ])
        .unwrap_err();
        assert!(matches!(err, DiskError::OverlayGivenTwice { .. }), "{err}");
        assert!(
            err.to_string().contains("the overlay of another disk"),
            "{err}"
        );
        let err =
            check_not_given_twice(&[disk(&base, false, Some(OverlayConfig::File(base.clone())))])
                .unwrap_err();
        assert!(err.to_string().contains("a disk image"), "{err}");
        assert!(check_overlay_kind(&dir).is_err());
        assert!(check_overlay_kind(&base).is_ok());
        assert!(check_overlay_kind(&dir.join("new.ovl")).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

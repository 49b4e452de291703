//! `--disk` images as virtio-blk devices: the checks a disk needs before it is opened (what kind of
//! file, the same image given twice), then one `Block` per disk, attached by the device manager
//! (which gives it its window, IRQ line and I/O thread, `ember-disk<N>`). Disk I/O (preadv,
//! pwritev, fdatasync, punching holes) runs only on that thread, served through the transport's
//! queue handler: a vCPU reading the device's registers never waits for a request in flight, and a
//! guest that keeps a queue full of large requests, or a slow FLUSH, cannot delay signals, the
//! console or Ctrl-A x.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use ember_devices::virtio::block::BlockError;
use ember_devices::virtio::{Block, DiskConfig};
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use crate::device_manager::{DeviceError, DeviceManager};
use crate::vcpu::VmControl;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Image(#[from] BlockError),
    #[error(
        "disk image {} is given twice (also as {}); only read-only disks may share an image",
        path.display(),
        first.display()
    )]
    GivenTwice {
        path: std::path::PathBuf,
        first: std::path::PathBuf,
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

/// The image lock would refuse a second writer too, but as "in use by another process", which
/// sends the user looking for a process that does not exist.
fn check_not_given_twice(disks: &[DiskConfig]) -> Result<(), DiskError> {
    let ids: Vec<_> = disks.iter().map(|d| image_identity(&d.path)).collect();
    for (i, disk) in disks.iter().enumerate() {
        let Some(id) = ids[i] else { continue };
        let earlier = disks[..i]
            .iter()
            .zip(&ids)
            .find(|(d, other)| **other == Some(id) && !(d.readonly && disk.readonly));
        if let Some((first, _)) = earlier {
            return Err(DiskError::GivenTwice {
                path: disk.path.clone(),
                first: first.path.clone(),
            });
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

//! Attaching `--disk` images as virtio-blk devices on virtio-mmio.
//!
//! Each disk gets the next virtio-mmio slot from the memory map (address, IRQ), an irqfd on that
//! IRQ, one ioeventfd per queue at QueueNotify (datamatch = queue index), a place on the MMIO bus,
//! and a thread of its own (`ember-disk<N>`, with its own seccomp filter) whose event loop serves
//! its requests through the transport's queue handler, never through the transport itself: a
//! vCPU reading the device's registers does not wait for a request in flight. Disk I/O (preadv, pwritev, fdatasync, punching holes) never runs on the main
//! event loop, so a guest that keeps a queue full of large requests, or a slow FLUSH, cannot delay
//! signals, the console or Ctrl-A x.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use ember_boot::layout::MmioDeviceInfo;
use ember_devices::virtio::block::BlockError;
use ember_devices::virtio::mmio::NOTIFY_OFFSET;
use ember_devices::virtio::{Block, DiskConfig, MmioTransport};
use ember_devices::{Bus, BusDevice};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use crate::vcpu::{ExitReason, VmControl};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("too many disks: the IOAPIC has IRQ lines for {max} virtio devices")]
    TooMany { max: u32 },
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
    #[error("disk {}: cannot create the virtio-mmio device: {source}", path.display())]
    Transport {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {}: cannot register the irqfd on IRQ {irq}: {source}", path.display())]
    Irqfd {
        path: std::path::PathBuf,
        irq: u32,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    #[error("disk {}: cannot register the queue notification ioeventfd: {source}", path.display())]
    Ioeventfd {
        path: std::path::PathBuf,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    #[error("disk {}: cannot start its I/O thread: {source}", path.display())]
    Thread {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {}: {source}", path.display())]
    Bus {
        path: std::path::PathBuf,
        #[source]
        source: ember_devices::bus::BusError,
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

/// Creates one virtio-blk device per disk, in order (the first is the guest's vda), and returns
/// the slots they took: the DSDT describes them and each `cmdline_word()` goes on the kernel
/// command line.
pub fn attach_disks(
    vm: &VmFd,
    mmio_bus: &mut Bus,
    mem: &GuestMemoryMmap,
    disks: &[DiskConfig],
    ctl: &Arc<VmControl>,
    seccomp: bool,
) -> Result<Vec<MmioDeviceInfo>, DiskError> {
    check_not_given_twice(disks)?;
    let mut slots = Vec::with_capacity(disks.len());
    for (i, disk) in disks.iter().enumerate() {
        let slot = u32::try_from(i)
            .ok()
            .and_then(MmioDeviceInfo::virtio_slot)
            .ok_or(DiskError::TooMany {
                max: ember_boot::layout::VIRTIO_IRQ_MAX - ember_boot::layout::VIRTIO_IRQ_BASE + 1,
            })?;
        let path = || disk.path.clone();
        check_image_kind(&disk.path)?;
        let block = Block::new(disk)?;
        let transport =
            MmioTransport::new(mem.clone(), block).map_err(|source| DiskError::Transport {
                path: path(),
                source,
            })?;
        vm.register_irqfd(transport.irq_evt(), slot.irq)
            .map_err(|source| DiskError::Irqfd {
                path: path(),
                irq: slot.irq,
                source,
            })?;
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(slot.addr + NOTIFY_OFFSET),
                queue as u32,
            )
            .map_err(|source| DiskError::Ioeventfd {
                path: path(),
                source,
            })?;
        }
        // Requests are served by the queue handler on the disk's thread; the transport on the
        // bus only answers register accesses, which therefore never wait for the disk.
        let handler = transport
            .queue_handler()
            .map_err(|source| DiskError::Transport {
                path: path(),
                source,
            })?;
        let device = Arc::new(Mutex::new(transport));
        mmio_bus
            .insert(slot.addr, slot.len, device as Arc<Mutex<dyn BusDevice>>)
            .map_err(|source| DiskError::Bus {
                path: path(),
                source,
            })?;
        let handler = Arc::new(Mutex::new(handler));
        spawn_io_thread(i, handler, ctl.clone(), seccomp).map_err(|source| DiskError::Thread {
            path: path(),
            source,
        })?;
        slots.push(slot);
    }
    Ok(slots)
}

/// The disk's own event loop, on its own thread: queue notifications in, requests served, the
/// interrupt raised. Ends with the process.
fn spawn_io_thread(
    index: usize,
    device: Arc<Mutex<dyn MutEventSubscriber + Send>>,
    ctl: Arc<VmControl>,
    seccomp: bool,
) -> std::io::Result<()> {
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    em.add_subscriber(device);
    std::thread::Builder::new()
        .name(format!("ember-disk{index}"))
        .spawn(move || {
            crate::signals::block_in_this_thread();
            if seccomp {
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Disk) {
                    ctl.request_exit(ExitReason::VcpuFailed(format!("disk {index}: {e}")));
                    return;
                }
            }
            loop {
                if let Err(e) = em.run() {
                    ctl.request_exit(ExitReason::VcpuFailed(format!(
                        "disk {index}: event loop: {e:?}"
                    )));
                    return;
                }
            }
        })?;
    Ok(())
}

//! The disk image: opening, locking, and positioned I/O on it, straight or through a
//! copy-on-write overlay (`overlay.rs`).
//!
//! An image opened read-write takes an exclusive OFD lock on the whole file and a read-only one
//! a shared lock, so two VMs can share a read-only image but never write one another's disk. A
//! base under an overlay is opened read-only and locked shared (any number of VMs may use it, none
//! may write it), its overlay exclusively. OFD locks belong to the open file description: they go
//! away with the file, whichever way Ember exits.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::overlay::Overlay;
use super::{DiskConfig, OverlayConfig};

pub const SECTOR_SIZE: u64 = 512;
/// virtio-blk device ids are 20 bytes, NUL-padded when shorter.
pub const DISK_ID_LEN: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image {} is in use by another process (it is locked)", path.display())]
    Locked { path: PathBuf },
    #[error("cannot lock disk image {}: {source}", path.display())]
    Lock { path: PathBuf, source: io::Error },
    #[error("cannot find the size of disk image {}: {source}", path.display())]
    Size { path: PathBuf, source: io::Error },
    #[error(
        "disk image {} is {size} bytes, which is not a multiple of {SECTOR_SIZE}-byte sectors",
        path.display()
    )]
    UnalignedSize { path: PathBuf, size: u64 },
    #[error("disk id {id:?} is longer than {DISK_ID_LEN} bytes")]
    IdTooLong { id: String },
    #[error(
        "disk image {}: readonly=on cannot go with an overlay (the overlay is there to take the \
         guest's writes; the base is never written either way)",
        path.display()
    )]
    ReadonlyOverlay { path: PathBuf },
    #[error("cannot read base image {} (for its fingerprint): {source}", path.display())]
    BaseRead { path: PathBuf, source: io::Error },
    #[error("cannot open or create overlay {}: {source}", path.display())]
    OverlayOpen { path: PathBuf, source: io::Error },
    #[error("overlay {} is not a regular file", path.display())]
    OverlayNotAFile { path: PathBuf },
    #[error("overlay {} is in use by another process (it is locked)", path.display())]
    OverlayLocked { path: PathBuf },
    #[error("overlay {}: cannot {what}: {source}", path.display())]
    OverlayIo {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("{} is not an Ember overlay ({reason}); give a new or empty file for a new overlay", path.display())]
    NotAnOverlay { path: PathBuf, reason: &'static str },
    #[error("overlay {} is format version {version}; this Ember reads version {}", path.display(), super::overlay::OVERLAY_VERSION)]
    OverlayVersion { path: PathBuf, version: u32 },
    #[error("overlay {} is damaged: {reason}", path.display())]
    OverlayDamaged { path: PathBuf, reason: String },
    #[error(
        "overlay {} belongs to another base: it was made over {}, and {what}; its blocks mean \
         something only over the image they were written on",
        overlay.display(),
        made_over.display()
    )]
    WrongBase {
        overlay: PathBuf,
        base: PathBuf,
        made_over: PathBuf,
        what: String,
    },
    #[error("overlay {}: a disk of {size} bytes is too large for an overlay file", path.display())]
    OverlayTooLarge { path: PathBuf, size: u64 },
    #[error("cannot create a temporary overlay in {} ($TMPDIR): {source}", dir.display())]
    OverlayTmp { dir: PathBuf, source: io::Error },
}

/// An open, locked disk image of a whole number of sectors, maybe under an overlay.
#[derive(Debug)]
pub struct DiskImage {
    /// The image, or the base under an overlay (then opened read-only).
    file: File,
    path: PathBuf,
    /// What the guest sees: false with an overlay.
    readonly: bool,
    sectors: u64,
    id: [u8; DISK_ID_LEN],
    overlay: Option<Overlay>,
}

impl DiskImage {
    pub fn open(config: &DiskConfig) -> Result<Self, BlockError> {
        let path = config.path.clone();
        if config.readonly && config.overlay.is_some() {
            return Err(BlockError::ReadonlyOverlay { path });
        }
        let id = disk_id(config)?;
        // The base first: a missing base must not leave a new overlay behind.
        let file_readonly = config.readonly || config.overlay.is_some();
        let file = OpenOptions::new()
            .read(true)
            .write(!file_readonly)
            .open(&path)
            .map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?;
        lock(&file, file_readonly, &path)?;
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?;
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::UnalignedSize { path, size });
        }
        let overlay = match &config.overlay {
            None => None,
            Some(OverlayConfig::File(ov)) => Some(Overlay::open(ov, &file, &path, size)?),
            Some(OverlayConfig::Tmp) => Some(Overlay::tmp(size)?),
            Some(OverlayConfig::Captured(from)) => {
                Some(Overlay::private_copy(from, &file, &path, size)?)
            }
        };
        Ok(DiskImage {
            file,
            path,
            readonly: config.readonly,
            sectors: size / SECTOR_SIZE,
            id,
            overlay,
        })
    }

    pub fn overlay(&self) -> Option<&Overlay> {
        self.overlay.as_ref()
    }

    /// Writes the overlay's current content, as an overlay file over this disk's base, to a new
    /// file at `to` (see `Overlay::capture`); nothing for a disk without an overlay.
    pub fn capture_overlay(&self, to: &Path) -> Result<(), BlockError> {
        match &self.overlay {
            Some(o) => o.capture(&self.file, &self.path, to),
            None => Ok(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn id(&self) -> &[u8; DISK_ID_LEN] {
        &self.id
    }

    /// Positioned reads and writes of the image file itself (for tests and tools; requests go
    /// through [`DiskImage::transfer`], which knows about overlays).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Moves all of `iovs` between the disk at `offset` and memory; returns the bytes moved. The
    /// caller checked the range lies on the disk.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for the whole call (for writes when reading
    /// the disk) and that no Rust reference points into.
    pub unsafe fn transfer(
        &self,
        iovs: &mut [libc::iovec],
        offset: u64,
        direction: Direction,
    ) -> io::Result<u64> {
        // SAFETY: the caller vouches for the buffers.
        unsafe {
            match (&self.overlay, direction) {
                (None, _) => transfer_all(&self.file, iovs, offset, direction),
                (Some(o), Direction::ToGuest) => o.read(&self.file, iovs, offset),
                (Some(o), Direction::ToDisk) => o.write(&self.file, iovs, offset),
            }
        }
    }

    /// Returns once every completed write is on stable storage.
    pub fn flush(&self) -> io::Result<()> {
        match &self.overlay {
            None => self.file.sync_data(),
            Some(o) => o.flush(),
        }
    }

    /// DISCARD: deallocates `len` bytes at `offset` where the file system can (a hint: where it
    /// cannot, the bytes stay). Over an overlay they read as zeros afterwards, whatever the base
    /// holds there.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match &self.overlay {
            None => match punch_hole(&self.file, offset, len) {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                r => r,
            },
            Some(o) => o.zero(&self.file, offset, len, true),
        }
    }

    /// WRITE_ZEROES: `len` bytes at `offset` read as zeros afterwards; with `unmap` they may be
    /// deallocated (a punched hole reads back as zeros too).
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        match &self.overlay {
            None => {
                if unmap && punch_hole(&self.file, offset, len).is_ok() {
                    return Ok(());
                }
                write_zeroes(&self.file, offset, len)
            }
            Some(o) => o.zero(&self.file, offset, len, unmap),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ToGuest,
    ToDisk,
}

/// Deallocates `len` bytes at `offset`; they read back as zeros afterwards.
pub(super) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Zeroes `len` bytes at `offset`, keeping them allocated. Falls back to writing zeros where the
/// filesystem cannot zero a range (e.g. tmpfs before 6.x).
pub(super) fn write_zeroes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    match fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64);
                file.write_all_at(&zeros[..n as usize], offset + done)?;
                done += n;
            }
            Ok(())
        }
        r => r,
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    // fallocate(2) refuses an empty range with EINVAL; for us it is a request for nothing.
    if len == 0 {
        return Ok(());
    }
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is ours and open.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Moves all of `iovs` at `offset` of `file`, going on after short transfers (a huge request, a
/// signal): one preadv/pwritev for the whole list when it can. Returns the bytes moved.
///
/// # Safety
/// Every iovec must describe memory that is valid for the whole call (for writes when reading
/// the file) and that no Rust reference points into.
pub(super) unsafe fn transfer_all(
    file: &File,
    iovs: &mut [libc::iovec],
    mut offset: u64,
    direction: Direction,
) -> io::Result<u64> {
    let mut moved = 0u64;
    let mut first = 0;
    while first < iovs.len() {
        let left = &iovs[first..];
        let (at, count) = vectored_args(left, offset)?;
        // SAFETY: the caller vouches for the buffers; the fd is ours and open.
        let r = unsafe {
            match direction {
                Direction::ToGuest => libc::preadv(file.as_raw_fd(), left.as_ptr(), count, at),
                Direction::ToDisk => libc::pwritev(file.as_raw_fd(), left.as_ptr(), count, at),
            }
        };
        let n = match usize::try_from(r) {
            // The image shrank under us (someone else truncated it): not the guest's doing.
            Ok(0) => {
                return Err(match direction {
                    Direction::ToGuest => io::ErrorKind::UnexpectedEof.into(),
                    Direction::ToDisk => io::ErrorKind::WriteZero.into(),
                })
            }
            Ok(n) => n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
        };
        moved += n as u64;
        offset += n as u64;
        first = advance(iovs, first, n);
    }
    Ok(moved)
}

/// Consumes `n` transferred bytes from `iovs[first..]`: whole iovecs are skipped and a partly
/// done one is trimmed to what is left. Returns the new first iovec's index.
fn advance(iovs: &mut [libc::iovec], mut first: usize, mut n: usize) -> usize {
    while let Some(iov) = iovs.get_mut(first) {
        if n < iov.iov_len {
            // Inside this iovec's buffer.
            iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(n).cast();
            iov.iov_len -= n;
            break;
        }
        n -= iov.iov_len;
        first += 1;
    }
    first
}

fn vectored_args(iovs: &[libc::iovec], offset: u64) -> io::Result<(libc::off_t, libc::c_int)> {
    match (
        libc::off_t::try_from(offset),
        libc::c_int::try_from(iovs.len()),
    ) {
        (Ok(offset), Ok(count)) => Ok((offset, count)),
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

fn disk_id(config: &DiskConfig) -> Result<[u8; DISK_ID_LEN], BlockError> {
    let mut id = [0u8; DISK_ID_LEN];
    let bytes = match &config.id {
        Some(given) if given.len() > DISK_ID_LEN => {
            return Err(BlockError::IdTooLong { id: given.clone() });
        }
        Some(given) => given.as_bytes().to_vec(),
        None => config
            .path
            .file_name()
            .map(|n| n.as_encoded_bytes().to_vec())
            .unwrap_or_default(),
    };
    let n = bytes.len().min(DISK_ID_LEN);
    id[..n].copy_from_slice(&bytes[..n]);
    Ok(id)
}

pub(super) fn lock(file: &File, shared: bool, path: &Path) -> Result<(), BlockError> {
    let lock_type = if shared { libc::F_RDLCK } else { libc::F_WRLCK };
    // l_start = l_len = 0 from SEEK_SET covers the whole file, however it grows.
    // SAFETY: flock is plain data; all-zero is a valid value before the fields are set.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = lock_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK reads the flock we pass and nothing else; the fd is open.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(BlockError::Locked {
            path: path.to_path_buf(),
        }),
        _ => Err(BlockError::Lock {
            path: path.to_path_buf(),
            source: err,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempfile::TempFile;

    fn image(size: u64) -> TempFile {
        let t = TempFile::new_with_prefix("/tmp/ember-blk-test").unwrap();
        t.as_file().set_len(size).unwrap();
        t
    }

    fn config(path: &Path, readonly: bool) -> DiskConfig {
        DiskConfig {
            path: path.to_path_buf(),
            readonly,
            id: None,
            overlay: None,
        }
    }

    #[test]
    fn advance_skips_done_iovecs_and_trims_a_partly_done_one() {
        let mut buf = [0u8; 64];
        let base = buf.as_mut_ptr();
        let at = |o: usize| base.wrapping_add(o).cast::<libc::c_void>();
        let mut iovs = [
            libc::iovec {
                iov_base: at(0),
                iov_len: 16,
            },
            libc::iovec {
                iov_base: at(16),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: at(32),
                iov_len: 32,
            },
        ];
        assert_eq!(advance(&mut iovs, 0, 0), 0);
        assert_eq!((iovs[0].iov_base, iovs[0].iov_len), (at(0), 16));
        // All of the first and 3 bytes into the second.
        assert_eq!(advance(&mut iovs, 0, 19), 1);
        assert_eq!((iovs[1].iov_base, iovs[1].iov_len), (at(19), 5));
        // Exactly the rest of the second.
        assert_eq!(advance(&mut iovs, 1, 5), 2);
        assert_eq!((iovs[2].iov_base, iovs[2].iov_len), (at(32), 32));
        assert_eq!(advance(&mut iovs, 2, 31), 2);
        assert_eq!((iovs[2].iov_base, iovs[2].iov_len), (at(63), 1));
        assert_eq!(advance(&mut iovs, 2, 1), 3);
    }

    #[test]
    fn second_read_write_open_is_refused_naming_the_image() {
        let t = image(4096);
        let first = DiskImage::open(&config(t.as_path(), false)).unwrap();
        let err = DiskImage::open(&config(t.as_path(), false)).unwrap_err();
        assert!(matches!(err, BlockError::Locked { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&t.as_path().display().to_string()), "{msg}");
        assert!(msg.contains("in use by another process"), "{msg}");
        // Nor may a reader share a disk that is being written.
        assert!(matches!(
            DiskImage::open(&config(t.as_path(), true)),
            Err(BlockError::Locked { .. })
        ));
        drop(first);
        DiskImage::open(&config(t.as_path(), false)).unwrap();
    }

    #[test]
    fn read_only_opens_share_but_exclude_a_writer() {
        let t = image(4096);
        let a = DiskImage::open(&config(t.as_path(), true)).unwrap();
        let b = DiskImage::open(&config(t.as_path(), true)).unwrap();
        assert!(a.readonly() && b.readonly());
        assert!(matches!(
            DiskImage::open(&config(t.as_path(), false)),
            Err(BlockError::Locked { .. })
        ));
    }

    #[test]
    fn size_must_be_whole_sectors() {
        let t = image(1000);
        let err = DiskImage::open(&config(t.as_path(), false)).unwrap_err();
        assert!(matches!(err, BlockError::UnalignedSize { size: 1000, .. }));
        assert!(err.to_string().contains(&t.as_path().display().to_string()));
        let t = image(3 * 512);
        assert_eq!(
            DiskImage::open(&config(t.as_path(), false))
                .unwrap()
                .sectors(),
            3
        );
    }

    #[test]
    fn missing_image_is_named() {
        let err = DiskImage::open(&config(Path::new("/nonexistent/disk.img"), false)).unwrap_err();
        assert!(matches!(err, BlockError::Open { .. }));
        assert!(err.to_string().contains("/nonexistent/disk.img"));
    }

    #[test]
    fn id_defaults_to_the_file_name_truncated() {
        let mut c = config(Path::new("/x/a-rather-long-disk-image-name.img"), false);
        assert_eq!(&disk_id(&c).unwrap(), b"a-rather-long-disk-i");
        c.path = "/x/root.img".into();
        assert_eq!(&disk_id(&c).unwrap()[..9], b"root.img\0");
        c.id = Some("data".into());
        assert_eq!(
            &disk_id(&c).unwrap(),
            b"data\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
        );
        c.id = Some("x".repeat(21));
        assert!(matches!(disk_id(&c), Err(BlockError::IdTooLong { .. })));
    }
}

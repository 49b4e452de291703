//! The disk image: opening, locking, and positioned I/O on it.
//!
//! An image opened read-write takes an exclusive OFD lock on the whole file and a read-only one
//! a shared lock, so two VMs can share a read-only image but never write one another's disk. OFD
//! locks belong to the open file description: they go away with the file, whichever way Ember
//! exits.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::DiskConfig;

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
}

/// An open, locked disk image of a whole number of sectors.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    readonly: bool,
    sectors: u64,
    id: [u8; DISK_ID_LEN],
}

impl DiskImage {
    pub fn open(config: &DiskConfig) -> Result<Self, BlockError> {
        let path = config.path.clone();
        let id = disk_id(config)?;
        let file = OpenOptions::new()
            .read(true)
            .write(!config.readonly)
            .open(&path)
            .map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?;
        lock(&file, config.readonly, &path)?;
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
        Ok(DiskImage {
            file,
            path,
            readonly: config.readonly,
            sectors: size / SECTOR_SIZE,
            id,
        })
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

    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// One preadv(2) into `iovs` from `offset`; returns the bytes read (short at end of file).
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for writes for the whole call and that no
    /// Rust reference points into.
    pub unsafe fn preadv(&self, iovs: &[libc::iovec], offset: u64) -> io::Result<usize> {
        let (offset, count) = vectored_args(iovs, offset)?;
        // SAFETY: the caller vouches for the buffers; the fd is ours and open.
        let n = unsafe { libc::preadv(self.file.as_raw_fd(), iovs.as_ptr(), count, offset) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// One pwritev(2) of `iovs` at `offset`; returns the bytes written.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for reads for the whole call.
    pub unsafe fn pwritev(&self, iovs: &[libc::iovec], offset: u64) -> io::Result<usize> {
        let (offset, count) = vectored_args(iovs, offset)?;
        // SAFETY: the caller vouches for the buffers; the fd is ours and open.
        let n = unsafe { libc::pwritev(self.file.as_raw_fd(), iovs.as_ptr(), count, offset) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Returns once every completed write is on stable storage.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `len` bytes at `offset`; they read back as zeros afterwards.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zeroes `len` bytes at `offset`, keeping them allocated. Falls back to writing zeros where
    /// the filesystem cannot zero a range (e.g. tmpfs before 6.x).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64);
                    self.file
                        .write_all_at(&zeros[..n as usize], offset + done)?;
                    done += n;
                }
                Ok(())
            }
            r => r,
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // fallocate(2) refuses an empty range with EINVAL; for us it is a request for nothing.
        if len == 0 {
            return Ok(());
        }
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is ours and open.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
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

fn lock(file: &File, shared: bool, path: &Path) -> Result<(), BlockError> {
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
        }
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

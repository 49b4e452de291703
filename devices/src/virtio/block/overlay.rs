//! Copy-on-write overlays (`--disk path=BASE,overlay=FILE|tmp`): the guest sees a read-write disk
//! of the base's size whose blocks come from the base image until the guest writes them, and from
//! the overlay file afterwards. The base is only ever read.
//!
//! # The overlay file, version 1
//!
//! | offset | length | what |
//! |---|---|---|
//! | 0 | 4 KiB | the header, below |
//! | 4 KiB | `map_len` | the allocation map: bit `b % 8` of byte `b / 8` set = block `b` is the overlay's |
//! | `data_offset` | the disk's size | the disk's bytes, each at `data_offset` + its offset on the disk |
//!
//! The file is sparse: a block the guest never wrote is a hole and takes no space, so an overlay
//! costs what the guest wrote. Header fields, little-endian:
//!
//! | offset | type | what |
//! |---|---|---|
//! | 0 | 8 bytes | magic `EMBEROVL` |
//! | 8 | u32 | version, 1 |
//! | 12 | u32 | block size, 4096 |
//! | 16 | u64 | the disk's size in bytes: the base's size |
//! | 24 | u64 | `map_offset`, 4096 |
//! | 32 | u64 | `map_len`: one bit per block, rounded up to 4 KiB |
//! | 40 | u64 | `data_offset`: after the map, rounded up to 1 MiB |
//! | 48 | u64 | the base's fingerprint: FNV-1a 64 of its size (u64 LE), first MiB and last MiB |
//! | 56 | u16 | length of the next field |
//! | 58 | bytes | the base's path when the overlay was made (at most 2 KiB), for error messages only |
//! | 4088 | u64 | FNV-1a 64 of header bytes 0..4088 |
//!
//! **Why 4 KiB blocks.** A block is what a partial write copies up from the base first, and what
//! a write newly allocates in the overlay. Guest filesystems and the page cache write in 4 KiB
//! units, so with 4 KiB blocks nearly every write covers its blocks whole and needs no copy-up at
//! all, and an overlay grows by what was written. With 64 KiB blocks a 4 KiB write to a fresh block
//! would first copy 60 KiB from the base (16x the I/O for random writes, and 16x the space). The
//! price is the map: 32 KiB per GiB of disk on file, and in memory only for the 128 MiB regions
//! the guest wrote (4 KiB each).
//!
//! **Why not qcow2.** The qcow2 crates on crates.io are pre-1.0 and async-first (tokio),
//! and bring a dozen dependencies whose system calls the disk thread's seccomp filter would have
//! to allow, and qcow2's own metadata (L1/L2 tables, refcounts) needs far more care to stay
//! consistent across a crash than one bit per block does. Here a block stays at its own offset
//! (plus `data_offset`), so reading or writing the overlay is the same preadv/pwritev as for a
//! plain image, and the map is the only metadata. What it costs: other tools cannot read the
//! format (it is documented here and in the README).
//!
//! **Crash safety.** The map on file only ever points at data that is on stable storage: a FLUSH
//! syncs the overlay's data, then writes the map's changed pages, then syncs again. Writes the
//! guest has not flushed are lost when Ember stops (the guest's filesystem finds its last flush,
//! as after a power cut); their bytes may be in the file, but the map on file does not point at
//! them, and a later partial write to such a block copies the base's bytes up again first.
//!
//! **`overlay=tmp`** is an unnamed file (O_TMPFILE, or a file unlinked right after creation where
//! the filesystem has no O_TMPFILE) in `$TMPDIR` (default /tmp): it goes with Ember's last file
//! descriptor, however Ember ends. It has no header or map on file, and its FLUSH returns at once:
//! nothing can read it after Ember, so there is nothing to make durable.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::backend::{self, BlockError, Direction};

pub const OVERLAY_MAGIC: &[u8; 8] = b"EMBEROVL";
pub const OVERLAY_VERSION: u32 = 1;
/// The copy-on-write unit (see the module's documentation for why 4 KiB).
pub const OVERLAY_BLOCK: u64 = 4096;
const HEADER_LEN: u64 = 4096;
const SUM_AT: usize = HEADER_LEN as usize - 8;
const BASE_PATH_AT: usize = 58;
const BASE_PATH_MAX: usize = 2048;
/// The map is read and written in pages of this many bytes (each covers 128 MiB of disk).
const MAP_PAGE: usize = 4096;
const WORDS_PER_PAGE: usize = MAP_PAGE / 8;
const BLOCKS_PER_PAGE: u64 = MAP_PAGE as u64 * 8;
/// How much of each end of the base its fingerprint reads.
const FINGERPRINT_SPAN: u64 = 1 << 20;
/// Data starts on a 1 MiB boundary, so guest blocks line up with any extent or huge page size of
/// the file system the overlay lives on.
const DATA_ALIGN: u64 = 1 << 20;

/// Where everything is in an overlay for a disk of a given size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    disk_size: u64,
    blocks: u64,
    map_len: u64,
    data_offset: u64,
}

impl Geometry {
    /// None if the overlay file could not be that large (past what lseek can address).
    fn for_disk(disk_size: u64) -> Option<Self> {
        let blocks = disk_size.div_ceil(OVERLAY_BLOCK);
        let map_len = blocks
            .div_ceil(8)
            .next_multiple_of(MAP_PAGE as u64)
            .max(MAP_PAGE as u64);
        let data_offset = HEADER_LEN
            .checked_add(map_len)?
            .checked_next_multiple_of(DATA_ALIGN)?;
        let g = Geometry {
            disk_size,
            blocks,
            map_len,
            data_offset,
        };
        (g.file_len()? <= i64::MAX as u64).then_some(g)
    }

    /// As `for_disk`, or the error naming `path` (the overlay, or where it would be).
    fn checked(disk_size: u64, path: &Path) -> Result<Self, BlockError> {
        Self::for_disk(disk_size).ok_or_else(|| BlockError::OverlayTooLarge {
            path: path.to_path_buf(),
            size: disk_size,
        })
    }

    fn file_len(&self) -> Option<u64> {
        self.data_offset.checked_add(self.disk_size)
    }

    /// The end of block `b` on the disk: the last block may be shorter (disks are whole sectors,
    /// not whole blocks).
    fn block_end(&self, b: u64) -> u64 {
        ((b + 1) * OVERLAY_BLOCK).min(self.disk_size)
    }
}

/// Which blocks are the overlay's. Pages of the map are kept only once a block in them is set, so
/// a huge disk with a few writes costs a few pages.
#[derive(Debug)]
struct AllocationMap {
    pages: Vec<Option<Box<[u64; WORDS_PER_PAGE]>>>,
    /// Pages changed since the map was last written to the file.
    dirty: BTreeSet<usize>,
}

impl AllocationMap {
    fn new(blocks: u64) -> Self {
        let n = usize::try_from(blocks.div_ceil(BLOCKS_PER_PAGE)).unwrap_or(usize::MAX);
        AllocationMap {
            pages: std::iter::repeat_with(|| None).take(n).collect(),
            dirty: BTreeSet::new(),
        }
    }

    fn get(&self, block: u64) -> bool {
        let (page, word, bit) = Self::position(block);
        match self.pages.get(page) {
            Some(Some(p)) => p[word] & (1 << bit) != 0,
            _ => false,
        }
    }

    fn position(block: u64) -> (usize, usize, u32) {
        let page = (block / BLOCKS_PER_PAGE) as usize;
        let in_page = block % BLOCKS_PER_PAGE;
        (page, (in_page / 64) as usize, (in_page % 64) as u32)
    }

    /// Marks blocks `first..end`, which the caller checked are on the disk.
    fn set(&mut self, first: u64, end: u64) {
        for block in first..end {
            let (page, word, bit) = Self::position(block);
            let Some(slot) = self.pages.get_mut(page) else {
                return;
            };
            let p = slot.get_or_insert_with(|| Box::new([0; WORDS_PER_PAGE]));
            if p[word] & (1 << bit) == 0 {
                p[word] |= 1 << bit;
                self.dirty.insert(page);
            }
        }
    }

    /// Whether block `first` is the overlay's, and how many blocks from it on (up to `end`) are
    /// the same.
    fn run(&self, first: u64, end: u64) -> (bool, u64) {
        let state = self.get(first);
        let mut b = first + 1;
        while b < end {
            let (page, _, _) = Self::position(b);
            if !state && matches!(self.pages.get(page), Some(None)) {
                // A page never written: all of it is the base's.
                b = (b / BLOCKS_PER_PAGE + 1) * BLOCKS_PER_PAGE;
                continue;
            }
            if self.get(b) != state {
                break;
            }
            b += 1;
        }
        (state, b.min(end) - first)
    }

    fn page_bytes(&self, page: usize) -> [u8; MAP_PAGE] {
        let mut out = [0u8; MAP_PAGE];
        if let Some(Some(p)) = self.pages.get(page) {
            for (chunk, word) in out.chunks_exact_mut(8).zip(p.iter()) {
                chunk.copy_from_slice(&word.to_le_bytes());
            }
        }
        out
    }

    fn load_page(&mut self, page: usize, bytes: &[u8]) {
        if bytes.iter().all(|&b| b == 0) {
            return;
        }
        let mut words = Box::new([0u64; WORDS_PER_PAGE]);
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            *word = u64::from_le_bytes(w);
        }
        if let Some(slot) = self.pages.get_mut(page) {
            *slot = Some(words);
        }
    }

    fn allocated_blocks(&self) -> u64 {
        self.pages
            .iter()
            .flatten()
            .map(|p| p.iter().map(|w| u64::from(w.count_ones())).sum::<u64>())
            .sum()
    }
}

/// What an overlay's request side changes, under one lock: requests run on the disk's thread, a
/// snapshot writes the map from the VMM's.
#[derive(Debug)]
struct Mutable {
    map: AllocationMap,
    /// One block, for copying up from the base.
    block: Vec<u8>,
}

/// An open overlay, locked exclusively.
#[derive(Debug)]
pub struct Overlay {
    file: File,
    /// None for `overlay=tmp`.
    path: Option<PathBuf>,
    geometry: Geometry,
    /// Where the guest's bytes start in the file (0 for tmp, which has no header).
    data_offset: u64,
    mutable: Mutex<Mutable>,
}

/// The header's fields that are checked against the base.
struct Header {
    geometry: Geometry,
    fingerprint: u64,
    base_path: Vec<u8>,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        let g = &self.geometry;
        h[0..8].copy_from_slice(OVERLAY_MAGIC);
        h[8..12].copy_from_slice(&OVERLAY_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(OVERLAY_BLOCK as u32).to_le_bytes());
        h[16..24].copy_from_slice(&g.disk_size.to_le_bytes());
        h[24..32].copy_from_slice(&HEADER_LEN.to_le_bytes());
        h[32..40].copy_from_slice(&g.map_len.to_le_bytes());
        h[40..48].copy_from_slice(&g.data_offset.to_le_bytes());
        h[48..56].copy_from_slice(&self.fingerprint.to_le_bytes());
        let n = self.base_path.len().min(BASE_PATH_MAX);
        h[56..58].copy_from_slice(&(n as u16).to_le_bytes());
        h[BASE_PATH_AT..BASE_PATH_AT + n].copy_from_slice(&self.base_path[..n]);
        let sum = fnv1a(fnv1a_start(), &h[..SUM_AT]);
        h[SUM_AT..].copy_from_slice(&sum.to_le_bytes());
        h
    }

    /// Checks everything that does not need the base; `Err` is the reason, for the error.
    fn decode(h: &[u8; HEADER_LEN as usize]) -> Result<Self, HeaderError> {
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        if &h[0..8] != OVERLAY_MAGIC {
            return Err(HeaderError::NotAnOverlay("no EMBEROVL magic at its start"));
        }
        let version = u32_at(8);
        if version != OVERLAY_VERSION {
            return Err(HeaderError::Version(version));
        }
        if u64_at(SUM_AT) != fnv1a(fnv1a_start(), &h[..SUM_AT]) {
            return Err(HeaderError::Damaged(
                "its header checksum does not match".into(),
            ));
        }
        let block = u32_at(12);
        if u64::from(block) != OVERLAY_BLOCK {
            return Err(HeaderError::Damaged(format!(
                "block size {block}, not {OVERLAY_BLOCK}"
            )));
        }
        let disk_size = u64_at(16);
        let Some(geometry) = Geometry::for_disk(disk_size) else {
            return Err(HeaderError::Damaged(format!(
                "a disk size of {disk_size} bytes is too large"
            )));
        };
        if u64_at(24) != HEADER_LEN
            || u64_at(32) != geometry.map_len
            || u64_at(40) != geometry.data_offset
        {
            return Err(HeaderError::Damaged(format!(
                "its map and data offsets ({}, {} bytes, {}) are not those of a {disk_size}-byte \
                 disk",
                u64_at(24),
                u64_at(32),
                u64_at(40)
            )));
        }
        let n = usize::from(u16::from_le_bytes([h[56], h[57]]));
        if n > BASE_PATH_MAX {
            return Err(HeaderError::Damaged(format!(
                "a base path of {n} bytes (at most {BASE_PATH_MAX})"
            )));
        }
        Ok(Header {
            geometry,
            fingerprint: u64_at(48),
            base_path: h[BASE_PATH_AT..BASE_PATH_AT + n].to_vec(),
        })
    }
}

enum HeaderError {
    NotAnOverlay(&'static str),
    Version(u32),
    Damaged(String),
}

/// Puts the magic and a valid checksum on `bytes` (padded to a header's length): for the fuzz
/// target, so that its inputs reach the checks behind those two.
#[doc(hidden)]
pub fn seal_header(bytes: &mut Vec<u8>) {
    if bytes.len() < HEADER_LEN as usize {
        bytes.resize(HEADER_LEN as usize, 0);
    }
    bytes[0..8].copy_from_slice(OVERLAY_MAGIC);
    let sum = fnv1a(fnv1a_start(), &bytes[..SUM_AT]);
    bytes[SUM_AT..HEADER_LEN as usize].copy_from_slice(&sum.to_le_bytes());
}

fn fnv1a_start() -> u64 {
    0xcbf2_9ce4_8422_2325
}

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Tells one base from another without reading all of it: its size and both ends (partition
/// tables and file system superblocks, with their UUIDs, are at the start; GPT's backup and many
/// images' last writes at the end).
fn fingerprint(base: &File, base_path: &Path, size: u64) -> Result<u64, BlockError> {
    let span = size.min(FINGERPRINT_SPAN);
    let mut buf = vec![0u8; span as usize];
    let mut h = fnv1a(fnv1a_start(), &size.to_le_bytes());
    for offset in [0, size - span] {
        base.read_exact_at(&mut buf, offset)
            .map_err(|source| BlockError::BaseRead {
                path: base_path.to_path_buf(),
                source,
            })?;
        h = fnv1a(h, &buf);
    }
    Ok(h)
}

impl Overlay {
    /// Opens the overlay at `path` over `base` (already open and locked shared), or creates it
    /// if it does not exist or is empty.
    pub(super) fn open(
        path: &Path,
        base: &File,
        base_path: &Path,
        disk_size: u64,
    ) -> Result<Self, BlockError> {
        let geometry = Geometry::checked(disk_size, path)?;
        let open_err = |source| BlockError::OverlayOpen {
            path: path.to_path_buf(),
            source,
        };
        let (file, created) = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(f) => (f, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(open_err)?;
                (f, false)
            }
            Err(e) => return Err(open_err(e)),
        };
        let io_err = |what: &'static str| {
            let path = path.to_path_buf();
            move |source| BlockError::OverlayIo { path, what, source }
        };
        let meta = file.metadata().map_err(io_err("find its size"))?;
        if !meta.is_file() {
            return Err(BlockError::OverlayNotAFile {
                path: path.to_path_buf(),
            });
        }
        backend::lock(&file, false, path).map_err(|e| match e {
            BlockError::Locked { path } => BlockError::OverlayLocked { path },
            e => e,
        })?;
        // Whoever holds the lock decides: an empty file (just created, here or by an Ember that
        // lost the race for the lock) is made an overlay, anything else must already be one.
        let len = file.metadata().map_err(io_err("find its size"))?.len();
        let mut map = AllocationMap::new(geometry.blocks);
        if len == 0 {
            let header = Header {
                geometry,
                fingerprint: fingerprint(base, base_path, disk_size)?,
                base_path: std::path::absolute(base_path)
                    .unwrap_or_else(|_| base_path.to_path_buf())
                    .into_os_string()
                    .into_vec(),
            };
            file.write_all_at(&header.encode(), 0)
                .map_err(io_err("write its header"))?;
            // The checks above made file_len() addressable.
            file.set_len(geometry.file_len().unwrap_or(0))
                .map_err(io_err("size it"))?;
            file.sync_all().map_err(io_err("sync its header"))?;
            if created {
                sync_parent(path);
            }
        } else {
            check_existing(&file, path, len, base, base_path, geometry)?;
            load_map(&file, path, &geometry, &mut map)?;
        }
        Ok(Overlay {
            file,
            path: Some(path.to_path_buf()),
            geometry,
            data_offset: geometry.data_offset,
            mutable: Mutex::new(Mutable {
                map,
                block: vec![0; OVERLAY_BLOCK as usize],
            }),
        })
    }

    /// An anonymous overlay in `$TMPDIR`, gone with Ember.
    pub(super) fn tmp(disk_size: u64) -> Result<Self, BlockError> {
        let dir = std::env::temp_dir();
        let tmp_err = |source| BlockError::OverlayTmp {
            dir: dir.clone(),
            source,
        };
        let geometry = Geometry::checked(disk_size, &dir)?;
        // O_EXCL: it can never be given a name (linkat) either.
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE | libc::O_EXCL)
            .open(&dir)
        {
            Ok(f) => f,
            // A file system without O_TMPFILE: a file that has a name only for a moment.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
                ) =>
            {
                unlinked_file(&dir).map_err(tmp_err)?
            }
            Err(e) => return Err(tmp_err(e)),
        };
        // No lock: nothing else can open a file without a name (but through /proc, as root).
        file.set_len(disk_size).map_err(tmp_err)?;
        Ok(Overlay {
            file,
            path: None,
            geometry,
            data_offset: 0,
            mutable: Mutex::new(Mutable {
                map: AllocationMap::new(geometry.blocks),
                block: vec![0; OVERLAY_BLOCK as usize],
            }),
        })
    }

    /// The overlay's path; None for `overlay=tmp`.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Blocks the guest has written (or zeroed), of OVERLAY_BLOCK bytes.
    pub fn allocated_blocks(&self) -> u64 {
        self.lock().map.allocated_blocks()
    }

    #[cfg(test)]
    pub(crate) fn file_for_tests(&self) -> &File {
        &self.file
    }

    fn lock(&self) -> MutexGuard<'_, Mutable> {
        self.mutable.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads `iovs` from `offset` on the disk: each run of blocks from the overlay or the base,
    /// whichever holds it. The caller checked the range is on the disk. Returns the bytes read.
    ///
    /// # Safety
    /// As for `backend::transfer_all`: every iovec must be valid for writes for the whole call.
    pub(super) unsafe fn read(
        &self,
        base: &File,
        iovs: &mut [libc::iovec],
        offset: u64,
    ) -> io::Result<u64> {
        let total = iovs_len(iovs);
        if total == 0 {
            return Ok(0);
        }
        let m = self.lock();
        let end = offset + total;
        let last = (end - 1) / OVERLAY_BLOCK;
        let mut pieces = Vec::new();
        let mut done = 0u64;
        while done < total {
            let at = offset + done;
            let (ours, blocks) = m.map.run(at / OVERLAY_BLOCK, last + 1);
            let run_end = ((at / OVERLAY_BLOCK + blocks) * OVERLAY_BLOCK).min(end);
            let len = run_end - at;
            let (file, file_offset) = if ours {
                (&self.file, self.data_offset + at)
            } else {
                (base, at)
            };
            // SAFETY: pieces of the caller's iovecs, so as valid as they are.
            unsafe {
                if len == total {
                    // All from one file: the caller's iovecs as they are.
                    backend::transfer_all(file, iovs, file_offset, Direction::ToGuest)?;
                } else {
                    sub_iovs(iovs, done, len, &mut pieces);
                    backend::transfer_all(file, &mut pieces, file_offset, Direction::ToGuest)?;
                }
            }
            done += len;
        }
        Ok(total)
    }

    /// Writes `iovs` at `offset` into the overlay, first copying up from the base the blocks the
    /// write covers only in part and that are not the overlay's yet. Returns the bytes written.
    ///
    /// # Safety
    /// As for `backend::transfer_all`: every iovec must be valid for reads for the whole call.
    pub(super) unsafe fn write(
        &self,
        base: &File,
        iovs: &mut [libc::iovec],
        offset: u64,
    ) -> io::Result<u64> {
        let total = iovs_len(iovs);
        if total == 0 {
            return Ok(0);
        }
        let mut m = self.lock();
        let (first, end_block) = self.copy_up_edges(&mut m, base, offset, total)?;
        // SAFETY: the caller's iovecs, as the caller vouches.
        unsafe {
            backend::transfer_all(
                &self.file,
                iovs,
                self.data_offset + offset,
                Direction::ToDisk,
            )?
        };
        // Only now: until the data is there, the blocks are still the base's.
        m.map.set(first, end_block);
        Ok(total)
    }

    /// Zeroes `len` bytes at `offset` (DISCARD and WRITE_ZEROES both): the base's bytes there are
    /// never seen again. Holes where the file system has them (`unmap`), zeros written otherwise.
    pub(super) fn zero(&self, base: &File, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut m = self.lock();
        let (first, end_block) = self.copy_up_edges(&mut m, base, offset, len)?;
        let at = self.data_offset + offset;
        let punched = unmap && backend::punch_hole(&self.file, at, len).is_ok();
        if !punched {
            backend::write_zeroes(&self.file, at, len)?;
        }
        m.map.set(first, end_block);
        Ok(())
    }

    /// Copies up from the base the first and last block of `offset..offset + len` where the range
    /// covers them only in part and they are not the overlay's yet. Returns the range's blocks.
    fn copy_up_edges(
        &self,
        m: &mut Mutable,
        base: &File,
        offset: u64,
        len: u64,
    ) -> io::Result<(u64, u64)> {
        let end = offset + len;
        let first = offset / OVERLAY_BLOCK;
        let last = (end - 1) / OVERLAY_BLOCK;
        for b in [first, last] {
            let (start, stop) = (b * OVERLAY_BLOCK, self.geometry.block_end(b));
            let whole = offset <= start && end >= stop;
            // When first == last the second turn finds the block the overlay's already.
            if whole || m.map.get(b) {
                continue;
            }
            let n = (stop - start) as usize;
            let Mutable { map, block } = m;
            base.read_exact_at(&mut block[..n], start)?;
            self.file
                .write_all_at(&block[..n], self.data_offset + start)?;
            // Set now, not after the guest's data: the block holds what it read as, so it is the
            // overlay's whether or not the rest of the request succeeds.
            map.set(b, b + 1);
        }
        Ok((first, last + 1))
    }

    /// Makes everything written so far durable: the data first, then the map that points at it.
    /// For tmp, nothing.
    pub(super) fn flush(&self) -> io::Result<()> {
        if self.path.is_none() {
            return Ok(());
        }
        let mut m = self.lock();
        self.file.sync_data()?;
        if m.map.dirty.is_empty() {
            return Ok(());
        }
        let pages: Vec<usize> = m.map.dirty.iter().copied().collect();
        for page in pages {
            let bytes = m.map.page_bytes(page);
            self.file
                .write_all_at(&bytes, HEADER_LEN + (page * MAP_PAGE) as u64)?;
            // Clean only once written: a failed FLUSH leaves the rest for the next.
            m.map.dirty.remove(&page);
        }
        self.file.sync_data()
    }
}

impl Overlay {
    /// Writes what the guest sees of this overlay now into a new overlay file at `to` (which
    /// must not exist): a header over `base`, the allocation map, and the written blocks only,
    /// so the copy is as sparse as the guest's writes. Holds the overlay's lock throughout: no
    /// write lands half in the copy. A tmp overlay is captured the same way, which is how a
    /// snapshot keeps the disk of a VM whose overlay has no name.
    pub(super) fn capture(
        &self,
        base: &File,
        base_path: &Path,
        to: &Path,
    ) -> Result<(), BlockError> {
        let g = self.geometry;
        let m = self.lock();
        let io_err = |what: &'static str| {
            let path = to.to_path_buf();
            move |source| BlockError::OverlayIo { path, what, source }
        };
        let out = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(to)
            .map_err(|source| BlockError::OverlayOpen {
                path: to.to_path_buf(),
                source,
            })?;
        let written = (|| {
            let header = Header {
                geometry: g,
                fingerprint: fingerprint(base, base_path, g.disk_size)?,
                base_path: std::path::absolute(base_path)
                    .unwrap_or_else(|_| base_path.to_path_buf())
                    .into_os_string()
                    .into_vec(),
            };
            out.write_all_at(&header.encode(), 0)
                .map_err(io_err("write its header"))?;
            out.set_len(g.file_len().unwrap_or(0))
                .map_err(io_err("size it"))?;
            for page in 0..m.map.pages.len() {
                if m.map.pages[page].is_some() {
                    out.write_all_at(
                        &m.map.page_bytes(page),
                        HEADER_LEN + (page * MAP_PAGE) as u64,
                    )
                    .map_err(io_err("write its allocation map"))?;
                }
            }
            copy_data(
                &self.file,
                self.data_offset,
                g.disk_size,
                &out,
                g.data_offset,
            )
            .map_err(io_err("copy the written blocks"))?;
            out.sync_all().map_err(io_err("sync it"))
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(to);
        }
        written
    }

    /// A private overlay that starts as the captured overlay `from` (see [`Overlay::capture`]):
    /// an unnamed file in `$TMPDIR` holding a sparse copy of it, checked against `base` like any
    /// overlay file. `from` is only read, so any number of VMs start from one capture and none
    /// sees another's writes.
    pub(super) fn private_copy(
        from: &Path,
        base: &File,
        base_path: &Path,
        disk_size: u64,
    ) -> Result<Self, BlockError> {
        let geometry = Geometry::checked(disk_size, from)?;
        let src = File::open(from).map_err(|source| BlockError::OverlayOpen {
            path: from.to_path_buf(),
            source,
        })?;
        let io_err = |what: &'static str| {
            let path = from.to_path_buf();
            move |source| BlockError::OverlayIo { path, what, source }
        };
        let len = src.metadata().map_err(io_err("find its size"))?.len();
        check_existing(&src, from, len, base, base_path, geometry)?;
        let tmp = Self::tmp(disk_size)?;
        let file = tmp.file;
        file.set_len(len).map_err(io_err("size its copy"))?;
        copy_data(&src, 0, len, &file, 0).map_err(io_err("copy it"))?;
        let mut map = AllocationMap::new(geometry.blocks);
        load_map(&file, from, &geometry, &mut map)?;
        Ok(Overlay {
            file,
            path: None,
            geometry,
            data_offset: geometry.data_offset,
            mutable: Mutex::new(Mutable {
                map,
                block: vec![0; OVERLAY_BLOCK as usize],
            }),
        })
    }
}

/// Copies the data of `src` in `from..from + len` to `dst` at `to..`, skipping holes
/// (SEEK_DATA/SEEK_HOLE), with copy_file_range (which may share the blocks, on file systems
/// that can) and plain reads and writes where that is not possible.
fn copy_data(src: &File, from: u64, len: u64, dst: &File, to: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let end = from.saturating_add(len);
    let seek = |off: u64, whence| {
        // SAFETY: lseek on a descriptor this function borrows.
        let r = unsafe { libc::lseek(src.as_raw_fd(), off as libc::off_t, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data past `off`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(end)
            } else {
                Err(e)
            };
        }
        Ok((r as u64).min(end))
    };
    let mut at = from;
    while at < end {
        let data = seek(at, libc::SEEK_DATA)?;
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.max(data);
        copy_range(src, data, dst, to + (data - from), hole - data)?;
        at = hole;
    }
    Ok(())
}

fn copy_range(
    src: &File,
    mut off_in: u64,
    dst: &File,
    mut off_out: u64,
    mut len: u64,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    while len > 0 {
        let (mut i, mut o) = (off_in as libc::loff_t, off_out as libc::loff_t);
        // SAFETY: both descriptors are borrowed for the call; the offsets are locals.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut i,
                dst.as_raw_fd(),
                &mut o,
                len as usize,
                0,
            )
        };
        if n > 0 {
            let n = n as u64;
            (off_in, off_out, len) = (off_in + n, off_out + n, len - n);
            continue;
        }
        let e = io::Error::last_os_error();
        match (n, e.raw_os_error()) {
            (0, _) => return Err(io::ErrorKind::UnexpectedEof.into()),
            (_, Some(libc::EINTR)) => continue,
            // Across file systems on old kernels, or a kernel or file system without it.
            (_, Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)) => break,
            _ => return Err(e),
        }
    }
    let mut buf = vec![0u8; (len.min(1 << 20)) as usize];
    while len > 0 {
        let n = len.min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], off_in)?;
        dst.write_all_at(&buf[..n], off_out)?;
        (off_in, off_out, len) = (off_in + n as u64, off_out + n as u64, len - n as u64);
    }
    Ok(())
}

/// A new file in `dir`, already unlinked.
fn unlinked_file(dir: &Path) -> io::Result<File> {
    for attempt in 0..100u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = dir.join(format!(
            ".ember-overlay-{}-{nanos}-{attempt}",
            std::process::id()
        ));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => {
                std::fs::remove_file(&path)?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::ErrorKind::AlreadyExists.into())
}

/// A new file's name is durable only once its directory is synced; without it a crash could lose
/// an overlay the guest had flushed writes into.
fn sync_parent(path: &Path) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Err(e) = File::open(parent).and_then(|d| d.sync_all()) {
        log::warn!(
            "cannot sync directory {} after creating overlay {}: {e}",
            parent.display(),
            path.display()
        );
    }
}

fn check_existing(
    file: &File,
    path: &Path,
    len: u64,
    base: &File,
    base_path: &Path,
    geometry: Geometry,
) -> Result<(), BlockError> {
    let not_overlay = |reason| BlockError::NotAnOverlay {
        path: path.to_path_buf(),
        reason,
    };
    if len < HEADER_LEN {
        return Err(not_overlay("it is shorter than an overlay's header"));
    }
    let mut h = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut h, 0)
        .map_err(|source| BlockError::OverlayIo {
            path: path.to_path_buf(),
            what: "read its header",
            source,
        })?;
    let header = Header::decode(&h).map_err(|e| match e {
        HeaderError::NotAnOverlay(reason) => not_overlay(reason),
        HeaderError::Version(version) => BlockError::OverlayVersion {
            path: path.to_path_buf(),
            version,
        },
        HeaderError::Damaged(reason) => BlockError::OverlayDamaged {
            path: path.to_path_buf(),
            reason,
        },
    })?;
    let wrong_base = |what: String| BlockError::WrongBase {
        overlay: path.to_path_buf(),
        base: base_path.to_path_buf(),
        made_over: PathBuf::from(OsStr::from_bytes(&header.base_path)),
        what,
    };
    if header.geometry.disk_size != geometry.disk_size {
        return Err(wrong_base(format!(
            "that base was {} bytes, {} is {}",
            header.geometry.disk_size,
            base_path.display(),
            geometry.disk_size
        )));
    }
    if header.fingerprint != fingerprint(base, base_path, geometry.disk_size)? {
        return Err(wrong_base(format!(
            "{} has that base's size but other bytes in its first or last MiB",
            base_path.display()
        )));
    }
    match geometry.file_len() {
        Some(need) if len >= need => Ok(()),
        need => Err(BlockError::OverlayDamaged {
            path: path.to_path_buf(),
            reason: format!(
                "it is cut short: {len} bytes, {} expected",
                need.unwrap_or(u64::MAX)
            ),
        }),
    }
}

fn load_map(
    file: &File,
    path: &Path,
    geometry: &Geometry,
    map: &mut AllocationMap,
) -> Result<(), BlockError> {
    // Enough pages for every block (the map's length may round past them).
    let pages = map.pages.len();
    let mut chunk = vec![0u8; 64 * MAP_PAGE];
    let mut page = 0;
    while page < pages {
        let n = (pages - page).min(64);
        let buf = &mut chunk[..n * MAP_PAGE];
        file.read_exact_at(buf, HEADER_LEN + (page * MAP_PAGE) as u64)
            .map_err(|source| BlockError::OverlayIo {
                path: path.to_path_buf(),
                what: "read its allocation map",
                source,
            })?;
        for (i, bytes) in buf.chunks_exact(MAP_PAGE).enumerate() {
            map.load_page(page + i, bytes);
        }
        page += n;
    }
    debug_assert!(pages as u64 * MAP_PAGE as u64 <= geometry.map_len);
    Ok(())
}

fn iovs_len(iovs: &[libc::iovec]) -> u64 {
    iovs.iter().map(|i| i.iov_len as u64).sum()
}

/// The iovecs for bytes `skip..skip + len` of `iovs` (which hold at least that many), into `out`.
fn sub_iovs(iovs: &[libc::iovec], skip: u64, len: u64, out: &mut Vec<libc::iovec>) {
    out.clear();
    let end = skip + len;
    let mut at = 0u64;
    for iov in iovs {
        let l = iov.iov_len as u64;
        let (from, to) = (skip.max(at), end.min(at + l));
        if from < to {
            out.push(libc::iovec {
                // Inside the iovec's own buffer.
                iov_base: iov
                    .iov_base
                    .cast::<u8>()
                    .wrapping_add((from - at) as usize)
                    .cast(),
                iov_len: (to - from) as usize,
            });
        }
        at += l;
        if at >= end {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_puts_data_after_the_map_on_a_mib_boundary() {
        let g = Geometry::for_disk(64 << 20).unwrap();
        assert_eq!(g.blocks, 16384);
        assert_eq!(g.map_len, 4096);
        assert_eq!(g.data_offset, 1 << 20);
        // 1 TiB: 2^28 blocks, a 32 MiB map.
        let g = Geometry::for_disk(1 << 40).unwrap();
        assert_eq!(g.map_len, 32 << 20);
        assert_eq!(g.data_offset, 33 << 20);
        // A disk of whole sectors but not whole blocks: its last block is short.
        let g = Geometry::for_disk(4096 + 512).unwrap();
        assert_eq!((g.blocks, g.block_end(1)), (2, 4608));
        assert!(Geometry::for_disk(u64::MAX - 512).is_none());
        assert!(Geometry::for_disk(i64::MAX as u64).is_none());
    }

    #[test]
    fn map_runs_and_sets() {
        let mut m = AllocationMap::new(3 * BLOCKS_PER_PAGE);
        assert_eq!(m.run(0, 3 * BLOCKS_PER_PAGE), (false, 3 * BLOCKS_PER_PAGE));
        m.set(5, 9);
        m.set(BLOCKS_PER_PAGE + 1, BLOCKS_PER_PAGE + 2);
        assert_eq!(m.run(0, 100), (false, 5));
        assert_eq!(m.run(5, 100), (true, 4));
        assert_eq!(m.run(9, 20), (false, 11));
        assert_eq!(
            m.run(9, 3 * BLOCKS_PER_PAGE),
            (false, BLOCKS_PER_PAGE + 1 - 9)
        );
        assert_eq!(m.dirty.iter().copied().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(m.allocated_blocks(), 5);
        // Bit b % 8 of byte b / 8.
        let bytes = m.page_bytes(0);
        assert_eq!(bytes[0], 0b1110_0000);
        assert_eq!(bytes[1], 0b0000_0001);
        let mut again = AllocationMap::new(3 * BLOCKS_PER_PAGE);
        again.load_page(0, &bytes);
        again.load_page(2, &[0; MAP_PAGE]);
        assert!(again.pages[2].is_none(), "an empty page is not kept");
        assert_eq!(again.run(5, 100), (true, 4));
        // Setting out of range (never asked for: requests are checked) changes nothing.
        m.set(3 * BLOCKS_PER_PAGE, 3 * BLOCKS_PER_PAGE + 1);
        assert_eq!(m.allocated_blocks(), 5);
    }

    #[test]
    fn header_round_trips_and_refuses_damage() {
        let header = Header {
            geometry: Geometry::for_disk(1 << 30).unwrap(),
            fingerprint: 42,
            base_path: b"/images/base.img".to_vec(),
        };
        let bytes = header.encode();
        let back = Header::decode(&bytes).ok().unwrap();
        assert_eq!(back.geometry, header.geometry);
        assert_eq!(
            (back.fingerprint, back.base_path.as_slice()),
            (42, &b"/images/base.img"[..])
        );
        // Sealed: the magic and checksum pass, so the version is what is refused.
        let mut sealed = vec![0u8; 10];
        seal_header(&mut sealed);
        assert!(matches!(
            Header::decode(sealed.as_slice().try_into().unwrap()),
            Err(HeaderError::Version(0))
        ));
        let mut flipped = bytes;
        flipped[20] ^= 1;
        assert!(matches!(
            Header::decode(&flipped),
            Err(HeaderError::Damaged(_))
        ));
        let mut other = bytes;
        other[8] = 2;
        assert!(matches!(
            Header::decode(&other),
            Err(HeaderError::Version(2))
        ));
        let mut junk = bytes;
        junk[0] = b'X';
        assert!(matches!(
            Header::decode(&junk),
            Err(HeaderError::NotAnOverlay(_))
        ));
    }

    #[test]
    fn sub_iovs_cut_inside_and_across_iovecs() {
        let mut buf = [0u8; 64];
        let p = buf.as_mut_ptr();
        let iov = |o: usize, l: usize| libc::iovec {
            iov_base: p.wrapping_add(o).cast(),
            iov_len: l,
        };
        let iovs = [iov(0, 10), iov(10, 20), iov(30, 34)];
        let mut out = Vec::new();
        sub_iovs(&iovs, 5, 30, &mut out);
        let got: Vec<(usize, usize)> = out
            .iter()
            .map(|i| (i.iov_base as usize - p as usize, i.iov_len))
            .collect();
        assert_eq!(got, vec![(5, 5), (10, 20), (30, 5)]);
        sub_iovs(&iovs, 30, 34, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].iov_len, 34);
    }
}

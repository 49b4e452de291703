//! Guest memory in a file, for snapshots: written once from a paused VM, then mapped (never read)
//! by every VM restored from it.
//!
//! The file holds the guest's RAM regions one after the other, at the offsets `MemoryLayout`
//! records. Pages that are all zeros are not written: the file is sparse, so an idle 128 MiB
//! guest costs the disk what it really used, and the holes read back as zeros. A restored VM maps
//! the file `MAP_PRIVATE`: the pages it only reads are the page cache's, shared by every clone of
//! the same snapshot, and a page it writes becomes its own copy; the file never changes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("guest memory file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "guest memory file {} is {found} bytes; the snapshot's guest has {expected} bytes of RAM",
        path.display()
    )]
    WrongSize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("guest memory file {}: cannot map it: {reason}", path.display())]
    Map { path: PathBuf, reason: String },
}

/// One RAM region: where it sits in the guest and in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    pub regions: Vec<RegionLayout>,
}

impl MemoryLayout {
    pub fn total(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }
}

fn is_zero(page: &[u8]) -> bool {
    // Eight bytes at a time; the compiler vectorises this.
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
}

/// Writes `mem` to a new file at `path` (refusing to overwrite: a snapshot's memory file may be
/// mapped by running clones). The VM must be paused.
pub fn write(mem: &GuestMemoryMmap, path: &Path) -> Result<MemoryLayout, MemoryFileError> {
    let io_err = |source| MemoryFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err)?;
    let mut layout = MemoryLayout {
        regions: Vec::new(),
    };
    let mut offset = 0u64;
    for region in GuestMemoryBackend::iter(mem) {
        let len = region.len();
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| MemoryFileError::Map {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        // SAFETY: the region is mapped for `len` bytes for as long as `mem` lives, and the VM is
        // paused, so nothing writes it while it is read.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len as usize) };
        // Runs of non-zero pages, each written with one call.
        let mut run_start: Option<usize> = None;
        for (i, page) in bytes.chunks(PAGE).enumerate() {
            let at = i * PAGE;
            match (is_zero(page), run_start) {
                (false, None) => run_start = Some(at),
                (true, Some(start)) => {
                    file.write_all_at(&bytes[start..at], offset + start as u64)
                        .map_err(io_err)?;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run_start {
            file.write_all_at(&bytes[start..], offset + start as u64)
                .map_err(io_err)?;
        }
        layout.regions.push(RegionLayout {
            guest_addr: region.start_addr().0,
            len,
            file_offset: offset,
        });
        offset += len;
    }
    file.set_len(offset).map_err(io_err)?;
    Ok(layout)
}

/// Maps the file at `path` as guest memory laid out as `layout`, privately: the guest's writes
/// stay in this process. With `prefault`, every page is mapped now (read from the page cache,
/// shared with every other mapping of the file) rather than at the guest's first touch.
pub fn map(
    path: &Path,
    layout: &MemoryLayout,
    prefault: bool,
) -> Result<GuestMemoryMmap, MemoryFileError> {
    let io_err = |source| MemoryFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let map_err = |reason: String| MemoryFileError::Map {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(io_err)?;
    let found = file.metadata().map_err(io_err)?.len();
    if found != layout.total() {
        return Err(MemoryFileError::WrongSize {
            path: path.to_path_buf(),
            found,
            expected: layout.total(),
        });
    }
    let file = std::sync::Arc::new(file);
    let mut regions = Vec::with_capacity(layout.regions.len());
    for r in &layout.regions {
        let len =
            usize::try_from(r.len).map_err(|_| map_err(format!("region of {} bytes", r.len)))?;
        // Populating a private writable mapping would copy every page (the kernel breaks
        // copy-on-write for it); populated read-only and made writable after, the pages stay the
        // page cache's until the guest writes one.
        let (prot, populate) = if prefault {
            (libc::PROT_READ, libc::MAP_POPULATE)
        } else {
            (libc::PROT_READ | libc::PROT_WRITE, 0)
        };
        let mapping = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
            .with_mmap_prot(prot)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE | populate)
            .build()
            .map_err(|e| map_err(e.to_string()))?;
        if prefault {
            // SAFETY: the range is exactly the mapping just made, which this region owns.
            let r = unsafe {
                libc::mprotect(
                    mapping.as_ptr().cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            if r != 0 {
                return Err(map_err(format!("mprotect: {}", io::Error::last_os_error())));
            }
        }
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| map_err(format!("region at {:#x} wraps around", r.guest_addr)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ember-memfile-{}-{name}", std::process::id()))
    }

    #[test]
    fn what_is_written_maps_back_and_writes_stay_private() {
        let path = temp_path("roundtrip");
        let _ = std::fs::remove_file(&path);
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 64 << 10),
        ])
        .unwrap();
        mem.write_slice(b"first page", GuestAddress(0x10)).unwrap();
        mem.write_slice(b"middle", GuestAddress(0x8_0000)).unwrap();
        mem.write_slice(b"high", GuestAddress((1 << 32) + 0xfff0))
            .unwrap();
        let layout = write(&mem, &path).unwrap();
        assert_eq!(layout.total(), (1 << 20) + (64 << 10));
        // Zero pages are holes: the file uses a few pages of disk, not 1 MiB.
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&path).unwrap().blocks();
        assert!(blocks * 512 < 256 << 10, "{blocks} blocks");
        assert!(
            write(&mem, &path).is_err(),
            "an existing file is not overwritten"
        );

        let a = map(&path, &layout, false).unwrap();
        let b = map(&path, &layout, true).unwrap();
        let mut buf = [0u8; 10];
        a.read_slice(&mut buf, GuestAddress(0x10)).unwrap();
        assert_eq!(&buf, b"first page");
        let mut buf = [0u8; 4];
        a.read_slice(&mut buf, GuestAddress((1 << 32) + 0xfff0))
            .unwrap();
        assert_eq!(&buf, b"high");
        // One clone's write is its own, prefaulted or not.
        a.write_slice(b"CLONE A", GuestAddress(0x8_0000)).unwrap();
        b.write_slice(b"CLONE B", GuestAddress(0x9_0000)).unwrap();
        let mut buf = [0u8; 7];
        a.read_slice(&mut buf, GuestAddress(0x9_0000)).unwrap();
        assert_eq!(buf, [0u8; 7]);
        let mut buf = [0u8; 6];
        b.read_slice(&mut buf, GuestAddress(0x8_0000)).unwrap();
        assert_eq!(&buf, b"middle");
        drop((a, b));
        let mut buf = [0u8; 6];
        let file = File::open(&path).unwrap();
        file.read_exact_at(&mut buf, 0x8_0000).unwrap();
        assert_eq!(&buf, b"middle", "the file is never written by a clone");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_memory_file_of_the_wrong_size_is_refused() {
        let path = temp_path("size");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let layout = MemoryLayout {
            regions: vec![RegionLayout {
                guest_addr: 0,
                len: 1 << 20,
                file_offset: 0,
            }],
        };
        let err = map(&path, &layout, false).unwrap_err();
        assert!(
            err.to_string()
                .contains("is 8192 bytes; the snapshot's guest has 1048576"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
    }
}

//! The kernel and initramfs loaders on arbitrary files (the input is the file, so ELF and bzImage
//! seeds work as they are). Besides not panicking: a kernel that loads ends inside guest RAM, and
//! an initramfs that loads lies inside RAM, above the kernel and below the MMIO hole.
#![no_main]

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::OnceLock;

use ember_boot::kernel::{load_initramfs, load_kernel, EntryKind, LoadedKernel};
use ember_boot::layout;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM_SIZE: u64 = 64 << 20;

fn memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(MEM_SIZE)
            .into_iter()
            .map(|(b, l)| (GuestAddress(b), l as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    })
}

/// An anonymous file holding `bytes`, positioned at its start like a freshly opened one.
fn file_of(bytes: &[u8]) -> File {
    // SAFETY: memfd_create with a valid name; the fd is owned by the File alone.
    let mut f = unsafe {
        let fd = libc::memfd_create(c"ember-fuzz".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        File::from_raw_fd(fd)
    };
    f.write_all(bytes).unwrap();
    use std::io::Seek;
    f.rewind().unwrap();
    f
}

fuzz_target!(|data: &[u8]| {
    let mem = memory();
    let ram_end = mem.last_addr().raw_value() + 1;
    let loaded = match load_kernel(mem, &mut file_of(data)) {
        Ok(k) => {
            // (An entry point outside RAM is not checked: the guest faults, Ember does not.)
            assert!(
                k.kernel_end.raw_value() <= ram_end,
                "kernel end {:#x} past RAM",
                k.kernel_end.raw_value()
            );
            k
        }
        Err(e) => {
            drop(e.to_string());
            // Place the initramfs after a made-up kernel instead.
            let end = data.get(..4).map_or(0, |b| {
                u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            });
            LoadedKernel {
                entry: GuestAddress(layout::HIMEM_START),
                kind: EntryKind::Linux64,
                setup_header: None,
                kernel_end: GuestAddress(end),
            }
        }
    };
    match load_initramfs(mem, &mut file_of(data), &loaded, MEM_SIZE) {
        Ok(info) => {
            assert_eq!(info.size, data.len() as u64);
            assert!(info.addr.raw_value() >= loaded.kernel_end.raw_value());
            let end = info.addr.raw_value() + info.size;
            assert!(end <= ram_end.min(layout::MMIO_HOLE_START), "{end:#x}");
        }
        Err(e) => drop(e.to_string()),
    }
});

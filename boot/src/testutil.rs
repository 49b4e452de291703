//! Test helpers: temporary files, guest memory, and tiny ELF kernels built in memory.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use vm_memory::{GuestAddress, GuestMemoryMmap};

pub type Mem = GuestMemoryMmap<()>;

/// Guest memory laid out as Ember lays it out: split around the MMIO hole.
pub fn guest_memory(size: u64) -> Mem {
    let ranges: Vec<(GuestAddress, usize)> = crate::layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    Mem::from_ranges(&ranges).unwrap()
}

/// A file in the temp directory, removed on drop.
pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    pub fn new(name: &str, contents: &[u8]) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("ember-boot-test-{}-{n}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(contents).unwrap();
        TempFile { path }
    }

    pub fn open(&self) -> File {
        File::open(&self.path).unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub const EM_X86_64: u16 = 62;
pub const EM_AARCH64: u16 = 183;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// A minimal ELF64 executable: one PT_LOAD segment with `code` at physical `load_addr`, entry at
/// `load_addr`, and, with `pvh_entry`, a PT_NOTE holding a Xen PHYS32_ENTRY note.
pub fn elf(machine: u16, load_addr: u64, code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let phnum = if pvh_entry.is_some() { 2 } else { 1 };
    let note_off = EHDR + phnum * PHDR;
    let mut note = Vec::new();
    if let Some(entry) = pvh_entry {
        // An unrelated note first, as real kernels have several.
        note.extend_from_slice(&4u32.to_le_bytes()); // namesz
        note.extend_from_slice(&4u32.to_le_bytes()); // descsz
        note.extend_from_slice(&1u32.to_le_bytes()); // type
        note.extend_from_slice(b"GNU\0");
        note.extend_from_slice(&[0xaa; 4]);
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&entry.to_le_bytes());
    }
    let code_off = (note_off + note.len()).next_multiple_of(16);

    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, SysV
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&machine.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&load_addr.to_le_bytes()); // e_entry
    f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(EHDR as u16).to_le_bytes());
    f.extend_from_slice(&(PHDR as u16).to_le_bytes());
    f.extend_from_slice(&(phnum as u16).to_le_bytes());
    f.extend_from_slice(&[0; 6]); // no sections
    assert_eq!(f.len(), EHDR);

    let mut phdr = |kind: u32, flags: u32, off: usize, addr: u64, size: usize, align: u64| {
        f.extend_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&flags.to_le_bytes());
        f.extend_from_slice(&(off as u64).to_le_bytes());
        f.extend_from_slice(&addr.to_le_bytes()); // vaddr
        f.extend_from_slice(&addr.to_le_bytes()); // paddr
        f.extend_from_slice(&(size as u64).to_le_bytes()); // filesz
        f.extend_from_slice(&(size as u64).to_le_bytes()); // memsz
        f.extend_from_slice(&align.to_le_bytes());
    };
    phdr(1, 5, code_off, load_addr, code.len(), 16); // PT_LOAD, R+X
    if pvh_entry.is_some() {
        phdr(4, 4, note_off, 0, note.len(), 4); // PT_NOTE
    }
    f.extend_from_slice(&note);
    f.resize(code_off, 0);
    f.extend_from_slice(code);
    f
}

/// Says that a test (or part of one) did not run here and why, in the `SKIPPED name: why` form
/// scripts/test.sh counts. Written to stderr directly: libtest captures `eprintln!` of passing
/// tests, and a skip must show.
pub fn say_skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

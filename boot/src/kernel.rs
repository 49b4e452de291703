//! Kernel and initramfs loading.
//!
//! Three kinds of kernel files are accepted:
//! - an x86_64 ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note: entered through PVH (32-bit protected
//!   mode, see <https://xenbits.xen.org/docs/unstable/misc/pvh.html>);
//! - any other x86_64 ELF (a vmlinux or a freestanding test guest): entered at `e_entry` in long
//!   mode, as the Linux 64-bit boot protocol describes (Documentation/arch/x86/boot.rst, "64-bit
//!   Boot Protocol");
//! - a bzImage: its protected-mode part is loaded at `code32_start` and entered at the 64-bit entry
//!   0x200 bytes in, which needs boot protocol 2.12+ with `XLF_KERNEL_64` (boot.rst, "xloadflags").
//!
//! linux-loader does the copying. Everything it would report poorly (a file cut short, another
//! architecture, a kernel bigger than the guest) is checked here first, so that a user sees what is
//! wrong with their file rather than "Unable to read kernel image".

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use linux_loader::bootparam::{setup_header, XLF_KERNEL_64};
use linux_loader::elf::{
    Elf64_Ehdr, Elf64_Phdr, EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB, EM_X86_64, PT_LOAD, PT_NOTE,
};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{KernelLoader, KernelLoaderResult};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout;

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Offset of the setup header in a bzImage (boot.rst, "The real-mode kernel header").
const BZIMAGE_HEADER_OFFSET: u64 = 0x1f1;
/// "HdrS", the setup header's magic.
const BZIMAGE_MAGIC: u32 = 0x5372_6448;
/// The first protocol version with `xloadflags` (and so with a declared 64-bit entry).
const BZIMAGE_MIN_VERSION: u16 = 0x020c;
const PAGE_SIZE: u64 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot read the kernel image: {0}")]
    Read(#[source] io::Error),
    #[error("the kernel image is empty")]
    Empty,
    #[error("the kernel image is not an x86_64 ELF or bzImage kernel")]
    NotAKernel,
    #[error("the ELF kernel is 32-bit; Ember boots 64-bit (ELFCLASS64) x86_64 kernels")]
    Elf32,
    #[error("the ELF kernel is big-endian; x86_64 kernels are little-endian")]
    ElfBigEndian,
    #[error("the ELF kernel is built for {arch} (e_machine {machine}), not x86_64")]
    WrongArchitecture { machine: u16, arch: &'static str },
    #[error("the ELF kernel is malformed: {0}")]
    MalformedElf(&'static str),
    #[error(
        "the kernel image is truncated: its {what} ends at byte {end} but the file has only {len} bytes"
    )]
    Truncated {
        what: &'static str,
        end: u64,
        len: u64,
    },
    #[error("the ELF kernel has no loadable segment")]
    NoLoadableSegment,
    #[error(
        "the kernel wants to load at {addr:#x}, below {min:#x} where Ember keeps its boot structures"
    )]
    LoadsTooLow { addr: u64, min: u64 },
    #[error(
        "the ELF kernel's entry point {entry:#x} is below {min:#x}, where no kernel is loaded"
    )]
    EntryTooLow { entry: u64, min: u64 },
    #[error(
        "the ELF kernel's {what} {entry:#x} is outside its loadable segments ({start:#x}..{end:#x})"
    )]
    EntryOutsideKernel {
        what: &'static str,
        entry: u64,
        start: u64,
        end: u64,
    },
    #[error(
        "the kernel does not fit in guest memory: it needs {start:#x}..{end:#x}, so at least \
         --memory {needed_mib}M"
    )]
    TooBig {
        start: u64,
        end: u64,
        /// Guest RAM starts at 0, so this is `end` rounded up to whole MiB.
        needed_mib: u64,
    },
    #[error(
        "the kernel wants {start:#x}..{end:#x}, which reaches past {limit:#x} where the MMIO hole \
         starts; Ember loads kernels into the RAM below it, whatever --memory is"
    )]
    BeyondLowMemory { start: u64, end: u64, limit: u64 },
    #[error(
        "the bzImage uses boot protocol {major}.{minor:02}, which has no 64-bit entry point; Ember \
         needs protocol 2.12 or later"
    )]
    OldBootProtocol { major: u8, minor: u8 },
    #[error("the bzImage has no 64-bit entry point (XLF_KERNEL_64 is not set: a 32-bit kernel?)")]
    No64BitEntry,
    #[error("cannot load the kernel: {0}")]
    Load(#[source] linux_loader::loader::Error),
    #[error("cannot read the initramfs: {0}")]
    InitrdRead(#[source] io::Error),
    #[error("the initramfs is empty")]
    InitrdEmpty,
    #[error(
        "the initramfs ({size} bytes) does not fit in guest memory between the kernel end ({low:#x}) \
         and {high:#x}; give the guest more memory"
    )]
    InitrdTooBig { size: u64, low: u64, high: u64 },
}

/// How the vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Long mode, paging on, RSI = zero page (Linux 64-bit boot protocol).
    Linux64,
    /// 32-bit protected mode, paging off, EBX = `hvm_start_info` (PVH).
    Pvh,
}

#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: GuestAddress,
    pub kind: EntryKind,
    /// A bzImage's setup header, to be copied into the zero page.
    pub setup_header: Option<setup_header>,
    /// First byte after everything the kernel occupies (for a bzImage, including the room it
    /// decompresses into: `max(code32_start, pref_address) + init_size`); the initramfs goes
    /// above it.
    pub kernel_end: GuestAddress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdInfo {
    pub addr: GuestAddress,
    pub size: u64,
}

/// The end of RAM below the MMIO hole: where high-placed things must stop.
fn low_ram_end<M: GuestMemoryBackend>(mem: &M) -> u64 {
    let last = mem.last_addr().raw_value().saturating_add(1);
    last.min(layout::MMIO_HOLE_START)
}

fn file_len(kernel: &mut File) -> Result<u64, KernelError> {
    kernel.seek(SeekFrom::End(0)).map_err(KernelError::Read)
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> Result<(), KernelError> {
    file.seek(SeekFrom::Start(offset))
        .map_err(KernelError::Read)?;
    file.read_exact(buf).map_err(KernelError::Read)
}

/// Loads `kernel` into guest memory and says how to enter it.
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut File,
) -> Result<LoadedKernel, KernelError> {
    let len = file_len(kernel)?;
    if len == 0 {
        return Err(KernelError::Empty);
    }
    let mut magic = [0u8; 4];
    if len >= 4 {
        read_at(kernel, 0, &mut magic)?;
    }
    if magic == *b"\x7fELF" {
        return load_elf(mem, kernel, len);
    }
    if is_bzimage(kernel, len)? {
        return load_bzimage(mem, kernel, len);
    }
    Err(KernelError::NotAKernel)
}

fn arch_name(machine: u16) -> &'static str {
    use linux_loader::elf::*;
    match machine {
        EM_386 => "i386",
        EM_ARM => "32-bit ARM",
        EM_AARCH64 => "aarch64",
        EM_RISCV => "RISC-V",
        EM_PPC64 => "ppc64",
        EM_S390 => "s390",
        EM_MIPS => "MIPS",
        _ => "another architecture",
    }
}

/// The physical ranges an ELF kernel's loadable segments occupy.
struct ElfExtent {
    segments: Vec<(u64, u64)>,
    start: u64,
    end: u64,
}

impl ElfExtent {
    /// A vCPU started anywhere else runs whatever the guest memory holds there (zeroes, or
    /// nothing at all outside RAM): a hang or an emulation failure instead of a clear error.
    fn check_entry(&self, what: &'static str, entry: u64) -> Result<(), KernelError> {
        if self.segments.iter().any(|&(s, e)| (s..e).contains(&entry)) {
            Ok(())
        } else {
            Err(KernelError::EntryOutsideKernel {
                what,
                entry,
                start: self.start,
                end: self.end,
            })
        }
    }
}

/// Checks everything about the ELF file that linux-loader would either miss or report vaguely,
/// and returns where its loadable segments go.
fn check_elf<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut File,
    len: u64,
) -> Result<ElfExtent, KernelError> {
    let ehdr_size = std::mem::size_of::<Elf64_Ehdr>() as u64;
    // The class byte sits before anything that differs between 32- and 64-bit headers, so a
    // 32-bit ELF is recognised even when it is shorter than a 64-bit header.
    let mut ident = [0u8; 16];
    if len < ident.len() as u64 {
        return Err(KernelError::Truncated {
            what: "ELF header",
            end: ehdr_size,
            len,
        });
    }
    read_at(kernel, 0, &mut ident)?;
    if ident[EI_CLASS] != ELFCLASS64 {
        return Err(KernelError::Elf32);
    }
    if ident[EI_DATA] != ELFDATA2LSB {
        return Err(KernelError::ElfBigEndian);
    }
    if len < ehdr_size {
        return Err(KernelError::Truncated {
            what: "ELF header",
            end: ehdr_size,
            len,
        });
    }
    let mut ehdr = Elf64_Ehdr::default();
    read_at(kernel, 0, ehdr.as_mut_slice())?;
    if ehdr.e_machine != EM_X86_64 {
        return Err(KernelError::WrongArchitecture {
            machine: ehdr.e_machine,
            arch: arch_name(ehdr.e_machine),
        });
    }
    let phdr_size = std::mem::size_of::<Elf64_Phdr>() as u64;
    if u64::from(ehdr.e_phentsize) != phdr_size {
        return Err(KernelError::MalformedElf("unexpected program header size"));
    }
    let phdrs_end = u64::from(ehdr.e_phnum)
        .checked_mul(phdr_size)
        .and_then(|n| n.checked_add(ehdr.e_phoff))
        .ok_or(KernelError::MalformedElf(
            "program header table out of range",
        ))?;
    if phdrs_end > len {
        return Err(KernelError::Truncated {
            what: "program header table",
            end: phdrs_end,
            len,
        });
    }

    let mut lowest = u64::MAX;
    let mut highest = 0u64;
    let mut segments = Vec::new();
    for i in 0..u64::from(ehdr.e_phnum) {
        let mut phdr = Elf64_Phdr::default();
        read_at(kernel, ehdr.e_phoff + i * phdr_size, phdr.as_mut_slice())?;
        // Any segment linux-loader reads (PT_LOAD, and PT_NOTE for the PVH entry) must be whole.
        let file_end = phdr
            .p_offset
            .checked_add(phdr.p_filesz)
            .ok_or(KernelError::MalformedElf("segment file range overflows"))?;
        if file_end > len && (phdr.p_type == PT_LOAD || phdr.p_type == PT_NOTE) {
            return Err(KernelError::Truncated {
                what: if phdr.p_type == PT_LOAD {
                    "loadable segment"
                } else {
                    "note segment"
                },
                end: file_end,
                len,
            });
        }
        if phdr.p_type != PT_LOAD {
            continue;
        }
        if phdr.p_memsz < phdr.p_filesz {
            return Err(KernelError::MalformedElf(
                "segment is smaller in memory than in the file",
            ));
        }
        if phdr.p_paddr < layout::HIMEM_START {
            return Err(KernelError::LoadsTooLow {
                addr: phdr.p_paddr,
                min: layout::HIMEM_START,
            });
        }
        let mem_end = phdr
            .p_paddr
            .checked_add(phdr.p_memsz)
            .ok_or(KernelError::MalformedElf("segment address range overflows"))?;
        lowest = lowest.min(phdr.p_paddr);
        highest = highest.max(mem_end);
        segments.push((phdr.p_paddr, mem_end));
    }
    if lowest == u64::MAX {
        return Err(KernelError::NoLoadableSegment);
    }
    if ehdr.e_entry < layout::HIMEM_START {
        return Err(KernelError::EntryTooLow {
            entry: ehdr.e_entry,
            min: layout::HIMEM_START,
        });
    }
    check_fits(mem, lowest, highest)?;
    let extent = ElfExtent {
        segments,
        start: lowest,
        end: highest,
    };
    extent.check_entry("entry point", ehdr.e_entry)?;
    Ok(extent)
}

/// Errors unless `start..end` is RAM below the MMIO hole.
fn check_fits<M: GuestMemoryBackend>(mem: &M, start: u64, end: u64) -> Result<(), KernelError> {
    // More guest memory cannot help here: RAM above the hole starts at 4 GiB.
    if end > layout::MMIO_HOLE_START {
        return Err(KernelError::BeyondLowMemory {
            start,
            end,
            limit: layout::MMIO_HOLE_START,
        });
    }
    let fits = end <= low_ram_end(mem)
        && usize::try_from(end - start)
            .map(|n| GuestMemoryBackend::check_range(mem, GuestAddress(start), n))
            .unwrap_or(false);
    if fits {
        Ok(())
    } else {
        Err(KernelError::TooBig {
            start,
            end,
            needed_mib: end.div_ceil(1 << 20),
        })
    }
}

fn load_elf<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut File,
    len: u64,
) -> Result<LoadedKernel, KernelError> {
    let extent = check_elf(mem, kernel, len)?;
    let result: KernelLoaderResult =
        Elf::load(mem, None, kernel, Some(GuestAddress(layout::HIMEM_START)))
            .map_err(KernelError::Load)?;
    let (entry, kind) = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => {
            // The note is only read while loading, so its entry is checked here.
            extent.check_entry("PVH entry point", addr.raw_value())?;
            (addr, EntryKind::Pvh)
        }
        _ => (result.kernel_load, EntryKind::Linux64),
    };
    Ok(LoadedKernel {
        entry,
        kind,
        setup_header: None,
        kernel_end: GuestAddress(extent.end.max(result.kernel_end)),
    })
}

fn read_setup_header(kernel: &mut File) -> Result<setup_header, KernelError> {
    let mut hdr = setup_header::default();
    read_at(kernel, BZIMAGE_HEADER_OFFSET, hdr.as_mut_slice())?;
    Ok(hdr)
}

fn is_bzimage(kernel: &mut File, len: u64) -> Result<bool, KernelError> {
    let hdr_end = BZIMAGE_HEADER_OFFSET + std::mem::size_of::<setup_header>() as u64;
    if len < hdr_end {
        return Ok(false);
    }
    let hdr = read_setup_header(kernel)?;
    Ok(hdr.header == BZIMAGE_MAGIC)
}

fn load_bzimage<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut File,
    len: u64,
) -> Result<LoadedKernel, KernelError> {
    let hdr = read_setup_header(kernel)?;
    let version = hdr.version;
    if version < BZIMAGE_MIN_VERSION {
        return Err(KernelError::OldBootProtocol {
            major: (version >> 8) as u8,
            minor: (version & 0xff) as u8,
        });
    }
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(KernelError::No64BitEntry);
    }
    // boot.rst: "setup_sects ... If this field is 0, the real value is 4", plus the boot sector.
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        u64::from(hdr.setup_sects)
    };
    let setup_size = (setup_sects + 1) * 512;
    // syssize counts the protected-mode code in 16-byte paragraphs (protocol 2.04+).
    let payload_end = setup_size + u64::from(hdr.syssize) * 16;
    if payload_end > len {
        return Err(KernelError::Truncated {
            what: "protected-mode code",
            end: payload_end,
            len,
        });
    }
    let load = u64::from(hdr.code32_start);
    if load < layout::HIMEM_START {
        return Err(KernelError::LoadsTooLow {
            addr: load,
            min: layout::HIMEM_START,
        });
    }
    // The decompressor works in init_size bytes from the kernel's runtime address, which is at
    // least pref_address: that memory must exist, and the initramfs must stay clear of it.
    let runtime_start = load.max(hdr.pref_address);
    let end = (load + (len - setup_size)).max(runtime_start + u64::from(hdr.init_size));
    check_fits(mem, load, end)?;

    let result = BzImage::load(mem, None, kernel, Some(GuestAddress(layout::HIMEM_START)))
        .map_err(KernelError::Load)?;
    Ok(LoadedKernel {
        entry: GuestAddress(result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET),
        kind: EntryKind::Linux64,
        setup_header: result.setup_header,
        kernel_end: GuestAddress(end.max(result.kernel_end)),
    })
}

/// Loads the initramfs as high as the kernel accepts, page aligned, above the kernel.
///
/// `mem_size` is the guest's RAM size; the initramfs stays below both the end of RAM and the MMIO
/// hole, and below the bzImage's `initrd_addr_max` when the kernel declares one.
pub fn load_initramfs<M: GuestMemoryBackend>(
    mem: &M,
    initrd: &mut File,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<InitrdInfo, KernelError> {
    let size = initrd
        .seek(SeekFrom::End(0))
        .map_err(KernelError::InitrdRead)?;
    if size == 0 {
        return Err(KernelError::InitrdEmpty);
    }
    let mut high = mem_size.min(layout::MMIO_HOLE_START).min(low_ram_end(mem));
    if let Some(hdr) = kernel.setup_header {
        // initrd_addr_max is the highest address the last byte may have (boot.rst).
        if hdr.initrd_addr_max != 0 {
            high = high.min(u64::from(hdr.initrd_addr_max) + 1);
        }
    }
    let low = kernel.kernel_end.raw_value().next_multiple_of(PAGE_SIZE);
    let too_big = KernelError::InitrdTooBig { size, low, high };
    let addr = match high.checked_sub(size) {
        Some(top) => top & !(PAGE_SIZE - 1),
        None => return Err(too_big),
    };
    if addr < low {
        return Err(too_big);
    }
    let count = usize::try_from(size).map_err(|_| KernelError::InitrdTooBig { size, low, high })?;
    initrd
        .seek(SeekFrom::Start(0))
        .map_err(KernelError::InitrdRead)?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, count)
        .map_err(|e| KernelError::InitrdRead(io::Error::other(e)))?;
    Ok(InitrdInfo {
        addr: GuestAddress(addr),
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{elf, guest_memory, TempFile, EM_AARCH64, EM_X86_64};
    use std::path::PathBuf;

    const CODE: &[u8] = &[0xf4; 64];

    fn load(bytes: &[u8]) -> Result<LoadedKernel, KernelError> {
        load_with_memory(bytes, 64 << 20)
    }

    fn load_with_memory(bytes: &[u8], mem_size: u64) -> Result<LoadedKernel, KernelError> {
        let mem = guest_memory(mem_size);
        let file = TempFile::new("kernel", bytes);
        load_kernel(&mem, &mut file.open())
    }

    #[test]
    fn elf_without_pvh_note_enters_at_e_entry_in_long_mode() {
        let kernel = load(&elf(EM_X86_64, 0x20_0000, CODE, None)).unwrap();
        assert_eq!(kernel.kind, EntryKind::Linux64);
        assert_eq!(kernel.entry, GuestAddress(0x20_0000));
        assert_eq!(
            kernel.kernel_end,
            GuestAddress(0x20_0000 + CODE.len() as u64)
        );
        assert!(kernel.setup_header.is_none());
    }

    #[test]
    fn elf_code_lands_at_its_physical_address() {
        let code: Vec<u8> = (0..200u8).collect();
        let mem = guest_memory(64 << 20);
        let file = TempFile::new("kernel", &elf(EM_X86_64, 0x10_0000, &code, None));
        load_kernel(&mem, &mut file.open()).unwrap();
        let mut back = vec![0u8; code.len()];
        mem.read_slice(&mut back, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(back, code);
    }

    #[test]
    fn elf_with_pvh_note_enters_through_pvh() {
        let kernel = load(&elf(EM_X86_64, 0x10_0000, CODE, Some(0x10_0020))).unwrap();
        assert_eq!(kernel.kind, EntryKind::Pvh);
        assert_eq!(kernel.entry, GuestAddress(0x10_0020));
    }

    #[test]
    fn empty_file_is_reported_as_empty() {
        assert!(matches!(load(&[]), Err(KernelError::Empty)));
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let err = load(&garbage).unwrap_err();
        assert!(matches!(err, KernelError::NotAKernel));
        assert_eq!(
            err.to_string(),
            "the kernel image is not an x86_64 ELF or bzImage kernel"
        );
        assert!(matches!(load(b"hi"), Err(KernelError::NotAKernel)));
    }

    #[test]
    fn elf_for_aarch64_names_the_architecture() {
        let err = load(&elf(EM_AARCH64, 0x10_0000, CODE, None)).unwrap_err();
        assert!(matches!(
            err,
            KernelError::WrongArchitecture {
                machine: EM_AARCH64,
                arch: "aarch64"
            }
        ));
        assert!(err.to_string().contains("aarch64"), "{err}");
    }

    #[test]
    fn elf32_is_refused() {
        let mut image = elf(EM_X86_64, 0x10_0000, CODE, None);
        image[4] = 1; // ELFCLASS32
        assert!(matches!(load(&image), Err(KernelError::Elf32)));
    }

    #[test]
    fn elf_cut_short_is_truncated_not_partially_loaded() {
        let image = elf(EM_X86_64, 0x10_0000, CODE, None);
        // Cut inside the segment, inside the program headers, inside the ELF header.
        for cut in [image.len() - 10, 64 + 20, 40] {
            match load(&image[..cut]) {
                Err(KernelError::Truncated { len, .. }) => assert_eq!(len, cut as u64),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn elf_with_pvh_note_cut_short_is_truncated() {
        let image = elf(EM_X86_64, 0x10_0000, CODE, Some(0x10_0000));
        // The code follows the note: cut inside the note.
        let cut = 64 + 2 * 56 + 30;
        match load(&image[..cut]) {
            Err(KernelError::Truncated { len, .. }) => assert_eq!(len, cut as u64),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn elf_bigger_than_memory_does_not_fit() {
        // A segment claiming 16 MiB in memory at 1 MiB, in an 8 MiB guest.
        let mut image = elf(EM_X86_64, 0x10_0000, CODE, None);
        let memsz_offset = 64 + 40;
        image[memsz_offset..memsz_offset + 8].copy_from_slice(&(16u64 << 20).to_le_bytes());
        let err = load_with_memory(&image, 8 << 20).unwrap_err();
        assert!(matches!(err, KernelError::TooBig { .. }), "{err:?}");
        assert!(err.to_string().contains("does not fit in guest memory"));
        // 1 MiB + 16 MiB: a guest of 17 MiB holds it (it said "17 MiB from 1 MiB").
        assert!(err.to_string().ends_with("at least --memory 17M"), "{err}");
        assert!(load_with_memory(&image, 17 << 20).is_ok());
    }

    #[test]
    fn elf_loading_below_1mib_is_refused() {
        let err = load(&elf(EM_X86_64, 0x8000, CODE, None)).unwrap_err();
        assert!(matches!(err, KernelError::LoadsTooLow { addr: 0x8000, .. }));
        let mut image = elf(EM_X86_64, 0x10_0000, CODE, None);
        image[24..32].copy_from_slice(&0x7000u64.to_le_bytes()); // e_entry
        assert!(matches!(
            load(&image),
            Err(KernelError::EntryTooLow { entry: 0x7000, .. })
        ));
    }

    #[test]
    fn elf_entry_outside_its_segments_is_refused() {
        // In RAM but past the code: the vCPU would run zeroes.
        let mut image = elf(EM_X86_64, 0x10_0000, CODE, None);
        image[24..32].copy_from_slice(&0x700_0000u64.to_le_bytes()); // e_entry
        let err = load(&image).unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::EntryOutsideKernel {
                    entry: 0x700_0000,
                    start: 0x10_0000,
                    end: 0x10_0040,
                    ..
                }
            ),
            "{err:?}"
        );
        // Beyond guest RAM (and beyond the 4 GiB the page tables map).
        image[24..32].copy_from_slice(&0x8_0000_0000u64.to_le_bytes());
        assert!(matches!(
            load(&image),
            Err(KernelError::EntryOutsideKernel { .. })
        ));
        // One byte past the end of the last segment.
        image[24..32].copy_from_slice(&0x10_0040u64.to_le_bytes());
        assert!(matches!(
            load(&image),
            Err(KernelError::EntryOutsideKernel { .. })
        ));
        let pvh = elf(EM_X86_64, 0x10_0000, CODE, Some(0xdead_0000));
        let err = load(&pvh).unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::EntryOutsideKernel {
                    what: "PVH entry point",
                    entry: 0xdead_0000,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("PVH entry point 0xdead0000"),
            "{err}"
        );
    }

    #[test]
    fn elf_linked_in_or_above_the_mmio_hole_is_not_a_memory_size_problem() {
        // Straddling the hole start, linked at 3.5 GiB, linked above 4 GiB.
        for addr in [0xbfff_ffe0, 0xe000_0000, 0x1_4000_0000] {
            let err = load_with_memory(&elf(EM_X86_64, addr, CODE, None), 6 << 30).unwrap_err();
            assert!(
                matches!(err, KernelError::BeyondLowMemory { start, .. } if start == addr),
                "{addr:#x}: {err:?}"
            );
            assert!(!err.to_string().contains("more memory"), "{err}");
        }
    }

    /// A bzImage-shaped file: boot sector + one setup sector, then `payload`.
    fn fake_bzimage(version: u16, xloadflags: u16, payload: &[u8]) -> Vec<u8> {
        let mut hdr = setup_header {
            setup_sects: 1,
            boot_flag: 0xaa55,
            header: BZIMAGE_MAGIC,
            version,
            loadflags: 1, // LOADED_HIGH
            code32_start: 0x10_0000,
            xloadflags,
            syssize: payload.len().div_ceil(16) as u32,
            init_size: 0x20_0000,
            pref_address: 0x100_0000,
            ..Default::default()
        };
        hdr.cmdline_size = 2047;
        let mut image = vec![0u8; 1024];
        image[0x1f1..0x1f1 + std::mem::size_of::<setup_header>()].copy_from_slice(hdr.as_slice());
        image.extend_from_slice(payload);
        image
    }

    #[test]
    fn bzimage_enters_0x200_into_protected_mode_code() {
        let payload = vec![0x90u8; 4096];
        let kernel = load(&fake_bzimage(0x020f, XLF_KERNEL_64, &payload)).unwrap();
        assert_eq!(kernel.kind, EntryKind::Linux64);
        assert_eq!(kernel.entry, GuestAddress(0x10_0200));
        let hdr = kernel.setup_header.unwrap();
        assert_eq!({ hdr.header }, BZIMAGE_MAGIC);
        // The decompression area (pref_address + init_size) is counted as kernel.
        assert_eq!(kernel.kernel_end, GuestAddress(0x100_0000 + 0x20_0000));
    }

    #[test]
    fn bzimage_without_64bit_entry_is_refused() {
        let payload = vec![0x90u8; 4096];
        assert!(matches!(
            load(&fake_bzimage(0x020f, 0, &payload)),
            Err(KernelError::No64BitEntry)
        ));
        let err = load(&fake_bzimage(0x0204, 0, &payload)).unwrap_err();
        assert!(matches!(
            err,
            KernelError::OldBootProtocol { major: 2, minor: 4 }
        ));
        assert!(err.to_string().contains("2.04"), "{err}");
    }

    #[test]
    fn bzimage_cut_short_is_truncated() {
        let image = fake_bzimage(0x020f, XLF_KERNEL_64, &vec![0x90u8; 4096]);
        let cut = image.len() - 100;
        assert!(matches!(
            load(&image[..cut]),
            Err(KernelError::Truncated { len, .. }) if len == cut as u64
        ));
    }

    #[test]
    fn bzimage_too_big_to_decompress_does_not_fit() {
        // 1 MiB + 16 MiB preferred address + 2 MiB init_size > 8 MiB of RAM.
        let image = fake_bzimage(0x020f, XLF_KERNEL_64, &vec![0x90u8; 4096]);
        assert!(matches!(
            load_with_memory(&image, 8 << 20),
            Err(KernelError::TooBig { .. })
        ));
    }

    fn kit_file(name: &str) -> Option<PathBuf> {
        let home = std::env::var_os("HOME")?;
        let path = PathBuf::from(home).join(".cache/ember/kit").join(name);
        path.exists().then_some(path)
    }

    #[test]
    fn kit_bzimage_loads_with_its_setup_header() {
        let Some(path) = kit_file("bzImage") else {
            crate::testutil::say_skipped(
                "kit_bzimage_loads_with_its_setup_header",
                "no kit ($HOME/.cache/ember/kit/bzImage): run scripts/kit.sh",
            );
            return;
        };
        let mem = guest_memory(256 << 20);
        let kernel = load_kernel(&mem, &mut File::open(&path).unwrap()).unwrap();
        assert_eq!(kernel.kind, EntryKind::Linux64);
        let hdr = kernel.setup_header.expect("a bzImage has a setup header");
        assert_eq!({ hdr.header }, BZIMAGE_MAGIC);
        assert_ne!(hdr.xloadflags & XLF_KERNEL_64, 0);
        assert_eq!(kernel.entry.0, u64::from(hdr.code32_start) + 0x200);
        // What was loaded at code32_start is the file after the setup sectors.
        let setup_size = (u64::from(hdr.setup_sects) + 1) * 512;
        let mut expected = vec![0u8; 256];
        read_at(&mut File::open(&path).unwrap(), setup_size, &mut expected).unwrap();
        let mut loaded = vec![0u8; 256];
        mem.read_slice(&mut loaded, GuestAddress(u64::from(hdr.code32_start)))
            .unwrap();
        assert_eq!(loaded, expected);
    }

    #[test]
    fn kit_vmlinux_loads_with_pvh_entry() {
        let Some(path) = kit_file("vmlinux") else {
            crate::testutil::say_skipped(
                "kit_vmlinux_loads_with_pvh_entry",
                "no kit ($HOME/.cache/ember/kit/vmlinux): run scripts/kit.sh",
            );
            return;
        };
        let mem = guest_memory(256 << 20);
        let kernel = load_kernel(&mem, &mut File::open(&path).unwrap()).unwrap();
        // Debian's cloud kernel (the kit's) is built with CONFIG_PVH=y.
        assert_eq!(kernel.kind, EntryKind::Pvh);
        assert!(kernel.entry.0 >= layout::HIMEM_START);
    }

    #[test]
    fn initramfs_goes_high_page_aligned_and_intact() {
        let mem = guest_memory(64 << 20);
        let kernel = load(&elf(EM_X86_64, 0x10_0000, CODE, None)).unwrap();
        let contents: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let file = TempFile::new("initrd", &contents);
        let info = load_initramfs(&mem, &mut file.open(), &kernel, 64 << 20).unwrap();
        assert_eq!(info.size, contents.len() as u64);
        assert_eq!(info.addr.0 % PAGE_SIZE, 0);
        assert!(info.addr.0 + info.size <= 64 << 20);
        assert!(
            info.addr.0 + info.size > (64 << 20) - PAGE_SIZE,
            "as high as possible"
        );
        let mut back = vec![0u8; contents.len()];
        mem.read_slice(&mut back, info.addr).unwrap();
        assert_eq!(back, contents);
    }

    #[test]
    fn initramfs_respects_initrd_addr_max() {
        let mem = guest_memory(64 << 20);
        let mut kernel = load(&elf(EM_X86_64, 0x10_0000, CODE, None)).unwrap();
        kernel.setup_header = Some(setup_header {
            initrd_addr_max: (32 << 20) - 1,
            ..Default::default()
        });
        let file = TempFile::new("initrd", &[1u8; 5000]);
        let info = load_initramfs(&mem, &mut file.open(), &kernel, 64 << 20).unwrap();
        assert!(info.addr.0 + info.size <= 32 << 20);
        assert_eq!(info.addr.0, (32 << 20) - 2 * PAGE_SIZE);
    }

    #[test]
    fn initramfs_too_big_or_empty_is_an_error() {
        let mem = guest_memory(4 << 20);
        let kernel = LoadedKernel {
            entry: GuestAddress(0x10_0000),
            kind: EntryKind::Linux64,
            setup_header: None,
            kernel_end: GuestAddress(0x30_0000),
        };
        let file = TempFile::new("initrd", &vec![0u8; 2 << 20]);
        let err = load_initramfs(&mem, &mut file.open(), &kernel, 4 << 20).unwrap_err();
        assert!(matches!(err, KernelError::InitrdTooBig { .. }), "{err:?}");
        let empty = TempFile::new("initrd", &[]);
        assert!(matches!(
            load_initramfs(&mem, &mut empty.open(), &kernel, 4 << 20),
            Err(KernelError::InitrdEmpty)
        ));
    }
}

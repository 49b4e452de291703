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
    Elf64_Ehdr, Elf64_Phdr, EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB, EM_X86_64, PT_LOAD,
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
        "the kernel does not fit in guest memory: it needs {start:#x}..{end:#x} ({needed_mib} MiB from \
         1 MiB); give the guest more memory"
    )]
    TooBig {
        start: u64,
        end: u64,
        needed_mib: u64,
    },
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
    /// decompresses into), rounded to nothing: the initramfs goes above it.
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

/// Checks everything about the ELF file that linux-loader would either miss or report vaguely,
/// and returns the physical range its loadable segments occupy.
fn check_elf<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut File,
    len: u64,
) -> Result<(u64, u64), KernelError> {
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
    for i in 0..u64::from(ehdr.e_phnum) {
        let mut phdr = Elf64_Phdr::default();
        read_at(kernel, ehdr.e_phoff + i * phdr_size, phdr.as_mut_slice())?;
        if phdr.p_type != PT_LOAD {
            continue;
        }
        let file_end = phdr
            .p_offset
            .checked_add(phdr.p_filesz)
            .ok_or(KernelError::MalformedElf("segment file range overflows"))?;
        if file_end > len {
            return Err(KernelError::Truncated {
                what: "loadable segment",
                end: file_end,
                len,
            });
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
    }
    if lowest == u64::MAX {
        return Err(KernelError::NoLoadableSegment);
    }
    check_fits(mem, lowest, highest)?;
    Ok((lowest, highest))
}

/// Errors unless `start..end` is RAM below the MMIO hole.
fn check_fits<M: GuestMemoryBackend>(mem: &M, start: u64, end: u64) -> Result<(), KernelError> {
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
    let (_, end) = check_elf(mem, kernel, len)?;
    let result: KernelLoaderResult =
        Elf::load(mem, None, kernel, Some(GuestAddress(layout::HIMEM_START)))
            .map_err(KernelError::Load)?;
    let (entry, kind) = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => (addr, EntryKind::Pvh),
        _ => (result.kernel_load, EntryKind::Linux64),
    };
    Ok(LoadedKernel {
        entry,
        kind,
        setup_header: None,
        kernel_end: GuestAddress(end.max(result.kernel_end)),
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

//! Boot parameters: the command line, the E820 memory map, and the structure that hands them to
//! the kernel.
//!
//! - Linux 64-bit entry: the zero page (`struct boot_params`) as Linux's boot protocol defines it
//!   (Documentation/arch/x86/boot.rst and zero-page.rst), at `layout::ZERO_PAGE_START`.
//! - PVH entry: `struct hvm_start_info` version 1 with its memory map and module list, as Xen's
//!   public/arch-x86/hvm/start_info.h defines it, at `layout::PVH_INFO_START`.
//!
//! Both kinds also get the MP table and the ACPI tables: those describe CPUs and devices, not the
//! entry protocol.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::acpi::{create_acpi_tables, AcpiError};
use crate::kernel::{EntryKind, InitrdInfo, LoadedKernel};
use crate::layout::{self, GuestDevice};
use crate::mptable::{setup_mptable, MptableError};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` 0xff: "undefined" boot loader (boot.rst, "type_of_loader").
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Linux's x86_64 `CONFIG_PHYSICAL_ALIGN` default; only read from a header Ember makes up.
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// The `hvm_start_info` version that carries a memory map.
const PVH_START_INFO_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("the kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write the kernel command line to guest memory: {0}")]
    CmdlineWrite(#[source] vm_memory::GuestMemoryError),
    #[error(
        "initramfs at {addr:#x} (+{size:#x}) is beyond the 4 GiB the boot protocol can address"
    )]
    InitrdOutOfReach { addr: u64, size: u64 },
    #[error("cannot write the zero page: {0}")]
    ZeroPage(#[source] linux_loader::configurator::Error),
    #[error("cannot write the PVH start info: {0}")]
    StartInfo(#[source] linux_loader::configurator::Error),
    #[error("too many E820 entries ({0})")]
    TooManyE820Entries(usize),
    #[error("cannot write the MP table: {0}")]
    Mptable(#[from] MptableError),
    #[error("cannot write the ACPI tables: {0}")]
    Acpi(#[from] AcpiError),
    #[error("kernel entry point error: {0}")]
    Kernel(#[from] crate::kernel::KernelError),
    #[error("vCPU setup error: {0}")]
    Cpu(#[from] crate::cpu::CpuError),
}

/// What `configure_system` needs to know about the machine.
pub struct BootSetup<'a> {
    pub mem_size: u64,
    /// The final command line, device words included.
    pub cmdline: &'a str,
    pub initrd: Option<InitrdInfo>,
    pub cpus: u8,
    /// The devices the guest's tables describe (the device manager's list).
    pub devices: &'a [GuestDevice],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// The guest's E820 map, sorted and without overlaps:
///
/// | range                              | kind     |
/// |------------------------------------|----------|
/// | 0 .. EBDA_START (0x9fc00)          | RAM      |
/// | EBDA_START .. 1 MiB                | reserved (MP table, ACPI tables) |
/// | 1 MiB .. min(mem_size, 3 GiB)      | RAM      |
/// | 4 GiB .. 4 GiB + (mem_size - 3 GiB) | RAM, only when mem_size > 3 GiB |
///
/// For `mem_size >= 1 MiB` the RAM entries add up to exactly
/// `mem_size - (0x100000 - 0x9fc00) = mem_size - 0x60400` bytes (the 385 KiB reserved below 1 MiB
/// is backed by guest memory but not offered to the kernel).
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = Vec::new();
    let mut push = |start: u64, end: u64, kind: E820Kind| {
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind,
            });
        }
    };
    let low_end = mem_size.min(layout::MMIO_HOLE_START);
    push(0, low_end.min(layout::EBDA_START), E820Kind::Ram);
    push(
        layout::EBDA_START,
        layout::HIMEM_START.min(low_end.max(layout::EBDA_START)),
        E820Kind::Reserved,
    );
    push(layout::HIMEM_START, low_end, E820Kind::Ram);
    if mem_size > layout::MMIO_HOLE_START {
        push(
            layout::MMIO_HOLE_END,
            layout::MMIO_HOLE_END + (mem_size - layout::MMIO_HOLE_START),
            E820Kind::Ram,
        );
    }
    map
}

/// Writes the command line, the entry protocol's boot structure, the MP table and the ACPI tables.
pub fn configure_system<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &LoadedKernel,
    setup: &BootSetup,
) -> Result<(), BootError> {
    write_cmdline(mem, setup.cmdline, kernel.setup_header.as_ref())?;
    setup_mptable(mem, setup.cpus)?;
    let rsdp = create_acpi_tables(mem, setup.cpus, setup.devices)?;
    if let Some(initrd) = setup.initrd {
        let end = initrd.addr.0.checked_add(initrd.size);
        if end.is_none_or(|e| e > u64::from(u32::MAX) + 1) {
            return Err(BootError::InitrdOutOfReach {
                addr: initrd.addr.0,
                size: initrd.size,
            });
        }
    }
    match kernel.kind {
        EntryKind::Linux64 => write_zero_page(mem, kernel, setup, rsdp),
        EntryKind::Pvh => write_pvh_start_info(mem, setup, rsdp),
    }
}

/// The longest command line the kernel accepts, excluding the NUL.
fn cmdline_limit(hdr: Option<&setup_header>) -> usize {
    let ours = layout::CMDLINE_MAX_SIZE - 1;
    match hdr {
        // cmdline_size exists from protocol 2.06 and excludes the terminating NUL (boot.rst).
        Some(h) if h.version >= 0x0206 && h.cmdline_size != 0 => ours.min(h.cmdline_size as usize),
        _ => ours,
    }
}

fn write_cmdline<M: GuestMemoryBackend>(
    mem: &M,
    cmdline: &str,
    hdr: Option<&setup_header>,
) -> Result<(), BootError> {
    let max = cmdline_limit(hdr);
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(BootError::CmdlineWrite)
}

fn fresh_setup_header() -> setup_header {
    setup_header {
        boot_flag: KERNEL_BOOT_FLAG_MAGIC,
        header: KERNEL_HDR_MAGIC,
        kernel_alignment: KERNEL_MIN_ALIGNMENT_BYTES,
        ..Default::default()
    }
}

fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &LoadedKernel,
    setup: &BootSetup,
    rsdp: GuestAddress,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr: kernel.setup_header.unwrap_or_else(fresh_setup_header),
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    if kernel.setup_header.is_none() {
        // A bzImage's cmdline_size is the kernel's limit and stays; a vmlinux has none, so this
        // reports the length of the line Ember wrote.
        params.hdr.cmdline_size = setup.cmdline.len() as u32;
    }
    if let Some(initrd) = setup.initrd {
        // configure_system checked both fit in 32 bits.
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp.0;

    let map = e820_map(setup.mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820Entries(map.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;

    LinuxBootConfigurator::write_bootparams::<M>(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::ZeroPage)
}

fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    setup: &BootSetup,
    rsdp: GuestAddress,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(setup.mem_size)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            // Xen's memmap types are E820's.
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let max_entries = ((layout::PVH_MODLIST_START - layout::PVH_MEMMAP_START) as usize)
        / std::mem::size_of::<hvm_memmap_table_entry>();
    if memmap.len() > max_entries {
        return Err(BootError::TooManyE820Entries(memmap.len()));
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: PVH_START_INFO_VERSION,
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: rsdp.0,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let module = setup.initrd.map(|initrd| hvm_modlist_entry {
        paddr: initrd.addr.0,
        size: initrd.size,
        ..Default::default()
    });
    if module.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MODLIST_START;
    }
    let mut params = BootParams::new(&info, GuestAddress(layout::PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
    if let Some(module) = module {
        params.set_modules(&[module], GuestAddress(layout::PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<M>(&params, mem).map_err(BootError::StartInfo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{guest_memory, Mem};

    const RESERVED_BELOW_1MIB: u64 = layout::HIMEM_START - layout::EBDA_START;

    fn ram_sum(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum()
    }

    fn assert_sorted_disjoint(map: &[E820Entry]) {
        for pair in map.windows(2) {
            assert!(
                pair[0].addr + pair[0].size <= pair[1].addr,
                "overlap or disorder: {pair:?}"
            );
        }
    }

    #[test]
    fn e820_ram_is_memory_minus_the_reserved_385k() {
        for mib in [128u64, 512, 3 << 10, 4 << 10] {
            let mem_size = mib << 20;
            let map = e820_map(mem_size);
            assert_sorted_disjoint(&map);
            assert_eq!(ram_sum(&map), mem_size - RESERVED_BELOW_1MIB, "{mib} MiB");
            assert_eq!(RESERVED_BELOW_1MIB, 0x60400);
            // Nothing in the MMIO hole.
            for e in &map {
                let end = e.addr + e.size;
                assert!(
                    end <= layout::MMIO_HOLE_START || e.addr >= layout::MMIO_HOLE_END,
                    "{e:?} overlaps the hole"
                );
            }
        }
    }

    #[test]
    fn e820_above_3g_continues_at_4g() {
        let map = e820_map(4 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            E820Entry {
                addr: layout::HIMEM_START,
                size: layout::MMIO_HOLE_START - layout::HIMEM_START,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(
            map[3],
            E820Entry {
                addr: 4 << 30,
                size: 1 << 30,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(e820_map(128 << 20).len(), 3);
        assert_eq!(e820_map(3 << 30).len(), 3);
    }

    fn elf_kernel(kind: EntryKind) -> LoadedKernel {
        LoadedKernel {
            entry: GuestAddress(0x100_0000),
            kind,
            setup_header: None,
            kernel_end: GuestAddress(0x200_0000),
        }
    }

    const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

    fn configure(mem: &Mem, kernel: &LoadedKernel, initrd: Option<InitrdInfo>) {
        let setup = BootSetup {
            mem_size: 128 << 20,
            cmdline: CMDLINE,
            initrd,
            cpus: 2,
            devices: &[],
        };
        configure_system(mem, kernel, &setup).unwrap();
    }

    fn read_cstr(mem: &Mem, addr: u64) -> String {
        let mut buf = vec![0u8; layout::CMDLINE_MAX_SIZE];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        let end = buf.iter().position(|b| *b == 0).unwrap();
        String::from_utf8(buf[..end].to_vec()).unwrap()
    }

    #[test]
    fn zero_page_points_at_cmdline_initrd_e820_and_rsdp() {
        let mem = guest_memory(128 << 20);
        let initrd = InitrdInfo {
            addr: GuestAddress(0x700_0000),
            size: 12345,
        };
        configure(&mem, &elf_kernel(EntryKind::Linux64), Some(initrd));
        let params: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(hdr.type_of_loader, KERNEL_LOADER_OTHER);
        assert_eq!({ hdr.cmd_line_ptr } as u64, layout::CMDLINE_START);
        assert_eq!({ hdr.cmdline_size } as usize, CMDLINE.len());
        assert_eq!(read_cstr(&mem, layout::CMDLINE_START), CMDLINE);
        assert_eq!({ hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ hdr.ramdisk_size }, 12345);
        assert_eq!({ params.acpi_rsdp_addr }, layout::RSDP_START);
        assert_eq!(params.e820_entries, 3);
        let table = params.e820_table;
        let ram: u64 = table[..3]
            .iter()
            .filter(|e| e.r#type == E820Kind::Ram as u32)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (128 << 20) - RESERVED_BELOW_1MIB);
        let mut rsdp = [0u8; 8];
        mem.read_slice(&mut rsdp, GuestAddress(layout::RSDP_START))
            .unwrap();
        assert_eq!(&rsdp, b"RSD PTR ");
    }

    #[test]
    fn zero_page_keeps_the_bzimage_header() {
        let mem = guest_memory(128 << 20);
        let mut kernel = elf_kernel(EntryKind::Linux64);
        kernel.setup_header = Some(setup_header {
            header: KERNEL_HDR_MAGIC,
            version: 0x020f,
            cmdline_size: 255,
            xloadflags: 0x7f,
            code32_start: 0x10_0000,
            ..Default::default()
        });
        configure(&mem, &kernel, None);
        let params: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ hdr.xloadflags }, 0x7f);
        assert_eq!({ hdr.cmdline_size }, 255, "the kernel's limit stays");
        assert_eq!(hdr.type_of_loader, KERNEL_LOADER_OTHER);
        assert_eq!({ hdr.ramdisk_image }, 0);
    }

    #[test]
    fn cmdline_over_the_kernels_limit_is_refused() {
        let mem = guest_memory(128 << 20);
        let mut kernel = elf_kernel(EntryKind::Linux64);
        let long = "x".repeat(layout::CMDLINE_MAX_SIZE);
        let setup = BootSetup {
            mem_size: 128 << 20,
            cmdline: &long,
            initrd: None,
            cpus: 1,
            devices: &[],
        };
        assert!(matches!(
            configure_system(&mem, &kernel, &setup),
            Err(BootError::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        let exact = "x".repeat(layout::CMDLINE_MAX_SIZE - 1);
        configure_system(
            &mem,
            &kernel,
            &BootSetup {
                cmdline: &exact,
                ..setup
            },
        )
        .unwrap();
        assert_eq!(read_cstr(&mem, layout::CMDLINE_START), exact);

        kernel.setup_header = Some(setup_header {
            version: 0x020f,
            cmdline_size: 100,
            ..Default::default()
        });
        let err = configure_system(
            &mem,
            &kernel,
            &BootSetup {
                cmdline: &"y".repeat(101),
                ..setup
            },
        )
        .unwrap_err();
        assert!(matches!(
            err,
            BootError::CmdlineTooLong { len: 101, max: 100 }
        ));
    }

    #[test]
    fn pvh_start_info_has_cmdline_memmap_rsdp_and_initrd_module() {
        let mem = guest_memory(128 << 20);
        let initrd = InitrdInfo {
            addr: GuestAddress(0x700_0000),
            size: 4096,
        };
        configure(&mem, &elf_kernel(EntryKind::Pvh), Some(initrd));
        let info: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(read_cstr(&mem, info.cmdline_paddr), CMDLINE);
        assert_eq!(info.rsdp_paddr, layout::RSDP_START);
        assert_eq!(info.memmap_paddr, layout::PVH_MEMMAP_START);
        let map = e820_map(128 << 20);
        assert_eq!(info.memmap_entries as usize, map.len());
        for (i, expected) in map.iter().enumerate() {
            let entry: hvm_memmap_table_entry = mem
                .read_obj(GuestAddress(info.memmap_paddr + i as u64 * 24))
                .unwrap();
            assert_eq!(
                (entry.addr, entry.size, entry.type_),
                (expected.addr, expected.size, expected.kind as u32)
            );
        }
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x700_0000, 4096));
        // hvm_start_info and the zero page are not confused.
        let zero_page: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        assert_eq!({ zero_page.hdr.header }, 0);
        assert!(
            std::mem::size_of::<hvm_start_info>() as u64
                <= layout::PVH_MEMMAP_START - layout::PVH_INFO_START
        );
    }

    #[test]
    fn pvh_without_initrd_has_no_modules() {
        let mem = guest_memory(128 << 20);
        configure(&mem, &elf_kernel(EntryKind::Pvh), None);
        let info: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }
}

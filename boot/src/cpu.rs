//! Initial vCPU state: CPUID, MSRs, registers, segments and paging, FPU, local APIC.
//!
//! - Linux 64-bit entry (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"): long mode with
//!   paging on and an identity map, a flat 64-bit code segment and flat data segments, interrupts
//!   off, RSI = the zero page.
//! - PVH entry (xenbits.xen.org/docs/unstable/misc/pvh.html): 32-bit protected mode, paging off,
//!   flat 4 GiB CS (read/execute) and DS/ES/SS (read/write), a 32-bit TSS in TR, EBX = the
//!   `hvm_start_info`.
//!
//! CPUID is what KVM supports, adjusted per vCPU so the topology the guest reads (APIC ids, one
//! thread per core, `cpus` cores in one package) matches the MP table and the MADT.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, CpuId, Msrs,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::kernel::{EntryKind, LoadedKernel};
use crate::{gdt, layout, paging};

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("vCPU {id} does not exist on a machine with {cpus} vCPUs")]
    InvalidCpu { id: u8, cpus: u8 },
    #[error("cannot get the CPUID KVM supports: {0}")]
    GetSupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("too many CPUID entries ({0})")]
    TooManyCpuidEntries(usize),
    #[error("cannot set the vCPU's CPUID: {0}")]
    SetCpuid(#[source] kvm_ioctls::Error),
    #[error("cannot get the MSRs KVM supports: {0}")]
    GetMsrIndexList(#[source] kvm_ioctls::Error),
    #[error("cannot set the vCPU's MSRs: {0}")]
    SetMsrs(#[source] kvm_ioctls::Error),
    #[error("KVM set {written} of {wanted} boot MSRs; MSR {failed:#x} was refused")]
    MsrRefused {
        written: usize,
        wanted: usize,
        failed: u32,
    },
    #[error("cannot {0} the vCPU's general registers: {1}")]
    Regs(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot {0} the vCPU's special registers: {1}")]
    Sregs(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot set the vCPU's FPU state: {0}")]
    Fpu(#[source] kvm_ioctls::Error),
    #[error("cannot {0} the vCPU's local APIC (is the in-kernel irqchip created?): {1}")]
    Lapic(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot write the GDT, IDT or page tables to guest memory: {0}")]
    Tables(#[source] vm_memory::GuestMemoryError),
}

// Control register and EFER bits (Intel SDM vol. 3A sections 2.5 and 2.2.1).
const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set; everything else (IF included) is clear.
const RFLAGS_RESERVED: u64 = 1 << 1;

// MSR indices (Intel SDM vol. 4).
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRITEBACK: u64 = 6;

// Local APIC registers and LVT delivery modes (Intel SDM vol. 3A section 11.5.1).
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

// CPUID bits used below.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_EDX_MTRR: u32 = 1 << 12;
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// KVM's paravirtual feature leaf (kernel uapi asm/kvm_para.h) and the features a guest uses
/// through VMCALL/VMMCALL hypercalls: PV spinlock kicks, PV IPIs, PV yield.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
const KVM_HYPERCALL_FEATURES: u32 =
    KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vendor {
    Intel,
    Amd,
    Other,
}

fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(leaf0) = entries.iter().find(|e| e.function == 0) else {
        return Vendor::Other;
    };
    let mut name = [0u8; 12];
    name[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    name[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    name[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &name {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Bits needed to number `n` things: the width of the core id field in an APIC id.
fn id_bits(n: u8) -> u32 {
    if n <= 1 {
        0
    } else {
        u32::BITS - (u32::from(n) - 1).leading_zeros()
    }
}

/// Leaf 1: initial APIC id, logical processor count, CLFLUSH line size, hypervisor bit.
fn update_leaf1(entries: &mut [kvm_cpuid_entry2], id: u8, cpus: u8, tsc_deadline: bool) {
    for e in entries.iter_mut().filter(|e| e.function == 1) {
        // KVM never reports the TSC-deadline timer in its supported CPUID: the VMM offers it
        // when KVM_CAP_TSC_DEADLINE_TIMER says the in-kernel LAPIC has it (kernel api.rst).
        // Without it Linux calibrates the LAPIC timer against another clock at every boot.
        if tsc_deadline {
            e.ecx |= LEAF1_ECX_TSC_DEADLINE;
        }
        let mut clflush = (e.ebx >> 8) & 0xff;
        if clflush == 0 {
            clflush = 8; // in 8-byte units: 64-byte lines
        }
        e.ebx = (u32::from(id) << 24) | (u32::from(cpus) << 16) | (clflush << 8);
        e.ecx |= LEAF1_ECX_HYPERVISOR;
        if cpus > 1 {
            e.edx |= LEAF1_EDX_HTT;
        } else {
            e.edx &= !LEAF1_EDX_HTT;
        }
    }
}

/// Intel leaf 4: cores per package, and how many logical processors share each cache (one per
/// core for L1/L2, the whole package for L3).
fn update_cache_topology(entries: &mut [kvm_cpuid_entry2], cpus: u8) {
    for e in entries.iter_mut().filter(|e| e.function == 4) {
        if e.eax & 0x1f == 0 {
            continue; // no more caches
        }
        let level = (e.eax >> 5) & 0x7;
        let sharing = if level >= 3 { u32::from(cpus) - 1 } else { 0 };
        e.eax &= 0x3fff; // keep type, level and the cache flags
        e.eax |= (sharing & 0xfff) << 14;
        e.eax |= ((u32::from(cpus) - 1) & 0x3f) << 26;
    }
}

/// Leaves 0xB and 0x1F (extended topology): an SMT level of one thread and a core level of
/// `cpus` cores; EDX is the x2APIC id. Replaces whatever subleaves KVM reported.
fn update_extended_topology(entries: &mut Vec<kvm_cpuid_entry2>, leaf: u32, id: u8, cpus: u8) {
    if !entries.iter().any(|e| e.function == leaf) {
        return;
    }
    entries.retain(|e| e.function != leaf);
    let apic_id = u32::from(id);
    let levels = [
        (0, 1, TOPOLOGY_LEVEL_SMT),
        (id_bits(cpus), u32::from(cpus), TOPOLOGY_LEVEL_CORE),
        (0, 0, 0), // the invalid level that ends the list
    ];
    for (index, (shift, count, kind)) in levels.into_iter().enumerate() {
        entries.push(kvm_cpuid_entry2 {
            function: leaf,
            index: index as u32,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: shift,
            ebx: count,
            ecx: (kind << 8) | index as u32,
            edx: apic_id,
            ..Default::default()
        });
    }
}

/// AMD leaves 0x8000_0008 (core count, APIC id core bits) and 0x8000_001E (extended APIC id).
fn update_amd_topology(entries: &mut [kvm_cpuid_entry2], id: u8, cpus: u8) {
    for e in entries.iter_mut() {
        match e.function {
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(cpus) << 12) | (u32::from(cpus) - 1);
            }
            0x8000_001e => {
                e.eax = u32::from(id);
                e.ebx = u32::from(id); // compute unit id; one thread per unit
                e.ecx = 0; // node 0, one node
            }
            _ => {}
        }
    }
}

/// Hides the KVM paravirtual features that work through hypercalls. On a kvm_pvm host a
/// hypercall from guest ring 0 never completes: the guest re-executes its VMCALL forever (the
/// first PV IPI, while the second CPU came up, hung every SMP boot). The guest then uses the
/// APIC for IPIs and plain spinning instead.
fn hide_hypercall_features(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries
        .iter_mut()
        .filter(|e| e.function == KVM_CPUID_FEATURES)
    {
        e.eax &= !KVM_HYPERCALL_FEATURES;
    }
}

/// What the guest's CPUID offers beyond KVM's supported set, per host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CpuidPolicy {
    /// Offer KVM's hypercall-based PV features (false on kvm_pvm hosts).
    pub hypercalls: bool,
    /// Offer the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER).
    pub tsc_deadline: bool,
}

impl CpuidPolicy {
    pub const HARDWARE: CpuidPolicy = CpuidPolicy {
        hypercalls: true,
        tsc_deadline: true,
    };
}

/// What KVM offers every vCPU, asked once per VM rather than once per vCPU.
pub struct HostCpu {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msr_index: Vec<u32>,
    /// Whether the in-kernel LAPIC has the TSC-deadline timer.
    pub tsc_deadline: bool,
}

impl HostCpu {
    pub fn query(kvm: &Kvm) -> Result<Self, CpuError> {
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(CpuError::GetSupportedCpuid)?
            .as_slice()
            .to_vec();
        let msr_index = kvm
            .get_msr_index_list()
            .map_err(CpuError::GetMsrIndexList)?
            .as_slice()
            .to_vec();
        Ok(HostCpu {
            cpuid,
            msr_index,
            tsc_deadline: kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
        })
    }
}

/// KVM's supported CPUID adjusted for vCPU `id` of `cpus`.
pub fn normalize_cpuid(entries: &mut Vec<kvm_cpuid_entry2>, id: u8, cpus: u8, policy: CpuidPolicy) {
    if !policy.hypercalls {
        hide_hypercall_features(entries);
    }
    let vendor = vendor(entries);
    update_leaf1(entries, id, cpus, policy.tsc_deadline);
    update_extended_topology(entries, 0xb, id, cpus);
    update_extended_topology(entries, 0x1f, id, cpus);
    match vendor {
        Vendor::Intel => update_cache_topology(entries, cpus),
        Vendor::Amd => update_amd_topology(entries, id, cpus),
        Vendor::Other => {}
    }
}

/// Sets the vCPU's CPUID and returns it.
fn setup_cpuid(
    host: &HostCpu,
    vcpu: &VcpuFd,
    id: u8,
    cpus: u8,
    policy: CpuidPolicy,
) -> Result<Vec<kvm_cpuid_entry2>, CpuError> {
    let mut entries = host.cpuid.clone();
    normalize_cpuid(&mut entries, id, cpus, policy);
    let cpuid =
        CpuId::from_entries(&entries).map_err(|_| CpuError::TooManyCpuidEntries(entries.len()))?;
    vcpu.set_cpuid2(&cpuid).map_err(CpuError::SetCpuid)?;
    Ok(entries)
}

fn has_mtrr(cpuid: &[kvm_cpuid_entry2]) -> bool {
    cpuid
        .iter()
        .any(|e| e.function == 1 && e.edx & LEAF1_EDX_MTRR != 0)
}

/// The MSR values a kernel expects at entry: no syscall/sysenter targets yet, TSC from zero,
/// fast strings on, MTRRs enabled with write-back as the default type.
fn boot_msrs() -> [kvm_msr_entry; 11] {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    [
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRITEBACK),
    ]
}

fn setup_msrs(host: &HostCpu, vcpu: &VcpuFd, cpuid: &[kvm_cpuid_entry2]) -> Result<(), CpuError> {
    let supported = host.msr_index.as_slice();
    // KVM emulates the MTRRs for any vCPU whose CPUID has them, but does not list them in
    // KVM_GET_MSR_INDEX_LIST; without MTRRdefType, Linux runs with MTRRs (and so PAT) disabled.
    let mtrr = has_mtrr(cpuid);
    let wanted: Vec<kvm_msr_entry> = boot_msrs()
        .into_iter()
        .filter(|m| supported.contains(&m.index) || (m.index == MSR_MTRR_DEF_TYPE && mtrr))
        .collect();
    let msrs = Msrs::from_entries(&wanted).map_err(|_| CpuError::MsrRefused {
        written: 0,
        wanted: wanted.len(),
        failed: 0,
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(CpuError::SetMsrs)?;
    if written != wanted.len() {
        // KVM stops at the first MSR it refuses.
        return Err(CpuError::MsrRefused {
            written,
            wanted: wanted.len(),
            failed: wanted.get(written).map_or(0, |m| m.index),
        });
    }
    Ok(())
}

fn setup_regs(vcpu: &VcpuFd, kernel: &LoadedKernel) -> Result<(), CpuError> {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: kernel.entry.0,
        ..Default::default()
    };
    match kernel.kind {
        EntryKind::Linux64 => {
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
            regs.rsi = layout::ZERO_PAGE_START;
        }
        EntryKind::Pvh => regs.rbx = layout::PVH_INFO_START,
    }
    vcpu.set_regs(&regs).map_err(|e| CpuError::Regs("set", e))
}

/// Writes the GDT and an empty IDT, and loads the segment registers from that GDT.
fn setup_segments<M: GuestMemoryBackend>(
    mem: &M,
    sregs: &mut kvm_sregs,
    long_mode: bool,
) -> Result<(), CpuError> {
    let table = gdt::table(long_mode);
    let mut bytes = Vec::with_capacity(table.len() * 8);
    for d in table {
        bytes.extend_from_slice(&d.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(layout::GDT_START))
        .map_err(CpuError::Tables)?;
    sregs.gdt.base = layout::GDT_START;
    sregs.gdt.limit = (bytes.len() - 1) as u16;

    // Any exception before the kernel loads its own IDT becomes a triple fault: a clean reset.
    mem.write_obj(0u64, GuestAddress(layout::IDT_START))
        .map_err(CpuError::Tables)?;
    sregs.idt.base = layout::IDT_START;
    sregs.idt.limit = 0;

    let code = gdt::segment(gdt::CODE_INDEX, table[gdt::CODE_INDEX as usize]);
    let data = gdt::segment(gdt::DATA_INDEX, table[gdt::DATA_INDEX as usize]);
    let tss = gdt::segment(gdt::TSS_INDEX, table[gdt::TSS_INDEX as usize]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    Ok(())
}

fn setup_sregs<M: GuestMemoryBackend>(
    mem: &M,
    vcpu: &VcpuFd,
    kind: EntryKind,
) -> Result<(), CpuError> {
    let mut sregs = vcpu.get_sregs().map_err(|e| CpuError::Sregs("get", e))?;
    // Caches on, as firmware leaves them.
    sregs.cr0 &= !(CR0_CD | CR0_NW);
    match kind {
        EntryKind::Linux64 => {
            setup_segments(mem, &mut sregs, true)?;
            sregs.cr3 = paging::write_identity_map(mem).map_err(CpuError::Tables)?;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryKind::Pvh => {
            setup_segments(mem, &mut sregs, false)?;
            sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & !CR0_PG;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer &= !(EFER_LME | EFER_LMA);
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| CpuError::Sregs("set", e))
}

fn setup_fpu(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(CpuError::Fpu)
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as _;
    }
}

fn set_delivery_mode(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let value = lapic_reg(lapic, offset);
    set_lapic_reg(
        lapic,
        offset,
        (value & !APIC_DELIVERY_MODE_MASK) | (mode << 8),
    );
}

/// LINT0 delivers the 8259's ExtINT and LINT1 NMIs, as the MP table's local interrupt entries say
/// (MP spec 1.4 section 3.6.2.1, virtual wire mode).
fn setup_lapic(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut lapic = vcpu.get_lapic().map_err(|e| CpuError::Lapic("get", e))?;
    set_delivery_mode(&mut lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_delivery_mode(&mut lapic, APIC_LVT_LINT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| CpuError::Lapic("set", e))
}

/// Puts vCPU `id` of `cpus` in the state the kernel's entry protocol expects. Call after the VM's
/// in-kernel irqchip exists, once per vCPU; the tables it writes to guest memory are the same each
/// time.
pub fn configure_vcpu<M: GuestMemoryBackend>(
    host: &HostCpu,
    vcpu: &VcpuFd,
    id: u8,
    cpus: u8,
    kernel: &LoadedKernel,
    mem: &M,
    policy: CpuidPolicy,
) -> Result<(), CpuError> {
    if id >= cpus {
        return Err(CpuError::InvalidCpu { id, cpus });
    }
    // CPUID first: which MSRs KVM accepts depends on the features the vCPU has.
    let cpuid = setup_cpuid(host, vcpu, id, cpus, policy)?;
    setup_msrs(host, vcpu, &cpuid)?;
    setup_regs(vcpu, kernel)?;
    setup_sregs(mem, vcpu, kernel.kind)?;
    setup_fpu(vcpu)?;
    setup_lapic(vcpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::load_kernel;
    use crate::params::{configure_system, BootSetup};
    use crate::testutil::{elf, guest_memory, Mem, TempFile, EM_X86_64};
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{VcpuExit, VmFd};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    /// 64-bit guest: writes 'A' to COM1, then the zero page's "HdrS" through RSI, then a byte
    /// pushed and popped through the stack, then what it reads at the first virtio-mmio window
    /// (3.25 GiB: only reachable if all four page directories are right), then halts.
    const GUEST64: &[u8] = &[
        0x66, 0xba, 0xf8, 0x03, // mov $0x3f8,%dx
        0xb0, 0x41, // mov $'A',%al
        0xee, // out %al,(%dx)
        0x8b, 0x86, 0x02, 0x02, 0x00, 0x00, // mov 0x202(%rsi),%eax
        0xef, // out %eax,(%dx)
        0x6a, 0x42, // push $0x42
        0x58, // pop %rax
        0xee, // out %al,(%dx)
        0xb9, 0x00, 0x00, 0x00, 0xd0, // mov $0xd0000000,%ecx
        0x8b, 0x01, // mov (%rcx),%eax
        0xef, // out %eax,(%dx)
        0xf4, // hlt
    ];
    /// 32-bit PVH guest: writes the first dword at EBX (the start info magic) to COM1, halts.
    const GUEST_PVH: &[u8] = &[
        0x66, 0xba, 0xf8, 0x03, // mov $0x3f8,%dx
        0x8b, 0x03, // mov (%ebx),%eax
        0xef, // out %eax,(%dx)
        0xf4, // hlt
    ];

    struct Vm {
        kvm: Kvm,
        vm: VmFd,
        mem: Mem,
    }

    /// A VM with an irqchip and 64 MiB of memory, or `None` (said loudly) without /dev/kvm.
    fn vm(test: &str) -> Option<Vm> {
        let kvm = match Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => {
                crate::testutil::say_skipped(test, &format!("cannot open /dev/kvm ({e})"));
                return None;
            }
        };
        let vm = kvm.create_vm().unwrap();
        vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .unwrap();
        vm.create_irq_chip().unwrap();
        let mem = guest_memory(64 << 20);
        for (slot, region) in mem.iter().enumerate() {
            let host = mem.get_host_address(region.start_addr()).unwrap();
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the mapping lives in `mem`, which the returned Vm keeps alive with the VM.
            unsafe { vm.set_user_memory_region(region).unwrap() };
        }
        Some(Vm { kvm, vm, mem })
    }

    fn boot(vm: &Vm, image: &[u8], cpus: u8) -> LoadedKernel {
        let file = TempFile::new("guest.elf", image);
        let kernel = load_kernel(&vm.mem, &mut file.open()).unwrap();
        let setup = BootSetup {
            mem_size: 64 << 20,
            cmdline: "console=ttyS0",
            initrd: None,
            cpus,
            devices: &[],
        };
        configure_system(&vm.mem, &kernel, &setup).unwrap();
        kernel
    }

    #[derive(Debug, PartialEq)]
    enum Event {
        Out(u16, Vec<u8>),
        MmioRead(u64, usize),
    }

    /// Runs until `n` port or MMIO exits (or something unexpected), answering MMIO reads with
    /// 0x12345678. The guests end in HLT, which the in-kernel local APIC handles without an exit.
    fn run(vcpu: &mut VcpuFd, n: usize) -> Vec<Event> {
        let mut events = Vec::new();
        while events.len() < n {
            match vcpu.run().unwrap() {
                VcpuExit::IoOut(port, data) => events.push(Event::Out(port, data.to_vec())),
                VcpuExit::MmioRead(addr, data) => {
                    events.push(Event::MmioRead(addr, data.len()));
                    let value = 0x1234_5678u32.to_le_bytes();
                    data.copy_from_slice(&value[..data.len()]);
                }
                other => panic!("unexpected exit {other:?} after {events:?}"),
            }
        }
        events
    }

    #[test]
    fn linux64_entry_runs_in_long_mode_with_identity_paging() {
        let Some(vm) = vm("linux64_entry_runs_in_long_mode_with_identity_paging") else {
            return;
        };
        let kernel = boot(&vm, &elf(EM_X86_64, 0x10_0000, GUEST64, None), 1);
        assert_eq!(kernel.kind, EntryKind::Linux64);
        let mut vcpu = vm.vm.create_vcpu(0).unwrap();
        configure_vcpu(
            &HostCpu::query(&vm.kvm).unwrap(),
            &vcpu,
            0,
            1,
            &kernel,
            &vm.mem,
            CpuidPolicy::HARDWARE,
        )
        .unwrap();

        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(sregs.cr3, layout::PML4_START);
        assert_eq!(sregs.cs.l, 1);
        let regs = vcpu.get_regs().unwrap();
        assert_eq!(regs.rip, 0x10_0000);
        assert_eq!(regs.rsi, layout::ZERO_PAGE_START);

        assert_eq!(
            run(&mut vcpu, 5),
            vec![
                Event::Out(0x3f8, b"A".to_vec()),
                Event::Out(0x3f8, b"HdrS".to_vec()),
                Event::Out(0x3f8, vec![0x42]),
                Event::MmioRead(layout::VIRTIO_MMIO_START, 4),
                Event::Out(0x3f8, 0x1234_5678u32.to_le_bytes().to_vec()),
            ]
        );
    }

    #[test]
    fn pvh_entry_runs_in_protected_mode_with_start_info_in_ebx() {
        let Some(vm) = vm("pvh_entry_runs_in_protected_mode_with_start_info_in_ebx") else {
            return;
        };
        let entry = 0x10_0000;
        let kernel = boot(
            &vm,
            &elf(EM_X86_64, entry, GUEST_PVH, Some(entry as u32)),
            1,
        );
        assert_eq!(kernel.kind, EntryKind::Pvh);
        let mut vcpu = vm.vm.create_vcpu(0).unwrap();
        configure_vcpu(
            &HostCpu::query(&vm.kvm).unwrap(),
            &vcpu,
            0,
            1,
            &kernel,
            &vm.mem,
            CpuidPolicy::HARDWARE,
        )
        .unwrap();

        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(sregs.efer & EFER_LMA, 0);
        assert_eq!(
            (sregs.cs.db, sregs.cs.l, sregs.cs.limit),
            (1, 0, 0xffff_ffff)
        );
        assert_eq!(sregs.tr.limit, 0x67);
        assert_eq!(vcpu.get_regs().unwrap().rbx, layout::PVH_INFO_START);

        let magic = linux_loader::start_info::XEN_HVM_START_MAGIC_VALUE;
        assert_eq!(
            run(&mut vcpu, 1),
            vec![Event::Out(0x3f8, magic.to_le_bytes().to_vec())]
        );
    }

    fn cpuid_leaf(vcpu: &VcpuFd, function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
        let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .copied()
    }

    #[test]
    fn second_vcpu_of_two_gets_its_apic_id_and_lapic_wiring() {
        let Some(vm) = vm("second_vcpu_of_two_gets_its_apic_id_and_lapic_wiring") else {
            return;
        };
        let kernel = boot(&vm, &elf(EM_X86_64, 0x10_0000, GUEST64, None), 2);
        let vcpus: Vec<VcpuFd> = (0..2).map(|i| vm.vm.create_vcpu(i).unwrap()).collect();
        for (id, vcpu) in vcpus.iter().enumerate() {
            configure_vcpu(
                &HostCpu::query(&vm.kvm).unwrap(),
                vcpu,
                id as u8,
                2,
                &kernel,
                &vm.mem,
                CpuidPolicy::HARDWARE,
            )
            .unwrap();
        }
        let leaf1 = cpuid_leaf(&vcpus[1], 1, 0).unwrap();
        assert_eq!(leaf1.ebx >> 24, 1, "initial APIC id of vCPU 1");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 2, "logical processors");
        assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        if vm.kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
            assert_ne!(
                leaf1.ecx & LEAF1_ECX_TSC_DEADLINE,
                0,
                "TSC-deadline timer offered"
            );
        } else {
            crate::testutil::say_skipped(
                "cpuid_tsc_deadline",
                "this host's KVM has no KVM_CAP_TSC_DEADLINE_TIMER",
            );
        }
        assert_eq!(cpuid_leaf(&vcpus[0], 1, 0).unwrap().ebx >> 24, 0);
        // Leaf 0xB is only there when the host's KVM offers it (Ember fills it in, never adds
        // it); without it the topology checks cannot run, and that is said.
        match cpuid_leaf(&vcpus[1], 0xb, 1) {
            Some(core_level) => {
                assert_eq!(core_level.edx, 1, "x2APIC id");
                assert_eq!(core_level.ebx & 0xffff, 2, "cores");
                assert_eq!((core_level.ecx >> 8) & 0xff, TOPOLOGY_LEVEL_CORE);
            }
            None => crate::testutil::say_skipped(
                "cpuid_leaf_0xb_topology",
                "this host's KVM offers no CPUID leaf 0xB, so its topology was not checked",
            ),
        }
        let lapic = vcpus[1].get_lapic().unwrap();
        assert_eq!(
            (lapic_reg(&lapic, APIC_LVT_LINT0) >> 8) & 7,
            APIC_MODE_EXTINT
        );
        assert_eq!((lapic_reg(&lapic, APIC_LVT_LINT1) >> 8) & 7, APIC_MODE_NMI);

        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpus[1].get_msrs(&mut msrs).unwrap(), 1);
        assert_eq!(msrs.as_slice()[0].data, MTRR_ENABLE | MTRR_TYPE_WRITEBACK);
    }

    #[test]
    fn vcpu_id_beyond_cpu_count_is_refused() {
        let Some(vm) = vm("vcpu_id_beyond_cpu_count_is_refused") else {
            return;
        };
        let kernel = boot(&vm, &elf(EM_X86_64, 0x10_0000, GUEST64, None), 1);
        let vcpu = vm.vm.create_vcpu(0).unwrap();
        assert!(matches!(
            configure_vcpu(
                &HostCpu::query(&vm.kvm).unwrap(),
                &vcpu,
                1,
                1,
                &kernel,
                &vm.mem,
                CpuidPolicy::HARDWARE
            ),
            Err(CpuError::InvalidCpu { id: 1, cpus: 1 })
        ));
    }

    fn synthetic(function: u32, index: u32, eax: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ..Default::default()
        }
    }

    #[test]
    fn intel_cache_leaf_shares_l3_across_the_package() {
        let mut entries = vec![
            kvm_cpuid_entry2 {
                function: 0,
                ebx: u32::from_le_bytes(*b"Genu"),
                edx: u32::from_le_bytes(*b"ineI"),
                ecx: u32::from_le_bytes(*b"ntel"),
                ..Default::default()
            },
            // L1d (type 1, level 1) and L3 (type 3, level 3), each claiming 64 sharers.
            synthetic(4, 0, (63 << 14) | (1 << 5) | 1),
            synthetic(4, 3, (63 << 14) | (3 << 5) | 3),
            synthetic(0xb, 0, 0),
        ];
        normalize_cpuid(&mut entries, 3, 4, CpuidPolicy::HARDWARE);
        let l1 = entries
            .iter()
            .find(|e| e.function == 4 && e.index == 0)
            .unwrap();
        let l3 = entries
            .iter()
            .find(|e| e.function == 4 && e.index == 3)
            .unwrap();
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(l3.eax >> 26, 3, "cores per package - 1");
        let topo: Vec<_> = entries.iter().filter(|e| e.function == 0xb).collect();
        assert_eq!(topo.len(), 3);
        assert_eq!((topo[1].eax, topo[1].ebx, topo[1].edx), (2, 4, 3));
    }

    #[test]
    fn hypercall_features_are_hidden_only_when_the_policy_says_so() {
        let all = KVM_HYPERCALL_FEATURES | 1; // and the kvmclock bit, which stays
        let leaf = || vec![synthetic(KVM_CPUID_FEATURES, 0, all)];
        let mut hw = leaf();
        normalize_cpuid(&mut hw, 0, 1, CpuidPolicy::HARDWARE);
        assert_eq!(hw[0].eax, all);
        let mut pvm = leaf();
        normalize_cpuid(
            &mut pvm,
            0,
            1,
            CpuidPolicy {
                hypercalls: false,
                ..CpuidPolicy::HARDWARE
            },
        );
        assert_eq!(
            pvm[0].eax, 1,
            "PV unhalt, send-IPI and yield hidden; kvmclock kept"
        );
    }

    #[test]
    fn the_tsc_deadline_timer_is_offered_only_when_kvm_has_it() {
        let leaf = || vec![synthetic(1, 0, 0)];
        let mut with = leaf();
        normalize_cpuid(&mut with, 0, 1, CpuidPolicy::HARDWARE);
        assert_ne!(with[0].ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        let mut without = leaf();
        let policy = CpuidPolicy {
            tsc_deadline: false,
            ..CpuidPolicy::HARDWARE
        };
        normalize_cpuid(&mut without, 0, 1, policy);
        assert_eq!(without[0].ecx & LEAF1_ECX_TSC_DEADLINE, 0);
    }
}

//! One vCPU's state: what KVM keeps for it and a resumed guest needs, read and written in the
//! order KVM's API requires.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, kvm_xsave2, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::fam::FamStruct;

use super::{ioctl, IoctlError};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_MTRR_PHYS_BASE0: u32 = 0x200;
const MSR_MTRR_FIX64K_00000: u32 = 0x250;
const MSR_MTRR_FIX16K_80000: u32 = 0x258;
const MSR_MTRR_FIX16K_A0000: u32 = 0x259;
const MSR_MTRR_FIX4K_C0000: u32 = 0x268;
const MSR_MTRR_FIX4K_F8000: u32 = 0x26f;
const MSR_IA32_CR_PAT: u32 = 0x277;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// Variable-range MTRR pairs KVM emulates (its MTRRcap VCNT).
const MTRR_VARIABLE_PAIRS: u32 = 8;
/// MSRs per KVM_GET_MSRS / KVM_SET_MSRS: well under KVM's per-call limit, and a batch that
/// meets an unreadable MSR is read again from the one after it.
const MSR_BATCH: usize = 64;
/// The legacy `kvm_xsave` area, in 32-bit words; KVM_CAP_XSAVE2 hosts may use more.
const XSAVE_LEGACY_WORDS: usize = size_of::<kvm_xsave>() / 4;
/// KVM's TSC frequency is calibrated per host boot: within 250 ppm it is the same clock.
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error(transparent)]
    Ioctl(#[from] IoctlError),
    #[error("KVM_SET_MSRS set {set} of {wanted} MSRs: it refused MSR {index:#x}")]
    MsrRefused {
        index: u32,
        set: usize,
        wanted: usize,
    },
    #[error("cannot build the {what} for KVM: {source:?}")]
    Buffer {
        what: &'static str,
        source: vmm_sys_util::fam::Error,
    },
    #[error("saved XSAVE area of {saved} bytes does not fit this host's {host}-byte area")]
    XsaveSize { saved: usize, host: usize },
    #[error(
        "the saved vCPU's TSC ran at {saved} kHz, this host's runs at {host} kHz, and KVM cannot \
         scale it (KVM_SET_TSC_KHZ: {source})"
    )]
    TscKhz {
        saved: u32,
        host: u32,
        source: kvm_ioctls::Error,
    },
}

/// What saving and restoring a vCPU needs to know about the host, asked once per VM.
#[derive(Clone, Debug)]
pub struct SaveContext {
    /// MSRs to save: KVM_GET_MSR_INDEX_LIST, and the MTRRs and PAT, which KVM emulates for a
    /// vCPU whose CPUID has them without listing them (Linux keeps its memory types there).
    pub msr_index: Vec<u32>,
    /// The XSAVE area's size in bytes: KVM_CAP_XSAVE2's answer, 4096 where only KVM_CAP_XSAVE
    /// exists, None where KVM has no XSAVE at all.
    pub xsave_size: Option<usize>,
    pub xcrs: bool,
}

impl SaveContext {
    pub fn query(kvm: &Kvm, vm: &VmFd) -> Result<Self, VcpuStateError> {
        let mut msr_index = kvm
            .get_msr_index_list()
            .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        let mtrr_variable = (0..2 * MTRR_VARIABLE_PAIRS).map(|i| MSR_MTRR_PHYS_BASE0 + i);
        let mtrr_fixed = [
            MSR_MTRR_FIX64K_00000,
            MSR_MTRR_FIX16K_80000,
            MSR_MTRR_FIX16K_A0000,
        ]
        .into_iter()
        .chain(MSR_MTRR_FIX4K_C0000..=MSR_MTRR_FIX4K_F8000);
        let extra = mtrr_variable
            .chain(mtrr_fixed)
            .chain([MSR_MTRR_DEF_TYPE, MSR_IA32_CR_PAT]);
        for index in extra {
            if !msr_index.contains(&index) {
                msr_index.push(index);
            }
        }
        let xsave_size = match vm.check_extension_int(Cap::Xsave2) {
            n if n > 0 => usize::try_from(n).ok(),
            _ if vm.check_extension(Cap::Xsave) => Some(size_of::<kvm_xsave>()),
            _ => None,
        };
        Ok(SaveContext {
            msr_index,
            xsave_size,
            xcrs: vm.check_extension(Cap::Xcrs),
        })
    }
}

/// kvm-bindings derives no serde traits for `kvm_fpu`: its field list for serde's remote derive.
#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_fpu")]
struct KvmFpuDef {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    pad1: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
    pad2: u32,
}

/// A vCPU as KVM holds it. CPUID, MSRs and the XSAVE area are kept as plain lists, not as
/// kvm-bindings' FAM wrappers, so that no length header can disagree with its entries.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR of [`SaveContext::msr_index`] that KVM let us read, with its value; the index
    /// says which.
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    #[serde(with = "KvmFpuDef")]
    pub fpu: kvm_fpu,
    /// The whole XSAVE area in 32-bit words (the legacy 4 KiB and any XSAVE2 part); empty
    /// where KVM has no XSAVE.
    pub xsave: Vec<u32>,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
    /// None where KVM cannot tell (no KVM_CAP_GET_TSC_KHZ).
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running (its thread is out of KVM_RUN, as all the
    /// VM's vCPUs must be: pending events are only stable then).
    pub fn save(vcpu: &VcpuFd, ctx: &SaveContext) -> Result<Self, VcpuStateError> {
        // KVM_GET_MP_STATE first: it lets the LAPIC take pending INIT/SIPI events, which
        // changes what the other calls return. KVM_GET_VCPU_EVENTS last, since the others may
        // still move a pending event.
        let mp_state = vcpu.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let fpu = vcpu.get_fpu().map_err(ioctl("KVM_GET_FPU"))?;
        let xsave = save_xsave(vcpu, ctx.xsave_size)?;
        let xcrs = if ctx.xcrs {
            Some(vcpu.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?)
        } else {
            None
        };
        let debugregs = vcpu.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
        let tsc_khz = vcpu.get_tsc_khz().ok();
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_CPUID2"))?
            .as_slice()
            .iter()
            // Leaf 0 reports at least leaf 1, so an all-zero leaf 0 is an unused slot.
            .filter(|e| !(e.function == 0 && e.index == 0 && e.eax == 0))
            .copied()
            .collect();
        let msrs = save_msrs(vcpu, &ctx.msr_index)?;
        let vcpu_events = vcpu
            .get_vcpu_events()
            .map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            cpuid,
            msrs,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debugregs,
            lapic,
            mp_state,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Writes the state into a vCPU that has not run yet.
    pub fn restore(&self, vcpu: &VcpuFd, ctx: &SaveContext) -> Result<(), VcpuStateError> {
        // The TSC frequency before the TSC value, which KVM turns into an offset at the
        // vCPU's rate.
        if let Some(saved) = self.tsc_khz {
            restore_tsc_khz(vcpu, saved)?;
        }
        // CPUID first: which MSRs, XCR0 bits and XSAVE components KVM accepts depends on it.
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|source| VcpuStateError::Buffer {
            what: "CPUID list",
            source,
        })?;
        vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        // KVM_SET_REGS drops a pending exception, which KVM_SET_VCPU_EVENTS (last) restores.
        vcpu.set_regs(&self.regs).map_err(ioctl("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(ioctl("KVM_SET_SREGS"))?;
        vcpu.set_fpu(&self.fpu).map_err(ioctl("KVM_SET_FPU"))?;
        // XSAVE holds everything the FPU state does and more: it goes after, and wins.
        restore_xsave(vcpu, &self.xsave, ctx.xsave_size)?;
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        }
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        // The LAPIC after the sregs, which carry the APIC base, and before the MSRs: KVM takes
        // a TSC deadline only from a LAPIC whose timer is in TSC-deadline mode.
        vcpu.set_lapic(&self.lapic)
            .map_err(ioctl("KVM_SET_LAPIC"))?;
        // The deadline after the TSC it is compared with, or KVM arms the timer against the
        // wrong count (or not at all).
        let (deadline, rest): (Vec<_>, Vec<_>) = self
            .msrs
            .iter()
            .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
        restore_msrs(vcpu, &rest)?;
        restore_msrs(vcpu, &deadline)?;
        vcpu.set_vcpu_events(&self.vcpu_events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// The saved value of MSR `index`, if it was saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }

    /// The saved guest TSC.
    pub fn tsc(&self) -> Option<u64> {
        self.msr(MSR_IA32_TSC)
    }
}

/// Reads every MSR of `indices` KVM lets us read. KVM_GET_MSRS stops at the first MSR it
/// refuses and says how many it read: those are kept, the refused one is left out (logged), and
/// the batch goes on after it.
fn save_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut skipped = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|source| VcpuStateError::Buffer {
            what: "MSR list",
            source,
        })?;
        let read = vcpu.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        let read = read.min(batch.len());
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        if let Some(&refused) = batch.get(read) {
            skipped.push(refused);
            rest = &rest[read + 1..];
        } else {
            rest = &rest[batch.len()..];
        }
    }
    if !skipped.is_empty() {
        log::debug!("vcpu state: MSRs KVM lists but would not read: {skipped:#x?}");
    }
    Ok(saved)
}

fn restore_msrs(vcpu: &VcpuFd, entries: &[&kvm_msr_entry]) -> Result<(), VcpuStateError> {
    for batch in entries.chunks(MSR_BATCH) {
        let batch: Vec<kvm_msr_entry> = batch.iter().map(|&&m| m).collect();
        let msrs = Msrs::from_entries(&batch).map_err(|source| VcpuStateError::Buffer {
            what: "MSR list",
            source,
        })?;
        let set = vcpu.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if set < batch.len() {
            return Err(VcpuStateError::MsrRefused {
                index: batch[set].index,
                set,
                wanted: batch.len(),
            });
        }
    }
    Ok(())
}

/// The FAM length (in u32 words past the legacy area) of an XSAVE area of `bytes`.
fn xsave_extra_words(bytes: usize) -> usize {
    bytes
        .saturating_sub(size_of::<kvm_xsave>())
        .div_ceil(size_of::<<kvm_xsave2 as FamStruct>::Entry>())
}

fn save_xsave(vcpu: &VcpuFd, size: Option<usize>) -> Result<Vec<u32>, VcpuStateError> {
    let Some(size) = size else {
        return Ok(Vec::new());
    };
    let extra = xsave_extra_words(size);
    if extra == 0 {
        let xsave = vcpu.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
        return Ok(xsave.region.to_vec());
    }
    let mut xsave = Xsave::new(extra).map_err(|source| VcpuStateError::Buffer {
        what: "XSAVE area",
        source,
    })?;
    // SAFETY: the buffer holds the whole area KVM_CAP_XSAVE2 said this VM's vCPUs have, which
    // is what KVM_GET_XSAVE2 writes (Ember enables no XSTATE features after asking).
    unsafe { vcpu.get_xsave2(&mut xsave) }.map_err(ioctl("KVM_GET_XSAVE2"))?;
    let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(words)
}

fn restore_xsave(vcpu: &VcpuFd, words: &[u32], size: Option<usize>) -> Result<(), VcpuStateError> {
    let host = size.unwrap_or(0);
    if words.is_empty() {
        return Ok(());
    }
    let host_words = XSAVE_LEGACY_WORDS + xsave_extra_words(host);
    if host == 0 || words.len() > host_words || words.len() < XSAVE_LEGACY_WORDS {
        return Err(VcpuStateError::XsaveSize {
            saved: words.len() * 4,
            host,
        });
    }
    // Sized for this host; a shorter saved area leaves the components past it zero, and its
    // header says they are not in use.
    let mut xsave =
        Xsave::new(host_words - XSAVE_LEGACY_WORDS).map_err(|source| VcpuStateError::Buffer {
            what: "XSAVE area",
            source,
        })?;
    let (region, extra) = words.split_at(XSAVE_LEGACY_WORDS);
    // SAFETY: only the fixed-size region is reached through the struct; the FAM part is
    // written through as_mut_slice, which knows its length.
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(region);
    xsave.as_mut_slice()[..extra.len()].copy_from_slice(extra);
    // SAFETY: the buffer is as large as the area KVM_CAP_XSAVE2 said KVM reads from it.
    unsafe { vcpu.set_xsave2(&xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
    Ok(())
}

fn restore_tsc_khz(vcpu: &VcpuFd, saved: u32) -> Result<(), VcpuStateError> {
    let Ok(host) = vcpu.get_tsc_khz() else {
        // KVM cannot tell this vCPU's rate, so it cannot scale it either.
        return Ok(());
    };
    let diff = u64::from(host.abs_diff(saved));
    if diff * 1_000_000 <= u64::from(saved) * TSC_KHZ_TOLERANCE_PPM {
        return Ok(());
    }
    vcpu.set_tsc_khz(saved)
        .map_err(|source| VcpuStateError::TscKhz {
            saved,
            host,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::testutil;
    use ember_boot::cpu::{configure_vcpu, CpuidPolicy, HostCpu};
    use ember_boot::kernel::{EntryKind, LoadedKernel};
    use ember_devices::state::{from_bytes, to_bytes};
    use kvm_bindings::{
        KVM_MP_STATE_HALTED, KVM_VCPUEVENT_VALID_SHADOW, KVM_X86_SHADOW_INT_MOV_SS,
    };
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// In no MSR range KVM emulates (and KVM's ignore_msrs is off by default).
    const NO_SUCH_MSR: u32 = 0xdead_beef;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;

    /// A vCPU set up as Ember boots one, then moved away from that: registers, an MSR, a
    /// debug register and the FPU control word changed as a running guest would.
    fn configured_vcpu(kvm: &Kvm, vm: &VmFd) -> VcpuFd {
        let vcpu = vm.create_vcpu(0).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let kernel = LoadedKernel {
            entry: GuestAddress(0x10_0000),
            kind: EntryKind::Linux64,
            setup_header: None,
            kernel_end: GuestAddress(0x20_0000),
        };
        let host = HostCpu::query(kvm).unwrap();
        configure_vcpu(&host, &vcpu, 0, 1, &kernel, &mem, CpuidPolicy::HARDWARE).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        (regs.rax, regs.rbx, regs.r15, regs.rip) =
            (0x1122_3344_5566_7788, 0xdead_beef, u64::MAX, 0x10_0042);
        vcpu.set_regs(&regs).unwrap();
        let msrs = [
            (MSR_KERNEL_GS_BASE, 0xffff_8880_0000_1000),
            (MSR_IA32_SYSENTER_ESP, 0x4000),
        ]
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        });
        assert_eq!(
            vcpu.set_msrs(&Msrs::from_entries(&msrs).unwrap()).unwrap(),
            2
        );
        let mut debugregs = vcpu.get_debug_regs().unwrap();
        debugregs.db[0] = 0x10_0000;
        vcpu.set_debug_regs(&debugregs).unwrap();
        let mut fpu = vcpu.get_fpu().unwrap();
        fpu.fcw = 0x027f;
        vcpu.set_fpu(&fpu).unwrap();
        set_ymm_state(&vcpu);
        // NMIs blocked and an interrupt shadow: as if stopped right after a MOV SS in an NMI
        // handler. Then halted, as a guest idling in HLT is.
        let mut events = vcpu.get_vcpu_events().unwrap();
        events.nmi.masked = 1;
        events.interrupt.shadow = KVM_X86_SHADOW_INT_MOV_SS as u8;
        events.flags |= KVM_VCPUEVENT_VALID_SHADOW;
        vcpu.set_vcpu_events(&events).unwrap();
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_HALTED,
        })
        .unwrap();
        vcpu
    }

    /// Upper YMM halves, where the host offers guests AVX: state only the XSAVE area holds
    /// (KVM_SET_FPU cannot write it), so a restore that loses XSAVE shows.
    fn set_ymm_state(vcpu: &VcpuFd) {
        const XCR0_AVX: u64 = 0b111;
        const XSTATE_BV: usize = 512 / 4;
        const YMM_HI: usize = 576 / 4;
        let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let avx = cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == 0xd && e.index == 0 && u64::from(e.eax) & XCR0_AVX == XCR0_AVX);
        if !avx {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED vcpu state YMM part: this host offers guests no AVX"
            );
            return;
        }
        let mut xcrs = vcpu.get_xcrs().unwrap();
        xcrs.xcrs[0].value = XCR0_AVX;
        vcpu.set_xcrs(&xcrs).unwrap();
        let mut xsave = vcpu.get_xsave().unwrap();
        xsave.region[XSTATE_BV] |= 0b100;
        for (i, word) in xsave.region[YMM_HI..YMM_HI + 64].iter_mut().enumerate() {
            *word = 0x0101_0101 * (i as u32 + 1);
        }
        // SAFETY: a legacy-sized area on a vCPU whose XSAVE area is that size or larger; KVM
        // reads no more than the struct.
        unsafe { vcpu.set_xsave(&xsave) }.unwrap();
    }

    /// The state with what moves on its own while nothing runs (the TSC) set aside, to
    /// compare the rest byte for byte.
    fn without_tsc(state: &VcpuState) -> Vec<u8> {
        let mut state = state.clone();
        state.msrs.retain(|m| m.index != MSR_IA32_TSC);
        to_bytes(&state).unwrap()
    }

    /// Saved from one VM's vCPU, restored into a fresh VM's, saved again: the same bytes (the
    /// guest TSC aside, which has moved on by the time between the two saves and no more).
    #[test]
    fn vcpu_state_round_trips_into_a_fresh_vm() {
        let Some((kvm, vm)) = testutil::vm("vcpu_state_round_trips_into_a_fresh_vm") else {
            return;
        };
        let vcpu = configured_vcpu(&kvm, &vm);
        let mut ctx = SaveContext::query(&kvm, &vm).unwrap();
        // An MSR KVM does not know, amid the others: left out, and the rest still read.
        ctx.msr_index.insert(ctx.msr_index.len() / 2, NO_SUCH_MSR);
        let saved = VcpuState::save(&vcpu, &ctx).unwrap();
        let bytes = to_bytes(&saved).unwrap();
        assert_eq!(saved.msrs.len(), ctx.msr_index.len() - 1);
        assert_eq!(saved.msr(NO_SUCH_MSR), None);
        assert_eq!(saved.msr(MSR_KERNEL_GS_BASE), Some(0xffff_8880_0000_1000));
        assert!(!saved.cpuid.is_empty());
        let tsc = saved.tsc().expect("the TSC is saved");

        let (_, vm2) = testutil::vm("vcpu_state_round_trips_into_a_fresh_vm").unwrap();
        let vcpu2 = vm2.create_vcpu(0).unwrap();
        let state: VcpuState = from_bytes(&bytes).unwrap();
        state.restore(&vcpu2, &ctx).unwrap();
        let again = VcpuState::save(&vcpu2, &ctx).unwrap();
        assert_eq!(without_tsc(&again), without_tsc(&saved));
        let regs = vcpu2.get_regs().unwrap();
        assert_eq!((regs.rax, regs.rip), (0x1122_3344_5566_7788, 0x10_0042));
        assert_eq!(vcpu2.get_fpu().unwrap().fcw, 0x027f);
        assert_eq!(vcpu2.get_vcpu_events().unwrap().nmi.masked, 1);
        assert_eq!(vcpu2.get_mp_state().unwrap().mp_state, KVM_MP_STATE_HALTED);
        let tsc2 = again.tsc().unwrap();
        // Restored, the TSC goes on from the saved count: not from the fresh vCPU's, and by no
        // more than a few seconds' worth.
        let khz = u64::from(saved.tsc_khz.unwrap_or(1_000_000));
        assert!(
            tsc2 >= tsc && tsc2 - tsc < 5_000 * khz,
            "saved {tsc}, restored {tsc2}"
        );
    }

    #[test]
    fn a_refused_state_names_the_ioctl_and_garbage_does_not_decode() {
        let Some((kvm, vm)) = testutil::vm("a_refused_state_names_the_ioctl") else {
            return;
        };
        let vcpu = configured_vcpu(&kvm, &vm);
        let ctx = SaveContext::query(&kvm, &vm).unwrap();
        let saved = VcpuState::save(&vcpu, &ctx).unwrap();
        let bytes = to_bytes(&saved).unwrap();
        for len in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                from_bytes::<VcpuState>(&bytes[..len]).is_err(),
                "{len} bytes"
            );
        }
        assert!(from_bytes::<VcpuState>(&[0xff; 64]).is_err());

        // Paging on with protection off is no state a CPU can be in.
        let mut bad = saved.clone();
        bad.sregs.cr0 = 1 << 31;
        let vcpu2 = vm.create_vcpu(1).unwrap();
        let err = bad.restore(&vcpu2, &ctx).unwrap_err();
        assert!(err.to_string().contains("KVM_SET_SREGS"), "{err}");

        // A TSC twice as fast as this host's: KVM scales it, or the error says it cannot.
        let mut faster = saved.clone();
        let host_khz = saved.tsc_khz.expect("KVM reports the TSC rate");
        faster.tsc_khz = Some(2 * host_khz);
        let vcpu3 = vm.create_vcpu(2).unwrap();
        match faster.restore(&vcpu3, &ctx) {
            Ok(()) => assert_eq!(vcpu3.get_tsc_khz().unwrap(), 2 * host_khz),
            Err(err) => assert!(matches!(err, VcpuStateError::TscKhz { .. }), "{err}"),
        }

        let mut bad = saved;
        bad.xsave.resize(bad.xsave.len() + (1 << 16), 0);
        let err = bad.restore(&vcpu2, &ctx).unwrap_err();
        assert!(matches!(err, VcpuStateError::XsaveSize { .. }), "{err}");
    }
}

//! KVM's part of a running VM as plain data, for snapshots: each vCPU's registers, FPU/XSAVE,
//! MSRs, LAPIC, pending events and CPUID ([`VcpuState`]), and the VM's interrupt controllers, PIT
//! and clock ([`VmState`]). The structs derive serde's traits (kvm-bindings' `serde` feature for
//! the KVM structures) and are encoded like every device state, with `ember_devices::state`.
//!
//! Restoring is done into a fresh VM: create it with its irqchip and PIT, restore the
//! [`VmState`], then create each vCPU and restore its [`VcpuState`] before its first `KVM_RUN`.

mod vcpu;
mod vm;

pub use vcpu::{SaveContext, VcpuState, VcpuStateError};
pub use vm::{VmState, VmStateError};

/// A KVM call that failed, by the name of its ioctl.
#[derive(Debug, thiserror::Error)]
#[error("{ioctl} failed: {source}")]
pub struct IoctlError {
    pub ioctl: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

/// For `map_err`: names the ioctl a KVM call failure came from.
fn ioctl(name: &'static str) -> impl Fn(kvm_ioctls::Error) -> IoctlError {
    move |source| IoctlError {
        ioctl: name,
        source,
    }
}

#[cfg(test)]
mod testutil {
    use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
    use kvm_ioctls::{Kvm, VmFd};

    /// A VM with the in-kernel irqchip and PIT, as Ember makes them, or None (said on stderr in
    /// the form scripts/test.sh counts) where there is no /dev/kvm.
    pub fn vm(test: &str) -> Option<(Kvm, VmFd)> {
        let kvm = match Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED {test}: cannot open /dev/kvm ({e})"
                );
                return None;
            }
        };
        let vm = kvm.create_vm().unwrap();
        vm.set_tss_address(ember_boot::layout::KVM_TSS_ADDRESS as usize)
            .unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .unwrap();
        Some((kvm, vm))
    }
}

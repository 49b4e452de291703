//! x86_64 boot for Ember: everything that turns a kernel file and a machine description into guest
//! memory contents and initial vCPU state. No KVM VM assembly here; `vmm` drives these steps:
//! `kernel::load_kernel` (and `load_initramfs`), `params::configure_system`, then
//! `cpu::configure_vcpu` for each vCPU.

pub mod acpi;
pub mod cpu;
pub mod gdt;
pub mod kernel;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod params;
#[cfg(test)]
mod testutil;

pub use acpi::{create_acpi_tables, AcpiError};
pub use cpu::{configure_vcpu, CpuError};
pub use kernel::{load_initramfs, load_kernel, EntryKind, InitrdInfo, KernelError, LoadedKernel};
pub use mptable::{setup_mptable, MptableError};
pub use params::{configure_system, e820_map, BootError, BootSetup, E820Entry, E820Kind};

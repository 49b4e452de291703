//! x86_64 boot for Ember: everything that turns a kernel file and a machine description into guest
//! memory contents and initial vCPU state. No KVM VM assembly here; `vmm` drives these steps.

pub mod layout;

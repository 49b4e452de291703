//! `ember-floor`: the least a KVM virtual machine monitor can do, as the benchmark's reference
//! floor. It opens /dev/kvm, creates a VM with one 64 KiB memory slot and one vCPU, runs a few
//! real-mode instructions that write a line to the serial port's data register a byte at a time,
//! copies each byte to stdout, and exits when the guest halts. No irqchip, no devices, no boot
//! protocol, no threads: whatever Ember spends beyond this on a host is Ember's own cost.
//!
//! Usage: ember-floor [LINE]   (default `ember-guest: ready`, the null guest's ready line)

use std::io::Write;
use std::process::ExitCode;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};

#[derive(Debug, thiserror::Error)]
enum FloorError {
    #[error("cannot open /dev/kvm: {0}")]
    Open(#[source] kvm_ioctls::Error),
    #[error("{ioctl}: {source}")]
    Kvm {
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot map guest memory: {0}")]
    Map(#[source] std::io::Error),
    #[error("the line ({0} bytes) does not fit in the guest's memory")]
    LineTooLong(usize),
    #[error("stdout: {0}")]
    Stdout(#[source] std::io::Error),
    #[error("unexpected exit {0}")]
    UnexpectedExit(String),
}

fn ioctl_failed(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> FloorError {
    move |source| FloorError::Kvm { ioctl, source }
}

const MEM_SIZE: usize = 64 << 10;
const CODE: u64 = 0x1000;
const TEXT: u64 = 0x2000;
const COM1: u16 = 0x3f8;

/// 16-bit code at CODE: `mov si, TEXT; mov dx, COM1; l: lodsb; test al, al; jz h; out dx, al;
/// jmp l; h: hlt`.
const GUEST: [u8; 15] = [
    0xbe, 0x00, 0x20, // mov si, 0x2000
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xac, // lodsb
    0x84, 0xc0, // test al, al
    0x74, 0x03, // jz +3
    0xee, // out dx, al
    0xeb, 0xf8, // jmp -8
    0xf4, // hlt
];

fn run(line: &str) -> Result<(), FloorError> {
    let kvm = Kvm::new().map_err(FloorError::Open)?;
    let vm = kvm.create_vm().map_err(ioctl_failed("KVM_CREATE_VM"))?;
    // SAFETY: a fresh anonymous mapping, kept for the life of the process (the VM's).
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(FloorError::Map(std::io::Error::last_os_error()));
    }
    // SAFETY: the mapping above is MEM_SIZE bytes, writable, and nothing else uses it yet.
    let guest = unsafe { std::slice::from_raw_parts_mut(mem.cast::<u8>(), MEM_SIZE) };
    let text = line.as_bytes();
    if TEXT as usize + text.len() + 2 > MEM_SIZE {
        return Err(FloorError::LineTooLong(text.len()));
    }
    guest[CODE as usize..CODE as usize + GUEST.len()].copy_from_slice(&GUEST);
    guest[TEXT as usize..TEXT as usize + text.len()].copy_from_slice(text);
    guest[TEXT as usize + text.len()] = b'\n';
    guest[TEXT as usize + text.len() + 1] = 0;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem as u64,
    };
    // SAFETY: the region stays mapped until the process exits.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(ioctl_failed("KVM_SET_USER_MEMORY_REGION"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(ioctl_failed("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(ioctl_failed("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(ioctl_failed("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(ioctl_failed("KVM_GET_REGS"))?;
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(ioctl_failed("KVM_SET_REGS"))?;
    let mut out = std::io::stdout().lock();
    loop {
        match vcpu.run().map_err(ioctl_failed("KVM_RUN"))? {
            VcpuExit::IoOut(COM1, data) => {
                // Unbuffered, as a console is: each byte reaches the reader as it comes.
                out.write_all(data)
                    .and_then(|()| out.flush())
                    .map_err(FloorError::Stdout)?;
            }
            VcpuExit::Hlt => return Ok(()),
            other => return Err(FloorError::UnexpectedExit(format!("{other:?}"))),
        }
    }
}

fn main() -> ExitCode {
    let line = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ember-guest: ready".into());
    match run(&line) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ember-floor: error: {e}");
            ExitCode::from(1)
        }
    }
}

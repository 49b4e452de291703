//! The VM's own state: the in-kernel PICs and IOAPIC, the PIT, and the KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{ioctl, IoctlError};

#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error(transparent)]
    Ioctl(#[from] IoctlError),
}

/// The interrupt controllers as KVM_GET_IRQCHIP reads them, the PIT's channels, and the clock
/// kvmclock guests read (nanoseconds).
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn get_irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, IoctlError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(ioctl("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

impl VmState {
    /// Reads the state of a VM whose vCPUs are all out of KVM_RUN.
    pub fn save(vm: &VmFd) -> Result<Self, VmStateError> {
        Ok(VmState {
            pic_master: get_irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
        })
    }

    /// Writes the state into a fresh VM that has its irqchip and PIT, before its vCPUs are
    /// restored.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmStateError> {
        // Which chip each one is comes from its place in the struct, not from the chip_id the
        // bytes carry: a swapped or corrupt id must not program the wrong controller.
        for (chip_id, saved) in [
            (KVM_IRQCHIP_PIC_MASTER, &self.pic_master),
            (KVM_IRQCHIP_PIC_SLAVE, &self.pic_slave),
            (KVM_IRQCHIP_IOAPIC, &self.ioapic),
        ] {
            let chip = kvm_irqchip { chip_id, ..*saved };
            vm.set_irqchip(&chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(ioctl("KVM_SET_PIT2"))?;
        // The clock goes on from the saved value, as after a pause: with KVM_CLOCK_REALTIME KVM
        // would move it on by the wall-clock time since the snapshot, and a guest restored a
        // day later would see its monotonic clock leap by a day in an instant.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::testutil;
    use ember_devices::state::{from_bytes, to_bytes};

    /// What moves on its own between a save and the next, set aside to compare the rest byte
    /// for byte: when each PIT channel's count was loaded (host time), and the clock.
    fn without_time(state: &VmState) -> Vec<u8> {
        let mut state = state.clone();
        for channel in &mut state.pit.channels {
            channel.count_load_time = 0;
        }
        state.clock = kvm_clock_data::default();
        to_bytes(&state).unwrap()
    }

    /// Puts each part in a state a fresh VM does not have: a PIC mask and base, an IOAPIC
    /// redirection entry, PIT channel 0 counting, the clock an hour on.
    fn drive(vm: &VmFd) {
        let mut pic = get_irqchip(vm, KVM_IRQCHIP_PIC_MASTER).unwrap();
        // SAFETY: chip_id says which union member KVM filled in.
        let master = unsafe { &mut pic.chip.pic };
        master.imr = 0xfa;
        master.irq_base = 0x20;
        vm.set_irqchip(&pic).unwrap();
        let mut ioapic = get_irqchip(vm, KVM_IRQCHIP_IOAPIC).unwrap();
        // SAFETY: as above; the redirection entry is a plain u64 in its union.
        unsafe {
            ioapic.chip.ioapic.redirtbl[4].bits = 0x24;
        }
        vm.set_irqchip(&ioapic).unwrap();
        let mut pit = vm.get_pit2().unwrap();
        pit.channels[0].mode = 2;
        pit.channels[0].count = 0x1234;
        vm.set_pit2(&pit).unwrap();
        vm.set_clock(&kvm_clock_data {
            clock: 3_600_000_000_000,
            ..Default::default()
        })
        .unwrap();
    }

    #[test]
    fn vm_state_round_trips_into_a_fresh_vm() {
        let Some((_kvm, vm)) = testutil::vm("vm_state_round_trips_into_a_fresh_vm") else {
            return;
        };
        drive(&vm);
        let saved = VmState::save(&vm).unwrap();
        let bytes = to_bytes(&saved).unwrap();

        let (_kvm2, vm2) = testutil::vm("vm_state_round_trips_into_a_fresh_vm").unwrap();
        assert_ne!(
            without_time(&VmState::save(&vm2).unwrap()),
            without_time(&saved)
        );
        let state: VmState = from_bytes(&bytes).unwrap();
        state.restore(&vm2).unwrap();
        let again = VmState::save(&vm2).unwrap();
        assert_eq!(without_time(&again), without_time(&saved));
        // SAFETY: a PIC chip_id.
        assert_eq!(unsafe { again.pic_master.chip.pic.imr }, 0xfa);
        // The clock goes on from the saved hour, by no more than the time the test took.
        let (was, now) = (saved.clock.clock, again.clock.clock);
        assert!(
            now >= was && now - was < 5_000_000_000,
            "saved {was} ns, restored {now} ns"
        );
    }

    #[test]
    fn garbage_does_not_decode_and_a_vm_without_a_pit_is_named() {
        let Some((kvm, vm)) = testutil::vm("garbage_does_not_decode") else {
            return;
        };
        let saved = VmState::save(&vm).unwrap();
        let bytes = to_bytes(&saved).unwrap();
        for len in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(from_bytes::<VmState>(&bytes[..len]).is_err(), "{len} bytes");
        }
        let mut longer = bytes;
        longer.push(0);
        assert!(from_bytes::<VmState>(&longer).is_err());

        // A VM with an irqchip but no PIT.
        let bare = kvm.create_vm().unwrap();
        bare.create_irq_chip().unwrap();
        let err = saved.restore(&bare).unwrap_err();
        assert!(err.to_string().contains("KVM_SET_PIT2"), "{err}");
    }
}

//! The VM-wide state KVM keeps in the kernel ([`VmState`]): the two PICs, the IOAPIC, the PIT
//! and the KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// The in-kernel interrupt controllers, timer and clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock.
    pub clock: kvm_clock_data,
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|e| SnapshotError::Kvm("KVM_GET_IRQCHIP", e))?;
    Ok(chip)
}

impl VmState {
    /// Saves the VM's in-kernel devices (the vCPUs must be paused).
    pub fn save(vm: &VmFd) -> Result<Self, SnapshotError> {
        Ok(Self {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm
                .get_pit2()
                .map_err(|e| SnapshotError::Kvm("KVM_GET_PIT2", e))?,
            clock: vm
                .get_clock()
                .map_err(|e| SnapshotError::Kvm("KVM_GET_CLOCK", e))?,
        })
    }

    /// Restores them into a VM created with its irqchip and PIT, before any vCPU runs.
    pub fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        let k = |what: &'static str| move |e| SnapshotError::Kvm(what, e);
        let chips = [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ];
        for (chip, id) in chips {
            if chip.chip_id != id {
                return Err(SnapshotError::Invalid(
                    "an irqchip entry names another chip",
                ));
            }
            vm.set_irqchip(chip).map_err(k("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(k("KVM_SET_PIT2"))?;
        // KVM_SET_CLOCK takes only the clock value (and KVM_CLOCK_REALTIME, not used here).
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(k("KVM_SET_CLOCK"))?;
        Ok(())
    }
}

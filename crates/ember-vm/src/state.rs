//! [`VmState`]: the VM-level KVM state a snapshot saves (interrupt controllers, PIT,
//! kvmclock), and [`Vm::save_state`] / [`Vm::restore_state`].

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

use crate::{Vm, VmError};

/// The in-kernel devices' state of a VM: both 8259 PICs, the IOAPIC, the 8254 PIT and
/// the kvmclock base. vCPU state (registers, LAPIC, MSRs, ...) is per vCPU, in
/// `ember_vcpu`.
///
/// Serializable with serde (kvm-bindings' own support for the KVM structures).
/// `PartialEq` compares the irqchips byte for byte (kvm-bindings gives `kvm_irqchip` no
/// `PartialEq`: it holds a union).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// `KVM_GET_IRQCHIP` of the master PIC (`chip_id` `KVM_IRQCHIP_PIC_MASTER`).
    pub pic_master: kvm_irqchip,
    /// `KVM_GET_IRQCHIP` of the slave PIC (`chip_id` `KVM_IRQCHIP_PIC_SLAVE`).
    pub pic_slave: kvm_irqchip,
    /// `KVM_GET_IRQCHIP` of the IOAPIC (`chip_id` `KVM_IRQCHIP_IOAPIC`).
    pub ioapic: kvm_irqchip,
    /// `KVM_GET_PIT2`.
    pub pit: kvm_pit_state2,
    /// `KVM_GET_CLOCK`, with `KVM_CLOCK_TSC_STABLE` cleared (`KVM_SET_CLOCK` may refuse
    /// it).
    pub clock: kvm_clock_data,
}

impl PartialEq for VmState {
    fn eq(&self, other: &Self) -> bool {
        irqchip_bytes(&self.pic_master) == irqchip_bytes(&other.pic_master)
            && irqchip_bytes(&self.pic_slave) == irqchip_bytes(&other.pic_slave)
            && irqchip_bytes(&self.ioapic) == irqchip_bytes(&other.ioapic)
            && self.pit == other.pit
            && self.clock == other.clock
    }
}

/// The bytes of `chip`.
fn irqchip_bytes(chip: &kvm_irqchip) -> &[u8] {
    // SAFETY: `kvm_irqchip` is `repr(C)` plain data without padding (two u32s, then a
    // 512-byte union whose `dummy` member spans all of it; kvm-bindings derives
    // zerocopy's `IntoBytes` for it, which proves the absence of padding), and every
    // value of it is fully initialized: built zeroed by `Default` and filled by KVM, or
    // deserialized from its bytes. The slice borrows `chip` for its lifetime.
    unsafe {
        std::slice::from_raw_parts(
            (chip as *const kvm_irqchip).cast::<u8>(),
            std::mem::size_of::<kvm_irqchip>(),
        )
    }
}

/// The three irqchips, by `chip_id` and name for messages.
const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "PIC master"),
    (KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
    (KVM_IRQCHIP_IOAPIC, "IOAPIC"),
];

impl<B> Vm<B> {
    /// Saves the VM-level state: both PICs and the IOAPIC (`KVM_GET_IRQCHIP`), the PIT
    /// (`KVM_GET_PIT2`) and the kvmclock (`KVM_GET_CLOCK`, `KVM_CLOCK_TSC_STABLE`
    /// cleared as Firecracker does). Needs [`Vm::create_irqchip_and_pit`]. Pause every
    /// vCPU first, so the state is consistent with theirs.
    ///
    /// ```no_run
    /// # let kvm = kvm_ioctls::Kvm::new()?;
    /// # let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])?;
    /// let vm = ember_vm::Vm::new(&kvm, mem)?;
    /// vm.create_irqchip_and_pit()?;
    /// let state = vm.save_state()?;
    /// assert_eq!(state.ioapic.chip_id, kvm_bindings::KVM_IRQCHIP_IOAPIC);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let [pic_master, pic_slave, ioapic] = CHIPS.map(|(chip_id, name)| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd()
                .get_irqchip(&mut chip)
                .map(|()| chip)
                .map_err(|source| VmError::GetIrqchip { chip: name, source })
        });
        let (pic_master, pic_slave, ioapic) = (pic_master?, pic_slave?, ioapic?);
        let pit = self.fd().get_pit2().map_err(VmError::GetPit)?;
        let mut clock = self.fd().get_clock().map_err(VmError::GetClock)?;
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        Ok(VmState {
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock,
        })
    }

    /// Restores a state from [`Vm::save_state`] into this VM: the PIT (`KVM_SET_PIT2`),
    /// the kvmclock (`KVM_SET_CLOCK`), then both PICs and the IOAPIC
    /// (`KVM_SET_IRQCHIP`), in Firecracker's order.
    ///
    /// Call it on a new VM with [`Vm::create_irqchip_and_pit`] done, after the vCPUs'
    /// own state is restored and before they run. Each irqchip's `chip_id` is checked
    /// first ([`VmError::StateChipId`]: a state whose chips are missing or swapped sets
    /// nothing). `KVM_CLOCK_TSC_STABLE` is cleared before `KVM_SET_CLOCK` (it is only
    /// ever reported by `KVM_GET_CLOCK`); other flags are passed on, so with
    /// `KVM_CLOCK_REALTIME` (set by hosts with a TSC clocksource) KVM moves the clock on
    /// by the wall time since the save, as in Firecracker.
    ///
    /// ```no_run
    /// # let kvm = kvm_ioctls::Kvm::new()?;
    /// # let mem = || vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]);
    /// let old = ember_vm::Vm::new(&kvm, mem()?)?;
    /// old.create_irqchip_and_pit()?;
    /// let state = old.save_state()?;
    ///
    /// let new = ember_vm::Vm::new(&kvm, mem()?)?;
    /// new.create_irqchip_and_pit()?;
    /// // ... create the vCPUs and restore their state ...
    /// new.restore_state(&state)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let chips = [&state.pic_master, &state.pic_slave, &state.ioapic];
        for (chip, (expected, name)) in chips.iter().zip(CHIPS) {
            if chip.chip_id != expected {
                return Err(VmError::StateChipId {
                    chip: name,
                    found: chip.chip_id,
                    expected,
                });
            }
        }
        self.fd().set_pit2(&state.pit).map_err(VmError::SetPit)?;
        let mut clock = state.clock;
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        self.fd()
            .set_clock(&clock)
            .map_err(|source| VmError::SetClock {
                clock: clock.clock,
                flags: clock.flags,
                source,
            })?;
        for (chip, (_, name)) in chips.into_iter().zip(CHIPS) {
            self.fd()
                .set_irqchip(chip)
                .map_err(|source| VmError::SetIrqchip { chip: name, source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality_looks_at_every_irqchip_byte() {
        let chip = |chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        let state = VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER),
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE),
            ioapic: chip(KVM_IRQCHIP_IOAPIC),
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data::default(),
        };
        assert_eq!(state, state.clone());
        let mut other = state.clone();
        // SAFETY: every member of the zeroed union is plain data; the write keeps every
        // byte initialized.
        unsafe { other.ioapic.chip.ioapic.redirtbl[23].bits = 1 << 16 };
        assert_ne!(state, other);
        let mut other = state.clone();
        other.clock.clock = 1;
        assert_ne!(state, other);

        // A serde round trip keeps every byte.
        let bytes = postcard::to_stdvec(&other).unwrap();
        assert_eq!(postcard::from_bytes::<VmState>(&bytes).unwrap(), other);
    }
}

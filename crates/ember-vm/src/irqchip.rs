//! KVM's in-kernel interrupt controllers and timer.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;

use crate::VmError;

/// Creates KVM's in-kernel interrupt controllers (`KVM_CREATE_IRQCHIP`: two 8259 PICs,
/// an IOAPIC and a local APIC per vCPU) and then its 8254 PIT (`KVM_CREATE_PIT2` with
/// flags `KVM_PIT_SPEAKER_DUMMY`, so KVM also answers the PC-speaker port `0x61`).
///
/// **Call this before creating any vCPU**: KVM refuses `KVM_CREATE_IRQCHIP` once a
/// vCPU exists, and vCPUs created before it would have no in-kernel local APIC.
/// Call it once per VM: a second call fails with [`VmError::CreateIrqchip`]
/// (`EEXIST`). After it, legacy devices can inject GSIs 0..24 through irqfds
/// (e.g. `ember_arch::layout::COM1_GSI`).
///
/// ```no_run
/// let kvm = kvm_ioctls::Kvm::new().unwrap();
/// let vm = kvm.create_vm().unwrap();
/// ember_vm::create_irqchip_and_pit(&vm).unwrap();
/// let _vcpu = vm.create_vcpu(0).unwrap(); // only after the irqchip
/// ```
pub fn create_irqchip_and_pit(vm: &VmFd) -> Result<(), VmError> {
    vm.create_irq_chip().map_err(VmError::CreateIrqchip)?;
    let config = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(config).map_err(|source| VmError::CreatePit {
        flags: config.flags,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_irqchip_and_pit_once() {
        if !ember_guests::testing::kvm_available("creates_irqchip_and_pit_once") {
            return;
        }
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        create_irqchip_and_pit(&vm).unwrap();

        let err = create_irqchip_and_pit(&vm).unwrap_err();
        assert!(
            matches!(err, VmError::CreateIrqchip(ref e) if e.errno() == libc::EEXIST),
            "{err:?}"
        );
        assert!(err.to_string().contains("KVM_CREATE_IRQCHIP"));

        // The VM is usable afterwards: a vCPU gets an in-kernel LAPIC.
        let vcpu = vm.create_vcpu(0).unwrap();
        assert!(vcpu.get_lapic().is_ok());
    }
}

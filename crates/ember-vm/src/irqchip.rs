//! KVM's in-kernel interrupt controllers and timer.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};

use crate::{Vm, VmError};

impl<B> Vm<B> {
    /// Creates KVM's in-kernel interrupt controllers (`KVM_CREATE_IRQCHIP`: two 8259
    /// PICs, an IOAPIC and a local APIC per vCPU) and then its 8254 PIT
    /// (`KVM_CREATE_PIT2` with flags `KVM_PIT_SPEAKER_DUMMY`, so KVM also answers the
    /// PC-speaker port `0x61`).
    ///
    /// **Call this before creating any vCPU**: KVM refuses `KVM_CREATE_IRQCHIP` once a
    /// vCPU exists, and vCPUs created before it would have no in-kernel local APIC.
    /// Call it once per VM: a second call fails with [`VmError::CreateIrqchip`]
    /// (`EEXIST`). After it, devices can inject GSIs 0..24 through irqfds
    /// ([`Vm::register_irqfd`], e.g. with `ember_arch::layout::COM1_GSI`).
    ///
    /// ```no_run
    /// # let kvm = kvm_ioctls::Kvm::new()?;
    /// # let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])?;
    /// let vm = ember_vm::Vm::new(&kvm, mem)?;
    /// vm.create_irqchip_and_pit()?;
    /// let _vcpu = vm.fd().create_vcpu(0)?; // only after the irqchip
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn create_irqchip_and_pit(&self) -> Result<(), VmError> {
        self.fd()
            .create_irq_chip()
            .map_err(VmError::CreateIrqchip)?;
        let config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd()
            .create_pit2(config)
            .map_err(|source| VmError::CreatePit {
                flags: config.flags,
                source,
            })
    }
}

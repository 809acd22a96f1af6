//! VM-wide x86 state that must exist before vCPUs are created.

use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::VcpuError;

/// Guest physical address of the three pages KVM needs for the real-mode TSS on
/// Intel hosts. It lies in the MMIO hole, above anything Ember maps there.
pub const KVM_TSS_ADDRESS: u64 = ember_arch::layout::KVM_TSS_START;
/// Guest physical address of the identity-map page KVM uses for real mode on Intel.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = ember_arch::layout::KVM_IDENTITY_MAP_START;
/// Highest vCPU count Ember supports: APIC IDs are 8 bits in the MP table and in
/// CPUID leaf 1, and 0xff is the broadcast ID.
pub const MAX_VCPUS: u32 = 254;

/// Sets the TSS and identity-map addresses. Call once, before creating vCPUs.
pub fn setup_vm(vm: &VmFd) -> Result<(), VcpuError> {
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(|e| VcpuError::kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(|e| VcpuError::kvm("KVM_SET_TSS_ADDR", e))
}

/// The most vCPUs this host's KVM and Ember allow in one VM.
pub fn max_vcpus(kvm: &Kvm) -> u32 {
    let kvm_max = if kvm.check_extension(Cap::MaxVcpus) {
        kvm.get_max_vcpus()
    } else {
        kvm.get_nr_vcpus()
    };
    (kvm_max as u32).min(MAX_VCPUS)
}

/// Checks a requested vCPU count against [`max_vcpus`].
///
/// ```no_run
/// let kvm = kvm_ioctls::Kvm::new().unwrap();
/// assert!(ember_vcpu::vm::check_vcpu_count(&kvm, 0).is_err());
/// assert!(ember_vcpu::vm::check_vcpu_count(&kvm, 1).is_ok());
/// ```
pub fn check_vcpu_count(kvm: &Kvm, requested: u32) -> Result<(), VcpuError> {
    if requested == 0 {
        return Err(VcpuError::NoVcpus);
    }
    let max = max_vcpus(kvm);
    if requested > max {
        return Err(VcpuError::TooManyVcpus { requested, max });
    }
    if requested as usize > kvm.get_nr_vcpus() {
        log::warn!(
            "{requested} vCPUs is above this host's recommended maximum of {}",
            kvm.get_nr_vcpus()
        );
    }
    Ok(())
}

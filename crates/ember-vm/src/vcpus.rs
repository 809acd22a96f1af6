//! How many vCPUs a VM may have.

use kvm_ioctls::{Cap, Kvm};

use crate::VmError;

/// Highest vCPU count Ember supports: APIC IDs are 8 bits in the MP table and in
/// CPUID leaf 1, and 0xff is the broadcast ID.
pub const MAX_VCPUS: u32 = 254;

/// The most vCPUs this host's KVM (`KVM_CAP_MAX_VCPUS`, else `KVM_CAP_NR_VCPUS`) and
/// Ember ([`MAX_VCPUS`]) allow in one VM.
///
/// ```no_run
/// let kvm = kvm_ioctls::Kvm::new()?;
/// assert!((1..=ember_vm::MAX_VCPUS).contains(&ember_vm::max_vcpus(&kvm)));
/// # Ok::<(), kvm_ioctls::Error>(())
/// ```
pub fn max_vcpus(kvm: &Kvm) -> u32 {
    let kvm_max = if kvm.check_extension(Cap::MaxVcpus) {
        kvm.get_max_vcpus()
    } else {
        kvm.get_nr_vcpus()
    };
    u32::try_from(kvm_max).unwrap_or(u32::MAX).min(MAX_VCPUS)
}

/// Checks a requested vCPU count against [`max_vcpus`]; logs a warning above the
/// host's recommended count (`KVM_CAP_NR_VCPUS`), which still works.
///
/// ```no_run
/// use ember_vm::{check_vcpu_count, VmError};
/// let kvm = kvm_ioctls::Kvm::new()?;
/// assert!(matches!(check_vcpu_count(&kvm, 0), Err(VmError::NoVcpus)));
/// assert!(check_vcpu_count(&kvm, 1).is_ok());
/// # Ok::<(), kvm_ioctls::Error>(())
/// ```
pub fn check_vcpu_count(kvm: &Kvm, requested: u32) -> Result<(), VmError> {
    if requested == 0 {
        return Err(VmError::NoVcpus);
    }
    let max = max_vcpus(kvm);
    if requested > max {
        return Err(VmError::TooManyVcpus { requested, max });
    }
    let recommended = kvm.get_nr_vcpus();
    if requested as usize > recommended {
        log::warn!("{requested} vCPUs is above this host's recommended maximum of {recommended}");
    }
    Ok(())
}

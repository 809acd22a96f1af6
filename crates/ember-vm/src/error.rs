//! The error type of VM-level KVM calls.

/// Errors from creating a VM or from its VM-level KVM calls. Each names the call and the
/// value it was given.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A region does not own its host mapping, so nothing guarantees it outlives the VM.
    #[error(
        "guest memory region at {addr:#x} does not own its host mapping, so it cannot be \
         handed to KVM safely"
    )]
    UnownedRegion {
        /// Guest physical address of the region.
        addr: u64,
    },
    /// A memory slot number is at or above what KVM supports.
    #[error("memory slot {slot} is out of range: KVM supports slots below {limit}")]
    SlotOutOfRange {
        /// The slot that would have been used.
        slot: u32,
        /// KVM's slot count (`KVM_CAP_NR_MEMSLOTS`).
        limit: u32,
    },
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error(
        "KVM_SET_USER_MEMORY_REGION for slot {slot} (guest {addr:#x}, size {size:#x}) \
         failed: {source}"
    )]
    SetUserMemoryRegion {
        /// The slot being registered.
        slot: u32,
        /// Guest physical address of the region.
        addr: u64,
        /// Size of the region in bytes.
        size: u64,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// `KVM_CREATE_IRQCHIP` failed (for example because the VM already has one, or
    /// vCPUs were already created).
    #[error("KVM_CREATE_IRQCHIP failed")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_PIT2` failed (for example because the VM already has a PIT).
    #[error("KVM_CREATE_PIT2 with flags {flags:#x} failed")]
    CreatePit {
        /// The `kvm_pit_config.flags` passed.
        flags: u32,
        /// The error from KVM.
        #[source]
        source: kvm_ioctls::Error,
    },
}

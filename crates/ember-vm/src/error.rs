//! The error type of VM-level KVM calls.

use kvm_ioctls::IoEventAddress;

/// Errors from creating a VM or from its VM-level KVM calls. Each names the call and the
/// value it was given.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `KVM_CREATE_VM` failed.
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// `KVM_GET_VCPU_MMAP_SIZE` failed.
    #[error("KVM_GET_VCPU_MMAP_SIZE failed: {0}")]
    VcpuMmapSize(#[source] kvm_ioctls::Error),
    /// `KVM_SET_TSS_ADDR` failed.
    #[error("KVM_SET_TSS_ADDR at {addr:#x} failed: {source}")]
    SetTssAddress {
        /// The guest physical address given.
        addr: u64,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_IDENTITY_MAP_ADDR` failed.
    #[error("KVM_SET_IDENTITY_MAP_ADDR at {addr:#x} failed: {source}")]
    SetIdentityMapAddress {
        /// The guest physical address given.
        addr: u64,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// A region does not own its host mapping, so nothing guarantees it outlives the VM.
    #[error(
        "guest memory region at {addr:#x} does not own its host mapping, so it cannot be \
         handed to KVM safely"
    )]
    UnownedRegion {
        /// Guest physical address of the region.
        addr: u64,
    },
    /// The guest memory has more regions than KVM has memory slots.
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
    /// `KVM_IRQFD` (assigning or, with `assign: false`, deassigning) failed.
    #[error("KVM_IRQFD ({}) for GSI {gsi} failed: {source}", if *assign { "assign" } else { "deassign" })]
    Irqfd {
        /// The GSI given.
        gsi: u32,
        /// Whether the irqfd was being assigned (`false`: deassigned).
        assign: bool,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// `KVM_IOEVENTFD` (assigning or, with `assign: false`, deassigning) failed.
    #[error(
        "KVM_IOEVENTFD ({}) at {addr:x?} with datamatch {datamatch:?} failed: {source}",
        if *assign { "assign" } else { "deassign" }
    )]
    Ioeventfd {
        /// The address given.
        addr: IoEventAddress,
        /// The value given to match, if any.
        datamatch: Option<u64>,
        /// Whether the ioeventfd was being assigned (`false`: deassigned).
        assign: bool,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_USER_MEMORY_REGION` changing a slot's flags (turning the dirty log on or
    /// off) failed.
    #[error("KVM_SET_USER_MEMORY_REGION setting flags {flags:#x} on memory slot {slot} failed: {source}")]
    SetSlotFlags {
        /// The slot.
        slot: u32,
        /// The flags asked for (`KVM_MEM_LOG_DIRTY_PAGES` or 0).
        flags: u32,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// The dirty log was read while it is off.
    #[error("KVM's dirty log is off: turn it on with Vm::set_dirty_log(true) first")]
    DirtyLogDisabled,
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("KVM_GET_DIRTY_LOG for memory slot {slot} failed: {source}")]
    GetDirtyLog {
        /// The slot.
        slot: u32,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_IRQCHIP` failed (no in-kernel irqchip?).
    #[error("KVM_GET_IRQCHIP for the {chip} failed: {source}")]
    GetIrqchip {
        /// Which chip: "PIC master", "PIC slave" or "IOAPIC".
        chip: &'static str,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_IRQCHIP` failed.
    #[error("KVM_SET_IRQCHIP for the {chip} failed: {source}")]
    SetIrqchip {
        /// Which chip: "PIC master", "PIC slave" or "IOAPIC".
        chip: &'static str,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// A saved irqchip has the wrong `chip_id` (a corrupt or mismatched state).
    #[error("saved {chip} state has chip_id {found}, expected {expected}")]
    StateChipId {
        /// Which chip the state was for.
        chip: &'static str,
        /// The `chip_id` in the state.
        found: u32,
        /// The `chip_id` that chip has.
        expected: u32,
    },
    /// `KVM_GET_PIT2` failed (no PIT?).
    #[error("KVM_GET_PIT2 failed: {0}")]
    GetPit(#[source] kvm_ioctls::Error),
    /// `KVM_SET_PIT2` failed.
    #[error("KVM_SET_PIT2 failed: {0}")]
    SetPit(#[source] kvm_ioctls::Error),
    /// `KVM_GET_CLOCK` failed.
    #[error("KVM_GET_CLOCK failed: {0}")]
    GetClock(#[source] kvm_ioctls::Error),
    /// `KVM_SET_CLOCK` failed.
    #[error("KVM_SET_CLOCK to {clock} ns with flags {flags:#x} failed: {source}")]
    SetClock {
        /// The clock value given, in nanoseconds.
        clock: u64,
        /// The flags given.
        flags: u32,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// A VM needs at least one vCPU.
    #[error("a VM needs at least one vCPU (0 requested)")]
    NoVcpus,
    /// More vCPUs were asked for than this host's KVM (or Ember) supports.
    #[error("{requested} vCPUs requested, but at most {max} are supported here")]
    TooManyVcpus {
        /// Number asked for.
        requested: u32,
        /// Maximum supported.
        max: u32,
    },
}

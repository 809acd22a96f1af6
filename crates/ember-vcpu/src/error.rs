//! Errors from vCPU set-up and from running a vCPU.

use std::fmt;

/// Up to 15 bytes of the instruction a vCPU stopped on (15 is the x86 maximum length).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct InstructionBytes {
    bytes: [u8; 15],
    len: u8,
}

impl InstructionBytes {
    /// Keeps the first 15 bytes of `bytes`.
    ///
    /// ```
    /// let insn = ember_vcpu::InstructionBytes::new(&[0x0f, 0x0b]);
    /// assert_eq!(insn.as_slice(), &[0x0f, 0x0b]);
    /// assert_eq!(insn.to_string(), "0f 0b");
    /// ```
    pub fn new(bytes: &[u8]) -> Self {
        let mut insn = InstructionBytes::default();
        let len = bytes.len().min(insn.bytes.len());
        insn.bytes[..len].copy_from_slice(&bytes[..len]);
        insn.len = len as u8;
        insn
    }

    /// The bytes read; empty when the instruction's address could not be read.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl fmt::Display for InstructionBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.len == 0 {
            return f.write_str("unreadable");
        }
        for (i, b) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for InstructionBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{self}]")
    }
}

/// Errors from creating, configuring or running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed while setting up the VM or a vCPU.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The operation, e.g. `KVM_SET_CPUID2 on vCPU 1`.
        op: String,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// More vCPUs were asked for than this host's KVM (or Ember) supports.
    #[error("{requested} vCPUs requested, but at most {max} are supported here")]
    TooManyVcpus {
        /// Number asked for.
        requested: u32,
        /// Maximum supported.
        max: u32,
    },
    /// KVM accepted only some of the MSRs (boot MSRs, or a saved state's).
    #[error("KVM_SET_MSRS on vCPU {vcpu} set {set} of {total} MSRs; MSR {failed:#x} was refused")]
    MsrsRejected {
        /// vCPU index.
        vcpu: u32,
        /// How many MSRs were set.
        set: usize,
        /// How many were asked for.
        total: usize,
        /// The first MSR KVM refused.
        failed: u32,
    },
    /// The MSR list could not be built.
    #[error("cannot build the boot MSR list: {0:?}")]
    MsrList(vmm_sys_util::fam::Error),
    /// Writing the boot GDT or page tables into guest memory failed.
    #[error("cannot write the boot {what} at guest address {addr:#x}: {source}")]
    GuestMemory {
        /// Which structure, e.g. `GDT`.
        what: &'static str,
        /// Where it was being written.
        addr: u64,
        /// The underlying error.
        source: vm_memory::GuestMemoryError,
    },
    /// Mapping the vCPU's `kvm_run` area (`mmap` of the vCPU fd) failed.
    #[error("cannot map the kvm_run area of vCPU {vcpu} ({size} bytes): {source}")]
    MapRun {
        /// vCPU index.
        vcpu: u32,
        /// The size mapped (`KVM_GET_VCPU_MMAP_SIZE`).
        size: usize,
        /// The error from the OS.
        source: std::io::Error,
    },
    /// Installing the signal handler used to stop vCPUs failed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
    /// Spawning the vCPU thread failed.
    #[error("cannot spawn the thread for vCPU {vcpu}: {source}")]
    Spawn {
        /// vCPU index.
        vcpu: u32,
        /// The error from the OS.
        source: std::io::Error,
    },
    /// The vCPU thread's [start hook](crate::Vcpu::set_thread_hook) failed; the guest
    /// did not run on it.
    #[error("vCPU {vcpu}: the thread start hook failed: {source}")]
    ThreadStart {
        /// vCPU index.
        vcpu: u32,
        /// What the hook reported.
        source: std::io::Error,
    },
    /// The vCPU thread panicked.
    #[error("the thread of vCPU {vcpu} panicked")]
    ThreadPanicked {
        /// vCPU index.
        vcpu: u32,
    },
    /// `KVM_RUN` itself failed.
    #[error("KVM_RUN on vCPU {vcpu} failed: {source}")]
    Run {
        /// vCPU index.
        vcpu: u32,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// KVM could not enter the guest (`KVM_EXIT_FAIL_ENTRY`): usually an invalid
    /// register state.
    #[error(
        "vCPU {vcpu}: KVM could not enter the guest (hardware entry failure reason {reason:#x}, host CPU {cpu})"
    )]
    FailEntry {
        /// vCPU index.
        vcpu: u32,
        /// `hardware_entry_failure_reason` from KVM.
        reason: u64,
        /// Host CPU the entry failed on.
        cpu: u32,
    },
    /// KVM's instruction emulator met an instruction it cannot emulate
    /// (`KVM_EXIT_INTERNAL_ERROR`, suberror `KVM_INTERNAL_ERROR_EMULATION`).
    #[error(
        "vCPU {vcpu}: KVM cannot emulate the instruction at RIP {rip:#x} (bytes: {bytes}); \
         this host's KVM emulates guest kernel code and lacks this instruction: hide the \
         feature from the guest (CPUID, kernel parameters) or run on a host with hardware KVM"
    )]
    EmulationFailure {
        /// vCPU index.
        vcpu: u32,
        /// Guest RIP of the instruction.
        rip: u64,
        /// The instruction's bytes, read from guest memory.
        bytes: InstructionBytes,
    },
    /// Any other `KVM_EXIT_INTERNAL_ERROR`.
    #[error("vCPU {vcpu}: KVM internal error, suberror {suberror}, data {data:x?}")]
    InternalError {
        /// vCPU index.
        vcpu: u32,
        /// `internal.suberror`.
        suberror: u32,
        /// The first words of `internal.data`.
        data: [u64; 4],
    },
    /// The [syscall trap](crate::syscall_trap) could not be set up.
    #[error("syscall trap: {0}")]
    SyscallTrap(#[from] crate::syscall_trap::SyscallTrapError),
    /// An exit was answered (`Vcpu::complete_*`) that the vCPU is not stopped on.
    #[error(
        "vCPU {vcpu}: cannot answer a {expected} exit: the last exit was {}",
        crate::UnhandledExit::Other { reason: *actual }.name()
    )]
    NoPendingExit {
        /// vCPU index.
        vcpu: u32,
        /// The exit the answer was for, e.g. `KVM_EXIT_X86_RDMSR`.
        expected: &'static str,
        /// The `KVM_EXIT_*` number of the last exit.
        actual: u32,
    },
    /// The eventfd a [`VcpuGroup`](crate::VcpuGroup) learns of vCPUs ending through
    /// could not be created or shared.
    #[error("cannot create the eventfd that signals a vCPU's end: {0}")]
    EventFd(std::io::Error),
    /// Waiting for a [`VcpuGroup`](crate::VcpuGroup)'s events failed.
    #[error("waiting for the vCPUs to end (poll) failed: {0}")]
    Wait(std::io::Error),
    /// The vCPU is not paused, and the operation needs it to be
    /// ([`RunningVcpu::save_state`](crate::RunningVcpu::save_state)), or it was resumed
    /// while a pause was being waited for.
    #[error("vCPU {vcpu} is not paused")]
    NotPaused {
        /// vCPU index.
        vcpu: u32,
    },
    /// The vCPU's run loop has ended, so it cannot be paused or asked for its state.
    #[error("vCPU {vcpu}: its run loop has ended")]
    NotRunning {
        /// vCPU index.
        vcpu: u32,
    },
    /// [`RunningVcpu::pause`](crate::RunningVcpu::pause) (or `save_state`) was called on
    /// the vCPU's own thread (from a device or an exit handler), where it would wait for
    /// itself; use [`VcpuControl::request_pause`](crate::VcpuControl::request_pause) there.
    #[error("vCPU {vcpu}: cannot wait for a pause on the vCPU's own thread")]
    OnVcpuThread {
        /// vCPU index.
        vcpu: u32,
    },
    /// Completing the exit a vCPU stopped on (`KVM_RUN` with `immediate_exit` set, before
    /// saving its state) produced an exit that cannot be completed without running the
    /// guest.
    #[error("vCPU {vcpu}: completing the pending exit produced exit reason {reason}, which cannot be completed without running the guest")]
    PendingExit {
        /// vCPU index.
        vcpu: u32,
        /// The `KVM_EXIT_*` number.
        reason: u32,
    },
    /// The list of MSRs to save (`KVM_GET_MSR_INDEX_LIST` on `/dev/kvm`) was not
    /// available when the vCPU was created.
    #[error("vCPU {vcpu}: no MSR index list to save MSRs with: {reason}")]
    MsrIndexList {
        /// vCPU index.
        vcpu: u32,
        /// Why it is missing.
        reason: String,
    },
    /// A saved state's MSR list is longer than one `KVM_SET_MSRS` can take.
    #[error("vCPU {vcpu}: the saved state holds {count} MSRs, more than the {max} KVM takes")]
    TooManyMsrs {
        /// vCPU index.
        vcpu: u32,
        /// Entries in the state.
        count: usize,
        /// `KVM_MAX_MSR_ENTRIES`.
        max: usize,
    },
}

impl VcpuError {
    pub(crate) fn kvm(op: impl Into<String>, source: kvm_ioctls::Error) -> Self {
        VcpuError::Kvm {
            op: op.into(),
            source,
        }
    }
}

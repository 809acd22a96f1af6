//! The error type of the benchmark helpers.

use std::fmt;

use ember_bus::BusError;
use ember_guests::GuestError;
use ember_memory::MemoryError;
use ember_vcpu::VcpuError;

/// Everything that can go wrong while setting up or running a benchmark VM.
#[derive(Debug)]
pub enum Error {
    /// A KVM ioctl failed.
    Kvm {
        /// The operation, e.g. `KVM_CREATE_VM`.
        op: &'static str,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// Ember's vCPU set-up or run loop failed.
    Vcpu(VcpuError),
    /// Guest memory could not be created or registered.
    Memory(MemoryError),
    /// A VM-level KVM call failed.
    Vm(ember_vm::VmError),
    /// The guest did not assemble.
    Guest(GuestError),
    /// Writing the guest code into guest memory failed.
    GuestMemory(ember_memory::vm_memory::GuestMemoryError),
    /// Ember's ELF loader rejected the guest image.
    Load(ember_boot::ElfError),
    /// The guest image has no PVH entry note.
    NoPvhEntry,
    /// The trivial device could not be put on the bus.
    Bus(BusError),
    /// KVM accepted only `set` of the `total` boot MSRs.
    MsrsRejected {
        /// MSRs KVM set.
        set: usize,
        /// MSRs asked for.
        total: usize,
    },
    /// The guest stopped in a way the benchmark does not expect.
    UnexpectedExit {
        /// Which run loop saw it (`floor` or `ember`).
        side: &'static str,
        /// What it saw.
        exit: String,
    },
    /// A run loop saw a different number of exits than the guest was built to make.
    ExitCount {
        /// Which run loop (`floor` or `ember`).
        side: &'static str,
        /// Which counter disagreed.
        counter: &'static str,
        /// Exits the guest makes.
        expected: u64,
        /// Exits counted.
        seen: u64,
    },
    /// `getrusage` failed.
    Rusage(std::io::Error),
    /// Starting, waiting for or inspecting a VMM process failed.
    Process {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A VMM process did not behave as expected (exit status, output).
    Vmm(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Kvm { op, source } => write!(f, "{op} failed: {source}"),
            Error::Vcpu(e) => write!(f, "vCPU: {e}"),
            Error::Memory(e) => write!(f, "guest memory: {e}"),
            Error::Vm(e) => write!(f, "VM: {e}"),
            Error::Guest(e) => write!(f, "{e}"),
            Error::GuestMemory(e) => write!(f, "cannot load the guest code: {e}"),
            Error::Load(e) => write!(f, "cannot load the guest image: {e}"),
            Error::NoPvhEntry => write!(f, "the guest image has no PVH entry note"),
            Error::Bus(e) => write!(f, "cannot insert the benchmark device: {e}"),
            Error::MsrsRejected { set, total } => {
                write!(f, "KVM_SET_MSRS set only {set} of {total} boot MSRs")
            }
            Error::UnexpectedExit { side, exit } => {
                write!(f, "{side}: the guest stopped unexpectedly: {exit}")
            }
            Error::ExitCount {
                side,
                counter,
                expected,
                seen,
            } => write!(
                f,
                "{side}: {counter} counted {seen} exits, the guest makes {expected}"
            ),
            Error::Rusage(e) => write!(f, "getrusage failed: {e}"),
            Error::Process { what, source } => write!(f, "{what}: {source}"),
            Error::Vmm(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Kvm { source, .. } => Some(source),
            Error::Vcpu(e) => Some(e),
            Error::Memory(e) => Some(e),
            Error::Vm(e) => Some(e),
            Error::Guest(e) => Some(e),
            Error::GuestMemory(e) => Some(e),
            Error::Load(e) => Some(e),
            Error::Bus(e) => Some(e),
            Error::Rusage(e) => Some(e),
            Error::Process { source, .. } => Some(source),
            Error::MsrsRejected { .. }
            | Error::UnexpectedExit { .. }
            | Error::ExitCount { .. }
            | Error::NoPvhEntry
            | Error::Vmm(_) => None,
        }
    }
}

impl From<VcpuError> for Error {
    fn from(e: VcpuError) -> Self {
        Error::Vcpu(e)
    }
}

impl From<ember_vm::VmError> for Error {
    fn from(e: ember_vm::VmError) -> Self {
        Error::Vm(e)
    }
}

impl From<MemoryError> for Error {
    fn from(e: MemoryError) -> Self {
        Error::Memory(e)
    }
}

impl From<GuestError> for Error {
    fn from(e: GuestError) -> Self {
        Error::Guest(e)
    }
}

impl From<BusError> for Error {
    fn from(e: BusError) -> Self {
        Error::Bus(e)
    }
}

impl From<ember_memory::vm_memory::GuestMemoryError> for Error {
    fn from(e: ember_memory::vm_memory::GuestMemoryError) -> Self {
        Error::GuestMemory(e)
    }
}

impl From<ember_boot::ElfError> for Error {
    fn from(e: ember_boot::ElfError) -> Self {
        Error::Load(e)
    }
}

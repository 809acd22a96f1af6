//! A vCPU's saved state ([`VcpuState`]), what [`Vcpu::save_state`](crate::Vcpu::save_state)
//! returns and [`Vcpu::restore_state`](crate::Vcpu::restore_state) takes.
//!
//! Every KVM structure is kvm-bindings' own, serialised with its `serde` support (as
//! opaque bytes), so a state written by one process restores in another.
//!
//! What is saved, and the order of the restore (Firecracker's, for the same reasons):
//!
//! | field | saved with | restored with, in this order |
//! |---|---|---|
//! | `cpuid` | `KVM_GET_CPUID2` | `KVM_SET_CPUID2` (first: other ioctls depend on it) |
//! | `tsc_khz` | `KVM_GET_TSC_KHZ` | `KVM_SET_TSC_KHZ`, only if it differs from the vCPU's (before the TSC MSR) |
//! | `mp_state` | `KVM_GET_MP_STATE` (read first: it may change the LAPIC) | `KVM_SET_MP_STATE` |
//! | `regs` | `KVM_GET_REGS` | `KVM_SET_REGS` (clears pending exceptions: before the events) |
//! | `sregs` | `KVM_GET_SREGS` | `KVM_SET_SREGS` (holds the APIC base: before the LAPIC) |
//! | `xsave` | `KVM_GET_XSAVE` | `KVM_SET_XSAVE` |
//! | `xcrs` | `KVM_GET_XCRS` | `KVM_SET_XCRS` |
//! | `debugregs` | `KVM_GET_DEBUGREGS` | `KVM_SET_DEBUGREGS` |
//! | `lapic` | `KVM_GET_LAPIC` (`None` without the in-kernel irqchip) | `KVM_SET_LAPIC` (before the MSRs: TSC_DEADLINE needs it) |
//! | `msrs` | `KVM_GET_MSRS` (see [`msrs`](crate::msrs)) | `KVM_SET_MSRS`, all or an error |
//! | `events` | `KVM_GET_VCPU_EVENTS` (read last) | `KVM_SET_VCPU_EVENTS` (last) |
//! | `syscall_trap` | the run loop's [trap](crate::syscall_trap) state | the trap's state |

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs,
};
use serde::{Deserialize, Serialize};

pub use crate::syscall_trap::{SyscallTrapArmed, SyscallTrapVcpuState};

/// Everything about a vCPU that lives in KVM (and the few things the run loop keeps for
/// it), enough to continue the guest on a new vCPU of a new VM with the same memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index (and APIC ID).
    pub index: u32,
    /// Its CPUID.
    pub cpuid: CpuId,
    /// Its MSRs: those of [`msr_index_list`](crate::msrs::msr_index_list) KVM read.
    pub msrs: Msrs,
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (`KVM_GET_XSAVE`, 4 KiB).
    pub xsave: XsaveState,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// The local APIC's registers; `None` for a VM without the in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    /// Pending and injected exceptions, interrupts, NMIs and SMIs; interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for SIPI, ...
    pub mp_state: kvm_mp_state,
    /// DR0-DR3, DR6, DR7.
    pub debugregs: kvm_debugregs,
    /// The vCPU's TSC frequency in kHz; `None` where KVM does not say.
    pub tsc_khz: Option<u32>,
    /// The [syscall trap](crate::syscall_trap)'s state, where the vCPU had it on.
    pub syscall_trap: Option<SyscallTrapVcpuState>,
}

/// `kvm_xsave`, which kvm-bindings gives neither `Clone` nor `PartialEq` (it ends in a
/// flexible array, always empty for `KVM_GET_XSAVE`); serialised as kvm-bindings does.
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct XsaveState(pub kvm_xsave);

impl Clone for XsaveState {
    fn clone(&self) -> Self {
        XsaveState(kvm_xsave {
            region: self.0.region,
            ..Default::default()
        })
    }
}

impl PartialEq for XsaveState {
    fn eq(&self, other: &Self) -> bool {
        self.0.region == other.0.region
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xsave_clones_and_compares_by_its_region() {
        let mut a = XsaveState(kvm_xsave::default());
        a.0.region[7] = 0x1234_5678;
        let b = a.clone();
        assert_eq!(a, b);
        a.0.region[1023] = 1;
        assert_ne!(a, b);
    }

    #[test]
    fn xsave_serialises_as_its_bytes() {
        let mut a = XsaveState(kvm_xsave::default());
        a.0.region[0] = 0xdead_beef;
        a.0.region[1023] = 0x0102_0304;
        let bytes = postcard::to_stdvec(&a).unwrap();
        let b: XsaveState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(a, b);
        // A truncated encoding is an error, not a panic.
        assert!(postcard::from_bytes::<XsaveState>(&bytes[..100]).is_err());
    }
}

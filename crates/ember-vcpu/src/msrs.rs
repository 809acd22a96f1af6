//! The MSR values a vCPU starts with.

use kvm_bindings::{kvm_msr_entry, Msrs};

use crate::VcpuError;

/// MSR indices used at boot.
pub mod index {
    /// IA32_TSC.
    pub const IA32_TSC: u32 = 0x10;
    /// IA32_SYSENTER_CS.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// IA32_MISC_ENABLE.
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// IA32_MTRR_DEF_TYPE.
    pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    /// STAR (SYSCALL target segments).
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR (64-bit SYSCALL entry).
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR (compatibility-mode SYSCALL entry).
    pub const CSTAR: u32 = 0xc000_0083;
    /// SYSCALL_MASK (RFLAGS mask on SYSCALL).
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// KERNEL_GS_BASE.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// IA32_MISC_ENABLE bit 0: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_MTRR_DEF_TYPE: MTRRs enabled (bit 11), default type write-back (6).
const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 6;

/// The boot MSRs: SYSCALL/SYSENTER cleared, TSC at 0, fast strings on, and MTRRs
/// enabled with write-back as the default type, so a guest that never programs MTRRs
/// (Linux with no firmware) maps its RAM cacheable.
///
/// ```
/// let msrs = ember_vcpu::msrs::boot_msrs().unwrap();
/// assert!(msrs.as_slice().iter().any(|m| m.index == 0x2ff && m.data == 0x806));
/// ```
pub fn boot_msrs() -> Result<Msrs, VcpuError> {
    let entries = [
        (index::IA32_SYSENTER_CS, 0),
        (index::IA32_SYSENTER_ESP, 0),
        (index::IA32_SYSENTER_EIP, 0),
        (index::STAR, 0),
        (index::CSTAR, 0),
        (index::KERNEL_GS_BASE, 0),
        (index::SYSCALL_MASK, 0),
        (index::LSTAR, 0),
        (index::IA32_TSC, 0),
        (index::IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (index::IA32_MTRR_DEF_TYPE, MTRR_ENABLE_WRITE_BACK),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    Msrs::from_entries(&entries).map_err(VcpuError::MsrList)
}

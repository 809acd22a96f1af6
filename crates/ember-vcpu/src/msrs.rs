//! The MSR values a vCPU starts with, and the MSRs a snapshot saves.
//!
//! # Saving MSRs
//!
//! [`Vcpu::save_state`](crate::Vcpu::save_state) saves every MSR of
//! [`msr_index_list`] (`KVM_GET_MSR_INDEX_LIST`, with IA32_TSC_DEADLINE moved last so
//! that it is restored after IA32_TSC, as Firecracker orders them). It reads them with
//! one `KVM_GET_MSRS` ([`read_msrs`]); KVM stops at the first MSR it cannot read and
//! returns how many it read, so on a short count the prefix is kept, the MSR KVM
//! refused is skipped (logged at debug level) and the rest is read with another
//! `KVM_GET_MSRS`: the state holds exactly the MSRs KVM returned, in list order, and
//! restoring them (`KVM_SET_MSRS`) must set them all.

use std::sync::{Arc, OnceLock};

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_MSR_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

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
    /// IA32_TSC_DEADLINE (restored only after IA32_TSC).
    pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
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

/// The MSRs a snapshot saves: KVM's `KVM_GET_MSR_INDEX_LIST` (MSRs KVM saves and
/// restores, and the ones it emulates), with IA32_TSC_DEADLINE moved to the end, after
/// IA32_TSC.
///
/// ```no_run
/// let kvm = kvm_ioctls::Kvm::new().unwrap();
/// let list = ember_vcpu::msrs::msr_index_list(&kvm).unwrap();
/// assert!(list.contains(&ember_vcpu::msrs::index::IA32_TSC));
/// ```
pub fn msr_index_list(kvm: &Kvm) -> Result<Vec<u32>, VcpuError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| VcpuError::kvm("KVM_GET_MSR_INDEX_LIST", e))?;
    let mut list = list.as_slice().to_vec();
    if let Some(at) = list.iter().position(|&i| i == index::IA32_TSC_DEADLINE) {
        let deadline = list.remove(at);
        list.push(deadline);
    }
    Ok(list)
}

/// [`msr_index_list`] of this process's `/dev/kvm`, fetched once (by the first
/// [`Vcpu::new`](crate::Vcpu::new), on the thread creating vCPUs, so vCPU threads never
/// open `/dev/kvm`) and shared.
pub(crate) fn cached_msr_index_list() -> Result<Arc<[u32]>, String> {
    static LIST: OnceLock<Result<Arc<[u32]>, String>> = OnceLock::new();
    LIST.get_or_init(|| {
        let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
        msr_index_list(&kvm)
            .map(Arc::from)
            .map_err(|e| e.to_string())
    })
    .clone()
}

/// Reads the MSRs `indices` of vCPU `fd` (vCPU number `vcpu`, for errors): one
/// `KVM_GET_MSRS` for as many as KVM reads; where it stops short, the MSR it refused is
/// skipped and the rest read with another call (see the [module docs](self)). Returns
/// the MSRs read, in the order of `indices`, and the indices skipped.
pub fn read_msrs(fd: &VcpuFd, indices: &[u32], vcpu: u32) -> Result<(Msrs, Vec<u32>), VcpuError> {
    let mut read: Vec<kvm_msr_entry> = Vec::with_capacity(indices.len());
    let mut skipped = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(VcpuError::MsrList)?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|e| VcpuError::kvm(format!("KVM_GET_MSRS on vCPU {vcpu}"), e))?
            .min(chunk.len());
        read.extend_from_slice(&msrs.as_slice()[..n]);
        if n < chunk.len() {
            log::debug!(
                "vCPU {vcpu}: KVM_GET_MSRS read {n} of {} MSRs; skipping MSR {:#x}",
                chunk.len(),
                chunk[n]
            );
            skipped.push(chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    let msrs = Msrs::from_entries(&read).map_err(VcpuError::MsrList)?;
    Ok((msrs, skipped))
}

/// Writes `msrs` to vCPU `fd` with one `KVM_SET_MSRS`. Where KVM stops short, an MSR
/// it refuses to set to 0 is skipped (0 is every such MSR's reset value, so the new vCPU
/// already has it: KVM reads MSR_KVM_ASYNC_PF_INT as 0 without the in-kernel irqchip,
/// say, but refuses to write it) and the rest written with another call; any other
/// refusal fails naming the MSR.
pub(crate) fn write_msrs(fd: &VcpuFd, msrs: &Msrs, vcpu: u32) -> Result<(), VcpuError> {
    let all = msrs.as_slice();
    let mut rest = all;
    while !rest.is_empty() {
        let chunk = Msrs::from_entries(rest).map_err(VcpuError::MsrList)?;
        let set = fd
            .set_msrs(&chunk)
            .map_err(|e| VcpuError::kvm(format!("KVM_SET_MSRS on vCPU {vcpu}"), e))?;
        match rest.get(set) {
            None => return Ok(()),
            Some(refused) if refused.data == 0 => {
                log::debug!(
                    "vCPU {vcpu}: KVM_SET_MSRS refused MSR {:#x} = 0; skipped",
                    refused.index
                );
                rest = &rest[set + 1..];
            }
            Some(refused) => {
                return Err(VcpuError::MsrsRejected {
                    vcpu,
                    set: all.len() - rest.len() + set,
                    total: all.len(),
                    failed: refused.index,
                })
            }
        }
    }
    Ok(())
}

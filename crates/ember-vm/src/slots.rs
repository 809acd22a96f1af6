//! Registering guest memory with KVM as memory slots, and deleting the slots again.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, VmFd};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::VmError;

/// Registers every region of `mem` with KVM (`KVM_SET_USER_MEMORY_REGION`), one slot per
/// region, numbered from 0, with `flags` (0, or `KVM_MEM_LOG_DIRTY_PAGES`), and records
/// each in `registered` as soon as KVM has it.
///
/// The caller keeps `mem` (and so every region's mapping) alive, unmoved, until the
/// slots in `registered` are deleted with [`delete`]: [`crate::Vm`] does, by owning both
/// and deleting the slots when it is dropped.
pub(crate) fn register<B: Bitmap>(
    vm: &VmFd,
    mem: &GuestMemoryMmap<B>,
    flags: u32,
    registered: &mut Vec<kvm_userspace_memory_region>,
) -> Result<(), VmError> {
    // KVM reports how many slots it supports; slot numbers must be below that.
    let limit = u32::try_from(vm.check_extension_int(Cap::NrMemslots))
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or(u32::MAX);

    for (slot, region) in (0u32..).zip(mem.iter()) {
        let addr = region.start_addr().raw_value();
        let size = region.len();
        if !region.owned() {
            return Err(VmError::UnownedRegion { addr });
        }
        if slot >= limit {
            return Err(VmError::SlotOutOfRange { slot, limit });
        }
        let entry = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: addr,
            memory_size: size,
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: `userspace_addr` is the start of a live mapping of exactly `memory_size`
        // bytes that this region owns (checked above), so it stays mapped for as long as
        // the region lives. The caller keeps `mem` until the slot is deleted (see above),
        // and `Vm` deletes it only once no vCPU of ours can run, so KVM never reaches the
        // range after it is unmapped. Overlaps with other slots are rejected by KVM.
        unsafe { vm.set_user_memory_region(entry) }.map_err(|source| {
            VmError::SetUserMemoryRegion {
                slot,
                addr,
                size,
                source,
            }
        })?;
        registered.push(entry);
        log::debug!("memory slot {slot}: guest {addr:#x}, size {size:#x}");
    }
    Ok(())
}

/// Re-registers every slot in `registered` with `flags` (only the flags change: KVM
/// keeps the slot's memory, and `KVM_MEM_LOG_DIRTY_PAGES` turns its dirty log on or
/// off), updating `registered`. If KVM refuses one, the slots already changed get
/// their old flags back, so all slots keep the same flags.
pub(crate) fn set_flags(
    vm: &VmFd,
    registered: &mut [kvm_userspace_memory_region],
    flags: u32,
) -> Result<(), VmError> {
    for index in 0..registered.len() {
        let Some(&old) = registered.get(index) else {
            break;
        };
        let entry = kvm_userspace_memory_region { flags, ..old };
        // SAFETY: the same slot, guest range and host mapping KVM already has (see
        // `register`, which made it); only the flags differ.
        match unsafe { vm.set_user_memory_region(entry) } {
            Ok(()) => {
                if let Some(slot) = registered.get_mut(index) {
                    *slot = entry;
                }
            }
            Err(source) => {
                for changed in registered.iter_mut().take(index) {
                    let back = kvm_userspace_memory_region {
                        flags: old.flags,
                        ..*changed
                    };
                    // SAFETY: as above, back to the flags the slot had.
                    match unsafe { vm.set_user_memory_region(back) } {
                        Ok(()) => *changed = back,
                        Err(e) => {
                            log::error!("restoring the flags of memory slot {}: {e}", changed.slot)
                        }
                    }
                }
                return Err(VmError::SetSlotFlags {
                    slot: old.slot,
                    flags,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Deletes the slots in `registered` (`KVM_SET_USER_MEMORY_REGION` with size 0). When
/// that returns, KVM no longer reaches their memory, even from vCPUs still running.
/// Returns whether every slot was deleted.
pub(crate) fn delete(vm: &VmFd, registered: &[kvm_userspace_memory_region]) -> bool {
    let mut all = true;
    for entry in registered {
        let removal = kvm_userspace_memory_region {
            memory_size: 0,
            ..*entry
        };
        // SAFETY: a size of 0 deletes the slot; KVM reads no memory for it, and waits
        // until nothing in the kernel uses the old slot before returning.
        if let Err(e) = unsafe { vm.set_user_memory_region(removal) } {
            log::error!("deleting memory slot {}: {e}", entry.slot);
            all = false;
        }
    }
    all
}

//! Registering guest memory with KVM as memory slots.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::VmError;

/// Registers every region of `mem` with KVM (`KVM_SET_USER_MEMORY_REGION`), one slot per
/// region, numbered from `first_slot`. Returns the next free slot number.
///
/// A `VmFd` can outlive any borrow of `mem` (and vCPUs keep the VM alive on their own),
/// so this function keeps each registered region's host mapping alive for the rest of the
/// process: dropping `mem` afterwards does not unmap guest RAM. That is what makes it
/// sound for KVM to keep using the memory, and it matches a VMM process running one VM.
/// Regions that do not own their mapping are rejected, since their lifetime is not ours
/// to extend.
///
/// # Example
///
/// ```no_run
/// use ember_memory::{create_guest_memory, HugePages, MemoryLayout, MIB};
/// use ember_vm::register_memory_slots;
/// use kvm_ioctls::Kvm;
///
/// let vm = Kvm::new()?.create_vm()?;
/// let layout = MemoryLayout::new(512 * MIB)?;
/// let mem = create_guest_memory(&layout, HugePages::None)?;
/// let next_slot = register_memory_slots(&vm, &mem, 0)?;
/// assert_eq!(next_slot, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn register_memory_slots(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    first_slot: u32,
) -> Result<u32, VmError> {
    // KVM reports how many slots it supports; slot numbers must be below that.
    let limit = u32::try_from(vm.check_extension_int(Cap::NrMemslots))
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or(u32::MAX);

    let mut slot = first_slot;
    for region in mem.iter() {
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
            flags: 0,
            guest_phys_addr: addr,
            memory_size: size,
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: `userspace_addr` is the start of a live mapping of exactly `memory_size`
        // bytes owned by this region (checked above), and we hold `mem` borrowed until the
        // ioctl returns. Right after it we leak one strong reference to the mapping, so it
        // is never unmapped and its address range can never be reused for other data while
        // KVM may still access it, however long the VM lives. Overlaps with other slots are
        // rejected by KVM itself.
        unsafe { vm.set_user_memory_region(entry) }.map_err(|source| {
            VmError::SetUserMemoryRegion {
                slot,
                addr,
                size,
                source,
            }
        })?;
        std::mem::forget(region.get_mmap());
        log::debug!("memory slot {slot}: guest {addr:#x}, size {size:#x}");
        // Cannot overflow: slot < limit <= u32::MAX.
        slot += 1;
    }
    Ok(slot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_guests::testing::kvm_available;
    use ember_memory::{create_guest_memory, HugePages, MemoryLayout, GIB, MIB};
    use kvm_ioctls::Kvm;

    #[test]
    fn registers_slots_with_kvm() {
        if !kvm_available("registers_slots_with_kvm") {
            return;
        }
        let vm = Kvm::new().unwrap().create_vm().unwrap();

        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let mem = create_guest_memory(&layout, HugePages::None).unwrap();
        assert_eq!(register_memory_slots(&vm, &mem, 0).unwrap(), 1);

        // The same guest range again overlaps slot 0: KVM refuses, and the error says where.
        let err = register_memory_slots(&vm, &mem, 1).unwrap_err();
        assert!(
            matches!(err, VmError::SetUserMemoryRegion { slot: 1, addr: 0, size, .. } if size == 64 * MIB),
            "{err}"
        );

        // Guest RAM split around the hole takes two slots.
        let vm = Kvm::new().unwrap().create_vm().unwrap();
        let layout = MemoryLayout::new(4 * GIB).unwrap();
        let mem = create_guest_memory(&layout, HugePages::None).unwrap();
        assert_eq!(register_memory_slots(&vm, &mem, 3).unwrap(), 5);
    }

    #[test]
    fn rejects_slots_beyond_kvm_limit() {
        if !kvm_available("rejects_slots_beyond_kvm_limit") {
            return;
        }
        let kvm = Kvm::new().unwrap();
        let limit = u32::try_from(kvm.get_nr_memslots()).unwrap();
        let vm = kvm.create_vm().unwrap();
        let layout = MemoryLayout::new(16 * MIB).unwrap();
        let mem = create_guest_memory(&layout, HugePages::None).unwrap();
        let err = register_memory_slots(&vm, &mem, limit).unwrap_err();
        assert!(
            matches!(err, VmError::SlotOutOfRange { slot, limit: l } if slot == limit && l == limit),
            "{err}"
        );
    }
}

//! Dropping a VM gives its guest RAM back: many VMs created, touched and dropped in one
//! process leave the resident set where it was. Alone in this file, so that no other
//! test's allocations run in the same process while it measures.

use ember_guests::testing::{kvm_available, rss_bytes};
use ember_memory::{create_guest_memory, HugePages, MemoryLayout, MIB};
use ember_vm::Vm;
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};

/// Creates a VM with `size` bytes of RAM, writes to every page of it and drops it.
fn create_touch_drop(kvm: &Kvm, size: u64) {
    let layout = MemoryLayout::new(size).unwrap();
    let vm = Vm::new(kvm, create_guest_memory(&layout, HugePages::None).unwrap()).unwrap();
    vm.create_irqchip_and_pit().unwrap();
    let _vcpu = vm.fd().create_vcpu(0).unwrap();
    for page in (0..size).step_by(4096) {
        vm.memory().write_obj(1u8, GuestAddress(page)).unwrap();
    }
}

#[test]
fn creating_and_dropping_vms_keeps_rss_flat() {
    if !kvm_available("creating_and_dropping_vms_keeps_rss_flat") {
        return;
    }
    const VMS: u64 = 12;
    const SIZE: u64 = 64 * MIB;
    let kvm = Kvm::new().unwrap();
    // One VM first, so that one-time allocations (KVM's, the allocator's) are in the
    // baseline.
    create_touch_drop(&kvm, SIZE);
    let before = rss_bytes();
    for _ in 0..VMS {
        create_touch_drop(&kvm, SIZE);
    }
    let after = rss_bytes();
    // Leaking even one VM's RAM would add 64 MiB; 12 of them 768 MiB.
    assert!(
        after < before + 16 * MIB,
        "RSS grew from {} MiB to {} MiB over {VMS} VMs of {} MiB",
        before / MIB,
        after / MIB,
        SIZE / MIB
    );
}

//! `Vm` against real KVM: memory slots, irqchip, irqfds, ioeventfds, and what dropping
//! the last handle does.

use ember_guests::testing::kvm_available;
use ember_memory::{create_guest_memory, HugePages, MemoryLayout, GIB, MIB};
use ember_vm::{Vm, VmError};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuExit};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

fn memory(size: u64) -> GuestMemoryMmap {
    create_guest_memory(&MemoryLayout::new(size).unwrap(), HugePages::None).unwrap()
}

#[test]
fn registers_one_slot_per_region() {
    if !kvm_available("registers_one_slot_per_region") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm = Vm::new(&kvm, memory(64 * MIB)).unwrap();
    assert_eq!(vm.memory_slots(), 1);

    // KVM has slot 0 over guest RAM: a second slot over the same range is refused.
    let region = vm.memory().iter().next().unwrap();
    let overlapping = kvm_userspace_memory_region {
        slot: 1,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 0x1000,
        userspace_addr: region.as_ptr() as u64,
    };
    // SAFETY: the range is the start of the VM's own guest RAM, mapped for as long as
    // `vm` lives; KVM refuses the slot anyway, since it overlaps slot 0.
    let err = unsafe { vm.fd().set_user_memory_region(overlapping) }.unwrap_err();
    assert_eq!(err.errno(), libc::EEXIST);

    // Guest RAM split around the MMIO hole takes two slots.
    let vm = Vm::new(&kvm, memory(4 * GIB)).unwrap();
    assert_eq!(vm.memory_slots(), 2);
}

#[test]
fn rejects_a_region_that_does_not_own_its_mapping() {
    if !kvm_available("rejects_a_region_that_does_not_own_its_mapping") {
        return;
    }
    let owner = MmapRegion::<()>::new(0x10_0000).unwrap();
    // SAFETY: the range is `owner`'s mapping, with its protection and flags, and `owner`
    // outlives the borrowed region (both drop at the end of this test, the VM first).
    let borrowed = unsafe {
        MmapRegion::<()>::build_raw(owner.as_ptr(), owner.size(), owner.prot(), owner.flags())
    }
    .unwrap();
    let region = GuestRegionMmap::new(borrowed, GuestAddress(0x20_0000)).unwrap();
    let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
    let err = Vm::new(&Kvm::new().unwrap(), mem).unwrap_err();
    assert!(
        matches!(err, VmError::UnownedRegion { addr: 0x20_0000 }),
        "{err}"
    );
    assert!(err.to_string().contains("0x200000"), "{err}");
}

#[test]
fn creates_irqchip_and_pit_once() {
    if !kvm_available("creates_irqchip_and_pit_once") {
        return;
    }
    let vm = Vm::new(&Kvm::new().unwrap(), memory(16 * MIB)).unwrap();
    vm.create_irqchip_and_pit().unwrap();

    let err = vm.create_irqchip_and_pit().unwrap_err();
    assert!(
        matches!(err, VmError::CreateIrqchip(ref e) if e.errno() == libc::EEXIST),
        "{err:?}"
    );
    assert!(err.to_string().contains("KVM_CREATE_IRQCHIP"));

    // The VM is usable afterwards: a vCPU gets an in-kernel LAPIC.
    let vcpu = vm.fd().create_vcpu(0).unwrap();
    assert!(vcpu.get_lapic().is_ok());
}

#[test]
fn irqfds_and_ioeventfds_register_and_errors_name_the_target() {
    if !kvm_available("irqfds_and_ioeventfds_register_and_errors_name_the_target") {
        return;
    }
    let vm = Vm::new(&Kvm::new().unwrap(), memory(16 * MIB)).unwrap();
    vm.create_irqchip_and_pit().unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_irqfd(&irq, 4).unwrap();
    // The same eventfd twice is refused, and the error says which GSI.
    let err = vm.register_irqfd(&irq, 4).unwrap_err();
    assert!(
        matches!(
            err,
            VmError::Irqfd {
                gsi: 4,
                assign: true,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("KVM_IRQFD (assign) for GSI 4"),
        "{err}"
    );
    vm.unregister_irqfd(&irq, 4).unwrap();
    vm.register_irqfd(&irq, 4).unwrap();

    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let at = IoEventAddress::Mmio(0xd000_0050);
    vm.register_ioeventfd(&notify, at, 2u32).unwrap();
    let err = vm.register_ioeventfd(&notify, at, 2u32).unwrap_err();
    assert!(
        matches!(
            err,
            VmError::Ioeventfd {
                addr: IoEventAddress::Mmio(0xd000_0050),
                datamatch: Some(2),
                assign: true,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("Mmio(d0000050)"), "{err}");
    vm.unregister_ioeventfd(&notify, at, 2u32).unwrap();
    let pio = IoEventAddress::Pio(0x80);
    vm.register_ioeventfd(&notify, pio, NoDatamatch).unwrap();
    let err = vm.unregister_ioeventfd(&notify, at, 2u32).unwrap_err();
    assert!(
        matches!(err, VmError::Ioeventfd { assign: false, .. }),
        "{err}"
    );
}

#[test]
fn memory_with_a_dirty_bitmap() {
    if !kvm_available("memory_with_a_dirty_bitmap") {
        return;
    }
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)])
        .unwrap();
    let vm: Vm<AtomicBitmap> = Vm::new(&Kvm::new().unwrap(), mem).unwrap();
    vm.memory().write_obj(7u64, GuestAddress(0x5000)).unwrap();
    let region = vm.memory().find_region(GuestAddress(0)).unwrap();
    assert!(region.bitmap().dirty_at(0x5000));
    assert!(!region.bitmap().dirty_at(0x4000));
}

/// A vCPU made directly on the VM fd outlives the `Vm`: once the last handle is gone its
/// guest sees no RAM, so the unmapped memory is out of its reach.
#[test]
fn dropping_the_last_handle_deletes_the_slots() {
    if !kvm_available("dropping_the_last_handle_deletes_the_slots") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm = Vm::new(&kvm, memory(16 * MIB)).unwrap();
    let mut vcpu = vm.fd().create_vcpu(0).unwrap();
    // Real mode at 0x1000: `hlt`.
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    vm.memory().write_obj(0xf4u8, GuestAddress(0x1000)).unwrap();

    // A clone keeps everything: the guest still finds its `hlt`.
    let clone = vm.clone();
    drop(vm);
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
    regs.rip = 0x1000;
    vcpu.set_regs(&regs).unwrap();

    drop(clone);
    // No slot: the instruction fetch at 0x1000 reaches no RAM.
    match vcpu.run() {
        Ok(VcpuExit::Hlt) => panic!("the guest still executed from its RAM"),
        Ok(VcpuExit::MmioRead(addr, _)) => assert_eq!(addr, 0x1000),
        Ok(VcpuExit::InternalError) => {}
        other => panic!("unexpected exit {other:?}"),
    }
}

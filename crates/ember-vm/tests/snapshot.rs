//! Snapshot support against real KVM: VM-level state saved from one VM and restored into
//! another, and KVM's dirty log of the pages a guest writes.

use ember_guests::testing::kvm_available;
use ember_memory::{create_guest_memory, HugePages, MemoryLayout, GIB, MIB};
use ember_vm::{Vm, VmError, VmState};
use kvm_bindings::{kvm_clock_data, kvm_irqchip, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC};
use kvm_bindings::{KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn memory(size: u64) -> GuestMemoryMmap {
    create_guest_memory(&MemoryLayout::new(size).unwrap(), HugePages::None).unwrap()
}

fn vm_with_irqchip(kvm: &Kvm) -> Vm {
    let vm = Vm::new(kvm, memory(16 * MIB)).unwrap();
    vm.create_irqchip_and_pit().unwrap();
    vm
}

/// What must survive a save/restore exactly: the PIT's `count_load_time` is the host
/// time of the load, and the clock keeps ticking, so both are left out (the clock is
/// checked apart).
fn comparable(state: &VmState) -> VmState {
    let mut state = state.clone();
    for channel in &mut state.pit.channels {
        channel.count_load_time = 0;
    }
    state.clock = kvm_clock_data::default();
    state
}

const CLOCK_NS: u64 = 1_000_000_000_000; // 1000 s

/// Puts recognisable values into every part of the VM state.
fn set_distinct_state(vm: &Vm) {
    let fd = vm.fd();
    let mut master = kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    fd.get_irqchip(&mut master).unwrap();
    master.chip.pic.imr = 0x5a;
    master.chip.pic.irq_base = 0x20;
    fd.set_irqchip(&master).unwrap();
    let mut slave = kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_SLAVE,
        ..Default::default()
    };
    fd.get_irqchip(&mut slave).unwrap();
    slave.chip.pic.imr = 0xa5;
    slave.chip.pic.irq_base = 0x28;
    fd.set_irqchip(&slave).unwrap();
    let mut ioapic = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    fd.get_irqchip(&mut ioapic).unwrap();
    // SAFETY: the chip is an IOAPIC, so `ioapic` is the union member KVM filled; the
    // entry is plain data. Vector 0x33, masked (bit 16), so nothing is delivered.
    unsafe { ioapic.chip.ioapic.redirtbl[3].bits = (1 << 16) | 0x33 };
    fd.set_irqchip(&ioapic).unwrap();
    // Channel 2 (the speaker's) runs no timer in KVM and raises no interrupt.
    let mut pit = fd.get_pit2().unwrap();
    pit.channels[2].count = 0x1234;
    pit.channels[2].mode = 3;
    fd.set_pit2(&pit).unwrap();
    fd.set_clock(&kvm_clock_data {
        clock: CLOCK_NS,
        ..Default::default()
    })
    .unwrap();
}

#[test]
fn state_round_trips_into_a_second_vm() {
    if !kvm_available("state_round_trips_into_a_second_vm") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let first = vm_with_irqchip(&kvm);
    set_distinct_state(&first);
    let saved = first.save_state().unwrap();
    // SAFETY: reading plain-data union members KVM filled.
    unsafe {
        assert_eq!(saved.pic_master.chip.pic.imr, 0x5a);
        assert_eq!(saved.ioapic.chip.ioapic.redirtbl[3].bits, (1 << 16) | 0x33);
    }
    assert_eq!(saved.pit.channels[2].count, 0x1234);
    assert!(saved.clock.clock >= CLOCK_NS);
    assert_eq!(saved.clock.flags & KVM_CLOCK_TSC_STABLE, 0);

    // Through serde, as a snapshot file would carry it.
    let bytes = postcard::to_stdvec(&saved).unwrap();
    let loaded: VmState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(loaded, saved);

    let second = vm_with_irqchip(&kvm);
    let fresh = second.save_state().unwrap();
    assert_ne!(comparable(&fresh), comparable(&loaded));
    assert!(fresh.clock.clock < CLOCK_NS / 10);

    second.restore_state(&loaded).unwrap();
    let restored = second.save_state().unwrap();
    assert_eq!(comparable(&restored), comparable(&loaded));
    assert!(
        (loaded.clock.clock..loaded.clock.clock + 60_000_000_000).contains(&restored.clock.clock),
        "clock {} after restoring {}",
        restored.clock.clock,
        loaded.clock.clock
    );
}

#[test]
fn restore_rejects_a_state_with_swapped_chips() {
    if !kvm_available("restore_rejects_a_state_with_swapped_chips") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let first = vm_with_irqchip(&kvm);
    set_distinct_state(&first);
    let mut state = first.save_state().unwrap();
    std::mem::swap(&mut state.pic_slave, &mut state.ioapic);

    let second = vm_with_irqchip(&kvm);
    let before = second.save_state().unwrap();
    let err = second.restore_state(&state).unwrap_err();
    assert!(
        matches!(
            err,
            VmError::StateChipId {
                chip: "PIC slave",
                found: KVM_IRQCHIP_IOAPIC,
                expected: KVM_IRQCHIP_PIC_SLAVE
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "saved PIC slave state has chip_id 2, expected 1"
    );
    // Nothing was set, not even the PIT (restored before the chips).
    let after = second.save_state().unwrap();
    assert_eq!(comparable(&after), comparable(&before));
}

#[test]
fn save_needs_the_in_kernel_irqchip() {
    if !kvm_available("save_needs_the_in_kernel_irqchip") {
        return;
    }
    let vm = Vm::new(&Kvm::new().unwrap(), memory(16 * MIB)).unwrap();
    let err = vm.save_state().unwrap_err();
    assert!(
        matches!(
            err,
            VmError::GetIrqchip {
                chip: "PIC master",
                ..
            }
        ),
        "{err}"
    );
}

/// Pages the real-mode guest below writes: its only writes (no stack, no interrupts).
const TARGET_PAGES: [u64; 5] = [0x20, 0x21, 0x50, 0x9f, 0xfe];

/// Real-mode code at 0x1000: for each target page, `mov ax, page << 8; mov ds, ax;
/// mov byte [0], 0xa5`; then `hlt`.
fn guest_code() -> Vec<u8> {
    let mut code = Vec::new();
    for page in TARGET_PAGES {
        let segment = (page << 8) as u16; // segment * 16 = page * 4096
        code.push(0xb8); // mov ax, imm16
        code.extend_from_slice(&segment.to_le_bytes());
        code.extend_from_slice(&[0x8e, 0xd8]); // mov ds, ax
        code.extend_from_slice(&[0xc6, 0x06, 0x00, 0x00, 0xa5]); // mov byte [0], 0xa5
    }
    code.push(0xf4); // hlt
    code
}

/// Runs `guest_code` on a new vCPU of `vm` until its `hlt`.
fn run_guest(vm: &Vm) {
    let mut vcpu = vm.fd().create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    match vcpu.run().unwrap() {
        VcpuExit::Hlt => {}
        other => panic!("unexpected exit {other:?}"),
    }
}

/// The set bits of a dirty-log bitmap, as page numbers.
fn pages(words: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    for (index, &word) in words.iter().enumerate() {
        for bit in 0..64 {
            if word & (1 << bit) != 0 {
                out.push(index as u64 * 64 + bit);
            }
        }
    }
    out
}

#[test]
fn dirty_log_shows_exactly_the_pages_the_guest_wrote() {
    if !kvm_available("dirty_log_shows_exactly_the_pages_the_guest_wrote") {
        return;
    }
    let vm = Vm::new(&Kvm::new().unwrap(), memory(16 * MIB)).unwrap();
    vm.memory()
        .write_slice(&guest_code(), GuestAddress(0x1000))
        .unwrap();
    assert!(!vm.dirty_log_enabled());
    assert!(matches!(vm.dirty_log(), Err(VmError::DirtyLogDisabled)));

    vm.set_dirty_log(true).unwrap();
    assert!(vm.dirty_log_enabled());
    vm.set_dirty_log(true).unwrap(); // already on: nothing to do
                                     // The VMM's own writes are not KVM's to log.
    vm.memory().write_obj(1u8, GuestAddress(0x30_000)).unwrap();
    run_guest(&vm);
    for page in TARGET_PAGES {
        assert_eq!(
            vm.memory()
                .read_obj::<u8>(GuestAddress(page << 12))
                .unwrap(),
            0xa5
        );
    }

    let log = vm.dirty_log().unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].len(), (16 * MIB / 4096 / 64) as usize);
    assert_eq!(pages(&log[0]), TARGET_PAGES);
    // Reading cleared it.
    let again = vm.dirty_log().unwrap();
    assert_eq!(pages(&again[0]), Vec::<u64>::new());

    vm.set_dirty_log(false).unwrap();
    assert!(!vm.dirty_log_enabled());
    assert!(matches!(vm.dirty_log(), Err(VmError::DirtyLogDisabled)));
}

#[test]
fn dirty_log_from_the_start_covers_every_slot() {
    if !kvm_available("dirty_log_from_the_start_covers_every_slot") {
        return;
    }
    let vm = Vm::new_with_dirty_log(&Kvm::new().unwrap(), memory(3 * GIB + 16 * MIB)).unwrap();
    assert!(vm.dirty_log_enabled());
    let log = vm.dirty_log().unwrap();
    let sizes: Vec<usize> = log.iter().map(Vec::len).collect();
    assert_eq!(
        sizes,
        [
            (3 * GIB / 4096 / 64) as usize,
            (16 * MIB / 4096 / 64) as usize
        ]
    );
    assert!(log.iter().flatten().all(|&word| word == 0));

    // Turned off and on again, the guest's writes land in slot 0's log.
    vm.set_dirty_log(false).unwrap();
    vm.set_dirty_log(true).unwrap();
    vm.memory()
        .write_slice(&guest_code(), GuestAddress(0x1000))
        .unwrap();
    run_guest(&vm);
    let log = vm.dirty_log().unwrap();
    assert_eq!(pages(&log[0]), TARGET_PAGES);
    assert!(log[1].iter().all(|&word| word == 0));
}

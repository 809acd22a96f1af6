//! A vCPU keeps its VM's memory alive, and the memory goes once the VM and every vCPU
//! have: VMs created, run and dropped in one process leave the resident set where it
//! was. Alone in this file, so that no other test runs in the process while it
//! measures.

use std::sync::{Arc, Mutex};

use ember_bus::{Bus, BusDevice, BusKind};
use ember_guests::testing::{kvm_available, rss_bytes};
use ember_memory::{create_guest_memory, HugePages, MemoryLayout, MIB};
use ember_vcpu::{regs, BootRegs, Vcpu, VcpuOutcome};
use ember_vm::Vm;
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};

const CODE: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const PORT: u64 = 0x110;
const SIZE: u64 = 64 * MIB;

/// Keeps the last value written to it.
#[derive(Default)]
struct Last(Mutex<Option<u32>>);

impl BusDevice for Last {
    fn read(&self, _: u64, _: &mut [u8]) {}
    fn write(&self, _: u64, data: &[u8]) {
        if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            *self.0.lock().unwrap() = Some(u32::from_le_bytes(bytes));
        }
    }
}

/// A VM whose every page the VMM touches, and a vCPU that outlives the `Vm` handle:
/// its guest reads a value the VMM wrote after the handle was dropped, and reports it.
fn run_vm_past_its_handle(kvm: &Kvm, value: u32) {
    let layout = MemoryLayout::new(SIZE).unwrap();
    let vm = Vm::new(kvm, create_guest_memory(&layout, HugePages::None).unwrap()).unwrap();
    let mem = vm.memory();
    for page in (0..SIZE).step_by(4096) {
        mem.write_obj(1u8, GuestAddress(page)).unwrap();
    }
    regs::write_boot_tables(mem).unwrap();
    // mov eax, [DATA]; mov dx, PORT; out dx, eax; hlt
    let code = [
        0x8b, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, 0x66, 0xba, 0x10, 0x01, 0xef, 0xf4,
    ];
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();

    let last = Arc::new(Last::default());
    let pio = Arc::new(Bus::new(BusKind::Pio));
    pio.insert(PORT, 4, last.clone()).unwrap();
    let mut vcpu = Vcpu::new(&vm, 0, pio, Arc::new(Bus::new(BusKind::Mmio))).unwrap();
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    vcpu.set_cpuid(&supported, 1).unwrap();
    vcpu.set_boot_msrs().unwrap();
    vcpu.set_fpu().unwrap();
    vcpu.set_long_mode_entry(&BootRegs {
        entry: GuestAddress(CODE),
        stack: GuestAddress(regs::BOOT_STACK_POINTER),
        rsi: 0,
        rdi: 0,
    })
    .unwrap();

    // The vCPU's handle keeps the memory (and its slot) alive.
    let guest_memory = vcpu.vm().memory().clone();
    drop(vm);
    guest_memory.write_obj(value, GuestAddress(DATA)).unwrap();
    drop(guest_memory);
    assert_eq!(vcpu.run().unwrap(), VcpuOutcome::Halted);
    assert_eq!(*last.0.lock().unwrap(), Some(value));
}

#[test]
fn vms_and_vcpus_dropped_give_their_memory_back() {
    if !kvm_available("vms_and_vcpus_dropped_give_their_memory_back") {
        return;
    }
    const VMS: u32 = 12;
    let kvm = Kvm::new().unwrap();
    // One VM first, so that one-time allocations are in the baseline.
    run_vm_past_its_handle(&kvm, 0x1234);
    let before = rss_bytes();
    for i in 0..VMS {
        run_vm_past_its_handle(&kvm, 0x600d_0000 + i);
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

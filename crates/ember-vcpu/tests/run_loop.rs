//! The run loop against real KVM, with tiny guests assembled in Rust.
//!
//! Each guest runs at CPL0, which nested KVM hosts emulate one instruction at a time, so
//! they are a handful of instructions each.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_bus::{Bus, BusDevice, BusKind};
use ember_guests::asm::assemble;
use ember_guests::testing::kvm_available;
use ember_memory::{create_guest_memory, HugePages, MemoryLayout};
use ember_vcpu::{
    regs, BootRegs, ExitAction, ExitKind, GroupEvent, UnhandledExit, Vcpu, VcpuError, VcpuGroup,
    VcpuOutcome,
};
use ember_vm::Vm;
use iced_x86::code_asm::*;
use iced_x86::IcedError;
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};

const CODE: u64 = 0x10_0000;
/// Port where guests report values for the test to check.
const REPORT_PORT: u16 = 0x110;
const MMIO_BASE: u64 = 0xd000_0000;

/// Records every access; reads answer `0x10 + offset` in each byte.
#[derive(Default)]
struct Recorder(Mutex<Vec<(char, u64, Vec<u8>)>>);

impl Recorder {
    fn take(&self) -> Vec<(char, u64, Vec<u8>)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl BusDevice for Recorder {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0x10 + offset as u8);
        self.0.lock().unwrap().push(('r', offset, data.to_vec()));
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.0.lock().unwrap().push(('w', offset, data.to_vec()));
    }
}

struct TestVm {
    kvm: Kvm,
    vm: Vm,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    report: Arc<Recorder>,
}

impl TestVm {
    fn new(test: &str) -> Option<TestVm> {
        if !kvm_available(test) {
            return None;
        }
        let kvm = Kvm::new().unwrap();
        let layout = MemoryLayout::new(64 << 20).unwrap();
        let vm = Vm::new(&kvm, create_guest_memory(&layout, HugePages::None).unwrap()).unwrap();
        regs::write_boot_tables(vm.memory()).unwrap();
        let report = Arc::new(Recorder::default());
        let pio = Arc::new(Bus::new(BusKind::Pio));
        pio.insert(u64::from(REPORT_PORT), 16, report.clone())
            .unwrap();
        let mmio = Arc::new(Bus::new(BusKind::Mmio));
        Some(TestVm {
            kvm,
            vm,
            pio,
            mmio,
            report,
        })
    }

    fn load(&self, build: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) {
        let code = assemble(CODE, build).unwrap();
        self.vm
            .memory()
            .write_slice(&code, GuestAddress(CODE))
            .unwrap();
    }

    fn vcpu(&self, index: u32, count: u32) -> Vcpu {
        let vcpu = Vcpu::new(&self.vm, index, self.pio.clone(), self.mmio.clone()).unwrap();
        let supported = self
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        vcpu.set_cpuid(&supported, count).unwrap();
        vcpu.set_boot_msrs().unwrap();
        vcpu.set_fpu().unwrap();
        vcpu.set_long_mode_entry(&BootRegs {
            entry: GuestAddress(CODE),
            stack: GuestAddress(regs::BOOT_STACK_POINTER - 0x100 * u64::from(index)),
            rsi: 0,
            rdi: u64::from(index),
        })
        .unwrap();
        vcpu
    }
}

fn w(offset: u64, data: &[u8]) -> (char, u64, Vec<u8>) {
    ('w', offset, data.to_vec())
}

fn r(offset: u64, data: &[u8]) -> (char, u64, Vec<u8>) {
    ('r', offset, data.to_vec())
}

#[test]
fn pio_reaches_the_device_with_the_guest_width() {
    let Some(t) = TestVm::new("pio_reaches_the_device_with_the_guest_width") else {
        return;
    };
    let dev = Arc::new(Recorder::default());
    t.pio.insert(0x100, 8, dev.clone()).unwrap();
    t.load(|a| {
        a.mov(al, 0x11u32)?;
        a.mov(dx, 0x100u32)?;
        a.out(dx, al)?;
        a.mov(ax, 0x2233u32)?;
        a.mov(dx, 0x102u32)?;
        a.out(dx, ax)?;
        a.mov(eax, 0x4455_6677u32)?;
        a.mov(dx, 0x104u32)?;
        a.out(dx, eax)?;
        a.mov(dx, 0x101u32)?;
        a.in_(al, dx)?;
        a.mov(dx, 0x102u32)?;
        a.in_(ax, dx)?;
        a.mov(dx, 0x104u32)?;
        a.in_(eax, dx)?;
        // Echo the last read so the test sees what the guest got.
        a.mov(dx, REPORT_PORT as u32)?;
        a.out(dx, eax)?;
        a.hlt()
    });
    let mut vcpu = t.vcpu(0, 1);
    let stats = vcpu.stats();
    assert_eq!(vcpu.run().unwrap(), VcpuOutcome::Halted);
    assert_eq!(
        dev.take(),
        vec![
            w(0, &[0x11]),
            w(2, &[0x33, 0x22]),
            w(4, &[0x77, 0x66, 0x55, 0x44]),
            r(1, &[0x11]),
            r(2, &[0x12, 0x12]),
            r(4, &[0x14; 4]),
        ]
    );
    assert_eq!(t.report.take(), vec![w(0, &[0x14; 4])]);
    assert_eq!(stats.get(ExitKind::IoOut), 4);
    assert_eq!(stats.get(ExitKind::IoIn), 3);
    assert_eq!(stats.get(ExitKind::Hlt), 1);
}

#[test]
fn mmio_reaches_the_device_with_the_guest_width() {
    let Some(t) = TestVm::new("mmio_reaches_the_device_with_the_guest_width") else {
        return;
    };
    let dev = Arc::new(Recorder::default());
    t.mmio.insert(MMIO_BASE, 0x100, dev.clone()).unwrap();
    t.load(|a| {
        a.mov(rbx, MMIO_BASE)?;
        a.mov(byte_ptr(rbx), 0xa1u32)?;
        a.mov(word_ptr(rbx + 0x10), 0xb2b3u32)?;
        a.mov(dword_ptr(rbx + 0x20), 0xc4c5_c6c7u32)?;
        a.mov(rax, 0x0102_0304_0506_0708u64)?;
        a.mov(qword_ptr(rbx + 0x30), rax)?;
        a.mov(rax, qword_ptr(rbx + 0x08))?;
        a.mov(dx, REPORT_PORT as u32)?;
        a.out(dx, eax)?;
        a.movzx(eax, word_ptr(rbx + 0x02))?;
        a.out(dx, eax)?;
        a.hlt()
    });
    let mut vcpu = t.vcpu(0, 1);
    assert_eq!(vcpu.run().unwrap(), VcpuOutcome::Halted);
    assert_eq!(
        dev.take(),
        vec![
            w(0, &[0xa1]),
            w(0x10, &[0xb3, 0xb2]),
            w(0x20, &[0xc7, 0xc6, 0xc5, 0xc4]),
            w(0x30, &[8, 7, 6, 5, 4, 3, 2, 1]),
            r(0x08, &[0x18; 8]),
            r(0x02, &[0x12; 2]),
        ]
    );
    assert_eq!(
        t.report.take(),
        vec![w(0, &[0x18; 4]), w(0, &[0x12, 0x12, 0, 0])]
    );
    assert_eq!(vcpu.stats().get(ExitKind::MmioWrite), 4);
    assert_eq!(vcpu.stats().get(ExitKind::MmioRead), 2);
}

#[test]
fn unclaimed_reads_return_all_ones_and_writes_are_dropped() {
    let Some(t) = TestVm::new("unclaimed_reads_return_all_ones_and_writes_are_dropped") else {
        return;
    };
    t.load(|a| {
        a.mov(dx, 0x200u32)?;
        a.out(dx, al)?;
        a.in_(eax, dx)?;
        a.mov(dx, REPORT_PORT as u32)?;
        a.out(dx, eax)?;
        a.mov(rbx, MMIO_BASE + 0x1000)?;
        a.mov(dword_ptr(rbx), 1u32)?;
        a.mov(rax, qword_ptr(rbx))?;
        a.out(dx, eax)?;
        a.hlt()
    });
    let mut vcpu = t.vcpu(0, 1);
    assert_eq!(vcpu.run().unwrap(), VcpuOutcome::Halted);
    assert_eq!(t.report.take(), vec![w(0, &[0xff; 4]), w(0, &[0xff; 4])]);
    assert_eq!(t.pio.stats().unclaimed_reads, 1);
    assert_eq!(t.pio.stats().unclaimed_writes, 1);
    assert_eq!(t.mmio.stats().unclaimed_reads, 1);
    assert_eq!(t.mmio.stats().unclaimed_writes, 1);
}

#[test]
fn string_io_is_split_into_accesses() {
    let Some(t) = TestVm::new("string_io_is_split_into_accesses") else {
        return;
    };
    let dev = Arc::new(Recorder::default());
    t.pio.insert(0x100, 4, dev.clone()).unwrap();
    t.load(|a| {
        let mut text = a.create_label();
        a.lea(rsi, ptr(text))?;
        a.mov(ecx, 5u32)?;
        a.mov(dx, 0x100u32)?;
        a.rep().outsb()?;
        a.lea(rsi, ptr(text))?;
        a.mov(ecx, 2u32)?;
        a.mov(dx, 0x102u32)?;
        a.rep().outsw()?;
        a.hlt()?;
        a.set_label(&mut text)?;
        a.db(b"hello")
    });
    let mut vcpu = t.vcpu(0, 1);
    assert_eq!(vcpu.run().unwrap(), VcpuOutcome::Halted);
    let mut expected: Vec<_> = b"hello".iter().map(|&b| w(0, &[b])).collect();
    expected.push(w(2, b"he"));
    expected.push(w(2, b"ll"));
    assert_eq!(dev.take(), expected);
}

#[test]
fn two_vcpus_both_run_and_report_their_apic_ids() {
    let Some(t) = TestVm::new("two_vcpus_both_run_and_report_their_apic_ids") else {
        return;
    };
    t.load(|a| {
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.shr(ebx, 24u32)?;
        a.mov(eax, ebx)?;
        a.shl(eax, 8u32)?;
        a.or(eax, edi)?; // vCPU index in the low byte, APIC ID in the next
        a.mov(dx, REPORT_PORT as u32)?;
        a.out(dx, ax)?;
        a.hlt()
    });
    let vcpus: Vec<_> = (0..2).map(|i| t.vcpu(i, 2)).collect();
    let running: Vec<_> = vcpus.into_iter().map(|v| v.spawn(None).unwrap()).collect();
    for r in running {
        assert_eq!(r.join().unwrap(), VcpuOutcome::Halted);
    }
    let mut seen = t.report.take();
    seen.sort();
    assert_eq!(seen, vec![w(0, &[0, 0]), w(0, &[1, 1])]);
}

/// The thread hook runs first, on the vCPU's own thread; a failing hook ends the thread
/// before the guest runs a single instruction.
#[test]
fn thread_hook_runs_first_and_a_failing_one_keeps_the_guest_from_running() {
    let Some(t) =
        TestVm::new("thread_hook_runs_first_and_a_failing_one_keeps_the_guest_from_running")
    else {
        return;
    };
    t.load(|a| {
        a.mov(dx, REPORT_PORT as u32)?;
        a.out(dx, al)?;
        a.hlt()
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let mut vcpu = t.vcpu(0, 2);
    vcpu.set_thread_hook(Some(Arc::new(move |index| {
        let name = std::thread::current().name().map(str::to_owned);
        record.lock().unwrap().push((index, name));
        Ok(())
    })));
    assert_eq!(
        vcpu.spawn(None).unwrap().join().unwrap(),
        VcpuOutcome::Halted
    );
    assert_eq!(
        *seen.lock().unwrap(),
        [(0, Some("ember-vcpu-0".to_owned()))]
    );
    assert_eq!(t.report.take().len(), 1, "the guest ran once");

    // A second vCPU of the same VM (index 0 is taken).
    let mut vcpu = t.vcpu(1, 2);
    vcpu.set_thread_hook(Some(Arc::new(|_| Err(std::io::Error::other("no filter")))));
    match vcpu.spawn(None).unwrap().join() {
        Err(VcpuError::ThreadStart { vcpu: 1, source }) => {
            assert_eq!(source.to_string(), "no filter")
        }
        other => panic!("expected ThreadStart, got {other:?}"),
    }
    assert!(t.report.take().is_empty(), "the guest ran");
}

#[test]
fn stop_a_spinning_vcpu_from_another_thread() {
    let Some(t) = TestVm::new("stop_a_spinning_vcpu_from_another_thread") else {
        return;
    };
    t.load(|a| {
        let mut spin = a.create_label();
        a.mov(dx, REPORT_PORT as u32)?;
        a.set_label(&mut spin)?;
        a.out(dx, al)?;
        a.jmp(spin)
    });
    let vcpu = t.vcpu(0, 1).spawn(None).unwrap();
    // Wait until the guest is demonstrably running.
    let deadline = Instant::now() + Duration::from_secs(10);
    while vcpu.stats().get(ExitKind::IoOut) < 10 {
        assert!(Instant::now() < deadline, "guest never ran");
        std::thread::sleep(Duration::from_millis(1));
    }
    let stopper = Arc::new(vcpu);
    let remote = Arc::clone(&stopper);
    std::thread::spawn(move || remote.stop()).join().unwrap();
    let vcpu = Arc::into_inner(stopper).unwrap();
    assert_eq!(vcpu.join().unwrap(), VcpuOutcome::Stopped);
}

#[test]
fn stop_is_race_free_even_right_after_spawn() {
    let Some(t) = TestVm::new("stop_is_race_free_even_right_after_spawn") else {
        return;
    };
    // A guest that never exits on its own: with nothing to dispatch, only the kick
    // can get the thread out of KVM_RUN.
    t.load(|a| {
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.jmp(spin)
    });
    for i in 0..20 {
        let vcpu = t.vcpu(i, 20).spawn(None).unwrap();
        if i % 2 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
        vcpu.stop();
        assert_eq!(vcpu.join().unwrap(), VcpuOutcome::Stopped, "vCPU {i}");
    }
}

#[test]
fn stop_a_vcpu_halted_in_the_kernel() {
    let Some(t) = TestVm::new("stop_a_vcpu_halted_in_the_kernel") else {
        return;
    };
    // With the in-kernel irqchip, hlt does not exit to userspace: the vCPU sleeps in
    // KVM until the kick arrives.
    t.vm.create_irqchip_and_pit().unwrap();
    t.load(|a| {
        a.mov(dx, REPORT_PORT as u32)?;
        a.out(dx, al)?;
        a.cli()?;
        a.hlt()
    });
    let done = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let vcpu = t.vcpu(0, 1);
    vcpu.set_lapic().unwrap();
    let vcpu = vcpu.spawn(Some(done.try_clone().unwrap())).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.report.0.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "guest never ran");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    assert!(!vcpu.is_finished());
    vcpu.stop();
    assert_eq!(vcpu.join().unwrap(), VcpuOutcome::Stopped);
    assert_eq!(
        done.read().unwrap(),
        1,
        "the done event is written when the loop ends"
    );
}

#[test]
fn triple_fault_is_a_shutdown_outcome() {
    let Some(t) = TestVm::new("triple_fault_is_a_shutdown_outcome") else {
        return;
    };
    // ud2 with an empty IDT: #UD, then #GP, then #DF all fail: triple fault.
    t.load(|a| a.ud2());
    let mut vcpu = t.vcpu(0, 1);
    assert_eq!(vcpu.run().unwrap(), VcpuOutcome::Shutdown);
    assert_eq!(vcpu.stats().get(ExitKind::Shutdown), 1);
}

#[test]
fn executing_from_mmio_is_a_clean_emulation_failure() {
    let Some(t) = TestVm::new("executing_from_mmio_is_a_clean_emulation_failure") else {
        return;
    };
    // Jumping into the MMIO hole makes KVM fetch an instruction with no memory behind
    // it, which every KVM reports as an emulation failure.
    t.load(|a| {
        a.mov(rax, MMIO_BASE)?;
        a.jmp(rax)
    });
    let mut vcpu = t.vcpu(0, 1);
    match vcpu.run() {
        Err(
            e @ VcpuError::EmulationFailure {
                vcpu: 0,
                rip: MMIO_BASE,
                ..
            },
        ) => {
            let msg = e.to_string();
            assert!(msg.contains("RIP 0xd0000000"), "{msg}");
            assert!(msg.contains("bytes: unreadable"), "{msg}");
        }
        other => panic!("expected an emulation failure at {MMIO_BASE:#x}, got {other:?}"),
    }
    assert_eq!(vcpu.stats().get(ExitKind::InternalError), 1);
}

/// Whether guest kernel code is run by KVM's instruction emulator (nested PVM).
fn kernel_code_is_emulated() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

#[test]
fn unemulatable_instruction_reports_rip_and_bytes() {
    let Some(t) = TestVm::new("unemulatable_instruction_reports_rip_and_bytes") else {
        return;
    };
    t.load(|a| {
        a.nop()?;
        a.int3()
    });
    let mut vcpu = t.vcpu(0, 1);
    let result = vcpu.run();
    if kernel_code_is_emulated() {
        match result {
            Err(VcpuError::EmulationFailure { rip, bytes, .. }) => {
                assert_eq!(rip, CODE + 1);
                assert_eq!(bytes.as_slice()[0], 0xcc, "{bytes}");
            }
            other => panic!("expected an emulation failure on int3, got {other:?}"),
        }
    } else {
        // Hardware KVM runs int3: #BP with an empty IDT triple-faults.
        assert_eq!(result.unwrap(), VcpuOutcome::Shutdown);
    }
}

#[test]
fn pvh_entry_starts_in_32_bit_protected_mode() {
    let Some(t) = TestVm::new("pvh_entry_starts_in_32_bit_protected_mode") else {
        return;
    };
    // Assembled as 32-bit code: in 64-bit mode `dec eax` (0x48) would be a REX prefix
    // and the report below would differ.
    let mut a = CodeAssembler::new(32).unwrap();
    a.mov(eax, ebx).unwrap();
    a.dec(eax).unwrap();
    a.mov(dx, REPORT_PORT as u32).unwrap();
    a.out(dx, eax).unwrap();
    a.mov(eax, cr0).unwrap();
    a.out(dx, eax).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    t.vm.memory()
        .write_slice(&code, GuestAddress(CODE))
        .unwrap();
    let vcpu = t.vcpu(0, 1);
    vcpu.set_pvh_entry(GuestAddress(CODE), GuestAddress(0x6000))
        .unwrap();
    let mut vcpu = vcpu;
    assert_eq!(vcpu.run().unwrap(), VcpuOutcome::Halted);
    let report = t.report.take();
    assert_eq!(report[0], w(0, &0x5fffu32.to_le_bytes()));
    let cr0_value = u32::from_le_bytes(report[1].2.clone().try_into().unwrap());
    assert_eq!(cr0_value & 1, 1, "protected mode");
    assert_eq!(cr0_value & (1 << 31), 0, "paging off");
}

#[test]
fn too_many_vcpus_is_an_error() {
    let Some(t) = TestVm::new("too_many_vcpus_is_an_error") else {
        return;
    };
    assert!(matches!(
        ember_vm::check_vcpu_count(&t.kvm, 0),
        Err(ember_vm::VmError::NoVcpus)
    ));
    assert!(ember_vm::check_vcpu_count(&t.kvm, 1).is_ok());
    let max = ember_vm::max_vcpus(&t.kvm);
    match ember_vm::check_vcpu_count(&t.kvm, max + 1) {
        Err(e @ ember_vm::VmError::TooManyVcpus { .. }) => {
            assert!(e.to_string().contains(&format!("at most {max}")), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Instruction fallback: each instruction it completes, in a long-mode guest with an IDT,
// checked against what the CPU does. On hardware KVM the CPU runs these instructions and
// the fallback is never called; the guest-visible results must be the same either way.

/// Where the tests' IDT goes (inside the identity map, clear of code and boot tables).
const IDT: u64 = 0x20_0000;
/// Exception handlers: one 0x80-byte slot per vector from here.
const HANDLERS: u64 = CODE + 0x1000;
/// Report offsets (from `REPORT_PORT`): a marker from the main code, the vector an
/// exception handler ran for, and the return RIP it found on its stack.
const MARK: u64 = 0;
const VECTOR: u64 = 4;
const RETURN_RIP: u64 = 8;

fn w32(offset: u64, value: u32) -> (char, u64, Vec<u8>) {
    w(offset, &value.to_le_bytes())
}

impl TestVm {
    /// A vCPU with the instruction fallback on and an IDT whose handlers for `vectors`
    /// report the vector and their return RIP, run `then` (e.g. step over the faulting
    /// instruction) and return with `iretq`.
    fn vcpu_with_idt(
        &self,
        vectors: &[u8],
        then: impl Fn(u8, &mut CodeAssembler) -> Result<(), IcedError>,
    ) -> Vcpu {
        for &vector in vectors {
            let handler = HANDLERS + 0x80 * u64::from(vector);
            let code = assemble(handler, |a| {
                a.push(rax)?;
                a.push(rdx)?;
                a.mov(eax, u32::from(vector))?;
                a.mov(dx, (u64::from(REPORT_PORT) + VECTOR) as u32)?;
                a.out(dx, eax)?;
                a.mov(rax, qword_ptr(rsp + 16))?;
                a.mov(dx, (u64::from(REPORT_PORT) + RETURN_RIP) as u32)?;
                a.out(dx, eax)?;
                a.pop(rdx)?;
                a.pop(rax)?;
                then(vector, a)?;
                a.iretq()
            })
            .unwrap();
            assert!(code.len() <= 0x80);
            self.vm
                .memory()
                .write_slice(&code, GuestAddress(handler))
                .unwrap();
            // 64-bit interrupt gate: present, DPL 0, kernel code selector.
            let mut gate = [0u8; 16];
            gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
            gate[2..4].copy_from_slice(&regs::selector::KERNEL_CODE.to_le_bytes());
            gate[5] = 0x8e;
            gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
            gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
            self.vm
                .memory()
                .write_slice(&gate, GuestAddress(IDT + 16 * u64::from(vector)))
                .unwrap();
        }
        let mut vcpu = self.vcpu(0, 1);
        let mut sregs = vcpu.fd().get_sregs().unwrap();
        sregs.idt.base = IDT;
        sregs.idt.limit = 256 * 16 - 1;
        vcpu.fd().set_sregs(&sregs).unwrap();
        vcpu.set_instruction_fallback(true);
        vcpu
    }
}

/// Length of the code `build` assembles at `CODE`: where the next instruction starts.
fn code_len(build: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> u32 {
    assemble(CODE, build).unwrap().len() as u32
}

/// The fallback's count of `kind`: the instructions must have gone through it where the
/// host cannot run them, and never reach it on hardware KVM.
fn assert_fallback_count(vcpu_stats: &ember_vcpu::ExitStats, kind: ExitKind, emulated: u64) {
    let expected = if kernel_code_is_emulated() {
        emulated
    } else {
        0
    };
    assert_eq!(vcpu_stats.get(kind), expected, "{}", kind.name());
}

#[test]
fn fallback_int3_delivers_bp_with_the_return_rip_after_it() {
    let Some(t) = TestVm::new("fallback_int3_delivers_bp_with_the_return_rip_after_it") else {
        return;
    };
    // The #BP handler counts in ebx and returns.
    let mut vcpu = t.vcpu_with_idt(&[3], |_, a| a.inc(ebx));
    t.load(|a| {
        a.xor(ebx, ebx)?;
        a.int3()?;
        a.int3()?;
        a.mov(eax, ebx)?;
        a.mov(dx, u32::from(REPORT_PORT))?;
        a.out(dx, eax)?;
        a.hlt()
    });
    let after_first = CODE as u32
        + code_len(|a| {
            a.xor(ebx, ebx)?;
            a.int3()
        });
    let stats = vcpu.stats();
    assert_eq!(vcpu.run().unwrap(), VcpuOutcome::Halted);
    assert_eq!(
        t.report.take(),
        vec![
            w32(VECTOR, 3),
            w32(RETURN_RIP, after_first),
            w32(VECTOR, 3),
            w32(RETURN_RIP, after_first + 1),
            w32(MARK, 2),
        ]
    );
    assert_fallback_count(&stats, ExitKind::FallbackInt3, 2);
    assert_eq!(stats.get(ExitKind::InternalError), 0);
}

#[test]
fn fallback_fwait_without_pending_x87_exceptions_goes_on() {
    let Some(t) = TestVm::new("fallback_fwait_without_pending_x87_exceptions_goes_on") else {
        return;
    };
    // Any exception here would be a bug: report it and stop.
    let mut vcpu = t.vcpu_with_idt(&[6, 7, 13, 16], |_, a| a.hlt());
    t.load(|a| {
        a.wait()?; // fwait (9b)
        a.mov(eax, 0x1234u32)?;
        a.mov(dx, u32::from(REPORT_PORT))?;
        a.out(dx, eax)?;
        a.hlt()
    });
    let stats = vcpu.stats();
    assert_eq!(vcpu.run().unwrap(), VcpuOutcome::Halted);
    assert_eq!(t.report.take(), vec![w32(MARK, 0x1234)]);
    assert_fallback_count(&stats, ExitKind::FallbackFwait, 1);
}

#[test]
fn fallback_fwait_raises_mf_at_the_fwait_for_a_pending_unmasked_exception() {
    let Some(t) =
        TestVm::new("fallback_fwait_raises_mf_at_the_fwait_for_a_pending_unmasked_exception")
    else {
        return;
    };
    // The #MF handler steps over the fwait (the x87 state stays as it is).
    let mut vcpu = t.vcpu_with_idt(&[16], |_, a| a.add(qword_ptr(rsp), 1));
    // Zero-divide flagged (FSW.ZE and ES) and unmasked (FCW.ZM clear), as if an `fdiv`
    // by zero had just run. CR0.NE is set by the boot registers.
    let mut fpu = vcpu.fd().get_fpu().unwrap();
    fpu.fcw = 0x037b;
    fpu.fsw = 0x0084;
    vcpu.fd().set_fpu(&fpu).unwrap();
    t.load(|a| {
        a.nop()?;
        a.wait()?; // fwait (9b)
        a.mov(eax, 0x1234u32)?;
        a.mov(dx, u32::from(REPORT_PORT))?;
        a.out(dx, eax)?;
        a.hlt()
    });
    let stats = vcpu.stats();
    assert_eq!(vcpu.run().unwrap(), VcpuOutcome::Halted);
    assert_eq!(
        t.report.take(),
        vec![
            w32(VECTOR, 16),
            w32(RETURN_RIP, CODE as u32 + 1), // a fault: the fwait itself
            w32(MARK, 0x1234),
        ]
    );
    assert_fallback_count(&stats, ExitKind::FallbackFwait, 1);
}

#[test]
fn fallback_fwait_raises_nm_when_cr0_mp_and_ts_are_set() {
    let Some(t) = TestVm::new("fallback_fwait_raises_nm_when_cr0_mp_and_ts_are_set") else {
        return;
    };
    // The #NM handler clears CR0.TS, as an OS restoring the FPU would, and returns to
    // the fwait, which then runs.
    let mut vcpu = t.vcpu_with_idt(&[7], |_, a| a.clts());
    let mut sregs = vcpu.fd().get_sregs().unwrap();
    assert_ne!(sregs.cr0 & 2, 0, "CR0.MP is set by the boot registers");
    sregs.cr0 |= 1 << 3; // TS
    vcpu.fd().set_sregs(&sregs).unwrap();
    t.load(|a| {
        a.nop()?;
        a.wait()?; // fwait (9b)
        a.mov(eax, 0x1234u32)?;
        a.mov(dx, u32::from(REPORT_PORT))?;
        a.out(dx, eax)?;
        a.hlt()
    });
    let stats = vcpu.stats();
    assert_eq!(vcpu.run().unwrap(), VcpuOutcome::Halted);
    assert_eq!(
        t.report.take(),
        vec![
            w32(VECTOR, 7),
            w32(RETURN_RIP, CODE as u32 + 1),
            w32(MARK, 0x1234),
        ]
    );
    assert_fallback_count(&stats, ExitKind::FallbackFwait, 2);
}

#[test]
fn fallback_reports_what_it_does_not_handle() {
    let Some(t) = TestVm::new("fallback_reports_what_it_does_not_handle") else {
        return;
    };
    // Code fetched from the MMIO hole fails emulation on every KVM, with no bytes to read.
    t.load(|a| {
        a.mov(rax, MMIO_BASE)?;
        a.jmp(rax)
    });
    let mut vcpu = t.vcpu_with_idt(&[], |_, _| Ok(()));
    match vcpu.run() {
        Err(VcpuError::EmulationFailure { rip, bytes, .. }) => {
            assert_eq!(rip, MMIO_BASE);
            assert!(bytes.as_slice().is_empty());
        }
        other => panic!("expected an emulation failure at {MMIO_BASE:#x}, got {other:?}"),
    }
    assert_eq!(vcpu.stats().get(ExitKind::InternalError), 1);
}

// ---------------------------------------------------------------------------------------
// Exits the run loop leaves to its caller.

/// An MSR no CPU implements, which the tests' MSR filter sends to userspace.
const USER_MSR: u32 = 0x4000_1000;

impl TestVm {
    /// Sends every guest `rdmsr` and `wrmsr` of [`USER_MSR`] to the VMM.
    fn route_user_msr_to_userspace(&self) {
        use kvm_ioctls::{Cap, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags};
        self.vm
            .fd()
            .enable_cap(&kvm_bindings::kvm_enable_cap {
                cap: Cap::X86UserSpaceMsr as u32,
                args: [u64::from(kvm_bindings::KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
                ..Default::default()
            })
            .unwrap();
        // A clear bit denies the access, which with the exit enabled means: ask the VMM.
        self.vm
            .fd()
            .set_msr_filter(
                MsrFilterDefaultAction::ALLOW,
                &[MsrFilterRange {
                    flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
                    base: USER_MSR,
                    msr_count: 1,
                    bitmap: &[0u8],
                }],
            )
            .unwrap();
    }

    /// Guest code: reads [`USER_MSR`] and reports EAX, then EDX; writes
    /// `0x1_aabb_ccdd` to it; reports 0x600d; halts.
    fn load_msr_guest(&self) {
        self.load(|a| {
            a.mov(ecx, USER_MSR)?;
            a.rdmsr()?;
            a.mov(ebx, edx)?;
            a.mov(dx, REPORT_PORT as u32)?;
            a.out(dx, eax)?;
            a.mov(eax, ebx)?;
            a.out(dx, eax)?;
            a.mov(eax, 0xaabb_ccddu32)?;
            a.mov(edx, 1u32)?;
            a.wrmsr()?;
            a.mov(eax, 0x600du32)?;
            a.mov(dx, REPORT_PORT as u32)?;
            a.out(dx, eax)?;
            a.hlt()
        });
    }
}

#[test]
fn msr_exits_go_to_the_caller_who_answers_and_resumes() {
    let Some(t) = TestVm::new("msr_exits_go_to_the_caller_who_answers_and_resumes") else {
        return;
    };
    t.route_user_msr_to_userspace();
    t.load_msr_guest();
    let mut vcpu = t.vcpu(0, 1);

    let exit = match vcpu.run().unwrap() {
        VcpuOutcome::Unhandled(exit) => exit,
        other => panic!("expected the rdmsr, got {other:?}"),
    };
    assert!(
        matches!(exit, UnhandledExit::Rdmsr { index: USER_MSR, reason } if reason == kvm_bindings::KVM_MSR_EXIT_REASON_FILTER),
        "{exit:?}"
    );
    assert_eq!(exit.to_string(), "KVM_EXIT_X86_RDMSR of MSR 0x40001000");
    // Not stopped on a wrmsr: answering one is refused, and says why.
    let err = vcpu.complete_wrmsr(true).unwrap_err();
    assert!(
        matches!(err, VcpuError::NoPendingExit { vcpu: 0, expected: "KVM_EXIT_X86_WRMSR", actual } if actual == kvm_bindings::KVM_EXIT_X86_RDMSR),
        "{err}"
    );
    assert!(
        err.to_string().contains("last exit was KVM_EXIT_X86_RDMSR"),
        "{err}"
    );
    vcpu.complete_rdmsr(Some(0x1122_3344_5566_7788)).unwrap();

    match vcpu.run().unwrap() {
        VcpuOutcome::Unhandled(UnhandledExit::Wrmsr {
            index: USER_MSR,
            value,
            ..
        }) => assert_eq!(value, 0x1_aabb_ccdd),
        other => panic!("expected the wrmsr, got {other:?}"),
    }
    vcpu.complete_wrmsr(true).unwrap();
    assert_eq!(vcpu.run().unwrap(), VcpuOutcome::Halted);
    // The guest read what the caller answered, and went on after the write.
    assert_eq!(
        t.report.take(),
        vec![
            w(0, &0x5566_7788u32.to_le_bytes()),
            w(0, &0x1122_3344u32.to_le_bytes()),
            w(0, &0x600du32.to_le_bytes()),
        ]
    );
    assert_eq!(vcpu.stats().get(ExitKind::Other), 2);
}

#[test]
fn refused_rdmsr_raises_gp_in_the_guest() {
    let Some(t) = TestVm::new("refused_rdmsr_raises_gp_in_the_guest") else {
        return;
    };
    t.route_user_msr_to_userspace();
    t.load_msr_guest();
    let mut vcpu = t.vcpu_with_idt(&[13], |_, a| a.hlt());
    assert!(matches!(
        vcpu.run().unwrap(),
        VcpuOutcome::Unhandled(UnhandledExit::Rdmsr { .. })
    ));
    vcpu.complete_rdmsr(None).unwrap();
    assert_eq!(vcpu.run().unwrap(), VcpuOutcome::Halted);
    // #GP pushes an error code (0 here) where the handler looks for the return RIP.
    assert_eq!(t.report.take(), vec![w32(VECTOR, 13), w32(RETURN_RIP, 0)]);
}

#[test]
fn an_exit_handler_answers_on_the_vcpu_thread() {
    let Some(t) = TestVm::new("an_exit_handler_answers_on_the_vcpu_thread") else {
        return;
    };
    t.route_user_msr_to_userspace();
    t.load_msr_guest();
    let mut vcpu = t.vcpu(0, 1);
    let written = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&written);
    vcpu.set_exit_handler(move |vcpu, exit| {
        let answered = match exit {
            UnhandledExit::Rdmsr {
                index: USER_MSR, ..
            } => vcpu.complete_rdmsr(Some(42)),
            UnhandledExit::Wrmsr {
                index: USER_MSR,
                value,
                ..
            } => {
                seen.lock().unwrap().push(value);
                vcpu.complete_wrmsr(true)
            }
            _ => return ExitAction::Return,
        };
        match answered {
            Ok(()) => ExitAction::Resume,
            Err(_) => ExitAction::Return,
        }
    });
    let group = VcpuGroup::start([vcpu]).unwrap();
    let (event, results) = group.run(&[]).unwrap();
    assert_eq!(event, GroupEvent::VcpuEnded);
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].result.as_ref().unwrap(), &VcpuOutcome::Halted);
    assert_eq!(*written.lock().unwrap(), vec![0x1_aabb_ccdd]);
    assert_eq!(
        t.report.take(),
        vec![
            w(0, &42u32.to_le_bytes()),
            w(0, &[0; 4]),
            w(0, &0x600du32.to_le_bytes()),
        ]
    );
}

#[test]
fn single_step_debug_exits_reach_the_caller() {
    let Some(t) = TestVm::new("single_step_debug_exits_reach_the_caller") else {
        return;
    };
    t.load(|a| {
        a.mov(eax, 1u32)?; // 5 bytes
        a.mov(ebx, 2u32)?; // 5 bytes
        a.hlt()
    });
    let mut vcpu = t.vcpu(0, 1);
    let debug = kvm_bindings::kvm_guest_debug {
        control: kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_SINGLESTEP,
        ..Default::default()
    };
    vcpu.fd().set_guest_debug(&debug).unwrap();
    for after in [CODE + 5, CODE + 10] {
        match vcpu.run().unwrap() {
            VcpuOutcome::Unhandled(exit @ UnhandledExit::Debug { exception, pc, .. }) => {
                assert_eq!((exception, pc), (1, after), "#DB after each instruction");
                assert_eq!(exit.name(), "KVM_EXIT_DEBUG");
            }
            other => panic!("expected a debug exit at {after:#x}, got {other:?}"),
        }
    }
    // Stepping off again, the guest runs on to its hlt.
    vcpu.fd()
        .set_guest_debug(&kvm_bindings::kvm_guest_debug::default())
        .unwrap();
    assert_eq!(vcpu.run().unwrap(), VcpuOutcome::Halted);
    assert_eq!(vcpu.fd().get_regs().unwrap().rip, CODE + 11);
}

// ---------------------------------------------------------------------------------------
// vCPU groups.

/// Guest code: vCPU 0 (RDI) halts; every other vCPU reports its index and spins.
fn load_one_halts_others_spin(t: &TestVm) {
    t.load(|a| {
        let mut spin = a.create_label();
        let mut halt = a.create_label();
        a.test(edi, edi)?;
        a.jz(halt)?;
        a.mov(eax, edi)?;
        a.mov(dx, REPORT_PORT as u32)?;
        a.out(dx, al)?;
        a.set_label(&mut spin)?;
        a.pause()?;
        a.jmp(spin)?;
        a.set_label(&mut halt)?;
        a.hlt()
    });
}

#[test]
fn a_group_ends_when_one_vcpu_ends_and_stops_the_others() {
    let Some(t) = TestVm::new("a_group_ends_when_one_vcpu_ends_and_stops_the_others") else {
        return;
    };
    load_one_halts_others_spin(&t);
    // vCPU 0 starts only once vCPU 1 is demonstrably running.
    let mut group = VcpuGroup::new().unwrap();
    let first = t.vcpu(0, 2);
    group.spawn(t.vcpu(1, 2)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.report.0.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "vCPU 1 never ran");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(group.spawn(first).unwrap().index(), 0);
    let unrelated = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    assert_eq!(group.wait(&[&unrelated]).unwrap(), GroupEvent::VcpuEnded);
    let results = group.join();
    let outcomes: Vec<_> = results
        .iter()
        .map(|r| (r.index, *r.result.as_ref().unwrap()))
        .collect();
    assert_eq!(
        outcomes,
        vec![(1, VcpuOutcome::Stopped), (0, VcpuOutcome::Halted)]
    );
    assert_eq!(results[0].stats.get(ExitKind::IoOut), 1);
    assert_eq!(results[1].stats.get(ExitKind::Hlt), 1);
}

#[test]
fn a_group_ends_on_a_stop_event_of_the_caller() {
    let Some(t) = TestVm::new("a_group_ends_on_a_stop_event_of_the_caller") else {
        return;
    };
    load_one_halts_others_spin(&t);
    let group = VcpuGroup::start([t.vcpu(1, 3), t.vcpu(2, 3)]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.report.0.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "the vCPUs never ran");
        std::thread::sleep(Duration::from_millis(1));
    }
    // What a device's exit signal does: write its eventfd from another thread.
    let quiet = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let power_off = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let signal = power_off.try_clone().unwrap();
    let device = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        signal.write(1).unwrap();
    });
    let (event, results) = group.run(&[&quiet, &power_off]).unwrap();
    device.join().unwrap();
    assert_eq!(event, GroupEvent::Stop(1));
    let outcomes: Vec<_> = results
        .iter()
        .map(|r| (r.index, *r.result.as_ref().unwrap()))
        .collect();
    assert_eq!(
        outcomes,
        vec![(1, VcpuOutcome::Stopped), (2, VcpuOutcome::Stopped)]
    );
}

#[test]
fn dropping_a_group_stops_and_joins_its_vcpus() {
    let Some(t) = TestVm::new("dropping_a_group_stops_and_joins_its_vcpus") else {
        return;
    };
    load_one_halts_others_spin(&t);
    let group = VcpuGroup::start([t.vcpu(1, 2)]).unwrap();
    let stats = group.vcpus()[0].shared_stats();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.get(ExitKind::IoOut) == 0 {
        assert!(Instant::now() < deadline, "vCPU 1 never ran");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(group);
    // The thread is gone: nothing holds the counters but us.
    assert_eq!(Arc::strong_count(&stats), 1);
}

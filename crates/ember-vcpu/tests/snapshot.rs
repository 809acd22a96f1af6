//! Pause, resume, save and restore of vCPUs against real KVM, with tiny guests.
//!
//! The main guest computes a deterministic checksum (a xorshift generator stirring a
//! 4 KiB buffer), reporting its progress to a port after each outer round; at the end
//! it mixes in MSR KERNEL_GS_BASE (which it wrote at the start) and reports whether the
//! TSC went forwards, then sleeps (`cli; hlt`, in KVM: every VM here has the in-kernel
//! irqchip, as a VMM's does). A restore that lost the registers, the memory, the MSRs
//! (KERNEL_GS_BASE, the TSC) or the position in the loop changes what it reports.
//!
//! CPL0 guest code is emulated one instruction at a time on nested hosts (about 1 us
//! each), so the guest is sized to run for a fraction of a second there.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ember_bus::{Bus, BusDevice, BusKind};
use ember_guests::asm::assemble;
use ember_guests::testing::kvm_available;
use ember_memory::{create_guest_memory, HugePages, MemoryLayout};
use ember_vcpu::state::VcpuState;
use ember_vcpu::{
    msrs, regs, BootRegs, RunningVcpu, Vcpu, VcpuControl, VcpuError, VcpuGroup, VcpuOutcome,
};
use ember_vm::Vm;
use iced_x86::code_asm::*;
use iced_x86::IcedError;
use kvm_bindings::{KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const CODE: u64 = 0x10_0000;
/// Each vCPU's 4 KiB buffer: `BUFFERS + index * 0x1000`.
const BUFFERS: u64 = 0x20_0000;
const BUFFER_WORDS: u32 = 512;
const MEMORY: u64 = 32 << 20;

/// Report ports (offsets from `REPORT_PORT`): progress (outer rounds done), TSC check,
/// result low and high halves, a marker. A vCPU's reports go to `REPORT_PORT + 0x10 *
/// index`.
const REPORT_PORT: u16 = 0x110;
const PROGRESS: u64 = 0;
const TSC_OK: u64 = 4;
const RESULT_LO: u64 = 8;
const RESULT_HI: u64 = 12;
/// The port the PIO-IN guest reads.
const IN_PORT: u16 = 0x100;

const OUTER: u32 = 64;
const INNER: u32 = 192;
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
/// Canonical, as KERNEL_GS_BASE must be.
const GS_BASE_VALUE: u64 = 0x0000_5678_9abc_def0;

/// What a vCPU reported, in order, plus a hook for the progress reports.
#[derive(Default)]
struct Reports {
    writes: Mutex<Vec<(u64, u32)>>,
    /// Progress value at which to request a pause of `control`.
    pause_at: AtomicU32,
    /// Request a pause of `control` at every multiple of this progress value (0: none).
    pause_every: AtomicU32,
    control: OnceLock<VcpuControl>,
}

impl Reports {
    fn pausing_at(progress: u32) -> Arc<Reports> {
        let r = Reports::default();
        r.pause_at.store(progress, Ordering::Relaxed);
        Arc::new(r)
    }

    fn of(&self, offset: u64) -> Vec<u32> {
        self.writes
            .lock()
            .unwrap()
            .iter()
            .filter(|(o, _)| *o == offset)
            .map(|&(_, v)| v)
            .collect()
    }

    fn progress(&self) -> u32 {
        self.of(PROGRESS).last().copied().unwrap_or(0)
    }

    /// The checksum and TSC check, once the guest has reported them.
    fn result(&self) -> Option<(u64, u32)> {
        let lo = *self.of(RESULT_LO).last()?;
        let hi = *self.of(RESULT_HI).last()?;
        let tsc = *self.of(TSC_OK).last()?;
        Some((u64::from(hi) << 32 | u64::from(lo), tsc))
    }

    fn wait_result(&self) -> (u64, u32) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(r) = self.result() {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "the guest never reported a result"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl BusDevice for Reports {
    fn read(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(v);
        self.writes.lock().unwrap().push((offset, value));
        let every = self.pause_every.load(Ordering::Relaxed);
        let periodic = every != 0 && value % every == 0;
        if offset == PROGRESS && (value == self.pause_at.load(Ordering::Relaxed) || periodic) {
            if let Some(control) = self.control.get() {
                // On the vCPU's thread: park right after this exit.
                control.request_pause();
            }
        }
    }
}

/// Answers port reads: the first with `first` (requesting a pause of `control`, if
/// set), later ones with `later`; counts them.
struct Answer {
    first: u8,
    later: u8,
    reads: AtomicU32,
    control: OnceLock<VcpuControl>,
}

impl Answer {
    fn new(first: u8, later: u8) -> Arc<Answer> {
        Arc::new(Answer {
            first,
            later,
            reads: AtomicU32::new(0),
            control: OnceLock::new(),
        })
    }
}

impl BusDevice for Answer {
    fn read(&self, _: u64, data: &mut [u8]) {
        let n = self.reads.fetch_add(1, Ordering::SeqCst);
        data.fill(if n == 0 { self.first } else { self.later });
        if n == 0 {
            if let Some(control) = self.control.get() {
                control.request_pause();
            }
        }
    }
    fn write(&self, _: u64, _: &[u8]) {}
}

/// A VM with the in-kernel irqchip and report devices for `vcpus` vCPUs.
struct Machine {
    kvm: Kvm,
    vm: Vm,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    reports: Vec<Arc<Reports>>,
}

impl Machine {
    fn new(reports: Vec<Arc<Reports>>) -> Machine {
        let kvm = Kvm::new().unwrap();
        let layout = MemoryLayout::new(MEMORY).unwrap();
        let vm = Vm::new(&kvm, create_guest_memory(&layout, HugePages::None).unwrap()).unwrap();
        vm.create_irqchip_and_pit().unwrap();
        let pio = Arc::new(Bus::new(BusKind::Pio));
        for (i, r) in reports.iter().enumerate() {
            pio.insert(u64::from(REPORT_PORT) + 0x10 * i as u64, 0x10, r.clone())
                .unwrap();
        }
        let mmio = Arc::new(Bus::new(BusKind::Mmio));
        Machine {
            kvm,
            vm,
            pio,
            mmio,
            reports,
        }
    }

    /// A fresh machine running `code` from the start.
    fn booted(
        reports: Vec<Arc<Reports>>,
        code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    ) -> Machine {
        let m = Machine::new(reports);
        regs::write_boot_tables(m.vm.memory()).unwrap();
        let code = assemble(CODE, code).unwrap();
        m.vm.memory()
            .write_slice(&code, GuestAddress(CODE))
            .unwrap();
        m
    }

    /// A machine with a copy of `from`'s memory, and nothing run yet.
    fn copy_of(from: &Machine, reports: Vec<Arc<Reports>>) -> Machine {
        let m = Machine::new(reports);
        for region in from.vm.memory().iter() {
            let mut bytes = vec![0u8; region.len() as usize];
            from.vm
                .memory()
                .read_slice(&mut bytes, region.start_addr())
                .unwrap();
            m.vm.memory()
                .write_slice(&bytes, region.start_addr())
                .unwrap();
        }
        m
    }

    /// vCPU `index` of `count`, set up to start at `CODE` with RDI = its index.
    fn boot_vcpu(&self, index: u32, count: u32) -> Vcpu {
        let vcpu = self.new_vcpu(index);
        let supported = self
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        vcpu.set_cpuid(&supported, count).unwrap();
        vcpu.set_boot_msrs().unwrap();
        vcpu.set_fpu().unwrap();
        vcpu.set_lapic().unwrap();
        vcpu.set_long_mode_entry(&BootRegs {
            entry: GuestAddress(CODE),
            stack: GuestAddress(regs::BOOT_STACK_POINTER - 0x100 * u64::from(index)),
            rsi: 0,
            rdi: u64::from(index),
        })
        .unwrap();
        vcpu.set_runnable().unwrap();
        if let Some(r) = self.reports.get(index as usize) {
            let _ = r.control.set(vcpu.control());
        }
        vcpu
    }

    fn new_vcpu(&self, index: u32) -> Vcpu {
        Vcpu::new(&self.vm, index, self.pio.clone(), self.mmio.clone()).unwrap()
    }

    /// vCPU `state.index` with `state` restored (through its serialised form).
    fn restored_vcpu(&self, state: &VcpuState) -> Vcpu {
        let bytes = postcard::to_stdvec(state).unwrap();
        let decoded: VcpuState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(&decoded, state, "the state survives serialisation");
        let mut vcpu = self.new_vcpu(state.index);
        vcpu.restore_state(&decoded).unwrap();
        vcpu
    }
}

/// The checksum guest. RDI = vCPU index.
fn checksum_guest(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut outer = a.create_label();
    let mut inner = a.create_label();
    let mut sleep = a.create_label();
    // Report ports of this vCPU: DX base in R13.
    a.mov(r13, rdi)?;
    a.shl(r13, 4)?;
    a.add(r13, i32::from(REPORT_PORT))?;
    // KERNEL_GS_BASE = GS_BASE_VALUE ^ index.
    a.mov(rax, GS_BASE_VALUE)?;
    a.xor(rax, rdi)?;
    a.mov(rdx, rax)?;
    a.shr(rdx, 32)?;
    a.mov(ecx, msrs::index::KERNEL_GS_BASE)?;
    a.wrmsr()?;
    // R12 = TSC at the start.
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(r12, rax)?;
    // RBX = buffer; R8 = generator; R9 = checksum; R10 = rounds done.
    a.mov(rbx, rdi)?;
    a.shl(rbx, 12)?;
    a.add(rbx, BUFFERS as i32)?;
    a.mov(r8, SEED)?;
    a.xor(r8, rdi)?;
    a.xor(r9, r9)?;
    a.xor(r10, r10)?;
    a.set_label(&mut outer)?;
    a.mov(r11, u64::from(INNER))?;
    a.set_label(&mut inner)?;
    // xorshift64
    a.mov(rax, r8)?;
    a.shl(rax, 13)?;
    a.xor(r8, rax)?;
    a.mov(rax, r8)?;
    a.shr(rax, 7)?;
    a.xor(r8, rax)?;
    a.mov(rax, r8)?;
    a.shl(rax, 17)?;
    a.xor(r8, rax)?;
    // buf[r8 % words] += r8; checksum = rol(checksum, 5) ^ buf[...]
    a.mov(rax, r8)?;
    a.and(eax, BUFFER_WORDS - 1)?;
    a.lea(rsi, qword_ptr(rbx + rax * 8))?;
    a.add(qword_ptr(rsi), r8)?;
    a.mov(rax, qword_ptr(rsi))?;
    a.rol(r9, 5)?;
    a.xor(r9, rax)?;
    a.dec(r11)?;
    a.jnz(inner)?;
    a.inc(r10)?;
    a.mov(eax, r10d)?;
    a.mov(rdx, r13)?;
    a.out(dx, eax)?;
    a.cmp(r10, OUTER as i32)?;
    a.jb(outer)?;
    // Mix in KERNEL_GS_BASE.
    a.mov(ecx, msrs::index::KERNEL_GS_BASE)?;
    a.rdmsr()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.xor(r9, rax)?;
    // TSC went forwards?
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.cmp(rax, r12)?;
    a.setae(al)?;
    a.movzx(eax, al)?;
    a.lea(rdx, qword_ptr(r13 + TSC_OK as i32))?;
    a.out(dx, eax)?;
    a.mov(rax, r9)?;
    a.lea(rdx, qword_ptr(r13 + RESULT_LO as i32))?;
    a.out(dx, eax)?;
    a.shr(rax, 32)?;
    a.lea(rdx, qword_ptr(r13 + RESULT_HI as i32))?;
    a.out(dx, eax)?;
    a.set_label(&mut sleep)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(sleep)
}

/// What the checksum guest computes for vCPU `index`, computed here.
fn expected_checksum(index: u64) -> u64 {
    let mut buf = [0u64; BUFFER_WORDS as usize];
    let mut x = SEED ^ index;
    let mut sum = 0u64;
    for _ in 0..OUTER * INNER {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x as usize) & (BUFFER_WORDS as usize - 1);
        buf[i] = buf[i].wrapping_add(x);
        sum = sum.rotate_left(5) ^ buf[i];
    }
    sum ^ (GS_BASE_VALUE ^ index)
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn stop_and_join(vcpu: RunningVcpu) {
    vcpu.stop();
    assert_eq!(vcpu.join().unwrap(), VcpuOutcome::Stopped);
}

#[test]
fn uninterrupted_checksum_matches_the_model() {
    if !kvm_available("uninterrupted_checksum_matches_the_model") {
        return;
    }
    let m = Machine::booted(vec![Arc::new(Reports::default())], checksum_guest);
    let vcpu = m.boot_vcpu(0, 1).spawn(None).unwrap();
    assert_eq!(m.reports[0].wait_result(), (expected_checksum(0), 1));
    assert_eq!(m.reports[0].of(PROGRESS), (1..=OUTER).collect::<Vec<_>>());
    stop_and_join(vcpu);
}

#[test]
fn paused_mid_run_restores_into_a_new_vm_and_resumes_in_place() {
    if !kvm_available("paused_mid_run_restores_into_a_new_vm_and_resumes_in_place") {
        return;
    }
    const AT: u32 = 20;
    let m = Machine::booted(vec![Reports::pausing_at(AT)], checksum_guest);
    let vcpu = m.boot_vcpu(0, 1).spawn(None).unwrap();
    // The progress device asks for the pause at round AT; pause() waits for the park.
    wait_for("round 20", || m.reports[0].progress() >= AT);
    vcpu.pause().unwrap();
    assert!(vcpu.is_paused());
    assert_eq!(m.reports[0].progress(), AT);
    let state = vcpu.save_state().unwrap();
    assert_eq!(state.mp_state.mp_state, KVM_MP_STATE_RUNNABLE);
    assert!(state.lapic.is_some());
    let gs_base = state
        .msrs
        .as_slice()
        .iter()
        .find(|m| m.index == msrs::index::KERNEL_GS_BASE)
        .expect("KERNEL_GS_BASE is saved");
    assert_eq!(gs_base.data, GS_BASE_VALUE);
    // Nothing moves while paused.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(m.reports[0].progress(), AT);

    // A new VM, new vCPU, the memory copied.
    let copy = Machine::copy_of(&m, vec![Arc::new(Reports::default())]);
    let restored = copy.restored_vcpu(&state).spawn(None).unwrap();
    assert_eq!(copy.reports[0].wait_result(), (expected_checksum(0), 1));
    // It went on from where it was paused, not from the start.
    assert_eq!(
        copy.reports[0].of(PROGRESS),
        (AT + 1..=OUTER).collect::<Vec<_>>()
    );
    stop_and_join(restored);

    // The original, resumed in place, gets there too.
    vcpu.resume();
    assert_eq!(m.reports[0].wait_result(), (expected_checksum(0), 1));
    assert_eq!(m.reports[0].of(PROGRESS), (1..=OUTER).collect::<Vec<_>>());
    stop_and_join(vcpu);
}

#[test]
fn paused_by_a_kick_while_computing_restores_into_a_new_vm() {
    if !kvm_available("paused_by_a_kick_while_computing_restores_into_a_new_vm") {
        return;
    }
    let m = Machine::booted(vec![Arc::new(Reports::default())], checksum_guest);
    let vcpu = m.boot_vcpu(0, 1).spawn(None).unwrap();
    wait_for("round 2", || m.reports[0].progress() >= 2);
    // The guest is inside KVM_RUN, computing: only the kick gets it out.
    vcpu.pause().unwrap();
    let at = m.reports[0].progress();
    let state = vcpu.save_state().unwrap();
    let copy = Machine::copy_of(&m, vec![Arc::new(Reports::default())]);
    stop_and_join(vcpu);
    let restored = copy.restored_vcpu(&state).spawn(None).unwrap();
    assert_eq!(copy.reports[0].wait_result(), (expected_checksum(0), 1));
    let progress = copy.reports[0].of(PROGRESS);
    if at < OUTER {
        assert_eq!(progress, (at + 1..=OUTER).collect::<Vec<_>>());
    }
    stop_and_join(restored);
}

#[test]
fn many_pauses_and_resumes_leave_the_result_unchanged() {
    if !kvm_available("many_pauses_and_resumes_leave_the_result_unchanged") {
        return;
    }
    let m = Machine::booted(vec![Arc::new(Reports::default())], checksum_guest);
    let vcpu = m.boot_vcpu(0, 1).spawn(None).unwrap();
    wait_for("round 1", || m.reports[0].progress() >= 1);
    for i in 0..25 {
        vcpu.pause().unwrap();
        assert!(vcpu.is_paused());
        let at = m.reports[0].progress();
        if i % 5 == 0 {
            std::thread::sleep(Duration::from_millis(10));
            assert_eq!(m.reports[0].progress(), at, "the guest ran while paused");
            // Saving leaves the vCPU as it was.
            vcpu.save_state().unwrap();
        }
        vcpu.resume();
        std::thread::sleep(Duration::from_millis(1 + i % 3));
    }
    assert_eq!(m.reports[0].wait_result(), (expected_checksum(0), 1));
    assert_eq!(m.reports[0].of(PROGRESS), (1..=OUTER).collect::<Vec<_>>());
    // A vCPU not paused has no state to give.
    assert!(matches!(
        vcpu.save_state(),
        Err(VcpuError::NotPaused { vcpu: 0 })
    ));
    stop_and_join(vcpu);
}

#[test]
fn pauses_requested_every_eighth_round_resume_to_the_same_result() {
    if !kvm_available("pauses_requested_every_eighth_round_resume_to_the_same_result") {
        return;
    }
    let reports = Arc::new(Reports::default());
    reports.pause_every.store(8, Ordering::Relaxed);
    let m = Machine::booted(vec![reports], checksum_guest);
    let vcpu = m.boot_vcpu(0, 1).spawn(None).unwrap();
    for round in (8..=OUTER).step_by(8) {
        wait_for("the pause", || vcpu.is_paused());
        assert_eq!(m.reports[0].progress(), round);
        let state = vcpu.save_state().unwrap();
        assert_eq!(state.regs.r10, u64::from(round), "rounds done, in R10");
        vcpu.resume();
        wait_for("the next round", || {
            m.reports[0].progress() > round || round == OUTER
        });
    }
    assert_eq!(m.reports[0].wait_result(), (expected_checksum(0), 1));
    assert_eq!(m.reports[0].of(PROGRESS), (1..=OUTER).collect::<Vec<_>>());
    stop_and_join(vcpu);
}

/// The PIO-IN guest: reads `IN_PORT`, reports the byte as its result, sleeps.
fn in_guest(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut sleep = a.create_label();
    a.mov(eax, 0xffff_ffffu32)?;
    a.mov(dx, u32::from(IN_PORT))?;
    a.in_(al, dx)?;
    a.mov(dx, u32::from(REPORT_PORT) + RESULT_LO as u32)?;
    a.out(dx, eax)?;
    a.set_label(&mut sleep)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(sleep)
}

#[test]
fn a_pio_read_answered_before_the_pause_reaches_the_guest_after_restore() {
    if !kvm_available("a_pio_read_answered_before_the_pause_reaches_the_guest_after_restore") {
        return;
    }
    let m = Machine::booted(vec![Arc::new(Reports::default())], in_guest);
    let device = Answer::new(0x5a, 0xee);
    m.pio.insert(u64::from(IN_PORT), 1, device.clone()).unwrap();
    let vcpu = m.boot_vcpu(0, 1);
    let _ = device.control.set(vcpu.control());
    let vcpu = vcpu.spawn(None).unwrap();
    // The device's read handler asks for the pause: the vCPU parks right after the IN
    // exit, before KVM has put the answer into AL.
    wait_for("the IN", || device.reads.load(Ordering::SeqCst) == 1);
    vcpu.pause().unwrap();
    let state = vcpu.save_state().unwrap();
    // Completed before the save: AL holds the answer and RIP is past the IN.
    assert_eq!(state.regs.rax, 0xffff_ff5a);
    let in_at = CODE + 5 + 4;
    assert_eq!(state.regs.rip, in_at + 1, "RIP after `in al, dx`");

    let copy = Machine::copy_of(&m, vec![Arc::new(Reports::default())]);
    let copy_device = Answer::new(0xee, 0xee);
    copy.pio
        .insert(u64::from(IN_PORT), 1, copy_device.clone())
        .unwrap();
    let restored = copy.restored_vcpu(&state).spawn(None).unwrap();
    wait_for("the restored result", || {
        !copy.reports[0].of(RESULT_LO).is_empty()
    });
    assert_eq!(copy.reports[0].of(RESULT_LO), vec![0xffff_ff5a]);
    assert_eq!(
        copy_device.reads.load(Ordering::SeqCst),
        0,
        "the restored guest repeated the IN"
    );
    stop_and_join(restored);

    vcpu.resume();
    wait_for("the result in place", || {
        !m.reports[0].of(RESULT_LO).is_empty()
    });
    assert_eq!(m.reports[0].of(RESULT_LO), vec![0xffff_ff5a]);
    assert_eq!(device.reads.load(Ordering::SeqCst), 1);
    stop_and_join(vcpu);
}

/// vCPU 0 runs the checksum; vCPU 1 reports a marker and halts (in KVM).
fn two_vcpu_guest(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut compute = a.create_label();
    let mut sleep = a.create_label();
    a.test(edi, edi)?;
    a.jz(compute)?;
    a.mov(eax, 0x1111u32)?;
    a.mov(dx, u32::from(REPORT_PORT) + 0x10 + RESULT_LO as u32)?;
    a.out(dx, eax)?;
    a.set_label(&mut sleep)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(sleep)?;
    a.set_label(&mut compute)?;
    checksum_guest(a)
}

#[test]
fn a_group_of_two_pauses_saves_and_restores_both() {
    if !kvm_available("a_group_of_two_pauses_saves_and_restores_both") {
        return;
    }
    const AT: u32 = 10;
    let m = Machine::booted(
        vec![Reports::pausing_at(AT), Arc::new(Reports::default())],
        two_vcpu_guest,
    );
    let group = VcpuGroup::start([m.boot_vcpu(1, 2), m.boot_vcpu(0, 2)]).unwrap();
    wait_for("vCPU 1's marker and round 10", || {
        !m.reports[1].of(RESULT_LO).is_empty() && m.reports[0].progress() >= AT
    });
    // vCPU 0 asked for its pause at round AT; vCPU 1 sleeps in KVM and is kicked.
    group.pause_all().unwrap();
    assert!(group.vcpus().iter().all(RunningVcpu::is_paused));
    assert!(
        !readable(group.ended_event()),
        "a paused vCPU counted as ended"
    );
    let states = group.save_states().unwrap();
    assert_eq!(states.len(), 2);
    let (one, zero) = (&states[0], &states[1]);
    assert_eq!((one.index, zero.index), (1, 0));
    assert_eq!(one.mp_state.mp_state, KVM_MP_STATE_HALTED);
    assert_eq!(zero.mp_state.mp_state, KVM_MP_STATE_RUNNABLE);
    assert_eq!(m.reports[0].progress(), AT);

    let copy = Machine::copy_of(
        &m,
        vec![Arc::new(Reports::default()), Arc::new(Reports::default())],
    );
    drop(group);
    let restored = VcpuGroup::start([copy.restored_vcpu(zero), copy.restored_vcpu(one)]).unwrap();
    assert_eq!(copy.reports[0].wait_result(), (expected_checksum(0), 1));
    assert_eq!(
        copy.reports[0].of(PROGRESS),
        (AT + 1..=OUTER).collect::<Vec<_>>()
    );
    // vCPU 1 is still asleep where it was: no marker again, halted, past the hlt.
    restored.pause_all().unwrap();
    let again = restored.save_states().unwrap();
    assert_eq!(again[1].mp_state.mp_state, KVM_MP_STATE_HALTED);
    assert_eq!(again[1].regs.rip, one.regs.rip);
    assert!(copy.reports[1].writes.lock().unwrap().is_empty());
    restored.resume_all();
    let results = restored.join();
    assert!(results
        .iter()
        .all(|r| matches!(r.result, Ok(VcpuOutcome::Stopped))));
}

/// Whether `fd` is readable now (without reading it).
fn readable(fd: &impl std::os::fd::AsRawFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; poll writes only its `revents`.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1
}

#[test]
fn stop_while_paused_ends_the_thread() {
    if !kvm_available("stop_while_paused_ends_the_thread") {
        return;
    }
    let m = Machine::booted(vec![Arc::new(Reports::default())], checksum_guest);
    let done = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let vcpu = m
        .boot_vcpu(0, 1)
        .spawn(Some(done.try_clone().unwrap()))
        .unwrap();
    wait_for("round 1", || m.reports[0].progress() >= 1);
    vcpu.pause().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(!vcpu.is_finished());
    assert!(!readable(&done), "a paused vCPU reported its end");
    vcpu.stop();
    wait_for("the thread to end", || vcpu.is_finished());
    assert!(readable(&done));
    // Nothing left to pause or ask.
    assert!(matches!(
        vcpu.pause(),
        Err(VcpuError::NotRunning { vcpu: 0 })
    ));
    assert!(matches!(
        vcpu.save_state(),
        Err(VcpuError::NotRunning { vcpu: 0 })
    ));
    assert_eq!(vcpu.join().unwrap(), VcpuOutcome::Stopped);
}

/// Sets a distinctive value in every part of the state, saves it, restores it into a
/// vCPU of a new VM and saves that: each part must come back (a restore that skipped
/// one fails here).
#[test]
fn every_part_of_the_state_survives_a_restore() {
    if !kvm_available("every_part_of_the_state_survives_a_restore") {
        return;
    }
    let m = Machine::booted(vec![], |a| a.hlt());
    let mut vcpu = m.boot_vcpu(0, 1);
    let fd = vcpu.fd();
    let mut r = fd.get_regs().unwrap();
    r.rax = 0x1111;
    r.r15 = 0xf0f0_f0f0;
    r.rip = CODE + 0x40;
    fd.set_regs(&r).unwrap();
    let mut dr = fd.get_debug_regs().unwrap();
    dr.db = [0x1000, 0x2000, 0x3000, 0x4000];
    dr.dr7 = 0x400 | 0x3; // L0, G0
    fd.set_debug_regs(&dr).unwrap();
    let mut events = fd.get_vcpu_events().unwrap();
    events.nmi.masked = 1;
    events.interrupt.shadow = 1;
    events.flags = kvm_bindings::KVM_VCPUEVENT_VALID_SHADOW;
    fd.set_vcpu_events(&events).unwrap();
    let mut lapic = fd.get_lapic().unwrap();
    // TPR (0x80) = 0x20.
    lapic.regs[0x80] = 0x20;
    fd.set_lapic(&lapic).unwrap();
    fd.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: KVM_MP_STATE_HALTED,
    })
    .unwrap();
    let entries = [
        (msrs::index::KERNEL_GS_BASE, 0xffff_8000_1234_5000),
        (msrs::index::IA32_SYSENTER_EIP, 0xffff_ffff_8100_0000),
        (msrs::index::STAR, 0x0023_0010_0000_0000),
    ]
    .map(|(index, data)| kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let set = kvm_bindings::Msrs::from_entries(&entries).unwrap();
    assert_eq!(fd.set_msrs(&set).unwrap(), 3);
    let mut xsave = fd.get_xsave().unwrap();
    // XMM0 (legacy area, bytes 160..176) = a pattern.
    for (i, w) in xsave.region[40..44].iter_mut().enumerate() {
        *w = 0xa5a5_0000 + i as u32;
    }
    // XSTATE_BV (bytes 512..520): SSE state present.
    xsave.region[128] |= 2;
    // SAFETY: a whole kvm_xsave read from KVM, changed in XMM0 and XSTATE_BV only.
    unsafe { fd.set_xsave(&xsave) }.unwrap();
    let saved = vcpu.save_state().unwrap();
    assert_eq!(saved.tsc_khz, fd_tsc_khz(&vcpu));

    let other = Machine::new(vec![]);
    let mut restored = other.restored_vcpu(&saved);
    let again = restored.save_state().unwrap();
    assert_eq!(again.regs, saved.regs);
    assert_eq!(again.sregs, saved.sregs);
    assert_eq!(again.debugregs.db, [0x1000, 0x2000, 0x3000, 0x4000]);
    assert_eq!(again.debugregs, saved.debugregs);
    assert_eq!(again.events.nmi.masked, 1);
    assert_eq!(again.events.interrupt.shadow, 1);
    assert_eq!(again.events, saved.events);
    assert_eq!(again.mp_state.mp_state, KVM_MP_STATE_HALTED);
    assert_eq!(again.lapic.unwrap().regs[0x80], 0x20);
    assert_eq!(again.xsave.0.region[40..44], xsave.region[40..44]);
    assert_eq!(again.xsave, saved.xsave);
    assert_eq!(again.xcrs, saved.xcrs);
    assert_eq!(again.cpuid, saved.cpuid);
    let msr = |s: &VcpuState, index: u32| {
        s.msrs
            .as_slice()
            .iter()
            .find(|m| m.index == index)
            .map(|m| m.data)
    };
    for (index, data) in entries.map(|e| (e.index, e.data)) {
        assert_eq!(msr(&again, index), Some(data), "MSR {index:#x}");
    }
    // Every MSR saved comes back; the TSC has moved on meanwhile, from where it was.
    let indices = |s: &VcpuState| {
        s.msrs
            .as_slice()
            .iter()
            .map(|m| m.index)
            .collect::<Vec<_>>()
    };
    assert_eq!(indices(&again), indices(&saved));
    let tsc = msrs::index::IA32_TSC;
    assert!(msr(&again, tsc).unwrap() >= msr(&saved, tsc).unwrap());
    drop(vcpu);
}

fn fd_tsc_khz(vcpu: &Vcpu) -> Option<u32> {
    vcpu.fd().get_tsc_khz().ok()
}

#[test]
fn a_vm_without_the_irqchip_saves_no_lapic_and_restores() {
    if !kvm_available("a_vm_without_the_irqchip_saves_no_lapic_and_restores") {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let new_vm = || {
        let layout = MemoryLayout::new(MEMORY).unwrap();
        Vm::new(&kvm, create_guest_memory(&layout, HugePages::None).unwrap()).unwrap()
    };
    let vm = new_vm();
    regs::write_boot_tables(vm.memory()).unwrap();
    let pio = Arc::new(Bus::new(BusKind::Pio));
    let mmio = Arc::new(Bus::new(BusKind::Mmio));
    let mut vcpu = Vcpu::new(&vm, 0, pio.clone(), mmio.clone()).unwrap();
    vcpu.set_cpuid(
        &kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap(),
        1,
    )
    .unwrap();
    vcpu.set_boot_msrs().unwrap();
    vcpu.set_long_mode_entry(&BootRegs {
        entry: GuestAddress(CODE),
        stack: GuestAddress(regs::BOOT_STACK_POINTER),
        rsi: 0,
        rdi: 7,
    })
    .unwrap();
    let state = vcpu.save_state().unwrap();
    assert!(state.lapic.is_none());
    let other = new_vm();
    let mut restored = Vcpu::new(&other, 0, pio, mmio).unwrap();
    restored.restore_state(&state).unwrap();
    assert_eq!(restored.fd().get_regs().unwrap().rdi, 7);
    assert_eq!(restored.fd().get_sregs().unwrap(), state.sregs);
}

//! `ember-minimal`: the smallest useful VMM built from the Ember crates' public APIs.
//!
//! ```text
//! ember-minimal <vmlinux> [cmdline]
//! ```
//!
//! It boots a 64-bit ELF kernel with the Linux boot protocol on one vCPU and 256 MiB of
//! RAM, and shows each crate's part in that:
//!
//! * `ember-memory` lays out and maps guest RAM; `ember-boot` loads the ELF and writes
//!   the command line and zero page into it; `ember-vcpu` writes the page tables and GDT
//!   for the 64-bit entry (all before KVM is touched, so bad input fails early).
//! * `ember-vm` owns the VM and its memory, with KVM's in-kernel irqchip and PIT.
//! * `ember-devices` on an `ember-bus` PIO bus: COM1 on stdout (its interrupt an irqfd),
//!   an i8042 (the guest's reset ends the VM) and the debug-exit port (the byte the guest
//!   writes there is this process's exit status). Every port comes from `ember-arch`.
//! * `ember-vcpu` picks the CPU model for this host (`CpuTemplate::detect`: on nested
//!   hosts, one that hides what their KVM cannot emulate, with the instruction fallback).
//! * `ember-vcpu`'s `VcpuGroup` runs the vCPU and waits for the first VM-ending event:
//!   the vCPU's run loop ending, or a device's `ExitSignal`.
//!
//! Exit status: the guest's debug-exit code; 0 after a reset or power-off; 1, with one
//! `ember-minimal: error: ...` line on stderr, for anything else.

use std::process::ExitCode;
use std::sync::Arc;

use ember_arch::layout::{
    BOOT_STACK_POINTER, COM1_GSI, COM1_PORT, DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_SIZE, HIMEM_START,
    I8042_PORT, I8042_PORT_SIZE, SERIAL_PORT_SIZE,
};
use ember_boot::{configure_linux_boot, load_elf, Cmdline};
use ember_bus::{Bus, BusKind};
use ember_devices::{DebugExit, ExitRequest, ExitSignal, IrqLine, Serial, SerialOutput, I8042};
use ember_memory::{create_guest_memory, HugePages, MemoryLayout, MIB};
use ember_vcpu::cpuid::CpuTemplate;
use ember_vcpu::kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use ember_vcpu::{regs, BootRegs, SystemEvent, Vcpu, VcpuGroup, VcpuOutcome};
use ember_vm::kvm_ioctls::Kvm;
use ember_vm::vm_memory::GuestAddress;
use ember_vm::Vm;

const USAGE: &str = "usage: ember-minimal <vmlinux> [cmdline]";
const RAM_SIZE: u64 = 256 * MIB;
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ember-minimal: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Boots the kernel named on the command line; returns the exit status.
fn run() -> Result<u8> {
    let mut args = std::env::args().skip(1);
    let (Some(kernel_path), cmdline_arg, None) = (args.next(), args.next(), args.next()) else {
        return Err(USAGE.into());
    };
    let image = std::fs::read(&kernel_path)
        .map_err(|e| format!("cannot read the kernel {kernel_path}: {e}"))?;

    // Guest RAM with the kernel, its command line, the zero page and the boot page tables.
    let memory = create_guest_memory(&MemoryLayout::new(RAM_SIZE)?, HugePages::None)?;
    let kernel = load_elf(&memory, &image, GuestAddress(HIMEM_START))
        .map_err(|e| format!("cannot load the kernel {kernel_path}: {e}"))?;
    let mut cmdline = Cmdline::default();
    cmdline.insert_str(cmdline_arg.as_deref().unwrap_or(DEFAULT_CMDLINE))?;
    // The CPU model for this host: on nested hosts whose KVM emulates guest kernel code,
    // one that hides what that emulator lacks (and kernel parameters to match).
    let (template, _why) = CpuTemplate::detect();
    for param in template.kernel_params() {
        cmdline.insert_str(param)?;
    }
    let zero_page = configure_linux_boot(&memory, &cmdline, None)?;
    regs::write_boot_tables(&memory)?;

    // The VM takes the memory; KVM emulates the interrupt controllers and the timer.
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = Vm::new(&kvm, memory)?;
    vm.create_irqchip_and_pit()?;

    // Legacy devices. Those that can end the VM share one ExitSignal.
    let exit = Arc::new(ExitSignal::new()?);
    let pio = Arc::new(Bus::new(BusKind::Pio));
    let serial_irq = IrqLine::new()?;
    vm.register_irqfd(serial_irq.event_fd(), COM1_GSI)?;
    let serial = Serial::new(SerialOutput::Stdout, serial_irq)?;
    pio.insert(COM1_PORT.into(), SERIAL_PORT_SIZE, Arc::new(serial))?;
    let i8042 = I8042::new(Arc::clone(&exit))?;
    pio.insert(I8042_PORT.into(), I8042_PORT_SIZE, Arc::new(i8042))?;
    let debug_exit = DebugExit::new(Arc::clone(&exit));
    pio.insert(
        DEBUG_EXIT_PORT.into(),
        DEBUG_EXIT_PORT_SIZE,
        Arc::new(debug_exit),
    )?;

    // One vCPU, entering the kernel in 64-bit mode with RSI = the zero page.
    let mut vcpu = Vcpu::new(&vm, 0, pio, Arc::new(Bus::new(BusKind::Mmio)))?;
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    template.apply(&mut cpuid);
    vcpu.set_cpuid(&cpuid, 1)?;
    vcpu.set_instruction_fallback(template.instruction_fallback());
    vcpu.set_boot_msrs()?;
    vcpu.set_fpu()?;
    vcpu.set_lapic()?;
    vcpu.set_long_mode_entry(&BootRegs {
        entry: kernel.entry,
        stack: GuestAddress(BOOT_STACK_POINTER),
        rsi: zero_page.0,
        rdi: 0,
    })?;

    // Run until the vCPU ends or a device asks the VM to end; then stop and join.
    let (_event, results) = VcpuGroup::start([vcpu])?.run(&[exit.event_fd()])?;
    match exit.requested() {
        Some(ExitRequest::DebugExit(code)) => return Ok(code),
        Some(ExitRequest::Reset | ExitRequest::PowerOff) => return Ok(0),
        None => {}
    }
    match results.into_iter().next().map(|vcpu| vcpu.result) {
        Some(Ok(VcpuOutcome::SystemEvent(SystemEvent::Shutdown | SystemEvent::Reset))) => Ok(0),
        Some(Ok(outcome)) => Err(format!("the vCPU ended the VM: {outcome:?}").into()),
        Some(Err(e)) => Err(format!("the vCPU failed: {e}").into()),
        None => Err("no vCPU ran".into()),
    }
}

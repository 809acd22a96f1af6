//! x86-64 vCPUs for KVM: set-up and the run loop.
//!
//! * **Set-up** ([`Vcpu::set_cpuid`], [`Vcpu::set_boot_msrs`], [`Vcpu::set_fpu`],
//!   [`Vcpu::set_lapic`], [`Vcpu::set_long_mode_entry`]): CPUID from KVM's supported
//!   list with the hypervisor bit, APIC IDs and topology; boot MSRs; FPU; LAPIC
//!   LINT0/LINT1; 64-bit entry with a GDT and identity-mapped page tables
//!   ([`regs::write_boot_tables`], once per VM).
//! * **Creating** ([`Vcpu::new`]) from an [`ember_vm::Vm`]: the vCPU holds the VM, so
//!   the guest memory it runs on lives as long as it does; generic, as the `Vm` is, over
//!   the guest memory's dirty-page bitmap.
//! * **Running** ([`Vcpu::run`], [`Vcpu::spawn`]): one thread per vCPU; port I/O and
//!   MMIO exits go straight to [`ember_bus::Bus`]es with no lock of their own and no
//!   allocation; halts, triple faults and system events end the loop as a
//!   [`VcpuOutcome`]; entry failures and emulation failures as a [`VcpuError`] that says
//!   where the guest was (for an emulation failure, RIP and the instruction bytes).
//! * **Exits for the caller** ([`UnhandledExit`]): hypercalls, MSR accesses sent to
//!   userspace, debug exits and any other exit the loop does not know end [`Vcpu::run`]
//!   as [`VcpuOutcome::Unhandled`]; the caller answers ([`Vcpu::complete_rdmsr`], ...)
//!   and calls `run` again. Or an [exit handler](Vcpu::set_exit_handler) on the vCPU's
//!   thread answers them and resumes the guest.
//! * **A VM's vCPUs together** ([`VcpuGroup`]): every vCPU on its own thread, a wait for
//!   the first VM-ending event (a vCPU ending, or an eventfd of the VMM's), then stop
//!   and join them all.
//! * **Instruction fallback** ([`fallback`], [`Vcpu::set_instruction_fallback`]): on
//!   hosts whose KVM cannot emulate some guest kernel instructions (`int3` and `fwait`
//!   on nested PVM), the run loop completes them itself with their architectural
//!   effect, and counts each.
//! * **Syscall trap** ([`syscall_trap`], [`Vcpu::set_syscall_trap`]): on hosts where a
//!   64-bit `syscall` from guest user mode does not reach CPL0 (nested PVM), the run
//!   loop finishes it through an MSR filter on MSR_LSTAR and a trap page, so the guest
//!   kernel's system call entry runs; counted as `syscall-trap` exits.
//! * **Stopping** ([`RunningVcpu::stop`]) from any thread, race-free (see [`kick`]).
//! * **Pausing and snapshots** ([`RunningVcpu::pause`], [`RunningVcpu::save_state`],
//!   [`Vcpu::save_state`], [`Vcpu::restore_state`], [`state::VcpuState`]): a paused
//!   vCPU parks on its thread with its pending exit completed; its state (serde) restores
//!   on a new vCPU of a new VM.
//! * **Counting** exits per reason ([`ExitStats`]) and, opt-in
//!   ([`Vcpu::enable_exit_timing`]), timing them: a log2 histogram per exit reason of the
//!   time from `KVM_RUN` returning to the next `KVM_RUN` call ([`ExitProfile`], printable
//!   as a table, mergeable across vCPUs).
//!
//! A VM with one vCPU that writes a byte to port 0x80 and halts:
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use ember_bus::{Bus, BusDevice, BusKind};
//! use ember_vcpu::{regs, BootRegs, Vcpu, VcpuOutcome};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! struct Post(Mutex<Vec<u8>>);
//! impl BusDevice for Post {
//!     fn read(&self, _: u64, _: &mut [u8]) {}
//!     fn write(&self, _: u64, data: &[u8]) { self.0.lock().unwrap().extend_from_slice(data) }
//! }
//!
//! let kvm = kvm_ioctls::Kvm::new().unwrap();
//! let layout = ember_memory::MemoryLayout::new(16 << 20).unwrap();
//! let mem = ember_memory::create_guest_memory(&layout, ember_memory::HugePages::None).unwrap();
//! let vm = ember_vm::Vm::new(&kvm, mem).unwrap();
//! regs::write_boot_tables(vm.memory()).unwrap();
//! // mov al, 0x2a; out 0x80, al; hlt
//! vm.memory().write_slice(&[0xb0, 0x2a, 0xe6, 0x80, 0xf4], GuestAddress(0x10_0000)).unwrap();
//!
//! let post = Arc::new(Post(Mutex::new(Vec::new())));
//! let pio = Arc::new(Bus::new(BusKind::Pio));
//! pio.insert(0x80, 1, post.clone()).unwrap();
//! let mmio = Arc::new(Bus::new(BusKind::Mmio));
//!
//! let mut vcpu = Vcpu::new(&vm, 0, pio, mmio).unwrap();
//! vcpu.set_cpuid(&kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap(), 1).unwrap();
//! vcpu.set_boot_msrs().unwrap();
//! vcpu.set_fpu().unwrap();
//! vcpu.set_long_mode_entry(&BootRegs {
//!     entry: GuestAddress(0x10_0000),
//!     stack: GuestAddress(regs::BOOT_STACK_POINTER),
//!     rsi: 0,
//!     rdi: 0,
//! }).unwrap();
//! assert_eq!(vcpu.run().unwrap(), VcpuOutcome::Halted);
//! assert_eq!(*post.0.lock().unwrap(), vec![0x2a]);
//! ```

#![deny(missing_docs)]

pub mod clock;
mod control;
pub mod cpuid;
mod error;
mod exit;
pub mod fallback;
mod group;
pub mod kick;
pub mod lapic;
pub mod msrs;
pub mod regs;
mod run_area;
pub mod state;
mod stats;
pub mod syscall_trap;
mod vcpu;
mod x86;

pub use control::VcpuControl;
pub use error::{InstructionBytes, VcpuError};
pub use exit::{ExitAction, UnhandledExit};
pub use group::{GroupEvent, VcpuGroup, VcpuResult};
pub use regs::BootRegs;
pub use stats::{
    format_ns, latency_bucket, latency_bucket_bound_ns, latency_bucket_label, ExitKind,
    ExitProfile, ExitStats, LatencyHistogram, LATENCY_BUCKETS,
};
pub use vcpu::{ExitHandler, RunningVcpu, SystemEvent, ThreadHook, Vcpu, VcpuOutcome};
/// The crates this crate's API uses, so users get the matching versions.
pub use {ember_bus, ember_vm, kvm_bindings, kvm_ioctls, vm_memory, vmm_sys_util};

/// The README's example, compiled as a doc test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

//! Exits the run loop leaves to its caller: [`UnhandledExit`], and what an [exit
//! handler](crate::Vcpu::set_exit_handler) says to do after one ([`ExitAction`]).

use std::fmt;

use kvm_bindings::{
    kvm_run, KVM_EXIT_DEBUG, KVM_EXIT_HYPERCALL, KVM_EXIT_MEMORY_FAULT, KVM_EXIT_X86_RDMSR,
    KVM_EXIT_X86_WRMSR,
};

/// An exit the run loop does not handle itself, with the data its `kvm_run` carried.
/// [`Vcpu::run`](crate::Vcpu::run) returns it as
/// [`VcpuOutcome::Unhandled`](crate::VcpuOutcome::Unhandled) (or hands it to the vCPU's
/// [exit handler](crate::Vcpu::set_exit_handler) first). Port I/O, MMIO, halts,
/// shutdowns, system events, entry failures and internal errors are never unhandled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnhandledExit {
    /// `KVM_EXIT_HYPERCALL`: the guest executed `vmcall`/`vmmcall` for a hypercall KVM
    /// sends to userspace (see `KVM_CAP_EXIT_HYPERCALL`). Answer with
    /// [`Vcpu::complete_hypercall`](crate::Vcpu::complete_hypercall).
    Hypercall {
        /// The hypercall number (`RAX`).
        nr: u64,
        /// Its arguments.
        args: [u64; 6],
        /// Whether the guest was in 64-bit mode.
        long_mode: bool,
    },
    /// `KVM_EXIT_X86_RDMSR`: a guest `rdmsr` KVM sends to userspace (see
    /// `KVM_CAP_X86_USER_SPACE_MSR` and `KVM_X86_SET_MSR_FILTER`). Answer with
    /// [`Vcpu::complete_rdmsr`](crate::Vcpu::complete_rdmsr); left unanswered, the guest
    /// reads whatever `kvm_run` held.
    Rdmsr {
        /// The MSR's index (`ECX`).
        index: u32,
        /// Why KVM sent it (`KVM_MSR_EXIT_REASON_*`).
        reason: u32,
    },
    /// `KVM_EXIT_X86_WRMSR`: a guest `wrmsr` KVM sends to userspace. Answer with
    /// [`Vcpu::complete_wrmsr`](crate::Vcpu::complete_wrmsr); left unanswered, it
    /// completes.
    Wrmsr {
        /// The MSR's index (`ECX`).
        index: u32,
        /// The value written (`EDX:EAX`).
        value: u64,
        /// Why KVM sent it (`KVM_MSR_EXIT_REASON_*`).
        reason: u32,
    },
    /// `KVM_EXIT_DEBUG`: a breakpoint, single step or watchpoint of guest debugging
    /// (`KVM_SET_GUEST_DEBUG`). Nothing to answer; resuming goes on from `RIP`.
    Debug {
        /// The exception vector (1 for #DB, 3 for #BP).
        exception: u32,
        /// Guest `RIP` at the exit.
        pc: u64,
        /// `DR6`: what triggered a #DB.
        dr6: u64,
        /// `DR7`.
        dr7: u64,
    },
    /// `KVM_EXIT_MEMORY_FAULT`: KVM could not resolve a guest access to `gpa` itself
    /// (private/shared conversion of guest_memfd memory, for instance).
    MemoryFault {
        /// `KVM_MEMORY_EXIT_FLAG_*`.
        flags: u64,
        /// The guest physical address.
        gpa: u64,
        /// The size of the access.
        size: u64,
    },
    /// Any other exit reason; its data is in `kvm_run`
    /// ([`Vcpu::kvm_run_mut`](crate::Vcpu::kvm_run_mut)).
    Other {
        /// The `KVM_EXIT_*` number.
        reason: u32,
    },
}

impl UnhandledExit {
    /// Reads the exit `run` holds. Call only right after `KVM_RUN` returned with an
    /// exit (not an error), so that `exit_reason` says which union member is valid.
    pub(crate) fn from_kvm_run(run: &kvm_run) -> UnhandledExit {
        match run.exit_reason {
            KVM_EXIT_HYPERCALL => {
                // SAFETY: the exit reason says `hypercall` is the active member; its
                // flags word is plain data whichever of its two names KVM wrote.
                let (call, flags) = unsafe {
                    let call = run.__bindgen_anon_1.hypercall;
                    (call, call.__bindgen_anon_1.flags)
                };
                UnhandledExit::Hypercall {
                    nr: call.nr,
                    args: call.args,
                    // KVM_EXIT_HYPERCALL_LONG_MODE; older kernels set `longmode`, the
                    // same bit.
                    long_mode: flags & 1 != 0,
                }
            }
            KVM_EXIT_X86_RDMSR => {
                // SAFETY: the exit reason says `msr` is the active member.
                let msr = unsafe { run.__bindgen_anon_1.msr };
                UnhandledExit::Rdmsr {
                    index: msr.index,
                    reason: msr.reason,
                }
            }
            KVM_EXIT_X86_WRMSR => {
                // SAFETY: the exit reason says `msr` is the active member.
                let msr = unsafe { run.__bindgen_anon_1.msr };
                UnhandledExit::Wrmsr {
                    index: msr.index,
                    value: msr.data,
                    reason: msr.reason,
                }
            }
            KVM_EXIT_DEBUG => {
                // SAFETY: the exit reason says `debug` is the active member.
                let arch = unsafe { run.__bindgen_anon_1.debug.arch };
                UnhandledExit::Debug {
                    exception: arch.exception,
                    pc: arch.pc,
                    dr6: arch.dr6,
                    dr7: arch.dr7,
                }
            }
            KVM_EXIT_MEMORY_FAULT => {
                // SAFETY: the exit reason says `memory_fault` is the active member.
                let fault = unsafe { run.__bindgen_anon_1.memory_fault };
                UnhandledExit::MemoryFault {
                    flags: fault.flags,
                    gpa: fault.gpa,
                    size: fault.size,
                }
            }
            reason => UnhandledExit::Other { reason },
        }
    }

    /// The `KVM_EXIT_*` number of the exit.
    ///
    /// ```
    /// use ember_vcpu::UnhandledExit;
    /// assert_eq!(UnhandledExit::Rdmsr { index: 0x10, reason: 2 }.reason(), 29);
    /// ```
    pub fn reason(&self) -> u32 {
        match self {
            UnhandledExit::Hypercall { .. } => KVM_EXIT_HYPERCALL,
            UnhandledExit::Rdmsr { .. } => KVM_EXIT_X86_RDMSR,
            UnhandledExit::Wrmsr { .. } => KVM_EXIT_X86_WRMSR,
            UnhandledExit::Debug { .. } => KVM_EXIT_DEBUG,
            UnhandledExit::MemoryFault { .. } => KVM_EXIT_MEMORY_FAULT,
            UnhandledExit::Other { reason } => *reason,
        }
    }

    /// The exit reason's name, e.g. `KVM_EXIT_X86_RDMSR`.
    ///
    /// ```
    /// use ember_vcpu::UnhandledExit;
    /// assert_eq!(UnhandledExit::Other { reason: 7 }.name(), "KVM_EXIT_IRQ_WINDOW_OPEN");
    /// assert_eq!(UnhandledExit::Other { reason: 1000 }.name(), "an unknown KVM exit");
    /// ```
    pub fn name(&self) -> &'static str {
        exit_reason_name(self.reason())
    }
}

impl fmt::Display for UnhandledExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.name();
        match *self {
            UnhandledExit::Hypercall { nr, args, .. } => {
                write!(f, "{name} {nr} with arguments {args:#x?}")
            }
            UnhandledExit::Rdmsr { index, .. } => write!(f, "{name} of MSR {index:#x}"),
            UnhandledExit::Wrmsr { index, value, .. } => {
                write!(f, "{name} of {value:#x} to MSR {index:#x}")
            }
            UnhandledExit::Debug { exception, pc, .. } => {
                write!(f, "{name} (vector {exception}) at RIP {pc:#x}")
            }
            UnhandledExit::MemoryFault { gpa, size, .. } => {
                write!(f, "{name} at {gpa:#x} (size {size:#x})")
            }
            UnhandledExit::Other { reason } => write!(f, "{name} ({reason})"),
        }
    }
}

/// What the run loop does after an [exit handler](crate::Vcpu::set_exit_handler) ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitAction {
    /// Enter the guest again: the handler dealt with the exit.
    Resume,
    /// End [`Vcpu::run`](crate::Vcpu::run) with
    /// [`VcpuOutcome::Unhandled`](crate::VcpuOutcome::Unhandled).
    Return,
}

/// The name of a `KVM_EXIT_*` reason.
fn exit_reason_name(reason: u32) -> &'static str {
    const NAMES: [&str; 40] = [
        "KVM_EXIT_UNKNOWN",
        "KVM_EXIT_EXCEPTION",
        "KVM_EXIT_IO",
        "KVM_EXIT_HYPERCALL",
        "KVM_EXIT_DEBUG",
        "KVM_EXIT_HLT",
        "KVM_EXIT_MMIO",
        "KVM_EXIT_IRQ_WINDOW_OPEN",
        "KVM_EXIT_SHUTDOWN",
        "KVM_EXIT_FAIL_ENTRY",
        "KVM_EXIT_INTR",
        "KVM_EXIT_SET_TPR",
        "KVM_EXIT_TPR_ACCESS",
        "KVM_EXIT_S390_SIEIC",
        "KVM_EXIT_S390_RESET",
        "KVM_EXIT_DCR",
        "KVM_EXIT_NMI",
        "KVM_EXIT_INTERNAL_ERROR",
        "KVM_EXIT_OSI",
        "KVM_EXIT_PAPR_HCALL",
        "KVM_EXIT_S390_UCONTROL",
        "KVM_EXIT_WATCHDOG",
        "KVM_EXIT_S390_TSCH",
        "KVM_EXIT_EPR",
        "KVM_EXIT_SYSTEM_EVENT",
        "KVM_EXIT_S390_STSI",
        "KVM_EXIT_IOAPIC_EOI",
        "KVM_EXIT_HYPERV",
        "KVM_EXIT_ARM_NISV",
        "KVM_EXIT_X86_RDMSR",
        "KVM_EXIT_X86_WRMSR",
        "KVM_EXIT_DIRTY_RING_FULL",
        "KVM_EXIT_AP_RESET_HOLD",
        "KVM_EXIT_X86_BUS_LOCK",
        "KVM_EXIT_XEN",
        "KVM_EXIT_RISCV_SBI",
        "KVM_EXIT_RISCV_CSR",
        "KVM_EXIT_NOTIFY",
        "KVM_EXIT_LOONGARCH_IOCSR",
        "KVM_EXIT_MEMORY_FAULT",
    ];
    usize::try_from(reason)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("an unknown KVM exit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_kvm_constants() {
        use kvm_bindings::*;
        for (reason, name) in [
            (KVM_EXIT_UNKNOWN, "KVM_EXIT_UNKNOWN"),
            (KVM_EXIT_HYPERCALL, "KVM_EXIT_HYPERCALL"),
            (KVM_EXIT_DEBUG, "KVM_EXIT_DEBUG"),
            (KVM_EXIT_IRQ_WINDOW_OPEN, "KVM_EXIT_IRQ_WINDOW_OPEN"),
            (KVM_EXIT_INTERNAL_ERROR, "KVM_EXIT_INTERNAL_ERROR"),
            (KVM_EXIT_SYSTEM_EVENT, "KVM_EXIT_SYSTEM_EVENT"),
            (KVM_EXIT_X86_RDMSR, "KVM_EXIT_X86_RDMSR"),
            (KVM_EXIT_X86_WRMSR, "KVM_EXIT_X86_WRMSR"),
            (KVM_EXIT_X86_BUS_LOCK, "KVM_EXIT_X86_BUS_LOCK"),
            (KVM_EXIT_MEMORY_FAULT, "KVM_EXIT_MEMORY_FAULT"),
        ] {
            assert_eq!(exit_reason_name(reason), name);
        }
    }

    #[test]
    fn reads_each_exit_from_kvm_run() {
        let mut run = kvm_run {
            exit_reason: KVM_EXIT_X86_WRMSR,
            ..Default::default()
        };
        run.__bindgen_anon_1.msr.index = 0x4b56_4d00;
        run.__bindgen_anon_1.msr.data = 0x1234;
        run.__bindgen_anon_1.msr.reason = 2;
        let exit = UnhandledExit::from_kvm_run(&run);
        assert_eq!(
            exit,
            UnhandledExit::Wrmsr {
                index: 0x4b56_4d00,
                value: 0x1234,
                reason: 2
            }
        );
        assert_eq!(
            exit.to_string(),
            "KVM_EXIT_X86_WRMSR of 0x1234 to MSR 0x4b564d00"
        );

        run.exit_reason = KVM_EXIT_HYPERCALL;
        run.__bindgen_anon_1.hypercall.nr = 12;
        run.__bindgen_anon_1.hypercall.args = [1, 2, 3, 4, 5, 6];
        run.__bindgen_anon_1.hypercall.__bindgen_anon_1.flags = 1;
        assert_eq!(
            UnhandledExit::from_kvm_run(&run),
            UnhandledExit::Hypercall {
                nr: 12,
                args: [1, 2, 3, 4, 5, 6],
                long_mode: true
            }
        );

        run.exit_reason = kvm_bindings::KVM_EXIT_IRQ_WINDOW_OPEN;
        let exit = UnhandledExit::from_kvm_run(&run);
        assert_eq!(exit, UnhandledExit::Other { reason: 7 });
        assert_eq!(exit.to_string(), "KVM_EXIT_IRQ_WINDOW_OPEN (7)");
    }
}

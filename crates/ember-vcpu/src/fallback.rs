//! Instruction fallback: instructions the run loop completes on the guest's behalf when
//! the host's KVM cannot emulate them.
//!
//! On hosts where KVM runs guest kernel-mode code through its instruction emulator
//! (nested PVM, see [`crate::cpuid::CpuTemplate::NestedCompat`]), some instructions end
//! `KVM_RUN` with `KVM_EXIT_INTERNAL_ERROR` / `KVM_INTERNAL_ERROR_EMULATION` instead of
//! running. A few of them have simple, fully specified semantics that a VMM can carry
//! out with the register and event ioctls, so the guest goes on exactly as a CPU would
//! have run it. [`decide`] is that decision, a pure function of the instruction bytes
//! and the vCPU state it needs; [`crate::Vcpu::set_instruction_fallback`] turns it on in
//! the run loop, which then applies the [`Completion`] and counts it as an exit of kind
//! [`FallbackInstruction::exit_kind`].
//!
//! | instruction | bytes | seen failing on | completion |
//! |---|---|---|---|
//! | `int3` | `cc` | Linux's alternatives self-test (`int3_selftest`) and run-time text patching (`text_poke_bp`), in long mode | RIP + 1, then #BP (vector 3, no error code) is delivered through the guest's IDT, so the handler sees the return RIP after the `int3`, as for the trap the CPU raises |
//! | `fwait` / `wait` | `9b` | Debian's 6.1 kernel, about 95 s into boot once the template's `clearcpuid=` list let both vCPUs come up, and dozens of times later; x87 is baseline, so it cannot be hidden | #NM (vector 7) when CR0.MP and CR0.TS are both set; #MF (vector 16) at the `fwait` when an unmasked x87 exception is pending and CR0.NE is set; otherwise RIP + 1 (a no-op). With CR0.NE clear the CPU would wait for an external FERR# interrupt: not handled |
//!
//! Anything else, an instruction with prefixes, and any case the table does not cover
//! (single-stepping with RFLAGS.TF, an event already being injected) is not handled: the
//! run loop reports it as [`crate::VcpuError::EmulationFailure`], as without the
//! fallback. Instructions that can be hidden from the guest are hidden instead
//! ([`crate::cpuid::CpuTemplate::NestedCompat`]): `clac`/`stac` (SMAP), for one, are
//! not completed here, because this host runs them in some states and fails in others
//! while its CPUID leaks SMAP to the guest, so no single answer (#UD or not) would match
//! what the guest was told.
//!
//! The decision is made on the bytes KVM reports it failed on (the exit's
//! `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`), else on the bytes at RIP. When
//! memory no longer holds that instruction (another vCPU changed it after the failure:
//! Linux's text patching replaces an `int3` with the rest of a jump while other vCPUs
//! run), the run loop runs the vCPU again, to execute what is there now.

use crate::x86::{CR0_MP, CR0_NE, CR0_TS, RFLAGS_TF};
use crate::ExitKind;

/// The six x87 exception flags (FSW) and their masks (FCW): IE, DE, ZE, OE, UE, PE.
const X87_EXCEPTIONS: u16 = 0x3f;

/// #BP, breakpoint.
const VECTOR_BP: u8 = 3;
/// #NM, device not available.
const VECTOR_NM: u8 = 7;
/// #MF, x87 floating-point error.
const VECTOR_MF: u8 = 16;

/// An instruction the fallback completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackInstruction {
    /// `int3` (`cc`).
    Int3,
    /// `fwait` (`9b`).
    Fwait,
}

impl FallbackInstruction {
    /// The exit kind each completion of this instruction is counted as.
    ///
    /// ```
    /// use ember_vcpu::fallback::FallbackInstruction;
    /// assert_eq!(FallbackInstruction::Int3.exit_kind().name(), "fallback-int3");
    /// ```
    pub fn exit_kind(self) -> ExitKind {
        match self {
            FallbackInstruction::Int3 => ExitKind::FallbackInt3,
            FallbackInstruction::Fwait => ExitKind::FallbackFwait,
        }
    }

    /// The instruction's length in bytes.
    pub fn encoded_len(self) -> u8 {
        match self {
            FallbackInstruction::Int3 | FallbackInstruction::Fwait => 1,
        }
    }

    /// Recognises the instruction at the start of `bytes` (no prefixes).
    ///
    /// ```
    /// use ember_vcpu::fallback::FallbackInstruction;
    /// assert_eq!(FallbackInstruction::decode(&[0xcc, 0x90]), Some(FallbackInstruction::Int3));
    /// assert_eq!(FallbackInstruction::decode(&[0x9b]), Some(FallbackInstruction::Fwait));
    /// assert_eq!(FallbackInstruction::decode(&[0xcd, 0x03]), None); // `int 3` is another instruction
    /// ```
    pub fn decode(bytes: &[u8]) -> Option<FallbackInstruction> {
        match bytes {
            [0xcc, ..] => Some(FallbackInstruction::Int3),
            [0x9b, ..] => Some(FallbackInstruction::Fwait),
            _ => None,
        }
    }
}

/// The vCPU state the decision depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestState {
    /// CR0.
    pub cr0: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// x87 control word.
    pub fcw: u16,
    /// x87 status word.
    pub fsw: u16,
}

/// How to complete an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The instruction ran: RIP moves past it and RFLAGS becomes `rflags`.
    Retire {
        /// Bytes to add to RIP.
        len: u8,
        /// The new RFLAGS.
        rflags: u64,
    },
    /// The instruction raises exception `vector` (no error code) with the return RIP
    /// `len` bytes on: 0 for a fault (the handler sees the faulting instruction), the
    /// instruction's length for a trap (`int3`).
    Raise {
        /// Bytes to add to RIP before the exception is delivered.
        len: u8,
        /// The exception vector.
        vector: u8,
    },
}

/// Decides how to complete the instruction at the start of `bytes` in state `state`;
/// `None` when the fallback does not handle it (see the [module docs](self)).
///
/// ```
/// use ember_vcpu::fallback::{decide, Completion, FallbackInstruction, GuestState};
/// let state = GuestState { cr0: 0x8000_0033, fcw: 0x37f, ..Default::default() };
/// assert_eq!(
///     decide(&[0xcc], &state),
///     Some((FallbackInstruction::Int3, Completion::Raise { len: 1, vector: 3 }))
/// );
/// assert_eq!(
///     decide(&[0x9b], &state),
///     Some((FallbackInstruction::Fwait, Completion::Retire { len: 1, rflags: 0 }))
/// );
/// assert_eq!(decide(&[0x0f, 0xae, 0x2f], &state), None); // xrstor
/// ```
pub fn decide(bytes: &[u8], state: &GuestState) -> Option<(FallbackInstruction, Completion)> {
    let insn = FallbackInstruction::decode(bytes)?;
    if state.rflags & RFLAGS_TF != 0 {
        // A completed instruction would be followed by a single-step #DB; leave that to
        // a real CPU rather than approximate it.
        return None;
    }
    let len = insn.encoded_len();
    let retire = |rflags| Completion::Retire { len, rflags };
    let fault = |vector| Completion::Raise { len: 0, vector };
    let completion = match insn {
        FallbackInstruction::Int3 => Completion::Raise {
            len,
            vector: VECTOR_BP,
        },
        FallbackInstruction::Fwait => {
            let pending = state.fsw & !state.fcw & X87_EXCEPTIONS != 0;
            if state.cr0 & (CR0_MP | CR0_TS) == CR0_MP | CR0_TS {
                fault(VECTOR_NM)
            } else if pending && state.cr0 & CR0_NE != 0 {
                fault(VECTOR_MF)
            } else if pending {
                // Legacy FERR# reporting: the CPU waits for an external interrupt.
                return None;
            } else {
                retire(state.rflags)
            }
        }
    };
    Some((insn, completion))
}

/// What the run loop does with an emulation failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Complete `instruction` as `completion` says.
    Complete(FallbackInstruction, Completion),
    /// Memory no longer holds the instruction KVM failed on: run the vCPU again.
    RunAgain,
    /// Not handled: report the emulation failure.
    Report,
}

/// Resolves an emulation failure: `reported` are the bytes KVM says it failed on (if it
/// says), `in_memory` the bytes at RIP now, `state` the vCPU state.
///
/// ```
/// use ember_vcpu::fallback::{resolve, GuestState, Resolution};
/// let state = GuestState::default();
/// // Another vCPU replaced the int3 with a jump after KVM failed on it.
/// assert_eq!(resolve(Some(&[0xcc]), &[0xe9, 1, 2, 3, 4], &state), Resolution::RunAgain);
/// assert!(matches!(resolve(None, &[0xcc], &state), Resolution::Complete(..)));
/// assert_eq!(resolve(None, &[0x0f, 0x0b], &state), Resolution::Report); // ud2
/// ```
pub fn resolve(reported: Option<&[u8]>, in_memory: &[u8], state: &GuestState) -> Resolution {
    let failed = reported.unwrap_or(in_memory);
    let Some((insn, completion)) = decide(failed, state) else {
        return Resolution::Report;
    };
    let len = usize::from(insn.encoded_len());
    if in_memory.get(..len) == failed.get(..len) {
        Resolution::Complete(insn, completion)
    } else {
        Resolution::RunAgain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CR0_LINUX: u64 = 0x8005_0033; // PG, AM, WP, NE, ET, MP, PE
    const FCW_DEFAULT: u16 = 0x37f; // every exception masked

    fn state() -> GuestState {
        GuestState {
            cr0: CR0_LINUX,
            rflags: 0x46,
            fcw: FCW_DEFAULT,
            fsw: 0,
        }
    }

    #[test]
    fn int3_is_a_trap_after_the_instruction() {
        assert_eq!(
            decide(&[0xcc, 0x0f, 0x0b], &state()),
            Some((
                FallbackInstruction::Int3,
                Completion::Raise { len: 1, vector: 3 }
            ))
        );
    }

    #[test]
    fn only_the_exact_encodings_are_handled() {
        let s = state();
        for bytes in [
            &[][..],
            &[0xcd, 0x03],       // int 3: another instruction (IOPL checks in VM86)
            &[0x66, 0xcc],       // prefixed
            &[0x0f, 0x01, 0xca], // clac: hidden by the template instead
            &[0x0f, 0x01, 0xc8], // monitor
            &[0xf3, 0x48, 0x0f, 0xb8, 0xc0], // popcnt: hidden by the template instead
            &[0x0f, 0xae, 0x2f], // xrstor
        ] {
            assert_eq!(decide(bytes, &s), None, "{bytes:02x?}");
        }
    }

    #[test]
    fn fwait_is_a_no_op_without_pending_exceptions() {
        let s = state();
        assert_eq!(
            decide(&[0x9b, 0xdb, 0xe3], &s), // fwait; fninit: only the wait part
            Some((
                FallbackInstruction::Fwait,
                Completion::Retire {
                    len: 1,
                    rflags: s.rflags
                }
            ))
        );
        // A flag set but masked is not pending.
        let masked = GuestState { fsw: 0x04, ..s };
        assert!(matches!(
            decide(&[0x9b], &masked),
            Some((_, Completion::Retire { len: 1, .. }))
        ));
    }

    #[test]
    fn fwait_raises_mf_for_an_unmasked_pending_exception() {
        // ZE flagged and unmasked (FCW bit 2 clear).
        let s = GuestState {
            fsw: 0x84,
            fcw: FCW_DEFAULT & !0x04,
            ..state()
        };
        assert_eq!(
            decide(&[0x9b], &s),
            Some((
                FallbackInstruction::Fwait,
                Completion::Raise { len: 0, vector: 16 }
            ))
        );
        // With CR0.NE clear the CPU would wait for FERR#: not handled.
        let legacy = GuestState {
            cr0: s.cr0 & !CR0_NE,
            ..s
        };
        assert_eq!(decide(&[0x9b], &legacy), None);
    }

    #[test]
    fn fwait_raises_nm_when_mp_and_ts_are_set() {
        let s = GuestState {
            cr0: CR0_LINUX | CR0_TS,
            ..state()
        };
        assert_eq!(
            decide(&[0x9b], &s),
            Some((
                FallbackInstruction::Fwait,
                Completion::Raise { len: 0, vector: 7 }
            ))
        );
        // TS without MP: fwait ignores TS.
        let no_mp = GuestState {
            cr0: (CR0_LINUX | CR0_TS) & !CR0_MP,
            ..state()
        };
        assert!(matches!(
            decide(&[0x9b], &no_mp),
            Some((_, Completion::Retire { .. }))
        ));
        // #NM takes precedence over a pending x87 exception.
        let both = GuestState {
            fsw: 0x84,
            fcw: 0x37b,
            ..s
        };
        assert_eq!(
            decide(&[0x9b], &both).map(|(_, c)| c),
            Some(Completion::Raise { len: 0, vector: 7 })
        );
    }

    #[test]
    fn changed_bytes_run_the_vcpu_again() {
        let s = state();
        // KVM failed on an int3 that another vCPU has since patched into a jump.
        assert_eq!(
            resolve(Some(&[0xcc, 0x1f, 0x44, 0, 0]), &[0xe9, 0x10, 0, 0, 0], &s),
            Resolution::RunAgain
        );
        // Memory unreadable now: run again too (the fetch will tell).
        assert_eq!(resolve(Some(&[0xcc]), &[], &s), Resolution::RunAgain);
        // Same instruction, different bytes after it: complete it.
        assert!(matches!(
            resolve(Some(&[0xcc, 0x90]), &[0xcc, 0xe9], &s),
            Resolution::Complete(FallbackInstruction::Int3, _)
        ));
        // Without KVM's bytes, memory decides.
        assert!(matches!(
            resolve(None, &[0x9b], &s),
            Resolution::Complete(FallbackInstruction::Fwait, _)
        ));
        // KVM failed on something unhandled: report, whatever memory holds now.
        assert_eq!(
            resolve(Some(&[0x0f, 0xae, 0x2f]), &[0xcc], &s),
            Resolution::Report
        );
        assert_eq!(resolve(None, &[], &s), Resolution::Report);
    }

    #[test]
    fn single_stepping_is_not_handled() {
        let s = GuestState {
            rflags: 0x46 | RFLAGS_TF,
            ..state()
        };
        for bytes in [&[0xcc][..], &[0x9b]] {
            assert_eq!(decide(bytes, &s), None);
        }
    }

    #[test]
    fn every_instruction_counts_as_its_own_exit_kind() {
        let kinds = [FallbackInstruction::Int3, FallbackInstruction::Fwait]
            .map(FallbackInstruction::exit_kind);
        for (i, a) in kinds.iter().enumerate() {
            assert!(a.name().starts_with("fallback-"));
            for b in &kinds[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}

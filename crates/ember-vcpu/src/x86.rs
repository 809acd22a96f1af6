//! x86 architectural bits the crate's modules share: control registers, EFER, RFLAGS and
//! page-table entries, each named once.

/// CR0.PE: protected mode.
pub(crate) const CR0_PE: u64 = 1;
/// CR0.MP: `wait`/`fwait` honour CR0.TS.
pub(crate) const CR0_MP: u64 = 1 << 1;
/// CR0.TS: a task switch happened, x87 state is not the current task's.
pub(crate) const CR0_TS: u64 = 1 << 3;
/// CR0.ET: x87 present (always 1 on modern CPUs).
pub(crate) const CR0_ET: u64 = 1 << 4;
/// CR0.NE: x87 errors are reported as #MF, not through FERR#.
pub(crate) const CR0_NE: u64 = 1 << 5;
/// CR0.PG: paging.
pub(crate) const CR0_PG: u64 = 1 << 31;

/// CR4.PAE: physical address extension.
pub(crate) const CR4_PAE: u64 = 1 << 5;
/// CR4.OSFXSR: the OS saves SSE state with FXSAVE.
pub(crate) const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXMMEXCPT: the OS handles SIMD floating-point exceptions.
pub(crate) const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// CR4.LA57: 5-level paging.
pub(crate) const CR4_LA57: u64 = 1 << 12;
/// CR4.SMEP: supervisor-mode execution prevention.
pub(crate) const CR4_SMEP: u64 = 1 << 20;

/// EFER.LME: long mode enable.
pub(crate) const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub(crate) const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE: no-execute enable.
pub(crate) const EFER_NXE: u64 = 1 << 11;

/// RFLAGS.TF: single-step trap after each instruction.
pub(crate) const RFLAGS_TF: u64 = 1 << 8;
/// RFLAGS.IF: maskable interrupts enabled.
pub(crate) const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS.RF: resume flag (no instruction breakpoint on the next instruction).
pub(crate) const RFLAGS_RF: u64 = 1 << 16;

/// Page-table entry: present.
pub(crate) const PTE_PRESENT: u64 = 1;
/// Page-table entry: writable.
pub(crate) const PTE_WRITABLE: u64 = 1 << 1;
/// Page-table entry: user-accessible.
pub(crate) const PTE_USER: u64 = 1 << 2;
/// Page-table entry: accessed.
pub(crate) const PTE_ACCESSED: u64 = 1 << 5;
/// Page-table entry: dirty.
pub(crate) const PTE_DIRTY: u64 = 1 << 6;
/// Page-directory entry: maps a large page.
pub(crate) const PTE_HUGE: u64 = 1 << 7;
/// Page-table entry: no-execute (with EFER.NXE).
pub(crate) const PTE_NX: u64 = 1 << 63;

/// The 4 KiB page size.
pub(crate) const PAGE_SIZE: u64 = 0x1000;

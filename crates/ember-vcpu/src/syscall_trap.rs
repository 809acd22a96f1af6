//! Syscall trap: makes 64-bit `syscall` from guest user mode enter the guest kernel on
//! hosts whose KVM gets it wrong.
//!
//! # The host bug
//!
//! On nested PVM hosts (the `kvm_pvm` module, see
//! [`CpuTemplate::NestedCompat`](crate::cpuid::CpuTemplate::NestedCompat)) a 64-bit
//! `syscall` executed at CPL3 does everything SYSCALL does except the privilege change:
//! RCX gets the return address, R11 the old RFLAGS, RFLAGS is masked with
//! MSR_SYSCALL_MASK and RIP becomes MSR_LSTAR, but CS and SS keep the user selectors.
//! The vCPU is then at the kernel's entry point at CPL3, and its fetch from the
//! supervisor-only entry page faults: Linux's first system call ends in
//! `init[1]: segfault at ffffffff81c00080 ... error 15` (a #PF with error code 0x15 at
//! `entry_SYSCALL_64`) and the kernel panics. The other ways into the kernel do not help:
//! `int $0x80` from user mode raises #UD, and compatibility-mode `syscall` jumps to
//! MSR_CSTAR truncated to 32 bits. Exceptions from user mode, `iretq`, `sysretq` and
//! `swapgs` work. (`crates/ember-vcpu/tests/user_mode.rs` shows each of these with tiny
//! guests.)
//!
//! # The mechanism
//!
//! The VMM finishes what `syscall` leaves undone:
//!
//! 1. **MSR filter** ([`SyscallTrap::new`], once per VM): `KVM_CAP_X86_USER_SPACE_MSR`
//!    with `KVM_MSR_EXIT_REASON_FILTER` and an MSR filter that allows everything but
//!    reads and writes of MSR_LSTAR, so the guest's `wrmsr`/`rdmsr` of it exit to the
//!    VMM (`KVM_EXIT_X86_WRMSR`/`RDMSR`). The guest reads back the value it wrote; the
//!    real MSR_LSTAR holds [`TRAP_ADDRESS`].
//! 2. **Trap pages**: when the guest writes MSR_LSTAR, the run loop remembers the value,
//!    reads MSR_STAR (Linux writes it just before), and maps two pages at
//!    [`TRAP_ADDRESS`], in PML4 slot [`PML4_SLOT`] of the page tables the guest runs on.
//!    Linux writes MSR_LSTAR in `syscall_init` while CR3 is `swapper_pg_dir`, whose
//!    kernel-half PML4 entries every process copies, and slot 509 is a hole in Linux's
//!    4-level layout (between the `cpu_entry_area` and the espfix stacks), so every
//!    process gets the trap. The first page is user-accessible, read-only and executable,
//!    and holds `mov byte [TRAP_ADDRESS + 0x1000], al`; the second is user-accessible,
//!    writable and NX, and maps a guest-physical page with nothing behind it (the
//!    caller's MMIO page), so the store is an MMIO exit. The page-table pages and the
//!    code page come from guest RAM the caller reserves ([`RESERVED_PAGES`] pages, marked
//!    reserved in the e820 map so the guest never uses them).
//! 3. **Kernel entry**: a `syscall` from user mode lands on the trap page (at CPL3 on the
//!    broken host, at CPL0 on a correct one) and its store exits to the VMM. If RFLAGS.IF
//!    is clear (SYSCALL cleared it through Linux's SFMASK) and RIP is the trap's own
//!    store, the run loop loads CS with a flat 64-bit DPL 0 code segment with the
//!    selector `STAR[47:32] & 0xfffc`, SS with a flat DPL 0 data segment with the
//!    selector `STAR[47:32] + 8`, and RIP with the guest's MSR_LSTAR, exactly as SYSCALL
//!    defines them; RCX, R11 and RFLAGS are already right. The kernel entry then runs
//!    as it would have (`swapgs`, its own stack switch) and returns with `sysretq`,
//!    which works on this host. The registers go through `kvm_run`'s synchronised
//!    register area (`KVM_CAP_SYNC_REGS`), so the exit costs no vCPU ioctl.
//!
//! Anything else that reaches the trap's data page is not a system call, and the guest
//! sees the page fault it would have seen had the pages not been there: user code
//! cannot enter the kernel through the trap. A jump to the trap page with IF set (user
//! code always runs with IF set, and cannot clear it at IOPL 0) gets a #PF for the
//! instruction fetch at [`TRAP_ADDRESS`]: not present, with the user bit for CPL3 and
//! the instruction-fetch bit when EFER.NXE or CR4.SMEP is set (as the CPU reports it),
//! CR2 = [`TRAP_ADDRESS`], RIP back at [`TRAP_ADDRESS`], and RFLAGS.RF set in the frame as
//! for any fault: exactly what a fetch from Linux's unmapped hole raises. A store to the
//! data page from other code gets a not-present write #PF with CR2 = the address
//! written; KVM has already retired that store, so the frame's RIP points after it (a
//! process doing this gets its SIGSEGV one instruction late).
//!
//! With the trap (and the template's `nopti`), Ember's small 6.1 kernel runs a busybox
//! initramfs on the nested host: thousands of system calls, `mount`, `fork`/`exec`, and
//! finally `poweroff -f`.
//!
//! # Cost
//!
//! Per system call, one MMIO exit from user mode plus the run loop's handling, which
//! makes no ioctl. `vmm_syscall_trap_round_trip_cost` in `tests/user_mode.rs` measures
//! it: on the nested development host (2 cores, load about 5, debug build) a round
//! trip of `syscall`, trap and `sysretq` from a user loop took 78-97 us, the same as the
//! floor of a plain user-mode MMIO store round trip there (89-106 us; 18 us on an idle
//! machine per KVM-HOST-FACTS.md), and the run loop spent 0.4-0.6 us (mean) per
//! trapped system call. With the trap on, every exit of the vCPU also carries its registers and
//! system registers in `kvm_run` (KVM copies them out at each exit, and back in after a
//! trapped system call); that made no measurable difference to the MMIO floor. In a
//! Linux guest (Ember's small 6.1 kernel, busybox `dd bs=1`) a `read`/`write` system call
//! took about 0.5 ms of guest time, almost all of it the kernel's own code run through
//! KVM's instruction emulator (about 1 us per instruction). The guest's
//! `wrmsr`/`rdmsr` of MSR_LSTAR (a few per vCPU, at boot) cost an exit each and, for
//! writes, two ioctls. The MMIO-write path of the run loop pays one mask and one compare
//! for the check.
//!
//! # Limits
//!
//! * 4-level paging only: with CR4.LA57 the trap is not armed (the template hides LA57).
//! * No page-table isolation: with PTI, user mode runs on a second PML4 that does not
//!   get the trap's slot, and a system call faults at [`TRAP_ADDRESS`] (the template
//!   adds `nopti`).
//! * The guest must not use PML4 slot 509 itself, must write MSR_LSTAR with CR3 at page
//!   tables whose kernel half its processes share (Linux does both), and must write
//!   MSR_STAR before MSR_LSTAR and never change it afterwards (STAR is read when LSTAR is
//!   written). Where the slot is in use, CR3 is outside guest RAM or the vCPU is not in
//!   long mode, the vCPU's real MSR_LSTAR gets the guest's value and the trap stays
//!   unarmed on that vCPU (a warning is logged): system calls then behave as the host
//!   makes them.
//! * The guest's SFMASK must clear IF (Linux's does): a trap entry with IF set is taken
//!   for a jump, not a system call.
//! * SMEP and SMAP must be off in the guest on hosts where `syscall` does reach CPL0 (the
//!   trap's pages are user pages): the template hides both. On the broken host the
//!   trap runs at CPL3 and they do not matter.
//! * Compatibility-mode `syscall` and `int $0x80` are not covered: 32-bit user programs
//!   still cannot make system calls on this host.
//! * `KVM_GET_MSRS` of MSR_LSTAR returns [`TRAP_ADDRESS`], not the guest's value; the trap
//!   owns the VM's MSR filter (`KVM_X86_SET_MSR_FILTER` replaces any earlier filter).

use crate::x86::{
    CR4_LA57, CR4_SMEP, EFER_LMA, EFER_NXE, PAGE_SIZE, PTE_ACCESSED, PTE_DIRTY, PTE_NX,
    PTE_PRESENT, PTE_USER, PTE_WRITABLE, RFLAGS_IF, RFLAGS_RF,
};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use ember_vm::Vm;
use kvm_bindings::{
    kvm_enable_cap, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs, KVM_EXIT_X86_WRMSR,
    KVM_MSR_EXIT_REASON_FILTER, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS,
};
use kvm_ioctls::{
    Cap, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, SyncReg, VcpuFd,
};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::msrs::index::{LSTAR, STAR};
use crate::{ExitKind, VcpuError};

/// Guest-virtual address of the trap: MSR_LSTAR's real value, and the trap's code page.
/// PML4 slot [`PML4_SLOT`], a hole in Linux's 4-level kernel layout.
///
/// ```
/// use ember_vcpu::syscall_trap::{PML4_SLOT, TRAP_ADDRESS};
/// assert_eq!((TRAP_ADDRESS >> 39) & 511, PML4_SLOT);
/// ```
pub const TRAP_ADDRESS: u64 = 0xffff_fe80_0000_0000;
/// Guest-virtual address of the trap's data page, whose store is the MMIO exit.
pub const TRAP_DATA_ADDRESS: u64 = TRAP_ADDRESS + PAGE_SIZE;
/// The PML4 slot the trap's pages are mapped in.
pub const PML4_SLOT: u64 = 509;
/// Pages of guest RAM the trap needs ([`SyscallTrap::new`]): the code page, then a
/// page-directory-pointer table, a page directory and a page table.
pub const RESERVED_PAGES: u64 = 4;

/// Bits 51:12 of a page-table entry or CR3: the physical address.
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

// The code page: the store, `ud2`, then `int3`s to the end, so that a jump anywhere
// else in the page traps at once.
/// `mov byte [TRAP_DATA_ADDRESS], al`: `a2` and a 64-bit absolute address.
const STORE: [u8; 9] = {
    let a = TRAP_DATA_ADDRESS.to_le_bytes();
    [0xa2, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]
};
const STORE_LEN: u64 = STORE.len() as u64;
const UD2: [u8; 2] = [0x0f, 0x0b];
const INT3: u8 = 0xcc;

/// Intermediate entries: Linux's `_KERNPG_TABLE` plus the user bit, so that its
/// `pgd_bad`/`pud_bad`/`pmd_bad` checks (which ignore the user bit) find them sane.
const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED | PTE_DIRTY;
/// The code page: user, read-only, executable.
const CODE_FLAGS: u64 = PTE_PRESENT | PTE_USER | PTE_ACCESSED;
/// The data page: user, writable (NX added when EFER.NXE is set).
const DATA_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED | PTE_DIRTY;

/// #PF.
const VECTOR_PF: u8 = 14;
// #PF error code bits.
const PF_WRITE: u32 = 1 << 1;
const PF_USER: u32 = 1 << 2;
const PF_FETCH: u32 = 1 << 4;

/// Why the syscall trap could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SyscallTrapError {
    /// The host's KVM lacks a capability the trap needs.
    #[error("this host's KVM lacks {0}, which the syscall trap needs")]
    Unsupported(&'static str),
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// The reserved pages are unusable.
    #[error("the syscall trap's {RESERVED_PAGES} reserved pages at {addr:#x}: {reason}")]
    Pages {
        /// Guest-physical address given.
        addr: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The MMIO page is unusable.
    #[error("the syscall trap's MMIO page at {addr:#x}: {reason}")]
    MmioPage {
        /// Guest-physical address given.
        addr: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Why the trap could not be mapped into the guest's page tables: the guest's state,
/// not an error of the VMM. The vCPU then runs without the trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MapError {
    #[error("the vCPU is not in long mode")]
    NotLongMode,
    #[error("the guest uses 5-level paging (CR4.LA57)")]
    FiveLevelPaging,
    #[error("the PML4 at {0:#x} (from CR3) is outside guest RAM")]
    RootOutsideRam(u64),
    #[error("PML4 slot 509 of the page tables at {table:#x} is in use (entry {entry:#x})")]
    SlotInUse { table: u64, entry: u64 },
    #[error("cannot write the trap's page table at {0:#x}")]
    Write(u64),
}

/// What [`SyscallTrap::map`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapped {
    /// Filled the empty slot.
    New,
    /// The slot already pointed at the trap's tables (another vCPU, or an earlier
    /// write): left alone.
    Already,
}

/// The VM-wide part of the syscall trap: where its pages are, with the VM's MSR filter
/// set up. Shared by every vCPU ([`Vcpu::set_syscall_trap`](crate::Vcpu::set_syscall_trap)).
#[derive(Debug)]
pub struct SyscallTrap {
    /// Guest-physical address of the [`RESERVED_PAGES`] pages.
    pages: u64,
    /// Guest-physical address of the page behind the data page: no memory there.
    mmio: u64,
    /// Serialises the page-table work of the vCPUs.
    map_lock: Mutex<()>,
}

impl SyscallTrap {
    /// Sets up the trap for the VM `vm` with guest memory `mem`: checks and writes the
    /// trap's code page, enables `KVM_CAP_X86_USER_SPACE_MSR` for filtered MSRs and sets
    /// an MSR filter that sends the guest's accesses to MSR_LSTAR to the VMM (and allows
    /// every other MSR).
    ///
    /// `pages` is the first of [`RESERVED_PAGES`] page-aligned pages of guest RAM the
    /// VMM keeps for the trap and marks reserved in the guest's memory map; `mmio_page`
    /// a page-aligned guest-physical page with no RAM and no device behind it (in the
    /// MMIO hole, say). Call once per VM, before the vCPUs run, then hand the result to
    /// every vCPU with [`Vcpu::set_syscall_trap`](crate::Vcpu::set_syscall_trap): with
    /// the filter on, every vCPU must handle the MSR exits.
    ///
    /// Fails with [`SyscallTrapError`] (as [`VcpuError::SyscallTrap`]) when KVM lacks
    /// `KVM_CAP_X86_USER_SPACE_MSR`, `KVM_CAP_X86_MSR_FILTER` or register
    /// synchronisation (`KVM_CAP_SYNC_REGS`), or when the pages are not where they must
    /// be.
    ///
    /// ```no_run
    /// use ember_vcpu::syscall_trap::SyscallTrap;
    /// use vm_memory::GuestAddress;
    ///
    /// let kvm = kvm_ioctls::Kvm::new()?;
    /// let layout = ember_memory::MemoryLayout::new(64 << 20)?;
    /// let mem = ember_memory::create_guest_memory(&layout, ember_memory::HugePages::None)?;
    /// let vm = ember_vm::Vm::new(&kvm, mem)?;
    /// // 0xc0000..0xc4000 is reserved in Ember's e820 map; nothing lives at 3 GiB.
    /// let trap = SyscallTrap::new(&vm, GuestAddress(0xc_0000), GuestAddress(0xc000_0000))?;
    /// let mut vcpu = ember_vcpu::Vcpu::new(
    ///     &vm,
    ///     0,
    ///     std::sync::Arc::new(ember_bus::Bus::new(ember_bus::BusKind::Pio)),
    ///     std::sync::Arc::new(ember_bus::Bus::new(ember_bus::BusKind::Mmio)),
    /// )?;
    /// vcpu.set_syscall_trap(Some(trap));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new<B: Bitmap>(
        vm: &Vm<B>,
        pages: GuestAddress,
        mmio_page: GuestAddress,
    ) -> Result<Arc<SyscallTrap>, VcpuError> {
        let trap = SyscallTrap::prepare(vm.memory(), pages, mmio_page)?;
        let vm = vm.fd();
        for (cap, name) in [
            (Cap::X86UserSpaceMsr, "KVM_CAP_X86_USER_SPACE_MSR"),
            (Cap::X86MsrFilter, "KVM_CAP_X86_MSR_FILTER"),
        ] {
            if !vm.check_extension(cap) {
                return Err(SyscallTrapError::Unsupported(name).into());
            }
        }
        let sync = u64::try_from(vm.check_extension_int(Cap::SyncRegs)).unwrap_or(0);
        let needed = u64::from(KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS);
        if sync & needed != needed {
            return Err(SyscallTrapError::Unsupported(
                "KVM_CAP_SYNC_REGS for registers and system registers",
            )
            .into());
        }
        vm.enable_cap(&kvm_enable_cap {
            cap: Cap::X86UserSpaceMsr as u32,
            args: [u64::from(KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
            ..Default::default()
        })
        .map_err(|source| SyscallTrapError::Kvm {
            op: "KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)",
            source,
        })?;
        // A clear bit denies the access, which with the exit enabled means: ask the VMM.
        let deny = [0u8];
        vm.set_msr_filter(
            MsrFilterDefaultAction::ALLOW,
            &[MsrFilterRange {
                flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
                base: LSTAR,
                msr_count: 1,
                bitmap: &deny,
            }],
        )
        .map_err(|source| SyscallTrapError::Kvm {
            op: "KVM_X86_SET_MSR_FILTER",
            source,
        })?;
        Ok(Arc::new(trap))
    }

    /// Checks where the pages are and writes the code page; no KVM involved.
    pub(crate) fn prepare<B: Bitmap>(
        mem: &GuestMemoryMmap<B>,
        pages: GuestAddress,
        mmio_page: GuestAddress,
    ) -> Result<SyscallTrap, SyscallTrapError> {
        let (pages, mmio) = (pages.0, mmio_page.0);
        let bad_pages = |reason| SyscallTrapError::Pages {
            addr: pages,
            reason,
        };
        let bad_mmio = |reason| SyscallTrapError::MmioPage { addr: mmio, reason };
        if pages % PAGE_SIZE != 0 {
            return Err(bad_pages("not page-aligned"));
        }
        let len = RESERVED_PAGES * PAGE_SIZE;
        if pages.checked_add(len).is_none_or(|end| end > ADDRESS_MASK)
            || !mem.check_range(GuestAddress(pages), len as usize)
        {
            return Err(bad_pages("not all in guest RAM"));
        }
        if mmio % PAGE_SIZE != 0 {
            return Err(bad_mmio("not page-aligned"));
        }
        if mmio > ADDRESS_MASK {
            return Err(bad_mmio("beyond what a page-table entry can address"));
        }
        if mem.address_in_range(GuestAddress(mmio))
            || mem.address_in_range(GuestAddress(mmio + PAGE_SIZE - 1))
        {
            return Err(bad_mmio(
                "guest RAM is there, so the trap's store would not exit",
            ));
        }
        let mut code = [INT3; PAGE_SIZE as usize];
        code[..STORE.len()].copy_from_slice(&STORE);
        code[STORE.len()..STORE.len() + UD2.len()].copy_from_slice(&UD2);
        mem.write_slice(&code, GuestAddress(pages))
            .map_err(|_| bad_pages("cannot write the code page"))?;
        Ok(SyscallTrap {
            pages,
            mmio,
            map_lock: Mutex::new(()),
        })
    }

    /// Guest-physical address of the first reserved page (the code page).
    pub fn pages(&self) -> GuestAddress {
        GuestAddress(self.pages)
    }

    /// Guest-physical address of the page behind the trap's data page.
    pub fn mmio_page(&self) -> GuestAddress {
        GuestAddress(self.mmio)
    }

    /// The reserved pages: code, PDPT, page directory, page table.
    fn page_addresses(&self) -> [u64; 4] {
        [0, 1, 2, 3].map(|i| self.pages + i * PAGE_SIZE)
    }

    /// Maps the trap's two pages into PML4 slot [`PML4_SLOT`] of the page tables at
    /// `cr3`, if that slot is empty. Every value comes from the guest: nothing here
    /// trusts it beyond reading one PML4 entry, which must be in guest RAM.
    pub(crate) fn map<B: Bitmap>(
        &self,
        mem: &GuestMemoryMmap<B>,
        cr3: u64,
        cr4: u64,
        efer: u64,
    ) -> Result<Mapped, MapError> {
        if efer & EFER_LMA == 0 {
            return Err(MapError::NotLongMode);
        }
        if cr4 & CR4_LA57 != 0 {
            return Err(MapError::FiveLevelPaging);
        }
        let root = cr3 & ADDRESS_MASK;
        // Cannot overflow: root is below 2^52.
        let slot = GuestAddress(root + 8 * PML4_SLOT);
        let [code, pdpt, pd, pt] = self.page_addresses();
        // Two vCPUs writing MSR_LSTAR at once must not both build the tables.
        let _guard = self.map_lock.lock().unwrap_or_else(PoisonError::into_inner);
        let entry: u64 = mem
            .load(slot, Ordering::Acquire)
            .map_err(|_| MapError::RootOutsideRam(root))?;
        if entry & PTE_PRESENT != 0 {
            return if entry & ADDRESS_MASK == pdpt {
                Ok(Mapped::Already)
            } else {
                Err(MapError::SlotInUse { table: root, entry })
            };
        }
        let nx = if efer & EFER_NXE != 0 { PTE_NX } else { 0 };
        let write_table = |table: u64, entries: &[u64]| {
            let mut bytes = [0u8; PAGE_SIZE as usize];
            for (chunk, e) in bytes.chunks_exact_mut(8).zip(entries) {
                chunk.copy_from_slice(&e.to_le_bytes());
            }
            mem.write_slice(&bytes, GuestAddress(table))
                .map_err(|_| MapError::Write(table))
        };
        write_table(pdpt, &[pd | TABLE_FLAGS])?;
        write_table(pd, &[pt | TABLE_FLAGS])?;
        write_table(pt, &[code | CODE_FLAGS, self.mmio | DATA_FLAGS | nx])?;
        // Last, in one aligned store: a walker never sees a half-built tree.
        mem.store(pdpt | TABLE_FLAGS, slot, Ordering::Release)
            .map_err(|_| MapError::Write(slot.0))?;
        Ok(Mapped::New)
    }
}

/// What to do with a store that reached the trap's data page.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Entry {
    /// A system call: finish it with these CS, SS and RIP.
    Syscall {
        rip: u64,
        cs: kvm_segment,
        ss: kvm_segment,
    },
    /// Not a system call: raise the #PF the access would have raised without the trap,
    /// with RIP at `rip`.
    Fault { rip: u64, cr2: u64, error_code: u32 },
}

/// The vCPU state [`decide`] needs from the trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Armed {
    /// The guest's MSR_LSTAR.
    pub lstar: u64,
    /// MSR_STAR when the guest wrote MSR_LSTAR.
    pub star: u64,
}

/// Decides what a store to the trap's data page at byte `offset` is, from the vCPU's
/// registers at the exit; `armed` is `None` where the trap is not armed on this vCPU.
pub(crate) fn decide(
    armed: Option<Armed>,
    offset: u64,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
) -> Entry {
    // KVM retires an emulated MMIO store before it exits; accept the store's own
    // address too, in case a KVM does not.
    let from_trap = regs.rip == TRAP_ADDRESS + STORE_LEN || regs.rip == TRAP_ADDRESS;
    let long_mode = sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0;
    if let Some(armed) = armed {
        if from_trap && offset == 0 && long_mode && regs.rflags & RFLAGS_IF == 0 {
            let selector = (armed.star >> 32) as u16;
            return Entry::Syscall {
                rip: armed.lstar,
                cs: kernel_code_segment(selector & 0xfffc),
                ss: kernel_data_segment(selector.wrapping_add(8)),
            };
        }
    }
    // KVM's notion of the CPL: SS.DPL.
    let user = if sregs.ss.dpl == 3 { PF_USER } else { 0 };
    if from_trap {
        // A jump to the trap: the fetch from the (as far as the guest knows) unmapped
        // page faults. The CPU reports fetches only with NX or SMEP on.
        let fetch = if sregs.efer & EFER_NXE != 0 || sregs.cr4 & CR4_SMEP != 0 {
            PF_FETCH
        } else {
            0
        };
        Entry::Fault {
            rip: TRAP_ADDRESS,
            cr2: TRAP_ADDRESS,
            error_code: user | fetch,
        }
    } else {
        // Some other store to the data page. KVM has retired it: RIP stays after it.
        Entry::Fault {
            rip: regs.rip,
            cr2: TRAP_DATA_ADDRESS + (offset % PAGE_SIZE),
            error_code: user | PF_WRITE,
        }
    }
}

/// The flat 64-bit DPL 0 code segment SYSCALL loads.
fn kernel_code_segment(selector: u16) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The flat DPL 0 data segment SYSCALL loads into SS.
fn kernel_data_segment(selector: u16) -> kvm_segment {
    kvm_segment {
        selector,
        type_: 0x3, // read/write, accessed
        db: 1,
        l: 0,
        ..kernel_code_segment(selector)
    }
}

/// Whether `addr` is canonical with 48-bit (or, with LA57, 57-bit) virtual addresses.
fn is_canonical(addr: u64, la57: bool) -> bool {
    let unused = if la57 { 64 - 57 } else { 64 - 48 };
    (((addr << unused) as i64) >> unused) as u64 == addr
}

/// The per-vCPU state of the trap that lives in the VMM, not in KVM: what a snapshot
/// saves with the vCPU ([`VcpuState::syscall_trap`](crate::state::VcpuState)). KVM's own
/// MSR_LSTAR holds [`TRAP_ADDRESS`] where the trap is armed, and is saved and restored
/// as it is with the other MSRs; restored on a vCPU whose VMM re-created the trap at the
/// same addresses ([`SyscallTrap::new`] with the same pages), the guest goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SyscallTrapVcpuState {
    /// The MSR_LSTAR the guest wrote (and reads back).
    pub guest_lstar: u64,
    /// Set where the trap is armed on the vCPU: the guest's MSR_LSTAR and the MSR_STAR
    /// read when the guest wrote it.
    pub armed: Option<SyscallTrapArmed>,
}

/// The trap's state on a vCPU where it is armed (part of [`SyscallTrapVcpuState`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SyscallTrapArmed {
    /// The guest's MSR_LSTAR, where a system call enters the kernel.
    pub lstar: u64,
    /// MSR_STAR when the guest wrote MSR_LSTAR (the kernel's selectors).
    pub star: u64,
}

/// The per-vCPU part of the trap, owned by the run loop.
#[derive(Debug)]
pub(crate) struct VcpuTrap {
    trap: Arc<SyscallTrap>,
    /// The MSR_LSTAR the guest wrote (and reads back). The boot MSRs set 0.
    guest_lstar: u64,
    /// Set when the trap is armed on this vCPU: mapped, real MSR_LSTAR = TRAP_ADDRESS.
    armed: Option<Armed>,
}

impl VcpuTrap {
    /// The trap's state for a vCPU; turns on register synchronisation in its `kvm_run`
    /// (the exits that follow carry the registers the trap reads and writes).
    pub(crate) fn new(trap: Arc<SyscallTrap>, fd: &mut VcpuFd) -> VcpuTrap {
        fd.set_sync_valid_reg(SyncReg::Register);
        fd.set_sync_valid_reg(SyncReg::SystemRegister);
        VcpuTrap {
            trap,
            guest_lstar: 0,
            armed: None,
        }
    }

    /// The state a snapshot saves.
    pub(crate) fn save(&self) -> SyscallTrapVcpuState {
        SyscallTrapVcpuState {
            guest_lstar: self.guest_lstar,
            armed: self.armed.map(|a| SyscallTrapArmed {
                lstar: a.lstar,
                star: a.star,
            }),
        }
    }

    /// Takes the state a snapshot saved.
    pub(crate) fn restore(&mut self, state: &SyscallTrapVcpuState) {
        self.guest_lstar = state.guest_lstar;
        self.armed = state.armed.map(|a| Armed {
            lstar: a.lstar,
            star: a.star,
        });
    }

    /// Turns register synchronisation off again.
    pub(crate) fn detach(fd: &mut VcpuFd) {
        fd.clear_sync_valid_reg(SyncReg::Register);
        fd.clear_sync_valid_reg(SyncReg::SystemRegister);
    }

    /// Answers a guest `rdmsr` that exited (`KVM_EXIT_X86_RDMSR`): MSR_LSTAR reads the
    /// guest's value; any other MSR (only another filter would send it here) raises #GP.
    pub(crate) fn rdmsr(&self, index: u32, data: &mut u64, error: &mut u8) {
        if index == LSTAR {
            *data = self.guest_lstar;
            *error = 0;
        } else {
            *error = 1;
        }
    }

    /// Handles the guest `wrmsr` that just exited (`KVM_EXIT_X86_WRMSR`): accepts a
    /// canonical MSR_LSTAR, arms the trap (maps it under the current CR3, real MSR_LSTAR
    /// = [`TRAP_ADDRESS`]) or, where it cannot, gives the real MSR the guest's value.
    /// Anything else raises #GP in the guest, as the CPU would for a non-canonical
    /// value. Fails only when a KVM ioctl does.
    #[cold]
    pub(crate) fn wrmsr<B: Bitmap>(
        &mut self,
        fd: &mut VcpuFd,
        mem: &GuestMemoryMmap<B>,
        vcpu: u32,
    ) -> Result<(), VcpuError> {
        let sregs = fd.sync_regs().sregs;
        let run = fd.get_kvm_run();
        if run.exit_reason != KVM_EXIT_X86_WRMSR {
            return Ok(());
        }
        // SAFETY: the exit reason is KVM_EXIT_X86_WRMSR, so `msr` is the active member.
        let msr = unsafe { &mut run.__bindgen_anon_1.msr };
        let (index, value) = (msr.index, msr.data);
        let accepted = index == LSTAR && is_canonical(value, sregs.cr4 & CR4_LA57 != 0);
        msr.error = u8::from(!accepted);
        if !accepted {
            // Guest-triggered, like the lines below: rate-limited.
            ember_rate_limiter::log_limited!(
                log::Level::Debug,
                "vCPU {vcpu}: #GP for wrmsr {index:#x} <- {value:#x}"
            );
            return Ok(());
        }
        self.guest_lstar = value;
        let star = get_msr(fd, STAR, vcpu)?;
        let real = match self.trap.map(mem, sregs.cr3, sregs.cr4, sregs.efer) {
            Ok(how) => {
                ember_rate_limiter::log_limited!(
                    log::Level::Debug,
                    "vCPU {vcpu}: syscall trap armed for MSR_LSTAR {value:#x}, MSR_STAR \
                     {star:#x}, CR3 {:#x} ({how:?})",
                    sregs.cr3
                );
                self.armed = Some(Armed { lstar: value, star });
                TRAP_ADDRESS
            }
            Err(why) => {
                ember_rate_limiter::warn_limited!(
                    "vCPU {vcpu}: syscall trap not armed: {why}; the guest's system calls \
                     go straight to its MSR_LSTAR {value:#x}"
                );
                self.armed = None;
                value
            }
        };
        set_msr(fd, LSTAR, real, vcpu)
    }

    /// Handles a store to the trap's data page at guest-physical `addr`: enters the
    /// guest kernel for a system call ([`ExitKind::SyscallTrap`]), otherwise raises the
    /// guest's #PF ([`ExitKind::MmioWrite`]). The register changes go back through
    /// `kvm_run` with the next `KVM_RUN`; only the fault path makes an ioctl.
    pub(crate) fn enter(&self, fd: &mut VcpuFd, addr: u64) -> Result<ExitKind, VcpuError> {
        let offset = addr.wrapping_sub(self.trap.mmio);
        let sync = fd.sync_regs_mut();
        match decide(self.armed, offset, &sync.regs, &sync.sregs) {
            Entry::Syscall { rip, cs, ss } => {
                sync.regs.rip = rip;
                sync.sregs.cs = cs;
                sync.sregs.ss = ss;
                fd.set_sync_dirty_reg(SyncReg::Register);
                fd.set_sync_dirty_reg(SyncReg::SystemRegister);
                Ok(ExitKind::SyscallTrap)
            }
            Entry::Fault {
                rip,
                cr2,
                error_code,
            } => {
                let at = sync.regs.rip;
                let mut events = fd
                    .get_vcpu_events()
                    .map_err(|e| VcpuError::kvm("KVM_GET_VCPU_EVENTS (syscall trap)", e))?;
                if events.exception.injected != 0 || events.exception.pending != 0 {
                    // An event already on its way into the guest: let it go first and
                    // drop the store, as the bus does for an unclaimed one.
                    return Ok(ExitKind::MmioWrite);
                }
                let sync = fd.sync_regs_mut();
                sync.regs.rip = rip;
                // A fault's frame has RF set; KVM sets it only for exceptions it
                // raises itself.
                sync.regs.rflags |= RFLAGS_RF;
                sync.sregs.cr2 = cr2;
                fd.set_sync_dirty_reg(SyncReg::Register);
                fd.set_sync_dirty_reg(SyncReg::SystemRegister);
                // Injected, not pending: applying the synchronised registers at the
                // next KVM_RUN drops a pending exception, not an injected one.
                events.exception.injected = 1;
                events.exception.pending = 0;
                events.exception.nr = VECTOR_PF;
                events.exception.has_error_code = 1;
                events.exception.error_code = error_code;
                fd.set_vcpu_events(&events)
                    .map_err(|e| VcpuError::kvm("KVM_SET_VCPU_EVENTS (syscall trap)", e))?;
                ember_rate_limiter::log_limited!(
                    log::Level::Debug,
                    "syscall trap entered other than by syscall (RIP {at:#x}, store to \
                     {addr:#x}): #PF {error_code:#x} at {cr2:#x}"
                );
                Ok(ExitKind::MmioWrite)
            }
        }
    }
}

fn get_msr(fd: &VcpuFd, index: u32, vcpu: u32) -> Result<u64, VcpuError> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .map_err(VcpuError::MsrList)?;
    let read = fd
        .get_msrs(&mut msrs)
        .map_err(|e| VcpuError::kvm(format!("KVM_GET_MSRS {index:#x} on vCPU {vcpu}"), e))?;
    match msrs.as_slice().first() {
        Some(entry) if read == 1 => Ok(entry.data),
        _ => Err(VcpuError::MsrsRejected {
            vcpu,
            set: read,
            total: 1,
            failed: index,
        }),
    }
}

fn set_msr(fd: &VcpuFd, index: u32, data: u64, vcpu: u32) -> Result<(), VcpuError> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])
    .map_err(VcpuError::MsrList)?;
    let set = fd
        .set_msrs(&msrs)
        .map_err(|e| VcpuError::kvm(format!("KVM_SET_MSRS {index:#x} on vCPU {vcpu}"), e))?;
    if set == 1 {
        Ok(())
    } else {
        Err(VcpuError::MsrsRejected {
            vcpu,
            set,
            total: 1,
            failed: index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const PAGES: u64 = 0x10_0000;
    const MMIO: u64 = 0xc000_0000;
    const ROOT: u64 = 0x20_0000;
    const EFER_LONG: u64 = EFER_LMA | (1 << 8) | EFER_NXE | 1;
    const CR4_PAE: u64 = 1 << 5;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (16 * MIB) as usize)]).unwrap()
    }

    fn trap(mem: &GuestMemoryMmap) -> SyscallTrap {
        SyscallTrap::prepare(mem, GuestAddress(PAGES), GuestAddress(MMIO)).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, at: u64) -> u64 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// The guest-physical address of `virt` under `root` (4 KiB pages only), and the
    /// flags of every level ANDed together.
    fn translate(mem: &GuestMemoryMmap, root: u64, virt: u64) -> Option<(u64, u64)> {
        let mut table = root & ADDRESS_MASK;
        let mut flags = u64::MAX;
        for shift in [39, 30, 21, 12] {
            let entry = read(mem, table + 8 * ((virt >> shift) & 511));
            if entry & PTE_PRESENT == 0 {
                return None;
            }
            flags &= entry & !ADDRESS_MASK;
            table = entry & ADDRESS_MASK;
        }
        Some((table | (virt & 0xfff), flags))
    }

    #[test]
    fn the_code_page_holds_the_store_then_traps() {
        let mem = mem();
        trap(&mem);
        let mut page = [0u8; 4096];
        mem.read_slice(&mut page, GuestAddress(PAGES)).unwrap();
        assert_eq!(page[0], 0xa2);
        assert_eq!(page[1..9], TRAP_DATA_ADDRESS.to_le_bytes());
        assert_eq!(page[9..11], UD2);
        assert!(page[11..].iter().all(|&b| b == INT3));
    }

    #[test]
    fn an_empty_slot_is_filled() {
        let mem = mem();
        let t = trap(&mem);
        // PCID bits in CR3 are ignored.
        let cr3 = ROOT | 0x5;
        assert_eq!(
            t.map(&mem, cr3, CR4_PAE, EFER_LONG),
            Ok(Mapped::New),
            "first map"
        );
        let (code, flags) = translate(&mem, ROOT, TRAP_ADDRESS).unwrap();
        assert_eq!(code, PAGES);
        assert_eq!(
            flags & (PTE_USER | PTE_WRITABLE | PTE_NX),
            PTE_USER,
            "user, read-only, exec"
        );
        let (data, flags) = translate(&mem, ROOT, TRAP_DATA_ADDRESS + 8).unwrap();
        assert_eq!(data, MMIO + 8);
        assert_eq!(flags & (PTE_USER | PTE_WRITABLE), PTE_USER | PTE_WRITABLE);
        assert_eq!(read(&mem, PAGES + 3 * PAGE_SIZE + 8) & PTE_NX, PTE_NX);
        // Intermediate entries look like Linux's kernel tables plus U.
        assert_eq!(
            read(&mem, ROOT + 8 * PML4_SLOT),
            (PAGES + PAGE_SIZE) | TABLE_FLAGS
        );
        // Nothing else in the PML4 changed.
        for slot in (0..512).filter(|&s| s != PML4_SLOT) {
            assert_eq!(read(&mem, ROOT + 8 * slot), 0, "slot {slot}");
        }
    }

    #[test]
    fn without_nxe_the_data_page_has_no_nx_bit() {
        let mem = mem();
        let t = trap(&mem);
        t.map(&mem, ROOT, CR4_PAE, EFER_LONG & !EFER_NXE).unwrap();
        assert_eq!(read(&mem, PAGES + 3 * PAGE_SIZE + 8) & PTE_NX, 0);
    }

    #[test]
    fn a_slot_already_filled_is_left_alone() {
        let mem = mem();
        let t = trap(&mem);
        assert_eq!(t.map(&mem, ROOT, CR4_PAE, EFER_LONG), Ok(Mapped::New));
        // Another vCPU, or another write, with the same tables.
        let pt = PAGES + 3 * PAGE_SIZE;
        mem.write_obj(0x1234u64, GuestAddress(pt + 16)).unwrap();
        assert_eq!(t.map(&mem, ROOT, CR4_PAE, EFER_LONG), Ok(Mapped::Already));
        assert_eq!(read(&mem, pt + 16), 0x1234, "the tables were not rewritten");
        // A second PML4 that copied the kernel half (a process): also already there.
        let copy = ROOT + 0x1000;
        let entry = read(&mem, ROOT + 8 * PML4_SLOT);
        mem.write_obj(entry, GuestAddress(copy + 8 * PML4_SLOT))
            .unwrap();
        assert_eq!(t.map(&mem, copy, CR4_PAE, EFER_LONG), Ok(Mapped::Already));
    }

    #[test]
    fn a_slot_the_guest_uses_is_left_alone() {
        let mem = mem();
        let t = trap(&mem);
        let theirs = 0x30_0000 | TABLE_FLAGS;
        mem.write_obj(theirs, GuestAddress(ROOT + 8 * PML4_SLOT))
            .unwrap();
        assert_eq!(
            t.map(&mem, ROOT, CR4_PAE, EFER_LONG),
            Err(MapError::SlotInUse {
                table: ROOT,
                entry: theirs
            })
        );
        assert_eq!(read(&mem, ROOT + 8 * PML4_SLOT), theirs);
        assert_eq!(read(&mem, PAGES + PAGE_SIZE), 0, "no table written");
    }

    #[test]
    fn cr3_outside_ram_is_refused() {
        let mem = mem();
        let t = trap(&mem);
        for cr3 in [16 * MIB, 0x000f_ffff_ffff_f000, u64::MAX, 0xc000_0000] {
            assert_eq!(
                t.map(&mem, cr3, CR4_PAE, EFER_LONG),
                Err(MapError::RootOutsideRam(cr3 & ADDRESS_MASK)),
                "{cr3:#x}"
            );
        }
        assert_eq!(read(&mem, PAGES + PAGE_SIZE), 0, "no table written");
    }

    #[test]
    fn five_level_paging_and_legacy_modes_are_refused() {
        let mem = mem();
        let t = trap(&mem);
        assert_eq!(
            t.map(&mem, ROOT, CR4_PAE | CR4_LA57, EFER_LONG),
            Err(MapError::FiveLevelPaging)
        );
        assert_eq!(
            t.map(&mem, ROOT, CR4_PAE, EFER_LONG & !EFER_LMA),
            Err(MapError::NotLongMode)
        );
        assert_eq!(read(&mem, ROOT + 8 * PML4_SLOT), 0);
    }

    #[test]
    fn bad_pages_are_refused_at_set_up() {
        let mem = mem();
        let prepare =
            |pages, mmio| SyscallTrap::prepare(&mem, GuestAddress(pages), GuestAddress(mmio));
        for pages in [PAGES + 8, 16 * MIB - 3 * PAGE_SIZE, 16 * MIB, !0xfff] {
            assert!(
                matches!(prepare(pages, MMIO), Err(SyscallTrapError::Pages { .. })),
                "{pages:#x}"
            );
        }
        for mmio in [MMIO + 1, 0x8000, 16 * MIB - PAGE_SIZE, 1 << 52] {
            assert!(
                matches!(prepare(PAGES, mmio), Err(SyscallTrapError::MmioPage { .. })),
                "{mmio:#x}"
            );
        }
        assert!(prepare(16 * MIB - 4 * PAGE_SIZE, 16 * MIB).is_ok());
    }

    fn user_regs(rip: u64, rflags: u64) -> (kvm_regs, kvm_sregs) {
        let regs = kvm_regs {
            rip,
            rflags,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            efer: EFER_LONG,
            cr4: CR4_PAE,
            ..Default::default()
        };
        sregs.cs = kvm_segment {
            selector: 0x33,
            dpl: 3,
            l: 1,
            ..Default::default()
        };
        sregs.ss = kvm_segment {
            selector: 0x2b,
            dpl: 3,
            ..Default::default()
        };
        (regs, sregs)
    }

    const LINUX: Armed = Armed {
        lstar: 0xffff_ffff_81c0_0080,
        star: 0x0023_0010_0000_0000,
    };

    #[test]
    fn a_syscall_enters_the_kernel_as_star_says() {
        let (regs, sregs) = user_regs(TRAP_ADDRESS + STORE_LEN, 0x2);
        let Entry::Syscall { rip, cs, ss } = decide(Some(LINUX), 0, &regs, &sregs) else {
            panic!("not a syscall");
        };
        assert_eq!(rip, LINUX.lstar);
        assert_eq!(
            (cs.selector, cs.dpl, cs.l, cs.db, cs.type_, cs.present, cs.s),
            (0x10, 0, 1, 0, 0xb, 1, 1)
        );
        assert_eq!(
            (ss.selector, ss.dpl, ss.l, ss.db, ss.type_, ss.present, ss.s),
            (0x18, 0, 0, 1, 0x3, 1, 1)
        );
        assert_eq!((cs.base, cs.limit, ss.limit), (0, 0xffff_ffff, 0xffff_ffff));
        // RPL bits of STAR's selector: masked for CS only, as SYSCALL does.
        let odd = Armed {
            star: 0x0013_0000_0000,
            ..LINUX
        };
        let Entry::Syscall { cs, ss, .. } = decide(Some(odd), 0, &regs, &sregs) else {
            panic!("not a syscall");
        };
        assert_eq!((cs.selector, ss.selector), (0x10, 0x1b));
        // Also at CPL0 (a host whose syscall works): the same entry.
        let mut kernel = sregs;
        kernel.cs = kernel_code_segment(0x10);
        kernel.ss = kernel_data_segment(0x18);
        assert!(matches!(
            decide(Some(LINUX), 0, &regs, &kernel),
            Entry::Syscall { .. }
        ));
    }

    #[test]
    fn a_jump_to_the_trap_with_if_set_is_a_fetch_fault() {
        let (regs, sregs) = user_regs(TRAP_ADDRESS + STORE_LEN, 0x202);
        let fault = Entry::Fault {
            rip: TRAP_ADDRESS,
            cr2: TRAP_ADDRESS,
            error_code: PF_USER | PF_FETCH,
        };
        assert_eq!(decide(Some(LINUX), 0, &regs, &sregs), fault);
        // Unarmed, even IF clear is no system call.
        let (regs_if_clear, _) = user_regs(TRAP_ADDRESS + STORE_LEN, 0x2);
        assert_eq!(decide(None, 0, &regs_if_clear, &sregs), fault);
        // Without NX and SMEP the CPU does not report the fetch.
        let mut no_nx = sregs;
        no_nx.efer &= !EFER_NXE;
        assert_eq!(
            decide(Some(LINUX), 0, &regs, &no_nx),
            Entry::Fault {
                rip: TRAP_ADDRESS,
                cr2: TRAP_ADDRESS,
                error_code: PF_USER
            }
        );
    }

    #[test]
    fn another_store_to_the_data_page_is_a_write_fault() {
        let (regs, sregs) = user_regs(0x40_0010, 0x2);
        assert_eq!(
            decide(Some(LINUX), 0x20, &regs, &sregs),
            Entry::Fault {
                rip: 0x40_0010,
                cr2: TRAP_DATA_ADDRESS + 0x20,
                error_code: PF_USER | PF_WRITE
            }
        );
        // The trap's RIP but another offset: not the trap's store either.
        let (regs, _) = user_regs(TRAP_ADDRESS + STORE_LEN, 0x2);
        assert!(matches!(
            decide(Some(LINUX), 8, &regs, &sregs),
            Entry::Fault { .. }
        ));
        // Compatibility mode: not a 64-bit syscall.
        let mut compat = sregs;
        compat.cs.l = 0;
        assert!(matches!(
            decide(Some(LINUX), 0, &regs, &compat),
            Entry::Fault { .. }
        ));
    }

    #[test]
    fn canonical_addresses() {
        assert!(is_canonical(0x7fff_ffff_ffff, false));
        assert!(is_canonical(0xffff_8000_0000_0000, false));
        assert!(!is_canonical(0x8000_0000_0000, false));
        assert!(is_canonical(0x8000_0000_0000, true));
        assert!(!is_canonical(0x0100_0000_0000_0000, true));
        assert!(is_canonical(TRAP_ADDRESS, false));
    }
}

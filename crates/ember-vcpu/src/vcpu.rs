//! A vCPU: creation, x86-64 set-up, and the run loop that dispatches exits to the buses.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use ember_bus::{Bus, BusHandle};
use ember_vm::Vm;
use kvm_bindings::{
    kvm_mp_state, kvm_run, CpuId, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_HLT, KVM_EXIT_HYPERCALL,
    KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_INTR, KVM_EXIT_IO, KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT,
    KVM_EXIT_MEMORY_FAULT, KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN, KVM_EXIT_SYSTEM_EVENT,
    KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::VcpuFd;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::clock::ExitClock;
use crate::control::{Command, Shared, VcpuControl, PAUSE, STOP};
use crate::exit::{ExitAction, UnhandledExit};
use crate::fallback::{self, Completion, FallbackInstruction, GuestState, Resolution};
use crate::kick::{install_kick_handler, kick_signal};
use crate::msrs::index::LSTAR;
use crate::regs::BootRegs;
use crate::run_area::RunArea;
use crate::state::{VcpuState, XsaveState};
use crate::syscall_trap::{SyscallTrap, VcpuTrap};
use crate::x86::{EFER_LMA, PAGE_SIZE};
use crate::{cpuid, lapic, msrs, regs, ExitKind, ExitStats, InstructionBytes, VcpuError};

/// x86's longest instruction.
const MAX_INSTRUCTION_LEN: usize = 15;
/// `Vcpu::syscall_trap_page` with the trap off: not page-aligned, so no masked address
/// equals it.
const NO_TRAP_PAGE: u64 = u64::MAX;

/// What the [instruction fallback](crate::fallback) did with an emulation failure.
enum FallbackResult {
    /// Completed: the guest goes on; count it as this kind.
    Completed(ExitKind),
    /// The instruction KVM failed on is no longer in memory (another vCPU changed it):
    /// run the vCPU again, to execute what is there now.
    Retry,
    /// Report the failure.
    Failed,
}

/// A system event reported by `KVM_EXIT_SYSTEM_EVENT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEvent {
    /// The guest asked to power off.
    Shutdown,
    /// The guest asked to reset.
    Reset,
    /// The guest reported a crash.
    Crash,
    /// Another event type.
    Other(u32),
}

/// How a vCPU's run loop ended, when it ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuOutcome {
    /// The guest executed `hlt` (seen only without the in-kernel irqchip, which handles
    /// `hlt` itself).
    Halted,
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    Shutdown,
    /// A system event.
    SystemEvent(SystemEvent),
    /// Another thread stopped the vCPU ([`RunningVcpu::stop`] or the stop flag).
    Stopped,
    /// An exit the run loop leaves to its caller (a hypercall, an MSR access sent to
    /// userspace, a debug exit, ...), and no [exit handler](Vcpu::set_exit_handler)
    /// resumed the guest. Answer it if it needs an answer
    /// ([`Vcpu::complete_hypercall`], [`Vcpu::complete_rdmsr`],
    /// [`Vcpu::complete_wrmsr`], or [`Vcpu::kvm_run_mut`] for any other), then call
    /// [`Vcpu::run`] again to resume the guest.
    Unhandled(UnhandledExit),
}

/// What still needs doing after `KVM_RUN` returned, once the exit's borrow of the
/// vCPU has ended.
enum Pending {
    Done,
    Io,
    /// An MMIO access that is not the syscall trap's.
    Mmio,
    /// A guest `wrmsr` for the [syscall trap](crate::syscall_trap).
    Wrmsr,
    /// An exit for the caller.
    Unhandled,
}

/// A closure the run loop hands the exits it does not handle itself
/// ([`Vcpu::set_exit_handler`]).
pub type ExitHandler<B> = Box<dyn FnMut(&mut Vcpu<B>, UnhandledExit) -> ExitAction + Send>;

/// One vCPU of a VM, with the buses its exits go to; generic, as its [`Vm`] is, over
/// the guest memory's dirty-page bitmap `B`.
pub struct Vcpu<B = ()> {
    index: u32,
    /// The vCPU's `kvm_run` area, mapped by this crate: exits are read from it, and
    /// `KVM_RUN` is issued through it (see [`crate::run_area`]).
    run_area: RunArea,
    /// Declared before `vm`: fields drop in order, so the vCPU file descriptor is closed
    /// before this vCPU's handle on the VM (and its memory) is released.
    fd: VcpuFd,
    /// Handles cache the buses' device tables: one relaxed load per access.
    pio: BusHandle,
    mmio: BusHandle,
    /// Stop and pause requests, one word the run loop checks before each `KVM_RUN`.
    control: Arc<Shared>,
    stats: Arc<ExitStats>,
    /// The clock exits are timed with, if they are ([`Vcpu::enable_exit_timing`]). A
    /// plain field, so that with timing off the exit path pays two well-predicted
    /// branches and nothing else.
    timer: Option<ExitClock>,
    /// The exit being handled, and the clock reading when `KVM_RUN` returned with it;
    /// recorded at the next `KVM_RUN` call.
    timed_exit: Option<(ExitKind, u64)>,
    /// Whether emulation failures go through the [instruction fallback](crate::fallback).
    fallback: bool,
    /// The [syscall trap](crate::syscall_trap)'s per-vCPU state, when it is on.
    syscall_trap: Option<VcpuTrap>,
    /// The guest-physical page of the trap's stores, or [`NO_TRAP_PAGE`]: the MMIO-write
    /// path pays one mask and one compare for the trap.
    syscall_trap_page: u64,
    /// Where exits the run loop does not handle go first, if anywhere.
    exit_handler: Option<ExitHandler<B>>,
    /// Run first on the vCPU's thread by [`Vcpu::spawn`].
    thread_hook: Option<ThreadHook>,
    /// The MSRs [`Vcpu::save_state`] saves, or why there is no list.
    msr_indices: Result<Arc<[u32]>, String>,
    /// The VM, and with it the guest memory: held for as long as `fd` is open, because
    /// the kernel VM (and KVM's access to the memory) lives on while any vCPU fd does.
    vm: Vm<B>,
}

/// A function [`Vcpu::spawn`] runs first on the vCPU's new thread, given the vCPU's
/// index, before the guest runs: where a VMM installs the thread's seccomp filter. An
/// error ends the thread with [`VcpuError::ThreadStart`] without running the guest.
pub type ThreadHook = Arc<dyn Fn(u32) -> std::io::Result<()> + Send + Sync>;

impl<B> std::fmt::Debug for Vcpu<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl<B: Bitmap> Vcpu<B> {
    /// Creates vCPU `index` (its APIC ID too) on `vm`. Its port and MMIO exits go to
    /// `pio` and `mmio`. The vCPU holds a handle on `vm`, so the VM and its guest memory
    /// live at least as long as the vCPU.
    ///
    /// With the in-kernel irqchip, create it ([`Vm::create_irqchip_and_pit`]) first.
    pub fn new(vm: &Vm<B>, index: u32, pio: Arc<Bus>, mmio: Arc<Bus>) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::kvm(format!("KVM_CREATE_VCPU {index}"), e))?;
        let size = vm.vcpu_mmap_size();
        let run_area = RunArea::map(&fd, size).map_err(|source| VcpuError::MapRun {
            vcpu: index,
            size,
            source,
        })?;
        Ok(Vcpu {
            index,
            run_area,
            fd,
            pio: pio.handle(),
            mmio: mmio.handle(),
            control: Arc::new(Shared::default()),
            stats: Arc::new(ExitStats::default()),
            timer: None,
            timed_exit: None,
            fallback: false,
            syscall_trap: None,
            syscall_trap_page: NO_TRAP_PAGE,
            exit_handler: None,
            thread_hook: None,
            msr_indices: msrs::cached_msr_index_list(),
            vm: vm.clone(),
        })
    }

    /// The VM this vCPU belongs to, and through it the guest memory.
    pub fn vm(&self) -> &Vm<B> {
        &self.vm
    }

    /// Turns the [instruction fallback](crate::fallback) on or off (off by default): with
    /// it on, an instruction the host's KVM could not emulate that the fallback handles
    /// is completed on the guest's behalf with its architectural effect and counted as a
    /// `fallback-*` exit ([`ExitKind::FallbackInt3`], ...) instead of ending the run loop.
    /// Turn it on where the host needs it
    /// ([`CpuTemplate::instruction_fallback`](crate::cpuid::CpuTemplate::instruction_fallback)).
    pub fn set_instruction_fallback(&mut self, on: bool) {
        self.fallback = on;
    }

    /// Turns the [syscall trap](crate::syscall_trap) on, with the VM's [`SyscallTrap`],
    /// or off (`None`, the default). With it on, the guest's `rdmsr`/`wrmsr` of
    /// MSR_LSTAR (which the VM's MSR filter sends to the VMM) are handled by the run
    /// loop and counted as [`ExitKind::Msr`], and a `syscall` from guest user mode, which
    /// lands on the trap, is completed into the guest kernel's entry and counted as
    /// [`ExitKind::SyscallTrap`]. Once [`SyscallTrap::new`] has set the filter, every
    /// vCPU of the VM needs the trap on (their MSR_LSTAR accesses exit). Turn it on where
    /// the host needs it ([`CpuTemplate::syscall_trap`](crate::cpuid::CpuTemplate::syscall_trap)).
    ///
    /// With the trap on, each exit also carries the vCPU's registers and system
    /// registers in `kvm_run` (`KVM_CAP_SYNC_REGS`), and the run loop hands the changes
    /// it makes for a system call back that way: they reach KVM with the next `KVM_RUN`.
    pub fn set_syscall_trap(&mut self, trap: Option<Arc<SyscallTrap>>) {
        match trap {
            Some(trap) => {
                self.syscall_trap_page = trap.mmio_page().0;
                self.syscall_trap = Some(VcpuTrap::new(trap, &mut self.fd));
            }
            None => {
                if self.syscall_trap.take().is_some() {
                    VcpuTrap::detach(&mut self.fd);
                }
                self.syscall_trap_page = NO_TRAP_PAGE;
            }
        }
    }

    /// Turns on exit timing: from now on, the time from each `KVM_RUN` return to the
    /// vCPU's next `KVM_RUN` call (the time the VMM spends on the exit: decoding it,
    /// dispatching it to a bus and the device's handler) goes into a per-reason log2
    /// histogram in [`ExitStats`] ([`ExitStats::profile`]). Costs one pair of clock
    /// reads per exit (`rdtsc` where the kernel keeps time with the TSC, else
    /// `clock_gettime(CLOCK_MONOTONIC)`) and allocates nothing; exits that end the run
    /// loop (halt, shutdown, stop, errors) are counted but not timed. Off by default.
    /// The first call in a process may spend about a millisecond calibrating the TSC.
    pub fn enable_exit_timing(&mut self) {
        self.timer = Some(ExitClock::get());
        self.stats.set_timing();
    }

    /// This vCPU's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The KVM vCPU file descriptor, for set-up this crate does not cover.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Exit counters, readable from any thread while the vCPU runs.
    pub fn stats(&self) -> Arc<ExitStats> {
        Arc::clone(&self.stats)
    }

    /// A handle that stops or pauses the run loop at its next check, before its next
    /// `KVM_RUN` (usable on the vCPU's own thread, from a device or an exit handler).
    /// From other threads prefer [`RunningVcpu::stop`] and [`RunningVcpu::pause`],
    /// which also kick the vCPU out of `KVM_RUN`.
    pub fn control(&self) -> VcpuControl {
        VcpuControl(Arc::clone(&self.control))
    }

    /// Sets CPUID from KVM's `supported` list for vCPU `self.index()` of `count`
    /// (see [`cpuid::vcpu_cpuid`]).
    pub fn set_cpuid(&self, supported: &CpuId, count: u32) -> Result<(), VcpuError> {
        let ids = |n: u32| u8::try_from(n).ok().filter(|&n| n != 0xff);
        let (Some(index), Some(count)) = (ids(self.index), ids(count)) else {
            return Err(VcpuError::TooManyVcpus {
                requested: count,
                max: ember_vm::MAX_VCPUS,
            });
        };
        let cpuid = cpuid::vcpu_cpuid(supported, index, count);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| VcpuError::kvm(format!("KVM_SET_CPUID2 on vCPU {}", self.index), e))
    }

    /// Sets the boot MSRs ([`msrs::boot_msrs`]); fails naming the first MSR KVM refused.
    pub fn set_boot_msrs(&self) -> Result<(), VcpuError> {
        let msrs = msrs::boot_msrs()?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| VcpuError::kvm(format!("KVM_SET_MSRS on vCPU {}", self.index), e))?;
        let entries = msrs.as_slice();
        match entries.get(set) {
            None => Ok(()),
            Some(failed) => Err(VcpuError::MsrsRejected {
                vcpu: self.index,
                set,
                total: entries.len(),
                failed: failed.index,
            }),
        }
    }

    /// Sets the FPU control words ([`regs::setup_fpu`]).
    pub fn set_fpu(&self) -> Result<(), VcpuError> {
        regs::setup_fpu(&self.fd)
    }

    /// Programs the local APIC's LINT0/LINT1 ([`lapic::setup_lint`]); needs the
    /// in-kernel irqchip.
    pub fn set_lapic(&self) -> Result<(), VcpuError> {
        lapic::setup_lint(&self.fd)
    }

    /// Enters 64-bit mode at `boot` ([`regs::setup_long_mode`]).
    pub fn set_long_mode_entry(&self, boot: &BootRegs) -> Result<(), VcpuError> {
        regs::setup_long_mode(&self.fd, boot)
    }

    /// Enters a kernel's 32-bit PVH entry point with `EBX` = `start_info`
    /// ([`regs::setup_pvh_entry`]).
    pub fn set_pvh_entry(
        &self,
        entry: GuestAddress,
        start_info: GuestAddress,
    ) -> Result<(), VcpuError> {
        regs::setup_pvh_entry(&self.fd, entry, start_info)
    }

    /// Marks the vCPU runnable. With the in-kernel irqchip, vCPUs other than 0 otherwise
    /// wait for INIT/SIPI from the boot processor, as Linux expects; a guest that starts
    /// every vCPU at its entry point needs this.
    pub fn set_runnable(&self) -> Result<(), VcpuError> {
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(|e| VcpuError::kvm(format!("KVM_SET_MP_STATE on vCPU {}", self.index), e))
    }

    /// Runs `KVM_RUN` once and handles the exit.
    ///
    /// Returns `Ok(None)` when the guest should simply go on (an access dispatched to a
    /// bus, a spurious signal) and `Ok(Some(_))` when the run loop should end.
    #[inline]
    pub fn step(&mut self) -> Result<Option<VcpuOutcome>, VcpuError> {
        if let Some(clock) = self.timer {
            self.finish_timed_exit(clock);
        }
        let requests = &self.control.requests;
        let Some(ran) = self
            .run_area
            .run(&self.fd, || requests.load(Ordering::Acquire) != 0)
        else {
            return self.on_request();
        };
        // Read before anything else looks at the exit.
        let returned = self.timer.map(ExitClock::now);
        if let Err(e) = ran {
            return self.run_failed(e, returned);
        }
        let run = self.run_area.get_mut();
        let (kind, pending) = match run.exit_reason {
            KVM_EXIT_IO => {
                // SAFETY: the exit reason says `io` is the active union member.
                match u32::from(unsafe { run.__bindgen_anon_1.io.direction }) {
                    KVM_EXIT_IO_OUT => (ExitKind::IoOut, Pending::Io),
                    KVM_EXIT_IO_IN => (ExitKind::IoIn, Pending::Io),
                    _ => return Err(self.run_error(libc::EINVAL)),
                }
            }
            KVM_EXIT_MMIO => {
                // SAFETY: the exit reason says `mmio` is the active union member.
                let mmio = unsafe { &run.__bindgen_anon_1.mmio };
                if mmio.is_write != 0 && mmio.phys_addr & !(PAGE_SIZE - 1) == self.syscall_trap_page
                {
                    let addr = mmio.phys_addr;
                    (self.enter_syscall_trap(addr)?, Pending::Done)
                } else if mmio.is_write != 0 {
                    (ExitKind::MmioWrite, Pending::Mmio)
                } else {
                    (ExitKind::MmioRead, Pending::Mmio)
                }
            }
            KVM_EXIT_HLT => {
                self.stats.record(ExitKind::Hlt);
                return Ok(Some(VcpuOutcome::Halted));
            }
            KVM_EXIT_SHUTDOWN => {
                self.stats.record(ExitKind::Shutdown);
                return Ok(Some(VcpuOutcome::Shutdown));
            }
            KVM_EXIT_SYSTEM_EVENT => {
                // SAFETY: the exit reason says `system_event` is the active union member.
                let kind = unsafe { run.__bindgen_anon_1.system_event.type_ };
                self.stats.record(ExitKind::SystemEvent);
                let event = match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => SystemEvent::Shutdown,
                    KVM_SYSTEM_EVENT_RESET => SystemEvent::Reset,
                    KVM_SYSTEM_EVENT_CRASH => SystemEvent::Crash,
                    other => SystemEvent::Other(other),
                };
                return Ok(Some(VcpuOutcome::SystemEvent(event)));
            }
            KVM_EXIT_FAIL_ENTRY => {
                // SAFETY: the exit reason says `fail_entry` is the active union member.
                let fail = unsafe { run.__bindgen_anon_1.fail_entry };
                self.stats.record(ExitKind::FailEntry);
                return Err(VcpuError::FailEntry {
                    vcpu: self.index,
                    reason: fail.hardware_entry_failure_reason,
                    cpu: fail.cpu,
                });
            }
            KVM_EXIT_INTERNAL_ERROR => {
                let kind = match self.fallback {
                    true => self.complete_unemulated(),
                    false => FallbackResult::Failed,
                };
                match kind {
                    FallbackResult::Completed(kind) => (kind, Pending::Done),
                    FallbackResult::Retry => (ExitKind::InternalError, Pending::Done),
                    FallbackResult::Failed => {
                        self.stats.record(ExitKind::InternalError);
                        return Err(self.internal_error());
                    }
                }
            }
            reason @ (KVM_EXIT_X86_RDMSR | KVM_EXIT_X86_WRMSR) => {
                // SAFETY: the exit reason says `msr` is the active union member.
                let msr = unsafe { &mut run.__bindgen_anon_1.msr };
                match &self.syscall_trap {
                    Some(trap) if msr.index == LSTAR && reason == KVM_EXIT_X86_RDMSR => {
                        trap.rdmsr(msr.index, &mut msr.data, &mut msr.error);
                        (ExitKind::Msr, Pending::Done)
                    }
                    Some(_) if msr.index == LSTAR => (ExitKind::Msr, Pending::Wrmsr),
                    _ => (ExitKind::Other, Pending::Unhandled),
                }
            }
            KVM_EXIT_INTR => (ExitKind::Interrupted, Pending::Done),
            // Everything else is the caller's.
            _ => (ExitKind::Other, Pending::Unhandled),
        };
        self.stats.record(kind);
        if let Some(at) = returned {
            self.timed_exit = Some((kind, at));
        }
        match pending {
            Pending::Done => {}
            Pending::Io => self.dispatch_io(),
            Pending::Mmio => self.dispatch_mmio(),
            Pending::Wrmsr => self.syscall_trap_wrmsr()?,
            Pending::Unhandled => return Ok(self.hand_over_exit()),
        }
        Ok(None)
    }

    /// `KVM_RUN` returned an error: a kick (`EINTR`), a memory fault KVM hands to
    /// userspace, or a failure.
    #[cold]
    fn run_failed(
        &mut self,
        e: kvm_ioctls::Error,
        returned: Option<u64>,
    ) -> Result<Option<VcpuOutcome>, VcpuError> {
        match e.errno() {
            libc::EINTR | libc::EAGAIN => {
                self.stats.record(ExitKind::Interrupted);
                // A kick leaves immediate_exit set; clear it so a spurious signal does
                // not turn into a busy loop.
                self.run_area.clear_immediate_exit();
                if self.control.requests.load(Ordering::Acquire) != 0 {
                    return self.on_request();
                }
                if let Some(at) = returned {
                    self.timed_exit = Some((ExitKind::Interrupted, at));
                }
                Ok(None)
            }
            // KVM_EXIT_MEMORY_FAULT comes with -1 and EFAULT or EHWPOISON (the KVM API
            // docs); with any other errno, exit_reason is stale.
            libc::EFAULT | libc::EHWPOISON
                if self.run_area.get_mut().exit_reason == KVM_EXIT_MEMORY_FAULT =>
            {
                self.stats.record(ExitKind::Other);
                if let Some(at) = returned {
                    self.timed_exit = Some((ExitKind::Other, at));
                }
                Ok(self.hand_over_exit())
            }
            _ => Err(VcpuError::Run {
                vcpu: self.index,
                source: e,
            }),
        }
    }

    #[cold]
    fn run_error(&self, errno: i32) -> VcpuError {
        VcpuError::Run {
            vcpu: self.index,
            source: kvm_ioctls::Error::new(errno),
        }
    }

    /// Offers an exit the run loop does not handle to the [exit
    /// handler](Vcpu::set_exit_handler), if there is one; returns the outcome that ends
    /// the run loop, or `None` when the handler resumed the guest. Cold: hypercalls,
    /// MSR exits and debug exits are rare next to port I/O and MMIO.
    #[cold]
    fn hand_over_exit(&mut self) -> Option<VcpuOutcome> {
        let exit = UnhandledExit::from_kvm_run(self.run_area.get_mut());
        log::trace!("vCPU {}: {exit}", self.index);
        // Taken out for the call, so the handler can have the whole vCPU.
        let Some(mut handler) = self.exit_handler.take() else {
            return Some(VcpuOutcome::Unhandled(exit));
        };
        let action = handler(self, exit);
        // A handler the closure installed meanwhile wins.
        self.exit_handler.get_or_insert(handler);
        match action {
            ExitAction::Resume => None,
            ExitAction::Return => Some(VcpuOutcome::Unhandled(exit)),
        }
    }

    /// Records the exit being handled: its time in the VMM ends now, as the vCPU is
    /// about to call `KVM_RUN` again (or to leave the run loop on a stop request).
    #[inline]
    fn finish_timed_exit(&mut self, clock: ExitClock) {
        if let Some((kind, returned)) = self.timed_exit.take() {
            let ns = clock.nanos(returned, clock.now());
            self.stats.record_latency(kind, ns);
        }
    }

    /// Runs the guest until it halts, shuts down, fails, is stopped, or exits for a
    /// reason the run loop leaves to the caller ([`VcpuOutcome::Unhandled`]); after
    /// that one, calling `run` again resumes the guest.
    pub fn run(&mut self) -> Result<VcpuOutcome, VcpuError> {
        loop {
            if let Some(outcome) = self.step()? {
                if outcome == VcpuOutcome::Stopped && log::log_enabled!(log::Level::Debug) {
                    if let Ok(regs) = self.fd.get_regs() {
                        log::debug!("vCPU {} stopped at RIP {:#x}", self.index, regs.rip);
                    }
                }
                return Ok(outcome);
            }
        }
    }

    /// Hands the exits the run loop does not handle ([`UnhandledExit`]) to `handler`
    /// first, on the vCPU's own thread, instead of ending [`Vcpu::run`] with
    /// [`VcpuOutcome::Unhandled`] at once. The handler gets the vCPU, to answer the exit
    /// ([`Vcpu::complete_hypercall`], ...), and says whether the guest goes on
    /// ([`ExitAction::Resume`]) or `run` returns the exit
    /// ([`ExitAction::Return`]). What a VMM running its vCPUs on threads
    /// ([`Vcpu::spawn`], [`VcpuGroup`](crate::VcpuGroup)) uses to serve hypercalls or
    /// MSRs. Port I/O and MMIO never reach it, so it costs the hot path nothing.
    ///
    /// ```no_run
    /// # fn f(vcpu: &mut ember_vcpu::Vcpu) {
    /// use ember_vcpu::{ExitAction, UnhandledExit};
    /// // Answer reads of MSR 0x4b564d00 with 42; leave anything else to `run`'s caller.
    /// vcpu.set_exit_handler(|vcpu, exit| match exit {
    ///     UnhandledExit::Rdmsr { index: 0x4b56_4d00, .. } => {
    ///         match vcpu.complete_rdmsr(Some(42)) {
    ///             Ok(()) => ExitAction::Resume,
    ///             Err(_) => ExitAction::Return,
    ///         }
    ///     }
    ///     _ => ExitAction::Return,
    /// });
    /// # }
    /// ```
    pub fn set_exit_handler<F>(&mut self, handler: F)
    where
        F: FnMut(&mut Vcpu<B>, UnhandledExit) -> ExitAction + Send + 'static,
    {
        self.exit_handler = Some(Box::new(handler));
    }

    /// Answers the [`UnhandledExit::Hypercall`] the vCPU stopped on: the guest sees `ret`
    /// in `RAX` when it resumes. Fails with [`VcpuError::NoPendingExit`] if the vCPU did
    /// not stop on a hypercall.
    pub fn complete_hypercall(&mut self, ret: u64) -> Result<(), VcpuError> {
        let run = self.pending_exit(KVM_EXIT_HYPERCALL, "KVM_EXIT_HYPERCALL")?;
        // The exit reason says `hypercall` is the union member KVM reads back.
        run.__bindgen_anon_1.hypercall.ret = ret;
        Ok(())
    }

    /// Answers the [`UnhandledExit::Rdmsr`] the vCPU stopped on: the guest's `rdmsr`
    /// reads `value`, or, with `None`, raises #GP. Fails with
    /// [`VcpuError::NoPendingExit`] if the vCPU did not stop on an `rdmsr`.
    pub fn complete_rdmsr(&mut self, value: Option<u64>) -> Result<(), VcpuError> {
        let run = self.pending_exit(KVM_EXIT_X86_RDMSR, "KVM_EXIT_X86_RDMSR")?;
        // The exit reason says `msr` is the union member KVM reads back.
        run.__bindgen_anon_1.msr.data = value.unwrap_or(0);
        run.__bindgen_anon_1.msr.error = u8::from(value.is_none());
        Ok(())
    }

    /// Answers the [`UnhandledExit::Wrmsr`] the vCPU stopped on: the guest's `wrmsr`
    /// completes if `accepted`, or raises #GP. Fails with [`VcpuError::NoPendingExit`]
    /// if the vCPU did not stop on a `wrmsr`.
    pub fn complete_wrmsr(&mut self, accepted: bool) -> Result<(), VcpuError> {
        let run = self.pending_exit(KVM_EXIT_X86_WRMSR, "KVM_EXIT_X86_WRMSR")?;
        // The exit reason says `msr` is the union member KVM reads back.
        run.__bindgen_anon_1.msr.error = u8::from(!accepted);
        Ok(())
    }

    /// The vCPU's `kvm_run` page: the last exit's data, for answering an
    /// [`UnhandledExit::Other`] (or anything the `complete_*` methods do not cover)
    /// before resuming. (A kick writes `kvm_run` only while the vCPU is inside
    /// `KVM_RUN`, never while this reference can exist.)
    pub fn kvm_run_mut(&mut self) -> &mut kvm_run {
        self.run_area.get_mut()
    }

    /// `kvm_run`, if the last exit was `reason`.
    fn pending_exit(&mut self, reason: u32, name: &'static str) -> Result<&mut kvm_run, VcpuError> {
        let vcpu = self.index;
        let run = self.run_area.get_mut();
        if run.exit_reason != reason {
            return Err(VcpuError::NoPendingExit {
                vcpu,
                expected: name,
                actual: run.exit_reason,
            });
        }
        Ok(run)
    }
}

impl<B: Bitmap + Send + Sync + 'static> Vcpu<B> {
    /// Sets the function [`Vcpu::spawn`] runs first on the vCPU's thread, before the
    /// guest runs (where a VMM installs that thread's seccomp filter).
    ///
    /// ```no_run
    /// # fn f(vcpu: &mut ember_vcpu::Vcpu) {
    /// use std::sync::Arc;
    /// vcpu.set_thread_hook(Some(Arc::new(|index| {
    ///     // Install the filter of vCPU thread `index` here.
    ///     log::debug!("vCPU {index} starting");
    ///     Ok(())
    /// })));
    /// # }
    /// ```
    pub fn set_thread_hook(&mut self, hook: Option<ThreadHook>) {
        self.thread_hook = hook;
    }

    /// Runs the vCPU on a thread of its own named `ember-vcpu-N`. The thread runs the
    /// [thread hook](Vcpu::set_thread_hook) first, if there is one. When the run loop
    /// ends (or the hook fails), `done` (if given) is written, so an event loop can
    /// wake up.
    pub fn spawn(mut self, done: Option<EventFd>) -> Result<RunningVcpu, VcpuError> {
        install_kick_handler()?;
        let index = self.index;
        let control = Arc::clone(&self.control);
        let stats = Arc::clone(&self.stats);
        let thread = std::thread::Builder::new()
            .name(format!("ember-vcpu-{index}"))
            .spawn(move || {
                let result = match self.thread_hook.take() {
                    Some(hook) => hook(index).map_err(|source| VcpuError::ThreadStart {
                        vcpu: index,
                        source,
                    }),
                    None => Ok(()),
                }
                .and_then(|()| self.run());
                // Before `done`: whoever it wakes finds the vCPU ended.
                self.control.mark_ended();
                if let Some(done) = done {
                    // A full counter still wakes the reader; nothing to do on error.
                    let _ = done.write(1);
                }
                result
            })
            .map_err(|source| VcpuError::Spawn {
                vcpu: index,
                source,
            })?;
        Ok(RunningVcpu {
            index,
            thread,
            control,
            stats,
        })
    }
}

impl<B: Bitmap> Vcpu<B> {
    /// Handles a port-I/O exit, including string I/O (`rep ins/outs`), which arrives as
    /// `count` accesses of `size` bytes.
    #[inline]
    fn dispatch_io(&mut self) {
        // SAFETY: KVM_RUN returned with exit_reason KVM_EXIT_IO (that is the only way
        // here), so `io` is the active member of the union.
        let io = unsafe { self.run_area.get_mut().__bindgen_anon_1.io };
        let size = usize::from(io.size);
        let Some(len) = size.checked_mul(io.count as usize) else {
            return;
        };
        if size == 0 || len == 0 {
            return;
        }
        // The data is on the page after kvm_run, inside the mapping `run_area` owns and
        // derives the slice from (not from a `&kvm_run`); `None` if KVM ever put it
        // elsewhere.
        let Some(data) = self.run_area.pio_data(io.data_offset as usize, len) else {
            return;
        };
        let port = u64::from(io.port);
        if u32::from(io.direction) == KVM_EXIT_IO_OUT {
            for chunk in data.chunks_exact(size) {
                let _ = self.pio.write(port, chunk);
            }
        } else {
            for chunk in data.chunks_exact_mut(size) {
                let _ = self.pio.read(port, chunk);
            }
        }
    }

    /// Handles an MMIO exit: at most 8 bytes, in `kvm_run` itself.
    #[inline]
    fn dispatch_mmio(&mut self) {
        // SAFETY: KVM_RUN returned with exit_reason KVM_EXIT_MMIO (that is the only way
        // here), so `mmio` is the active member of the union.
        let mmio = unsafe { &mut self.run_area.get_mut().__bindgen_anon_1.mmio };
        let addr = mmio.phys_addr;
        let write = mmio.is_write != 0;
        let Some(data) = mmio.data.get_mut(..mmio.len as usize) else {
            return;
        };
        // An unclaimed access is counted by the bus; the guest goes on.
        if write {
            let _ = self.mmio.write(addr, data);
        } else {
            let _ = self.mmio.read(addr, data);
        }
    }

    /// A store to the [syscall trap](crate::syscall_trap)'s page: a system call to
    /// complete, or a fault to raise. Cold: only system calls get here.
    #[cold]
    fn enter_syscall_trap(&mut self, addr: u64) -> Result<ExitKind, VcpuError> {
        match &self.syscall_trap {
            Some(trap) => trap.enter(&mut self.fd, addr),
            None => Ok(ExitKind::MmioWrite),
        }
    }

    /// The guest wrote an MSR the [syscall trap](crate::syscall_trap)'s filter sends
    /// here (MSR_LSTAR): a few times per vCPU, at boot.
    #[cold]
    fn syscall_trap_wrmsr(&mut self) -> Result<(), VcpuError> {
        match self.syscall_trap.as_mut() {
            Some(trap) => trap.wrmsr(&mut self.fd, self.vm.memory(), self.index),
            None => Ok(()),
        }
    }

    /// Turns `KVM_EXIT_INTERNAL_ERROR` into an error that says where the guest was.
    #[cold]
    fn internal_error(&mut self) -> VcpuError {
        let run = self.run_area.get_mut();
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is active.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        if internal.suberror != KVM_INTERNAL_ERROR_EMULATION {
            let mut data = [0u64; 4];
            let n = (internal.ndata as usize).min(data.len());
            data[..n].copy_from_slice(&internal.data[..n]);
            return VcpuError::InternalError {
                vcpu: self.index,
                suberror: internal.suberror,
                data,
            };
        }
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        VcpuError::EmulationFailure {
            vcpu: self.index,
            rip,
            bytes: self.instruction_bytes(rip),
        }
    }

    /// Reads up to 15 bytes at `rip` through the guest's page tables.
    fn instruction_bytes(&self, rip: u64) -> InstructionBytes {
        let cs_base = self.fd.get_sregs().map(|s| s.cs.base).unwrap_or(0);
        self.read_code(cs_base.wrapping_add(rip))
    }

    /// Reads up to 15 bytes at linear address `linear`, translating each page on its
    /// own (an instruction may straddle two pages that are not contiguous in guest
    /// physical memory); stops at the first byte that cannot be read.
    fn read_code(&self, linear: u64) -> InstructionBytes {
        let mut bytes = [0u8; MAX_INSTRUCTION_LEN];
        let mut len = 0;
        while len < bytes.len() {
            let addr = linear.wrapping_add(len as u64);
            let Ok(t) = self.fd.translate_gva(addr) else {
                break;
            };
            if t.valid == 0 {
                break;
            }
            let in_page = (PAGE_SIZE - (addr % PAGE_SIZE)) as usize;
            let end = (len + in_page).min(bytes.len());
            let start = len;
            // Byte by byte: the instruction may run off the end of guest memory.
            for (i, b) in bytes[start..end].iter_mut().enumerate() {
                let gpa = t.physical_address.wrapping_add(i as u64);
                match self.vm.memory().read_obj::<u8>(GuestAddress(gpa)) {
                    Ok(v) => {
                        *b = v;
                        len += 1;
                    }
                    Err(_) => return InstructionBytes::new(&bytes[..len]),
                }
            }
        }
        InstructionBytes::new(&bytes[..len])
    }

    /// The [instruction fallback](crate::fallback): completes the instruction KVM could
    /// not emulate, if it is one the fallback handles. Cold: only emulation failures
    /// get here.
    #[cold]
    fn complete_unemulated(&mut self) -> FallbackResult {
        let run = self.run_area.get_mut();
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is active, and
        // `emulation_failure` is its layout for the emulation suberror.
        let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
        if failure.suberror != KVM_INTERNAL_ERROR_EMULATION {
            return FallbackResult::Failed;
        }
        // The bytes KVM failed on, when it says (Linux 5.14 and later).
        let reported = (failure.ndata >= 3
            && failure.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0)
            .then(|| {
                // SAFETY: the flag says the instruction bytes are filled in.
                let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
                let len = usize::from(insn.insn_size).min(insn.insn_bytes.len());
                InstructionBytes::new(&insn.insn_bytes[..len])
            });
        let (Ok(mut regs), Ok(sregs), Ok(mut events)) = (
            self.fd.get_regs(),
            self.fd.get_sregs(),
            self.fd.get_vcpu_events(),
        ) else {
            return FallbackResult::Failed;
        };
        let in_memory = self.read_code(sregs.cs.base.wrapping_add(regs.rip));
        let failed = reported.unwrap_or(in_memory);
        let (fcw, fsw) = match FallbackInstruction::decode(failed.as_slice()) {
            Some(FallbackInstruction::Fwait) => match self.fd.get_fpu() {
                Ok(fpu) => (fpu.fcw, fpu.fsw),
                Err(_) => return FallbackResult::Failed,
            },
            _ => (0, 0),
        };
        let state = GuestState {
            cr0: sregs.cr0,
            rflags: regs.rflags,
            fcw,
            fsw,
        };
        // An event already on its way into the guest: leave it to a real CPU.
        if events.exception.injected != 0 || events.exception.pending != 0 {
            return FallbackResult::Failed;
        }
        let reported = reported.as_ref().map(InstructionBytes::as_slice);
        let (insn, completion) = match fallback::resolve(reported, in_memory.as_slice(), &state) {
            Resolution::Complete(insn, completion) => (insn, completion),
            Resolution::RunAgain => return FallbackResult::Retry,
            Resolution::Report => return FallbackResult::Failed,
        };
        // RIP wraps at the width of the code segment, as the CPU's does.
        let ip_mask = if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
            u64::MAX
        } else if sregs.cs.db != 0 {
            u64::from(u32::MAX)
        } else {
            u64::from(u16::MAX)
        };
        let (len, vector) = match completion {
            Completion::Retire { len, rflags } => {
                regs.rflags = rflags;
                (len, None)
            }
            Completion::Raise { len, vector } => (len, Some(vector)),
        };
        let at = regs.rip;
        regs.rip = regs.rip.wrapping_add(u64::from(len)) & ip_mask;
        // The instruction completed: an interrupt shadow (after `sti` or `mov ss`) that
        // covered it is over.
        let shadow = events.interrupt.shadow != 0 && len > 0;
        if shadow {
            events.interrupt.shadow = 0;
        }
        if let Some(vector) = vector {
            events.exception.injected = 1;
            events.exception.nr = vector;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
            events.exception.pending = 0;
        }
        if self.fd.set_regs(&regs).is_err() {
            return FallbackResult::Failed;
        }
        if (vector.is_some() || shadow) && self.fd.set_vcpu_events(&events).is_err() {
            return FallbackResult::Failed;
        }
        log::trace!(
            "vCPU {}: completed {insn:?} at RIP {at:#x} ({completion:?})",
            self.index
        );
        FallbackResult::Completed(insn.exit_kind())
    }
}

/// Completion rounds [`Vcpu::complete_pending_exits`] allows: a string access KVM
/// splits comes back a page (or 1024 iterations) at a time before it re-enters the
/// guest, so a handful is the most ever seen.
const MAX_COMPLETION_ROUNDS: usize = 4096;

impl<B: Bitmap> Vcpu<B> {
    /// Completes the exit the vCPU stopped on, as the next `KVM_RUN` would, without
    /// running the guest: `KVM_RUN` with `immediate_exit` set, which makes KVM finish a
    /// port or MMIO read (the data the device answered reaches the guest's register and
    /// the instruction retires), apply registers the run loop changed through `kvm_run`,
    /// and return `EINTR`. A completion that produces another access (the next page of
    /// a `rep ins`) is dispatched to the bus and completed in turn. Afterwards every bit
    /// of the vCPU's state is in KVM, where the `KVM_GET_*` ioctls read it. What
    /// [`Vcpu::save_state`] does first; harmless when there is nothing to complete.
    pub fn complete_pending_exits(&mut self) -> Result<(), VcpuError> {
        for _ in 0..MAX_COMPLETION_ROUNDS {
            let more = self
                .run_area
                .run_immediate_exit(&self.fd)
                .map_err(|source| VcpuError::Run {
                    vcpu: self.index,
                    source,
                })?;
            if !more {
                return Ok(());
            }
            let run = self.run_area.get_mut();
            match run.exit_reason {
                KVM_EXIT_IO => {
                    // SAFETY: the exit reason says `io` is the active union member.
                    let kind = match u32::from(unsafe { run.__bindgen_anon_1.io.direction }) {
                        KVM_EXIT_IO_OUT => ExitKind::IoOut,
                        _ => ExitKind::IoIn,
                    };
                    self.stats.record(kind);
                    self.dispatch_io();
                }
                KVM_EXIT_MMIO => {
                    // SAFETY: the exit reason says `mmio` is the active union member.
                    let write = unsafe { run.__bindgen_anon_1.mmio.is_write } != 0;
                    self.stats.record(match write {
                        true => ExitKind::MmioWrite,
                        false => ExitKind::MmioRead,
                    });
                    self.dispatch_mmio();
                }
                reason => {
                    return Err(VcpuError::PendingExit {
                        vcpu: self.index,
                        reason,
                    })
                }
            }
        }
        Err(VcpuError::PendingExit {
            vcpu: self.index,
            reason: self.run_area.get_mut().exit_reason,
        })
    }

    /// Saves the vCPU's state ([`VcpuState`]; what it holds, and in which order it is
    /// read, is in [`crate::state`]). Completes the pending exit first
    /// ([`Vcpu::complete_pending_exits`]), as Firecracker does, so no port or MMIO read
    /// is lost. The vCPU must not be running (call it on a [`Vcpu`] that is not
    /// spawned, or through [`RunningVcpu::save_state`] while it is paused), and for a
    /// consistent snapshot no other vCPU of the VM should run either.
    ///
    /// ```no_run
    /// # fn f(vcpu: &mut ember_vcpu::Vcpu, other: &mut ember_vcpu::Vcpu) -> Result<(), ember_vcpu::VcpuError> {
    /// let state = vcpu.save_state()?;
    /// // On a vCPU with the same index of a new VM with the same memory:
    /// other.restore_state(&state)?;
    /// # Ok(()) }
    /// ```
    pub fn save_state(&mut self) -> Result<VcpuState, VcpuError> {
        self.complete_pending_exits()?;
        let vcpu = self.index;
        let op = |what: &str| format!("{what} on vCPU {vcpu}");
        let indices = self
            .msr_indices
            .clone()
            .map_err(|reason| VcpuError::MsrIndexList { vcpu, reason })?;
        // KVM_GET_MP_STATE may change the LAPIC's state: first.
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(|e| VcpuError::kvm(op("KVM_GET_MP_STATE"), e))?;
        let regs = self
            .fd
            .get_regs()
            .map_err(|e| VcpuError::kvm(op("KVM_GET_REGS"), e))?;
        let sregs = self
            .fd
            .get_sregs()
            .map_err(|e| VcpuError::kvm(op("KVM_GET_SREGS"), e))?;
        let xsave = self
            .fd
            .get_xsave()
            .map_err(|e| VcpuError::kvm(op("KVM_GET_XSAVE"), e))?;
        let xcrs = self
            .fd
            .get_xcrs()
            .map_err(|e| VcpuError::kvm(op("KVM_GET_XCRS"), e))?;
        let debugregs = self
            .fd
            .get_debug_regs()
            .map_err(|e| VcpuError::kvm(op("KVM_GET_DEBUGREGS"), e))?;
        let lapic = match self.fd.get_lapic() {
            Ok(lapic) => Some(lapic),
            // No in-kernel irqchip, no LAPIC in KVM: EINVAL (ENXIO on older kernels).
            Err(e) if matches!(e.errno(), libc::EINVAL | libc::ENXIO) => None,
            Err(e) => return Err(VcpuError::kvm(op("KVM_GET_LAPIC"), e)),
        };
        let tsc_khz = self.fd.get_tsc_khz().ok();
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VcpuError::kvm(op("KVM_GET_CPUID2"), e))?;
        let (msrs, skipped) = msrs::read_msrs(&self.fd, &indices, vcpu)?;
        if !skipped.is_empty() {
            log::debug!("vCPU {vcpu}: MSRs KVM did not read, not saved: {skipped:x?}");
        }
        // Read last: the other GET ioctls may change what it holds.
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(|e| VcpuError::kvm(op("KVM_GET_VCPU_EVENTS"), e))?;
        Ok(VcpuState {
            index: vcpu,
            cpuid,
            msrs,
            regs,
            sregs,
            xsave: XsaveState(xsave),
            xcrs,
            lapic,
            events,
            mp_state,
            debugregs,
            tsc_khz,
            syscall_trap: self.syscall_trap.as_ref().map(VcpuTrap::save),
        })
    }

    /// Restores a state [`Vcpu::save_state`] saved, on a vCPU that has not run, of a VM
    /// with the same memory contents (and, for a VM that had it, the in-kernel irqchip
    /// created). The order is Firecracker's (see [`crate::state`]); `KVM_SET_TSC_KHZ`
    /// only where the frequency differs from this vCPU's. Restore the VM's own state
    /// (irqchip, PIT, clock) after every vCPU's.
    ///
    /// The [syscall trap](crate::syscall_trap): turn it on first
    /// ([`Vcpu::set_syscall_trap`], same pages) where the saved vCPU had it, and its
    /// state is restored too. A state with the trap restored on a vCPU without it gets
    /// the guest's own MSR_LSTAR in the real MSR (system calls then go straight to the
    /// guest kernel, right on a host without the bug); a state without the trap on a
    /// vCPU with it leaves the trap unarmed, reading back the real MSR_LSTAR.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        let vcpu = self.index;
        let op = |what: &str| format!("{what} on vCPU {vcpu}");
        let count = state.msrs.as_slice().len();
        if count > KVM_MAX_MSR_ENTRIES {
            return Err(VcpuError::TooManyMsrs {
                vcpu,
                count,
                max: KVM_MAX_MSR_ENTRIES,
            });
        }
        self.fd
            .set_cpuid2(&state.cpuid)
            .map_err(|e| VcpuError::kvm(op("KVM_SET_CPUID2"), e))?;
        if let Some(khz) = state.tsc_khz {
            if self.fd.get_tsc_khz().ok() != Some(khz) {
                self.fd
                    .set_tsc_khz(khz)
                    .map_err(|e| VcpuError::kvm(op(&format!("KVM_SET_TSC_KHZ {khz}")), e))?;
            }
        }
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(|e| VcpuError::kvm(op("KVM_SET_MP_STATE"), e))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(|e| VcpuError::kvm(op("KVM_SET_REGS"), e))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(|e| VcpuError::kvm(op("KVM_SET_SREGS"), e))?;
        // SAFETY: `state.xsave.0` is a whole `kvm_xsave` (4 KiB), the size
        // KVM_SET_XSAVE reads; the kernel checks its contents.
        unsafe { self.fd.set_xsave(&state.xsave.0) }
            .map_err(|e| VcpuError::kvm(op("KVM_SET_XSAVE"), e))?;
        self.fd
            .set_xcrs(&state.xcrs)
            .map_err(|e| VcpuError::kvm(op("KVM_SET_XCRS"), e))?;
        self.fd
            .set_debug_regs(&state.debugregs)
            .map_err(|e| VcpuError::kvm(op("KVM_SET_DEBUGREGS"), e))?;
        if let Some(lapic) = &state.lapic {
            self.fd
                .set_lapic(lapic)
                .map_err(|e| VcpuError::kvm(op("KVM_SET_LAPIC"), e))?;
        }
        msrs::write_msrs(&self.fd, &state.msrs, vcpu)?;
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(|e| VcpuError::kvm(op("KVM_SET_VCPU_EVENTS"), e))?;
        let guest_lstar = || {
            state
                .msrs
                .as_slice()
                .iter()
                .find(|m| m.index == LSTAR)
                .map_or(0, |m| m.data)
        };
        match (self.syscall_trap.as_mut(), &state.syscall_trap) {
            (Some(trap), Some(saved)) => trap.restore(saved),
            (Some(trap), None) => trap.restore(&crate::state::SyscallTrapVcpuState {
                guest_lstar: guest_lstar(),
                armed: None,
            }),
            (None, Some(saved)) => {
                let entry = kvm_bindings::kvm_msr_entry {
                    index: LSTAR,
                    data: saved.guest_lstar,
                    ..Default::default()
                };
                let lstar =
                    kvm_bindings::Msrs::from_entries(&[entry]).map_err(VcpuError::MsrList)?;
                msrs::write_msrs(&self.fd, &lstar, vcpu)?;
            }
            (None, None) => {}
        }
        Ok(())
    }

    /// The run loop found a request bit set: ends the loop for a stop, parks for a
    /// pause (until it is lifted), goes on otherwise. Cold: the exit path only loads
    /// the request word.
    #[cold]
    fn on_request(&mut self) -> Result<Option<VcpuOutcome>, VcpuError> {
        loop {
            let requests = self.control.requests.load(Ordering::Acquire);
            if requests & STOP != 0 {
                return Ok(Some(VcpuOutcome::Stopped));
            }
            if requests & PAUSE == 0 {
                return Ok(None);
            }
            self.park();
        }
    }

    /// Parks the vCPU on its thread until the pause is lifted or a stop is requested,
    /// running the commands posted meanwhile.
    #[cold]
    fn park(&mut self) {
        // As Firecracker does on pause: tell a kvmclock guest it was stopped, so its
        // watchdogs do not take the pause for a lockup. EINVAL: no kvmclock.
        if let Err(e) = self.fd.kvmclock_ctrl() {
            if e.errno() != libc::EINVAL {
                log::warn!("vCPU {}: KVM_KVMCLOCK_CTRL failed: {e}", self.index);
            }
        }
        if let Err(e) = self.complete_pending_exits() {
            log::warn!("vCPU {}: pausing: {e}", self.index);
        }
        log::debug!("vCPU {} paused", self.index);
        let control = Arc::clone(&self.control);
        control.park(|command| match command {
            Command::SaveState(reply) => {
                // The caller may have given up waiting; nothing to do then.
                let _ = reply.send(self.save_state());
            }
        });
        log::debug!("vCPU {} resumed", self.index);
    }
}

/// A vCPU running on its own thread.
#[derive(Debug)]
pub struct RunningVcpu {
    index: u32,
    thread: JoinHandle<Result<VcpuOutcome, VcpuError>>,
    control: Arc<Shared>,
    stats: Arc<ExitStats>,
}

impl RunningVcpu {
    /// The vCPU's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Exit counters so far.
    pub fn stats(&self) -> &ExitStats {
        &self.stats
    }

    /// The exit counters, shared: still readable after [`RunningVcpu::join`], when
    /// they are final.
    pub fn shared_stats(&self) -> Arc<ExitStats> {
        Arc::clone(&self.stats)
    }

    /// The vCPU thread's pthread handle (for its CPU affinity, say); valid until
    /// [`RunningVcpu::join`].
    pub fn as_pthread_t(&self) -> libc::pthread_t {
        self.thread.as_pthread_t()
    }

    /// Whether the run loop has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Asks the vCPU to stop and kicks it out of `KVM_RUN`; returns at once. The run
    /// loop then ends with [`VcpuOutcome::Stopped`] (unless it had already ended), paused
    /// or not.
    pub fn stop(&self) {
        self.control.stop();
        self.kick();
    }

    /// Asks the vCPU to pause and kicks it out of `KVM_RUN`; returns at once, before
    /// the vCPU has parked ([`RunningVcpu::pause`] waits for that).
    pub fn request_pause(&self) {
        self.control.request_pause();
        self.kick();
    }

    /// Pauses the vCPU: kicks it out of `KVM_RUN` and returns once its thread has
    /// parked. Before parking, the thread calls `KVM_KVMCLOCK_CTRL` (so a guest with
    /// kvmclock does not see the pause as a soft lockup; `EINVAL`, for a guest without
    /// kvmclock, is ignored, as Firecracker does) and completes the exit the vCPU
    /// stopped on (`KVM_RUN` with `immediate_exit`), so no port or MMIO read is lost.
    /// A paused vCPU does not count as ended ([`VcpuGroup::wait`](crate::VcpuGroup::wait));
    /// [`RunningVcpu::stop`] still ends it. Waits as long as the vCPU's thread takes to
    /// get back to the run loop (a device handler in progress finishes first).
    ///
    /// Fails with [`VcpuError::NotRunning`] if the run loop has ended, and
    /// [`VcpuError::OnVcpuThread`] on the vCPU's own thread.
    ///
    /// ```no_run
    /// # fn f(vcpu: ember_vcpu::Vcpu) -> Result<(), ember_vcpu::VcpuError> {
    /// let running = vcpu.spawn(None)?;
    /// running.pause()?;
    /// let state = running.save_state()?;
    /// running.resume();
    /// # Ok(()) }
    /// ```
    pub fn pause(&self) -> Result<(), VcpuError> {
        if std::thread::current().id() == self.thread.thread().id() {
            return Err(VcpuError::OnVcpuThread { vcpu: self.index });
        }
        self.request_pause();
        self.control.wait_parked(self.index)
    }

    /// Waits until a vCPU asked to pause ([`RunningVcpu::request_pause`]) has parked.
    pub fn wait_paused(&self) -> Result<(), VcpuError> {
        if std::thread::current().id() == self.thread.thread().id() {
            return Err(VcpuError::OnVcpuThread { vcpu: self.index });
        }
        self.control.wait_parked(self.index)
    }

    /// Lets a paused vCPU go on; returns at once. Does nothing to a vCPU that is not
    /// paused.
    pub fn resume(&self) {
        self.control.resume();
    }

    /// Whether the vCPU is parked ([`RunningVcpu::pause`]).
    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// A handle on the vCPU's run loop ([`VcpuControl`]).
    pub fn control(&self) -> VcpuControl {
        VcpuControl(Arc::clone(&self.control))
    }

    /// The paused vCPU's state ([`Vcpu::save_state`], run on the vCPU's thread). Fails
    /// with [`VcpuError::NotPaused`] unless the vCPU is paused.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        if std::thread::current().id() == self.thread.thread().id() {
            return Err(VcpuError::OnVcpuThread { vcpu: self.index });
        }
        let (reply, answer) = mpsc::channel();
        self.control.post(Command::SaveState(reply), self.index)?;
        answer
            .recv()
            .unwrap_or(Err(VcpuError::NotRunning { vcpu: self.index }))
    }

    /// Sends the kick signal, if the thread still runs.
    fn kick(&self) {
        if self.thread.is_finished() {
            return;
        }
        // SAFETY: the pthread handle is valid: we own the JoinHandle, so the thread has
        // not been joined (or detached). Signalling a thread that has exited but is not
        // yet joined is allowed.
        let rc = unsafe { libc::pthread_kill(self.thread.as_pthread_t(), kick_signal()) };
        if rc != 0 {
            log::warn!("cannot kick vCPU {}: error {rc}", self.index);
        }
    }

    /// Waits for the run loop to end and returns how it ended.
    pub fn join(self) -> Result<VcpuOutcome, VcpuError> {
        self.thread
            .join()
            .unwrap_or(Err(VcpuError::ThreadPanicked { vcpu: self.index }))
    }
}

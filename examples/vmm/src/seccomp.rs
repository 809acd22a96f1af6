//! Per-thread seccomp-BPF filters (`--seccomp on`, the default).
//!
//! Every thread that touches guest input runs under a filter, built with rust-vmm's
//! `seccompiler` (Firecracker's filter compiler), that allows only the system calls that
//! thread needs, some only with the arguments it uses (`ioctl` request numbers, `fcntl`
//! commands, `prctl` options, `tgkill` signals). [`ThreadKind`] names the filters:
//!
//! - **main**: installed by the run loop after it has spawned the vCPU threads, just
//!   before its event loop (a filter is inherited by the threads created after it,
//!   which the vCPUs must not be).
//! - **vcpu**: installed by each vCPU thread first, through
//!   [`ember_vcpu::Vcpu::set_thread_hook`], before the guest runs.
//! - **virtio-blk**, **virtio-net**, **virtio-rng**: installed by each virtio worker
//!   thread first, through [`ember_virtio::MmioTransport::set_thread_hook`], before it
//!   touches a queue.
//! - **console**: the console writer thread (`serial-output`), through
//!   [`ember_devices::Serial::with_thread_hook`], before it writes anything.
//! - **logger**: the log writer thread (`ember-log`, see [`crate::logger`]), started by
//!   [`init`] (before any filter is installed, so that it inherits none), before it
//!   writes anything.
//! - **api**: the API server thread (`ember-api`, see [`crate::api`]), by itself, before
//!   it accepts a connection.
//!
//! Filters stack: a thread runs under every filter it inherited as well as its own, and
//! a system call must pass all of them. That matters for the virtio workers, which the
//! guest's driver starts (its `DRIVER_OK` store to the transport) on a vCPU thread: each
//! worker inherits the vCPU filter and adds its own. The vCPU filter therefore allows
//! what a new thread does before its hook runs (`clone3`, `rseq`, `set_robust_list`,
//! naming itself, `seccomp` to install its own filter) and everything the workers do
//! (`pread64`, `fdatasync`, `getrandom`, ...), which a vCPU thread does not itself need;
//! each worker's own filter narrows that back to its device's needs. Cloud Hypervisor
//! avoids the widening by deferring activation to its VMM thread (the vCPU queues it and
//! writes an eventfd); doing the same here needs the transport to hand activation to
//! another thread.
//!
//! A forbidden system call raises SIGSYS (`SECCOMP_RET_TRAP`); the handler, which uses
//! only async-signal-safe calls (`write`, `prctl(PR_GET_NAME)`, `_exit`), prints one line
//! naming the thread and the call, and the process exits with status
//! [`EXIT_BAD_SYSCALL`] (148, Firecracker's):
//!
//! ```text
//! ember: seccomp: thread 'ember-vcpu-0' made a forbidden system call 41 (socket); exiting. (--seccomp off disables the filters, for debugging)
//! ```
//!
//! `seccompiler::apply_filter` sets `no_new_privs` (`PR_SET_NO_NEW_PRIVS`) on the thread
//! before installing its filter, as the kernel requires of an unprivileged caller.
//!
//! For tests, [`SELFTEST_ENV`] (`EMBER_SECCOMP_SELFTEST=main|vcpu|virtio-blk|...`),
//! read once at start-up, makes the threads of that kind issue a system call their
//! filter forbids right after installing it; with `--seccomp off` the call is harmless
//! and the VM carries on.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, OnceLock};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_irqchip,
    kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_translation,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The exit status after a forbidden system call (Firecracker's "bad syscall" status).
pub const EXIT_BAD_SYSCALL: i32 = 148;

/// The environment variable that makes the threads of one kind ([`ThreadKind::name`])
/// issue a system call their filter forbids, right after installing it: for tests.
pub const SELFTEST_ENV: &str = "EMBER_SECCOMP_SELFTEST";

/// Why the filters could not be set up or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A filter did not compile (a bug in the rules below).
    #[error("cannot compile the seccomp filter of the {kind} threads: {source}")]
    Compile {
        /// The thread kind ([`ThreadKind::name`]).
        kind: &'static str,
        /// What seccompiler said.
        source: seccompiler::BackendError,
    },
    /// The kernel refused a filter (`prctl(PR_SET_NO_NEW_PRIVS)` or `seccomp(2)`).
    #[error("cannot install the seccomp filter of thread '{thread}': {source}")]
    Install {
        /// The thread's name.
        thread: String,
        /// What failed.
        source: seccompiler::Error,
    },
    /// A device started a thread this VMM has no filter for.
    #[error("no seccomp filter for thread '{0}' (a device thread this VMM does not know)")]
    UnknownThread(String),
    /// The log writer thread could not be started, or its filter installed.
    #[error("cannot start the log writer thread: {0}")]
    Logger(io::Error),
    /// `sigaction(SIGSYS)` failed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(io::Error),
    /// [`SELFTEST_ENV`] names no thread kind.
    #[error("{SELFTEST_ENV}={value}: not a thread kind (expected one of: {expected})")]
    BadSelftest {
        /// The variable's value.
        value: String,
        /// The kinds there are.
        expected: String,
    },
}

/// The kinds of thread `ember` runs, one filter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// The main thread's event loop (stdin to the serial port, signals, VM end).
    Main,
    /// A vCPU thread (`ember-vcpu-N`).
    Vcpu,
    /// The thread that creates the virtio workers (`ember-spawner`, see
    /// [`crate::spawner`]), so that they do not inherit the vCPU filter.
    Spawner,
    /// The virtio-blk worker (`ember-virtio-blk`).
    VirtioBlk,
    /// The virtio-net worker (`ember-virtio-net`).
    VirtioNet,
    /// The virtio-rng worker (`ember-virtio-rng`).
    VirtioRng,
    /// The console writer thread.
    Console,
    /// The log writer thread (`ember-log`).
    Logger,
    /// The API server thread (`ember-api`, see [`crate::api`]).
    Api,
    /// The main thread of an `ember` serving the API socket: [`ThreadKind::Main`] and
    /// what pausing, resuming and snapshotting the VM take.
    MainApi,
}

impl ThreadKind {
    /// Every kind, in the order of the README's tables.
    pub const ALL: [ThreadKind; 10] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Spawner,
        ThreadKind::VirtioBlk,
        ThreadKind::VirtioNet,
        ThreadKind::VirtioRng,
        ThreadKind::Console,
        ThreadKind::Logger,
        ThreadKind::Api,
        ThreadKind::MainApi,
    ];

    /// The kind's name, as [`SELFTEST_ENV`] takes it.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Spawner => "spawner",
            ThreadKind::VirtioBlk => "virtio-blk",
            ThreadKind::VirtioNet => "virtio-net",
            ThreadKind::VirtioRng => "virtio-rng",
            ThreadKind::Console => "console",
            ThreadKind::Logger => "logger",
            ThreadKind::Api => "api",
            ThreadKind::MainApi => "main-api",
        }
    }

    /// The kind named `name` ([`ThreadKind::name`]).
    pub fn from_name(name: &str) -> Option<ThreadKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kind of the virtio worker thread named `thread` (`ember-virtio-blk`, ...).
    pub fn of_worker(thread: &str) -> Option<ThreadKind> {
        let kind = Self::from_name(thread.strip_prefix("ember-")?)?;
        kind.is_worker().then_some(kind)
    }

    /// Whether this is a virtio worker, created by the spawner thread (and so also under
    /// the spawner's filter).
    pub fn is_worker(self) -> bool {
        matches!(
            self,
            ThreadKind::VirtioBlk | ThreadKind::VirtioNet | ThreadKind::VirtioRng
        )
    }

    /// The system calls this kind's filter allows, each once, by number.
    pub fn allowed(self) -> Vec<Allowed> {
        let groups: &[&[Rule]] = match self {
            ThreadKind::Main => &[THREAD_LIFE, EVENT_LOOP, MAIN],
            ThreadKind::MainApi => &[THREAD_LIFE, EVENT_LOOP, MAIN, MAIN_SNAPSHOT],
            ThreadKind::Vcpu => &[THREAD_LIFE, VCPU],
            ThreadKind::Spawner => &[
                THREAD_LIFE,
                THREAD_START,
                // Whatever the workers it creates do (they inherit this filter).
                EVENT_LOOP,
                BLK,
                NET,
                RNG,
            ],
            ThreadKind::VirtioBlk => &[THREAD_LIFE, EVENT_LOOP, BLK],
            ThreadKind::VirtioNet => &[THREAD_LIFE, EVENT_LOOP, NET],
            ThreadKind::VirtioRng => &[THREAD_LIFE, EVENT_LOOP, RNG],
            ThreadKind::Console => &[THREAD_LIFE, CONSOLE],
            ThreadKind::Logger => &[THREAD_LIFE, LOGGER],
            ThreadKind::Api => &[THREAD_LIFE, API],
        };
        merge(groups.iter().flat_map(|g| g.iter()))
    }

    /// The system call the [self-test](SELFTEST_ENV) makes on a thread of this kind:
    /// one its filter forbids. For a worker, one the spawner filter it inherits allows
    /// (`clone3`), so that only the worker's own filter can stop it.
    fn selftest_call(self) -> i64 {
        if self.is_worker() {
            libc::SYS_clone3
        } else {
            libc::SYS_socket
        }
    }
}

/// One system call a filter allows: any arguments, or argument `index` equal to one
/// of `values`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// The system call's number.
    pub nr: i64,
    /// `None`: any arguments. Otherwise the argument index (0-based) and the values it
    /// may take, each with its name.
    pub only: Option<ArgCheck>,
}

/// An argument check: the argument's index (0-based) and the values it may take, each
/// with its name.
pub type ArgCheck = (u8, Vec<(u64, &'static str)>);

impl Allowed {
    /// The system call's name.
    #[cfg(test)]
    pub fn name(&self) -> &'static str {
        syscall_name(self.nr)
    }
}

/// A rule of the tables below: a system call, and the argument values allowed (all if
/// `values` is empty).
#[derive(Debug, Clone, Copy)]
struct Rule {
    nr: i64,
    arg: u8,
    values: &'static [(u64, &'static str)],
}

/// Any arguments.
const fn any(nr: i64) -> Rule {
    Rule {
        nr,
        arg: 0,
        values: &[],
    }
}

/// Argument `arg` one of `values`.
const fn only(nr: i64, arg: u8, values: &'static [(u64, &'static str)]) -> Rule {
    Rule { nr, arg, values }
}

/// Merges rule groups: one entry per system call, whose values are the union of the
/// groups' (any arguments if any group allows any).
fn merge<'a>(rules: impl Iterator<Item = &'a Rule>) -> Vec<Allowed> {
    let mut merged: BTreeMap<i64, Option<ArgCheck>> = BTreeMap::new();
    for rule in rules {
        let entry = merged
            .entry(rule.nr)
            .or_insert_with(|| Some((rule.arg, Vec::new())));
        match entry {
            _ if rule.values.is_empty() => *entry = None,
            None => {}
            Some((arg, values)) => {
                // Every rule of one system call checks the same argument.
                debug_assert_eq!(*arg, rule.arg, "{}", syscall_name(rule.nr));
                for v in rule.values {
                    if !values.contains(v) {
                        values.push(*v);
                    }
                }
            }
        }
    }
    merged
        .into_iter()
        .map(|(nr, only)| Allowed { nr, only })
        .collect()
}

// ioctl request numbers: _IOC(dir, 0xAE, nr, size) for KVM (linux/kvm.h).
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
}
const KVM_RUN: u64 = kvm_ioc(0, 0x80, 0);
const KVM_GET_REGS: u64 = kvm_ioc(IOC_READ, 0x81, std::mem::size_of::<kvm_regs>());
const KVM_SET_REGS: u64 = kvm_ioc(IOC_WRITE, 0x82, std::mem::size_of::<kvm_regs>());
const KVM_GET_SREGS: u64 = kvm_ioc(IOC_READ, 0x83, std::mem::size_of::<kvm_sregs>());
const KVM_TRANSLATE: u64 = kvm_ioc(
    IOC_READ | IOC_WRITE,
    0x85,
    std::mem::size_of::<kvm_translation>(),
);
const KVM_GET_MSRS: u64 = kvm_ioc(IOC_READ | IOC_WRITE, 0x88, std::mem::size_of::<kvm_msrs>());
const KVM_SET_MSRS: u64 = kvm_ioc(IOC_WRITE, 0x89, std::mem::size_of::<kvm_msrs>());
const KVM_GET_FPU: u64 = kvm_ioc(IOC_READ, 0x8c, std::mem::size_of::<kvm_fpu>());
const KVM_GET_VCPU_EVENTS: u64 = kvm_ioc(IOC_READ, 0x9f, std::mem::size_of::<kvm_vcpu_events>());
const KVM_SET_VCPU_EVENTS: u64 = kvm_ioc(IOC_WRITE, 0xa0, std::mem::size_of::<kvm_vcpu_events>());
// What saving a paused vCPU's state reads, and the pause's KVM_KVMCLOCK_CTRL.
const KVM_GET_CPUID2: u64 = kvm_ioc(
    IOC_READ | IOC_WRITE,
    0x91,
    std::mem::size_of::<kvm_cpuid2>(),
);
const KVM_GET_LAPIC: u64 = kvm_ioc(IOC_READ, 0x8e, std::mem::size_of::<kvm_lapic_state>());
const KVM_GET_MP_STATE: u64 = kvm_ioc(IOC_READ, 0x98, std::mem::size_of::<kvm_mp_state>());
const KVM_GET_XSAVE: u64 = kvm_ioc(IOC_READ, 0xa4, std::mem::size_of::<kvm_xsave>());
const KVM_GET_XCRS: u64 = kvm_ioc(IOC_READ, 0xa6, std::mem::size_of::<kvm_xcrs>());
const KVM_GET_DEBUGREGS: u64 = kvm_ioc(IOC_READ, 0xa1, std::mem::size_of::<kvm_debugregs>());
const KVM_GET_TSC_KHZ: u64 = kvm_ioc(0, 0xa3, 0);
const KVM_KVMCLOCK_CTRL: u64 = kvm_ioc(0, 0xad, 0);
// What a snapshot reads from the VM fd on the main thread.
const KVM_GET_IRQCHIP: u64 = kvm_ioc(
    IOC_READ | IOC_WRITE,
    0x62,
    std::mem::size_of::<kvm_irqchip>(),
);
const KVM_GET_PIT2: u64 = kvm_ioc(IOC_READ, 0x9f, std::mem::size_of::<kvm_pit_state2>());
const KVM_GET_CLOCK: u64 = kvm_ioc(IOC_READ, 0x7c, std::mem::size_of::<kvm_clock_data>());
const KVM_GET_DIRTY_LOG: u64 = kvm_ioc(IOC_WRITE, 0x42, std::mem::size_of::<kvm_dirty_log>());

/// `tcsetattr(TCSANOW)` (glibc reads the settings back with `TCGETS` to check them):
/// the console's panic hook restores the terminal from whichever thread panics, and the
/// main thread does when the VM ends.
const TERMINAL_IOCTLS: &[(u64, &str)] = &[(libc::TCGETS, "TCGETS"), (libc::TCSETS, "TCSETS")];

/// What every thread needs to run Rust code and end: memory (glibc's malloc arenas,
/// `mremap` for large reallocations), locks, log lines on stderr, closing its fds,
/// exiting, the SIGSYS report (`prctl(PR_GET_NAME)`), an abort after a panic
/// (`tgkill(SIGABRT)`) and the terminal restore in the panic hook.
const THREAD_LIFE: &[Rule] = &[
    any(libc::SYS_brk),
    any(libc::SYS_mmap),
    any(libc::SYS_mremap),
    any(libc::SYS_munmap),
    any(libc::SYS_mprotect),
    any(libc::SYS_madvise),
    any(libc::SYS_futex),
    any(libc::SYS_sched_yield),
    any(libc::SYS_clock_gettime),
    any(libc::SYS_getrandom),
    any(libc::SYS_restart_syscall),
    any(libc::SYS_write),
    any(libc::SYS_close),
    any(libc::SYS_rt_sigprocmask),
    any(libc::SYS_sigaltstack),
    any(libc::SYS_getpid),
    any(libc::SYS_gettid),
    any(libc::SYS_exit),
    any(libc::SYS_exit_group),
    only(libc::SYS_tgkill, 2, &[(libc::SIGABRT as u64, "SIGABRT")]),
    only(
        libc::SYS_prctl,
        0,
        &[(libc::PR_GET_NAME as u64, "PR_GET_NAME")],
    ),
    // Debug builds of std check that an fd is open before closing it.
    only(libc::SYS_fcntl, 1, &[(libc::F_GETFD as u64, "F_GETFD")]),
    only(libc::SYS_ioctl, 1, TERMINAL_IOCTLS),
];

/// Waiting on and reading eventfds, signalfds, stdin, timerfds, tap fds.
const EVENT_LOOP: &[Rule] = &[
    any(libc::SYS_epoll_wait),
    any(libc::SYS_epoll_pwait),
    any(libc::SYS_epoll_ctl),
    any(libc::SYS_read),
];

/// The main thread's event loop, and stopping the vCPUs (`tgkill` with the kick
/// signal) when the VM ends or is paused.
const MAIN: &[Rule] = &[any(libc::SYS_tgkill)];

/// The main thread's API work on a running VM: pausing and resuming device workers
/// (a resumed worker's eventfds and epoll set are made here, the thread by the
/// spawner), and snapshots: the VM's irqchip, PIT, clock and dirty log, the memory
/// file and the state file (written to a temporary file, synced, renamed into place).
const MAIN_SNAPSHOT: &[Rule] = &[
    only(
        libc::SYS_ioctl,
        1,
        &[
            (KVM_GET_IRQCHIP, "KVM_GET_IRQCHIP"),
            (KVM_GET_PIT2, "KVM_GET_PIT2"),
            (KVM_GET_CLOCK, "KVM_GET_CLOCK"),
            (KVM_GET_DIRTY_LOG, "KVM_GET_DIRTY_LOG"),
        ],
    ),
    any(libc::SYS_eventfd2),
    any(libc::SYS_epoll_create1),
    only(
        libc::SYS_fcntl,
        1,
        &[(libc::F_DUPFD_CLOEXEC as u64, "F_DUPFD_CLOEXEC")],
    ),
    any(libc::SYS_openat),
    any(libc::SYS_fstat),
    any(libc::SYS_newfstatat),
    any(libc::SYS_statx),
    any(libc::SYS_lseek),
    any(libc::SYS_pwrite64),
    any(libc::SYS_ftruncate),
    any(libc::SYS_fsync),
    any(libc::SYS_fdatasync),
    any(libc::SYS_rename),
    any(libc::SYS_renameat),
    any(libc::SYS_renameat2),
    any(libc::SYS_unlink),
    any(libc::SYS_unlinkat),
];

/// A vCPU thread: the run loop's ioctls (`KVM_RUN`; the registers, events, MSRs, FPU
/// and address translation that the instruction fallback, the syscall trap and the
/// error reports read and write), the kick signal's return, and the MMIO transport's
/// work when the guest starts a device: the worker's eventfds and epoll set (the
/// thread itself comes from the spawner thread, over a channel: `futex`).
const VCPU: &[Rule] = &[
    only(
        libc::SYS_ioctl,
        1,
        &[
            (KVM_RUN, "KVM_RUN"),
            (KVM_GET_REGS, "KVM_GET_REGS"),
            (KVM_SET_REGS, "KVM_SET_REGS"),
            (KVM_GET_SREGS, "KVM_GET_SREGS"),
            (KVM_TRANSLATE, "KVM_TRANSLATE"),
            (KVM_GET_MSRS, "KVM_GET_MSRS"),
            (KVM_SET_MSRS, "KVM_SET_MSRS"),
            (KVM_GET_FPU, "KVM_GET_FPU"),
            (KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS"),
            (KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS"),
            (KVM_GET_CPUID2, "KVM_GET_CPUID2"),
            (KVM_GET_LAPIC, "KVM_GET_LAPIC"),
            (KVM_GET_MP_STATE, "KVM_GET_MP_STATE"),
            (KVM_GET_XSAVE, "KVM_GET_XSAVE"),
            (KVM_GET_XCRS, "KVM_GET_XCRS"),
            (KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS"),
            (KVM_GET_TSC_KHZ, "KVM_GET_TSC_KHZ"),
            (KVM_KVMCLOCK_CTRL, "KVM_KVMCLOCK_CTRL"),
        ],
    ),
    any(libc::SYS_rt_sigreturn),
    any(libc::SYS_eventfd2),
    any(libc::SYS_epoll_create1),
    any(libc::SYS_epoll_ctl),
    // Draining eventfds: the queue notifications when the driver resets a device.
    any(libc::SYS_read),
    only(
        libc::SYS_fcntl,
        1,
        &[(libc::F_DUPFD_CLOEXEC as u64, "F_DUPFD_CLOEXEC")],
    ),
];

/// Starting a thread, and what the new thread does before its start hook installs its
/// own filter (glibc's and std's thread set-up, then `seccomp(SECCOMP_SET_MODE_FILTER)`
/// after `PR_SET_NO_NEW_PRIVS`).
const THREAD_START: &[Rule] = &[
    any(libc::SYS_clone),
    any(libc::SYS_clone3),
    any(libc::SYS_rseq),
    any(libc::SYS_set_robust_list),
    any(libc::SYS_sched_getaffinity),
    only(
        libc::SYS_prctl,
        0,
        &[
            (libc::PR_SET_NAME as u64, "PR_SET_NAME"),
            (libc::PR_SET_NO_NEW_PRIVS as u64, "PR_SET_NO_NEW_PRIVS"),
        ],
    ),
    only(
        libc::SYS_seccomp,
        0,
        &[(
            libc::SECCOMP_SET_MODE_FILTER as u64,
            "SECCOMP_SET_MODE_FILTER",
        )],
    ),
];

/// The virtio-blk worker: the image file (`preadv`/`pwritev`, and `pread64`/`pwrite64`
/// for single buffers), FLUSH, DISCARD and WRITE_ZEROES, and the rate limiter's timer.
const BLK: &[Rule] = &[
    any(libc::SYS_pread64),
    any(libc::SYS_pwrite64),
    any(libc::SYS_preadv),
    any(libc::SYS_pwritev),
    any(libc::SYS_fdatasync),
    any(libc::SYS_fallocate),
    any(libc::SYS_timerfd_settime),
    any(libc::SYS_timerfd_gettime),
];

/// The virtio-net worker: frames are `read`/`write` on the tap (in [`EVENT_LOOP`] and
/// [`THREAD_LIFE`]); the rate limiters' timers.
const NET: &[Rule] = &[
    any(libc::SYS_timerfd_settime),
    any(libc::SYS_timerfd_gettime),
];

/// The virtio-rng worker: `getrandom` (in [`THREAD_LIFE`]), and the rate limiter's
/// timer.
const RNG: &[Rule] = &[
    any(libc::SYS_timerfd_settime),
    any(libc::SYS_timerfd_gettime),
];

/// The console writer thread (`serial-output`, started by the serial port): nothing
/// beyond [`THREAD_LIFE`], whose `write` puts the guest's output on stdout or in the
/// output file and whose `futex` waits on the output queue.
const CONSOLE: &[Rule] = &[];

/// The log writer thread (`ember-log`): nothing beyond [`THREAD_LIFE`], whose `write`
/// puts the log lines on stderr and whose `futex` waits on the log buffer.
const LOGGER: &[Rule] = &[];

/// The API server thread (`ember-api`): `poll` over the listener, its wake-up eventfd
/// and the connections (glibc's `poll` is `poll(2)`; `ppoll` for other C libraries),
/// `accept4` (non-blocking, close-on-exec connections), `read` for requests and the
/// eventfd, `sendto` for responses (`send` with `MSG_NOSIGNAL`), `unlink` (or
/// `unlinkat`) to remove the socket when it stops; `write` (the VMM's eventfd) and
/// `futex` (the request channel, the reply wait with its timeout) are in
/// [`THREAD_LIFE`].
const API: &[Rule] = &[
    any(libc::SYS_poll),
    any(libc::SYS_ppoll),
    any(libc::SYS_accept4),
    any(libc::SYS_read),
    any(libc::SYS_sendto),
    any(libc::SYS_unlink),
    any(libc::SYS_unlinkat),
];

/// Compiles `kind`'s filter: the allowed calls pass, anything else raises SIGSYS.
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    compile_with(kind, SeccompAction::Trap)
}

/// Compiles `kind`'s filter with `otherwise` for calls it does not allow.
fn compile_with(kind: ThreadKind, otherwise: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let error = |source| SeccompError::Compile {
        kind: kind.name(),
        source,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for allowed in kind.allowed() {
        let chain = match &allowed.only {
            None => Vec::new(),
            Some((arg, values)) => values
                .iter()
                .map(|&(value, _)| {
                    // The checked arguments (ioctl request, fcntl command, prctl option,
                    // signal, seccomp operation) are C ints: compare the low 32 bits, as
                    // the kernel reads them.
                    SeccompCondition::new(*arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
                        .and_then(|c| SeccompRule::new(vec![c]))
                        .map_err(error)
                })
                .collect::<Result<_, _>>()?,
        };
        rules.insert(allowed.nr, chain);
    }
    SeccompFilter::new(rules, otherwise, SeccompAction::Allow, TargetArch::x86_64)
        .and_then(BpfProgram::try_from)
        .map_err(error)
}

/// The filters, compiled at start-up, and the self-test.
struct State {
    /// `None` with `--seccomp off`.
    /// Each kind's filter, compiled by the first thread that enters the kind (a VM
    /// uses four or five of the kinds; compiling all ten at start-up took about a third
    /// of a millisecond of a restore's few).
    programs: Option<BTreeMap<ThreadKind, OnceLock<BpfProgram>>>,
    selftest: Option<ThreadKind>,
}

static STATE: OnceLock<State> = OnceLock::new();

/// Sets the filters up, once, before any thread is started: with `enabled`, installs
/// the SIGSYS handler (each filter is compiled when a thread first needs it; every
/// kind's compiles, as the unit tests check); either way, reads [`SELFTEST_ENV`].
/// The filters are then installed by [`enter`] and the hooks ([`vcpu_hook`],
/// [`worker_hook`]).
///
/// Then starts the log writer thread ([`crate::logger::start`]), which [`enter`]s
/// [`ThreadKind::Logger`] first: here, because it must start after the filters are
/// compiled and before any thread installs one (it would inherit it).
pub fn init(enabled: bool) -> Result<(), SeccompError> {
    let selftest =
        match std::env::var(SELFTEST_ENV) {
            Ok(value) if !value.is_empty() => Some(ThreadKind::from_name(&value).ok_or_else(
                || SeccompError::BadSelftest {
                    value,
                    expected: ThreadKind::ALL.map(ThreadKind::name).join(", "),
                },
            )?),
            _ => None,
        };
    let programs = if enabled {
        fix_malloc_arena_limit();
        let programs = ThreadKind::ALL
            .into_iter()
            .map(|kind| (kind, OnceLock::new()))
            .collect::<BTreeMap<_, _>>();
        install_sigsys_handler()?;
        Some(programs)
    } else {
        None
    };
    // A second call keeps the first state.
    let _ = STATE.set(State { programs, selftest });
    crate::logger::start(|| enter(ThreadKind::Logger).map_err(io::Error::other))
        .map_err(SeccompError::Logger)
}

/// Sets glibc's malloc arena limit now, while no filter is installed.
///
/// Without a limit set, glibc computes one the first time a thread's allocation would
/// create a ninth arena, by reading `/sys/devices/system/cpu/online` (`openat`): on
/// whichever thread that happens to be, filtered or not, and no filter here allows
/// opening files. Setting the limit glibc would compute (8 per CPU on 64-bit) keeps its
/// behaviour and takes the file read out of every thread. musl has no arenas.
fn fix_malloc_arena_limit() {
    #[cfg(target_env = "gnu")]
    {
        // glibc's own count: the online CPUs (one small read), not
        // `available_parallelism`, which also reads the cgroup's CPU quota files (a dozen
        // system calls at every start and restore).
        // SAFETY: sysconf only reads system configuration.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        let cpus = libc::c_int::try_from(online).unwrap_or(1).max(1);
        let limit = cpus.saturating_mul(8);
        // SAFETY: mallopt takes two integers and only changes malloc's settings.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, limit) } == 0 {
            log::warn!("mallopt(M_ARENA_MAX, {limit}) failed; a thread may hit its filter");
        }
    }
}

/// Installs the calling thread's filter, if filters are on, and runs the self-test if
/// it asks for this kind. The thread then runs under the filter for good.
pub fn enter(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(state) = STATE.get() else {
        return Ok(());
    };
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("main");
    if let Some(cell) = state.programs.as_ref().and_then(|p| p.get(&kind)) {
        let program = match cell.get() {
            Some(program) => program,
            // Two threads of a kind may both compile it; the first result is kept.
            None => {
                let compiled = compile(kind)?;
                cell.get_or_init(|| compiled)
            }
        };
        remember_thread_name(name);
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
            thread: name.to_string(),
            source,
        })?;
        log::debug!(
            "seccomp: thread '{name}' runs under the {} filter",
            kind.name()
        );
    }
    // `main` tests the main thread whichever filter it runs under.
    let tested = state.selftest == Some(kind)
        || (state.selftest == Some(ThreadKind::Main) && kind == ThreadKind::MainApi);
    if tested {
        selftest(kind, name);
    }
    Ok(())
}

/// The vCPU threads' start hook: [`enter`]s [`ThreadKind::Vcpu`]. `None` when there is
/// nothing to do (filters off, no self-test).
pub fn vcpu_hook() -> Option<ember_vcpu::ThreadHook> {
    active()?;
    Some(Arc::new(|_index| {
        enter(ThreadKind::Vcpu).map_err(io::Error::other)
    }))
}

/// The virtio worker threads' start hook: [`enter`]s the kind the thread's name says
/// ([`ThreadKind::of_worker`]); a thread of no known kind fails to start. `None` when
/// there is nothing to do.
pub fn worker_hook() -> Option<ember_virtio::ThreadHook> {
    let state = active()?;
    let filtered = state.programs.is_some();
    Some(Arc::new(move |thread: &str| {
        match ThreadKind::of_worker(thread) {
            Some(kind) => enter(kind),
            None if filtered => Err(SeccompError::UnknownThread(thread.to_string())),
            None => Ok(()),
        }
        .map_err(io::Error::other)
    }))
}

/// The spawner thread's start hook: [`enter`]s [`ThreadKind::Spawner`]. `None` when
/// there is nothing to do.
pub fn spawner_hook() -> Option<ember_virtio::ThreadHook> {
    active()?;
    Some(Arc::new(|_thread: &str| {
        enter(ThreadKind::Spawner).map_err(io::Error::other)
    }))
}

/// The console writer thread's start hook ([`ember_devices::Serial::with_thread_hook`]):
/// [`enter`]s [`ThreadKind::Console`]. `None` when there is nothing to do.
pub fn console_hook() -> Option<ember_virtio::ThreadHook> {
    active()?;
    Some(Arc::new(|_thread: &str| {
        enter(ThreadKind::Console).map_err(io::Error::other)
    }))
}

/// The state, if filters are on or a self-test is asked for.
fn active() -> Option<&'static State> {
    STATE
        .get()
        .filter(|s| s.programs.is_some() || s.selftest.is_some())
}

/// Makes the system call `kind`'s filter forbids ([`ThreadKind::selftest_call`]),
/// after saying so; harmless when the filter is off.
fn selftest(kind: ThreadKind, thread: &str) {
    let nr = kind.selftest_call();
    log::warn!(
        "seccomp self-test ({SELFTEST_ENV}={}): thread '{thread}' makes system call {nr} ({}), \
         which its filter forbids",
        kind.name(),
        syscall_name(nr)
    );
    // The line is out before the call ends the process (except on the log writer
    // thread, which wrote it itself).
    crate::logger::wait_written();
    if nr == libc::SYS_clone3 {
        // SAFETY: clone3 with no arguments structure (NULL, size 0) fails with EINVAL
        // before creating anything.
        unsafe {
            libc::syscall(
                libc::SYS_clone3,
                std::ptr::null_mut::<libc::c_void>(),
                0usize,
            )
        };
    } else {
        // SAFETY: socket takes no pointers; the fd, if any, is closed at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd >= 0 {
            // SAFETY: `fd` was just created here and nothing else uses it.
            unsafe { libc::close(fd) };
        }
    }
    log::warn!("seccomp self-test: thread '{thread}' survived system call {nr}");
}

/// The longest thread name the SIGSYS report shows from [`remember_thread_name`].
const NAME_MAX: usize = 32;

thread_local! {
    /// This thread's name, for the SIGSYS handler (the kernel keeps only 15 bytes of it:
    /// `ember-virtio-bl`). Const-initialised and without a destructor, so reading it is
    /// a plain thread-local load, safe in a signal handler.
    static THREAD_NAME: Cell<([u8; NAME_MAX], usize)> = const { Cell::new(([0; NAME_MAX], 0)) };
}

fn remember_thread_name(name: &str) {
    let mut buf = [0u8; NAME_MAX];
    let len = name.len().min(NAME_MAX);
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    THREAD_NAME.with(|n| n.set((buf, len)));
}

/// Installs [`on_sigsys`] for SIGSYS, process-wide.
fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: zero is a valid sigaction (no handler, empty mask, no flags); the fields
    // set below make it a valid SA_SIGINFO handler.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as extern "C" fn(_, _, _) as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is initialised; sigemptyset writes only its mask.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is valid for the call; the old action is not asked for.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(SeccompError::Handler(io::Error::last_os_error()));
    }
    Ok(())
}

/// `siginfo_t` as the kernel fills it for SIGSYS (`_sigsys` in the union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// `si_code` of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: libc::c_int = 1;

/// The SIGSYS handler: one line on stderr naming the thread and the system call, then
/// `_exit(148)`. Async-signal-safe: no allocation, no lock, only `write`,
/// `prctl(PR_GET_NAME)` and `_exit` (each allowed by every filter).
extern "C" fn on_sigsys(_signo: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let mut line = Line::new();
    line.push(b"ember: seccomp: thread '");
    let (mut name, mut len) = THREAD_NAME.with(Cell::get);
    if len == 0 {
        // A thread that installed no filter of its own (it inherited one): the
        // kernel's copy of its name, at most 15 bytes and a NUL.
        // SAFETY: PR_GET_NAME writes at most 16 bytes, and `name` has NAME_MAX.
        unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
        len = name.iter().position(|&b| b == 0).unwrap_or(16);
    }
    line.push(name.get(..len).unwrap_or(b"?"));
    line.push(b"' ");
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; for SIGSYS
    // its union holds `_sigsys`, which SigsysInfo lays out (read only when si_code says
    // so).
    let (code, nr) = unsafe {
        let info = &*info.cast::<SigsysInfo>();
        (info.code, info.syscall)
    };
    if code == SYS_SECCOMP {
        line.push(b"made a forbidden system call ");
        line.push_number(i64::from(nr));
        line.push(b" (");
        line.push(syscall_name(i64::from(nr)).as_bytes());
        line.push(b"); exiting. (--seccomp off disables the filters, for debugging)\n");
    } else {
        line.push(b"received SIGSYS from outside seccomp; exiting.\n");
    }
    line.write_to_stderr();
    // SAFETY: _exit is async-signal-safe and ends the process without running anything.
    unsafe { libc::_exit(EXIT_BAD_SYSCALL) }
}

/// A line built on the stack, for the signal handler.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }

    /// Appends as much of `bytes` as fits.
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut rest = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }

    /// Writes the line to fd 2 with `write(2)`, retrying short writes.
    fn write_to_stderr(&self) {
        let mut rest = self.as_bytes();
        while !rest.is_empty() {
            // SAFETY: `rest` is valid for reads of its length.
            let n = unsafe { libc::write(libc::STDERR_FILENO, rest.as_ptr().cast(), rest.len()) };
            match usize::try_from(n) {
                Ok(n) if n > 0 => rest = rest.get(n..).unwrap_or(&[]),
                _ => return,
            }
        }
    }
}

/// The name of x86-64 system call `nr`, or `?`. Allocation-free (for the signal
/// handler).
pub fn syscall_name(nr: i64) -> &'static str {
    let (names, first) = if nr >= NAMES_HIGH_FIRST {
        (NAMES_HIGH, NAMES_HIGH_FIRST)
    } else {
        (NAMES_LOW, 0)
    };
    usize::try_from(nr - first)
        .ok()
        .and_then(|i| names.split(' ').nth(i))
        .filter(|name| !name.is_empty())
        .unwrap_or("?")
}

/// The number of the first name in [`NAMES_HIGH`].
const NAMES_HIGH_FIRST: i64 = 424;

/// x86-64 system call names, numbers 0 to 335 in order, one word each (seccompiler's
/// table, Linux 6.12).
const NAMES_LOW: &str = concat!(
    "read write open close stat fstat lstat poll lseek mmap mprotect munmap brk ",
    "rt_sigaction rt_sigprocmask rt_sigreturn ioctl pread64 pwrite64 readv writev access ",
    "pipe select sched_yield mremap msync mincore madvise shmget shmat shmctl dup dup2 ",
    "pause nanosleep getitimer alarm setitimer getpid sendfile socket connect accept ",
    "sendto recvfrom sendmsg recvmsg shutdown bind listen getsockname getpeername ",
    "socketpair setsockopt getsockopt clone fork vfork execve exit wait4 kill uname ",
    "semget semop semctl shmdt msgget msgsnd msgrcv msgctl fcntl flock fsync fdatasync ",
    "truncate ftruncate getdents getcwd chdir fchdir rename mkdir rmdir creat link unlink ",
    "symlink readlink chmod fchmod chown fchown lchown umask gettimeofday getrlimit ",
    "getrusage sysinfo times ptrace getuid syslog getgid setuid setgid geteuid getegid ",
    "setpgid getppid getpgrp setsid setreuid setregid getgroups setgroups setresuid ",
    "getresuid setresgid getresgid getpgid setfsuid setfsgid getsid capget capset ",
    "rt_sigpending rt_sigtimedwait rt_sigqueueinfo rt_sigsuspend sigaltstack utime mknod ",
    "uselib personality ustat statfs fstatfs sysfs getpriority setpriority sched_setparam ",
    "sched_getparam sched_setscheduler sched_getscheduler sched_get_priority_max ",
    "sched_get_priority_min sched_rr_get_interval mlock munlock mlockall munlockall ",
    "vhangup modify_ldt pivot_root _sysctl prctl arch_prctl adjtimex setrlimit chroot ",
    "sync acct settimeofday mount umount2 swapon swapoff reboot sethostname setdomainname ",
    "iopl ioperm create_module init_module delete_module get_kernel_syms query_module ",
    "quotactl nfsservctl getpmsg putpmsg afs_syscall tuxcall security gettid readahead ",
    "setxattr lsetxattr fsetxattr getxattr lgetxattr fgetxattr listxattr llistxattr ",
    "flistxattr removexattr lremovexattr fremovexattr tkill time futex sched_setaffinity ",
    "sched_getaffinity set_thread_area io_setup io_destroy io_getevents io_submit ",
    "io_cancel get_thread_area lookup_dcookie epoll_create epoll_ctl_old epoll_wait_old ",
    "remap_file_pages getdents64 set_tid_address restart_syscall semtimedop fadvise64 ",
    "timer_create timer_settime timer_gettime timer_getoverrun timer_delete clock_settime ",
    "clock_gettime clock_getres clock_nanosleep exit_group epoll_wait epoll_ctl tgkill ",
    "utimes vserver mbind set_mempolicy get_mempolicy mq_open mq_unlink mq_timedsend ",
    "mq_timedreceive mq_notify mq_getsetattr kexec_load waitid add_key request_key keyctl ",
    "ioprio_set ioprio_get inotify_init inotify_add_watch inotify_rm_watch migrate_pages ",
    "openat mkdirat mknodat fchownat futimesat newfstatat unlinkat renameat linkat ",
    "symlinkat readlinkat fchmodat faccessat pselect6 ppoll unshare set_robust_list ",
    "get_robust_list splice tee sync_file_range vmsplice move_pages utimensat epoll_pwait ",
    "signalfd timerfd_create eventfd fallocate timerfd_settime timerfd_gettime accept4 ",
    "signalfd4 eventfd2 epoll_create1 dup3 pipe2 inotify_init1 preadv pwritev ",
    "rt_tgsigqueueinfo perf_event_open recvmmsg fanotify_init fanotify_mark prlimit64 ",
    "name_to_handle_at open_by_handle_at clock_adjtime syncfs sendmmsg setns getcpu ",
    "process_vm_readv process_vm_writev kcmp finit_module sched_setattr sched_getattr ",
    "renameat2 seccomp getrandom memfd_create kexec_file_load bpf execveat userfaultfd ",
    "membarrier mlock2 copy_file_range preadv2 pwritev2 pkey_mprotect pkey_alloc ",
    "pkey_free statx io_pgetevents rseq uretprobe ",
);
/// x86-64 system call names from number 424 (`NAMES_HIGH_FIRST`) to 462, in order.
const NAMES_HIGH: &str = concat!(
    "pidfd_send_signal io_uring_setup io_uring_enter io_uring_register open_tree ",
    "move_mount fsopen fsconfig fsmount fspick pidfd_open clone3 close_range openat2 ",
    "pidfd_getfd faccessat2 process_madvise epoll_pwait2 mount_setattr quotactl_fd ",
    "landlock_create_ruleset landlock_add_rule landlock_restrict_self memfd_secret ",
    "process_mrelease futex_waitv set_mempolicy_home_node cachestat fchmodat2 ",
    "map_shadow_stack futex_wake futex_wait futex_requeue statmount listmount ",
    "lsm_get_self_attr lsm_set_self_attr lsm_list_modules mseal ",
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_ioctl_numbers_match_linux_headers() {
        // From <linux/kvm.h> on x86-64, printed by a C program.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_SET_REGS, 0x4090_ae82);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_TRANSLATE, 0xc018_ae85);
        assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
        assert_eq!(KVM_SET_MSRS, 0x4008_ae89);
        assert_eq!(KVM_GET_FPU, 0x81a0_ae8c);
        assert_eq!(KVM_GET_VCPU_EVENTS, 0x8040_ae9f);
        assert_eq!(KVM_SET_VCPU_EVENTS, 0x4040_aea0);
    }

    #[test]
    fn syscall_names_by_number() {
        assert_eq!(syscall_name(0), "read");
        assert_eq!(syscall_name(16), "ioctl");
        assert_eq!(syscall_name(41), "socket");
        assert_eq!(syscall_name(59), "execve");
        assert_eq!(syscall_name(334), "rseq");
        assert_eq!(syscall_name(335), "uretprobe");
        assert_eq!(syscall_name(424), "pidfd_send_signal");
        assert_eq!(syscall_name(435), "clone3");
        for nr in [-1, 336, 400, 423, 10_000] {
            assert_eq!(syscall_name(nr), "?", "{nr}");
        }
        for kind in ThreadKind::ALL {
            for allowed in kind.allowed() {
                assert_ne!(allowed.name(), "?", "{} {}", kind.name(), allowed.nr);
            }
        }
    }

    #[test]
    fn worker_threads_are_known_by_name() {
        assert_eq!(
            ThreadKind::of_worker("ember-virtio-blk"),
            Some(ThreadKind::VirtioBlk)
        );
        assert_eq!(
            ThreadKind::of_worker("ember-virtio-net"),
            Some(ThreadKind::VirtioNet)
        );
        assert_eq!(
            ThreadKind::of_worker("ember-virtio-rng"),
            Some(ThreadKind::VirtioRng)
        );
        for other in [
            "ember-virtio-gpu",
            "ember-vcpu-0",
            "ember-main",
            "virtio-blk",
            "",
        ] {
            assert_eq!(ThreadKind::of_worker(other), None, "{other}");
        }
        for kind in ThreadKind::ALL {
            assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
        }
    }

    /// Whether `filter` lets through every call (and argument value) `wanted` allows.
    fn covers(filter: &[Allowed], wanted: &Allowed) -> bool {
        filter.iter().any(|a| {
            a.nr == wanted.nr
                && match (&a.only, &wanted.only) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some((i, have)), Some((j, want))) => {
                        i == j && want.iter().all(|v| have.contains(v))
                    }
                }
        })
    }

    /// A worker is created by the spawner thread and runs under both filters, so
    /// everything a worker's filter allows, the spawner filter must allow too.
    #[test]
    fn the_spawner_filter_allows_everything_the_workers_it_creates_do() {
        let spawner = ThreadKind::Spawner.allowed();
        for kind in ThreadKind::ALL.into_iter().filter(|k| k.is_worker()) {
            for wanted in kind.allowed() {
                assert!(
                    covers(&spawner, &wanted),
                    "{} allows {} {:?}, the spawner filter does not",
                    kind.name(),
                    wanted.name(),
                    wanted.only
                );
            }
        }
    }

    /// The vCPU thread no longer creates threads (the spawner does), so its filter
    /// allows neither thread creation nor the workers' file and timer calls.
    #[test]
    fn the_vcpu_filter_creates_no_threads_and_does_no_device_io() {
        let vcpu = ThreadKind::Vcpu.allowed();
        for nr in [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_seccomp,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_fdatasync,
            libc::SYS_timerfd_settime,
        ] {
            assert!(
                !vcpu.iter().any(|a| a.nr == nr),
                "the vCPU filter allows {}",
                syscall_name(nr)
            );
        }
    }

    #[test]
    fn every_filter_compiles_and_each_call_is_listed_once() {
        for kind in ThreadKind::ALL {
            let program = compile(kind).unwrap();
            assert!(
                !program.is_empty() && program.len() < 4096,
                "{}",
                kind.name()
            );
            let allowed = kind.allowed();
            let mut numbers: Vec<i64> = allowed.iter().map(|a| a.nr).collect();
            numbers.dedup();
            assert_eq!(numbers.len(), allowed.len(), "{}", kind.name());
        }
    }

    /// Runs `f` on a new thread under `kind`'s filter, with forbidden calls failing with
    /// EPERM instead of raising SIGSYS (which would end the test process).
    fn under_filter<T: Send + 'static>(kind: ThreadKind, f: fn() -> T) -> T {
        let program = compile_with(kind, SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        std::thread::spawn(move || {
            seccompiler::apply_filter(&program).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    /// `ioctl(-1, request)`'s errno: EBADF if the filter let it through, EPERM if not.
    fn ioctl_errno(request: u64) -> i32 {
        // SAFETY: fd -1 makes the call fail before the kernel looks at the argument.
        let rc = unsafe { libc::ioctl(-1, request as libc::Ioctl, 0) };
        assert_eq!(rc, -1);
        io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    fn socket_errno() -> i32 {
        // SAFETY: no pointers; a created fd is closed at once.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd >= 0 {
            // SAFETY: `fd` was created just above.
            unsafe { libc::close(fd) };
            return 0;
        }
        io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn the_vcpu_filter_checks_ioctl_request_numbers() {
        let (run, create_vm, set_cpuid, socket) = under_filter(ThreadKind::Vcpu, || {
            (
                ioctl_errno(KVM_RUN),
                ioctl_errno(0xae01),      // KVM_CREATE_VM
                ioctl_errno(0x4008_ae90), // KVM_SET_CPUID2
                socket_errno(),
            )
        });
        assert_eq!(run, libc::EBADF, "KVM_RUN is allowed");
        assert_eq!(create_vm, libc::EPERM, "KVM_CREATE_VM is not");
        assert_eq!(set_cpuid, libc::EPERM, "KVM_SET_CPUID2 is not");
        assert_eq!(socket, libc::EPERM, "socket is not");
    }

    #[test]
    fn a_worker_filter_forbids_kvm_ioctls_and_sockets() {
        for kind in [
            ThreadKind::VirtioBlk,
            ThreadKind::VirtioNet,
            ThreadKind::VirtioRng,
        ] {
            let (run, socket) = under_filter(kind, || (ioctl_errno(KVM_RUN), socket_errno()));
            assert_eq!(run, libc::EPERM, "{}", kind.name());
            assert_eq!(socket, libc::EPERM, "{}", kind.name());
        }
        // Without a filter, the same calls get through.
        assert_eq!(ioctl_errno(KVM_RUN), libc::EBADF);
        assert_eq!(socket_errno(), 0);
    }

    #[test]
    fn the_rng_worker_may_call_getrandom_but_not_pread() {
        let (random, pread) = under_filter(ThreadKind::VirtioRng, || {
            let mut buf = [0u8; 8];
            // SAFETY: `buf` is writable for its length.
            let random = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
            // SAFETY: fd -1; the buffer is valid anyway.
            let pread = unsafe { libc::pread64(-1, buf.as_mut_ptr().cast(), buf.len(), 0) };
            let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
            (random, (pread, errno))
        });
        assert_eq!(random, 8);
        assert_eq!(pread, (-1, libc::EPERM));
    }

    #[test]
    fn the_api_filter_forbids_sockets_and_kvm_ioctls() {
        let (socket, run) =
            under_filter(ThreadKind::Api, || (socket_errno(), ioctl_errno(KVM_RUN)));
        assert_eq!(socket, libc::EPERM);
        assert_eq!(run, libc::EPERM);
    }

    /// Reads one response (head and `Content-Length` body) from `s`.
    fn api_response(s: &mut std::os::unix::net::UnixStream) -> String {
        use std::io::Read;
        let mut text = Vec::new();
        let mut byte = [0u8; 1];
        while !text.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut byte).unwrap(), 1, "closed: {text:?}");
            text.push(byte[0]);
        }
        let head = String::from_utf8(text).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        head + std::str::from_utf8(&body).unwrap()
    }

    /// The API thread's whole life under its filter, with forbidden calls failing with
    /// EPERM: accepting, keep-alive requests answered by the VMM side, a refused
    /// request closing its connection, a second client, then shutdown and removal of
    /// the socket. A call the filter lacks would make one of these fail.
    #[test]
    fn the_api_server_runs_under_its_filter() {
        use crate::api::{ApiReply, ApiRequest, ApiServer, InstanceInfo, InstanceState};
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        use std::time::Duration;

        let program =
            compile_with(ThreadKind::Api, SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (server, requests) = ApiServer::start_with_hook(&path, move || {
            seccompiler::apply_filter(&program).map_err(|e| e.to_string())
        })
        .unwrap();
        let vmm = std::thread::spawn(move || {
            while let Some((request, responder)) = requests.recv_timeout(Duration::from_secs(20)) {
                responder.reply(match request {
                    ApiRequest::GetInstanceInfo => {
                        ApiReply::Json(InstanceInfo::new("f", InstanceState::NotStarted).to_json())
                    }
                    _ => ApiReply::NoContent,
                });
            }
        });
        let connect = || {
            let s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        };
        let mut s = connect();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let r = api_response(&mut s);
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("\"Not started\""), "{r}");
        let body = r#"{"vcpu_count": 1, "mem_size_mib": 128}"#;
        s.write_all(
            format!(
                "PUT /machine-config HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        let r = api_response(&mut s);
        assert!(r.starts_with("HTTP/1.1 204 No Content\r\n"), "{r}");
        s.write_all(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap();
        let r = api_response(&mut s);
        assert!(r.starts_with("HTTP/1.1 501 "), "{r}");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        let mut s = connect();
        s.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        assert!(api_response(&mut s).starts_with("HTTP/1.1 200 OK\r\n"));
        drop(server);
        assert!(!path.exists(), "the API thread could not remove its socket");
        vmm.join().unwrap();
    }

    #[test]
    fn the_report_line_formats_numbers() {
        let mut line = Line::new();
        line.push(b"n=");
        line.push_number(0);
        line.push(b",");
        line.push_number(435);
        line.push(b",");
        line.push_number(-7);
        assert_eq!(line.as_bytes(), b"n=0,435,-7");
        let mut long = Line::new();
        long.push(&[b'x'; 300]);
        assert_eq!(long.as_bytes().len(), 256);
    }

    /// Prints the README's tables: `cargo test -p ember-vmm --bin ember seccomp::tests::
    /// print_readme_tables -- --ignored --nocapture`.
    #[test]
    #[ignore = "prints the README's tables"]
    fn print_readme_tables() {
        for kind in ThreadKind::ALL {
            let allowed = kind.allowed();
            let list: Vec<String> = allowed
                .iter()
                .map(|a| match &a.only {
                    None => format!("`{}`", a.name()),
                    Some((_, values)) => {
                        let names: Vec<&str> = values.iter().map(|&(_, n)| n).collect();
                        format!("`{}` ({})", a.name(), names.join(", "))
                    }
                })
                .collect();
            println!(
                "| {} | {} | {} |",
                kind.name(),
                allowed.len(),
                list.join(", ")
            );
        }
    }
}

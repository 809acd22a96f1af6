//! Stopping a vCPU that is inside `KVM_RUN`, from another thread, without races.
//!
//! The stopper sets the vCPU's stop flag, then sends the vCPU thread a real-time
//! signal. The signal handler runs on the vCPU thread and, if the thread is in the
//! window from its stop-flag check to the return of `KVM_RUN`, sets `immediate_exit`
//! in that thread's `kvm_run`, so:
//! * if the thread is inside `KVM_RUN`, the signal makes it return `EINTR`;
//! * if the thread is between its flag check and `KVM_RUN`, `immediate_exit` makes
//!   the next `KVM_RUN` return `EINTR` at once instead of running the guest;
//! * outside the window, the handler does nothing: the thread checks the flag before
//!   it enters `KVM_RUN` again.
//!
//! Either way the run loop reads the flag and returns
//! [`VcpuOutcome::Stopped`](crate::VcpuOutcome::Stopped).
//!
//! The window holds no Rust reference into `kvm_run` (the run loop reads exits only
//! after it), so the handler's write never lands under a live reference; it writes
//! through a pointer derived from the vCPU's own mapping of `kvm_run`, atomically, as
//! every other access to `immediate_exit` is.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::VcpuError;

thread_local! {
    /// `kvm_run.immediate_exit` of the vCPU this thread is running, while it is in the
    /// window around `KVM_RUN`; null outside it.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(ptr::null_mut()) };
}

/// The signal used to kick vCPU threads out of `KVM_RUN`: `SIGRTMIN + 0`.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    // `try_with` and `get` on a const-initialised Cell neither allocate nor lock, so
    // they are async-signal-safe.
    let byte = IMMEDIATE_EXIT
        .try_with(Cell::get)
        .unwrap_or(ptr::null_mut());
    if !byte.is_null() {
        // SAFETY: `byte` was registered by this very thread (the handler runs on the
        // thread it interrupts), derived from the pointer `mmap` returned for the
        // vCPU's kvm_run area, and is unregistered before the area can go away
        // (`KickTarget` lives inside `RunArea::run`, which borrows the area). While it
        // is registered no Rust reference to the byte exists, and every other access
        // to it is atomic; a u8 is always aligned.
        unsafe { AtomicU8::from_ptr(byte) }.store(1, Ordering::Relaxed);
    }
}

/// Installs the kick signal handler for the process (once; later calls are free).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), handle_kick))
        .map_err(VcpuError::SignalHandler)
}

/// Registers a vCPU's `kvm_run.immediate_exit` byte as this thread's kick target for
/// as long as it lives (the window around one `KVM_RUN`).
pub(crate) struct KickTarget(());

impl KickTarget {
    /// `immediate_exit` must stay mapped, with no Rust reference to it, until the
    /// target is dropped.
    #[inline]
    pub(crate) fn register(immediate_exit: *mut u8) -> KickTarget {
        IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
        KickTarget(())
    }
}

impl Drop for KickTarget {
    #[inline]
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|c| c.set(ptr::null_mut()));
    }
}

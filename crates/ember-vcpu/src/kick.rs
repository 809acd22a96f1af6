//! Stopping a vCPU that is inside `KVM_RUN`, from another thread, without races.
//!
//! The stopper sets the vCPU's stop flag, then sends the vCPU thread a real-time
//! signal. The signal handler runs on the vCPU thread and sets `immediate_exit` in that
//! thread's `kvm_run`, so:
//! * if the thread is inside `KVM_RUN`, the signal makes it return `EINTR`;
//! * if the thread is between its flag check and `KVM_RUN`, `immediate_exit` makes
//!   the next `KVM_RUN` return `EINTR` at once instead of running the guest.
//!
//! Either way the run loop sees `EINTR`, reads the flag and returns
//! [`VcpuOutcome::Stopped`](crate::VcpuOutcome::Stopped).

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::ptr;
use std::sync::OnceLock;

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::VcpuError;

thread_local! {
    /// The `kvm_run` of the vCPU this thread is running, or null.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// The signal used to kick vCPU threads out of `KVM_RUN`: `SIGRTMIN + 0`.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    // `try_with` and `get` on a const-initialised Cell neither allocate nor lock, so
    // they are async-signal-safe.
    let run = KVM_RUN.try_with(Cell::get).unwrap_or(ptr::null_mut());
    if !run.is_null() {
        // SAFETY: `run` was registered by this very thread from a live `VcpuFd` mapping
        // and is cleared before that mapping can go away (see `KickTarget`). A volatile
        // write to a byte in it cannot tear.
        unsafe { ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick signal handler for the process (once; later calls are free).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), handle_kick))
        .map_err(VcpuError::SignalHandler)
}

/// Registers a `kvm_run` as this thread's kick target for as long as it lives.
pub(crate) struct KickTarget(());

impl KickTarget {
    pub(crate) fn register(run: *mut kvm_run) -> KickTarget {
        KVM_RUN.with(|c| c.set(run));
        KickTarget(())
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(ptr::null_mut()));
    }
}

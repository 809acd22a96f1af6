//! Requests to a vCPU's run loop from other threads: stop, pause, resume, and commands
//! a paused vCPU runs on its own thread.
//!
//! The requests are bits of one atomic word, which the run loop loads once before each
//! `KVM_RUN` (and after a kick's `EINTR`): a pause costs the exit path nothing more than
//! the stop flag did. Everything else (parking, commands) is off the hot path, behind a
//! mutex and a condition variable.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::state::VcpuState;
use crate::VcpuError;

/// Request bit: end the run loop.
pub(crate) const STOP: u32 = 1;
/// Request bit: park the vCPU until the bit is cleared.
pub(crate) const PAUSE: u32 = 2;

/// Work for a paused vCPU's thread.
pub(crate) enum Command {
    /// Save the vCPU's state and send it back.
    SaveState(Sender<Result<VcpuState, VcpuError>>),
}

#[derive(Default)]
struct Park {
    /// The vCPU's thread is parked (out of `KVM_RUN`, pending exits completed).
    parked: bool,
    /// The run loop has ended (its thread is about to end).
    ended: bool,
    commands: VecDeque<Command>,
}

/// The state shared by a vCPU, its thread and the handles that control it.
#[derive(Default)]
pub(crate) struct Shared {
    /// [`STOP`] | [`PAUSE`]: the run loop's one check.
    pub(crate) requests: AtomicU32,
    park: Mutex<Park>,
    changed: Condvar,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("requests", &self.requests.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Park> {
        // Nothing in `Park` can be left half-updated by a panic.
        self.park.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Park>) -> MutexGuard<'a, Park> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets request bits, waking a parked vCPU thread and anyone waiting.
    fn set(&self, bits: u32) {
        let _park = self.lock();
        self.requests.fetch_or(bits, Ordering::AcqRel);
        self.changed.notify_all();
    }

    pub(crate) fn stop(&self) {
        self.set(STOP);
    }

    pub(crate) fn request_pause(&self) {
        self.set(PAUSE);
    }

    pub(crate) fn resume(&self) {
        let _park = self.lock();
        self.requests.fetch_and(!PAUSE, Ordering::AcqRel);
        self.changed.notify_all();
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.lock().parked
    }

    /// Waits until vCPU `vcpu`'s thread has parked.
    pub(crate) fn wait_parked(&self, vcpu: u32) -> Result<(), VcpuError> {
        let mut park = self.lock();
        loop {
            if park.parked {
                return Ok(());
            }
            if park.ended {
                return Err(VcpuError::NotRunning { vcpu });
            }
            if self.requests.load(Ordering::Acquire) & PAUSE == 0 {
                // Resumed meanwhile: it will not park.
                return Err(VcpuError::NotPaused { vcpu });
            }
            park = self.wait(park);
        }
    }

    /// Queues `command` for vCPU `vcpu`'s parked thread.
    pub(crate) fn post(&self, command: Command, vcpu: u32) -> Result<(), VcpuError> {
        let mut park = self.lock();
        if park.ended {
            return Err(VcpuError::NotRunning { vcpu });
        }
        if !park.parked {
            return Err(VcpuError::NotPaused { vcpu });
        }
        park.commands.push_back(command);
        self.changed.notify_all();
        Ok(())
    }

    /// On the vCPU's thread: parks until the pause is lifted or a stop is requested,
    /// running the commands posted meanwhile with `run`.
    pub(crate) fn park(&self, mut run: impl FnMut(Command)) {
        let mut park = self.lock();
        park.parked = true;
        self.changed.notify_all();
        loop {
            if let Some(command) = park.commands.pop_front() {
                drop(park);
                run(command);
                park = self.lock();
                continue;
            }
            let requests = self.requests.load(Ordering::Acquire);
            if requests & STOP != 0 || requests & PAUSE == 0 {
                park.parked = false;
                self.changed.notify_all();
                return;
            }
            park = self.wait(park);
        }
    }

    /// On the vCPU's thread, as its run loop has ended: fails whatever waits for it.
    pub(crate) fn mark_ended(&self) {
        let mut park = self.lock();
        park.ended = true;
        park.parked = false;
        // Dropping the senders fails their receivers.
        park.commands.clear();
        self.changed.notify_all();
    }
}

/// A handle on a vCPU's run loop, usable from any thread, including the vCPU's own (a
/// device or an exit handler): requests take effect when the run loop next checks them,
/// before its next `KVM_RUN`. It does not kick the vCPU out of `KVM_RUN`;
/// [`RunningVcpu`](crate::RunningVcpu)'s methods do.
///
/// ```no_run
/// # fn f(vcpu: &ember_vcpu::Vcpu) {
/// let control = vcpu.control();
/// // In a device's handler, on the vCPU's thread: park right after this exit.
/// control.request_pause();
/// # }
/// ```
#[derive(Clone)]
pub struct VcpuControl(pub(crate) Arc<Shared>);

impl std::fmt::Debug for VcpuControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuControl")
            .field("requests", &self.0.requests.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl VcpuControl {
    /// Asks the run loop to end ([`VcpuOutcome::Stopped`](crate::VcpuOutcome::Stopped)),
    /// paused or not.
    pub fn stop(&self) {
        self.0.stop();
    }

    /// Asks the run loop to park the vCPU before its next `KVM_RUN`, until
    /// [`VcpuControl::resume`].
    pub fn request_pause(&self) {
        self.0.request_pause();
    }

    /// Lifts a pause: a parked vCPU goes on.
    pub fn resume(&self) {
        self.0.resume();
    }

    /// Whether the vCPU's thread is parked.
    pub fn is_paused(&self) -> bool {
        self.0.is_paused()
    }
}

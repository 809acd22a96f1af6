//! How devices ask the VMM to end the VM.
//!
//! Devices that end the VM (the debug-exit port, the i8042 reset command, the ACPI
//! shutdown register) share one
//! [`ExitSignal`]. The first request is recorded and the signal's eventfd becomes
//! readable; the VMM polls that eventfd (or checks [`ExitSignal::requested`] after each
//! vCPU exit) and then stops its vCPUs.

use std::sync::OnceLock;

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::DeviceError;

/// Why a device wants the VM to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitRequest {
    /// The guest wrote this code to the debug-exit port; the VMM should exit with it.
    DebugExit(u8),
    /// The guest asked for a reset (i8042 command `0xFE`, or the ACPI reset register).
    /// Ember treats it as a clean shutdown.
    Reset,
    /// The guest powered off: it entered ACPI sleep state S5 (soft off) through the
    /// sleep control register. A clean shutdown.
    PowerOff,
}

/// A one-shot, thread-safe "please end the VM" signal shared by devices and the VMM.
///
/// Share it with an `Arc`. The first [`request`](ExitSignal::request) wins; later ones
/// are ignored, so an exit code cannot be overwritten by a guest that keeps writing.
///
/// ```
/// use ember_devices::{ExitRequest, ExitSignal};
///
/// let exit = ExitSignal::new().unwrap();
/// assert_eq!(exit.requested(), None);
/// exit.request(ExitRequest::DebugExit(3));
/// exit.request(ExitRequest::Reset); // too late: the first request wins
/// assert_eq!(exit.requested(), Some(ExitRequest::DebugExit(3)));
/// assert_eq!(exit.event_fd().read().unwrap(), 1);
/// ```
#[derive(Debug)]
pub struct ExitSignal {
    event: EventFd,
    request: OnceLock<ExitRequest>,
}

impl ExitSignal {
    /// Creates a signal with no request and a non-blocking eventfd.
    pub fn new() -> Result<Self, DeviceError> {
        let event =
            EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(|source| DeviceError::EventFd {
                op: "create the exit eventfd",
                source,
            })?;
        Ok(ExitSignal {
            event,
            request: OnceLock::new(),
        })
    }

    /// Records `req` if it is the first request, and makes the eventfd readable.
    ///
    /// Never blocks and never fails: if the eventfd cannot be written (its counter is
    /// saturated) the request is still recorded and the failure is logged.
    pub fn request(&self, req: ExitRequest) {
        if self.request.set(req).is_err() {
            debug_limited!("exit already requested; ignoring {req:?}");
            return;
        }
        log::debug!("exit requested: {req:?}");
        if let Err(err) = self.event.write(1) {
            ember_rate_limiter::warn_limited!(
                "failed to signal the exit eventfd for {req:?}: {err}"
            );
        }
    }

    /// The first request made, if any.
    pub fn requested(&self) -> Option<ExitRequest> {
        self.request.get().copied()
    }

    /// The eventfd that becomes readable once an exit is requested.
    pub fn event_fd(&self) -> &EventFd {
        &self.event
    }
}

//! Interrupt lines backed by eventfds (KVM irqfds).

use std::io;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::DeviceError;

/// An edge-triggered interrupt line: triggering it writes 1 to an eventfd.
///
/// The VMM registers the eventfd with KVM as an irqfd
/// (`vm.register_irqfd(line.event_fd(), gsi)`), so a trigger injects the interrupt
/// without leaving the kernel.
///
/// ```
/// use ember_devices::IrqLine;
/// use vm_superio::Trigger;
///
/// let line = IrqLine::new().unwrap();
/// line.trigger().unwrap();
/// assert_eq!(line.event_fd().read().unwrap(), 1);
/// ```
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// Creates a line with a fresh non-blocking eventfd.
    pub fn new() -> Result<Self, DeviceError> {
        EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
            .map(IrqLine)
            .map_err(|source| DeviceError::EventFd {
                op: "create an interrupt eventfd",
                source,
            })
    }

    /// Wraps an existing eventfd.
    pub fn from_event_fd(event: EventFd) -> Self {
        IrqLine(event)
    }

    /// Returns a second handle on the same eventfd (for example, one for the device
    /// and one to register with KVM).
    pub fn try_clone(&self) -> Result<Self, DeviceError> {
        self.0
            .try_clone()
            .map(IrqLine)
            .map_err(|source| DeviceError::EventFd {
                op: "clone an interrupt eventfd",
                source,
            })
    }

    /// The eventfd to register with KVM as an irqfd.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for IrqLine {
    type E = io::Error;

    /// Writes 1 to the eventfd.
    fn trigger(&self) -> Result<(), io::Error> {
        self.0.write(1)
    }
}

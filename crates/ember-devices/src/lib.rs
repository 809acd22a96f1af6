//! Legacy and platform devices for Ember virtual machine monitors: a 16550A serial port,
//! an i8042 controller that turns the guest's reset into a clean exit, the ACPI
//! shutdown register a hardware-reduced guest powers off through, and debug-exit and
//! boot-done ports. No KVM: the devices talk to the guest through an
//! [`ember_bus::Bus`] and raise interrupts on eventfds ([`IrqLine`]) that a VMM may
//! register with any hypervisor. Virtio devices live in `ember-virtio-devices`.
//!
//! Every device implements [`ember_bus::BusDevice`]: insert it into an
//! [`ember_bus::Bus`] at its port and the vCPU run loop reaches it through the bus.
//! Devices lock themselves, so all methods take `&self`, and whatever a guest sends
//! (offsets, widths, values) is handled without panicking.
//!
//! ```
//! use std::io::Write;
//! use std::sync::{Arc, Mutex};
//! use ember_bus::{Bus, BusKind};
//! use ember_devices::*;
//!
//! /// Collects serial output in memory.
//! #[derive(Clone, Default)]
//! struct Buf(Arc<Mutex<Vec<u8>>>);
//! impl Write for Buf {
//!     fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
//!         self.0.lock().unwrap().extend_from_slice(data);
//!         Ok(data.len())
//!     }
//!     fn flush(&mut self) -> std::io::Result<()> { Ok(()) }
//! }
//!
//! let pio = Bus::new(BusKind::Pio);
//! let out = Buf::default();
//! let serial = Serial::new(SerialOutput::Writer(Box::new(out.clone())), IrqLine::new()?)?;
//! pio.insert(COM1_PORT.into(), SERIAL_PORT_SIZE, Arc::new(serial))?;
//!
//! let exit = Arc::new(ExitSignal::new()?);
//! pio.insert(
//!     DEBUG_EXIT_PORT.into(),
//!     DEBUG_EXIT_PORT_SIZE,
//!     Arc::new(DebugExit::new(Arc::clone(&exit))),
//! )?;
//!
//! // What a vCPU does on `out 0x3f8, al` and then `out 0xf4, al`:
//! pio.write(COM1_PORT.into(), b"A")?;
//! pio.write(DEBUG_EXIT_PORT.into(), &[7])?;
//!
//! assert_eq!(*out.0.lock().unwrap(), b"A");
//! assert_eq!(exit.requested(), Some(ExitRequest::DebugExit(7)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Modules, one concept each: [`exit`] (how devices ask the VMM to end the VM),
//! [`irq`] (eventfd interrupt lines), [`serial`], [`i8042`], [`acpi_shutdown`],
//! [`debug_exit`], [`boot_done`] and [`error`].

#![deny(missing_docs)]

/// [`log::debug!`] for lines a guest can trigger at will: at most a few per call site
/// per window ([`ember_rate_limiter::log_limited!`]).
macro_rules! debug_limited {
    ($($arg:tt)+) => {
        ember_rate_limiter::log_limited!(ember_rate_limiter::log::Level::Debug, $($arg)+)
    };
}

/// [`log::trace!`], rate-limited like [`debug_limited!`].
macro_rules! trace_limited {
    ($($arg:tt)+) => {
        ember_rate_limiter::log_limited!(ember_rate_limiter::log::Level::Trace, $($arg)+)
    };
}

pub mod acpi_shutdown;
pub mod boot_done;
pub mod debug_exit;
pub mod error;
pub mod exit;
pub mod i8042;
pub mod irq;
mod output;
pub mod serial;

#[cfg(test)]
mod testutil;

pub use acpi_shutdown::{
    AcpiShutdown, ACPI_RESET_VALUE, ACPI_SHUTDOWN_PORT, ACPI_SHUTDOWN_PORT_SIZE, S5_SLEEP_TYPE,
};
pub use boot_done::{BootDone, BOOT_DONE_MAGIC, BOOT_DONE_PORT, BOOT_DONE_PORT_SIZE};
pub use debug_exit::{DebugExit, DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_SIZE};
pub use error::DeviceError;
pub use exit::{ExitRequest, ExitSignal};
pub use i8042::{
    I8042State, I8042, I8042_KEYBOARD_GSI, I8042_OUTPUT_BUFFER_SIZE, I8042_PORT, I8042_PORT_SIZE,
};
pub use irq::IrqLine;
pub use serial::{
    Serial, SerialOutput, SerialState, SerialStats, ThreadHook, COM1_GSI, COM1_PORT,
    DEFAULT_OUTPUT_BUFFER, SERIAL_FIFO_SIZE, SERIAL_PORT_SIZE,
};
/// The crates this crate's API uses (`BusDevice`, `Trigger`, the UART's error, `EventFd`),
/// so users get the matching versions.
pub use {ember_bus, vm_superio, vmm_sys_util};

/// The README's example, compiled and run as a doc test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

//! The error type shared by every device in this crate.

use std::io;
use std::path::PathBuf;

/// Errors from creating or driving a device.
///
/// Each variant names the operation that failed and, where there is one, the path or
/// value involved. Guest accesses never produce these: a device drops or logs what a
/// guest does wrong. They come from the VMM's own calls (construction, input, setup).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Creating or cloning an eventfd failed.
    #[error("failed to {op}")]
    EventFd {
        /// What was being done, e.g. "create the exit eventfd".
        op: &'static str,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// The file chosen for serial output could not be created or truncated.
    #[error("failed to open serial output file {}", path.display())]
    OpenSerialOutput {
        /// The path that could not be opened.
        path: PathBuf,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// Duplicating standard output for the serial port's writer thread failed (stdout
    /// closed, say).
    #[error("failed to duplicate stdout for the serial output")]
    DupStdout {
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// The serial port's output writer thread could not be started.
    #[error("failed to start the serial output's writer thread")]
    SpawnSerialOutput {
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// Queuing host input for the guest on the serial port failed (the interrupt could
    /// not be raised).
    #[error("failed to enqueue {len} input bytes on the serial port")]
    SerialInput {
        /// How many bytes were offered.
        len: usize,
        /// The error from the UART model.
        #[source]
        source: vm_superio::serial::Error<io::Error>,
    },
}

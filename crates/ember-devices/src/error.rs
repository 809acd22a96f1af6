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
    /// A saved serial state holds more pending input than the UART's FIFO.
    #[error("serial state holds {len} pending input bytes, more than the FIFO's {max}")]
    SerialStateInput {
        /// The bytes in the state.
        len: usize,
        /// The FIFO's size.
        max: usize,
    },
    /// Restoring the serial state failed (its pending interrupt could not be raised).
    #[error("failed to restore the serial state")]
    RestoreSerial {
        /// The error from the UART model.
        #[source]
        source: vm_superio::serial::Error<io::Error>,
    },
    /// A saved i8042 state has more bytes waiting than the output buffer holds.
    #[error("i8042 state holds {len} output bytes, more than the buffer's {max}")]
    I8042StateOutput {
        /// The bytes in the state.
        len: usize,
        /// The buffer's size.
        max: usize,
    },
    /// A saved i8042 state has a pending command that takes no parameter.
    #[error("i8042 state has command {command:#04x} pending, which takes no parameter")]
    I8042StatePendingCommand {
        /// The command.
        command: u8,
    },
    /// The i8042's output buffer has no room for the keys (the guest is not reading its
    /// keyboard).
    #[error("i8042 keyboard buffer full: {needed} bytes needed, {free} free")]
    KeyboardBufferFull {
        /// Bytes the keys need.
        needed: usize,
        /// Bytes free.
        free: usize,
    },
}

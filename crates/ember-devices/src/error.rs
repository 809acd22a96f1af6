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
    /// `KVM_CREATE_IRQCHIP` failed (for example because the VM already has one, or
    /// vCPUs were already created).
    #[error("KVM_CREATE_IRQCHIP failed")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_PIT2` failed (for example because the VM already has a PIT).
    #[error("KVM_CREATE_PIT2 with flags {flags:#x} failed")]
    CreatePit {
        /// The `kvm_pit_config.flags` passed.
        flags: u32,
        /// The error from KVM.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A virtio-blk backing file could not be opened or examined.
    #[error("failed to {op} disk image {}", path.display())]
    DiskImage {
        /// What was being done, e.g. "open" or "read the size of".
        op: &'static str,
        /// The backing file.
        path: PathBuf,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// A virtio-blk backing file's size is not a whole number of 512-byte sectors.
    #[error("disk image {} is {size} bytes, not a multiple of 512", path.display())]
    DiskSize {
        /// The backing file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// A tap interface name is empty, longer than 15 bytes or contains a NUL byte.
    #[error("invalid tap interface name {name:?}: it must be 1 to 15 bytes without NUL")]
    TapName {
        /// The name given.
        name: String,
    },
    /// Opening or configuring a tap interface failed.
    #[error("failed to {op} for tap interface {name}")]
    Tap {
        /// What was being done, e.g. "open /dev/net/tun" or "set TUNSETIFF".
        op: &'static str,
        /// The interface name.
        name: String,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
}

//! The error type of the virtio devices' construction and set-up.

use std::io;
use std::path::PathBuf;

/// Errors from creating a virtio device or its backend.
///
/// Each variant names the operation that failed and, where there is one, the path or
/// value involved. Guest requests never produce these: a device answers a bad request
/// with an error status. They come from the VMM's own calls.
#[derive(Debug, thiserror::Error)]
pub enum VirtioDeviceError {
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

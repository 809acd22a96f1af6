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
    /// A virtio-blk backing path is neither a regular file nor a block device.
    #[error("disk image {} is a {kind}: only regular files and block devices can back a disk", path.display())]
    DiskType {
        /// The path given.
        path: PathBuf,
        /// What it is instead, e.g. "directory", "FIFO" or "character device".
        kind: &'static str,
    },
    /// A virtio-blk backing file is locked by another open of it (another VMM, or this
    /// one): a read-write disk needs it unlocked, a read-only one needs no writer.
    #[error(
        "disk image {} is in use: {holder} holds a {held} lock on it, so it cannot be opened {wanted}",
        path.display()
    )]
    DiskLocked {
        /// The backing file.
        path: PathBuf,
        /// How it was to be opened: "read-write" or "read-only".
        wanted: &'static str,
        /// The conflicting lock: "write" or "read".
        held: &'static str,
        /// Who holds it, e.g. "process 1234 (ember)", or "another process".
        holder: String,
    },
    /// A virtio-blk serial is longer than `VIRTIO_BLK_ID_BYTES` (20).
    #[error("disk serial {serial:?} is {len} bytes; at most 20 are allowed")]
    DiskSerial {
        /// The serial given.
        serial: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A device's rate limiter settings were rejected, or its timer could not be
    /// created.
    #[error("rate limiter of {device}: {source}")]
    RateLimiter {
        /// Which device (and direction), e.g. "virtio-blk disk.img" or "virtio-net rx".
        device: String,
        /// What was wrong.
        #[source]
        source: ember_rate_limiter::RateLimiterError,
    },
    /// A tap interface name is empty, longer than 15 bytes or contains a NUL byte.
    #[error("invalid tap interface name {name:?}: it must be 1 to 15 bytes without NUL")]
    TapName {
        /// The name given.
        name: String,
    },
    /// Tap interface `name` does not exist. Ember opens existing taps only and never
    /// creates one, so it needs no `CAP_NET_ADMIN`.
    #[error(
        "tap '{name}' does not exist; create it with `ip tuntap add dev {name} mode tap vnet_hdr user USER` (as root, USER being who runs the VMM) and bring it up with `ip link set {name} up`"
    )]
    TapMissing {
        /// The interface name.
        name: String,
    },
    /// Interface `name` exists but is not a tap (a tun, or no tun/tap device at all).
    #[error("interface '{name}' is not a tap device: {what}")]
    NotTap {
        /// The interface name.
        name: String,
        /// What it is instead.
        what: String,
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

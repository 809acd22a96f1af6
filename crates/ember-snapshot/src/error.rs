//! The error type of every operation of this crate.

use std::io;
use std::path::PathBuf;

/// Why a state file could not be written, read or decoded.
///
/// Each variant names what was wrong and the values involved, so that a corrupt or
/// foreign file is reported precisely, never with a panic.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file system operation on `path` failed.
    #[error("failed to {op} {}", path.display())]
    Io {
        /// What was being done, e.g. "create the temporary state file".
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// The path to load is not a regular file (a directory, FIFO, device, ...).
    #[error("{} is not a regular file", path.display())]
    NotRegularFile {
        /// The path.
        path: PathBuf,
    },
    /// The bytes end before the container does: shorter than the fixed header and
    /// checksum, or than the payload length the header declares.
    #[error("state file truncated: {len} bytes, at least {needed} needed")]
    Truncated {
        /// How many bytes there are.
        len: u64,
        /// How many the container needs.
        needed: u64,
    },
    /// The first 8 bytes are not [`MAGIC`](crate::MAGIC): not an Ember state file.
    #[error("not an Ember state file: magic {found:02x?}, expected \"EMBERSNP\"")]
    BadMagic {
        /// The first 8 bytes found.
        found: [u8; 8],
    },
    /// The file's format version is not the one the caller reads.
    #[error(
        "state file format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        /// The version in the file.
        found: u32,
        /// The version the caller asked for.
        supported: u32,
    },
    /// There are bytes after the declared payload and its checksum.
    #[error("state file declares a {declared}-byte payload but holds {actual} bytes of payload")]
    LengthMismatch {
        /// The payload length in the header.
        declared: u64,
        /// The bytes between the header and the checksum.
        actual: u64,
    },
    /// The CRC-64 stored at the end does not match the bytes before it.
    #[error("state file checksum mismatch: stored {stored:#018x}, computed {computed:#018x}")]
    Checksum {
        /// The checksum in the file.
        stored: u64,
        /// The checksum of the file's bytes.
        computed: u64,
    },
    /// The payload is not a valid encoding of the requested state type.
    #[error("failed to decode the state: {0}")]
    Decode(String),
    /// The container would be (or the file is) larger than
    /// [`MAX_STATE_FILE_SIZE`](crate::MAX_STATE_FILE_SIZE).
    #[error("state of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The size found or needed.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The state could not be encoded (for example a sequence of unknown length).
    #[error("failed to encode the state: {0}")]
    Encode(String),
}

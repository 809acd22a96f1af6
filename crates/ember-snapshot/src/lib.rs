//! Versioned, checksummed state files for Ember VMM snapshots.
//!
//! A VMM gathers its vCPU, VM and device state into one serde value and writes it with
//! [`save`]; a new process reads it back with [`load`]. The file is a small container
//! ([`mod@format`]): the magic `EMBERSNP`, a format version the caller chooses, the payload
//! length, the payload ([postcard](https://docs.rs/postcard) encoding of the value) and a
//! CRC-64 of everything before it. A file that is truncated, corrupted, of another
//! version or not a state file at all is refused with a [`SnapshotError`] naming what
//! was wrong, before any decoding is attempted.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct State {
//!     vcpus: Vec<u64>,
//!     serial: Option<String>,
//! }
//!
//! let state = State { vcpus: vec![1, 2], serial: Some("ttyS0".into()) };
//! let bytes = ember_snapshot::encode(1, &state)?;
//! assert_eq!(ember_snapshot::decode::<State>(&bytes, 1)?, state);
//!
//! // Any change is caught by the checksum (or an earlier check).
//! let mut corrupt = bytes.clone();
//! corrupt[21] ^= 0x10;
//! assert!(ember_snapshot::decode::<State>(&corrupt, 1).is_err());
//! # Ok::<(), ember_snapshot::SnapshotError>(())
//! ```
//!
//! Decoding hostile bytes is safe: no panic, and no allocation beyond what the input
//! can back. Past the checksum, postcard reads lengths as varints and takes strings
//! and byte arrays only from the bytes present, and serde preallocates at most 1 MiB for
//! a sequence whatever length it declares. State types must not be recursive (no depth
//! limit) and must not hold sequences of zero-sized elements (a declared length of
//! 2^60 of those would be iterated).
//!
//! Modules, one concept each: [`mod@format`] (the byte layout), [`mod@file`] (files on disk)
//! and [`error`].

#![deny(missing_docs)]

pub mod error;
pub mod file;
pub mod format;

pub use error::SnapshotError;
pub use file::{load, save};
pub use format::{
    checksum, frame, unframe, CHECKSUM_LEN, HEADER_LEN, MAGIC, MAX_STATE_FILE_SIZE, MIN_LEN,
};
/// The serialization crates this crate's API uses.
pub use {postcard, serde};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Encodes `state` (postcard) in a container of format `version`.
///
/// Fails with [`SnapshotError::Encode`] if postcard cannot encode the value, and
/// [`SnapshotError::TooLarge`] if the container would exceed [`MAX_STATE_FILE_SIZE`].
///
/// ```
/// let bytes = ember_snapshot::encode(2, &vec![1u8, 2, 3])?;
/// assert_eq!(&bytes[..8], b"EMBERSNP");
/// assert_eq!(bytes.len(), ember_snapshot::MIN_LEN + 4); // length byte + 3 bytes
/// # Ok::<(), ember_snapshot::SnapshotError>(())
/// ```
pub fn encode<T: Serialize>(version: u32, state: &T) -> Result<Vec<u8>, SnapshotError> {
    let payload = postcard::to_allocvec(state).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    frame(version, &payload)
}

/// Checks a container of format `version` ([`unframe`]'s checks, in order: length,
/// magic, version, declared length, checksum) and decodes its payload as a `T`.
///
/// The payload must be exactly one `T`: bytes left over are a
/// [`SnapshotError::Decode`] error, like any invalid encoding.
///
/// ```
/// use ember_snapshot::{decode, encode, SnapshotError};
/// let bytes = encode(1, &(1u16, true))?;
/// assert_eq!(decode::<(u16, bool)>(&bytes, 1)?, (1, true));
/// assert!(matches!(decode::<(u16, bool)>(&bytes[..10], 1), Err(SnapshotError::Truncated { .. })));
/// # Ok::<(), SnapshotError>(())
/// ```
pub fn decode<T: DeserializeOwned>(bytes: &[u8], version: u32) -> Result<T, SnapshotError> {
    let payload = unframe(bytes, version)?;
    let (state, rest) =
        postcard::take_from_bytes(payload).map_err(|e| SnapshotError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(SnapshotError::Decode(format!(
            "{} bytes left over after the state ({} of {} payload bytes used)",
            rest.len(),
            payload.len() - rest.len(),
            payload.len()
        )));
    }
    Ok(state)
}

/// The README's example, compiled and run as a doc test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests;

//! The container's byte layout: a fixed header, the payload and a CRC-64.
//!
//! ```text
//! offset          size  field
//! 0               8     magic, b"EMBERSNP"
//! 8               4     format version, u32 little endian
//! 12              8     payload length N, u64 little endian
//! 20              N     payload (postcard encoding of the state)
//! 20 + N          8     CRC-64/ECMA-182 of bytes 0 .. 20 + N, u64 little endian
//! ```
//!
//! [`frame`] builds a container around a payload; [`unframe`] checks one and returns
//! its payload. Neither knows about serde: [`crate::encode`] and [`crate::decode`] add
//! the postcard step.

use crate::SnapshotError;

/// The first 8 bytes of every state file.
pub const MAGIC: [u8; 8] = *b"EMBERSNP";
/// Bytes before the payload: magic, version, payload length.
pub const HEADER_LEN: usize = 8 + 4 + 8;
/// Bytes after the payload: the CRC-64.
pub const CHECKSUM_LEN: usize = 8;
/// The smallest container (an empty payload).
pub const MIN_LEN: usize = HEADER_LEN + CHECKSUM_LEN;
/// The largest container [`frame`], [`unframe`] and [`crate::load`] accept: 64 MiB.
/// A VMM's device and vCPU state is a few hundred KiB at most; guest memory is never in
/// the state file.
pub const MAX_STATE_FILE_SIZE: u64 = 64 << 20;

const VERSION_OFFSET: usize = 8;
const LENGTH_OFFSET: usize = 12;

/// The checksum algorithm: CRC-64/ECMA-182 (the one Firecracker's snapshots use).
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182);

/// The CRC-64/ECMA-182 of `bytes`, as stored in the container's last 8 bytes.
///
/// ```
/// // The catalogue's check value.
/// assert_eq!(ember_snapshot::checksum(b"123456789"), 0x6c40_df5f_0b49_7347);
/// ```
pub fn checksum(bytes: &[u8]) -> u64 {
    CRC64.checksum(bytes)
}

/// Wraps `payload` in a container of format `version`.
///
/// Fails with [`SnapshotError::TooLarge`] if the container would exceed
/// [`MAX_STATE_FILE_SIZE`].
///
/// ```
/// let file = ember_snapshot::frame(3, b"state")?;
/// assert_eq!(&file[..8], b"EMBERSNP");
/// assert_eq!(ember_snapshot::unframe(&file, 3)?, b"state");
/// # Ok::<(), ember_snapshot::SnapshotError>(())
/// ```
pub fn frame(version: u32, payload: &[u8]) -> Result<Vec<u8>, SnapshotError> {
    let size = (payload.len() as u64).saturating_add(MIN_LEN as u64);
    if size > MAX_STATE_FILE_SIZE {
        return Err(SnapshotError::TooLarge {
            size,
            max: MAX_STATE_FILE_SIZE,
        });
    }
    let mut out = Vec::with_capacity(payload.len() + MIN_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Checks a container of format `version` and returns its payload.
///
/// The checks, in order: size ([`TooLarge`](SnapshotError::TooLarge), or
/// [`Truncated`](SnapshotError::Truncated) below [`MIN_LEN`]), magic
/// ([`BadMagic`](SnapshotError::BadMagic)), version
/// ([`UnsupportedVersion`](SnapshotError::UnsupportedVersion)), declared payload length
/// against the bytes present ([`Truncated`](SnapshotError::Truncated) when fewer,
/// [`LengthMismatch`](SnapshotError::LengthMismatch) when more), and the CRC-64
/// ([`Checksum`](SnapshotError::Checksum)).
///
/// ```
/// use ember_snapshot::{frame, unframe, SnapshotError};
/// let file = frame(1, b"abc")?;
/// assert!(matches!(
///     unframe(&file, 2),
///     Err(SnapshotError::UnsupportedVersion { found: 1, supported: 2 })
/// ));
/// # Ok::<(), SnapshotError>(())
/// ```
pub fn unframe(bytes: &[u8], version: u32) -> Result<&[u8], SnapshotError> {
    let len = bytes.len() as u64;
    if len > MAX_STATE_FILE_SIZE {
        return Err(SnapshotError::TooLarge {
            size: len,
            max: MAX_STATE_FILE_SIZE,
        });
    }
    let truncated = SnapshotError::Truncated {
        len,
        needed: MIN_LEN as u64,
    };
    if bytes.len() < MIN_LEN {
        return Err(truncated);
    }
    let (Some(magic), Some(found_version), Some(declared)) = (
        field::<8>(bytes, 0),
        field::<4>(bytes, VERSION_OFFSET),
        field::<8>(bytes, LENGTH_OFFSET),
    ) else {
        return Err(truncated);
    };
    if magic != MAGIC {
        return Err(SnapshotError::BadMagic { found: magic });
    }
    let found_version = u32::from_le_bytes(found_version);
    if found_version != version {
        return Err(SnapshotError::UnsupportedVersion {
            found: found_version,
            supported: version,
        });
    }
    let declared = u64::from_le_bytes(declared);
    let actual = len - MIN_LEN as u64;
    if declared > actual {
        return Err(SnapshotError::Truncated {
            len,
            needed: declared.saturating_add(MIN_LEN as u64),
        });
    }
    if declared < actual {
        return Err(SnapshotError::LengthMismatch { declared, actual });
    }
    let crc_offset = bytes.len() - CHECKSUM_LEN;
    let (Some(covered), Some(stored)) = (bytes.get(..crc_offset), field::<8>(bytes, crc_offset))
    else {
        // Unreachable: the length was checked above.
        return Err(truncated);
    };
    let stored = u64::from_le_bytes(stored);
    let computed = checksum(covered);
    if stored != computed {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    covered.get(HEADER_LEN..).ok_or(truncated)
}

/// The `N` bytes of `bytes` at `offset`, if there are that many.
fn field<const N: usize>(bytes: &[u8], offset: usize) -> Option<[u8; N]> {
    bytes
        .get(offset..offset.checked_add(N)?)
        .and_then(|s| s.try_into().ok())
}

//! Checked writes into guest memory, and the error they fail with.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// Why a table could not be written to guest memory.
///
/// The whole range is checked before anything is written, so
/// [`OutsideGuestMemory`](Self::OutsideGuestMemory) means nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum GuestWriteError {
    /// The tables do not lie entirely inside guest memory.
    #[error("{what} at {addr:#x} (size {len:#x}) does not fit in guest memory")]
    OutsideGuestMemory {
        /// What was to be written ("ACPI tables", "MP table").
        what: &'static str,
        /// Guest physical start address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Guest memory rejected a write to a range that was checked to lie in it.
    #[error("failed to write {len:#x} bytes to guest memory at {addr:#x}")]
    Write {
        /// Guest physical start address.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// The underlying guest memory error.
        #[source]
        source: GuestMemoryError,
    },
}

/// Writes all of `buf` at `addr`, after checking that the whole range lies in
/// writable guest memory, so that a failing write never writes part of `buf`.
pub(crate) fn write_bytes<M: GuestMemory>(
    mem: &M,
    what: &'static str,
    buf: &[u8],
    addr: u64,
) -> Result<(), GuestWriteError> {
    let len = buf.len() as u64;
    let fits = addr.checked_add(len).is_some()
        && mem.check_range(GuestAddress(addr), buf.len(), Permissions::Write);
    if !fits {
        return Err(GuestWriteError::OutsideGuestMemory { what, addr, len });
    }
    mem.write_slice(buf, GuestAddress(addr))
        .map_err(|source| GuestWriteError::Write { addr, len, source })
}

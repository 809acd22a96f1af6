//! Checked writes into guest memory: the whole range is checked before anything is
//! written, so a write that fails has written nothing. What loaders and firmware-table
//! writers (`ember-boot`, `ember-firmware`) put into guest memory goes through here.
//!
//! ```
//! use ember_memory::checked_write::{write_bytes, GuestWriteError};
//! use ember_memory::vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
//! write_bytes(&mem, "a table", b"hello", 0x100)?;
//! // Runs past the end: refused, and nothing of it was written.
//! let err = write_bytes(&mem, "a table", &[1; 16], 0xff8).unwrap_err();
//! assert!(matches!(err, GuestWriteError::OutsideGuestMemory { addr: 0xff8, len: 16, .. }));
//! # Ok::<(), GuestWriteError>(())
//! ```

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// Why a range of guest memory could not be written.
///
/// Every function here checks the whole range it is about to write first, so
/// [`OutsideGuestMemory`](Self::OutsideGuestMemory) means nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum GuestWriteError {
    /// A range to be written (or pointed at) is not inside writable guest memory.
    #[error("{what} at {addr:#x} (size {len:#x}) does not fit in guest memory")]
    OutsideGuestMemory {
        /// What was to be written ("initrd", "zero page", "ACPI tables", ...).
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

/// Returns whether `[addr, addr + len)` lies entirely in writable guest memory.
///
/// An empty range is trivially accepted: there is nothing to write.
pub fn range_in_memory<M: GuestMemory>(mem: &M, addr: u64, len: u64) -> bool {
    if len == 0 {
        return true;
    }
    if addr.checked_add(len).is_none() {
        return false;
    }
    match usize::try_from(len) {
        Ok(count) => mem.check_range(GuestAddress(addr), count, Permissions::Write),
        Err(_) => false,
    }
}

/// `Ok` if `[addr, addr + len)` lies in guest memory, otherwise
/// [`GuestWriteError::OutsideGuestMemory`] naming `what`.
pub fn check_range<M: GuestMemory>(
    mem: &M,
    what: &'static str,
    addr: u64,
    len: u64,
) -> Result<(), GuestWriteError> {
    if range_in_memory(mem, addr, len) {
        Ok(())
    } else {
        Err(GuestWriteError::OutsideGuestMemory { what, addr, len })
    }
}

/// Writes all of `buf` at `addr`.
///
/// Checks the whole range first so that a failing write never writes part
/// of `buf`.
pub fn write_bytes<M: GuestMemory>(
    mem: &M,
    what: &'static str,
    buf: &[u8],
    addr: u64,
) -> Result<(), GuestWriteError> {
    let len = buf.len() as u64;
    check_range(mem, what, addr, len)?;
    mem.write_slice(buf, GuestAddress(addr))
        .map_err(|source| GuestWriteError::Write { addr, len, source })
}

/// Writes `len` zero bytes at `addr`, a page at a time (no allocation sized
/// by `len`).
pub fn write_zeros<M: GuestMemory>(
    mem: &M,
    what: &'static str,
    addr: u64,
    len: u64,
) -> Result<(), GuestWriteError> {
    const ZEROS: [u8; 4096] = [0; 4096];
    check_range(mem, what, addr, len)?;
    let mut done = 0u64;
    while done < len {
        let chunk = (len - done).min(ZEROS.len() as u64);
        // `chunk` is at most 4096, so the `get` always succeeds.
        let buf = ZEROS.get(..chunk as usize).unwrap_or(&ZEROS);
        // Cannot overflow: `check_range` checked `addr + len`.
        let at = addr + done;
        mem.write_slice(buf, GuestAddress(at))
            .map_err(|source| GuestWriteError::Write {
                addr: at,
                len: chunk,
                source,
            })?;
        done += chunk;
    }
    Ok(())
}

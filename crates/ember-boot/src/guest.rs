//! Checked writes into guest memory, shared by the loaders and configurators, and the
//! error they fail with.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// Why a range of guest memory could not be written.
///
/// Every loader and configurator checks the whole range it is about to write first, so
/// [`OutsideGuestMemory`](Self::OutsideGuestMemory) means nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum GuestWriteError {
    /// A range the loader must write (or point the guest at) is not inside guest
    /// memory.
    #[error("{what} at {addr:#x} (size {len:#x}) does not fit in guest memory")]
    OutsideGuestMemory {
        /// What was to be written ("initrd", "zero page", ...).
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
pub(crate) fn range_in_memory<M: GuestMemory>(mem: &M, addr: u64, len: u64) -> bool {
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
pub(crate) fn check_range<M: GuestMemory>(
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
pub(crate) fn write_bytes<M: GuestMemory>(
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
pub(crate) fn write_zeros<M: GuestMemory>(
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

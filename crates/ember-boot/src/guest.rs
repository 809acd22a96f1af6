//! Checked writes into guest memory, shared by the loaders.

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::BootError;

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

/// Writes all of `buf` at `addr`.
///
/// Checks the whole range first so that a failing write never writes part
/// of `buf`.
pub(crate) fn write_bytes<M: GuestMemory>(
    mem: &M,
    what: &'static str,
    buf: &[u8],
    addr: u64,
) -> Result<(), BootError> {
    let len = buf.len() as u64;
    if !range_in_memory(mem, addr, len) {
        return Err(BootError::OutsideGuestMemory { what, addr, len });
    }
    mem.write_slice(buf, GuestAddress(addr))
        .map_err(|source| BootError::GuestMemoryWrite { addr, len, source })
}

/// Writes `len` zero bytes at `addr`, a page at a time (no allocation sized
/// by `len`).
pub(crate) fn write_zeros<M: GuestMemory>(
    mem: &M,
    what: &'static str,
    addr: u64,
    len: u64,
) -> Result<(), BootError> {
    const ZEROS: [u8; 4096] = [0; 4096];
    if !range_in_memory(mem, addr, len) {
        return Err(BootError::OutsideGuestMemory { what, addr, len });
    }
    let mut done = 0u64;
    while done < len {
        let chunk = (len - done).min(ZEROS.len() as u64);
        // `chunk` is at most 4096, so the `get` always succeeds.
        let buf = ZEROS.get(..chunk as usize).unwrap_or(&ZEROS);
        // Cannot overflow: `range_in_memory` checked `addr + len`.
        let at = addr + done;
        mem.write_slice(buf, GuestAddress(at))
            .map_err(|source| BootError::GuestMemoryWrite {
                addr: at,
                len: chunk,
                source,
            })?;
        done += chunk;
    }
    Ok(())
}

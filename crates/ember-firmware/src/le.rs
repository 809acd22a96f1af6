//! Fixed-offset writes into packed little-endian tables, and their byte checksum.

/// Copies `src` to `off`; does nothing if that is out of bounds.
///
/// Callers use offsets and sizes that are constants within the fixed table sizes, so
/// the out-of-bounds case is never taken; it exists so that no index can panic.
pub(crate) fn put(buf: &mut [u8], off: usize, src: &[u8]) {
    let end = off.saturating_add(src.len());
    if let Some(dst) = buf.get_mut(off..end) {
        dst.copy_from_slice(src);
    }
}

/// The byte that makes `bytes` plus it sum to 0 mod 256: the checksum both ACPI tables
/// and the MP table carry.
pub(crate) fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b)))
}

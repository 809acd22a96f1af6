//! Fixed-offset writes into packed little-endian tables.

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

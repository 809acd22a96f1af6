//! Fixed-offset byte access for packed little-endian structures.
//!
//! Callers use offsets that are compile-time constants checked to be in
//! bounds (see the assertions in `zero_page.rs`), so the out-of-bounds
//! fallbacks below are never taken; they exist so that no index can panic.

/// Returns the `N` bytes at `off`, or zeros if they are out of bounds.
pub(crate) fn get<const N: usize>(buf: &[u8], off: usize) -> [u8; N] {
    buf.get(off..)
        .and_then(<[u8]>::first_chunk::<N>)
        .copied()
        .unwrap_or([0; N])
}

/// Copies `src` to `off`; does nothing if that is out of bounds.
pub(crate) fn put(buf: &mut [u8], off: usize, src: &[u8]) {
    let end = off.saturating_add(src.len());
    if let Some(dst) = buf.get_mut(off..end) {
        dst.copy_from_slice(src);
    }
}

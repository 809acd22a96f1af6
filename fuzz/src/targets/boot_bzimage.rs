//! bzImage parsing and loading ([`ember_boot::parse_bzimage`],
//! [`ember_boot::load_bzimage`]) from raw bytes into a small guest memory (12 MiB at 0,
//! 4 MiB at 16 MiB), then the zero page ([`ember_boot::configure_bzimage_boot`]) and an
//! initrd below the kernel's `initrd_addr_max` ([`ember_boot::initrd::load_initrd_below`]).
//!
//! Checked: accessors agree with the image; a rejected load leaves guest memory
//! untouched; a load puts the protected-mode kernel at 1 MiB with its entry at
//! `+0x200`, a runtime start in memory at or above 1 MiB, and an end past both; the
//! zero page carries the image's setup header; the initrd lands between the kernel's
//! end and its limit; an image of another length is refused.

use ember_arch::layout::{HIMEM_START, ZERO_PAGE_SIZE};
use ember_boot::initrd::load_initrd_below;
use ember_boot::zero_page::{BOOT_FLAG_MAGIC, HEADER_MAGIC};
use ember_boot::{configure_bzimage_boot, load_bzimage, parse_bzimage, BootParams, Cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::common::{any_page_written, tracked_memory};

/// Guest memory: `(start, len)` regions.
pub const MEMORY: [(u64, u64); 2] = [(0, 12 << 20), (16 << 20, 4 << 20)];

/// The harness: `data` is the image.
pub fn run(data: &[u8]) {
    let Ok(bz) = parse_bzimage(data) else {
        return;
    };
    assert_eq!(bz.kernel_offset() + bz.kernel_len(), data.len());
    assert!(bz.kernel_len() > 0x200);
    assert!(bz.setup_header().len() <= 0x290 - 0x1f1);
    assert_eq!(
        bz.setup_header(),
        &data[0x1f1..0x1f1 + bz.setup_header().len()]
    );

    let mem = tracked_memory(&MEMORY);
    if data.len() > 1 {
        let short = &data[..data.len() - 1];
        assert!(
            load_bzimage(&mem, &bz, short).is_err(),
            "image of another length loaded"
        );
        assert!(!any_page_written(&mem));
    }
    let load = match load_bzimage(&mem, &bz, data) {
        Ok(load) => load,
        Err(e) => {
            assert!(
                !any_page_written(&mem),
                "rejected bzImage ({e}) wrote guest memory"
            );
            return;
        }
    };
    assert_eq!(load.start, GuestAddress(HIMEM_START));
    assert_eq!(load.entry.0, HIMEM_START + 0x200);
    assert!(load.runtime_start.0 >= HIMEM_START, "{load:?}");
    assert!(
        load.end.0 >= HIMEM_START + bz.kernel_len() as u64,
        "{load:?}"
    );
    assert!(
        load.end.0 >= load.runtime_start.0 + u64::from(bz.init_size()),
        "{load:?}"
    );
    assert!(mem.address_in_range(load.runtime_start), "{load:?}");
    let mut kernel_start = [0u8; 16];
    let n = kernel_start.len().min(bz.kernel_len());
    mem.read_slice(&mut kernel_start[..n], load.start)
        .expect("kernel in memory");
    assert_eq!(
        kernel_start[..n],
        data[bz.kernel_offset()..bz.kernel_offset() + n]
    );

    let mut cmdline = Cmdline::default();
    cmdline
        .insert_str("console=ttyS0 panic=1")
        .expect("cmdline");
    let Ok(zero_page) = configure_bzimage_boot(&mem, &bz, &cmdline, None) else {
        return;
    };
    let mut page = [0u8; ZERO_PAGE_SIZE];
    mem.read_slice(&mut page, zero_page).expect("zero page");
    let params = BootParams::from_bytes(page);
    assert_eq!(params.boot_flag(), BOOT_FLAG_MAGIC);
    assert_eq!(params.header(), HEADER_MAGIC);

    let initrd = [0x5au8; 3000];
    let max = bz.initrd_addr_max();
    if let Ok(at) = load_initrd_below(&mem, zero_page, &initrd, load.end, max) {
        assert!(
            at.0 >= load.end.0,
            "initrd at {at:?} below the kernel end {load:?}"
        );
        assert!(
            at.0 + initrd.len() as u64 - 1 <= max,
            "initrd at {at:?} above {max:#x}"
        );
        let mut page = [0u8; ZERO_PAGE_SIZE];
        mem.read_slice(&mut page, zero_page).expect("zero page");
        let params = BootParams::from_bytes(page);
        assert_eq!(params.ramdisk_image(), at.0);
        assert_eq!(params.ramdisk_size() as usize, initrd.len());
    }
}

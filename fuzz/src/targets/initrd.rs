//! Initrd placement ([`ember_boot::initrd::place_initrd`],
//! [`ember_boot::initrd::load_initrd_below`], [`ember_boot::initrd::copy_initrd`]) in guest
//! memories of up to six regions at any (even unaligned) addresses, with any size,
//! lower bound, upper limit and zero-page address.
//!
//! Checked: a placement is page aligned, at or above the lower bound, ends at or below
//! the limit and lies inside one region; a failed load writes nothing; a load writes
//! the image there and records it in the zero page.

use ember_arch::layout::ZERO_PAGE_SIZE;
use ember_boot::e820::E820_MAX_ENTRIES;
use ember_boot::initrd::{copy_initrd, load_initrd_below, place_initrd, DEFAULT_INITRD_ADDR_MAX};
use ember_boot::{configure_linux_boot, e820_map, BootParams, Cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::common::{any_page_written, tracked_memory};
use crate::{decode, input_struct};

input_struct! {
    /// Regions, then the size, lower bound and limit (each with a selector, see
    /// [`run`]), the zero page's address, and `op % 4`: place, load with a zero page,
    /// copy, or build the e820 map and zero page of the memory.
    pub struct InitrdInput {
        pub regions: Vec<Region>,
        pub size_kind: u8,
        pub size: u64,
        pub lowest_kind: u8,
        pub lowest: u64,
        pub max_kind: u8,
        pub addr_max: u64,
        pub zero_page: u32,
        pub op: u8,
    }
}

input_struct! {
    /// A region `gap * 256` bytes (or, with bit 15 set, at the next 4 GiB boundary)
    /// after the previous one, `(pages % 512 + 1) * 4 KiB - tail` long.
    pub struct Region {
        pub gap: u16,
        pub pages: u16,
        pub tail: u8,
    }
}

/// The harness.
pub fn run(data: &[u8]) {
    let Some(input) = decode::<InitrdInput>(data) else {
        return;
    };
    let mut ranges = Vec::new();
    let mut at = 0u64;
    for r in input.regions.iter().take(6) {
        at = if r.gap & 0x8000 != 0 {
            (at | 0xffff_ffff) + 1
        } else {
            at + u64::from(r.gap) * 256
        };
        let len = (u64::from(r.pages % 512) + 1) * 4096 - u64::from(r.tail);
        ranges.push((at, len));
        at += len;
    }
    if ranges.is_empty() {
        ranges.push((0, 1 << 20));
    }
    let end = at.max(1 << 20);
    let size = match input.size_kind % 4 {
        0 => input.size % 0x1_0000,
        1 => input.size % (end + 0x2000),
        2 => input.size,
        _ => u64::from(u32::MAX) - 1 + input.size % 3,
    };
    let lowest = match input.lowest_kind % 3 {
        0 => 0,
        1 => input.lowest % end,
        _ => input.lowest,
    };
    let addr_max = match input.max_kind % 4 {
        0 => u64::MAX,
        1 => input.addr_max % (end + 0x1000),
        2 => input.addr_max,
        _ => DEFAULT_INITRD_ADDR_MAX,
    };
    let mem = tracked_memory(&ranges);

    let check = |addr: GuestAddress| {
        assert_eq!(addr.0 % 4096, 0, "unaligned initrd at {addr:?}");
        assert!(addr.0 >= lowest, "initrd at {addr:?} below {lowest:#x}");
        let last = addr.0.checked_add(size - 1).expect("initrd end overflows");
        assert!(
            last <= addr_max,
            "initrd ends at {last:#x} above {addr_max:#x}"
        );
        let region = mem.find_region(addr).expect("initrd outside memory");
        assert!(
            last < region.start_addr().0 + region.len(),
            "initrd at {addr:?} + {size:#x} leaves its region"
        );
    };

    match input.op % 4 {
        3 => {
            let map = e820_map(&mem);
            match configure_linux_boot(&mem, &Cmdline::default(), None) {
                Ok(zero_page) => {
                    let map = map.expect("boot configured without an e820 map");
                    assert!(!map.is_empty() && map.len() <= E820_MAX_ENTRIES);
                    for pair in map.windows(2) {
                        assert!(
                            pair[0].addr + pair[0].size <= pair[1].addr,
                            "e820 entries overlap or are unsorted: {map:?}"
                        );
                    }
                    let mut page = [0u8; ZERO_PAGE_SIZE];
                    mem.read_slice(&mut page, zero_page).expect("zero page");
                    assert_eq!(BootParams::from_bytes(page).e820_table(), map);
                }
                Err(e) => assert!(
                    !any_page_written(&mem),
                    "failed boot set-up ({e}) wrote memory"
                ),
            }
        }
        0 => {
            if let Ok(addr) = place_initrd(&mem, size, lowest, addr_max) {
                check(addr);
            }
        }
        op => {
            if size > 0x1_0000 {
                return;
            }
            let image: Vec<u8> = (0..size).map(|i| i as u8 ^ 0xa5).collect();
            if op == 1 {
                let zero_page = GuestAddress(u64::from(input.zero_page) % (end + 0x1000));
                match load_initrd_below(&mem, zero_page, &image, GuestAddress(lowest), addr_max) {
                    Ok(addr) => {
                        check(addr);
                        let mut page = [0u8; ZERO_PAGE_SIZE];
                        mem.read_slice(&mut page, zero_page).expect("zero page");
                        let params = BootParams::from_bytes(page);
                        assert_eq!(params.ramdisk_image(), addr.0);
                        assert_eq!(u64::from(params.ramdisk_size()), size);
                        let overlaps = addr.0 < zero_page.0 + ZERO_PAGE_SIZE as u64
                            && zero_page.0 < addr.0 + size;
                        if !overlaps {
                            let mut back = vec![0u8; image.len()];
                            mem.read_slice(&mut back, addr).expect("initrd");
                            assert!(back == image, "initrd bytes");
                        }
                    }
                    Err(e) => assert!(!any_page_written(&mem), "failed load ({e}) wrote memory"),
                }
            } else {
                match copy_initrd(&mem, &image, GuestAddress(lowest), addr_max) {
                    Ok(addr) => {
                        check(addr);
                        let mut back = vec![0u8; image.len()];
                        mem.read_slice(&mut back, addr).expect("initrd");
                        assert!(back == image, "initrd bytes");
                    }
                    Err(e) => assert!(!any_page_written(&mem), "failed copy ({e}) wrote memory"),
                }
            }
        }
    }
}

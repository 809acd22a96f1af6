//! Host memory backing the guest's RAM, built on vm-memory.

use std::io;

use vm_memory::bitmap::{Bitmap, NewBitmap};
use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{Address, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::{MemoryError, MemoryLayout, MIB};

/// Size of the huge pages used by [`HugePages::HugeTlbfs`].
pub const HUGE_PAGE_SIZE: u64 = 2 * MIB;

/// `MAP_HUGE_2MB` from `<linux/mman.h>` (21 = log2(2 MiB), shifted by `MAP_HUGE_SHIFT`).
/// Spelled out because libc only exports it for some targets. Without it the kernel would
/// use the host's default huge page size, which may be 1 GiB.
const MAP_HUGE_2MB: libc::c_int = 21 << 26;

/// Where the host pool of 2 MiB huge pages is accounted.
const HUGEPAGES_2M_SYSFS: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// How guest RAM is backed on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugePages {
    /// Ordinary 4 KiB pages.
    #[default]
    None,
    /// Ordinary pages with `madvise(MADV_HUGEPAGE)`, so the kernel may back them with
    /// transparent huge pages. Fails if the host kernel has no THP support.
    Transparent,
    /// `MAP_HUGETLB` with 2 MiB pages from the host's preallocated pool. The RAM size must
    /// be a multiple of 2 MiB, and creation fails up front if the pool is too small.
    HugeTlbfs,
}

/// Allocates host memory for every RAM region in `layout`, without dirty-page tracking.
///
/// This is [`create_guest_memory_with_bitmap`] with the bitmap `()`, so that the result
/// has one type whatever the call site does with it (as `HashMap::new` is
/// `HashMap::with_hasher` with the default hasher).
///
/// Mappings are anonymous and private. With [`HugePages::None`] and
/// [`HugePages::Transparent`] they are `MAP_NORESERVE`, so untouched guest RAM costs no
/// host memory. [`HugePages::HugeTlbfs`] mappings do reserve their pages: an unreserved
/// hugetlb mapping would kill the VMM with `SIGBUS` on first touch if the pool ran dry,
/// instead of failing here.
///
/// Every region is `madvise(MADV_DONTDUMP)`: a core dump of the VMM leaves guest RAM
/// out (it would be as large as the guest, and holds the guest's secrets); smaps shows
/// the mapping's `VmFlags` with `dd`.
///
/// # Example
///
/// ```
/// use ember_memory::{create_guest_memory, HugePages, MemoryLayout, MIB};
/// use ember_memory::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
///
/// let layout = MemoryLayout::new(64 * MIB)?;
/// let mem = create_guest_memory(&layout, HugePages::None)?;
/// assert_eq!(mem.num_regions(), 1);
///
/// mem.write_obj(0x1234_5678u32, GuestAddress(0x1000))?;
/// assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000))?, 0x1234_5678);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn create_guest_memory(
    layout: &MemoryLayout,
    huge_pages: HugePages,
) -> Result<GuestMemoryMmap, MemoryError> {
    create_guest_memory_with_bitmap(layout, huge_pages)
}

/// Allocates host memory for every RAM region in `layout`, each region with a dirty
/// bitmap `B` sized for it: `()` for none, `vm_memory::bitmap::AtomicBitmap` to record
/// every page written through vm-memory (by the VMM, by virtio devices) for snapshots
/// and live migration. Writes the guest makes itself are KVM's dirty log, not this.
///
/// Otherwise as [`create_guest_memory`].
///
/// # Example
///
/// ```
/// use ember_memory::vm_memory::bitmap::{AtomicBitmap, Bitmap};
/// use ember_memory::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
/// use ember_memory::{create_guest_memory_with_bitmap, HugePages, MemoryLayout, MIB};
///
/// let layout = MemoryLayout::new(64 * MIB)?;
/// let mem = create_guest_memory_with_bitmap::<AtomicBitmap>(&layout, HugePages::None)?;
/// mem.write_obj(1u8, GuestAddress(0x5000))?;
///
/// let ram = mem.find_region(GuestAddress(0)).unwrap();
/// assert!(ram.bitmap().dirty_at(0x5000));
/// assert!(!ram.bitmap().dirty_at(0x6000));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn create_guest_memory_with_bitmap<B: NewBitmap>(
    layout: &MemoryLayout,
    huge_pages: HugePages,
) -> Result<GuestMemoryMmap<B>, MemoryError> {
    if huge_pages == HugePages::HugeTlbfs {
        check_huge_page_pool(layout.ram_size())?;
    }

    let mut regions = Vec::with_capacity(layout.ram_regions().len());
    for &(addr, size) in layout.ram_regions() {
        let mapping = map_region(addr, size, huge_pages)?;
        advise(&mapping, addr, size, libc::MADV_DONTDUMP, "MADV_DONTDUMP")?;
        if huge_pages == HugePages::Transparent {
            advise(&mapping, addr, size, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")?;
        }
        let region = GuestRegionMmap::new(mapping, addr).ok_or(MemoryError::RangeOverflow {
            addr: addr.raw_value(),
            size,
        })?;
        regions.push(region);
    }
    log::debug!(
        "created {:#x} bytes of guest memory in {} region(s), huge pages: {huge_pages:?}",
        layout.ram_size(),
        regions.len()
    );
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

/// Maps `size` bytes of host memory for the guest region at `addr`.
fn map_region<B: NewBitmap>(
    addr: GuestAddress,
    size: u64,
    huge_pages: HugePages,
) -> Result<MmapRegion<B>, MemoryError> {
    let hugetlb = huge_pages == HugePages::HugeTlbfs;
    let mut flags = libc::MAP_ANONYMOUS | libc::MAP_PRIVATE;
    if hugetlb {
        flags |= libc::MAP_HUGETLB | MAP_HUGE_2MB;
    } else {
        flags |= libc::MAP_NORESERVE;
    }
    // vm-memory only builds for 64-bit targets, so u64 -> usize is lossless.
    let size_bytes = size as usize;
    // `with_len`, not `default`: a default `AtomicBitmap` covers no pages at all.
    MmapRegionBuilder::new_with_bitmap(size_bytes, B::with_len(size_bytes))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .with_hugetlbfs(hugetlb)
        .build()
        .map_err(|source| match source {
            // The pool shrank (or another process reserved pages) since the pre-check.
            MmapRegionError::Mmap(ref e) if hugetlb && e.raw_os_error() == Some(libc::ENOMEM) => {
                MemoryError::HugePagesUnavailable {
                    needed: size / HUGE_PAGE_SIZE,
                    available: available_huge_pages(),
                }
            }
            source => MemoryError::Mmap {
                addr: addr.raw_value(),
                size,
                source,
            },
        })
}

/// `madvise(advice)` on the whole of `mapping` (the guest region at `addr`):
/// `MADV_HUGEPAGE` (back it with transparent huge pages) or `MADV_DONTDUMP` (leave it
/// out of core dumps).
pub(crate) fn advise<B: Bitmap>(
    mapping: &MmapRegion<B>,
    addr: GuestAddress,
    size: u64,
    advice: libc::c_int,
    name: &'static str,
) -> Result<(), MemoryError> {
    debug_assert!(advice == libc::MADV_HUGEPAGE || advice == libc::MADV_DONTDUMP);
    // SAFETY: `mapping` is a live mapping of exactly `mapping.size()` bytes that we created
    // and own. MADV_HUGEPAGE only changes how the kernel may back the pages, and
    // MADV_DONTDUMP only whether they go into a core dump; neither changes their
    // contents or validity, so no Rust-visible memory is affected.
    let ret = unsafe {
        libc::madvise(
            mapping.as_ptr().cast::<libc::c_void>(),
            mapping.size(),
            advice,
        )
    };
    if ret != 0 {
        return Err(MemoryError::Madvise {
            advice: name,
            addr: addr.raw_value(),
            size,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Fails unless `ram_size` is a whole number of 2 MiB pages and the host pool holds them.
///
/// Checked before mapping anything so the error names the shortfall rather than a bare
/// `ENOMEM` from the second region.
fn check_huge_page_pool(ram_size: u64) -> Result<(), MemoryError> {
    if ram_size % HUGE_PAGE_SIZE != 0 {
        return Err(MemoryError::HugePageUnaligned {
            size: ram_size,
            align: HUGE_PAGE_SIZE,
        });
    }
    let needed = ram_size / HUGE_PAGE_SIZE;
    let available = available_huge_pages();
    if available < needed {
        return Err(MemoryError::HugePagesUnavailable { needed, available });
    }
    Ok(())
}

/// 2 MiB huge pages the host can still reserve: free minus already reserved.
/// A host without the sysfs directory has no 2 MiB pool at all.
fn available_huge_pages() -> u64 {
    let read = |name: &str| -> u64 {
        std::fs::read_to_string(format!("{HUGEPAGES_2M_SYSFS}/{name}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    read("free_hugepages").saturating_sub(read("resv_hugepages"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GIB, PAGE_SIZE};
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    /// Writes and reads back a distinct byte at the first and last address of every region.
    fn touch_region_ends(layout: &MemoryLayout, mem: &GuestMemoryMmap) {
        assert_eq!(mem.num_regions(), layout.ram_regions().len());
        for (i, (&(addr, size), region)) in layout.ram_regions().iter().zip(mem.iter()).enumerate()
        {
            assert_eq!(region.start_addr(), addr);
            assert_eq!(region.len(), size);
            let last = addr.unchecked_add(size - 1);
            let (a, b) = (0x10 + i as u8, 0x80 + i as u8);
            mem.write_obj(a, addr).unwrap();
            mem.write_obj(b, last).unwrap();
            assert_eq!(mem.read_obj::<u8>(addr).unwrap(), a);
            assert_eq!(mem.read_obj::<u8>(last).unwrap(), b);
            // Nothing is mapped right after the region (the hole, or the end of RAM).
            assert!(mem.read_obj::<u8>(last.unchecked_add(1)).is_err());
        }
    }

    #[test]
    fn small_guest_memory() {
        let layout = MemoryLayout::new(512 * crate::MIB).unwrap();
        let mem = create_guest_memory(&layout, HugePages::None).unwrap();
        touch_region_ends(&layout, &mem);
    }

    /// Every page of every region has a dirty bit, set by writes through vm-memory and
    /// by nothing else.
    #[test]
    fn dirty_bitmap_covers_every_region() {
        use vm_memory::bitmap::AtomicBitmap;

        let layout = MemoryLayout::new(4 * GIB + 16 * crate::MIB).unwrap();
        let mem: GuestMemoryMmap<AtomicBitmap> =
            create_guest_memory_with_bitmap(&layout, HugePages::None).unwrap();
        assert_eq!(mem.num_regions(), 2);
        for region in mem.iter() {
            let last_page = region.len() as usize - PAGE_SIZE as usize;
            let (first, last) = (
                region.start_addr(),
                region.start_addr().unchecked_add(last_page as u64),
            );
            assert!(!region.bitmap().dirty_at(0));
            assert!(!region.bitmap().dirty_at(last_page));
            mem.write_obj(1u8, first).unwrap();
            mem.write_obj(2u8, last.unchecked_add(PAGE_SIZE - 1))
                .unwrap();
            assert!(region.bitmap().dirty_at(0));
            assert!(region.bitmap().dirty_at(last_page));
            assert!(!region.bitmap().dirty_at(PAGE_SIZE as usize));
            assert!(!region.bitmap().dirty_at(last_page - PAGE_SIZE as usize));
        }
    }

    #[test]
    fn guest_memory_above_hole() {
        // MAP_NORESERVE: only the few touched pages cost host memory.
        let layout = MemoryLayout::new(4 * GIB + 16 * crate::MIB).unwrap();
        let mem = create_guest_memory(&layout, HugePages::None).unwrap();
        assert_eq!(mem.num_regions(), 2);
        touch_region_ends(&layout, &mem);
        assert!(mem.read_obj::<u8>(GuestAddress(3 * GIB)).is_err());
    }

    /// The `VmFlags` line of the /proc/self/smaps entry for the mapping that contains
    /// `ptr` (adjacent mappings with the same flags are merged into one entry).
    fn vm_flags(ptr: *mut u8) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let addr = ptr as usize;
        let contains = |line: &str| {
            let Some((range, _)) = line.split_once(' ') else {
                return false;
            };
            let Some((lo, hi)) = range.split_once('-') else {
                return false;
            };
            match (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) {
                (Ok(lo), Ok(hi)) => lo <= addr && addr < hi,
                _ => false,
            }
        };
        // An entry's header is followed by its fields; VmFlags is the last of them.
        let entry = smaps
            .lines()
            .skip_while(|line| !contains(line))
            .find(|line| line.starts_with("VmFlags:"));
        entry
            .unwrap_or_else(|| panic!("no smaps entry contains {addr:#x}"))
            .to_owned()
    }

    /// Every region, with and without a dirty bitmap, is left out of core dumps
    /// (smaps' `dd` flag is `VM_DONTDUMP`).
    #[test]
    fn guest_memory_is_not_dumped() {
        use vm_memory::bitmap::AtomicBitmap;

        let layout = MemoryLayout::new(4 * GIB + 16 * crate::MIB).unwrap();
        let plain = create_guest_memory(&layout, HugePages::None).unwrap();
        let tracked: GuestMemoryMmap<AtomicBitmap> =
            create_guest_memory_with_bitmap(&layout, HugePages::None).unwrap();
        let ptrs = plain
            .iter()
            .map(|r| r.as_ptr())
            .chain(tracked.iter().map(|r| r.as_ptr()));
        let mut regions = 0;
        for ptr in ptrs {
            let flags = vm_flags(ptr);
            assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
            regions += 1;
        }
        assert_eq!(regions, 4);
    }

    #[test]
    fn transparent_huge_pages() {
        let layout = MemoryLayout::new(64 * crate::MIB).unwrap();
        let mem = match create_guest_memory(&layout, HugePages::Transparent) {
            Ok(mem) => mem,
            // Only acceptable on a kernel built without THP.
            Err(MemoryError::Madvise { source, .. })
                if source.raw_os_error() == Some(libc::EINVAL)
                    && !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() =>
            {
                return;
            }
            Err(e) => panic!("{e}"),
        };
        touch_region_ends(&layout, &mem);
        let region = mem.iter().next().unwrap();
        let flags = vm_flags(region.as_ptr());
        // "hg" is how smaps shows MADV_HUGEPAGE.
        assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
    }

    #[test]
    fn hugetlbfs_rejects_unaligned_size() {
        let layout = MemoryLayout::new(16 * crate::MIB + PAGE_SIZE).unwrap();
        let err = create_guest_memory(&layout, HugePages::HugeTlbfs).unwrap_err();
        assert!(
            matches!(err, MemoryError::HugePageUnaligned { size, align }
                if size == 16 * crate::MIB + PAGE_SIZE && align == HUGE_PAGE_SIZE),
            "{err}"
        );
    }

    #[test]
    fn hugetlbfs_needs_a_big_enough_pool() {
        let layout = MemoryLayout::new(16 * crate::MIB).unwrap();
        let available = available_huge_pages();
        match create_guest_memory(&layout, HugePages::HugeTlbfs) {
            Ok(mem) => {
                assert!(available >= 8, "succeeded with only {available} pages");
                assert_eq!(mem.iter().next().unwrap().is_hugetlbfs(), Some(true));
                touch_region_ends(&layout, &mem);
            }
            Err(MemoryError::HugePagesUnavailable { needed, available }) => {
                assert_eq!(needed, 8);
                assert!(available < 8);
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn hugetlbfs_shortfall_message() {
        // Far more than any test host reserves.
        let err = check_huge_page_pool(1024 * GIB).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("guest memory needs 524288 free 2 MiB huge pages but the host has"),
            "{err}"
        );
    }
}

//! Allocators for guest resources: MMIO address ranges and interrupt lines (GSIs).

use std::collections::{BTreeMap, BTreeSet};

use vm_memory::{Address, GuestAddress};

use crate::MemoryError;

/// First-fit allocator of address ranges inside a fixed window `[base, base + size)`.
///
/// Allocations never overlap each other or leave the window. The window may end at the
/// very top of the 64-bit address space; all arithmetic is checked.
///
/// # Example
///
/// ```
/// use ember_memory::AddressAllocator;
/// use ember_memory::vm_memory::GuestAddress;
///
/// let mut mmio = AddressAllocator::new(GuestAddress(0xD000_0000), 0x10_0000)?;
/// let a = mmio.allocate(0x100, 0x1000)?;
/// let b = mmio.allocate(0x100, 0x1000)?;
/// assert_eq!((a, b), (GuestAddress(0xD000_0000), GuestAddress(0xD000_1000)));
///
/// assert_eq!(mmio.free(a)?, 0x100);
/// assert_eq!(mmio.allocate(0x100, 0x1000)?, a); // first fit reuses the hole
/// # Ok::<(), ember_memory::MemoryError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressAllocator {
    base: u64,
    /// Last address of the window, inclusive, so a window may end at `u64::MAX`.
    last: u64,
    /// Allocated ranges: start -> size. Kept disjoint and inside the window.
    allocated: BTreeMap<u64, u64>,
}

impl AddressAllocator {
    /// Creates an allocator over `[base, base + size)`.
    ///
    /// Fails if `size` is 0 or the window runs past the end of the address space.
    ///
    /// # Example
    ///
    /// ```
    /// use ember_memory::AddressAllocator;
    /// use ember_memory::vm_memory::GuestAddress;
    ///
    /// assert!(AddressAllocator::new(GuestAddress(0x1000), 0x1000).is_ok());
    /// assert!(AddressAllocator::new(GuestAddress(u64::MAX), 2).is_err());
    /// ```
    pub fn new(base: GuestAddress, size: u64) -> Result<Self, MemoryError> {
        let base = base.raw_value();
        let last = size
            .checked_sub(1)
            .and_then(|len| base.checked_add(len))
            .ok_or(MemoryError::InvalidWindow { base, size })?;
        Ok(AddressAllocator {
            base,
            last,
            allocated: BTreeMap::new(),
        })
    }

    /// First address of the window.
    pub fn base(&self) -> GuestAddress {
        GuestAddress(self.base)
    }

    /// Last address of the window (inclusive).
    pub fn last(&self) -> GuestAddress {
        GuestAddress(self.last)
    }

    /// Allocates `size` bytes starting at a multiple of `align`, at the lowest such
    /// address that is free.
    ///
    /// `align` must be a power of two (1 means unaligned).
    ///
    /// # Example
    ///
    /// ```
    /// use ember_memory::AddressAllocator;
    /// use ember_memory::vm_memory::GuestAddress;
    ///
    /// let mut alloc = AddressAllocator::new(GuestAddress(0x1800), 0x10000)?;
    /// assert_eq!(alloc.allocate(0x100, 0x1000)?, GuestAddress(0x2000));
    /// assert!(alloc.allocate(0x100, 3).is_err());
    /// # Ok::<(), ember_memory::MemoryError>(())
    /// ```
    pub fn allocate(&mut self, size: u64, align: u64) -> Result<GuestAddress, MemoryError> {
        if size == 0 {
            return Err(MemoryError::ZeroSize);
        }
        if !align.is_power_of_two() {
            return Err(MemoryError::InvalidAlignment { align });
        }

        // Walk the gaps between allocations in address order; `cursor` is the first
        // address of the current gap, `None` once the allocations reach u64::MAX.
        let mut cursor = Some(self.base);
        let mut found = None;
        for (&start, &len) in &self.allocated {
            // `start > c` also guarantees `start - 1` cannot underflow.
            if let Some(addr) = cursor
                .filter(|&c| start > c)
                .and_then(|c| fit(c, start - 1, size, align))
            {
                found = Some(addr);
                break;
            }
            // Cannot underflow: allocations are never empty.
            cursor = (start + (len - 1)).checked_add(1);
        }
        let addr = found
            .or_else(|| cursor.and_then(|c| fit(c, self.last, size, align)))
            .ok_or(MemoryError::OutOfSpace {
                size,
                align,
                base: self.base,
                last: self.last,
            })?;
        self.allocated.insert(addr, size);
        Ok(GuestAddress(addr))
    }

    /// Allocates exactly `[addr, addr + size)`, for devices at fixed addresses.
    ///
    /// Fails if the range leaves the window or overlaps an existing allocation.
    ///
    /// # Example
    ///
    /// ```
    /// use ember_memory::AddressAllocator;
    /// use ember_memory::vm_memory::GuestAddress;
    ///
    /// let mut alloc = AddressAllocator::new(GuestAddress(0), 0x10000)?;
    /// alloc.allocate_at(GuestAddress(0x4000), 0x1000)?;
    /// assert!(alloc.allocate_at(GuestAddress(0x4800), 0x1000).is_err());
    /// # Ok::<(), ember_memory::MemoryError>(())
    /// ```
    pub fn allocate_at(&mut self, addr: GuestAddress, size: u64) -> Result<(), MemoryError> {
        let addr = addr.raw_value();
        if size == 0 {
            return Err(MemoryError::ZeroSize);
        }
        let end = addr
            .checked_add(size - 1)
            .ok_or(MemoryError::RangeOverflow { addr, size })?;
        if addr < self.base || end > self.last {
            return Err(MemoryError::OutsideWindow {
                addr,
                size,
                base: self.base,
                last: self.last,
            });
        }
        // Allocations are disjoint and sorted, so among those starting at or before `end`
        // the last one reaches furthest; only it can intersect the request.
        if let Some((&other_addr, &other_size)) = self.allocated.range(..=end).next_back() {
            if other_addr + (other_size - 1) >= addr {
                return Err(MemoryError::Overlap {
                    addr,
                    size,
                    other_addr,
                    other_size,
                });
            }
        }
        self.allocated.insert(addr, size);
        Ok(())
    }

    /// Releases the allocation starting at `addr` and returns its size.
    ///
    /// # Example
    ///
    /// ```
    /// use ember_memory::AddressAllocator;
    /// use ember_memory::vm_memory::GuestAddress;
    ///
    /// let mut alloc = AddressAllocator::new(GuestAddress(0), 0x10000)?;
    /// let addr = alloc.allocate(0x300, 0x100)?;
    /// assert_eq!(alloc.free(addr)?, 0x300);
    /// assert!(alloc.free(addr).is_err());
    /// # Ok::<(), ember_memory::MemoryError>(())
    /// ```
    pub fn free(&mut self, addr: GuestAddress) -> Result<u64, MemoryError> {
        let addr = addr.raw_value();
        self.allocated
            .remove(&addr)
            .ok_or(MemoryError::NotAllocated { addr })
    }
}

/// The lowest multiple of `align` at or above `first` such that `size` bytes from it end
/// at or before `last`, if any. `align` is a power of two and `size` is non-zero.
fn fit(first: u64, last: u64, size: u64, align: u64) -> Option<u64> {
    let addr = first.checked_next_multiple_of(align)?;
    let end = addr.checked_add(size - 1)?;
    (end <= last).then_some(addr)
}

/// Allocator of interrupt lines (GSIs) from the inclusive range `[first, last]`.
///
/// It hands out the lowest free GSI. On x86 a VMM gives it
/// `ember_arch::layout::{DEVICE_GSI_START, DEVICE_GSI_END}` (5 and 23): the IOAPIC has 24
/// pins and 0-4 are taken by the PIT, keyboard, PIC cascade and COM ports.
///
/// # Example
///
/// ```
/// use ember_memory::GsiAllocator;
///
/// let mut gsis = GsiAllocator::new(5, 23)?;
/// assert_eq!(gsis.allocate()?, 5);
/// gsis.allocate_specific(7)?;
/// assert_eq!(gsis.allocate()?, 6);
/// assert_eq!(gsis.allocate()?, 8);
/// gsis.free(6)?;
/// assert_eq!(gsis.allocate()?, 6);
/// # Ok::<(), ember_memory::MemoryError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GsiAllocator {
    first: u32,
    last: u32,
    used: BTreeSet<u32>,
}

impl GsiAllocator {
    /// Creates an allocator for GSIs `first..=last`. Fails if `first > last`.
    pub fn new(first: u32, last: u32) -> Result<Self, MemoryError> {
        if first > last {
            return Err(MemoryError::InvalidGsiRange { first, last });
        }
        Ok(GsiAllocator {
            first,
            last,
            used: BTreeSet::new(),
        })
    }

    /// Allocates the lowest free GSI.
    pub fn allocate(&mut self) -> Result<u32, MemoryError> {
        // Walk the used GSIs in order until one is missing; `None` means the used GSIs
        // run up to u32::MAX.
        let mut candidate = Some(self.first);
        for &gsi in &self.used {
            if Some(gsi) != candidate {
                break;
            }
            candidate = gsi.checked_add(1);
        }
        let gsi = candidate
            .filter(|&gsi| gsi <= self.last)
            .ok_or(MemoryError::GsiExhausted {
                first: self.first,
                last: self.last,
            })?;
        self.used.insert(gsi);
        Ok(gsi)
    }

    /// Allocates `gsi` itself, for devices with a fixed interrupt line.
    pub fn allocate_specific(&mut self, gsi: u32) -> Result<(), MemoryError> {
        self.check_range(gsi)?;
        if !self.used.insert(gsi) {
            return Err(MemoryError::GsiInUse { gsi });
        }
        Ok(())
    }

    /// Releases `gsi` so it can be allocated again.
    pub fn free(&mut self, gsi: u32) -> Result<(), MemoryError> {
        self.check_range(gsi)?;
        if !self.used.remove(&gsi) {
            return Err(MemoryError::GsiNotAllocated { gsi });
        }
        Ok(())
    }

    fn check_range(&self, gsi: u32) -> Result<(), MemoryError> {
        if gsi < self.first || gsi > self.last {
            return Err(MemoryError::GsiOutOfRange {
                gsi,
                first: self.first,
                last: self.last,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 0x1000;

    fn alloc(base: u64, size: u64) -> AddressAllocator {
        AddressAllocator::new(GuestAddress(base), size).unwrap()
    }

    /// No two allocations overlap and all lie inside the window.
    fn assert_disjoint(a: &AddressAllocator) {
        let mut prev_end: Option<u64> = None;
        for (&start, &len) in &a.allocated {
            let end = start + (len - 1);
            assert!(start >= a.base && end <= a.last);
            if let Some(p) = prev_end {
                assert!(start > p, "{start:#x} overlaps range ending {p:#x}");
            }
            prev_end = Some(end);
        }
    }

    #[test]
    fn rejects_bad_windows() {
        for (base, size) in [(0, 0), (u64::MAX, 2), (2, u64::MAX)] {
            let err = AddressAllocator::new(GuestAddress(base), size).unwrap_err();
            assert!(
                matches!(err, MemoryError::InvalidWindow { base: b, size: s } if b == base && s == size),
                "{err}"
            );
        }
        // Windows ending exactly at u64::MAX are fine.
        assert!(AddressAllocator::new(GuestAddress(0), u64::MAX).is_ok());
        assert!(AddressAllocator::new(GuestAddress(u64::MAX), 1).is_ok());
        assert!(AddressAllocator::new(GuestAddress(1), u64::MAX).is_ok());
    }

    #[test]
    fn aligns_allocations() {
        let mut a = alloc(0x1001, 0x10_0000);
        assert_eq!(a.allocate(1, 1).unwrap(), GuestAddress(0x1001));
        assert_eq!(a.allocate(0x10, 0x10).unwrap(), GuestAddress(0x1010));
        assert_eq!(a.allocate(PAGE, PAGE).unwrap(), GuestAddress(0x2000));
        assert_eq!(a.allocate(1, 0x1_0000).unwrap(), GuestAddress(0x1_0000));
        // The gap left by alignment is still usable.
        assert_eq!(a.allocate(0xe, 1).unwrap(), GuestAddress(0x1002));
        assert_disjoint(&a);
    }

    #[test]
    fn rejects_bad_alignment_and_size() {
        let mut a = alloc(0, 0x10000);
        for align in [0, 3, 0x1800, u64::MAX] {
            let err = a.allocate(PAGE, align).unwrap_err();
            assert!(
                matches!(err, MemoryError::InvalidAlignment { align: x } if x == align),
                "{err}"
            );
        }
        assert_eq!(
            a.allocate(PAGE, 3).unwrap_err().to_string(),
            "alignment 0x3 is invalid: it must be a power of two"
        );
        assert!(matches!(a.allocate(0, 1), Err(MemoryError::ZeroSize)));
        assert!(matches!(
            a.allocate_at(GuestAddress(0), 0),
            Err(MemoryError::ZeroSize)
        ));
    }

    #[test]
    fn exhaustion() {
        let mut a = alloc(0x1000, 4 * PAGE);
        for i in 0..4 {
            assert_eq!(
                a.allocate(PAGE, PAGE).unwrap(),
                GuestAddress(0x1000 + i * PAGE)
            );
        }
        let err = a.allocate(1, 1).unwrap_err();
        assert!(
            matches!(
                err,
                MemoryError::OutOfSpace {
                    size: 1,
                    align: 1,
                    base: 0x1000,
                    last: 0x4fff
                }
            ),
            "{err}"
        );
        // Larger than the window, or an alignment no address in the window meets.
        let mut b = alloc(0x1000, 4 * PAGE);
        assert!(b.allocate(5 * PAGE, 1).is_err());
        assert!(b.allocate(1, 0x1_0000).is_err());
        assert_eq!(b.allocate(4 * PAGE, PAGE).unwrap(), GuestAddress(0x1000));
    }

    #[test]
    fn fragmentation_and_reuse() {
        let mut a = alloc(0, 8 * PAGE);
        let pages: Vec<_> = (0..8).map(|_| a.allocate(PAGE, PAGE).unwrap()).collect();
        // Free every other page: 4 pages free in total, but no two adjacent.
        for p in pages.iter().step_by(2) {
            assert_eq!(a.free(*p).unwrap(), PAGE);
        }
        assert!(matches!(
            a.allocate(2 * PAGE, 1),
            Err(MemoryError::OutOfSpace { .. })
        ));
        // Single pages go into the holes, lowest first.
        assert_eq!(a.allocate(PAGE, PAGE).unwrap(), pages[0]);
        assert_eq!(a.allocate(0x800, 1).unwrap(), pages[2]);
        // Merging two neighbours makes room for a bigger range.
        a.free(pages[5]).unwrap();
        assert_eq!(a.allocate(2 * PAGE, PAGE).unwrap(), pages[4]);
        assert_disjoint(&a);
        // Freeing an address that does not start an allocation fails.
        let err = a.free(GuestAddress(pages[2].raw_value() + 1)).unwrap_err();
        assert_eq!(err.to_string(), "no allocation starts at 0x2001");
        assert!(a.free(pages[7]).is_ok());
        assert!(a.free(pages[7]).is_err());
    }

    #[test]
    fn allocate_at_rejects_overlap() {
        let mut a = alloc(0, 0x10000);
        a.allocate_at(GuestAddress(0x4000), 0x2000).unwrap();
        for (addr, size) in [
            (0x4000, 1),
            (0x3000, 0x1001),
            (0x5fff, 1),
            (0x5000, 0x2000),
            (0x3000, 0x4000),
        ] {
            let err = a.allocate_at(GuestAddress(addr), size).unwrap_err();
            assert!(
                matches!(
                    err,
                    MemoryError::Overlap {
                        other_addr: 0x4000,
                        other_size: 0x2000,
                        ..
                    }
                ),
                "{addr:#x}+{size:#x}: {err}"
            );
        }
        // Touching neighbours are fine.
        a.allocate_at(GuestAddress(0x3000), 0x1000).unwrap();
        a.allocate_at(GuestAddress(0x6000), 0x1000).unwrap();
        // Outside the window.
        assert!(matches!(
            a.allocate_at(GuestAddress(0xf000), 0x1001),
            Err(MemoryError::OutsideWindow { .. })
        ));
        // Dynamic allocation steps around fixed ones.
        assert_eq!(a.allocate(0x4000, PAGE).unwrap(), GuestAddress(0x7000));
        assert_eq!(a.allocate(0x3000, PAGE).unwrap(), GuestAddress(0));
        assert_disjoint(&a);
    }

    #[test]
    fn allocate_at_outside_window() {
        let mut a = alloc(0x10000, 0x10000);
        for (addr, size) in [(0xffff, 2), (0x1_ffff, 2), (0x2_0000, 1), (0, 0x10000)] {
            let err = a.allocate_at(GuestAddress(addr), size).unwrap_err();
            assert!(
                matches!(
                    err,
                    MemoryError::OutsideWindow {
                        base: 0x10000,
                        last: 0x1ffff,
                        ..
                    }
                ),
                "{err}"
            );
        }
        a.allocate_at(GuestAddress(0x1_ffff), 1).unwrap();
    }

    #[test]
    fn overflow_near_top_of_address_space() {
        let base = u64::MAX - 4 * PAGE + 1;
        let mut a = alloc(base, 4 * PAGE);
        assert_eq!(a.last(), GuestAddress(u64::MAX));
        // Sizes or alignments that would wrap are rejected, not wrapped.
        assert!(matches!(
            a.allocate_at(GuestAddress(u64::MAX), 2),
            Err(MemoryError::RangeOverflow {
                addr: u64::MAX,
                size: 2
            })
        ));
        assert!(a.allocate(u64::MAX, 1).is_err());
        assert!(a.allocate(1, 1 << 63).is_err());
        // The last byte of the address space can be allocated, and then nothing follows.
        a.allocate_at(GuestAddress(u64::MAX - PAGE + 1), PAGE)
            .unwrap();
        assert_eq!(a.allocate(PAGE, PAGE).unwrap(), GuestAddress(base));
        assert_eq!(
            a.allocate(2 * PAGE, PAGE).unwrap(),
            GuestAddress(base + PAGE)
        );
        assert!(matches!(
            a.allocate(1, 1),
            Err(MemoryError::OutOfSpace { .. })
        ));
        assert_eq!(a.free(GuestAddress(u64::MAX - PAGE + 1)).unwrap(), PAGE);
        assert_eq!(a.allocate(1, 1).unwrap(), GuestAddress(u64::MAX - PAGE + 1));
        assert_disjoint(&a);
        // A window covering all of memory works at both ends.
        let mut all = alloc(0, u64::MAX);
        assert_eq!(all.allocate(1 << 63, 1 << 63).unwrap(), GuestAddress(0));
        assert_eq!(all.allocate(PAGE, 1 << 63).unwrap(), GuestAddress(1 << 63));
    }

    #[test]
    fn gsi_allocation_and_exhaustion() {
        let mut g = GsiAllocator::new(5, 23).unwrap();
        let got: Vec<u32> = (0..19).map(|_| g.allocate().unwrap()).collect();
        assert_eq!(got, (5..=23).collect::<Vec<_>>());
        let err = g.allocate().unwrap_err();
        assert!(matches!(
            err,
            MemoryError::GsiExhausted { first: 5, last: 23 }
        ));
        assert_eq!(err.to_string(), "all GSIs in [5, 23] are allocated");
        g.free(11).unwrap();
        assert_eq!(g.allocate().unwrap(), 11);
    }

    #[test]
    fn gsi_specific_duplicate_and_free() {
        let mut g = GsiAllocator::new(5, 23).unwrap();
        g.allocate_specific(5).unwrap();
        g.allocate_specific(23).unwrap();
        assert!(matches!(
            g.allocate_specific(5),
            Err(MemoryError::GsiInUse { gsi: 5 })
        ));
        assert_eq!(g.allocate().unwrap(), 6);
        for gsi in [4, 24] {
            let err = g.allocate_specific(gsi).unwrap_err();
            assert!(
                matches!(err, MemoryError::GsiOutOfRange { gsi: x, first: 5, last: 23 } if x == gsi),
                "{err}"
            );
            assert!(g.free(gsi).is_err());
        }
        g.free(23).unwrap();
        assert!(matches!(
            g.free(23),
            Err(MemoryError::GsiNotAllocated { gsi: 23 })
        ));
        assert!(GsiAllocator::new(24, 23).is_err());
    }

    #[test]
    fn gsi_range_up_to_u32_max() {
        let mut g = GsiAllocator::new(u32::MAX - 1, u32::MAX).unwrap();
        assert_eq!(g.allocate().unwrap(), u32::MAX - 1);
        assert_eq!(g.allocate().unwrap(), u32::MAX);
        assert!(matches!(
            g.allocate(),
            Err(MemoryError::GsiExhausted { .. })
        ));
    }
}

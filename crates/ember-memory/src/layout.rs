//! Where RAM and MMIO live in an x86-64 guest's physical address space.
//!
//! ```text
//! 0                 3 GiB   0xD000_0000      0xFEC0_0000  4 GiB          ram_end  (1 GiB aligned)
//! |----- low RAM -----|--hole--|-- device MMIO --|-IOAPIC..-|-- high RAM --|  ...  |-- 64 GiB high MMIO --|
//! ```
//!
//! RAM fills `[0, 3 GiB)` first; whatever does not fit continues at 4 GiB, so 32-bit
//! devices and the interrupt controllers keep the top gigabyte below 4 GiB.

use vm_memory::GuestAddress;

use crate::MemoryError;

/// One mebibyte.
pub const MIB: u64 = ember_arch::layout::MIB;
/// One gibibyte.
pub const GIB: u64 = ember_arch::layout::GIB;
/// Guest page size; RAM sizes must be a multiple of it.
pub const PAGE_SIZE: u64 = ember_arch::layout::PAGE_SIZE;

/// Start of the 32-bit MMIO hole `[3 GiB, 4 GiB)`; no RAM is placed there.
pub const MMIO_HOLE_START: u64 = ember_arch::layout::MMIO_HOLE_START;
/// End (exclusive) of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = ember_arch::layout::MMIO_HOLE_END;
/// Start of the window handed to the MMIO allocator for devices.
pub const DEVICE_MMIO_START: u64 = ember_arch::layout::DEVICE_MMIO_START;
/// End (exclusive) of the device window. It stops below the IOAPIC (0xFEC0_0000), the
/// LAPIC (0xFEE0_0000) and the firmware area just below 4 GiB.
pub const DEVICE_MMIO_END: u64 = ember_arch::layout::DEVICE_MMIO_END;
/// Smallest guest RAM size accepted.
pub const MIN_RAM_SIZE: u64 = 16 * MIB;
/// Largest guest RAM size accepted.
pub const MAX_RAM_SIZE: u64 = 1024 * GIB;
/// Size of the 64-bit MMIO window above RAM (for PCI BARs).
pub const HIGH_MMIO_SIZE: u64 = ember_arch::layout::HIGH_MMIO_SIZE;
/// Alignment of the 64-bit MMIO window, so large BARs can be naturally aligned.
pub const HIGH_MMIO_ALIGN: u64 = ember_arch::layout::HIGH_MMIO_ALIGN;

/// The guest physical memory map for a given amount of RAM.
///
/// # Example
///
/// ```
/// use ember_memory::{MemoryLayout, GIB};
/// use ember_memory::vm_memory::GuestAddress;
///
/// let layout = MemoryLayout::new(6 * GIB)?;
/// assert_eq!(
///     layout.ram_regions(),
///     &[(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), 3 * GIB)]
/// );
/// assert_eq!(layout.ram_end(), 7 * GIB);
/// # Ok::<(), ember_memory::MemoryError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    ram_size: u64,
    /// One or two regions, sorted by address.
    regions: Vec<(GuestAddress, u64)>,
}

impl MemoryLayout {
    /// Lays out `ram_size` bytes of RAM around the 32-bit MMIO hole.
    ///
    /// `ram_size` must be a multiple of 4 KiB, between [`MIN_RAM_SIZE`] and
    /// [`MAX_RAM_SIZE`] inclusive.
    ///
    /// # Example
    ///
    /// ```
    /// use ember_memory::{MemoryError, MemoryLayout, MIB};
    ///
    /// let layout = MemoryLayout::new(512 * MIB)?;
    /// assert_eq!(layout.ram_regions().len(), 1);
    ///
    /// let err = MemoryLayout::new(0x1000).unwrap_err();
    /// assert_eq!(err.to_string(), "guest memory size 0x1000 is below the minimum 16 MiB");
    /// # Ok::<(), MemoryError>(())
    /// ```
    pub fn new(ram_size: u64) -> Result<Self, MemoryError> {
        if ram_size < MIN_RAM_SIZE {
            return Err(MemoryError::RamTooSmall {
                size: ram_size,
                min: MIN_RAM_SIZE,
            });
        }
        if ram_size > MAX_RAM_SIZE {
            return Err(MemoryError::RamTooLarge {
                size: ram_size,
                max: MAX_RAM_SIZE,
            });
        }
        if ram_size % PAGE_SIZE != 0 {
            return Err(MemoryError::RamUnaligned {
                size: ram_size,
                align: PAGE_SIZE,
            });
        }

        let low = ram_size.min(MMIO_HOLE_START);
        let mut regions = vec![(GuestAddress(0), low)];
        if ram_size > low {
            // Cannot overflow: ram_size <= MAX_RAM_SIZE, far below u64::MAX - 4 GiB.
            regions.push((GuestAddress(MMIO_HOLE_END), ram_size - low));
        }
        Ok(MemoryLayout { ram_size, regions })
    }

    /// Total guest RAM in bytes.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// RAM regions as `(start, size)`, sorted: `[0, min(ram, 3 GiB))` and, when RAM does
    /// not fit below the hole, `[4 GiB, 4 GiB + rest)`.
    pub fn ram_regions(&self) -> &[(GuestAddress, u64)] {
        &self.regions
    }

    /// End (exclusive) of the RAM region that starts at address 0.
    pub fn low_ram_end(&self) -> u64 {
        self.ram_size.min(MMIO_HOLE_START)
    }

    /// One past the last RAM byte; above 4 GiB when RAM spills over the hole.
    pub fn ram_end(&self) -> u64 {
        if self.ram_size <= MMIO_HOLE_START {
            self.ram_size
        } else {
            MMIO_HOLE_END + (self.ram_size - MMIO_HOLE_START)
        }
    }

    /// The 32-bit MMIO hole as `(start, size)`: `[3 GiB, 4 GiB)`.
    pub fn mmio_hole(&self) -> (GuestAddress, u64) {
        (
            GuestAddress(MMIO_HOLE_START),
            MMIO_HOLE_END - MMIO_HOLE_START,
        )
    }

    /// The part of the hole given to devices as `(start, size)`:
    /// `[DEVICE_MMIO_START, DEVICE_MMIO_END)`.
    ///
    /// # Example
    ///
    /// ```
    /// use ember_memory::{AddressAllocator, MemoryLayout, MIB};
    ///
    /// let layout = MemoryLayout::new(512 * MIB)?;
    /// let (base, size) = layout.device_mmio_window();
    /// let mut mmio = AddressAllocator::new(base, size)?;
    /// let bar = mmio.allocate(0x1000, 0x1000)?;
    /// assert_eq!(bar, base);
    /// # Ok::<(), ember_memory::MemoryError>(())
    /// ```
    pub fn device_mmio_window(&self) -> (GuestAddress, u64) {
        (
            GuestAddress(DEVICE_MMIO_START),
            DEVICE_MMIO_END - DEVICE_MMIO_START,
        )
    }

    /// The 64-bit MMIO window as `(start, size)`: it starts at `max(4 GiB, ram_end)`
    /// rounded up to 1 GiB and spans [`HIGH_MMIO_SIZE`].
    pub fn high_mmio_window(&self) -> (GuestAddress, u64) {
        let floor = self.ram_end().max(MMIO_HOLE_END);
        // Cannot overflow: ram_end <= 1025 GiB.
        let start = floor.next_multiple_of(HIGH_MMIO_ALIGN);
        (GuestAddress(start), HIGH_MMIO_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Address;

    fn regions(layout: &MemoryLayout) -> Vec<(u64, u64)> {
        layout
            .ram_regions()
            .iter()
            .map(|(a, s)| (a.raw_value(), *s))
            .collect()
    }

    fn total(layout: &MemoryLayout) -> u64 {
        layout.ram_regions().iter().map(|(_, s)| s).sum()
    }

    #[test]
    fn below_hole() {
        let l = MemoryLayout::new(512 * MIB).unwrap();
        assert_eq!(l.ram_size(), 512 * MIB);
        assert_eq!(regions(&l), [(0, 512 * MIB)]);
        assert_eq!(l.low_ram_end(), 512 * MIB);
        assert_eq!(l.ram_end(), 512 * MIB);
        assert_eq!(l.high_mmio_window(), (GuestAddress(4 * GIB), 64 * GIB));
    }

    #[test]
    fn exactly_three_gib_stays_below_hole() {
        let l = MemoryLayout::new(3 * GIB).unwrap();
        assert_eq!(regions(&l), [(0, 3 * GIB)]);
        assert_eq!(l.low_ram_end(), 3 * GIB);
        assert_eq!(l.ram_end(), 3 * GIB);
        assert_eq!(l.high_mmio_window().0, GuestAddress(4 * GIB));
    }

    #[test]
    fn four_gib_splits_around_hole() {
        let l = MemoryLayout::new(4 * GIB).unwrap();
        assert_eq!(regions(&l), [(0, 3 * GIB), (4 * GIB, GIB)]);
        assert_eq!(total(&l), 4 * GIB);
        assert_eq!(l.low_ram_end(), 3 * GIB);
        assert_eq!(l.ram_end(), 5 * GIB);
        assert_eq!(l.high_mmio_window().0, GuestAddress(5 * GIB));
    }

    #[test]
    fn six_gib_splits_around_hole() {
        let l = MemoryLayout::new(6 * GIB).unwrap();
        assert_eq!(regions(&l), [(0, 3 * GIB), (4 * GIB, 3 * GIB)]);
        assert_eq!(total(&l), 6 * GIB);
        assert_eq!(l.ram_end(), 7 * GIB);
        assert_eq!(l.high_mmio_window().0, GuestAddress(7 * GIB));
    }

    #[test]
    fn high_mmio_rounds_up_to_gib() {
        let l = MemoryLayout::new(4 * GIB + PAGE_SIZE).unwrap();
        assert_eq!(l.ram_end(), 5 * GIB + PAGE_SIZE);
        assert_eq!(l.high_mmio_window().0, GuestAddress(6 * GIB));
    }

    #[test]
    fn limits_are_inclusive() {
        let min = MemoryLayout::new(MIN_RAM_SIZE).unwrap();
        assert_eq!(regions(&min), [(0, MIN_RAM_SIZE)]);
        let max = MemoryLayout::new(MAX_RAM_SIZE).unwrap();
        assert_eq!(total(&max), MAX_RAM_SIZE);
        assert_eq!(max.ram_end(), MAX_RAM_SIZE + GIB);
    }

    #[test]
    fn rejects_bad_sizes() {
        for size in [0, PAGE_SIZE, MIN_RAM_SIZE - PAGE_SIZE] {
            assert!(
                matches!(MemoryLayout::new(size), Err(MemoryError::RamTooSmall { size: s, min }) if s == size && min == MIN_RAM_SIZE),
                "{size:#x}"
            );
        }
        for size in [MAX_RAM_SIZE + PAGE_SIZE, u64::MAX] {
            assert!(
                matches!(MemoryLayout::new(size), Err(MemoryError::RamTooLarge { size: s, max }) if s == size && max == MAX_RAM_SIZE),
                "{size:#x}"
            );
        }
        for size in [MIN_RAM_SIZE + 1, 512 * MIB + 0x800] {
            assert!(
                matches!(MemoryLayout::new(size), Err(MemoryError::RamUnaligned { size: s, align }) if s == size && align == PAGE_SIZE),
                "{size:#x}"
            );
        }
    }

    #[test]
    fn error_messages_name_value_and_limit() {
        let msg = |size| MemoryLayout::new(size).unwrap_err().to_string();
        assert_eq!(
            msg(0x1000),
            "guest memory size 0x1000 is below the minimum 16 MiB"
        );
        assert_eq!(
            msg(MAX_RAM_SIZE + PAGE_SIZE),
            "guest memory size 0x10000001000 is above the maximum 1024 GiB"
        );
        assert_eq!(
            msg(MIN_RAM_SIZE + 1),
            "guest memory size 0x1000001 is not a multiple of the 4 KiB page size"
        );
    }

    fn overlaps((a, a_len): (u64, u64), (b, b_len): (u64, u64)) -> bool {
        a < b + b_len && b < a + a_len
    }

    #[test]
    fn windows_do_not_overlap_ram() {
        for size in [
            MIN_RAM_SIZE,
            512 * MIB,
            3 * GIB,
            3 * GIB + PAGE_SIZE,
            4 * GIB,
            6 * GIB,
            MAX_RAM_SIZE,
        ] {
            let l = MemoryLayout::new(size).unwrap();
            let windows = [l.mmio_hole(), l.device_mmio_window(), l.high_mmio_window()]
                .map(|(a, s)| (a.raw_value(), s));
            for &(addr, len) in l.ram_regions() {
                for w in windows {
                    assert!(!overlaps((addr.raw_value(), len), w), "{size:#x}: {w:x?}");
                }
            }
            // The device window sits inside the hole and below the IOAPIC.
            let (hole, hole_len) = windows[0];
            let (dev, dev_len) = windows[1];
            assert!(dev >= hole && dev + dev_len <= hole + hole_len);
            assert!(dev + dev_len <= 0xFEC0_0000);
            // The high window sits above 4 GiB and all RAM.
            assert!(windows[2].0 >= MMIO_HOLE_END.max(l.ram_end()));
            assert_eq!(windows[2].0 % HIGH_MMIO_ALIGN, 0);
        }
    }
}

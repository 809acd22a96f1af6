//! The e820 memory map handed to the kernel.

use ember_arch::layout::{EBDA_START, HIMEM_START};
use vm_memory::{GuestMemory, GuestMemoryBackend, GuestMemoryRegion};

use crate::le;

// The low region splits into RAM, the reserved EBDA-to-1-MiB range, and RAM again.
const _: () = assert!(EBDA_START < HIMEM_START);

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory, which the kernel must not use.
pub const E820_RESERVED: u32 = 2;
/// Most e820 entries the zero page holds (`E820_MAX_ENTRIES_ZEROPAGE`).
pub const E820_MAX_ENTRIES: usize = 128;

/// Why an e820 map could not be built from guest memory.
#[derive(Debug, thiserror::Error)]
pub enum E820Error {
    /// The guest memory offers no view of its physical regions (for example
    /// memory behind an IOMMU), so no e820 map can be built.
    #[error("guest memory has no physical region map to build an e820 map from")]
    NoPhysicalMemory,
    /// No guest memory region starts at address 0.
    #[error("no guest memory region starts at address 0; the boot layout needs low memory")]
    NoRegionAtZero,
    /// The region at address 0 ends below 1 MiB.
    #[error("guest memory region at 0 ends at {end:#x}, below 1 MiB ({himem:#x})")]
    LowMemoryTooSmall {
        /// Exclusive end of the region at 0.
        end: u64,
        /// The required minimum end, [`HIMEM_START`].
        himem: u64,
    },
    /// More e820 entries than the zero page (and the PVH memory map) can hold.
    #[error("{count} e820 entries exceed the limit of {max}")]
    TooManyEntries {
        /// Number of entries.
        count: usize,
        /// The limit, [`E820_MAX_ENTRIES`].
        max: usize,
    },
}

/// One e820 entry (`struct boot_e820_entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest physical start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Kind of memory: [`E820_RAM`], [`E820_RESERVED`], ...
    pub kind: u32,
}

impl E820Entry {
    /// Size of an entry in the zero page, in bytes (packed `u64, u64, u32`).
    pub const SIZE: usize = 20;

    /// The entry's packed little-endian representation in the zero page.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        le::put(&mut out, 0, &self.addr.to_le_bytes());
        le::put(&mut out, 8, &self.size.to_le_bytes());
        le::put(&mut out, 16, &self.kind.to_le_bytes());
        out
    }

    /// Decodes an entry from its packed little-endian representation.
    pub fn from_bytes(bytes: &[u8; Self::SIZE]) -> Self {
        Self {
            addr: u64::from_le_bytes(le::get(bytes, 0)),
            size: u64::from_le_bytes(le::get(bytes, 8)),
            kind: u32::from_le_bytes(le::get(bytes, 16)),
        }
    }
}

/// Builds the e820 map of `mem`, sorted by address.
///
/// The region starting at address 0 is split around the legacy PC holes:
/// `[0, EBDA_START)` RAM, `[EBDA_START, HIMEM_START)` reserved and
/// `[HIMEM_START, end)` RAM. Every other region is reported as RAM as it is.
///
/// # Errors
///
/// [`E820Error::NoRegionAtZero`] if no region starts at 0,
/// [`E820Error::LowMemoryTooSmall`] if it ends below 1 MiB,
/// [`E820Error::TooManyEntries`] if the map exceeds
/// [`E820_MAX_ENTRIES`], and [`E820Error::NoPhysicalMemory`] if `mem` does
/// not expose its physical regions.
///
/// # Example
///
/// ```
/// use ember_boot::e820::{e820_map, E820Entry, E820_RAM, E820_RESERVED};
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
/// let map = e820_map(&mem)?;
/// assert_eq!(map, [
///     E820Entry { addr: 0, size: 0x9_fc00, kind: E820_RAM },
///     E820Entry { addr: 0x9_fc00, size: 0x6_0400, kind: E820_RESERVED },
///     E820Entry { addr: 0x10_0000, size: (64 << 20) - 0x10_0000, kind: E820_RAM },
/// ]);
/// # Ok::<(), ember_boot::e820::E820Error>(())
/// ```
pub fn e820_map<M: GuestMemory>(mem: &M) -> Result<Vec<E820Entry>, E820Error> {
    let phys = mem.physical_memory().ok_or(E820Error::NoPhysicalMemory)?;
    let mut regions: Vec<(u64, u64)> = Vec::new();
    for region in phys.iter() {
        if regions.len() >= E820_MAX_ENTRIES {
            // Even one entry per region would be too many.
            return Err(E820Error::TooManyEntries {
                count: phys.num_regions(),
                max: E820_MAX_ENTRIES,
            });
        }
        regions.push((region.start_addr().0, region.len()));
    }
    regions.sort_unstable();

    let mut map = Vec::with_capacity(regions.len() + 2);
    let mut saw_zero = false;
    for (addr, size) in regions {
        if size == 0 {
            continue;
        }
        if addr == 0 {
            // The region's exclusive end is `size`, as it starts at 0.
            let end = size;
            if end < HIMEM_START {
                return Err(E820Error::LowMemoryTooSmall {
                    end,
                    himem: HIMEM_START,
                });
            }
            saw_zero = true;
            map.push(E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM,
            });
            map.push(E820Entry {
                addr: EBDA_START,
                size: HIMEM_START - EBDA_START,
                kind: E820_RESERVED,
            });
            if end > HIMEM_START {
                map.push(E820Entry {
                    addr: HIMEM_START,
                    size: end - HIMEM_START,
                    kind: E820_RAM,
                });
            }
        } else {
            map.push(E820Entry {
                addr,
                size,
                kind: E820_RAM,
            });
        }
    }
    if !saw_zero {
        return Err(E820Error::NoRegionAtZero);
    }
    if map.len() > E820_MAX_ENTRIES {
        return Err(E820Error::TooManyEntries {
            count: map.len(),
            max: E820_MAX_ENTRIES,
        });
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn mem(ranges: &[(u64, u64)]) -> GuestMemoryMmap<()> {
        let ranges: Vec<_> = ranges
            .iter()
            .map(|&(a, s)| (GuestAddress(a), s as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    fn ram(addr: u64, size: u64) -> E820Entry {
        E820Entry {
            addr,
            size,
            kind: E820_RAM,
        }
    }

    const LOW_RAM: E820Entry = E820Entry {
        addr: 0,
        size: EBDA_START,
        kind: E820_RAM,
    };
    const HOLE: E820Entry = E820Entry {
        addr: EBDA_START,
        size: HIMEM_START - EBDA_START,
        kind: E820_RESERVED,
    };

    #[test]
    fn single_64_mib_region() {
        let map = e820_map(&mem(&[(0, 64 * MIB)])).unwrap();
        assert_eq!(map, [LOW_RAM, HOLE, ram(HIMEM_START, 63 * MIB)]);
    }

    #[test]
    fn two_regions_around_the_32_bit_hole() {
        let map = e820_map(&mem(&[(0, 3 * GIB), (4 * GIB, GIB)])).unwrap();
        assert_eq!(
            map,
            [
                LOW_RAM,
                HOLE,
                ram(HIMEM_START, 3 * GIB - MIB),
                ram(4 * GIB, GIB)
            ]
        );
    }

    #[test]
    fn low_region_of_exactly_1_mib() {
        let map = e820_map(&mem(&[(0, MIB), (16 * MIB, MIB)])).unwrap();
        assert_eq!(map, [LOW_RAM, HOLE, ram(16 * MIB, MIB)]);
    }

    #[test]
    fn no_region_at_zero() {
        let err = e820_map(&mem(&[(MIB, 64 * MIB)])).unwrap_err();
        assert!(matches!(err, E820Error::NoRegionAtZero));
    }

    #[test]
    fn low_region_below_1_mib() {
        let err = e820_map(&mem(&[(0, 0x8_0000)])).unwrap_err();
        assert!(matches!(
            err,
            E820Error::LowMemoryTooSmall {
                end: 0x8_0000,
                himem: HIMEM_START
            }
        ));
    }

    #[test]
    fn too_many_regions() {
        // 128 regions plus the two extra entries of the low region: 130.
        let mut ranges = vec![(0, 2 * MIB)];
        ranges.extend((1..128).map(|i| (i * 4 * MIB, 4096)));
        let err = e820_map(&mem(&ranges)).unwrap_err();
        assert!(matches!(
            err,
            E820Error::TooManyEntries {
                count: 130,
                max: E820_MAX_ENTRIES
            }
        ));
        // 126 regions: 128 entries, the limit.
        ranges.truncate(126);
        assert_eq!(e820_map(&mem(&ranges)).unwrap().len(), E820_MAX_ENTRIES);
    }

    #[test]
    fn entry_byte_layout() {
        let e = E820Entry {
            addr: 0x1122_3344_5566_7788,
            size: 0x99aa_bbcc_ddee_ff00,
            kind: 0x0102_0304,
        };
        let bytes = e.to_bytes();
        assert_eq!(&bytes[..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&bytes[8..16], &0x99aa_bbcc_ddee_ff00u64.to_le_bytes());
        assert_eq!(&bytes[16..], &[4, 3, 2, 1]);
        assert_eq!(E820Entry::from_bytes(&bytes), e);
    }
}

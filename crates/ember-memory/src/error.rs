//! The crate's error type.

use vm_memory::mmap::MmapRegionError;
use vm_memory::GuestRegionCollectionError;

/// Everything that can go wrong in this crate.
///
/// Each variant carries the rejected value and the limit it broke, so the message alone
/// says what to change.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested guest RAM size is below [`MIN_RAM_SIZE`](crate::MIN_RAM_SIZE).
    #[error("guest memory size {size:#x} is below the minimum {}", human(.min))]
    RamTooSmall {
        /// The requested size in bytes.
        size: u64,
        /// The smallest size accepted.
        min: u64,
    },
    /// The requested guest RAM size is above [`MAX_RAM_SIZE`](crate::MAX_RAM_SIZE).
    #[error("guest memory size {size:#x} is above the maximum {}", human(.max))]
    RamTooLarge {
        /// The requested size in bytes.
        size: u64,
        /// The largest size accepted.
        max: u64,
    },
    /// The requested guest RAM size is not a whole number of pages.
    #[error("guest memory size {size:#x} is not a multiple of the {} page size", human(.align))]
    RamUnaligned {
        /// The requested size in bytes.
        size: u64,
        /// The page size it must be a multiple of.
        align: u64,
    },
    /// HugeTlbfs backing was asked for but the RAM size is not a whole number of huge pages.
    #[error(
        "guest memory size {size:#x} is not a multiple of the {} huge page size",
        human(.align)
    )]
    HugePageUnaligned {
        /// The requested size in bytes.
        size: u64,
        /// The huge page size it must be a multiple of.
        align: u64,
    },
    /// HugeTlbfs backing was asked for but the host's 2 MiB huge page pool is too small.
    #[error(
        "guest memory needs {needed} free 2 MiB huge pages but the host has {available} \
         (raise /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages)"
    )]
    HugePagesUnavailable {
        /// Huge pages the guest memory needs.
        needed: u64,
        /// Huge pages the host could still hand out.
        available: u64,
    },
    /// Mapping host memory for a guest RAM region failed.
    #[error("cannot map {size:#x} bytes for guest memory at {addr:#x}: {source}")]
    Mmap {
        /// Guest physical address of the region.
        addr: u64,
        /// Size of the region in bytes.
        size: u64,
        /// Why the mapping failed.
        source: MmapRegionError,
    },
    /// `madvise` failed on a region: `MADV_HUGEPAGE` typically because the host kernel
    /// lacks THP; `MADV_DONTDUMP` should not fail on an anonymous mapping.
    #[error("madvise({advice}) on guest memory at {addr:#x} (size {size:#x}) failed: {source}")]
    Madvise {
        /// The advice: `MADV_HUGEPAGE` or `MADV_DONTDUMP`.
        advice: &'static str,
        /// Guest physical address of the region.
        addr: u64,
        /// Size of the region in bytes.
        size: u64,
        /// The error `madvise` returned.
        source: std::io::Error,
    },
    /// A region at `addr` of `size` bytes would run past the end of the address space.
    #[error(
        "region at {addr:#x} with size {size:#x} runs past the end of the 64-bit address space"
    )]
    RangeOverflow {
        /// Start of the region.
        addr: u64,
        /// Size of the region in bytes.
        size: u64,
    },
    /// vm-memory refused to assemble the regions into guest memory.
    #[error("cannot assemble guest memory regions: {0}")]
    GuestMemory(#[from] GuestRegionCollectionError),
    /// An address allocator window is empty or runs past the end of the address space.
    #[error(
        "allocator window at {base:#x} with size {size:#x} is empty or runs past the end \
         of the 64-bit address space"
    )]
    InvalidWindow {
        /// Requested window start.
        base: u64,
        /// Requested window size.
        size: u64,
    },
    /// An allocation of zero bytes was requested.
    #[error("allocation size 0 is invalid: the minimum is 1 byte")]
    ZeroSize,
    /// An alignment that is not a power of two was requested.
    #[error("alignment {align:#x} is invalid: it must be a power of two")]
    InvalidAlignment {
        /// The rejected alignment.
        align: u64,
    },
    /// No free range in the window satisfies the request.
    #[error(
        "no free range of {size:#x} bytes aligned to {align:#x} in the window \
         [{base:#x}, {last:#x}]"
    )]
    OutOfSpace {
        /// Requested size.
        size: u64,
        /// Requested alignment.
        align: u64,
        /// First address of the window.
        base: u64,
        /// Last address of the window (inclusive).
        last: u64,
    },
    /// A fixed allocation does not lie inside the allocator's window.
    #[error("range at {addr:#x} with size {size:#x} is outside the window [{base:#x}, {last:#x}]")]
    OutsideWindow {
        /// Requested start.
        addr: u64,
        /// Requested size.
        size: u64,
        /// First address of the window.
        base: u64,
        /// Last address of the window (inclusive).
        last: u64,
    },
    /// A fixed allocation overlaps an existing one.
    #[error(
        "range at {addr:#x} with size {size:#x} overlaps the allocation at {other_addr:#x} \
         with size {other_size:#x}"
    )]
    Overlap {
        /// Requested start.
        addr: u64,
        /// Requested size.
        size: u64,
        /// Start of the allocation in the way.
        other_addr: u64,
        /// Size of the allocation in the way.
        other_size: u64,
    },
    /// `free` was called with an address that does not start an allocation.
    #[error("no allocation starts at {addr:#x}")]
    NotAllocated {
        /// The address passed to `free`.
        addr: u64,
    },
    /// A GSI allocator range with `first > last` was requested.
    #[error("GSI range [{first}, {last}] is empty: the first GSI is above the last")]
    InvalidGsiRange {
        /// Requested first GSI.
        first: u32,
        /// Requested last GSI.
        last: u32,
    },
    /// Every GSI in the allocator's range is taken.
    #[error("all GSIs in [{first}, {last}] are allocated")]
    GsiExhausted {
        /// First GSI of the range.
        first: u32,
        /// Last GSI of the range.
        last: u32,
    },
    /// A GSI outside the allocator's range was requested or freed.
    #[error("GSI {gsi} is outside the allocator range [{first}, {last}]")]
    GsiOutOfRange {
        /// The rejected GSI.
        gsi: u32,
        /// First GSI of the range.
        first: u32,
        /// Last GSI of the range.
        last: u32,
    },
    /// A GSI that is already allocated was requested again.
    #[error("GSI {gsi} is already allocated")]
    GsiInUse {
        /// The rejected GSI.
        gsi: u32,
    },
    /// A GSI that is not allocated was freed.
    #[error("GSI {gsi} is not allocated")]
    GsiNotAllocated {
        /// The rejected GSI.
        gsi: u32,
    },
    /// A read, write or length change of a guest memory file failed.
    #[error("{op} the memory file ({len:#x} bytes at offset {offset:#x}) failed: {source}")]
    MemoryFile {
        /// What was being done: "writing", "setting the length of", ...
        op: &'static str,
        /// File offset of the access (0 for whole-file operations).
        offset: u64,
        /// Bytes involved (the new length, for a length change).
        len: u64,
        /// The error the system call returned.
        source: std::io::Error,
    },
    /// A memory file is shorter than the guest RAM it is to back.
    #[error(
        "memory file is {len:#x} bytes long but the guest has {needed:#x} bytes of RAM \
         (wrong memory size, or a truncated file)"
    )]
    MemoryFileTooShort {
        /// The file's length.
        len: u64,
        /// The guest RAM size it must at least have.
        needed: u64,
    },
    /// vm-memory refused a slice of a guest memory region.
    #[error(
        "cannot access {len:#x} bytes at offset {offset:#x} of guest memory region {region}: \
         {source}"
    )]
    GuestSlice {
        /// Index of the region.
        region: usize,
        /// Offset in the region.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// What vm-memory said.
        source: vm_memory::GuestMemoryError,
    },
    /// A page or region outside a [`DirtyBitmap`](crate::DirtyBitmap) was named.
    #[error(
        "dirty page {page} of region {region} is out of range: the bitmap has {regions} \
         region(s), this one with {pages} page(s)"
    )]
    DirtyPageOutOfRange {
        /// The region named.
        region: usize,
        /// The page named.
        page: u64,
        /// How many regions the bitmap has.
        regions: usize,
        /// How many pages the region has (0 if it does not exist).
        pages: u64,
    },
    /// Bitmap words to merge into a region have the wrong count.
    #[error("dirty bitmap for region {region} has {found} word(s), expected {expected}")]
    DirtyBitmapMismatch {
        /// The region.
        region: usize,
        /// Words the region has: one bit per 4 KiB page, rounded up to 64 bits.
        expected: usize,
        /// Words given.
        found: usize,
    },
    /// A [`DirtyBitmap`](crate::DirtyBitmap) does not match the guest memory's regions.
    #[error(
        "dirty bitmap does not match guest memory: region {region} has {memory_pages} \
         page(s), the bitmap {}",
        match .bitmap_pages { Some(p) => format!("{p} page(s)"), None => "no such region".into() }
    )]
    DirtyBitmapLayout {
        /// The first region that differs.
        region: usize,
        /// The bitmap's page count for it, if the bitmap has the region at all.
        bitmap_pages: Option<u64>,
        /// The memory's page count for it.
        memory_pages: u64,
    },
    /// A [`DirtyBitmap`](crate::DirtyBitmap) has more regions than the guest memory.
    #[error("dirty bitmap has {bitmap} region(s) but guest memory has {memory}")]
    DirtyBitmapRegions {
        /// Regions in the bitmap.
        bitmap: usize,
        /// Regions in the memory.
        memory: usize,
    },
}

/// Formats a byte count for messages: "16 MiB" when it is a whole unit, hex otherwise.
fn human(bytes: &u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    let bytes = *bytes;
    for (unit, name) in UNITS {
        if bytes != 0 && bytes % unit == 0 {
            return format!("{} {name}", bytes / unit);
        }
    }
    format!("{bytes:#x} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(&(16 << 20)), "16 MiB");
        assert_eq!(human(&(1024 << 30)), "1024 GiB");
        assert_eq!(human(&0x1000), "4 KiB");
        assert_eq!(human(&0x1001), "0x1001 bytes");
        assert_eq!(human(&0), "0x0 bytes");
    }
}

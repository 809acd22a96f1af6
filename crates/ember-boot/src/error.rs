//! The error type of every fallible operation in this crate.

use vm_memory::GuestMemoryError;

/// Why loading a kernel or configuring its boot parameters failed.
///
/// Every malformed input has its own variant naming the offending value, so
/// that a user who passed a bad kernel image or command line learns what is
/// wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The image is shorter than an ELF64 header.
    #[error("kernel image is {len} bytes, too short for a 64-byte ELF64 header")]
    ElfTruncatedHeader {
        /// Length of the image in bytes.
        len: usize,
    },
    /// The image does not start with `\x7fELF`.
    #[error("kernel image has bad ELF magic {magic:02x?} (expected [7f, 45, 4c, 46])")]
    ElfBadMagic {
        /// The first four bytes of the image.
        magic: [u8; 4],
    },
    /// `EI_CLASS` is not `ELFCLASS64`.
    #[error("ELF class {class} is not ELFCLASS64 (2)")]
    ElfNotClass64 {
        /// The `EI_CLASS` byte.
        class: u8,
    },
    /// `EI_DATA` is not `ELFDATA2LSB`.
    #[error("ELF data encoding {data} is not little-endian (ELFDATA2LSB, 1)")]
    ElfNotLittleEndian {
        /// The `EI_DATA` byte.
        data: u8,
    },
    /// `e_machine` is not `EM_X86_64`.
    #[error("ELF machine {machine} is not EM_X86_64 (62)")]
    ElfWrongMachine {
        /// The `e_machine` field.
        machine: u16,
    },
    /// `e_type` is not `ET_EXEC`.
    #[error("ELF type {elf_type} is not ET_EXEC (2)")]
    ElfNotExecutable {
        /// The `e_type` field.
        elf_type: u16,
    },
    /// `e_phentsize` is not the size of an ELF64 program header.
    #[error("ELF program header entry size {phentsize} is not 56")]
    ElfBadPhentsize {
        /// The `e_phentsize` field.
        phentsize: u16,
    },
    /// `e_phnum` is `PN_XNUM`: the real count lives in a section header,
    /// which a kernel image never needs.
    #[error("ELF program header count 0xffff (PN_XNUM, extended numbering) is not supported")]
    ElfExtendedPhnum,
    /// The program header table does not lie inside the image.
    #[error(
        "ELF program header table at offset {phoff:#x} with {phnum} entries \
         does not fit in the {image_len}-byte image"
    )]
    ElfPhdrTableOutOfImage {
        /// The `e_phoff` field.
        phoff: u64,
        /// The `e_phnum` field.
        phnum: u16,
        /// Length of the image in bytes.
        image_len: usize,
    },
    /// The image has no `PT_LOAD` program header.
    #[error("ELF image has no PT_LOAD segment")]
    ElfNoLoadSegment,
    /// A segment's file bytes do not lie inside the image.
    #[error(
        "ELF segment {index} file range at offset {offset:#x} (size {filesz:#x}) \
         does not fit in the {image_len}-byte image"
    )]
    ElfSegmentOutOfImage {
        /// Index of the program header.
        index: usize,
        /// The `p_offset` field.
        offset: u64,
        /// The `p_filesz` field.
        filesz: u64,
        /// Length of the image in bytes.
        image_len: usize,
    },
    /// A segment has more file bytes than memory bytes.
    #[error("ELF segment {index} has p_filesz {filesz:#x} larger than p_memsz {memsz:#x}")]
    ElfSegmentFileszExceedsMemsz {
        /// Index of the program header.
        index: usize,
        /// The `p_filesz` field.
        filesz: u64,
        /// The `p_memsz` field.
        memsz: u64,
    },
    /// A segment's end address overflows the 64-bit address space.
    #[error("ELF segment {index} at {addr:#x} (size {size:#x}) overflows the address space")]
    ElfSegmentAddressOverflow {
        /// Index of the program header.
        index: usize,
        /// The `p_paddr` field.
        addr: u64,
        /// The `p_memsz` field.
        size: u64,
    },
    /// A segment starts below the lowest address the caller allows.
    #[error("ELF segment {index} at {addr:#x} lies below the lowest load address {lowest:#x}")]
    ElfSegmentBelowLowest {
        /// Index of the program header.
        index: usize,
        /// The `p_paddr` field.
        addr: u64,
        /// The lowest allowed address.
        lowest: u64,
    },
    /// A segment does not lie entirely inside guest memory.
    #[error("ELF segment {index} at {addr:#x} (size {size:#x}) does not fit in guest memory")]
    ElfSegmentOutsideMemory {
        /// Index of the program header.
        index: usize,
        /// The `p_paddr` field.
        addr: u64,
        /// The `p_memsz` field.
        size: u64,
    },
    /// The entry point is not inside any loaded segment.
    #[error("ELF entry point {entry:#x} is not inside any loaded segment")]
    ElfEntryOutsideSegments {
        /// The `e_entry` field.
        entry: u64,
    },
    /// A command line was created with no room even for its NUL.
    #[error("command line capacity must be at least 1 (room for the terminating NUL)")]
    CmdlineZeroCapacity,
    /// The command line, with its NUL, would exceed its limit.
    #[error("command line of {len} bytes (with NUL) exceeds the limit of {limit} bytes")]
    CmdlineTooLong {
        /// Length the command line would have, including the NUL.
        len: usize,
        /// The limit, including the NUL.
        limit: usize,
    },
    /// The text to add contains a NUL byte.
    #[error("command line text contains a NUL byte at position {position}")]
    CmdlineContainsNul {
        /// Byte position of the NUL within the added text.
        position: usize,
    },
    /// The text to add contains a byte that is not printable ASCII.
    #[error(
        "command line text contains byte {byte:#04x} at position {position}, \
         which is not printable ASCII"
    )]
    CmdlineNonPrintable {
        /// The offending byte.
        byte: u8,
        /// Byte position within the added text.
        position: usize,
    },
    /// The guest memory offers no view of its physical regions (for example
    /// memory behind an IOMMU), so no e820 map can be built.
    #[error("guest memory has no physical region map to build an e820 map from")]
    NoPhysicalMemory,
    /// No guest memory region starts at address 0.
    #[error("no guest memory region starts at address 0; the boot layout needs low memory")]
    E820NoRegionAtZero,
    /// The region at address 0 ends below 1 MiB.
    #[error("guest memory region at 0 ends at {end:#x}, below 1 MiB ({himem:#x})")]
    E820LowMemoryTooSmall {
        /// Exclusive end of the region at 0.
        end: u64,
        /// The required minimum end, [`HIMEM_START`](crate::HIMEM_START).
        himem: u64,
    },
    /// More e820 entries than the zero page can hold.
    #[error("{count} e820 entries exceed the zero page's limit of {max}")]
    E820TooManyEntries {
        /// Number of entries.
        count: usize,
        /// The limit, [`E820_MAX_ENTRIES`](crate::E820_MAX_ENTRIES).
        max: usize,
    },
    /// A range the loader must write is not inside guest memory.
    #[error("{what} at {addr:#x} (size {len:#x}) does not fit in guest memory")]
    OutsideGuestMemory {
        /// What was to be written.
        what: &'static str,
        /// Guest physical start address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Writing to guest memory failed.
    #[error("failed to write {len:#x} bytes to guest memory at {addr:#x}")]
    GuestMemoryWrite {
        /// Guest physical start address.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// The underlying guest memory error.
        #[source]
        source: GuestMemoryError,
    },
    /// The initrd has no bytes.
    #[error("the initrd is empty")]
    InitrdEmpty,
    /// No page-aligned place in guest RAM between the kernel's end and the highest
    /// address the kernel accepts holds the initrd.
    #[error(
        "initrd of {size:#x} bytes does not fit in guest RAM between {lowest:#x} and {max:#x}; give the guest more memory"
    )]
    InitrdDoesNotFit {
        /// Size of the initrd.
        size: u64,
        /// Lowest allowed address (end of the kernel).
        lowest: u64,
        /// Highest address the initrd may reach (inclusive).
        max: u64,
    },
    /// The zero page could not be read back to record the initrd.
    #[error("cannot read the zero page at {addr:#x}: {source}")]
    ZeroPageRead {
        /// Its address.
        addr: u64,
        /// The guest memory error.
        #[source]
        source: GuestMemoryError,
    },
}

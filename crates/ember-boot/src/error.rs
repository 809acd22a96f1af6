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
    /// A note in a `PT_NOTE` segment is cut off before the end of its
    /// 12-byte header.
    #[error(
        "ELF note at offset {offset:#x} of segment {segment} is truncated: \
         {remaining} bytes left, a note header needs 12"
    )]
    ElfNoteTruncated {
        /// Index of the `PT_NOTE` program header.
        segment: usize,
        /// Offset of the note within the segment.
        offset: usize,
        /// Bytes left in the segment at that offset.
        remaining: usize,
    },
    /// A note's name or descriptor runs past the end of its `PT_NOTE` segment.
    #[error(
        "ELF note at offset {offset:#x} of segment {segment} (namesz {namesz}, \
         descsz {descsz}) runs past the end of the {segment_len}-byte segment"
    )]
    ElfNoteOutOfSegment {
        /// Index of the `PT_NOTE` program header.
        segment: usize,
        /// Offset of the note within the segment.
        offset: usize,
        /// The note's `n_namesz`.
        namesz: u32,
        /// The note's `n_descsz`.
        descsz: u32,
        /// Size of the segment in bytes.
        segment_len: usize,
    },
    /// The `XEN_ELFNOTE_PHYS32_ENTRY` note's descriptor is neither 4 nor 8
    /// bytes long.
    #[error("Xen PVH entry note has a {descsz}-byte descriptor (expected 4 or 8)")]
    PvhEntryBadSize {
        /// The note's `n_descsz`.
        descsz: u32,
    },
    /// The PVH entry point does not fit in 32 bits.
    #[error("Xen PVH entry point {entry:#x} does not fit in 32 bits")]
    PvhEntryTooHigh {
        /// The entry point from the note.
        entry: u64,
    },
    /// The PVH entry point is not inside any loaded segment.
    #[error("Xen PVH entry point {entry:#x} is not inside any loaded segment")]
    ElfPvhEntryOutsideSegments {
        /// The entry point from the note.
        entry: u64,
    },
    /// The bzImage is too short for what its header says it holds.
    #[error("bzImage is {len} bytes, too short: it needs at least {needed}")]
    BzImageTruncated {
        /// Length of the image in bytes.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// `boot_flag` (offset `0x1fe`) is not `0xaa55`.
    #[error("bzImage boot_flag is {flag:#06x} (expected 0xaa55)")]
    BzBadBootFlag {
        /// The `boot_flag` field.
        flag: u16,
    },
    /// `header` (offset `0x202`) is not `"HdrS"`.
    #[error("bzImage setup header magic is {magic:02x?} (expected \"HdrS\")")]
    BzBadHeaderMagic {
        /// The four bytes at `0x202`.
        magic: [u8; 4],
    },
    /// The boot protocol version is too old.
    #[error(
        "bzImage boot protocol version {}.{} ({version:#06x}) is older than the \
         minimum {}.{} ({min:#06x}), which the 64-bit entry needs",
        .version >> 8, .version & 0xff, .min >> 8, .min & 0xff
    )]
    BzUnsupportedVersion {
        /// The `version` field.
        version: u16,
        /// The lowest supported version.
        min: u16,
    },
    /// The setup header (ending at `0x202` + the byte at `0x201`) ends
    /// before the last field the loader reads.
    #[error("bzImage setup header ends at {end:#x}, before {min:#x} (the end of init_size)")]
    BzSetupHeaderTooShort {
        /// Exclusive end of the setup header.
        end: usize,
        /// The smallest end accepted.
        min: usize,
    },
    /// The setup header runs past the room `struct boot_params` has for it.
    #[error("bzImage setup header ends at {end:#x}, past the zero page's limit {max:#x}")]
    BzSetupHeaderTooLong {
        /// Exclusive end of the setup header.
        end: usize,
        /// The largest end accepted.
        max: usize,
    },
    /// `loadflags` lacks `LOADED_HIGH`: the kernel wants to be loaded at
    /// `0x10000`, which this loader does not do.
    #[error("bzImage loadflags {loadflags:#04x} lack LOADED_HIGH (bit 0)")]
    BzNotLoadedHigh {
        /// The `loadflags` field.
        loadflags: u8,
    },
    /// `xloadflags` lacks `XLF_KERNEL_64`: there is no 64-bit entry point.
    #[error("bzImage xloadflags {xloadflags:#06x} lack XLF_KERNEL_64 (bit 0): no 64-bit entry")]
    BzNo64BitEntry {
        /// The `xloadflags` field.
        xloadflags: u16,
    },
    /// The protected-mode kernel, after `setup_sects` sectors of setup code,
    /// starts at or past the end of the image.
    #[error(
        "bzImage protected-mode kernel at offset {offset:#x} (setup_sects {setup_sects}) \
         is not inside the {image_len}-byte image"
    )]
    BzKernelOutOfImage {
        /// The effective `setup_sects` (0 read as 4).
        setup_sects: u8,
        /// Offset of the protected-mode kernel, `(setup_sects + 1) * 512`.
        offset: usize,
        /// Length of the image in bytes.
        image_len: usize,
    },
    /// The protected-mode kernel is too short to hold its 64-bit entry
    /// point at offset `0x200`.
    #[error("bzImage protected-mode kernel is {len} bytes; its 64-bit entry at 0x200 needs {min}")]
    BzKernelTooSmall {
        /// Length of the protected-mode kernel.
        len: usize,
        /// The smallest length accepted.
        min: usize,
    },
    /// The image handed to the loader is not the one that was parsed.
    #[error("bzImage of {len} bytes is not the parsed image of {expected} bytes")]
    BzImageMismatch {
        /// Length of the parsed image.
        expected: usize,
        /// Length of the image given.
        len: usize,
    },
    /// The kernel, or the memory it needs while it decompresses
    /// (`init_size`), does not fit in guest memory.
    #[error("bzImage kernel at {addr:#x} needs {size:#x} bytes, which do not fit in guest memory")]
    BzKernelOutsideMemory {
        /// Guest physical start address.
        addr: u64,
        /// Bytes needed.
        size: u64,
    },
    /// A relocatable kernel's `kernel_alignment` is not a power of two.
    #[error("bzImage kernel_alignment {alignment:#x} is not a power of two")]
    BzBadKernelAlignment {
        /// The `kernel_alignment` field.
        alignment: u32,
    },
    /// The kernel would decompress itself below 1 MiB.
    #[error("bzImage runtime start {runtime_start:#x} lies below {himem:#x}")]
    BzRuntimeBelowHimem {
        /// The kernel's runtime start address (boot.rst's algorithm).
        runtime_start: u64,
        /// [`HIMEM_START`](crate::HIMEM_START).
        himem: u64,
    },
    /// The command line is longer than the kernel's `cmdline_size`.
    #[error("command line of {len} bytes exceeds the kernel's cmdline_size of {max} bytes")]
    BzCmdlineTooLong {
        /// Length of the command line, without its NUL.
        len: usize,
        /// The kernel's `cmdline_size` (without the NUL).
        max: u32,
    },
    /// An MP table needs at least one CPU.
    #[error("an MP table needs at least one CPU")]
    MpTableNoCpus,
    /// Too many CPUs for xAPIC IDs: the IOAPIC takes the ID after the last
    /// CPU, and `0xff` is the broadcast ID.
    #[error("{num_cpus} CPUs exceed the MP table's limit of {max}")]
    MpTableTooManyCpus {
        /// The number of CPUs asked for.
        num_cpus: u8,
        /// The limit.
        max: u8,
    },
    /// The MP table would reach 1 MiB.
    #[error("MP table would end at {end:#x}, past its limit {limit:#x}")]
    MpTableTooLarge {
        /// Exclusive end of the table.
        end: u64,
        /// The limit, [`HIMEM_START`](crate::HIMEM_START).
        limit: u64,
    },
    /// ACPI tables need at least one CPU.
    #[error("ACPI tables need at least one CPU")]
    AcpiNoCpus,
    /// Too many CPUs for xAPIC IDs: the IOAPIC takes the ID after the last
    /// CPU, and `0xff` is the broadcast ID.
    #[error("{num_cpus} CPUs exceed the MADT's limit of {max}")]
    AcpiTooManyCpus {
        /// The number of CPUs asked for.
        num_cpus: u8,
        /// The limit, [`ACPI_MAX_CPUS`](crate::acpi::ACPI_MAX_CPUS).
        max: u8,
    },
    /// More devices than the DSDT can name.
    #[error("{count} ACPI devices exceed the DSDT's limit of {max}")]
    AcpiTooManyDevices {
        /// The number of devices asked for.
        count: usize,
        /// The limit, [`ACPI_MAX_DEVICES`](crate::acpi::ACPI_MAX_DEVICES).
        max: usize,
    },
    /// A virtio-mmio register window is empty or does not lie below 4 GiB
    /// (the DSDT describes it with `Memory32Fixed`).
    #[error(
        "ACPI device {index}: virtio-mmio window at {addr:#x} (size {len:#x}) \
         is empty or does not lie below 4 GiB"
    )]
    AcpiBadMmioRange {
        /// Index of the device in the list.
        index: usize,
        /// The window's address.
        addr: u64,
        /// The window's size.
        len: u64,
    },
    /// A device's GSI is not an IOAPIC pin.
    #[error("ACPI device {index}: GSI {gsi} is not one of the IOAPIC's {pins} pins")]
    AcpiBadGsi {
        /// Index of the device in the list.
        index: usize,
        /// The GSI.
        gsi: u32,
        /// Number of IOAPIC pins, [`IOAPIC_NUM_PINS`](crate::acpi::IOAPIC_NUM_PINS).
        pins: u32,
    },
    /// COM1 is listed more than once.
    #[error("ACPI device {index} is a second COM1")]
    AcpiDuplicateCom1 {
        /// Index of the second COM1 in the list.
        index: usize,
    },
    /// The S5 sleep type does not fit the 3-bit `SLP_TYP` field.
    #[error("ACPI S5 sleep type {sleep_type} exceeds the SLP_TYP field's maximum {max}")]
    AcpiBadSleepType {
        /// The sleep type asked for.
        sleep_type: u8,
        /// The limit, [`ACPI_MAX_SLEEP_TYPE`](crate::acpi::ACPI_MAX_SLEEP_TYPE).
        max: u8,
    },
    /// The ACPI tables would reach 1 MiB.
    #[error("ACPI tables would end at {end:#x}, past their limit {limit:#x}")]
    AcpiTablesTooLarge {
        /// Exclusive end of the tables (the end of the DSDT).
        end: u64,
        /// The limit, [`HIMEM_START`](crate::HIMEM_START).
        limit: u64,
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

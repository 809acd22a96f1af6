//! Where the loader puts things in guest physical memory: the addresses, defined once
//! in [`ember_arch::layout`] (which documents the whole map), that this crate uses.

pub use ember_arch::layout::{
    ACPI_DSDT_START, ACPI_FADT_START, ACPI_MADT_START, ACPI_RSDP_START, ACPI_XSDT_START,
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MPTABLE_START, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, VMM_RESERVED_SIZE, VMM_RESERVED_START, ZERO_PAGE_SIZE,
    ZERO_PAGE_START,
};

// The layout must hold together: PVH start info, module list and memory map
// in order and below the zero page (and above the vCPU crate's GDT and IDT at
// 0x500..0x600), zero page below the stack (0x8000..0x8ff0) and the page
// tables (0x9000..0xf000), command line above them and below the EBDA, EBDA
// below high memory.
const _: () = assert!(PVH_INFO_START >= 0x600);
const _: () = assert!(PVH_INFO_START + crate::HvmStartInfo::SIZE as u64 <= PVH_MODLIST_START);
const _: () = assert!(PVH_MODLIST_START + crate::HvmModlistEntry::SIZE as u64 <= PVH_MEMMAP_START);
const _: () = assert!(
    PVH_MEMMAP_START + (crate::E820_MAX_ENTRIES * crate::HvmMemmapTableEntry::SIZE) as u64
        <= ZERO_PAGE_START
);
const _: () = assert!(ZERO_PAGE_START + ZERO_PAGE_SIZE as u64 <= 0x8000);
const _: () = assert!(CMDLINE_START >= 0xf000);
const _: () = assert!(ZERO_PAGE_START + ZERO_PAGE_SIZE as u64 <= CMDLINE_START);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
const _: () = assert!(EBDA_START < HIMEM_START);
const _: () = assert!(EBDA_START <= ACPI_RSDP_START);
const _: () = assert!(
    MPTABLE_START + crate::mptable::mptable_size(crate::mptable::MPTABLE_MAX_CPUS) as u64
        <= VMM_RESERVED_START
);
const _: () = assert!(VMM_RESERVED_START + VMM_RESERVED_SIZE <= ACPI_RSDP_START);
const _: () = assert!(ACPI_RSDP_START < ACPI_XSDT_START);
const _: () = assert!(ACPI_XSDT_START < ACPI_FADT_START);
const _: () = assert!(ACPI_FADT_START < ACPI_MADT_START);
const _: () = assert!(ACPI_MADT_START < ACPI_DSDT_START);
const _: () = assert!(ACPI_DSDT_START < HIMEM_START);

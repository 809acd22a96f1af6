//! Where the loader puts things in guest physical memory.
//!
//! The map below follows the conventional PC layout that Linux expects when it
//! is entered directly at its 64-bit entry point or its 32-bit PVH entry point
//! (no firmware, no real-mode setup code). Rows marked *vCPU* are written by
//! the vCPU crate (`ember_vcpu::regs`), not by this crate; they are listed so
//! that nothing here collides with them.
//!
//! | range                               | use                                           |
//! |-------------------------------------|-----------------------------------------------|
//! | `[0, 0x500)`                        | real-mode IVT and BIOS data area: left alone  |
//! | `[0x500, 0x600)`                    | boot GDT at 0x500 (8 entries), IDT at 0x580 (*vCPU*) |
//! | `[PVH_INFO_START, +0x38)`           | PVH `hvm_start_info` (0x6000..0x6038)         |
//! | `[PVH_MODLIST_START, +0x20)`        | PVH module list, one entry (0x6040..0x6060)   |
//! | `[PVH_MEMMAP_START, +128 * 24)`     | PVH memory map (0x6080..0x6c80 at most)       |
//! | `[ZERO_PAGE_START, +4 KiB)`         | the zero page (`struct boot_params`)          |
//! | `[0x8000, 0x8ff0)`                  | boot stack, growing down from 0x8ff0 (*vCPU*) |
//! | `[0x9000, 0xf000)`                  | identity page tables: PML4, PDPT, 4 PDs (*vCPU*) |
//! | `[CMDLINE_START, +2 KiB)`           | the kernel command line, NUL-terminated       |
//! | `[EBDA_START, HIMEM_START)`         | EBDA, VGA hole and BIOS ROM: reserved in e820 |
//! | `[MPTABLE_START, +mptable_size(n))` | MP floating pointer and configuration table   |
//! | `[VMM_RESERVED_START, +64 KiB)`     | kept for the VMM (the example VMM's syscall trap pages) |
//! | `[ACPI_RSDP_START, +36)`            | ACPI RSDP (0xe0000)                           |
//! | `[ACPI_XSDT_START, +52)`            | ACPI XSDT (0xe0040; room up to 0xe0100)       |
//! | `[ACPI_FADT_START, +276)`           | ACPI FADT (0xe0100..0xe0214)                  |
//! | `[ACPI_MADT_START, +62 + 8 * n)`    | ACPI MADT (0xe0400..0xe0c2e at most)          |
//! | `[ACPI_DSDT_START, HIMEM_START)`    | ACPI DSDT, 36 bytes + its AML (0xe1000..)     |
//! | `[HIMEM_START, ...)`                | the kernel image and the rest of RAM          |
//!
//! Everything the loader writes below [`EBDA_START`] sits in conventional
//! memory that the e820 map reports as RAM. The PVH structures (used only for
//! a PVH boot) and the zero page (used only for a Linux boot) share the page
//! below the stack without overlapping, so one layout serves both protocols.
//! The MP table sits at the start of the EBDA, where Linux scans for the MP
//! floating pointer (`smp_scan_config` looks at the first KiB of the EBDA and
//! at 639 KiB); with 254 CPUs it runs past `0xa0000` into the VGA window,
//! which is still reserved and still below 1 MiB. The ACPI tables
//! ([`setup_acpi`](crate::setup_acpi)) fill the BIOS ROM area from
//! `0xe0000`: the RSDP first, where Linux's scan of `0xe0000..0x100000`
//! (16-byte steps) finds it even when no boot protocol passes its address,
//! then the fixed-size tables at fixed places, then the DSDT, the only
//! table whose size depends on the devices, with the rest of the area
//! (124 KiB) to grow into. Between the two, the option-ROM area from
//! [`VMM_RESERVED_START`] is left to the VMM: RAM in the guest's memory that
//! the e820 map reports as reserved, so the kernel never uses it. A bzImage's
//! protected-mode kernel is loaded at exactly [`HIMEM_START`].

/// Guest physical address of the zero page (`struct boot_params`).
///
/// `0x7000` is the address most KVM VMMs use: it is page aligned, in low RAM
/// that the kernel can read before it sets up its own mappings, and below the
/// command line and the EBDA. The kernel copies the page early in boot
/// (`copy_bootdata`), so it may later reuse the memory.
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Size of the zero page in bytes (`sizeof(struct boot_params)`).
pub const ZERO_PAGE_SIZE: usize = 4096;

/// Guest physical address of the kernel command line.
///
/// Placed in low RAM well above the zero page and below the EBDA, so that a
/// command line of [`CMDLINE_MAX_SIZE`] bytes fits with room to spare. The
/// zero page's `cmd_line_ptr` points here.
pub const CMDLINE_START: u64 = 0x20000;

/// Largest command line, including its terminating NUL, in bytes.
///
/// This is x86's `COMMAND_LINE_SIZE`: the kernel copies at most this many
/// bytes from `cmd_line_ptr` into `boot_command_line`.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Start of high memory (1 MiB).
///
/// x86 kernels are loaded at or above 1 MiB; below it lie the legacy PC
/// holes. [`load_elf`](crate::load_elf) is normally called with this as its
/// lowest allowed address.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the Extended BIOS Data Area.
///
/// `[EBDA_START, HIMEM_START)` covers the EBDA, the legacy VGA window and the
/// BIOS ROM area. The e820 map marks it reserved so the kernel never uses it
/// as RAM (and finds ACPI/MP tables there, if a VMM places any).
pub const EBDA_START: u64 = 0x9_fc00;

/// Guest physical address of the MP table
/// ([`setup_mptable`](crate::setup_mptable)): the start of the EBDA.
pub const MPTABLE_START: u64 = EBDA_START;

/// Guest physical address of [`VMM_RESERVED_SIZE`] bytes of RAM that the
/// loader leaves to the VMM for pages of its own that the guest must not use
/// (the example VMM keeps its syscall trap's pages there, see
/// `ember_vcpu::syscall_trap`): the legacy option-ROM area, inside the range
/// the e820 map reports as reserved, above the largest MP table and below the
/// ACPI tables. Linux only reads it, looking for ROM signatures.
pub const VMM_RESERVED_START: u64 = 0xc_0000;

/// Size of the range at [`VMM_RESERVED_START`] (64 KiB).
pub const VMM_RESERVED_SIZE: u64 = 0x1_0000;

/// Guest physical address of the ACPI RSDP
/// ([`setup_acpi`](crate::setup_acpi)): the start of the area Linux scans
/// for it, `0xe0000..0x100000`.
pub const ACPI_RSDP_START: u64 = 0xe_0000;

/// Guest physical address of the ACPI XSDT (room for 19 entries up to
/// [`ACPI_FADT_START`]).
pub const ACPI_XSDT_START: u64 = 0xe_0040;

/// Guest physical address of the ACPI FADT (276 bytes).
pub const ACPI_FADT_START: u64 = 0xe_0100;

/// Guest physical address of the ACPI MADT (at most 2094 bytes, for 254
/// vCPUs).
pub const ACPI_MADT_START: u64 = 0xe_0400;

/// Guest physical address of the ACPI DSDT, which may grow up to
/// [`HIMEM_START`].
pub const ACPI_DSDT_START: u64 = 0xe_1000;

/// Guest physical address of the PVH start info (`struct hvm_start_info`);
/// the VMM passes it to the kernel in `ebx`.
///
/// The module list and memory map follow it in the same page, below the
/// zero page: see [`PVH_MODLIST_START`] and [`PVH_MEMMAP_START`].
pub const PVH_INFO_START: u64 = 0x6000;

/// Guest physical address of the PVH module list (one `hvm_modlist_entry`,
/// for the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;

/// Guest physical address of the PVH memory map: at most
/// [`E820_MAX_ENTRIES`](crate::E820_MAX_ENTRIES) `hvm_memmap_table_entry`s.
pub const PVH_MEMMAP_START: u64 = 0x6080;

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

//! Every fixed guest physical address, I/O port and interrupt line of an Ember x86-64 VM.
//!
//! # Low memory (below 1 MiB)
//!
//! The conventional PC layout Linux expects when it is entered directly at its 64-bit
//! or its 32-bit PVH entry point (no firmware, no real-mode setup code).
//!
//! | range                                  | use                                         | written by |
//! |----------------------------------------|---------------------------------------------|------------|
//! | `[0, 0x500)`                           | real-mode IVT and BIOS data area: left alone | -         |
//! | `[BOOT_GDT_START, +64)`                | boot GDT, 8 entries                          | ember-vcpu |
//! | `[BOOT_IDT_START, +128)`               | boot IDT                                     | ember-vcpu |
//! | `[PVH_INFO_START, +0x38)`              | PVH `hvm_start_info`                         | ember-boot |
//! | `[PVH_MODLIST_START, +0x20)`           | PVH module list, one entry                   | ember-boot |
//! | `[PVH_MEMMAP_START, +128 * 24)`        | PVH memory map                               | ember-boot |
//! | `[ZERO_PAGE_START, +ZERO_PAGE_SIZE)`   | the zero page (`struct boot_params`)         | ember-boot |
//! | `[0x8000, BOOT_STACK_POINTER)`         | boot stack, growing down                     | ember-vcpu |
//! | `[PML4_START, PDE_START + 4 * 4 KiB)`  | identity page tables: PML4, PDPT, 4 PDs      | ember-vcpu |
//! | `[CMDLINE_START, +CMDLINE_MAX_SIZE)`   | the kernel command line, NUL-terminated      | ember-boot |
//! | `[EBDA_START, HIMEM_START)`            | EBDA, VGA hole, BIOS ROM: reserved in e820   | -          |
//! | `[MPTABLE_START, ...)`                 | MP floating pointer and configuration table  | ember-firmware |
//! | `[VMM_RESERVED_START, +VMM_RESERVED_SIZE)` | left to the VMM (the syscall trap's pages) | the VMM   |
//! | `[ACPI_RSDP_START, +36)`               | ACPI RSDP                                    | ember-firmware |
//! | `[ACPI_XSDT_START, ACPI_FADT_START)`   | ACPI XSDT                                    | ember-firmware |
//! | `[ACPI_FADT_START, ACPI_MADT_START)`   | ACPI FADT                                    | ember-firmware |
//! | `[ACPI_MADT_START, ACPI_DSDT_START)`   | ACPI MADT                                    | ember-firmware |
//! | `[ACPI_DSDT_START, HIMEM_START)`       | ACPI DSDT and its AML                        | ember-firmware |
//! | `[HIMEM_START, ...)`                   | the kernel image and the rest of RAM         | ember-boot |
//!
//! Everything below [`EBDA_START`] sits in conventional memory that the e820 map reports
//! as RAM; the PVH structures (PVH boots only) and the zero page (Linux boots only) share
//! the page below the stack without overlapping, so one layout serves both protocols.
//! The MP table sits at the start of the EBDA, where Linux scans for the MP floating
//! pointer. The ACPI tables fill the BIOS ROM area from `0xe0000`, where Linux's scan
//! for the RSDP finds it even when no boot protocol passes its address. Between the two,
//! the option-ROM area from [`VMM_RESERVED_START`] is RAM the e820 map reports as
//! reserved: the guest never uses it, so a VMM may keep pages of its own there.
//!
//! # The whole address space
//!
//! ```text
//! 0          3 GiB        0xD000_0000       0xFEC0_0000   4 GiB          ram_end (1 GiB aligned)
//! |- low RAM -|-- hole --|-- device MMIO --|- IOAPIC ... -|-- high RAM --| ... |-- 64-bit MMIO --|
//! ```
//!
//! RAM fills `[0, MMIO_HOLE_START)` first; whatever does not fit continues at
//! [`MMIO_HOLE_END`] (4 GiB), so 32-bit devices and the interrupt controllers keep the
//! top gigabyte. The first page of the hole is [`SYSCALL_TRAP_MMIO_START`]; device MMIO
//! windows are allocated from `[DEVICE_MMIO_START, DEVICE_MMIO_END)`; the IOAPIC, the
//! LAPICs and the pages KVM needs for real mode on Intel sit above that.
//!
//! # Interrupt lines
//!
//! The IOAPIC has [`IOAPIC_PINS`] pins; GSIs `0..LEGACY_GSI_END` belong to the legacy PC
//! devices ([`I8042_KEYBOARD_GSI`], [`COM1_GSI`], ...), and
//! `DEVICE_GSI_START..=DEVICE_GSI_END` are handed out to other devices (virtio-mmio).

/// One kibibyte.
pub const KIB: u64 = 1 << 10;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;
/// Guest page size.
pub const PAGE_SIZE: u64 = 0x1000;

// ---------------------------------------------------------------------------------------
// Low memory: boot structures.

/// Guest physical address of the boot GDT (8 entries, up to [`BOOT_IDT_START`]).
pub const BOOT_GDT_START: u64 = 0x500;
/// Guest physical address of the boot IDT.
pub const BOOT_IDT_START: u64 = 0x580;

/// Guest physical address of the PVH start info (`struct hvm_start_info`); a PVH kernel
/// gets it in `ebx`. The module list and memory map follow it in the same page.
pub const PVH_INFO_START: u64 = 0x6000;
/// Guest physical address of the PVH module list (one `hvm_modlist_entry`, the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// Guest physical address of the PVH memory map (at most 128 `hvm_memmap_table_entry`s).
pub const PVH_MEMMAP_START: u64 = 0x6080;

/// Guest physical address of the zero page (`struct boot_params`): page aligned, in low
/// RAM the kernel can read before it sets up its own mappings. The kernel copies it early
/// in boot, so it may later reuse the memory.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Size of the zero page in bytes (`sizeof(struct boot_params)`).
pub const ZERO_PAGE_SIZE: usize = 4096;

/// Initial stack pointer of a vCPU entered in 64-bit mode; the stack grows down from here
/// towards `0x8000`.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Guest physical address of the boot PML4.
pub const PML4_START: u64 = 0x9000;
/// Guest physical address of the boot PDPT.
pub const PDPTE_START: u64 = 0xa000;
/// Guest physical address of the first of the four boot page directories (identity map
/// of the first 4 GiB with 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Number of boot page directories at [`PDE_START`].
pub const PDE_COUNT: u64 = 4;

/// Guest physical address of the kernel command line, well above the zero page and below
/// the EBDA.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, including its terminating NUL: x86's `COMMAND_LINE_SIZE`.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Start of the Extended BIOS Data Area. `[EBDA_START, HIMEM_START)` (EBDA, VGA window,
/// BIOS ROM area) is reserved in the e820 map.
pub const EBDA_START: u64 = 0x9_fc00;
/// Guest physical address of the MP table: the start of the EBDA, where Linux's
/// `smp_scan_config` looks.
pub const MPTABLE_START: u64 = EBDA_START;
/// Upper bound of the MP table: with 254 vCPUs it ends below this.
pub const MPTABLE_LIMIT: u64 = VMM_RESERVED_START;

/// Guest physical address of [`VMM_RESERVED_SIZE`] bytes of RAM left to the VMM for pages
/// of its own that the guest must not use (the legacy option-ROM area, reserved in the
/// e820 map; Linux only reads it, looking for ROM signatures).
pub const VMM_RESERVED_START: u64 = 0xc_0000;
/// Size of the range at [`VMM_RESERVED_START`] (64 KiB).
pub const VMM_RESERVED_SIZE: u64 = 0x1_0000;

/// Guest physical address of the ACPI RSDP: the start of the area Linux scans for it.
pub const ACPI_RSDP_START: u64 = 0xe_0000;
/// Guest physical address of the ACPI XSDT.
pub const ACPI_XSDT_START: u64 = 0xe_0040;
/// Guest physical address of the ACPI FADT.
pub const ACPI_FADT_START: u64 = 0xe_0100;
/// Guest physical address of the ACPI MADT (room for 254 vCPUs).
pub const ACPI_MADT_START: u64 = 0xe_0400;
/// Guest physical address of the ACPI DSDT, which may grow up to [`HIMEM_START`].
pub const ACPI_DSDT_START: u64 = 0xe_1000;

/// Start of high memory (1 MiB): kernels are loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;

// ---------------------------------------------------------------------------------------
// The 32-bit MMIO hole and above.

/// Start of the 32-bit MMIO hole `[3 GiB, 4 GiB)`; no RAM is placed there.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End (exclusive) of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// A page at the start of the hole with nothing behind it, so every access exits to the
/// VMM: the syscall trap's data page is mapped here.
pub const SYSCALL_TRAP_MMIO_START: u64 = MMIO_HOLE_START;
/// Start of the window the MMIO allocator hands to devices.
pub const DEVICE_MMIO_START: u64 = 0xD000_0000;
/// End (exclusive) of the device window: below the IOAPIC.
pub const DEVICE_MMIO_END: u64 = IOAPIC_START;
/// Guest physical address of the IOAPIC (its default base).
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// Guest physical address of every local APIC (its default base).
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// Guest physical address of the identity-map page KVM uses for real mode on Intel.
pub const KVM_IDENTITY_MAP_START: u64 = 0xFFFB_C000;
/// Guest physical address of the three pages KVM uses for the real-mode TSS on Intel.
pub const KVM_TSS_START: u64 = 0xFFFB_D000;
/// Size of the 64-bit MMIO window above RAM (for PCI BARs).
pub const HIGH_MMIO_SIZE: u64 = 64 * GIB;
/// Alignment of the 64-bit MMIO window, so large BARs can be naturally aligned.
pub const HIGH_MMIO_ALIGN: u64 = GIB;

// ---------------------------------------------------------------------------------------
// I/O ports.

/// The i8042 controller's data port; its command/status port is 4 above.
pub const I8042_PORT: u16 = 0x60;
/// Size of the i8042's port range (0x60..=0x64).
pub const I8042_PORT_SIZE: u64 = 5;
/// The i8042's command/status port, the last of its range.
pub const I8042_COMMAND_PORT: u16 = I8042_PORT + (I8042_PORT_SIZE as u16 - 1);
/// The first serial port (COM1), a 16550A.
pub const COM1_PORT: u16 = 0x3f8;
/// Size of a 16550A's port range.
pub const SERIAL_PORT_SIZE: u64 = 8;
/// The debug-exit port: a byte written here ends the VM with that exit code.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Size of the debug-exit port.
pub const DEBUG_EXIT_PORT_SIZE: u64 = 1;
/// The boot-done port: the guest writes a magic value here once it has booted (next to the debug-exit port).
pub const BOOT_DONE_PORT: u16 = 0xf5;
/// Size of the boot-done port.
pub const BOOT_DONE_PORT_SIZE: u64 = 1;
/// The ACPI sleep control/status and reset registers of a hardware-reduced machine.
pub const ACPI_SHUTDOWN_PORT: u16 = 0x600;
/// Size of the ACPI shutdown register block.
pub const ACPI_SHUTDOWN_PORT_SIZE: u64 = 1;

// ---------------------------------------------------------------------------------------
// Interrupt lines.

/// Number of IOAPIC pins, and so of GSIs KVM's in-kernel IOAPIC routes.
pub const IOAPIC_PINS: u32 = 24;
/// The i8042 keyboard's GSI.
pub const I8042_KEYBOARD_GSI: u32 = 1;
/// COM1's GSI.
pub const COM1_GSI: u32 = 4;
/// First GSI not reserved for legacy PC devices.
pub const LEGACY_GSI_END: u32 = 5;
/// First GSI handed out to devices (virtio-mmio).
pub const DEVICE_GSI_START: u32 = LEGACY_GSI_END;
/// Last GSI (inclusive) handed out to devices: the IOAPIC's last pin.
pub const DEVICE_GSI_END: u32 = IOAPIC_PINS - 1;

// The layout must hold together.
const _: () = assert!(BOOT_GDT_START + 8 * 8 <= BOOT_IDT_START);
const _: () = assert!(BOOT_IDT_START + 128 <= PVH_INFO_START);
const _: () = assert!(PVH_INFO_START < PVH_MODLIST_START);
const _: () = assert!(PVH_MODLIST_START < PVH_MEMMAP_START);
const _: () = assert!(PVH_MEMMAP_START + 128 * 24 <= ZERO_PAGE_START);
const _: () = assert!(ZERO_PAGE_START + ZERO_PAGE_SIZE as u64 <= 0x8000);
const _: () = assert!(BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(PML4_START < PDPTE_START && PDPTE_START < PDE_START);
const _: () = assert!(PDE_START + PDE_COUNT * PAGE_SIZE <= CMDLINE_START);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
const _: () = assert!(MPTABLE_LIMIT <= VMM_RESERVED_START);
const _: () = assert!(VMM_RESERVED_START + VMM_RESERVED_SIZE <= ACPI_RSDP_START);
const _: () = assert!(ACPI_RSDP_START % 16 == 0);
const _: () = assert!(ACPI_RSDP_START < ACPI_XSDT_START);
const _: () = assert!(ACPI_XSDT_START < ACPI_FADT_START);
const _: () = assert!(ACPI_FADT_START < ACPI_MADT_START);
const _: () = assert!(ACPI_MADT_START < ACPI_DSDT_START);
const _: () = assert!(ACPI_DSDT_START < HIMEM_START);
const _: () = assert!(HIMEM_START < MMIO_HOLE_START);
const _: () = assert!(SYSCALL_TRAP_MMIO_START + PAGE_SIZE <= DEVICE_MMIO_START);
const _: () = assert!(DEVICE_MMIO_START < DEVICE_MMIO_END);
const _: () = assert!(IOAPIC_START < LAPIC_START);
const _: () = assert!(LAPIC_START < KVM_IDENTITY_MAP_START);
const _: () = assert!(KVM_IDENTITY_MAP_START + PAGE_SIZE <= KVM_TSS_START);
const _: () = assert!(KVM_TSS_START + 3 * PAGE_SIZE <= MMIO_HOLE_END);
const _: () = assert!(COM1_GSI < LEGACY_GSI_END && I8042_KEYBOARD_GSI < LEGACY_GSI_END);
const _: () = assert!(DEVICE_GSI_START <= DEVICE_GSI_END && DEVICE_GSI_END < IOAPIC_PINS);

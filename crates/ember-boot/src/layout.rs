//! Where the loader puts things in guest physical memory.
//!
//! The map below follows the conventional PC layout that Linux expects when it
//! is entered directly at its 64-bit entry point (no firmware, no real-mode
//! setup code):
//!
//! | range                          | use                                             |
//! |--------------------------------|-------------------------------------------------|
//! | `[0, 0x500)`                   | real-mode IVT and BIOS data area: left alone    |
//! | `[ZERO_PAGE_START, +4 KiB)`    | the zero page (`struct boot_params`)            |
//! | `[CMDLINE_START, +2 KiB)`      | the kernel command line, NUL-terminated         |
//! | `[EBDA_START, HIMEM_START)`    | EBDA, VGA hole and BIOS ROM: reserved in e820   |
//! | `[HIMEM_START, ...)`           | the kernel image and the rest of RAM            |
//!
//! Everything the loader writes below 1 MiB sits in conventional memory that
//! the e820 map reports as RAM, below the EBDA, and clear of the pages a VMM
//! conventionally uses for the boot GDT, stack and identity page tables
//! (`0x500..0x7000` and `0x8000..0x10000`), so the pieces never overlap.

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

// The layout must hold together: zero page below the command line, command
// line below the EBDA, EBDA below high memory.
const _: () = assert!(ZERO_PAGE_START + ZERO_PAGE_SIZE as u64 <= CMDLINE_START);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
const _: () = assert!(EBDA_START < HIMEM_START);

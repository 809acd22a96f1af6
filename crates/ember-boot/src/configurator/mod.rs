//! Boot-protocol configurators: they write the structures a kernel reads when it
//! is entered, after a [loader](crate::loader) has placed it.
//!
//! - [`linux`]: the Linux 64-bit boot protocol, the zero page
//!   (`struct boot_params`) and the command line, for an ELF `vmlinux` or a
//!   bzImage entered at its 64-bit entry point with `rsi` = the zero page.
//! - [`pvh`]: the PVH boot protocol, `struct hvm_start_info` with its memory
//!   map and module list, for a `vmlinux` entered at its 32-bit PVH entry point
//!   with `ebx` = the start info.
//!
//! Both take the address of the ACPI RSDP, if the VMM wrote ACPI tables, and
//! pass it to the kernel; both build the memory map with
//! [`e820_map`](crate::e820::e820_map), and check everything before they write
//! anything.

pub mod linux;
pub mod pvh;
mod rsdp;

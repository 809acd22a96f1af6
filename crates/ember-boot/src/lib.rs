//! Linux boot loader for x86-64 KVM guests.
//!
//! `ember-boot` puts a Linux kernel and its boot parameters into guest memory
//! so that a VMM can start a vCPU at one of the kernel's entry points:
//!
//! - a 64-bit ELF kernel (`vmlinux`), loaded with [`load_elf`] and entered at
//!   its 64-bit entry point with the command line ([`Cmdline`]) and zero page
//!   ([`BootParams`], with an [e820 map](e820_map)) written by
//!   [`configure_linux_boot`];
//! - the same `vmlinux` entered at its 32-bit PVH entry point
//!   ([`KernelLoad::pvh_entry`], from the Xen note found by
//!   [`find_pvh_entry`]) with the `hvm_start_info` written by
//!   [`configure_pvh_boot`];
//! - a compressed `bzImage`, parsed by [`parse_bzimage`], loaded by
//!   [`load_bzimage`] and entered at its 64-bit entry point with the zero
//!   page written by [`configure_bzimage_boot`].
//!
//! An initrd is placed by the [`initrd`] module. [`setup_mptable`]
//! describes the vCPUs and the IOAPIC to a kernel without ACPI, and
//! [`setup_acpi`] writes minimal ACPI tables (vCPUs, IOAPIC, and devices in
//! the DSDT) for kernels that find CPUs only through ACPI; the
//! `configure_*_boot` functions pass the kernel the RSDP's address. Where
//! each piece goes in guest physical memory, and why, is documented in
//! [`layout`].
//!
//! All input, above all the kernel image, is treated as untrusted: any byte
//! sequence yields either a load or a [`BootError`], never a panic, and a
//! rejected image leaves guest memory untouched.
//!
//! # Example
//!
//! ```
//! use ember_boot::{configure_linux_boot, load_elf, BootParams, Cmdline, HIMEM_START};
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! # // A minimal vmlinux-like ELF64: one PT_LOAD of 4 code bytes at 16 MiB
//! # // (with 0x1000 bytes in memory), entry point at its start.
//! # fn tiny_vmlinux() -> Vec<u8> {
//! #     let mut elf = vec![0u8; 64 + 56];
//! #     elf[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
//! #     elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
//! #     elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
//! #     elf[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // e_entry
//! #     elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
//! #     elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
//! #     elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
//! #     let ph = &mut elf[64..];
//! #     ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
//! #     ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
//! #     ph[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // p_paddr
//! #     ph[32..40].copy_from_slice(&4u64.to_le_bytes()); // p_filesz
//! #     ph[40..48].copy_from_slice(&0x1000u64.to_le_bytes()); // p_memsz
//! #     elf.extend_from_slice(&[0xf4, 0xeb, 0xfd, 0x90]); // hlt; jmp $-1; nop
//! #     elf
//! # }
//! // 64 MiB of guest RAM at guest physical address 0.
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
//!
//! // Load the kernel at or above 1 MiB.
//! let kernel = load_elf(&mem, &tiny_vmlinux(), GuestAddress(HIMEM_START))?;
//! assert_eq!(kernel.entry, GuestAddress(0x100_0000));
//! assert_eq!(kernel.end, GuestAddress(0x100_1000));
//!
//! // Write the command line and the zero page.
//! let mut cmdline = Cmdline::default();
//! cmdline.insert_str("console=ttyS0 reboot=k panic=1")?;
//! let zero_page = configure_linux_boot(&mem, &cmdline, None)?;
//!
//! // A VMM now starts the vCPU at `kernel.entry` with `rsi = zero_page`.
//! let mut page = [0u8; 4096];
//! mem.read_slice(&mut page, zero_page).unwrap();
//! let params = BootParams::from_bytes(page);
//! assert_eq!(params.boot_flag(), 0xaa55);
//! assert_eq!(params.e820_entries(), 3);
//! # Ok::<(), ember_boot::BootError>(())
//! ```
#![deny(missing_docs)]

pub mod acpi;
mod aml;
pub mod bzimage;
pub mod cmdline;
pub mod e820;
pub mod elf;
pub mod error;
mod guest;
pub mod initrd;
pub mod layout;
mod le;
pub mod linux;
pub mod mptable;
pub mod pvh;
pub mod zero_page;

#[cfg(test)]
mod testing;

pub use acpi::{
    setup_acpi, AcpiConfig, AcpiDevice, AcpiShutdown, ACPI_MAX_CPUS, ACPI_MAX_SLEEP_TYPE,
};
pub use bzimage::{
    bzimage_boot_params, configure_bzimage_boot, load_bzimage, parse_bzimage, BzImage, BzImageLoad,
};
pub use cmdline::{load_cmdline, Cmdline};
pub use e820::{e820_map, E820Entry, E820_MAX_ENTRIES, E820_RAM, E820_RESERVED};
pub use elf::{load_elf, KernelLoad};
pub use error::BootError;
pub use initrd::{load_initrd, load_initrd_below};
pub use layout::{
    ACPI_RSDP_START, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MPTABLE_START,
    PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_SIZE, ZERO_PAGE_START,
};
pub use linux::{configure_linux_boot, linux_boot_params};
pub use mptable::{mptable_size, setup_mptable, MPTABLE_MAX_CPUS};
pub use pvh::{
    configure_pvh_boot, find_pvh_entry, HvmMemmapTableEntry, HvmModlistEntry, HvmStartInfo,
    XEN_ELFNOTE_PHYS32_ENTRY,
};
pub use zero_page::BootParams;

//! Linux kernel loaders and boot protocols for x86-64 KVM guests.
//!
//! `ember-boot` puts a Linux kernel and what it reads at entry into guest memory,
//! so that a VMM can start a vCPU at one of the kernel's entry points. It is split
//! the way rust-vmm's `linux-loader` is:
//!
//! - [`loader`] places the kernel: [`loader::elf`] loads a 64-bit ELF `vmlinux`
//!   (and finds its PVH entry note), [`loader::bzimage`] parses and loads a
//!   compressed `bzImage`.
//! - [`configurator`] writes the boot protocol's structures:
//!   [`configurator::linux`] the zero page ([`zero_page::BootParams`]) and command
//!   line for the 64-bit entry (`rsi` = zero page), [`configurator::pvh`] the
//!   `hvm_start_info` for the 32-bit PVH entry (`ebx` = start info).
//! - [`cmdline`] builds the command line, [`initrd`] places an initial ramdisk,
//!   [`e820`] turns guest memory into the e820 memory map both protocols pass.
//!
//! Firmware tables (ACPI, MP table) are not here but in `ember-firmware`; the
//! configurators take the RSDP address it returns. Every fixed address comes from
//! [`ember_arch::layout`], which documents the whole guest physical map.
//!
//! Every function is generic over vm-memory's [`GuestMemory`](vm_memory::GuestMemory)
//! (re-exported as [`vm_memory`]), so any backend and bitmap works. All input, above
//! all the kernel image, is treated as untrusted: any byte sequence yields either a
//! load or an error naming the bad value (each module has its own error type;
//! [`Error`] wraps them all for `?`), never a panic, and a rejected image or
//! configuration leaves guest memory untouched.
//!
//! # Example
//!
//! ```
//! use ember_arch::layout::HIMEM_START;
//! use ember_boot::cmdline::Cmdline;
//! use ember_boot::configurator::linux::configure_linux_boot;
//! use ember_boot::initrd::load_initrd;
//! use ember_boot::loader::elf::load_elf;
//! use ember_boot::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//! use ember_boot::zero_page::BootParams;
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
//! // Write the command line and the zero page (no ACPI tables: no RSDP), then an
//! // initrd above the kernel, recorded in the zero page.
//! let mut cmdline = Cmdline::default();
//! cmdline.insert_str("console=ttyS0 reboot=k panic=1")?;
//! let zero_page = configure_linux_boot(&mem, &cmdline, None)?;
//! let initrd = load_initrd(&mem, zero_page, b"070701", kernel.end)?;
//!
//! // A VMM now starts the vCPU at `kernel.entry` with `rsi = zero_page`.
//! let mut page = [0u8; 4096];
//! mem.read_slice(&mut page, zero_page).unwrap();
//! let params = BootParams::from_bytes(page);
//! assert_eq!(params.boot_flag(), 0xaa55);
//! assert_eq!(params.e820_entries(), 3);
//! assert_eq!(params.ramdisk_image(), initrd.0);
//! # Ok::<(), ember_boot::Error>(())
//! ```
#![deny(missing_docs)]

pub mod cmdline;
pub mod configurator;
pub mod e820;
mod error;
mod guest;
pub mod initrd;
mod le;
pub mod loader;
pub mod zero_page;

#[cfg(test)]
mod testing;

pub use vm_memory;

pub use cmdline::{Cmdline, CmdlineError};
pub use configurator::linux::{configure_bzimage_boot, configure_linux_boot, LinuxBootError};
pub use configurator::pvh::{configure_pvh_boot, PvhError};
pub use e820::{e820_map, E820Entry, E820Error};
pub use error::Error;
pub use guest::GuestWriteError;
pub use initrd::InitrdError;
pub use loader::bzimage::{load_bzimage, parse_bzimage, BzImage, BzImageError, BzImageLoad};
pub use loader::elf::{find_pvh_entry, load_elf, ElfError, KernelLoad};
pub use zero_page::{BootParams, ZeroPageError};

/// The README's example, compiled and run as a doc test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

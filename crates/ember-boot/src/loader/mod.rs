//! Kernel loaders: they validate a kernel image and copy it into guest memory,
//! and say where to enter it.
//!
//! - [`elf`]: a 64-bit ELF `vmlinux`, loaded at its segments' physical
//!   addresses; also reads the PVH entry point from its Xen note.
//! - [`bzimage`]: a compressed `bzImage`, whose protected-mode kernel is loaded
//!   at 1 MiB and entered at its 64-bit entry point.
//!
//! A loader only places the kernel. The structures the kernel reads at entry
//! (zero page, `hvm_start_info`, command line) are written by the
//! [configurators](crate::configurator), the initrd by [`initrd`](crate::initrd).

pub mod bzimage;
pub mod elf;

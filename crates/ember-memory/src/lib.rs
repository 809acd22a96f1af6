//! Guest memory for x86-64 KVM virtual machines: the physical memory map, RAM backed by
//! [vm-memory](vm_memory), and allocators for MMIO windows and
//! interrupt lines (GSIs).
//!
//! * [`MemoryLayout`] places RAM below the 32-bit MMIO hole `[3 GiB, 4 GiB)` and above
//!   4 GiB, and names the device and 64-bit MMIO windows.
//! * [`create_guest_memory`] maps host memory for the layout, optionally with huge pages;
//!   [`create_guest_memory_with_bitmap`] does the same with a dirty-page bitmap
//!   (vm-memory's `AtomicBitmap`) for snapshots and migration.
//! * [`AddressAllocator`] and [`GsiAllocator`] hand out MMIO ranges and GSIs without
//!   overlaps.
//! * Snapshots: [`write_memory_file`] saves all of guest RAM to a memory file,
//!   [`write_dirty_pages`] only the pages a [`DirtyBitmap`] marks (a diff, with holes
//!   elsewhere), and [`map_guest_memory_file`] maps a memory file back as guest RAM,
//!   lazily and privately.
//!
//! ```
//! use ember_memory::vm_memory::{Bytes, GuestAddress};
//! use ember_memory::{create_guest_memory, AddressAllocator, GsiAllocator, HugePages};
//! use ember_memory::{MemoryLayout, MIB};
//!
//! let layout = MemoryLayout::new(512 * MIB)?;
//! let mem = create_guest_memory(&layout, HugePages::None)?;
//! mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))?;
//! assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000))?, 0xdead_beef);
//!
//! // MMIO ranges for devices come from the window inside the 32-bit hole.
//! let (base, size) = layout.device_mmio_window();
//! let mut mmio = AddressAllocator::new(base, size)?;
//! let regs = mmio.allocate(0x1000, 0x1000)?;
//! assert_eq!(regs, GuestAddress(0xD000_0000));
//!
//! // IOAPIC pins 0-4 belong to legacy devices; the rest are handed out.
//! use ember_arch::layout::{DEVICE_GSI_END, DEVICE_GSI_START};
//! let mut gsis = GsiAllocator::new(DEVICE_GSI_START, DEVICE_GSI_END)?;
//! assert_eq!(gsis.allocate()?, 5);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

mod allocator;
pub mod checked_write;
mod dirty;
mod error;
mod guest;
mod layout;
mod memory_file;

pub use allocator::{AddressAllocator, GsiAllocator};
pub use dirty::DirtyBitmap;
pub use error::MemoryError;
pub use guest::{create_guest_memory, create_guest_memory_with_bitmap, HugePages, HUGE_PAGE_SIZE};
pub use layout::{
    MemoryLayout, DEVICE_MMIO_END, DEVICE_MMIO_START, GIB, HIGH_MMIO_ALIGN, HIGH_MMIO_SIZE,
    MAX_RAM_SIZE, MIB, MIN_RAM_SIZE, MMIO_HOLE_END, MMIO_HOLE_START, PAGE_SIZE,
};
pub use memory_file::{map_guest_memory_file, write_dirty_pages, write_memory_file};
/// The vm-memory crate this crate is built on, so users get the matching version.
pub use vm_memory;

/// The README's example, compiled and run as a doc test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

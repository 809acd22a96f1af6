//! The x86-64 machine that Ember's crates build: where everything lives in the guest's
//! physical address space, in its I/O port space and on its interrupt lines.
//!
//! Every fixed guest address that more than one place needs is defined once, in
//! [`layout`]; the loaders (`ember-boot`), the firmware tables (`ember-firmware`), guest
//! memory (`ember-memory`), the VM (`ember-vm`), the vCPUs (`ember-vcpu`) and the
//! devices take their addresses from here, so two crates can never disagree about where
//! the IOAPIC is. This crate has no dependencies.
//!
//! ```
//! use ember_arch::layout;
//!
//! // The kernel goes at 1 MiB, above the boot structures and the BIOS area.
//! assert!(layout::CMDLINE_START + layout::CMDLINE_MAX_SIZE as u64 <= layout::EBDA_START);
//! assert_eq!(layout::HIMEM_START, 0x10_0000);
//! // Device MMIO windows are allocated below the IOAPIC.
//! assert!(layout::DEVICE_MMIO_END <= layout::IOAPIC_START);
//! ```

#![no_std]
#![deny(missing_docs)]

pub mod layout;

/// The README's example, compiled and run as a doc test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

//! Firmware tables for x86-64 KVM guests: ACPI and the MP table.
//!
//! A guest kernel learns the machine's CPUs, interrupt controllers and platform
//! devices from tables the firmware leaves in memory. Ember has no firmware, so the
//! VMM writes them before it starts the kernel:
//!
//! - [`acpi::setup_acpi`] writes minimal, hardware-reduced ACPI tables (RSDP, XSDT,
//!   FADT, MADT, DSDT) and returns the RSDP's address, which `ember-boot`'s boot
//!   configurators pass to the kernel.
//! - The DSDT is open: each device describes itself by implementing the [`aml::Aml`]
//!   trait (as Cloud Hypervisor's devices do), built from the AML blocks in [`aml`]
//!   (names, devices, `_HID`, `_CRS` resource templates with I/O ports, 32-bit
//!   memory windows and interrupts, packages). [`devices`] has ready-made
//!   descriptions of what Ember's VMM uses: a 16550 serial port and virtio-mmio
//!   transports; [`acpi::AcpiShutdown`] is the power-off and reset register with its
//!   `\_S5_` object.
//! - [`mptable::setup_mptable`] writes an Intel MultiProcessor Specification table
//!   for kernels that find CPUs that way.
//!
//! This is the counterpart of rust-vmm's `acpi_tables` crate and of the MP table
//! writers in Firecracker and Cloud Hypervisor. Every table goes where
//! [`ember_arch::layout`] says; every function is generic over vm-memory's
//! [`GuestMemory`](vm_memory::GuestMemory) (re-exported as [`vm_memory`]), checks
//! its whole input and target range before it writes anything, and fails with its
//! module's error ([`Error`] wraps them all).
//!
//! # Example
//!
//! A machine with two vCPUs, COM1, one virtio-mmio device and a device of the VMM's
//! own:
//!
//! ```
//! use ember_arch::layout::ACPI_FADT_START;
//! use ember_firmware::acpi::{setup_acpi, AcpiConfig};
//! use ember_firmware::aml::{Aml, Device, EisaId, Name, NameSeg};
//! use ember_firmware::devices::{Serial16550, VirtioMmio};
//! use ember_firmware::mptable::setup_mptable;
//! use ember_firmware::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! /// A device with nothing but a hardware ID.
//! struct Beeper;
//!
//! impl Aml for Beeper {
//!     fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
//!         const NAME: NameSeg = match NameSeg::new(b"BEEP") {
//!             Ok(name) => name,
//!             Err(_) => panic!("not a NameSeg"),
//!         };
//!         const HID: EisaId = match EisaId::new(b"PNP0800") {
//!             Ok(id) => id,
//!             Err(_) => panic!("not an EISA ID"),
//!         };
//!         Device::new(NAME, &[&Name::new(NameSeg::HID, &HID)]).append_aml_bytes(bytes);
//!     }
//! }
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
//! let disk = VirtioMmio::new(0, 0xd000_0000, 0x1000, 5)?;
//! setup_mptable(&mem, 2)?;
//! let rsdp = setup_acpi(
//!     &mem,
//!     &AcpiConfig {
//!         num_cpus: 2,
//!         devices: &[&Serial16550::COM1, &disk, &Beeper],
//!         shutdown: None,
//!     },
//! )?;
//!
//! // The DSDT (at the address the FADT gives in X_DSDT, offset 140) holds all three.
//! let dsdt: u64 = mem.read_obj(GuestAddress(ACPI_FADT_START + 140)).unwrap();
//! let len: u32 = mem.read_obj(GuestAddress(dsdt + 4)).unwrap();
//! let mut table = vec![0u8; len as usize];
//! mem.read_slice(&mut table, GuestAddress(dsdt)).unwrap();
//! for name in [b"COM1", b"V000", b"BEEP"] {
//!     assert!(table.windows(4).any(|w| w == name));
//! }
//! assert_eq!(rsdp, GuestAddress(0xe_0000));
//! # Ok::<(), ember_firmware::Error>(())
//! ```
#![deny(missing_docs)]

pub mod acpi;
pub mod aml;
pub mod devices;
mod guest;
mod le;
pub mod mptable;

#[cfg(test)]
mod testing;

pub use vm_memory;

pub use acpi::{setup_acpi, AcpiConfig, AcpiError, AcpiShutdown};
pub use aml::{Aml, AmlError};
pub use devices::DescriptionError;
pub use guest::GuestWriteError;
pub use mptable::{setup_mptable, MpTableError};

/// Any error of this crate: each module's own error, wrapped unchanged (its message
/// is the module error's message), so that a caller writing all the tables in one
/// function can use `?` throughout.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// The MP table could not be written.
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    /// An AML building block could not be made.
    #[error(transparent)]
    Aml(#[from] AmlError),
    /// A ready-made device description was refused.
    #[error(transparent)]
    Description(#[from] DescriptionError),
}

/// The README's example, compiled and run as a doc test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

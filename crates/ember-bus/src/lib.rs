//! PIO and MMIO buses for a KVM virtual machine monitor.
//!
//! A [`Bus`] maps address ranges to devices implementing [`BusDevice`]. The vCPU run loop
//! hands every port-I/O or MMIO exit to [`BusHandle::read`] or [`BusHandle::write`] (one
//! [`BusHandle`] per vCPU thread, from [`Bus::handle`]) or to [`Bus::read`] /
//! [`Bus::write`], which find the device claiming the address and call it with the
//! offset from the device's base.
//!
//! * **No global lock on the exit path.** The device table is an immutable snapshot
//!   swapped atomically on insert/remove (read-copy-update). A [`BusHandle`] caches the
//!   snapshot: its lookup is one relaxed atomic load (is the cache current?) plus a
//!   binary search, with nothing written to shared memory. Devices do their own
//!   locking, so two vCPUs touching two devices never contend.
//! * **Guest input is checked.** Access widths must be 1, 2, 4 (or 8 on MMIO) bytes and
//!   the access must lie inside one device. Reads of unclaimed addresses return all
//!   ones, writes there are dropped; both are counted ([`Bus::stats`]).
//! * **No allocation per access.**
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use ember_bus::{Bus, BusDevice, BusKind};
//!
//! /// A one-byte scratch register.
//! #[derive(Default)]
//! struct Scratch(Mutex<u8>);
//!
//! impl BusDevice for Scratch {
//!     fn read(&self, _offset: u64, data: &mut [u8]) {
//!         data.fill(*self.0.lock().unwrap());
//!     }
//!     fn write(&self, _offset: u64, data: &[u8]) {
//!         *self.0.lock().unwrap() = data[0];
//!     }
//! }
//!
//! let bus = Bus::new(BusKind::Pio);
//! bus.insert(0x80, 1, Arc::new(Scratch::default())).unwrap();
//! bus.write(0x80, &[0x42]).unwrap();
//! let mut byte = [0u8; 1];
//! bus.read(0x80, &mut byte).unwrap();
//! assert_eq!(byte, [0x42]);
//!
//! // Nobody lives at 0x81: the guest reads all ones and the miss is counted.
//! assert!(bus.read(0x81, &mut byte).is_err());
//! assert_eq!(byte, [0xff]);
//! assert_eq!(bus.stats().unclaimed_reads, 1);
//!
//! // On a vCPU thread: a handle of its own, same results, faster.
//! let mut pio = bus.handle();
//! pio.write(0x80, &[0x43]).unwrap();
//! pio.read(0x80, &mut byte).unwrap();
//! assert_eq!(byte, [0x43]);
//! ```

#![deny(missing_docs)]

mod bus;
mod device;

pub use bus::{Bus, BusError, BusHandle, BusKind, BusStats};
pub use device::BusDevice;

/// The README's example, compiled and run as a doc test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

//! Virtio for Ember VMMs.
//!
//! * [`VirtioDevice`]: what a device implements, once, independent of the transport.
//! * [`mmio`]: the virtio-mmio (version 2, virtio 1.x) transport, an
//!   [`ember_bus::BusDevice`] that owns the registers and the device status state
//!   machine and hands validated queues to the device.
//! * [`worker`]: the thread that serves an activated device's queues (notifications,
//!   EVENT_IDX, work budgets, clean stop); a device supplies a [`worker::QueueHandler`].
//! * [`chain`]: bounded, validating walks over descriptor chains and copies to and from
//!   the buffers they describe.
//!
//! The rust-vmm crates in this API are re-exported ([`virtio_queue`], [`vm_memory`],
//! [`vmm_sys_util`]) so that users get matching versions.
//!
//! # Guest memory
//!
//! Transports and devices are generic over how guest memory is held: any vm-memory
//! [`GuestAddressSpace`](vm_memory::GuestAddressSpace) `M`, as in rust-vmm's
//! vm-virtio. `Arc<GuestMemoryMmap<B>>` is the plain choice;
//! `GuestMemoryAtomic<GuestMemoryMmap<B>>` lets the VMM swap the memory map (hotplug),
//! and a device's worker sees the new map at its next wake-up. The bitmap `B` is `()`
//! for no dirty-page tracking, or `AtomicBitmap` to record the pages devices write (for
//! snapshots and live migration): writes through vm-memory mark them, and a device that
//! writes through host pointers (a `preadv(2)` into guest memory) marks them itself.
//!
//! A device implements [`VirtioDevice`] (what does not depend on `M`) and
//! [`ActivateDevice<M>`](ActivateDevice), normally for every `M`.
//!
//! # Example
//!
//! A transport on an MMIO bus, driven the way a guest driver would:
//!
//! ```
//! use std::sync::Arc;
//!
//! use ember_bus::{Bus, BusKind};
//! use ember_virtio::mmio::{reg, status, MmioTransport, MMIO_WINDOW_SIZE};
//! use ember_virtio::vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap};
//! use ember_virtio::vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
//! use ember_virtio::{ActivateDevice, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1};
//!
//! /// An entropy device with one queue; it only counts its activations.
//! #[derive(Default)]
//! struct TinyRng {
//!     activations: usize,
//! }
//!
//! impl VirtioDevice for TinyRng {
//!     fn device_type(&self) -> u32 {
//!         ember_virtio::device_type::RNG
//!     }
//!     fn queue_max_sizes(&self) -> &[u16] {
//!         &[256]
//!     }
//!     fn device_features(&self) -> u64 {
//!         VIRTIO_F_VERSION_1
//!     }
//!     fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
//!     fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
//!     fn reset(&mut self) {}
//! }
//!
//! impl<M: GuestAddressSpace> ActivateDevice<M> for TinyRng {
//!     fn activate(&mut self, activation: Activation<M>) -> Result<(), ActivateError> {
//!         assert_eq!(activation.queues.len(), 1);
//!         self.activations += 1;
//!         Ok(())
//!     }
//! }
//!
//! let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
//! let irq = EventFd::new(EFD_NONBLOCK).unwrap();
//! let transport = Arc::new(MmioTransport::new(Box::new(TinyRng::default()), mem, irq).unwrap());
//! // A VMM registers these as KVM ioeventfds at base + QUEUE_NOTIFY_OFFSET.
//! assert_eq!(transport.queue_notify_events().len(), 1);
//!
//! const BASE: u64 = 0xd000_0000;
//! let bus = Bus::new(BusKind::Mmio);
//! bus.insert(BASE, MMIO_WINDOW_SIZE, transport.clone()).unwrap();
//!
//! let read = |offset: u64| {
//!     let mut data = [0u8; 4];
//!     bus.read(BASE + offset, &mut data).unwrap();
//!     u32::from_le_bytes(data)
//! };
//! let write = |offset: u64, value: u32| bus.write(BASE + offset, &value.to_le_bytes()).unwrap();
//!
//! assert_eq!(read(reg::MAGIC_VALUE), 0x7472_6976);
//! assert_eq!(read(reg::VERSION), 2);
//! assert_eq!(read(reg::DEVICE_ID), 4);
//!
//! write(reg::STATUS, status::ACKNOWLEDGE);
//! write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
//! write(reg::DEVICE_FEATURES_SEL, 1);
//! let high = read(reg::DEVICE_FEATURES);
//! assert_eq!(high, 1, "VIRTIO_F_VERSION_1 is bit 32");
//! write(reg::DRIVER_FEATURES_SEL, 1);
//! write(reg::DRIVER_FEATURES, high);
//! let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
//! write(reg::STATUS, features_ok);
//! assert_eq!(read(reg::STATUS), features_ok);
//!
//! // Queue 0: 256 entries, rings in guest memory.
//! write(reg::QUEUE_SEL, 0);
//! assert_eq!(read(reg::QUEUE_NUM_MAX), 256);
//! write(reg::QUEUE_NUM, 256);
//! write(reg::QUEUE_DESC_LOW, 0x1000);
//! write(reg::QUEUE_DESC_HIGH, 0);
//! write(reg::QUEUE_DRIVER_LOW, 0x2000);
//! write(reg::QUEUE_DRIVER_HIGH, 0);
//! write(reg::QUEUE_DEVICE_LOW, 0x3000);
//! write(reg::QUEUE_DEVICE_HIGH, 0);
//! write(reg::QUEUE_READY, 1);
//! write(reg::STATUS, features_ok | status::DRIVER_OK);
//! assert!(transport.is_activated());
//!
//! // Status 0 resets the device; it can be set up again.
//! write(reg::STATUS, 0);
//! assert!(!transport.is_activated());
//! assert_eq!(read(reg::STATUS), 0);
//! ```

#![deny(missing_docs)]

pub mod chain;
mod device;
pub mod mmio;
pub mod state;
pub mod worker;

pub use device::{
    device_type, ActivateDevice, ActivateError, Activation, ActiveQueue, InterruptKind, PauseError,
    ThreadHook, ThreadSpawner, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
pub use mmio::{
    MmioTransport, TransportError, TransportStats, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET,
};
pub use state::{MmioQueueState, MmioTransportState, QueueState};

/// The bus crate whose `BusDevice` the transport implements.
pub use ember_bus;
/// The rate limiter crate whose saved states [`VirtioDevice`] devices give and take.
pub use ember_rate_limiter;
/// The virtio-queue crate this crate is built on (its `Queue` is in [`ActiveQueue`]).
pub use virtio_queue;
/// The vm-memory crate this crate is built on (guest memory, [`Activation::mem`]).
pub use vm_memory;
/// The vmm-sys-util crate this crate is built on (the `EventFd`s of the API).
pub use vmm_sys_util;

/// The README's example, compiled and run as a doc test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

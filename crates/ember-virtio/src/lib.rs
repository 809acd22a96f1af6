//! Virtio for Ember VMMs.
//!
//! * [`VirtioDevice`]: what a device implements, once, independent of the transport.
//! * [`mmio`]: the virtio-mmio (version 2, virtio 1.x) transport, an
//!   [`ember_bus::BusDevice`] that owns the registers and the device status state
//!   machine and hands validated queues to the device.

#![deny(missing_docs)]

mod device;

pub use device::{
    device_type, ActivateError, Activation, ActiveQueue, InterruptKind, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

//! Virtio devices for Ember VMMs: [`Block`] (virtio-blk on a raw file), [`Net`] (virtio-net on a tap
//! interface) and [`Rng`] (virtio-rng on `getrandom(2)`).
//!
//! Each implements [`ember_virtio::VirtioDevice`], so any transport can carry it. When the
//! driver sets DRIVER_OK, [`ActivateDevice::activate`](ember_virtio::ActivateDevice::activate)
//! starts one worker thread per device, named `ember-virtio-<type>`, that waits with
//! epoll on the queues' notify eventfds (and the tap); `reset` stops and joins it.
//!
//! Everything a descriptor chain says is guest-controlled and checked: lengths are summed
//! with overflow checks, every buffer is checked against guest memory before use, host
//! allocations are bounded (at most [`MAX_CHAIN_SEGMENTS`] segments per chain, reused
//! per queue; net's fixed bounce buffers; block moves data between the disk and guest
//! memory directly, with `preadv(2)`/`pwritev(2)`), chain walks are bounded by virtio-queue, and each wake-up handles at
//! most a queue's worth of chains before looking at other events. A malformed request
//! completes with an error status when it has a writable status byte, and otherwise
//! with used length 0; the device keeps working either way.
//!
//! The per-request logic is in plain functions ([`block::process_request`],
//! [`rng::process_request`], [`net::process_tx_chain`], [`net::process_rx`]) that tests
//! and fuzzers call without threads.
//!
//! Guest memory is whatever the transport holds: the devices implement
//! [`ActivateDevice<M>`](ember_virtio::ActivateDevice) for every vm-memory
//! [`GuestAddressSpace`](vm_memory::GuestAddressSpace) `M` (block: whose memory is
//! host-mapped, as `GuestMemoryMmap` is), so `Arc<GuestMemoryMmap<AtomicBitmap>>` gives
//! dirty-page tracking of everything they write, and `GuestMemoryAtomic<..>` memory
//! hotplug.
//!
//! ```
//! use std::sync::Arc;
//!
//! use ember_virtio_devices::ember_virtio::MmioTransport;
//! use ember_virtio_devices::vm_memory::bitmap::AtomicBitmap;
//! use ember_virtio_devices::vm_memory::{GuestAddress, GuestMemoryMmap};
//! use ember_virtio_devices::Rng;
//! use ember_virtio_devices::ember_virtio::vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
//!
//! // Guest memory that records the pages devices write.
//! let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
//! let irq = EventFd::new(EFD_NONBLOCK)?;
//! let rng = MmioTransport::new(Box::new(Rng::new()), Arc::new(mem), irq)?;
//! assert_eq!(rng.device_type(), ember_virtio_devices::ember_virtio::device_type::RNG);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub mod block;
mod error;
mod limited;
pub mod net;
pub mod rng;
pub mod tap;

pub use block::{Block, BlockOptions, Disk};
pub use ember_virtio::chain::MAX_CHAIN_SEGMENTS;
pub use net::{Net, NetBackend};
pub use rng::Rng;
pub use tap::Tap;

pub use error::VirtioDeviceError;

/// The ember-virtio crate whose [`VirtioDevice`](ember_virtio::VirtioDevice) trait the
/// devices implement.
pub use ember_virtio;
/// The virtio-queue crate of the per-request functions' signatures.
pub use virtio_queue;
/// The vm-memory crate of the per-request functions' signatures.
pub use vm_memory;

/// Virtio device queue size limit used by all Ember devices.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// Copies the part of `config` that `offset..offset + data.len()` overlaps into the
/// start of `data`; bytes outside the configuration space are left untouched.
fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    let Some(avail) = config.len().checked_sub(start) else {
        return;
    };
    let n = avail.min(data.len());
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
mod testutil;

#[cfg(test)]
mod tests {
    use super::read_config_bytes;

    #[test]
    fn config_reads_clip_to_the_space() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0xff, 0xff]);
        let mut data = [0xffu8; 2];
        read_config_bytes(&config, 4, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        let mut data = [0u8; 1];
        read_config_bytes(&config, 0, &mut data);
        assert_eq!(data, [1]);
    }
}

/// The README's example, compiled and run as a doc test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

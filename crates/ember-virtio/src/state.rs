//! Saved state of the virtio-mmio transport and its queues, for snapshots: plain data
//! with serde support, produced by [`MmioTransport::save_state`] and consumed by
//! [`MmioTransport::restore_state`].
//!
//! Everything here is untrusted when it comes back from a file:
//! [`MmioTransport::restore_state`] checks it against the device and guest memory and
//! refuses what does not fit, with an error naming the value.
//!
//! [`MmioTransport::save_state`]: crate::MmioTransport::save_state
//! [`MmioTransport::restore_state`]: crate::MmioTransport::restore_state

use ember_rate_limiter::RateLimiterState;
use serde::{Deserialize, Serialize};

/// A serde mirror of virtio-queue's [`QueueState`](virtio_queue::QueueState): a queue's
/// configuration and its ring positions, with `From` conversions both ways.
///
/// ```
/// use ember_virtio::virtio_queue::{self, Queue, QueueT};
/// use ember_virtio::QueueState;
///
/// let mut queue = Queue::new(256)?;
/// queue.set_next_avail(7);
/// queue.set_next_used(6);
/// let saved = QueueState::from(queue.state());
/// assert_eq!((saved.next_avail, saved.next_used), (7, 6));
/// let back = Queue::try_from(virtio_queue::QueueState::from(saved))?;
/// assert_eq!(back.next_used(), 6);
/// # Ok::<(), virtio_queue::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// The maximum size the device offers.
    pub max_size: u16,
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
    /// Whether `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// Whether the queue is ready.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueState {
    fn from(s: virtio_queue::QueueState) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueState> for virtio_queue::QueueState {
    fn from(s: QueueState) -> Self {
        virtio_queue::QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// One queue of a saved [`MmioTransportState`]: the registers the driver wrote and, if
/// the device was running with this queue, the device's queue (ring positions
/// included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioQueueState {
    /// QueueNum: 0 until the driver wrote a valid size.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc; `None` if the driver never wrote it.
    pub desc: Option<u64>,
    /// QueueDriver (the available ring); `None` if the driver never wrote it.
    pub avail: Option<u64>,
    /// QueueDevice (the used ring); `None` if the driver never wrote it.
    pub used: Option<u64>,
    /// The device's queue, with `next_avail`, `next_used` and EVENT_IDX: `Some` for the
    /// queues the device was activated with.
    pub active: Option<QueueState>,
}

/// The saved state of an [`MmioTransport`](crate::MmioTransport): every register the
/// driver can change, the interrupt status, the configuration generation, and each
/// queue. Taken while the device is paused ([`MmioTransport::pause`]); restored into a
/// new transport built on the same kind of device.
///
/// [`MmioTransport::pause`]: crate::MmioTransport::pause
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The virtio device ID: a restore onto another kind of device is refused.
    pub device_type: u32,
    /// The device's queue maximum sizes (their number is the queue count): a restore
    /// onto a device with other queues is refused.
    pub queue_max_sizes: Vec<u16>,
    /// Device status.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted (or is writing).
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// SHMSel.
    pub shm_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration as the driver last could read it.
    pub config_generation: u32,
    /// Whether the device was activated (DRIVER_OK succeeded).
    pub activated: bool,
    /// One per device queue, in index order.
    pub queues: Vec<MmioQueueState>,
    /// The levels of the device's rate limiters
    /// ([`VirtioDevice::save_rate_limiters`](crate::VirtioDevice::save_rate_limiters));
    /// none when a self-describing format (JSON) leaves them out.
    #[serde(default)]
    pub rate_limiters: Vec<RateLimiterState>,
}

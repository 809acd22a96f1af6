//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2), modern interface only.
//!
//! [`MmioTransport`] is an [`ember_bus::BusDevice`] covering a [`MMIO_WINDOW_SIZE`] window:
//! the registers below `0x100`, the device's configuration space from `0x100`. It owns
//! the driver-visible state (feature selection, queue set-up, device status) and checks
//! every guest write against the status state machine; the device only sees validated
//! queues, once, when the driver sets DRIVER_OK.
//!
//! # Wiring it into a VMM
//!
//! * Insert the transport on the MMIO bus at `base` with length [`MMIO_WINDOW_SIZE`].
//! * Register the `irq` [`EventFd`] given to [`MmioTransport::new`] as a KVM irqfd for
//!   the device's GSI; the transport writes it on every interrupt.
//! * For each `(index, evt)` of [`MmioTransport::queue_notify_events`], register
//!   `KVM_IOEVENTFD` at `base +` [`QUEUE_NOTIFY_OFFSET`], 4 bytes, datamatch `index`.
//!   Without it, QueueNotify writes still reach the device (the transport signals the
//!   same `EventFd`), at the cost of a VM exit handled on the vCPU thread.
//!
//! # Guest input
//!
//! Registers need 4-byte aligned 32-bit accesses; configuration space takes any width.
//! Bad widths, unknown offsets, reads of write-only and writes of read-only registers
//! read as 0 or are dropped; writes a register's rules refuse (wrong status stage,
//! invalid queue size...) are dropped. All are counted in [`TransportStats`] and logged
//! (bad widths and unknown registers as warnings, refused writes at debug level), at
//! most 10 lines per 5 s for each kind and transport (`ember_rate_limiter`'s
//! `warn_limited!`, under the transport's own [`LogSource`], which its register
//! accesses and its device's worker threads enter), with a count of the lines
//! suppressed: a guest cannot flood the host's log, nor use up one device's lines by
//! flooding another. Nothing a guest writes can panic the transport.
//!
//! # Pause, snapshot, restore
//!
//! [`MmioTransport::pause`] stops the device's worker after the request in flight and
//! keeps its queues; [`MmioTransport::resume`] starts it again with them.
//! [`MmioTransport::save_state`] (while paused) returns a serde
//! [`MmioTransportState`](crate::MmioTransportState); [`MmioTransport::restore_state`]
//! puts it into a new transport built on the same kind of device, and the device carries
//! on from the saved ring positions.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ember_rate_limiter::log_limit::LogSource;
use ember_rate_limiter::{error_limited, warn_limited};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemory, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::device::{
    device_type, ActivateDevice, Activation, ActiveQueue, InterruptKind, PauseError, ThreadHook,
    ThreadSpawner, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Size of the MMIO window a transport occupies: registers and configuration space.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// Offset of QueueNotify, for a VMM registering `KVM_IOEVENTFD`s (datamatch: the queue
/// index, 4 bytes).
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// MagicValue: "virt", little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The virtio-mmio version this transport implements (the modern interface).
pub const MMIO_VERSION: u32 = 2;
/// VendorID reported to the driver: "EMBR" in little-endian byte order.
pub const VENDOR_ID: u32 = 0x5242_4d45;

/// The largest queue size the split virtqueue format allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// InterruptStatus bit: the device used buffers in at least one queue.
pub const INTERRUPT_USED_BUFFER: u32 = 1 << 0;
/// InterruptStatus bit: the device's configuration changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = 1 << 1;

/// Register offsets in the window (virtio 1.2, section 4.2.2).
pub mod reg {
    /// MagicValue (R).
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Version (R).
    pub const VERSION: u64 = 0x004;
    /// DeviceID (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// VendorID (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// DeviceFeatures (R): 32 feature bits selected by DeviceFeaturesSel.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// DeviceFeaturesSel (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// DriverFeatures (W): 32 feature bits selected by DriverFeaturesSel.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// DriverFeaturesSel (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// QueueSel (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// QueueNumMax (R): 0 for a queue that does not exist.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// QueueNum (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// QueueReady (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// QueueNotify (W).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// InterruptStatus (R).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// InterruptACK (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Status (RW).
    pub const STATUS: u64 = 0x070;
    /// QueueDescLow (W).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// QueueDescHigh (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// QueueDriverLow (W): the available ring.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// QueueDriverHigh (W).
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// QueueDeviceLow (W): the used ring.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// QueueDeviceHigh (W).
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// SHMSel (W).
    pub const SHM_SEL: u64 = 0x0ac;
    /// SHMLenLow (R): all ones, there is no shared memory region.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// SHMLenHigh (R).
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// SHMBaseLow (R).
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// SHMBaseHigh (R).
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// QueueReset (RW): VIRTIO_F_RING_RESET is not offered, reads 0, writes ignored.
    pub const QUEUE_RESET: u64 = 0x0c0;
    /// ConfigGeneration (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Transport feature bits this transport cannot honour. They are removed from what the
/// device offers: split rings only, QueueNotify carries only the queue index, no
/// per-queue reset, no PCI-only features.
const UNSUPPORTED_FEATURES: u64 = (1 << 34) // VIRTIO_F_RING_PACKED
    | (1 << 37) // VIRTIO_F_SR_IOV
    | (1 << 38) // VIRTIO_F_NOTIFICATION_DATA
    | (1 << 39) // VIRTIO_F_NOTIF_CONFIG_DATA
    | (1 << 40) // VIRTIO_F_RING_RESET
    | (1 << 41); // VIRTIO_F_ADMIN_VQ

/// Why a transport could not be built, paused, resumed, saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The device has no queues.
    #[error("the device has no queues")]
    NoQueues,
    /// More queues than a 16-bit queue index can name.
    #[error("the device has {0} queues, at most 65536 are supported")]
    TooManyQueues(usize),
    /// A queue's maximum size is 0, not a power of two, or above 32768.
    #[error("queue {index} has maximum size {size}: must be a power of two from 1 to 32768")]
    InvalidQueueMaxSize {
        /// The queue.
        index: usize,
        /// Its maximum size.
        size: u16,
    },
    /// A queue notification `EventFd` could not be created.
    #[error("cannot create the notification eventfd of queue {index}: {source}")]
    EventFd {
        /// The queue.
        index: usize,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The device could not be paused ([`MmioTransport::pause`]).
    #[error("cannot pause: {0}")]
    Pause(#[from] PauseError),
    /// [`MmioTransport::save_state`] on a running device: pause it first.
    #[error(
        "virtio device type {device_type} ({}) is running: pause it before saving its state",
        device_type::name(*device_type)
    )]
    NotPaused {
        /// The device's virtio device ID.
        device_type: u32,
    },
    /// The device did not start again with its queues ([`MmioTransport::resume`], or an
    /// activated state given to [`MmioTransport::restore_state`]).
    #[error(
        "virtio device type {device_type} ({}) did not start with its saved queues: {reason}",
        device_type::name(*device_type)
    )]
    Start {
        /// The device's virtio device ID.
        device_type: u32,
        /// What failed.
        reason: String,
    },
    /// [`MmioTransport::restore_state`] on a transport the driver already set up.
    #[error(
        "cannot restore virtio device type {device_type} ({}): the transport is not freshly built (status {status:#x}, activated: {activated})",
        device_type::name(*device_type)
    )]
    RestoreNotFresh {
        /// The device's virtio device ID.
        device_type: u32,
        /// The transport's current status register.
        status: u32,
        /// Whether it is activated.
        activated: bool,
    },
    /// The saved state is of another kind of device.
    #[error(
        "the saved state is of virtio device type {saved} ({}), this transport carries device type {actual} ({})",
        device_type::name(*saved),
        device_type::name(*actual)
    )]
    RestoreDeviceType {
        /// The device type in the state.
        saved: u32,
        /// This transport's device type.
        actual: u32,
    },
    /// The saved state has another number of queues than the device.
    #[error("the saved state has {saved} queues, the device has {actual}")]
    RestoreQueueCount {
        /// Queues in the state.
        saved: usize,
        /// Queues of the device.
        actual: usize,
    },
    /// A queue's maximum size in the saved state differs from the device's.
    #[error("queue {index}: the saved state has maximum size {saved}, the device has {actual}")]
    RestoreQueueMaxSize {
        /// The queue.
        index: usize,
        /// Its maximum size in the state.
        saved: u16,
        /// Its maximum size on the device.
        actual: u16,
    },
    /// The driver features in the saved state include some this device does not offer.
    #[error("the saved driver features {driver:#x} include {extra:#x}, which the device does not offer (it offers {offered:#x})")]
    RestoreFeatures {
        /// The driver features in the state.
        driver: u64,
        /// The device's offered features.
        offered: u64,
        /// The bits in `driver` not in `offered`.
        extra: u64,
    },
    /// The saved state is inconsistent, or does not fit guest memory.
    #[error("invalid saved state: {0}")]
    RestoreInvalid(String),
}

/// Counters of guest accesses the transport did not act on, and of other events worth
/// reporting.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TransportStats {
    /// Register accesses that were not 4-byte aligned 32-bit accesses.
    pub bad_widths: u64,
    /// Accesses to offsets with no register, reads of write-only registers and writes
    /// of read-only registers.
    pub unknown_registers: u64,
    /// Writes a register's rules refused: a status transition out of order, features
    /// or queue set-up at the wrong stage, an invalid queue size or queue index...
    pub refused_writes: u64,
    /// Notifications delivered through the QueueNotify register (no ioeventfd).
    pub queue_notifies: u64,
    /// Times FEATURES_OK was refused because of the driver's features.
    pub features_refused: u64,
    /// Times DRIVER_OK failed to activate the device (DEVICE_NEEDS_RESET was set).
    pub activation_failures: u64,
}

#[derive(Default)]
struct Stats {
    bad_widths: AtomicU64,
    unknown_registers: AtomicU64,
    refused_writes: AtomicU64,
    queue_notifies: AtomicU64,
    features_refused: AtomicU64,
    activation_failures: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The interrupt a virtio-mmio device raises: InterruptStatus plus an irqfd.
struct MmioInterrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        let bit = match kind {
            InterruptKind::Queue(_) => INTERRUPT_USED_BUFFER,
            InterruptKind::Config => INTERRUPT_CONFIG_CHANGE,
        };
        // The status bit must be visible before the guest takes the interrupt.
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq.write(1)
    }
}

/// What the driver configured for one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct QueueConfig {
    /// QueueNum; 0 until the driver writes a valid size.
    size: u16,
    ready: bool,
    desc: Address,
    driver: Address,
    device: Address,
}

/// A 64-bit address written as two 32-bit halves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Address {
    value: u64,
    /// Whether the driver wrote either half.
    set: bool,
}

impl Address {
    fn write_half(&mut self, high: bool, half: u32) {
        self.value = if high {
            (self.value & 0xffff_ffff) | (u64::from(half) << 32)
        } else {
            (self.value & !0xffff_ffff) | u64::from(half)
        };
        self.set = true;
    }
}

/// Every register the driver can change; a reset puts back [`Registers::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Registers {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    shm_sel: u32,
    queues: Vec<QueueConfig>,
    activated: bool,
}

impl Registers {
    fn new(num_queues: usize) -> Self {
        Registers {
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            shm_sel: 0,
            queues: vec![QueueConfig::default(); num_queues],
            activated: false,
        }
    }

    /// Queue registers may be written after FEATURES_OK and before DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    /// Driver features may be written after DRIVER and before FEATURES_OK.
    fn features_writable(&self) -> bool {
        self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0
    }
}

struct Inner<M: GuestAddressSpace> {
    device: Box<dyn ActivateDevice<M>>,
    regs: Registers,
    /// While paused: the queues the device gave back, positions included.
    paused: Option<Vec<ActiveQueue>>,
    /// Added to the device's configuration generation: a restored transport goes on
    /// from the saved value. Kept across resets.
    config_generation_offset: u32,
}

impl<M: GuestAddressSpace> Inner<M> {
    fn config_generation(&self) -> u32 {
        self.device
            .config_generation()
            .wrapping_add(self.config_generation_offset)
    }
}

/// A virtio device behind the virtio-mmio (version 2) register interface.
///
/// `M` is how guest memory is held (see the [crate docs](crate#guest-memory)):
/// `Arc<GuestMemoryMmap<B>>`, or `GuestMemoryAtomic<GuestMemoryMmap<B>>`.
///
/// All methods take `&self`; the driver-visible state is behind one `Mutex`. QueueNotify
/// and InterruptACK do not take it.
pub struct MmioTransport<M: GuestAddressSpace> {
    device_type: u32,
    /// What the driver is offered: the device's features, plus VERSION_1, minus
    /// [`UNSUPPORTED_FEATURES`].
    offered_features: u64,
    queue_max_sizes: Vec<u16>,
    mem: M,
    /// One per queue, nonblocking; kept across resets.
    notify: Vec<EventFd>,
    interrupt: Arc<MmioInterrupt>,
    inner: Mutex<Inner<M>>,
    /// Mirrors `Registers::activated`, readable without the lock.
    activated: AtomicBool,
    stats: Stats,
    /// Handed to the device in every [`Activation`].
    thread_hook: Option<ThreadHook>,
    /// Handed to the device in every [`Activation`].
    spawner: Option<Arc<dyn ThreadSpawner>>,
    /// Whom this transport's and its device's rate-limited log lines are charged to.
    log_source: LogSource,
}

impl<M: GuestAddressSpace> fmt::Debug for MmioTransport<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field(
                "offered_features",
                &format_args!("{:#x}", self.offered_features),
            )
            .field("queue_max_sizes", &self.queue_max_sizes)
            .field("activated", &self.is_activated())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<M: GuestAddressSpace> MmioTransport<M> {
    /// Wraps `device`. `irq` is written on every interrupt (register it as a KVM irqfd);
    /// `mem` (for instance `Arc<GuestMemoryMmap<B>>`, or a `GuestMemoryAtomic` for
    /// hotplug) is handed to the device on activation and used to validate queues.
    ///
    /// Creates one nonblocking, close-on-exec notification `EventFd` per queue. Fails if the device has
    /// no queues or a queue's maximum size is not a power of two in `1..=32768`.
    pub fn new(
        device: Box<dyn ActivateDevice<M>>,
        mem: M,
        irq: EventFd,
    ) -> Result<Self, TransportError> {
        let queue_max_sizes = device.queue_max_sizes().to_vec();
        if queue_max_sizes.is_empty() {
            return Err(TransportError::NoQueues);
        }
        if queue_max_sizes.len() > usize::from(u16::MAX) + 1 {
            return Err(TransportError::TooManyQueues(queue_max_sizes.len()));
        }
        for (index, &size) in queue_max_sizes.iter().enumerate() {
            if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
                return Err(TransportError::InvalidQueueMaxSize { index, size });
            }
        }
        let notify = (0..queue_max_sizes.len())
            .map(|index| {
                EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
                    .map_err(|source| TransportError::EventFd { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let offered_features =
            (device.device_features() | VIRTIO_F_VERSION_1) & !UNSUPPORTED_FEATURES;
        let device_type = device.device_type();
        let regs = Registers::new(queue_max_sizes.len());
        Ok(MmioTransport {
            device_type,
            offered_features,
            queue_max_sizes,
            mem,
            notify,
            interrupt: Arc::new(MmioInterrupt {
                status: AtomicU32::new(0),
                irq,
            }),
            inner: Mutex::new(Inner {
                device,
                regs,
                paused: None,
                config_generation_offset: 0,
            }),
            activated: AtomicBool::new(false),
            stats: Stats::default(),
            thread_hook: None,
            spawner: None,
            log_source: LogSource::new(),
        })
    }

    /// The [`LogSource`] this transport's rate-limited log lines are charged to: its
    /// register accesses that may log run under it (not InterruptStatus, InterruptACK
    /// and QueueNotify, the accesses of every request, which never log on their own),
    /// and its device's threads enter it before the
    /// [thread hook](Self::set_thread_hook). A VMM can enter it too, on a thread of its
    /// own that serves this device.
    ///
    /// ```
    /// # use ember_virtio::MmioTransport;
    /// fn log_for<M: vm_memory::GuestAddressSpace>(transport: &MmioTransport<M>) {
    ///     let _device = transport.log_source().scope();
    ///     ember_rate_limiter::warn_limited!("charged to this transport's device");
    /// }
    /// ```
    pub fn log_source(&self) -> LogSource {
        self.log_source
    }

    /// The hook handed to the device: enters [`log_source`](Self::log_source), then
    /// runs the VMM's hook, if any.
    fn device_thread_hook(&self) -> ThreadHook {
        let source = self.log_source;
        let hook = self.thread_hook.clone();
        Arc::new(move |name: &str| {
            source.enter();
            hook.as_ref().map_or(Ok(()), |hook| hook(name))
        })
    }

    /// Sets the function every device thread runs first, before it touches a queue
    /// (passed to the device as [`Activation::thread_hook`]): where a VMM installs the
    /// seccomp filter of the device's worker threads.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use ember_virtio::{MmioTransport, ThreadHook};
    /// fn confine_workers<M: vm_memory::GuestAddressSpace>(transport: &mut MmioTransport<M>) {
    ///     let hook: ThreadHook = Arc::new(|name: &str| {
    ///         // Install this thread's seccomp filter here.
    ///         log::debug!("{name} starting");
    ///         Ok(())
    ///     });
    ///     transport.set_thread_hook(Some(hook));
    /// }
    /// ```
    pub fn set_thread_hook(&mut self, hook: Option<ThreadHook>) {
        self.thread_hook = hook;
    }

    /// Sets who creates the device's threads (passed to the device as
    /// [`Activation::spawner`]); without one they are created on the vCPU thread that
    /// activates the device. See [`ThreadSpawner`] for why a VMM with per-thread
    /// seccomp filters wants one.
    pub fn set_thread_spawner(&mut self, spawner: Option<Arc<dyn ThreadSpawner>>) {
        self.spawner = spawner;
    }

    /// The virtio device ID of the device behind the transport.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The features offered to the driver: the device's, plus VIRTIO_F_VERSION_1,
    /// minus the transport features this transport does not implement.
    pub fn offered_features(&self) -> u64 {
        self.offered_features
    }

    /// Whether the device was activated (DRIVER_OK succeeded) since the last reset.
    pub fn is_activated(&self) -> bool {
        self.activated.load(Ordering::Acquire)
    }

    /// The notification `EventFd` of every queue, cloned, with its index: register each
    /// as a `KVM_IOEVENTFD` at `base +` [`QUEUE_NOTIFY_OFFSET`], 4 bytes, datamatch the
    /// index. A clone that fails (out of file descriptors) is logged and left out; that
    /// queue's notifications then arrive through the QueueNotify register.
    pub fn queue_notify_events(&self) -> Vec<(u16, EventFd)> {
        self.notify
            .iter()
            .enumerate()
            .filter_map(|(index, evt)| {
                let index = u16::try_from(index).ok()?;
                match evt.try_clone() {
                    Ok(evt) => Some((index, evt)),
                    Err(e) => {
                        log::warn!(
                            "virtio-mmio: cannot clone the notify eventfd of queue {index}: {e}"
                        );
                        None
                    }
                }
            })
            .collect()
    }

    /// The transport's interrupt, as handed to the device on activation (for a VMM that
    /// raises configuration-change interrupts itself).
    pub fn interrupt(&self) -> Arc<dyn VirtioInterrupt> {
        self.interrupt.clone()
    }

    /// Counters of ignored accesses and failures.
    pub fn stats(&self) -> TransportStats {
        let s = &self.stats;
        TransportStats {
            bad_widths: s.bad_widths.load(Ordering::Relaxed),
            unknown_registers: s.unknown_registers.load(Ordering::Relaxed),
            refused_writes: s.refused_writes.load(Ordering::Relaxed),
            queue_notifies: s.queue_notifies.load(Ordering::Relaxed),
            features_refused: s.features_refused.load(Ordering::Relaxed),
            activation_failures: s.activation_failures.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<M>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configuration-space offset of an access at `offset`, if the whole access is
    /// inside the window's configuration space.
    fn config_offset(offset: u64, len: usize) -> Option<u64> {
        let end = offset.checked_add(u64::try_from(len).ok()?)?;
        (end <= MMIO_WINDOW_SIZE).then(|| offset - reg::CONFIG)
    }

    fn read_register(&self, offset: u64) -> Option<u32> {
        let value = match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::INTERRUPT_STATUS => self.interrupt.status.load(Ordering::SeqCst),
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH | reg::QUEUE_RESET => 0,
            reg::DEVICE_FEATURES | reg::QUEUE_NUM_MAX | reg::QUEUE_READY | reg::STATUS => {
                let inner = self.lock();
                let regs = &inner.regs;
                match offset {
                    reg::DEVICE_FEATURES => match regs.device_features_sel {
                        0 => self.offered_features as u32,
                        1 => (self.offered_features >> 32) as u32,
                        _ => 0,
                    },
                    reg::QUEUE_NUM_MAX => self.selected_max_size(regs).map_or(0, u32::from),
                    reg::QUEUE_READY => selected(regs).map_or(0, |q| u32::from(q.ready)),
                    _ => regs.status,
                }
            }
            reg::CONFIG_GENERATION => self.lock().config_generation(),
            _ => return None,
        };
        Some(value)
    }

    fn selected_max_size(&self, regs: &Registers) -> Option<u16> {
        let index = usize::try_from(regs.queue_sel).ok()?;
        self.queue_max_sizes.get(index).copied()
    }

    fn write_register(&self, offset: u64, value: u32) {
        let accepted = match offset {
            reg::QUEUE_NOTIFY => self.notify_queue(value),
            reg::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
                true
            }
            reg::QUEUE_RESET => false,
            reg::DEVICE_FEATURES_SEL
            | reg::DRIVER_FEATURES
            | reg::DRIVER_FEATURES_SEL
            | reg::QUEUE_SEL
            | reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::STATUS
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
            | reg::SHM_SEL => self.write_setup_register(offset, value),
            _ => {
                self.bad_access(false, true, offset, 4);
                return;
            }
        };
        if !accepted {
            self.refused_write(offset, value);
        }
    }

    /// A set-up register (features, queues, STATUS, which activates and resets the
    /// device): under the state lock and this transport's log source, since the
    /// device's own code runs here too. Kept out of line, away from the registers
    /// every request uses.
    #[inline(never)]
    fn write_setup_register(&self, offset: u64, value: u32) -> bool {
        let _device = self.log_source.scope();
        let mut inner = self.lock();
        self.write_locked(&mut inner, offset, value)
    }

    #[cold]
    fn refused_write(&self, offset: u64, value: u32) {
        bump(&self.stats.refused_writes);
        let _device = self.log_source.scope();
        ember_rate_limiter::log_limited!(
            log::Level::Debug,
            "virtio-mmio (device type {}): write of {value:#x} to register {offset:#x} refused",
            self.device_type
        );
    }

    /// Writes a register that needs the state lock; returns whether the write was
    /// accepted.
    fn write_locked(&self, inner: &mut Inner<M>, offset: u64, value: u32) -> bool {
        let regs = &mut inner.regs;
        match offset {
            reg::DEVICE_FEATURES_SEL => regs.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => regs.driver_features_sel = value,
            reg::QUEUE_SEL => regs.queue_sel = value,
            reg::SHM_SEL => regs.shm_sel = value,
            reg::DRIVER_FEATURES => {
                if !regs.features_writable() {
                    return false;
                }
                let value = u64::from(value);
                regs.driver_features = match regs.driver_features_sel {
                    0 => (regs.driver_features & !0xffff_ffff) | value,
                    1 => (regs.driver_features & 0xffff_ffff) | (value << 32),
                    _ => return false,
                };
            }
            reg::STATUS => return self.write_status(inner, value),
            _ => return self.write_queue_register(regs, offset, value),
        }
        true
    }

    fn write_queue_register(&self, regs: &mut Registers, offset: u64, value: u32) -> bool {
        // Disabling a queue is allowed at any time: drivers write QueueReady 0 when they
        // tear a queue down and then wait to read 0 back (Linux's vm_del_vq,
        // virtio-drivers' queue_unset). A running device keeps serving the queue until
        // the next reset; only setting a queue up is restricted to before DRIVER_OK.
        if offset == reg::QUEUE_READY && value == 0 {
            if let Some(queue) = selected_mut(regs) {
                queue.ready = false;
                return true;
            }
            return false;
        }
        if !regs.queue_setup_allowed() {
            return false;
        }
        let Some(max_size) = self.selected_max_size(regs) else {
            return false;
        };
        let Some(queue) = selected_mut(regs) else {
            return false;
        };
        if offset == reg::QUEUE_READY {
            match value {
                0 => queue.ready = false,
                1 if queue.size != 0 && queue.desc.set && queue.driver.set && queue.device.set => {
                    queue.ready = true
                }
                _ => return false,
            }
            return true;
        }
        // A ready queue's size and addresses are fixed until it is disabled.
        if queue.ready {
            return false;
        }
        match offset {
            reg::QUEUE_NUM => match u16::try_from(value) {
                Ok(size) if size != 0 && size <= max_size && size.is_power_of_two() => {
                    queue.size = size
                }
                _ => return false,
            },
            reg::QUEUE_DESC_LOW => queue.desc.write_half(false, value),
            reg::QUEUE_DESC_HIGH => queue.desc.write_half(true, value),
            reg::QUEUE_DRIVER_LOW => queue.driver.write_half(false, value),
            reg::QUEUE_DRIVER_HIGH => queue.driver.write_half(true, value),
            reg::QUEUE_DEVICE_LOW => queue.device.write_half(false, value),
            reg::QUEUE_DEVICE_HIGH => queue.device.write_half(true, value),
            _ => return false,
        }
        true
    }

    /// Signals queue `value`'s notification `EventFd`; false for a nonexistent queue.
    fn notify_queue(&self, value: u32) -> bool {
        let Some(evt) = usize::try_from(value).ok().and_then(|i| self.notify.get(i)) else {
            return false;
        };
        bump(&self.stats.queue_notifies);
        // EAGAIN only if the counter is about to overflow: the device is woken anyway.
        if let Err(e) = evt.write(1) {
            let _device = self.log_source.scope();
            ember_rate_limiter::log_limited!(
                log::Level::Debug,
                "virtio-mmio: notify of queue {value}: {e}"
            );
        }
        true
    }

    /// The Status register's state machine; returns whether the whole write was taken.
    fn write_status(&self, inner: &mut Inner<M>, value: u32) -> bool {
        use status::*;

        if value == 0 {
            self.reset(inner);
            return true;
        }
        let old = inner.regs.status;
        let added = value & !old;
        // Drivers only add bits; the device alone sets DEVICE_NEEDS_RESET; no bits
        // beyond those the spec defines.
        if value & old != old
            || added & !(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED) != 0
        {
            return false;
        }
        if added == 0 {
            return true;
        }
        let missing = |bit: u32, needed: u32| added & bit != 0 && value & needed == 0;
        if missing(DRIVER, ACKNOWLEDGE)
            || missing(FEATURES_OK, DRIVER)
            || missing(DRIVER_OK, FEATURES_OK)
        {
            return false;
        }

        let mut new = value;
        // A driver that gave up, or a device that needs a reset, goes no further.
        let halted = new & (FAILED | DEVICE_NEEDS_RESET) != 0;
        if added & FEATURES_OK != 0 {
            let features = inner.regs.driver_features;
            let acceptable =
                features & !self.offered_features == 0 && features & VIRTIO_F_VERSION_1 != 0;
            if !acceptable {
                bump(&self.stats.features_refused);
                warn_limited!(
                    "virtio-mmio (device type {}): FEATURES_OK refused: driver features {features:#x}, offered {:#x}",
                    self.device_type,
                    self.offered_features
                );
            }
            if halted || !acceptable {
                new &= !FEATURES_OK;
            }
        }
        if added & DRIVER_OK != 0 && (halted || new & FEATURES_OK == 0) {
            new &= !DRIVER_OK;
        }
        inner.regs.status = new;
        if added & DRIVER_OK != 0 && new & DRIVER_OK != 0 {
            self.activate(inner);
        }
        new == value
    }

    /// Hands the ready queues to the device. On failure sets DEVICE_NEEDS_RESET and
    /// raises a configuration interrupt; the device stays inactive until a reset.
    fn activate(&self, inner: &mut Inner<M>) {
        if inner.regs.activated {
            return;
        }
        let result = self
            .build_queues(&inner.regs)
            .and_then(|queues| self.start_device(inner, queues));
        match result {
            Ok(()) => {
                inner.regs.activated = true;
                self.activated.store(true, Ordering::Release);
            }
            Err(reason) => {
                bump(&self.stats.activation_failures);
                error_limited!(
                    "virtio-mmio: device type {} not activated, needs reset: {reason}",
                    self.device_type
                );
                inner.regs.status |= status::DEVICE_NEEDS_RESET;
                if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
                    error_limited!("virtio-mmio: cannot raise the configuration interrupt: {e}");
                }
            }
        }
    }

    /// Calls the device's `activate` with `queues`.
    fn start_device(&self, inner: &mut Inner<M>, queues: Vec<ActiveQueue>) -> Result<(), String> {
        inner
            .device
            .activate(Activation {
                mem: self.mem.clone(),
                queues,
                interrupt: self.interrupt.clone(),
                features: inner.regs.driver_features,
                thread_hook: Some(self.device_thread_hook()),
                spawner: self.spawner.clone(),
            })
            .map_err(|e| format!("the device failed to start: {e}"))
    }

    /// A `Queue` per ready queue, in index order, validated against guest memory.
    fn build_queues(&self, regs: &Registers) -> Result<Vec<ActiveQueue>, String> {
        let event_idx = regs.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mem = self.mem.memory();
        let mut active = Vec::new();
        for ((i, config), &max_size) in regs.queues.iter().enumerate().zip(&self.queue_max_sizes) {
            if !config.ready {
                continue;
            }
            let index = u16::try_from(i).map_err(|_| format!("queue index {i} out of range"))?;
            let fail = |what: &str, e: &dyn fmt::Display| format!("queue {index}: {what}: {e}");
            let mut queue = Queue::new(max_size).map_err(|e| fail("maximum size", &e))?;
            queue
                .try_set_size(config.size)
                .map_err(|e| fail("size", &e))?;
            queue
                .try_set_desc_table_address(GuestAddress(config.desc.value))
                .map_err(|e| fail("descriptor table", &e))?;
            queue
                .try_set_avail_ring_address(GuestAddress(config.driver.value))
                .map_err(|e| fail("available ring", &e))?;
            queue
                .try_set_used_ring_address(GuestAddress(config.device.value))
                .map_err(|e| fail("used ring", &e))?;
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            if !rings_in_memory(&*mem, &queue) {
                return Err(format!(
                    "queue {index}: rings (descriptors {:#x}, available {:#x}, used {:#x}, size {}) \
                     are not inside guest memory",
                    config.desc.value, config.driver.value, config.device.value, config.size
                ));
            }
            let notify = self.notify[i]
                .try_clone()
                .map_err(|e| fail("cloning the notify eventfd", &e))?;
            active.push(ActiveQueue {
                index,
                queue,
                notify,
            });
        }
        Ok(active)
    }

    /// Status 0: stops the device and puts every register back to its initial value.
    ///
    /// Runs on the vCPU thread with the state lock held, so the device's `reset` must
    /// return quickly: a device on [`crate::worker::Worker`] waits for at most the one
    /// request its worker is handling (the worker checks its stop flag between
    /// requests), never for a batch.
    fn reset(&self, inner: &mut Inner<M>) {
        inner.device.reset();
        inner.paused = None;
        inner.regs = Registers::new(self.queue_max_sizes.len());
        self.activated.store(false, Ordering::Release);
        // The device's worker has stopped: nothing raises interrupts any more.
        self.interrupt.status.store(0, Ordering::SeqCst);
        // Drop notifications nobody will serve, so the next activation starts quiet.
        for evt in &self.notify {
            let _ = evt.read();
        }
    }
}

fn selected(regs: &Registers) -> Option<&QueueConfig> {
    regs.queues.get(usize::try_from(regs.queue_sel).ok()?)
}

fn selected_mut(regs: &mut Registers) -> Option<&mut QueueConfig> {
    let index = usize::try_from(regs.queue_sel).ok()?;
    regs.queues.get_mut(index)
}

/// Whether an access of `len` bytes at `offset` is a 4-byte aligned 32-bit access.
fn register_access(offset: u64, len: usize) -> bool {
    len == 4 && offset % 4 == 0
}

impl<M: GuestAddressSpace> MmioTransport<M> {
    /// Counts an access the transport ignores, and logs it (rate-limited: the guest
    /// decides how often).
    #[cold]
    fn bad_access(&self, bad_width: bool, write: bool, offset: u64, len: usize) {
        let _device = self.log_source.scope();
        let what = if bad_width {
            bump(&self.stats.bad_widths);
            "not a 4-byte aligned 32-bit register access"
        } else {
            bump(&self.stats.unknown_registers);
            "no such register"
        };
        warn_limited!(
            "virtio-mmio (device type {}): guest {} of {len} bytes at offset {offset:#x} ignored: {what}",
            self.device_type,
            if write { "write" } else { "read" }
        );
    }
}

/// Whether each ring of `queue` lies inside `mem`: virtio-queue's `Queue::is_valid`
/// without its `error!` line, which a guest could have logged at will (bad ring
/// addresses, DRIVER_OK, reset, again); the caller reports the failure, rate-limited.
fn rings_in_memory<G: GuestMemory>(mem: &G, queue: &Queue) -> bool {
    let size = u64::from(queue.size());
    // Descriptor table: 16 bytes per entry. Available ring: flags, idx, a u16 per
    // entry, used_event. Used ring: flags, idx, 8 bytes per entry, avail_event.
    [
        (queue.desc_table(), 16 * size, Permissions::Read),
        (queue.avail_ring(), 6 + 2 * size, Permissions::Read),
        (queue.used_ring(), 6 + 8 * size, Permissions::Write),
    ]
    .into_iter()
    .all(|(addr, len, access)| {
        usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len, access))
    })
}

impl<M: GuestAddressSpace + Send + Sync> ember_bus::BusDevice for MmioTransport<M> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            match Self::config_offset(offset, data.len()) {
                Some(config) => {
                    let _device = self.log_source.scope();
                    self.lock().device.read_config(config, data)
                }
                None => self.bad_access(false, false, offset, data.len()),
            }
            return;
        }
        if !register_access(offset, data.len()) {
            self.bad_access(true, false, offset, data.len());
            return;
        }
        match self.read_register(offset) {
            Some(value) => data.copy_from_slice(&value.to_le_bytes()),
            None => self.bad_access(false, false, offset, data.len()),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            match Self::config_offset(offset, data.len()) {
                Some(config) => {
                    let _device = self.log_source.scope();
                    self.lock().device.write_config(config, data)
                }
                None => self.bad_access(false, true, offset, data.len()),
            }
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if register_access(offset, data.len()) => {
                self.write_register(offset, u32::from_le_bytes(bytes))
            }
            _ => self.bad_access(true, true, offset, data.len()),
        }
    }
}

mod snapshot;

#[cfg(test)]
mod tests;

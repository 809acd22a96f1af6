//! The trait a virtio device implements once, whatever transport carries it.
//!
//! A transport (virtio-mmio here; a PCI transport later) owns the registers the driver
//! sees: feature selection, queue set-up, status. It calls the device only to learn what
//! the device offers, to reach its configuration space, and to start and stop it. Queue
//! processing never happens on a vCPU's exit path: [`ActivateDevice::activate`] hands the
//! device its queues with one notification [`EventFd`] each (signalled by KVM through an
//! ioeventfd, or by the transport), and the device serves them on a thread of its own.
//!
//! Devices are generic over how guest memory is held (see the crate docs).

use std::sync::Arc;

use ember_rate_limiter::{RateLimiterError, RateLimiterState};
use virtio_queue::Queue;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

/// Feature bit: the device conforms to virtio 1.x. Ember's transports require it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: the driver may use indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Feature bit: `used_event`/`avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Virtio device IDs (virtio 1.2, section 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;

    /// A short name for device ID `id`, for messages: `"net"`, `"block"`, `"rng"`, or
    /// `"unknown"` for IDs Ember has no device for.
    ///
    /// ```
    /// use ember_virtio::device_type;
    /// assert_eq!(device_type::name(device_type::BLOCK), "block");
    /// assert_eq!(device_type::name(0xfff0), "unknown");
    /// ```
    pub fn name(id: u32) -> &'static str {
        match id {
            NET => "net",
            BLOCK => "block",
            RNG => "rng",
            _ => "unknown",
        }
    }
}

/// Why a device raises an interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device used buffers of this queue.
    Queue(u16),
    /// The device's configuration changed.
    Config,
}

/// How a device interrupts the driver. The transport implements it (virtio-mmio:
/// set a bit in InterruptStatus and signal an irqfd).
pub trait VirtioInterrupt: Send + Sync {
    /// Raises the interrupt.
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;
}

/// A queue the driver set up, ready for the device.
#[derive(Debug)]
pub struct ActiveQueue {
    /// Queue index.
    pub index: u16,
    /// The queue, validated against guest memory by the transport.
    pub queue: Queue,
    /// Signalled when the driver notifies this queue. Nonblocking (`EFD_NONBLOCK`), and
    /// shared with the transport, which keeps it across resets; the transport drains it
    /// when the driver resets the device.
    pub notify: EventFd,
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation<M: GuestAddressSpace> {
    /// Guest memory: the address space the transport was built with. Take a snapshot
    /// with [`GuestAddressSpace::memory`] when handling requests.
    pub mem: M,
    /// The queues the driver enabled, in index order.
    pub queues: Vec<ActiveQueue>,
    /// Raises interrupts.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The features the driver accepted (a subset of [`VirtioDevice::device_features`]).
    pub features: u64,
    /// Runs first on every thread the device starts for this activation, before the
    /// thread touches a queue: where a VMM installs the thread's seccomp filter.
    /// [`Worker::spawn`](crate::worker::Worker::spawn) runs it; a device that starts
    /// threads of its own must run it too. An [`MmioTransport`](crate::MmioTransport)
    /// always passes one: it enters the transport's
    /// [`log_source`](crate::MmioTransport::log_source) (so the thread's rate-limited
    /// log lines count against this device only), then runs the hook set by
    /// [`MmioTransport::set_thread_hook`](crate::MmioTransport::set_thread_hook).
    pub thread_hook: Option<ThreadHook>,
    /// Creates the device's threads, if set; else they are created where
    /// [`ActivateDevice::activate`] runs (a vCPU thread, for a guest's DRIVER_OK). A
    /// thread inherits the seccomp filter of the thread that creates it, so a VMM with
    /// per-thread filters creates device threads on a thread of its own (see
    /// [`ThreadSpawner`]). Set by
    /// [`MmioTransport::set_thread_spawner`](crate::MmioTransport::set_thread_spawner).
    pub spawner: Option<Arc<dyn ThreadSpawner>>,
}

/// Creates threads on a VMM's behalf: [`Worker::spawn`](crate::worker::Worker::spawn)
/// asks it instead of creating the worker thread itself.
///
/// Why: seccomp filters are inherited. A device starts its worker when the driver sets
/// DRIVER_OK, on the vCPU thread that made that write, so without a spawner every worker
/// would run under the vCPU thread's filter too, and the vCPU filter would have to allow
/// thread creation and every system call of every device. A spawner thread, started
/// before any filter, creates them instead; its filter is the one that must allow
/// thread creation and the workers' calls, and it never touches guest input.
///
/// ```
/// use std::io;
/// use std::sync::{mpsc, Mutex};
/// use std::thread::JoinHandle;
/// use ember_virtio::ThreadSpawner;
///
/// type Request = (String, Box<dyn FnOnce() + Send>, mpsc::Sender<io::Result<JoinHandle<()>>>);
///
/// /// Creates threads on one thread of its own.
/// struct OnOneThread(Mutex<mpsc::Sender<Request>>);
///
/// impl ThreadSpawner for OnOneThread {
///     fn spawn(&self, name: String, body: Box<dyn FnOnce() + Send>) -> io::Result<JoinHandle<()>> {
///         let (reply, answer) = mpsc::channel();
///         let sent = self.0.lock().map_err(|_| io::Error::other("poisoned"))?.send((name, body, reply));
///         sent.map_err(|_| io::Error::other("the spawner thread is gone"))?;
///         answer.recv().map_err(|_| io::Error::other("the spawner thread is gone"))?
///     }
/// }
///
/// let (send, requests) = mpsc::channel::<Request>();
/// std::thread::spawn(move || {
///     for (name, body, reply) in requests {
///         let _ = reply.send(std::thread::Builder::new().name(name).spawn(body));
///     }
/// });
/// let spawner = OnOneThread(Mutex::new(send));
/// let thread = spawner.spawn("worker".into(), Box::new(|| println!("hello")))?;
/// thread.join().unwrap();
/// # Ok::<(), io::Error>(())
/// ```
pub trait ThreadSpawner: Send + Sync {
    /// Starts a thread named `name` running `body`, and returns its handle.
    fn spawn(
        &self,
        name: String,
        body: Box<dyn FnOnce() + Send + 'static>,
    ) -> std::io::Result<std::thread::JoinHandle<()>>;
}

/// A function run first on a device thread, given the thread's name; an error stops the
/// thread before it does anything else, and the activation fails.
pub type ThreadHook = Arc<dyn Fn(&str) -> std::io::Result<()> + Send + Sync>;

/// Why a device could not start. The transport then sets DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver enabled a different number of queues than the device needs.
    #[error("the device needs {expected} queues, the driver enabled {got}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues the driver enabled.
        got: usize,
    },
    /// The device's worker could not start.
    #[error("cannot start the device: {0}")]
    Start(#[source] std::io::Error),
    /// Anything else, described.
    #[error("{0}")]
    Other(String),
}

impl<M: GuestAddressSpace> std::fmt::Debug for Activation<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activation")
            .field("queues", &self.queues)
            .field("features", &format_args!("{:#x}", self.features))
            .finish_non_exhaustive()
    }
}

/// A virtio device, independent of its transport and of how guest memory is held: what
/// the transport asks the device (identity, queues, features, configuration space) and
/// tells it (reset). Starting it is [`ActivateDevice`], the one part that sees guest
/// memory.
pub trait VirtioDevice: Send {
    /// The virtio device ID ([`device_type`]).
    fn device_type(&self) -> u32;

    /// The largest size the device supports for each of its queues; the length is the
    /// number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers, including [`VIRTIO_F_VERSION_1`] and the
    /// ring features ([`VIRTIO_RING_F_EVENT_IDX`], [`VIRTIO_RING_F_INDIRECT_DESC`]) it
    /// supports.
    fn device_features(&self) -> u64;

    /// Reads the device-specific configuration space. Bytes outside it are left as they
    /// are (the transport pre-fills zeroes); `offset` is guest-controlled.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific configuration space; writes to read-only or
    /// nonexistent fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Bumped whenever the device changes its configuration space by itself.
    fn config_generation(&self) -> u32 {
        0
    }

    /// Stops the device (its worker has finished when this returns) and forgets the
    /// queues, so that it can be activated again. Called when the driver writes 0 to
    /// the status register.
    fn reset(&mut self);

    /// Pauses an active device: stops its worker(s) after at most the request in flight
    /// ([`Worker::stop_keeping_queues`](crate::worker::Worker::stop_keeping_queues))
    /// and gives back its queues, positions included, in the order
    /// [`Activation::queues`] had them. The device keeps its backend (disk, tap, rate
    /// limiters...) and stays ready for [`ActivateDevice::activate`] with the same
    /// queues (a resume), or with queues rebuilt from a snapshot (a restore).
    ///
    /// The default says the device cannot pause ([`PauseError::Unsupported`]), so that
    /// a VMM pausing a VM learns which device is in the way instead of waiting.
    fn pause(&mut self) -> Result<Vec<ActiveQueue>, PauseError> {
        Err(PauseError::Unsupported {
            device_type: self.device_type(),
        })
    }

    /// The levels of the device's rate limiters, for a snapshot of a paused (or never
    /// activated) device: one state per limiter the device can have, in an order of its
    /// own (a disk: one; a network card: rx, tx), [`RateLimiterState::default`] for one
    /// that limits nothing. Without them a restored guest would start with full buckets
    /// and its one-time bursts again.
    ///
    /// The default: a device without rate limiters.
    fn save_rate_limiters(&mut self) -> Vec<RateLimiterState> {
        Vec::new()
    }

    /// Sets the device's rate limiters to levels [`save_rate_limiters`] gave, on a
    /// device built with the same limits, before it is activated. A state that does not
    /// fit (another number of limiters, a bucket the limiter lacks, a level above its
    /// settings) is refused with the error naming it.
    ///
    /// The default accepts only states of no limit at all.
    ///
    /// [`save_rate_limiters`]: VirtioDevice::save_rate_limiters
    fn restore_rate_limiters(
        &mut self,
        states: &[RateLimiterState],
    ) -> Result<(), RateLimiterError> {
        match states.iter().all(RateLimiterState::is_unlimited) {
            true => Ok(()),
            false => Err(RateLimiterError::StateCount {
                expected: 0,
                got: states.len(),
            }),
        }
    }
}

/// Why [`VirtioDevice::pause`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// The device does not implement pausing.
    #[error(
        "virtio device type {device_type} ({}) does not support pause",
        device_type::name(*device_type)
    )]
    Unsupported {
        /// The device's virtio device ID.
        device_type: u32,
    },
    /// The device has no running worker to pause.
    #[error(
        "virtio device type {device_type} ({}) is not running",
        device_type::name(*device_type)
    )]
    NotRunning {
        /// The device's virtio device ID.
        device_type: u32,
    },
    /// The device's worker thread had panicked: its queues are lost, the device needs a
    /// reset.
    #[error(
        "the worker of virtio device type {device_type} ({}) panicked; its queues are lost",
        device_type::name(*device_type)
    )]
    WorkerLost {
        /// The device's virtio device ID.
        device_type: u32,
    },
}

/// Starting a [`VirtioDevice`] on guest memory held as `M` (a vm-memory
/// [`GuestAddressSpace`]); transports hold devices as `Box<dyn ActivateDevice<M>>`.
///
/// Kept apart from [`VirtioDevice`] so that a device implements it for every `M`
/// (`impl<M: GuestAddressSpace + Send + 'static> ActivateDevice<M> for MyDevice`) and
/// serves VMMs with and without dirty-page tracking or memory hotplug, while calls such
/// as `device.device_features()` stay unambiguous.
pub trait ActivateDevice<M: GuestAddressSpace>: VirtioDevice {
    /// Starts the device: called once, when the driver sets DRIVER_OK, and again only
    /// after a [`reset`](VirtioDevice::reset).
    fn activate(&mut self, activation: Activation<M>) -> Result<(), ActivateError>;
}

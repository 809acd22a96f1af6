//! The worker thread that serves an activated device's queues.
//!
//! A device implements [`QueueHandler`] (what to do when a queue is notified or a
//! backend file descriptor is readable) and, in [`ActivateDevice::activate`], hands it to
//! [`Worker::spawn`] with the [`Activation`]; in [`VirtioDevice::reset`] it calls
//! [`Worker::stop`], which gives the handler back. Everything else is the worker's:
//!
//! * **One thread per device**, waiting with epoll on a stop eventfd, on every queue's
//!   notify eventfd and on the handler's [backend fds](QueueHandler::backend_fds) (a
//!   tap, a socket, a timerfd...). The model is Cloud Hypervisor's `EpollHelper`.
//!   Queue processing never runs on a vCPU thread.
//! * **Notifications cost one `epoll_wait`.** Notify eventfds are edge-triggered and
//!   never read: every signal (KVM's ioeventfd, the transport's QueueNotify register,
//!   [`WorkerContext::kick`]) puts the eventfd back on epoll's ready list, so none is
//!   lost, and the worker saves a `read(2)` per notification. Backend fds are
//!   level-triggered and can be paused with [`WorkerContext::watch_backend`].
//! * **Clean, bounded stop.** [`Worker::stop`] (or dropping the [`Worker`]) sets a stop
//!   flag and writes the stop eventfd. [`WorkerContext::process_queue`] checks the flag
//!   between requests, and the thread between handler calls and before anything else in
//!   each wake-up, so a stop waits for at most the request in flight, not for a batch of
//!   [`QUEUE_BUDGET`] requests (a transport resets a device while a vCPU holds its lock).
//!   A handler that loops by itself checks [`WorkerContext::stopping`], or passes
//!   [`WorkerContext::stop_flag`] to [`drain_queue_until`]. The handler comes back, so a
//!   device keeps its backend and can be activated again.
//! * **EVENT_IDX.** [`drain_queue`] turns notifications off while it pops chains, then
//!   on again, and looks at the ring once more: a chain the driver added in between is
//!   handled now rather than waiting for a notification that will not come.
//!   [`WorkerContext::signal_used`] then raises the interrupt only if the driver's
//!   `used_event` asks for one (with `VIRTIO_RING_F_EVENT_IDX`; always without).
//! * **Bounded work per wake-up.** [`drain_queue`] handles at most a budget of chains
//!   ([`QUEUE_BUDGET`]); when the ring still has more, [`WorkerContext::process_queue`]
//!   re-signals the queue's own eventfd, so the loop comes back to it after the other
//!   ready events, the stop request included. A busy queue cannot starve the others.
//! * **Guest memory** is taken once per wake-up with [`WorkerContext::memory`], a
//!   snapshot of the device's [`GuestAddressSpace`]: with `GuestMemoryAtomic`, a memory
//!   map the VMM replaced (hotplug) is seen at the next wake-up.
//!
//! Nothing the guest writes makes the worker panic: a chain the handler cannot use is
//! completed (normally with an error status), queue errors are logged (rate-limited, as
//! the guest can cause them at will) and the worker carries on, and a ring whose index
//! runs ahead of its chains is ignored until the next notification.
//!
//! # Example
//!
//! A device with one queue that fills each buffer it gets with a running byte counter:
//!
//! ```
//! use std::sync::Arc;
//!
//! use ember_virtio::chain::{walk_into, ChainLayout, Cursor};
//! use ember_virtio::mmio::MmioTransport;
//! use ember_virtio::vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap};
//! use ember_virtio::vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
//! use ember_virtio::worker::{QueueHandler, Worker, WorkerContext, QUEUE_BUDGET};
//! use ember_virtio::{ActivateDevice, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1};
//!
//! /// Runs on the worker thread.
//! struct CounterHandler {
//!     next: u8,
//!     layout: ChainLayout,
//! }
//!
//! impl<M: GuestAddressSpace> QueueHandler<M> for CounterHandler {
//!     fn queue_notified(&mut self, ctx: &mut WorkerContext<M>, queue: usize) {
//!         let Self { next, layout } = self;
//!         ctx.process_queue(queue, QUEUE_BUDGET, |mem, chain| {
//!             walk_into(layout, mem, chain);
//!             if !layout.is_sound() {
//!                 return 0;
//!             }
//!             let mut bytes = [0u8; 64];
//!             let n = layout.writable_len.min(64) as usize;
//!             for byte in &mut bytes[..n] {
//!                 *byte = *next;
//!                 *next = next.wrapping_add(1);
//!             }
//!             match Cursor::new(&layout.writable).write(mem, &bytes[..n]) {
//!                 Ok(()) => n as u32,
//!                 Err(_) => 0,
//!             }
//!         });
//!     }
//! }
//!
//! /// What the transport sees.
//! #[derive(Default)]
//! struct Counter {
//!     worker: Option<Worker<CounterHandler>>,
//! }
//!
//! impl VirtioDevice for Counter {
//!     fn device_type(&self) -> u32 {
//!         0x1234
//!     }
//!     fn queue_max_sizes(&self) -> &[u16] {
//!         &[64]
//!     }
//!     fn device_features(&self) -> u64 {
//!         VIRTIO_F_VERSION_1
//!     }
//!     fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
//!     fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
//!     fn reset(&mut self) {
//!         if let Some(worker) = self.worker.take() {
//!             worker.stop();
//!         }
//!     }
//! }
//!
//! impl<M: GuestAddressSpace + Send + 'static> ActivateDevice<M> for Counter {
//!     fn activate(&mut self, activation: Activation<M>) -> Result<(), ActivateError> {
//!         let handler = CounterHandler { next: 0, layout: ChainLayout::default() };
//!         self.worker = Some(Worker::spawn("counter", handler, activation)?);
//!         Ok(())
//!     }
//! }
//!
//! let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])?);
//! let irq = EventFd::new(EFD_NONBLOCK)?;
//! let transport = MmioTransport::new(Box::new(Counter::default()), mem, irq)?;
//! assert_eq!(transport.device_type(), 0x1234);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

#[cfg(doc)]
use crate::{ActivateDevice, VirtioDevice};
use crate::{Activation, ActiveQueue, InterruptKind, VirtioInterrupt, VIRTIO_RING_F_EVENT_IDX};
use ember_rate_limiter::{error_limited, warn_limited};
use log::error;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// Chains a queue handler should handle per wake-up before the worker looks at other
/// events: the size of Ember's largest queue, so one wake-up can empty a full ring.
pub const QUEUE_BUDGET: usize = 256;

/// epoll token of the stop eventfd; queue `i` is `QUEUE_TOKEN_BASE + i`, backend fd `j`
/// is `BACKEND_TOKEN_BASE + j`.
const STOP_TOKEN: u64 = 0;
const QUEUE_TOKEN_BASE: u64 = 1;
const BACKEND_TOKEN_BASE: u64 = 1 << 32;

/// What a device does on its worker thread, with guest memory held as `M`.
///
/// Every method runs on the worker thread, one at a time; none may block for long (the
/// stop request waits for the call in progress). A method that handles many requests
/// in a loop of its own checks [`WorkerContext::stopping`] between them.
pub trait QueueHandler<M: GuestAddressSpace>: Send + 'static {
    /// File descriptors besides the queues to wait on for input (level-triggered
    /// `EPOLLIN`), asked once when the worker starts; their index in the returned list
    /// is passed to [`QueueHandler::backend_ready`] and
    /// [`WorkerContext::watch_backend`]. The handler keeps them open while it runs.
    fn backend_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Queue `queue` (an index into the activated queues, in index order) was notified,
    /// or the worker just started (then every queue is, once, for chains the driver
    /// queued before DRIVER_OK).
    fn queue_notified(&mut self, ctx: &mut WorkerContext<M>, queue: usize);

    /// Backend fd `index` is readable, or hung up or failed (then the worker stops
    /// polling it after this call).
    fn backend_ready(&mut self, _ctx: &mut WorkerContext<M>, _index: usize) {}
}

/// What a [`QueueHandler`] works with: guest memory, the queues, the interrupt, and the
/// worker's epoll set.
pub struct WorkerContext<M: GuestAddressSpace> {
    mem: M,
    queues: Vec<ActiveQueue>,
    interrupt: Arc<dyn VirtioInterrupt>,
    features: u64,
    epoll: Epoll,
    backend_fds: Vec<RawFd>,
    /// Backend fds still in the epoll set (one that hung up or failed is removed).
    backend_live: Vec<bool>,
    /// Set by [`Worker::stop`] before it signals the stop eventfd.
    stop: Arc<AtomicBool>,
}

impl<M: GuestAddressSpace> fmt::Debug for WorkerContext<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerContext")
            .field("queues", &self.queues)
            .field("features", &format_args!("{:#x}", self.features))
            .field("backend_fds", &self.backend_fds)
            .field("backend_live", &self.backend_live)
            .finish_non_exhaustive()
    }
}

impl<M: GuestAddressSpace> WorkerContext<M> {
    /// A snapshot of guest memory. Take one per wake-up and use it for the whole call:
    /// it costs an atomic reference count (`Arc`) or an `ArcSwap` load
    /// (`GuestMemoryAtomic`).
    pub fn memory(&self) -> M::T {
        self.mem.memory()
    }

    /// The features the driver accepted.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether [`Worker::stop`] was called: a handler working through many requests in
    /// a loop of its own returns as soon as this is true (the worker then exits), so
    /// that a device reset waits for one request, not for the whole batch. One relaxed
    /// atomic load.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// The flag behind [`stopping`](Self::stopping), for a handler that calls
    /// [`drain_queue_until`] while it borrows a queue (and so cannot call `stopping`).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// The number of queues the driver enabled.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Queue `queue`, `None` if there is no such queue.
    pub fn queue_mut(&mut self, queue: usize) -> Option<&mut Queue> {
        self.queues.get_mut(queue).map(|q| &mut q.queue)
    }

    /// The device's interrupt, for a configuration-change interrupt
    /// ([`InterruptKind::Config`]); queue interrupts go through
    /// [`WorkerContext::signal_used`].
    pub fn interrupt(&self) -> &Arc<dyn VirtioInterrupt> {
        &self.interrupt
    }

    /// Serves queue `queue` the usual way: [`drain_queue_until`] with `handle` (which
    /// gets the memory snapshot and a chain, and returns the used length) and the
    /// worker's stop flag, then [`signal_used`](Self::signal_used) if any chain was
    /// handled and [`kick`](Self::kick) if the budget ran out. A stop request ends it
    /// after the request in flight.
    pub fn process_queue<F>(&mut self, queue: usize, budget: usize, mut handle: F) -> Drained
    where
        F: FnMut(&M::M, DescriptorChain<&M::M>) -> u32,
    {
        let mem = self.mem.memory();
        let Some(q) = self.queues.get_mut(queue) else {
            return Drained::default();
        };
        let drained = drain_queue_until(&*mem, &mut q.queue, budget, &self.stop, |chain| {
            handle(&mem, chain)
        });
        if drained.handled > 0 {
            self.signal_used(&mem, queue);
        }
        if drained.more && !self.stopping() {
            self.kick(queue);
        }
        drained
    }

    /// Raises queue `queue`'s interrupt if the driver wants one for the used entries
    /// added since the last call (virtio-queue's `needs_notification`, which honours
    /// `VIRTIO_RING_F_EVENT_IDX`). `mem` is this wake-up's [`memory`](Self::memory).
    pub fn signal_used(&mut self, mem: &M::M, queue: usize) {
        let Some(q) = self.queues.get_mut(queue) else {
            return;
        };
        let needed = q.queue.needs_notification(mem).unwrap_or_else(|e| {
            warn_limited!(
                "virtio queue {}: cannot read used_event ({e}); interrupting",
                q.index
            );
            true
        });
        if needed {
            if let Err(e) = self.interrupt.trigger(InterruptKind::Queue(q.index)) {
                error_limited!("virtio queue {}: cannot raise the interrupt: {e}", q.index);
            }
        }
    }

    /// Makes the worker come back to queue `queue` after the other ready events, for a
    /// handler that stopped with work left.
    pub fn kick(&self, queue: usize) {
        if let Some(q) = self.queues.get(queue) {
            if let Err(e) = q.notify.write(1) {
                error_limited!(
                    "virtio queue {}: cannot re-signal the notify eventfd: {e}",
                    q.index
                );
            }
        }
    }

    /// Starts or stops waiting for backend fd `index` to become readable: a handler
    /// with nowhere to put input (no rx buffers) pauses it, so that a readable fd does
    /// not wake the worker in a loop, and resumes it when the driver adds buffers.
    pub fn watch_backend(&self, index: usize, watch: bool) {
        let Some(&fd) = self.backend_fds.get(index) else {
            return;
        };
        if !self.backend_live.get(index).copied().unwrap_or(false) {
            return;
        }
        let events = if watch {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        let event = EpollEvent::new(events, BACKEND_TOKEN_BASE + index as u64);
        if let Err(e) = self.epoll.ctl(ControlOperation::Modify, fd, event) {
            error!("virtio worker: cannot change the interest in backend fd {fd}: {e}");
        }
    }

    fn drop_backend(&mut self, index: usize) {
        let (Some(&fd), Some(live)) = (
            self.backend_fds.get(index),
            self.backend_live.get_mut(index),
        ) else {
            return;
        };
        if !*live {
            return;
        }
        *live = false;
        error!("virtio worker: backend fd {fd} hung up or failed; no longer polling it");
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

/// How [`drain_queue`] ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// Chains handled (used entries added).
    pub handled: usize,
    /// The budget ran out, or a stop was requested ([`drain_queue_until`]), with chains
    /// possibly left; the caller should come back ([`WorkerContext::kick`]) unless the
    /// worker is stopping.
    pub more: bool,
}

/// Pops chains from `queue` and hands each to `handle`, which returns the used length,
/// until the ring is empty or `budget` chains are done.
///
/// Notifications are off while it pops; when the ring looks empty they are turned on
/// and the ring is checked once more, so a chain added in between is not left waiting
/// (with `VIRTIO_RING_F_EVENT_IDX` this sets `avail_event`).
///
/// Guest errors end the call until the next notification instead of spinning or
/// flooding the log: an avail index more than the queue size ahead of the device's
/// (virtio 1.2, 2.7.13.3 forbids it), a head index past the queue (the chain is skipped:
/// it has no used entry to write), and, the anti-spin guard, a ring whose avail index
/// stays ahead of what can be popped (an avail ring the device cannot read): after two
/// rounds that pop nothing the function gives up until the next notification. Each is
/// logged at most a few times per interval (the guest controls how often).
///
/// ```
/// use ember_virtio::vm_memory::{GuestAddress, GuestMemoryMmap};
/// use ember_virtio::worker::drain_queue;
/// use virtio_queue::mock::MockSplitQueue;
/// use virtio_queue::desc::{split::Descriptor, RawDescriptor};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// let driver = MockSplitQueue::new(&mem, 16);
/// let desc = Descriptor::new(0x8000, 64, 2 /* VRING_DESC_F_WRITE */, 0);
/// driver.add_desc_chains(&[RawDescriptor::from(desc)], 0).unwrap();
/// let mut queue = driver.create_queue().unwrap();
///
/// let drained = drain_queue(&mem, &mut queue, 256, |chain| {
///     chain.map(|desc| desc.len()).sum()
/// });
/// assert_eq!((drained.handled, drained.more), (1, false));
/// ```
pub fn drain_queue<G, F>(mem: &G, queue: &mut Queue, budget: usize, handle: F) -> Drained
where
    G: GuestMemory,
    F: FnMut(DescriptorChain<&G>) -> u32,
{
    drain_queue_until(mem, queue, budget, &AtomicBool::new(false), handle)
}

/// [`drain_queue`], which also stops, with [`Drained::more`] set, as soon as `stop` is
/// true: it is checked before each chain, so a stop request waits for at most the one
/// `handle` call in progress. [`WorkerContext::process_queue`] passes the worker's
/// [`stop_flag`](WorkerContext::stop_flag).
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use ember_virtio::vm_memory::{GuestAddress, GuestMemoryMmap};
/// use ember_virtio::worker::drain_queue_until;
/// use virtio_queue::mock::MockSplitQueue;
/// use virtio_queue::desc::{split::Descriptor, RawDescriptor};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// let driver = MockSplitQueue::new(&mem, 16);
/// let descs: Vec<RawDescriptor> =
///     (0..4).map(|_| RawDescriptor::from(Descriptor::new(0x8000, 64, 2, 0))).collect();
/// driver.add_desc_chains(&descs, 0).unwrap();
/// let mut queue = driver.create_queue().unwrap();
///
/// // The handler of the second chain asks for a stop: the third is not popped.
/// let stop = AtomicBool::new(false);
/// let mut seen = 0;
/// let drained = drain_queue_until(&mem, &mut queue, 256, &stop, |_chain| {
///     seen += 1;
///     if seen == 2 {
///         stop.store(true, Ordering::Relaxed);
///     }
///     0
/// });
/// assert_eq!((drained.handled, drained.more), (2, true));
/// ```
pub fn drain_queue_until<G, F>(
    mem: &G,
    queue: &mut Queue,
    budget: usize,
    stop: &AtomicBool,
    mut handle: F,
) -> Drained
where
    G: GuestMemory,
    F: FnMut(DescriptorChain<&G>) -> u32,
{
    let mut handled = 0;
    // Chains popped, used entry or not: what the budget counts.
    let mut popped_total = 0;
    let mut empty_rounds = 0;
    if let Err(e) = queue.disable_notification(mem) {
        warn_limited!("virtio queue: cannot disable notifications: {e}");
    }
    loop {
        let mut popped = false;
        loop {
            if stop.load(Ordering::Relaxed) {
                return Drained {
                    handled,
                    more: true,
                };
            }
            match pop_chain(mem, queue) {
                Pop::InvalidAvailIndex => {
                    return Drained {
                        handled,
                        more: false,
                    }
                }
                Pop::Empty => break,
                Pop::BadHead(_) => {
                    popped = true;
                    popped_total += 1;
                }
                Pop::Chain(chain) => {
                    popped = true;
                    popped_total += 1;
                    let head = chain.head_index();
                    let len = handle(chain);
                    if let Err(e) = queue.add_used(mem, head, len) {
                        error_limited!("virtio queue: cannot add used entry for head {head}: {e}");
                    }
                    handled += 1;
                }
            }
            if popped_total >= budget {
                return Drained {
                    handled,
                    more: true,
                };
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) => {
                if !popped {
                    empty_rounds += 1;
                    if empty_rounds >= 2 {
                        warn_limited!("virtio queue: avail index ahead of poppable chains; ignoring until the next notification");
                        break;
                    }
                }
            }
            Ok(false) => break,
            Err(e) => {
                error_limited!("virtio queue: cannot enable notifications: {e}");
                break;
            }
        }
    }
    Drained {
        handled,
        more: false,
    }
}

/// What [`pop_chain`] found.
#[derive(Debug)]
pub enum Pop<'a, G: GuestMemory> {
    /// The next chain; its head index is inside the queue.
    Chain(DescriptorChain<&'a G>),
    /// The next chain's head index is past the queue size: the avail entry is consumed
    /// (the guest gets no used entry for it, having named no real descriptor) and the
    /// chain must be dropped. Logged, rate-limited.
    BadHead(u16),
    /// Nothing to pop.
    Empty,
    /// The driver's avail index is more than the queue size ahead of the device's,
    /// which no valid driver does: the queue cannot be served until the driver resets
    /// it, and nothing was popped. Logged, rate-limited.
    InvalidAvailIndex,
}

/// Pops the next chain of `queue`, checking what virtio-queue leaves to the caller, or
/// reports with an error line on every call, which a guest could repeat at will: an
/// avail index too far ahead, and a head index past the queue. For a device that pops
/// chains itself (virtio-net's receive path, driven by its backend) rather than through
/// [`drain_queue`], which uses this.
///
/// ```
/// use ember_virtio::vm_memory::{GuestAddress, GuestMemoryMmap};
/// use ember_virtio::worker::{pop_chain, Pop};
/// use virtio_queue::mock::MockSplitQueue;
/// use virtio_queue::desc::{split::Descriptor, RawDescriptor};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// let driver = MockSplitQueue::new(&mem, 16);
/// let desc = Descriptor::new(0x8000, 64, 2, 0);
/// driver.add_desc_chains(&[RawDescriptor::from(desc)], 0).unwrap();
/// let mut queue = driver.create_queue().unwrap();
///
/// assert!(matches!(pop_chain(&mem, &mut queue), Pop::Chain(c) if c.head_index() == 0));
/// assert!(matches!(pop_chain(&mem, &mut queue), Pop::Empty));
/// ```
pub fn pop_chain<'a, G: GuestMemory>(mem: &'a G, queue: &mut Queue) -> Pop<'a, G> {
    if avail_index_invalid(mem, queue) {
        return Pop::InvalidAvailIndex;
    }
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        return Pop::Empty;
    };
    let head = chain.head_index();
    if head >= queue.size() {
        warn_limited!(
            "virtio queue: head index {head} is past the queue size {}; chain skipped",
            queue.size()
        );
        return Pop::BadHead(head);
    }
    Pop::Chain(chain)
}

/// Whether the driver's avail index is more than the queue size ahead of the device's,
/// which no valid driver does: the queue cannot be served until the driver resets it.
/// Checked before each pop, because virtio-queue logs an error on every pop of such a
/// ring (one per notification the guest sends); this check logs rate-limited.
fn avail_index_invalid<G: GuestMemory>(mem: &G, queue: &Queue) -> bool {
    let Ok(avail) = queue.avail_idx(mem, Ordering::Acquire) else {
        // Unreadable: `pop_descriptor_chain` fails too, without looping (see above).
        return false;
    };
    let ahead = avail - Wrapping(queue.next_avail());
    if ahead.0 <= queue.size() {
        return false;
    }
    warn_limited!(
        "virtio queue: avail index {} is {} entries ahead of the device's {} (queue size {}); ignoring the queue until the next notification",
        avail.0,
        ahead.0,
        queue.next_avail(),
        queue.size()
    );
    true
}

/// Why [`Worker::spawn`] failed; the handler comes back, so a device keeps its backend.
#[derive(thiserror::Error)]
#[error("cannot start the virtio worker thread: {source}")]
pub struct SpawnError<H> {
    /// The handler given to [`Worker::spawn`].
    pub handler: H,
    /// What failed: creating the eventfd or the epoll set, adding an fd to it, or
    /// creating the thread.
    #[source]
    pub source: io::Error,
}

impl<H> fmt::Debug for SpawnError<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpawnError")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl<H> From<SpawnError<H>> for crate::ActivateError {
    fn from(e: SpawnError<H>) -> Self {
        crate::ActivateError::Start(e.source)
    }
}

/// A running worker thread; dropping it stops it (and drops the handler).
pub struct Worker<H> {
    stop: EventFd,
    /// Set before `stop` is written; shared with the thread's [`WorkerContext`].
    stop_flag: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The handler and the queues, sent back when the thread ends.
    done: mpsc::Receiver<(H, Vec<ActiveQueue>)>,
}

impl<H: Send + 'static> Worker<H> {
    /// Starts thread `ember-virtio-<kind>` serving `activation`'s queues with `handler`,
    /// created by [`Activation::spawner`] if there is one. The thread runs
    /// [`Activation::thread_hook`] first, if there is one; if the hook fails, so does
    /// `spawn`, and the handler comes back in the [`SpawnError`].
    ///
    /// Each queue's EVENT_IDX is set according to the negotiated features. The handler's
    /// [`queue_notified`](QueueHandler::queue_notified) runs once for every queue first.
    pub fn spawn<M>(
        kind: &str,
        handler: H,
        activation: Activation<M>,
    ) -> Result<Self, SpawnError<H>>
    where
        M: GuestAddressSpace + Send + 'static,
        H: QueueHandler<M>,
    {
        let Activation {
            mem,
            mut queues,
            interrupt,
            features,
            thread_hook,
            spawner,
        } = activation;
        for q in &mut queues {
            q.queue
                .set_event_idx(features & VIRTIO_RING_F_EVENT_IDX != 0);
        }
        let backend_fds = handler.backend_fds();
        let (stop, epoll) = match set_up_epoll(&queues, &backend_fds) {
            Ok(pair) => pair,
            Err(source) => return Err(SpawnError { handler, source }),
        };
        let stop_flag = Arc::new(AtomicBool::new(false));
        let ctx = WorkerContext {
            mem,
            queues,
            interrupt,
            features,
            epoll,
            backend_live: vec![true; backend_fds.len()],
            backend_fds,
            stop: Arc::clone(&stop_flag),
        };
        // The handler travels through a channel, so that it is still ours if the thread
        // cannot be created or its start hook fails; the hook's result comes back first.
        // The handler comes back through `done` when the thread ends.
        let (send, recv) = mpsc::channel::<(H, WorkerContext<M>)>();
        let (started_send, started) = mpsc::sync_channel::<io::Result<()>>(1);
        let (done_send, done) = mpsc::sync_channel::<(H, Vec<ActiveQueue>)>(1);
        let name = format!("ember-virtio-{kind}");
        let thread_name = name.clone();
        let body = move || {
            let hooked = match &thread_hook {
                Some(hook) => hook(&thread_name),
                None => Ok(()),
            };
            let go = hooked.is_ok();
            let _ = started_send.send(hooked);
            if !go {
                return;
            }
            if let Ok((handler, ctx)) = recv.recv() {
                let (handler, ctx) = run(handler, ctx);
                let _ = done_send.send((handler, ctx.queues));
            }
        };
        let spawned = match &spawner {
            Some(spawner) => spawner.spawn(name, Box::new(body)),
            None => std::thread::Builder::new().name(name).spawn(body),
        };
        let thread = match spawned {
            Ok(thread) => thread,
            Err(source) => return Err(SpawnError { handler, source }),
        };
        let hooked = started
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the worker thread exited at once")));
        if let Err(source) = hooked {
            let _ = thread.join();
            return Err(SpawnError { handler, source });
        }
        if let Err(mpsc::SendError((handler, _))) = send.send((handler, ctx)) {
            let _ = thread.join();
            return Err(SpawnError {
                handler,
                source: io::Error::other("the worker thread exited at once"),
            });
        }
        Ok(Worker {
            stop,
            stop_flag,
            thread: Some(thread),
            done,
        })
    }
}

impl<H> Worker<H> {
    /// Signals the thread to stop, waits for it and returns the handler (`None` if the
    /// thread panicked). The wait is for the handler call in progress, and within
    /// [`WorkerContext::process_queue`] for the one request in progress (see the
    /// [module docs](self)).
    pub fn stop(mut self) -> Option<H> {
        self.stop_and_join().map(|(handler, _)| handler)
    }

    /// [`stop`](Self::stop), which also gives back the queues with their positions
    /// (`next_avail`, `next_used`) as the thread left them: every chain popped was
    /// completed (a stop waits for the request in flight), and the chains still in the
    /// available ring are left there. Activating the device again with these queues
    /// carries on where the worker stopped: this is how a device pauses
    /// ([`VirtioDevice::pause`]). `None` if the thread panicked.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use ember_virtio::vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap};
    /// use ember_virtio::vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    /// use ember_virtio::virtio_queue::{Queue, QueueT};
    /// use ember_virtio::worker::{QueueHandler, Worker, WorkerContext};
    /// use ember_virtio::{Activation, ActiveQueue, InterruptKind, VirtioInterrupt};
    ///
    /// struct Idle;
    /// impl<M: GuestAddressSpace> QueueHandler<M> for Idle {
    ///     fn queue_notified(&mut self, _ctx: &mut WorkerContext<M>, _queue: usize) {}
    /// }
    /// struct NoIrq;
    /// impl VirtioInterrupt for NoIrq {
    ///     fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> { Ok(()) }
    /// }
    ///
    /// let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)])?);
    /// let mut queue = Queue::new(16)?;
    /// queue.set_next_avail(5);
    /// let activation = Activation {
    ///     mem,
    ///     queues: vec![ActiveQueue { index: 0, queue, notify: EventFd::new(EFD_NONBLOCK)? }],
    ///     interrupt: Arc::new(NoIrq),
    ///     features: 0,
    ///     thread_hook: None,
    ///     spawner: None,
    /// };
    /// let worker = Worker::spawn("idle", Idle, activation).map_err(|e| e.source)?;
    /// let (_handler, queues) = worker.stop_keeping_queues().expect("the worker did not panic");
    /// assert_eq!(queues[0].queue.next_avail(), 5);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stop_keeping_queues(mut self) -> Option<(H, Vec<ActiveQueue>)> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Option<(H, Vec<ActiveQueue>)> {
        let thread = self.thread.take()?;
        // The flag first: the thread may be inside a batch, where it checks only the flag.
        self.stop_flag.store(true, Ordering::Relaxed);
        if let Err(e) = self.stop.write(1) {
            error!("virtio worker: cannot signal stop: {e}");
        }
        match thread.join() {
            Ok(()) => self.done.try_recv().ok(),
            Err(_) => {
                error!("virtio worker thread panicked");
                None
            }
        }
    }
}

impl<H> fmt::Debug for Worker<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl<H> Drop for Worker<H> {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// The stop eventfd and an epoll set with it, every queue's notify eventfd and the
/// backend fds.
fn set_up_epoll(queues: &[ActiveQueue], backend_fds: &[RawFd]) -> io::Result<(EventFd, Epoll)> {
    let stop = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, STOP_TOKEN),
    )?;
    // Edge-triggered and never read (see the module docs). The counter only grows; it
    // would take 2^64 notifications to saturate it.
    for (i, q) in queues.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            q.notify.as_raw_fd(),
            EpollEvent::new(
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                QUEUE_TOKEN_BASE + i as u64,
            ),
        )?;
    }
    for (j, &fd) in backend_fds.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, BACKEND_TOKEN_BASE + j as u64),
        )?;
    }
    Ok((stop, epoll))
}

/// Serves the queues until a stop request; gives back the handler and the context (the
/// queues in it, positions included).
fn run<M: GuestAddressSpace, H: QueueHandler<M>>(
    handler: H,
    mut ctx: WorkerContext<M>,
) -> (H, WorkerContext<M>) {
    let handler = serve(handler, &mut ctx);
    (handler, ctx)
}

fn serve<M: GuestAddressSpace, H: QueueHandler<M>>(
    mut handler: H,
    ctx: &mut WorkerContext<M>,
) -> H {
    // Serve whatever the driver queued before activation.
    for i in 0..ctx.queues.len() {
        if ctx.stopping() {
            return handler;
        }
        handler.queue_notified(ctx, i);
    }
    let mut events = vec![EpollEvent::default(); 8 + ctx.queues.len() + ctx.backend_fds.len()];
    loop {
        let n = match ctx.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("virtio worker: epoll_wait failed, stopping: {e}");
                return handler;
            }
        };
        if events[..n].iter().any(|ev| ev.data() == STOP_TOKEN) {
            return handler;
        }
        for ev in &events[..n] {
            // A stop requested during this batch of events: do not start another call.
            if ctx.stopping() {
                return handler;
            }
            let token = ev.data();
            if token >= BACKEND_TOKEN_BASE {
                let index = (token - BACKEND_TOKEN_BASE) as usize;
                handler.backend_ready(ctx, index);
                // epoll reports hang-ups and errors whatever the interest set, so a dead
                // backend fd would wake the loop forever: stop polling it.
                if ev
                    .event_set()
                    .intersects(EventSet::HANG_UP | EventSet::ERROR)
                {
                    ctx.drop_backend(index);
                }
            } else if token >= QUEUE_TOKEN_BASE {
                let index = (token - QUEUE_TOKEN_BASE) as usize;
                if index < ctx.queues.len() {
                    handler.queue_notified(ctx, index);
                }
            }
        }
    }
}

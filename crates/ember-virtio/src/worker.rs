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
//! * **Clean stop.** [`Worker::stop`] (or dropping the [`Worker`]) writes the stop
//!   eventfd; the thread checks it before anything else in each wake-up, finishes the
//!   handler call it is in, and exits. The handler comes back, so a device keeps its
//!   backend and can be activated again.
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
//! completed (normally with an error status), queue errors are logged and the worker
//! carries on, and a ring whose index runs ahead of its chains is ignored until the next
//! notification.
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
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

#[cfg(doc)]
use crate::{ActivateDevice, VirtioDevice};
use crate::{Activation, ActiveQueue, InterruptKind, VirtioInterrupt, VIRTIO_RING_F_EVENT_IDX};
use log::{debug, error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
/// stop request waits for the call in progress).
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

    /// Serves queue `queue` the usual way: [`drain_queue`] with `handle` (which gets the
    /// memory snapshot and a chain, and returns the used length), then
    /// [`signal_used`](Self::signal_used) if any chain was handled and
    /// [`kick`](Self::kick) if the budget ran out.
    pub fn process_queue<F>(&mut self, queue: usize, budget: usize, mut handle: F) -> Drained
    where
        F: FnMut(&M::M, DescriptorChain<&M::M>) -> u32,
    {
        let mem = self.mem.memory();
        let Some(q) = self.queues.get_mut(queue) else {
            return Drained::default();
        };
        let drained = drain_queue(&*mem, &mut q.queue, budget, |chain| handle(&mem, chain));
        if drained.handled > 0 {
            self.signal_used(&mem, queue);
        }
        if drained.more {
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
            warn!(
                "virtio queue {}: cannot read used_event ({e}); interrupting",
                q.index
            );
            true
        });
        if needed {
            if let Err(e) = self.interrupt.trigger(InterruptKind::Queue(q.index)) {
                error!("virtio queue {}: cannot raise the interrupt: {e}", q.index);
            }
        }
    }

    /// Makes the worker come back to queue `queue` after the other ready events, for a
    /// handler that stopped with work left.
    pub fn kick(&self, queue: usize) {
        if let Some(q) = self.queues.get(queue) {
            if let Err(e) = q.notify.write(1) {
                error!(
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
    /// The budget ran out with chains possibly left; the caller should come back
    /// ([`WorkerContext::kick`]).
    pub more: bool,
}

/// Pops chains from `queue` and hands each to `handle`, which returns the used length,
/// until the ring is empty or `budget` chains are done.
///
/// Notifications are off while it pops; when the ring looks empty they are turned on
/// and the ring is checked once more, so a chain added in between is not left waiting
/// (with `VIRTIO_RING_F_EVENT_IDX` this sets `avail_event`). A ring whose avail index
/// runs ahead of what can be popped (an invalid index from a buggy or hostile driver)
/// does not spin: after two rounds that pop nothing the function gives up until the
/// next notification.
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
pub fn drain_queue<G, F>(mem: &G, queue: &mut Queue, budget: usize, mut handle: F) -> Drained
where
    G: GuestMemory,
    F: FnMut(DescriptorChain<&G>) -> u32,
{
    let mut handled = 0;
    let mut empty_rounds = 0;
    if let Err(e) = queue.disable_notification(mem) {
        warn!("virtio queue: cannot disable notifications: {e}");
    }
    loop {
        let mut popped = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            popped = true;
            let head = chain.head_index();
            let len = handle(chain);
            if let Err(e) = queue.add_used(mem, head, len) {
                error!("virtio queue: cannot add used entry for head {head}: {e}");
            }
            handled += 1;
            if handled >= budget {
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
                        // Guest-triggered: keep it out of the default log level.
                        debug!("virtio queue: avail index ahead of poppable chains; ignoring until the next notification");
                        break;
                    }
                }
            }
            Ok(false) => break,
            Err(e) => {
                error!("virtio queue: cannot enable notifications: {e}");
                break;
            }
        }
    }
    Drained {
        handled,
        more: false,
    }
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
    thread: Option<JoinHandle<Option<H>>>,
}

impl<H: Send + 'static> Worker<H> {
    /// Starts thread `ember-virtio-<kind>` serving `activation`'s queues with `handler`.
    /// The thread runs [`Activation::thread_hook`] first, if there is one; if the hook
    /// fails, so does `spawn`, and the handler comes back in the [`SpawnError`].
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
        let ctx = WorkerContext {
            mem,
            queues,
            interrupt,
            features,
            epoll,
            backend_live: vec![true; backend_fds.len()],
            backend_fds,
        };
        // The handler travels through a channel, so that it is still ours if the thread
        // cannot be created or its start hook fails; the hook's result comes back first.
        let (send, recv) = mpsc::channel::<(H, WorkerContext<M>)>();
        let (started_send, started) = mpsc::sync_channel::<io::Result<()>>(1);
        let name = format!("ember-virtio-{kind}");
        let thread_name = name.clone();
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let hooked = match &thread_hook {
                Some(hook) => hook(&thread_name),
                None => Ok(()),
            };
            let go = hooked.is_ok();
            let _ = started_send.send(hooked);
            if !go {
                return None;
            }
            let (handler, ctx) = recv.recv().ok()?;
            Some(run(handler, ctx))
        });
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
            thread: Some(thread),
        })
    }
}

impl<H> Worker<H> {
    /// Signals the thread to stop, waits for it and returns the handler (`None` if the
    /// thread panicked).
    pub fn stop(mut self) -> Option<H> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Option<H> {
        let thread = self.thread.take()?;
        if let Err(e) = self.stop.write(1) {
            error!("virtio worker: cannot signal stop: {e}");
        }
        match thread.join() {
            Ok(handler) => handler,
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
    let stop = EventFd::new(EFD_NONBLOCK)?;
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

fn run<M: GuestAddressSpace, H: QueueHandler<M>>(mut handler: H, mut ctx: WorkerContext<M>) -> H {
    // Serve whatever the driver queued before activation.
    for i in 0..ctx.queues.len() {
        handler.queue_notified(&mut ctx, i);
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
            let token = ev.data();
            if token >= BACKEND_TOKEN_BASE {
                let index = (token - BACKEND_TOKEN_BASE) as usize;
                handler.backend_ready(&mut ctx, index);
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
                    handler.queue_notified(&mut ctx, index);
                }
            }
        }
    }
}

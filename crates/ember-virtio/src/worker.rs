//! The worker thread every virtio device runs once activated.
//!
//! One thread per device waits with epoll on each queue's notify eventfd, on the
//! backend's file descriptors (the tap) and on a stop eventfd. Notify eventfds are
//! edge-triggered and never read (see `set_up_epoll`): a queue notification costs the
//! worker one `epoll_wait` and is handed to the device's [`QueueHandler`], which pops chains, handles them
//! with plain functions and adds used entries; [`WorkerContext::signal_used`] then raises
//! the queue's interrupt when `needs_notification` (which honours `EVENT_IDX`) says so.
//!
//! Work per wake-up is bounded: [`drain_queue`] handles at most a budget of chains and,
//! if the ring still has more, re-signals the queue's own eventfd so that the loop comes
//! back to it after looking at everything else (including the stop request).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use crate::{Activation, ActiveQueue, InterruptKind, VirtioInterrupt, VIRTIO_RING_F_EVENT_IDX};
use log::{debug, error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Chains handled per queue per wake-up before the worker looks at other events.
pub const QUEUE_BUDGET: usize = 256;

/// epoll token of the stop eventfd; queue `i` is `QUEUE_TOKEN_BASE + i`, backend fd `j`
/// is `BACKEND_TOKEN_BASE + j`.
const STOP_TOKEN: u64 = 0;
const QUEUE_TOKEN_BASE: u64 = 1;
const BACKEND_TOKEN_BASE: u64 = 1 << 32;

/// What a device does on its worker thread.
pub trait QueueHandler: Send + 'static {
    /// File descriptors besides the queues to wait on for input (level-triggered
    /// `EPOLLIN`); their index is passed to [`QueueHandler::backend_ready`].
    fn backend_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Queue `queue` (an index into [`WorkerContext::queues`]) was notified (its eventfd
    /// is already drained), or the worker just started.
    fn queue_notified(&mut self, ctx: &mut WorkerContext, queue: usize);

    /// Backend fd `index` is readable.
    fn backend_ready(&mut self, _ctx: &mut WorkerContext, _index: usize) {}
}

/// What a handler works with: guest memory, the queues, the interrupt.
pub struct WorkerContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The device's queues, in index order.
    pub queues: Vec<ActiveQueue>,
    /// Raises interrupts.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    epoll: Epoll,
    backend_fds: Vec<RawFd>,
    /// Backend fds still in the epoll set (one that hung up or failed is removed).
    backend_live: Vec<bool>,
}

impl WorkerContext {
    /// Raises queue `queue`'s interrupt if the driver wants one for the used entries
    /// added since the last call.
    pub fn signal_used(&mut self, queue: usize) {
        let Some(q) = self.queues.get_mut(queue) else {
            return;
        };
        let needed = q.queue.needs_notification(&self.mem).unwrap_or_else(|e| {
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

    /// Makes the worker come back to queue `queue` after looking at other events.
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

    /// Starts or stops waiting for backend fd `index` to become readable.
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
}

impl WorkerContext {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Chains handled (used entries added).
    pub handled: usize,
    /// The budget ran out with chains possibly left; the caller should come back.
    pub more: bool,
}

/// Pops chains from `queue` and hands each to `handle`, which returns the used length,
/// until the ring is empty (notifications then re-enabled) or `budget` chains are done.
///
/// A ring whose avail index runs ahead of what can be popped (an invalid index from a
/// buggy or hostile driver) does not spin: after two rounds that pop nothing the
/// function gives up until the next notification.
pub fn drain_queue<F>(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    budget: usize,
    mut handle: F,
) -> Drained
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
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

/// A running worker thread; dropping it stops it.
pub struct Worker<H> {
    stop: EventFd,
    thread: Option<JoinHandle<Option<H>>>,
}

impl<H: QueueHandler> Worker<H> {
    /// Starts thread `ember-virtio-<kind>` serving `activation`'s queues with `handler`.
    /// Queues have EVENT_IDX set according to the negotiated features. On failure the
    /// handler comes back with the error, so a device keeps its backend.
    pub fn spawn(kind: &str, handler: H, activation: Activation) -> Result<Self, (io::Error, H)> {
        let Activation {
            mem,
            mut queues,
            interrupt,
            features,
        } = activation;
        for q in &mut queues {
            q.queue
                .set_event_idx(features & VIRTIO_RING_F_EVENT_IDX != 0);
        }
        let backend_fds = handler.backend_fds();
        let (stop, epoll) = match set_up_epoll(&queues, &backend_fds) {
            Ok(pair) => pair,
            Err(e) => return Err((e, handler)),
        };
        let ctx = WorkerContext {
            mem,
            queues,
            interrupt,
            epoll,
            backend_live: vec![true; backend_fds.len()],
            backend_fds,
        };
        // The handler travels through a channel, so that it is still ours if the thread
        // cannot be created.
        let (send, recv) = mpsc::channel::<(H, WorkerContext)>();
        let spawned = std::thread::Builder::new()
            .name(format!("ember-virtio-{kind}"))
            .spawn(move || {
                let (handler, ctx) = recv.recv().ok()?;
                Some(run(handler, ctx))
            });
        let thread = match spawned {
            Ok(thread) => thread,
            Err(e) => return Err((e, handler)),
        };
        if let Err(mpsc::SendError((handler, _))) = send.send((handler, ctx)) {
            let _ = thread.join();
            return Err((
                io::Error::other("the worker thread exited at once"),
                handler,
            ));
        }
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

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

impl<H> std::fmt::Debug for Worker<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl<H> Drop for Worker<H> {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = thread.join();
        }
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
    // Notify eventfds are edge-triggered and never read: every signal (KVM's ioeventfd,
    // the transport's QueueNotify, `WorkerContext::kick`) wakes the eventfd's waiters,
    // which puts it on epoll's ready list again, so no notification is lost, and the
    // worker saves a `read(2)` per notification (~0.4 us here). The counter only grows;
    // it would take 2^64 notifications to saturate it.
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

fn run<H: QueueHandler>(mut handler: H, mut ctx: WorkerContext) -> H {
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

//! The queue worker's protections, on the real code paths: a stop request waits for one
//! request, not for a batch, and the drain loop's anti-spin guard ends a call on a ring
//! whose avail index runs ahead of what can be popped.

use std::num::Wrapping;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

mod common;

use common::{unreadable_avail_ring, Ring};
use ember_virtio::virtio_queue::{Queue, QueueT};
use ember_virtio::vm_memory::{GuestAddress, GuestMemoryMmap};
use ember_virtio::vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use ember_virtio::worker::{drain_queue, QueueHandler, Worker, WorkerContext, QUEUE_BUDGET};
use ember_virtio::{Activation, ActiveQueue, InterruptKind, VirtioInterrupt, VIRTIO_F_VERSION_1};

/// Long enough for a hang to be a hang, however slow the machine; a test that passes
/// never waits for it.
const HANG: Duration = Duration::from_secs(60);

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        Ok(())
    }
}

/// A device whose every request takes `REQUEST_TIME`: a slow disk, say.
struct SlowHandler {
    handled: Arc<AtomicUsize>,
    first: Option<mpsc::Sender<()>>,
}

const REQUEST_TIME: Duration = Duration::from_millis(20);

impl QueueHandler<Arc<GuestMemoryMmap>> for SlowHandler {
    fn queue_notified(&mut self, ctx: &mut WorkerContext<Arc<GuestMemoryMmap>>, queue: usize) {
        let Self { handled, first } = self;
        ctx.process_queue(queue, QUEUE_BUDGET, |_mem, _chain| {
            if let Some(first) = first.take() {
                let _ = first.send(());
            }
            std::thread::sleep(REQUEST_TIME);
            handled.fetch_add(1, Ordering::SeqCst);
            0
        });
    }
}

#[test]
fn stop_waits_for_one_request_not_for_the_batch() {
    const CHAINS: u16 = 256;
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let mut ring = Ring::new(&mem, CHAINS);
    // 256 one-descriptor chains, a full ring and a full budget.
    let heads: Vec<u16> = (0..CHAINS).collect();
    for &head in &heads {
        ring.buffer(head);
    }
    ring.offer(&heads);
    let queue = ring.queue();
    let activation = Activation {
        mem: mem.clone(),
        queues: vec![ActiveQueue {
            index: 0,
            queue,
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        }],
        interrupt: Arc::new(NoInterrupt),
        features: VIRTIO_F_VERSION_1,
        thread_hook: None,
        spawner: None,
    };
    let handled = Arc::new(AtomicUsize::new(0));
    let (first_send, first) = mpsc::channel();
    let handler = SlowHandler {
        handled: handled.clone(),
        first: Some(first_send),
    };
    let worker = Worker::spawn("slow", handler, activation).unwrap();
    // The worker serves the queued chains as it starts; stop it inside the batch.
    first
        .recv_timeout(HANG)
        .expect("the worker never started a request");
    let handler = worker.stop().expect("the worker thread panicked");

    let done = handled.load(Ordering::SeqCst);
    assert_eq!(
        usize::from(ring.used_idx()),
        done,
        "every handled request was completed"
    );
    // Without the stop check between requests, all 256 (5 s of work) are handled first.
    assert!(
        done < 16,
        "stop waited for {done} of {CHAINS} requests; it should wait for the one in flight"
    );
    assert!(handler.first.is_none());
}

/// Runs the real `drain_queue` on its own thread; `None` if it did not return (the
/// thread is left spinning, and the test fails).
fn drain_on_thread(mem: GuestMemoryMmap, mut queue: Queue) -> Option<(usize, bool, u16)> {
    let (send, recv) = mpsc::channel();
    std::thread::spawn(move || {
        let drained = drain_queue(&mem, &mut queue, QUEUE_BUDGET, |_chain| 0);
        let _ = send.send((drained.handled, drained.more, queue.next_avail()));
    });
    recv.recv_timeout(HANG).ok()
}

#[test]
fn anti_spin_guard_ends_a_drain_of_an_unpoppable_ring() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    // One chain announced, none readable: without the guard, every round pops nothing,
    // re-enabling notifications reports the ring non-empty, and the loop never ends.
    let queue = unreadable_avail_ring(&mem, 16, 1);
    let (handled, more, next_avail) =
        drain_on_thread(mem, queue).expect("drain_queue spun on a ring it cannot pop");
    assert_eq!((handled, more, next_avail), (0, false, 0));
}

#[test]
fn avail_index_too_far_ahead_is_ignored() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let ring = Ring::new(&mem, 16);
    let queue = ring.queue();
    // 17 entries announced on a 16-entry ring: no valid driver does that.
    ring.set_avail_idx((Wrapping(queue.next_avail()) + Wrapping(17)).0);
    let (handled, more, next_avail) =
        drain_on_thread(mem, queue).expect("drain_queue spun on an invalid avail index");
    assert_eq!((handled, more, next_avail), (0, false, 0));
}

#[test]
fn head_index_past_the_queue_is_skipped_without_a_used_entry() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let mut ring = Ring::new(&mem, 16);
    for head in 0..3 {
        ring.buffer(head);
    }
    // The second avail entry names head 40, past the 16-entry queue.
    ring.offer(&[0, 40, 2]);
    let mut queue = ring.queue();
    let mut heads = Vec::new();
    let drained = drain_queue(&mem, &mut queue, QUEUE_BUDGET, |chain| {
        heads.push(chain.head_index());
        64
    });
    assert_eq!(heads, [0, 2]);
    assert_eq!((drained.handled, drained.more), (2, false));
    assert_eq!(queue.next_avail(), 3);
    assert_eq!(ring.used_idx(), 2);
}

//! Pause, resume, save and restore of the virtio-mmio transport, with a device written
//! on the public API only (a "sequencer" that numbers the chains it serves) and driven
//! through the registers as a guest driver would.
//!
//! The sequencer gives each chain the used length `n` for the `n`-th chain it served,
//! so a chain served twice, skipped or served out of order shows in the used ring.

use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{Ring, USED};
use ember_bus::BusDevice;
use ember_virtio::mmio::{reg, status, MmioTransport, INTERRUPT_CONFIG_CHANGE};
use ember_virtio::virtio_queue::QueueT;
use ember_virtio::vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use ember_virtio::vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use ember_virtio::worker::{QueueHandler, Worker, WorkerContext, QUEUE_BUDGET};
use ember_virtio::{
    ActivateDevice, ActivateError, Activation, ActiveQueue, InterruptKind, MmioTransportState,
    PauseError, TransportError, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

type Mem = Arc<GuestMemoryMmap>;

const SEQUENCER_ID: u32 = 0xfff1;
const UNPAUSABLE_ID: u32 = 0xfff2;
const QUEUE_MAX: u16 = 64;
const HANG: Duration = Duration::from_secs(30);

/// Runs on the worker: numbers chains, optionally slowly (a slow disk, say).
struct SequencerHandler {
    next: u32,
    delay: Duration,
}

impl<M: GuestAddressSpace> QueueHandler<M> for SequencerHandler {
    fn queue_notified(&mut self, ctx: &mut WorkerContext<M>, queue: usize) {
        let Self { next, delay } = self;
        ctx.process_queue(queue, QUEUE_BUDGET, |_mem, _chain| {
            std::thread::sleep(*delay);
            *next += 1;
            *next
        });
    }
}

/// A third-party device that supports pause: it keeps its handler's counter.
struct Sequencer {
    worker: Option<Worker<SequencerHandler>>,
    next: u32,
    delay: Duration,
    generation: u32,
}

impl Sequencer {
    fn new(delay: Duration) -> Self {
        Sequencer {
            worker: None,
            next: 0,
            delay,
            generation: 0,
        }
    }
}

impl VirtioDevice for Sequencer {
    fn device_type(&self) -> u32 {
        SEQUENCER_ID
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX]
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }
    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn config_generation(&self) -> u32 {
        self.generation
    }
    fn reset(&mut self) {
        if let Some(handler) = self.worker.take().and_then(Worker::stop) {
            self.next = handler.next;
        }
    }
    fn pause(&mut self) -> Result<Vec<ActiveQueue>, PauseError> {
        let worker = self.worker.take().ok_or(PauseError::NotRunning {
            device_type: SEQUENCER_ID,
        })?;
        let (handler, queues) = worker.stop_keeping_queues().ok_or(PauseError::WorkerLost {
            device_type: SEQUENCER_ID,
        })?;
        self.next = handler.next;
        Ok(queues)
    }
}

impl<M: GuestAddressSpace + Send + 'static> ActivateDevice<M> for Sequencer {
    fn activate(&mut self, activation: Activation<M>) -> Result<(), ActivateError> {
        let handler = SequencerHandler {
            next: self.next,
            delay: self.delay,
        };
        self.worker = Some(Worker::spawn("sequencer", handler, activation)?);
        Ok(())
    }
}

/// A device on the worker that does not implement pause (the trait's default).
#[derive(Default)]
struct Unpausable {
    worker: Option<Worker<SequencerHandler>>,
}

impl VirtioDevice for Unpausable {
    fn device_type(&self) -> u32 {
        UNPAUSABLE_ID
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX]
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn reset(&mut self) {
        self.worker.take();
    }
}

impl<M: GuestAddressSpace + Send + 'static> ActivateDevice<M> for Unpausable {
    fn activate(&mut self, activation: Activation<M>) -> Result<(), ActivateError> {
        let handler = SequencerHandler {
            next: 0,
            delay: Duration::ZERO,
        };
        self.worker = Some(Worker::spawn("unpausable", handler, activation)?);
        Ok(())
    }
}

fn memory() -> Mem {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
}

fn transport(device: Box<dyn ActivateDevice<Mem>>, mem: &Mem) -> MmioTransport<Mem> {
    MmioTransport::new(device, mem.clone(), EventFd::new(EFD_NONBLOCK).unwrap()).unwrap()
}

fn read(t: &MmioTransport<Mem>, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn write(t: &MmioTransport<Mem>, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

const FEATURES_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

/// Negotiates the device's features and sets queue 0 up on `ring`'s addresses, up to
/// but not including QueueReady and DRIVER_OK.
fn set_up(t: &MmioTransport<Mem>, size: u16) {
    write(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    let features = t.offered_features();
    for sel in 0..2 {
        write(t, reg::DRIVER_FEATURES_SEL, sel);
        write(t, reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
    }
    write(t, reg::STATUS, FEATURES_OK);
    write(t, reg::QUEUE_SEL, 0);
    write(t, reg::QUEUE_NUM, u32::from(size));
    write(t, reg::QUEUE_DESC_LOW, common::DESC as u32);
    write(t, reg::QUEUE_DRIVER_LOW, common::AVAIL as u32);
    write(t, reg::QUEUE_DEVICE_LOW, USED as u32);
}

fn start(t: &MmioTransport<Mem>) {
    write(t, reg::QUEUE_READY, 1);
    write(t, reg::STATUS, FEATURES_OK | status::DRIVER_OK);
    assert!(t.is_activated());
}

/// Used ring entry `i`: (id, len).
fn used_entry(mem: &Mem, size: u16, i: u16) -> (u32, u32) {
    let at = USED + 4 + 8 * u64::from(i % size);
    let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
    let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
    (id, len)
}

fn wait_used(ring: &Ring, at_least: u16) -> u16 {
    let deadline = Instant::now() + HANG;
    loop {
        let used = ring.used_idx();
        if used >= at_least {
            return used;
        }
        assert!(Instant::now() < deadline, "the device used {used} chains");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A ring of `size` one-buffer chains offered in order, heads 0..size.
fn full_ring(mem: &Mem, size: u16) -> Ring<'_> {
    let mut ring = Ring::new(mem, size);
    let heads: Vec<u16> = (0..size).collect();
    for &head in &heads {
        ring.buffer(head);
    }
    ring.offer(&heads);
    ring
}

/// Every used entry in order: chain `i` has head `i` and was the `first + i`-th served.
fn assert_served_in_order(mem: &Mem, size: u16, from: u16, to: u16, first_seq: u32) {
    for i in from..to {
        let (id, len) = used_entry(mem, size, i);
        assert_eq!(id, u32::from(i), "used entry {i} is for the wrong chain");
        assert_eq!(
            len,
            first_seq + u32::from(i - from),
            "used entry {i}: chain served out of order or twice"
        );
    }
}

/// Pausing mid-batch stops the worker after the request in flight; nothing moves while
/// paused; resume carries on from the same ring positions, each chain served once.
#[test]
fn pause_mid_batch_and_resume_serve_each_chain_once() {
    let mem = memory();
    let ring = full_ring(&mem, QUEUE_MAX);
    let t = transport(Box::new(Sequencer::new(Duration::from_millis(5))), &mem);
    set_up(&t, QUEUE_MAX);
    start(&t);
    wait_used(&ring, 3);

    let paused_at = Instant::now();
    t.pause().unwrap();
    assert!(
        paused_at.elapsed() < Duration::from_secs(2),
        "pause waited for the batch: {:?}",
        paused_at.elapsed()
    );
    assert!(t.is_paused());
    t.pause().unwrap(); // idempotent
    let used = ring.used_idx();
    assert!(used < QUEUE_MAX, "the whole batch ran before the pause");
    // A notification while paused is not served until resume.
    write(&t, reg::QUEUE_NOTIFY, 0);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ring.used_idx(), used, "a paused device served a chain");

    let state = t.save_state().unwrap();
    let queue = state.queues[0].active.expect("the queue is active");
    assert_eq!(queue.next_used, used);
    assert_eq!(
        queue.next_avail, used,
        "a chain was popped but not completed"
    );
    assert!(queue.event_idx_enabled);
    assert_eq!(state.status, FEATURES_OK | status::DRIVER_OK);
    assert!(state.activated);

    t.resume().unwrap();
    assert!(!t.is_paused());
    t.resume().unwrap(); // idempotent
    wait_used(&ring, QUEUE_MAX);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(ring.used_idx(), QUEUE_MAX, "chains served twice");
    assert_served_in_order(&mem, QUEUE_MAX, 0, QUEUE_MAX, 1);
}

/// A state saved while paused, through postcard, into a new transport and device: the
/// chains left in the ring are served, the used index goes on from where it was.
#[test]
fn restore_into_a_new_transport_carries_on() {
    let mem = memory();
    let ring = full_ring(&mem, QUEUE_MAX);
    let old = transport(Box::new(Sequencer::new(Duration::from_millis(5))), &mem);
    set_up(&old, QUEUE_MAX);
    start(&old);
    wait_used(&ring, 5);
    old.pause().unwrap();
    let done = ring.used_idx();
    let bytes = postcard::to_allocvec(&old.save_state().unwrap()).unwrap();
    drop(old);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(ring.used_idx(), done);

    let state: MmioTransportState = postcard::from_bytes(&bytes).unwrap();
    let new = transport(Box::new(Sequencer::new(Duration::ZERO)), &mem);
    assert!(!new.is_activated());
    new.restore_state(&state).unwrap();
    assert!(new.is_activated());
    assert_eq!(read(&new, reg::STATUS), FEATURES_OK | status::DRIVER_OK);
    wait_used(&ring, QUEUE_MAX);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(ring.used_idx(), QUEUE_MAX, "chains served twice");
    // The old device served the first ones; the new one, counting from 1, the rest.
    assert_served_in_order(&mem, QUEUE_MAX, 0, done, 1);
    assert_served_in_order(&mem, QUEUE_MAX, done, QUEUE_MAX, 1);

    // The restored transport pauses and saves again like any other.
    new.pause().unwrap();
    let again = new.save_state().unwrap();
    assert_eq!(again.queues[0].active.unwrap().next_used, QUEUE_MAX);
}

/// Interrupt status and configuration generation survive a save and restore.
#[test]
fn interrupt_status_and_config_generation_are_restored() {
    let mem = memory();
    let _ring = Ring::new(&mem, 16);
    let mut device = Sequencer::new(Duration::ZERO);
    device.generation = 7;
    let old = transport(Box::new(device), &mem);
    set_up(&old, 16);
    start(&old);
    old.interrupt().trigger(InterruptKind::Config).unwrap();
    assert_eq!(read(&old, reg::INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
    old.pause().unwrap();
    let state = old.save_state().unwrap();
    assert_eq!(state.interrupt_status, INTERRUPT_CONFIG_CHANGE);
    assert_eq!(state.config_generation, 7);
    drop(old);

    let mut device = Sequencer::new(Duration::ZERO);
    device.generation = 2;
    let new = transport(Box::new(device), &mem);
    new.restore_state(&state).unwrap();
    assert_eq!(read(&new, reg::INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
    assert_eq!(read(&new, reg::CONFIG_GENERATION), 7);
    write(&new, reg::INTERRUPT_ACK, INTERRUPT_CONFIG_CHANGE);
    assert_eq!(read(&new, reg::INTERRUPT_STATUS), 0);
}

/// A driver half-way through set-up: the registers it wrote come back, and it finishes
/// on the new transport.
#[test]
fn a_state_saved_during_set_up_restores_the_registers() {
    let mem = memory();
    let ring = full_ring(&mem, 16);
    let old = transport(Box::new(Sequencer::new(Duration::ZERO)), &mem);
    set_up(&old, 16);
    old.pause().unwrap(); // not activated: nothing to stop
    let state = old.save_state().unwrap();
    assert!(!state.activated);
    assert_eq!(state.queues[0].size, 16);
    assert_eq!(state.queues[0].desc, Some(common::DESC));
    assert_eq!(state.queues[0].active, None);
    drop(old);

    let new = transport(Box::new(Sequencer::new(Duration::ZERO)), &mem);
    new.restore_state(&state).unwrap();
    assert!(!new.is_activated());
    assert_eq!(read(&new, reg::STATUS), FEATURES_OK);
    // Only QueueReady and DRIVER_OK are left to write: the sizes and addresses are back.
    start(&new);
    wait_used(&ring, 16);
    assert_served_in_order(&mem, 16, 0, 16, 1);
}

/// A device that does not implement pause: an error naming it, at once, and the device
/// keeps running.
#[test]
fn pausing_a_device_without_pause_support_is_an_error() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 16);
    let t = transport(Box::<Unpausable>::default(), &mem);
    set_up(&t, 16);
    start(&t);
    let asked = Instant::now();
    let err = t.pause().unwrap_err();
    assert!(asked.elapsed() < Duration::from_secs(2));
    assert!(
        matches!(
            err,
            TransportError::Pause(PauseError::Unsupported {
                device_type: UNPAUSABLE_ID
            })
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&UNPAUSABLE_ID.to_string()) && message.contains("does not support pause"),
        "{message}"
    );
    assert!(!t.is_paused());
    assert!(matches!(
        t.save_state(),
        Err(TransportError::NotPaused {
            device_type: UNPAUSABLE_ID
        })
    ));
    // Still serving.
    ring.buffer(0);
    ring.offer(&[0]);
    write(&t, reg::QUEUE_NOTIFY, 0);
    wait_used(&ring, 1);
}

#[test]
fn save_state_needs_a_paused_device() {
    let mem = memory();
    let _ring = Ring::new(&mem, 16);
    let t = transport(Box::new(Sequencer::new(Duration::ZERO)), &mem);
    set_up(&t, 16);
    start(&t);
    let err = t.save_state().unwrap_err();
    assert!(err.to_string().contains("pause it"), "{err}");
    t.pause().unwrap();
    t.save_state().unwrap();
}

/// A reset while paused drops the kept queues; the driver can set the device up again.
#[test]
fn a_reset_while_paused_forgets_the_queues() {
    let mem = memory();
    let ring = full_ring(&mem, 16);
    let t = transport(Box::new(Sequencer::new(Duration::ZERO)), &mem);
    set_up(&t, 16);
    start(&t);
    wait_used(&ring, 16);
    t.pause().unwrap();
    write(&t, reg::STATUS, 0);
    assert!(!t.is_paused() && !t.is_activated());
    t.resume().unwrap(); // nothing to resume
    assert!(!t.is_activated());
    let state = t.save_state().unwrap();
    assert_eq!(state.status, 0);
    assert_eq!(state.queues[0].active, None);
}

/// A paused, activated sequencer's state, with chains left in its ring.
fn saved_state(mem: &Mem) -> MmioTransportState {
    let old = transport(Box::new(Sequencer::new(Duration::ZERO)), mem);
    set_up(&old, 16);
    start(&old);
    old.pause().unwrap();
    old.save_state().unwrap()
}

/// States that do not fit the device or guest memory are refused with an error naming
/// what is wrong, and leave the transport as it was: the right state restores after.
#[test]
fn restore_rejects_states_that_do_not_fit() {
    let mem = memory();
    let _ring = Ring::new(&mem, 16);
    let good = saved_state(&mem);
    let t = transport(Box::new(Sequencer::new(Duration::ZERO)), &mem);

    let mut other_type = good.clone();
    other_type.device_type = 2;
    let err = t.restore_state(&other_type).unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::RestoreDeviceType {
                saved: 2,
                actual: SEQUENCER_ID
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("block"), "{err}");

    let mut two_queues = good.clone();
    two_queues.queue_max_sizes.push(QUEUE_MAX);
    two_queues.queues.push(two_queues.queues[0]);
    let err = t.restore_state(&two_queues).unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::RestoreQueueCount {
                saved: 2,
                actual: 1
            }
        ),
        "{err:?}"
    );

    let mut smaller = good.clone();
    smaller.queue_max_sizes[0] = 32;
    let err = t.restore_state(&smaller).unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::RestoreQueueMaxSize {
                index: 0,
                saved: 32,
                actual: QUEUE_MAX
            }
        ),
        "{err:?}"
    );

    // The device's queue must be the one the registers describe.
    let mut other_rings = good.clone();
    other_rings.queues[0].active.as_mut().unwrap().used_ring += 0x1000;
    let err = t.restore_state(&other_rings).unwrap_err();
    assert!(err.to_string().contains("other ring addresses"), "{err}");
    let mut not_ready = good.clone();
    not_ready.queues[0].active.as_mut().unwrap().ready = false;
    let err = t.restore_state(&not_ready).unwrap_err();
    assert!(err.to_string().contains("not ready"), "{err}");
    let mut event_idx = good.clone();
    let active = event_idx.queues[0].active.as_mut().unwrap();
    active.event_idx_enabled = !active.event_idx_enabled;
    let err = t.restore_state(&event_idx).unwrap_err();
    assert!(err.to_string().contains("EVENT_IDX"), "{err}");

    let mut outside = good.clone();
    outside.queues[0].active.as_mut().unwrap().used_ring = 1 << 20; // just past memory
    outside.queues[0].used = Some(1 << 20);
    let err = t.restore_state(&outside).unwrap_err();
    assert!(matches!(err, TransportError::RestoreInvalid(_)), "{err:?}");
    assert!(err.to_string().contains("not inside guest memory"), "{err}");

    let mut misaligned = good.clone();
    misaligned.queues[0].active.as_mut().unwrap().desc_table = common::DESC + 1;
    misaligned.queues[0].desc = Some(common::DESC + 1);
    let err = t.restore_state(&misaligned).unwrap_err();
    assert!(err.to_string().contains("queue 0"), "{err}");

    let mut too_big = good.clone();
    too_big.queues[0].active.as_mut().unwrap().size = 128;
    assert!(matches!(
        t.restore_state(&too_big),
        Err(TransportError::RestoreInvalid(_))
    ));

    let mut features = good.clone();
    features.driver_features |= 1 << 40;
    let err = t.restore_state(&features).unwrap_err();
    assert!(
        matches!(err, TransportError::RestoreFeatures { extra, .. } if extra == 1 << 40),
        "{err:?}"
    );

    let mut bad_status = good.clone();
    bad_status.status |= 0x20;
    assert!(matches!(
        t.restore_state(&bad_status),
        Err(TransportError::RestoreInvalid(_))
    ));

    let mut no_queue = good.clone();
    no_queue.queues[0].active = None;
    assert!(matches!(
        t.restore_state(&no_queue),
        Err(TransportError::RestoreInvalid(_))
    ));

    // Nothing stuck: the transport is as built, and the right state restores.
    assert!(!t.is_activated());
    assert_eq!(read(&t, reg::STATUS), 0);
    t.restore_state(&good).unwrap();
    assert!(t.is_activated());
    // A second restore on the now-active transport is refused.
    let err = t.restore_state(&good).unwrap_err();
    assert!(
        matches!(err, TransportError::RestoreNotFresh { .. }),
        "{err:?}"
    );
}

/// The worker gives its queues back with the positions it reached.
#[test]
fn stop_keeping_queues_returns_the_positions() {
    let mem = memory();
    let ring = full_ring(&mem, 16);
    struct NoIrq;
    impl ember_virtio::VirtioInterrupt for NoIrq {
        fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
            Ok(())
        }
    }
    let activation = Activation {
        mem: mem.clone(),
        queues: vec![ActiveQueue {
            index: 0,
            queue: ring.queue(),
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        }],
        interrupt: Arc::new(NoIrq),
        features: VIRTIO_F_VERSION_1,
        thread_hook: None,
        spawner: None,
    };
    let handler = SequencerHandler {
        next: 0,
        delay: Duration::ZERO,
    };
    let worker = Worker::spawn("positions", handler, activation).unwrap();
    wait_used(&ring, 16);
    let (handler, queues) = worker.stop_keeping_queues().unwrap();
    assert_eq!(handler.next, 16);
    assert_eq!(queues.len(), 1);
    assert_eq!(queues[0].queue.next_avail(), 16);
    assert_eq!(queues[0].queue.next_used(), 16);
}

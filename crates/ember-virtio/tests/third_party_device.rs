//! A device written the way an outside crate would write one, with only ember-virtio's
//! public API (and the rust-vmm crates it re-exports): an "uppercase echo" device with a
//! transmit queue (the driver sends text) and a receive queue (the device returns the
//! text in upper case). It sits behind an `MmioTransport` on an MMIO bus and is driven
//! as a guest driver would: feature negotiation and queue set-up through register
//! writes, descriptors and rings written into guest memory, notifications through
//! QueueNotify, completions read from the used rings.

use ember_rate_limiter::log_limit::LogSource;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ember_bus::{Bus, BusKind};
use ember_virtio::chain::{walk_into, ChainLayout, Cursor};
use ember_virtio::mmio::{reg, status, MmioTransport, MMIO_WINDOW_SIZE};
use ember_virtio::virtio_queue::QueueT;
use ember_virtio::vm_memory::bitmap::{AtomicBitmap, Bitmap};
use ember_virtio::vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap, GuestMemoryRegion,
};
use ember_virtio::vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use ember_virtio::worker::{drain_queue, QueueHandler, Worker, WorkerContext, QUEUE_BUDGET};
use ember_virtio::{
    ActivateDevice, ActivateError, Activation, ThreadHook, ThreadSpawner, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

// ---------------------------------------------------------------------------------------
// The device

/// Receive queue: the device writes into the driver's buffers.
const RX: usize = 0;
/// Transmit queue: the driver's buffers hold text for the device.
const TX: usize = 1;
/// Longest message the device takes; longer ones are dropped.
const MAX_MESSAGE: u64 = 4096;
/// A device ID from the range the virtio spec leaves unassigned.
const ECHO_DEVICE_ID: u32 = 0xfff0;
/// Queue size the device offers.
const QUEUE_MAX: u16 = 64;

/// The device as the transport sees it: identity, features, and the running worker.
#[derive(Default)]
struct UppercaseEcho {
    worker: Option<Worker<EchoHandler>>,
    /// Messages not yet delivered when the device was last reset are kept.
    pending: VecDeque<Vec<u8>>,
}

impl VirtioDevice for UppercaseEcho {
    fn device_type(&self) -> u32 {
        ECHO_DEVICE_ID
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX, QUEUE_MAX]
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }
    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn reset(&mut self) {
        if let Some(handler) = self.worker.take().and_then(Worker::stop) {
            self.pending = handler.pending;
        }
    }
}

impl<M: GuestAddressSpace + Send + 'static> ActivateDevice<M> for UppercaseEcho {
    fn activate(&mut self, activation: Activation<M>) -> Result<(), ActivateError> {
        if activation.queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: activation.queues.len(),
            });
        }
        let handler = EchoHandler {
            pending: std::mem::take(&mut self.pending),
            layout: ChainLayout::default(),
        };
        self.worker = Some(Worker::spawn("echo", handler, activation)?);
        Ok(())
    }
}

/// The device's side on its worker thread.
struct EchoHandler {
    /// Upper-cased messages waiting for a receive buffer.
    pending: VecDeque<Vec<u8>>,
    /// Reused for every chain.
    layout: ChainLayout,
}

impl EchoHandler {
    /// Takes the text of every transmit chain (used length 0: the device writes nothing
    /// into them).
    fn transmit<M: GuestAddressSpace>(&mut self, ctx: &mut WorkerContext<M>) {
        let Self { pending, layout } = self;
        ctx.process_queue(TX, QUEUE_BUDGET, |mem, chain| {
            walk_into(layout, mem, chain);
            if !layout.is_sound() || layout.readable_len > MAX_MESSAGE {
                return 0;
            }
            let mut text = vec![0u8; layout.readable_len as usize];
            if Cursor::new(&layout.readable).read(mem, &mut text).is_ok() {
                text.make_ascii_uppercase();
                pending.push_back(text);
            }
            0
        });
    }

    /// Puts pending messages into receive buffers, one buffer per message, while both
    /// last.
    fn receive<M: GuestAddressSpace>(&mut self, ctx: &mut WorkerContext<M>) {
        if self.pending.is_empty() {
            return;
        }
        let mem = ctx.memory();
        let Some(queue) = ctx.queue_mut(RX) else {
            return;
        };
        let Self { pending, layout } = self;
        // One buffer per pending message: the budget stops the drain before a chain
        // with nothing to put in it is popped.
        let drained = drain_queue(&*mem, queue, pending.len(), |chain| {
            walk_into(layout, &*mem, chain);
            let Some(text) = pending.pop_front() else {
                return 0;
            };
            let n = text.len().min(layout.writable_len as usize);
            match Cursor::new(&layout.writable).write(&*mem, &text[..n]) {
                Ok(()) if layout.is_sound() => n as u32,
                _ => 0,
            }
        });
        if drained.more {
            // Stopped for want of messages, not of buffers: ask the driver to say when it
            // adds buffers (drain_queue leaves notifications off when its budget ends).
            let _ = queue.enable_notification(&*mem);
        }
        if drained.handled > 0 {
            ctx.signal_used(&mem, RX);
        }
    }
}

impl<M: GuestAddressSpace> QueueHandler<M> for EchoHandler {
    fn queue_notified(&mut self, ctx: &mut WorkerContext<M>, queue: usize) {
        if queue == TX {
            self.transmit(ctx);
        }
        // New text, or new receive buffers: either may let messages out.
        self.receive(ctx);
    }
}

// ---------------------------------------------------------------------------------------
// The guest driver

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
/// Transport base on the MMIO bus.
const BASE: u64 = 0xd000_0000;
const MEM_SIZE: usize = 1 << 20;
/// Where message buffers live.
const DATA: u64 = 0x8_0000;

/// One split virtqueue as the driver lays it out and fills it.
struct DriverQueue {
    index: u32,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl DriverQueue {
    /// A queue of `size` entries with its three parts in the pages from `base`.
    fn new(index: u32, base: u64, size: u16) -> Self {
        DriverQueue {
            index,
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Adds a chain of `(address, length, device-writable)` buffers and makes it
    /// available; returns its head.
    fn add<G: GuestMemory>(&mut self, mem: &G, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let slot = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&self.next_desc.to_le_bytes());
            let at = GuestAddress(self.desc + 16 * u64::from(slot));
            mem.write_slice(&raw, at).unwrap();
        }
        let ring_slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * ring_slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The index last, released: the device must see the entry before it.
        mem.store(
            self.avail_idx.to_le(),
            GuestAddress(self.avail + 2),
            std::sync::atomic::Ordering::Release,
        )
        .unwrap();
        head
    }

    /// With EVENT_IDX: interrupt me once the used index passes `event`.
    fn set_used_event<G: GuestMemory>(&self, mem: &G, event: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(event.to_le(), GuestAddress(at)).unwrap();
    }

    fn used_idx<G: GuestMemory>(&self, mem: &G) -> u16 {
        mem.load(
            GuestAddress(self.used + 2),
            std::sync::atomic::Ordering::Acquire,
        )
        .map(u16::from_le)
        .unwrap()
    }

    /// Used element `i`: (head, length).
    fn used_elem<G: GuestMemory>(&self, mem: &G, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    /// Waits (at most 10 s) for the used index to reach `n`.
    fn wait_used<G: GuestMemory>(&self, mem: &G, n: u16) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.used_idx(mem) == n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

/// The guest's view of the device: the MMIO window on a bus, and guest memory.
struct Guest<M: GuestAddressSpace> {
    bus: Bus,
    transport: Arc<MmioTransport<M>>,
    mem: M,
    irq: EventFd,
    rx: DriverQueue,
    tx: DriverQueue,
}

impl<M: GuestAddressSpace + Send + Sync + 'static> Guest<M> {
    fn new(mem: M) -> Self {
        Self::with_thread_hook(mem, None)
    }

    fn with_thread_hook(mem: M, hook: Option<ThreadHook>) -> Self {
        Self::with_threads(mem, hook, None)
    }

    fn with_threads(
        mem: M,
        hook: Option<ThreadHook>,
        spawner: Option<Arc<dyn ThreadSpawner>>,
    ) -> Self {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let device = Box::new(UppercaseEcho::default());
        let mut transport =
            MmioTransport::new(device, mem.clone(), irq.try_clone().unwrap()).unwrap();
        transport.set_thread_hook(hook);
        transport.set_thread_spawner(spawner);
        let transport = Arc::new(transport);
        let bus = Bus::new(BusKind::Mmio);
        bus.insert(BASE, MMIO_WINDOW_SIZE, transport.clone())
            .unwrap();
        Guest {
            bus,
            transport,
            mem,
            irq,
            rx: DriverQueue::new(RX as u32, 0x1_0000, 16),
            tx: DriverQueue::new(TX as u32, 0x2_0000, 16),
        }
    }

    fn read(&self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.bus.read(BASE + offset, &mut data).unwrap();
        u32::from_le_bytes(data)
    }

    fn write(&self, offset: u64, value: u32) {
        self.bus.write(BASE + offset, &value.to_le_bytes()).unwrap();
    }

    /// Linux's virtio-mmio probe and virtio core, in order: identify, reset,
    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues, DRIVER_OK.
    fn initialize(&self, wanted_features: u64) {
        let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        assert_eq!(self.start(wanted_features), features_ok | status::DRIVER_OK);
        assert!(self.transport.is_activated());
    }

    /// Sets the device up as [`Guest::initialize`] does and returns the status read back
    /// after DRIVER_OK.
    fn start(&self, wanted_features: u64) -> u32 {
        assert_eq!(self.read(reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.read(reg::VERSION), 2);
        assert_eq!(self.read(reg::DEVICE_ID), ECHO_DEVICE_ID);
        self.write(reg::STATUS, 0);
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);

        let mut offered = 0u64;
        for sel in 0..2 {
            self.write(reg::DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read(reg::DEVICE_FEATURES)) << (32 * sel);
        }
        assert_eq!(offered, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        let accepted = offered & wanted_features;
        for sel in 0..2 {
            self.write(reg::DRIVER_FEATURES_SEL, sel);
            self.write(reg::DRIVER_FEATURES, (accepted >> (32 * sel)) as u32);
        }
        let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(reg::STATUS, features_ok);
        assert_eq!(self.read(reg::STATUS), features_ok, "FEATURES_OK refused");

        for q in [&self.rx, &self.tx] {
            self.write(reg::QUEUE_SEL, q.index);
            assert_eq!(self.read(reg::QUEUE_NUM_MAX), u32::from(QUEUE_MAX));
            assert_eq!(self.read(reg::QUEUE_READY), 0);
            self.write(reg::QUEUE_NUM, u32::from(q.size));
            for (low, value) in [
                (reg::QUEUE_DESC_LOW, q.desc),
                (reg::QUEUE_DRIVER_LOW, q.avail),
                (reg::QUEUE_DEVICE_LOW, q.used),
            ] {
                self.write(low, value as u32);
                self.write(low + 4, (value >> 32) as u32);
            }
            self.write(reg::QUEUE_READY, 1);
            assert_eq!(self.read(reg::QUEUE_READY), 1);
        }
        self.write(reg::STATUS, features_ok | status::DRIVER_OK);
        self.read(reg::STATUS)
    }

    fn notify(&self, queue: &DriverQueue) {
        self.write(reg::QUEUE_NOTIFY, queue.index);
    }

    /// Interrupts raised since the last call, acknowledged as a driver does.
    fn take_interrupts(&self) -> (u64, u32) {
        let count = self.irq.read().unwrap_or(0);
        let pending = self.read(reg::INTERRUPT_STATUS);
        self.write(reg::INTERRUPT_ACK, pending);
        (count, pending)
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .memory()
            .read_slice(&mut buf, GuestAddress(addr))
            .unwrap();
        buf
    }
}

fn plain_memory() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn echoes_text_in_upper_case() {
    let mut guest = Guest::new(plain_memory());
    guest.initialize(VIRTIO_F_VERSION_1);
    let mem = guest.mem.memory();

    // Two receive buffers, the first split across two descriptors.
    let rx_a = guest.rx.add(
        &*mem,
        &[(DATA + 0x1000, 4, true), (DATA + 0x2000, 60, true)],
    );
    let rx_b = guest.rx.add(&*mem, &[(DATA + 0x3000, 64, true)]);
    guest.notify(&guest.rx);

    // A message in two readable buffers, then a second one.
    mem.write_slice(b"hello, ", GuestAddress(DATA)).unwrap();
    mem.write_slice(b"world", GuestAddress(DATA + 0x100))
        .unwrap();
    let tx_a = guest
        .tx
        .add(&*mem, &[(DATA, 7, false), (DATA + 0x100, 5, false)]);
    mem.write_slice(b"virtio!", GuestAddress(DATA + 0x200))
        .unwrap();
    let tx_b = guest.tx.add(&*mem, &[(DATA + 0x200, 7, false)]);
    guest.notify(&guest.tx);

    assert!(guest.tx.wait_used(&*mem, 2), "transmit chains not used");
    assert!(guest.rx.wait_used(&*mem, 2), "receive buffers not used");
    assert_eq!(guest.tx.used_elem(&*mem, 0), (u32::from(tx_a), 0));
    assert_eq!(guest.tx.used_elem(&*mem, 1), (u32::from(tx_b), 0));
    assert_eq!(guest.rx.used_elem(&*mem, 0), (u32::from(rx_a), 12));
    assert_eq!(guest.rx.used_elem(&*mem, 1), (u32::from(rx_b), 7));
    // "HELLO, WORLD" across the first buffer's two descriptors.
    assert_eq!(guest.bytes(DATA + 0x1000, 4), b"HELL");
    assert_eq!(guest.bytes(DATA + 0x2000, 8), b"O, WORLD");
    assert_eq!(guest.bytes(DATA + 0x3000, 8), b"VIRTIO!\0");

    // Without EVENT_IDX every batch of used buffers interrupts; both queues raised
    // "used buffer".
    let (count, pending) = guest.take_interrupts();
    assert!(count >= 1, "no interrupt");
    assert_eq!(pending, 1, "InterruptStatus: used buffer");

    // Status 0 stops the worker.
    guest.write(reg::STATUS, 0);
    assert!(!guest.transport.is_activated());
    assert_eq!(guest.transport.stats().refused_writes, 0);
}

/// The transport's thread hook runs on the worker thread, first, with the thread's name:
/// where a VMM installs the worker's seccomp filter.
#[test]
fn thread_hook_runs_first_on_the_worker_thread() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let hook: ThreadHook = Arc::new(move |name: &str| {
        let current = std::thread::current().name().map(str::to_owned);
        record.lock().unwrap().push((name.to_owned(), current));
        Ok(())
    });
    let guest = Guest::with_thread_hook(plain_memory(), Some(hook));
    guest.initialize(VIRTIO_F_VERSION_1);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [(
            "ember-virtio-echo".to_owned(),
            Some("ember-virtio-echo".to_owned())
        )]
    );
}

/// Creates threads on a thread of its own.
struct SpawnerThread {
    requests: Mutex<mpsc::Sender<SpawnRequest>>,
}

type SpawnRequest = (
    String,
    Box<dyn FnOnce() + Send>,
    mpsc::Sender<std::io::Result<std::thread::JoinHandle<()>>>,
);

impl ThreadSpawner for SpawnerThread {
    fn spawn(
        &self,
        name: String,
        body: Box<dyn FnOnce() + Send>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let (reply, answer) = mpsc::channel();
        self.requests
            .lock()
            .unwrap()
            .send((name, body, reply))
            .unwrap();
        answer.recv().unwrap()
    }
}

/// With a spawner, the worker thread is created by it (on the spawner's thread, not the
/// one that activates the device), and the device works as without.
#[test]
fn worker_threads_come_from_the_transport_spawner() {
    let (send, requests) = mpsc::channel::<SpawnRequest>();
    let spawned = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&spawned);
    let spawner_thread = std::thread::spawn(move || {
        for (name, body, reply) in requests {
            count.fetch_add(1, Ordering::SeqCst);
            let _ = reply.send(std::thread::Builder::new().name(name).spawn(body));
        }
    });
    let spawner: Arc<dyn ThreadSpawner> = Arc::new(SpawnerThread {
        requests: Mutex::new(send),
    });
    let mut guest = Guest::with_threads(plain_memory(), None, Some(spawner));
    guest.initialize(VIRTIO_F_VERSION_1);
    let mem = guest.mem.memory();
    let rx = guest.rx.add(&*mem, &[(DATA + 0x1000, 16, true)]);
    mem.write_slice(b"spawned", GuestAddress(DATA)).unwrap();
    guest.tx.add(&*mem, &[(DATA, 7, false)]);
    guest.notify(&guest.rx);
    guest.notify(&guest.tx);
    assert!(guest.rx.wait_used(&*mem, 1), "no echo");
    assert_eq!(guest.rx.used_elem(&*mem, 0), (u32::from(rx), 7));
    assert_eq!(guest.bytes(DATA + 0x1000, 7), b"SPAWNED");
    assert_eq!(spawned.load(Ordering::SeqCst), 1);
    // A reset stops the worker; the next activation asks the spawner again.
    guest.write(reg::STATUS, 0);
    drop(guest);
    let _ = spawner_thread.join();
}

/// A hook that fails (a filter that cannot be installed) stops the worker before it
/// serves anything: the activation fails and the driver sees DEVICE_NEEDS_RESET.
#[test]
fn failing_thread_hook_fails_the_activation() {
    let hook: ThreadHook = Arc::new(|_: &str| Err(std::io::Error::other("no filter")));
    let guest = Guest::with_thread_hook(plain_memory(), Some(hook));
    let status = guest.start(VIRTIO_F_VERSION_1);
    assert_ne!(status & status::DEVICE_NEEDS_RESET, 0, "status {status:#x}");
    assert!(!guest.transport.is_activated());
}

/// The device's worker thread logs under its transport's `LogSource` (entered before
/// the VMM's hook runs), so its rate-limited lines count against this device only.
#[test]
fn worker_threads_log_under_their_transport() {
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let hook: ThreadHook = Arc::new(move |_: &str| {
        let _ = tx.lock().unwrap().send(LogSource::current());
        Ok(())
    });
    let guest = Guest::with_thread_hook(plain_memory(), Some(hook));
    let source = guest.transport.log_source();
    assert_ne!(source, LogSource::SHARED);
    let other = Guest::new(plain_memory());
    assert_ne!(other.transport.log_source(), source);
    guest.start(VIRTIO_F_VERSION_1);
    assert!(guest.transport.is_activated());
    let seen = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(seen, source);
    // The thread that drove the transport is back to its own source.
    assert_eq!(LogSource::current(), LogSource::SHARED);
}

#[test]
fn text_waits_for_receive_buffers() {
    let mut guest = Guest::new(plain_memory());
    guest.initialize(VIRTIO_F_VERSION_1);
    let mem = guest.mem.memory();

    mem.write_slice(b"early", GuestAddress(DATA)).unwrap();
    guest.tx.add(&*mem, &[(DATA, 5, false)]);
    guest.notify(&guest.tx);
    assert!(guest.tx.wait_used(&*mem, 1));
    // Nothing to receive into yet.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(guest.rx.used_idx(&*mem), 0);

    let head = guest.rx.add(&*mem, &[(DATA + 0x1000, 16, true)]);
    guest.notify(&guest.rx);
    assert!(guest.rx.wait_used(&*mem, 1), "pending text not delivered");
    assert_eq!(guest.rx.used_elem(&*mem, 0), (u32::from(head), 5));
    assert_eq!(guest.bytes(DATA + 0x1000, 5), b"EARLY");
}

/// A full ring of transmit chains; with EVENT_IDX the driver asks for one interrupt,
/// after the last chain is used, and gets exactly one.
#[test]
fn full_ring_with_event_idx() {
    let mut guest = Guest::new(plain_memory());
    guest.initialize(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    let mem = guest.mem.memory();
    let n = guest.tx.size;
    // Interrupt when used index passes n - 1, i.e. once all n are used.
    guest.tx.set_used_event(&*mem, n - 1);
    guest.rx.set_used_event(&*mem, u16::MAX);
    for i in 0..n {
        let at = DATA + 0x10 * u64::from(i);
        mem.write_slice(b"x", GuestAddress(at)).unwrap();
        guest.tx.add(&*mem, &[(at, 1, false)]);
    }
    guest.notify(&guest.tx);
    assert!(guest.tx.wait_used(&*mem, n), "not every chain was used");
    let (count, pending) = guest.take_interrupts();
    assert_eq!(count, 1, "one interrupt for the whole ring");
    assert_eq!(pending, 1);
}

/// The same device on memory with dirty-page tracking and hotplug support: only the
/// type of the address space changes.
#[test]
fn runs_on_atomic_memory_with_a_dirty_bitmap() {
    let mmap =
        GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut guest = Guest::new(GuestMemoryAtomic::new(mmap));
    guest.initialize(VIRTIO_F_VERSION_1);
    let mem = guest.mem.memory();
    guest.rx.add(&*mem, &[(DATA + 0x5000, 16, true)]);
    mem.write_slice(b"dirty", GuestAddress(DATA)).unwrap();
    guest.tx.add(&*mem, &[(DATA, 5, false)]);
    guest.notify(&guest.tx);
    assert!(guest.rx.wait_used(&*mem, 1));
    assert_eq!(guest.bytes(DATA + 0x5000, 5), b"DIRTY");
    let region = mem.find_region(GuestAddress(DATA)).unwrap();
    assert!(region.bitmap().dirty_at((DATA + 0x5000) as usize));
    assert!(!region.bitmap().dirty_at((DATA + 0x6000) as usize));
}

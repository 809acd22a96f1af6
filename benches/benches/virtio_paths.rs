//! Device paths behind an exit, in process (no KVM, no threads):
//!
//! * `serial`: one byte out of the 16550 (`ember_devices::Serial`, output to a sink): a
//!   1-byte PIO write to THR at COM1 through a `BusHandle` (and through `Bus::write`),
//!   with the THR-empty interrupt off (`thr`), and on (`thr_irq`: each byte also writes
//!   the interrupt eventfd, and the guest acknowledges with an IIR read).
//! * `virtio_blk`: one 4 KiB request on a mock split queue (virtio-queue's
//!   `MockSplitQueue` in a `GuestMemoryMmap`), backed by a file on tmpfs (`/dev/shm`),
//!   as the device's worker handles a notification carrying one request:
//!   `disable_notification`, pop the chain, `block::process_request`, `add_used`,
//!   `enable_notification`, `needs_notification`. `FLUSH` is negotiated, so writes are
//!   not followed by `fdatasync`. The driver's side (writing the header, publishing
//!   the chain) is done outside the timed part. `read_4k_kick` and `write_4k_kick` add
//!   the device's side of the notification as Ember's worker does it: one `epoll_wait`
//!   that returns the queue's (edge-triggered, never read) notify eventfd. The signal
//!   itself is KVM's ioeventfd on the vCPU's side, so it is done outside the timed part.
//!   `floor_pread_4k` and `floor_pwrite_4k` are the floor: the same system calls on the
//!   same file and offsets from a host buffer, without queue or guest memory; and
//!   `floor_epoll_wait` the notification's: the `epoll_wait` alone. Guest memory is an
//!   `Arc<GuestMemoryMmap>` of which each notification takes a snapshot, as the worker
//!   does once per wake-up; `read_4k_dirty` is `read_4k` on memory with a dirty bitmap
//!   (`AtomicBitmap`), where the device marks the pages it read into, and
//!   `read_4k_drain` is `read_4k` through the worker's own drain loop
//!   (`ember_virtio::worker::drain_queue`: stop flag, avail-index and head checks).
//! * `virtio_mmio`: the two register accesses of every virtio interrupt, an
//!   InterruptStatus read and an InterruptACK write, on an `MmioTransport`.
//!
//! At the end, a table of the medians (and MiB/s for virtio-blk) of this run.
//!
//! The clock is criterion's wall clock, or with `EMBER_BENCH_CLOCK=cpu` the thread's CPU
//! time (`CLOCK_THREAD_CPUTIME_ID`; the kernel's time in `pread`/`pwrite` counts),
//! which leaves out the time other processes take on a shared machine.
//!
//! `cargo bench -p ember-benches --bench virtio_paths`

mod common;
use common::{median_ns, run_groups, CpuTime};
use std::cell::RefCell;
use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::measurement::{Measurement, WallTime};
use criterion::{BatchSize, BenchmarkGroup, Criterion, Throughput};
use ember_bus::{Bus, BusDevice, BusKind};
use ember_devices::{IrqLine, Serial, SerialOutput, COM1_PORT, SERIAL_PORT_SIZE};
use ember_virtio::mmio::{reg, MmioTransport};
use ember_virtio::worker::{drain_queue, QUEUE_BUDGET};
use ember_virtio::{ActivateDevice, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1};
use ember_virtio_devices::block::{
    process_request, RequestBuffers, SECTOR_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use ember_virtio_devices::{BlockOptions, Disk};
use std::os::fd::AsRawFd;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Short runs: each benchmark takes under 2 s.
fn short<M: Measurement>(group: &mut BenchmarkGroup<'_, M>) {
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(50)
        .nresamples(10_000);
}

// ---------------------------------------------------------------------------------------
// Serial

const COM1: u64 = COM1_PORT as u64;
const THR: u64 = COM1;
const IER: u64 = COM1 + 1;
const IIR: u64 = COM1 + 2;
/// IER bit: THR-empty interrupt.
const IER_THRE: u8 = 0x02;

fn serial_bus(irq_on: bool) -> (Bus, Arc<Serial>, IrqLine) {
    let irq = IrqLine::new().expect("eventfd");
    let irq_view = irq.try_clone().expect("eventfd clone");
    let serial = Arc::new(Serial::new(SerialOutput::Sink, irq).expect("serial"));
    let bus = Bus::new(BusKind::Pio);
    bus.insert(COM1, SERIAL_PORT_SIZE, serial.clone())
        .expect("COM1");
    if irq_on {
        bus.write(IER, &[IER_THRE]).expect("IER");
    }
    (bus, serial, irq_view)
}

fn serial<M: Measurement>(c: &mut Criterion<M>) {
    let mut group = c.benchmark_group("serial");
    short(&mut group);
    group.throughput(Throughput::Bytes(1));

    let (bus, serial, irq) = serial_bus(false);
    let mut handle = bus.handle();
    group.bench_function("thr_handle", |b| {
        b.iter(|| handle.write(black_box(THR), black_box(b"x")));
    });
    group.bench_function("thr_bus", |b| {
        b.iter(|| bus.write(black_box(THR), black_box(b"x")));
    });
    assert_eq!(serial.stats().bytes_lost, 0);
    assert!(irq.event_fd().read().is_err(), "IER is 0: no interrupt");

    // Interrupt-driven output: each byte raises THR-empty (an eventfd write) and the
    // guest's handler acknowledges it by reading IIR (a second exit), as Linux's 8250
    // driver does.
    let (bus, serial, irq) = serial_bus(true);
    let mut handle = bus.handle();
    group.bench_function("thr_irq_handle", |b| {
        b.iter(|| {
            handle.write(black_box(THR), black_box(b"x"))?;
            let mut iir = [0u8];
            handle.read(black_box(IIR), &mut iir).map(|()| iir)
        });
    });
    let stats = serial.stats();
    assert_eq!(stats.bytes_lost, 0);
    let interrupts = irq.event_fd().read().unwrap_or(0);
    assert!(
        interrupts + 1 >= stats.bytes_out,
        "{interrupts} interrupts for {} bytes",
        stats.bytes_out
    );
    group.finish();
}

// ---------------------------------------------------------------------------------------
// virtio-blk

const NEXT: u16 = 1;
const WRITE: u16 = 2;
/// Queue size; chains of 3 descriptors use slots `3i..3i + 3`.
const QUEUE_SIZE: u16 = 256;
/// Distinct chains (each with its own buffers) cycled through.
const CHAINS: u16 = 64;
const BLOCK: u32 = 4096;
const MEM_SIZE: usize = 16 << 20;
/// The used ring (see [`Blk::new`]); the descriptor table and avail ring are below.
const USED: u64 = 0x4000;
const HEADERS: u64 = 0x10_0000;
const STATUSES: u64 = 0x11_0000;
const DATA: u64 = 0x20_0000;
/// Size of the disk image: requests walk through it 4 KiB at a time.
const DISK_SIZE: u64 = 16 << 20;

/// A disk image on tmpfs, removed on drop.
struct Image(PathBuf);

impl Image {
    fn create() -> Image {
        let dir = Path::new("/dev/shm");
        let dir = if dir.is_dir() {
            dir.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("ember-bench-blk-{}.img", std::process::id()));
        let file = File::create(&path).expect("create the disk image");
        let data: Vec<u8> = (0..DISK_SIZE).map(|i| (i / 4096) as u8 ^ i as u8).collect();
        file.write_all_at(&data, 0).expect("fill the disk image");
        Image(path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The worker's side of queue notifications, as `ember_devices`' virtio worker does it:
/// notify eventfds in an epoll set, edge-triggered, never read. One eventfd per chain of
/// a batch, because a batch's setups all run before its timed parts: each timed part
/// then takes exactly one pending notification with one `epoll_wait`.
struct Notify {
    epoll: Epoll,
    fds: Vec<EventFd>,
}

impl Notify {
    fn new() -> Notify {
        let epoll = Epoll::new().expect("epoll");
        let fds: Vec<EventFd> = (0..CHAINS)
            .map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd"))
            .collect();
        for (i, fd) in fds.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd.as_raw_fd(),
                    EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, i as u64),
                )
                .expect("epoll_ctl");
        }
        Notify { epoll, fds }
    }

    /// The notification for chain `slot` (untimed: KVM's side).
    fn signal(&self, slot: usize) {
        self.fds[slot].write(1).expect("notify");
    }

    /// The worker waking for one notification.
    fn wait_one(&self) {
        let mut events = [EpollEvent::default(); 1];
        let n = self.epoll.wait(0, &mut events).expect("epoll_wait");
        assert_eq!(n, 1, "no notification pending");
    }
}

/// The driver and the device around one queue, on guest memory with bitmap `B`.
struct Blk<'m, B: Bitmap + 'static> {
    mem: &'m Arc<GuestMemoryMmap<B>>,
    vq: MockSplitQueue<'m, GuestMemoryMmap<B>>,
    queue: Queue,
    disk: Disk,
    buffers: RequestBuffers,
    req_type: u32,
    /// Requests published so far (chain `published % CHAINS` is next).
    published: u64,
}

impl<'m, B: Bitmap + 'static> Blk<'m, B> {
    fn new(mem: &'m Arc<GuestMemoryMmap<B>>, disk: Disk, req_type: u32) -> Self {
        let vq = MockSplitQueue::create(&**mem, GuestAddress(0), QUEUE_SIZE);
        let data_flags = if req_type == VIRTIO_BLK_T_IN {
            WRITE
        } else {
            0
        };
        for i in 0..CHAINS {
            let slot = 3 * i;
            let descs = [
                Descriptor::new(HEADERS + 16 * u64::from(i), 16, NEXT, slot + 1),
                Descriptor::new(
                    DATA + u64::from(BLOCK) * u64::from(i),
                    BLOCK,
                    data_flags | NEXT,
                    slot + 2,
                ),
                Descriptor::new(STATUSES + u64::from(i), 1, WRITE, 0),
            ];
            for (k, d) in descs.into_iter().enumerate() {
                vq.desc_table()
                    .store(slot + k as u16, RawDescriptor::from(d))
                    .expect("descriptor");
            }
        }
        let mut queue: Queue = vq.create_queue().expect("queue");
        // MockSplitQueue puts the used ring `len` bytes (not `2 * len + 6`) after the
        // start of the avail ring's entries, so it overlaps the avail ring from entry
        // `len / 2 - 2` on (virtio-queue 0.18's `SplitQueueRing::end`); put it past it.
        assert!(vq.avail_addr().0 + 6 + 2 * u64::from(QUEUE_SIZE) <= USED);
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        // A fresh ring: flags and idx 0 (an earlier `Blk` in the same memory used it).
        mem.write_slice(&[0u8; 4], GuestAddress(USED))
            .expect("used ring");
        // The negotiated RING_EVENT_IDX, as the worker sets it.
        queue.set_event_idx(true);
        Blk {
            mem,
            vq,
            queue,
            disk,
            buffers: RequestBuffers::new(),
            req_type,
            published: 0,
        }
    }

    /// Driver side: writes the next chain's header and status, makes it available.
    /// Returns the chain's number (`0..CHAINS`).
    fn publish(&mut self) -> usize {
        let chain = (self.published % u64::from(CHAINS)) as u16;
        let sector = (self.published * u64::from(BLOCK) % DISK_SIZE) / SECTOR_SIZE;
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&self.req_type.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        let mem = &**self.mem;
        mem.write_slice(&header, GuestAddress(HEADERS + 16 * u64::from(chain)))
            .expect("header");
        mem.write_obj(0xeeu8, GuestAddress(STATUSES + u64::from(chain)))
            .expect("status");
        let avail = self.vq.avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % QUEUE_SIZE))
            .expect("avail slot")
            .store(3 * chain);
        avail.idx().store(idx.wrapping_add(1));
        self.published += 1;
        usize::from(chain)
    }

    /// Device side: handles a notification carrying one request.
    #[inline(never)]
    fn handle_notification(&mut self) {
        // The worker's snapshot of guest memory for this wake-up.
        let snapshot = self.mem.memory();
        let mem = &*snapshot;
        self.queue.disable_notification(mem).expect("disable");
        let chain = self.queue.pop_descriptor_chain(mem).expect("a chain");
        let head = chain.head_index();
        let done = process_request(
            &self.disk,
            mem,
            chain,
            VIRTIO_BLK_F_FLUSH,
            &mut self.buffers,
        );
        self.queue
            .add_used(mem, head, done.used_len)
            .expect("add_used");
        let more = self.queue.enable_notification(mem).expect("enable");
        debug_assert!(!more);
        black_box(self.queue.needs_notification(mem).expect("needs"));
    }

    /// Device side, as the worker runs it: the same notification through
    /// `ember_virtio::worker::drain_queue` (its stop, avail-index and head checks).
    #[inline(never)]
    fn handle_notification_with_drain(&mut self) {
        let snapshot = self.mem.memory();
        let mem = &*snapshot;
        let (disk, buffers) = (&self.disk, &mut self.buffers);
        let drained = drain_queue(mem, &mut self.queue, QUEUE_BUDGET, |chain| {
            process_request(disk, mem, chain, VIRTIO_BLK_F_FLUSH, buffers).used_len
        });
        debug_assert_eq!((drained.handled, drained.more), (1, false));
        black_box(self.queue.needs_notification(mem).expect("needs"));
    }

    /// Checks that the last `CHAINS` requests completed with `VIRTIO_BLK_S_OK`, that
    /// every published request was used, and (reads) that the data is the disk's.
    fn check(&self) {
        let used_idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
        assert_eq!(used_idx, self.published as u16);
        for i in 0..CHAINS.min(self.published as u16) {
            let status: u8 = self
                .mem
                .read_obj(GuestAddress(STATUSES + u64::from(i)))
                .expect("status");
            assert_eq!(status, VIRTIO_BLK_S_OK, "chain {i}");
        }
        if self.req_type == VIRTIO_BLK_T_IN && self.published > 0 {
            let last = self.published - 1;
            let chain = last % u64::from(CHAINS);
            let offset = last * u64::from(BLOCK) % DISK_SIZE;
            let mut got = vec![0u8; BLOCK as usize];
            self.mem
                .read_slice(&mut got, GuestAddress(DATA + u64::from(BLOCK) * chain))
                .expect("data");
            let want: Vec<u8> = (offset..offset + u64::from(BLOCK))
                .map(|i| (i / 4096) as u8 ^ i as u8)
                .collect();
            assert!(got == want, "read data differs from the disk");
        }
    }
}

/// Benchmarks `name`: requests of `req_type` on guest memory `mem`, each handled as one
/// notification (with its `epoll_wait` if `kick`). The driver publishes a batch of
/// `CHAINS` (untimed), then the device handles them one notification each (timed).
fn bench_blk<M: Measurement, B: Bitmap + 'static>(
    group: &mut BenchmarkGroup<'_, M>,
    name: &str,
    mem: &Arc<GuestMemoryMmap<B>>,
    disk: Disk,
    req_type: u32,
    kick: bool,
    drain: bool,
) {
    let batch = BatchSize::NumIterations(u64::from(CHAINS));
    let blk = RefCell::new(Blk::new(mem, disk, req_type));
    let notify = Notify::new();
    group.bench_function(name, |b| {
        b.iter_batched(
            || {
                let slot = blk.borrow_mut().publish();
                if kick {
                    // What KVM's ioeventfd does on the guest's notify write, on the
                    // vCPU's side: not the device's time.
                    notify.signal(slot);
                }
            },
            |()| {
                if kick {
                    notify.wait_one();
                }
                if drain {
                    blk.borrow_mut().handle_notification_with_drain();
                } else {
                    blk.borrow_mut().handle_notification();
                }
            },
            batch,
        )
    });
    blk.borrow().check();
}

fn virtio_blk<M: Measurement>(c: &mut Criterion<M>) {
    let image = Image::create();
    let open = || Disk::open(&image.0, BlockOptions { read_only: false }).expect("disk");
    let mut group = c.benchmark_group("virtio_blk");
    short(&mut group);
    group.throughput(Throughput::Bytes(u64::from(BLOCK)));

    let mem = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory"),
    );
    let dirty_mem = Arc::new(
        GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .expect("memory"),
    );
    // Batches of `CHAINS` (see `bench_blk`), for the notification floor too.
    let batch = BatchSize::NumIterations(u64::from(CHAINS));
    let bench = |group: &mut BenchmarkGroup<'_, M>, name: &str, req_type: u32, kick: bool| {
        bench_blk(group, name, &mem, open(), req_type, kick, false);
    };
    // The floor: the same 4 KiB system calls on the same file at the same offsets, from
    // and into a host buffer, with no queue and no guest memory.
    let floor = |group: &mut BenchmarkGroup<'_, M>, name: &str, write: bool| {
        let file = File::options()
            .read(true)
            .write(true)
            .open(&image.0)
            .expect("open the disk image");
        let mut buf = vec![0u8; BLOCK as usize];
        let mut n = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                let offset = n * u64::from(BLOCK) % DISK_SIZE;
                n += 1;
                if write {
                    file.write_all_at(black_box(&buf), offset).expect("pwrite");
                } else {
                    file.read_exact_at(black_box(&mut buf), offset)
                        .expect("pread");
                }
            })
        });
    };
    // The floor of a notification: one `epoll_wait` taking one pending edge-triggered
    // eventfd, nothing else.
    {
        group.throughput(Throughput::Elements(1));
        let notify = Notify::new();
        let mut slot = 0usize;
        group.bench_function("floor_epoll_wait", |b| {
            b.iter_batched(
                || {
                    notify.signal(slot);
                    slot = (slot + 1) % usize::from(CHAINS);
                },
                |()| notify.wait_one(),
                batch,
            )
        });
        group.throughput(Throughput::Bytes(u64::from(BLOCK)));
    }
    // Reads first: they check the data against the image, which the writes change.
    floor(&mut group, "floor_pread_4k", false);
    bench(&mut group, "read_4k", VIRTIO_BLK_T_IN, false);
    bench(&mut group, "read_4k_kick", VIRTIO_BLK_T_IN, true);
    bench_blk(
        &mut group,
        "read_4k_dirty",
        &dirty_mem,
        open(),
        VIRTIO_BLK_T_IN,
        false,
        false,
    );
    bench_blk(
        &mut group,
        "read_4k_drain",
        &mem,
        open(),
        VIRTIO_BLK_T_IN,
        false,
        true,
    );
    floor(&mut group, "floor_pwrite_4k", true);
    bench(&mut group, "write_4k", VIRTIO_BLK_T_OUT, false);
    bench(&mut group, "write_4k_kick", VIRTIO_BLK_T_OUT, true);
    group.finish();
}

// ---------------------------------------------------------------------------------------
// virtio-mmio registers

/// A device with one queue that is never started: only its transport's registers are
/// measured.
struct Quiet;

impl VirtioDevice for Quiet {
    fn device_type(&self) -> u32 {
        ember_virtio::device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn reset(&mut self) {}
}

impl<M: GuestAddressSpace> ActivateDevice<M> for Quiet {
    fn activate(&mut self, _activation: Activation<M>) -> Result<(), ActivateError> {
        Ok(())
    }
}

/// The two register accesses a guest makes for every virtio interrupt: reading
/// InterruptStatus and writing InterruptACK, each a `BusDevice` call on the vCPU
/// thread after an MMIO exit.
fn virtio_mmio<M: Measurement>(c: &mut Criterion<M>) {
    let mem = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory"),
    );
    let transport = MmioTransport::new(
        Box::new(Quiet),
        mem,
        EventFd::new(EFD_NONBLOCK).expect("eventfd"),
    )
    .expect("transport");
    let mut group = c.benchmark_group("virtio_mmio");
    short(&mut group);
    group.throughput(Throughput::Elements(1));
    group.bench_function("interrupt_status_read", |b| {
        let mut data = [0u8; 4];
        b.iter(|| {
            BusDevice::read(&transport, black_box(reg::INTERRUPT_STATUS), &mut data);
            black_box(data)
        })
    });
    group.bench_function("interrupt_ack_write", |b| {
        let ack = 1u32.to_le_bytes();
        b.iter(|| BusDevice::write(&transport, black_box(reg::INTERRUPT_ACK), &ack))
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------
// Run and summary; the clock and result helpers are in `common/mod.rs`.

/// Every group of this file.
fn groups<M: Measurement + 'static>(c: &mut Criterion<M>) {
    serial(c);
    virtio_blk(c);
    virtio_mmio(c);
}

fn summary(clock: &str, since: SystemTime) {
    println!("\nSummary ({clock} clock): medians of this run");
    println!(
        "{:<28} {:>12} {:>12} {:>9}",
        "benchmark", "median", "throughput", "vs floor"
    );
    // (group, benchmark, bytes per iteration, its floor)
    let rows = [
        ("serial", "thr_handle", 1.0, None),
        ("serial", "thr_bus", 1.0, None),
        ("serial", "thr_irq_handle", 1.0, None),
        ("virtio_blk", "floor_epoll_wait", 0.0, None),
        ("virtio_blk", "floor_pread_4k", f64::from(BLOCK), None),
        (
            "virtio_blk",
            "read_4k",
            f64::from(BLOCK),
            Some("floor_pread_4k"),
        ),
        ("virtio_blk", "floor_pwrite_4k", f64::from(BLOCK), None),
        (
            "virtio_blk",
            "write_4k",
            f64::from(BLOCK),
            Some("floor_pwrite_4k"),
        ),
        (
            "virtio_blk",
            "read_4k_kick",
            f64::from(BLOCK),
            Some("floor_pread_4k"),
        ),
        (
            "virtio_blk",
            "write_4k_kick",
            f64::from(BLOCK),
            Some("floor_pwrite_4k"),
        ),
        (
            "virtio_blk",
            "read_4k_dirty",
            f64::from(BLOCK),
            Some("floor_pread_4k"),
        ),
        (
            "virtio_blk",
            "read_4k_drain",
            f64::from(BLOCK),
            Some("floor_pread_4k"),
        ),
        ("virtio_mmio", "interrupt_status_read", 0.0, None),
        ("virtio_mmio", "interrupt_ack_write", 0.0, None),
    ];
    for (group, id, bytes, floor) in rows {
        let Some(ns) = median_ns(group, id, since) else {
            println!("{:<28} {:>12} {:>12}", format!("{group}/{id}"), "-", "-");
            continue;
        };
        let throughput = if bytes == 0.0 {
            String::new()
        } else if bytes > 1.0 {
            format!("{:.0} MiB/s", bytes / ns * 1e9 / f64::from(1 << 20))
        } else {
            format!("{:.1} MB/s", bytes / ns * 1e3)
        };
        let ratio = floor
            .and_then(|f| median_ns(group, f, since))
            .map_or(String::new(), |f| format!("{:.2}x", ns / f));
        println!(
            "{:<28} {:>9.1} ns {:>12} {:>9}",
            format!("{group}/{id}"),
            ns,
            throughput,
            ratio
        );
    }
    println!(
        "(target: virtio-blk >= 2048 MiB/s per core device-side; floor: the bare pread/pwrite)"
    );
}

fn main() {
    let since = SystemTime::now();
    let clock = run_groups(groups::<CpuTime>, groups::<WallTime>);
    summary(clock, since);
}

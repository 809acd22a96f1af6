//! A guest cannot flood the host's log: what it can trigger at will (bad register
//! accesses on the transport, head indices past the queue, an avail index running
//! ahead) is logged at most `MAX_PER_WINDOW` lines per `WINDOW` per call site and
//! device.
//!
//! One test function, because the logger it installs to count lines is per process.

use std::sync::Arc;
use std::time::Instant;

use ember_bus::BusDevice;
use ember_rate_limiter::log_limit::{MAX_PER_WINDOW, WINDOW};
use ember_rate_limiter::testing::{max_lines, LogRecorder};
use ember_virtio::mmio::{reg, MmioTransport};
mod common;

use common::{unreadable_avail_ring, Ring};
use ember_virtio::virtio_queue::QueueT;
use ember_virtio::vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use ember_virtio::vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use ember_virtio::worker::{drain_queue, QUEUE_BUDGET};
use ember_virtio::{ActivateDevice, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1};

/// The lines logged since the last call ("LEVEL target: message").
fn take_lines() -> Vec<String> {
    LogRecorder::install().take()
}

/// Checks `lines`, logged since `started` by a guest repeating something bad `times`
/// times: `needle` was logged (the first ones are), and no more lines than `sites`
/// rate-limited call sites allow.
fn assert_bounded(lines: &[String], needle: &str, sites: usize, started: Instant, times: usize) {
    assert!(
        lines.iter().any(|l| l.contains(needle)),
        "no {needle:?} among {} lines; first: {:?}",
        lines.len(),
        lines.get(..3)
    );
    let limit = max_lines(sites, started);
    assert!(
        lines.len() <= limit,
        "{} lines for {times} bad requests (limit {limit}); first: {:?}",
        lines.len(),
        lines.first()
    );
}

/// A device with one queue that never starts anything.
struct Inert;

impl VirtioDevice for Inert {
    fn device_type(&self) -> u32 {
        ember_virtio::device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn reset(&mut self) {}
}

impl<M: GuestAddressSpace> ActivateDevice<M> for Inert {
    fn activate(&mut self, _activation: Activation<M>) -> Result<(), ActivateError> {
        Ok(())
    }
}

const HAMMER: usize = 10_000;

/// A transport for [`Inert`] on 1 MiB of guest memory.
fn inert_transport() -> MmioTransport<Arc<GuestMemoryMmap>> {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    MmioTransport::new(Box::new(Inert), mem, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap()
}

/// A guest's 32-bit register write.
fn write_reg(transport: &MmioTransport<Arc<GuestMemoryMmap>>, offset: u64, value: u32) {
    transport.write(offset, &value.to_le_bytes());
}

/// The driver's feature negotiation: ACKNOWLEDGE, DRIVER, the high 32 feature bits
/// `high`, then FEATURES_OK (which the transport refuses for features not offered).
fn negotiate(transport: &MmioTransport<Arc<GuestMemoryMmap>>, high: u32) {
    use ember_virtio::mmio::status::{ACKNOWLEDGE, DRIVER, FEATURES_OK};
    write_reg(transport, reg::STATUS, ACKNOWLEDGE | DRIVER);
    write_reg(transport, reg::DRIVER_FEATURES_SEL, 1);
    write_reg(transport, reg::DRIVER_FEATURES, high);
    write_reg(transport, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

fn hammer_the_transport() {
    let transport = inert_transport();
    take_lines();
    let started = Instant::now();
    for _ in 0..HAMMER {
        // An offset with no register, and a 2-byte read of a 4-byte register.
        transport.write(0x0f0, &1u32.to_le_bytes());
        let mut half = [0u8; 2];
        transport.read(reg::MAGIC_VALUE, &mut half);
    }
    let lines = take_lines();
    let stats = transport.stats();
    assert_eq!(
        stats.unknown_registers, HAMMER as u64,
        "every access is still counted"
    );
    assert_eq!(stats.bad_widths, HAMMER as u64);
    // Two call sites (unknown register, bad width).
    assert_bounded(
        &lines,
        "offset 0xf0 ignored: no such register",
        2,
        started,
        2 * HAMMER,
    );
}

fn hammer_bad_heads() {
    const SIZE: u16 = 16;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let mut ring = Ring::new(&mem, SIZE);
    ring.buffer(0);
    ring.offer(&[0]);
    let mut queue = ring.queue();
    // The first chain is fine; the driver then offers head 40 on a 16-entry queue, a
    // ring's worth per notification.
    assert_eq!(
        drain_queue(&mem, &mut queue, QUEUE_BUDGET, |_| 0).handled,
        1
    );
    take_lines();
    let started = Instant::now();
    let mut handled = 0;
    let rounds = HAMMER / usize::from(SIZE);
    for _ in 0..rounds {
        ring.offer(&[40; SIZE as usize]);
        handled += drain_queue(&mem, &mut queue, QUEUE_BUDGET, |_| 0).handled;
    }
    let lines = take_lines();
    assert_eq!(handled, 0, "no chain with a bad head reaches the handler");
    assert_eq!(ring.used_idx(), 1, "no used entry for a bad head");
    let offered = 1 + rounds * usize::from(SIZE);
    assert_eq!(
        usize::from(queue.next_avail()),
        offered % 65536,
        "every bad chain was consumed"
    );
    assert_bounded(
        &lines,
        "head index 40 is past the queue size 16",
        1,
        started,
        offered - 1,
    );
}

fn hammer_bad_avail_index() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let ring = Ring::new(&mem, 16);
    let mut queue = ring.queue();
    // 17 chains announced on a 16-entry ring; the driver notifies over and over.
    ring.set_avail_idx(17);
    take_lines();
    let started = Instant::now();
    for _ in 0..HAMMER {
        let drained = drain_queue(&mem, &mut queue, QUEUE_BUDGET, |_| 0);
        assert_eq!(drained.handled, 0);
    }
    let lines = take_lines();
    assert_bounded(
        &lines,
        "avail index 17 is 17 entries ahead",
        1,
        started,
        HAMMER,
    );
}

/// A driver that sets FEATURES_OK with a feature the device never offered, resets the
/// device and tries again, over and over.
fn hammer_features_ok_refusals() {
    let transport = inert_transport();
    take_lines();
    let started = Instant::now();
    for _ in 0..HAMMER {
        // Feature bit 62, never offered (VERSION_1 is bit 32).
        negotiate(&transport, 1 << 30);
        write_reg(&transport, reg::STATUS, 0);
    }
    let lines = take_lines();
    assert_bounded(&lines, "FEATURES_OK refused", 1, started, HAMMER);
}

/// A ring whose avail index announces a chain nobody can pop (its entries lie past the
/// end of memory), drained over and over: the anti-spin guard's warning.
fn hammer_unpoppable_ring() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let mut queue = unreadable_avail_ring(&mem, 16, 1);
    take_lines();
    let started = Instant::now();
    for _ in 0..HAMMER {
        assert_eq!(
            drain_queue(&mem, &mut queue, QUEUE_BUDGET, |_| 0).handled,
            0
        );
    }
    // virtio-queue's own line for each failed read of the ring is left out: a guest
    // cannot reach it, as the transport refuses rings outside memory at DRIVER_OK
    // (`hammer_rings_outside_memory`), and this ring is unreadable only because the
    // test built it so.
    let lines: Vec<String> = take_lines()
        .into_iter()
        .filter(|l| !l.contains("virtio_queue::queue: Failed to read from memory"))
        .collect();
    assert_bounded(
        &lines,
        "avail index ahead of poppable chains",
        1,
        started,
        HAMMER,
    );
}

/// A driver that gives a queue rings outside guest memory and sets DRIVER_OK, resets
/// the device and tries again, over and over: the transport refuses each activation
/// with one rate-limited line, and nothing else logs (virtio-queue's `is_valid` would
/// have logged an unlimited line each time).
fn hammer_rings_outside_memory() {
    use ember_virtio::mmio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
    let transport = inert_transport();
    take_lines();
    let started = Instant::now();
    let write = |offset, value| write_reg(&transport, offset, value);
    for round in 0..HAMMER as u32 {
        negotiate(&transport, 1); // VERSION_1
        write(reg::QUEUE_SEL, 0);
        write(reg::QUEUE_NUM, 16);
        // Each ring in turn past the end of the 1 MiB of memory.
        let outside = 0x10_0000 + (round % 7) * 0x1000;
        let (desc, avail, used) = match round % 3 {
            0 => (outside, 0x1000, 0x2000),
            1 => (0x1000, outside, 0x2000),
            _ => (0x1000, 0x2000, outside),
        };
        write(reg::QUEUE_DESC_LOW, desc);
        write(reg::QUEUE_DRIVER_LOW, avail);
        write(reg::QUEUE_DEVICE_LOW, used);
        write(reg::QUEUE_READY, 1);
        write(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(!transport.is_activated());
        write(reg::STATUS, 0);
    }
    let lines = take_lines();
    assert_bounded(&lines, "are not inside guest memory", 1, started, HAMMER);
}

/// A guest flooding one transport with bad accesses uses up that transport's lines
/// only: another transport's first bad accesses are still logged.
fn one_flooded_transport_leaves_another_its_lines() {
    let (flooded, quiet) = (inert_transport(), inert_transport());
    take_lines();
    let started = Instant::now();
    for _ in 0..HAMMER {
        flooded.write(0x0f4, &1u32.to_le_bytes());
    }
    let flood_lines = take_lines().len();
    for _ in 0..5 {
        quiet.write(0x0f4, &1u32.to_le_bytes());
    }
    let quiet_lines = take_lines();
    // Unless a 5 s window ended meanwhile, the flood used up its call site's budget;
    // the other transport has a budget of its own at the same site.
    if started.elapsed() < WINDOW {
        assert_eq!(flood_lines, MAX_PER_WINDOW as usize);
    }
    assert_eq!(quiet_lines.len(), 5, "{quiet_lines:?}");
    assert!(quiet_lines
        .iter()
        .all(|l| l.contains("offset 0xf4 ignored")));
}

#[test]
fn guest_triggered_log_lines_are_bounded() {
    LogRecorder::install();
    hammer_the_transport();
    hammer_bad_heads();
    hammer_bad_avail_index();
    hammer_features_ok_refusals();
    hammer_unpoppable_ring();
    hammer_rings_outside_memory();
    one_flooded_transport_leaves_another_its_lines();
}

//! A guest cannot flood the host's log: what it can trigger at will (bad register
//! accesses on the transport, head indices past the queue, an avail index running
//! ahead) is logged at most `MAX_PER_WINDOW` lines per `WINDOW` per call site.
//!
//! One test function, because the logger it installs to count lines is per process.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ember_bus::BusDevice;
use ember_rate_limiter::log_limit::{MAX_PER_WINDOW, WINDOW};
use ember_virtio::mmio::{reg, MmioTransport};
mod common;

use common::Ring;
use ember_virtio::virtio_queue::QueueT;
use ember_virtio::vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use ember_virtio::vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use ember_virtio::worker::{drain_queue, QUEUE_BUDGET};
use ember_virtio::{ActivateDevice, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1};

/// Every line logged, as "LEVEL target: message".
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Calls to `log`, in case a line is lost on a poisoned lock.
static CALLS: AtomicUsize = AtomicUsize::new(0);

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        CALLS.fetch_add(1, Ordering::SeqCst);
        let line = format!("{} {}: {}", record.level(), record.target(), record.args());
        LINES.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

/// The lines logged since the last call.
fn take_lines() -> Vec<String> {
    std::mem::take(&mut *LINES.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The most lines `sites` rate-limited call sites may log in `elapsed`: one window's
/// worth each, plus one for every window that began meanwhile. Slowness only raises it.
fn bound(sites: usize, started: Instant) -> usize {
    let windows = started.elapsed().as_millis() / WINDOW.as_millis() + 2;
    sites * MAX_PER_WINDOW as usize * windows as usize
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

fn hammer_the_transport() {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let transport =
        MmioTransport::new(Box::new(Inert), mem, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
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
    assert!(
        lines
            .iter()
            .any(|l| l.contains("offset 0xf0 ignored: no such register")),
        "the first bad accesses are logged; {} lines, first: {:?}",
        lines.len(),
        lines.get(..3)
    );
    // Two call sites (unknown register, bad width).
    let limit = bound(2, started);
    assert!(
        lines.len() <= limit,
        "{} lines for {} bad accesses (limit {limit}); first: {:?}",
        lines.len(),
        2 * HAMMER,
        lines.first()
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
    assert!(
        lines
            .iter()
            .any(|l| l.contains("head index 40 is past the queue size 16")),
        "{} lines, first: {:?}",
        lines.len(),
        lines.get(..3)
    );
    let limit = bound(1, started);
    assert!(
        lines.len() <= limit,
        "{} lines for {} bad heads (limit {limit}); first: {:?}",
        lines.len(),
        offered - 1,
        lines.first()
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
    assert!(
        lines
            .iter()
            .any(|l| l.contains("avail index 17 is 17 entries ahead")),
        "{} lines, first: {:?}",
        lines.len(),
        lines.get(..3)
    );
    let limit = bound(1, started);
    assert!(
        lines.len() <= limit,
        "{} lines for {HAMMER} notifications (limit {limit}); first: {:?}",
        lines.len(),
        lines.first()
    );
}

#[test]
fn guest_triggered_log_lines_are_bounded() {
    log::set_logger(&CAPTURE).unwrap();
    log::set_max_level(log::LevelFilter::Debug);
    hammer_the_transport();
    hammer_bad_heads();
    hammer_bad_avail_index();
    assert!(CALLS.load(Ordering::SeqCst) > 0);
}

//! virtio-net's receive path pops chains itself (it is driven by frames arriving, not by
//! the guest's notifications alone), so it must check what virtio-queue leaves to the
//! caller: an avail index too far ahead and head indices past the queue make
//! virtio-queue log an error on every pop, as often as the guest likes. A guest doing
//! either, over and over, gets a bounded number of log lines, and the queue behaves.
//!
//! One test function, because the logger it installs to count lines is per process.

use std::collections::VecDeque;
use std::io;
use std::time::Instant;

use ember_rate_limiter::testing::{max_lines, LogRecorder};
use ember_virtio_devices::net::{process_rx, FrameBuffer, RxStop, VIRTIO_NET_HDR_LEN};
use ember_virtio_devices::NetBackend;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

fn take_lines() -> Vec<String> {
    LogRecorder::install().take()
}

/// A backend that always has another frame.
struct Endless(VecDeque<u8>);

impl NetBackend for Endless {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (VIRTIO_NET_HDR_LEN + 60).min(buf.len());
        buf[..n].fill(0);
        self.0.push_back(0);
        Ok(n)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        Ok(frame.len())
    }
}

const SIZE: u16 = 16;
const HAMMER: usize = 10_000;
/// Where receive buffers go.
const DATA: u64 = 0x8000;

fn publish(vq: &MockSplitQueue<'_, GuestMemoryMmap>, head: u16) {
    let idx = vq.avail().idx().load();
    vq.avail()
        .ring()
        .ref_at(usize::from(idx % SIZE))
        .unwrap()
        .store(head);
    vq.avail().idx().store(idx.wrapping_add(1));
}

fn bad_heads(mem: &GuestMemoryMmap) {
    let vq = MockSplitQueue::create(mem, GuestAddress(0), SIZE);
    let mut queue: Queue = vq.create_queue().unwrap();
    vq.desc_table()
        .store(0, RawDescriptor::from(Descriptor::new(DATA, 2048, 2, 0)))
        .unwrap();
    let mut backend = Endless(VecDeque::new());
    let mut buffer = FrameBuffer::new();
    take_lines();
    let started = Instant::now();
    let mut bad = 0;
    for _ in 0..HAMMER / usize::from(SIZE) {
        // A ring of chains naming descriptor 40 of 16.
        for _ in 0..SIZE {
            publish(&vq, 40);
        }
        let report = process_rx(mem, &mut queue, &mut backend, &mut buffer, 256);
        assert_eq!((report.delivered, report.used), (0, 0));
        assert_eq!(report.bad_buffers, 0);
        bad += report.skipped;
    }
    assert_eq!(bad, HAMMER / usize::from(SIZE) * usize::from(SIZE));
    // No used entry for a head that names no descriptor.
    assert_eq!(queue.next_used(), 0);
    // A good buffer after all that still gets its frame.
    publish(&vq, 0);
    let report = process_rx(mem, &mut queue, &mut backend, &mut buffer, 256);
    assert_eq!((report.delivered, report.used), (1, 1));
    let lines = take_lines();
    assert!(
        lines.iter().any(|l| l.contains("head index 40 is past")),
        "{lines:?}"
    );
    let limit = max_lines(1, started);
    assert!(
        lines.len() <= limit,
        "{} lines for {HAMMER} bad heads (limit {limit}); first: {:?}",
        lines.len(),
        lines.first()
    );
}

fn avail_index_too_far_ahead(mem: &GuestMemoryMmap) {
    let vq = MockSplitQueue::create(mem, GuestAddress(0), SIZE);
    let mut queue: Queue = vq.create_queue().unwrap();
    vq.avail().idx().store(SIZE + 1);
    let mut backend = Endless(VecDeque::new());
    let mut buffer = FrameBuffer::new();
    take_lines();
    let started = Instant::now();
    for _ in 0..HAMMER {
        let report = process_rx(mem, &mut queue, &mut backend, &mut buffer, 256);
        assert_eq!((report.used, report.stop), (0, RxStop::NoBuffers));
    }
    assert!(backend.0.is_empty(), "no frame was read");
    let lines = take_lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("entries ahead of the device's")),
        "{lines:?}"
    );
    let limit = max_lines(1, started);
    assert!(
        lines.len() <= limit,
        "{} lines for {HAMMER} receive passes (limit {limit}); first: {:?}",
        lines.len(),
        lines.first()
    );
}

#[test]
fn a_guest_cannot_flood_the_log_through_the_receive_queue() {
    LogRecorder::install();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    bad_heads(&mem);
    avail_index_too_far_ahead(&mem);
}

//! Split virtqueues under a hostile driver: random descriptor tables, available rings
//! and indices, used-event values and ring layouts, with chains popped, walked,
//! completed, given back and served by Ember's devices in any order.
//!
//! The queue implementation is virtio-queue's; what Ember adds on top is exercised
//! here: its devices consume the chains ([`ember_virtio_devices::rng::process_request`]
//! and [`ember_virtio_devices::net::process_rx`], which pops, gives back and completes
//! chains itself), and the device worker's loop, [`ember_virtio::worker::drain_queue`],
//! which must end (a hang is a libFuzzer timeout) within its budget.

use std::io;

use ember_virtio::worker::drain_queue;
use ember_virtio_devices::net::{process_rx, FrameBuffer, NetBackend};
use ember_virtio_devices::rng;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};

use crate::common::{
    place_chain, poke, virtio_memory, write_desc, Addr, Chain, Ring, DATA_START, REGION1_LEN,
    REGION2_START,
};
use crate::{decode, input_struct};

input_struct! {
    /// Queue size selector, ring layout (`layout % 4`: the default, rings in the second
    /// region and at the end of the first, rings straddling the hole, misaligned
    /// rings), `EVENT_IDX`, and the operations.
    pub struct QueueInput {
        pub size_sel: u8,
        pub layout: u8,
        pub event_idx: bool,
        pub ops: Vec<QueueOp>,
    }
}

input_struct! {
    /// One driver or device action; `kind % 12` selects it (see [`run`]).
    pub struct QueueOp {
        pub kind: u8,
        pub index: u16,
        pub value: u32,
        pub addr: Addr,
        pub chain: Chain,
    }
}

/// A backend with `frames` frames of `len` bytes waiting.
struct Frames {
    frames: u16,
    len: usize,
}

impl NetBackend for Frames {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.frames == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.frames -= 1;
        let n = self.len.min(buf.len());
        buf[..n].fill(0);
        Ok(n)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        Ok(frame.len())
    }
}

/// Walks a chain to its end; the number of descriptors is bounded by the queue size
/// plus one indirect table.
fn walk_chain<I: Iterator<Item = Descriptor>>(chain: I, size: u16) -> usize {
    let mut n = 0usize;
    for _ in chain {
        n += 1;
        assert!(
            n <= usize::from(size) + usize::from(u16::MAX),
            "chain longer than the queue and an indirect table"
        );
    }
    n
}

/// The rings of a layout, or `None` for one virtio-queue refuses.
fn ring_for(layout: u8, size: u16) -> Ring {
    let mut ring = Ring::new(size, 0);
    match layout % 4 {
        0 => {}
        1 => {
            ring.desc = REGION2_START;
            ring.avail = REGION1_LEN - (6 + 2 * u64::from(size));
            ring.used = REGION2_START + 0x8000;
        }
        2 => {
            ring.desc = REGION1_LEN - 16;
            ring.avail = REGION1_LEN - 4;
            ring.used = REGION1_LEN - 8;
        }
        _ => {
            ring.desc = DATA_START + 8;
            ring.avail = DATA_START + 0x1001;
            ring.used = DATA_START + 0x2002;
        }
    }
    ring
}

/// The harness. Operations (`kind % 12`): 0 make `chain` available; 1 write a raw
/// descriptor at table slot `index`; 2 set the available index; 3 write an available
/// ring entry; 4 pop one chain, walk it, and complete it or give it back; 5 drain the
/// queue with virtio-rng's request handler; 6 add a used entry for any head; 7
/// enable / disable notifications; 8 ask whether to notify; 9 move `next_avail` /
/// `next_used`; 10 write `used_event` and the ring flags; 11 receive frames into the
/// queue as virtio-net does.
pub fn run(data: &[u8]) {
    let Some(input) = decode::<QueueInput>(data) else {
        return;
    };
    let mem = virtio_memory();
    let size = Ring::size_from(input.size_sel);
    let mut ring = ring_for(input.layout, size);
    let queue = ring.queue(&mem, input.event_idx);
    let Some(mut queue) = queue else {
        // Not a valid queue: the transport refuses it before a device sees it.
        return;
    };
    let mut buffer = FrameBuffer::new();
    for op in input.ops.iter().take(64) {
        match op.kind % 12 {
            0 => {
                place_chain(&mem, &mut ring, &op.chain, &[]);
            }
            1 => {
                let d = Descriptor::new(
                    op.addr.resolve(),
                    op.value,
                    (op.value >> 16) as u16 & 7,
                    op.index.rotate_right(8),
                );
                write_desc(&mem, ring.desc, op.index, d);
            }
            2 => poke(&mem, ring.avail + 2, &op.index.to_le_bytes()),
            3 => {
                let slot = u64::from(op.index % size);
                poke(
                    &mem,
                    ring.avail + 4 + 2 * slot,
                    &(op.value as u16).to_le_bytes(),
                );
            }
            4 => {
                if let Some(chain) = queue.pop_descriptor_chain(&mem) {
                    let head = chain.head_index();
                    let n = walk_chain(chain, size);
                    if op.value & 1 == 0 {
                        let _ = queue.add_used(&mem, head, n as u32);
                    } else {
                        queue.go_to_previous_position();
                    }
                }
            }
            5 => {
                let budget = (op.value % 300) as usize + 1;
                let before = queue.next_avail();
                let drained = drain_queue(&mem, &mut queue, budget, |chain| {
                    if op.index & 1 == 0 {
                        rng::process_request(&mem, chain)
                    } else {
                        walk_chain(chain, size) as u32
                    }
                });
                // The budget counts every chain popped, handled or skipped (a head
                // index past the queue has no used entry to write).
                let popped = usize::from(queue.next_avail().wrapping_sub(before));
                assert!(drained.handled <= popped && popped <= budget);
                // "More" exactly when the budget stopped it.
                assert_eq!(drained.more, popped == budget);
            }
            6 => {
                let _ = queue.add_used(&mem, op.index, op.value);
            }
            7 => {
                if op.value & 1 == 0 {
                    let _ = queue.enable_notification(&mem);
                } else {
                    let _ = queue.disable_notification(&mem);
                }
            }
            8 => {
                let _ = queue.needs_notification(&mem);
            }
            9 => {
                if op.value & 1 == 0 {
                    queue.set_next_avail(op.index);
                } else {
                    queue.set_next_used(op.index);
                }
            }
            10 => {
                let used_event = ring.avail + 4 + 2 * u64::from(size);
                poke(&mem, used_event, &op.index.to_le_bytes());
                poke(&mem, ring.avail, &(op.value as u16).to_le_bytes());
            }
            _ => {
                let mut backend = Frames {
                    frames: op.index % 16,
                    len: (op.value % 2000) as usize,
                };
                let budget = usize::from(op.index >> 8) % 64 + 1;
                let report = process_rx(&mem, &mut queue, &mut backend, &mut buffer, budget);
                assert_eq!(report.used, report.delivered + report.bad_buffers);
                // Skipped chains (heads past the queue) count against the budget too.
                assert!(report.used + report.skipped <= budget);
            }
        }
        // The queue's own view stays in range.
        let _ = queue.avail_idx(&mem, std::sync::atomic::Ordering::Acquire);
        let _ = queue.used_idx(&mem, std::sync::atomic::Ordering::Acquire);
    }
}

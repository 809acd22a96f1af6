//! A split ring laid out by hand for the tests: the descriptor table, the available
//! ring and the used ring each on pages of their own. (virtio-queue's `MockSplitQueue`
//! places the used ring over the second half of the available ring, so a device's
//! used-ring writes change the heads the driver offered.)

#![allow(dead_code)]

use ember_virtio::virtio_queue::desc::split::Descriptor;
use ember_virtio::virtio_queue::Queue;
use ember_virtio::virtio_queue::QueueT;
use ember_virtio::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor table (up to 256 entries: 4 KiB).
pub const DESC: u64 = 0x1000;
/// Available ring: flags, idx, ring, used_event.
pub const AVAIL: u64 = 0x3000;
/// Used ring: flags, idx, ring, avail_event.
pub const USED: u64 = 0x4000;
/// Where buffers go.
pub const DATA: u64 = 0x8000;

/// The driver's side of a ring of `size` entries in `mem` (at least 64 KiB).
pub struct Ring<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub size: u16,
    avail_idx: u16,
}

impl<'a> Ring<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        for addr in [AVAIL, AVAIL + 2, USED, USED + 2] {
            mem.write_obj(0u16, GuestAddress(addr)).unwrap();
        }
        Ring {
            mem,
            size,
            avail_idx: 0,
        }
    }

    /// The device's queue on this ring, ready.
    pub fn queue(&self) -> Queue {
        let mut queue = Queue::new(self.size).unwrap();
        queue.try_set_size(self.size).unwrap();
        queue
            .try_set_desc_table_address(GuestAddress(DESC))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(AVAIL))
            .unwrap();
        queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        queue.set_ready(true);
        queue
    }

    /// Writes descriptor `index`: a device-writable buffer of 64 bytes, no next.
    pub fn buffer(&self, index: u16) {
        let desc = Descriptor::new(DATA + u64::from(index) * 64, 64, 2, 0);
        self.mem
            .write_obj(desc, GuestAddress(DESC + u64::from(index) * 16))
            .unwrap();
    }

    /// Offers `heads` (appends them to the available ring and publishes the index).
    pub fn offer(&mut self, heads: &[u16]) {
        for &head in heads {
            let slot = u64::from(self.avail_idx % self.size);
            self.mem
                .write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes the available index, whatever the ring holds.
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// The used index the device published.
    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(USED + 2)).unwrap())
    }
}

/// A queue of `size` entries whose avail ring header (flags, idx) is the last 4 bytes of
/// `mem` and whose ring entries lie past its end: the avail index can be read, its
/// entries cannot (as after a memory hot-unplug), so `pop_descriptor_chain` finds
/// nothing while the index says there is something.
pub fn unreadable_avail_ring(mem: &GuestMemoryMmap, size: u16, avail_idx: u16) -> Queue {
    let mem_end = 0x1_0000;
    let avail = mem_end - 4;
    mem.write_obj(avail_idx.to_le(), GuestAddress(avail + 2))
        .unwrap();
    let mut queue = Queue::new(size).unwrap();
    queue.try_set_size(size).unwrap();
    queue.try_set_desc_table_address(GuestAddress(0)).unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(avail))
        .unwrap();
    queue
        .try_set_used_ring_address(GuestAddress(0x2000))
        .unwrap();
    queue.set_ready(true);
    queue
}

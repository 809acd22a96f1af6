//! Driver-side helpers for the virtio device tests: guest memory, a mock split queue
//! that builds chains, and a recording interrupt.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_virtio::{ActiveQueue, InterruptKind, VirtioInterrupt};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;

/// Guest memory size for tests: 16 MiB at 0.
pub const MEM_SIZE: u64 = 16 << 20;
/// Where tests put their buffers (the queue structures sit below 64 KiB).
pub const DATA: u64 = 0x10_0000;

pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// One descriptor as a test describes it: (address, length, writable).
pub type D = (u64, u32, bool);

/// A driver: a mock queue plus the next free descriptor table slot.
pub struct Driver<'a> {
    pub vq: MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    next: u16,
    size: u16,
}

impl<'a> Driver<'a> {
    /// A queue of `size` entries whose structures start at `base`.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        Driver {
            vq: MockSplitQueue::create(mem, GuestAddress(base), size),
            mem,
            next: 0,
            size,
        }
    }

    pub fn queue(&self) -> Queue {
        self.vq.create_queue::<Queue>().unwrap()
    }

    /// Adds a chain of `descs` (linked with NEXT) and makes it available; returns the
    /// head index.
    pub fn add(&mut self, descs: &[D]) -> u16 {
        assert!(!descs.is_empty() && descs.len() <= self.size as usize);
        let n = descs.len() as u16;
        if self.next + n > self.size {
            self.next = 0;
        }
        let head = self.next;
        let raw: Vec<Descriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let last = i + 1 == descs.len();
                let mut flags = if w { WRITE } else { 0 };
                if !last {
                    flags |= NEXT;
                }
                Descriptor::new(addr, len, flags, head + i as u16 + 1)
            })
            .collect();
        self.store(head, &raw);
        self.publish(head);
        self.next += n;
        head
    }

    /// Stores raw descriptors at table slots `at..` without making anything available.
    pub fn store(&self, at: u16, descs: &[Descriptor]) {
        for (i, d) in descs.iter().enumerate() {
            self.vq
                .desc_table()
                .store(at + i as u16, RawDescriptor::from(*d))
                .unwrap();
        }
    }

    /// Makes the chain starting at `head` available.
    pub fn publish(&self, head: u16) {
        let idx = self.vq.avail().idx().load();
        self.vq
            .avail()
            .ring()
            .ref_at((idx % self.size) as usize)
            .unwrap()
            .store(head);
        self.vq.avail().idx().store(idx.wrapping_add(1));
    }

    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj::<u16>(self.vq.used_addr().unchecked_add(2))
            .unwrap()
    }

    /// Used ring element `i`: (id, len).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let e = self
            .vq
            .used()
            .ring()
            .ref_at((i % self.size) as usize)
            .unwrap()
            .load();
        (e.id(), e.len())
    }

    /// Waits (at most 10 s) until the used index reaches `n`.
    pub fn wait_used(&self, n: u16) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.used_idx() == n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}

/// An interrupt that records what it was asked to raise.
#[derive(Default)]
pub struct RecordingInterrupt(pub Mutex<Vec<InterruptKind>>);

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        self.0.lock().unwrap().push(kind);
        Ok(())
    }
}

impl RecordingInterrupt {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn kinds(&self) -> Vec<InterruptKind> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (at most 10 s) for an interrupt of `kind`.
    pub fn wait_for(&self, kind: InterruptKind) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.kinds().contains(&kind) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}

/// An active queue for `driver`'s queue plus a handle on its notify eventfd.
pub fn active_queue(index: u16, driver: &Driver<'_>) -> (ActiveQueue, EventFd) {
    let notify = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = notify.try_clone().unwrap();
    let mut queue = driver.queue();
    queue.set_ready(true);
    (
        ActiveQueue {
            index,
            queue,
            notify,
        },
        kick,
    )
}

pub fn fill(mem: &GuestMemoryMmap, addr: u64, data: &[u8]) {
    mem.write_slice(data, GuestAddress(addr)).unwrap();
}

pub fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

pub use ember_guests::testing::XorShift;

//! Pieces shared by the harnesses: a small guest memory with a hole, guest addresses and
//! lengths chosen so that most land somewhere interesting, and a driver that puts
//! descriptor chains into a split virtqueue (directly, through the rings, or through an
//! indirect table).

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::input_struct;

/// Start of the first RAM region.
pub const REGION1_START: u64 = 0;
/// Size of the first RAM region (128 KiB).
pub const REGION1_LEN: u64 = 0x2_0000;
/// Start of the second RAM region: `[0x20000, 0x30000)` is a hole.
pub const REGION2_START: u64 = 0x3_0000;
/// Size of the second RAM region (64 KiB).
pub const REGION2_LEN: u64 = 0x1_0000;
/// One past the last byte of guest memory.
pub const MEM_END: u64 = REGION2_START + REGION2_LEN;

/// Virtqueue structures (the harness's default layout): descriptor table,
/// available ring, used ring and an indirect table, 4 KiB each (room for 256 entries).
pub const DESC_TABLE: u64 = 0x0;
/// Available ring of the default layout.
pub const AVAIL_RING: u64 = 0x1000;
/// Used ring of the default layout.
pub const USED_RING: u64 = 0x2000;
/// Indirect descriptor table of the default layout.
pub const INDIRECT_TABLE: u64 = 0x3000;
/// Second queue (virtio-net tx) structures: `+0x4000` from the first.
pub const SECOND_QUEUE: u64 = 0x4000;
/// Start of the area for data buffers.
pub const DATA_START: u64 = 0x8000;
/// Size of the data area (up to the hole).
pub const DATA_LEN: u64 = REGION1_LEN - DATA_START;

/// `VRING_DESC_F_NEXT`.
pub const F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub const F_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`.
pub const F_INDIRECT: u16 = 4;

/// The small guest memory the virtio harnesses use: 128 KiB at 0, a 64 KiB hole,
/// 64 KiB more.
pub fn virtio_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(REGION1_START), REGION1_LEN as usize),
        (GuestAddress(REGION2_START), REGION2_LEN as usize),
    ])
    .expect("guest memory")
}

/// Guest memory that records which pages were written, for loaders that promise to
/// write nothing when they fail.
pub type TrackedMemory = GuestMemoryMmap<AtomicBitmap>;

/// Tracked guest memory with the given `(start, len)` regions.
pub fn tracked_memory(ranges: &[(u64, u64)]) -> TrackedMemory {
    let ranges: Vec<_> = ranges
        .iter()
        .map(|&(start, len)| (GuestAddress(start), len as usize))
        .collect();
    TrackedMemory::from_ranges(&ranges).expect("guest memory")
}

/// Whether any page of `mem` was written since it was created.
pub fn any_page_written(mem: &TrackedMemory) -> bool {
    mem.iter().any(|region| {
        let bitmap = region.bitmap();
        (0..region.len() as usize)
            .step_by(0x1000)
            .any(|offset| bitmap.dirty_at(offset))
    })
}

input_struct! {
    /// A guest physical address: mostly in the data area, sometimes in the second
    /// region, at the edges of the hole and of memory, or anywhere.
    pub struct Addr {
        pub kind: u8,
        pub value: u32,
    }
}

impl Addr {
    /// An address `offset` bytes into the data area.
    pub fn data(offset: u32) -> Self {
        Addr {
            kind: 0,
            value: offset,
        }
    }

    /// The guest address this selects.
    pub fn resolve(&self) -> u64 {
        let v = u64::from(self.value);
        match self.kind % 10 {
            0..=3 => DATA_START + v % DATA_LEN,
            4 => REGION2_START + v % REGION2_LEN,
            5 => REGION1_LEN - 1 - v % 64,
            6 => MEM_END - 1 - v % 64,
            7 => v % MEM_END,
            8 => u64::MAX - v % 0x1_0000,
            _ => (v << 32) | v,
        }
    }
}

input_struct! {
    /// A buffer length: small, up to a page, whole sectors, or anything.
    pub struct Len {
        pub kind: u8,
        pub value: u32,
    }
}

impl Len {
    /// Exactly `len` bytes.
    pub fn exact(len: u32) -> Self {
        Len {
            kind: 1,
            value: len,
        }
    }

    /// The length this selects.
    pub fn resolve(&self) -> u32 {
        match self.kind % 5 {
            0 => self.value % 64,
            1 => self.value % 0x1001,
            2 => (self.value % 17) * 512,
            3 => (self.value % 17) * 512 + 1,
            _ => self.value,
        }
    }
}

input_struct! {
    /// One descriptor of a chain. `mode % 16`: 0-11 a normal descriptor (`NEXT` unless
    /// last, `WRITE` if `write`); 12 links to descriptor `next` instead of the following
    /// one (loops, jumps); 13 also sets `INDIRECT`; 14 ends the chain early (no `NEXT`);
    /// 15 uses `next` as the raw flags and as the raw link.
    pub struct Desc {
        pub addr: Addr,
        pub len: Len,
        pub write: bool,
        pub mode: u8,
        pub next: u16,
    }
}

impl Desc {
    /// A normal descriptor.
    pub fn new(addr: Addr, len: u32, write: bool) -> Self {
        Desc {
            addr,
            len: Len::exact(len),
            write,
            mode: 0,
            next: 0,
        }
    }
}

input_struct! {
    /// A descriptor chain and how it reaches the device. `delivery % 4`: 0 as a plain
    /// list of descriptors (no rings); 1 through the descriptor table and the available
    /// ring; 2 through an indirect table (at `table`, or the default one when
    /// `table.kind` is even) whose descriptor is the ring's head; 3 through the rings
    /// starting at table slot `table.value`, wrapping around the table.
    pub struct Chain {
        pub delivery: u8,
        pub table: Addr,
        pub descs: Vec<Desc>,
    }
}

impl Chain {
    /// A chain of `descs` through the rings.
    pub fn ring(descs: Vec<Desc>) -> Self {
        Chain {
            delivery: 1,
            table: Addr::default(),
            descs,
        }
    }
}

/// Writes one raw descriptor at `table + 16 * index`; ignores writes outside memory.
pub fn write_desc<M: GuestMemory>(mem: &M, table: u64, index: u16, d: Descriptor) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&d.addr().0.to_le_bytes());
    raw[8..12].copy_from_slice(&d.len().to_le_bytes());
    raw[12..14].copy_from_slice(&d.flags().to_le_bytes());
    raw[14..16].copy_from_slice(&d.next().to_le_bytes());
    if let Some(addr) = table.checked_add(16 * u64::from(index)) {
        let _ = mem.write_slice(&raw, GuestAddress(addr));
    }
}

/// Writes `bytes` at `addr` if the whole range is in memory.
pub fn poke<M: GuestMemory>(mem: &M, addr: u64, bytes: &[u8]) {
    let _ = mem.write_slice(bytes, GuestAddress(addr));
}

/// Reads a little-endian `u16`, 0 outside memory.
pub fn peek_u16<M: GuestMemory>(mem: &M, addr: u64) -> u16 {
    mem.read_obj::<u16>(GuestAddress(addr)).unwrap_or(0)
}

/// Where a split virtqueue lives in guest memory, and the driver's view of it.
#[derive(Debug, Clone)]
pub struct Ring {
    /// Queue size (a power of two).
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Default indirect table address.
    pub indirect: u64,
    /// Next descriptor table slot the driver uses.
    pub next_slot: u16,
}

impl Ring {
    /// A ring of `size` entries in the default layout shifted by `base`.
    pub fn new(size: u16, base: u64) -> Self {
        Ring {
            size,
            desc: base + DESC_TABLE,
            avail: base + AVAIL_RING,
            used: base + USED_RING,
            indirect: base + INDIRECT_TABLE,
            next_slot: 0,
        }
    }

    /// A queue of `size` entries selected by `size_sel` (1 to 256).
    pub fn size_from(size_sel: u8) -> u16 {
        1 << (size_sel % 9)
    }

    /// A ready device-side queue for this ring, or `None` if virtio-queue refuses the
    /// addresses or they are not in memory.
    pub fn queue<M: GuestMemory>(&self, mem: &M, event_idx: bool) -> Option<Queue> {
        let mut q = Queue::new(256).ok()?;
        q.try_set_size(self.size).ok()?;
        q.try_set_desc_table_address(GuestAddress(self.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .ok()?;
        q.try_set_used_ring_address(GuestAddress(self.used)).ok()?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q.is_valid(mem).then_some(q)
    }

    /// The driver's available index.
    pub fn avail_idx<M: GuestMemory>(&self, mem: &M) -> u16 {
        peek_u16(mem, self.avail + 2)
    }

    /// The device's used index.
    pub fn used_idx<M: GuestMemory>(&self, mem: &M) -> u16 {
        peek_u16(mem, self.used + 2)
    }

    /// Makes the chain at table slot `head` available.
    pub fn publish<M: GuestMemory>(&self, mem: &M, head: u16) {
        let idx = self.avail_idx(mem);
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        poke(mem, slot, &head.to_le_bytes());
        poke(mem, self.avail + 2, &idx.wrapping_add(1).to_le_bytes());
    }
}

/// The flags and link of descriptor `i` of `n` in a chain whose next descriptor (if
/// any) is at index `following`.
fn flags_and_next(d: &Desc, last: bool, following: u16) -> (u16, u16) {
    let write = if d.write { F_WRITE } else { 0 };
    let next = if last { 0 } else { F_NEXT };
    match d.mode % 16 {
        12 => (write | F_NEXT, d.next),
        13 => (write | next | F_INDIRECT, following),
        14 => (write, following),
        15 => (d.next, d.next),
        _ => (write | next, following),
    }
}

/// How [`place_chain`] handed a chain over.
pub enum Placed {
    /// As a plain list of descriptors: give it to the device as it is.
    Direct(Vec<Descriptor>),
    /// Made available in the ring: pop it from the queue.
    Ring,
    /// Nothing to deliver (an empty chain through the rings).
    Nothing,
}

/// Puts `chain` where its `delivery` says, and copies `content` into its buffers in
/// chain order (whatever their flags: the device must only read the readable ones).
pub fn place_chain<M: GuestMemory>(
    mem: &M,
    ring: &mut Ring,
    chain: &Chain,
    content: &[u8],
) -> Placed {
    let descs: Vec<Descriptor> = {
        let limit = match chain.delivery % 4 {
            0 => 512,
            2 => 256,
            _ => usize::from(ring.size),
        };
        let n = chain.descs.len().min(limit);
        chain.descs[..n]
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let following = match chain.delivery % 4 {
                    1 | 3 => (ring.next_slot.wrapping_add(i as u16 + 1)) % ring.size,
                    _ => i as u16 + 1,
                };
                let (flags, next) = flags_and_next(d, i + 1 == n, following);
                Descriptor::new(d.addr.resolve(), d.len.resolve(), flags, next)
            })
            .collect()
    };
    fill_buffers(mem, &descs, content);
    match chain.delivery % 4 {
        0 => Placed::Direct(descs),
        2 => {
            let table = if chain.table.kind.is_multiple_of(2) {
                ring.indirect
            } else {
                chain.table.resolve()
            };
            for (i, d) in descs.iter().enumerate() {
                write_desc(mem, table, i as u16, *d);
            }
            // The indirect descriptor's length: the table, or (odd value) anything.
            let len = if chain.table.value % 7 == 3 {
                chain.table.value
            } else {
                16 * descs.len() as u32
            };
            let head = ring.next_slot % ring.size;
            write_desc(
                mem,
                ring.desc,
                head,
                Descriptor::new(table, len, F_INDIRECT, 0),
            );
            ring.publish(mem, head);
            ring.next_slot = (head + 1) % ring.size;
            Placed::Ring
        }
        delivery => {
            if descs.is_empty() {
                return Placed::Nothing;
            }
            if delivery == 3 {
                ring.next_slot = (chain.table.value % u32::from(ring.size)) as u16;
            }
            let head = ring.next_slot % ring.size;
            for (i, d) in descs.iter().enumerate() {
                let slot = (head as usize + i) % usize::from(ring.size);
                write_desc(mem, ring.desc, slot as u16, *d);
            }
            ring.publish(mem, head);
            ring.next_slot = ((head as usize + descs.len()) % usize::from(ring.size)) as u16;
            Placed::Ring
        }
    }
}

/// Copies `content` across the buffers of `descs`, in order; buffers outside memory
/// are skipped.
pub fn fill_buffers<M: GuestMemory>(mem: &M, descs: &[Descriptor], content: &[u8]) {
    let mut rest = content;
    for d in descs {
        if rest.is_empty() {
            break;
        }
        let n = (d.len() as usize).min(rest.len());
        poke(mem, d.addr().0, &rest[..n]);
        rest = &rest[n..];
    }
}

/// A chain as the device saw it: the descriptors its iterator yielded.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Every descriptor yielded, in order.
    pub descs: Vec<Descriptor>,
}

impl Seen {
    /// Total bytes of the device-writable descriptors.
    pub fn writable_len(&self) -> u64 {
        self.descs
            .iter()
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum()
    }

    /// Total bytes of the device-readable descriptors.
    pub fn readable_len(&self) -> u64 {
        self.descs
            .iter()
            .filter(|d| !d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum()
    }

    /// The last non-empty descriptor.
    pub fn last_non_empty(&self) -> Option<Descriptor> {
        self.descs.iter().rev().find(|d| d.len() > 0).copied()
    }
}

/// Wraps a chain so that every descriptor the device takes is recorded in `seen`.
pub fn recording<'s, I>(chain: I, seen: &'s mut Seen) -> impl Iterator<Item = Descriptor> + 's
where
    I: IntoIterator<Item = Descriptor>,
    I::IntoIter: 's,
{
    chain.into_iter().inspect(move |d| seen.descs.push(*d))
}

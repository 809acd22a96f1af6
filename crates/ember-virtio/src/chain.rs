//! Bounded, validating walks over guest descriptor chains, and copies to and from the
//! byte streams they describe.
//!
//! A device handler turns each chain into a [`ChainLayout`] with [`walk_into`]: the
//! device-readable and device-writable buffers ([`Segment`]s), their total lengths, and
//! what is wrong with the chain, if anything. A [`Cursor`] then reads the readable
//! stream (a request header, data to send) and writes the writable one (data, a status
//! byte), across buffer boundaries, or hands out host slices of guest memory for
//! zero-copy I/O. One layout per queue, reused, means no allocation per request.
//!
//! ```
//! use ember_virtio::chain::{walk_into, ChainLayout, Cursor};
//! use ember_virtio::virtio_queue::desc::split::Descriptor;
//! use ember_virtio::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! const WRITE: u16 = 2; // VRING_DESC_F_WRITE
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
//! mem.write_slice(b"ping", GuestAddress(0x1000)).unwrap();
//! // A request in one readable buffer, room for the reply in two writable ones.
//! let chain = [
//!     Descriptor::new(0x1000, 4, 0, 0),
//!     Descriptor::new(0x2000, 2, WRITE, 0),
//!     Descriptor::new(0x3000, 8, WRITE, 0),
//! ];
//!
//! let mut layout = ChainLayout::default();
//! walk_into(&mut layout, &mem, chain);
//! assert!(layout.is_sound());
//! assert_eq!((layout.readable_len, layout.writable_len), (4, 10));
//!
//! let mut request = [0u8; 4];
//! Cursor::new(&layout.readable).read(&mem, &mut request).unwrap();
//! assert_eq!(&request, b"ping");
//! Cursor::new(&layout.writable).write(&mem, b"pong").unwrap();
//! assert_eq!(mem.read_obj::<[u8; 2]>(GuestAddress(0x2000)).unwrap(), *b"po");
//! assert_eq!(mem.read_obj::<[u8; 2]>(GuestAddress(0x3000)).unwrap(), *b"ng");
//! ```
//!
//! Everything here is guest-controlled input. [`walk_into`] never trusts a length: it sums in
//! `u64`, stores at most [`MAX_CHAIN_SEGMENTS`] segments (so a chain's memory footprint
//! on the host is bounded whatever the guest writes), and checks every segment against
//! guest memory once, up front. The walk itself terminates because virtio-queue's
//! [`virtio_queue::DescriptorChain`] iterator is bounded by the queue (or indirect table)
//! size and stops at the first descriptor it cannot read; a loop in the `next` links
//! therefore shows up here as a chain of at most queue-size descriptors.

use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::MS;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress, Permissions, VolatileSlice,
};

/// At most this many non-empty descriptors of a chain are kept. Longer chains are marked
/// malformed (too long). 1024 is four times the largest queue Ember offers (256), so
/// only indirect tables can get there.
pub const MAX_CHAIN_SEGMENTS: usize = 1024;

/// One non-empty descriptor: a guest buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes, never 0.
    pub len: u32,
}

/// What a descriptor chain describes, split into the device-readable and the
/// device-writable byte streams.
#[derive(Debug, Default, Clone)]
pub struct ChainLayout {
    /// Device-readable segments, in chain order (at most [`MAX_CHAIN_SEGMENTS`] in all).
    pub readable: Vec<Segment>,
    /// Device-writable segments, in chain order.
    pub writable: Vec<Segment>,
    /// Total bytes of the readable segments kept.
    pub readable_len: u64,
    /// Total bytes of the writable segments kept.
    pub writable_len: u64,
    /// The chain's last non-empty descriptor if it is device-writable (where a status
    /// byte goes), even when the chain is [`too_long`](Self::too_long).
    pub last_writable: Option<Segment>,
    /// A readable descriptor followed a writable one (virtio 1.2, 2.7.4.2 forbids it).
    pub misordered: bool,
    /// The chain had more than [`MAX_CHAIN_SEGMENTS`] non-empty descriptors.
    pub too_long: bool,
    /// Some segment is not entirely inside guest memory.
    pub out_of_bounds: bool,
}

impl ChainLayout {
    /// Whether the chain is well formed: in bounds, ordered and not too long.
    pub fn is_sound(&self) -> bool {
        !self.misordered && !self.too_long && !self.out_of_bounds
    }

    /// Empties the layout, keeping the segment vectors' capacity so a device that reuses
    /// one layout per queue does not allocate per request.
    pub fn clear(&mut self) {
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
        self.last_writable = None;
        self.misordered = false;
        self.too_long = false;
        self.out_of_bounds = false;
    }
}

/// Walks a chain (any iterator of descriptors, normally a
/// [`virtio_queue::DescriptorChain`]) into `layout` (cleared first, its allocations
/// reused), validating each segment against `mem`.
///
/// Empty descriptors are skipped. The layout records what is wrong rather than failing:
/// a device decides how to complete a chain that is not
/// [`is_sound`](ChainLayout::is_sound) (block, for one, still writes an error status
/// into [`last_writable`](ChainLayout::last_writable)).
pub fn walk_into<M, I>(layout: &mut ChainLayout, mem: &M, chain: I)
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    layout.clear();
    let mut kept = 0usize;
    let mut seen_writable = false;
    for desc in chain {
        if desc.len() == 0 {
            continue;
        }
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if desc.is_write_only() {
            seen_writable = true;
            layout.last_writable = Some(seg);
        } else {
            layout.last_writable = None;
            if seen_writable {
                layout.misordered = true;
            }
        }
        if kept >= MAX_CHAIN_SEGMENTS {
            layout.too_long = true;
            continue;
        }
        kept += 1;
        let access = if desc.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        // `len` is a u32, so it fits a usize on every supported target.
        if !in_one_region(mem, seg.addr, seg.len as usize)
            && !mem.check_range(seg.addr, seg.len as usize, access)
        {
            layout.out_of_bounds = true;
        }
        if desc.is_write_only() {
            layout.writable_len += u64::from(seg.len);
            layout.writable.push(seg);
        } else {
            layout.readable_len += u64::from(seg.len);
            layout.readable.push(seg);
        }
    }
}

/// The host slice of `[addr, addr + len)` when the range lies inside one region: one
/// binary search, where vm-memory's general range iterator costs several times that.
/// `None` when it does not (it may still be valid across adjacent regions).
///
/// Writes through the slice's methods mark the region's dirty bitmap; a caller that
/// hands the slice's pointer to the kernel (`preadv(2)`) must mark it itself, with
/// `slice.bitmap().mark_dirty(0, len)`.
pub fn region_slice<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
) -> Option<VolatileSlice<'_, MS<'_, M>>> {
    let region = mem.find_region(addr)?;
    // `find_region` returned the region containing `addr`, so this cannot underflow.
    let offset = addr.unchecked_offset_from(region.start_addr());
    region.get_slice(MemoryRegionAddress(offset), len).ok()
}

/// Whether `[addr, addr + len)` lies inside one region of a plain (IOMMU-less) guest
/// memory, the common case [`walk_into`] checks first.
fn in_one_region<M: GuestMemory + ?Sized>(mem: &M, addr: GuestAddress, len: usize) -> bool {
    mem.physical_memory()
        .is_some_and(|phys| region_slice(phys, addr, len).is_some())
}

/// Why a copy through a [`Cursor`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    /// The segments ended before the requested number of bytes.
    #[error("the descriptor chain's buffers end before the bytes requested")]
    Short,
    /// Guest memory refused the access.
    #[error("a descriptor chain's buffer is not in guest memory")]
    Memory,
}

/// A position in the byte stream formed by a list of segments (a [`ChainLayout`]'s
/// `readable` or `writable` ones). Cloning it saves the position.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    segs: &'a [Segment],
    index: usize,
    offset: u32,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `segs`.
    pub fn new(segs: &'a [Segment]) -> Self {
        Cursor {
            segs,
            index: 0,
            offset: 0,
        }
    }

    /// Calls `f(address, length, position in the caller's buffer)` for each piece of the
    /// next `total` bytes, then moves past them.
    fn for_each_piece(
        &mut self,
        total: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), CopyError>,
    ) -> Result<(), CopyError> {
        let mut done = 0usize;
        while done < total {
            let seg = self.segs.get(self.index).ok_or(CopyError::Short)?;
            let left = (seg.len - self.offset) as usize;
            let n = left.min(total - done);
            let addr = seg
                .addr
                .0
                .checked_add(u64::from(self.offset))
                .ok_or(CopyError::Memory)?;
            f(GuestAddress(addr), n, done)?;
            done += n;
            if n == left {
                self.index += 1;
                self.offset = 0;
            } else {
                // n < left <= u32::MAX.
                self.offset += n as u32;
            }
        }
        Ok(())
    }

    /// Copies the next `buf.len()` bytes of the stream into `buf`. On error the cursor
    /// is somewhere inside the range and `buf` may be partly filled.
    pub fn read<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &mut [u8],
    ) -> Result<(), CopyError> {
        let total = buf.len();
        self.for_each_piece(total, |addr, n, at| {
            mem.read_slice(&mut buf[at..at + n], addr)
                .map_err(|_| CopyError::Memory)
        })
    }

    /// Calls `f` with each host slice of guest memory backing the next `total` bytes of
    /// the stream, in order, then moves past them. Errors with [`CopyError::Memory`] when
    /// part of the range is not guest memory, and [`CopyError::Short`] when the segments
    /// end first; `f` may have seen a prefix of the range by then.
    ///
    /// This is the zero-copy path: `f` can hand the slices' host addresses to a system
    /// call. Such writes bypass vm-memory, so the caller marks them dirty (see
    /// [`region_slice`]).
    pub fn slices<M, F>(&mut self, mem: &M, total: usize, mut f: F) -> Result<(), CopyError>
    where
        M: GuestMemoryBackend + ?Sized,
        F: FnMut(VolatileSlice<'_, MS<'_, M>>) -> Result<(), CopyError>,
    {
        self.for_each_piece(total, |addr, n, _| {
            if let Some(slice) = region_slice(mem, addr, n) {
                return f(slice);
            }
            // Across regions (or not guest memory at all): vm-memory splits it.
            for slice in GuestMemoryBackend::get_slices(mem, addr, n) {
                f(slice.map_err(|_| CopyError::Memory)?)?;
            }
            Ok(())
        })
    }

    /// Copies `buf` into the next `buf.len()` bytes of the stream, marking the pages
    /// written dirty. On error a prefix of `buf` may have been written.
    pub fn write<M: GuestMemory + ?Sized>(&mut self, mem: &M, buf: &[u8]) -> Result<(), CopyError> {
        self.for_each_piece(buf.len(), |addr, n, at| {
            mem.write_slice(&buf[at..at + n], addr)
                .map_err(|_| CopyError::Memory)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::GuestMemoryMmap;

    const W: u16 = 2; // VRING_DESC_F_WRITE

    fn walk(mem: &GuestMemoryMmap, chain: Vec<Descriptor>) -> ChainLayout {
        let mut layout = ChainLayout::default();
        walk_into(&mut layout, mem, chain);
        layout
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn walk_splits_and_flags() {
        let m = mem();
        let l = walk(
            &m,
            vec![
                Descriptor::new(0x100, 16, 0, 0),
                Descriptor::new(0x200, 0, 0, 0),
                Descriptor::new(0x300, 8, W, 0),
                Descriptor::new(0x400, 1, W, 0),
            ],
        );
        assert!(l.is_sound());
        assert_eq!(l.readable_len, 16);
        assert_eq!(l.writable_len, 9);
        assert_eq!(l.readable.len(), 1);
        assert_eq!(l.last_writable.unwrap().addr, GuestAddress(0x400));

        let l = walk(
            &m,
            vec![
                Descriptor::new(0x300, 8, W, 0),
                Descriptor::new(0x100, 8, 0, 0),
            ],
        );
        assert!(l.misordered);
        assert_eq!(l.last_writable, None);
        let l = walk(&m, vec![Descriptor::new(0xfff0, 0x20, 0, 0)]);
        assert!(l.out_of_bounds);
        let l = walk(&m, vec![Descriptor::new(u64::MAX - 4, u32::MAX, W, 0)]);
        assert!(l.out_of_bounds);
    }

    #[test]
    fn walk_caps_segments() {
        let m = mem();
        let descs: Vec<_> = (0..MAX_CHAIN_SEGMENTS + 10)
            .map(|i| Descriptor::new(0x100, 1, if i > 5 { W } else { 0 }, 0))
            .collect();
        let l = walk(&m, descs);
        assert!(l.too_long);
        assert_eq!(l.readable.len() + l.writable.len(), MAX_CHAIN_SEGMENTS);
        assert!(l.last_writable.is_some());
    }

    #[test]
    fn cursor_copies_across_segments() {
        let m = mem();
        let segs = [
            Segment {
                addr: GuestAddress(0x100),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x200),
                len: 5,
            },
        ];
        let mut c = Cursor::new(&segs);
        c.write(&m, b"abcdefg").unwrap();
        assert_eq!(c.write(&m, b"hi"), Err(CopyError::Short));
        let mut c = Cursor::new(&segs);
        let mut buf = [0u8; 2];
        c.read(&m, &mut buf).unwrap();
        let mut buf = [0u8; 4];
        c.read(&m, &mut buf).unwrap();
        assert_eq!(&buf, b"cdef");
        let mut buf = [0u8; 3];
        assert_eq!(c.read(&m, &mut buf), Err(CopyError::Short));
    }
}

//! virtio-blk request handling ([`ember_virtio_devices::block::process_request`]),
//! structure-aware: random request types and sectors (near the end of the disk and far
//! past it), discard / write-zeroes segments, chains of random lengths and flags
//! (headers in write-only descriptors, status in read-only ones), any number of
//! guest buffers per `preadv`/`pwritev`, read-only and writable disks, given directly or popped from a queue.
//!
//! Checked: a completion with a status has a valid status byte, stored in the last
//! byte of the chain's last non-empty descriptor, which is device-writable, and its used
//! length never exceeds the chain's writable bytes; one without a status has used
//! length 0. And the data: a successful read returns what this input's earlier writes
//! (and write-zeroes) put on the disk, `GET_ID` the disk's ID.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::OnceLock;

use ember_virtio_devices::block::{
    process_request, Completion, RequestBuffers, MAX_IOVECS, SECTOR_SIZE, VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use ember_virtio_devices::{BlockOptions, Disk};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::common::{place_chain, recording, virtio_memory, Chain, Placed, Ring, Seen};
use crate::{decode, input_struct};

/// Disk size in sectors (64 KiB).
pub const DISK_SECTORS: u64 = 128;

input_struct! {
    /// Disk and negotiation (`config` bits: 0 read-only disk, 1 `FLUSH`, 2 `DISCARD`,
    /// 3 `WRITE_ZEROES`), selector of guest buffers per system call, queue size
    /// selector, requests.
    pub struct BlkInput {
        pub config: u8,
        pub iov_batch: u8,
        pub size_sel: u8,
        pub requests: Vec<BlkRequest>,
    }
}

input_struct! {
    /// One request: `req_type % 7` picks IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES
    /// or `raw_type`; the header, then the discard / write-zeroes segments, then `data`
    /// are copied into the chain's buffers in order.
    pub struct BlkRequest {
        pub req_type: u8,
        pub raw_type: u32,
        pub reserved: u32,
        pub sector: Sector,
        pub segments: Vec<DwzSegment>,
        pub data: Vec<u8>,
        pub chain: Chain,
    }
}

input_struct! {
    /// A sector number: `kind % 4` inside the disk, near its end, anything, or near
    /// `u64::MAX`.
    pub struct Sector {
        pub kind: u8,
        pub value: u64,
    }
}

input_struct! {
    /// A discard / write-zeroes segment.
    pub struct DwzSegment {
        pub sector: Sector,
        pub num_sectors: u32,
        pub flags: u32,
    }
}

impl Sector {
    /// The sector number this selects.
    pub fn resolve(&self) -> u64 {
        match self.kind % 4 {
            0 => self.value % DISK_SECTORS,
            1 => DISK_SECTORS.wrapping_sub(self.value % 4),
            2 => self.value,
            _ => u64::MAX - self.value % 8,
        }
    }
}

impl BlkRequest {
    /// The request type this selects.
    pub fn request_type(&self) -> u32 {
        match self.req_type % 7 {
            0 => VIRTIO_BLK_T_IN,
            1 => VIRTIO_BLK_T_OUT,
            2 => VIRTIO_BLK_T_FLUSH,
            3 => VIRTIO_BLK_T_GET_ID,
            4 => VIRTIO_BLK_T_DISCARD,
            5 => VIRTIO_BLK_T_WRITE_ZEROES,
            _ => self.raw_type,
        }
    }

    /// The bytes the driver puts in the chain: header, segments, data.
    pub fn content(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.request_type().to_le_bytes());
        out.extend_from_slice(&self.reserved.to_le_bytes());
        out.extend_from_slice(&self.sector.resolve().to_le_bytes());
        for s in self.segments.iter().take(32) {
            out.extend_from_slice(&s.sector.resolve().to_le_bytes());
            out.extend_from_slice(&s.num_sectors.to_le_bytes());
            out.extend_from_slice(&s.flags.to_le_bytes());
        }
        out.extend_from_slice(&self.data);
        out
    }
}

/// A sparse image of [`DISK_SECTORS`] sectors in `/dev/shm` (or the temporary
/// directory), opened and unlinked at once.
fn open_disk(read_only: bool) -> Disk {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!(
        "ember-fuzz-blk-{}-{}.img",
        std::process::id(),
        if read_only { "ro" } else { "rw" }
    ));
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .expect("create the disk image");
    file.set_len(DISK_SECTORS * SECTOR_SIZE)
        .expect("size the disk image");
    drop(file);
    let disk = Disk::open(&path, BlockOptions { read_only }).expect("open the disk image");
    let _ = std::fs::remove_file(&path);
    disk
}

/// A fresh writable scratch disk (for a whole device).
pub fn scratch_disk() -> Disk {
    open_disk(false)
}

/// The two disks, opened once per process.
fn disk(read_only: bool) -> &'static Disk {
    static RW: OnceLock<Disk> = OnceLock::new();
    static RO: OnceLock<Disk> = OnceLock::new();
    if read_only {
        RO.get_or_init(|| open_disk(true))
    } else {
        RW.get_or_init(|| open_disk(false))
    }
}

/// What the harness knows of the disk's bytes: set by this input's writes, unknown
/// before (the disk is shared between inputs).
struct Shadow(Vec<Option<u8>>);

/// The bytes of the chain's readable (or writable) buffers, in order.
fn gather(mem: &GuestMemoryMmap, seen: &Seen, writable: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for d in seen.descs.iter().filter(|d| d.is_write_only() == writable) {
        let mut buf = vec![0u8; d.len() as usize];
        mem.read_slice(&mut buf, d.addr())
            .expect("buffer in memory");
        out.extend_from_slice(&buf);
    }
    out
}

/// Whether the chain's non-empty buffers are pairwise disjoint (then what the device
/// read is still in memory, and what it wrote is not overwritten).
fn disjoint(seen: &Seen) -> bool {
    let mut ranges: Vec<(u64, u64)> = seen
        .descs
        .iter()
        .filter(|d| d.len() > 0)
        .map(|d| (d.addr().0, d.addr().0 + u64::from(d.len())))
        .collect();
    ranges.sort_unstable();
    ranges.windows(2).all(|w| w[0].1 <= w[1].0)
}

/// For a request that succeeded on a chain of disjoint buffers: OUT and WRITE_ZEROES
/// update the shadow, DISCARD forgets, IN must return what the shadow knows, GET_ID
/// the disk's ID.
fn check_data(mem: &GuestMemoryMmap, disk: &Disk, c: Completion, seen: &Seen, shadow: &mut Shadow) {
    if c.status != Some(VIRTIO_BLK_S_OK) || !disjoint(seen) {
        return;
    }
    let readable = gather(mem, seen, false);
    let header = &readable[..16];
    let req_type = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let payload = &readable[16..];
    let data_in = |len: usize| {
        let writable = gather(mem, seen, true);
        assert_eq!(writable.len() as u64, seen.writable_len());
        assert!(len < writable.len(), "{len} data bytes and a status byte");
        writable[..len].to_vec()
    };
    let at = |sector: u64| (sector * SECTOR_SIZE) as usize;
    match req_type {
        VIRTIO_BLK_T_OUT => {
            let start = at(sector);
            for (i, &b) in payload.iter().enumerate() {
                shadow.0[start + i] = Some(b);
            }
        }
        VIRTIO_BLK_T_IN => {
            let len = c.used_len as usize - 1;
            assert_eq!(
                len as u64,
                seen.writable_len() - 1,
                "short read reported OK"
            );
            let start = at(sector);
            for (i, b) in data_in(len).into_iter().enumerate() {
                if let Some(want) = shadow.0[start + i] {
                    assert_eq!(b, want, "byte {i} of a read of sector {sector}");
                }
            }
        }
        VIRTIO_BLK_T_GET_ID => {
            let len = c.used_len as usize - 1;
            assert_eq!(data_in(len), disk.id()[..len], "GET_ID");
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            for seg in payload.chunks_exact(16) {
                let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
                let num = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
                let value = (req_type == VIRTIO_BLK_T_WRITE_ZEROES).then_some(0);
                let start = at(sector);
                for b in &mut shadow.0[start..start + at(u64::from(num))] {
                    *b = value;
                }
            }
        }
        _ => {}
    }
}

fn check(mem: &GuestMemoryMmap, c: Completion, seen: &Seen) {
    match c.status {
        None => assert_eq!(c.used_len, 0, "no status but used length {}", c.used_len),
        Some(status) => {
            assert!(status <= VIRTIO_BLK_S_UNSUPP, "bad status {status}");
            assert!(c.used_len >= 1, "a status byte but used length 0");
            assert!(
                u64::from(c.used_len) <= seen.writable_len(),
                "used length {} > writable bytes {} of {:?}",
                c.used_len,
                seen.writable_len(),
                seen.descs
            );
            let last = seen
                .last_non_empty()
                .expect("a status byte in an empty chain");
            assert!(last.is_write_only(), "status in a read-only descriptor");
            let at = last.addr().0 + u64::from(last.len()) - 1;
            let stored: u8 = mem.read_obj(GuestAddress(at)).expect("status byte");
            assert_eq!(stored, status, "status byte in memory");
        }
    }
}

/// The harness.
pub fn run(data: &[u8]) {
    let Some(input) = decode::<BlkInput>(data) else {
        return;
    };
    let disk = disk(input.config & 1 != 0);
    let mut features = 0;
    for (bit, feature) in [
        (2, VIRTIO_BLK_F_FLUSH),
        (4, VIRTIO_BLK_F_DISCARD),
        (8, VIRTIO_BLK_F_WRITE_ZEROES),
    ] {
        if input.config & bit != 0 {
            features |= feature;
        }
    }
    let batch = [1, 2, 3, 16, MAX_IOVECS][usize::from(input.iov_batch % 5)];
    let mut buffers = RequestBuffers::with_iovec_batch(batch);

    let mem = virtio_memory();
    let mut ring = Ring::new(Ring::size_from(input.size_sel), 0);
    let Some(mut queue) = ring.queue(&mem, false) else {
        return;
    };
    let mut shadow = Shadow(vec![None; (DISK_SECTORS * SECTOR_SIZE) as usize]);
    for req in input.requests.iter().take(32) {
        let content = req.content();
        match place_chain(&mem, &mut ring, &req.chain, &content) {
            Placed::Direct(descs) => {
                let mut seen = Seen::default();
                let c = process_request(
                    disk,
                    &mem,
                    recording(descs, &mut seen),
                    features,
                    &mut buffers,
                );
                check(&mem, c, &seen);
                check_data(&mem, disk, c, &seen, &mut shadow);
            }
            Placed::Ring => {
                let Some(chain) = queue.pop_descriptor_chain(&mem) else {
                    continue;
                };
                let head = chain.head_index();
                let mut seen = Seen::default();
                let c = process_request(
                    disk,
                    &mem,
                    recording(chain, &mut seen),
                    features,
                    &mut buffers,
                );
                check(&mem, c, &seen);
                check_data(&mem, disk, c, &seen, &mut shadow);
                let _ = queue.add_used(&mem, head, c.used_len);
            }
            Placed::Nothing => {}
        }
    }
}

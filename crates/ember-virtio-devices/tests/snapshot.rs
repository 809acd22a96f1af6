//! Pause, resume, save and restore of the real devices (virtio-blk on a temporary image,
//! virtio-rng, virtio-net on fake backends) behind the virtio-mmio transport, driven by
//! a guest-side driver over plain guest memory. Restores go into a new transport and a
//! new device, as a new VMM process would build them, with the state passed through
//! postcard as a snapshot file would carry it.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_bus::BusDevice;
use ember_rate_limiter::{
    RateLimiterConfig, RateLimiterState, TokenBucketConfig, TokenBucketState,
};
use ember_virtio_devices::block::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};
use ember_virtio_devices::ember_virtio::mmio::{reg, status, MmioTransport};
use ember_virtio_devices::ember_virtio::{
    ActivateDevice, MmioTransportState, TransportError, VIRTIO_RING_F_EVENT_IDX,
};
use ember_virtio_devices::net::{NetBackend, VIRTIO_NET_HDR_LEN};
use ember_virtio_devices::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use ember_virtio_devices::{Block, BlockOptions, Net, Rng};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Mem = Arc<GuestMemoryMmap>;

const MEM_SIZE: usize = 4 << 20;
const QUEUE_SIZE: u16 = 64;
/// Queue `q`'s descriptor table; its available ring is 4 KiB above, its used ring 8 KiB.
const RINGS: u64 = 0x1_0000;
/// Request `r`'s buffers: a page each from here.
const DATA: u64 = 0x10_0000;
const IMAGE_SECTORS: u64 = 2048;
const HANG: Duration = Duration::from_secs(30);
const FEATURES_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

fn memory() -> Mem {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
}

fn desc_table(q: usize) -> u64 {
    RINGS + 0x4000 * q as u64
}
fn avail_ring(q: usize) -> u64 {
    desc_table(q) + 0x1000
}
fn used_ring(q: usize) -> u64 {
    desc_table(q) + 0x2000
}

/// The driver's side of one queue: free descriptors and the chains in flight.
struct Ring {
    q: usize,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    /// Used entries read back so far.
    seen: u16,
}

/// A guest driver: memory and a ring per queue.
struct Guest {
    mem: Mem,
    rings: Vec<Ring>,
}

impl Guest {
    fn new(mem: &Mem, queues: usize) -> Guest {
        for q in 0..queues {
            for addr in [avail_ring(q), used_ring(q)] {
                mem.write_slice(&[0u8; 4], GuestAddress(addr)).unwrap();
            }
        }
        Guest {
            mem: mem.clone(),
            rings: (0..queues)
                .map(|q| Ring {
                    q,
                    free: (0..QUEUE_SIZE).rev().collect(),
                    chains: HashMap::new(),
                    avail_idx: 0,
                    seen: 0,
                })
                .collect(),
        }
    }

    /// Negotiates every feature the device offers and sets up every queue, then DRIVER_OK.
    fn set_up(&self, t: &MmioTransport<Mem>) {
        write(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let features = t.offered_features();
        assert_ne!(features & VIRTIO_RING_F_EVENT_IDX, 0);
        for sel in 0..2 {
            write(t, reg::DRIVER_FEATURES_SEL, sel);
            write(t, reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        write(t, reg::STATUS, FEATURES_OK);
        for ring in &self.rings {
            write(t, reg::QUEUE_SEL, ring.q as u32);
            write(t, reg::QUEUE_NUM, u32::from(QUEUE_SIZE));
            write(t, reg::QUEUE_DESC_LOW, desc_table(ring.q) as u32);
            write(t, reg::QUEUE_DRIVER_LOW, avail_ring(ring.q) as u32);
            write(t, reg::QUEUE_DEVICE_LOW, used_ring(ring.q) as u32);
            write(t, reg::QUEUE_READY, 1);
        }
        write(t, reg::STATUS, FEATURES_OK | status::DRIVER_OK);
        assert!(t.is_activated());
    }

    /// Makes a chain of `(address, length, device-writable)` buffers available on queue
    /// `q`; returns its head, or `None` if the ring has no room.
    fn add(&mut self, q: usize, buffers: &[(u64, u32, bool)]) -> Option<u16> {
        let ring = &mut self.rings[q];
        if ring.free.len() < buffers.len() {
            return None;
        }
        let descs: Vec<u16> = (0..buffers.len())
            .map(|_| ring.free.pop().unwrap())
            .collect();
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let at = desc_table(q) + 16 * u64::from(descs[i]);
            let mut flags: u16 = if writable { 2 } else { 0 };
            let next = descs.get(i + 1).copied().unwrap_or(0);
            if i + 1 < buffers.len() {
                flags |= 1;
            }
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        let head = descs[0];
        let slot = u64::from(ring.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(head, GuestAddress(avail_ring(q) + 4 + 2 * slot))
            .unwrap();
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(ring.avail_idx, GuestAddress(avail_ring(q) + 2))
            .unwrap();
        ring.chains.insert(head, descs);
        Some(head)
    }

    fn used_idx(&self, q: usize) -> u16 {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem.read_obj(GuestAddress(used_ring(q) + 2)).unwrap()
    }

    /// Used entry `i` of queue `q`: (id, len).
    fn used_entry(&self, q: usize, i: u16) -> (u32, u32) {
        let at = used_ring(q) + 4 + 8 * u64::from(i % QUEUE_SIZE);
        let id = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    /// Waits until queue `q`'s used index reaches `idx`.
    fn wait_used(&self, q: usize, idx: u16) {
        let deadline = Instant::now() + HANG;
        while self.used_idx(q) != idx {
            assert!(
                Instant::now() < deadline,
                "queue {q}: used index {} never reached {idx}",
                self.used_idx(q)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The used entries not read yet, freeing their descriptors; a head that is not in
    /// flight (completed twice, or never offered) fails the test.
    fn reap(&mut self, q: usize) -> Vec<(u16, u32)> {
        let used = self.used_idx(q);
        let mut out = Vec::new();
        while self.rings[q].seen != used {
            let (id, len) = self.used_entry(q, self.rings[q].seen);
            let head = u16::try_from(id).unwrap();
            let ring = &mut self.rings[q];
            let descs = ring
                .chains
                .remove(&head)
                .unwrap_or_else(|| panic!("queue {q}: head {head} used but not in flight"));
            ring.free.extend(descs);
            ring.seen = ring.seen.wrapping_add(1);
            out.push((head, len));
        }
        out
    }

    /// Chains offered on queue `q` and not yet used.
    fn in_flight(&self, q: usize) -> usize {
        self.rings[q].chains.len()
    }
}

fn transport(device: Box<dyn ActivateDevice<Mem>>, mem: &Mem) -> MmioTransport<Mem> {
    MmioTransport::new(device, mem.clone(), EventFd::new(EFD_NONBLOCK).unwrap()).unwrap()
}

fn read(t: &MmioTransport<Mem>, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn write(t: &MmioTransport<Mem>, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn notify(t: &MmioTransport<Mem>, q: usize) {
    write(t, reg::QUEUE_NOTIFY, q as u32);
}

/// Saves a paused transport's state and reads it back through postcard.
fn snapshot(t: &MmioTransport<Mem>) -> MmioTransportState {
    let bytes = postcard::to_allocvec(&t.save_state().unwrap()).unwrap();
    postcard::from_bytes(&bytes).unwrap()
}

// ---------------------------------------------------------------------------------------
// virtio-blk

fn image(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(IMAGE_SECTORS * 512)
        .unwrap();
    path
}

fn block(path: &Path) -> Box<Block> {
    Box::new(Block::new(path, BlockOptions { read_only: false }).unwrap())
}

/// The 512 bytes request `r` writes: its number, repeated.
fn pattern(r: u64) -> Vec<u8> {
    (0..512).map(|i| (r as u8) ^ (i as u8)).collect()
}

fn status_addr(r: u64) -> u64 {
    DATA + 0x1000 * r + 0x800
}

/// Offers a write of `pattern(r)` to sector `r`; returns the head.
fn add_write(guest: &mut Guest, r: u64) -> Option<u16> {
    let base = DATA + 0x1000 * r;
    let mem = guest.mem.clone();
    mem.write_obj(VIRTIO_BLK_T_OUT, GuestAddress(base)).unwrap();
    mem.write_obj(0u32, GuestAddress(base + 4)).unwrap();
    mem.write_obj(r, GuestAddress(base + 8)).unwrap();
    mem.write_slice(&pattern(r), GuestAddress(base + 0x100))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(status_addr(r))).unwrap();
    guest.add(
        0,
        &[
            (base, 16, false),
            (base + 0x100, 512, false),
            (status_addr(r), 1, true),
        ],
    )
}

fn assert_written(guest: &Guest, path: &Path, requests: std::ops::Range<u64>) {
    let file = std::fs::File::open(path).unwrap();
    for r in requests {
        let status: u8 = guest.mem.read_obj(GuestAddress(status_addr(r))).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK, "request {r}: status {status:#x}");
        let mut sector = vec![0u8; 512];
        file.read_exact_at(&mut sector, r * 512).unwrap();
        assert_eq!(
            sector,
            pattern(r),
            "sector {r} does not hold request {r}'s data"
        );
    }
}

/// (a) Writes in the available ring when the device is paused complete, after a restore
/// into a new transport and a new `Block` on the same image, with OK status, their data
/// on the image, and used entries that follow the ones served before the pause.
#[test]
fn block_requests_pending_at_pause_complete_after_restore() {
    const BEFORE: u64 = 3;
    const PENDING: u64 = 5;
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    let mem = memory();
    let mut guest = Guest::new(&mem, 1);
    let old = transport(block(&path), &mem);
    guest.set_up(&old);

    let mut heads = Vec::new();
    for r in 0..BEFORE {
        heads.push(add_write(&mut guest, r).unwrap());
    }
    notify(&old, 0);
    guest.wait_used(0, BEFORE as u16);

    old.pause().unwrap();
    // The guest queues more, and even notifies, while the device is paused.
    for r in BEFORE..BEFORE + PENDING {
        heads.push(add_write(&mut guest, r).unwrap());
    }
    notify(&old, 0);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        guest.used_idx(0),
        BEFORE as u16,
        "a paused disk served requests"
    );

    let state = snapshot(&old);
    let queue = state.queues[0].active.unwrap();
    assert_eq!((queue.next_avail, queue.next_used), (3, 3));
    // The new process: the old one (and its lock on the image) is gone.
    drop(old);

    let new = transport(block(&path), &mem);
    new.restore_state(&state).unwrap();
    let total = (BEFORE + PENDING) as u16;
    guest.wait_used(0, total);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(guest.used_idx(0), total, "requests completed twice");
    for i in 0..total {
        let (id, _) = guest.used_entry(0, i);
        assert_eq!(id, u32::from(heads[usize::from(i)]), "used entry {i}");
    }
    assert_written(&guest, &path, 0..BEFORE + PENDING);
    assert_eq!(guest.reap(0).len(), usize::from(total));

    // And it keeps working.
    add_write(&mut guest, 40).unwrap();
    notify(&new, 0);
    guest.wait_used(0, total + 1);
    assert_written(&guest, &path, 40..41);
}

/// (b) Pauses and resumes in place while requests stream in: every request completes
/// exactly once, nothing is served while paused, and the data is on the image.
#[test]
fn block_pause_and_resume_under_a_stream_of_requests() {
    const REQUESTS: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    let mem = memory();
    let mut guest = Guest::new(&mem, 1);
    let t = transport(block(&path), &mem);
    guest.set_up(&t);

    let mut done: HashMap<u64, usize> = HashMap::new();
    let mut request_of: HashMap<u16, u64> = HashMap::new();
    let mut completed = 0usize;
    let mut reap =
        |guest: &mut Guest, request_of: &mut HashMap<u16, u64>, done: &mut HashMap<u64, usize>| {
            for (head, _) in guest.reap(0) {
                let r = request_of.remove(&head).unwrap();
                *done.entry(r).or_default() += 1;
                completed += 1;
            }
        };
    let mut pauses = 0;
    // Requests submitted; request `r` writes sector `r`.
    let mut r = 0u64;
    let submit = |guest: &mut Guest, request_of: &mut HashMap<u16, u64>, r: &mut u64| {
        let head = add_write(guest, *r)?;
        request_of.insert(head, *r);
        *r += 1;
        Some(head)
    };
    while r < REQUESTS {
        if submit(&mut guest, &mut request_of, &mut r).is_none() {
            // The ring is full: let the device catch up.
            notify(&t, 0);
            std::thread::sleep(Duration::from_micros(200));
            reap(&mut guest, &mut request_of, &mut done);
            continue;
        }
        if r % 4 == 0 {
            notify(&t, 0);
        }
        if r % 37 == 0 {
            notify(&t, 0);
            t.pause().unwrap();
            pauses += 1;
            let frozen = guest.used_idx(0);
            // Queued and notified while paused: not served until resume.
            submit(&mut guest, &mut request_of, &mut r);
            notify(&t, 0);
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(guest.used_idx(0), frozen, "served while paused");
            let state = t.save_state().unwrap();
            assert_eq!(state.queues[0].active.unwrap().next_used, frozen);
            t.resume().unwrap();
        }
    }
    notify(&t, 0);
    let deadline = Instant::now() + HANG;
    while guest.in_flight(0) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} requests never completed",
            guest.in_flight(0)
        );
        std::thread::sleep(Duration::from_millis(1));
        reap(&mut guest, &mut request_of, &mut done);
    }
    std::thread::sleep(Duration::from_millis(50));
    reap(&mut guest, &mut request_of, &mut done);
    assert!(pauses >= 5, "only {pauses} pauses");
    assert_eq!(completed as u64, r, "requests completed more than once");
    assert_eq!(done.len() as u64, r);
    assert!(done.values().all(|&n| n == 1), "a request completed twice");
    assert_eq!(guest.used_idx(0), r as u16);
    assert_written(&guest, &path, 0..r);
}

// ---------------------------------------------------------------------------------------
// virtio-rng

fn read_buffer(mem: &Mem, at: u64) -> [u8; 64] {
    let mut bytes = [0u8; 64];
    mem.read_slice(&mut bytes, GuestAddress(at)).unwrap();
    bytes
}

/// (c) rng: chains pending at pause are filled after a restore into a new device.
#[test]
fn rng_round_trip() {
    let mem = memory();
    let mut guest = Guest::new(&mem, 1);
    let old = transport(Box::new(Rng::new()), &mem);
    guest.set_up(&old);
    let buffer = |i: u64| DATA + 0x1000 * i;
    for i in 0..2 {
        guest.add(0, &[(buffer(i), 64, true)]).unwrap();
    }
    notify(&old, 0);
    guest.wait_used(0, 2);
    old.pause().unwrap();
    let mut heads = Vec::new();
    for i in 2..5 {
        heads.push(guest.add(0, &[(buffer(i), 64, true)]).unwrap());
    }
    let state = snapshot(&old);
    drop(old);
    for i in 2..5 {
        assert_eq!(read_buffer(&mem, buffer(i)), [0u8; 64]);
    }

    let new = transport(Box::new(Rng::new()), &mem);
    new.restore_state(&state).unwrap();
    guest.wait_used(0, 5);
    for (i, head) in (2..5u16).zip(heads) {
        assert_eq!(guest.used_entry(0, i), (u32::from(head), 64));
        let bytes = read_buffer(&mem, buffer(u64::from(i)));
        assert_ne!(bytes, [0u8; 64], "buffer {i} not filled");
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(guest.used_idx(0), 5);
}

// ---------------------------------------------------------------------------------------
// virtio-net

#[derive(Clone, Default)]
struct Fake {
    rx: Arc<Mutex<VecDeque<Vec<u8>>>>,
    tx: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl NetBackend for Fake {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.rx.lock().unwrap().pop_front() {
            Some(frame) => {
                buf[..frame.len()].copy_from_slice(&frame);
                Ok(frame.len())
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.tx.lock().unwrap().push(frame.to_vec());
        Ok(frame.len())
    }
}

/// A frame with a zero virtio-net header and `tag` in its payload.
fn frame(tag: u8) -> Vec<u8> {
    let mut frame = vec![0u8; VIRTIO_NET_HDR_LEN + 60];
    frame[VIRTIO_NET_HDR_LEN..].fill(tag);
    frame
}

const RX: usize = 0;
const TX: usize = 1;
const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

fn add_tx(guest: &mut Guest, i: u64, tag: u8) -> u16 {
    let at = DATA + 0x1000 * i;
    let f = frame(tag);
    guest.mem.write_slice(&f, GuestAddress(at)).unwrap();
    guest.add(TX, &[(at, f.len() as u32, false)]).unwrap()
}

fn add_rx(guest: &mut Guest, i: u64) -> u16 {
    guest.add(RX, &[(DATA + 0x1000 * i, 2048, true)]).unwrap()
}

fn rx_payload(guest: &Guest, i: u64) -> Vec<u8> {
    let mut f = frame(0);
    guest
        .mem
        .read_slice(&mut f, GuestAddress(DATA + 0x1000 * i))
        .unwrap();
    f[VIRTIO_NET_HDR_LEN..].to_vec()
}

/// (c) net: tx chains pending at pause go out of the new device's backend after the
/// restore, and rx buffers posted before the pause take the new backend's frames, at
/// the used positions that follow the ones served before.
#[test]
fn net_round_trip() {
    let mem = memory();
    let mut guest = Guest::new(&mem, 2);
    let old_backend = Fake::default();
    let old = transport(
        Box::new(Net::with_backend(Box::new(old_backend.clone()), Some(MAC))),
        &mem,
    );
    guest.set_up(&old);
    // Before: one frame each way.
    add_rx(&mut guest, 0);
    add_rx(&mut guest, 1);
    old_backend.rx.lock().unwrap().push_back(frame(0xa1));
    add_tx(&mut guest, 10, 0xb1);
    notify(&old, TX);
    notify(&old, RX);
    guest.wait_used(TX, 1);
    guest.wait_used(RX, 1);
    assert_eq!(rx_payload(&guest, 0), vec![0xa1; 60]);

    old.pause().unwrap();
    let tx_heads = [add_tx(&mut guest, 11, 0xb2), add_tx(&mut guest, 12, 0xb3)];
    let state = snapshot(&old);
    assert_eq!(state.queues.len(), 2);
    drop(old);
    assert_eq!(
        old_backend.tx.lock().unwrap().len(),
        1,
        "a paused net sent a frame"
    );

    let new_backend = Fake::default();
    new_backend.rx.lock().unwrap().push_back(frame(0xa2));
    let new = transport(
        Box::new(Net::with_backend(Box::new(new_backend.clone()), Some(MAC))),
        &mem,
    );
    new.restore_state(&state).unwrap();
    guest.wait_used(TX, 3);
    guest.wait_used(RX, 2);
    assert_eq!(
        *new_backend.tx.lock().unwrap(),
        vec![frame(0xb2), frame(0xb3)],
        "the pending tx frames, in order, once"
    );
    assert_eq!(guest.used_entry(TX, 1).0, u32::from(tx_heads[0]));
    assert_eq!(guest.used_entry(TX, 2).0, u32::from(tx_heads[1]));
    assert_eq!(rx_payload(&guest, 1), vec![0xa2; 60]);
    assert_eq!(guest.used_entry(RX, 1).1, frame(0).len() as u32);
    let mut mac = [0u8; 6];
    new.read(reg::CONFIG, &mut mac);
    assert_eq!(mac, MAC);
}

/// A datagram socket as the backend: a tap's behaviour (a pollable fd, frames that wait
/// in it).
struct Sock(UnixDatagram);

impl NetBackend for Sock {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.0.send(frame)
    }
    fn rx_fd(&self) -> Option<RawFd> {
        Some(self.0.as_raw_fd())
    }
}

/// Pause and resume in place keep the backend open and polled: a frame arriving while
/// paused waits in it and is delivered on resume; a tx chain queued while paused goes
/// out on resume.
#[test]
fn net_pause_keeps_the_backend() {
    let mem = memory();
    let mut guest = Guest::new(&mem, 2);
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    peer.set_read_timeout(Some(HANG)).unwrap();
    let t = transport(
        Box::new(Net::with_backend(Box::new(Sock(ours)), Some(MAC))),
        &mem,
    );
    guest.set_up(&t);
    add_rx(&mut guest, 0);
    add_rx(&mut guest, 1);
    notify(&t, RX);
    peer.send(&frame(0xc1)).unwrap();
    guest.wait_used(RX, 1);

    t.pause().unwrap();
    peer.send(&frame(0xc2)).unwrap();
    add_tx(&mut guest, 10, 0xd1);
    notify(&t, TX);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(guest.used_idx(RX), 1, "a paused net delivered a frame");
    assert_eq!(guest.used_idx(TX), 0, "a paused net sent a frame");

    t.resume().unwrap();
    guest.wait_used(RX, 2);
    guest.wait_used(TX, 1);
    assert_eq!(rx_payload(&guest, 1), vec![0xc2; 60]);
    let mut got = vec![0u8; 2048];
    let n = peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &frame(0xd1)[..]);
}

// ---------------------------------------------------------------------------------------
// Refused states

/// (d) States of another device type, another queue count, or with rings outside guest
/// memory are refused with an error, and the transport stays usable.
#[test]
fn restore_rejects_mismatched_states() {
    let mem = memory();
    let mut guest = Guest::new(&mem, 1);
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    let blk = transport(block(&path), &mem);
    guest.set_up(&blk);
    blk.pause().unwrap();
    let blk_state = snapshot(&blk);
    drop(blk);

    // A block state into an rng.
    let rng = transport(Box::new(Rng::new()), &mem);
    let err = rng.restore_state(&blk_state).unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::RestoreDeviceType {
                saved: 2,
                actual: 4
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("block") && message.contains("rng"),
        "{message}"
    );

    // A net state with one queue into a net (two queues).
    let net_guest = Guest::new(&mem, 2);
    let net = transport(
        Box::new(Net::with_backend(Box::new(Fake::default()), Some(MAC))),
        &mem,
    );
    net_guest.set_up(&net);
    net.pause().unwrap();
    let mut net_state = snapshot(&net);
    drop(net);
    net_state.queues.pop();
    net_state.queue_max_sizes.pop();
    let net2 = transport(
        Box::new(Net::with_backend(Box::new(Fake::default()), Some(MAC))),
        &mem,
    );
    let err = net2.restore_state(&net_state).unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::RestoreQueueCount {
                saved: 1,
                actual: 2
            }
        ),
        "{err:?}"
    );

    // A ring outside guest memory.
    let blk = transport(block(&path), &mem);
    let mut outside = blk_state.clone();
    outside.queues[0].active.as_mut().unwrap().avail_ring = MEM_SIZE as u64 - 64;
    outside.queues[0].avail = Some(MEM_SIZE as u64 - 64);
    let err = blk.restore_state(&outside).unwrap_err();
    assert!(err.to_string().contains("not inside guest memory"), "{err}");
    assert!(!blk.is_activated());
    // The right state still restores.
    blk.restore_state(&blk_state).unwrap();
    assert!(blk.is_activated());
    assert_eq!(read(&blk, reg::STATUS), FEATURES_OK | status::DRIVER_OK);
    add_write(&mut guest, 0).unwrap();
    notify(&blk, 0);
    guest.wait_used(0, 1);
    assert_written(&guest, &path, 0..1);
}

// ---------------------------------------------------------------------------------------
// Rate limiter levels

/// A bucket that refills in an hour: nothing comes back while a test runs.
fn slow_bucket(size: u64) -> Option<TokenBucketConfig> {
    Some(TokenBucketConfig {
        size,
        one_time_burst: 0,
        refill_time_ms: 3_600_000,
    })
}

fn limited_block(path: &Path, ops: u64) -> Box<Block> {
    let limits = RateLimiterConfig {
        bandwidth: None,
        ops: slow_bucket(ops),
    };
    Box::new(block(path).with_rate_limiter(limits).unwrap())
}

/// (e) A restored disk goes on with the tokens its limiter had: a guest that spent its
/// ops bucket before the snapshot gets no fresh one from the restore, while the same
/// snapshot with full buckets serves the request at once.
#[test]
fn block_rate_limiter_levels_survive_a_restore() {
    const OPS: u64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    let mem = memory();
    let mut guest = Guest::new(&mem, 1);
    let old = transport(limited_block(&path, OPS), &mem);
    guest.set_up(&old);
    // The bucket's 4 requests, and one more charged after it was done: a debt of 1.
    for r in 0..=OPS {
        add_write(&mut guest, r).unwrap();
    }
    notify(&old, 0);
    guest.wait_used(0, OPS as u16 + 1);
    old.pause().unwrap();
    let state = snapshot(&old);
    drop(old);
    let in_debt = TokenBucketState {
        budget: 0,
        one_time_burst: 0,
        debt: 1,
    };
    assert_eq!(
        state.rate_limiters,
        [RateLimiterState {
            bandwidth: None,
            ops: Some(in_debt)
        }]
    );

    // The guest's next request waits in the ring: the restored limiter is in debt.
    let restored = transport(limited_block(&path, OPS), &mem);
    restored.restore_state(&state).unwrap();
    add_write(&mut guest, OPS + 1).unwrap();
    notify(&restored, 0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        guest.used_idx(0),
        OPS as u16 + 1,
        "a restored disk served a request its limiter had no tokens for"
    );
    restored.pause().unwrap();
    assert_eq!(
        restored.save_state().unwrap().rate_limiters,
        state.rate_limiters
    );
    drop(restored);

    // The same snapshot with a fresh limiter's levels: served at once.
    let fresh = transport(limited_block(&path, OPS), &mem);
    let mut full = state.clone();
    full.rate_limiters = fresh.save_state().unwrap().rate_limiters;
    assert_eq!(full.rate_limiters[0].ops.map(|b| b.budget), Some(OPS));
    fresh.restore_state(&full).unwrap();
    guest.wait_used(0, OPS as u16 + 2);
    assert_written(&guest, &path, 0..OPS + 2);
}

/// (f) Saved limiter levels that do not fit the new device's limiters are refused by
/// name, and the transport stays usable.
#[test]
fn restore_rejects_rate_limiter_states_that_do_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    let mem = memory();
    let limited = transport(limited_block(&path, 8), &mem);
    let saved = limited.save_state().unwrap();
    drop(limited);
    let unlimited_state = transport(block(&path), &mem).save_state().unwrap();
    assert_eq!(unlimited_state.rate_limiters, [RateLimiterState::default()]);

    let cases: [(Vec<RateLimiterState>, &[&str]); 3] = [
        (Vec::new(), &["rate limiters", "0 saved", "1 rate limiters"]),
        (
            unlimited_state.rate_limiters.clone(),
            &["no levels for the limiter's ops bucket"],
        ),
        (
            vec![RateLimiterState {
                bandwidth: None,
                ops: Some(TokenBucketState {
                    budget: 9,
                    one_time_burst: 0,
                    debt: 0,
                }),
            }],
            &["ops", "budget 9", "(8)"],
        ),
    ];
    let t = transport(limited_block(&path, 8), &mem);
    for (rate_limiters, words) in cases {
        let state = MmioTransportState {
            rate_limiters,
            ..saved.clone()
        };
        let err = t.restore_state(&state).unwrap_err();
        assert!(matches!(err, TransportError::RestoreInvalid(_)), "{err:?}");
        let message = err.to_string();
        for word in words {
            assert!(message.contains(word), "{message:?} lacks {word:?}");
        }
        assert_eq!(t.save_state().unwrap(), saved, "a refused state changed it");
    }
    // A limited state into an unlimited disk, and a net's two limiters into a disk.
    let other_dir = tempfile::tempdir().unwrap();
    let err = transport(block(&image(&other_dir)), &mem)
        .restore_state(&saved)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ops bucket levels but the limiter has no ops bucket"),
        "{err}"
    );
    let net = transport(
        Box::new(Net::with_backend(Box::new(Fake::default()), Some(MAC))),
        &mem,
    );
    assert_eq!(net.save_state().unwrap().rate_limiters.len(), 2, "rx, tx");
    t.restore_state(&saved).unwrap();
}

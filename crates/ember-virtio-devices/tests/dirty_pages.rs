//! Real devices, behind the virtio-mmio transport and on their worker threads, on guest
//! memory with a dirty bitmap (`AtomicBitmap`): after they served a request, exactly
//! the guest pages they wrote are marked dirty (the buffers they filled, the status
//! byte, the used ring), and no other (the request header, the buffers they only read,
//! the descriptor table and the available ring).
//!
//! The driver fills the rings before DRIVER_OK and the bitmap is cleared right after,
//! so every page dirty afterwards was written by the device (its worker serves chains
//! queued before activation when it starts).

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_bus::BusDevice;
use ember_virtio_devices::block::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use ember_virtio_devices::ember_virtio::mmio::{reg, status, MmioTransport};
use ember_virtio_devices::ember_virtio::{ActivateDevice, VIRTIO_RING_F_EVENT_IDX};
use ember_virtio_devices::vm_memory::bitmap::{AtomicBitmap, Bitmap};
use ember_virtio_devices::vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, MmapRegion,
};
use ember_virtio_devices::{Block, BlockOptions, Rng};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const PAGE: u64 = 0x1000;
const MEM_SIZE: usize = 1 << 20;
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x1_0000;
const AVAIL_RING: u64 = 0x1_1000;
const USED_RING: u64 = 0x1_2000;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

type DirtyMemory = GuestMemoryMmap<AtomicBitmap>;

fn dirty_memory() -> DirtyMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A guest driver for a one-queue device.
struct Driver<M: GuestAddressSpace> {
    transport: MmioTransport<M>,
    mem: M,
    next_desc: u16,
    avail_idx: u16,
}

impl<M> Driver<M>
where
    M: GuestAddressSpace<M = DirtyMemory> + Send + Sync + 'static,
{
    /// Negotiates the device's features (all of them) and sets queue 0 up, up to but
    /// not including DRIVER_OK.
    fn new(device: Box<dyn ActivateDevice<M>>, mem: M) -> Self {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let features = device.device_features();
        assert_ne!(features & VIRTIO_RING_F_EVENT_IDX, 0);
        let driver = Driver {
            transport: MmioTransport::new(device, mem.clone(), irq).unwrap(),
            mem,
            next_desc: 0,
            avail_idx: 0,
        };
        driver.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        for sel in 0..2 {
            driver.write(reg::DRIVER_FEATURES_SEL, sel);
            driver.write(reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        driver.write(reg::STATUS, Self::FEATURES_OK);
        assert_eq!(driver.read(reg::STATUS), Self::FEATURES_OK);
        driver.write(reg::QUEUE_SEL, 0);
        driver.write(reg::QUEUE_NUM, u32::from(QUEUE_SIZE));
        driver.write(reg::QUEUE_DESC_LOW, DESC_TABLE as u32);
        driver.write(reg::QUEUE_DRIVER_LOW, AVAIL_RING as u32);
        driver.write(reg::QUEUE_DEVICE_LOW, USED_RING as u32);
        driver.write(reg::QUEUE_READY, 1);
        driver
    }

    const FEATURES_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

    fn read(&self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(&self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// Makes a chain of `(address, length, device-writable)` buffers available.
    fn add(&mut self, buffers: &[(u64, u32, bool)]) {
        let mem = self.mem.memory();
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let slot = self.next_desc;
            self.next_desc += 1;
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            let at = DESC_TABLE + 16 * u64::from(slot);
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(self.next_desc, GuestAddress(at + 14))
                .unwrap();
        }
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        mem.write_obj(head, GuestAddress(AVAIL_RING + 4 + 2 * slot))
            .unwrap();
        self.avail_idx += 1;
        mem.store(
            self.avail_idx,
            GuestAddress(AVAIL_RING + 2),
            Ordering::Release,
        )
        .unwrap();
    }

    /// Clears every dirty bit, sets DRIVER_OK (the worker starts and serves the queued
    /// chains) and waits for all of them to be used.
    fn start_and_wait(&self) {
        let mem = self.mem.memory();
        for region in mem.iter() {
            let mapping: &MmapRegion<AtomicBitmap> = region;
            mapping.bitmap().reset();
        }
        self.write(reg::STATUS, Self::FEATURES_OK | status::DRIVER_OK);
        assert!(self.transport.is_activated());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let used: u16 = mem
                .load(GuestAddress(USED_RING + 2), Ordering::Acquire)
                .unwrap();
            if used == self.avail_idx {
                break;
            }
            assert!(Instant::now() < deadline, "the device used {used} chains");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Stop the worker before reading the bitmap: nothing writes any more.
        self.write(reg::STATUS, 0);
    }

    /// Used element `i`'s length.
    fn used_len(&self, i: u64) -> u32 {
        self.mem
            .memory()
            .read_obj(GuestAddress(USED_RING + 4 + 8 * i + 4))
            .unwrap()
    }

    /// The guest pages marked dirty, in address order.
    fn dirty_pages(&self) -> Vec<u64> {
        let mem = self.mem.memory();
        let mut pages = Vec::new();
        for region in mem.iter() {
            let start = region.start_addr().0;
            for offset in (0..region.len()).step_by(PAGE as usize) {
                if region.bitmap().dirty_at(offset as usize) {
                    pages.push(start + offset);
                }
            }
        }
        pages
    }
}

/// virtio-rng fills two buffers, one straddling a page boundary.
#[test]
fn rng_marks_exactly_the_pages_it_fills() {
    let mut driver = Driver::new(Box::new(Rng::new()), Arc::new(dirty_memory()));
    driver.add(&[(0x2_0800, 0x1000, true)]);
    driver.add(&[(0x3_0000, 16, true), (0x4_0000, 0, true)]);
    driver.start_and_wait();
    assert_eq!(driver.used_len(0), 0x1000);
    assert_eq!(driver.used_len(1), 16);
    assert_eq!(
        driver.dirty_pages(),
        [USED_RING, 0x2_0000, 0x2_1000, 0x3_0000],
        "dirty pages (used ring, the filled buffers)"
    );
}

/// virtio-blk on memory that can be swapped (hotplug): a read fills guest memory with
/// `preadv(2)`, which vm-memory does not see, so the device marks those pages itself; a
/// write only reads guest memory.
#[test]
fn block_marks_exactly_the_pages_it_fills() {
    let mut image = tempfile::NamedTempFile::new().unwrap();
    let content: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    image.write_all(&content).unwrap();
    let block = Block::new(image.path(), BlockOptions::default()).unwrap();
    let mem = GuestMemoryAtomic::new(dirty_memory());
    let mut driver = Driver::new(Box::new(block), mem.clone());

    let header = |req_type: u32, sector: u64| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    };
    let guest = mem.memory();
    // Read sectors 8..16 into 0x3_0800 (two pages), status at 0x4_0000.
    guest
        .write_slice(&header(VIRTIO_BLK_T_IN, 8), GuestAddress(0x2_0000))
        .unwrap();
    driver.add(&[
        (0x2_0000, 16, false),
        (0x3_0800, 0x1000, true),
        (0x4_0000, 1, true),
    ]);
    // Write 0x5_0000 (one page) to sectors 32..40, status at 0x6_0000.
    guest
        .write_slice(&header(VIRTIO_BLK_T_OUT, 32), GuestAddress(0x2_0100))
        .unwrap();
    guest
        .write_slice(&[0xab; 0x1000], GuestAddress(0x5_0000))
        .unwrap();
    driver.add(&[
        (0x2_0100, 16, false),
        (0x5_0000, 0x1000, false),
        (0x6_0000, 1, true),
    ]);
    driver.start_and_wait();

    assert_eq!(driver.used_len(0), 0x1001);
    assert_eq!(driver.used_len(1), 1);
    for status_at in [0x4_0000, 0x6_0000] {
        let status: u8 = guest.read_obj(GuestAddress(status_at)).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK);
    }
    let mut read = vec![0u8; 0x1000];
    guest.read_slice(&mut read, GuestAddress(0x3_0800)).unwrap();
    assert!(read == content[8 * 512..16 * 512], "read data differs");
    assert_eq!(
        driver.dirty_pages(),
        [USED_RING, 0x3_0000, 0x3_1000, 0x4_0000, 0x6_0000],
        "dirty pages (used ring, read buffer, status bytes)"
    );
}

//! virtio-drivers glue: the [`Hal`] for this guest (identity mapping, DMA pages from a
//! static region, bounce buffers for anything the driver shares from outside it), bounded
//! polling, and finding the virtio-mmio devices the command line names.

use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use crate::cmdline::VirtioMmioDevice;
use crate::println;

/// Size of the page allocator's part of the DMA region.
const DMA_PAGES_SIZE: usize = 2 << 20;
/// Size of the bounce pool at the end of the DMA region.
const BOUNCE_SIZE: usize = 256 << 10;
/// Allocation granule of the bounce pool.
const BOUNCE_GRANULE: usize = 64;
/// Granules in the bounce pool.
const BOUNCE_GRANULES: usize = BOUNCE_SIZE / BOUNCE_GRANULE;
/// Size of the whole DMA region.
const DMA_SIZE: usize = DMA_PAGES_SIZE + BOUNCE_SIZE;

#[repr(C, align(4096))]
struct DmaRegion([u8; DMA_SIZE]);

/// The only memory the devices are ever given: virtqueues and buffers from
/// [`GuestHal::dma_alloc`] (the first [`DMA_PAGES_SIZE`] bytes), and bounce buffers for
/// what the driver shares from elsewhere (the last [`BOUNCE_SIZE`] bytes).
static mut DMA: DmaRegion = DmaRegion([0; DMA_SIZE]);
/// Offset of the first free byte of the page allocator's part of [`DMA`].
static DMA_NEXT: AtomicUsize = AtomicUsize::new(0);

/// The end of the identity map Ember sets up (4 GiB).
const IDENTITY_MAP_END: u64 = 4 << 30;

fn dma_base() -> usize {
    core::ptr::addr_of_mut!(DMA) as usize
}

/// Whether `addr..addr + len` lies inside the DMA region.
pub fn in_dma_region(addr: usize, len: usize) -> bool {
    addr >= dma_base()
        && addr
            .checked_add(len)
            .is_some_and(|end| end <= dma_base() + DMA_SIZE)
}

/// A first-fit allocator of [`BOUNCE_GRANULE`]-byte granules at the end of [`DMA`]. The
/// guest is single-threaded; the flag only catches re-entry.
struct BouncePool {
    busy: AtomicBool,
    used: UnsafeCell<[bool; BOUNCE_GRANULES]>,
}

// SAFETY: `used` is only touched while `busy` is held.
unsafe impl Sync for BouncePool {}

static BOUNCE: BouncePool = BouncePool {
    busy: AtomicBool::new(false),
    used: UnsafeCell::new([false; BOUNCE_GRANULES]),
};
/// Buffers bounced so far (shared from outside the DMA region).
static BOUNCED: AtomicUsize = AtomicUsize::new(0);

impl BouncePool {
    fn with<R>(&self, f: impl FnOnce(&mut [bool; BOUNCE_GRANULES]) -> R) -> R {
        assert!(
            !self.busy.swap(true, Ordering::Acquire),
            "bounce pool re-entered"
        );
        // SAFETY: `busy` is held, so this is the only reference.
        let result = f(unsafe { &mut *self.used.get() });
        self.busy.store(false, Ordering::Release);
        result
    }

    /// Allocates room for `len` bytes; returns its address.
    fn alloc(&self, len: usize) -> usize {
        let n = len.div_ceil(BOUNCE_GRANULE).max(1);
        let first = self.with(|used| {
            let mut run = 0;
            for i in 0..BOUNCE_GRANULES {
                run = if used[i] { 0 } else { run + 1 };
                if run == n {
                    let first = i + 1 - n;
                    used[first..=i].fill(true);
                    return Some(first);
                }
            }
            None
        });
        let first = first.unwrap_or_else(|| panic!("bounce pool exhausted ({len} bytes asked)"));
        dma_base() + DMA_PAGES_SIZE + first * BOUNCE_GRANULE
    }

    fn free(&self, addr: usize, len: usize) {
        let first = (addr - dma_base() - DMA_PAGES_SIZE) / BOUNCE_GRANULE;
        let n = len.div_ceil(BOUNCE_GRANULE).max(1);
        self.with(|used| used[first..first + n].fill(false));
    }
}

/// The guest's [`Hal`]: physical addresses are virtual addresses (Ember identity-maps
/// the first 4 GiB). DMA pages come from a static, page-aligned bump region that is never
/// given back. Buffers the driver shares from outside the DMA region (request headers on
/// its stack, indirect descriptor tables on the heap) are bounced through a pool at the
/// end of the region, so the device only ever sees addresses inside it.
pub struct GuestHal;

// SAFETY: dma_alloc returns zeroed, page-aligned pages that nothing else uses; with the
// identity map, the addresses given to the device are the addresses the driver uses;
// share hands out either the buffer itself (inside the DMA region) or a bounce buffer
// nobody else uses until unshare, which copies device-written data back.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let size = pages * PAGE_SIZE;
        let offset = DMA_NEXT.fetch_add(size, Ordering::Relaxed);
        assert!(
            offset + size <= DMA_PAGES_SIZE,
            "out of DMA memory: {pages} pages asked, {} KiB left",
            DMA_PAGES_SIZE.saturating_sub(offset) / 1024
        );
        let ptr = (dma_base() + offset) as *mut u8;
        // SAFETY: the range lies inside DMA and was handed out to nobody else.
        unsafe { ptr.write_bytes(0, size) };
        (
            ptr as PhysAddr,
            NonNull::new(ptr).expect("DMA region at address 0"),
        )
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO region at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let addr = buffer.as_ptr().cast::<u8>() as usize;
        let len = buffer.len();
        if in_dma_region(addr, len) {
            return addr as PhysAddr;
        }
        BOUNCED.fetch_add(1, Ordering::Relaxed);
        let bounce = BOUNCE.alloc(len);
        if direction != BufferDirection::DeviceToDriver {
            // SAFETY: `buffer` is valid for reads (the caller's contract); the bounce
            // buffer was just allocated for `len` bytes.
            unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, bounce as *mut u8, len) };
        }
        bounce as PhysAddr
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let addr = buffer.as_ptr().cast::<u8>() as usize;
        let len = buffer.len();
        if paddr as usize == addr {
            return;
        }
        if direction != BufferDirection::DriverToDevice {
            // SAFETY: `buffer` is valid for writes (the caller's contract) and `paddr` is
            // the bounce buffer share gave it.
            unsafe { core::ptr::copy_nonoverlapping(paddr as *const u8, addr as *mut u8, len) };
        }
        BOUNCE.free(paddr as usize, len);
    }
}

/// How many buffers [`GuestHal::share`] has bounced so far.
pub fn bounced() -> usize {
    BOUNCED.load(Ordering::Relaxed)
}

/// A zeroed buffer of `len` bytes in the DMA region, page-aligned, never freed.
pub fn dma_buffer(len: usize) -> &'static mut [u8] {
    let (_, vaddr) = GuestHal::dma_alloc(len.div_ceil(PAGE_SIZE).max(1), BufferDirection::Both);
    // SAFETY: dma_alloc handed these zeroed bytes to us alone, for good.
    unsafe { core::slice::from_raw_parts_mut(vaddr.as_ptr(), len) }
}

/// A `T` placed in the DMA region (its own page), never freed.
pub fn dma_box<T>(value: T) -> &'static mut T {
    assert!(core::mem::align_of::<T>() <= PAGE_SIZE);
    let (_, vaddr) = GuestHal::dma_alloc(
        core::mem::size_of::<T>().div_ceil(PAGE_SIZE).max(1),
        BufferDirection::Both,
    );
    let ptr = vaddr.as_ptr().cast::<T>();
    // SAFETY: page-aligned memory of at least size_of::<T>() bytes that only we use.
    unsafe {
        ptr.write(value);
        &mut *ptr
    }
}

/// Checks that the [`GuestHal`] hands out zeroed, page-aligned DMA memory that user
/// mode can write, and returns the address of the page it got.
pub fn check_dma() -> PhysAddr {
    let (paddr, vaddr) = GuestHal::dma_alloc(1, BufferDirection::Both);
    assert_eq!(
        paddr % PAGE_SIZE as PhysAddr,
        0,
        "DMA page not page-aligned"
    );
    assert_eq!(
        paddr,
        vaddr.as_ptr() as PhysAddr,
        "DMA page not identity-mapped"
    );
    // SAFETY: the page was just allocated for us.
    let page = unsafe { core::slice::from_raw_parts_mut(vaddr.as_ptr(), PAGE_SIZE) };
    assert!(page.iter().all(|&b| b == 0), "DMA page not zeroed");
    page.fill(0xa5);
    paddr
}

/// Polling iterations per second, an upper estimate: one iteration is a check (a memory
/// read of a used ring index) and a `pause`. Measured with `ember.test=calibrate` on the
/// nested-KVM machines (AMD EPYC): about 20 M/s with the host's 2 cores oversubscribed,
/// more when idle. `pause` costs anywhere from ~10 to ~140 cycles depending on the CPU,
/// so budgets built on this last at least their nominal time on such hosts, and longer
/// on a loaded or slower one.
pub const POLLS_PER_SECOND: u64 = 50_000_000;

/// Calls `check` until it returns `Some`, at most `budget` times with a `pause` between
/// calls; returns the value and the number of iterations it took.
pub fn poll<T>(budget: u64, mut check: impl FnMut() -> Option<T>) -> Option<(T, u64)> {
    for i in 0..budget {
        if let Some(value) = check() {
            return Some((value, i));
        }
        core::hint::spin_loop();
    }
    None
}

/// The transport of a device at `device`, or `None` (with a line saying why).
fn open(device: &VirtioMmioDevice) -> Option<MmioTransport<'static>> {
    let addr = device.addr;
    let in_identity_map = device
        .addr
        .checked_add(device.size)
        .is_some_and(|end| end <= IDENTITY_MAP_END);
    let Some(header) = NonNull::new(addr as *mut VirtIOHeader).filter(|_| in_identity_map) else {
        println!("virtio-guest: device at {addr:#x}: not inside the identity-mapped 4 GiB");
        return None;
    };
    // SAFETY: the command line says a virtio-mmio register window of `size` bytes is at
    // `addr`, which is identity-mapped, and nothing else uses it.
    match unsafe { MmioTransport::new(header, device.size as usize) } {
        Ok(transport) => Some(transport),
        Err(err) => {
            println!("virtio-guest: device at {addr:#x}: {err}");
            None
        }
    }
}

/// The transport of the first device of type `wanted` on the command line.
pub fn find(devices: &[VirtioMmioDevice], wanted: DeviceType) -> Option<MmioTransport<'static>> {
    devices.iter().find_map(|device| {
        let transport = open(device)?;
        (transport.device_type() == wanted).then(|| {
            println!(
                "virtio-guest: {wanted:?} device at {:#x} (irq {}), version {:?}",
                device.addr,
                device.irq,
                transport.version()
            );
            transport
        })
    })
}

/// Opens a virtio-mmio transport on each device and prints its type and version, or
/// why it could not. Prints nothing when there are no devices.
pub fn probe_virtio_mmio(devices: &[VirtioMmioDevice]) {
    for device in devices {
        if let Some(transport) = open(device) {
            println!(
                "virtio-guest: device at {:#x}: type {:?}, version {:?}, vendor {:#x}",
                device.addr,
                transport.device_type(),
                transport.version(),
                transport.vendor_id()
            );
        }
    }
}

//! virtio-drivers glue: the [`Hal`] for this guest (identity mapping, DMA pages from a
//! static bump region) and probing the virtio-mmio devices the command line names.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::Transport;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use crate::cmdline::VirtioMmioDevice;
use crate::println;

/// Size of the DMA region.
const DMA_SIZE: usize = 1 << 20;

#[repr(C, align(4096))]
struct DmaRegion([u8; DMA_SIZE]);

/// Memory for virtqueues and DMA buffers; only [`GuestHal::dma_alloc`] hands it out.
static mut DMA: DmaRegion = DmaRegion([0; DMA_SIZE]);
/// Offset of the first free byte in [`DMA`].
static DMA_NEXT: AtomicUsize = AtomicUsize::new(0);

/// The end of the identity map Ember sets up (4 GiB).
const IDENTITY_MAP_END: u64 = 4 << 30;

/// The guest's [`Hal`]: physical addresses are virtual addresses (Ember identity-maps
/// the first 4 GiB), and DMA pages come from a static, page-aligned bump region that is
/// never given back.
pub struct GuestHal;

// SAFETY: dma_alloc returns zeroed, page-aligned pages that nothing else uses; with the
// identity map, the addresses given to the device are the addresses the driver uses.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let size = pages * PAGE_SIZE;
        let offset = DMA_NEXT.fetch_add(size, Ordering::Relaxed);
        assert!(
            offset + size <= DMA_SIZE,
            "out of DMA memory: {pages} pages asked, {} KiB left",
            DMA_SIZE.saturating_sub(offset) / 1024
        );
        let ptr = (core::ptr::addr_of_mut!(DMA) as usize + offset) as *mut u8;
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

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
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

/// Opens a virtio-mmio transport on each device and prints its type and version, or
/// why it could not. Prints nothing when there are no devices.
pub fn probe_virtio_mmio(devices: &[VirtioMmioDevice]) {
    for device in devices {
        let addr = device.addr;
        let in_identity_map = device
            .addr
            .checked_add(device.size)
            .is_some_and(|end| end <= IDENTITY_MAP_END);
        let Some(header) = NonNull::new(addr as *mut VirtIOHeader).filter(|_| in_identity_map)
        else {
            println!("virtio-guest: device at {addr:#x}: not inside the identity-mapped 4 GiB");
            continue;
        };
        // SAFETY: the command line says a virtio-mmio register window of `size` bytes is
        // at `addr`, which is identity-mapped, and nothing else uses it.
        match unsafe { MmioTransport::new(header, device.size as usize) } {
            Ok(transport) => println!(
                "virtio-guest: device at {addr:#x}: type {:?}, version {:?}, vendor {:#x}",
                transport.device_type(),
                transport.version(),
                transport.vendor_id()
            ),
            Err(err) => println!("virtio-guest: device at {addr:#x}: {err}"),
        }
    }
}

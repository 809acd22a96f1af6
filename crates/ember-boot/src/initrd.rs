//! Placing an initial ramdisk in guest memory.
//!
//! The initrd goes as high as it can: the kernel decompresses and allocates upwards
//! from its own end, so the top of RAM is what it uses last. It must stay at or below
//! `initrd_addr_max`, which for a 64-bit ELF boot (no setup header to ask) is the
//! boot protocol's default ([`load_initrd`]); a bzImage says what it accepts
//! ([`BzImage::initrd_addr_max`](crate::loader::bzimage::BzImage::initrd_addr_max), for
//! [`load_initrd_below`]). For a PVH boot, [`copy_initrd`] places and writes
//! it without a zero page.

use ember_arch::layout::{PAGE_SIZE, ZERO_PAGE_SIZE};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
};

use crate::guest::{write_bytes, GuestWriteError};
use crate::zero_page::BootParams;

/// Why an initrd could not be placed or loaded.
#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    /// The initrd has no bytes.
    #[error("the initrd is empty")]
    Empty,
    /// No page-aligned place in guest RAM between the kernel's end and the highest
    /// address the kernel accepts holds the initrd.
    #[error(
        "initrd of {size:#x} bytes does not fit in guest RAM between {lowest:#x} and {max:#x}; give the guest more memory"
    )]
    DoesNotFit {
        /// Size of the initrd.
        size: u64,
        /// Lowest allowed address (end of the kernel).
        lowest: u64,
        /// Highest address the initrd may reach (inclusive).
        max: u64,
    },
    /// The guest memory offers no view of its physical regions to place the initrd
    /// in.
    #[error("guest memory has no physical region map to place the initrd in")]
    NoPhysicalMemory,
    /// The zero page could not be read back to record the initrd.
    #[error("cannot read the zero page at {addr:#x}: {source}")]
    ZeroPageRead {
        /// Its address.
        addr: u64,
        /// The guest memory error.
        #[source]
        source: GuestMemoryError,
    },
    /// The initrd or the zero page could not be written.
    #[error(transparent)]
    Memory(#[from] GuestWriteError),
}

/// The highest address (inclusive) an initrd may occupy when the kernel does not say
/// otherwise (boot protocol before 2.03, and the ELF entry).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Finds the highest page-aligned address where `size` bytes fit inside one RAM
/// region, at or above `lowest`, ending at or below `addr_max` (inclusive).
///
/// ```
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
/// let at = ember_boot::initrd::place_initrd(&mem, 0x1800, 0x20_0000, u64::MAX).unwrap();
/// assert_eq!(at, GuestAddress((64 << 20) - 0x2000));
/// ```
pub fn place_initrd<M: GuestMemory>(
    mem: &M,
    size: u64,
    lowest: u64,
    addr_max: u64,
) -> Result<GuestAddress, InitrdError> {
    if size == 0 {
        return Err(InitrdError::Empty);
    }
    let no_fit = InitrdError::DoesNotFit {
        size,
        lowest,
        max: addr_max,
    };
    let phys = mem.physical_memory().ok_or(InitrdError::NoPhysicalMemory)?;
    let limit = addr_max.saturating_add(1); // exclusive
    phys.iter()
        .filter_map(|region| {
            let start = region.start_addr().0.max(lowest);
            let end = region.start_addr().0.checked_add(region.len())?.min(limit);
            let top = end.checked_sub(size)? & !(PAGE_SIZE - 1);
            (top >= start).then_some(top)
        })
        .max()
        .map(GuestAddress)
        .ok_or(no_fit)
}

/// Copies `image` into guest memory above `kernel_end` (see [`place_initrd`]),
/// at or below [`DEFAULT_INITRD_ADDR_MAX`], and records its address and size in
/// the zero page at `zero_page`.
///
/// This is [`load_initrd_below`] with the boot protocol's default limit, for
/// kernels (such as an ELF `vmlinux`) with no setup header to ask.
///
/// ```
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
/// let cmdline = ember_boot::cmdline::Cmdline::default();
/// let zero_page = ember_boot::configurator::linux::configure_linux_boot(&mem, &cmdline, None).unwrap();
/// let at = ember_boot::initrd::load_initrd(&mem, zero_page, b"070701...", GuestAddress(0x20_0000)).unwrap();
/// assert_eq!(at.0 % 4096, 0);
/// ```
pub fn load_initrd<M: GuestMemory>(
    mem: &M,
    zero_page: GuestAddress,
    image: &[u8],
    kernel_end: GuestAddress,
) -> Result<GuestAddress, InitrdError> {
    load_initrd_below(mem, zero_page, image, kernel_end, DEFAULT_INITRD_ADDR_MAX)
}

/// Copies `image` into guest memory above `kernel_end`, with its last byte at
/// or below `addr_max` (see [`place_initrd`]), and records its address and
/// size in the zero page at `zero_page`.
///
/// For a bzImage pass
/// [`BzImage::initrd_addr_max`](crate::loader::bzimage::BzImage::initrd_addr_max). The zero
/// page is read before anything is written.
///
/// # Errors
///
/// [`InitrdError::Empty`], [`InitrdError::DoesNotFit`] (also for an
/// initrd of 4 GiB or more: `ramdisk_size` is 32 bits),
/// [`InitrdError::NoPhysicalMemory`], [`InitrdError::ZeroPageRead`], or
/// [`InitrdError::Memory`].
///
/// ```
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
/// let cmdline = ember_boot::cmdline::Cmdline::default();
/// let zero_page = ember_boot::configurator::linux::configure_linux_boot(&mem, &cmdline, None).unwrap();
/// let at = ember_boot::initrd::load_initrd_below(
///     &mem, zero_page, &[7; 4096], GuestAddress(0x20_0000), 0xff_ffff,
/// ).unwrap();
/// assert_eq!(at, GuestAddress(0xff_f000));
/// ```
pub fn load_initrd_below<M: GuestMemory>(
    mem: &M,
    zero_page: GuestAddress,
    image: &[u8],
    kernel_end: GuestAddress,
    addr_max: u64,
) -> Result<GuestAddress, InitrdError> {
    let size = image.len() as u64;
    // The zero page's ramdisk_size field is 32 bits.
    let max_size = u64::from(u32::MAX);
    if size > max_size {
        return Err(InitrdError::DoesNotFit {
            size,
            lowest: kernel_end.0,
            max: max_size,
        });
    }
    let addr = place_initrd(mem, size, kernel_end.0, addr_max)?;
    let mut page = [0u8; ZERO_PAGE_SIZE];
    mem.read_slice(&mut page, zero_page)
        .map_err(|source| InitrdError::ZeroPageRead {
            addr: zero_page.0,
            source,
        })?;
    let mut params = BootParams::from_bytes(page);
    params.set_ramdisk(addr, size as u32);
    write_bytes(mem, "initrd", image, addr.0)?;
    params.write_to(mem, zero_page)?;
    Ok(addr)
}

/// Copies `image` into guest memory above `kernel_end`, with its last byte at
/// or below `addr_max` (see [`place_initrd`]), and returns its address. No
/// zero page is touched: for a PVH boot, pass the address and size to
/// [`configure_pvh_boot`](crate::configurator::pvh::configure_pvh_boot).
///
/// # Errors
///
/// [`InitrdError::Empty`], [`InitrdError::DoesNotFit`],
/// [`InitrdError::NoPhysicalMemory`], or [`InitrdError::Memory`].
///
/// ```
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
/// let at = ember_boot::initrd::copy_initrd(&mem, &[7; 100], GuestAddress(0x20_0000), u64::MAX)?;
/// assert_eq!(at, GuestAddress((64 << 20) - 0x1000));
/// # Ok::<(), ember_boot::initrd::InitrdError>(())
/// ```
pub fn copy_initrd<M: GuestMemory>(
    mem: &M,
    image: &[u8],
    kernel_end: GuestAddress,
    addr_max: u64,
) -> Result<GuestAddress, InitrdError> {
    let addr = place_initrd(mem, image.len() as u64, kernel_end.0, addr_max)?;
    write_bytes(mem, "initrd", image, addr.0)?;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::Cmdline;
    use crate::configurator::linux::configure_linux_boot;
    use vm_memory::GuestMemoryMmap;

    fn mem(ranges: &[(u64, u64)]) -> GuestMemoryMmap {
        let ranges: Vec<_> = ranges
            .iter()
            .map(|&(a, l)| (GuestAddress(a), l as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn goes_to_the_top_of_ram_page_aligned() {
        let m = mem(&[(0, 64 << 20)]);
        assert_eq!(
            place_initrd(&m, 1, 0, u64::MAX).unwrap().0,
            (64 << 20) - 0x1000
        );
        assert_eq!(
            place_initrd(&m, 0x1000, 0, u64::MAX).unwrap().0,
            (64 << 20) - 0x1000
        );
        assert_eq!(
            place_initrd(&m, 0x1001, 0, u64::MAX).unwrap().0,
            (64 << 20) - 0x2000
        );
    }

    #[test]
    fn respects_addr_max_and_regions() {
        // RAM below and above the 32-bit hole; addr_max keeps it low.
        let m = mem(&[(0, 0x4000_0000), (0x1_0000_0000, 0x4000_0000)]);
        let at = place_initrd(&m, 0x10_0000, 0x20_0000, DEFAULT_INITRD_ADDR_MAX).unwrap();
        assert_eq!(at.0 + 0x10_0000 - 1, DEFAULT_INITRD_ADDR_MAX);
        let high = place_initrd(&m, 0x10_0000, 0x20_0000, u64::MAX).unwrap();
        assert_eq!(high.0, 0x1_4000_0000 - 0x10_0000);
    }

    #[test]
    fn errors() {
        let m = mem(&[(0, 16 << 20)]);
        assert!(matches!(
            place_initrd(&m, 0, 0, u64::MAX),
            Err(InitrdError::Empty)
        ));
        assert!(matches!(
            place_initrd(&m, 15 << 20, 2 << 20, u64::MAX),
            Err(InitrdError::DoesNotFit { size, lowest: 0x20_0000, .. }) if size == 15 << 20
        ));
        // Exactly fits between the kernel end and the top.
        assert_eq!(
            place_initrd(&m, 14 << 20, 2 << 20, u64::MAX).unwrap().0,
            2 << 20
        );
        assert!(place_initrd(&m, u64::MAX, 0, u64::MAX).is_err());
    }

    #[test]
    fn load_writes_image_and_zero_page() {
        let m = mem(&[(0, 64 << 20)]);
        let zp = configure_linux_boot(&m, &Cmdline::default(), None).unwrap();
        let image: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let at = load_initrd(&m, zp, &image, GuestAddress(0x40_0000)).unwrap();
        let mut back = vec![0u8; image.len()];
        m.read_slice(&mut back, at).unwrap();
        assert_eq!(back, image);
        let mut page = [0u8; ZERO_PAGE_SIZE];
        m.read_slice(&mut page, zp).unwrap();
        let params = BootParams::from_bytes(page);
        assert_eq!(
            (params.ramdisk_image(), params.ramdisk_size()),
            (at.0, 5000)
        );
    }

    #[test]
    fn load_below_respects_addr_max() {
        let m = mem(&[(0, 64 << 20)]);
        let zp = configure_linux_boot(&m, &Cmdline::default(), None).unwrap();
        let at =
            load_initrd_below(&m, zp, &[1; 0x2000], GuestAddress(0x40_0000), 0xff_ffff).unwrap();
        assert_eq!(at, GuestAddress(0xff_e000));
        // u64::MAX (a bzImage with XLF_CAN_BE_LOADED_ABOVE_4G): the top of RAM.
        let at =
            load_initrd_below(&m, zp, &[1; 0x2000], GuestAddress(0x40_0000), u64::MAX).unwrap();
        assert_eq!(at, GuestAddress((64 << 20) - 0x2000));
        let mut page = [0u8; ZERO_PAGE_SIZE];
        m.read_slice(&mut page, zp).unwrap();
        assert_eq!(BootParams::from_bytes(page).ramdisk_image(), at.0);
        // Below the kernel's end: does not fit.
        assert!(matches!(
            load_initrd_below(&m, zp, &[1; 0x2000], GuestAddress(0x40_0000), 0x40_0fff),
            Err(InitrdError::DoesNotFit { .. })
        ));
    }

    #[test]
    fn copy_writes_without_zero_page() {
        let m = mem(&[(0, 16 << 20)]);
        let image: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let at = copy_initrd(&m, &image, GuestAddress(0x20_0000), u64::MAX).unwrap();
        assert_eq!(at, GuestAddress((16 << 20) - 0x1000));
        let mut back = vec![0u8; image.len()];
        m.read_slice(&mut back, at).unwrap();
        assert_eq!(back, image);
        assert!(matches!(
            copy_initrd(&m, &[], GuestAddress(0x20_0000), u64::MAX),
            Err(InitrdError::Empty)
        ));
    }
}

//! Loading a compressed Linux kernel (`bzImage`) and entering it at its
//! 64-bit entry point.
//!
//! A bzImage is the real-mode boot sector and setup code (`setup_sects`
//! 512-byte sectors after the boot sector) followed by the protected-mode
//! kernel: a small decompressor with the compressed kernel as its payload.
//! The setup header at offset `0x1f1` describes it
//! (`Documentation/arch/x86/boot.rst`). Following the 64-bit boot protocol,
//! this loader copies the protected-mode kernel to 1 MiB, copies the setup
//! header into a fresh zero page, and the VMM enters the kernel at load
//! address + `0x200` in 64-bit mode with `rsi` pointing at the zero page. The
//! real-mode setup code is never run.
//!
//! Only kernels that support this are accepted: boot protocol 2.12 or newer
//! (for `xloadflags`), `LOADED_HIGH` and `XLF_KERNEL_64`. The zero page for
//! the entry is built by the
//! [Linux configurator](crate::configurator::linux::configure_bzimage_boot).

use ember_arch::layout::HIMEM_START;
use vm_memory::{GuestAddress, GuestMemory};

use crate::guest::{range_in_memory, write_bytes, GuestWriteError};
use crate::le;
use crate::zero_page::{
    BOOT_FLAG, BOOT_FLAG_MAGIC, CMDLINE_SIZE, EDD_MBR_SIG_BUFFER, HEADER, HEADER_MAGIC,
    INITRD_ADDR_MAX, INIT_SIZE, JUMP, KERNEL_ALIGNMENT, LOADED_HIGH, LOADFLAGS, PREF_ADDRESS,
    RELOCATABLE_KERNEL, SETUP_HEADER, SETUP_SECTS, VERSION, XLF_CAN_BE_LOADED_ABOVE_4G,
    XLF_KERNEL_64, XLOADFLAGS,
};

/// Why a bzImage was rejected or could not be loaded.
///
/// Every malformed field has its own variant naming the offending value. A
/// rejected image leaves guest memory untouched.
#[derive(Debug, thiserror::Error)]
pub enum BzImageError {
    /// The bzImage is too short for what its header says it holds.
    #[error("bzImage is {len} bytes, too short: it needs at least {needed}")]
    Truncated {
        /// Length of the image in bytes.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// `boot_flag` (offset `0x1fe`) is not `0xaa55`.
    #[error("bzImage boot_flag is {flag:#06x} (expected 0xaa55)")]
    BadBootFlag {
        /// The `boot_flag` field.
        flag: u16,
    },
    /// `header` (offset `0x202`) is not `"HdrS"`.
    #[error("bzImage setup header magic is {magic:02x?} (expected \"HdrS\")")]
    BadHeaderMagic {
        /// The four bytes at `0x202`.
        magic: [u8; 4],
    },
    /// The boot protocol version is too old.
    #[error(
        "bzImage boot protocol version {}.{} ({version:#06x}) is older than the \
         minimum {}.{} ({min:#06x}), which the 64-bit entry needs",
        .version >> 8, .version & 0xff, .min >> 8, .min & 0xff
    )]
    UnsupportedVersion {
        /// The `version` field.
        version: u16,
        /// The lowest supported version, [`MIN_BOOT_PROTOCOL`].
        min: u16,
    },
    /// The setup header (ending at `0x202` + the byte at `0x201`) ends
    /// before the last field the loader reads.
    #[error("bzImage setup header ends at {end:#x}, before {min:#x} (the end of init_size)")]
    SetupHeaderTooShort {
        /// Exclusive end of the setup header.
        end: usize,
        /// The smallest end accepted.
        min: usize,
    },
    /// The setup header runs past the room `struct boot_params` has for it.
    #[error("bzImage setup header ends at {end:#x}, past the zero page's limit {max:#x}")]
    SetupHeaderTooLong {
        /// Exclusive end of the setup header.
        end: usize,
        /// The largest end accepted.
        max: usize,
    },
    /// `loadflags` lacks `LOADED_HIGH`: the kernel wants to be loaded at
    /// `0x10000`, which this loader does not do.
    #[error("bzImage loadflags {loadflags:#04x} lack LOADED_HIGH (bit 0)")]
    NotLoadedHigh {
        /// The `loadflags` field.
        loadflags: u8,
    },
    /// `xloadflags` lacks `XLF_KERNEL_64`: there is no 64-bit entry point.
    #[error("bzImage xloadflags {xloadflags:#06x} lack XLF_KERNEL_64 (bit 0): no 64-bit entry")]
    No64BitEntry {
        /// The `xloadflags` field.
        xloadflags: u16,
    },
    /// The protected-mode kernel, after `setup_sects` sectors of setup code,
    /// starts at or past the end of the image.
    #[error(
        "bzImage protected-mode kernel at offset {offset:#x} (setup_sects {setup_sects}) \
         is not inside the {image_len}-byte image"
    )]
    KernelOutOfImage {
        /// The effective `setup_sects` (0 read as 4).
        setup_sects: u8,
        /// Offset of the protected-mode kernel, `(setup_sects + 1) * 512`.
        offset: usize,
        /// Length of the image in bytes.
        image_len: usize,
    },
    /// The protected-mode kernel is too short to hold its 64-bit entry
    /// point at offset `0x200`.
    #[error("bzImage protected-mode kernel is {len} bytes; its 64-bit entry at 0x200 needs {min}")]
    KernelTooSmall {
        /// Length of the protected-mode kernel.
        len: usize,
        /// The smallest length accepted.
        min: usize,
    },
    /// The image handed to the loader is not the one that was parsed.
    #[error("bzImage of {len} bytes is not the parsed image of {expected} bytes")]
    ImageMismatch {
        /// Length of the parsed image.
        expected: usize,
        /// Length of the image given.
        len: usize,
    },
    /// The kernel, or the memory it needs while it decompresses
    /// (`init_size`), does not fit in guest memory.
    #[error("bzImage kernel at {addr:#x} needs {size:#x} bytes, which do not fit in guest memory")]
    KernelOutsideMemory {
        /// Guest physical start address.
        addr: u64,
        /// Bytes needed.
        size: u64,
    },
    /// A relocatable kernel's `kernel_alignment` is not a power of two.
    #[error("bzImage kernel_alignment {alignment:#x} is not a power of two")]
    BadKernelAlignment {
        /// The `kernel_alignment` field.
        alignment: u32,
    },
    /// The kernel would decompress itself below 1 MiB.
    #[error("bzImage runtime start {runtime_start:#x} lies below {himem:#x}")]
    RuntimeBelowHimem {
        /// The kernel's runtime start address (boot.rst's algorithm).
        runtime_start: u64,
        /// [`HIMEM_START`].
        himem: u64,
    },
    /// Guest memory rejected a write of the validated kernel.
    #[error(transparent)]
    Memory(#[from] GuestWriteError),
}

/// Oldest supported boot protocol version, 2.12: the first with
/// `xloadflags`, which announces the 64-bit entry point.
pub const MIN_BOOT_PROTOCOL: u16 = 0x020c;

/// Offset of the 64-bit entry point from the start of the protected-mode
/// kernel.
pub const ENTRY_64_OFFSET: u64 = 0x200;

/// Size of a setup sector.
const SECTOR_SIZE: usize = 512;

/// `setup_sects` value used when the field reads 0.
const DEFAULT_SETUP_SECTS: u8 = 4;

/// The setup header must reach at least the end of `init_size`, the last
/// field this loader reads (all protocol 2.10+ headers do).
const MIN_HEADER_END: usize = INIT_SIZE + 4;

/// Room for the setup header in `struct boot_params`: `[0x1f1, 0x290)`.
const MAX_HEADER_LEN: usize = EDD_MBR_SIG_BUFFER - SETUP_HEADER;

/// A validated bzImage header.
///
/// Built by [`parse_bzimage`]; holds a copy of the setup header (bounded by
/// the zero page's room for it), not the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BzImage {
    image_len: usize,
    setup_sects: u8,
    version: u16,
    loadflags: u8,
    xloadflags: u16,
    init_size: u32,
    initrd_addr_max: u32,
    cmdline_size: u32,
    kernel_alignment: u32,
    relocatable: bool,
    pref_address: u64,
    header: [u8; MAX_HEADER_LEN],
    header_len: usize,
}

impl BzImage {
    /// The boot protocol version (`0x020f` is 2.15).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The number of setup sectors (a `setup_sects` of 0 reads as 4).
    pub fn setup_sects(&self) -> u8 {
        self.setup_sects
    }

    /// Offset of the protected-mode kernel in the image,
    /// `(setup_sects + 1) * 512`.
    pub fn kernel_offset(&self) -> usize {
        (usize::from(self.setup_sects) + 1) * SECTOR_SIZE
    }

    /// Length of the protected-mode kernel: the rest of the image.
    pub fn kernel_len(&self) -> usize {
        self.image_len.saturating_sub(self.kernel_offset())
    }

    /// `loadflags`.
    pub fn loadflags(&self) -> u8 {
        self.loadflags
    }

    /// `xloadflags`.
    pub fn xloadflags(&self) -> u16 {
        self.xloadflags
    }

    /// `init_size`: bytes the kernel needs from its runtime start address
    /// while it decompresses and sets itself up.
    pub fn init_size(&self) -> u32 {
        self.init_size
    }

    /// The highest address (inclusive) the initrd may occupy: `u64::MAX`
    /// when the kernel sets `XLF_CAN_BE_LOADED_ABOVE_4G`, otherwise the
    /// header's `initrd_addr_max`. Pass it to
    /// [`load_initrd_below`](crate::initrd::load_initrd_below).
    pub fn initrd_addr_max(&self) -> u64 {
        if self.can_be_loaded_above_4g() {
            u64::MAX
        } else {
            u64::from(self.initrd_addr_max)
        }
    }

    /// Whether `xloadflags` has `XLF_CAN_BE_LOADED_ABOVE_4G`.
    pub fn can_be_loaded_above_4g(&self) -> bool {
        self.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G != 0
    }

    /// `cmdline_size`: the longest command line the kernel takes, without
    /// its NUL.
    pub fn cmdline_size(&self) -> u32 {
        self.cmdline_size
    }

    /// `kernel_alignment`.
    pub fn kernel_alignment(&self) -> u32 {
        self.kernel_alignment
    }

    /// Whether `relocatable_kernel` is set.
    pub fn relocatable(&self) -> bool {
        self.relocatable
    }

    /// `pref_address`: where a relocatable kernel prefers to run.
    pub fn pref_address(&self) -> u64 {
        self.pref_address
    }

    /// The setup header as it is in the image: bytes `0x1f1` up to
    /// `0x202` + the byte at `0x201`.
    pub fn setup_header(&self) -> &[u8] {
        self.header.get(..self.header_len).unwrap_or(&self.header)
    }

    /// The address the kernel will run (decompress itself) at when loaded
    /// at `load`, by boot.rst's algorithm: a relocatable kernel runs at
    /// `max(load, pref_address)` rounded up to `kernel_alignment`, any other
    /// at `pref_address`. `None` if rounding up overflows.
    fn runtime_start(&self, load: u64) -> Option<u64> {
        if self.relocatable {
            // `parse_bzimage` checked the alignment is a power of two.
            load.max(self.pref_address)
                .checked_next_multiple_of(u64::from(self.kernel_alignment))
        } else {
            Some(self.pref_address)
        }
    }
}

fn get_u8(image: &[u8], off: usize) -> u8 {
    u8::from_le_bytes(le::get(image, off))
}

fn get_u16(image: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(le::get(image, off))
}

fn get_u32(image: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(le::get(image, off))
}

/// Parses and validates the header of a bzImage.
///
/// Checks, in order: the image holds a setup header up to `init_size`;
/// `boot_flag` is `0xaa55`; `header` is `"HdrS"`; the protocol version is at
/// least [`MIN_BOOT_PROTOCOL`]; the setup header (ending at `0x202` + the
/// byte at `0x201`) covers `init_size`, fits the zero page (ends by `0x290`)
/// and lies in the image; `loadflags` has `LOADED_HIGH`; `xloadflags` has
/// `XLF_KERNEL_64`; a relocatable kernel's `kernel_alignment` is a power of
/// two; and the protected-mode kernel, after the setup sectors, lies in the
/// image and is long enough to hold its 64-bit entry point at `0x200`.
///
/// Any byte sequence yields a header or an error, never a panic.
///
/// # Errors
///
/// A variant of [`BzImageError`] naming the bad field.
///
/// # Example
///
/// ```
/// use ember_boot::loader::bzimage::{parse_bzimage, BzImageError};
///
/// // An ELF vmlinux is not a bzImage.
/// let mut image = vec![0u8; 0x1000];
/// image[..4].copy_from_slice(b"\x7fELF");
/// assert!(matches!(parse_bzimage(&image), Err(BzImageError::BadBootFlag { flag: 0 })));
/// ```
pub fn parse_bzimage(image: &[u8]) -> Result<BzImage, BzImageError> {
    let len = image.len();
    if len < MIN_HEADER_END {
        return Err(BzImageError::Truncated {
            len,
            needed: MIN_HEADER_END,
        });
    }
    let flag = get_u16(image, BOOT_FLAG);
    if flag != BOOT_FLAG_MAGIC {
        return Err(BzImageError::BadBootFlag { flag });
    }
    let magic: [u8; 4] = le::get(image, HEADER);
    if u32::from_le_bytes(magic) != HEADER_MAGIC {
        return Err(BzImageError::BadHeaderMagic { magic });
    }
    let version = get_u16(image, VERSION);
    if version < MIN_BOOT_PROTOCOL {
        return Err(BzImageError::UnsupportedVersion {
            version,
            min: MIN_BOOT_PROTOCOL,
        });
    }

    // The header ends at 0x202 plus the jump offset at 0x201 (at most 0x301).
    let end = HEADER + usize::from(get_u8(image, JUMP + 1));
    if end < MIN_HEADER_END {
        return Err(BzImageError::SetupHeaderTooShort {
            end,
            min: MIN_HEADER_END,
        });
    }
    if end > EDD_MBR_SIG_BUFFER {
        return Err(BzImageError::SetupHeaderTooLong {
            end,
            max: EDD_MBR_SIG_BUFFER,
        });
    }
    let source = image
        .get(SETUP_HEADER..end)
        .ok_or(BzImageError::Truncated { len, needed: end })?;
    let mut header = [0u8; MAX_HEADER_LEN];
    le::put(&mut header, 0, source);

    let loadflags = get_u8(image, LOADFLAGS);
    if loadflags & LOADED_HIGH == 0 {
        return Err(BzImageError::NotLoadedHigh { loadflags });
    }
    let xloadflags = get_u16(image, XLOADFLAGS);
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BzImageError::No64BitEntry { xloadflags });
    }
    let relocatable = get_u8(image, RELOCATABLE_KERNEL) != 0;
    let kernel_alignment = get_u32(image, KERNEL_ALIGNMENT);
    if relocatable && !kernel_alignment.is_power_of_two() {
        return Err(BzImageError::BadKernelAlignment {
            alignment: kernel_alignment,
        });
    }

    let setup_sects = match get_u8(image, SETUP_SECTS) {
        0 => DEFAULT_SETUP_SECTS,
        n => n,
    };
    // At most 256 * 512: no overflow.
    let offset = (usize::from(setup_sects) + 1) * SECTOR_SIZE;
    if offset >= len {
        return Err(BzImageError::KernelOutOfImage {
            setup_sects,
            offset,
            image_len: len,
        });
    }
    let kernel_len = len - offset;
    let min_kernel_len = ENTRY_64_OFFSET as usize + 1;
    if kernel_len < min_kernel_len {
        return Err(BzImageError::KernelTooSmall {
            len: kernel_len,
            min: min_kernel_len,
        });
    }

    Ok(BzImage {
        image_len: len,
        setup_sects,
        version,
        loadflags,
        xloadflags,
        init_size: get_u32(image, INIT_SIZE),
        initrd_addr_max: get_u32(image, INITRD_ADDR_MAX),
        cmdline_size: get_u32(image, CMDLINE_SIZE),
        kernel_alignment,
        relocatable,
        pref_address: u64::from_le_bytes(le::get(image, PREF_ADDRESS)),
        header,
        header_len: end - SETUP_HEADER,
    })
}

/// Where a bzImage was loaded and where to enter it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BzImageLoad {
    /// The 64-bit entry point: load address + `0x200`.
    pub entry: GuestAddress,
    /// The load address of the protected-mode kernel ([`HIMEM_START`]).
    pub start: GuestAddress,
    /// One past the highest address the kernel uses before it reads the
    /// memory map: the end of the loaded bytes, of `init_size` from the load
    /// address, and of `init_size` from the runtime start, whichever is
    /// highest. Place an initrd above it.
    pub end: GuestAddress,
    /// Where the kernel decompresses itself and runs (see
    /// [`load_bzimage`]); `[runtime_start, runtime_start + init_size)` is in
    /// guest memory.
    pub runtime_start: GuestAddress,
}

/// Copies the protected-mode kernel of `image` (parsed as `bz`) to
/// [`HIMEM_START`] and returns its 64-bit entry point.
///
/// The load address is always 1 MiB. For a non-relocatable kernel that is
/// what `LOADED_HIGH` demands. A relocatable kernel *may* be loaded at any
/// `kernel_alignment`-aligned address but need not be: 1 MiB is always
/// allowed, and the decompressor's 64-bit entry moves itself to its runtime
/// start (`max(load, pref_address)` rounded up to `kernel_alignment`, by
/// boot.rst's algorithm) before decompressing there, so loading low keeps the
/// layout fixed and leaves the rest of RAM free without losing alignment.
///
/// Checks before writing that `[load, load + max(kernel_len, init_size))`
/// and `[runtime_start, runtime_start + init_size)` lie in guest memory, and
/// that the runtime start is not below 1 MiB.
///
/// # Errors
///
/// [`BzImageError::ImageMismatch`] if `image` is not the image `bz` was parsed
/// from (by length), [`BzImageError::KernelOutsideMemory`],
/// [`BzImageError::RuntimeBelowHimem`], or [`BzImageError::Memory`].
///
/// # Example
///
/// ```
/// use ember_boot::loader::bzimage::{load_bzimage, parse_bzimage};
/// use ember_boot::vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// # fn tiny_bzimage() -> Vec<u8> {
/// #     let mut img = vec![0u8; 5 * 512];
/// #     img[0x1f1] = 4; // setup_sects
/// #     img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
/// #     img[0x200..0x202].copy_from_slice(&[0xeb, 0x6a]); // header ends at 0x26c
/// #     img[0x202..0x206].copy_from_slice(b"HdrS");
/// #     img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
/// #     img[0x211] = 1; // LOADED_HIGH
/// #     img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
/// #     img[0x234] = 1; // relocatable
/// #     img[0x236..0x238].copy_from_slice(&3u16.to_le_bytes()); // XLF_KERNEL_64 | above 4G
/// #     img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
/// #     img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
/// #     img[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes());
/// #     img.extend_from_slice(&[0x90; 0x400]);
/// #     img
/// # }
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
/// let image = tiny_bzimage();
/// let bz = parse_bzimage(&image)?;
/// let load = load_bzimage(&mem, &bz, &image)?;
/// assert_eq!(load.entry, GuestAddress(0x10_0200));
/// assert_eq!(load.runtime_start, GuestAddress(0x100_0000));
/// assert_eq!(load.end, GuestAddress(0x140_0000));
/// # Ok::<(), ember_boot::loader::bzimage::BzImageError>(())
/// ```
pub fn load_bzimage<M: GuestMemory>(
    mem: &M,
    bz: &BzImage,
    image: &[u8],
) -> Result<BzImageLoad, BzImageError> {
    let mismatch = BzImageError::ImageMismatch {
        expected: bz.image_len,
        len: image.len(),
    };
    if image.len() != bz.image_len {
        return Err(mismatch);
    }
    let kernel = image.get(bz.kernel_offset()..).ok_or(mismatch)?;

    let load = HIMEM_START;
    let init_size = u64::from(bz.init_size);
    let footprint = (kernel.len() as u64).max(init_size);
    if !range_in_memory(mem, load, footprint) {
        return Err(BzImageError::KernelOutsideMemory {
            addr: load,
            size: footprint,
        });
    }
    let runtime_start = bz
        .runtime_start(load)
        .ok_or(BzImageError::KernelOutsideMemory {
            addr: bz.pref_address,
            size: init_size,
        })?;
    if runtime_start < HIMEM_START {
        return Err(BzImageError::RuntimeBelowHimem {
            runtime_start,
            himem: HIMEM_START,
        });
    }
    // At least one byte, so that a zero init_size cannot put the runtime
    // start outside memory (or near 2^64).
    if !range_in_memory(mem, runtime_start, init_size.max(1)) {
        return Err(BzImageError::KernelOutsideMemory {
            addr: runtime_start,
            size: init_size,
        });
    }
    // Both ranges were checked to lie in memory, so neither sum overflows.
    let end = (load + footprint).max(runtime_start + init_size);

    log::debug!(
        "loading bzImage protected-mode kernel at {load:#x}: {:#x} bytes, \
         runtime start {runtime_start:#x}, init_size {init_size:#x}",
        kernel.len()
    );
    write_bytes(mem, "bzImage kernel", kernel, load)?;

    Ok(BzImageLoad {
        entry: GuestAddress(load + ENTRY_64_OFFSET),
        start: GuestAddress(load),
        end: GuestAddress(end),
        runtime_start: GuestAddress(runtime_start),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{bz_kernel_byte, filled_mem, read, BzSpec};
    use vm_memory::GuestMemoryMmap;

    const MEM_SIZE: usize = 32 << 20;
    const FILL: u8 = 0xa5;

    fn parse_err(image: &[u8]) -> BzImageError {
        let err = parse_bzimage(image).unwrap_err();
        assert!(!err.to_string().is_empty());
        err
    }

    /// Asserts that parsing and loading `spec` fails at load time and that
    /// guest memory is untouched.
    fn load_err(spec: &BzSpec, mem_size: usize) -> BzImageError {
        let mem = filled_mem(mem_size, FILL);
        let image = spec.build();
        let bz = parse_bzimage(&image).unwrap();
        let err = load_bzimage(&mem, &bz, &image).unwrap_err();
        assert!(!err.to_string().is_empty());
        for addr in (0..mem_size as u64).step_by(0x1_0000) {
            assert!(read(&mem, addr, 0x1_0000).iter().all(|&b| b == FILL));
        }
        err
    }

    #[test]
    fn parses_header_fields() {
        let spec = BzSpec::default();
        let bz = parse_bzimage(&spec.build()).unwrap();
        assert_eq!(bz.version(), 0x020f);
        assert_eq!(bz.setup_sects(), 4);
        assert_eq!(bz.kernel_offset(), 5 * 512);
        assert_eq!(bz.kernel_len(), 0x400);
        assert_eq!(bz.init_size(), 0x40_0000);
        assert_eq!(bz.cmdline_size(), 2047);
        assert_eq!(bz.kernel_alignment(), 0x20_0000);
        assert!(bz.relocatable());
        assert_eq!(bz.pref_address(), 0x100_0000);
        assert_eq!((bz.loadflags(), bz.xloadflags()), (1, 3));
        assert_eq!(bz.setup_header().len(), 0x26c - 0x1f1);
        assert_eq!(&bz.setup_header()[0x202 - 0x1f1..][..4], b"HdrS");
    }

    #[test]
    fn setup_sects_zero_means_four() {
        let spec = BzSpec {
            setup_sects: 0,
            ..BzSpec::default()
        };
        let bz = parse_bzimage(&spec.build()).unwrap();
        assert_eq!(bz.setup_sects(), 4);
        assert_eq!(bz.kernel_offset(), 5 * 512);
        let spec = BzSpec {
            setup_sects: 1,
            ..BzSpec::default()
        };
        assert_eq!(parse_bzimage(&spec.build()).unwrap().kernel_offset(), 1024);
    }

    #[test]
    fn initrd_addr_max_follows_xloadflags() {
        let bz = parse_bzimage(&BzSpec::default().build()).unwrap();
        assert!(bz.can_be_loaded_above_4g());
        assert_eq!(bz.initrd_addr_max(), u64::MAX);
        let spec = BzSpec {
            xloadflags: 1,
            ..BzSpec::default()
        };
        let bz = parse_bzimage(&spec.build()).unwrap();
        assert!(!bz.can_be_loaded_above_4g());
        assert_eq!(bz.initrd_addr_max(), 0x7fff_ffff);
    }

    #[test]
    fn loads_at_1_mib_with_entry_at_0x200() {
        let mem = filled_mem(MEM_SIZE, FILL);
        let image = BzSpec::default().build();
        let bz = parse_bzimage(&image).unwrap();
        let load = load_bzimage(&mem, &bz, &image).unwrap();
        assert_eq!(
            load,
            BzImageLoad {
                entry: GuestAddress(0x10_0200),
                start: GuestAddress(0x10_0000),
                // runtime start 16 MiB (pref_address, 2 MiB aligned) + 4 MiB
                end: GuestAddress(0x140_0000),
                runtime_start: GuestAddress(0x100_0000),
            }
        );
        let expected: Vec<u8> = (0..0x400).map(bz_kernel_byte).collect();
        assert_eq!(read(&mem, HIMEM_START, 0x400), expected);
        assert_eq!(read(&mem, HIMEM_START + 0x400, 1), [FILL]);
        assert_eq!(read(&mem, HIMEM_START - 1, 1), [FILL]);
    }

    #[test]
    fn runtime_start_by_boot_rst() {
        let mem = filled_mem(MEM_SIZE, FILL);
        for (relocatable, pref, align, runtime) in [
            (1, 0x100_0000, 0x20_0000, 0x100_0000),
            (1, 0, 0x20_0000, 0x20_0000), // 1 MiB rounded up to 2 MiB
            (1, 0x10_0000, 0x1000, 0x10_0000),
            (1, 0x110_0000, 0x80_0000, 0x180_0000),
            (0, 0x100_0000, 0, 0x100_0000), // alignment unused
            (0, 0x10_0000, 3, 0x10_0000),
        ] {
            let spec = BzSpec {
                relocatable,
                pref_address: pref,
                kernel_alignment: align,
                init_size: 0x10_0000,
                ..BzSpec::default()
            };
            let image = spec.build();
            let bz = parse_bzimage(&image).unwrap();
            let load = load_bzimage(&mem, &bz, &image).unwrap();
            assert_eq!(load.runtime_start, GuestAddress(runtime), "{spec:?}");
            assert_eq!(load.end, GuestAddress(runtime + 0x10_0000));
        }
    }

    #[test]
    fn end_covers_kernel_when_longer_than_init_size() {
        let mem = filled_mem(MEM_SIZE, FILL);
        let spec = BzSpec {
            init_size: 0x100,
            pref_address: 0x10_0000,
            kernel_alignment: 0x1000,
            ..BzSpec::default()
        };
        let image = spec.build();
        let bz = parse_bzimage(&image).unwrap();
        let load = load_bzimage(&mem, &bz, &image).unwrap();
        assert_eq!(load.end, GuestAddress(HIMEM_START + 0x400));
    }

    #[test]
    fn truncated_image() {
        let image = BzSpec::default().build();
        for len in [0, 1, 0x1ff, 0x202, 0x263] {
            assert!(matches!(
                parse_err(&image[..len]),
                BzImageError::Truncated { len: l, needed: 0x264 } if l == len
            ));
        }
        // Long enough for init_size but not for the whole header.
        let image = &image[..0x268];
        assert!(matches!(
            parse_err(image),
            BzImageError::Truncated {
                len: 0x268,
                needed: 0x26c
            }
        ));
    }

    #[test]
    fn bad_boot_flag() {
        let spec = BzSpec {
            boot_flag: 0x55aa,
            ..BzSpec::default()
        };
        assert!(matches!(
            parse_err(&spec.build()),
            BzImageError::BadBootFlag { flag: 0x55aa }
        ));
    }

    #[test]
    fn bad_header_magic() {
        let spec = BzSpec {
            magic: *b"HdrZ",
            ..BzSpec::default()
        };
        let err = parse_err(&spec.build());
        assert!(matches!(
            err,
            BzImageError::BadHeaderMagic { magic } if &magic == b"HdrZ"
        ));
    }

    #[test]
    fn old_protocol_versions() {
        for version in [0x020b, 0x0200, 0x0100, 0] {
            let spec = BzSpec {
                version,
                ..BzSpec::default()
            };
            let err = parse_err(&spec.build());
            assert!(matches!(
                err,
                BzImageError::UnsupportedVersion { version: v, min: 0x020c } if v == version
            ));
            if version == 0x020b {
                let msg = err.to_string();
                assert!(msg.contains("2.11") && msg.contains("2.12"), "{msg}");
            }
        }
        let spec = BzSpec {
            version: 0x020c,
            ..BzSpec::default()
        };
        assert!(parse_bzimage(&spec.build()).is_ok());
    }

    #[test]
    fn setup_header_length_bounded() {
        // 0x202 + 0x61 = 0x263: ends before init_size.
        let spec = BzSpec {
            jump: 0x61,
            ..BzSpec::default()
        };
        assert!(matches!(
            parse_err(&spec.build()),
            BzImageError::SetupHeaderTooShort {
                end: 0x263,
                min: 0x264
            }
        ));
        // 0x202 + 0x8e = 0x290: exactly the zero page's room.
        let spec = BzSpec {
            jump: 0x8e,
            ..BzSpec::default()
        };
        assert_eq!(
            parse_bzimage(&spec.build()).unwrap().setup_header().len(),
            0x290 - 0x1f1
        );
        for jump in [0x8f, 0xff] {
            let spec = BzSpec {
                jump,
                ..BzSpec::default()
            };
            assert!(matches!(
                parse_err(&spec.build()),
                BzImageError::SetupHeaderTooLong { end, max: 0x290 } if end == 0x202 + usize::from(jump)
            ));
        }
    }

    #[test]
    fn not_loaded_high() {
        let spec = BzSpec {
            loadflags: 0x80,
            ..BzSpec::default()
        };
        assert!(matches!(
            parse_err(&spec.build()),
            BzImageError::NotLoadedHigh { loadflags: 0x80 }
        ));
    }

    #[test]
    fn no_64_bit_entry() {
        let spec = BzSpec {
            xloadflags: 0x1e,
            ..BzSpec::default()
        };
        assert!(matches!(
            parse_err(&spec.build()),
            BzImageError::No64BitEntry { xloadflags: 0x1e }
        ));
    }

    #[test]
    fn bad_kernel_alignment() {
        for alignment in [0, 3, 0x30_0000] {
            let spec = BzSpec {
                kernel_alignment: alignment,
                ..BzSpec::default()
            };
            assert!(matches!(
                parse_err(&spec.build()),
                BzImageError::BadKernelAlignment { alignment: a } if a == alignment
            ));
        }
    }

    #[test]
    fn setup_sects_past_the_end() {
        let mut image = BzSpec::default().build();
        let len = image.len();
        image[0x1f1] = 200;
        assert!(matches!(
            parse_err(&image),
            BzImageError::KernelOutOfImage { setup_sects: 200, offset, image_len }
                if offset == 201 * 512 && image_len == len
        ));
        // Exactly at the end: an empty kernel.
        let spec = BzSpec {
            kernel_len: 0,
            ..BzSpec::default()
        };
        assert!(matches!(
            parse_err(&spec.build()),
            BzImageError::KernelOutOfImage {
                setup_sects: 4,
                offset: 2560,
                image_len: 2560
            }
        ));
        // Too short to hold the 64-bit entry point at 0x200.
        let spec = BzSpec {
            kernel_len: 0x200,
            ..BzSpec::default()
        };
        assert!(matches!(
            parse_err(&spec.build()),
            BzImageError::KernelTooSmall {
                len: 0x200,
                min: 0x201
            }
        ));
    }

    #[test]
    fn init_size_beyond_memory() {
        // Runtime start 16 MiB + 16 MiB + 1 byte > 32 MiB.
        let spec = BzSpec {
            init_size: 0x100_0001,
            ..BzSpec::default()
        };
        assert!(matches!(
            load_err(&spec, MEM_SIZE),
            BzImageError::KernelOutsideMemory {
                addr: 0x100_0000,
                size: 0x100_0001
            }
        ));
        // From the load address already.
        let spec = BzSpec {
            init_size: u32::MAX,
            ..BzSpec::default()
        };
        assert!(matches!(
            load_err(&spec, MEM_SIZE),
            BzImageError::KernelOutsideMemory {
                addr: 0x10_0000,
                size: 0xffff_ffff
            }
        ));
        // Memory ending inside the kernel bytes.
        let spec = BzSpec {
            init_size: 0,
            ..BzSpec::default()
        };
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0200)]).unwrap();
        let image = spec.build();
        let bz = parse_bzimage(&image).unwrap();
        assert!(matches!(
            load_bzimage(&mem, &bz, &image),
            Err(BzImageError::KernelOutsideMemory {
                addr: 0x10_0000,
                size: 0x400
            })
        ));
    }

    #[test]
    fn runtime_start_overflow_or_low() {
        let spec = BzSpec {
            pref_address: u64::MAX - 10,
            ..BzSpec::default()
        };
        assert!(matches!(
            load_err(&spec, MEM_SIZE),
            BzImageError::KernelOutsideMemory { .. }
        ));
        let spec = BzSpec {
            relocatable: 0,
            pref_address: 0x8_0000,
            ..BzSpec::default()
        };
        assert!(matches!(
            load_err(&spec, MEM_SIZE),
            BzImageError::RuntimeBelowHimem {
                runtime_start: 0x8_0000,
                himem: HIMEM_START
            }
        ));
    }

    #[test]
    fn zero_init_size_still_checks_runtime_start() {
        let spec = BzSpec {
            init_size: 0,
            relocatable: 0,
            pref_address: u64::MAX,
            ..BzSpec::default()
        };
        assert!(matches!(
            load_err(&spec, MEM_SIZE),
            BzImageError::KernelOutsideMemory {
                addr: u64::MAX,
                size: 0
            }
        ));
    }

    #[test]
    fn image_mismatch() {
        let mem = filled_mem(MEM_SIZE, FILL);
        let image = BzSpec::default().build();
        let bz = parse_bzimage(&image).unwrap();
        assert!(matches!(
            load_bzimage(&mem, &bz, &image[..100]),
            Err(BzImageError::ImageMismatch { len: 100, .. })
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // Deterministic fuzz: mutate the header area (and sometimes anywhere),
        // sometimes truncate; parse, load and build the zero page. Every
        // outcome must be Ok or a typed error.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 24 << 20)]).unwrap();
        let spec = BzSpec {
            init_size: 0x10_0000,
            ..BzSpec::default()
        };
        let base = spec.build();
        let mut state = 0xd1b5_4a32_d192_ed03u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut loaded = 0;
        for round in 0..20_000 {
            let mut image = base.clone();
            for _ in 0..(next() % 4 + 1) {
                let pos = if round % 4 == 0 {
                    (next() as usize) % image.len()
                } else {
                    0x1f1 + (next() as usize) % (0x290 - 0x1f1)
                };
                image[pos] = next() as u8;
            }
            let len = if next() % 8 == 0 {
                (next() as usize) % image.len()
            } else {
                image.len()
            };
            let image = &image[..len];
            let Ok(bz) = parse_bzimage(image) else {
                continue;
            };
            assert!(bz.setup_header().len() <= 0x290 - 0x1f1);
            assert!(bz.kernel_offset() + bz.kernel_len() == len);
            if let Ok(load) = load_bzimage(&mem, &bz, image) {
                loaded += 1;
                assert_eq!(load.entry.0, HIMEM_START + 0x200);
                assert!(load.end.0 <= 24 << 20);
                assert!(load.runtime_start.0 >= HIMEM_START);
            }
        }
        assert!(loaded > 0);
    }
}

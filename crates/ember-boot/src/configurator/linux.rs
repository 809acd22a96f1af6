//! The Linux 64-bit boot protocol: the command line and the zero page
//! (`struct boot_params`) for a kernel entered at its 64-bit entry point with
//! `rsi` pointing at the zero page.
//!
//! Two kernel formats, two ways to build the page: an ELF `vmlinux` has no
//! setup header, so [`linux_boot_params`] makes one up ([`configure_linux_boot`]
//! writes it); a bzImage brings its own, which [`bzimage_boot_params`] copies
//! into the page ([`configure_bzimage_boot`] writes it).

use ember_arch::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, ZERO_PAGE_SIZE, ZERO_PAGE_START,
};
use vm_memory::{GuestAddress, GuestMemory};

use super::rsdp::rsdp_paddr;
use crate::cmdline::Cmdline;
use crate::e820::{e820_map, E820Error};
use crate::guest::{check_range, write_bytes, GuestWriteError};
use crate::loader::bzimage::BzImage;
use crate::zero_page::{
    BootParams, ZeroPageError, BOOT_FLAG_MAGIC, CAN_USE_HEAP, HEADER_MAGIC,
    TYPE_OF_LOADER_UNDEFINED,
};

/// Why the zero page or the command line for a 64-bit Linux boot could not be
/// built or written. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    /// The command line, with its NUL, exceeds the boot layout's room for it.
    #[error("command line of {len} bytes (with NUL) exceeds the limit of {limit} bytes")]
    CmdlineTooLong {
        /// Length of the command line, including the NUL.
        len: usize,
        /// The limit, [`CMDLINE_MAX_SIZE`].
        limit: usize,
    },
    /// The command line is longer than the bzImage's `cmdline_size`.
    #[error("command line of {len} bytes exceeds the kernel's cmdline_size of {max} bytes")]
    CmdlineExceedsKernelLimit {
        /// Length of the command line, without its NUL.
        len: usize,
        /// The kernel's `cmdline_size` (without the NUL).
        max: u32,
    },
    /// The e820 map could not be built.
    #[error(transparent)]
    E820(#[from] E820Error),
    /// A field of the zero page could not be set.
    #[error(transparent)]
    ZeroPage(#[from] ZeroPageError),
    /// The command line, the zero page or the RSDP does not lie in guest memory,
    /// or a write failed.
    #[error(transparent)]
    Memory(#[from] GuestWriteError),
}

/// `kernel_alignment` written to the zero page of an ELF kernel: 16 MiB, the
/// x86-64 `CONFIG_PHYSICAL_ALIGN` default.
pub const KERNEL_ALIGNMENT: u32 = 0x0100_0000;

/// `heap_end_ptr` written to the zero page of a bzImage: the conventional end of
/// the setup heap, `0xfe00` (`0x10000` minus `0x200`).
pub const HEAP_END_PTR_VALUE: u16 = 0xfe00;

/// Builds the zero page that [`configure_linux_boot`] writes, without writing
/// anything, so a VMM can add fields (an initrd, ...) before writing it.
///
/// Sets `boot_flag` to `0xaa55`, `header` to `"HdrS"`, `type_of_loader` to
/// `0xff`, `kernel_alignment` to [`KERNEL_ALIGNMENT`], points the command
/// line at [`CMDLINE_START`] and fills the e820 map from [`e820_map`].
///
/// # Errors
///
/// [`LinuxBootError::CmdlineTooLong`] if the command line with its NUL exceeds
/// [`CMDLINE_MAX_SIZE`], or an error of [`e820_map`].
///
/// # Example
///
/// ```
/// use ember_boot::cmdline::Cmdline;
/// use ember_boot::configurator::linux::linux_boot_params;
/// use ember_boot::vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
/// let mut params = linux_boot_params(&mem, &Cmdline::default())?;
/// params.set_ramdisk(GuestAddress(0x300_0000), 0x1000);
/// assert_eq!(params.e820_entries(), 3);
/// # Ok::<(), ember_boot::Error>(())
/// ```
pub fn linux_boot_params<M: GuestMemory>(
    mem: &M,
    cmdline: &Cmdline,
) -> Result<BootParams, LinuxBootError> {
    let len = cmdline.len();
    // With its NUL, the command line must fit the kernel's buffer.
    if len >= CMDLINE_MAX_SIZE {
        return Err(LinuxBootError::CmdlineTooLong {
            len: len.saturating_add(1),
            limit: CMDLINE_MAX_SIZE,
        });
    }
    let e820 = e820_map(mem)?;

    let mut params = BootParams::new();
    params.set_boot_flag(BOOT_FLAG_MAGIC);
    params.set_header(HEADER_MAGIC);
    params.set_type_of_loader(TYPE_OF_LOADER_UNDEFINED);
    params.set_kernel_alignment(KERNEL_ALIGNMENT);
    // `len < CMDLINE_MAX_SIZE`, so it fits in a u32.
    params.set_cmdline(GuestAddress(CMDLINE_START), len as u32);
    params.set_e820(&e820)?;
    Ok(params)
}

/// Prepares guest memory for entering a 64-bit ELF Linux kernel: writes the
/// command line at [`CMDLINE_START`] and the zero page built by
/// [`linux_boot_params`] at [`ZERO_PAGE_START`], and returns the zero
/// page's address (the VMM passes it to the kernel in `rsi`).
///
/// `rsdp` is the address of the ACPI RSDP, if the VMM wrote ACPI tables
/// (the `ember-firmware` crate's `setup_acpi` returns it); it goes into the
/// zero page's `acpi_rsdp_addr`. With `None` the field is 0 and the kernel
/// scans the BIOS area for an RSDP.
///
/// Everything is checked before anything is written.
///
/// # Errors
///
/// Those of [`linux_boot_params`], or [`LinuxBootError::Memory`] if the command
/// line or zero page would not fit in guest memory, an RSDP at `rsdp` would not
/// lie in it, or a write failed.
///
/// # Example
///
/// ```
/// use ember_arch::layout::ZERO_PAGE_START;
/// use ember_boot::cmdline::Cmdline;
/// use ember_boot::configurator::linux::configure_linux_boot;
/// use ember_boot::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
/// let mut cmdline = Cmdline::default();
/// cmdline.insert_str("console=ttyS0")?;
/// let zero_page = configure_linux_boot(&mem, &cmdline, Some(GuestAddress(0xe0000)))?;
/// assert_eq!(zero_page, GuestAddress(ZERO_PAGE_START));
/// let magic: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x202)).unwrap();
/// assert_eq!(&magic.to_le_bytes(), b"HdrS");
/// let rsdp: u64 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x070)).unwrap();
/// assert_eq!(rsdp, 0xe0000);
/// # Ok::<(), ember_boot::Error>(())
/// ```
pub fn configure_linux_boot<M: GuestMemory>(
    mem: &M,
    cmdline: &Cmdline,
    rsdp: Option<GuestAddress>,
) -> Result<GuestAddress, LinuxBootError> {
    let mut params = linux_boot_params(mem, cmdline)?;
    params.set_acpi_rsdp_addr(GuestAddress(rsdp_paddr(mem, rsdp)?));
    write_cmdline_and_zero_page(mem, cmdline, &params)
}

/// Writes `cmdline` at [`CMDLINE_START`] and `params` at
/// [`ZERO_PAGE_START`], checking both ranges before writing either, and
/// returns the zero page's address.
fn write_cmdline_and_zero_page<M: GuestMemory>(
    mem: &M,
    cmdline: &Cmdline,
    params: &BootParams,
) -> Result<GuestAddress, LinuxBootError> {
    let line = cmdline.as_cstring_bytes();
    check_range(mem, "command line", CMDLINE_START, line.len() as u64)?;
    check_range(mem, "zero page", ZERO_PAGE_START, ZERO_PAGE_SIZE as u64)?;
    write_bytes(mem, "command line", &line, CMDLINE_START)?;
    let addr = GuestAddress(ZERO_PAGE_START);
    params.write_to(mem, addr)?;
    Ok(addr)
}

/// Builds the zero page for entering a bzImage at its 64-bit entry point,
/// without writing anything.
///
/// Starts from an all-zero page, copies in the image's setup header at
/// `0x1f1`, then sets `type_of_loader` to `0xff`, adds `CAN_USE_HEAP` to
/// `loadflags`, sets `heap_end_ptr` to [`HEAP_END_PTR_VALUE`],
/// `code32_start` to the load address, points `cmd_line_ptr` at
/// [`CMDLINE_START`] (keeping the kernel's `cmdline_size`) and fills the
/// e820 map from [`e820_map`].
///
/// # Errors
///
/// [`LinuxBootError::CmdlineExceedsKernelLimit`] if the command line is longer
/// than the kernel's `cmdline_size`, [`LinuxBootError::CmdlineTooLong`] if with
/// its NUL it exceeds [`CMDLINE_MAX_SIZE`], or [`LinuxBootError::E820`].
///
/// # Example
///
/// ```no_run
/// use ember_boot::cmdline::Cmdline;
/// use ember_boot::configurator::linux::bzimage_boot_params;
/// use ember_boot::loader::bzimage::parse_bzimage;
/// use ember_boot::vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let image = std::fs::read("bzImage").unwrap();
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 256 << 20)]).unwrap();
/// let bz = parse_bzimage(&image)?;
/// let params = bzimage_boot_params(&mem, &bz, &Cmdline::default())?;
/// assert_eq!(params.header(), 0x5372_6448); // "HdrS", from the image
/// # Ok::<(), ember_boot::Error>(())
/// ```
pub fn bzimage_boot_params<M: GuestMemory>(
    mem: &M,
    bz: &BzImage,
    cmdline: &Cmdline,
) -> Result<BootParams, LinuxBootError> {
    let len = cmdline.len();
    if len > usize::try_from(bz.cmdline_size()).unwrap_or(usize::MAX) {
        return Err(LinuxBootError::CmdlineExceedsKernelLimit {
            len,
            max: bz.cmdline_size(),
        });
    }
    if len >= CMDLINE_MAX_SIZE {
        return Err(LinuxBootError::CmdlineTooLong {
            len: len.saturating_add(1),
            limit: CMDLINE_MAX_SIZE,
        });
    }
    let e820 = e820_map(mem)?;

    let mut params = BootParams::new();
    params.set_setup_header(bz.setup_header())?;
    params.set_type_of_loader(TYPE_OF_LOADER_UNDEFINED);
    params.set_loadflags(params.loadflags() | CAN_USE_HEAP);
    params.set_heap_end_ptr(HEAP_END_PTR_VALUE);
    // HIMEM_START is 1 MiB: it fits in 32 bits.
    params.set_code32_start(HIMEM_START as u32);
    params.set_cmd_line_ptr(GuestAddress(CMDLINE_START));
    params.set_e820(&e820)?;
    Ok(params)
}

/// Prepares guest memory for entering a bzImage at its 64-bit entry point:
/// writes the command line at [`CMDLINE_START`] and the zero page built by
/// [`bzimage_boot_params`] at [`ZERO_PAGE_START`],
/// and returns the zero page's address (the VMM passes it in `rsi`).
///
/// `rsdp` is the address of the ACPI RSDP, if the VMM wrote ACPI tables
/// (the `ember-firmware` crate's `setup_acpi` returns it); it goes into the
/// zero page's `acpi_rsdp_addr`. With `None` the field is 0 and the kernel
/// scans the BIOS area for an RSDP.
///
/// Everything is checked before anything is written.
///
/// # Errors
///
/// Those of [`bzimage_boot_params`], or [`LinuxBootError::Memory`] if the
/// command line or zero page would not fit, an RSDP at `rsdp` would not lie in
/// guest memory, or a write failed.
///
/// # Example
///
/// ```no_run
/// use ember_boot::cmdline::Cmdline;
/// use ember_boot::configurator::linux::configure_bzimage_boot;
/// use ember_boot::initrd::load_initrd_below;
/// use ember_boot::loader::bzimage::{load_bzimage, parse_bzimage};
/// use ember_boot::vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let image = std::fs::read("bzImage").unwrap();
/// let ramdisk = std::fs::read("initrd.img").unwrap();
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 256 << 20)]).unwrap();
/// let bz = parse_bzimage(&image)?;
/// let kernel = load_bzimage(&mem, &bz, &image)?;
/// let zero_page = configure_bzimage_boot(&mem, &bz, &Cmdline::default(), None)?;
/// load_initrd_below(&mem, zero_page, &ramdisk, kernel.end, bz.initrd_addr_max())?;
/// // Start the vCPU at `kernel.entry` in 64-bit mode with rsi = zero_page.
/// # Ok::<(), ember_boot::Error>(())
/// ```
pub fn configure_bzimage_boot<M: GuestMemory>(
    mem: &M,
    bz: &BzImage,
    cmdline: &Cmdline,
    rsdp: Option<GuestAddress>,
) -> Result<GuestAddress, LinuxBootError> {
    let mut params = bzimage_boot_params(mem, bz, cmdline)?;
    params.set_acpi_rsdp_addr(GuestAddress(rsdp_paddr(mem, rsdp)?));
    write_cmdline_and_zero_page(mem, cmdline, &params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e820::{E820Entry, E820_MAX_ENTRIES, E820_RAM, E820_RESERVED};
    use crate::loader::bzimage::parse_bzimage;
    use crate::testing::BzSpec;
    use crate::testing::{filled_mem, read};
    use crate::zero_page::{HEAP_END_PTR, LOADED_HIGH};
    use ember_arch::layout::{ACPI_RSDP_START, EBDA_START};
    use vm_memory::GuestMemoryMmap;

    const MIB: u64 = 1 << 20;
    const MEM_SIZE: usize = 32 << 20;

    fn zero_page(mem: &GuestMemoryMmap<()>) -> BootParams {
        let page = read(mem, ZERO_PAGE_START, ZERO_PAGE_SIZE);
        BootParams::from_bytes(page.try_into().unwrap())
    }

    #[test]
    fn configures_64_mib_guest() {
        let mem = filled_mem(64 << 20, 0xcc);
        let mut cmdline = Cmdline::default();
        cmdline.insert_str("console=ttyS0 reboot=k").unwrap();
        let addr = configure_linux_boot(&mem, &cmdline, None).unwrap();
        assert_eq!(addr, GuestAddress(0x7000));

        // The command line, NUL-terminated, at 0x20000.
        assert_eq!(read(&mem, 0x20000, 23), b"console=ttyS0 reboot=k\0");
        assert_eq!(read(&mem, 0x20017, 1), [0xcc]);

        // Raw bytes at the documented offsets, read from guest memory.
        let z = ZERO_PAGE_START;
        assert_eq!(read(&mem, z + 0x1fe, 2), [0x55, 0xaa]);
        assert_eq!(read(&mem, z + 0x202, 4), b"HdrS");
        assert_eq!(read(&mem, z + 0x210, 1), [0xff]);
        assert_eq!(read(&mem, z + 0x230, 4), 0x0100_0000u32.to_le_bytes());
        assert_eq!(read(&mem, z + 0x228, 4), 0x20000u32.to_le_bytes());
        assert_eq!(read(&mem, z + 0x238, 4), 22u32.to_le_bytes());
        assert_eq!(read(&mem, z + 0x1e8, 1), [3]);
        assert_eq!(read(&mem, z + 0x2d0 + 40, 8), HIMEM_START.to_le_bytes());
        assert_eq!(read(&mem, z + 0x2d0 + 48, 8), (63 * MIB).to_le_bytes());

        let p = zero_page(&mem);
        assert_eq!(p.cmd_line_ptr(), CMDLINE_START);
        assert_eq!(
            p.e820_table(),
            [
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: EBDA_START,
                    size: HIMEM_START - EBDA_START,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: HIMEM_START,
                    size: 63 * MIB,
                    kind: E820_RAM
                },
            ]
        );
        assert_eq!(p, linux_boot_params(&mem, &cmdline).unwrap());
    }

    #[test]
    fn longest_command_line_fits() {
        let mem = filled_mem(2 << 20, 0xcc);
        let mut cmdline = Cmdline::default();
        cmdline
            .insert_str(&"x".repeat(CMDLINE_MAX_SIZE - 1))
            .unwrap();
        configure_linux_boot(&mem, &cmdline, None).unwrap();
        assert_eq!(read(&mem, CMDLINE_START + 2047, 1), [0]);
        assert_eq!(zero_page(&mem).cmdline_size(), 2047);
    }

    #[test]
    fn command_line_over_kernel_limit_rejected() {
        let mem = filled_mem(2 << 20, 0xcc);
        let mut cmdline = Cmdline::new(4096).unwrap();
        cmdline.insert_str(&"x".repeat(CMDLINE_MAX_SIZE)).unwrap();
        let err = configure_linux_boot(&mem, &cmdline, None).unwrap_err();
        assert!(matches!(
            err,
            LinuxBootError::CmdlineTooLong {
                len: 2049,
                limit: 2048
            }
        ));
        assert!(read(&mem, 0, 2 << 20).iter().all(|&b| b == 0xcc));
    }

    #[test]
    fn rsdp_address_in_zero_page() {
        let mem = filled_mem(2 << 20, 0xcc);
        configure_linux_boot(&mem, &Cmdline::default(), None).unwrap();
        assert_eq!(read(&mem, ZERO_PAGE_START + 0x070, 8), [0; 8]);
        let rsdp = GuestAddress(ACPI_RSDP_START);
        configure_linux_boot(&mem, &Cmdline::default(), Some(rsdp)).unwrap();
        assert_eq!(
            read(&mem, ZERO_PAGE_START + 0x070, 8),
            0xe0000u64.to_le_bytes()
        );
        assert_eq!(zero_page(&mem).acpi_rsdp_addr(), 0xe0000);

        // An RSDP outside guest memory: error, nothing written.
        let mem = filled_mem(2 << 20, 0xcc);
        let err = configure_linux_boot(
            &mem,
            &Cmdline::default(),
            Some(GuestAddress((2 << 20) - 35)),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            LinuxBootError::Memory(GuestWriteError::OutsideGuestMemory {
                what: "ACPI RSDP",
                len: 36,
                ..
            })
        ));
        assert!(read(&mem, 0, 2 << 20).iter().all(|&b| b == 0xcc));
    }

    #[test]
    fn bad_memory_layout_writes_nothing() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(MIB), 4 * MIB as usize)]).unwrap();
        let err = configure_linux_boot(&mem, &Cmdline::default(), None).unwrap_err();
        assert!(matches!(
            err,
            LinuxBootError::E820(E820Error::NoRegionAtZero)
        ));

        let mem = filled_mem(0x8_0000, 0xcc);
        let err = configure_linux_boot(&mem, &Cmdline::default(), None).unwrap_err();
        assert!(matches!(
            err,
            LinuxBootError::E820(E820Error::LowMemoryTooSmall { .. })
        ));
        assert!(read(&mem, 0, 0x8_0000).iter().all(|&b| b == 0xcc));
    }

    #[test]
    fn zero_page_holds_the_image_header() {
        let mem = filled_mem(MEM_SIZE, 0xcc);
        let image = BzSpec::default().build();
        let bz = parse_bzimage(&image).unwrap();
        let mut cmdline = Cmdline::default();
        cmdline.insert_str("console=ttyS0").unwrap();
        let addr =
            configure_bzimage_boot(&mem, &bz, &cmdline, Some(GuestAddress(0xe0000))).unwrap();
        assert_eq!(addr, GuestAddress(ZERO_PAGE_START));
        assert_eq!(read(&mem, CMDLINE_START, 14), b"console=ttyS0\0");

        let z = ZERO_PAGE_START;
        // Copied from the image.
        assert_eq!(read(&mem, z + 0x1f1, 1), [4]);
        assert_eq!(read(&mem, z + 0x1fe, 2), [0x55, 0xaa]);
        assert_eq!(read(&mem, z + 0x200, 2), [0xeb, 0x6a]);
        assert_eq!(read(&mem, z + 0x202, 4), b"HdrS");
        assert_eq!(read(&mem, z + 0x206, 2), 0x020fu16.to_le_bytes());
        assert_eq!(read(&mem, z + 0x236, 2), 3u16.to_le_bytes());
        assert_eq!(read(&mem, z + 0x238, 4), 2047u32.to_le_bytes()); // kept
        assert_eq!(read(&mem, z + 0x258, 8), 0x100_0000u64.to_le_bytes());
        assert_eq!(read(&mem, z + 0x260, 4), 0x40_0000u32.to_le_bytes());
        // Set by the loader.
        assert_eq!(read(&mem, z + 0x210, 1), [0xff]);
        assert_eq!(read(&mem, z + 0x211, 1), [LOADED_HIGH | CAN_USE_HEAP]);
        assert_eq!(read(&mem, z + HEAP_END_PTR as u64, 2), [0x00, 0xfe]);
        assert_eq!(read(&mem, z + 0x214, 4), 0x10_0000u32.to_le_bytes());
        assert_eq!(read(&mem, z + 0x228, 4), 0x20000u32.to_le_bytes());
        assert_eq!(read(&mem, z + 0x070, 8), 0xe0000u64.to_le_bytes());
        // The setup code after the header (0xcc in the image) is not copied,
        // and nothing before 0x1f1 comes from the image.
        let page = zero_page(&mem);
        assert!(page.as_bytes()[0x26c..0x290].iter().all(|&b| b == 0));
        assert_eq!(page.as_bytes()[0x1ef], 0); // sentinel
        assert_eq!(page.version(), 0x020f);
        assert_eq!(page.heap_end_ptr(), 0xfe00);
        assert_eq!(page.code32_start(), 0x10_0000);
        assert_eq!(page.cmd_line_ptr(), CMDLINE_START);
        assert_eq!(page.e820_table(), e820_map(&mem).unwrap());
        assert_eq!(page.acpi_rsdp_addr(), 0xe0000);
        let mut expected = bzimage_boot_params(&mem, &bz, &cmdline).unwrap();
        expected.set_acpi_rsdp_addr(GuestAddress(0xe0000));
        assert_eq!(page, expected);
        assert!(page.e820_table().len() <= E820_MAX_ENTRIES);
    }

    #[test]
    fn command_line_longer_than_cmdline_size() {
        let mem = filled_mem(MEM_SIZE, 0xcc);
        let spec = BzSpec {
            cmdline_size: 8,
            ..BzSpec::default()
        };
        let bz = parse_bzimage(&spec.build()).unwrap();
        let mut cmdline = Cmdline::default();
        cmdline.insert_str("12345678").unwrap();
        configure_bzimage_boot(&mem, &bz, &cmdline, None).unwrap();
        cmdline.insert_str("9").unwrap();
        let mem = filled_mem(MEM_SIZE, 0xcc);
        assert!(matches!(
            configure_bzimage_boot(&mem, &bz, &cmdline, None),
            Err(LinuxBootError::CmdlineExceedsKernelLimit { len: 10, max: 8 })
        ));
        assert!(read(&mem, 0, 1 << 20).iter().all(|&b| b == 0xcc));
        // The kernel allows more than the layout's 2 KiB: the layout wins.
        let spec = BzSpec {
            cmdline_size: 0x10_0000,
            ..BzSpec::default()
        };
        let bz = parse_bzimage(&spec.build()).unwrap();
        let mut cmdline = Cmdline::new(8192).unwrap();
        cmdline.insert_str(&"x".repeat(CMDLINE_MAX_SIZE)).unwrap();
        assert!(matches!(
            configure_bzimage_boot(&mem, &bz, &cmdline, None),
            Err(LinuxBootError::CmdlineTooLong {
                len: 2049,
                limit: 2048
            })
        ));
    }

    #[test]
    fn bzimage_boot_params_of_mutated_headers_never_panic() {
        // Deterministic fuzz over the setup header: whatever `parse_bzimage`
        // accepts, building its zero page yields a page or a typed error.
        let mem = filled_mem(24 << 20, 0);
        let base = BzSpec::default().build();
        let cmdline = Cmdline::default();
        let mut state = 0x6a09_e667_f3bc_c908u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut built = 0;
        for _ in 0..5_000 {
            let mut image = base.clone();
            for _ in 0..(next() % 4 + 1) {
                let pos = 0x1f1 + (next() as usize) % (0x290 - 0x1f1);
                image[pos] = next() as u8;
            }
            let Ok(bz) = parse_bzimage(&image) else {
                continue;
            };
            match bzimage_boot_params(&mem, &bz, &cmdline) {
                Ok(params) => {
                    built += 1;
                    assert_eq!(params.type_of_loader(), 0xff);
                    assert_eq!(params.cmd_line_ptr(), CMDLINE_START);
                }
                Err(err) => assert!(!err.to_string().is_empty()),
            }
        }
        assert!(built > 0);
    }
}

//! Booting a 64-bit ELF Linux kernel: command line plus zero page.

use vm_memory::{GuestAddress, GuestMemory};

use crate::acpi::rsdp_paddr;
use crate::guest::range_in_memory;
use crate::zero_page::{BOOT_FLAG_MAGIC, HEADER_MAGIC, TYPE_OF_LOADER_UNDEFINED};
use crate::{
    e820_map, load_cmdline, BootError, BootParams, Cmdline, CMDLINE_MAX_SIZE, CMDLINE_START,
    ZERO_PAGE_SIZE, ZERO_PAGE_START,
};

/// `kernel_alignment` written to the zero page: 16 MiB, the x86-64
/// `CONFIG_PHYSICAL_ALIGN` default.
pub const KERNEL_ALIGNMENT: u32 = 0x0100_0000;

/// Builds the zero page that [`configure_linux_boot`] writes, without writing
/// anything, so a VMM can add fields (an initrd, ...) before writing it.
///
/// Sets `boot_flag` to `0xaa55`, `header` to `"HdrS"`, `type_of_loader` to
/// `0xff`, `kernel_alignment` to [`KERNEL_ALIGNMENT`], points the command
/// line at [`CMDLINE_START`] and fills the e820 map from [`e820_map`].
///
/// # Errors
///
/// [`BootError::CmdlineTooLong`] if the command line with its NUL exceeds
/// [`CMDLINE_MAX_SIZE`], or an error of [`e820_map`].
///
/// # Example
///
/// ```
/// use ember_boot::{linux_boot_params, Cmdline};
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
/// let mut params = linux_boot_params(&mem, &Cmdline::default())?;
/// params.set_ramdisk(GuestAddress(0x300_0000), 0x1000);
/// assert_eq!(params.e820_entries(), 3);
/// # Ok::<(), ember_boot::BootError>(())
/// ```
pub fn linux_boot_params<M: GuestMemory>(
    mem: &M,
    cmdline: &Cmdline,
) -> Result<BootParams, BootError> {
    let len = cmdline.len();
    // With its NUL, the command line must fit the kernel's buffer.
    if len >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
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
/// (as returned by [`setup_acpi`](crate::setup_acpi)); it goes into the
/// zero page's `acpi_rsdp_addr`. With `None` the field is 0 and the kernel
/// scans the BIOS area for an RSDP.
///
/// Everything is checked before anything is written.
///
/// # Errors
///
/// Those of [`linux_boot_params`], [`BootError::OutsideGuestMemory`] if the
/// command line or zero page would not fit in guest memory or an RSDP at
/// `rsdp` would not lie in it, or [`BootError::GuestMemoryWrite`].
///
/// # Example
///
/// ```
/// use ember_boot::{configure_linux_boot, Cmdline, ZERO_PAGE_START};
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
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
/// # Ok::<(), ember_boot::BootError>(())
/// ```
pub fn configure_linux_boot<M: GuestMemory>(
    mem: &M,
    cmdline: &Cmdline,
    rsdp: Option<GuestAddress>,
) -> Result<GuestAddress, BootError> {
    let mut params = linux_boot_params(mem, cmdline)?;
    params.set_acpi_rsdp_addr(GuestAddress(rsdp_paddr(mem, rsdp)?));
    write_cmdline_and_zero_page(mem, cmdline, &params)
}

/// Writes `cmdline` at [`CMDLINE_START`] and `params` at
/// [`ZERO_PAGE_START`], checking both ranges before writing either, and
/// returns the zero page's address.
pub(crate) fn write_cmdline_and_zero_page<M: GuestMemory>(
    mem: &M,
    cmdline: &Cmdline,
    params: &BootParams,
) -> Result<GuestAddress, BootError> {
    let cmdline_len = cmdline.len() as u64 + 1;
    if !range_in_memory(mem, CMDLINE_START, cmdline_len) {
        return Err(BootError::OutsideGuestMemory {
            what: "command line",
            addr: CMDLINE_START,
            len: cmdline_len,
        });
    }
    if !range_in_memory(mem, ZERO_PAGE_START, ZERO_PAGE_SIZE as u64) {
        return Err(BootError::OutsideGuestMemory {
            what: "zero page",
            addr: ZERO_PAGE_START,
            len: ZERO_PAGE_SIZE as u64,
        });
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)?;
    let addr = GuestAddress(ZERO_PAGE_START);
    params.write_to(mem, addr)?;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{filled_mem, read};
    use crate::{E820Entry, E820_RAM, E820_RESERVED, EBDA_START, HIMEM_START};
    use vm_memory::GuestMemoryMmap;

    const MIB: u64 = 1 << 20;

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
            BootError::CmdlineTooLong {
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
        let rsdp = crate::setup_acpi(
            &mem,
            &crate::AcpiConfig {
                num_cpus: 2,
                devices: &[],
                shutdown: None,
            },
        )
        .unwrap();
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
            BootError::OutsideGuestMemory {
                what: "ACPI RSDP",
                len: 36,
                ..
            }
        ));
        assert!(read(&mem, 0, 2 << 20).iter().all(|&b| b == 0xcc));
    }

    #[test]
    fn bad_memory_layout_writes_nothing() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(MIB), 4 * MIB as usize)]).unwrap();
        let err = configure_linux_boot(&mem, &Cmdline::default(), None).unwrap_err();
        assert!(matches!(err, BootError::E820NoRegionAtZero));

        let mem = filled_mem(0x8_0000, 0xcc);
        let err = configure_linux_boot(&mem, &Cmdline::default(), None).unwrap_err();
        assert!(matches!(err, BootError::E820LowMemoryTooSmall { .. }));
        assert!(read(&mem, 0, 0x8_0000).iter().all(|&b| b == 0xcc));
    }
}

//! Booting Linux through its PVH entry point.
//!
//! A `vmlinux` built with `CONFIG_PVH` carries a Xen ELF note,
//! `XEN_ELFNOTE_PHYS32_ENTRY`, giving the physical address of a 32-bit entry
//! point (`pvh_start_xen`). A VMM may start the kernel there, in 32-bit
//! protected mode with paging off, with `ebx` pointing at a `struct
//! hvm_start_info` that describes the command line, the initrd (as a module)
//! and the memory map. No zero page is needed.
//!
//! The structures are defined in Xen's
//! `xen/include/public/arch-x86/hvm/start_info.h`; this module encodes them
//! byte by byte at the offsets documented there (all fields little-endian,
//! naturally aligned, no padding).

use ember_arch::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START,
    ZERO_PAGE_START,
};
use vm_memory::{GuestAddress, GuestMemory};

use super::rsdp::rsdp_paddr;
use crate::cmdline::Cmdline;
use crate::e820::{e820_map, E820Entry, E820Error, E820_MAX_ENTRIES};
use crate::guest::{check_range, write_bytes, GuestWriteError};
use crate::le;

/// Why the PVH boot structures could not be written. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    /// The command line, with its NUL, exceeds the kernel's limit.
    #[error("command line of {len} bytes (with NUL) exceeds the limit of {limit} bytes")]
    CmdlineTooLong {
        /// Length of the command line, including the NUL.
        len: usize,
        /// The limit, [`CMDLINE_MAX_SIZE`].
        limit: usize,
    },
    /// The initrd given as the module has size 0.
    #[error("the initrd is empty")]
    InitrdEmpty,
    /// The memory map could not be built.
    #[error(transparent)]
    E820(#[from] E820Error),
    /// A structure, the initrd or the RSDP does not lie in guest memory, or a write
    /// failed.
    #[error(transparent)]
    Memory(#[from] GuestWriteError),
}

/// Value of [`HvmStartInfo::magic`]: `"xEn3"` with the `0x80` bit of the `E`
/// set.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// The [`HvmStartInfo::version`] written: version 1 adds the memory map.
pub const HVM_START_INFO_VERSION: u32 = 1;

/// `struct hvm_start_info`, 56 bytes, passed to the kernel in `ebx`.
///
/// | offset | field            | size |
/// |--------|------------------|------|
/// | 0      | `magic`          | u32  |
/// | 4      | `version`        | u32  |
/// | 8      | `flags`          | u32  |
/// | 12     | `nr_modules`     | u32  |
/// | 16     | `modlist_paddr`  | u64  |
/// | 24     | `cmdline_paddr`  | u64  |
/// | 32     | `rsdp_paddr`     | u64  |
/// | 40     | `memmap_paddr`   | u64  |
/// | 48     | `memmap_entries` | u32  |
/// | 52     | `reserved`       | u32  |
///
/// An address of 0 means "not present".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HvmStartInfo {
    /// [`XEN_HVM_START_MAGIC_VALUE`].
    pub magic: u32,
    /// Version of the structure ([`HVM_START_INFO_VERSION`]).
    pub version: u32,
    /// `SIF_*` flags.
    pub flags: u32,
    /// Number of entries in the module list.
    pub nr_modules: u32,
    /// Guest physical address of the module list.
    pub modlist_paddr: u64,
    /// Guest physical address of the NUL-terminated command line.
    pub cmdline_paddr: u64,
    /// Guest physical address of the ACPI RSDP.
    pub rsdp_paddr: u64,
    /// Guest physical address of the memory map (version 1).
    pub memmap_paddr: u64,
    /// Number of entries in the memory map (version 1).
    pub memmap_entries: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

impl HvmStartInfo {
    /// Size in bytes.
    pub const SIZE: usize = 56;

    /// The structure's little-endian representation.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        le::put(&mut out, 0, &self.magic.to_le_bytes());
        le::put(&mut out, 4, &self.version.to_le_bytes());
        le::put(&mut out, 8, &self.flags.to_le_bytes());
        le::put(&mut out, 12, &self.nr_modules.to_le_bytes());
        le::put(&mut out, 16, &self.modlist_paddr.to_le_bytes());
        le::put(&mut out, 24, &self.cmdline_paddr.to_le_bytes());
        le::put(&mut out, 32, &self.rsdp_paddr.to_le_bytes());
        le::put(&mut out, 40, &self.memmap_paddr.to_le_bytes());
        le::put(&mut out, 48, &self.memmap_entries.to_le_bytes());
        le::put(&mut out, 52, &self.reserved.to_le_bytes());
        out
    }

    /// Decodes the structure from its little-endian representation.
    pub fn from_bytes(bytes: &[u8; Self::SIZE]) -> Self {
        Self {
            magic: u32::from_le_bytes(le::get(bytes, 0)),
            version: u32::from_le_bytes(le::get(bytes, 4)),
            flags: u32::from_le_bytes(le::get(bytes, 8)),
            nr_modules: u32::from_le_bytes(le::get(bytes, 12)),
            modlist_paddr: u64::from_le_bytes(le::get(bytes, 16)),
            cmdline_paddr: u64::from_le_bytes(le::get(bytes, 24)),
            rsdp_paddr: u64::from_le_bytes(le::get(bytes, 32)),
            memmap_paddr: u64::from_le_bytes(le::get(bytes, 40)),
            memmap_entries: u32::from_le_bytes(le::get(bytes, 48)),
            reserved: u32::from_le_bytes(le::get(bytes, 52)),
        }
    }
}

/// `struct hvm_modlist_entry`, 32 bytes: one module (for Linux, the first
/// module is the initrd).
///
/// | offset | field           | size |
/// |--------|-----------------|------|
/// | 0      | `paddr`         | u64  |
/// | 8      | `size`          | u64  |
/// | 16     | `cmdline_paddr` | u64  |
/// | 24     | `reserved`      | u64  |
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HvmModlistEntry {
    /// Guest physical address of the module.
    pub paddr: u64,
    /// Size of the module in bytes.
    pub size: u64,
    /// Guest physical address of the module's command line (0: none).
    pub cmdline_paddr: u64,
    /// Reserved, zero.
    pub reserved: u64,
}

impl HvmModlistEntry {
    /// Size in bytes.
    pub const SIZE: usize = 32;

    /// The structure's little-endian representation.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        le::put(&mut out, 0, &self.paddr.to_le_bytes());
        le::put(&mut out, 8, &self.size.to_le_bytes());
        le::put(&mut out, 16, &self.cmdline_paddr.to_le_bytes());
        le::put(&mut out, 24, &self.reserved.to_le_bytes());
        out
    }

    /// Decodes the structure from its little-endian representation.
    pub fn from_bytes(bytes: &[u8; Self::SIZE]) -> Self {
        Self {
            paddr: u64::from_le_bytes(le::get(bytes, 0)),
            size: u64::from_le_bytes(le::get(bytes, 8)),
            cmdline_paddr: u64::from_le_bytes(le::get(bytes, 16)),
            reserved: u64::from_le_bytes(le::get(bytes, 24)),
        }
    }
}

/// `struct hvm_memmap_table_entry`, 24 bytes: one memory map entry, with
/// the e820 types (`1` RAM, `2` reserved, ...).
///
/// | offset | field      | size |
/// |--------|------------|------|
/// | 0      | `addr`     | u64  |
/// | 8      | `size`     | u64  |
/// | 16     | `type`     | u32  |
/// | 20     | `reserved` | u32  |
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HvmMemmapTableEntry {
    /// Guest physical start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Kind of memory ([`E820_RAM`](crate::e820::E820_RAM), ...).
    pub kind: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

impl HvmMemmapTableEntry {
    /// Size in bytes.
    pub const SIZE: usize = 24;

    /// The structure's little-endian representation.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        le::put(&mut out, 0, &self.addr.to_le_bytes());
        le::put(&mut out, 8, &self.size.to_le_bytes());
        le::put(&mut out, 16, &self.kind.to_le_bytes());
        le::put(&mut out, 20, &self.reserved.to_le_bytes());
        out
    }

    /// Decodes the structure from its little-endian representation.
    pub fn from_bytes(bytes: &[u8; Self::SIZE]) -> Self {
        Self {
            addr: u64::from_le_bytes(le::get(bytes, 0)),
            size: u64::from_le_bytes(le::get(bytes, 8)),
            kind: u32::from_le_bytes(le::get(bytes, 16)),
            reserved: u32::from_le_bytes(le::get(bytes, 20)),
        }
    }
}

impl From<E820Entry> for HvmMemmapTableEntry {
    fn from(e: E820Entry) -> Self {
        Self {
            addr: e.addr,
            size: e.size,
            kind: e.kind,
            reserved: 0,
        }
    }
}

// The start info, module list and full memory map fit, in that order, in the room
// the layout gives them below the zero page.
const _: () = assert!(PVH_INFO_START + HvmStartInfo::SIZE as u64 <= PVH_MODLIST_START);
const _: () = assert!(PVH_MODLIST_START + HvmModlistEntry::SIZE as u64 <= PVH_MEMMAP_START);
const _: () = assert!(
    PVH_MEMMAP_START + (E820_MAX_ENTRIES * HvmMemmapTableEntry::SIZE) as u64 <= ZERO_PAGE_START
);

/// Prepares guest memory for entering Linux at its PVH entry point: writes
/// the command line at [`CMDLINE_START`], the memory map (from
/// [`e820_map`]) at [`PVH_MEMMAP_START`], a module list holding the initrd
/// (if any) at [`PVH_MODLIST_START`], and the `hvm_start_info` at
/// [`PVH_INFO_START`], whose address it returns (the VMM puts it in `ebx`).
///
/// `initrd` is the address and size of an initrd already in guest memory
/// (for example written by [`copy_initrd`](crate::initrd::copy_initrd)).
/// `rsdp` is the address of the ACPI RSDP, if the VMM wrote ACPI tables
/// (the `ember-firmware` crate's `setup_acpi` returns it); it goes into
/// `rsdp_paddr`. With `None` that is 0 and Linux scans the BIOS area for
/// an RSDP.
///
/// Everything is checked before anything is written.
///
/// # Errors
///
/// [`PvhError::CmdlineTooLong`] if the command line with its NUL exceeds
/// [`CMDLINE_MAX_SIZE`], an error of [`e820_map`],
/// [`PvhError::InitrdEmpty`] for an initrd of size 0,
/// [`GuestWriteError::OutsideGuestMemory`] if the initrd is not in guest memory or
/// a structure would not fit or an RSDP at `rsdp` would not lie in guest
/// memory, or [`GuestWriteError::Write`] (both as [`PvhError::Memory`]).
///
/// # Example
///
/// ```
/// use ember_arch::layout::PVH_INFO_START;
/// use ember_boot::cmdline::Cmdline;
/// use ember_boot::configurator::pvh::{configure_pvh_boot, HvmStartInfo};
/// use ember_boot::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
/// let mut cmdline = Cmdline::default();
/// cmdline.insert_str("console=ttyS0")?;
/// let initrd = Some((GuestAddress(0x300_0000), 0x1000));
/// let start_info = configure_pvh_boot(&mem, &cmdline, initrd, None)?;
/// assert_eq!(start_info, GuestAddress(PVH_INFO_START));
///
/// let mut bytes = [0u8; HvmStartInfo::SIZE];
/// mem.read_slice(&mut bytes, start_info).unwrap();
/// let info = HvmStartInfo::from_bytes(&bytes);
/// assert_eq!(info.magic, 0x336e_c578);
/// assert_eq!((info.nr_modules, info.memmap_entries), (1, 3));
/// # Ok::<(), ember_boot::Error>(())
/// ```
pub fn configure_pvh_boot<M: GuestMemory>(
    mem: &M,
    cmdline: &Cmdline,
    initrd: Option<(GuestAddress, u64)>,
    rsdp: Option<GuestAddress>,
) -> Result<GuestAddress, PvhError> {
    let len = cmdline.len();
    if len >= CMDLINE_MAX_SIZE {
        return Err(PvhError::CmdlineTooLong {
            len: len.saturating_add(1),
            limit: CMDLINE_MAX_SIZE,
        });
    }
    // At most E820_MAX_ENTRIES entries, so the memory map stays below the
    // zero page (asserted below).
    let e820 = e820_map(mem)?;
    let memmap: Vec<u8> = e820
        .iter()
        .flat_map(|&e| HvmMemmapTableEntry::from(e).to_bytes())
        .collect();

    let module = match initrd {
        None => None,
        Some((_, 0)) => return Err(PvhError::InitrdEmpty),
        Some((GuestAddress(paddr), size)) => {
            check_range(mem, "initrd", paddr, size)?;
            Some(HvmModlistEntry {
                paddr,
                size,
                ..Default::default()
            })
        }
    };

    let rsdp_paddr = rsdp_paddr(mem, rsdp)?;

    let info = HvmStartInfo {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: HVM_START_INFO_VERSION,
        nr_modules: u32::from(module.is_some()),
        modlist_paddr: if module.is_some() {
            PVH_MODLIST_START
        } else {
            0
        },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr,
        memmap_paddr: PVH_MEMMAP_START,
        // At most E820_MAX_ENTRIES (128).
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };

    let cmdline_len = len as u64 + 1;
    let checks = [
        ("command line", CMDLINE_START, cmdline_len),
        ("PVH memory map", PVH_MEMMAP_START, memmap.len() as u64),
        (
            "PVH module list",
            PVH_MODLIST_START,
            HvmModlistEntry::SIZE as u64,
        ),
        ("PVH start info", PVH_INFO_START, HvmStartInfo::SIZE as u64),
    ];
    for (what, addr, len) in checks {
        check_range(mem, what, addr, len)?;
    }

    write_bytes(
        mem,
        "command line",
        &cmdline.as_cstring_bytes(),
        CMDLINE_START,
    )?;
    write_bytes(mem, "PVH memory map", &memmap, PVH_MEMMAP_START)?;
    if let Some(module) = module {
        write_bytes(
            mem,
            "PVH module list",
            &module.to_bytes(),
            PVH_MODLIST_START,
        )?;
    }
    write_bytes(mem, "PVH start info", &info.to_bytes(), PVH_INFO_START)?;
    Ok(GuestAddress(PVH_INFO_START))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{filled_mem, read};
    use vm_memory::GuestMemoryMmap;

    fn pvh_mem() -> GuestMemoryMmap<()> {
        filled_mem(64 << 20, 0xcc)
    }

    fn start_info(mem: &GuestMemoryMmap<()>) -> HvmStartInfo {
        let bytes = read(mem, PVH_INFO_START, HvmStartInfo::SIZE);
        HvmStartInfo::from_bytes(&bytes.try_into().unwrap())
    }

    #[test]
    fn start_info_memmap_and_module() {
        let mem = pvh_mem();
        let mut cmdline = Cmdline::default();
        cmdline.insert_str("console=ttyS0 quiet").unwrap();
        let initrd = (GuestAddress(0x300_0000), 0x1234);
        let addr =
            configure_pvh_boot(&mem, &cmdline, Some(initrd), Some(GuestAddress(0xe0000))).unwrap();
        assert_eq!(addr, GuestAddress(0x6000));

        let info = start_info(&mem);
        assert_eq!(
            info,
            HvmStartInfo {
                magic: 0x336e_c578,
                version: 1,
                flags: 0,
                nr_modules: 1,
                modlist_paddr: PVH_MODLIST_START,
                cmdline_paddr: CMDLINE_START,
                rsdp_paddr: 0xe0000,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: 3,
                reserved: 0,
            }
        );
        // Raw bytes at Xen's documented offsets.
        assert_eq!(read(&mem, 0x6000, 4), 0x336e_c578u32.to_le_bytes());
        assert_eq!(read(&mem, 0x6000 + 12, 4), 1u32.to_le_bytes());
        assert_eq!(read(&mem, 0x6000 + 24, 8), CMDLINE_START.to_le_bytes());
        assert_eq!(read(&mem, 0x6000 + 32, 8), 0xe0000u64.to_le_bytes());
        assert_eq!(read(&mem, 0x6000 + 40, 8), PVH_MEMMAP_START.to_le_bytes());
        assert_eq!(read(&mem, 0x6000 + 48, 4), 3u32.to_le_bytes());

        assert_eq!(read(&mem, CMDLINE_START, 20), b"console=ttyS0 quiet\0");

        let module =
            HvmModlistEntry::from_bytes(&read(&mem, PVH_MODLIST_START, 32).try_into().unwrap());
        assert_eq!(
            module,
            HvmModlistEntry {
                paddr: 0x300_0000,
                size: 0x1234,
                cmdline_paddr: 0,
                reserved: 0
            }
        );

        let e820 = e820_map(&mem).unwrap();
        let memmap: Vec<E820Entry> = read(&mem, PVH_MEMMAP_START, 3 * 24)
            .chunks_exact(24)
            .map(|c| {
                let entry = HvmMemmapTableEntry::from_bytes(c.try_into().unwrap());
                assert_eq!(entry.reserved, 0);
                E820Entry {
                    addr: entry.addr,
                    size: entry.size,
                    kind: entry.kind,
                }
            })
            .collect();
        assert_eq!(memmap, e820);
        // Nothing written past the map, nor into the zero page.
        assert_eq!(read(&mem, PVH_MEMMAP_START + 3 * 24, 1), [0xcc]);
        assert!(read(&mem, 0x7000, 0x1000).iter().all(|&b| b == 0xcc));
    }

    #[test]
    fn without_initrd_no_module_list() {
        let mem = pvh_mem();
        configure_pvh_boot(&mem, &Cmdline::default(), None, None).unwrap();
        let info = start_info(&mem);
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
        assert_eq!(info.rsdp_paddr, 0);
        assert!(read(&mem, PVH_MODLIST_START, 32).iter().all(|&b| b == 0xcc));
        assert_eq!(read(&mem, CMDLINE_START, 1), [0]);
    }

    #[test]
    fn full_memory_map_fits_below_zero_page() {
        // 126 regions: 128 e820 entries, the limit.
        let mut ranges = vec![(GuestAddress(0), 2 << 20)];
        ranges.extend((1..126u64).map(|i| (GuestAddress(i * (4 << 20)), 4096)));
        let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        configure_pvh_boot(&mem, &Cmdline::default(), None, None).unwrap();
        let mut bytes = [0u8; HvmStartInfo::SIZE];
        vm_memory::Bytes::read_slice(&mem, &mut bytes, GuestAddress(PVH_INFO_START)).unwrap();
        let info = HvmStartInfo::from_bytes(&bytes);
        assert_eq!(info.memmap_entries, 128);
        // The last entry, ending right where the map's room ends.
        let mut last = [0u8; HvmMemmapTableEntry::SIZE];
        let at = PVH_MEMMAP_START + 127 * 24;
        vm_memory::Bytes::read_slice(&mem, &mut last, GuestAddress(at)).unwrap();
        let last = HvmMemmapTableEntry::from_bytes(&last);
        assert_eq!((last.addr, last.size), (125 * (4 << 20), 4096));
        assert_eq!(at + 24, 0x6c80);
    }

    #[test]
    fn errors_write_nothing() {
        let mem = pvh_mem();
        let cmdline = Cmdline::default();
        assert!(matches!(
            configure_pvh_boot(&mem, &cmdline, Some((GuestAddress(0x300_0000), 0)), None),
            Err(PvhError::InitrdEmpty)
        ));
        for (addr, size) in [((64 << 20) - 0x1000, 0x1001), (u64::MAX, 2), (0, u64::MAX)] {
            assert!(matches!(
                configure_pvh_boot(&mem, &cmdline, Some((GuestAddress(addr), size)), None),
                Err(PvhError::Memory(GuestWriteError::OutsideGuestMemory {
                    what: "initrd",
                    ..
                }))
            ));
        }
        let mut long = Cmdline::new(4096).unwrap();
        long.insert_str(&"x".repeat(CMDLINE_MAX_SIZE)).unwrap();
        assert!(matches!(
            configure_pvh_boot(&mem, &long, None, None),
            Err(PvhError::CmdlineTooLong {
                len: 2049,
                limit: 2048
            })
        ));
        assert!(matches!(
            configure_pvh_boot(&mem, &cmdline, None, Some(GuestAddress(64 << 20))),
            Err(PvhError::Memory(GuestWriteError::OutsideGuestMemory {
                what: "ACPI RSDP",
                addr,
                len: 36
            })) if addr == 64 << 20
        ));
        for addr in (0..1 << 20).step_by(0x1000) {
            assert!(read(&mem, addr, 0x1000).iter().all(|&b| b == 0xcc));
        }
        // Memory without low RAM.
        let high = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(1 << 20), 4 << 20)]).unwrap();
        assert!(matches!(
            configure_pvh_boot(&high, &cmdline, None, None),
            Err(PvhError::E820(E820Error::NoRegionAtZero))
        ));
    }

    #[test]
    fn structure_byte_layouts() {
        let info = HvmStartInfo {
            magic: 1,
            version: 2,
            flags: 3,
            nr_modules: 4,
            modlist_paddr: 5,
            cmdline_paddr: 6,
            rsdp_paddr: 7,
            memmap_paddr: 8,
            memmap_entries: 9,
            reserved: 10,
        };
        let b = info.to_bytes();
        for (off, value) in [(0, 1u8), (4, 2), (8, 3), (12, 4), (16, 5), (24, 6)] {
            assert_eq!(b[off], value, "offset {off}");
        }
        for (off, value) in [(32, 7u8), (40, 8), (48, 9), (52, 10)] {
            assert_eq!(b[off], value, "offset {off}");
        }
        assert_eq!(HvmStartInfo::from_bytes(&b), info);
        let m = HvmModlistEntry {
            paddr: 1,
            size: 2,
            cmdline_paddr: 3,
            reserved: 4,
        };
        let b = m.to_bytes();
        assert_eq!((b[0], b[8], b[16], b[24]), (1, 2, 3, 4));
        assert_eq!(HvmModlistEntry::from_bytes(&b), m);
        let e = HvmMemmapTableEntry {
            addr: 1,
            size: 2,
            kind: 3,
            reserved: 4,
        };
        let b = e.to_bytes();
        assert_eq!((b[0], b[8], b[16], b[20]), (1, 2, 3, 4));
        assert_eq!(HvmMemmapTableEntry::from_bytes(&b), e);
    }
}

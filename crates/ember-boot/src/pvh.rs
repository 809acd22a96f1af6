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

use vm_memory::{GuestAddress, GuestMemory};

use crate::acpi::rsdp_paddr;
use crate::elf::{program_headers, segment_file_bytes, PT_NOTE};
use crate::guest::{range_in_memory, write_bytes};
use crate::layout::{PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START};
use crate::{
    e820_map, le, load_cmdline, BootError, Cmdline, E820Entry, CMDLINE_MAX_SIZE, CMDLINE_START,
};

/// Xen ELF note type holding the 32-bit physical PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Value of [`HvmStartInfo::magic`]: `"xEn3"` with the `0x80` bit of the `E`
/// set.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// The [`HvmStartInfo::version`] written: version 1 adds the memory map.
pub const HVM_START_INFO_VERSION: u32 = 1;

/// The name of Xen's ELF notes, with its NUL (`n_namesz` = 4).
const XEN_NOTE_NAME: &[u8] = b"Xen\0";

/// Size of an ELF note header: `n_namesz`, `n_descsz`, `n_type` (u32 each).
const NOTE_HEADER_SIZE: usize = 12;

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
    /// Kind of memory ([`E820_RAM`](crate::E820_RAM), ...).
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

/// Rounds `len` up to a multiple of `align` (4 or 8). Callers pass values
/// below 2^34, so this cannot overflow.
fn padded(len: u64, align: u64) -> u64 {
    len.div_ceil(align) * align
}

/// Looks for the PVH entry note in the notes of `PT_NOTE` segment `segment`.
///
/// Each note is a 12-byte header (`n_namesz`, `n_descsz`, `n_type`), then
/// the name and the descriptor, each padded so that what follows starts
/// `align`-aligned from the start of the note (binutils'
/// `ELF_NOTE_DESC_OFFSET`; for `align` 4 this is simply each padded to 4
/// bytes). The padding after the segment's last descriptor may be cut off;
/// anything else running past the segment is an error.
fn find_in_notes(segment: usize, notes: &[u8], align: u64) -> Result<Option<u64>, BootError> {
    let mut offset = 0usize;
    // Each pass consumes at least NOTE_HEADER_SIZE bytes, so the loop ends.
    while let Some(rest) = notes.get(offset..).filter(|r| !r.is_empty()) {
        let header: &[u8; NOTE_HEADER_SIZE] =
            rest.first_chunk().ok_or(BootError::ElfNoteTruncated {
                segment,
                offset,
                remaining: rest.len(),
            })?;
        let namesz = u32::from_le_bytes(le::get(header, 0));
        let descsz = u32::from_le_bytes(le::get(header, 4));
        let n_type = u32::from_le_bytes(le::get(header, 8));

        let out_of_segment = BootError::ElfNoteOutOfSegment {
            segment,
            offset,
            namesz,
            descsz,
            segment_len: notes.len(),
        };
        // All in u64: at most 12 + 2 * (2^32 + 7), no overflow.
        let desc_start = padded(NOTE_HEADER_SIZE as u64 + u64::from(namesz), align);
        let desc_end = desc_start + u64::from(descsz);
        let note_end = desc_start + padded(u64::from(descsz), align);
        if desc_end > rest.len() as u64 {
            return Err(out_of_segment);
        }
        // `desc_end <= rest.len()`, so these fit in usize and are in bounds.
        let name = rest.get(NOTE_HEADER_SIZE..NOTE_HEADER_SIZE + namesz as usize);
        let desc = rest.get(desc_start as usize..desc_end as usize);
        let (Some(name), Some(desc)) = (name, desc) else {
            return Err(out_of_segment);
        };

        if name == XEN_NOTE_NAME && n_type == XEN_ELFNOTE_PHYS32_ENTRY {
            let entry = match *desc {
                [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
                [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
                _ => return Err(BootError::PvhEntryBadSize { descsz }),
            };
            if u32::try_from(entry).is_err() {
                return Err(BootError::PvhEntryTooHigh { entry });
            }
            return Ok(Some(entry));
        }
        // `note_end` may exceed the segment only by the last padding.
        offset = offset.saturating_add(note_end.min(rest.len() as u64) as usize);
    }
    Ok(None)
}

/// Finds the 32-bit PVH entry point of a 64-bit x86 ELF kernel (`vmlinux`).
///
/// Validates the ELF file header and program header table as
/// [`load_elf`](crate::load_elf) does, then walks the notes of every
/// `PT_NOTE` segment for the first note named `"Xen"` of type
/// [`XEN_ELFNOTE_PHYS32_ENTRY`]. Its descriptor is the entry point: 4 bytes,
/// or 8 bytes holding a value that fits in 32 bits. Notes are padded to 4
/// bytes, as Linux and the ELF64 notes of GNU tools emit them, or to 8 bytes
/// in a segment whose `p_align` is 8.
///
/// Returns `None` for an image without the note (a kernel built without
/// `CONFIG_PVH`). Any byte sequence yields a result or an error, never a
/// panic, and nothing is allocated.
///
/// # Errors
///
/// The ELF header errors of [`load_elf`](crate::load_elf),
/// [`BootError::ElfSegmentOutOfImage`] if a `PT_NOTE` segment does not lie
/// inside the image, [`BootError::ElfNoteTruncated`] or
/// [`BootError::ElfNoteOutOfSegment`] for a malformed note, and
/// [`BootError::PvhEntryBadSize`] or [`BootError::PvhEntryTooHigh`] for a
/// bad entry note.
///
/// # Example
///
/// ```
/// use ember_boot::{find_pvh_entry, BootError};
///
/// // Not an ELF image.
/// assert!(matches!(find_pvh_entry(b"\x7fELF"), Err(BootError::ElfTruncatedHeader { len: 4 })));
/// ```
pub fn find_pvh_entry(image: &[u8]) -> Result<Option<GuestAddress>, BootError> {
    for (index, phdr) in program_headers(image)? {
        if phdr.p_type != PT_NOTE {
            continue;
        }
        let notes = segment_file_bytes(image, index, phdr.offset, phdr.filesz)?;
        let align = if phdr.align == 8 { 8 } else { 4 };
        if let Some(entry) = find_in_notes(index, notes, align)? {
            return Ok(Some(GuestAddress(entry)));
        }
    }
    Ok(None)
}

/// Prepares guest memory for entering Linux at its PVH entry point: writes
/// the command line at [`CMDLINE_START`], the memory map (from
/// [`e820_map`]) at [`PVH_MEMMAP_START`], a module list holding the initrd
/// (if any) at [`PVH_MODLIST_START`], and the `hvm_start_info` at
/// [`PVH_INFO_START`], whose address it returns (the VMM puts it in `ebx`).
///
/// `initrd` is the address and size of an initrd already in guest memory
/// (for example written by [`copy_initrd`](crate::initrd::copy_initrd)).
/// `rsdp` is the address of the ACPI RSDP, if the VMM wrote ACPI tables
/// (as returned by [`setup_acpi`](crate::setup_acpi)); it goes into
/// `rsdp_paddr`. With `None` that is 0 and Linux scans the BIOS area for
/// an RSDP.
///
/// Everything is checked before anything is written.
///
/// # Errors
///
/// [`BootError::CmdlineTooLong`] if the command line with its NUL exceeds
/// [`CMDLINE_MAX_SIZE`], an error of [`e820_map`],
/// [`BootError::InitrdEmpty`] for an initrd of size 0,
/// [`BootError::OutsideGuestMemory`] if the initrd is not in guest memory or
/// a structure would not fit or an RSDP at `rsdp` would not lie in guest
/// memory, or [`BootError::GuestMemoryWrite`].
///
/// # Example
///
/// ```
/// use ember_boot::{configure_pvh_boot, Cmdline, HvmStartInfo, PVH_INFO_START};
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
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
/// # Ok::<(), ember_boot::BootError>(())
/// ```
pub fn configure_pvh_boot<M: GuestMemory>(
    mem: &M,
    cmdline: &Cmdline,
    initrd: Option<(GuestAddress, u64)>,
    rsdp: Option<GuestAddress>,
) -> Result<GuestAddress, BootError> {
    let len = cmdline.len();
    if len >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: len.saturating_add(1),
            limit: CMDLINE_MAX_SIZE,
        });
    }
    // At most E820_MAX_ENTRIES entries, so the memory map stays below the
    // zero page (asserted in `layout`).
    let e820 = e820_map(mem)?;
    let memmap: Vec<u8> = e820
        .iter()
        .flat_map(|&e| HvmMemmapTableEntry::from(e).to_bytes())
        .collect();

    let module = match initrd {
        None => None,
        Some((_, 0)) => return Err(BootError::InitrdEmpty),
        Some((GuestAddress(paddr), size)) => {
            if !range_in_memory(mem, paddr, size) {
                return Err(BootError::OutsideGuestMemory {
                    what: "initrd",
                    addr: paddr,
                    len: size,
                });
            }
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
        if !range_in_memory(mem, addr, len) {
            return Err(BootError::OutsideGuestMemory { what, addr, len });
        }
    }

    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)?;
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
    use crate::testing::{filled_mem, note, read, ElfSpec};
    use crate::{load_elf, HIMEM_START};
    use vm_memory::GuestMemoryMmap;

    const ENTRY: u32 = 0x20_0100;

    fn kernel() -> ElfSpec {
        ElfSpec::with_segments(&[(0x20_0000, &[0x90; 0x200], 0x1000)])
    }

    fn with_notes(notes: &[u8]) -> Vec<u8> {
        let mut spec = kernel();
        spec.push_note_segment(notes, 4);
        spec.build()
    }

    fn xen_entry_note(entry: u32) -> Vec<u8> {
        note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &entry.to_le_bytes(), 4)
    }

    /// Notes a real vmlinux carries before the PVH one: other Xen notes,
    /// other names with type 18, a GNU build id, odd name lengths.
    fn other_notes() -> Vec<u8> {
        let mut notes = Vec::new();
        notes.extend(note(b"Xen\0", 6, b"linux\0", 4)); // XEN_ELFNOTE_GUEST_OS
        notes.extend(note(b"GNU\0", 3, &[0xab; 20], 4)); // NT_GNU_BUILD_ID
        notes.extend(note(b"Linux\0", 18, &[1, 2, 3, 4], 4));
        notes.extend(note(b"Xen", 18, &[9, 9, 9, 9], 4)); // no NUL: not "Xen\0"
        notes.extend(note(b"", 18, &[], 4));
        notes
    }

    #[test]
    fn finds_entry_after_other_notes() {
        let mut notes = other_notes();
        notes.extend(xen_entry_note(ENTRY));
        notes.extend(note(b"Xen\0", 18, &0x1234u32.to_le_bytes(), 4)); // second: ignored
        let image = with_notes(&notes);
        assert_eq!(
            find_pvh_entry(&image).unwrap(),
            Some(GuestAddress(u64::from(ENTRY)))
        );
        let mem = filled_mem(4 << 20, 0);
        let load = load_elf(&mem, &image, GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(load.pvh_entry, Some(GuestAddress(u64::from(ENTRY))));
    }

    #[test]
    fn entry_in_second_note_segment() {
        let mut spec = kernel();
        spec.push_note_segment(&other_notes(), 4);
        spec.push_note_segment(&xen_entry_note(ENTRY), 4);
        assert_eq!(
            find_pvh_entry(&spec.build()).unwrap(),
            Some(GuestAddress(u64::from(ENTRY)))
        );
    }

    #[test]
    fn no_note_no_entry() {
        let image = kernel().build();
        assert_eq!(find_pvh_entry(&image).unwrap(), None);
        assert_eq!(find_pvh_entry(&with_notes(&other_notes())).unwrap(), None);
        assert_eq!(find_pvh_entry(&with_notes(&[])).unwrap(), None);
        let mem = filled_mem(4 << 20, 0);
        let load = load_elf(&mem, &image, GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(load.pvh_entry, None);
    }

    #[test]
    fn eight_byte_descriptor() {
        let notes = note(b"Xen\0", 18, &u64::from(ENTRY).to_le_bytes(), 4);
        assert_eq!(
            find_pvh_entry(&with_notes(&notes)).unwrap(),
            Some(GuestAddress(u64::from(ENTRY)))
        );
        let notes = note(b"Xen\0", 18, &0x1_0000_0000u64.to_le_bytes(), 4);
        assert!(matches!(
            find_pvh_entry(&with_notes(&notes)),
            Err(BootError::PvhEntryTooHigh {
                entry: 0x1_0000_0000
            })
        ));
    }

    #[test]
    fn wrong_descriptor_size() {
        for size in [0usize, 2, 3, 5, 12, 16] {
            let notes = note(b"Xen\0", 18, &vec![0x11; size], 4);
            assert!(matches!(
                find_pvh_entry(&with_notes(&notes)),
                Err(BootError::PvhEntryBadSize { descsz }) if descsz as usize == size
            ));
        }
    }

    #[test]
    fn eight_byte_aligned_note_segment() {
        let mut notes = note(b"GNU\0", 5, &[7; 12], 8); // NT_GNU_PROPERTY_TYPE_0
        notes.extend(note(b"Xen\0", 18, &ENTRY.to_le_bytes(), 8));
        let mut spec = kernel();
        spec.push_note_segment(&notes, 8);
        assert_eq!(
            find_pvh_entry(&spec.build()).unwrap(),
            Some(GuestAddress(u64::from(ENTRY)))
        );
    }

    #[test]
    fn truncated_note_header() {
        let mut notes = other_notes();
        let good = notes.len();
        notes.extend(&xen_entry_note(ENTRY)[..8]);
        let err = find_pvh_entry(&with_notes(&notes)).unwrap_err();
        assert!(matches!(
            err,
            BootError::ElfNoteTruncated { segment: 1, offset, remaining: 8 } if offset == good
        ));
        assert!(err.to_string().contains("truncated"));
    }

    #[test]
    fn note_running_past_the_segment() {
        let full = xen_entry_note(ENTRY);
        // Cut inside the descriptor, and inside the name.
        for cut in [full.len() - 1, 14] {
            assert!(matches!(
                find_pvh_entry(&with_notes(&full[..cut])),
                Err(BootError::ElfNoteOutOfSegment { segment: 1, offset: 0, namesz: 4, descsz: 4, segment_len })
                    if segment_len == cut
            ));
        }
        // Sizes near u32::MAX must not overflow.
        for (namesz, descsz) in [(u32::MAX, 4), (4, u32::MAX), (u32::MAX, u32::MAX)] {
            let mut notes = xen_entry_note(ENTRY);
            notes[..4].copy_from_slice(&namesz.to_le_bytes());
            notes[4..8].copy_from_slice(&descsz.to_le_bytes());
            assert!(matches!(
                find_pvh_entry(&with_notes(&notes)),
                Err(BootError::ElfNoteOutOfSegment { namesz: n, descsz: d, .. })
                    if n == namesz && d == descsz
            ));
        }
    }

    #[test]
    fn last_descriptor_padding_may_be_cut() {
        // A 3-byte descriptor of another note, padding cut off at the end.
        let mut notes = xen_entry_note(ENTRY);
        notes.splice(0..0, note(b"Foo\0", 1, &[1, 2, 3], 4));
        let mut tail = note(b"Bar\0", 2, &[1, 2, 3], 4);
        tail.pop();
        let mut other = other_notes();
        other.extend(tail);
        assert_eq!(find_pvh_entry(&with_notes(&other)).unwrap(), None);
        assert!(find_pvh_entry(&with_notes(&notes)).unwrap().is_some());
    }

    #[test]
    fn note_segment_outside_image() {
        let mut spec = kernel();
        let index = spec.push_note_segment(&xen_entry_note(ENTRY), 4);
        spec.phdrs[index].filesz = 1 << 20;
        assert!(matches!(
            find_pvh_entry(&spec.build()),
            Err(BootError::ElfSegmentOutOfImage { index: 1, .. })
        ));
        spec.phdrs[index].offset = u64::MAX;
        assert!(matches!(
            find_pvh_entry(&spec.build()),
            Err(BootError::ElfSegmentOutOfImage { index: 1, .. })
        ));
    }

    #[test]
    fn bad_elf_header_rejected() {
        let mut image = with_notes(&xen_entry_note(ENTRY));
        image[0] = 0;
        assert!(matches!(
            find_pvh_entry(&image),
            Err(BootError::ElfBadMagic { .. })
        ));
        assert!(matches!(
            find_pvh_entry(&image[..10]),
            Err(BootError::ElfTruncatedHeader { len: 10 })
        ));
    }

    #[test]
    fn load_elf_rejects_bad_notes_and_stray_pvh_entry() {
        let mem = filled_mem(4 << 20, 0xa5);
        let lowest = GuestAddress(HIMEM_START);
        let notes = note(b"Xen\0", 18, &[1, 2], 4);
        assert!(matches!(
            load_elf(&mem, &with_notes(&notes), lowest),
            Err(BootError::PvhEntryBadSize { descsz: 2 })
        ));
        // Entry outside the loaded segment [0x20_0000, 0x20_1000).
        for entry in [0x20_1000, 0x1f_ffff, 0] {
            assert!(matches!(
                load_elf(&mem, &with_notes(&xen_entry_note(entry)), lowest),
                Err(BootError::ElfPvhEntryOutsideSegments { entry: e }) if e == u64::from(entry)
            ));
        }
        // Nothing was written.
        assert!(read(&mem, 0x20_0000, 0x1000).iter().all(|&b| b == 0xa5));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut notes = other_notes();
        notes.extend(xen_entry_note(ENTRY));
        let base = with_notes(&notes);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut found = 0;
        for round in 0..20_000 {
            let mut image = base.clone();
            // Mostly hit the note segment at the end of the image.
            let notes_start = image.len() - notes.len();
            for _ in 0..(next() % 4 + 1) {
                let pos = if round % 4 == 0 {
                    (next() as usize) % image.len()
                } else {
                    notes_start + (next() as usize) % notes.len()
                };
                image[pos] = next() as u8;
            }
            let len = if next() % 8 == 0 {
                (next() as usize) % image.len()
            } else {
                image.len()
            };
            let image = &image[..len];
            match find_pvh_entry(image) {
                Ok(Some(entry)) => {
                    found += 1;
                    assert!(entry.0 <= u64::from(u32::MAX));
                }
                Ok(None) => {}
                Err(err) => assert!(!err.to_string().is_empty()),
            }
            if let Ok(load) = load_elf(&mem, image, GuestAddress(HIMEM_START)) {
                if let Some(pvh) = load.pvh_entry {
                    assert!(pvh.0 >= load.start.0 && pvh.0 < load.end.0);
                }
            }
        }
        assert!(found > 0);
    }

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
            Err(BootError::InitrdEmpty)
        ));
        for (addr, size) in [((64 << 20) - 0x1000, 0x1001), (u64::MAX, 2), (0, u64::MAX)] {
            assert!(matches!(
                configure_pvh_boot(&mem, &cmdline, Some((GuestAddress(addr), size)), None),
                Err(BootError::OutsideGuestMemory { what: "initrd", .. })
            ));
        }
        let mut long = Cmdline::new(4096).unwrap();
        long.insert_str(&"x".repeat(CMDLINE_MAX_SIZE)).unwrap();
        assert!(matches!(
            configure_pvh_boot(&mem, &long, None, None),
            Err(BootError::CmdlineTooLong {
                len: 2049,
                limit: 2048
            })
        ));
        assert!(matches!(
            configure_pvh_boot(&mem, &cmdline, None, Some(GuestAddress(64 << 20))),
            Err(BootError::OutsideGuestMemory {
                what: "ACPI RSDP",
                addr,
                len: 36
            }) if addr == 64 << 20
        ));
        for addr in (0..1 << 20).step_by(0x1000) {
            assert!(read(&mem, addr, 0x1000).iter().all(|&b| b == 0xcc));
        }
        // Memory without low RAM.
        let high = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(1 << 20), 4 << 20)]).unwrap();
        assert!(matches!(
            configure_pvh_boot(&high, &cmdline, None, None),
            Err(BootError::E820NoRegionAtZero)
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

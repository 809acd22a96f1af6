//! Loading a 64-bit ELF kernel (`vmlinux`) into guest memory.
//!
//! The loader validates the whole image before it writes a single byte, so a
//! malformed image never leaves guest memory half-loaded. Segments are placed
//! at their *physical* address (`p_paddr`): `vmlinux` links its code at a
//! virtual address in the top 2 GiB (`0xffffffff8...`) but gives physical
//! load addresses and a physical entry point, which is what a VMM entering the
//! kernel with paging identity-mapped needs.
//!
//! The same program header table also carries the kernel's notes: a kernel
//! built with `CONFIG_PVH` names its 32-bit PVH entry point in a Xen note,
//! which [`find_pvh_entry`] reads (and [`load_elf`] reports as
//! [`KernelLoad::pvh_entry`]) for the
//! [PVH configurator](crate::configurator::pvh).

use vm_memory::{GuestAddress, GuestMemory};

use crate::guest::{range_in_memory, write_bytes, write_zeros, GuestWriteError};
use crate::le;

/// Why an ELF kernel image was rejected or could not be loaded.
///
/// Every malformed field has its own variant naming the offending value. A
/// rejected image leaves guest memory untouched.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The image is shorter than an ELF64 header.
    #[error("kernel image is {len} bytes, too short for a 64-byte ELF64 header")]
    TruncatedHeader {
        /// Length of the image in bytes.
        len: usize,
    },
    /// The image does not start with `\x7fELF`.
    #[error("kernel image has bad ELF magic {magic:02x?} (expected [7f, 45, 4c, 46])")]
    BadMagic {
        /// The first four bytes of the image.
        magic: [u8; 4],
    },
    /// `EI_CLASS` is not `ELFCLASS64`.
    #[error("ELF class {class} is not ELFCLASS64 (2)")]
    NotClass64 {
        /// The `EI_CLASS` byte.
        class: u8,
    },
    /// `EI_DATA` is not `ELFDATA2LSB`.
    #[error("ELF data encoding {data} is not little-endian (ELFDATA2LSB, 1)")]
    NotLittleEndian {
        /// The `EI_DATA` byte.
        data: u8,
    },
    /// `e_machine` is not `EM_X86_64`.
    #[error("ELF machine {machine} is not EM_X86_64 (62)")]
    WrongMachine {
        /// The `e_machine` field.
        machine: u16,
    },
    /// `e_type` is not `ET_EXEC`.
    #[error("ELF type {elf_type} is not ET_EXEC (2)")]
    NotExecutable {
        /// The `e_type` field.
        elf_type: u16,
    },
    /// `e_phentsize` is not the size of an ELF64 program header.
    #[error("ELF program header entry size {phentsize} is not 56")]
    BadPhentsize {
        /// The `e_phentsize` field.
        phentsize: u16,
    },
    /// `e_phnum` is `PN_XNUM`: the real count lives in a section header,
    /// which a kernel image never needs.
    #[error("ELF program header count 0xffff (PN_XNUM, extended numbering) is not supported")]
    ExtendedPhnum,
    /// The program header table does not lie inside the image.
    #[error(
        "ELF program header table at offset {phoff:#x} with {phnum} entries \
         does not fit in the {image_len}-byte image"
    )]
    PhdrTableOutOfImage {
        /// The `e_phoff` field.
        phoff: u64,
        /// The `e_phnum` field.
        phnum: u16,
        /// Length of the image in bytes.
        image_len: usize,
    },
    /// The image has no `PT_LOAD` program header.
    #[error("ELF image has no PT_LOAD segment")]
    NoLoadSegment,
    /// A segment's file bytes do not lie inside the image.
    #[error(
        "ELF segment {index} file range at offset {offset:#x} (size {filesz:#x}) \
         does not fit in the {image_len}-byte image"
    )]
    SegmentOutOfImage {
        /// Index of the program header.
        index: usize,
        /// The `p_offset` field.
        offset: u64,
        /// The `p_filesz` field.
        filesz: u64,
        /// Length of the image in bytes.
        image_len: usize,
    },
    /// A segment has more file bytes than memory bytes.
    #[error("ELF segment {index} has p_filesz {filesz:#x} larger than p_memsz {memsz:#x}")]
    SegmentFileszExceedsMemsz {
        /// Index of the program header.
        index: usize,
        /// The `p_filesz` field.
        filesz: u64,
        /// The `p_memsz` field.
        memsz: u64,
    },
    /// A segment's end address overflows the 64-bit address space.
    #[error("ELF segment {index} at {addr:#x} (size {size:#x}) overflows the address space")]
    SegmentAddressOverflow {
        /// Index of the program header.
        index: usize,
        /// The `p_paddr` field.
        addr: u64,
        /// The `p_memsz` field.
        size: u64,
    },
    /// A segment starts below the lowest address the caller allows.
    #[error("ELF segment {index} at {addr:#x} lies below the lowest load address {lowest:#x}")]
    SegmentBelowLowest {
        /// Index of the program header.
        index: usize,
        /// The `p_paddr` field.
        addr: u64,
        /// The lowest allowed address.
        lowest: u64,
    },
    /// A segment does not lie entirely inside guest memory.
    #[error("ELF segment {index} at {addr:#x} (size {size:#x}) does not fit in guest memory")]
    SegmentOutsideMemory {
        /// Index of the program header.
        index: usize,
        /// The `p_paddr` field.
        addr: u64,
        /// The `p_memsz` field.
        size: u64,
    },
    /// The entry point is not inside any loaded segment.
    #[error("ELF entry point {entry:#x} is not inside any loaded segment")]
    EntryOutsideSegments {
        /// The `e_entry` field.
        entry: u64,
    },
    /// A note in a `PT_NOTE` segment is cut off before the end of its
    /// 12-byte header.
    #[error(
        "ELF note at offset {offset:#x} of segment {segment} is truncated: \
         {remaining} bytes left, a note header needs 12"
    )]
    NoteTruncated {
        /// Index of the `PT_NOTE` program header.
        segment: usize,
        /// Offset of the note within the segment.
        offset: usize,
        /// Bytes left in the segment at that offset.
        remaining: usize,
    },
    /// A note's name or descriptor runs past the end of its `PT_NOTE` segment.
    #[error(
        "ELF note at offset {offset:#x} of segment {segment} (namesz {namesz}, \
         descsz {descsz}) runs past the end of the {segment_len}-byte segment"
    )]
    NoteOutOfSegment {
        /// Index of the `PT_NOTE` program header.
        segment: usize,
        /// Offset of the note within the segment.
        offset: usize,
        /// The note's `n_namesz`.
        namesz: u32,
        /// The note's `n_descsz`.
        descsz: u32,
        /// Size of the segment in bytes.
        segment_len: usize,
    },
    /// The [`XEN_ELFNOTE_PHYS32_ENTRY`] note's descriptor is neither 4 nor 8
    /// bytes long.
    #[error("Xen PVH entry note has a {descsz}-byte descriptor (expected 4 or 8)")]
    PvhEntryBadSize {
        /// The note's `n_descsz`.
        descsz: u32,
    },
    /// The PVH entry point does not fit in 32 bits.
    #[error("Xen PVH entry point {entry:#x} does not fit in 32 bits")]
    PvhEntryTooHigh {
        /// The entry point from the note.
        entry: u64,
    },
    /// The PVH entry point is not inside any loaded segment.
    #[error("Xen PVH entry point {entry:#x} is not inside any loaded segment")]
    PvhEntryOutsideSegments {
        /// The entry point from the note.
        entry: u64,
    },
    /// Guest memory rejected a write of a validated segment.
    #[error(transparent)]
    Memory(#[from] GuestWriteError),
}

/// Size of an ELF64 file header.
const EHDR_SIZE: usize = 64;
/// Size of an ELF64 program header.
const PHDR_SIZE: usize = 56;

const ELFMAG: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
/// Program header type of a segment of ELF notes.
const PT_NOTE: u32 = 4;
const PN_XNUM: u16 = 0xffff;

/// Xen ELF note type holding the 32-bit physical PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// The name of Xen's ELF notes, with its NUL (`n_namesz` = 4).
const XEN_NOTE_NAME: &[u8] = b"Xen\0";

/// Size of an ELF note header: `n_namesz`, `n_descsz`, `n_type` (u32 each).
const NOTE_HEADER_SIZE: usize = 12;

/// Where a kernel was loaded and where to enter it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelLoad {
    /// Guest physical address of the kernel's entry point (`e_entry`).
    pub entry: GuestAddress,
    /// Lowest guest physical address written by the loader.
    pub start: GuestAddress,
    /// One past the highest guest physical address written by the loader.
    pub end: GuestAddress,
    /// The 32-bit PVH entry point from the image's Xen
    /// `XEN_ELFNOTE_PHYS32_ENTRY` note, if it has one (see
    /// [`find_pvh_entry`]). It lies inside a loaded
    /// segment.
    pub pvh_entry: Option<GuestAddress>,
}

/// Reads little-endian fields in order from a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, tail) = self.buf.split_first_chunk::<N>()?;
        self.buf = tail;
        Some(*head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.bytes().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.bytes().map(u64::from_le_bytes)
    }
}

/// The raw fields of an ELF64 file header that the loader looks at.
struct RawFileHeader {
    ident: [u8; 16],
    e_type: u16,
    machine: u16,
    entry: u64,
    phoff: u64,
    phentsize: u16,
    phnum: u16,
}

impl RawFileHeader {
    /// Reads the header fields in file order; `None` if `buf` is too short.
    fn read(buf: &[u8]) -> Option<Self> {
        let mut r = Reader::new(buf);
        let ident = r.bytes()?;
        let e_type = r.u16()?;
        let machine = r.u16()?;
        let _version = r.u32()?;
        let entry = r.u64()?;
        let phoff = r.u64()?;
        let _shoff = r.u64()?;
        let _flags = r.u32()?;
        let _ehsize = r.u16()?;
        let phentsize = r.u16()?;
        let phnum = r.u16()?;
        Some(Self {
            ident,
            e_type,
            machine,
            entry,
            phoff,
            phentsize,
            phnum,
        })
    }
}

/// The raw fields of an ELF64 program header that the loaders look at.
struct RawProgramHeader {
    p_type: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

impl RawProgramHeader {
    /// Reads the header fields in file order; `None` if `buf` is too short.
    fn read(buf: &[u8]) -> Option<Self> {
        let mut r = Reader::new(buf);
        let p_type = r.u32()?;
        let _flags = r.u32()?;
        let offset = r.u64()?;
        let _vaddr = r.u64()?;
        let paddr = r.u64()?;
        let filesz = r.u64()?;
        let memsz = r.u64()?;
        let align = r.u64()?;
        Some(Self {
            p_type,
            offset,
            paddr,
            filesz,
            memsz,
            align,
        })
    }
}

/// The validated ELF64 file header.
struct FileHeader {
    entry: u64,
    phoff: u64,
    phnum: u16,
}

impl FileHeader {
    fn parse(image: &[u8]) -> Result<Self, ElfError> {
        let raw = image
            .get(..EHDR_SIZE)
            .and_then(RawFileHeader::read)
            .ok_or(ElfError::TruncatedHeader { len: image.len() })?;

        let [m0, m1, m2, m3, class, data, ..] = raw.ident;
        let magic = [m0, m1, m2, m3];
        if magic != ELFMAG {
            return Err(ElfError::BadMagic { magic });
        }
        if class != ELFCLASS64 {
            return Err(ElfError::NotClass64 { class });
        }
        if data != ELFDATA2LSB {
            return Err(ElfError::NotLittleEndian { data });
        }
        if raw.machine != EM_X86_64 {
            return Err(ElfError::WrongMachine {
                machine: raw.machine,
            });
        }
        if raw.e_type != ET_EXEC {
            return Err(ElfError::NotExecutable {
                elf_type: raw.e_type,
            });
        }
        if usize::from(raw.phentsize) != PHDR_SIZE {
            return Err(ElfError::BadPhentsize {
                phentsize: raw.phentsize,
            });
        }
        if raw.phnum == PN_XNUM {
            return Err(ElfError::ExtendedPhnum);
        }
        Ok(Self {
            entry: raw.entry,
            phoff: raw.phoff,
            phnum: raw.phnum,
        })
    }

    /// The program header table, checked to lie inside `image`.
    fn phdr_table<'a>(&self, image: &'a [u8]) -> Result<&'a [u8], ElfError> {
        let out_of_image = ElfError::PhdrTableOutOfImage {
            phoff: self.phoff,
            phnum: self.phnum,
            image_len: image.len(),
        };
        let start = usize::try_from(self.phoff).ok();
        let end = start.and_then(|s| s.checked_add(usize::from(self.phnum) * PHDR_SIZE));
        match (start, end) {
            (Some(start), Some(end)) => image.get(start..end).ok_or(out_of_image),
            _ => Err(out_of_image),
        }
    }
}

/// Validates the ELF64 file header of `image` and returns its program
/// headers, in table order, paired with their indices.
///
/// The table is checked to lie inside `image`, so the iterator yields at most
/// `image.len() / 56` headers.
fn program_headers(
    image: &[u8],
) -> Result<impl Iterator<Item = (usize, RawProgramHeader)> + '_, ElfError> {
    let header = FileHeader::parse(image)?;
    let table = header.phdr_table(image)?;
    // Each chunk is exactly PHDR_SIZE bytes, long enough for every field, so
    // `read` never returns `None` and no header is skipped.
    Ok(table
        .chunks_exact(PHDR_SIZE)
        .filter_map(RawProgramHeader::read)
        .enumerate())
}

/// The file bytes `[offset, offset + filesz)` of program header `index`,
/// checked to lie inside `image`.
fn segment_file_bytes(
    image: &[u8],
    index: usize,
    offset: u64,
    filesz: u64,
) -> Result<&[u8], ElfError> {
    let out_of_image = ElfError::SegmentOutOfImage {
        index,
        offset,
        filesz,
        image_len: image.len(),
    };
    let file_start = usize::try_from(offset).ok();
    let file_end = file_start.and_then(|s| s.checked_add(usize::try_from(filesz).ok()?));
    match (file_start, file_end) {
        (Some(s), Some(e)) => image.get(s..e).ok_or(out_of_image),
        _ => Err(out_of_image),
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
fn find_in_notes(segment: usize, notes: &[u8], align: u64) -> Result<Option<u64>, ElfError> {
    let mut offset = 0usize;
    // Each pass consumes at least NOTE_HEADER_SIZE bytes, so the loop ends.
    while let Some(rest) = notes.get(offset..).filter(|r| !r.is_empty()) {
        let header: &[u8; NOTE_HEADER_SIZE] =
            rest.first_chunk().ok_or(ElfError::NoteTruncated {
                segment,
                offset,
                remaining: rest.len(),
            })?;
        let namesz = u32::from_le_bytes(le::get(header, 0));
        let descsz = u32::from_le_bytes(le::get(header, 4));
        let n_type = u32::from_le_bytes(le::get(header, 8));

        let out_of_segment = ElfError::NoteOutOfSegment {
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
                _ => return Err(ElfError::PvhEntryBadSize { descsz }),
            };
            if u32::try_from(entry).is_err() {
                return Err(ElfError::PvhEntryTooHigh { entry });
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
/// Validates the ELF file header and program header table as [`load_elf`]
/// does, then walks the notes of every
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
/// The ELF header errors of [`load_elf`], [`ElfError::SegmentOutOfImage`] if
/// a `PT_NOTE` segment does not lie inside the image, [`ElfError::NoteTruncated`] or
/// [`ElfError::NoteOutOfSegment`] for a malformed note, and
/// [`ElfError::PvhEntryBadSize`] or [`ElfError::PvhEntryTooHigh`] for a
/// bad entry note.
///
/// # Example
///
/// ```
/// use ember_boot::loader::elf::{find_pvh_entry, ElfError};
///
/// // Not an ELF image.
/// assert!(matches!(find_pvh_entry(b"\x7fELF"), Err(ElfError::TruncatedHeader { len: 4 })));
/// ```
pub fn find_pvh_entry(image: &[u8]) -> Result<Option<GuestAddress>, ElfError> {
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

/// A `PT_LOAD` segment, validated against the image and guest memory.
struct Segment<'a> {
    /// Guest physical address.
    addr: u64,
    /// Bytes to copy from the image.
    data: &'a [u8],
    /// Total size in memory; `memsz - data.len()` bytes are zero-filled.
    memsz: u64,
}

/// Parses and validates program header `index` if it is a `PT_LOAD`.
fn parse_load_segment<'a, M: GuestMemory>(
    mem: &M,
    image: &'a [u8],
    index: usize,
    phdr: RawProgramHeader,
    lowest: GuestAddress,
) -> Result<Option<Segment<'a>>, ElfError> {
    let RawProgramHeader {
        p_type,
        offset,
        paddr,
        filesz,
        memsz,
        ..
    } = phdr;
    if p_type != PT_LOAD {
        return Ok(None);
    }

    let data = segment_file_bytes(image, index, offset, filesz)?;
    if filesz > memsz {
        return Err(ElfError::SegmentFileszExceedsMemsz {
            index,
            filesz,
            memsz,
        });
    }
    if paddr.checked_add(memsz).is_none() {
        return Err(ElfError::SegmentAddressOverflow {
            index,
            addr: paddr,
            size: memsz,
        });
    }
    if paddr < lowest.0 {
        return Err(ElfError::SegmentBelowLowest {
            index,
            addr: paddr,
            lowest: lowest.0,
        });
    }
    if !range_in_memory(mem, paddr, memsz) {
        return Err(ElfError::SegmentOutsideMemory {
            index,
            addr: paddr,
            size: memsz,
        });
    }
    Ok(Some(Segment {
        addr: paddr,
        data,
        memsz,
    }))
}

/// Loads a 64-bit x86 ELF kernel (`vmlinux`) into guest memory.
///
/// Every `PT_LOAD` segment is copied to its physical address `p_paddr`, and
/// the bytes from `p_filesz` up to `p_memsz` (the kernel's `.bss`) are zeroed.
/// Every segment must lie at or above `lowest` (normally
/// [`HIMEM_START`](ember_arch::layout::HIMEM_START)) and entirely inside guest
/// memory, and the entry point must lie inside a loaded segment.
///
/// If the image carries a Xen `XEN_ELFNOTE_PHYS32_ENTRY` note, its PVH entry
/// point is returned too ([`KernelLoad::pvh_entry`]); it must also lie inside
/// a loaded segment. The notes are read by [`find_pvh_entry`], and a
/// malformed note segment rejects the image like any other malformed field.
///
/// The whole image is validated before anything is written: on error, guest
/// memory is unchanged. Any byte sequence yields either a load or an error,
/// never a panic.
///
/// # Errors
///
/// A variant of [`ElfError`] naming the malformed field, or
/// [`ElfError::Memory`] if guest memory rejects a write.
///
/// # Example
///
/// ```
/// use ember_arch::layout::HIMEM_START;
/// use ember_boot::loader::elf::{load_elf, ElfError};
/// use ember_boot::vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
/// // Not an ELF image: rejected, nothing written.
/// let err = load_elf(&mem, b"MZ\x90\x00", GuestAddress(HIMEM_START)).unwrap_err();
/// assert!(matches!(err, ElfError::TruncatedHeader { len: 4 }));
/// ```
pub fn load_elf<M: GuestMemory>(
    mem: &M,
    image: &[u8],
    lowest: GuestAddress,
) -> Result<KernelLoad, ElfError> {
    // `program_headers` validates the file header again; parsing it here
    // too gives the entry point and the header count.
    let header = FileHeader::parse(image)?;

    // Validate every segment before writing anything. The table lies inside
    // the image, so this allocation is bounded by the image size.
    let mut segments = Vec::with_capacity(usize::from(header.phnum));
    let mut saw_load = false;
    for (index, phdr) in program_headers(image)? {
        if let Some(segment) = parse_load_segment(mem, image, index, phdr, lowest)? {
            saw_load = true;
            if segment.memsz > 0 {
                segments.push(segment);
            }
        }
    }
    if !saw_load {
        return Err(ElfError::NoLoadSegment);
    }
    // Segments were checked not to overflow, so `addr + memsz` is exact.
    let inside = |addr: u64| {
        segments
            .iter()
            .any(|s| addr >= s.addr && addr - s.addr < s.memsz)
    };
    let entry = header.entry;
    if !inside(entry) {
        return Err(ElfError::EntryOutsideSegments { entry });
    }
    let pvh_entry = find_pvh_entry(image)?;
    if let Some(GuestAddress(pvh)) = pvh_entry {
        if !inside(pvh) {
            return Err(ElfError::PvhEntryOutsideSegments { entry: pvh });
        }
    }
    let start = segments.iter().map(|s| s.addr).min().unwrap_or(0);
    let end = segments.iter().map(|s| s.addr + s.memsz).max().unwrap_or(0);

    for s in &segments {
        log::debug!(
            "loading ELF segment at {:#x}: {:#x} file bytes, {:#x} memory bytes",
            s.addr,
            s.data.len(),
            s.memsz
        );
        write_bytes(mem, "ELF segment", s.data, s.addr)?;
        let filesz = s.data.len() as u64;
        write_zeros(mem, "ELF segment bss", s.addr + filesz, s.memsz - filesz)?;
    }

    Ok(KernelLoad {
        entry: GuestAddress(entry),
        start: GuestAddress(start),
        end: GuestAddress(end),
        pvh_entry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{filled_mem, read, ElfSpec, Phdr, EHDR, PHDR};

    use ember_arch::layout::HIMEM_START;
    use vm_memory::GuestMemoryMmap;

    const MEM_SIZE: usize = 16 << 20;
    const FILL: u8 = 0xa5;
    const LOWEST: GuestAddress = GuestAddress(HIMEM_START);

    fn mem() -> GuestMemoryMmap<()> {
        filled_mem(MEM_SIZE, FILL)
    }

    fn two_segments() -> ElfSpec {
        ElfSpec::with_segments(&[
            (0x20_0000, &[0xf4, 0x90, 0x90, 0xeb], 4),
            (0x30_0000, &[1, 2, 3, 4, 5, 6, 7, 8], 0x2000),
        ])
    }

    /// Asserts that loading `image` fails and that guest memory is untouched.
    fn load_err(image: &[u8]) -> ElfError {
        let mem = mem();
        let err = load_elf(&mem, image, LOWEST).unwrap_err();
        // The error message must render without panicking.
        assert!(!err.to_string().is_empty());
        for addr in (0..MEM_SIZE as u64).step_by(0x1_0000) {
            assert!(read(&mem, addr, 0x1_0000).iter().all(|&b| b == FILL));
        }
        err
    }

    #[test]
    fn loads_segments_at_paddr_and_zeroes_bss() {
        let mem = mem();
        let spec = two_segments();
        let load = load_elf(&mem, &spec.build(), LOWEST).unwrap();
        assert_eq!(
            load,
            KernelLoad {
                entry: GuestAddress(0x20_0000),
                start: GuestAddress(0x20_0000),
                end: GuestAddress(0x30_2000),
                pvh_entry: None,
            }
        );
        assert_eq!(read(&mem, 0x20_0000, 4), [0xf4, 0x90, 0x90, 0xeb]);
        assert_eq!(read(&mem, 0x30_0000, 8), [1, 2, 3, 4, 5, 6, 7, 8]);
        // bss: memsz beyond filesz is zeroed, and nothing past it is touched.
        assert!(read(&mem, 0x30_0008, 0x2000 - 8).iter().all(|&b| b == 0));
        assert_eq!(read(&mem, 0x30_2000, 1), [FILL]);
        assert_eq!(read(&mem, 0x1f_ffff, 1), [FILL]);
        assert_eq!(read(&mem, 0x20_0004, 1), [FILL]);
    }

    #[test]
    fn entry_inside_second_segment_and_non_load_headers_skipped() {
        let mut spec = two_segments();
        // The last bss byte.
        spec.entry = 0x30_1fff;
        // A PT_GNU_STACK whose fields would be invalid for a PT_LOAD (or a
        // PT_NOTE): ignored.
        spec.push_phdr(Phdr {
            p_type: 0x6474_e551,
            offset: u64::MAX,
            paddr: u64::MAX,
            filesz: u64::MAX,
            memsz: 0,
            align: 16,
        });
        let mem = mem();
        let load = load_elf(&mem, &spec.build(), LOWEST).unwrap();
        assert_eq!(load.entry, GuestAddress(0x30_1fff));
        assert_eq!(read(&mem, 0x20_0000, 4), [0xf4, 0x90, 0x90, 0xeb]);
        assert_eq!(read(&mem, 0x30_0000, 8), [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn segment_at_end_of_memory_and_exactly_at_lowest() {
        let top = MEM_SIZE as u64 - 0x1000;
        let spec = ElfSpec::with_segments(&[(HIMEM_START, &[1], 1), (top, &[2; 16], 0x1000)]);
        let mem = mem();
        let load = load_elf(&mem, &spec.build(), LOWEST).unwrap();
        assert_eq!(load.start, LOWEST);
        assert_eq!(load.end, GuestAddress(MEM_SIZE as u64));
        assert_eq!(read(&mem, top, 16), [2; 16]);
    }

    #[test]
    fn truncated_header() {
        let image = two_segments().build();
        for len in [0, 1, 4, 16, 63] {
            assert!(matches!(
                load_err(&image[..len]),
                ElfError::TruncatedHeader { len: l } if l == len
            ));
        }
    }

    #[test]
    fn bad_magic() {
        let mut image = two_segments().build();
        image[1] = b'X';
        assert!(matches!(
            load_err(&image),
            ElfError::BadMagic {
                magic: [0x7f, b'X', b'L', b'F']
            }
        ));
    }

    #[test]
    fn class_32_rejected() {
        let mut spec = two_segments();
        spec.class = 1;
        assert!(matches!(
            load_err(&spec.build()),
            ElfError::NotClass64 { class: 1 }
        ));
    }

    #[test]
    fn big_endian_rejected() {
        let mut spec = two_segments();
        spec.data = 2;
        assert!(matches!(
            load_err(&spec.build()),
            ElfError::NotLittleEndian { data: 2 }
        ));
    }

    #[test]
    fn wrong_machine_rejected() {
        let mut spec = two_segments();
        spec.machine = 183; // EM_AARCH64
        assert!(matches!(
            load_err(&spec.build()),
            ElfError::WrongMachine { machine: 183 }
        ));
    }

    #[test]
    fn dyn_and_rel_rejected() {
        for e_type in [1u16, 3, 4, 0] {
            let mut spec = two_segments();
            spec.e_type = e_type;
            assert!(matches!(
                load_err(&spec.build()),
                ElfError::NotExecutable { elf_type } if elf_type == e_type
            ));
        }
    }

    #[test]
    fn bad_phentsize_rejected() {
        let mut spec = two_segments();
        spec.phentsize = 32;
        assert!(matches!(
            load_err(&spec.build()),
            ElfError::BadPhentsize { phentsize: 32 }
        ));
    }

    #[test]
    fn pn_xnum_rejected() {
        let mut spec = two_segments();
        spec.phnum = Some(0xffff);
        assert!(matches!(load_err(&spec.build()), ElfError::ExtendedPhnum));
    }

    #[test]
    fn phdr_table_past_end() {
        let image = two_segments().build();
        // Cut inside the second program header.
        let cut = (EHDR + PHDR + 10) as usize;
        assert!(matches!(
            load_err(&image[..cut]),
            ElfError::PhdrTableOutOfImage { phoff: 64, phnum: 2, image_len } if image_len == cut
        ));
        // Too many headers claimed.
        let mut spec = two_segments();
        spec.phnum = Some(1000);
        assert!(matches!(
            load_err(&spec.build()),
            ElfError::PhdrTableOutOfImage { phnum: 1000, .. }
        ));
        // Offset past the end, and near u64::MAX.
        for phoff in [0x10_0000, u64::MAX - 8, u64::MAX] {
            let mut spec = two_segments();
            spec.phoff = phoff;
            assert!(matches!(
                load_err(&spec.build()),
                ElfError::PhdrTableOutOfImage { phoff: p, .. } if p == phoff
            ));
        }
    }

    #[test]
    fn segment_file_range_past_end() {
        let image = two_segments().build();
        // Drop the last byte of the second segment's data.
        let cut = image.len() - 1;
        assert!(matches!(
            load_err(&image[..cut]),
            ElfError::SegmentOutOfImage {
                index: 1,
                filesz: 8,
                ..
            }
        ));
        // offset + filesz overflows.
        let mut spec = two_segments();
        spec.phdrs[0].offset = u64::MAX - 1;
        assert!(matches!(
            load_err(&spec.build()),
            ElfError::SegmentOutOfImage { index: 0, offset, .. } if offset == u64::MAX - 1
        ));
        let mut spec = two_segments();
        spec.phdrs[0].filesz = u64::MAX;
        spec.phdrs[0].memsz = u64::MAX;
        assert!(matches!(
            load_err(&spec.build()),
            ElfError::SegmentOutOfImage { index: 0, .. }
        ));
    }

    #[test]
    fn filesz_larger_than_memsz() {
        let mut spec = two_segments();
        spec.phdrs[1].memsz = 4;
        assert!(matches!(
            load_err(&spec.build()),
            ElfError::SegmentFileszExceedsMemsz {
                index: 1,
                filesz: 8,
                memsz: 4
            }
        ));
    }

    #[test]
    fn segment_beyond_guest_memory() {
        // Straddling the end of memory.
        let mut spec = two_segments();
        spec.phdrs[1].paddr = MEM_SIZE as u64 - 0x1000;
        let err = load_err(&spec.build());
        assert!(matches!(
            err,
            ElfError::SegmentOutsideMemory { index: 1, addr, size: 0x2000 }
                if addr == MEM_SIZE as u64 - 0x1000
        ));
        assert_eq!(
            err.to_string(),
            "ELF segment 1 at 0xfff000 (size 0x2000) does not fit in guest memory"
        );
        // Entirely above memory.
        let mut spec = two_segments();
        spec.phdrs[0].paddr = 0x1_0000_0000;
        spec.entry = 0x1_0000_0000;
        assert!(matches!(
            load_err(&spec.build()),
            ElfError::SegmentOutsideMemory { index: 0, .. }
        ));
        // Huge bss: memsz far larger than memory.
        let mut spec = two_segments();
        spec.phdrs[1].memsz = 1 << 40;
        assert!(matches!(
            load_err(&spec.build()),
            ElfError::SegmentOutsideMemory { index: 1, .. }
        ));
    }

    #[test]
    fn segment_below_lowest() {
        let mut spec = two_segments();
        spec.phdrs[0].paddr = HIMEM_START - 1;
        spec.entry = HIMEM_START - 1;
        assert!(matches!(
            load_err(&spec.build()),
            ElfError::SegmentBelowLowest { index: 0, addr, lowest }
                if addr == HIMEM_START - 1 && lowest == HIMEM_START
        ));
    }

    #[test]
    fn address_overflow_near_u64_max() {
        for (paddr, memsz) in [
            (u64::MAX, 8),
            (u64::MAX - 0xfff, 0x1000),
            (1 << 63, 1 << 63),
        ] {
            let mut spec = two_segments();
            spec.phdrs[1].paddr = paddr;
            spec.phdrs[1].memsz = memsz;
            assert!(matches!(
                load_err(&spec.build()),
                ElfError::SegmentAddressOverflow { index: 1, addr, size }
                    if addr == paddr && size == memsz
            ));
        }
        // Ending just below 2^64 does not overflow but is not in memory.
        let mut spec = two_segments();
        spec.phdrs[1].paddr = u64::MAX - 0x2000;
        assert!(matches!(
            load_err(&spec.build()),
            ElfError::SegmentOutsideMemory { index: 1, .. }
        ));
    }

    #[test]
    fn entry_outside_segments() {
        // Just past the first segment, in the gap, and just past the last.
        for entry in [0x20_0004, 0x28_0000, 0x30_2000, 0, u64::MAX] {
            let mut spec = two_segments();
            spec.entry = entry;
            assert!(matches!(
                load_err(&spec.build()),
                ElfError::EntryOutsideSegments { entry: e } if e == entry
            ));
        }
    }

    #[test]
    fn no_pt_load() {
        let mut spec = two_segments();
        for p in &mut spec.phdrs {
            p.p_type = 6; // PT_PHDR
        }
        assert!(matches!(load_err(&spec.build()), ElfError::NoLoadSegment));
        let mut spec = two_segments();
        spec.phnum = Some(0);
        assert!(matches!(load_err(&spec.build()), ElfError::NoLoadSegment));
    }

    #[test]
    fn empty_load_segments_cannot_hold_the_entry() {
        let mut spec = ElfSpec::with_segments(&[(0x20_0000, &[], 0)]);
        spec.entry = 0x20_0000;
        assert!(matches!(
            load_err(&spec.build()),
            ElfError::EntryOutsideSegments { entry: 0x20_0000 }
        ));
    }

    #[test]
    fn late_bad_segment_writes_nothing() {
        // The first segment is fine; the third is bad. Nothing may be written.
        let mut spec = ElfSpec::with_segments(&[
            (0x20_0000, &[1; 64], 0x1000),
            (0x30_0000, &[2; 64], 0x1000),
            (0x40_0000, &[3; 64], 0x1000),
        ]);
        spec.phdrs[2].paddr = MEM_SIZE as u64;
        assert!(matches!(
            load_err(&spec.build()),
            ElfError::SegmentOutsideMemory { index: 2, .. }
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic fuzz: mutate a valid image byte by byte and
        // with random garbage; every outcome must be Ok or Err, and Ok only
        // for loads that stay in memory.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let base = ElfSpec::with_segments(&[(0x20_0000, &[0x90; 16], 0x100)]).build();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut image = base.clone();
            for _ in 0..(next() % 4 + 1) {
                let pos = (next() as usize) % image.len();
                image[pos] = next() as u8;
            }
            let len = if next() % 8 == 0 {
                (next() as usize) % image.len()
            } else {
                image.len()
            };
            if let Ok(load) = load_elf(&mem, &image[..len], LOWEST) {
                assert!(load.start.0 >= HIMEM_START);
                assert!(load.end.0 <= 4 << 20);
                assert!(load.entry.0 >= load.start.0 && load.entry.0 < load.end.0);
            }
        }
    }
}

/// The PVH entry note reader, and `load_elf` with notes.
#[cfg(test)]
mod pvh_note_tests {
    use super::*;
    use crate::testing::{filled_mem, note, read, ElfSpec};
    use ember_arch::layout::HIMEM_START;
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
            Err(ElfError::PvhEntryTooHigh {
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
                Err(ElfError::PvhEntryBadSize { descsz }) if descsz as usize == size
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
            ElfError::NoteTruncated { segment: 1, offset, remaining: 8 } if offset == good
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
                Err(ElfError::NoteOutOfSegment { segment: 1, offset: 0, namesz: 4, descsz: 4, segment_len })
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
                Err(ElfError::NoteOutOfSegment { namesz: n, descsz: d, .. })
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
            Err(ElfError::SegmentOutOfImage { index: 1, .. })
        ));
        spec.phdrs[index].offset = u64::MAX;
        assert!(matches!(
            find_pvh_entry(&spec.build()),
            Err(ElfError::SegmentOutOfImage { index: 1, .. })
        ));
    }

    #[test]
    fn bad_elf_header_rejected() {
        let mut image = with_notes(&xen_entry_note(ENTRY));
        image[0] = 0;
        assert!(matches!(
            find_pvh_entry(&image),
            Err(ElfError::BadMagic { .. })
        ));
        assert!(matches!(
            find_pvh_entry(&image[..10]),
            Err(ElfError::TruncatedHeader { len: 10 })
        ));
    }

    #[test]
    fn load_elf_rejects_bad_notes_and_stray_pvh_entry() {
        let mem = filled_mem(4 << 20, 0xa5);
        let lowest = GuestAddress(HIMEM_START);
        let notes = note(b"Xen\0", 18, &[1, 2], 4);
        assert!(matches!(
            load_elf(&mem, &with_notes(&notes), lowest),
            Err(ElfError::PvhEntryBadSize { descsz: 2 })
        ));
        // Entry outside the loaded segment [0x20_0000, 0x20_1000).
        for entry in [0x20_1000, 0x1f_ffff, 0] {
            assert!(matches!(
                load_elf(&mem, &with_notes(&xen_entry_note(entry)), lowest),
                Err(ElfError::PvhEntryOutsideSegments { entry: e }) if e == u64::from(entry)
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
}

//! Loading a 64-bit ELF kernel (`vmlinux`) into guest memory.
//!
//! The loader validates the whole image before it writes a single byte, so a
//! malformed image never leaves guest memory half-loaded. Segments are placed
//! at their *physical* address (`p_paddr`): `vmlinux` links its code at a
//! virtual address in the top 2 GiB (`0xffffffff8...`) but gives physical
//! load addresses and a physical entry point, which is what a VMM entering the
//! kernel with paging identity-mapped needs.
//!
//! The file and program header validation here is shared with the PVH note
//! reader in [`pvh`](crate::pvh).

use vm_memory::{GuestAddress, GuestMemory};

use crate::guest::{range_in_memory, write_bytes, write_zeros};
use crate::BootError;

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
pub(crate) const PT_NOTE: u32 = 4;
const PN_XNUM: u16 = 0xffff;

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
    /// [`find_pvh_entry`](crate::find_pvh_entry)). It lies inside a loaded
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
pub(crate) struct RawProgramHeader {
    pub(crate) p_type: u32,
    pub(crate) offset: u64,
    pub(crate) paddr: u64,
    pub(crate) filesz: u64,
    pub(crate) memsz: u64,
    pub(crate) align: u64,
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
    fn parse(image: &[u8]) -> Result<Self, BootError> {
        let raw = image
            .get(..EHDR_SIZE)
            .and_then(RawFileHeader::read)
            .ok_or(BootError::ElfTruncatedHeader { len: image.len() })?;

        let [m0, m1, m2, m3, class, data, ..] = raw.ident;
        let magic = [m0, m1, m2, m3];
        if magic != ELFMAG {
            return Err(BootError::ElfBadMagic { magic });
        }
        if class != ELFCLASS64 {
            return Err(BootError::ElfNotClass64 { class });
        }
        if data != ELFDATA2LSB {
            return Err(BootError::ElfNotLittleEndian { data });
        }
        if raw.machine != EM_X86_64 {
            return Err(BootError::ElfWrongMachine {
                machine: raw.machine,
            });
        }
        if raw.e_type != ET_EXEC {
            return Err(BootError::ElfNotExecutable {
                elf_type: raw.e_type,
            });
        }
        if usize::from(raw.phentsize) != PHDR_SIZE {
            return Err(BootError::ElfBadPhentsize {
                phentsize: raw.phentsize,
            });
        }
        if raw.phnum == PN_XNUM {
            return Err(BootError::ElfExtendedPhnum);
        }
        Ok(Self {
            entry: raw.entry,
            phoff: raw.phoff,
            phnum: raw.phnum,
        })
    }

    /// The program header table, checked to lie inside `image`.
    fn phdr_table<'a>(&self, image: &'a [u8]) -> Result<&'a [u8], BootError> {
        let out_of_image = BootError::ElfPhdrTableOutOfImage {
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
pub(crate) fn program_headers(
    image: &[u8],
) -> Result<impl Iterator<Item = (usize, RawProgramHeader)> + '_, BootError> {
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
pub(crate) fn segment_file_bytes(
    image: &[u8],
    index: usize,
    offset: u64,
    filesz: u64,
) -> Result<&[u8], BootError> {
    let out_of_image = BootError::ElfSegmentOutOfImage {
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
) -> Result<Option<Segment<'a>>, BootError> {
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
        return Err(BootError::ElfSegmentFileszExceedsMemsz {
            index,
            filesz,
            memsz,
        });
    }
    if paddr.checked_add(memsz).is_none() {
        return Err(BootError::ElfSegmentAddressOverflow {
            index,
            addr: paddr,
            size: memsz,
        });
    }
    if paddr < lowest.0 {
        return Err(BootError::ElfSegmentBelowLowest {
            index,
            addr: paddr,
            lowest: lowest.0,
        });
    }
    if !range_in_memory(mem, paddr, memsz) {
        return Err(BootError::ElfSegmentOutsideMemory {
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
/// [`HIMEM_START`](crate::HIMEM_START)) and entirely inside guest memory, and
/// the entry point must lie inside a loaded segment.
///
/// If the image carries a Xen `XEN_ELFNOTE_PHYS32_ENTRY` note, its PVH entry
/// point is returned too ([`KernelLoad::pvh_entry`]); it must also lie inside
/// a loaded segment. The notes are read by
/// [`find_pvh_entry`](crate::find_pvh_entry), and a malformed note segment
/// rejects the image like any other malformed field.
///
/// The whole image is validated before anything is written: on error, guest
/// memory is unchanged. Any byte sequence yields either a load or an error,
/// never a panic.
///
/// # Errors
///
/// An `Elf*` or `Pvh*` variant of [`BootError`] naming the malformed field,
/// or [`BootError::GuestMemoryWrite`] if guest memory rejects a write.
///
/// # Example
///
/// ```
/// use ember_boot::{load_elf, BootError, HIMEM_START};
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
/// // Not an ELF image: rejected, nothing written.
/// let err = load_elf(&mem, b"MZ\x90\x00", GuestAddress(HIMEM_START)).unwrap_err();
/// assert!(matches!(err, BootError::ElfTruncatedHeader { len: 4 }));
/// ```
pub fn load_elf<M: GuestMemory>(
    mem: &M,
    image: &[u8],
    lowest: GuestAddress,
) -> Result<KernelLoad, BootError> {
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
        return Err(BootError::ElfNoLoadSegment);
    }
    // Segments were checked not to overflow, so `addr + memsz` is exact.
    let inside = |addr: u64| {
        segments
            .iter()
            .any(|s| addr >= s.addr && addr - s.addr < s.memsz)
    };
    let entry = header.entry;
    if !inside(entry) {
        return Err(BootError::ElfEntryOutsideSegments { entry });
    }
    let pvh_entry = crate::pvh::find_pvh_entry(image)?;
    if let Some(GuestAddress(pvh)) = pvh_entry {
        if !inside(pvh) {
            return Err(BootError::ElfPvhEntryOutsideSegments { entry: pvh });
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

    use crate::HIMEM_START;
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
    fn load_err(image: &[u8]) -> BootError {
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
                BootError::ElfTruncatedHeader { len: l } if l == len
            ));
        }
    }

    #[test]
    fn bad_magic() {
        let mut image = two_segments().build();
        image[1] = b'X';
        assert!(matches!(
            load_err(&image),
            BootError::ElfBadMagic {
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
            BootError::ElfNotClass64 { class: 1 }
        ));
    }

    #[test]
    fn big_endian_rejected() {
        let mut spec = two_segments();
        spec.data = 2;
        assert!(matches!(
            load_err(&spec.build()),
            BootError::ElfNotLittleEndian { data: 2 }
        ));
    }

    #[test]
    fn wrong_machine_rejected() {
        let mut spec = two_segments();
        spec.machine = 183; // EM_AARCH64
        assert!(matches!(
            load_err(&spec.build()),
            BootError::ElfWrongMachine { machine: 183 }
        ));
    }

    #[test]
    fn dyn_and_rel_rejected() {
        for e_type in [1u16, 3, 4, 0] {
            let mut spec = two_segments();
            spec.e_type = e_type;
            assert!(matches!(
                load_err(&spec.build()),
                BootError::ElfNotExecutable { elf_type } if elf_type == e_type
            ));
        }
    }

    #[test]
    fn bad_phentsize_rejected() {
        let mut spec = two_segments();
        spec.phentsize = 32;
        assert!(matches!(
            load_err(&spec.build()),
            BootError::ElfBadPhentsize { phentsize: 32 }
        ));
    }

    #[test]
    fn pn_xnum_rejected() {
        let mut spec = two_segments();
        spec.phnum = Some(0xffff);
        assert!(matches!(
            load_err(&spec.build()),
            BootError::ElfExtendedPhnum
        ));
    }

    #[test]
    fn phdr_table_past_end() {
        let image = two_segments().build();
        // Cut inside the second program header.
        let cut = (EHDR + PHDR + 10) as usize;
        assert!(matches!(
            load_err(&image[..cut]),
            BootError::ElfPhdrTableOutOfImage { phoff: 64, phnum: 2, image_len } if image_len == cut
        ));
        // Too many headers claimed.
        let mut spec = two_segments();
        spec.phnum = Some(1000);
        assert!(matches!(
            load_err(&spec.build()),
            BootError::ElfPhdrTableOutOfImage { phnum: 1000, .. }
        ));
        // Offset past the end, and near u64::MAX.
        for phoff in [0x10_0000, u64::MAX - 8, u64::MAX] {
            let mut spec = two_segments();
            spec.phoff = phoff;
            assert!(matches!(
                load_err(&spec.build()),
                BootError::ElfPhdrTableOutOfImage { phoff: p, .. } if p == phoff
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
            BootError::ElfSegmentOutOfImage {
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
            BootError::ElfSegmentOutOfImage { index: 0, offset, .. } if offset == u64::MAX - 1
        ));
        let mut spec = two_segments();
        spec.phdrs[0].filesz = u64::MAX;
        spec.phdrs[0].memsz = u64::MAX;
        assert!(matches!(
            load_err(&spec.build()),
            BootError::ElfSegmentOutOfImage { index: 0, .. }
        ));
    }

    #[test]
    fn filesz_larger_than_memsz() {
        let mut spec = two_segments();
        spec.phdrs[1].memsz = 4;
        assert!(matches!(
            load_err(&spec.build()),
            BootError::ElfSegmentFileszExceedsMemsz {
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
            BootError::ElfSegmentOutsideMemory { index: 1, addr, size: 0x2000 }
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
            BootError::ElfSegmentOutsideMemory { index: 0, .. }
        ));
        // Huge bss: memsz far larger than memory.
        let mut spec = two_segments();
        spec.phdrs[1].memsz = 1 << 40;
        assert!(matches!(
            load_err(&spec.build()),
            BootError::ElfSegmentOutsideMemory { index: 1, .. }
        ));
    }

    #[test]
    fn segment_below_lowest() {
        let mut spec = two_segments();
        spec.phdrs[0].paddr = HIMEM_START - 1;
        spec.entry = HIMEM_START - 1;
        assert!(matches!(
            load_err(&spec.build()),
            BootError::ElfSegmentBelowLowest { index: 0, addr, lowest }
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
                BootError::ElfSegmentAddressOverflow { index: 1, addr, size }
                    if addr == paddr && size == memsz
            ));
        }
        // Ending just below 2^64 does not overflow but is not in memory.
        let mut spec = two_segments();
        spec.phdrs[1].paddr = u64::MAX - 0x2000;
        assert!(matches!(
            load_err(&spec.build()),
            BootError::ElfSegmentOutsideMemory { index: 1, .. }
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
                BootError::ElfEntryOutsideSegments { entry: e } if e == entry
            ));
        }
    }

    #[test]
    fn no_pt_load() {
        let mut spec = two_segments();
        for p in &mut spec.phdrs {
            p.p_type = 6; // PT_PHDR
        }
        assert!(matches!(
            load_err(&spec.build()),
            BootError::ElfNoLoadSegment
        ));
        let mut spec = two_segments();
        spec.phnum = Some(0);
        assert!(matches!(
            load_err(&spec.build()),
            BootError::ElfNoLoadSegment
        ));
    }

    #[test]
    fn empty_load_segments_cannot_hold_the_entry() {
        let mut spec = ElfSpec::with_segments(&[(0x20_0000, &[], 0)]);
        spec.entry = 0x20_0000;
        assert!(matches!(
            load_err(&spec.build()),
            BootError::ElfEntryOutsideSegments { entry: 0x20_0000 }
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
            BootError::ElfSegmentOutsideMemory { index: 2, .. }
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

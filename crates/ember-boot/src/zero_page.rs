//! The Linux zero page (`struct boot_params`).
//!
//! The zero page is a 4096-byte packed structure defined in
//! `arch/x86/include/uapi/asm/bootparam.h` and described in
//! `Documentation/arch/x86/zero-page.rst`; the embedded `setup_header` at
//! `0x1f1` is described in `Documentation/arch/x86/boot.rst`. This module
//! keeps it as a byte buffer and writes fields at their documented offsets,
//! so the layout is explicit and independent of Rust struct layout rules.
//! The offset constants carry the kernel's field names.

use std::fmt;

use ember_arch::layout::ZERO_PAGE_SIZE;
use vm_memory::{GuestAddress, GuestMemory};

use crate::e820::{E820Entry, E820_MAX_ENTRIES};
use crate::guest::{write_bytes, GuestWriteError};
use crate::le;

/// Why a field of the zero page could not be set. The page is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ZeroPageError {
    /// The setup header runs past the room `struct boot_params` has for it.
    #[error("setup header ends at {end:#x}, past the zero page's limit {max:#x}")]
    SetupHeaderTooLong {
        /// Exclusive end of the setup header in the page.
        end: usize,
        /// The largest end accepted, [`EDD_MBR_SIG_BUFFER`].
        max: usize,
    },
    /// More e820 entries than `e820_table` holds.
    #[error("{count} e820 entries exceed the zero page's limit of {max}")]
    TooManyE820Entries {
        /// Number of entries.
        count: usize,
        /// The limit, [`E820_MAX_ENTRIES`].
        max: usize,
    },
}

// `struct boot_params` fields outside the setup header.

/// `acpi_rsdp_addr` (u64): physical address of the ACPI RSDP.
pub const ACPI_RSDP_ADDR: usize = 0x070;
/// `ext_ramdisk_image` (u32): high 32 bits of `ramdisk_image`.
pub const EXT_RAMDISK_IMAGE: usize = 0x0c0;
/// `ext_ramdisk_size` (u32): high 32 bits of `ramdisk_size`.
pub const EXT_RAMDISK_SIZE: usize = 0x0c4;
/// `ext_cmd_line_ptr` (u32): high 32 bits of `cmd_line_ptr`.
pub const EXT_CMD_LINE_PTR: usize = 0x0c8;
/// `e820_entries` (u8): number of valid entries in `e820_table`.
pub const E820_ENTRIES: usize = 0x1e8;
/// `sentinel` (u8): must stay 0, or the kernel discards fields it thinks a
/// careless loader copied from the image.
pub const SENTINEL: usize = 0x1ef;
/// `hdr`: start of the embedded `struct setup_header`.
pub const SETUP_HEADER: usize = 0x1f1;
/// `edd_mbr_sig_buffer`: first field after the setup header's padding.
pub const EDD_MBR_SIG_BUFFER: usize = 0x290;
/// `e820_table`: [`E820_MAX_ENTRIES`] packed 20-byte `boot_e820_entry`s.
pub const E820_TABLE: usize = 0x2d0;

// `struct setup_header` fields, as offsets into the zero page.

/// `setup_sects` (u8): size of the real-mode setup code in 512-byte sectors.
pub const SETUP_SECTS: usize = 0x1f1;
/// `root_flags` (u16).
pub const ROOT_FLAGS: usize = 0x1f2;
/// `syssize` (u32): size of the protected-mode code in 16-byte paragraphs.
pub const SYSSIZE: usize = 0x1f4;
/// `ram_size` (u16): obsolete.
pub const RAM_SIZE: usize = 0x1f8;
/// `vid_mode` (u16): video mode control.
pub const VID_MODE: usize = 0x1fa;
/// `root_dev` (u16): default root device number.
pub const ROOT_DEV: usize = 0x1fc;
/// `boot_flag` (u16): [`BOOT_FLAG_MAGIC`].
pub const BOOT_FLAG: usize = 0x1fe;
/// `jump` (u16): x86 jump instruction.
pub const JUMP: usize = 0x200;
/// `header` (u32): [`HEADER_MAGIC`], `"HdrS"`.
pub const HEADER: usize = 0x202;
/// `version` (u16): boot protocol version.
pub const VERSION: usize = 0x206;
/// `realmode_swtch` (u32): boot loader hook.
pub const REALMODE_SWTCH: usize = 0x208;
/// `start_sys_seg` (u16): obsolete.
pub const START_SYS_SEG: usize = 0x20c;
/// `kernel_version` (u16): pointer to the kernel version string.
pub const KERNEL_VERSION: usize = 0x20e;
/// `type_of_loader` (u8): boot loader identifier.
pub const TYPE_OF_LOADER: usize = 0x210;
/// `loadflags` (u8): boot protocol option flags.
pub const LOADFLAGS: usize = 0x211;
/// `setup_move_size` (u16): obsolete.
pub const SETUP_MOVE_SIZE: usize = 0x212;
/// `code32_start` (u32): boot loader hook.
pub const CODE32_START: usize = 0x214;
/// `ramdisk_image` (u32): initrd load address, low 32 bits.
pub const RAMDISK_IMAGE: usize = 0x218;
/// `ramdisk_size` (u32): initrd size, low 32 bits.
pub const RAMDISK_SIZE: usize = 0x21c;
/// `bootsect_kludge` (u32): obsolete.
pub const BOOTSECT_KLUDGE: usize = 0x220;
/// `heap_end_ptr` (u16): end of the setup stack/heap.
pub const HEAP_END_PTR: usize = 0x224;
/// `ext_loader_ver` (u8): extended boot loader version.
pub const EXT_LOADER_VER: usize = 0x226;
/// `ext_loader_type` (u8): extended boot loader id.
pub const EXT_LOADER_TYPE: usize = 0x227;
/// `cmd_line_ptr` (u32): command line address, low 32 bits.
pub const CMD_LINE_PTR: usize = 0x228;
/// `initrd_addr_max` (u32): highest legal initrd address.
pub const INITRD_ADDR_MAX: usize = 0x22c;
/// `kernel_alignment` (u32): physical alignment required by the kernel.
pub const KERNEL_ALIGNMENT: usize = 0x230;
/// `relocatable_kernel` (u8): whether the kernel is relocatable.
pub const RELOCATABLE_KERNEL: usize = 0x234;
/// `min_alignment` (u8): minimum alignment, as a power of two.
pub const MIN_ALIGNMENT: usize = 0x235;
/// `xloadflags` (u16): boot protocol option flags.
pub const XLOADFLAGS: usize = 0x236;
/// `cmdline_size` (u32): command line length, without the NUL.
pub const CMDLINE_SIZE: usize = 0x238;
/// `hardware_subarch` (u32): hardware subarchitecture.
pub const HARDWARE_SUBARCH: usize = 0x23c;
/// `hardware_subarch_data` (u64): subarchitecture-specific data.
pub const HARDWARE_SUBARCH_DATA: usize = 0x240;
/// `payload_offset` (u32): offset of the kernel payload.
pub const PAYLOAD_OFFSET: usize = 0x248;
/// `payload_length` (u32): length of the kernel payload.
pub const PAYLOAD_LENGTH: usize = 0x24c;
/// `setup_data` (u64): physical address of a linked list of `setup_data`.
pub const SETUP_DATA: usize = 0x250;
/// `pref_address` (u64): preferred load address of a relocatable kernel.
pub const PREF_ADDRESS: usize = 0x258;
/// `init_size` (u32): linear memory required during initialization.
pub const INIT_SIZE: usize = 0x260;
/// `handover_offset` (u32): offset of the EFI handover entry point.
pub const HANDOVER_OFFSET: usize = 0x264;
/// `kernel_info_offset` (u32): offset of `kernel_info`.
pub const KERNEL_INFO_OFFSET: usize = 0x268;
/// One past the last byte of `struct setup_header`.
pub const SETUP_HEADER_END: usize = 0x26c;

/// Value of `boot_flag`.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Value of `header`: the bytes `"HdrS"` read as a little-endian u32.
pub const HEADER_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` of a boot loader without an assigned id.
pub const TYPE_OF_LOADER_UNDEFINED: u8 = 0xff;
/// `loadflags` bit: the protected-mode code is loaded at 1 MiB.
pub const LOADED_HIGH: u8 = 1 << 0;
/// `loadflags` bit: `heap_end_ptr` is valid.
pub const CAN_USE_HEAP: u8 = 1 << 7;
/// `xloadflags` bit: the kernel has the legacy 64-bit entry point at `0x200`.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// `xloadflags` bit: the kernel, boot parameters, command line and initrd
/// may lie above 4 GiB.
pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;

// Every fixed-offset access stays inside the page, and the layout matches
// the kernel's: setup header before `edd_mbr_sig_buffer`, e820 table last.
const _: () = assert!(SETUP_HEADER_END <= EDD_MBR_SIG_BUFFER);
const _: () = assert!(E820_TABLE + E820_MAX_ENTRIES * E820Entry::SIZE == 0xcd0);
const _: () = assert!(0xcd0 <= ZERO_PAGE_SIZE);

/// The zero page: a `struct boot_params` as a 4096-byte buffer with typed
/// setters and getters at the kernel's documented offsets.
///
/// # Example
///
/// ```
/// use ember_boot::e820::{E820Entry, E820_RAM};
/// use ember_boot::zero_page::BootParams;
/// use vm_memory::GuestAddress;
///
/// let mut params = BootParams::new();
/// params.set_boot_flag(0xaa55);
/// params.set_cmdline(GuestAddress(0x20000), 12);
/// params.set_e820(&[E820Entry { addr: 0, size: 0x9_fc00, kind: E820_RAM }])?;
/// assert_eq!(params.as_bytes()[0x1fe..0x200], [0x55, 0xaa]);
/// assert_eq!(params.cmd_line_ptr(), 0x20000);
/// assert_eq!(params.e820_entries(), 1);
/// # Ok::<(), ember_boot::zero_page::ZeroPageError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct BootParams {
    bytes: [u8; ZERO_PAGE_SIZE],
}

impl BootParams {
    /// An all-zero zero page.
    pub fn new() -> Self {
        Self {
            bytes: [0; ZERO_PAGE_SIZE],
        }
    }

    /// A zero page holding `bytes`, for example one read back from memory.
    pub fn from_bytes(bytes: [u8; ZERO_PAGE_SIZE]) -> Self {
        Self { bytes }
    }

    /// The raw page.
    pub fn as_bytes(&self) -> &[u8; ZERO_PAGE_SIZE] {
        &self.bytes
    }

    fn get_u8(&self, off: usize) -> u8 {
        u8::from_le_bytes(le::get(&self.bytes, off))
    }

    fn get_u16(&self, off: usize) -> u16 {
        u16::from_le_bytes(le::get(&self.bytes, off))
    }

    fn get_u32(&self, off: usize) -> u32 {
        u32::from_le_bytes(le::get(&self.bytes, off))
    }

    fn put(&mut self, off: usize, src: &[u8]) {
        le::put(&mut self.bytes, off, src);
    }

    /// Sets `boot_flag`; the kernel expects [`BOOT_FLAG_MAGIC`].
    pub fn set_boot_flag(&mut self, flag: u16) {
        self.put(BOOT_FLAG, &flag.to_le_bytes());
    }

    /// `boot_flag`.
    pub fn boot_flag(&self) -> u16 {
        self.get_u16(BOOT_FLAG)
    }

    /// Sets `header`; the kernel expects [`HEADER_MAGIC`] (`"HdrS"`).
    pub fn set_header(&mut self, magic: u32) {
        self.put(HEADER, &magic.to_le_bytes());
    }

    /// `header`.
    pub fn header(&self) -> u32 {
        self.get_u32(HEADER)
    }

    /// Copies a setup header, as read from a bzImage at offset `0x1f1`, into
    /// the page at [`SETUP_HEADER`].
    ///
    /// # Errors
    ///
    /// [`ZeroPageError::SetupHeaderTooLong`] if it would run past
    /// [`EDD_MBR_SIG_BUFFER`], the end of the room `struct boot_params` has
    /// for it; the page is then unchanged.
    pub fn set_setup_header(&mut self, header: &[u8]) -> Result<(), ZeroPageError> {
        let end = SETUP_HEADER.saturating_add(header.len());
        if end > EDD_MBR_SIG_BUFFER {
            return Err(ZeroPageError::SetupHeaderTooLong {
                end,
                max: EDD_MBR_SIG_BUFFER,
            });
        }
        self.put(SETUP_HEADER, header);
        Ok(())
    }

    /// `version`: the boot protocol version.
    pub fn version(&self) -> u16 {
        self.get_u16(VERSION)
    }

    /// Sets `type_of_loader`.
    pub fn set_type_of_loader(&mut self, loader: u8) {
        self.put(TYPE_OF_LOADER, &[loader]);
    }

    /// `type_of_loader`.
    pub fn type_of_loader(&self) -> u8 {
        self.get_u8(TYPE_OF_LOADER)
    }

    /// Sets `loadflags` (for example [`LOADED_HIGH`]).
    pub fn set_loadflags(&mut self, flags: u8) {
        self.put(LOADFLAGS, &[flags]);
    }

    /// `loadflags`.
    pub fn loadflags(&self) -> u8 {
        self.get_u8(LOADFLAGS)
    }

    /// Sets `kernel_alignment`.
    pub fn set_kernel_alignment(&mut self, alignment: u32) {
        self.put(KERNEL_ALIGNMENT, &alignment.to_le_bytes());
    }

    /// `kernel_alignment`.
    pub fn kernel_alignment(&self) -> u32 {
        self.get_u32(KERNEL_ALIGNMENT)
    }

    /// Sets `heap_end_ptr`, the end of the real-mode setup heap (valid with
    /// [`CAN_USE_HEAP`]).
    pub fn set_heap_end_ptr(&mut self, ptr: u16) {
        self.put(HEAP_END_PTR, &ptr.to_le_bytes());
    }

    /// `heap_end_ptr`.
    pub fn heap_end_ptr(&self) -> u16 {
        self.get_u16(HEAP_END_PTR)
    }

    /// Sets `code32_start`, the address of the loaded protected-mode code.
    pub fn set_code32_start(&mut self, addr: u32) {
        self.put(CODE32_START, &addr.to_le_bytes());
    }

    /// `code32_start`.
    pub fn code32_start(&self) -> u32 {
        self.get_u32(CODE32_START)
    }

    /// Points the kernel at a command line at `addr`: sets `cmd_line_ptr`
    /// and `ext_cmd_line_ptr` (the high 32 bits), leaving `cmdline_size`
    /// alone (a bzImage's header sets it to the kernel's limit).
    pub fn set_cmd_line_ptr(&mut self, addr: GuestAddress) {
        let [lo, hi] = split_u64(addr.0);
        self.put(CMD_LINE_PTR, &lo.to_le_bytes());
        self.put(EXT_CMD_LINE_PTR, &hi.to_le_bytes());
    }

    /// Points the kernel at a command line of `len` bytes (without its NUL)
    /// at `addr`: sets `cmd_line_ptr`, `ext_cmd_line_ptr` (the high 32 bits)
    /// and `cmdline_size`.
    pub fn set_cmdline(&mut self, addr: GuestAddress, len: u32) {
        self.set_cmd_line_ptr(addr);
        self.put(CMDLINE_SIZE, &len.to_le_bytes());
    }

    /// The command line address, from `cmd_line_ptr` and `ext_cmd_line_ptr`.
    pub fn cmd_line_ptr(&self) -> u64 {
        join_u64(self.get_u32(CMD_LINE_PTR), self.get_u32(EXT_CMD_LINE_PTR))
    }

    /// `cmdline_size`.
    pub fn cmdline_size(&self) -> u32 {
        self.get_u32(CMDLINE_SIZE)
    }

    /// Points the kernel at an initrd of `size` bytes at `addr`: sets
    /// `ramdisk_image`, `ext_ramdisk_image` (the high 32 bits),
    /// `ramdisk_size` and `ext_ramdisk_size` (zero).
    pub fn set_ramdisk(&mut self, addr: GuestAddress, size: u32) {
        let [lo, hi] = split_u64(addr.0);
        self.put(RAMDISK_IMAGE, &lo.to_le_bytes());
        self.put(EXT_RAMDISK_IMAGE, &hi.to_le_bytes());
        self.put(RAMDISK_SIZE, &size.to_le_bytes());
        self.put(EXT_RAMDISK_SIZE, &0u32.to_le_bytes());
    }

    /// The initrd address, from `ramdisk_image` and `ext_ramdisk_image`.
    pub fn ramdisk_image(&self) -> u64 {
        join_u64(self.get_u32(RAMDISK_IMAGE), self.get_u32(EXT_RAMDISK_IMAGE))
    }

    /// `ramdisk_size`.
    pub fn ramdisk_size(&self) -> u32 {
        self.get_u32(RAMDISK_SIZE)
    }

    /// Points the kernel at the ACPI RSDP at `addr`: sets `acpi_rsdp_addr`
    /// (offset `0x070`). 0 means none: the kernel then scans for it.
    ///
    /// ```
    /// use ember_arch::layout::ACPI_RSDP_START;
    /// use ember_boot::zero_page::BootParams;
    /// use vm_memory::GuestAddress;
    ///
    /// let mut params = BootParams::new();
    /// params.set_acpi_rsdp_addr(GuestAddress(ACPI_RSDP_START));
    /// assert_eq!(params.acpi_rsdp_addr(), 0xe0000);
    /// assert_eq!(params.as_bytes()[0x70..0x78], 0xe0000u64.to_le_bytes());
    /// ```
    pub fn set_acpi_rsdp_addr(&mut self, addr: GuestAddress) {
        self.put(ACPI_RSDP_ADDR, &addr.0.to_le_bytes());
    }

    /// `acpi_rsdp_addr`: the physical address of the ACPI RSDP (0: none).
    pub fn acpi_rsdp_addr(&self) -> u64 {
        u64::from_le_bytes(le::get(&self.bytes, ACPI_RSDP_ADDR))
    }

    /// Replaces the e820 map: sets `e820_entries` and fills `e820_table`,
    /// zeroing unused slots.
    ///
    /// # Errors
    ///
    /// [`ZeroPageError::TooManyE820Entries`] if there are more than
    /// [`E820_MAX_ENTRIES`] entries; the page is then unchanged.
    pub fn set_e820(&mut self, entries: &[E820Entry]) -> Result<(), ZeroPageError> {
        let count = u8::try_from(entries.len())
            .ok()
            .filter(|&n| usize::from(n) <= E820_MAX_ENTRIES)
            .ok_or(ZeroPageError::TooManyE820Entries {
                count: entries.len(),
                max: E820_MAX_ENTRIES,
            })?;
        let table_end = E820_TABLE + E820_MAX_ENTRIES * E820Entry::SIZE;
        if let Some(table) = self.bytes.get_mut(E820_TABLE..table_end) {
            table.fill(0);
            for (slot, entry) in table.chunks_exact_mut(E820Entry::SIZE).zip(entries) {
                slot.copy_from_slice(&entry.to_bytes());
            }
        }
        self.put(E820_ENTRIES, &[count]);
        Ok(())
    }

    /// `e820_entries`: the number of valid e820 entries.
    pub fn e820_entries(&self) -> u8 {
        self.get_u8(E820_ENTRIES)
    }

    /// The valid entries of `e820_table` (at most [`E820_MAX_ENTRIES`],
    /// whatever `e820_entries` says).
    pub fn e820_table(&self) -> Vec<E820Entry> {
        let count = usize::from(self.e820_entries()).min(E820_MAX_ENTRIES);
        (0..count)
            .map(|i| E820Entry::from_bytes(&le::get(&self.bytes, E820_TABLE + i * E820Entry::SIZE)))
            .collect()
    }

    /// Writes the page to guest memory at `addr`.
    ///
    /// # Errors
    ///
    /// [`GuestWriteError::OutsideGuestMemory`] if the page does not fit at `addr`
    /// (nothing is written), or [`GuestWriteError::Write`].
    pub fn write_to<M: GuestMemory>(
        &self,
        mem: &M,
        addr: GuestAddress,
    ) -> Result<(), GuestWriteError> {
        write_bytes(mem, "zero page", &self.bytes, addr.0)
    }
}

impl Default for BootParams {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for BootParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootParams")
            .field("boot_flag", &format_args!("{:#x}", self.boot_flag()))
            .field("header", &format_args!("{:#x}", self.header()))
            .field(
                "type_of_loader",
                &format_args!("{:#x}", self.type_of_loader()),
            )
            .field("loadflags", &format_args!("{:#x}", self.loadflags()))
            .field("cmd_line_ptr", &format_args!("{:#x}", self.cmd_line_ptr()))
            .field("cmdline_size", &self.cmdline_size())
            .field(
                "ramdisk_image",
                &format_args!("{:#x}", self.ramdisk_image()),
            )
            .field("ramdisk_size", &self.ramdisk_size())
            .field(
                "acpi_rsdp_addr",
                &format_args!("{:#x}", self.acpi_rsdp_addr()),
            )
            .field("e820_table", &self.e820_table())
            .finish_non_exhaustive()
    }
}

/// Splits a 64-bit address into its low and high 32-bit halves.
fn split_u64(value: u64) -> [u32; 2] {
    [value as u32, (value >> 32) as u32]
}

/// Joins low and high 32-bit halves into a 64-bit value.
fn join_u64(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | (u64::from(hi) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e820::{E820_RAM, E820_RESERVED};
    use crate::testing::{filled_mem, read};

    fn at<const N: usize>(p: &BootParams, off: usize) -> [u8; N] {
        p.as_bytes()[off..off + N].try_into().unwrap()
    }

    /// `struct setup_header` from bootparam.h: (offset constant, field size)
    /// in declaration order. The struct is packed, so each field must start
    /// where the previous one ends.
    const SETUP_HEADER_FIELDS: &[(usize, usize)] = &[
        (SETUP_SECTS, 1),
        (ROOT_FLAGS, 2),
        (SYSSIZE, 4),
        (RAM_SIZE, 2),
        (VID_MODE, 2),
        (ROOT_DEV, 2),
        (BOOT_FLAG, 2),
        (JUMP, 2),
        (HEADER, 4),
        (VERSION, 2),
        (REALMODE_SWTCH, 4),
        (START_SYS_SEG, 2),
        (KERNEL_VERSION, 2),
        (TYPE_OF_LOADER, 1),
        (LOADFLAGS, 1),
        (SETUP_MOVE_SIZE, 2),
        (CODE32_START, 4),
        (RAMDISK_IMAGE, 4),
        (RAMDISK_SIZE, 4),
        (BOOTSECT_KLUDGE, 4),
        (HEAP_END_PTR, 2),
        (EXT_LOADER_VER, 1),
        (EXT_LOADER_TYPE, 1),
        (CMD_LINE_PTR, 4),
        (INITRD_ADDR_MAX, 4),
        (KERNEL_ALIGNMENT, 4),
        (RELOCATABLE_KERNEL, 1),
        (MIN_ALIGNMENT, 1),
        (XLOADFLAGS, 2),
        (CMDLINE_SIZE, 4),
        (HARDWARE_SUBARCH, 4),
        (HARDWARE_SUBARCH_DATA, 8),
        (PAYLOAD_OFFSET, 4),
        (PAYLOAD_LENGTH, 4),
        (SETUP_DATA, 8),
        (PREF_ADDRESS, 8),
        (INIT_SIZE, 4),
        (HANDOVER_OFFSET, 4),
        (KERNEL_INFO_OFFSET, 4),
    ];

    #[test]
    fn setup_header_offsets_are_packed_in_kernel_order() {
        let mut expected = SETUP_HEADER;
        for &(offset, size) in SETUP_HEADER_FIELDS {
            assert_eq!(offset, expected, "field at {offset:#x}");
            expected += size;
        }
        assert_eq!(expected, SETUP_HEADER_END);
        // Spot checks against Documentation/arch/x86/boot.rst.
        assert_eq!(
            (BOOT_FLAG, HEADER, VERSION, TYPE_OF_LOADER, LOADFLAGS),
            (0x1fe, 0x202, 0x206, 0x210, 0x211)
        );
        assert_eq!(
            (RAMDISK_IMAGE, RAMDISK_SIZE, CMD_LINE_PTR, INITRD_ADDR_MAX),
            (0x218, 0x21c, 0x228, 0x22c)
        );
        assert_eq!((KERNEL_ALIGNMENT, CMDLINE_SIZE), (0x230, 0x238));
        assert_eq!((E820_ENTRIES, E820_TABLE), (0x1e8, 0x2d0));
        assert_eq!(HEADER_MAGIC.to_le_bytes(), *b"HdrS");
    }

    #[test]
    fn new_is_all_zero() {
        let p = BootParams::new();
        assert!(p.as_bytes().iter().all(|&b| b == 0));
        assert_eq!(p, BootParams::default());
        assert!(p.e820_table().is_empty());
    }

    #[test]
    fn setters_land_at_documented_offsets() {
        let mut p = BootParams::new();
        p.set_boot_flag(BOOT_FLAG_MAGIC);
        p.set_header(HEADER_MAGIC);
        p.set_type_of_loader(TYPE_OF_LOADER_UNDEFINED);
        p.set_loadflags(LOADED_HIGH | CAN_USE_HEAP);
        p.set_kernel_alignment(0x0100_0000);
        assert_eq!(at::<2>(&p, 0x1fe), [0x55, 0xaa]);
        assert_eq!(&at::<4>(&p, 0x202), b"HdrS");
        assert_eq!(at::<1>(&p, 0x210), [0xff]);
        assert_eq!(at::<1>(&p, 0x211), [0x81]);
        assert_eq!(at::<4>(&p, 0x230), [0, 0, 0, 1]);
        assert_eq!(p.boot_flag(), 0xaa55);
        assert_eq!(p.header(), HEADER_MAGIC);
        assert_eq!(p.type_of_loader(), 0xff);
        assert_eq!(p.loadflags(), 0x81);
        assert_eq!(p.kernel_alignment(), 0x0100_0000);
        // Nothing else was touched.
        let touched = [0x1fe..0x200, 0x202..0x206, 0x210..0x212, 0x230..0x234];
        for (i, &b) in p.as_bytes().iter().enumerate() {
            if !touched.iter().any(|r| r.contains(&i)) {
                assert_eq!(b, 0, "byte {i:#x}");
            }
        }
    }

    #[test]
    fn cmdline_pointer_and_size() {
        let mut p = BootParams::new();
        p.set_cmdline(GuestAddress(0x20000), 42);
        assert_eq!(at::<4>(&p, 0x228), 0x20000u32.to_le_bytes());
        assert_eq!(at::<4>(&p, 0x0c8), [0; 4]);
        assert_eq!(at::<4>(&p, 0x238), 42u32.to_le_bytes());
        assert_eq!((p.cmd_line_ptr(), p.cmdline_size()), (0x20000, 42));
        // Above 4 GiB the high half goes to ext_cmd_line_ptr.
        p.set_cmdline(GuestAddress(0x1_2345_6000), 7);
        assert_eq!(at::<4>(&p, 0x228), 0x2345_6000u32.to_le_bytes());
        assert_eq!(at::<4>(&p, 0x0c8), 1u32.to_le_bytes());
        assert_eq!(p.cmd_line_ptr(), 0x1_2345_6000);
    }

    #[test]
    fn ramdisk_pointer_and_size() {
        let mut p = BootParams::new();
        p.set_ramdisk(GuestAddress(0x2_0f00_0000), 0x80_0000);
        assert_eq!(at::<4>(&p, 0x218), 0x0f00_0000u32.to_le_bytes());
        assert_eq!(at::<4>(&p, 0x0c0), 2u32.to_le_bytes());
        assert_eq!(at::<4>(&p, 0x21c), 0x80_0000u32.to_le_bytes());
        assert_eq!(at::<4>(&p, 0x0c4), [0; 4]);
        assert_eq!(p.ramdisk_image(), 0x2_0f00_0000);
        assert_eq!(p.ramdisk_size(), 0x80_0000);
    }

    #[test]
    fn acpi_rsdp_address() {
        let mut p = BootParams::new();
        assert_eq!(p.acpi_rsdp_addr(), 0);
        p.set_acpi_rsdp_addr(GuestAddress(0x1_2345_6789));
        assert_eq!(at::<8>(&p, 0x070), 0x1_2345_6789u64.to_le_bytes());
        assert_eq!(p.acpi_rsdp_addr(), 0x1_2345_6789);
        // Nothing else was touched.
        for (i, &b) in p.as_bytes().iter().enumerate() {
            if !(0x070..0x078).contains(&i) {
                assert_eq!(b, 0, "byte {i:#x}");
            }
        }
    }

    fn entries(n: usize) -> Vec<E820Entry> {
        (0..n as u64)
            .map(|i| E820Entry {
                addr: i << 32,
                size: 0x1000 + i,
                kind: if i % 2 == 0 { E820_RAM } else { E820_RESERVED },
            })
            .collect()
    }

    #[test]
    fn e820_count_and_byte_layout() {
        let mut p = BootParams::new();
        let map = entries(3);
        p.set_e820(&map).unwrap();
        assert_eq!(at::<1>(&p, 0x1e8), [3]);
        assert_eq!(p.e820_entries(), 3);
        // Entry 1 at 0x2d0 + 20: addr u64, size u64, type u32, packed.
        let base = 0x2d0 + 20;
        assert_eq!(at::<8>(&p, base), (1u64 << 32).to_le_bytes());
        assert_eq!(at::<8>(&p, base + 8), 0x1001u64.to_le_bytes());
        assert_eq!(at::<4>(&p, base + 16), E820_RESERVED.to_le_bytes());
        assert_eq!(p.e820_table(), map);
        // Replacing with a shorter map clears the old entries.
        p.set_e820(&map[..1]).unwrap();
        assert_eq!(p.e820_table(), map[..1]);
        assert!(p.as_bytes()[0x2d0 + 20..0xcd0].iter().all(|&b| b == 0));
    }

    #[test]
    fn e820_full_table_fits_exactly() {
        let mut p = BootParams::new();
        let map = entries(E820_MAX_ENTRIES);
        p.set_e820(&map).unwrap();
        assert_eq!(p.e820_entries(), 128);
        let last = 0x2d0 + 127 * 20;
        assert_eq!(at::<8>(&p, last), (127u64 << 32).to_le_bytes());
        assert_eq!(last + 20, 0xcd0);
        assert!(p.as_bytes()[0xcd0..].iter().all(|&b| b == 0));
        assert_eq!(p.e820_table(), map);
    }

    #[test]
    fn too_many_e820_entries_rejected() {
        let mut p = BootParams::new();
        p.set_e820(&entries(2)).unwrap();
        let before = p.clone();
        for n in [129, 256, 300] {
            let err = p.set_e820(&entries(n)).unwrap_err();
            assert!(matches!(
                err,
                ZeroPageError::TooManyE820Entries { count, max: 128 } if count == n
            ));
            assert_eq!(p, before);
        }
    }

    #[test]
    fn e820_table_getter_bounded_by_table_size() {
        let mut bytes = [0u8; ZERO_PAGE_SIZE];
        bytes[E820_ENTRIES] = 255; // corrupt count
        assert_eq!(BootParams::from_bytes(bytes).e820_table().len(), 128);
    }

    #[test]
    fn write_to_guest_memory() {
        let mem = filled_mem(1 << 20, 0xee);
        let mut p = BootParams::new();
        p.set_header(HEADER_MAGIC);
        p.write_to(&mem, GuestAddress(0x7000)).unwrap();
        assert_eq!(read(&mem, 0x7000, 4096), p.as_bytes());
        assert_eq!(read(&mem, 0x7202, 4), b"HdrS");
        assert_eq!(read(&mem, 0x8000, 1), [0xee]);
        // Straddling the end of memory: error, nothing written.
        let err = p.write_to(&mem, GuestAddress((1 << 20) - 100)).unwrap_err();
        assert!(matches!(
            err,
            GuestWriteError::OutsideGuestMemory {
                what: "zero page",
                len: 4096,
                ..
            }
        ));
        assert!(read(&mem, (1 << 20) - 100, 100).iter().all(|&b| b == 0xee));
        assert!(p.write_to(&mem, GuestAddress(u64::MAX - 10)).is_err());
    }

    #[test]
    fn debug_summarises() {
        let s = format!("{:?}", BootParams::new());
        assert!(s.starts_with("BootParams {"), "{s}");
        assert!(s.len() < 400, "{s}");
    }
}

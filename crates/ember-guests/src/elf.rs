//! Wrapping flat guest code in a minimal ELF64 executable, so test guests go through
//! the same loader as a kernel.

/// Where Ember's guests are linked: 1 MiB, the lowest address a kernel may load at.
pub const GUEST_LOAD_ADDR: u64 = 0x10_0000;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// File offset of the code: one page in, so offset and address agree modulo the page
/// size as the ELF spec asks.
const CODE_OFFSET: usize = 0x1000;

/// Builds an `ET_EXEC` x86-64 ELF with one read/write/execute `PT_LOAD` segment holding
/// `code` at physical and virtual address `load_addr`, followed by `bss` zeroed bytes.
/// The entry point is `load_addr`.
///
/// ```
/// let image = ember_guests::elf::flat_elf(0x10_0000, &[0xf4], 0x1000);
/// assert_eq!(image.len(), 0x1001);
/// assert_eq!(image[0x1000], 0xf4);
/// ```
pub fn flat_elf(load_addr: u64, code: &[u8], bss: u64) -> Vec<u8> {
    let mut image = vec![0u8; CODE_OFFSET];
    let mut put = |off: usize, bytes: &[u8]| image[off..off + bytes.len()].copy_from_slice(bytes);
    // e_ident: magic, 64-bit, little-endian, version 1, System V ABI.
    put(0, b"\x7fELF\x02\x01\x01\x00");
    put(16, &2u16.to_le_bytes()); // e_type: ET_EXEC
    put(18, &62u16.to_le_bytes()); // e_machine: EM_X86_64
    put(20, &1u32.to_le_bytes()); // e_version
    put(24, &load_addr.to_le_bytes()); // e_entry
    put(32, &(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    put(52, &(EHDR_SIZE as u16).to_le_bytes()); // e_ehsize
    put(54, &(PHDR_SIZE as u16).to_le_bytes()); // e_phentsize
    put(56, &1u16.to_le_bytes()); // e_phnum
    let ph = EHDR_SIZE;
    put(ph, &1u32.to_le_bytes()); // p_type: PT_LOAD
    put(ph + 4, &7u32.to_le_bytes()); // p_flags: RWX
    put(ph + 8, &(CODE_OFFSET as u64).to_le_bytes()); // p_offset
    put(ph + 16, &load_addr.to_le_bytes()); // p_vaddr
    put(ph + 24, &load_addr.to_le_bytes()); // p_paddr
    put(ph + 32, &(code.len() as u64).to_le_bytes()); // p_filesz
    put(ph + 40, &(code.len() as u64 + bss).to_le_bytes()); // p_memsz
    put(ph + 48, &0x1000u64.to_le_bytes()); // p_align
    image.extend_from_slice(code);
    image
}

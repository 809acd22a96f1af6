//! Wrapping flat guest code in a minimal ELF64 executable, so test guests go through
//! the same loader as a kernel.

/// Where Ember's guests are linked: 1 MiB, the lowest address a kernel may load at.
pub const GUEST_LOAD_ADDR: u64 = 0x10_0000;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// File offset of the code: one page in, so offset and address agree modulo the page
/// size as the ELF spec asks.
const CODE_OFFSET: usize = 0x1000;

/// File offset of the `PT_NOTE` segment, when there is one: after the headers, before
/// the code.
const NOTE_OFFSET: usize = 0x100;

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the ELF note type that gives a PVH kernel's 32-bit entry.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

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
    build(load_addr, code, bss, None)
}

/// [`flat_elf`] plus a `PT_NOTE` segment holding the Xen `XEN_ELFNOTE_PHYS32_ENTRY` note
/// with `load_addr` as the PVH entry, so the image boots through PVH in Ember and in
/// other VMMs (QEMU's `-M microvm -kernel`) alike. The note's descriptor is 8 bytes, as
/// Linux's is (QEMU reads it as a pointer-sized value).
///
/// ```
/// let image = ember_guests::elf::pvh_elf(0x10_0000, &[0xf4], 0);
/// assert_eq!(&image[..4], b"\x7fELF");
/// assert_eq!(image[0x1000], 0xf4);
/// ```
pub fn pvh_elf(load_addr: u64, code: &[u8], bss: u64) -> Vec<u8> {
    let mut note = Vec::with_capacity(24);
    note.extend_from_slice(&4u32.to_le_bytes()); // n_namesz ("Xen\0")
    note.extend_from_slice(&8u32.to_le_bytes()); // n_descsz
    note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes()); // n_type
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&load_addr.to_le_bytes());
    build(load_addr, code, bss, Some(&note))
}

fn build(load_addr: u64, code: &[u8], bss: u64, note: Option<&[u8]>) -> Vec<u8> {
    let mut image = vec![0u8; CODE_OFFSET];
    let mut put = |off: usize, bytes: &[u8]| image[off..off + bytes.len()].copy_from_slice(bytes);
    let phnum: u16 = if note.is_some() { 2 } else { 1 };
    // e_ident: magic, 64-bit, little-endian, version 1, System V ABI.
    put(0, b"\x7fELF\x02\x01\x01\x00");
    put(16, &2u16.to_le_bytes()); // e_type: ET_EXEC
    put(18, &62u16.to_le_bytes()); // e_machine: EM_X86_64
    put(20, &1u32.to_le_bytes()); // e_version
    put(24, &load_addr.to_le_bytes()); // e_entry
    put(32, &(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    put(52, &(EHDR_SIZE as u16).to_le_bytes()); // e_ehsize
    put(54, &(PHDR_SIZE as u16).to_le_bytes()); // e_phentsize
    put(56, &phnum.to_le_bytes()); // e_phnum
    let ph = EHDR_SIZE;
    put(ph, &1u32.to_le_bytes()); // p_type: PT_LOAD
    put(ph + 4, &7u32.to_le_bytes()); // p_flags: RWX
    put(ph + 8, &(CODE_OFFSET as u64).to_le_bytes()); // p_offset
    put(ph + 16, &load_addr.to_le_bytes()); // p_vaddr
    put(ph + 24, &load_addr.to_le_bytes()); // p_paddr
    put(ph + 32, &(code.len() as u64).to_le_bytes()); // p_filesz
    put(ph + 40, &(code.len() as u64 + bss).to_le_bytes()); // p_memsz
    put(ph + 48, &0x1000u64.to_le_bytes()); // p_align
    if let Some(note) = note {
        let ph = EHDR_SIZE + PHDR_SIZE;
        put(ph, &4u32.to_le_bytes()); // p_type: PT_NOTE
        put(ph + 4, &4u32.to_le_bytes()); // p_flags: R
        put(ph + 8, &(NOTE_OFFSET as u64).to_le_bytes()); // p_offset
        put(ph + 32, &(note.len() as u64).to_le_bytes()); // p_filesz
        put(ph + 40, &(note.len() as u64).to_le_bytes()); // p_memsz
        put(ph + 48, &4u64.to_le_bytes()); // p_align
        put(NOTE_OFFSET, note);
    }
    image.extend_from_slice(code);
    image
}

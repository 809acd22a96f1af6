//! Test helpers: hand-made ELF64 images and small guest memories.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// One program header for [`build_elf`].
#[derive(Clone, Copy, Debug)]
pub struct Phdr {
    pub p_type: u32,
    pub offset: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// The fields of an ELF64 image that tests tweak.
#[derive(Clone, Debug)]
pub struct ElfSpec {
    pub class: u8,
    pub data: u8,
    pub e_type: u16,
    pub machine: u16,
    pub entry: u64,
    pub phoff: u64,
    pub phentsize: u16,
    /// `None`: the number of `phdrs`.
    pub phnum: Option<u16>,
    pub phdrs: Vec<Phdr>,
    /// Appended after the program header table.
    pub payload: Vec<u8>,
}

pub const EHDR: u64 = 64;
pub const PHDR: u64 = 56;

impl ElfSpec {
    /// A valid image with one PT_LOAD segment per `(paddr, data, memsz)`,
    /// data laid out back to back after the program headers; entry at the
    /// first segment.
    pub fn with_segments(segments: &[(u64, &[u8], u64)]) -> Self {
        let mut offset = EHDR + PHDR * segments.len() as u64;
        let mut phdrs = Vec::new();
        let mut payload = Vec::new();
        for &(paddr, data, memsz) in segments {
            phdrs.push(Phdr {
                p_type: 1,
                offset,
                paddr,
                filesz: data.len() as u64,
                memsz,
            });
            payload.extend_from_slice(data);
            offset += data.len() as u64;
        }
        Self {
            class: 2,
            data: 1,
            e_type: 2,
            machine: 62,
            entry: segments.first().map_or(0, |s| s.0),
            phoff: EHDR,
            phentsize: PHDR as u16,
            phnum: None,
            phdrs,
            payload,
        }
    }

    /// Appends a program header, moving the payload (and the existing
    /// headers' file offsets) one header further into the file.
    pub fn push_phdr(&mut self, phdr: Phdr) {
        for p in &mut self.phdrs {
            p.offset += PHDR;
        }
        self.phdrs.push(phdr);
    }

    pub fn build(&self) -> Vec<u8> {
        let mut elf = Vec::new();
        elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', self.class, self.data, 1]);
        elf.resize(16, 0);
        elf.extend_from_slice(&self.e_type.to_le_bytes());
        elf.extend_from_slice(&self.machine.to_le_bytes());
        elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
        elf.extend_from_slice(&self.entry.to_le_bytes());
        elf.extend_from_slice(&self.phoff.to_le_bytes());
        elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        elf.extend_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
        elf.extend_from_slice(&self.phentsize.to_le_bytes());
        let phnum = self.phnum.unwrap_or(self.phdrs.len() as u16);
        elf.extend_from_slice(&phnum.to_le_bytes());
        elf.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
        assert_eq!(elf.len() as u64, EHDR);
        for p in &self.phdrs {
            elf.extend_from_slice(&p.p_type.to_le_bytes());
            elf.extend_from_slice(&7u32.to_le_bytes()); // p_flags: RWX
            elf.extend_from_slice(&p.offset.to_le_bytes());
            elf.extend_from_slice(&(p.paddr | 0xffff_ffff_8000_0000).to_le_bytes()); // p_vaddr
            elf.extend_from_slice(&p.paddr.to_le_bytes());
            elf.extend_from_slice(&p.filesz.to_le_bytes());
            elf.extend_from_slice(&p.memsz.to_le_bytes());
            elf.extend_from_slice(&0x20_0000u64.to_le_bytes()); // p_align
        }
        elf.extend_from_slice(&self.payload);
        elf
    }
}

/// Guest memory with one region of `size` bytes at 0, filled with `fill`.
pub fn filled_mem(size: usize, fill: u8) -> GuestMemoryMmap<()> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
    let page = vec![fill; 4096];
    for addr in (0..size as u64).step_by(4096) {
        mem.write_slice(&page, GuestAddress(addr)).unwrap();
    }
    mem
}

/// Reads `len` bytes of guest memory at `addr`.
pub fn read(mem: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

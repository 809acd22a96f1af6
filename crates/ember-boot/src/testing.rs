//! Test helpers: hand-made ELF64 images (with notes), bzImages and small
//! guest memories.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// One program header for [`build_elf`].
#[derive(Clone, Copy, Debug)]
pub struct Phdr {
    pub p_type: u32,
    pub offset: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
    pub align: u64,
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
                align: 0x20_0000,
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

    /// Appends a PT_NOTE program header whose file bytes are `notes`,
    /// placed at the end of the payload. Returns its index.
    pub fn push_note_segment(&mut self, notes: &[u8], align: u64) -> usize {
        self.push_phdr(Phdr {
            p_type: 4,
            offset: 0,
            paddr: 0,
            filesz: notes.len() as u64,
            memsz: notes.len() as u64,
            align,
        });
        let offset = EHDR + PHDR * self.phdrs.len() as u64 + self.payload.len() as u64;
        let index = self.phdrs.len() - 1;
        self.phdrs[index].offset = offset;
        self.payload.extend_from_slice(notes);
        index
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
            elf.extend_from_slice(&p.align.to_le_bytes());
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

/// One ELF note: header, then name and descriptor each padded to `align`.
pub fn note(name: &[u8], n_type: u32, desc: &[u8], align: usize) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    out.extend_from_slice(&n_type.to_le_bytes());
    out.extend_from_slice(name);
    out.resize(out.len().next_multiple_of(align), 0);
    out.extend_from_slice(desc);
    out.resize(out.len().next_multiple_of(align), 0);
    out
}

/// The fields of a bzImage that tests tweak. The image is `setup_sects`
/// sectors of setup code after the boot sector, then `kernel_len` bytes of
/// protected-mode kernel filled with a pattern.
#[derive(Clone, Debug)]
pub struct BzSpec {
    pub setup_sects: u8,
    pub boot_flag: u16,
    pub magic: [u8; 4],
    pub version: u16,
    /// The byte at 0x201: the setup header ends at 0x202 + this.
    pub jump: u8,
    pub loadflags: u8,
    pub xloadflags: u16,
    pub initrd_addr_max: u32,
    pub kernel_alignment: u32,
    pub relocatable: u8,
    pub cmdline_size: u32,
    pub pref_address: u64,
    pub init_size: u32,
    pub kernel_len: usize,
}

impl Default for BzSpec {
    /// A valid 64-bit relocatable bzImage, protocol 2.15.
    fn default() -> Self {
        Self {
            setup_sects: 4,
            boot_flag: 0xaa55,
            magic: *b"HdrS",
            version: 0x020f,
            jump: 0x6a, // header ends at 0x26c
            loadflags: 0x01,
            xloadflags: 0x03,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable: 1,
            cmdline_size: 2047,
            pref_address: 0x100_0000,
            init_size: 0x40_0000,
            kernel_len: 0x400,
        }
    }
}

/// Byte `i` of the protected-mode kernel of a [`BzSpec`] image.
pub fn bz_kernel_byte(i: usize) -> u8 {
    (i as u8) ^ ((i >> 8) as u8) ^ 0x5a
}

impl BzSpec {
    /// Offset of the protected-mode kernel.
    pub fn kernel_offset(&self) -> usize {
        let sects = if self.setup_sects == 0 {
            4
        } else {
            self.setup_sects
        };
        (usize::from(sects) + 1) * 512
    }

    pub fn build(&self) -> Vec<u8> {
        let mut img = vec![0u8; self.kernel_offset()];
        let mut put = |off: usize, bytes: &[u8]| img[off..off + bytes.len()].copy_from_slice(bytes);
        put(0x1f1, &[self.setup_sects]);
        put(0x1fe, &self.boot_flag.to_le_bytes());
        put(0x200, &[0xeb, self.jump]);
        put(0x202, &self.magic);
        put(0x206, &self.version.to_le_bytes());
        put(0x211, &[self.loadflags]);
        put(0x214, &0x10_0000u32.to_le_bytes()); // code32_start
        put(0x22c, &self.initrd_addr_max.to_le_bytes());
        put(0x230, &self.kernel_alignment.to_le_bytes());
        put(0x234, &[self.relocatable, 21]); // relocatable_kernel, min_alignment
        put(0x236, &self.xloadflags.to_le_bytes());
        put(0x238, &self.cmdline_size.to_le_bytes());
        put(0x258, &self.pref_address.to_le_bytes());
        put(0x260, &self.init_size.to_le_bytes());
        // Setup code after the header: must not be copied to the zero page.
        let end = 0x202 + usize::from(self.jump);
        for b in img.iter_mut().skip(end).take(0x20) {
            *b = 0xcc;
        }
        img.extend((0..self.kernel_len).map(bz_kernel_byte));
        img
    }
}

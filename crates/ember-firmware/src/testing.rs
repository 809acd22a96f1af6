//! Test helpers: small guest memories.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// `size` bytes of guest memory at 0, every byte `fill`.
pub fn filled_mem(size: usize, fill: u8) -> GuestMemoryMmap<()> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
    mem.write_slice(&vec![fill; size], GuestAddress(0)).unwrap();
    mem
}

/// `len` bytes of guest memory at `addr`.
pub fn read(mem: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

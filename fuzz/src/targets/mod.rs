//! One module per fuzz target, each with `pub fn run(data: &[u8])`.

pub mod boot_bzimage;
pub mod boot_elf;
pub mod boot_pvh;
pub mod boot_tables;
pub mod bus;
pub mod cmdline;
pub mod i8042;
pub mod initrd;
pub mod rate_limiter;
pub mod serial;
pub mod snapshot_state;
pub mod virtio_blk;
pub mod virtio_mmio;
pub mod virtio_net;
pub mod virtio_queue;
pub mod virtio_rng;

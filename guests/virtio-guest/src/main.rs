//! Ember's Rust test guest for virtio devices.
//!
//! Ember loads it at 1 MiB and enters `_start` (see [`rt`]) through the Linux 64-bit
//! boot protocol; `_start` drops to user mode (CPL3), where nested KVM runs code
//! natively, and calls [`guest_main`]. The guest reports on COM1 and ends the VM through
//! Ember's debug-exit port: code 0 on success, 101 on a panic.
//!
//! Build it with `ember_guests::rust_guest::build_guest("virtio-guest")`, which passes
//! the flags it needs (a linker script, no start files, static relocation model).

#![no_std]
#![no_main]

extern crate alloc;

mod cmdline;
mod rt;
mod serial;
mod virtio;

use alloc::vec::Vec;
use core::hint::black_box;

/// Number of elements in the milestone's vector.
const VEC_LEN: u64 = 100_000;

/// The Rust entry point, entered from `_start` at CPL3 with the zero page's address.
#[no_mangle]
pub extern "C" fn guest_main(zero_page: u64) -> ! {
    println!("virtio-guest: running at CPL3");
    let cs: u16;
    // SAFETY: reads CS.
    unsafe {
        core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags))
    };
    println!("virtio-guest: CS = {cs:#x}, CPL: {}", cs & 3);
    assert_eq!(cs & 3, 3, "not running in user mode");

    // SAFETY: Ember passes the zero page, and the command line it points to, in
    // identity-mapped memory.
    let cmdline = unsafe { cmdline::read(zero_page) };
    println!("virtio-guest: cmdline: {cmdline}");
    let devices = cmdline::virtio_mmio_devices(cmdline);

    // The heap, SSE (Rust zeroes, copies and does floating point with it) and float
    // formatting, all in user mode.
    let mut values = Vec::new();
    for i in 0..VEC_LEN {
        values.push(black_box(i));
    }
    let sum: u64 = black_box(&values).iter().sum();
    let mean = sum as f64 / values.len() as f64;
    let half_sum: f64 = values.iter().map(|&v| v as f64 * 0.5).sum();
    println!(
        "virtio-guest: vec of {} u64: sum {sum}, mean {mean:.3}, half sum {half_sum:.1e}",
        values.len()
    );
    assert_eq!(sum, VEC_LEN * (VEC_LEN - 1) / 2);

    println!(
        "virtio-guest: {} virtio-mmio device(s) on the command line",
        devices.len()
    );
    for device in &devices {
        println!("virtio-guest: virtio-mmio device: {device}");
    }
    println!("virtio-guest: DMA page at {:#x}", virtio::check_dma());
    virtio::probe_virtio_mmio(&devices);

    println!("virtio-guest: done");
    rt::exit(0)
}

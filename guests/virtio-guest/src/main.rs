//! Ember's Rust test guest for virtio devices.
//!
//! Ember loads it at 1 MiB and enters `_start` (see [`rt`]) through the Linux 64-bit
//! boot protocol; `_start` drops to user mode (CPL3), where nested KVM runs code
//! natively, and calls [`guest_main`]. The guest reports on COM1 and ends the VM through
//! Ember's debug-exit port: code 0 on success, 101 on a panic.
//!
//! Build it with `ember_guests::rust_guest::build_guest("virtio-guest")`, which passes
//! the flags it needs (a linker script, no start files, static relocation model).
//!
//! What it does comes from its command line, `ember.test=<scenario>`:
//! - none: the user-mode, heap and float checks, and a probe of every virtio-mmio device;
//! - `blk`: the first virtio-blk disk: capacity, sector 0 as text, a pattern written to
//!   sector 1, flushed and read back;
//! - `blk-ro`: a read-only disk: reads work, a write fails with IOERR;
//! - `blk-flush`: a pattern written to sectors 8..16 and flushed, then
//!   `virtio-guest: blk-flush flushed` and a spin forever (the host kills the VMM);
//! - `blk-bench`: `ember.mib=<n>` MiB (default 64) read then written in 64 KiB requests,
//!   with `bench ...` lines for the host to time (`ember.verify=1` checks sector tags);
//! - `rng`: two 64-byte requests to virtio-rng;
//! - `rng-saturate`, `net-tx-saturate`: `ember.bytes=<n>` bytes (default 4 MiB) from
//!   virtio-rng or out of virtio-net as fast as the device allows, in requests of
//!   `ember.req=<n>` bytes (default 4096 and 1526), with `saturate ...` lines for the
//!   host to time (see [`saturate`]);
//! - `net-rx-saturate`: frames received from virtio-net as fast as they arrive, until
//!   `ember.bytes=<n>` bytes (default 4 MiB) or `ember.frames=<n>` frames have come,
//!   with the same `saturate ...` lines;
//! - `net`: an ARP request for 10.0.2.1 on virtio-net, and the reply;
//! - `snapshot`: a long deterministic computation over memory and the first disk, for
//!   the snapshot tests (see [`snapshot`]);
//! - `calibrate`: `ember.polls=<n>` polling iterations between two lines, to measure
//!   [`virtio::POLLS_PER_SECOND`] from the host.
//!
//! A scenario ends with exit code 0 on success; on failure it prints
//! `virtio-guest: <scenario> FAIL: <why>` and exits with 1 (2 for an unknown scenario).
//! `ember.log=<level>` shows virtio-drivers' log messages (default `warn`).

#![no_std]
#![no_main]

extern crate alloc;

mod blk;
mod cmdline;
mod logger;
mod net;
mod rng;
mod rt;
mod saturate;
mod serial;
mod snapshot;
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
    logger::init(cmdline::param(cmdline, "ember.log"));

    if let Some(scenario) = cmdline::param(cmdline, "ember.test") {
        run_scenario(scenario, cmdline, &devices);
    }

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

/// Runs `ember.test=<scenario>` and ends the VM: exit code 0 on success, 1 on failure,
/// 2 for an unknown scenario or parameter.
fn run_scenario(scenario: &str, cmdline: &str, devices: &[cmdline::VirtioMmioDevice]) -> ! {
    println!("virtio-guest: scenario {scenario}");
    let number = |key: &str, default: u64| -> u64 {
        match cmdline::param(cmdline, key) {
            None => default,
            Some(value) => value.parse().unwrap_or_else(|_| {
                println!("virtio-guest: {scenario} FAIL: {key}={value} is not a number");
                rt::exit(2)
            }),
        }
    };
    let result = match scenario {
        "blk" => blk::blk(devices),
        "blk-ro" => blk::blk_ro(devices),
        "blk-flush" => blk::blk_flush(devices),
        "blk-bench" => blk::bench(
            devices,
            number("ember.mib", 64),
            number("ember.verify", 0) != 0,
        ),
        "rng" => rng::rng(devices),
        "rng-saturate" => saturate::rng(
            devices,
            number("ember.bytes", 4 << 20),
            number("ember.req", 4096),
        ),
        "net-tx-saturate" => saturate::net_tx(
            devices,
            number("ember.bytes", 4 << 20),
            number("ember.req", 1526),
        ),
        "net-rx-saturate" => saturate::net_rx(
            devices,
            number("ember.bytes", 4 << 20),
            number("ember.frames", 0),
        ),
        "net" => net::net(devices),
        "snapshot" => snapshot::snapshot(
            devices,
            number("ember.rounds", 200),
            number("ember.pages", 256),
            number("ember.idle", 0) != 0,
        ),
        "calibrate" => {
            calibrate(number("ember.polls", 10 * virtio::POLLS_PER_SECOND));
            Ok(())
        }
        _ => {
            println!(
                "virtio-guest: unknown scenario {scenario:?} \
                 (blk, blk-ro, blk-flush, blk-bench, rng, rng-saturate, net, \
                 net-tx-saturate, net-rx-saturate, snapshot, calibrate)"
            );
            rt::exit(2)
        }
    };
    let bounced = virtio::bounced();
    match result {
        Ok(()) => {
            println!(
                "virtio-guest: {scenario} passed ({bounced} buffers bounced into the DMA region)"
            );
            rt::exit(0)
        }
        Err(why) => {
            println!("virtio-guest: {scenario} FAIL: {why}");
            rt::exit(1)
        }
    }
}

/// Spins `polls` iterations of the loop [`virtio::poll`] runs (a memory read and a
/// `pause`) between two lines the host can time.
fn calibrate(polls: u64) {
    let flag = core::sync::atomic::AtomicU16::new(0);
    println!("virtio-guest: calibrate start {polls}");
    let got = virtio::poll(polls, || {
        (flag.load(core::sync::atomic::Ordering::Acquire) != 0).then_some(())
    });
    println!("virtio-guest: calibrate done {}", u8::from(got.is_some()));
}

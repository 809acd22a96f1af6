//! `ember.test=snapshot`: a long, deterministic computation for the snapshot tests.
//!
//! Each round stirs a buffer of `ember.pages` 4 KiB pages (default 256) with xorshift,
//! writes a sector of the first virtio-blk disk derived from the running hash, reads it
//! back and folds it into the hash, and prints
//! `virtio-guest: snapshot round <r> hash <h>`. After `ember.rounds` rounds (default
//! 200) it prints `virtio-guest: snapshot result <h>` and exits with code
//! `10 + h % 100`, so a run that went wrong anywhere ends with another line and, almost
//! surely, another exit code. Nothing depends on time: a pause, a snapshot or a restore
//! in another process changes nothing the guest computes.
//!
//! With `ember.idle=1` it then spins forever without writing memory (the host kills or
//! pauses it), for the diff-snapshot test.

use alloc::format;
use alloc::string::String;
use alloc::vec;

use virtio_drivers::device::blk::SECTOR_SIZE;

use crate::blk::Disk;
use crate::cmdline::VirtioMmioDevice;
use crate::virtio::dma_buffer;
use crate::{println, rt};

/// u64 words per 4 KiB page.
const WORDS_PER_PAGE: usize = 512;
/// How many times a round stirs the whole buffer.
const PASSES: usize = 8;
/// Sectors the rounds cycle through, from [`FIRST_SECTOR`].
const SECTORS: u64 = 64;
const FIRST_SECTOR: u64 = 16;

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Runs the scenario; never returns (the exit code carries the result).
pub fn snapshot(devices: &[VirtioMmioDevice], rounds: u64, pages: u64, idle: bool) -> ! {
    match compute(devices, rounds, pages) {
        Ok(hash) => {
            println!("virtio-guest: snapshot result {hash:016x}");
            let code = 10 + (hash % 100) as u8;
            if idle {
                println!("virtio-guest: snapshot idle (exit code would be {code})");
                loop {
                    core::hint::spin_loop();
                }
            }
            rt::exit(code)
        }
        Err(why) => {
            println!("virtio-guest: snapshot FAIL: {why}");
            rt::exit(1)
        }
    }
}

fn compute(devices: &[VirtioMmioDevice], rounds: u64, pages: u64) -> Result<u64, String> {
    let mut disk = Disk::open(devices)?;
    if disk.capacity() < FIRST_SECTOR + SECTORS {
        return Err(format!(
            "the disk has {} sectors, need {}",
            disk.capacity(),
            FIRST_SECTOR + SECTORS
        ));
    }
    let words = usize::try_from(pages).map_err(|_| "too many pages")? * WORDS_PER_PAGE;
    let mut buffer = vec![0u64; words];
    for (i, w) in buffer.iter_mut().enumerate() {
        *w = i as u64 + 1;
    }
    let sector = dma_buffer(SECTOR_SIZE);
    let mut hash: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..rounds {
        for _ in 0..PASSES {
            for w in buffer.iter_mut() {
                hash = xorshift(hash ^ *w);
                *w = hash;
            }
        }
        let at = FIRST_SECTOR + round % SECTORS;
        for (i, b) in sector.iter_mut().enumerate() {
            *b = (hash >> ((i % 8) * 8)) as u8 ^ i as u8;
        }
        disk.write(at, sector)
            .map_err(|e| format!("round {round}: writing sector {at}: {e}"))?;
        sector.fill(0);
        disk.read(at, sector)
            .map_err(|e| format!("round {round}: reading sector {at}: {e}"))?;
        for chunk in sector.chunks_exact(8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            hash = xorshift(hash ^ u64::from_le_bytes(word));
        }
        println!("virtio-guest: snapshot round {round} hash {hash:016x}");
    }
    Ok(hash)
}

//! The virtio-rng scenario.

use alloc::format;
use alloc::string::String;
use core::fmt::Write;

use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::DeviceType;

use crate::cmdline::VirtioMmioDevice;
use crate::println;
use crate::virtio::{self, dma_buffer, GuestHal};

/// Bytes asked for per request.
const REQUEST: usize = 64;

/// `bytes` in hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `ember.test=rng`: two 64-byte requests, both filled, not all zero, different.
pub fn rng(devices: &[VirtioMmioDevice]) -> Result<(), String> {
    let transport = virtio::find(devices, DeviceType::EntropySource)
        .ok_or("no virtio-rng device on the command line")?;
    let mut rng =
        VirtIORng::<GuestHal, _>::new(transport).map_err(|e| format!("virtio-rng init: {e}"))?;
    let first = dma_buffer(REQUEST);
    let second = dma_buffer(REQUEST);
    for (name, buf) in [("first", &mut *first), ("second", &mut *second)] {
        let n = rng
            .request_entropy(buf)
            .map_err(|e| format!("{name} request: {e}"))?;
        println!("virtio-guest: rng {name} request: {n} bytes: {}", hex(buf));
        if n != REQUEST {
            return Err(format!(
                "{name} request returned {n} bytes, asked {REQUEST}"
            ));
        }
        if buf.iter().all(|&b| b == 0) {
            return Err(format!("{name} request returned all zeroes"));
        }
    }
    if first == second {
        return Err("both requests returned the same bytes".into());
    }
    println!("virtio-guest: rng ok {}", hex(&first[..8]));
    Ok(())
}

//! Scenarios that saturate a device, for the host to measure a rate limiter:
//! `rng-saturate` and `net-tx-saturate`.
//!
//! Each prints `virtio-guest: saturate start`, then moves `ember.bytes=<n>` bytes as
//! fast as the device lets it (in requests of `ember.req=<n>` bytes), with a
//! `virtio-guest: saturate progress <bytes>` line at every quarter, and ends with
//! `virtio-guest: saturate done <bytes> bytes <requests> requests`. The host times the
//! lines (the guest has no clock).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::DeviceType;

use crate::cmdline::VirtioMmioDevice;
use crate::println;
use crate::virtio::{self, dma_buffer, GuestHal};

/// Largest request either scenario makes.
pub const MAX_REQUEST: u64 = 64 * 1024;

/// Prints the progress lines of a transfer of `total` bytes.
struct Progress {
    total: u64,
    next_quarter: u64,
}

impl Progress {
    fn start(total: u64) -> Progress {
        println!("virtio-guest: saturate start");
        Progress {
            total,
            next_quarter: 1,
        }
    }

    fn update(&mut self, done: u64) {
        while self.next_quarter < 4 && done >= self.total / 4 * self.next_quarter {
            println!("virtio-guest: saturate progress {done}");
            self.next_quarter += 1;
        }
    }

    fn done(self, done: u64, requests: u64) {
        println!("virtio-guest: saturate done {done} bytes {requests} requests");
    }
}

fn check_request(request: u64, min: u64) -> Result<usize, String> {
    if !(min..=MAX_REQUEST).contains(&request) {
        return Err(format!(
            "ember.req={request} is outside {min}..={MAX_REQUEST}"
        ));
    }
    // At most 64 KiB.
    Ok(request as usize)
}

/// `ember.test=rng-saturate`: `total` bytes of entropy in requests of `request` bytes,
/// one at a time, each checked to be filled.
pub fn rng(devices: &[VirtioMmioDevice], total: u64, request: u64) -> Result<(), String> {
    let request = check_request(request, 1)?;
    let transport = virtio::find(devices, DeviceType::EntropySource)
        .ok_or("no virtio-rng device on the command line")?;
    let mut rng =
        VirtIORng::<GuestHal, _>::new(transport).map_err(|e| format!("virtio-rng init: {e}"))?;
    let buf = dma_buffer(request);
    let mut done = 0u64;
    let mut requests = 0u64;
    let mut progress = Progress::start(total);
    while done < total {
        let n = rng
            .request_entropy(buf)
            .map_err(|e| format!("request {requests}: {e}"))?;
        if n != request {
            return Err(format!(
                "request {requests} returned {n} bytes, asked {request}"
            ));
        }
        done += n as u64;
        requests += 1;
        progress.update(done);
    }
    progress.done(done, requests);
    Ok(())
}

/// Descriptors per queue of the net scenario.
const QUEUE_SIZE: usize = 16;
/// Frames in flight.
const IN_FLIGHT: usize = 8;

type Net = VirtIONetRaw<GuestHal, MmioTransport<'static>, QUEUE_SIZE>;

/// `ember.test=net-tx-saturate`: `total` bytes of broadcast frames of `request` bytes
/// (virtio-net header included; an unused ethertype, so the host drops them), with up to
/// [`IN_FLIGHT`] frames queued at once.
pub fn net_tx(devices: &[VirtioMmioDevice], total: u64, request: u64) -> Result<(), String> {
    let request = check_request(request, 64)?;
    let transport = virtio::find(devices, DeviceType::Network)
        .ok_or("no virtio-net device on the command line")?;
    let mut net = Net::new(transport).map_err(|e| format!("virtio-net init: {e}"))?;
    let mac = net.mac_address();
    // Slots: a frame buffer and the token of the transmission using it, if any.
    let mut slots: Vec<(&'static mut [u8], Option<u16>)> = Vec::new();
    for _ in 0..IN_FLIGHT {
        let buf = dma_buffer(request);
        let hdr = net
            .fill_buffer_header(buf)
            .map_err(|e| format!("tx header: {e}"))?;
        let eth = &mut buf[hdr..];
        eth[0..6].fill(0xff);
        eth[6..12].copy_from_slice(&mac);
        eth[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        slots.push((buf, None));
    }
    let mut queued = 0u64;
    let mut done = 0u64;
    let mut requests = 0u64;
    let mut progress = Progress::start(total);
    while done < total {
        // Queue a frame in every free slot while bytes remain to be queued.
        for (buf, token) in slots.iter_mut() {
            if token.is_none() && queued < total {
                // SAFETY: the buffer is not touched until transmit_complete for this
                // token (or never again, if the scenario fails and the VM ends).
                let t = unsafe { net.transmit_begin(buf) }
                    .map_err(|e| format!("transmit {requests}: {e}"))?;
                *token = Some(t);
                queued += request as u64;
            }
        }
        let Some(used) = net.poll_transmit() else {
            core::hint::spin_loop();
            continue;
        };
        let slot = slots
            .iter_mut()
            .find(|(_, token)| *token == Some(used))
            .ok_or_else(|| format!("transmit: used token {used} was never queued"))?;
        // SAFETY: the same buffer as transmit_begin got for this token.
        unsafe { net.transmit_complete(used, &*slot.0) }
            .map_err(|e| format!("transmit {requests}: {e}"))?;
        slot.1 = None;
        done += request as u64;
        requests += 1;
        progress.update(done);
    }
    progress.done(done, requests);
    Ok(())
}

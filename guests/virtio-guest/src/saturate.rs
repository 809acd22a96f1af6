//! Scenarios that saturate a device, for the host to measure a rate limiter:
//! `rng-saturate`, `net-tx-saturate` and `net-rx-saturate`.
//!
//! Each prints `virtio-guest: saturate start`, then moves `ember.bytes=<n>` bytes as
//! fast as the device lets it (in requests of `ember.req=<n>` bytes), with a
//! `virtio-guest: saturate progress <n>` line at every quarter, and ends with
//! `virtio-guest: saturate done <bytes> bytes <requests> requests`. The host times the
//! lines (the guest has no clock).
//!
//! `net-rx-saturate` receives instead, whatever the host sends, as fast as it arrives,
//! until `ember.bytes=<n>` bytes (virtio-net headers included) or, if given,
//! `ember.frames=<n>` frames have arrived; it ends with
//! `virtio-guest: saturate done <bytes> bytes <frames> frames`.

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

    /// The last line: `bytes` moved in `count` `unit`s (requests, frames).
    fn done(self, bytes: u64, count: u64, unit: &str) {
        println!("virtio-guest: saturate done {bytes} bytes {count} {unit}");
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
    progress.done(done, requests, "requests");
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
    progress.done(done, requests, "requests");
    Ok(())
}

/// Bytes per receive buffer (virtio-drivers wants at least 1526).
const RX_BUFFER_LEN: usize = 2048;

/// `ember.test=net-rx-saturate`: receives frames as fast as they arrive, with
/// [`QUEUE_SIZE`] buffers posted, until `total` bytes (headers included) or, when
/// `frames` is not 0, `frames` frames have arrived. The start line comes just before
/// the buffers are posted, so no frame can arrive before it.
pub fn net_rx(devices: &[VirtioMmioDevice], total: u64, frames: u64) -> Result<(), String> {
    let transport = virtio::find(devices, DeviceType::Network)
        .ok_or("no virtio-net device on the command line")?;
    let mut net = Net::new(transport).map_err(|e| format!("virtio-net init: {e}"))?;
    let buffers: Vec<&'static mut [u8]> =
        (0..QUEUE_SIZE).map(|_| dma_buffer(RX_BUFFER_LEN)).collect();
    // What counts towards the goal: frames, or bytes.
    let by_frames = frames != 0;
    let goal = if by_frames { frames } else { total };
    let mut progress = Progress::start(goal);
    // Posted buffers: the token receive_begin gave, and the buffer.
    let mut rx: Vec<(u16, &'static mut [u8])> = Vec::new();
    for buf in buffers {
        // SAFETY: the buffer is only read after receive_complete.
        let token = unsafe { net.receive_begin(buf) }.map_err(|e| format!("posting rx: {e}"))?;
        rx.push((token, buf));
    }
    let mut done = 0u64;
    let mut received = 0u64;
    loop {
        let reached = if by_frames { received } else { done };
        if reached >= goal {
            break;
        }
        progress.update(reached);
        let Some(token) = net.poll_receive() else {
            core::hint::spin_loop();
            continue;
        };
        let slot = rx
            .iter_mut()
            .find(|(t, _)| *t == token)
            .ok_or_else(|| format!("receive: used token {token} was never posted"))?;
        let buf = &mut *slot.1;
        // SAFETY: the same buffer as receive_begin got for this token.
        let (hdr, len) = unsafe { net.receive_complete(token, buf) }
            .map_err(|e| format!("receive {received}: {e}"))?;
        // SAFETY: the frame is not looked at; the buffer is only read after the next
        // receive_complete.
        slot.0 = unsafe { net.receive_begin(buf) }
            .map_err(|e| format!("reposting rx {received}: {e}"))?;
        done += (hdr + len) as u64;
        received += 1;
    }
    progress.done(done, received, "frames");
    Ok(())
}

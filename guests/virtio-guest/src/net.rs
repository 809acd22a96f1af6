//! The virtio-net scenario: an ARP request for 10.0.2.1 from 10.0.2.15, and its reply.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::DeviceType;

use crate::cmdline::VirtioMmioDevice;
use crate::println;
use crate::virtio::{self, dma_buffer, GuestHal, POLLS_PER_SECOND};

/// Descriptors per queue.
const QUEUE_SIZE: usize = 16;
/// Receive buffers kept posted.
const RX_BUFFERS: usize = 8;
/// Bytes per receive buffer (virtio-drivers wants at least 1526).
const RX_BUFFER_LEN: usize = 2048;
/// Our address.
const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
/// The address asked for.
const PEER_IP: [u8; 4] = [10, 0, 2, 1];
/// Shortest Ethernet frame (without FCS); shorter ones are padded.
const MIN_FRAME: usize = 60;
/// ARP over Ethernet: 14-byte Ethernet header and 28-byte ARP packet.
const ARP_FRAME_LEN: usize = 42;
/// How long to wait for the reply, in polls: about 2 s on the nested-KVM machines (see
/// [`POLLS_PER_SECOND`]).
const REPLY_BUDGET: u64 = 2 * POLLS_PER_SECOND;
/// Requests sent within the budget (the first right away, the others evenly spread),
/// in case one is lost.
const SENDS: u64 = 4;
/// How long a transmission may take before it counts as lost.
const TX_BUDGET: u64 = POLLS_PER_SECOND;

type Net = VirtIONetRaw<GuestHal, MmioTransport<'static>, QUEUE_SIZE>;

/// `mac` as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

/// The ARP request "who-has 10.0.2.1 tell 10.0.2.15" from `mac`, broadcast, padded to
/// the minimum frame size.
fn arp_request(mac: [u8; 6]) -> [u8; MIN_FRAME] {
    let mut f = [0u8; MIN_FRAME];
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&GUEST_IP);
    // Target hardware address (32..38) unknown: zero.
    f[38..42].copy_from_slice(&PEER_IP);
    f
}

/// The sender MAC of `frame` if it is an ARP reply from [`PEER_IP`] to us.
fn arp_reply_from_peer(frame: &[u8], mac: [u8; 6]) -> Option<[u8; 6]> {
    if frame.len() < ARP_FRAME_LEN
        || frame[0..6] != mac
        || frame[12..14] != 0x0806u16.to_be_bytes()
        || frame[14..16] != 1u16.to_be_bytes()
        || frame[16..18] != 0x0800u16.to_be_bytes()
        || frame[18] != 6
        || frame[19] != 4
        || frame[20..22] != 2u16.to_be_bytes()
        || frame[28..32] != PEER_IP
        || frame[32..38] != mac
        || frame[38..42] != GUEST_IP
    {
        return None;
    }
    frame[22..28].try_into().ok()
}

/// A short description of a frame that was not the reply.
fn describe(frame: &[u8]) -> String {
    if frame.len() < 14 {
        return format!("{} bytes", frame.len());
    }
    format!(
        "{} bytes, {} -> {}, ethertype {:#06x}",
        frame.len(),
        format_mac(&frame[6..12]),
        format_mac(&frame[0..6]),
        u16::from_be_bytes([frame[12], frame[13]])
    )
}

/// Sends `frame` (header included) and waits for the device to use it.
fn transmit(net: &mut Net, frame: &[u8]) -> Result<(), String> {
    // SAFETY: `frame` is not touched until transmit_complete (or never again, on a
    // timeout: the scenario then fails and the VM ends).
    let token = unsafe { net.transmit_begin(frame) }.map_err(|e| format!("transmit: {e}"))?;
    match virtio::poll(TX_BUDGET, || net.poll_transmit()) {
        Some((used, _)) if used == token => {}
        Some((used, _)) => return Err(format!("transmit: used token {used}, expected {token}")),
        None => return Err(format!("transmit: not completed after {TX_BUDGET} polls")),
    }
    // SAFETY: the same buffer as transmit_begin got.
    unsafe { net.transmit_complete(token, frame) }.map_err(|e| format!("transmit: {e}"))?;
    Ok(())
}

/// `ember.test=net`: print the MAC, ARP for 10.0.2.1, wait (bounded) for the reply.
pub fn net(devices: &[VirtioMmioDevice]) -> Result<(), String> {
    let transport = virtio::find(devices, DeviceType::Network)
        .ok_or("no virtio-net device on the command line")?;
    let mut net = Net::new(transport).map_err(|e| format!("virtio-net init: {e}"))?;
    let mac = net.mac_address();
    println!("virtio-guest: net mac {}", format_mac(&mac));

    // Post the receive buffers: (token, buffer).
    let mut rx: Vec<(u16, &'static mut [u8])> = Vec::new();
    for _ in 0..RX_BUFFERS {
        let buf = dma_buffer(RX_BUFFER_LEN);
        // SAFETY: the buffer is only read after receive_complete.
        let token = unsafe { net.receive_begin(buf) }.map_err(|e| format!("posting rx: {e}"))?;
        rx.push((token, buf));
    }

    let tx = dma_buffer(RX_BUFFER_LEN);
    let header_len = net
        .fill_buffer_header(tx)
        .map_err(|e| format!("tx header: {e}"))?;
    let frame_len = header_len + MIN_FRAME;
    tx[header_len..frame_len].copy_from_slice(&arp_request(mac));

    let mut sent = 0;
    let mut others = 0;
    let mut iteration = 0u64;
    while iteration < REPLY_BUDGET {
        if sent < SENDS && iteration >= sent * (REPLY_BUDGET / SENDS) {
            transmit(&mut net, &tx[..frame_len])?;
            sent += 1;
            println!("virtio-guest: net sent arp who-has 10.0.2.1 tell 10.0.2.15 (#{sent})");
        }
        iteration += 1;
        let Some(token) = net.poll_receive() else {
            core::hint::spin_loop();
            continue;
        };
        let slot = rx
            .iter()
            .position(|(t, _)| *t == token)
            .ok_or_else(|| format!("receive: used token {token} was never posted"))?;
        let buf = &mut *rx[slot].1;
        // SAFETY: the same buffer as receive_begin got for this token.
        let (hdr, len) =
            unsafe { net.receive_complete(token, buf) }.map_err(|e| format!("receive: {e}"))?;
        let frame = &buf[hdr..hdr + len];
        if let Some(peer_mac) = arp_reply_from_peer(frame, mac) {
            // virtio_net_hdr_v1: flags, gso_type, ..., num_buffers (u16 at 10).
            let num_buffers = u16::from_le_bytes([buf[10], buf[11]]);
            println!(
                "virtio-guest: net rx header flags {:#x} gso {:#x} num_buffers {num_buffers}, \
                 {others} other frame(s) before, after {iteration} polls",
                buf[0], buf[1]
            );
            println!(
                "virtio-guest: net ok arp reply from 10.0.2.1 is at {}",
                format_mac(&peer_mac)
            );
            return Ok(());
        }
        others += 1;
        println!("virtio-guest: net ignored frame: {}", describe(frame));
        // SAFETY: as above; the frame has been looked at.
        let token = unsafe { net.receive_begin(buf) }.map_err(|e| format!("reposting rx: {e}"))?;
        rx[slot].0 = token;
    }
    Err(format!(
        "no arp reply from 10.0.2.1 after {REPLY_BUDGET} polls ({sent} requests sent, \
         {others} other frames received)"
    ))
}

//! The virtio-blk scenarios: `blk`, `blk-ro` and `blk-bench`.
//!
//! Reads and writes use virtio-drivers' non-blocking calls with the request header, the
//! data and the status byte all in the DMA region, and wait for completion with a bounded
//! poll, so a device that never answers ends the scenario with a failure line instead of
//! hanging the guest.

use alloc::format;
use alloc::string::String;
use core::fmt::Write;

use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::DeviceType;

use crate::cmdline::VirtioMmioDevice;
use crate::println;
use crate::virtio::{self, dma_box, dma_buffer, GuestHal, POLLS_PER_SECOND};

/// How long a single request may take before it counts as lost: 10 s, generously.
const REQUEST_BUDGET: u64 = 10 * POLLS_PER_SECOND;
/// Bytes per request in the benchmark.
const BENCH_CHUNK: usize = 64 * 1024;
/// Sectors per benchmark request.
const BENCH_CHUNK_SECTORS: u64 = (BENCH_CHUNK / SECTOR_SIZE) as u64;

/// Why a request failed.
#[derive(Debug)]
pub enum IoFailure {
    /// virtio-drivers reported an error (`IoError` for a `VIRTIO_BLK_S_IOERR` status).
    Driver(virtio_drivers::Error),
    /// The device did not complete the request within [`REQUEST_BUDGET`] polls.
    Timeout,
}

impl core::fmt::Display for IoFailure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            IoFailure::Driver(e) => write!(f, "{e}"),
            IoFailure::Timeout => write!(f, "no completion after {REQUEST_BUDGET} polls"),
        }
    }
}

impl From<virtio_drivers::Error> for IoFailure {
    fn from(e: virtio_drivers::Error) -> Self {
        IoFailure::Driver(e)
    }
}

/// A virtio-blk device with its request header and status byte in the DMA region.
pub struct Disk {
    blk: VirtIOBlk<GuestHal, MmioTransport<'static>>,
    req: &'static mut BlkReq,
    resp: &'static mut BlkResp,
}

impl Disk {
    pub fn open(devices: &[VirtioMmioDevice]) -> Result<Disk, String> {
        let transport = virtio::find(devices, DeviceType::Block)
            .ok_or("no virtio-blk device on the command line")?;
        let blk = VirtIOBlk::new(transport).map_err(|e| format!("virtio-blk init: {e}"))?;
        Ok(Disk {
            blk,
            req: dma_box(BlkReq::default()),
            resp: dma_box(BlkResp::default()),
        })
    }

    /// Waits for the request `token` to be the next used one.
    fn wait(&mut self, token: u16) -> Result<(), IoFailure> {
        let blk = &mut self.blk;
        match virtio::poll(REQUEST_BUDGET, || blk.peek_used()) {
            Some((used, _)) if used == token => Ok(()),
            Some(_) => Err(IoFailure::Driver(virtio_drivers::Error::WrongToken)),
            None => Err(IoFailure::Timeout),
        }
    }

    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoFailure> {
        // SAFETY: req, buf and resp are not touched until complete_read_blocks (or never
        // again, on a timeout: the scenario then fails and the VM ends).
        let token = unsafe {
            self.blk
                .read_blocks_nb(sector as usize, self.req, buf, self.resp)?
        };
        self.wait(token)?;
        // SAFETY: the same buffers as read_blocks_nb got.
        unsafe {
            self.blk
                .complete_read_blocks(token, self.req, buf, self.resp)?
        };
        Ok(())
    }

    /// The disk's size in sectors.
    pub fn capacity(&self) -> u64 {
        self.blk.capacity()
    }

    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), IoFailure> {
        // SAFETY: as in `read`.
        let token = unsafe {
            self.blk
                .write_blocks_nb(sector as usize, self.req, buf, self.resp)?
        };
        self.wait(token)?;
        // SAFETY: the same buffers as write_blocks_nb got.
        unsafe {
            self.blk
                .complete_write_blocks(token, self.req, buf, self.resp)?
        };
        Ok(())
    }

    /// The device ID (GET_ID), as text.
    fn id(&mut self) -> Result<String, IoFailure> {
        let id = dma_box([0u8; 20]);
        let len = self.blk.device_id(id)?;
        Ok(printable(&id[..len]))
    }
}

/// `bytes` as text, with anything but printable ASCII shown as `.`.
fn printable(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '.'
            }
        })
        .collect()
}

/// The pattern the `blk` scenario writes to sector 1.
fn pattern(i: usize) -> u8 {
    (i as u8) ^ 0x5a
}

/// Opens the disk and prints what it is.
fn open_and_describe(devices: &[VirtioMmioDevice], name: &str) -> Result<Disk, String> {
    let mut disk = Disk::open(devices)?;
    let capacity = disk.blk.capacity();
    println!(
        "virtio-guest: {name} capacity {capacity} sectors, read-only {}",
        disk.blk.readonly()
    );
    match disk.id() {
        Ok(id) => println!("virtio-guest: {name} id {id}"),
        Err(e) => println!("virtio-guest: {name} id unavailable: {e}"),
    }
    if capacity < 2 {
        return Err(format!("capacity {capacity} sectors, need at least 2"));
    }
    Ok(disk)
}

/// Reads sector 0 into `buf` and prints its first 16 bytes as text.
fn read_sector0(disk: &mut Disk, name: &str, buf: &mut [u8]) -> Result<(), String> {
    disk.read(0, buf)
        .map_err(|e| format!("reading sector 0: {e}"))?;
    println!("virtio-guest: {name} sector 0: {}", printable(&buf[..16]));
    Ok(())
}

/// `ember.test=blk`: read sector 0, write a pattern to sector 1, flush, read it back.
pub fn blk(devices: &[VirtioMmioDevice]) -> Result<(), String> {
    let mut disk = open_and_describe(devices, "blk")?;
    let capacity = disk.blk.capacity();
    if disk.blk.readonly() {
        return Err("the device says it is read-only".into());
    }
    let buf = dma_buffer(SECTOR_SIZE);
    read_sector0(&mut disk, "blk", buf)?;

    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(i);
    }
    disk.write(1, buf)
        .map_err(|e| format!("writing sector 1: {e}"))?;
    disk.blk.flush().map_err(|e| format!("flush: {e}"))?;
    println!("virtio-guest: blk wrote and flushed sector 1");

    buf.fill(0);
    disk.read(1, buf)
        .map_err(|e| format!("reading sector 1 back: {e}"))?;
    if let Some(i) = (0..SECTOR_SIZE).find(|&i| buf[i] != pattern(i)) {
        return Err(format!(
            "sector 1 read back differs at byte {i}: {:#04x}, wrote {:#04x}",
            buf[i],
            pattern(i)
        ));
    }
    println!("virtio-guest: blk sector 1 read back matches");
    println!("virtio-guest: blk ok capacity={capacity}");
    Ok(())
}

/// `ember.test=blk-ro`: reads work, a write fails with an I/O error.
pub fn blk_ro(devices: &[VirtioMmioDevice]) -> Result<(), String> {
    let mut disk = open_and_describe(devices, "blk-ro")?;
    if !disk.blk.readonly() {
        return Err("VIRTIO_BLK_F_RO was not negotiated".into());
    }
    let buf = dma_buffer(SECTOR_SIZE);
    read_sector0(&mut disk, "blk-ro", buf)?;
    let before = dma_buffer(SECTOR_SIZE);
    disk.read(1, before)
        .map_err(|e| format!("reading sector 1: {e}"))?;

    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(i);
    }
    match disk.write(1, buf) {
        Ok(()) => return Err("writing sector 1 of a read-only disk succeeded".into()),
        Err(IoFailure::Driver(virtio_drivers::Error::IoError)) => {
            println!("virtio-guest: blk-ro write refused");
        }
        Err(e) => return Err(format!("writing sector 1 failed, but not with IOERR: {e}")),
    }
    // The device still works, and sector 1 did not change.
    buf.fill(0);
    disk.read(1, buf)
        .map_err(|e| format!("reading sector 1 after the refused write: {e}"))?;
    if buf != before {
        return Err("sector 1 changed although the write was refused".into());
    }
    println!("virtio-guest: blk-ro sector 1 unchanged");
    Ok(())
}

/// The first 8 bytes the benchmark expects in (`read`) or writes to each sector.
fn bench_tag(sector: u64, write: bool) -> u64 {
    if write {
        !sector
    } else {
        sector
    }
}

/// `ember.test=blk-bench ember.mib=<n> [ember.verify=1]`: reads, then writes, `n` MiB
/// sequentially in 64 KiB requests, one at a time. With `ember.verify=1` every sector
/// read must start with its sector number (u64, little endian); written sectors start
/// with its complement. The host times the lines; the guest has no clock.
pub fn bench(devices: &[VirtioMmioDevice], mib: u64, verify: bool) -> Result<(), String> {
    let mut disk = open_and_describe(devices, "bench")?;
    let sectors = mib * (1 << 20) / SECTOR_SIZE as u64;
    let capacity = disk.blk.capacity();
    if capacity < sectors {
        return Err(format!(
            "the disk has {capacity} sectors, {mib} MiB needs {sectors}"
        ));
    }
    let bytes = sectors * SECTOR_SIZE as u64;
    let buf = dma_buffer(BENCH_CHUNK);
    let mut mismatches = 0u64;
    let mut first_mismatch = String::new();

    println!("virtio-guest: bench start");
    let mut sector = 0;
    while sector < sectors {
        disk.read(sector, buf)
            .map_err(|e| format!("bench read at sector {sector}: {e}"))?;
        if verify {
            for (i, s) in buf.chunks_exact(SECTOR_SIZE).enumerate() {
                let n = sector + i as u64;
                let tag = u64::from_le_bytes(s[..8].try_into().unwrap_or_default());
                if tag != bench_tag(n, false) {
                    if mismatches == 0 {
                        let _ = write!(first_mismatch, "sector {n} starts with {tag:#x}");
                    }
                    mismatches += 1;
                }
            }
        }
        sector += BENCH_CHUNK_SECTORS;
    }
    println!("virtio-guest: bench read done {bytes}");

    let mut sector = 0;
    while sector < sectors {
        for (i, s) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            s[..8].copy_from_slice(&bench_tag(sector + i as u64, true).to_le_bytes());
        }
        disk.write(sector, buf)
            .map_err(|e| format!("bench write at sector {sector}: {e}"))?;
        sector += BENCH_CHUNK_SECTORS;
    }
    println!("virtio-guest: bench write done {bytes}");
    disk.blk.flush().map_err(|e| format!("bench flush: {e}"))?;
    println!("virtio-guest: bench flush done");
    // Reported after the timed phases, so that they are back to back.
    if verify {
        if mismatches > 0 {
            return Err(format!(
                "bench read: {mismatches} sectors do not hold their number; first: {first_mismatch}"
            ));
        }
        println!("virtio-guest: bench read verified {sectors} sectors");
    }
    Ok(())
}

/// The first sector `blk-flush` writes.
pub const FLUSH_FIRST_SECTOR: u64 = 8;
/// How many sectors `blk-flush` writes (4 KiB).
pub const FLUSH_SECTORS: usize = 8;

/// The byte `blk-flush` writes at byte `offset` of the disk: `offset * 7 + 0x3d`,
/// truncated (the host test computes the same).
fn flush_pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(7).wrapping_add(0x3d)) as u8
}

/// `ember.test=blk-flush`: writes a known pattern to sectors 8..16 (see
/// [`flush_pattern`]), flushes, prints `virtio-guest: blk-flush flushed` and then spins
/// forever, so that the host can kill the VMM at once and look for the data in the image.
/// Returns only on failure.
pub fn blk_flush(devices: &[VirtioMmioDevice]) -> Result<(), String> {
    let mut disk = open_and_describe(devices, "blk-flush")?;
    let needed = FLUSH_FIRST_SECTOR + FLUSH_SECTORS as u64;
    if disk.blk.capacity() < needed {
        return Err(format!("need at least {needed} sectors"));
    }
    let buf = dma_buffer(FLUSH_SECTORS * SECTOR_SIZE);
    let base = FLUSH_FIRST_SECTOR * SECTOR_SIZE as u64;
    for (i, b) in buf.iter_mut().enumerate() {
        *b = flush_pattern(base + i as u64);
    }
    disk.write(FLUSH_FIRST_SECTOR, buf)
        .map_err(|e| format!("writing sectors {FLUSH_FIRST_SECTOR}..{needed}: {e}"))?;
    disk.blk.flush().map_err(|e| format!("flush: {e}"))?;
    println!("virtio-guest: blk-flush flushed");
    loop {
        core::hint::spin_loop();
    }
}

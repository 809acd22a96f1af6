//! The trivial device every benchmark dispatches to, and bus layouts to put it in.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use ember_bus::{Bus, BusDevice, BusError};

/// Bytes each [`Register`] claims on a bus.
pub const REGISTER_LEN: u64 = 4;
/// First port of the PIO layouts ([`populate`]).
pub const PIO_BASE: u64 = 0x100;
/// Distance between two devices in the PIO layouts: a 4-port gap follows each device.
pub const PIO_STRIDE: u64 = 8;
/// First address of the MMIO layouts, in Ember's device MMIO window.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Distance between two devices in the MMIO layouts (one page each).
pub const MMIO_STRIDE: u64 = 0x1000;

/// A device with one 32-bit register at offset 0 (as wide as the access, little
/// endian), counting the accesses it sees.
///
/// The counters are updated with a plain load and store, not a locked read-modify-write,
/// so that counting costs next to nothing on the path being measured; they are exact
/// when one thread (one vCPU) makes the accesses, as in every benchmark here.
#[derive(Debug, Default)]
pub struct Register {
    value: AtomicU32,
    reads: AtomicU64,
    writes: AtomicU64,
}

impl Register {
    /// The register's value.
    pub fn value(&self) -> u32 {
        self.value.load(Ordering::Relaxed)
    }

    /// Reads dispatched to the device so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Writes dispatched to the device so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

fn bump(counter: &AtomicU64) {
    counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

impl BusDevice for Register {
    #[inline]
    fn read(&self, _offset: u64, data: &mut [u8]) {
        let bytes = self.value.load(Ordering::Relaxed).to_le_bytes();
        let n = data.len().min(bytes.len());
        data[..n].copy_from_slice(&bytes[..n]);
        bump(&self.reads);
    }

    #[inline]
    fn write(&self, _offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(bytes.len());
        bytes[..n].copy_from_slice(&data[..n]);
        self.value
            .store(u32::from_le_bytes(bytes), Ordering::Relaxed);
        bump(&self.writes);
    }
}

/// Where [`populate`] put the device the benchmarks aim at.
#[derive(Debug, Clone)]
pub struct Target {
    /// The device's base address.
    pub addr: u64,
    /// An address in the gap right after the device, which no device claims (the
    /// lookup searches as deep as for `addr`, then misses).
    pub unclaimed: u64,
    /// The device.
    pub device: Arc<Register>,
}

/// Puts `count` [`Register`]s on `bus`, `stride` apart from `base`, and returns the one
/// in the middle (index `count / 2`). `stride` must exceed [`REGISTER_LEN`] so that
/// [`Target::unclaimed`] lies in a gap.
pub fn populate(bus: &Bus, base: u64, stride: u64, count: usize) -> Result<Target, BusError> {
    let middle = count / 2;
    let mut target = None;
    for i in 0..count {
        let device = Arc::new(Register::default());
        let addr = base + stride * i as u64;
        bus.insert(addr, REGISTER_LEN, device.clone())?;
        if i == middle {
            target = Some(Target {
                addr,
                unclaimed: addr + REGISTER_LEN,
                device,
            });
        }
    }
    // `count == 0` leaves no target: give an address nobody claims and a lone device.
    Ok(target.unwrap_or_else(|| Target {
        addr: base,
        unclaimed: base,
        device: Arc::new(Register::default()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_bus::BusKind;

    #[test]
    fn register_stores_and_returns_little_endian() {
        let reg = Register::default();
        reg.write(0, &[0x11, 0x22, 0x33, 0x44]);
        assert_eq!(reg.value(), 0x4433_2211);
        let mut two = [0xffu8; 2];
        reg.read(0, &mut two);
        assert_eq!(two, [0x11, 0x22]);
        reg.write(0, &[0x7f]);
        assert_eq!(reg.value(), 0x7f);
        let mut eight = [0xffu8; 8];
        reg.read(0, &mut eight);
        assert_eq!(eight, [0x7f, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!((reg.reads(), reg.writes()), (2, 2));
    }

    #[test]
    fn populate_aims_at_the_middle_and_leaves_gaps() {
        for count in [1usize, 8, 64] {
            for (kind, base, stride) in [
                (BusKind::Pio, PIO_BASE, PIO_STRIDE),
                (BusKind::Mmio, MMIO_BASE, MMIO_STRIDE),
            ] {
                let bus = Bus::new(kind);
                let t = populate(&bus, base, stride, count).unwrap();
                assert_eq!(bus.len(), count);
                assert_eq!(t.addr, base + stride * (count as u64 / 2));
                bus.write(t.addr, &[1]).unwrap();
                assert_eq!(t.device.writes(), 1);
                assert!(bus.write(t.unclaimed, &[1]).is_err());
                assert_eq!(bus.stats().unclaimed_writes, 1);
            }
        }
    }
}

//! Helpers shared by the unit tests.

use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ember_bus::{Bus, BusDevice, BusKind};

/// A writer whose bytes (and flush count) the test can inspect.
#[derive(Clone, Default)]
pub struct SharedBuf {
    bytes: Arc<Mutex<Vec<u8>>>,
    flushes: Arc<AtomicUsize>,
}

impl SharedBuf {
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }

    pub fn flushes(&self) -> usize {
        self.flushes.load(Ordering::SeqCst)
    }
}

impl Write for SharedBuf {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.bytes.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

pub use ember_guests::testing::XorShift;

/// Hammers `device` with pseudo-random accesses: through a PIO bus around its range
/// `[base, base + len)` (including bad widths and addresses just outside), and directly
/// with arbitrary offsets and widths 0..=8. The test passes if nothing panics.
pub fn fuzz_device(device: Arc<dyn BusDevice>, base: u64, len: u64, seed: u64) {
    let bus = Bus::new(BusKind::Pio);
    bus.insert(base, len, Arc::clone(&device)).unwrap();
    let mut rng = XorShift::new(seed);
    let mut buf = [0u8; 8];
    for _ in 0..20_000 {
        let width = [1usize, 1, 1, 2, 4, 3, 8][rng.below(7) as usize];
        let addr = (base + rng.below(len + 8)).saturating_sub(4);
        let data = &mut buf[..width];
        if rng.next() & 1 == 0 {
            data.iter_mut().for_each(|b| *b = rng.next() as u8);
            let _ = bus.write(addr, data);
        } else {
            let _ = bus.read(addr, data);
        }

        // Directly, as a buggy bus might.
        let width = rng.below(9) as usize;
        let offset = match rng.below(3) {
            0 => rng.next(),
            _ => rng.below(len + 4),
        };
        let data = &mut buf[..width];
        if rng.next() & 1 == 0 {
            data.iter_mut().for_each(|b| *b = rng.next() as u8);
            device.write(offset, data);
        } else {
            device.read(offset, data);
        }
    }
}

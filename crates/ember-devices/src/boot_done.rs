//! A boot-done port: the guest reports that it has booted, the VMM records when.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ember_bus::BusDevice;

/// The boot-done I/O port.
pub const BOOT_DONE_PORT: u16 = ember_arch::layout::BOOT_DONE_PORT;
/// Number of ports the boot-done device claims.
pub const BOOT_DONE_PORT_SIZE: u64 = ember_arch::layout::BOOT_DONE_PORT_SIZE;
/// The value the guest writes to say it has booted.
pub const BOOT_DONE_MAGIC: u8 = 123;

/// Records the time from VMM start to the guest writing [`BOOT_DONE_MAGIC`].
///
/// A write at offset 0 whose first byte (the low byte, for wider writes) is the magic
/// records `vmm_start.elapsed()` and logs it with `log::info!`; only the first one
/// counts and later magic writes are silently ignored. Writes of any other value, or
/// at another offset, are ignored and counted ([`BootDone::ignored_writes`]). Reads
/// return all ones.
///
/// ```
/// use std::time::Instant;
/// use ember_bus::BusDevice;
/// use ember_devices::{BootDone, BOOT_DONE_MAGIC};
///
/// let dev = BootDone::new(Instant::now());
/// dev.write(0, &[1]);
/// assert_eq!(dev.boot_time(), None);
/// dev.write(0, &[BOOT_DONE_MAGIC]);
/// assert!(dev.boot_time().is_some());
/// assert_eq!(dev.ignored_writes(), 1);
/// ```
#[derive(Debug)]
pub struct BootDone {
    vmm_start: Instant,
    boot_time: OnceLock<Duration>,
    ignored: AtomicU64,
}

impl BootDone {
    /// Creates the device; boot time is measured from `vmm_start`.
    pub fn new(vmm_start: Instant) -> Self {
        BootDone {
            vmm_start,
            boot_time: OnceLock::new(),
            ignored: AtomicU64::new(0),
        }
    }

    /// Time from VMM start to the guest's first magic write, once it happened.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time.get().copied()
    }

    /// Number of writes that were not the magic value (or not at offset 0).
    pub fn ignored_writes(&self) -> u64 {
        self.ignored.load(Ordering::Relaxed)
    }
}

impl BusDevice for BootDone {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        match data.first() {
            Some(&BOOT_DONE_MAGIC) if offset == 0 => {
                let elapsed = self.vmm_start.elapsed();
                if self.boot_time.set(elapsed).is_ok() {
                    log::info!(
                        "guest boot done after {}.{:03} ms",
                        elapsed.as_millis(),
                        elapsed.subsec_micros() % 1000
                    );
                } else {
                    debug_limited!("boot-done: repeated magic write ignored");
                }
            }
            Some(&value) => {
                self.ignored.fetch_add(1, Ordering::Relaxed);
                debug_limited!("boot-done: ignoring write of {value:#04x} at offset {offset}");
            }
            None => {
                self.ignored.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fuzz_device;
    use ember_bus::{Bus, BusKind};
    use std::sync::Arc;

    const PORT: u64 = BOOT_DONE_PORT as u64;

    fn setup(start: Instant) -> (Bus, Arc<BootDone>) {
        let dev = Arc::new(BootDone::new(start));
        let bus = Bus::new(BusKind::Pio);
        bus.insert(PORT, BOOT_DONE_PORT_SIZE, dev.clone()).unwrap();
        (bus, dev)
    }

    #[test]
    fn magic_records_the_time_once() {
        let start = Instant::now();
        let (bus, dev) = setup(start);
        assert_eq!(dev.boot_time(), None);
        std::thread::sleep(Duration::from_millis(2));
        bus.write(PORT, &[BOOT_DONE_MAGIC]).unwrap();
        let first = dev.boot_time().unwrap();
        assert!(first >= Duration::from_millis(2));
        assert!(first <= start.elapsed());

        std::thread::sleep(Duration::from_millis(2));
        bus.write(PORT, &[BOOT_DONE_MAGIC]).unwrap();
        assert_eq!(dev.boot_time(), Some(first));
        assert_eq!(dev.ignored_writes(), 0);
    }

    #[test]
    fn wrong_values_are_ignored_and_counted() {
        let (bus, dev) = setup(Instant::now());
        for value in [0u8, 1, 122, 124, 0xff] {
            bus.write(PORT, &[value]).unwrap();
        }
        assert_eq!(dev.boot_time(), None);
        assert_eq!(dev.ignored_writes(), 5);
        dev.write(1, &[BOOT_DONE_MAGIC]);
        dev.write(0, &[]);
        assert_eq!(dev.boot_time(), None);
        assert_eq!(dev.ignored_writes(), 7);
        bus.write(PORT, &[BOOT_DONE_MAGIC]).unwrap();
        assert!(dev.boot_time().is_some());
    }

    #[test]
    fn wide_write_uses_the_low_byte() {
        let dev = BootDone::new(Instant::now());
        dev.write(0, &[BOOT_DONE_MAGIC, 0, 0, 0]);
        assert!(dev.boot_time().is_some());
    }

    #[test]
    fn reads_return_all_ones() {
        let (bus, _dev) = setup(Instant::now());
        let mut byte = [0u8];
        bus.read(PORT, &mut byte).unwrap();
        assert_eq!(byte, [0xff]);
    }

    #[test]
    fn survives_random_accesses() {
        let dev = Arc::new(BootDone::new(Instant::now()));
        fuzz_device(dev.clone(), PORT, BOOT_DONE_PORT_SIZE, 0xb007);
        assert!(dev.ignored_writes() > 0);
    }
}

//! The bus: a table of address ranges, each claimed by one device.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::BusDevice;

/// Which address space a bus serves. It decides the widest access allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    /// x86 port I/O: 16-bit addresses, accesses of 1, 2 or 4 bytes.
    Pio,
    /// Memory-mapped I/O: 64-bit addresses, accesses of 1, 2, 4 or 8 bytes.
    Mmio,
}

impl BusKind {
    fn allows_width(self, len: usize) -> bool {
        match self {
            BusKind::Pio => matches!(len, 1 | 2 | 4),
            BusKind::Mmio => matches!(len, 1 | 2 | 4 | 8),
        }
    }

    fn max_address(self) -> u64 {
        match self {
            BusKind::Pio => 0xffff,
            BusKind::Mmio => u64::MAX,
        }
    }
}

impl fmt::Display for BusKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BusKind::Pio => "PIO",
            BusKind::Mmio => "MMIO",
        })
    }
}

/// Errors from inserting, removing or dispatching on a [`Bus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The range `[base, base + len)` is empty, wraps around, or leaves the address space.
    #[error(
        "{kind} range at {base:#x} with length {len:#x} is empty or outside the address space"
    )]
    InvalidRange {
        /// The bus the range was meant for.
        kind: BusKind,
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range overlaps one already claimed.
    #[error(
        "{kind} range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}"
    )]
    Overlap {
        /// The bus.
        kind: BusKind,
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Start of the range already claimed.
        other_base: u64,
        /// Length of the range already claimed.
        other_len: u64,
    },
    /// No device was inserted at exactly this base address.
    #[error("no {kind} device is inserted at {base:#x}")]
    NotFound {
        /// The bus.
        kind: BusKind,
        /// The base address asked for.
        base: u64,
    },
    /// No device claims the whole access `[addr, addr + len)`.
    #[error("{kind} access of {len} bytes at {addr:#x} reaches no device")]
    Unclaimed {
        /// The bus.
        kind: BusKind,
        /// Address of the access.
        addr: u64,
        /// Length of the access in bytes.
        len: usize,
    },
    /// The access width is not one the bus allows.
    #[error("{kind} access at {addr:#x} has unsupported width {len}")]
    BadWidth {
        /// The bus.
        kind: BusKind,
        /// Address of the access.
        addr: u64,
        /// Length of the access in bytes.
        len: usize,
    },
}

/// Counters of accesses the bus could not deliver.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BusStats {
    /// Reads that reached no device (answered with all ones).
    pub unclaimed_reads: u64,
    /// Writes that reached no device (dropped).
    pub unclaimed_writes: u64,
    /// Accesses with a width the bus does not allow (reads answered with all ones,
    /// writes dropped).
    pub bad_widths: u64,
}

#[derive(Clone)]
struct Entry {
    base: u64,
    len: u64,
    device: Arc<dyn BusDevice>,
}

impl Entry {
    /// Last address claimed, inclusive (ranges may end at `u64::MAX`).
    fn last(&self) -> u64 {
        self.base + (self.len - 1)
    }
}

/// A PIO or MMIO bus.
///
/// Share it between vCPU threads with an `Arc`; every method takes `&self`.
pub struct Bus {
    kind: BusKind,
    /// Sorted by `base`, ranges disjoint. Replaced whole on every change.
    entries: ArcSwap<Vec<Entry>>,
    unclaimed_reads: AtomicU64,
    unclaimed_writes: AtomicU64,
    bad_widths: AtomicU64,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries = self.entries.load();
        let ranges: Vec<_> = entries.iter().map(|e| (e.base, e.len)).collect();
        f.debug_struct("Bus")
            .field("kind", &self.kind)
            .field("ranges", &ranges)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Bus {
    /// Creates an empty bus.
    ///
    /// ```
    /// let bus = ember_bus::Bus::new(ember_bus::BusKind::Mmio);
    /// assert_eq!(bus.len(), 0);
    /// ```
    pub fn new(kind: BusKind) -> Self {
        Bus {
            kind,
            entries: ArcSwap::from_pointee(Vec::new()),
            unclaimed_reads: AtomicU64::new(0),
            unclaimed_writes: AtomicU64::new(0),
            bad_widths: AtomicU64::new(0),
        }
    }

    /// The address space this bus serves.
    pub fn kind(&self) -> BusKind {
        self.kind
    }

    /// Number of devices on the bus.
    pub fn len(&self) -> usize {
        self.entries.load().len()
    }

    /// Whether the bus has no devices.
    pub fn is_empty(&self) -> bool {
        self.entries.load().is_empty()
    }

    /// Claims `[base, base + len)` for `device`.
    ///
    /// Fails if the range is empty, leaves the bus's address space, or overlaps a range
    /// already claimed. Safe to call while vCPUs run: they see the old or the new table,
    /// never a torn one.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use ember_bus::{Bus, BusDevice, BusKind, BusError};
    /// # struct Dummy;
    /// # impl BusDevice for Dummy {
    /// #     fn read(&self, _: u64, _: &mut [u8]) {}
    /// #     fn write(&self, _: u64, _: &[u8]) {}
    /// # }
    /// let bus = Bus::new(BusKind::Pio);
    /// bus.insert(0x3f8, 8, Arc::new(Dummy)).unwrap();
    /// assert!(matches!(
    ///     bus.insert(0x3fc, 8, Arc::new(Dummy)),
    ///     Err(BusError::Overlap { other_base: 0x3f8, .. })
    /// ));
    /// ```
    pub fn insert(&self, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Result<(), BusError> {
        let invalid = BusError::InvalidRange {
            kind: self.kind,
            base,
            len,
        };
        if len == 0 {
            return Err(invalid);
        }
        let last = base.checked_add(len - 1).ok_or(invalid)?;
        if last > self.kind.max_address() {
            return Err(invalid);
        }
        let new = Entry { base, len, device };
        let mut result = Ok(());
        self.entries.rcu(|current| {
            let idx = current.partition_point(|e| e.base < base);
            let clash = [idx.checked_sub(1), Some(idx)]
                .into_iter()
                .flatten()
                .filter_map(|i| current.get(i))
                .find(|e| e.base <= last && base <= e.last());
            if let Some(other) = clash {
                result = Err(BusError::Overlap {
                    kind: self.kind,
                    base,
                    len,
                    other_base: other.base,
                    other_len: other.len,
                });
                return Arc::clone(current);
            }
            result = Ok(());
            let mut next = Vec::with_capacity(current.len() + 1);
            next.extend_from_slice(&current[..idx]);
            next.push(new.clone());
            next.extend_from_slice(&current[idx..]);
            Arc::new(next)
        });
        result
    }

    /// Removes the device inserted at exactly `base` and returns it.
    pub fn remove(&self, base: u64) -> Result<Arc<dyn BusDevice>, BusError> {
        let mut removed = None;
        self.entries.rcu(|current| {
            removed = None;
            match current.binary_search_by_key(&base, |e| e.base) {
                Ok(idx) => {
                    let mut next = Vec::clone(current);
                    removed = Some(next.remove(idx).device);
                    Arc::new(next)
                }
                Err(_) => Arc::clone(current),
            }
        });
        removed.ok_or(BusError::NotFound {
            kind: self.kind,
            base,
        })
    }

    /// Returns the device claiming `addr` with its base and length, if any.
    pub fn device_at(&self, addr: u64) -> Option<(u64, u64, Arc<dyn BusDevice>)> {
        let entries = self.entries.load();
        Self::lookup(&entries, addr, 1).map(|e| (e.base, e.len, Arc::clone(&e.device)))
    }

    /// Finds the entry holding all of `[addr, addr + len)`.
    #[inline]
    fn lookup(entries: &[Entry], addr: u64, len: usize) -> Option<&Entry> {
        let idx = entries.partition_point(|e| e.base <= addr);
        let entry = entries.get(idx.checked_sub(1)?)?;
        let offset = addr - entry.base;
        (offset < entry.len && len as u64 <= entry.len - offset).then_some(entry)
    }

    /// Dispatches a guest read of `data.len()` bytes at `addr`.
    ///
    /// On error `data` holds all ones, which is what the guest should see, and the
    /// miss is counted in [`Bus::stats`].
    #[inline]
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        data.fill(0xff);
        if !self.kind.allows_width(data.len()) {
            self.bad_widths.fetch_add(1, Ordering::Relaxed);
            return Err(BusError::BadWidth {
                kind: self.kind,
                addr,
                len: data.len(),
            });
        }
        let entries = self.entries.load();
        match Self::lookup(&entries, addr, data.len()) {
            Some(entry) => {
                entry.device.read(addr - entry.base, data);
                Ok(())
            }
            None => {
                self.unclaimed_reads.fetch_add(1, Ordering::Relaxed);
                Err(BusError::Unclaimed {
                    kind: self.kind,
                    addr,
                    len: data.len(),
                })
            }
        }
    }

    /// Dispatches a guest write of `data` at `addr`.
    ///
    /// On error the write is dropped and counted in [`Bus::stats`].
    #[inline]
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        if !self.kind.allows_width(data.len()) {
            self.bad_widths.fetch_add(1, Ordering::Relaxed);
            return Err(BusError::BadWidth {
                kind: self.kind,
                addr,
                len: data.len(),
            });
        }
        let entries = self.entries.load();
        match Self::lookup(&entries, addr, data.len()) {
            Some(entry) => {
                entry.device.write(addr - entry.base, data);
                Ok(())
            }
            None => {
                self.unclaimed_writes.fetch_add(1, Ordering::Relaxed);
                Err(BusError::Unclaimed {
                    kind: self.kind,
                    addr,
                    len: data.len(),
                })
            }
        }
    }

    /// Counters of accesses that reached no device or had a bad width.
    pub fn stats(&self) -> BusStats {
        BusStats {
            unclaimed_reads: self.unclaimed_reads.load(Ordering::Relaxed),
            unclaimed_writes: self.unclaimed_writes.load(Ordering::Relaxed),
            bad_widths: self.bad_widths.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records every access; reads return the low byte of the offset in every byte.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(bool, u64, Vec<u8>)>>);

    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
            self.0.lock().unwrap().push((false, offset, data.to_vec()));
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((true, offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Recorder> {
        Arc::new(Recorder::default())
    }

    #[test]
    fn dispatches_with_offset_from_base() {
        let bus = Bus::new(BusKind::Mmio);
        let a = recorder();
        let b = recorder();
        bus.insert(0x1000, 0x100, a.clone()).unwrap();
        bus.insert(0x2000, 0x10, b.clone()).unwrap();

        let mut data = [0u8; 4];
        bus.read(0x1010, &mut data).unwrap();
        assert_eq!(data, [0x10; 4]);
        bus.write(0x200c, &[1, 2, 3, 4]).unwrap();
        bus.write(0x1000, &[9; 8]).unwrap();

        assert_eq!(
            *a.0.lock().unwrap(),
            vec![(false, 0x10, vec![0x10; 4]), (true, 0, vec![9; 8])]
        );
        assert_eq!(*b.0.lock().unwrap(), vec![(true, 0xc, vec![1, 2, 3, 4])]);
        assert_eq!(bus.stats(), BusStats::default());
    }

    #[test]
    fn unclaimed_reads_are_all_ones_and_counted() {
        let bus = Bus::new(BusKind::Pio);
        let dev = recorder();
        bus.insert(0x60, 1, dev.clone()).unwrap();
        for addr in [0x5f, 0x61, 0xffff] {
            let mut data = [0u8; 2];
            assert_eq!(
                bus.read(addr, &mut data),
                Err(BusError::Unclaimed {
                    kind: BusKind::Pio,
                    addr,
                    len: 2
                })
            );
            assert_eq!(data, [0xff, 0xff]);
        }
        assert!(bus.write(0x62, &[1]).is_err());
        assert_eq!(
            bus.stats(),
            BusStats {
                unclaimed_reads: 3,
                unclaimed_writes: 1,
                bad_widths: 0
            }
        );
        assert!(dev.0.lock().unwrap().is_empty());
    }

    #[test]
    fn access_straddling_the_end_of_a_device_is_unclaimed() {
        let bus = Bus::new(BusKind::Mmio);
        let dev = recorder();
        bus.insert(0x1000, 4, dev.clone()).unwrap();
        bus.insert(0x1004, 4, recorder()).unwrap();
        let mut data = [0u8; 4];
        assert!(bus.read(0x1002, &mut data).is_err());
        assert_eq!(data, [0xff; 4]);
        assert!(bus.write(0x1001, &[0; 8]).is_err());
        assert!(dev.0.lock().unwrap().is_empty());
        // Exactly the last byte is fine.
        bus.write(0x1003, &[7]).unwrap();
        assert_eq!(dev.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn widths_are_checked_per_bus_kind() {
        let pio = Bus::new(BusKind::Pio);
        pio.insert(0, 0x100, recorder()).unwrap();
        let mut eight = [0u8; 8];
        assert!(matches!(
            pio.read(0, &mut eight),
            Err(BusError::BadWidth { len: 8, .. })
        ));
        assert_eq!(eight, [0xff; 8]);
        assert!(pio.write(0, &[0; 3]).is_err());
        assert!(pio.write(0, &[]).is_err());
        assert_eq!(pio.stats().bad_widths, 3);

        let mmio = Bus::new(BusKind::Mmio);
        mmio.insert(0, 0x100, recorder()).unwrap();
        mmio.read(0, &mut eight).unwrap();
        let mut sixteen = [0u8; 16];
        assert!(mmio.read(0, &mut sixteen).is_err());
        assert!(mmio.write(0, &[0; 5]).is_err());
    }

    #[test]
    fn overlapping_and_invalid_ranges_are_rejected() {
        let bus = Bus::new(BusKind::Pio);
        bus.insert(0x10, 0x10, recorder()).unwrap();
        for (base, len) in [(0x10, 1), (0x1f, 1), (0x0, 0x11), (0x8, 0x100), (0x18, 2)] {
            assert!(
                matches!(
                    bus.insert(base, len, recorder()),
                    Err(BusError::Overlap { .. })
                ),
                "{base:#x}+{len:#x} should overlap"
            );
        }
        bus.insert(0x0, 0x10, recorder()).unwrap();
        bus.insert(0x20, 1, recorder()).unwrap();
        assert!(matches!(
            bus.insert(0x30, 0, recorder()),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(0xffff, 2, recorder()),
            Err(BusError::InvalidRange { .. })
        ));
        bus.insert(0xffff, 1, recorder()).unwrap();
        assert_eq!(bus.len(), 4);

        let mmio = Bus::new(BusKind::Mmio);
        assert!(matches!(
            mmio.insert(u64::MAX, 2, recorder()),
            Err(BusError::InvalidRange { .. })
        ));
        mmio.insert(u64::MAX - 7, 8, recorder()).unwrap();
        let mut data = [0u8; 8];
        mmio.read(u64::MAX - 7, &mut data).unwrap();
        assert!(mmio.read(u64::MAX - 3, &mut data).is_err());
        // Far past the last device: no overflow, just unclaimed.
        let small = Bus::new(BusKind::Mmio);
        small.insert(0, 1, recorder()).unwrap();
        assert!(small.read(u64::MAX - 1, &mut data).is_err());
    }

    #[test]
    fn remove_frees_the_range() {
        let bus = Bus::new(BusKind::Mmio);
        let dev = recorder();
        bus.insert(0x1000, 0x10, dev.clone()).unwrap();
        assert!(matches!(
            bus.remove(0x1001),
            Err(BusError::NotFound { base: 0x1001, .. })
        ));
        let removed = bus.remove(0x1000).unwrap();
        assert!(Arc::ptr_eq(&removed, &(dev.clone() as Arc<dyn BusDevice>)));
        assert!(bus.is_empty());
        assert!(bus.write(0x1000, &[1]).is_err());
        bus.insert(0x1008, 0x10, recorder()).unwrap();
        assert!(bus.device_at(0x1008).is_some());
        assert!(bus.device_at(0x1007).is_none());
    }

    #[test]
    fn concurrent_dispatch_while_inserting() {
        let bus = Arc::new(Bus::new(BusKind::Mmio));
        let dev = recorder();
        bus.insert(0, 8, dev.clone()).unwrap();
        let writers: Vec<_> = (0..2)
            .map(|_| {
                let bus = Arc::clone(&bus);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        bus.write(0, &[1]).unwrap();
                    }
                })
            })
            .collect();
        for i in 1..100u64 {
            bus.insert(i * 0x100, 8, recorder()).unwrap();
        }
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(dev.0.lock().unwrap().len(), 2000);
        assert_eq!(bus.len(), 100);
    }
}

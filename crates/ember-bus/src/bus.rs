//! The bus: a table of address ranges, each claimed by one device.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::cache::Cache;
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

    /// Whether the entry claims all of `[addr, addr + len)`.
    #[inline(always)]
    fn holds(&self, addr: u64, len: usize) -> bool {
        // Below `base` the offset wraps to at least `2^64 - base`, which is at least
        // `self.len` (the range fits the address space): rejected too.
        let offset = addr.wrapping_sub(self.base);
        offset < self.len && len as u64 <= self.len - offset
    }
}

/// The device table: sorted by `base`, ranges disjoint. Never changed in place: every
/// insert or remove publishes a new one.
type Table = Vec<Entry>;

/// The published table, shared by the [`Bus`] and every [`BusHandle`].
type SharedTable = Arc<ArcSwap<Table>>;

/// Miss counters, shared by the [`Bus`] and every [`BusHandle`].
#[derive(Debug, Default)]
struct Counters {
    unclaimed_reads: AtomicU64,
    unclaimed_writes: AtomicU64,
    bad_widths: AtomicU64,
}

impl Counters {
    #[cold]
    fn bad_width(&self, kind: BusKind, addr: u64, len: usize) -> BusError {
        self.bad_widths.fetch_add(1, Ordering::Relaxed);
        BusError::BadWidth { kind, addr, len }
    }

    #[cold]
    fn unclaimed_read(&self, kind: BusKind, addr: u64, len: usize) -> BusError {
        self.unclaimed_reads.fetch_add(1, Ordering::Relaxed);
        BusError::Unclaimed { kind, addr, len }
    }

    #[cold]
    fn unclaimed_write(&self, kind: BusKind, addr: u64, len: usize) -> BusError {
        self.unclaimed_writes.fetch_add(1, Ordering::Relaxed);
        BusError::Unclaimed { kind, addr, len }
    }
}

/// Fills an access buffer of an allowed width (1, 2, 4 or 8 bytes) with all ones: one
/// store, where `<[u8]>::fill` on a slice of unknown length would call `memset`.
#[inline(always)]
fn fill_ones(data: &mut [u8]) {
    match data.len() {
        1 => data[0] = 0xff,
        2 => data.copy_from_slice(&[0xff; 2]),
        4 => data.copy_from_slice(&[0xff; 4]),
        8 => data.copy_from_slice(&[0xff; 8]),
        _ => data.fill(0xff),
    }
}

/// Tables up to this many entries are searched by counting, without branches.
const SMALL_TABLE: usize = 16;

/// Finds the entry holding all of `[addr, addr + len)`.
#[inline(always)]
fn lookup(entries: &[Entry], addr: u64, len: usize) -> Option<(usize, &Entry)> {
    let below = if entries.len() <= SMALL_TABLE {
        // Entries starting at or below `addr`: a sum of comparisons, so an address that
        // changes from one access to the next costs no mispredicted branches.
        entries.iter().map(|e| usize::from(e.base <= addr)).sum()
    } else {
        entries.partition_point(|e| e.base <= addr)
    };
    let idx = below.checked_sub(1)?;
    let entry = entries.get(idx)?;
    entry.holds(addr, len).then_some((idx, entry))
}

/// [`lookup`], trying the entry at index `hint` first and leaving there the index of the
/// entry found. Any `hint` is safe: ranges are disjoint, so an entry that holds the
/// access is the one `lookup` would find, whichever table `hint` came from.
#[inline(always)]
fn lookup_hinted<'t>(
    entries: &'t [Entry],
    hint: &mut usize,
    addr: u64,
    len: usize,
) -> Option<&'t Entry> {
    if let Some(entry) = entries.get(*hint) {
        if entry.holds(addr, len) {
            return Some(entry);
        }
    }
    let (idx, entry) = lookup(entries, addr, len)?;
    *hint = idx;
    Some(entry)
}

/// Reads through `entries`: the body of [`Bus::read`] and [`BusHandle::read`].
#[inline(always)]
fn dispatch_read(
    kind: BusKind,
    entries: &[Entry],
    hint: Option<&mut usize>,
    counters: &Counters,
    addr: u64,
    data: &mut [u8],
) -> Result<(), BusError> {
    if !kind.allows_width(data.len()) {
        data.fill(0xff);
        return Err(counters.bad_width(kind, addr, data.len()));
    }
    fill_ones(data);
    let found = match hint {
        Some(hint) => lookup_hinted(entries, hint, addr, data.len()),
        None => lookup(entries, addr, data.len()).map(|(_, e)| e),
    };
    match found {
        Some(entry) => {
            entry.device.read(addr - entry.base, data);
            Ok(())
        }
        None => Err(counters.unclaimed_read(kind, addr, data.len())),
    }
}

/// Writes through `entries`: the body of [`Bus::write`] and [`BusHandle::write`].
#[inline(always)]
fn dispatch_write(
    kind: BusKind,
    entries: &[Entry],
    hint: Option<&mut usize>,
    counters: &Counters,
    addr: u64,
    data: &[u8],
) -> Result<(), BusError> {
    if !kind.allows_width(data.len()) {
        return Err(counters.bad_width(kind, addr, data.len()));
    }
    let found = match hint {
        Some(hint) => lookup_hinted(entries, hint, addr, data.len()),
        None => lookup(entries, addr, data.len()).map(|(_, e)| e),
    };
    match found {
        Some(entry) => {
            entry.device.write(addr - entry.base, data);
            Ok(())
        }
        None => Err(counters.unclaimed_write(kind, addr, data.len())),
    }
}

/// A PIO or MMIO bus.
///
/// Share it between threads with an `Arc`; every method takes `&self`. On a vCPU's exit
/// path prefer a [`BusHandle`] ([`Bus::handle`]), which skips the reference counting
/// that [`Bus::read`] and [`Bus::write`] do on every access.
pub struct Bus {
    kind: BusKind,
    entries: SharedTable,
    counters: Arc<Counters>,
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
            entries: Arc::new(ArcSwap::from_pointee(Vec::new())),
            counters: Arc::default(),
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
        lookup(&entries, addr, 1).map(|(_, e)| (e.base, e.len, Arc::clone(&e.device)))
    }

    /// Dispatches a guest read of `data.len()` bytes at `addr`.
    ///
    /// The device sees `data` filled with all ones. On error `data` holds all ones,
    /// which is what the guest should see, and the miss is counted in [`Bus::stats`].
    #[inline]
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let entries = self.entries.load();
        dispatch_read(self.kind, &entries, None, &self.counters, addr, data)
    }

    /// Dispatches a guest write of `data` at `addr`.
    ///
    /// On error the write is dropped and counted in [`Bus::stats`].
    #[inline]
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let entries = self.entries.load();
        dispatch_write(self.kind, &entries, None, &self.counters, addr, data)
    }

    /// Counters of accesses that reached no device or had a bad width, through the bus
    /// and all its handles.
    pub fn stats(&self) -> BusStats {
        let c = &self.counters;
        BusStats {
            unclaimed_reads: c.unclaimed_reads.load(Ordering::Relaxed),
            unclaimed_writes: c.unclaimed_writes.load(Ordering::Relaxed),
            bad_widths: c.bad_widths.load(Ordering::Relaxed),
        }
    }

    /// A handle for one vCPU thread: the fast way to dispatch accesses. See
    /// [`BusHandle`] for what it guarantees.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use ember_bus::{Bus, BusDevice, BusKind};
    /// # struct Dummy;
    /// # impl BusDevice for Dummy {
    /// #     fn read(&self, _: u64, data: &mut [u8]) { data.fill(0x11) }
    /// #     fn write(&self, _: u64, _: &[u8]) {}
    /// # }
    /// let bus = Arc::new(Bus::new(BusKind::Pio));
    /// let mut pio = bus.handle(); // owned: move it into the vCPU thread
    /// bus.insert(0x80, 1, Arc::new(Dummy)).unwrap(); // seen at the next access
    /// let mut byte = [0u8; 1];
    /// pio.read(0x80, &mut byte).unwrap();
    /// assert_eq!(byte, [0x11]);
    /// ```
    pub fn handle(&self) -> BusHandle {
        BusHandle {
            kind: self.kind,
            cache: Cache::new(Arc::clone(&self.entries)),
            hint: 0,
            counters: Arc::clone(&self.counters),
        }
    }
}

/// A vCPU's view of a [`Bus`], from [`Bus::handle`]: dispatches accesses like
/// [`Bus::read`] and [`Bus::write`], with the same checks, results and counters, but
/// faster.
///
/// The handle caches the bus's device table. Each access first compares the cached
/// table with the published one (one relaxed atomic load of a pointer) and only when
/// they differ takes the new table; then it checks the device the handle's previous
/// access went to (exits come in runs on one device: a UART's output, a queue's
/// notifications) and only if that one does not hold the access does a binary
/// search; then it calls the device. No reference counting, no shared cache line
/// written. Hence `&mut self`: keep one handle per vCPU thread (it is `Send` and
/// `Clone`, not shared).
///
/// **Freshness.** An access sees every [`Bus::insert`] and [`Bus::remove`] that returned
/// before the access started (that happened-before it, as anything that told the vCPU
/// thread the change was made ensures): a handle never dispatches to a device whose
/// removal it could know of. Changes are taken lazily, at the handle's next access, so
/// an idle handle keeps the table it last used, and with it a reference to each device
/// that was in it; a removed device is dropped only once every handle has made an
/// access (or been dropped). As with `Bus::read`, an access already running when
/// `remove` is called may still reach the removed device.
#[derive(Clone)]
pub struct BusHandle {
    kind: BusKind,
    cache: Cache<SharedTable, Arc<Table>>,
    /// Index of the entry the last access went to (a hint; see [`lookup_hinted`]).
    hint: usize,
    counters: Arc<Counters>,
}

impl fmt::Debug for BusHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusHandle")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl BusHandle {
    /// The address space of the bus this handle serves.
    pub fn kind(&self) -> BusKind {
        self.kind
    }

    /// Dispatches a guest read of `data.len()` bytes at `addr`; as [`Bus::read`].
    #[inline]
    pub fn read(&mut self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let entries: &Table = self.cache.load();
        let hint = Some(&mut self.hint);
        dispatch_read(self.kind, entries, hint, &self.counters, addr, data)
    }

    /// Dispatches a guest write of `data` at `addr`; as [`Bus::write`].
    #[inline]
    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let entries: &Table = self.cache.load();
        let hint = Some(&mut self.hint);
        dispatch_write(self.kind, entries, hint, &self.counters, addr, data)
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

    #[test]
    fn handle_dispatches_like_the_bus() {
        let bus = Bus::new(BusKind::Mmio);
        let dev = recorder();
        bus.insert(0x1000, 0x100, dev.clone()).unwrap();
        let mut h = bus.handle();
        assert_eq!(h.kind(), BusKind::Mmio);

        let mut data = [0u8; 4];
        h.read(0x1010, &mut data).unwrap();
        assert_eq!(data, [0x10; 4]);
        h.write(0x10fc, &[1, 2, 3, 4]).unwrap();
        // Same errors, same all-ones answer, counted in the bus's stats.
        let mut data = [0u8; 8];
        assert_eq!(
            h.read(0x10fc, &mut data),
            Err(BusError::Unclaimed {
                kind: BusKind::Mmio,
                addr: 0x10fc,
                len: 8
            })
        );
        assert_eq!(data, [0xff; 8]);
        assert!(h.write(0x2000, &[1]).is_err());
        let mut sixteen = [0u8; 16];
        assert!(matches!(
            h.read(0x1000, &mut sixteen),
            Err(BusError::BadWidth { len: 16, .. })
        ));
        assert_eq!(sixteen, [0xff; 16]);
        assert_eq!(
            bus.stats(),
            BusStats {
                unclaimed_reads: 1,
                unclaimed_writes: 1,
                bad_widths: 1
            }
        );
        assert_eq!(
            *dev.0.lock().unwrap(),
            vec![(false, 0x10, vec![0x10; 4]), (true, 0xfc, vec![1, 2, 3, 4])]
        );
    }

    /// Reads leave bytes the device does not write as all ones, whatever the buffer held.
    #[test]
    fn devices_see_all_ones_on_reads() {
        struct Untouched;
        impl BusDevice for Untouched {
            fn read(&self, _: u64, data: &mut [u8]) {
                assert!(data.iter().all(|&b| b == 0xff), "{data:?}");
            }
            fn write(&self, _: u64, _: &[u8]) {}
        }
        let bus = Bus::new(BusKind::Mmio);
        bus.insert(0, 0x100, Arc::new(Untouched)).unwrap();
        let mut h = bus.handle();
        for len in [1, 2, 4, 8] {
            let mut data = [0x5au8; 8];
            h.read(0, &mut data[..len]).unwrap();
            assert_eq!(&data[..len], &[0xff; 8][..len]);
            let mut data = [0x5au8; 8];
            bus.read(0, &mut data[..len]).unwrap();
            assert_eq!(&data[..len], &[0xff; 8][..len]);
        }
    }

    #[test]
    fn handle_sees_inserts_and_removes_made_after_it_was_created() {
        let bus = Bus::new(BusKind::Pio);
        let mut h = bus.handle();
        assert!(h.write(0x60, &[1]).is_err());

        let first = recorder();
        bus.insert(0x60, 1, first.clone()).unwrap();
        h.write(0x60, &[1]).unwrap();
        assert_eq!(first.0.lock().unwrap().len(), 1);

        // Removed: the next access does not reach it, even though the handle's cached
        // table still held it.
        bus.remove(0x60).unwrap();
        assert!(h.write(0x60, &[2]).is_err());
        assert_eq!(first.0.lock().unwrap().len(), 1);

        // Replaced at the same address: the next access reaches the new device.
        let second = recorder();
        bus.insert(0x60, 1, second.clone()).unwrap();
        h.write(0x60, &[3]).unwrap();
        assert_eq!(first.0.lock().unwrap().len(), 1);
        assert_eq!(*second.0.lock().unwrap(), vec![(true, 0, vec![3])]);

        // A handle made from a clone sees the same table.
        let mut h2 = h.clone();
        bus.remove(0x60).unwrap();
        assert!(h2.write(0x60, &[4]).is_err());
        assert!(h.write(0x60, &[4]).is_err());
        assert_eq!(second.0.lock().unwrap().len(), 1);
    }

    /// The handle tries the device of its previous access first; that never sends an
    /// access to the wrong device, also when the table changed in between, nor lets
    /// one straddle the end of that device.
    /// Tables on both sides of `SMALL_TABLE` (searched by counting, and by binary
    /// search): every device's first and last byte reach it with the right offset, the
    /// gaps between devices and the addresses around the table reach nothing, through
    /// the bus and through a handle, in an order that keeps missing the handle's hint.
    #[test]
    fn lookup_is_exact_for_small_and_large_tables() {
        for count in [1usize, 2, 15, 16, 17, 40] {
            let bus = Bus::new(BusKind::Mmio);
            let devices: Vec<_> = (0..count).map(|_| recorder()).collect();
            // Devices of 8 bytes at 0x1000 + 0x10 * i: an 8-byte gap after each.
            let base = |i: usize| 0x1000 + 0x10 * i as u64;
            for (i, d) in devices.iter().enumerate() {
                bus.insert(base(i), 8, d.clone()).unwrap();
            }
            let mut h = bus.handle();
            for i in (0..count).rev().chain(0..count) {
                for (addr, offset) in [(base(i), 0u64), (base(i) + 7, 7)] {
                    h.write(addr, &[i as u8]).unwrap();
                    bus.write(addr, &[i as u8]).unwrap();
                    let last = devices[i].0.lock().unwrap().last().cloned();
                    assert_eq!(last, Some((true, offset, vec![i as u8])), "{count}: {i}");
                }
                assert!(
                    h.write(base(i) + 8, &[0]).is_err(),
                    "{count}: gap after {i}"
                );
                assert!(
                    h.write(base(i) + 4, &[0; 8]).is_err(),
                    "{count}: straddles {i}"
                );
            }
            assert!(h.write(0xfff, &[0]).is_err());
            assert!(h.write(base(count), &[0]).is_err());
            let total: usize = devices.iter().map(|d| d.0.lock().unwrap().len()).sum();
            assert_eq!(
                total,
                8 * count,
                "{count}: an access reached a wrong device"
            );
        }
    }

    #[test]
    fn handle_hint_never_misroutes() {
        let bus = Bus::new(BusKind::Pio);
        let a = recorder();
        let b = recorder();
        bus.insert(0x10, 4, a.clone()).unwrap();
        bus.insert(0x20, 4, b.clone()).unwrap();
        let mut h = bus.handle();
        h.write(0x20, &[1]).unwrap(); // hint: b's index (1)
        assert!(h.write(0x22, &[0; 4]).is_err()); // straddles b's end
        assert!(h.write(0x1f, &[1]).is_err()); // just below b
                                               // A device below both shifts the indices: index 1 is now `a`.
        let c = recorder();
        bus.insert(0x0, 4, c.clone()).unwrap();
        h.write(0x21, &[2]).unwrap();
        h.write(0x13, &[3]).unwrap();
        h.write(0x3, &[4]).unwrap();
        bus.remove(0x0).unwrap();
        h.write(0x20, &[5]).unwrap();
        let writes = |r: &Recorder| -> Vec<(u64, u8)> {
            r.0.lock()
                .unwrap()
                .iter()
                .map(|(_, o, d)| (*o, d[0]))
                .collect()
        };
        assert_eq!(writes(&a), vec![(3, 3)]);
        assert_eq!(writes(&b), vec![(0, 1), (1, 2), (0, 5)]);
        assert_eq!(writes(&c), vec![(3, 4)]);
        assert_eq!(bus.stats().unclaimed_writes, 2);
    }

    #[test]
    fn removed_device_is_released_at_the_handles_next_access() {
        let bus = Bus::new(BusKind::Mmio);
        let dev = recorder();
        bus.insert(0x1000, 8, dev.clone()).unwrap();
        let mut h = bus.handle();
        h.write(0x1000, &[1]).unwrap();
        drop(bus.remove(0x1000).unwrap());
        // The idle handle's cached table still holds the device...
        assert_eq!(Arc::strong_count(&dev), 2);
        // ...until its next access, whatever the address.
        assert!(h.write(0x9999, &[1]).is_err());
        assert_eq!(Arc::strong_count(&dev), 1);
    }

    #[test]
    fn handle_outlives_the_bus() {
        let bus = Bus::new(BusKind::Pio);
        let dev = recorder();
        bus.insert(0x70, 2, dev.clone()).unwrap();
        let mut h = bus.handle();
        drop(bus);
        h.write(0x71, &[5]).unwrap();
        assert_eq!(*dev.0.lock().unwrap(), vec![(true, 1, vec![5])]);
    }

    /// Counts writes; reads return the low byte of the offset. Bounded memory, for
    /// threads that dispatch for a long time.
    #[derive(Default)]
    struct Counter(AtomicU64);

    impl BusDevice for Counter {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, _offset: u64, _data: &[u8]) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// vCPU threads dispatch through their own handles while devices come and go: the
    /// always-present device gets every access, a removed device none once its removal
    /// happened-before the access, and nothing tears.
    #[test]
    fn concurrent_handles_while_inserting_and_removing() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Barrier;

        const ROUNDS: u64 = 200;
        let bus = Arc::new(Bus::new(BusKind::Mmio));
        let fixed = Arc::new(Counter::default());
        bus.insert(0, 8, fixed.clone()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let vcpus: Vec<_> = (0..2)
            .map(|_| {
                let mut h = bus.handle();
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    let mut data = [0u8; 4];
                    while !stop.load(Ordering::Relaxed) {
                        h.write(0, &[1]).unwrap();
                        h.read(4, &mut data).unwrap();
                        assert_eq!(data, [4; 4]);
                        // The hot-plugged device may or may not be there; never torn.
                        match h.read(0x1004, &mut data) {
                            Ok(()) => assert_eq!(data, [4; 4]),
                            Err(_) => assert_eq!(data, [0xff; 4]),
                        }
                        n += 1;
                    }
                    n
                })
            })
            .collect();

        // Each round: insert a device, a checker thread's handle reaches it; remove it,
        // and once the checker knows (a barrier orders the threads) its handle no longer
        // does. Unrelated inserts keep the table changing under the vCPUs.
        let barrier = Arc::new(Barrier::new(2));
        let checker = {
            let barrier = Arc::clone(&barrier);
            let mut h = bus.handle();
            std::thread::spawn(move || {
                for _ in 0..ROUNDS {
                    barrier.wait(); // inserted
                    h.write(0x1000, &[1]).unwrap();
                    barrier.wait(); // written
                    barrier.wait(); // removed
                    assert!(h.write(0x1000, &[2]).is_err());
                    barrier.wait(); // checked
                }
            })
        };
        for round in 0..ROUNDS {
            let dev = Arc::new(Counter::default());
            bus.insert(0x1000, 8, dev.clone()).unwrap();
            bus.insert(0x2000 + round * 0x10, 8, Arc::new(Counter::default()))
                .unwrap();
            barrier.wait();
            barrier.wait();
            bus.remove(0x1000).unwrap();
            barrier.wait();
            barrier.wait();
            assert_eq!(dev.0.load(Ordering::Relaxed), 1);
        }
        checker.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        let total: u64 = vcpus.into_iter().map(|v| v.join().unwrap()).sum();
        assert_eq!(fixed.0.load(Ordering::Relaxed), total);
        assert_eq!(bus.len(), 1 + ROUNDS as usize);
    }
}

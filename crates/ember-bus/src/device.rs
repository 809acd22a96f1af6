//! The trait every device on a bus implements.

/// A device reachable through a [`Bus`](crate::Bus).
///
/// The bus has already checked the access: `offset + data.len()` lies inside the range
/// the device was inserted with, and `data.len()` is a width the bus allows (1, 2, 4,
/// or 8 on MMIO). A device still treats `offset` and the data as guest-controlled: an
/// offset it has no register at must be ignored (writes) or read as something harmless.
///
/// Methods take `&self` so that the bus needs no lock: a device with mutable state
/// keeps it behind its own `Mutex` or atomics.
pub trait BusDevice: Send + Sync {
    /// Handles a guest read of `data.len()` bytes at `offset` from the device's base.
    /// `data` arrives filled with all ones (the bus and its handles guarantee it, at the
    /// cost of one store); a device leaves bytes it does not model as they are.
    fn read(&self, offset: u64, data: &mut [u8]);

    /// Handles a guest write of `data` at `offset` from the device's base.
    fn write(&self, offset: u64, data: &[u8]);
}

//! A debug-exit port: the guest writes a byte and the VMM exits with that code.

use std::sync::Arc;

use ember_bus::BusDevice;

use crate::{ExitRequest, ExitSignal};

/// The debug-exit I/O port.
pub const DEBUG_EXIT_PORT: u16 = ember_arch::layout::DEBUG_EXIT_PORT;
/// Number of ports the debug-exit device claims.
pub const DEBUG_EXIT_PORT_SIZE: u64 = ember_arch::layout::DEBUG_EXIT_PORT_SIZE;

/// Ends the VM with the code the guest writes.
///
/// A write of any width at offset 0 requests [`ExitRequest::DebugExit`] with the low
/// byte (`data[0]`; x86 is little-endian) as the code. The code is used as is (unlike
/// QEMU's `isa-debug-exit`, which exits with `(code << 1) | 1`). Only the first request
/// on the shared [`ExitSignal`] counts. Reads return all ones.
///
/// ```
/// use std::sync::Arc;
/// use ember_bus::BusDevice;
/// use ember_devices::{DebugExit, ExitRequest, ExitSignal};
///
/// let exit = Arc::new(ExitSignal::new().unwrap());
/// let dev = DebugExit::new(Arc::clone(&exit));
/// dev.write(0, &[0x2a, 0, 0, 0]);
/// assert_eq!(exit.requested(), Some(ExitRequest::DebugExit(0x2a)));
/// ```
#[derive(Debug)]
pub struct DebugExit {
    exit: Arc<ExitSignal>,
}

impl DebugExit {
    /// Creates the device; guest writes are reported on `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        DebugExit { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        if let Some(&code) = data.first() {
            ember_rate_limiter::info_limited!("guest wrote {code:#04x} to the debug-exit port");
            self.exit.request(ExitRequest::DebugExit(code));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fuzz_device;
    use ember_bus::{Bus, BusKind};

    const PORT: u64 = DEBUG_EXIT_PORT as u64;

    fn setup() -> (Bus, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let bus = Bus::new(BusKind::Pio);
        bus.insert(
            PORT,
            DEBUG_EXIT_PORT_SIZE,
            Arc::new(DebugExit::new(Arc::clone(&exit))),
        )
        .unwrap();
        (bus, exit)
    }

    #[test]
    fn writes_of_every_width_give_the_low_byte() {
        for data in [&[0x2a][..], &[0x2a, 0x11], &[0x2a, 0x11, 0x22, 0x33]] {
            let exit = Arc::new(ExitSignal::new().unwrap());
            let dev = DebugExit::new(Arc::clone(&exit));
            dev.write(0, data);
            assert_eq!(exit.requested(), Some(ExitRequest::DebugExit(0x2a)));
            assert_eq!(exit.event_fd().read().unwrap(), 1);
        }
    }

    /// A 1-port range only admits 1-byte accesses on the bus; a VMM that wants
    /// `out dx, ax/eax` to reach the device maps a 4-port range.
    #[test]
    fn wide_writes_through_a_bus() {
        for width in [1usize, 2, 4] {
            let exit = Arc::new(ExitSignal::new().unwrap());
            let bus = Bus::new(BusKind::Pio);
            let dev = Arc::new(DebugExit::new(Arc::clone(&exit)));
            bus.insert(PORT, 4, dev).unwrap();
            let data = [0x07, 0xaa, 0xbb, 0xcc];
            bus.write(PORT, &data[..width]).unwrap();
            assert_eq!(exit.requested(), Some(ExitRequest::DebugExit(0x07)));
        }
    }

    #[test]
    fn byte_write_through_the_bus_and_first_wins() {
        let (bus, exit) = setup();
        bus.write(PORT, &[0]).unwrap();
        bus.write(PORT, &[9]).unwrap();
        assert_eq!(exit.requested(), Some(ExitRequest::DebugExit(0)));
    }

    #[test]
    fn reads_return_all_ones_and_do_not_exit() {
        let (bus, exit) = setup();
        let mut byte = [0u8];
        bus.read(PORT, &mut byte).unwrap();
        assert_eq!(byte, [0xff]);
        assert_eq!(exit.requested(), None);
    }

    #[test]
    fn empty_or_offset_writes_are_ignored() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let dev = DebugExit::new(Arc::clone(&exit));
        dev.write(0, &[]);
        dev.write(1, &[5]);
        dev.write(u64::MAX, &[5]);
        assert_eq!(exit.requested(), None);
    }

    #[test]
    fn survives_random_accesses() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let dev = Arc::new(DebugExit::new(Arc::clone(&exit)));
        fuzz_device(dev, PORT, DEBUG_EXIT_PORT_SIZE, 0xdeb6);
        assert!(matches!(exit.requested(), Some(ExitRequest::DebugExit(_))));
    }
}

//! A minimal i8042 PS/2 controller whose only job is the CPU-reset command.

use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use ember_bus::BusDevice;
use vm_superio::{I8042Device, Trigger};

use crate::{DeviceError, ExitRequest, ExitSignal};

/// First I/O port of the i8042 (the data port).
pub const I8042_PORT: u16 = 0x60;
/// Number of ports claimed: `0x60` (data) through `0x64` (command/status).
///
/// Ports `0x61..=0x63` in between are not i8042 registers; port `0x61` (system control
/// port B) is handled inside KVM when the PIT is created with `KVM_PIT_SPEAKER_DUMMY`
/// (see [`create_irqchip_and_pit`](crate::create_irqchip_and_pit)).
pub const I8042_PORT_SIZE: u64 = 5;

/// Bus offset of the command/status register (port `0x64`).
const COMMAND_OFFSET: u64 = 4;

/// Turns vm-superio's reset trigger into an [`ExitRequest::Reset`].
struct ResetTrigger(Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        log::info!("guest requested a reset through the i8042; ending the VM");
        self.0.request(ExitRequest::Reset);
        Ok(())
    }
}

/// The i8042 keyboard controller, reduced to what a VMM needs: writing the reset
/// command `0xFE` to port `0x64` (bus offset 4) ends the VM cleanly through
/// [`ExitSignal::request`]`(`[`ExitRequest::Reset`]`)`.
///
/// Insert it at [`I8042_PORT`] with length [`I8042_PORT_SIZE`]; the bus offset is
/// `port - 0x60`, which is the offset vm-superio's `I8042Device` expects. Every other
/// write is ignored and every register reads as 0 (no data, controller idle). An access
/// wider than a byte uses its first byte; the other bytes of a read stay all ones.
pub struct I8042 {
    device: Mutex<I8042Device<ResetTrigger>>,
}

impl fmt::Debug for I8042 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// Creates the controller; a guest reset will be reported on `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Result<Self, DeviceError> {
        Ok(I8042 {
            device: Mutex::new(I8042Device::new(ResetTrigger(exit))),
        })
    }

    fn lock(&self) -> MutexGuard<'_, I8042Device<ResetTrigger>> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Maps a bus offset to an i8042 offset, if it is inside the device.
fn register(offset: u64) -> Option<u8> {
    u8::try_from(offset)
        .ok()
        .filter(|&reg| u64::from(reg) < I8042_PORT_SIZE)
}

impl BusDevice for I8042 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let Some(reg) = register(offset) else {
            return;
        };
        if let Some(first) = data.first_mut() {
            *first = self.lock().read(reg);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let (Some(reg), Some(&value)) = (register(offset), data.first()) else {
            return;
        };
        if offset != COMMAND_OFFSET {
            log::trace!("i8042: ignoring write of {value:#04x} at offset {offset}");
        }
        // The trigger is infallible.
        let _ = self.lock().write(reg, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fuzz_device;
    use ember_bus::{Bus, BusKind};

    const BASE: u64 = I8042_PORT as u64;

    fn setup() -> (Bus, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let bus = Bus::new(BusKind::Pio);
        let dev = I8042::new(Arc::clone(&exit)).unwrap();
        bus.insert(BASE, I8042_PORT_SIZE, Arc::new(dev)).unwrap();
        (bus, exit)
    }

    #[test]
    fn reset_command_requests_reset() {
        let (bus, exit) = setup();
        bus.write(0x64, &[0xfe]).unwrap();
        assert_eq!(exit.requested(), Some(ExitRequest::Reset));
        assert_eq!(exit.event_fd().read().unwrap(), 1);
    }

    #[test]
    fn wide_reset_write_uses_first_byte() {
        let (bus, exit) = setup();
        bus.write(0x63, &[0xfe, 0xfe]).unwrap(); // offset 3: not the command port
        assert_eq!(exit.requested(), None);
        // Bus rejects 0x64 + 2 bytes (outside the range), so only 1-byte at 0x64 works.
        assert!(bus.write(0x64, &[0xfe, 0]).is_err());
        assert_eq!(exit.requested(), None);
    }

    #[test]
    fn other_commands_and_ports_do_not_reset() {
        let (bus, exit) = setup();
        for value in [0x00, 0xaa, 0xad, 0xd1, 0xff, 0xfd] {
            bus.write(0x64, &[value]).unwrap();
        }
        for port in 0x60..0x64 {
            bus.write(port, &[0xfe]).unwrap();
        }
        assert_eq!(exit.requested(), None);
        assert!(exit.event_fd().read().is_err());
    }

    #[test]
    fn registers_read_zero() {
        let (bus, _exit) = setup();
        let mut byte = [0xffu8];
        bus.read(0x64, &mut byte).unwrap();
        assert_eq!(byte, [0]);
        let mut word = [0u8; 4];
        bus.read(0x60, &mut word).unwrap();
        assert_eq!(word, [0, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn survives_random_accesses() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let dev = Arc::new(I8042::new(Arc::clone(&exit)).unwrap());
        fuzz_device(dev, BASE, I8042_PORT_SIZE, 0x8042);
        // Whatever the fuzzer did, the only possible request is a reset.
        assert!(matches!(exit.requested(), None | Some(ExitRequest::Reset)));
    }
}

//! The ACPI shutdown register of a hardware-reduced platform: the guest powers off (S5)
//! or resets by writing one byte to an I/O port.
//!
//! A hardware-reduced ACPI platform has no PM1 control block. Its FADT instead points
//! the sleep control register, the sleep status register and the reset register at I/O
//! ports, and its DSDT's `\_S5_` package gives the sleep type of S5 (soft off). Ember's
//! ACPI tables (`ember_firmware::acpi::setup_acpi` with an `AcpiShutdown`) put all three registers
//! at [`ACPI_SHUTDOWN_PORT`], S5's sleep type [`S5_SLEEP_TYPE`] in `\_S5_`, and
//! [`ACPI_RESET_VALUE`] in the FADT's `RESET_VALUE`; this device, inserted at that port,
//! turns the guest's writes into an [`ExitRequest`].
//!
//! What Linux writes there (ACPICA, `acpi_hw_extended_sleep` and `acpi_reset`):
//!
//! | write | meaning | effect |
//! |---|---|---|
//! | `0x80` | clear `WAK_STS` (sleep status register) before sleeping | none |
//! | `0x34` | `(SLP_TYP 5 << 2) \| SLP_EN`: enter S5 | [`ExitRequest::PowerOff`] |
//! | `0x01` | the FADT's reset value | [`ExitRequest::Reset`] |

use std::sync::Arc;

use ember_bus::BusDevice;

use crate::{ExitRequest, ExitSignal};

/// The I/O port of the sleep control, sleep status and reset register (the port Cloud
/// Hypervisor uses for its ACPI shutdown device; nothing else in Ember's PC layout is
/// there).
pub const ACPI_SHUTDOWN_PORT: u16 = ember_arch::layout::ACPI_SHUTDOWN_PORT;
/// Number of ports the device claims: the one-byte register.
pub const ACPI_SHUTDOWN_PORT_SIZE: u64 = ember_arch::layout::ACPI_SHUTDOWN_PORT_SIZE;
/// The sleep type (`SLP_TYP`) of S5, soft off, as the DSDT's `\_S5_` must give it.
pub const S5_SLEEP_TYPE: u8 = 5;
/// The value that resets the machine, as the FADT's `RESET_VALUE` must give it. Its
/// `SLP_EN` bit is clear, so it cannot be mistaken for a sleep request.
pub const ACPI_RESET_VALUE: u8 = 1;

/// `SLP_EN` (sleep enable), bit 5 of the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// `SLP_TYP` (sleep type), bits 2-4 of the sleep control register.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;

/// What a byte written to the register asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    /// `SLP_EN` with the S5 sleep type.
    PowerOff,
    /// The reset value.
    Reset,
    /// `SLP_EN` with another sleep type: a sleep state Ember does not have.
    OtherSleep(u8),
    /// Anything else, such as clearing `WAK_STS`.
    Nothing,
}

fn decode(value: u8) -> Command {
    if value == ACPI_RESET_VALUE {
        return Command::Reset;
    }
    if value & SLP_EN == 0 {
        return Command::Nothing;
    }
    // Reserved bits (0, 1, 6, 7) are not checked: the sleep type and SLP_EN decide, as
    // in hardware.
    match (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK {
        S5_SLEEP_TYPE => Command::PowerOff,
        other => Command::OtherSleep(other),
    }
}

/// Ends the VM when the guest powers off or resets through ACPI.
///
/// A write at offset 0 whose first byte (the low byte, for a wider write) has `SLP_EN`
/// set and sleep type [`S5_SLEEP_TYPE`] (`0x34`, whatever the reserved bits) requests
/// [`ExitRequest::PowerOff`]; a write of exactly [`ACPI_RESET_VALUE`] requests
/// [`ExitRequest::Reset`], as the i8042's reset command does. Other sleep types, other
/// values (clearing the wake status, `0x80`, among them), empty writes and writes at
/// other offsets are ignored. Only the first request on the shared [`ExitSignal`] counts.
///
/// Reads see the sleep status register: 0 (the machine never wakes from a sleep) at
/// offset 0 in the first byte; any other byte of a read stays all ones.
///
/// ```
/// use std::sync::Arc;
/// use ember_bus::BusDevice;
/// use ember_devices::{AcpiShutdown, ExitRequest, ExitSignal, S5_SLEEP_TYPE};
///
/// let exit = Arc::new(ExitSignal::new().unwrap());
/// let dev = AcpiShutdown::new(Arc::clone(&exit));
/// dev.write(0, &[0x80]); // clear WAK_STS: nothing happens
/// assert_eq!(exit.requested(), None);
/// dev.write(0, &[(S5_SLEEP_TYPE << 2) | 1 << 5]);
/// assert_eq!(exit.requested(), Some(ExitRequest::PowerOff));
/// ```
#[derive(Debug)]
pub struct AcpiShutdown {
    exit: Arc<ExitSignal>,
}

impl AcpiShutdown {
    /// Creates the device; power-off and reset requests are reported on `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        AcpiShutdown { exit }
    }
}

impl BusDevice for AcpiShutdown {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset == 0 {
            if let Some(status) = data.first_mut() {
                *status = 0;
            }
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        if offset != 0 {
            debug_limited!(
                "ACPI shutdown register: ignoring write of {value:#04x} at offset {offset}"
            );
            return;
        }
        match decode(value) {
            Command::PowerOff => {
                ember_rate_limiter::info_limited!(
                    "guest powered off through ACPI (S5); ending the VM"
                );
                self.exit.request(ExitRequest::PowerOff);
            }
            Command::Reset => {
                ember_rate_limiter::info_limited!(
                    "guest requested a reset through the ACPI reset register; ending the VM"
                );
                self.exit.request(ExitRequest::Reset);
            }
            Command::OtherSleep(sleep_type) => {
                ember_rate_limiter::warn_limited!(
                    "guest asked for ACPI sleep type {sleep_type}, which Ember lacks; ignored"
                );
            }
            Command::Nothing => {
                debug_limited!("ACPI shutdown register: ignoring write of {value:#04x}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fuzz_device;
    use ember_bus::{Bus, BusKind};

    const PORT: u64 = ACPI_SHUTDOWN_PORT as u64;
    /// What Linux writes for S5: `(5 << 2) | SLP_EN`.
    const S5: u8 = 0x34;

    fn setup() -> (Bus, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let bus = Bus::new(BusKind::Pio);
        bus.insert(
            PORT,
            ACPI_SHUTDOWN_PORT_SIZE,
            Arc::new(AcpiShutdown::new(Arc::clone(&exit))),
        )
        .unwrap();
        (bus, exit)
    }

    #[test]
    fn linux_power_off_sequence_ends_the_vm() {
        let (bus, exit) = setup();
        // acpi_hw_extended_sleep: clear WAK_STS, then SLP_TYP | SLP_EN.
        bus.write(PORT, &[0x80]).unwrap();
        assert_eq!(exit.requested(), None);
        assert!(exit.event_fd().read().is_err());
        bus.write(PORT, &[S5]).unwrap();
        assert_eq!(exit.requested(), Some(ExitRequest::PowerOff));
        assert_eq!(exit.event_fd().read().unwrap(), 1);
        // Then it polls the status register for WAK_STS, which never comes.
        let mut status = [0xaa];
        bus.read(PORT, &mut status).unwrap();
        assert_eq!(status, [0]);
    }

    #[test]
    fn s5_constant_matches_the_encoding() {
        assert_eq!((S5_SLEEP_TYPE << 2) | SLP_EN, S5);
        assert_eq!(decode(S5), Command::PowerOff);
        // The reserved bits do not matter; WAK_STS written along with it neither.
        assert_eq!(decode(S5 | 0b1100_0011), Command::PowerOff);
        assert_eq!(ACPI_RESET_VALUE & SLP_EN, 0);
    }

    #[test]
    fn reset_value_requests_a_reset() {
        let (bus, exit) = setup();
        bus.write(PORT, &[ACPI_RESET_VALUE]).unwrap();
        assert_eq!(exit.requested(), Some(ExitRequest::Reset));
        // The first request wins.
        bus.write(PORT, &[S5]).unwrap();
        assert_eq!(exit.requested(), Some(ExitRequest::Reset));
    }

    #[test]
    fn other_values_are_ignored() {
        let (bus, exit) = setup();
        // Every value without SLP_EN except the reset value, and SLP_EN with every other
        // sleep type (S0-S4, S6, S7), in any combination of the reserved bits.
        for value in 0..=u8::MAX {
            let command = decode(value);
            if value == ACPI_RESET_VALUE || command == Command::PowerOff {
                continue;
            }
            bus.write(PORT, &[value]).unwrap();
            assert_eq!(exit.requested(), None, "value {value:#04x}");
        }
        assert!(exit.event_fd().read().is_err());
        assert_eq!(decode(0x20), Command::OtherSleep(0));
        assert_eq!(decode(0x2c), Command::OtherSleep(3));
        assert_eq!(decode(0x3c), Command::OtherSleep(7));
        assert_eq!(decode(0x80), Command::Nothing);
        // 16 of the 256 values power off: SLP_EN and type 5, the 4 reserved bits free.
        let power_offs = (0..=u8::MAX)
            .filter(|&v| decode(v) == Command::PowerOff)
            .count();
        assert_eq!(power_offs, 16);
    }

    #[test]
    fn odd_widths_and_offsets() {
        // No data: ignored.
        let exit = Arc::new(ExitSignal::new().unwrap());
        let dev = AcpiShutdown::new(Arc::clone(&exit));
        dev.write(0, &[]);
        dev.write(1, &[S5]);
        dev.write(u64::MAX, &[S5]);
        assert_eq!(exit.requested(), None);
        let mut empty = [];
        dev.read(0, &mut empty);

        // A wider write uses its low byte.
        for data in [&[S5, 0][..], &[S5, 0xff, 0xff, 0xff], &[S5; 8]] {
            let exit = Arc::new(ExitSignal::new().unwrap());
            let dev = AcpiShutdown::new(Arc::clone(&exit));
            dev.write(0, data);
            assert_eq!(exit.requested(), Some(ExitRequest::PowerOff), "{data:?}");
        }
        let exit = Arc::new(ExitSignal::new().unwrap());
        let dev = AcpiShutdown::new(Arc::clone(&exit));
        dev.write(0, &[0x00, S5]); // S5 in the second byte is not the register's
        assert_eq!(exit.requested(), None);

        // Reads: the status byte, then all ones.
        let mut word = [0u8; 4];
        dev.read(0, &mut word);
        assert_eq!(word, [0, 0xff, 0xff, 0xff]);
        let mut byte = [0u8];
        dev.read(3, &mut byte);
        assert_eq!(byte, [0xff]);

        // On the bus, a 1-port device admits only 1-byte accesses.
        let (bus, exit) = setup();
        assert!(bus.write(PORT, &[S5, 0]).is_err());
        assert_eq!(exit.requested(), None);
    }

    #[test]
    fn survives_random_accesses() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let dev = Arc::new(AcpiShutdown::new(Arc::clone(&exit)));
        fuzz_device(dev, PORT, ACPI_SHUTDOWN_PORT_SIZE, 0xac01);
        assert!(matches!(
            exit.requested(),
            None | Some(ExitRequest::PowerOff) | Some(ExitRequest::Reset)
        ));
    }
}

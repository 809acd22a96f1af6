//! Ready-made DSDT descriptions of the devices Ember's VMM has: a 16550 serial port,
//! the i8042's keyboard port and a virtio-mmio transport. Each implements [`Aml`] and goes in
//! [`AcpiConfig::devices`](crate::acpi::AcpiConfig::devices); a device of your own
//! implements [`Aml`] the same way (see the [`aml`](crate::aml) module).
//!
//! Hardware-reduced ACPI gives Linux no legacy IRQs of its own: a device the guest
//! should use with interrupts must be described here, with its GSI.

use ember_arch::layout::{
    COM1_GSI, COM1_PORT, I8042_COMMAND_PORT, I8042_KEYBOARD_GSI, I8042_PORT, IOAPIC_PINS,
    SERIAL_PORT_SIZE,
};

use crate::aml::{
    Aml, Device, EisaId, Interrupt, Io, Memory32Fixed, Name, NameSeg, ResourceTemplate,
};

/// Why a device description was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptionError {
    /// A virtio-mmio register window is empty or does not lie below 4 GiB (the DSDT
    /// describes it with `Memory32Fixed`).
    #[error(
        "virtio-mmio window at {addr:#x} (size {len:#x}) is empty or does not lie below 4 GiB"
    )]
    BadMmioWindow {
        /// The window's address.
        addr: u64,
        /// The window's size.
        len: u64,
    },
    /// A GSI is not an IOAPIC pin.
    #[error("GSI {gsi} is not one of the IOAPIC's {pins} pins")]
    BadGsi {
        /// The GSI.
        gsi: u32,
        /// Number of IOAPIC pins, [`IOAPIC_PINS`].
        pins: u32,
    },
    /// A virtio-mmio `_UID` too large for its device name `V000`-`VFFF`.
    #[error("virtio-mmio _UID {uid} exceeds the limit of {max} (device names V000 to VFFF)")]
    UidTooLarge {
        /// The `_UID` given.
        uid: u16,
        /// The limit, [`VirtioMmio::MAX_UID`].
        max: u16,
    },
    /// A serial port's eight registers would run past port `0xffff`.
    #[error("serial port at {port:#x} runs past the last I/O port 0xffff")]
    BadPort {
        /// The base port given.
        port: u16,
    },
}

/// `_HID` of a 16550-compatible serial port.
const SERIAL_HID: EisaId = match EisaId::new(b"PNP0501") {
    Ok(id) => id,
    Err(_) => panic!("PNP0501 is an EISA ID"),
};

/// `_HID` of a PC/AT keyboard controller (8042), which Linux's i8042 driver matches.
const KEYBOARD_HID: EisaId = match EisaId::new(b"PNP0303") {
    Ok(id) => id,
    Err(_) => panic!("PNP0303 is an EISA ID"),
};

/// The i8042's device name in the DSDT.
const KEYBOARD_NAME: NameSeg = match NameSeg::new(b"PS2K") {
    Ok(name) => name,
    Err(_) => panic!("PS2K is a NameSeg"),
};

/// `_HID` that Linux's virtio_mmio driver matches.
const VIRTIO_MMIO_HID: &str = "LNRO0005";

/// Registers of a 16550: eight ports.
const SERIAL_PORTS: u8 = 8;
const _: () = assert!(SERIAL_PORTS as u64 == SERIAL_PORT_SIZE);

/// Checks that `gsi` is an IOAPIC pin.
fn check_gsi(gsi: u32) -> Result<(), DescriptionError> {
    if gsi < IOAPIC_PINS {
        Ok(())
    } else {
        Err(DescriptionError::BadGsi {
            gsi,
            pins: IOAPIC_PINS,
        })
    }
}

/// A 16550-compatible serial port: `Device(name)` with `_HID EISAID("PNP0501")`,
/// `_UID`, and in `_CRS` its eight I/O ports and its interrupt (edge, active high).
///
/// ```
/// use ember_firmware::aml::{Aml, NameSeg};
/// use ember_firmware::devices::Serial16550;
///
/// let com2 = Serial16550::new(NameSeg::new(b"COM2")?, 1, 0x2f8, 3)?;
/// assert!(com2.to_aml_bytes().windows(4).any(|w| w == b"COM2"));
/// assert!(Serial16550::new(NameSeg::new(b"COM9")?, 9, 0x3f8, 24).is_err()); // no pin 24
/// # Ok::<(), ember_firmware::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serial16550 {
    name: NameSeg,
    uid: u32,
    port: u16,
    gsi: u32,
}

impl Serial16550 {
    /// COM1 as Ember lays it out: `Device(COM1)`, `_UID 0`, ports
    /// [`COM1_PORT`]`..+8`, [`COM1_GSI`].
    pub const COM1: Serial16550 = Serial16550 {
        name: match NameSeg::new(b"COM1") {
            Ok(name) => name,
            Err(_) => panic!("COM1 is a NameSeg"),
        },
        uid: 0,
        port: COM1_PORT,
        gsi: COM1_GSI,
    };

    /// The serial port `name` (`_UID uid`) with its registers at `port..port + 8`,
    /// interrupting on `gsi`.
    ///
    /// # Errors
    ///
    /// [`DescriptionError::BadGsi`] if `gsi` is not an IOAPIC pin,
    /// [`DescriptionError::BadPort`] if the registers run past port `0xffff`.
    pub fn new(name: NameSeg, uid: u32, port: u16, gsi: u32) -> Result<Self, DescriptionError> {
        check_gsi(gsi)?;
        if port.checked_add(u16::from(SERIAL_PORTS) - 1).is_none() {
            return Err(DescriptionError::BadPort { port });
        }
        Ok(Self {
            name,
            uid,
            port,
            gsi,
        })
    }
}

impl Aml for Serial16550 {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        let io = Io::new(self.port, self.port, 1, SERIAL_PORTS);
        let irq = Interrupt::new(self.gsi);
        Device::new(
            self.name,
            &[
                &Name::new(NameSeg::HID, &SERIAL_HID),
                &Name::new(NameSeg::UID, &self.uid),
                &Name::new(NameSeg::CRS, &ResourceTemplate::new(&[&io, &irq])),
            ],
        )
        .append_aml_bytes(bytes);
    }
}

/// The keyboard port of an i8042 controller: `Device(PS2K)` with `_HID
/// EISAID("PNP0303")`, `_UID 0`, and in `_CRS` the data port, the command/status port
/// (in that order, as Linux's i8042 driver reads them) and the keyboard interrupt
/// (edge, active high), as Firecracker describes its i8042.
///
/// Without it a guest on hardware-reduced ACPI has no IRQ 1: Linux's i8042 driver finds
/// no PNP keyboard, probes the ports directly and fails to request the interrupt
/// (`probe of i8042 failed with error -22`), so no key (Ctrl+Alt+Del) reaches it.
///
/// ```
/// use ember_firmware::aml::Aml;
/// use ember_firmware::devices::I8042Keyboard;
///
/// let bytes = I8042Keyboard::EMBER.to_aml_bytes();
/// assert!(bytes.windows(4).any(|w| w == b"PS2K"));
/// assert!(I8042Keyboard::new(0x60, 0x64, 1).is_ok());
/// assert!(I8042Keyboard::new(0x60, 0x64, 24).is_err()); // no pin 24
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct I8042Keyboard {
    data_port: u16,
    command_port: u16,
    gsi: u32,
}

impl I8042Keyboard {
    /// The i8042 as Ember lays it out: data port [`I8042_PORT`], command/status port
    /// [`I8042_COMMAND_PORT`], [`I8042_KEYBOARD_GSI`].
    pub const EMBER: I8042Keyboard = I8042Keyboard {
        data_port: I8042_PORT,
        command_port: I8042_COMMAND_PORT,
        gsi: I8042_KEYBOARD_GSI,
    };

    /// An i8042 with its data register at `data_port`, its command/status register at
    /// `command_port`, and its keyboard interrupting on `gsi`.
    ///
    /// # Errors
    ///
    /// [`DescriptionError::BadGsi`] if `gsi` is not an IOAPIC pin.
    pub fn new(data_port: u16, command_port: u16, gsi: u32) -> Result<Self, DescriptionError> {
        check_gsi(gsi)?;
        Ok(Self {
            data_port,
            command_port,
            gsi,
        })
    }
}

impl Aml for I8042Keyboard {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        let data = Io::new(self.data_port, self.data_port, 1, 1);
        let command = Io::new(self.command_port, self.command_port, 1, 1);
        let irq = Interrupt::new(self.gsi);
        Device::new(
            KEYBOARD_NAME,
            &[
                &Name::new(NameSeg::HID, &KEYBOARD_HID),
                &Name::new(NameSeg::UID, &0u32),
                &Name::new(
                    NameSeg::CRS,
                    &ResourceTemplate::new(&[&data, &command, &irq]),
                ),
            ],
        )
        .append_aml_bytes(bytes);
    }
}

/// A virtio-mmio transport: `Device(Vxxx)` (`xxx` the `_UID` in three upper-case
/// hex digits) with `_HID "LNRO0005"` (as Linux's virtio_mmio driver matches),
/// `_UID`, and in `_CRS` its register window (`Memory32Fixed`, read-write) and its
/// interrupt (edge, active high).
///
/// ```
/// use ember_firmware::aml::Aml;
/// use ember_firmware::devices::VirtioMmio;
///
/// let disk = VirtioMmio::new(0x1a, 0xd000_0000, 0x1000, 5)?;
/// assert!(disk.to_aml_bytes().windows(4).any(|w| w == b"V01A"));
/// assert!(VirtioMmio::new(0, 0xffff_f000, 0x2000, 5).is_err()); // crosses 4 GiB
/// # Ok::<(), ember_firmware::devices::DescriptionError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmio {
    uid: u16,
    addr: u32,
    len: u32,
    gsi: u32,
}

impl VirtioMmio {
    /// The largest `_UID`: the device name holds it in three hex digits.
    pub const MAX_UID: u16 = 0xfff;

    /// The transport `_UID uid` (named `V` and `uid` in hex) with its registers at
    /// `[addr, addr + len)`, interrupting on `gsi`.
    ///
    /// # Errors
    ///
    /// [`DescriptionError::UidTooLarge`] above [`Self::MAX_UID`],
    /// [`DescriptionError::BadMmioWindow`] for a window that is empty or not below
    /// 4 GiB, [`DescriptionError::BadGsi`] if `gsi` is not an IOAPIC pin.
    pub fn new(uid: u16, addr: u64, len: u64, gsi: u32) -> Result<Self, DescriptionError> {
        if uid > Self::MAX_UID {
            return Err(DescriptionError::UidTooLarge {
                uid,
                max: Self::MAX_UID,
            });
        }
        let window = match (u32::try_from(addr), u32::try_from(len)) {
            (Ok(a), Ok(l)) if l > 0 && addr + len <= 1 << 32 => Some((a, l)),
            _ => None,
        };
        let Some((addr, len)) = window else {
            return Err(DescriptionError::BadMmioWindow { addr, len });
        };
        check_gsi(gsi)?;
        Ok(Self {
            uid,
            addr,
            len,
            gsi,
        })
    }

    /// `V000` to `VFFF`: `V` and the `_UID` in three upper-case hex digits.
    fn name(&self) -> NameSeg {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let digit = |shift: u16| HEX[usize::from((self.uid >> shift) & 0xf)];
        let name = [b'V', digit(8), digit(4), digit(0)];
        // Always a valid NameSeg: a letter, then hex digits.
        NameSeg::new(&name).unwrap_or(NameSeg::SB)
    }
}

impl Aml for VirtioMmio {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        let window = Memory32Fixed::new(self.addr, self.len, true);
        let irq = Interrupt::new(self.gsi);
        Device::new(
            self.name(),
            &[
                &Name::new(NameSeg::HID, &VIRTIO_MMIO_HID),
                &Name::new(NameSeg::UID, &self.uid),
                &Name::new(NameSeg::CRS, &ResourceTemplate::new(&[&window, &irq])),
            ],
        )
        .append_aml_bytes(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Device(V000) {...}` for a virtio-mmio device at 0xd0000000 (4 KiB) on
    /// GSI 5, assembled by hand from the ACPI 6.4 encodings (20.2 AML grammar,
    /// 6.4 resource descriptors); the PkgLength of each package counts its own
    /// bytes and everything after it to the end of the package. The same bytes
    /// come out of `iasl -oa` (ACPICA 20200925) for the ASL `iasl -d` prints for
    /// them.
    #[rustfmt::skip]
    pub(crate) const VIRTIO_AML: &[u8] = &[
        // ExtOpPrefix DeviceOp, PkgLength 58 = 0x3a, "V000"
        0x5b, 0x82, 0x3a, b'V', b'0', b'0', b'0',
        // Name(_HID, "LNRO0005"): NameOp, "_HID", StringPrefix, ASCII, NUL
        0x08, b'_', b'H', b'I', b'D',
        0x0d, b'L', b'N', b'R', b'O', b'0', b'0', b'0', b'5', 0x00,
        // Name(_UID, Zero)
        0x08, b'_', b'U', b'I', b'D', 0x00,
        // Name(_CRS, Buffer(BytePrefix 23) {...}): BufferOp, PkgLength 26
        0x08, b'_', b'C', b'R', b'S', 0x11, 0x1a, 0x0a, 0x17,
        // Memory32Fixed(ReadWrite, 0xd0000000, 0x1000): 0x86, length 9,
        // information 1 (read-write), base, length
        0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00,
        // Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) {5}:
        // 0x89, length 6, flags 0x03 (consumer | edge), 1 interrupt, 5
        0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00,
        // End Tag, checksum 0
        0x79, 0x00,
    ];

    /// `Device(COM1) {...}`, assembled by hand like [`VIRTIO_AML`].
    #[rustfmt::skip]
    pub(crate) const COM1_AML: &[u8] = &[
        // ExtOpPrefix DeviceOp, PkgLength 49 = 0x31, "COM1"
        0x5b, 0x82, 0x31, b'C', b'O', b'M', b'1',
        // Name(_HID, EISAID("PNP0501")): DWordPrefix 0x0105d041
        0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01,
        // Name(_UID, Zero)
        0x08, b'_', b'U', b'I', b'D', 0x00,
        // Name(_CRS, Buffer(BytePrefix 19) {...}): BufferOp, PkgLength 22
        0x08, b'_', b'C', b'R', b'S', 0x11, 0x16, 0x0a, 0x13,
        // IO(Decode16, 0x3f8, 0x3f8, 1, 8): 0x47, information 1 (16-bit
        // decode), minimum, maximum, alignment, length
        0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08,
        // Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) {4}
        0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00,
        // End Tag, checksum 0
        0x79, 0x00,
    ];

    #[test]
    fn virtio_mmio_bytes() {
        let v = VirtioMmio::new(0, 0xd000_0000, 0x1000, 5).unwrap();
        assert_eq!(v.to_aml_bytes(), VIRTIO_AML);
    }

    /// `Device(PS2K)` for Ember's i8042, assembled by hand as `COM1_AML` is.
    const I8042_AML: &[u8] = &[
        // ExtOpPrefix DeviceOp, PkgLength 57 = 0x39, "PS2K"
        0x5b, 0x82, 0x39, b'P', b'S', b'2', b'K',
        // Name(_HID, EISAID("PNP0303")): DWordPrefix 0x0303d041
        0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x03, 0x03, // Name(_UID, Zero)
        0x08, b'_', b'U', b'I', b'D', 0x00,
        // Name(_CRS, Buffer(BytePrefix 27) {...}): BufferOp, PkgLength 30
        0x08, b'_', b'C', b'R', b'S', 0x11, 0x1e, 0x0a, 0x1b,
        // IO(Decode16, 0x60, 0x60, 1, 1): the data port
        0x47, 0x01, 0x60, 0x00, 0x60, 0x00, 0x01, 0x01,
        // IO(Decode16, 0x64, 0x64, 1, 1): the command/status port
        0x47, 0x01, 0x64, 0x00, 0x64, 0x00, 0x01, 0x01,
        // Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) {1}
        0x89, 0x06, 0x00, 0x03, 0x01, 0x01, 0x00, 0x00, 0x00, // End Tag, checksum 0
        0x79, 0x00,
    ];

    #[test]
    fn i8042_bytes() {
        assert_eq!(I8042Keyboard::EMBER.to_aml_bytes(), I8042_AML);
        assert_eq!(KEYBOARD_HID.value(), 0x0303_d041);
        assert_eq!(
            I8042Keyboard::new(0x60, 0x64, 1).unwrap(),
            I8042Keyboard::EMBER
        );
        assert_eq!(
            I8042Keyboard::new(0x60, 0x64, 24),
            Err(DescriptionError::BadGsi { gsi: 24, pins: 24 })
        );
    }

    #[test]
    fn com1_bytes() {
        assert_eq!(Serial16550::COM1.to_aml_bytes(), COM1_AML);
        assert_eq!(SERIAL_HID.value(), 0x0105_d041);
        let same = Serial16550::new(NameSeg::new(b"COM1").unwrap(), 0, 0x3f8, 4).unwrap();
        assert_eq!(same, Serial16550::COM1);
    }

    #[test]
    fn virtio_names_and_uids() {
        let named = |uid| VirtioMmio::new(uid, 0xd000_0000, 0x1000, 5).unwrap();
        assert_eq!(named(0).name().as_bytes(), b"V000");
        assert_eq!(named(0x1a).name().as_bytes(), b"V01A");
        assert_eq!(named(VirtioMmio::MAX_UID).name().as_bytes(), b"VFFF");
        for uid in 0..=VirtioMmio::MAX_UID {
            let name = named(uid).name();
            assert_eq!(NameSeg::new(name.as_bytes()), Ok(name));
        }
        // V001 has _UID 1 (OneOp), V002 _UID 2 (BytePrefix 2), V100 a WordPrefix.
        assert!(named(1)
            .to_aml_bytes()
            .windows(7)
            .any(|w| w == b"_UID\x01\x08_"));
        assert!(named(2)
            .to_aml_bytes()
            .windows(8)
            .any(|w| w == b"_UID\x0a\x02\x08_"));
        assert!(named(0x100)
            .to_aml_bytes()
            .windows(9)
            .any(|w| w == b"_UID\x0b\x00\x01\x08_"));
        assert_eq!(
            VirtioMmio::new(0x1000, 0xd000_0000, 0x1000, 5),
            Err(DescriptionError::UidTooLarge {
                uid: 0x1000,
                max: 0xfff
            })
        );
    }

    #[test]
    fn bad_windows_gsis_and_ports_rejected() {
        for (addr, len) in [
            (0xd000_0000, 0),
            (0xffff_f000, 0x1001),
            (0x1_0000_0000, 0x1000),
            (0, 1 << 32),
            (u64::MAX, 2),
        ] {
            let err = VirtioMmio::new(1, addr, len, 5).unwrap_err();
            assert_eq!(err, DescriptionError::BadMmioWindow { addr, len });
            assert!(!err.to_string().is_empty());
        }
        // The last page below 4 GiB is fine.
        VirtioMmio::new(1, 0xffff_f000, 0x1000, 23).unwrap();
        assert_eq!(
            VirtioMmio::new(1, 0xd000_0000, 0x1000, 24),
            Err(DescriptionError::BadGsi { gsi: 24, pins: 24 })
        );
        let name = NameSeg::new(b"COM2").unwrap();
        assert_eq!(
            Serial16550::new(name, 1, 0x2f8, 99),
            Err(DescriptionError::BadGsi { gsi: 99, pins: 24 })
        );
        assert_eq!(
            Serial16550::new(name, 1, 0xfff9, 3),
            Err(DescriptionError::BadPort { port: 0xfff9 })
        );
        Serial16550::new(name, 1, 0xfff8, 3).unwrap();
    }
}

//! A device the crate knows nothing about, described in the DSDT through the public
//! API only: its own `Aml` implementation, built from the public AML blocks.

use ember_arch::layout::ACPI_FADT_START;
use ember_firmware::acpi::{setup_acpi, AcpiConfig};
use ember_firmware::aml::{
    Aml, Device, EisaId, Interrupt, Io, Memory32Fixed, Name, NameSeg, Package, ResourceTemplate,
};
use ember_firmware::devices::Serial16550;
use ember_firmware::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A watchdog with a port range, a page of registers, a level-triggered shared
/// interrupt and a vendor package.
struct Watchdog {
    port: u16,
    registers: u32,
    gsi: u32,
}

const NAME: NameSeg = match NameSeg::new(b"WDT0") {
    Ok(name) => name,
    Err(_) => panic!("not a NameSeg"),
};
const HID: EisaId = match EisaId::new(b"PNP0C09") {
    Ok(id) => id,
    Err(_) => panic!("not an EISA ID"),
};
const VENDOR: NameSeg = match NameSeg::new(b"VEND") {
    Ok(name) => name,
    Err(_) => panic!("not a NameSeg"),
};

impl Aml for Watchdog {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        let io = Io::new(self.port, self.port, 1, 4);
        let registers = Memory32Fixed::new(self.registers, 0x1000, false);
        let irq = Interrupt::new(self.gsi).level_triggered().shared();
        Device::new(
            NAME,
            &[
                &Name::new(NameSeg::HID, &HID),
                &Name::new(NameSeg::UID, &7u32),
                &Name::new(
                    NameSeg::CRS,
                    &ResourceTemplate::new(&[&io, &registers, &irq]),
                ),
                &Name::new(VENDOR, &Package::new(&[&"ember", &0x1234u16])),
            ],
        )
        .append_aml_bytes(bytes);
    }
}

/// The AML of `Watchdog { port: 0x510, registers: 0xfed0_0000, gsi: 9 }`, assembled
/// by hand from the ACPI 6.4 encodings.
#[rustfmt::skip]
const WATCHDOG_AML: &[u8] = &[
    // ExtOpPrefix DeviceOp, PkgLength 81 = 0x051 (two-byte form: the low
    // nibble in the lead byte 0x41, then 0x05), "WDT0"
    0x5b, 0x82, 0x41, 0x05, b'W', b'D', b'T', b'0',
    // Name(_HID, EISAID("PNP0C09")): DWordPrefix 0x090cd041
    0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0c, 0x09,
    // Name(_UID, 7)
    0x08, b'_', b'U', b'I', b'D', 0x0a, 0x07,
    // Name(_CRS, Buffer(BytePrefix 31) {...}): BufferOp, PkgLength 34
    0x08, b'_', b'C', b'R', b'S', 0x11, 0x22, 0x0a, 0x1f,
    // IO(Decode16, 0x510, 0x510, 1, 4)
    0x47, 0x01, 0x10, 0x05, 0x10, 0x05, 0x01, 0x04,
    // Memory32Fixed(ReadOnly, 0xfed00000, 0x1000)
    0x86, 0x09, 0x00, 0x00, 0x00, 0x00, 0xd0, 0xfe, 0x00, 0x10, 0x00, 0x00,
    // Interrupt(ResourceConsumer, Level, ActiveHigh, Shared) {9}: flags 0x09
    0x89, 0x06, 0x00, 0x09, 0x01, 0x09, 0x00, 0x00, 0x00,
    // End Tag
    0x79, 0x00,
    // Name(VEND, Package() { "ember", 0x1234 }): PackageOp, PkgLength 12,
    // NumElements 2, StringPrefix "ember" NUL, WordPrefix 0x1234
    0x08, b'V', b'E', b'N', b'D', 0x12, 0x0c, 0x02,
    0x0d, b'e', b'm', b'b', b'e', b'r', 0x00, 0x0b, 0x34, 0x12,
];

#[test]
fn user_defined_device_appears_in_the_dsdt() {
    let watchdog = Watchdog {
        port: 0x510,
        registers: 0xfed0_0000,
        gsi: 9,
    };
    assert_eq!(watchdog.to_aml_bytes(), WATCHDOG_AML);

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let config = AcpiConfig {
        num_cpus: 1,
        devices: &[&Serial16550::COM1, &watchdog],
        shutdown: None,
    };
    setup_acpi(&mem, &config).unwrap();

    // Follow the FADT's X_DSDT (offset 140) to the DSDT, as the guest does.
    let dsdt: u64 = mem.read_obj(GuestAddress(ACPI_FADT_START + 140)).unwrap();
    let len: u32 = mem.read_obj(GuestAddress(dsdt + 4)).unwrap();
    let mut table = vec![0u8; len as usize];
    mem.read_slice(&mut table, GuestAddress(dsdt)).unwrap();
    assert_eq!(
        table.iter().fold(0u8, |s, &b| s.wrapping_add(b)),
        0,
        "checksum"
    );

    // Scope (\_SB) { COM1, then the watchdog, byte for byte }: ScopeOp, PkgLength
    // 141 = 0x08d (itself 2, the path 5, COM1 51, the watchdog 83), \_SB_.
    let com1 = Serial16550::COM1.to_aml_bytes();
    let aml = &table[36..];
    let scope_header = [0x10, 0x4d, 0x08, b'\\', b'_', b'S', b'B', b'_'];
    assert_eq!(aml[..8], scope_header);
    assert_eq!(aml[8..8 + com1.len()], com1[..]);
    assert_eq!(&aml[8 + com1.len()..], WATCHDOG_AML);
}

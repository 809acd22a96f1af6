//! The guest-visible bytes of the firmware tables for one fixed machine, compared
//! with the bytes the tables had before they moved out of `ember-boot` and the DSDT's
//! device list became the open [`Aml`] trait: the same machine must keep seeing the
//! same tables.
//!
//! The machine: 2 vCPUs; COM1 and three virtio-mmio devices (`V000`-`V002` at
//! `0xd0000000`, `0xd0001000`, `0xd0002000`, 4 KiB each, GSIs 5-7) in the DSDT; the
//! shutdown register at port `0x600` with S5 sleep type 5 and reset value 1.

use ember_arch::layout::{
    ACPI_DSDT_START, ACPI_FADT_START, ACPI_MADT_START, ACPI_RSDP_START, ACPI_XSDT_START,
    MPTABLE_START,
};
use ember_firmware::acpi::{setup_acpi, AcpiConfig, AcpiShutdown, RSDP_SIZE};
use ember_firmware::aml::Aml;
use ember_firmware::devices::{Serial16550, VirtioMmio};
use ember_firmware::mptable::{mptable_size, setup_mptable};
use ember_firmware::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn hex(parts: &[&str]) -> Vec<u8> {
    let s: String = parts.concat();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

const RSDP: &[&str] = &["525344205054522054454d4245522002000000002400000040000e00000000008e000000"];
const XSDT: &[&str] = &[
    "58534454340000000186454d42455220454d424552564d2001000000454d42520100000000010e0000000000",
    "00040e0000000000",
];
const FADT: &[&str] = &[
    "46414350140100000644454d42455220454d424552564d2001000000454d4252010000000000000000100e00",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000002600003004100001080001000600000000000001000004",
    "000000000000000000100e000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000108000100060000000000000108000100060000",
    "00000000454d424552202020",
];
const MADT: &[&str] = &[
    "415049434e00000005e5454d42455220454d424552564d2001000000454d4252010000000000e0fe01000000",
    "00080000010000000008010101000000010c02000000c0fe000000000406ff000001",
];
const DSDT: &[&str] = &[
    "445344541f0100000247454d42455220454d424552564d2001000000454d425201000000085f53355f120502",
    "0a0500104f0e5c5f53425f5b8231434f4d31085f4849440c41d00501085f55494400085f43525311160a1347",
    "01f803f803010889060003010400000079005b823a56303030085f4849440d4c4e524f3030303500085f5549",
    "4400085f435253111a0a1786090001000000d00010000089060003010500000079005b823a56303031085f48",
    "49440d4c4e524f3030303500085f55494401085f435253111a0a1786090001001000d0001000008906000301",
    "0600000079005b823b56303032085f4849440d4c4e524f3030303500085f5549440a02085f435253111a0a17",
    "86090001002000d0001000008906000301070000007900",
];
const MP_TABLE: &[&str] = &[
    "5f4d505f10fc090001048b000000000050434d50f40004a2454d424552202020454d42455220564d4d202020",
    "00000000000016000000e0fe0000000000001403000600000102000000000000000000000001140100060000",
    "0102000000000000000000000100495341202020020211010000c0fe03000000000002000300000000010201",
    "0300000000020202030000000003020303000000000402040300000000050205030000000006020603000000",
    "000702070300000000080208030000000009020903000000000a020a03000000000b020b03000000000c020c",
    "03000000000d020d03000000000e020e03000000000f020f040300000000ff00040100000000ff01",
];

fn read(mem: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

/// A table's bytes, by the length in its header.
fn table(mem: &GuestMemoryMmap<()>, addr: u64) -> Vec<u8> {
    let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
    read(mem, addr, len as usize)
}

#[test]
fn tables_are_byte_for_byte_what_they_were() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let virtio: Vec<VirtioMmio> = (0..3u16)
        .map(|i| {
            VirtioMmio::new(
                i,
                0xd000_0000 + u64::from(i) * 0x1000,
                0x1000,
                5 + u32::from(i),
            )
        })
        .collect::<Result<_, _>>()
        .unwrap();
    let devices: [&dyn Aml; 4] = [&Serial16550::COM1, &virtio[0], &virtio[1], &virtio[2]];
    let shutdown = AcpiShutdown {
        port: 0x600,
        s5_sleep_type: 5,
        reset_value: 1,
    };
    let config = AcpiConfig {
        num_cpus: 2,
        devices: &devices,
        shutdown: Some(shutdown),
    };
    setup_acpi(&mem, &config).unwrap();
    setup_mptable(&mem, 2).unwrap();

    assert_eq!(read(&mem, ACPI_RSDP_START, RSDP_SIZE), hex(RSDP), "RSDP");
    assert_eq!(table(&mem, ACPI_XSDT_START), hex(XSDT), "XSDT");
    assert_eq!(table(&mem, ACPI_FADT_START), hex(FADT), "FADT");
    assert_eq!(table(&mem, ACPI_MADT_START), hex(MADT), "MADT");
    assert_eq!(table(&mem, ACPI_DSDT_START), hex(DSDT), "DSDT");
    assert_eq!(
        read(&mem, MPTABLE_START, mptable_size(2)),
        hex(MP_TABLE),
        "MP table"
    );
}

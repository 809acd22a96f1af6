//! The firmware tables a VMM writes from its configuration: ACPI
//! ([`ember_firmware::setup_acpi`], any CPU count and any list of devices for the
//! DSDT, described by [`ember_firmware::devices`] from any window, GSI, port and
//! `_UID`) and the MP table ([`ember_firmware::setup_mptable`]), into guest memories
//! that may be too small for them.
//!
//! Checked: a refused device description names a value; failures write nothing; written ACPI tables have valid checksums (the RSDP
//! and every table the XSDT lists, including the DSDT); with a shutdown register, the
//! FADT's reset, sleep control and sleep status registers point at its port and the
//! DSDT has `\_S5_`, and without one they are zero and it has none.

use ember_firmware::aml::{Aml, NameSeg};
use ember_firmware::devices::{Serial16550, VirtioMmio};
use ember_firmware::{setup_acpi, setup_mptable, AcpiConfig, AcpiShutdown};
use vm_memory::{Bytes, GuestAddress};

use crate::common::{any_page_written, tracked_memory, TrackedMemory};
use crate::{decode, input_struct};

input_struct! {
    /// CPUs, `memory % 4` (16 MiB, or ending below the ACPI area, inside the MP table
    /// area, inside the DSDT), the shutdown register, the devices.
    pub struct TablesInput {
        pub num_cpus: u8,
        pub memory: u8,
        pub shutdown: Option<Shutdown>,
        pub devices: Vec<Device>,
    }
}

input_struct! {
    /// An [`AcpiShutdown`]: any port, sleep type (valid up to 7) and reset value.
    pub struct Shutdown {
        pub port: u16,
        pub s5_sleep_type: u8,
        pub reset_value: u8,
    }
}

input_struct! {
    /// `kind % 4`: 0-1 a virtio-mmio window below 4 GiB-ish, 2 COM1 (`len` even) or
    /// a 16550 at port `addr` on any GSI, 3 a window at any address with any length
    /// and GSI. Virtio devices get `_UID`s 0, 1, ... in order.
    pub struct Device {
        pub kind: u8,
        pub addr: u64,
        pub len: u64,
        pub gsi: u32,
    }
}

fn memory(kind: u8) -> TrackedMemory {
    let len = match kind % 4 {
        0 => 16 << 20,
        1 => 0xe_0000,
        2 => 0x9_fc00 + 0x100,
        _ => 0xe_1000 + 0x80,
    };
    tracked_memory(&[(0, len)])
}

fn checksum_ok(mem: &TrackedMemory, addr: u64, len: usize) -> bool {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr))
        .expect("table in memory");
    buf.iter().fold(0u8, |a, &b| a.wrapping_add(b)) == 0
}

fn read_u32(mem: &TrackedMemory, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr)).expect("in memory")
}

fn read_u64(mem: &TrackedMemory, addr: u64) -> u64 {
    mem.read_obj(GuestAddress(addr)).expect("in memory")
}

/// The FADT's reset register (116), reset value (128), sleep control (244) and sleep
/// status (256) registers, and `\_S5_` in the DSDT, against `shutdown`.
fn check_shutdown(
    mem: &TrackedMemory,
    fadt: u64,
    dsdt: u64,
    dsdt_len: usize,
    shutdown: Option<AcpiShutdown>,
) {
    let mut gas = [0u8; 12];
    let mut aml = vec![0u8; dsdt_len];
    mem.read_slice(&mut aml, GuestAddress(dsdt)).expect("DSDT");
    let expected_gas = |port: u16| {
        let mut g = [1u8, 8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
        g[4..6].copy_from_slice(&port.to_le_bytes());
        g
    };
    let mut reset_value = [0u8];
    mem.read_slice(&mut reset_value, GuestAddress(fadt + 128))
        .expect("FADT");
    let flags = read_u32(mem, fadt + 112);
    for offset in [116, 244, 256] {
        mem.read_slice(&mut gas, GuestAddress(fadt + offset))
            .expect("FADT");
        match shutdown {
            Some(s) => assert_eq!(gas, expected_gas(s.port), "FADT register at {offset}"),
            None => assert_eq!(gas, [0; 12], "FADT register at {offset}"),
        }
    }
    match shutdown {
        Some(s) => {
            assert_eq!(reset_value, [s.reset_value]);
            assert_ne!(flags & 1 << 10, 0, "RESET_REG_SUP");
            // Name (_S5_, Package (2) { SLP_TYP, Zero }).
            let typ = match s.s5_sleep_type {
                0 => vec![0x00],
                1 => vec![0x01],
                t => vec![0x0a, t],
            };
            let mut s5 = vec![0x08, b'_', b'S', b'5', b'_', 0x12, 3 + typ.len() as u8, 2];
            s5.extend(typ);
            s5.push(0);
            assert_eq!(aml.get(36..36 + s5.len()), Some(&s5[..]), "\\_S5_ first");
        }
        None => {
            assert_eq!(reset_value, [0]);
            assert_eq!(flags & 1 << 10, 0, "RESET_REG_SUP");
            // The AML is empty or starts with `Scope (\\_SB)`.
            assert!(
                matches!(aml.get(36), None | Some(0x10)),
                "no \\_S5_ without a shutdown register"
            );
        }
    }
}

/// The harness.
pub fn run(data: &[u8]) {
    let Some(input) = decode::<TablesInput>(data) else {
        return;
    };
    let mem = memory(input.memory);
    if let Err(e) = setup_mptable(&mem, input.num_cpus) {
        assert!(
            !any_page_written(&mem),
            "failed MP table ({e}) wrote memory"
        );
    }

    let com2 = NameSeg::new(b"COM2").expect("a NameSeg");
    let mut described: Vec<Box<dyn Aml>> = Vec::new();
    let mut virtio_uid = 0u16;
    for d in input.devices.iter().take(0x1001) {
        let description = match d.kind % 4 {
            2 if d.len % 2 == 0 => Ok(Box::new(Serial16550::COM1) as Box<dyn Aml>),
            2 => Serial16550::new(com2, d.addr as u32, d.addr as u16, d.gsi % 32)
                .map(|s| Box::new(s) as Box<dyn Aml>),
            kind => {
                let (addr, len, gsi) = match kind {
                    0 | 1 => (
                        0xd000_0000 + (d.addr % 0x1000) * 0x1000,
                        d.len % 0x2000,
                        d.gsi % 32,
                    ),
                    _ => (d.addr, d.len, d.gsi),
                };
                let uid = virtio_uid;
                virtio_uid = virtio_uid.saturating_add(1);
                VirtioMmio::new(uid, addr, len, gsi).map(|v| Box::new(v) as Box<dyn Aml>)
            }
        };
        match description {
            Ok(device) => described.push(device),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
    let devices: Vec<&dyn Aml> = described.iter().map(|d| d.as_ref()).collect();
    let shutdown = input.shutdown.as_ref().map(|s| AcpiShutdown {
        port: s.port,
        s5_sleep_type: s.s5_sleep_type,
        reset_value: s.reset_value,
    });
    let config = AcpiConfig {
        num_cpus: input.num_cpus,
        devices: &devices,
        shutdown,
    };
    let mem = memory(input.memory);
    match setup_acpi(&mem, &config) {
        Ok(rsdp) => {
            let mut sig = [0u8; 8];
            mem.read_slice(&mut sig, rsdp).expect("RSDP");
            assert_eq!(&sig, b"RSD PTR ");
            assert!(checksum_ok(&mem, rsdp.0, 20), "RSDP checksum");
            assert!(checksum_ok(&mem, rsdp.0, 36), "RSDP extended checksum");
            let xsdt = read_u64(&mem, rsdp.0 + 24);
            let xsdt_len = read_u32(&mem, xsdt + 4) as usize;
            assert!(checksum_ok(&mem, xsdt, xsdt_len), "XSDT checksum");
            for i in 0..(xsdt_len - 36) / 8 {
                let table = read_u64(&mem, xsdt + 36 + 8 * i as u64);
                let len = read_u32(&mem, table + 4) as usize;
                assert!(
                    checksum_ok(&mem, table, len),
                    "checksum of table at {table:#x}"
                );
                let mut sig = [0u8; 4];
                mem.read_slice(&mut sig, GuestAddress(table))
                    .expect("table");
                if &sig == b"FACP" {
                    // The FADT points at the DSDT (X_DSDT at 140).
                    let dsdt = read_u64(&mem, table + 140);
                    let len = read_u32(&mem, dsdt + 4) as usize;
                    assert!(checksum_ok(&mem, dsdt, len), "DSDT checksum");
                    check_shutdown(&mem, table, dsdt, len, shutdown);
                }
            }
        }
        Err(e) => assert!(
            !any_page_written(&mem),
            "failed ACPI set-up ({e}) wrote memory"
        ),
    }
}

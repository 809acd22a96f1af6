//! Minimal ACPI tables: how a kernel without `CONFIG_X86_MPPARSE` finds the
//! vCPUs, the IOAPIC and the platform devices.
//!
//! [`setup_acpi`] writes, in the reserved area below 1 MiB (see
//! [`ember_arch::layout`]):
//!
//! | table | where                | what                                                    |
//! |-------|----------------------|---------------------------------------------------------|
//! | RSDP  | [`ACPI_RSDP_START`]  | revision 2: points at the XSDT (`RsdtAddress` 0)        |
//! | XSDT  | [`ACPI_XSDT_START`]  | points at the FADT and the MADT                         |
//! | FADT  | [`ACPI_FADT_START`]  | revision 6.4, 276 bytes: hardware-reduced ACPI, DSDT,   |
//! |       |                      | sleep control, sleep status and reset registers         |
//! | MADT  | [`ACPI_MADT_START`]  | one local APIC per vCPU, the IOAPIC, LINT1 as NMI       |
//! | DSDT  | [`ACPI_DSDT_START`]  | AML: `\_S5_`, and the devices ([`Aml`]) under `\_SB`   |
//!
//! All tables are little-endian and every table's bytes sum to 0 mod 256
//! (the RSDP's first 20 bytes too). Their headers carry OEM ID `"EMBER "`,
//! OEM table ID `"EMBERVM "` and creator ID `"EMBR"`.
//!
//! # Finding the RSDP
//!
//! The RSDP sits at the start of the BIOS area Linux scans (`0xe0000` to
//! `0xfffff`, on 16-byte boundaries) when nobody tells it where the RSDP
//! is, so older kernels find it too. The boot protocols can also pass its
//! address: `ember-boot`'s `configure_linux_boot`, `configure_bzimage_boot`
//! (zero page `acpi_rsdp_addr`) and `configure_pvh_boot`
//! (`hvm_start_info.rsdp_paddr`) take it as their `rsdp` argument.
//!
//! # The platform the tables describe
//!
//! - **Hardware-reduced ACPI** (FADT flag `HW_REDUCED_ACPI`): there is no
//!   PM timer, no PM1 event or control block, no SCI and no FACS, which is
//!   what Ember has. The power and sleep buttons are flagged as not fixed
//!   hardware (`PWR_BUTTON`, `SLP_BUTTON`), so Linux does not make up
//!   devices for buttons that a hardware-reduced platform cannot have.
//! - **IA-PC boot architecture flags**: an 8042 is present (Ember emulates
//!   an i8042 for the reset command; without the flag Linux declares the
//!   controller absent), there is no VGA (so Linux does not probe for one)
//!   and no CMOS RTC (Ember emulates none at ports `0x70`/`0x71`). MSI and
//!   ASPM are left alone: Ember has no PCI.
//! - **Interrupts**: the MADT has `PCAT_COMPAT` set (KVM emulates the dual
//!   8259 PIC), the IOAPIC has ID `num_cpus` (as in the MP table) and GSI
//!   base 0, and there is **no interrupt source override**: with KVM's
//!   default GSI routing, which Ember keeps, ISA IRQ `i` is GSI `i` on IOAPIC
//!   pin `i`, the in-kernel PIT included (IRQ 0 on pin 0). ACPI's default
//!   for an ISA IRQ without an override is exactly this identity mapping,
//!   edge-triggered and active high, so the MADT says the same as the
//!   [MP table](crate::mptable), which maps IRQ `i` to pin `i` for the same
//!   reason.
//!
//! # Devices in the DSDT
//!
//! Each device describes itself: [`AcpiConfig::devices`] is a list of [`Aml`]
//! objects, each appending its own `Device (...) {...}` to the DSDT's
//! `Scope (\_SB)`, in order. The [`devices`](crate::devices) module has the ones
//! Ember's VMM uses (a 16550, virtio-mmio); a device of your own implements
//! [`Aml`] with the building blocks of the [`aml`](crate::aml) module. Names must
//! be unique in `\_SB`: a guest's ACPI interpreter rejects a duplicate.
//!
//! # Power-off and reset
//!
//! A hardware-reduced platform has no PM1 control block, so the OS powers
//! off through the FADT's **sleep control register** instead: it finds the
//! S5 (soft-off) sleep type `SLP_TYP` in the DSDT's `\_S5_` package and
//! writes `(SLP_TYP << 2) | SLP_EN` (`SLP_EN` is bit 5) to the register,
//! after clearing the wake status (bit 7, `WAK_STS`) in the **sleep status
//! register**; it resets by writing the FADT's `RESET_VALUE` to the
//! **reset register**. With an [`AcpiShutdown`] in the configuration, all
//! three registers are one byte at its I/O port (generic address
//! structures: system I/O space, 8 bits at offset 0, byte access; FADT
//! flag `RESET_REG_SUP`), where a VMM places a device that ends the VM on
//! those two values, and the DSDT holds
//! `Name (\_S5_, Package () { SLP_TYP, Zero })`. Linux then offers
//! power-off only when both sleep registers and `\_S5_` are there
//! (`acpi_sleep_state_supported`), and with `reboot=acpi` (x86's first
//! choice by default) resets through the reset register. Without an
//! [`AcpiShutdown`] the registers stay zero, there is no `\_S5_`, and a
//! guest cannot power off through ACPI.
//!
//! Linux treats a hardware-reduced platform as having no legacy PIC
//! (`acpi_generic_reduced_hw_init` installs `null_legacy_pic`), so it does
//! not pre-assign Linux IRQs 0-15 to IOAPIC pins 0-15: an interrupt is
//! usable once a device description asks for its GSI. A device the guest
//! should use with interrupts (COM1, the i8042's keyboard, virtio-mmio)
//! therefore belongs in the DSDT.

use ember_arch::layout::{
    ACPI_DSDT_START, ACPI_FADT_START, ACPI_MADT_START, ACPI_RSDP_START, ACPI_XSDT_START,
    HIMEM_START, IOAPIC_START, LAPIC_START,
};
use vm_memory::{GuestAddress, GuestMemory};

use crate::aml::{Aml, Name, NamePath, NameSeg, Package, Scope};
use crate::guest::{write_bytes, GuestWriteError};
use crate::le;

/// Why the ACPI tables could not be written. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// ACPI tables need at least one CPU.
    #[error("ACPI tables need at least one CPU")]
    NoCpus,
    /// Too many CPUs for xAPIC IDs: the IOAPIC takes the ID after the last
    /// CPU, and `0xff` is the broadcast ID.
    #[error("{num_cpus} CPUs exceed the MADT's limit of {max}")]
    TooManyCpus {
        /// The number of CPUs asked for.
        num_cpus: u8,
        /// The limit, [`ACPI_MAX_CPUS`].
        max: u8,
    },
    /// The S5 sleep type does not fit the 3-bit `SLP_TYP` field.
    #[error("ACPI S5 sleep type {sleep_type} exceeds the SLP_TYP field's maximum {max}")]
    BadSleepType {
        /// The sleep type asked for.
        sleep_type: u8,
        /// The limit, [`ACPI_MAX_SLEEP_TYPE`].
        max: u8,
    },
    /// The ACPI tables would reach 1 MiB.
    #[error("ACPI tables would end at {end:#x} or beyond, past their limit {limit:#x}")]
    TablesTooLarge {
        /// Exclusive end of the tables (the end of the DSDT), or of as much of the
        /// DSDT as was built before it was found too large.
        end: u64,
        /// The limit, [`HIMEM_START`].
        limit: u64,
    },
    /// Guest memory does not hold the tables, or a write failed.
    #[error(transparent)]
    Memory(#[from] GuestWriteError),
}

/// The most vCPUs the MADT describes: as for the MP table, xAPIC IDs are 8
/// bits, the IOAPIC takes the ID after the last CPU, and `0xff` is the
/// broadcast ID.
pub const ACPI_MAX_CPUS: u8 = 254;

/// Size of the RSDP (revision 2).
pub const RSDP_SIZE: usize = 36;

/// The one-byte I/O register a guest powers off and resets through: the
/// FADT's sleep control, sleep status and reset register all point at
/// `port`, and the DSDT's `\_S5_` gives `s5_sleep_type` (see the
/// [module documentation](self#power-off-and-reset)).
///
/// To power off, the OS writes `(s5_sleep_type << 2) | 0x20` to `port`; to
/// reset, `reset_value`. It also writes `0x80` there (clearing the wake
/// status) before it powers off, and reads the port as the sleep status.
/// The device at `port` is the VMM's: it must tell those values apart, so
/// `reset_value` should not look like a sleep request (bit 5 clear).
///
/// As [`Aml`], it is `Name (\_S5_, Package () { s5_sleep_type, Zero })`, which
/// [`setup_acpi`] puts at the root of the DSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiShutdown {
    /// The I/O port of the register.
    pub port: u16,
    /// The S5 (soft-off) sleep type, `SLP_TYP`: 0 to [`ACPI_MAX_SLEEP_TYPE`].
    pub s5_sleep_type: u8,
    /// The value that resets the machine (FADT `RESET_VALUE`).
    pub reset_value: u8,
}

/// The largest sleep type: `SLP_TYP` is a 3-bit field.
pub const ACPI_MAX_SLEEP_TYPE: u8 = 7;

/// `Name (\_S5_, Package () { s5_sleep_type, Zero })`: the S5 sleep type for the
/// sleep control register (the second element would be for a PM1b control block,
/// which a hardware-reduced platform does not have).
impl Aml for AcpiShutdown {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        Name::new(NameSeg::S5, &Package::new(&[&self.s5_sleep_type, &0u8])).append_aml_bytes(bytes);
    }
}

/// What [`setup_acpi`] describes.
#[derive(Clone, Copy)]
pub struct AcpiConfig<'a> {
    /// Number of vCPUs, 1 to [`ACPI_MAX_CPUS`]: vCPU `i` gets ACPI
    /// processor UID `i` and local APIC ID `i`.
    pub num_cpus: u8,
    /// The devices for the DSDT's `Scope (\_SB)`, in order: each appends its own
    /// `Device` (see [`devices`](crate::devices) for ready-made ones).
    pub devices: &'a [&'a dyn Aml],
    /// The register the guest powers off and resets through, if any.
    pub shutdown: Option<AcpiShutdown>,
}

impl std::fmt::Debug for AcpiConfig<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiConfig")
            .field("num_cpus", &self.num_cpus)
            .field("devices", &self.devices.len())
            .field("shutdown", &self.shutdown)
            .finish()
    }
}

// Table header and fields.
const HEADER_SIZE: usize = 36;
const OEM_ID: &[u8; 6] = b"EMBER ";
const OEM_TABLE_ID: &[u8; 8] = b"EMBERVM ";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: &[u8; 4] = b"EMBR";
const CREATOR_REVISION: u32 = 1;
/// Offset of the checksum byte in a table header.
const CHECKSUM: usize = 9;

const RSDP_REVISION: u8 = 2;
/// The RSDP's first checksum covers the ACPI 1.0 part, bytes 0-19.
const RSDP_V1_SIZE: usize = 20;
const XSDT_REVISION: u8 = 1;
/// The FADT of ACPI 6.4: revision (major version) 6, minor version 4.
const FADT_REVISION: u8 = 6;
const FADT_MINOR_VERSION: u8 = 4;
/// Size of a revision 6 FADT.
pub const FADT_SIZE: usize = 276;
/// The MADT of ACPI 6.4.
const MADT_REVISION: u8 = 5;
/// DSDT revision 2: AML integers are 64 bits.
const DSDT_REVISION: u8 = 2;

// FADT field offsets (ACPI 6.4, table 5.9).
const FADT_DSDT: usize = 40;
const FADT_IAPC_BOOT_ARCH: usize = 109;
const FADT_FLAGS: usize = 112;
const FADT_RESET_REG: usize = 116;
const FADT_RESET_VALUE: usize = 128;
const FADT_MINOR_VERSION_OFFSET: usize = 131;
const FADT_X_DSDT: usize = 140;
const FADT_SLEEP_CONTROL_REG: usize = 244;
const FADT_SLEEP_STATUS_REG: usize = 256;
const FADT_HYPERVISOR_VENDOR_ID: usize = 268;

/// FADT flag: the power button, if any, is a control-method device.
pub const FADT_PWR_BUTTON: u32 = 1 << 4;
/// FADT flag: the sleep button, if any, is a control-method device.
pub const FADT_SLP_BUTTON: u32 = 1 << 5;
/// FADT flag: the reset register (`RESET_REG`, `RESET_VALUE`) is supported.
pub const FADT_RESET_REG_SUP: u32 = 1 << 10;
/// FADT flag: hardware-reduced ACPI.
pub const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// IA-PC boot architecture flag: an 8042 (or equivalent) is present.
pub const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// IA-PC boot architecture flag: VGA is not present.
pub const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// IA-PC boot architecture flag: no CMOS RTC.
pub const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
const HYPERVISOR_VENDOR_ID: &[u8; 8] = b"EMBER   ";

// Generic address structure (ACPI 6.4, 5.2.3.2).
const GAS_SIZE: usize = 12;
/// Address space ID: system I/O.
const GAS_SYSTEM_IO: u8 = 1;
/// Access size: byte.
const GAS_ACCESS_BYTE: u8 = 1;

// MADT.
const MADT_FIXED_SIZE: usize = HEADER_SIZE + 8;
/// MADT flag: the system also has dual 8259 PICs.
pub const MADT_PCAT_COMPAT: u32 = 1 << 0;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_LOCAL_APIC_SIZE: usize = 8;
const MADT_IO_APIC: u8 = 1;
const MADT_IO_APIC_SIZE: usize = 12;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_LOCAL_APIC_NMI_SIZE: usize = 6;
/// Local APIC flag: the processor is enabled.
const LOCAL_APIC_ENABLED: u32 = 1 << 0;
/// Processor UID meaning "all processors" in a local APIC NMI entry.
const ALL_PROCESSORS: u8 = 0xff;

/// The local APICs' address, as the MADT's 32-bit field holds it.
const LAPIC_ADDRESS: u32 = LAPIC_START as u32;
const _: () = assert!(LAPIC_START <= u32::MAX as u64);
/// The IOAPIC's address, as the MADT's 32-bit field holds it.
const IOAPIC_ADDRESS: u32 = IOAPIC_START as u32;
const _: () = assert!(IOAPIC_START <= u32::MAX as u64);

/// Size of the MADT for `num_cpus` vCPUs: `62 + 8 * num_cpus`.
const fn madt_size(num_cpus: u8) -> usize {
    MADT_FIXED_SIZE
        + MADT_LOCAL_APIC_SIZE * num_cpus as usize
        + MADT_IO_APIC_SIZE
        + MADT_LOCAL_APIC_NMI_SIZE
}

/// The tables referenced by the XSDT.
const XSDT_ENTRIES: usize = 2;
const XSDT_SIZE: usize = HEADER_SIZE + 8 * XSDT_ENTRIES;

// The fixed-size tables fit in their slots, and the DSDT's address fits the
// FADT's 32-bit DSDT field.
const _: () = assert!(ACPI_RSDP_START % 16 == 0);
const _: () = assert!(ACPI_RSDP_START + RSDP_SIZE as u64 <= ACPI_XSDT_START);
const _: () = assert!(ACPI_XSDT_START + XSDT_SIZE as u64 <= ACPI_FADT_START);
const _: () = assert!(ACPI_FADT_START + FADT_SIZE as u64 <= ACPI_MADT_START);
const _: () = assert!(ACPI_MADT_START + madt_size(ACPI_MAX_CPUS) as u64 <= ACPI_DSDT_START);
const _: () = assert!(ACPI_DSDT_START < HIMEM_START);
const _: () = assert!(ACPI_DSDT_START <= u32::MAX as u64);

/// A zeroed table of `len` bytes with its standard header filled in, except
/// the checksum (see [`seal`]).
fn table(signature: &[u8; 4], len: usize, revision: u8) -> Vec<u8> {
    let mut t = vec![0u8; len];
    le::put(&mut t, 0, signature);
    // Every table is far below 4 GiB: at most the DSDT's 124 KiB.
    le::put(&mut t, 4, &(len as u32).to_le_bytes());
    le::put(&mut t, 8, &[revision]);
    le::put(&mut t, 10, OEM_ID);
    le::put(&mut t, 16, OEM_TABLE_ID);
    le::put(&mut t, 24, &OEM_REVISION.to_le_bytes());
    le::put(&mut t, 28, CREATOR_ID);
    le::put(&mut t, 32, &CREATOR_REVISION.to_le_bytes());
    t
}

/// Sets the header's checksum so that the table sums to 0.
fn seal(mut t: Vec<u8>) -> Vec<u8> {
    le::put(&mut t, CHECKSUM, &[0]);
    let sum = le::checksum(&t);
    le::put(&mut t, CHECKSUM, &[sum]);
    t
}

/// The revision 2 RSDP pointing at the XSDT at `xsdt`.
fn build_rsdp(xsdt: u64) -> [u8; RSDP_SIZE] {
    let mut r = [0u8; RSDP_SIZE];
    le::put(&mut r, 0, b"RSD PTR ");
    le::put(&mut r, 9, OEM_ID);
    le::put(&mut r, 15, &[RSDP_REVISION]);
    // 16: RsdtAddress, 0: there is no RSDT.
    le::put(&mut r, 20, &(RSDP_SIZE as u32).to_le_bytes());
    le::put(&mut r, 24, &xsdt.to_le_bytes());
    let sum = le::checksum(r.get(..RSDP_V1_SIZE).unwrap_or_default());
    le::put(&mut r, 8, &[sum]);
    let sum = le::checksum(&r);
    le::put(&mut r, 32, &[sum]);
    r
}

fn build_xsdt(entries: &[u64; XSDT_ENTRIES]) -> Vec<u8> {
    let mut t = table(b"XSDT", XSDT_SIZE, XSDT_REVISION);
    for (i, addr) in entries.iter().enumerate() {
        le::put(&mut t, HEADER_SIZE + 8 * i, &addr.to_le_bytes());
    }
    seal(t)
}

/// A generic address structure for the byte at I/O port `port`: system
/// I/O space, register width 8 bits at bit offset 0, byte access.
fn io_port_gas(port: u16) -> [u8; GAS_SIZE] {
    let mut g = [0u8; GAS_SIZE];
    le::put(&mut g, 0, &[GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE]);
    le::put(&mut g, 4, &u64::from(port).to_le_bytes());
    g
}

fn build_fadt(dsdt: u32, shutdown: Option<&AcpiShutdown>) -> Vec<u8> {
    let mut t = table(b"FACP", FADT_SIZE, FADT_REVISION);
    // FIRMWARE_CTRL and X_FIRMWARE_CTRL stay 0: a hardware-reduced
    // platform needs no FACS. So do SCI_INT, SMI_CMD, the PM and GPE
    // blocks, and (without `shutdown`) RESET_REG and the sleep registers.
    le::put(&mut t, FADT_DSDT, &dsdt.to_le_bytes());
    let boot_arch =
        IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT;
    le::put(&mut t, FADT_IAPC_BOOT_ARCH, &boot_arch.to_le_bytes());
    let mut flags = FADT_HW_REDUCED_ACPI | FADT_PWR_BUTTON | FADT_SLP_BUTTON;
    if let Some(shutdown) = shutdown {
        let register = io_port_gas(shutdown.port);
        le::put(&mut t, FADT_RESET_REG, &register);
        le::put(&mut t, FADT_RESET_VALUE, &[shutdown.reset_value]);
        le::put(&mut t, FADT_SLEEP_CONTROL_REG, &register);
        le::put(&mut t, FADT_SLEEP_STATUS_REG, &register);
        flags |= FADT_RESET_REG_SUP;
    }
    le::put(&mut t, FADT_FLAGS, &flags.to_le_bytes());
    le::put(&mut t, FADT_MINOR_VERSION_OFFSET, &[FADT_MINOR_VERSION]);
    le::put(&mut t, FADT_X_DSDT, &u64::from(dsdt).to_le_bytes());
    le::put(&mut t, FADT_HYPERVISOR_VENDOR_ID, HYPERVISOR_VENDOR_ID);
    seal(t)
}

/// The MADT for `num_cpus` (1..=254) vCPUs.
fn build_madt(num_cpus: u8) -> Vec<u8> {
    let mut t = table(b"APIC", madt_size(num_cpus), MADT_REVISION);
    le::put(&mut t, HEADER_SIZE, &LAPIC_ADDRESS.to_le_bytes());
    le::put(&mut t, HEADER_SIZE + 4, &MADT_PCAT_COMPAT.to_le_bytes());
    let mut off = MADT_FIXED_SIZE;
    for i in 0..num_cpus {
        // Type, length, ACPI processor UID, APIC ID, flags.
        le::put(
            &mut t,
            off,
            &[MADT_LOCAL_APIC, MADT_LOCAL_APIC_SIZE as u8, i, i],
        );
        le::put(&mut t, off + 4, &LOCAL_APIC_ENABLED.to_le_bytes());
        off += MADT_LOCAL_APIC_SIZE;
    }
    // Type, length, I/O APIC ID, reserved, address, GSI base.
    let ioapic_id = num_cpus;
    le::put(
        &mut t,
        off,
        &[MADT_IO_APIC, MADT_IO_APIC_SIZE as u8, ioapic_id, 0],
    );
    le::put(&mut t, off + 4, &IOAPIC_ADDRESS.to_le_bytes());
    le::put(&mut t, off + 8, &0u32.to_le_bytes());
    off += MADT_IO_APIC_SIZE;
    // Type, length, processor UID (all), MPS INTI flags (conforming), LINT#.
    le::put(
        &mut t,
        off,
        &[MADT_LOCAL_APIC_NMI, MADT_LOCAL_APIC_NMI_SIZE as u8],
    );
    le::put(&mut t, off + 2, &[ALL_PROCESSORS, 0, 0, 1]);
    seal(t)
}

/// The most the DSDT's AML may take: the room up to 1 MiB after its header.
const DSDT_AML_ROOM: usize = (HIMEM_START - ACPI_DSDT_START) as usize - HEADER_SIZE;

/// The DSDT's AML: `\_S5_` with a shutdown register, then
/// `Scope (\_SB) { devices }` if there are devices.
///
/// Stops with [`AcpiError::TablesTooLarge`] as soon as the AML built so far
/// outgrows the room, so a huge list costs no more than the room.
fn dsdt_aml(devices: &[&dyn Aml], shutdown: Option<&AcpiShutdown>) -> Result<Vec<u8>, AcpiError> {
    let too_large = |len: usize| AcpiError::TablesTooLarge {
        end: ACPI_DSDT_START + (HEADER_SIZE + len) as u64,
        limit: HIMEM_START,
    };
    let mut aml = shutdown.map(Aml::to_aml_bytes).unwrap_or_default();
    if devices.is_empty() {
        return Ok(aml);
    }
    // Each device's AML once, checked as it grows; the scope then wraps it.
    let mut body = Vec::new();
    for device in devices {
        device.append_aml_bytes(&mut body);
        if aml.len() + body.len() > DSDT_AML_ROOM {
            return Err(too_large(aml.len() + body.len()));
        }
    }
    let sb = NamePath::root_segment(NameSeg::SB);
    Scope::new(sb, &[&RawAml(&body)]).append_aml_bytes(&mut aml);
    Ok(aml)
}

/// Bytes that are already AML, appended as they are.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        bytes.extend_from_slice(self.0);
    }
}

fn build_dsdt(aml: &[u8]) -> Vec<u8> {
    let mut t = table(b"DSDT", HEADER_SIZE + aml.len(), DSDT_REVISION);
    le::put(&mut t, HEADER_SIZE, aml);
    seal(t)
}

/// Checks the configuration before anything is built.
fn validate(config: &AcpiConfig<'_>) -> Result<(), AcpiError> {
    let num_cpus = config.num_cpus;
    if num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    if num_cpus > ACPI_MAX_CPUS {
        return Err(AcpiError::TooManyCpus {
            num_cpus,
            max: ACPI_MAX_CPUS,
        });
    }
    if let Some(shutdown) = config.shutdown {
        if shutdown.s5_sleep_type > ACPI_MAX_SLEEP_TYPE {
            return Err(AcpiError::BadSleepType {
                sleep_type: shutdown.s5_sleep_type,
                max: ACPI_MAX_SLEEP_TYPE,
            });
        }
    }
    Ok(())
}

/// Builds every table into one buffer that starts at [`ACPI_RSDP_START`].
fn build_tables(config: &AcpiConfig<'_>) -> Result<Vec<u8>, AcpiError> {
    let dsdt = build_dsdt(&dsdt_aml(config.devices, config.shutdown.as_ref())?);
    let end = ACPI_DSDT_START + dsdt.len() as u64;
    if end > HIMEM_START {
        return Err(AcpiError::TablesTooLarge {
            end,
            limit: HIMEM_START,
        });
    }
    // `ACPI_DSDT_START` is asserted to fit in 32 bits.
    let fadt = build_fadt(ACPI_DSDT_START as u32, config.shutdown.as_ref());
    let madt = build_madt(config.num_cpus);
    let xsdt = build_xsdt(&[ACPI_FADT_START, ACPI_MADT_START]);
    let rsdp = build_rsdp(ACPI_XSDT_START);

    // Below 1 MiB, so these offsets are small.
    let offset = |addr: u64| (addr - ACPI_RSDP_START) as usize;
    let mut buf = vec![0u8; offset(end)];
    le::put(&mut buf, 0, &rsdp);
    le::put(&mut buf, offset(ACPI_XSDT_START), &xsdt);
    le::put(&mut buf, offset(ACPI_FADT_START), &fadt);
    le::put(&mut buf, offset(ACPI_MADT_START), &madt);
    le::put(&mut buf, offset(ACPI_DSDT_START), &dsdt);
    Ok(buf)
}

/// Writes the ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) for `config` into
/// `[ACPI_RSDP_START, HIMEM_START)` and returns the RSDP's address, to pass
/// to the `configure_*_boot` functions as `rsdp`.
///
/// The MADT lists `config.num_cpus` enabled local APICs (vCPU `i`: ACPI
/// processor UID `i`, APIC ID `i`), the IOAPIC (ID `num_cpus`, at
/// `0xfec00000`, GSI base 0) and LINT1 of every local APIC as the NMI
/// input; the DSDT describes `config.devices`. With `config.shutdown`,
/// the FADT's sleep control, sleep status and reset registers point at its
/// port and the DSDT gets `\_S5_`. See the [module documentation](self)
/// for what the FADT says, how a guest powers off, and why the MADT has no
/// interrupt source override.
///
/// The configuration, the tables' size and the target range are all
/// checked before anything is written; the tables (with zeroed gaps
/// between them) are then written in one piece, from [`ACPI_RSDP_START`] to
/// the end of the DSDT. That range is reserved in the e820 map.
///
/// # Errors
///
/// [`AcpiError::NoCpus`] for 0 vCPUs, [`AcpiError::TooManyCpus`] for more than
/// [`ACPI_MAX_CPUS`], [`AcpiError::BadSleepType`] for an S5 sleep type above
/// [`ACPI_MAX_SLEEP_TYPE`], [`AcpiError::TablesTooLarge`] if the DSDT would reach
/// 1 MiB, or [`AcpiError::Memory`] if guest memory does not cover the tables or a
/// write fails.
///
/// # Example
///
/// ```
/// use ember_arch::layout::ACPI_RSDP_START;
/// use ember_firmware::acpi::{setup_acpi, AcpiConfig, AcpiShutdown};
/// use ember_firmware::devices::{Serial16550, VirtioMmio};
/// use ember_firmware::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
/// let disk = VirtioMmio::new(0, 0xd000_0000, 0x1000, 5)?;
/// let shutdown = AcpiShutdown { port: 0x600, s5_sleep_type: 5, reset_value: 1 };
/// let config = AcpiConfig {
///     num_cpus: 2,
///     devices: &[&Serial16550::COM1, &disk],
///     shutdown: Some(shutdown),
/// };
/// let rsdp = setup_acpi(&mem, &config)?;
/// assert_eq!(rsdp, GuestAddress(ACPI_RSDP_START));
/// let mut signature = [0u8; 8];
/// mem.read_slice(&mut signature, rsdp).unwrap();
/// assert_eq!(&signature, b"RSD PTR ");
/// let no_cpus = AcpiConfig { num_cpus: 0, devices: &[], shutdown: None };
/// assert!(setup_acpi(&mem, &no_cpus).is_err());
/// # Ok::<(), ember_firmware::Error>(())
/// ```
pub fn setup_acpi<M: GuestMemory>(
    mem: &M,
    config: &AcpiConfig<'_>,
) -> Result<GuestAddress, AcpiError> {
    validate(config)?;
    let tables = build_tables(config)?;
    // Checks the whole range before writing any of it.
    write_bytes(mem, "ACPI tables", &tables, ACPI_RSDP_START)?;
    Ok(GuestAddress(ACPI_RSDP_START))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{Serial16550, VirtioMmio};
    use crate::testing::{filled_mem, read};
    use ember_arch::layout::EBDA_START;
    use ember_boot::e820::{e820_map, E820_RESERVED};
    use vm_memory::GuestMemoryMmap;

    const COM1: &dyn Aml = &Serial16550::COM1;

    const FILL: u8 = 0xcc;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Reads the table at `addr` by its header's length, checking the
    /// signature, the standard header fields and the checksum.
    fn read_table(mem: &GuestMemoryMmap<()>, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let header = read(mem, addr, 36);
        assert_eq!(&header[..4], signature);
        let table = read(mem, addr, u32_at(&header, 4) as usize);
        assert_eq!(
            sum(&table),
            0,
            "{} checksum",
            String::from_utf8_lossy(signature)
        );
        assert_eq!(&table[10..16], b"EMBER ");
        assert_eq!(&table[16..24], b"EMBERVM ");
        assert_eq!(u32_at(&table, 24), 1, "OEM revision");
        assert_eq!(&table[28..32], b"EMBR");
        assert_eq!(u32_at(&table, 32), 1, "creator revision");
        table
    }

    struct Tables {
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
    }

    /// Follows the pointers from the RSDP as a kernel does, checking every
    /// checksum on the way.
    fn parse_back(mem: &GuestMemoryMmap<()>) -> Tables {
        let rsdp = read(mem, ACPI_RSDP_START, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum (first 20 bytes)");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum (36 bytes)");
        assert_eq!(&rsdp[9..15], b"EMBER ");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(u32_at(&rsdp, 16), 0, "RsdtAddress");
        assert_eq!(u32_at(&rsdp, 20), 36, "length");
        assert_eq!(&rsdp[33..36], [0; 3], "reserved");

        let xsdt = read_table(mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt[8], 1, "XSDT revision");
        assert_eq!(xsdt.len(), 36 + 16);
        let fadt = read_table(mem, u64_at(&xsdt, 36), b"FACP");
        let madt = read_table(mem, u64_at(&xsdt, 44), b"APIC");
        let dsdt = read_table(mem, u64_at(&fadt, 140), b"DSDT");
        Tables { fadt, madt, dsdt }
    }

    fn setup(num_cpus: u8, devices: &[&dyn Aml]) -> (GuestMemoryMmap<()>, Tables) {
        setup_with(num_cpus, devices, None)
    }

    fn setup_with(
        num_cpus: u8,
        devices: &[&dyn Aml],
        shutdown: Option<AcpiShutdown>,
    ) -> (GuestMemoryMmap<()>, Tables) {
        let mem = filled_mem(2 << 20, FILL);
        let config = AcpiConfig {
            num_cpus,
            devices,
            shutdown,
        };
        let rsdp = setup_acpi(&mem, &config).unwrap();
        assert_eq!(rsdp, GuestAddress(0xe0000));
        let tables = parse_back(&mem);
        (mem, tables)
    }

    /// Splits the MADT's interrupt controller structures by their lengths.
    fn madt_entries(madt: &[u8]) -> Vec<&[u8]> {
        let mut entries = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let len = usize::from(madt[off + 1]);
            assert!(len >= 2);
            entries.push(&madt[off..off + len]);
            off += len;
        }
        assert_eq!(off, madt.len());
        entries
    }

    fn check_madt(num_cpus: u8) {
        let (mem, t) = setup(num_cpus, &[]);
        let madt = &t.madt;
        let n = usize::from(num_cpus);
        assert_eq!(madt[8], 5, "MADT revision");
        assert_eq!(madt.len(), 44 + 8 * n + 12 + 6);
        assert_eq!(u32_at(madt, 36), 0xfee0_0000, "local APIC address");
        assert_eq!(u32_at(madt, 40), 1, "flags: PCAT_COMPAT only");

        let entries = madt_entries(madt);
        assert_eq!(entries.len(), n + 2);
        for (i, cpu) in entries[..n].iter().enumerate() {
            assert_eq!((cpu[0], cpu.len()), (0, 8), "processor local APIC");
            assert_eq!(usize::from(cpu[2]), i, "ACPI processor UID");
            assert_eq!(usize::from(cpu[3]), i, "APIC ID");
            assert_eq!(u32_at(cpu, 4), 1, "enabled");
        }
        let ioapic = entries[n];
        assert_eq!((ioapic[0], ioapic.len()), (1, 12), "I/O APIC");
        assert_eq!(ioapic[2], num_cpus, "IOAPIC ID, as in the MP table");
        assert_eq!(ioapic[3], 0, "reserved");
        assert_eq!(u32_at(ioapic, 4), 0xfec0_0000);
        assert_eq!(u32_at(ioapic, 8), 0, "GSI base");
        let nmi = entries[n + 1];
        assert_eq!((nmi[0], nmi.len()), (4, 6), "local APIC NMI");
        assert_eq!(nmi[2], 0xff, "all processors");
        assert_eq!(u16_at(nmi, 3), 0, "flags: conforming");
        assert_eq!(nmi[5], 1, "LINT1");
        // No interrupt source overrides (type 2) or anything else.
        assert!(entries.iter().all(|e| matches!(e[0], 0 | 1 | 4)));

        // The MADT ends before the DSDT; nothing is written past the tables.
        assert!(ACPI_MADT_START + madt.len() as u64 <= ACPI_DSDT_START);
        assert_eq!(read(&mem, ACPI_DSDT_START + 36, 1), [FILL]);
        assert_eq!(read(&mem, ACPI_RSDP_START - 1, 1), [FILL]);
    }

    #[test]
    fn madt_one_cpu() {
        check_madt(1);
    }

    #[test]
    fn madt_two_cpus() {
        check_madt(2);
    }

    #[test]
    fn madt_max_cpus() {
        check_madt(254);
        assert_eq!(madt_size(254), 2094);
    }

    #[test]
    fn xsdt_points_at_fadt_and_madt() {
        let (mem, _) = setup(2, &[]);
        let xsdt = read(&mem, ACPI_XSDT_START, 52);
        assert_eq!(u64_at(&xsdt, 36), ACPI_FADT_START);
        assert_eq!(u64_at(&xsdt, 44), ACPI_MADT_START);
        assert_eq!(
            u64_at(&read(&mem, ACPI_RSDP_START, 36), 24),
            ACPI_XSDT_START
        );
    }

    #[test]
    fn fadt_fields() {
        let (_, t) = setup(2, &[]);
        let f = &t.fadt;
        assert_eq!(f.len(), 276);
        assert_eq!((f[8], f[131]), (6, 4), "FADT version 6.4");
        assert_eq!(u32_at(f, 112), 1 << 20 | 1 << 5 | 1 << 4, "flags");
        assert_eq!(u16_at(f, 109), 1 << 1 | 1 << 2 | 1 << 5, "IA-PC boot flags");
        assert_eq!(u32_at(f, 40), 0xe1000, "DSDT");
        assert_eq!(u64_at(f, 140), 0xe1000, "X_DSDT");
        assert_eq!(&f[268..276], b"EMBER   ", "hypervisor vendor identity");
        assert_eq!(u32_at(f, 36), 0, "FIRMWARE_CTRL: no FACS");
        assert_eq!(u64_at(f, 132), 0, "X_FIRMWARE_CTRL: no FACS");
        assert_eq!(u16_at(f, 46), 0, "SCI_INT");
        assert_eq!(f[111], 0, "reserved");
        // Everything else (PM blocks, reset register, sleep registers, ...)
        // is zero.
        let set = [0..44, 109..111, 112..116, 131..132, 140..148, 268..276];
        for (i, &b) in f.iter().enumerate() {
            if !set.iter().any(|r| r.contains(&i)) {
                assert_eq!(b, 0, "FADT byte {i}");
            }
        }
    }

    const SHUTDOWN: AcpiShutdown = AcpiShutdown {
        port: 0x600,
        s5_sleep_type: 5,
        reset_value: 1,
    };

    /// The generic address structure for the byte at I/O port 0x600:
    /// address space 1 (system I/O), bit width 8, bit offset 0, access
    /// size 1 (byte), 64-bit address (ACPI 6.4, 5.2.3.2).
    const PORT_0X600_GAS: [u8; 12] = [1, 8, 0, 1, 0x00, 0x06, 0, 0, 0, 0, 0, 0];

    #[test]
    fn fadt_sleep_and_reset_registers() {
        let (_, t) = setup_with(2, &[COM1], Some(SHUTDOWN));
        let f = &t.fadt;
        assert_eq!(f.len(), 276);
        // ACPI 6.4, table 5.9: RESET_REG at 116 (12 bytes), RESET_VALUE at
        // 128, SLEEP_CONTROL_REG at 244 and SLEEP_STATUS_REG at 256 (12
        // bytes each).
        assert_eq!(f[116..128], PORT_0X600_GAS, "RESET_REG");
        assert_eq!(f[128], 1, "RESET_VALUE");
        assert_eq!(f[244..256], PORT_0X600_GAS, "SLEEP_CONTROL_REG");
        assert_eq!(f[256..268], PORT_0X600_GAS, "SLEEP_STATUS_REG");
        assert_eq!(
            u32_at(f, 112),
            1 << 20 | 1 << 10 | 1 << 5 | 1 << 4,
            "flags: HW_REDUCED_ACPI, RESET_REG_SUP, SLP_BUTTON, PWR_BUTTON"
        );
        // The rest is as without the registers.
        let (_, plain) = setup_with(2, &[COM1], None);
        let changed = [9..10, 112..116, 116..129, 244..268];
        for (i, (&a, &b)) in f.iter().zip(&plain.fadt).enumerate() {
            if !changed.iter().any(|r| r.contains(&i)) {
                assert_eq!(a, b, "FADT byte {i}");
            }
        }

        // Another port, sleep type and reset value.
        let other = AcpiShutdown {
            port: 0xfffe,
            s5_sleep_type: 7,
            reset_value: 0x0e,
        };
        let (_, t) = setup_with(1, &[], Some(other));
        let gas = [1, 8, 0, 1, 0xfe, 0xff, 0, 0, 0, 0, 0, 0];
        assert_eq!(t.fadt[116..128], gas);
        assert_eq!(t.fadt[128], 0x0e);
        assert_eq!(t.fadt[244..256], gas);
        assert_eq!(t.fadt[256..268], gas);
    }

    /// `Name (\_S5_, Package () { 0x05, Zero })` at the root of the
    /// DSDT, assembled by hand (20.2.5.4 NameOp, 20.2.5.5 PackageOp:
    /// PkgLength 5 counts itself, NumElements and the two elements). The
    /// same bytes come out of `iasl -oa` (ACPICA 20200925) for
    /// `Name (_S5, Package () { 0x05, Zero })`, and `iasl -d` reads the
    /// FADT built with [`SHUTDOWN`] back as a reset register and sleep
    /// control and status registers at SystemIO 0x600, 8 bits, byte access.
    #[rustfmt::skip]
    const S5_AML: &[u8] = &[
        // NameOp, "_S5_"
        0x08, b'_', b'S', b'5', b'_',
        // PackageOp, PkgLength 5, NumElements 2, BytePrefix 5, ZeroOp
        0x12, 0x05, 0x02, 0x0a, 0x05, 0x00,
    ];

    #[test]
    fn dsdt_s5_object() {
        let (_, t) = setup_with(1, &[], Some(SHUTDOWN));
        assert_eq!(&t.dsdt[36..], S5_AML);
        // Before the devices' scope.
        let (_, t) = setup_with(2, &[COM1], Some(SHUTDOWN));
        assert_eq!(&t.dsdt[36..36 + S5_AML.len()], S5_AML);
        assert_eq!(&t.dsdt[36 + S5_AML.len()..], COM1_DSDT_AML);
        // Sleep type 0: ZeroOp.
        let zero = AcpiShutdown {
            s5_sleep_type: 0,
            ..SHUTDOWN
        };
        let (_, t) = setup_with(1, &[], Some(zero));
        assert_eq!(&t.dsdt[36..], b"\x08_S5_\x12\x04\x02\x00\x00");
        // Without a shutdown register there is no \_S5_.
        let (_, t) = setup_with(2, &[COM1], None);
        assert!(!t.dsdt.windows(4).any(|w| w == b"_S5_"));
    }

    #[test]
    fn sleep_type_above_seven_rejected() {
        let mem = filled_mem(2 << 20, FILL);
        let config = |s5_sleep_type| AcpiConfig {
            num_cpus: 1,
            devices: &[],
            shutdown: Some(AcpiShutdown {
                s5_sleep_type,
                ..SHUTDOWN
            }),
        };
        let err = setup_acpi(&mem, &config(8)).unwrap_err();
        assert!(matches!(
            err,
            AcpiError::BadSleepType {
                sleep_type: 8,
                max: 7
            }
        ));
        assert!(err.to_string().contains('8'));
        assert!(read(&mem, ACPI_RSDP_START, 0x2_0000)
            .iter()
            .all(|&b| b == FILL));
        setup_acpi(&mem, &config(7)).unwrap();
    }

    #[test]
    fn empty_dsdt_is_a_bare_definition_block() {
        let (_, t) = setup(1, &[]);
        assert_eq!(t.dsdt.len(), 36);
        assert_eq!(t.dsdt[8], 2, "DSDT revision 2: 64-bit integers");
    }

    /// `Scope(\_SB) { Device(V000) {...} }` for a virtio-mmio device at
    /// 0xd0000000 (4 KiB) on GSI 5, assembled by hand from the ACPI 6.4
    /// encodings (20.2 AML grammar, 6.4 resource descriptors); the PkgLength
    /// of each package counts its own bytes and everything after it to the
    /// end of the package. The same bytes come out of `iasl -oa` (ACPICA
    /// 20200925; `-oa` keeps the root prefix of `\_SB` that its
    /// optimizer would drop) for the ASL `iasl -d` prints for them.
    #[rustfmt::skip]
    const VIRTIO_DSDT_AML: &[u8] = &[
        // ScopeOp, PkgLength 67 = 0x043 (two-byte form: 0x40 | 0x3, 0x04),
        // \_SB_
        0x10, 0x43, 0x04, b'\\', b'_', b'S', b'B', b'_',
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

    /// `Scope(\_SB) { Device(COM1) {...} }`, assembled by hand like
    /// [`VIRTIO_DSDT_AML`].
    #[rustfmt::skip]
    const COM1_DSDT_AML: &[u8] = &[
        // ScopeOp, PkgLength 57 = 0x39, \_SB_
        0x10, 0x39, b'\\', b'_', b'S', b'B', b'_',
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

    fn virtio(uid: u16, gsi: u32) -> VirtioMmio {
        VirtioMmio::new(uid, 0xd000_0000 + u64::from(uid) * 0x1000, 0x1000, gsi).unwrap()
    }

    #[test]
    fn dsdt_for_one_virtio_mmio_device() {
        let (_, t) = setup(2, &[&virtio(0, 5)]);
        assert_eq!(&t.dsdt[36..], VIRTIO_DSDT_AML);
    }

    #[test]
    fn dsdt_for_com1() {
        let (_, t) = setup(1, &[COM1]);
        assert_eq!(&t.dsdt[36..], COM1_DSDT_AML);
    }

    #[test]
    fn dsdt_for_several_devices() {
        let (v0, v1, v2) = (virtio(0, 5), virtio(1, 6), virtio(2, 7));
        let devices: [&dyn Aml; 4] = [&v0, COM1, &v1, &v2];
        let (_, t) = setup(4, &devices);
        let aml = &t.dsdt[36..];
        // One scope holding the four devices in order.
        let body: Vec<u8> = devices.iter().flat_map(|d| d.to_aml_bytes()).collect();
        let sb = NamePath::root_segment(NameSeg::SB);
        assert_eq!(aml, Scope::new(sb, &[&RawAml(&body)]).to_aml_bytes());
        // ScopeOp, PkgLength 239 = 0x0ef (itself 2, the path 5, the devices
        // 60 + 51 + 60 + 61), \_SB_.
        assert_eq!(&aml[..8], b"\x10\x4f\x0e\\_SB_");
        assert_eq!(v0.to_aml_bytes(), VIRTIO_DSDT_AML[8..]);
        assert_eq!(COM1.to_aml_bytes(), COM1_DSDT_AML[7..]);
        let find = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
        // V001 has _UID 1 (OneOp), V002 _UID 2 (BytePrefix 2) and GSI 7.
        assert!(find(b"V001\x08_HID"));
        assert!(find(b"\x08_UID\x01\x08_CRS"));
        assert!(find(b"V002\x08_HID"));
        assert!(find(b"\x08_UID\x0a\x02\x08_CRS"));
        assert!(find(&[0x89, 0x06, 0x00, 0x03, 0x01, 0x07, 0, 0, 0]));
    }

    #[test]
    fn many_devices_fit_and_too_many_do_not() {
        let owned: Vec<VirtioMmio> = (0..1000)
            .map(|i| virtio(i, 5 + u32::from(i % 19)))
            .collect();
        let devices: Vec<&dyn Aml> = owned.iter().map(|d| d as &dyn Aml).collect();
        let (mem, t) = setup(254, &devices);
        let end = ACPI_DSDT_START + t.dsdt.len() as u64;
        assert!(end <= HIMEM_START);
        let aml = &t.dsdt[36..];
        assert!(aml.windows(4).any(|w| w == b"V3E7"));
        // The scope's PkgLength uses the three-byte form (over 4095 bytes).
        assert_eq!(aml[1] >> 6, 2);
        if end < HIMEM_START {
            assert_eq!(read(&mem, end, 1), [FILL]);
        }

        // 4000 devices need about 280 KiB: more than the 124 KiB left.
        let owned: Vec<VirtioMmio> = (0..4000).map(|i| virtio(i, 5)).collect();
        let many: Vec<&dyn Aml> = owned.iter().map(|d| d as &dyn Aml).collect();
        let mem = filled_mem(2 << 20, FILL);
        let config = |devices| AcpiConfig {
            num_cpus: 1,
            devices,
            shutdown: None,
        };
        let err = setup_acpi(&mem, &config(&many)).unwrap_err();
        assert!(matches!(
            err,
            AcpiError::TablesTooLarge { end, limit: 0x10_0000 } if end > 0x10_0000
        ));
        assert!(read(&mem, ACPI_RSDP_START, 0x2_0000)
            .iter()
            .all(|&b| b == FILL));

        // A huge list is refused as soon as its AML outgrows the room: the end
        // reported is just past the limit, not that of the whole list.
        let huge: Vec<&dyn Aml> = vec![COM1; 100_000];
        let err = setup_acpi(&mem, &config(&huge)).unwrap_err();
        assert!(matches!(
            err,
            AcpiError::TablesTooLarge { end, .. } if end > 0x10_0000 && end < 0x10_1000
        ));
    }

    #[test]
    fn linux_rsdp_scan_finds_it() {
        // acpi_find_root_pointer: 16-byte steps over 0xe0000..0x100000, the
        // first "RSD PTR " whose 20-byte checksum (and, for revision 2, 36-byte
        // checksum) is 0.
        let (mem, _) = setup(2, &[COM1]);
        let area = read(&mem, 0xe0000, 0x2_0000);
        let found = (0..area.len())
            .step_by(16)
            .find(|&off| {
                area[off..].starts_with(b"RSD PTR ")
                    && sum(&area[off..off + 20]) == 0
                    && sum(&area[off..off + 36]) == 0
            })
            .map(|off| 0xe0000 + off as u64);
        assert_eq!(found, Some(ACPI_RSDP_START));
    }

    #[test]
    fn tables_lie_in_reserved_e820_range() {
        let mem = filled_mem(2 << 20, 0);
        let reserved = e820_map(&mem)
            .unwrap()
            .into_iter()
            .find(|e| e.kind == E820_RESERVED)
            .unwrap();
        assert_eq!(reserved.addr, EBDA_START);
        assert!(reserved.addr <= ACPI_RSDP_START);
        assert_eq!(reserved.addr + reserved.size, HIMEM_START);
    }

    fn config_err(num_cpus: u8, devices: &[&dyn Aml]) -> AcpiError {
        let mem = filled_mem(2 << 20, FILL);
        let config = AcpiConfig {
            num_cpus,
            devices,
            shutdown: None,
        };
        let err = setup_acpi(&mem, &config).unwrap_err();
        assert!(!err.to_string().is_empty());
        assert!(read(&mem, ACPI_RSDP_START, 0x2_0000)
            .iter()
            .all(|&b| b == FILL));
        err
    }

    #[test]
    fn zero_and_too_many_cpus_rejected() {
        assert!(matches!(config_err(0, &[COM1]), AcpiError::NoCpus));
        let err = config_err(255, &[]);
        assert!(matches!(
            err,
            AcpiError::TooManyCpus {
                num_cpus: 255,
                max: 254
            }
        ));
        assert!(err.to_string().contains("255"));
    }

    #[test]
    fn memory_without_the_bios_area_rejected() {
        let len = ACPI_DSDT_START + 36 - ACPI_RSDP_START;
        // Low memory only up to 0xe0000, then high memory.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0xe_0000),
            (GuestAddress(HIMEM_START), 1 << 20),
        ])
        .unwrap();
        let config = AcpiConfig {
            num_cpus: 1,
            devices: &[],
            shutdown: None,
        };
        assert!(matches!(
            setup_acpi(&mem, &config),
            Err(AcpiError::Memory(GuestWriteError::OutsideGuestMemory {
                what: "ACPI tables",
                addr: 0xe_0000,
                len: l
            })) if l == len
        ));
        // Memory ending one byte short of the tables' end: nothing written.
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0xe_0000 + len as usize - 1)])
                .unwrap();
        assert!(matches!(
            setup_acpi(&mem, &config),
            Err(AcpiError::Memory(
                GuestWriteError::OutsideGuestMemory { .. }
            ))
        ));
        assert!(read(&mem, ACPI_RSDP_START, len as usize - 1)
            .iter()
            .all(|&b| b == 0));
        // Exactly enough.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0xe_0000 + len as usize)])
            .unwrap();
        setup_acpi(&mem, &config).unwrap();
        parse_back(&mem);
    }
}

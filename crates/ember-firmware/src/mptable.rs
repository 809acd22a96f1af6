//! The Intel MultiProcessor Specification (1.4) table.
//!
//! Without ACPI, Linux learns how many CPUs there are, their local APIC IDs,
//! where the IOAPIC is and how the ISA interrupts reach it from the MP table.
//! [`setup_mptable`] writes one at [`MPTABLE_START`], the start of the EBDA,
//! where Linux looks for it: the 16-byte MP floating pointer structure
//! (`"_MP_"`), immediately followed by the MP configuration table
//! (`"PCMP"`) and its entries:
//!
//! | entries                 | count        | size each |
//! |-------------------------|--------------|-----------|
//! | processor               | `num_cpus`   | 20        |
//! | bus (`"ISA   "`, id 0)  | 1            | 8         |
//! | I/O APIC                | 1            | 8         |
//! | I/O interrupt assignment| 16 (IRQ 0-15)| 8         |
//! | local interrupt         | 2            | 8         |
//!
//! # ISA interrupt routing
//!
//! ISA IRQ `i` is described as wired to IOAPIC pin `i`, for all of 0..=15.
//! That is what KVM does when the VMM installs no GSI routing of its own
//! (`kvm_setup_default_irq_routing`: GSI `n` goes to IOAPIC pin `n` and, for
//! `n < 16`, to PIC input `n`), and the in-kernel PIT raises GSI 0; Ember
//! installs no routing. Firecracker and Cloud Hypervisor, which also keep
//! KVM's default routing, write the same identity table. The PC convention
//! of the PIT on IOAPIC pin 2 (IRQ 0 → pin 2, with IRQ 2 the PIC cascade)
//! holds only for VMMs that install that routing themselves, as QEMU does;
//! a VMM that does so must describe it with an interrupt source override
//! (which this table does not carry).

use ember_arch::layout::{HIMEM_START, IOAPIC_START, LAPIC_START, MPTABLE_LIMIT, MPTABLE_START};
use vm_memory::GuestMemory;

use crate::guest::{write_bytes, GuestWriteError};
use crate::le;

/// Why the MP table could not be written. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// An MP table needs at least one CPU.
    #[error("an MP table needs at least one CPU")]
    NoCpus,
    /// Too many CPUs for xAPIC IDs: the IOAPIC takes the ID after the last
    /// CPU, and `0xff` is the broadcast ID.
    #[error("{num_cpus} CPUs exceed the MP table's limit of {max}")]
    TooManyCpus {
        /// The number of CPUs asked for.
        num_cpus: u8,
        /// The limit, [`MPTABLE_MAX_CPUS`].
        max: u8,
    },
    /// The MP table would reach 1 MiB.
    #[error("MP table would end at {end:#x}, past its limit {limit:#x}")]
    TooLarge {
        /// Exclusive end of the table.
        end: u64,
        /// The limit, [`HIMEM_START`].
        limit: u64,
    },
    /// Guest memory does not hold the table, or a write failed.
    #[error(transparent)]
    Memory(#[from] GuestWriteError),
}

/// The most CPUs an MP table can describe: xAPIC IDs are 8 bits, the IOAPIC
/// takes the ID after the last CPU, and `0xff` is the broadcast ID.
pub const MPTABLE_MAX_CPUS: u8 = 254;

/// Physical address of the local APICs, [`LAPIC_START`].
pub const APIC_DEFAULT_PHYS_BASE: u32 = LAPIC_START as u32;
const _: () = assert!(LAPIC_START <= u32::MAX as u64);
/// Physical address of the IOAPIC, [`IOAPIC_START`].
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = IOAPIC_START as u32;
const _: () = assert!(IOAPIC_START <= u32::MAX as u64);
/// Local APIC version reported for each processor (an integrated xAPIC, as
/// KVM emulates).
pub const APIC_VERSION: u8 = 0x14;
/// IOAPIC version reported (KVM's IOAPIC reports 0x11).
pub const IOAPIC_VERSION: u8 = 0x11;

/// Number of ISA interrupts described (IRQ 0 to 15).
const ISA_IRQS: u8 = 16;

const MPF_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const PROCESSOR_SIZE: usize = 20;
const BUS_SIZE: usize = 8;
const IOAPIC_SIZE: usize = 8;
const IOINT_SIZE: usize = 8;
const LINT_SIZE: usize = 8;

// Entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

// Interrupt types of I/O and local interrupt entries.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

/// Processor entry flags: enabled, bootstrap processor.
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTPROCESSOR: u8 = 1 << 1;
/// IOAPIC entry flag: usable.
const MPC_APIC_USABLE: u8 = 1 << 0;
/// Interrupt flags 0: polarity and trigger mode conform to the bus (ISA:
/// active high, edge).
const MP_IRQ_CONFORMING: u16 = 0;
/// Local interrupt destination: every local APIC.
const ALL_LOCAL_APICS: u8 = 0xff;

/// Processor signature: family 6, model 0, stepping 0.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID feature flags: FPU (bit 0) and APIC (bit 9).
const CPU_FEATURES: u32 = 0x201;

/// MP specification revision 1.4.
const SPEC_REV: u8 = 4;
const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const OEM_ID: &[u8; 8] = b"EMBER   ";
const PRODUCT_ID: &[u8; 12] = b"EMBER VMM   ";
const BUS_TYPE_ISA: &[u8; 6] = b"ISA   ";

/// Size in bytes of the whole MP table (floating pointer, configuration
/// table header and entries) for `num_cpus` CPUs: `220 + 20 * num_cpus`.
///
/// ```
/// assert_eq!(ember_firmware::mptable::mptable_size(1), 240);
/// ```
pub const fn mptable_size(num_cpus: u8) -> usize {
    MPF_SIZE
        + HEADER_SIZE
        + PROCESSOR_SIZE * num_cpus as usize
        + BUS_SIZE
        + IOAPIC_SIZE
        + IOINT_SIZE * ISA_IRQS as usize
        + LINT_SIZE * 2
}

// Even the largest table ends in the room the layout gives it (the reserved EBDA,
// below the VMM's pages and the ACPI tables).
const _: () = assert!(MPTABLE_START + mptable_size(MPTABLE_MAX_CPUS) as u64 <= MPTABLE_LIMIT);
const _: () = assert!(MPTABLE_LIMIT <= HIMEM_START);
// The configuration table's address fits the floating pointer's 32 bits.
const _: () = assert!(MPTABLE_START + MPF_SIZE as u64 <= u32::MAX as u64);

fn processor_entry(apic_id: u8) -> [u8; PROCESSOR_SIZE] {
    let mut e = [0u8; PROCESSOR_SIZE];
    let flags = CPU_ENABLED | if apic_id == 0 { CPU_BOOTPROCESSOR } else { 0 };
    le::put(&mut e, 0, &[MP_PROCESSOR, apic_id, APIC_VERSION, flags]);
    le::put(&mut e, 4, &CPU_SIGNATURE.to_le_bytes());
    le::put(&mut e, 8, &CPU_FEATURES.to_le_bytes());
    // 12..20 reserved.
    e
}

fn bus_entry() -> [u8; BUS_SIZE] {
    let mut e = [0u8; BUS_SIZE];
    le::put(&mut e, 0, &[MP_BUS, 0]);
    le::put(&mut e, 2, BUS_TYPE_ISA);
    e
}

fn ioapic_entry(id: u8) -> [u8; IOAPIC_SIZE] {
    let mut e = [0u8; IOAPIC_SIZE];
    le::put(&mut e, 0, &[MP_IOAPIC, id, IOAPIC_VERSION, MPC_APIC_USABLE]);
    le::put(&mut e, 4, &IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    e
}

/// An I/O interrupt assignment (type 3) or local interrupt assignment
/// (type 4) entry: type, interrupt type, flags, source bus, source IRQ,
/// destination (IOAPIC or local APIC) ID, destination pin.
fn interrupt_entry(
    entry_type: u8,
    irq_type: u8,
    src_irq: u8,
    dest_id: u8,
    dest_pin: u8,
) -> [u8; IOINT_SIZE] {
    let mut e = [0u8; IOINT_SIZE];
    le::put(&mut e, 0, &[entry_type, irq_type]);
    le::put(&mut e, 2, &MP_IRQ_CONFORMING.to_le_bytes());
    le::put(&mut e, 4, &[0, src_irq, dest_id, dest_pin]);
    e
}

/// Builds the table for `num_cpus` (1..=254) CPUs; exactly
/// [`mptable_size`] bytes.
fn build_mptable(num_cpus: u8) -> Vec<u8> {
    let ioapic_id = num_cpus;
    let mut entries = Vec::with_capacity(mptable_size(num_cpus) - MPF_SIZE - HEADER_SIZE);
    for apic_id in 0..num_cpus {
        entries.extend_from_slice(&processor_entry(apic_id));
    }
    entries.extend_from_slice(&bus_entry());
    entries.extend_from_slice(&ioapic_entry(ioapic_id));
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&interrupt_entry(MP_INTSRC, MP_INT, irq, ioapic_id, irq));
    }
    entries.extend_from_slice(&interrupt_entry(
        MP_LINTSRC,
        MP_EXTINT,
        0,
        ALL_LOCAL_APICS,
        0,
    ));
    entries.extend_from_slice(&interrupt_entry(MP_LINTSRC, MP_NMI, 0, ALL_LOCAL_APICS, 1));
    // num_cpus + 1 bus + 1 IOAPIC + 16 + 2: at most 274.
    let entry_count = u16::from(num_cpus) + 2 + u16::from(ISA_IRQS) + 2;
    // At most 44 + 254 * 20 + 160: fits in u16.
    let base_length = (HEADER_SIZE + entries.len()) as u16;

    let mut header = [0u8; HEADER_SIZE];
    le::put(&mut header, 0, MPC_SIGNATURE);
    le::put(&mut header, 4, &base_length.to_le_bytes());
    le::put(&mut header, 6, &[SPEC_REV]);
    // 7: checksum, below.
    le::put(&mut header, 8, OEM_ID);
    le::put(&mut header, 16, PRODUCT_ID);
    // 28: OEM table pointer (u32) and 32: OEM table size (u16), none.
    le::put(&mut header, 34, &entry_count.to_le_bytes());
    le::put(&mut header, 36, &APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    // 40: extended table length (u16), 42: its checksum, 43: reserved.
    let sum = le::checksum(&header).wrapping_add(le::checksum(&entries));
    le::put(&mut header, 7, &[sum]);

    let mut mpf = [0u8; MPF_SIZE];
    le::put(&mut mpf, 0, MPF_SIGNATURE);
    // Asserted above to fit in 32 bits.
    let table_addr = (MPTABLE_START + MPF_SIZE as u64) as u32;
    le::put(&mut mpf, 4, &table_addr.to_le_bytes());
    // Length in 16-byte units, and the spec revision.
    le::put(&mut mpf, 8, &[1, SPEC_REV]);
    // 10: checksum; 11..16: feature bytes 1-5, all 0 (a configuration table
    // is present; no IMCR, virtual wire mode).
    let sum = le::checksum(&mpf);
    le::put(&mut mpf, 10, &[sum]);

    let mut table = Vec::with_capacity(mptable_size(num_cpus));
    table.extend_from_slice(&mpf);
    table.extend_from_slice(&header);
    table.extend_from_slice(&entries);
    table
}

/// Writes an MP table for `num_cpus` vCPUs at [`MPTABLE_START`].
///
/// CPU `i` gets local APIC ID `i`; CPU 0 is the bootstrap processor. The
/// IOAPIC gets ID `num_cpus`, version [`IOAPIC_VERSION`], at
/// [`IO_APIC_DEFAULT_PHYS_BASE`]. ISA IRQs 0-15 go to IOAPIC pins 0-15 (see
/// the [module documentation](self) for why IRQ 0 is on pin 0), ExtINT to
/// LINT0 and NMI to LINT1 of every local APIC. Every structure's bytes sum to
/// 0 mod 256.
///
/// The table is [`mptable_size`]`(num_cpus)` bytes, inside
/// `[EBDA_START, HIMEM_START)`, which the e820 map reports reserved. Its size
/// and place are checked before anything is written.
///
/// # Errors
///
/// [`MpTableError::NoCpus`] for 0 CPUs, [`MpTableError::TooManyCpus`] for more
/// than [`MPTABLE_MAX_CPUS`], or [`MpTableError::Memory`] if the table does not
/// fit in guest memory or a write fails.
///
/// # Example
///
/// ```
/// use ember_arch::layout::MPTABLE_START;
/// use ember_firmware::mptable::setup_mptable;
/// use ember_firmware::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
/// setup_mptable(&mem, 4)?;
/// let mut signature = [0u8; 4];
/// mem.read_slice(&mut signature, GuestAddress(MPTABLE_START)).unwrap();
/// assert_eq!(&signature, b"_MP_");
/// assert!(setup_mptable(&mem, 0).is_err());
/// # Ok::<(), ember_firmware::mptable::MpTableError>(())
/// ```
pub fn setup_mptable<M: GuestMemory>(mem: &M, num_cpus: u8) -> Result<(), MpTableError> {
    if num_cpus == 0 {
        return Err(MpTableError::NoCpus);
    }
    if num_cpus > MPTABLE_MAX_CPUS {
        return Err(MpTableError::TooManyCpus {
            num_cpus,
            max: MPTABLE_MAX_CPUS,
        });
    }
    let end = MPTABLE_START + mptable_size(num_cpus) as u64;
    if end > HIMEM_START {
        return Err(MpTableError::TooLarge {
            end,
            limit: HIMEM_START,
        });
    }
    let table = build_mptable(num_cpus);
    // Checks the whole range before writing any of it.
    write_bytes(mem, "MP table", &table, MPTABLE_START)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{filled_mem, read};
    use ember_arch::layout::EBDA_START;
    use ember_boot::e820::{e820_map, E820_RESERVED};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// Parses the table back from guest memory, checking both checksums,
    /// and returns the configuration table's entries.
    fn parse_back(mem: &GuestMemoryMmap<()>) -> Vec<Vec<u8>> {
        let mpf = read(mem, MPTABLE_START, 16);
        assert_eq!(&mpf[..4], b"_MP_");
        assert_eq!(sum(&mpf), 0, "floating pointer checksum");
        assert_eq!((mpf[8], mpf[9]), (1, 4), "length and spec revision");
        assert_eq!(&mpf[11..], [0; 5], "feature bytes");
        let table_addr = u64::from(u32_at(&mpf, 4));
        assert_eq!(table_addr, MPTABLE_START + 16);

        let header = read(mem, table_addr, 44);
        assert_eq!(&header[..4], b"PCMP");
        assert_eq!(header[6], 4);
        assert_eq!(&header[8..16], b"EMBER   ");
        assert_eq!(u32_at(&header, 36), 0xfee0_0000);
        assert_eq!(u16_at(&header, 40), 0, "no extended table");
        let length = usize::from(u16_at(&header, 4));
        let table = read(mem, table_addr, length);
        assert_eq!(sum(&table), 0, "configuration table checksum");

        let mut entries = Vec::new();
        let mut off = 44;
        while off < length {
            let size = match table[off] {
                0 => 20,
                1..=4 => 8,
                t => panic!("unknown entry type {t}"),
            };
            entries.push(table[off..off + size].to_vec());
            off += size;
        }
        assert_eq!(off, length);
        assert_eq!(usize::from(u16_at(&header, 34)), entries.len());
        entries
    }

    fn check_table(num_cpus: u8) {
        let mem = filled_mem(2 << 20, 0xcc);
        setup_mptable(&mem, num_cpus).unwrap();
        let n = usize::from(num_cpus);
        let entries = parse_back(&mem);
        assert_eq!(entries.len(), n + 20);

        let of_type = |t: u8| entries.iter().filter(move |e| e[0] == t);
        let cpus: Vec<_> = of_type(0).collect();
        assert_eq!(cpus.len(), n);
        for (i, cpu) in cpus.iter().enumerate() {
            assert_eq!(usize::from(cpu[1]), i, "APIC ID");
            assert_eq!(cpu[2], 0x14);
            assert_eq!(cpu[3] & 1, 1, "enabled");
            assert_eq!(cpu[3] & 2 != 0, i == 0, "BSP flag only on CPU 0");
            assert_eq!(u32_at(cpu, 4), 0x600);
            assert_eq!(u32_at(cpu, 8), 0x201);
        }

        let buses: Vec<_> = of_type(1).collect();
        assert_eq!(buses.len(), 1);
        assert_eq!(buses[0][1], 0);
        assert_eq!(&buses[0][2..8], b"ISA   ");

        let ioapics: Vec<_> = of_type(2).collect();
        assert_eq!(ioapics.len(), 1);
        let ioapic = ioapics[0];
        assert_eq!((ioapic[1], ioapic[2], ioapic[3]), (num_cpus, 0x11, 1));
        assert_eq!(u32_at(ioapic, 4), 0xfec0_0000);

        let ints: Vec<_> = of_type(3).collect();
        assert_eq!(ints.len(), 16);
        for (i, int) in ints.iter().enumerate() {
            assert_eq!(int[1], 0, "INT");
            assert_eq!(u16_at(int, 2), 0, "conforming");
            assert_eq!(int[4], 0, "source bus ISA");
            assert_eq!(usize::from(int[5]), i, "source IRQ");
            assert_eq!(int[6], num_cpus, "destination IOAPIC");
            assert_eq!(usize::from(int[7]), i, "destination pin");
        }

        let lints: Vec<_> = of_type(4).collect();
        assert_eq!(lints.len(), 2);
        assert_eq!((lints[0][1], lints[0][6], lints[0][7]), (3, 0xff, 0)); // ExtINT → LINT0
        assert_eq!((lints[1][1], lints[1][6], lints[1][7]), (1, 0xff, 1)); // NMI → LINT1

        // Entry order: processors, bus, IOAPIC, I/O interrupts, local interrupts.
        let types: Vec<u8> = entries.iter().map(|e| e[0]).collect();
        let mut sorted = types.clone();
        sorted.sort_unstable();
        assert_eq!(types, sorted);

        // Nothing written past the table.
        let end = MPTABLE_START + mptable_size(num_cpus) as u64;
        assert_eq!(read(&mem, end, 1), [0xcc]);
        assert_eq!(read(&mem, MPTABLE_START - 1, 1), [0xcc]);
    }

    #[test]
    fn one_cpu() {
        check_table(1);
    }

    #[test]
    fn two_cpus() {
        check_table(2);
    }

    #[test]
    fn max_cpus() {
        check_table(254);
        let end = MPTABLE_START + mptable_size(254) as u64;
        assert!(end > 0xa_0000 && end <= HIMEM_START);
    }

    #[test]
    fn table_lies_in_reserved_e820_range() {
        let mem = filled_mem(2 << 20, 0);
        let reserved = e820_map(&mem)
            .unwrap()
            .into_iter()
            .find(|e| e.kind == E820_RESERVED)
            .unwrap();
        assert_eq!(reserved.addr, EBDA_START);
        assert!(MPTABLE_START + mptable_size(254) as u64 <= reserved.addr + reserved.size);
    }

    #[test]
    fn zero_and_too_many_cpus_rejected() {
        let mem = filled_mem(2 << 20, 0xcc);
        assert!(matches!(setup_mptable(&mem, 0), Err(MpTableError::NoCpus)));
        let err = setup_mptable(&mem, 255).unwrap_err();
        assert!(matches!(
            err,
            MpTableError::TooManyCpus {
                num_cpus: 255,
                max: 254
            }
        ));
        assert!(err.to_string().contains("255"));
        assert!(read(&mem, MPTABLE_START, 0x2000).iter().all(|&b| b == 0xcc));
    }

    #[test]
    fn guest_memory_too_small() {
        let size = mptable_size(4);
        // Memory ending one byte before the end of the table.
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(MPTABLE_START), size - 1)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 4),
            Err(MpTableError::Memory(GuestWriteError::OutsideGuestMemory {
                what: "MP table",
                addr: MPTABLE_START,
                len
            })) if len == size as u64
        ));
        assert!(read(&mem, MPTABLE_START, size - 1).iter().all(|&b| b == 0));
        // Exactly enough.
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(MPTABLE_START), size)]).unwrap();
        setup_mptable(&mem, 4).unwrap();
        // Low memory only up to the EBDA.
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), EBDA_START as usize)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 1),
            Err(MpTableError::Memory(
                GuestWriteError::OutsideGuestMemory { .. }
            ))
        ));
    }

    #[test]
    fn sizes() {
        assert_eq!(mptable_size(1), 240);
        assert_eq!(mptable_size(254), 220 + 254 * 20);
        for n in [1, 2, 100, 254] {
            assert_eq!(build_mptable(n).len(), mptable_size(n));
        }
    }
}

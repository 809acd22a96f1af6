//! The hand-made seed corpus: small, valid inputs for every target, from which the
//! fuzzer mutates its way into the interesting corners.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example write-seeds` writes them to
//! `fuzz/corpus/<target>/seed-<name>`; the crate's tests check that the committed files
//! are exactly what this module generates, and that each structure-aware seed decodes
//! back to the value it was encoded from.

use std::fmt::Debug;

use arbitrary::Arbitrary;
use ember_devices::ACPI_RESET_VALUE;
use ember_virtio::mmio::reg;
use ember_virtio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

use crate::common::{Addr, Chain, Desc};
use crate::targets::boot_tables::{Device, Shutdown, TablesInput};
use crate::targets::bus::{BusInput, BusOp};
use crate::targets::cmdline::{CmdlineInput, Part};
use crate::targets::i8042::{I8042Input, PortOp};
use crate::targets::initrd::{InitrdInput, Region};
use crate::targets::rate_limiter::{Bucket, LimiterInput, LimiterOp};
use crate::targets::serial::{SerialInput, SerialOp};
use crate::targets::virtio_blk::{BlkInput, BlkRequest, DwzSegment, Sector};
use crate::targets::virtio_mmio::{MmioInput, MmioOp};
use crate::targets::virtio_net::{NetInput, NetOp, RxEvent};
use crate::targets::virtio_queue::{QueueInput, QueueOp};
use crate::targets::virtio_rng::RngInput;
use crate::{decode, Encode};

/// One seed: target, file name (without the `seed-` prefix), bytes.
pub struct Seed {
    /// The target (corpus directory).
    pub target: &'static str,
    /// The file is `seed-<name>`.
    pub name: &'static str,
    /// The input.
    pub data: Vec<u8>,
}

/// Encodes `value`, checking that it decodes back to itself.
fn structured<T>(target: &'static str, name: &'static str, value: T) -> Seed
where
    T: Encode + for<'a> Arbitrary<'a> + PartialEq + Debug,
{
    let data = value.to_bytes();
    let back: T = decode(&data).expect("seed decodes");
    assert_eq!(back, value, "seed {target}/{name} does not round-trip");
    Seed { target, name, data }
}

fn raw(target: &'static str, name: &'static str, data: Vec<u8>) -> Seed {
    Seed { target, name, data }
}

// ---- virtio ----------------------------------------------------------------

fn r(offset: u32, len: u32) -> Desc {
    Desc::new(Addr::data(offset), len, false)
}

fn w(offset: u32, len: u32) -> Desc {
    Desc::new(Addr::data(offset), len, true)
}

fn indirect(descs: Vec<Desc>) -> Chain {
    Chain {
        delivery: 2,
        table: Addr::default(),
        descs,
    }
}

fn direct(descs: Vec<Desc>) -> Chain {
    Chain {
        delivery: 0,
        table: Addr::default(),
        descs,
    }
}

fn blk_request(req_type: u8, sector: u64, chain: Chain) -> BlkRequest {
    BlkRequest {
        req_type,
        sector: Sector {
            kind: 0,
            value: sector,
        },
        chain,
        ..Default::default()
    }
}

fn blk_seeds() -> Vec<Seed> {
    let read = blk_request(
        0,
        3,
        Chain::ring(vec![r(0, 16), w(0x1000, 1024), w(0x2000, 1)]),
    );
    let write = BlkRequest {
        data: vec![0xab; 8],
        ..blk_request(
            1,
            5,
            Chain::ring(vec![r(0, 16), r(0x1000, 512), w(0x2000, 1)]),
        )
    };
    let flush = blk_request(2, 0, Chain::ring(vec![r(0, 16), w(0x2000, 1)]));
    let get_id = blk_request(
        3,
        0,
        Chain::ring(vec![r(0, 16), w(0x1000, 20), w(0x2000, 1)]),
    );
    let discard = BlkRequest {
        segments: vec![DwzSegment {
            sector: Sector { kind: 0, value: 8 },
            num_sectors: 8,
            flags: 0,
        }],
        ..blk_request(4, 0, Chain::ring(vec![r(0, 32), w(0x2000, 1)]))
    };
    let write_zeroes = BlkRequest {
        segments: vec![DwzSegment {
            sector: Sector { kind: 0, value: 16 },
            num_sectors: 4,
            flags: 1,
        }],
        ..blk_request(
            5,
            0,
            Chain::ring(vec![r(0, 16), r(0x100, 16), w(0x2000, 1)]),
        )
    };
    let scattered = blk_request(
        0,
        1,
        indirect(vec![
            r(0, 8),
            r(0x10, 8),
            w(0x1000, 300),
            w(0x1400, 212),
            w(0x2000, 1),
        ]),
    );
    let input = |requests, config| BlkInput {
        config,
        // 5 % 5 = 0: one guest buffer per system call, the most calls.
        iov_batch: 5,
        size_sel: 4,
        requests,
    };
    vec![
        structured("virtio_blk", "read", input(vec![read.clone()], 0)),
        structured(
            "virtio_blk",
            "write-flush",
            input(vec![write.clone(), flush], 2),
        ),
        structured(
            "virtio_blk",
            "write-read-back",
            input(
                vec![
                    write,
                    blk_request(
                        0,
                        5,
                        indirect(vec![r(0, 16), w(0x3000, 100), w(0x3400, 412), w(0x3800, 1)]),
                    ),
                ],
                0,
            ),
        ),
        structured("virtio_blk", "get-id", input(vec![get_id], 0)),
        structured(
            "virtio_blk",
            "discard-write-zeroes",
            input(vec![discard, write_zeroes], 0b1110),
        ),
        structured("virtio_blk", "indirect-read", input(vec![scattered], 0)),
        structured("virtio_blk", "read-only-disk", input(vec![read], 1)),
    ]
}

fn net_seeds() -> Vec<Seed> {
    let tx = NetOp {
        kind: 0,
        frame_len: 60,
        chain: Chain::ring(vec![r(0, 12), r(0x100, 60)]),
        ..Default::default()
    };
    let post = NetOp {
        kind: 1,
        chain: Chain::ring(vec![w(0x1000, 1526)]),
        ..Default::default()
    };
    let receive = NetOp {
        kind: 2,
        events: vec![
            RxEvent {
                kind: 0,
                len: 72,
                flags: 0,
                gso: 0,
            },
            RxEvent {
                kind: 2,
                ..Default::default()
            },
        ],
        budget: 8,
        ..Default::default()
    };
    let input = |ops| NetInput {
        rx_size: 4,
        tx_size: 4,
        ops,
        ..Default::default()
    };
    vec![
        structured("virtio_net", "tx", input(vec![tx.clone()])),
        structured(
            "virtio_net",
            "rx",
            input(vec![post.clone(), receive.clone()]),
        ),
        structured("virtio_net", "tx-rx", input(vec![post, tx, receive])),
    ]
}

fn rng_seeds() -> Vec<Seed> {
    let input = |chains| RngInput {
        size_sel: 4,
        event_idx: false,
        chains,
    };
    vec![
        structured(
            "virtio_rng",
            "one",
            input(vec![Chain::ring(vec![w(0, 64)])]),
        ),
        structured(
            "virtio_rng",
            "mixed",
            input(vec![
                Chain::ring(vec![r(0, 8), w(0x100, 4096), w(0x2000, 100)]),
                indirect(vec![w(0x3000, 16), w(0x3100, 16)]),
                direct(vec![w(0x4000, 32)]),
            ]),
        ),
    ]
}

fn queue_seeds() -> Vec<Seed> {
    let op = |kind: u8, index: u16, value: u32| QueueOp {
        kind,
        index,
        value,
        ..Default::default()
    };
    let place = |chain: Chain| QueueOp {
        kind: 0,
        chain,
        ..Default::default()
    };
    vec![
        structured(
            "virtio_queue",
            "pop-complete",
            QueueInput {
                size_sel: 4,
                layout: 0,
                event_idx: false,
                ops: vec![
                    place(Chain::ring(vec![r(0, 16), w(0x100, 512), w(0x400, 1)])),
                    op(4, 0, 0),
                    op(8, 0, 0),
                    place(Chain::ring(vec![w(0x800, 64)])),
                    place(indirect(vec![r(0x900, 8), w(0xa00, 8)])),
                    op(5, 0, 16),
                ],
            },
        ),
        structured(
            "virtio_queue",
            "event-idx-rx",
            QueueInput {
                size_sel: 3,
                layout: 1,
                event_idx: true,
                ops: vec![
                    place(Chain::ring(vec![w(0x100, 1526)])),
                    place(Chain::ring(vec![w(0x1000, 1526)])),
                    op(10, 1, 0),
                    op(11, 0x0102, 100),
                    op(8, 0, 0),
                    op(9, 0, 0),
                    op(4, 0, 1),
                ],
            },
        ),
    ]
}

fn mmio_seeds() -> Vec<Seed> {
    let op = |kind: u8, value: u64| MmioOp {
        kind,
        value,
        ..Default::default()
    };
    let init = |queues: u64| {
        let mut ops = vec![op(7, u64::MAX)];
        for q in 0..queues {
            ops.push(op(8, q | (6 << 8)));
        }
        ops.extend([
            op(9, 0),
            op(14, 0),
            MmioOp {
                kind: 13,
                value: 1,
                chain: Chain::ring(vec![w(0, 64)]),
                ..Default::default()
            },
            op(11, 0),
            op(12, 1),
            op(15, 1),
            op(10, 0),
            op(14, 0),
        ]);
        ops
    };
    let raw_register_write = MmioOp {
        kind: 0,
        offset: (reg::QUEUE_NUM / 4) as u16,
        width: 0,
        value: 64,
        ..Default::default()
    };
    vec![
        structured(
            "virtio_mmio",
            "mock-init",
            MmioInput {
                device: 0,
                queues: [1, 6, 6, 6],
                features: VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 0xff,
                fail: 0,
                ops: init(2),
            },
        ),
        structured(
            "virtio_mmio",
            "mock-failing-activation",
            MmioInput {
                device: 0,
                queues: [0, 8, 0, 0],
                features: 0,
                fail: 1,
                ops: [init(1), vec![raw_register_write]].concat(),
            },
        ),
        structured(
            "virtio_mmio",
            "rng",
            MmioInput {
                device: 5,
                ops: init(1),
                ..Default::default()
            },
        ),
        structured(
            "virtio_mmio",
            "net",
            MmioInput {
                device: 6,
                ops: init(2),
                ..Default::default()
            },
        ),
        structured(
            "virtio_mmio",
            "blk",
            MmioInput {
                device: 7,
                ops: init(1),
                ..Default::default()
            },
        ),
    ]
}

// ---- buses and legacy devices -------------------------------------------------

fn bus_seeds() -> Vec<Seed> {
    let insert = |addr: u64, len: u64| BusOp {
        kind: 0,
        addr_kind: 0,
        addr,
        len_kind: 0,
        len,
        width: 0,
    };
    let access = |kind: u8, addr: u64, width: u8| BusOp {
        kind,
        addr_kind: 0,
        addr,
        len_kind: 0,
        len: 0,
        width,
    };
    let ops = vec![
        insert(0x10, 8),
        insert(0x18, 4),
        insert(0x14, 8),
        access(3, 0x12, 2),
        access(4, 0x1a, 1),
        access(3, 0x16, 2),
        access(3, 0x10, 3),
        access(5, 0x19, 0),
        BusOp {
            kind: 2,
            ..access(0, 0x10, 0)
        },
        access(4, 0x10, 0),
    ];
    vec![
        structured(
            "bus",
            "pio",
            BusInput {
                mmio: 0,
                ops: ops.clone(),
            },
        ),
        structured("bus", "mmio", BusInput { mmio: 1, ops }),
    ]
}

fn serial_seeds() -> Vec<Seed> {
    let write = |offset: u8, value: u8| SerialOp {
        kind: 0,
        offset,
        width: 1,
        value,
        input: Vec::new(),
    };
    let read = |offset: u8| SerialOp {
        kind: 2,
        offset,
        width: 1,
        value: 0,
        input: Vec::new(),
    };
    let ops = vec![
        write(3, 0x80), // DLAB
        write(0, 0x01), // divisor
        write(1, 0x00),
        write(3, 0x03), // 8N1
        write(2, 0xc7), // FIFO
        write(1, 0x03), // IER
        write(0, b'h'),
        write(0, b'i'),
        read(5),
        read(2),
        SerialOp {
            kind: 3,
            input: b"input".to_vec(),
            ..read(0)
        },
        read(0),
        write(4, 0x10), // loopback
        write(0, b'x'),
        read(0),
        read(6),
        write(7, 0x55),
        read(7),
    ];
    vec![
        structured(
            "serial",
            "session",
            SerialInput {
                output: 1,
                fail_every: 0,
                ops: ops.clone(),
            },
        ),
        structured(
            "serial",
            "failing-output",
            SerialInput {
                output: 0,
                fail_every: 1,
                ops,
            },
        ),
    ]
}

fn i8042_seeds() -> Vec<Seed> {
    // port % 4 == 0: 0x5e + port / 4 % 10; == 1: 0xf3 + port / 4 % 4;
    // == 2: 0x5fe + port / 4 % 4.
    let at = |sel: u16, offset: u16| sel + 4 * offset;
    let op = |kind: u8, port: u16, value: u8| PortOp {
        kind,
        port,
        width: 1,
        value,
    };
    // Port 0x60 (data) and 0x64 (command/status), port 0x600 (ACPI).
    let (data, cmd, acpi) = (at(0, 2), at(0, 6), at(2, 2));
    vec![
        structured(
            "i8042",
            "reset",
            I8042Input {
                ops: vec![
                    op(1, cmd, 0),
                    op(0, data, 0xfe),
                    op(0, cmd, 0xd1),
                    op(1, data, 0),
                    op(0, cmd, 0xfe),
                ],
            },
        ),
        structured(
            "i8042",
            "exit-and-boot-done",
            I8042Input {
                ops: vec![
                    op(0, at(1, 2), 123),
                    op(1, at(1, 1), 0),
                    op(0, at(1, 1), 7),
                    op(0, cmd, 0xfe),
                ],
            },
        ),
        // What Linux's i8042 driver sends while probing: two CTR reads, a CTR write,
        // the AUX loop and interface tests.
        structured(
            "i8042",
            "linux-probe",
            I8042Input {
                ops: vec![
                    op(1, cmd, 0),
                    op(0, cmd, 0x20),
                    op(1, cmd, 0),
                    op(1, data, 0),
                    op(0, cmd, 0x20),
                    op(1, data, 0),
                    op(0, cmd, 0x60),
                    op(0, data, 0x74),
                    op(0, cmd, 0xd3),
                    op(0, data, 0x5a),
                    op(1, cmd, 0),
                    op(0, cmd, 0xa9),
                    op(1, data, 0),
                    op(0, cmd, 0xa7),
                    op(0, cmd, 0xa8),
                    op(0, cmd, 0x20),
                    op(1, data, 0),
                    op(0, cmd, 0xaa),
                    op(1, data, 0),
                ],
            },
        ),
        // Linux's hardware-reduced power-off: clear WAK_STS, then S5 with SLP_EN.
        structured(
            "i8042",
            "acpi-power-off",
            I8042Input {
                ops: vec![
                    op(1, acpi, 0),
                    op(0, acpi, 0x80),
                    op(0, acpi, 0x14),
                    op(0, acpi, 0x34),
                    op(0, acpi, ACPI_RESET_VALUE),
                ],
            },
        ),
    ]
}

// ---- boot -------------------------------------------------------------------------

/// A program header of [`elf`].
struct Segment {
    p_type: u32,
    paddr: u64,
    data: Vec<u8>,
    memsz: u64,
    align: u64,
}

/// An x86-64 `ET_EXEC` ELF image with `segments` (file data right after the program
/// headers, in order).
fn elf(entry: u64, segments: &[Segment]) -> Vec<u8> {
    let phoff = 64u64;
    let mut offset = phoff + 56 * segments.len() as u64;
    let mut img = vec![0u8; 64];
    img[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
    img[16..18].copy_from_slice(&2u16.to_le_bytes());
    img[18..20].copy_from_slice(&62u16.to_le_bytes());
    img[20..24].copy_from_slice(&1u32.to_le_bytes());
    img[24..32].copy_from_slice(&entry.to_le_bytes());
    img[32..40].copy_from_slice(&phoff.to_le_bytes());
    img[52..54].copy_from_slice(&64u16.to_le_bytes());
    img[54..56].copy_from_slice(&56u16.to_le_bytes());
    img[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
    for s in segments {
        let mut ph = [0u8; 56];
        ph[0..4].copy_from_slice(&s.p_type.to_le_bytes());
        ph[4..8].copy_from_slice(&5u32.to_le_bytes());
        ph[8..16].copy_from_slice(&offset.to_le_bytes());
        ph[16..24].copy_from_slice(&(s.paddr | 0xffff_ffff_8000_0000).to_le_bytes());
        ph[24..32].copy_from_slice(&s.paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&(s.data.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&s.memsz.to_le_bytes());
        ph[48..56].copy_from_slice(&s.align.to_le_bytes());
        img.extend_from_slice(&ph);
        offset += s.data.len() as u64;
    }
    for s in segments {
        img.extend_from_slice(&s.data);
    }
    img
}

/// One ELF note padded to `align`.
fn note(name: &[u8], n_type: u32, desc: &[u8], align: usize) -> Vec<u8> {
    let pad = |v: &mut Vec<u8>| {
        while !v.len().is_multiple_of(align) {
            v.push(0);
        }
    };
    let mut n = Vec::new();
    n.extend_from_slice(&(name.len() as u32).to_le_bytes());
    n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    n.extend_from_slice(&n_type.to_le_bytes());
    n.extend_from_slice(name);
    pad(&mut n);
    n.extend_from_slice(desc);
    pad(&mut n);
    n
}

fn load(paddr: u64, data: Vec<u8>, memsz: u64) -> Segment {
    Segment {
        p_type: 1,
        paddr,
        data,
        memsz,
        align: 0x1000,
    }
}

fn notes(data: Vec<u8>, align: u64) -> Segment {
    Segment {
        p_type: 4,
        paddr: 0,
        data,
        memsz: 0,
        align,
    }
}

const CODE: [u8; 4] = [0xf4, 0xeb, 0xfd, 0x90]; // hlt; jmp $-1; nop

fn elf_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let pvh4 = [
        note(b"GNU\0", 3, &[1; 20], 4),
        note(b"Xen\0", 18, &0x10_0100u32.to_le_bytes(), 4),
    ]
    .concat();
    let pvh8 = [
        note(b"Linux\0", 6, b"6.1\0", 8),
        note(b"Xen\0", 18, &0x20_0000u64.to_le_bytes(), 8),
    ]
    .concat();
    vec![
        (
            "minimal",
            elf(0x10_0000, &[load(0x10_0000, CODE.to_vec(), 0x1000)]),
        ),
        (
            "pvh-note",
            elf(
                0x10_0000,
                &[load(0x10_0000, [CODE; 64].concat(), 0x2000), notes(pvh4, 4)],
            ),
        ),
        (
            "two-segments-pvh8",
            elf(
                0x10_0000,
                &[
                    load(0x10_0000, CODE.to_vec(), 0x1000),
                    load(0x20_0000, vec![0x90; 64], 0x1_0000),
                    notes(pvh8, 8),
                ],
            ),
        ),
        (
            "high-segment",
            elf(0x40_0000, &[load(0x40_0000, CODE.to_vec(), 0x8_0000)]),
        ),
    ]
}

/// A bzImage: protocol 2.15, 64-bit entry, `setup_sects` 4, a kernel of `kernel_len`
/// bytes, `init_size`, and (if `relocatable`) 2 MiB alignment and preferred address.
fn bzimage(kernel_len: usize, init_size: u32, relocatable: bool) -> Vec<u8> {
    let mut img = vec![0u8; 5 * 512];
    img[0x1f1] = 4;
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x200..0x202].copy_from_slice(&[0xeb, 0x6a]); // header ends at 0x26c
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1; // LOADED_HIGH
    img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
    img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
    img[0x234] = u8::from(relocatable);
    img[0x236..0x238].copy_from_slice(&if relocatable { 3u16 } else { 1 }.to_le_bytes());
    img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    let pref = if relocatable { 0x20_0000u64 } else { 0x10_0000 };
    img[0x258..0x260].copy_from_slice(&pref.to_le_bytes());
    img[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
    img.extend((0..kernel_len).map(|i| i as u8));
    img
}

fn boot_seeds() -> Vec<Seed> {
    let mut seeds = Vec::new();
    for (name, image) in elf_seeds() {
        seeds.push(raw("boot_elf", name, image.clone()));
        if name != "minimal" && name != "high-segment" {
            seeds.push(raw("boot_pvh", name, image));
        }
    }
    seeds.push(raw("boot_pvh", "no-note", elf_seeds()[0].1.clone()));
    seeds.push(raw(
        "boot_bzimage",
        "relocatable",
        bzimage(0x400, 0x10_0000, true),
    ));
    seeds.push(raw("boot_bzimage", "fixed", bzimage(0x800, 0x4000, false)));

    let part = |s: &str| Part {
        printable: false,
        bytes: s.as_bytes().to_vec(),
    };
    seeds.push(structured(
        "cmdline",
        "linux",
        CmdlineInput {
            capacity_kind: 0,
            capacity: 0,
            parts: vec![part("console=ttyS0"), part("reboot=k panic=1"), part("")],
            addr: 0,
            boot: 1,
            initrd: None,
            rsdp: Some(0xe_0000),
        },
    ));
    let mut initrd = [0u8; 16];
    initrd[..8].copy_from_slice(&0x10_0000u64.to_le_bytes());
    initrd[8..].copy_from_slice(&0x1000u64.to_le_bytes());
    seeds.push(structured(
        "cmdline",
        "pvh-small-capacity",
        CmdlineInput {
            capacity_kind: 2,
            capacity: 30,
            parts: vec![
                part("root=/dev/vda"),
                part("rw"),
                part("quiet\tsplash"),
                Part {
                    printable: true,
                    bytes: vec![0, 1, 2, 200],
                },
            ],
            addr: 1,
            boot: 2,
            initrd: Some(initrd),
            rsdp: None,
        },
    ));
    seeds.push(structured(
        "initrd",
        "two-regions",
        InitrdInput {
            regions: vec![
                Region {
                    gap: 0,
                    pages: 511,
                    tail: 0,
                },
                Region {
                    gap: 0x100,
                    pages: 255,
                    tail: 0x10,
                },
            ],
            size_kind: 0,
            size: 0x1800,
            lowest_kind: 1,
            lowest: 0x10_0000,
            max_kind: 0,
            addr_max: 0,
            zero_page: 0x7000,
            op: 1,
        },
    ));
    seeds.push(structured(
        "initrd",
        "above-4g-copy",
        InitrdInput {
            regions: vec![
                Region {
                    gap: 0,
                    pages: 300,
                    tail: 0,
                },
                Region {
                    gap: 0x8000,
                    pages: 100,
                    tail: 0,
                },
            ],
            size_kind: 0,
            size: 0x3000,
            lowest_kind: 0,
            lowest: 0,
            max_kind: 0,
            addr_max: 0,
            zero_page: 0,
            op: 2,
        },
    ));
    seeds.push(structured(
        "initrd",
        "e820",
        InitrdInput {
            regions: vec![
                Region {
                    gap: 0,
                    pages: 511,
                    tail: 0,
                },
                Region {
                    gap: 0,
                    pages: 100,
                    tail: 0,
                },
                Region {
                    gap: 0x8000,
                    pages: 10,
                    tail: 0,
                },
            ],
            op: 3,
            ..Default::default()
        },
    ));
    seeds.push(structured(
        "boot_tables",
        "two-cpus-devices",
        TablesInput {
            num_cpus: 2,
            memory: 0,
            shutdown: Some(Shutdown {
                port: 0x600,
                s5_sleep_type: 5,
                reset_value: ACPI_RESET_VALUE,
            }),
            devices: vec![
                Device {
                    kind: 0,
                    addr: 0,
                    len: 0x1000,
                    gsi: 5,
                },
                Device {
                    kind: 2,
                    ..Default::default()
                },
                Device {
                    kind: 1,
                    addr: 1,
                    len: 0x200,
                    gsi: 6,
                },
            ],
        },
    ));
    seeds.push(structured(
        "boot_tables",
        "many-cpus",
        TablesInput {
            num_cpus: 64,
            memory: 0,
            shutdown: None,
            devices: Vec::new(),
        },
    ));
    seeds
}

// ---- rate limiter ----------------------------------------------------------

fn rate_limiter_seeds() -> Vec<Seed> {
    let op = |kind, bytes, tokens| LimiterOp {
        kind,
        bytes,
        tokens,
    };
    vec![
        // 1 MiB/s with a 512 KiB burst, 1000 ops/s: a guest's 64 KiB requests until
        // refused, then the timer.
        structured(
            "rate_limiter",
            "disk",
            LimiterInput {
                bandwidth: Bucket {
                    present: true,
                    size: 262_144,
                    one_time_burst: 524_288,
                    refill_time_ms: 250,
                },
                ops: Bucket {
                    present: true,
                    size: 100,
                    one_time_burst: 0,
                    refill_time_ms: 100,
                },
                steps: (0..14)
                    .flat_map(|_| [op(0, true, 65_536), op(0, false, 1)])
                    .chain([op(4, true, 0), op(3, true, 0), op(2, true, 4096)])
                    .collect(),
            },
        ),
        // Charged after the work: a frame larger than the bucket, then debt.
        structured(
            "rate_limiter",
            "net-debt",
            LimiterInput {
                bandwidth: Bucket {
                    present: true,
                    size: 1500,
                    one_time_burst: 0,
                    refill_time_ms: 1,
                },
                ops: Bucket::default(),
                steps: vec![
                    op(1, true, 65_550),
                    op(4, true, 0),
                    op(0, true, 64),
                    op(1, true, u64::MAX),
                    op(3, true, 0),
                ],
            },
        ),
    ]
}

// ---- snapshot state --------------------------------------------------------

/// Real states: built with the crates' types, devices saved by the devices.
mod snapshot {
    use std::sync::Arc;

    use ember_bus::BusDevice;
    use ember_devices::{ExitSignal, I8042State, SerialState, I8042};
    use ember_vcpu::state::{SyscallTrapArmed, SyscallTrapVcpuState, VcpuState, XsaveState};
    use ember_virtio::mmio::{reg, MmioTransport};
    use ember_virtio::vm_memory::{GuestAddress, GuestMemoryMmap};
    use ember_virtio::vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    use ember_virtio::{ActivateDevice, MmioTransportState};
    use ember_vm::VmState;
    use kvm_bindings::{
        kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state,
        kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events,
        kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
    };

    use super::{raw, Seed};
    use crate::targets::snapshot_state::{
        harness_net, harness_rng, FuzzState, MEMORY_SIZE as SNAPSHOT_MEMORY,
        VERSION as SNAPSHOT_VERSION,
    };

    fn vcpu_state(index: u8) -> VcpuState {
        let regs = kvm_regs {
            rip: 0xffff_ffff_8100_0000,
            rsp: 0xffff_c900_0000_3f00,
            rflags: 0x246,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cr0: 0x8005_0033,
            cr4: 0x3406f0,
            efer: 0xd01,
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        sregs.cs.selector = 0x10;
        sregs.cs.l = 1;
        let mut lapic = kvm_lapic_state::default();
        // APIC ID, spurious vector 0xff with the APIC enabled (`regs` is `c_char`).
        for (offset, value) in [(0x23, index), (0xf0, 0xff), (0xf1, 0x01)] {
            lapic.regs[offset] = value as _;
        }
        let msrs = Msrs::from_entries(&[
            kvm_msr_entry {
                index: 0x10, // TSC
                data: 0x1234_5678,
                ..Default::default()
            },
            kvm_msr_entry {
                index: 0xc000_0080, // EFER
                data: 0xd01,
                ..Default::default()
            },
        ])
        .expect("MSR list");
        let cpuid = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0xd,
                ebx: 0x756e_6547,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806f8,
                ebx: u32::from(index) << 24,
                ..Default::default()
            },
        ])
        .expect("CPUID list");
        let mut xsave = kvm_xsave::default();
        xsave.region[0] = 0x037f; // FCW
        xsave.region[6] = 0x1f80; // MXCSR
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].value = 0x7; // x87, SSE, AVX
        VcpuState {
            index: u32::from(index),
            cpuid,
            msrs,
            regs,
            sregs,
            xsave: XsaveState(xsave),
            xcrs,
            lapic: Some(lapic),
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state {
                mp_state: if index == 0 { 0 } else { 3 }, // RUNNABLE, HALTED
            },
            debugregs: kvm_debugregs {
                dr6: 0xffff_0ff0,
                dr7: 0x400,
                ..Default::default()
            },
            tsc_khz: Some(2_000_000),
            syscall_trap: (index == 0).then_some(SyscallTrapVcpuState {
                guest_lstar: 0xffff_ffff_8160_0000,
                armed: Some(SyscallTrapArmed {
                    lstar: 0xffff_ffff_8160_0000,
                    star: 0x0023_0010_0000_0000,
                }),
            }),
        }
    }

    fn vm_state() -> VmState {
        let chip = |chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        let mut pit = kvm_pit_state2::default();
        for channel in &mut pit.channels {
            channel.count = 0x1_0000;
            channel.rw_mode = 3;
            channel.mode = 3;
        }
        pit.channels[0].gate = 1;
        VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER),
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE),
            ioapic: chip(KVM_IRQCHIP_IOAPIC),
            pit,
            clock: kvm_clock_data {
                clock: 1_234_567_890,
                ..Default::default()
            },
        }
    }

    type SnapshotMem = Arc<GuestMemoryMmap>;

    /// A transport as `restore_state` finds it: built on the device the harness builds.
    fn transport(device: Box<dyn ActivateDevice<SnapshotMem>>) -> MmioTransport<SnapshotMem> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), SNAPSHOT_MEMORY)])
            .expect("guest memory");
        MmioTransport::new(
            device,
            Arc::new(mem),
            EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        )
        .expect("transport")
    }

    fn mmio_write(t: &MmioTransport<SnapshotMem>, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// A driver's set-up up to FEATURES_OK: every feature the device offers.
    fn negotiate(t: &MmioTransport<SnapshotMem>) {
        use ember_virtio::mmio::status::{ACKNOWLEDGE, DRIVER, FEATURES_OK};
        mmio_write(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        let features = t.offered_features();
        for sel in 0..2 {
            mmio_write(t, reg::DRIVER_FEATURES_SEL, sel);
            mmio_write(t, reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        mmio_write(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    /// The saved state of a virtio-rng the driver activated (rings of 64 entries at 4, 8
    /// and 12 KiB, inside the harness's memory), then paused: a real running device's state.
    fn activated_rng_state() -> MmioTransportState {
        use ember_virtio::mmio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
        let t = transport(Box::new(harness_rng()));
        negotiate(&t);
        mmio_write(&t, reg::QUEUE_SEL, 0);
        mmio_write(&t, reg::QUEUE_NUM, 64);
        mmio_write(&t, reg::QUEUE_DESC_LOW, 0x1000);
        mmio_write(&t, reg::QUEUE_DRIVER_LOW, 0x2000);
        mmio_write(&t, reg::QUEUE_DEVICE_LOW, 0x3000);
        mmio_write(&t, reg::QUEUE_READY, 1);
        mmio_write(
            &t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.is_activated(), "the seed's rng activates");
        t.pause().expect("pause");
        let state = t.save_state().expect("save");
        assert!(state.activated && state.queues[0].active.is_some());
        state
    }

    /// A virtio-net the driver negotiated features with and set one queue's size on.
    fn negotiated_net_state() -> MmioTransportState {
        let t = transport(Box::new(harness_net()));
        negotiate(&t);
        mmio_write(&t, reg::QUEUE_SEL, 1);
        mmio_write(&t, reg::QUEUE_NUM, 128);
        t.save_state().expect("save")
    }

    pub(super) fn snapshot_seeds() -> Vec<Seed> {
        let fresh_rng = transport(Box::new(harness_rng())).save_state().expect("save");
        let one = FuzzState {
            vm: vm_state(),
            vcpus: vec![vcpu_state(0)],
            serial: SerialState::default(),
            i8042: I8042::new(Arc::new(ExitSignal::new().expect("exit signal")))
                .expect("i8042")
                .save_state(),
            virtio: vec![fresh_rng],
        };
        let two = FuzzState {
            vm: vm_state(),
            vcpus: vec![vcpu_state(0), vcpu_state(1)],
            serial: SerialState {
                line_control: 0x03,
                interrupt_enable: 0x01,
                line_status: 0x61,
                in_buffer: b"ls\n".to_vec(),
                ..SerialState::default()
            },
            i8042: I8042State {
                ctr: 0x65,
                output_port: 0x03,
                output: vec![0x1d, 0x38, 0xe0, 0x53],
                pending_command: Some(0x60),
                last_was_command: true,
            },
            virtio: vec![activated_rng_state(), negotiated_net_state()],
        };
        // The devices alone: no vCPU, so that mutations land on the device states.
        let devices = FuzzState {
            vcpus: Vec::new(),
            ..two.clone()
        };
        let file =
            |state: &FuzzState| ember_snapshot::encode(SNAPSHOT_VERSION, state).expect("encode");
        let payload = |state: &FuzzState| {
            let file = file(state);
            ember_snapshot::unframe(&file, SNAPSHOT_VERSION)
                .expect("unframe")
                .to_vec()
        };
        // Both kinds decode: a whole state file through the first pass of the harness, a
        // bare payload through the second.
        for state in [&one, &two, &devices] {
            let back: FuzzState =
                ember_snapshot::decode(&file(state), SNAPSHOT_VERSION).expect("seed decodes");
            assert_eq!(&back, state);
        }
        vec![
            raw("snapshot_state", "file-one-vcpu", file(&one)),
            raw("snapshot_state", "file-two-vcpus-devices", file(&two)),
            raw("snapshot_state", "payload-one-vcpu", payload(&one)),
            raw("snapshot_state", "payload-two-vcpus-devices", payload(&two)),
            raw(
                "snapshot_state",
                "payload-devices-activated-rng",
                payload(&devices),
            ),
        ]
    }
}
use snapshot::snapshot_seeds;

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    seeds.extend(queue_seeds());
    seeds.extend(blk_seeds());
    seeds.extend(net_seeds());
    seeds.extend(rng_seeds());
    seeds.extend(mmio_seeds());
    seeds.extend(bus_seeds());
    seeds.extend(serial_seeds());
    seeds.extend(i8042_seeds());
    seeds.extend(boot_seeds());
    seeds.extend(rate_limiter_seeds());
    seeds.extend(snapshot_seeds());
    seeds
}

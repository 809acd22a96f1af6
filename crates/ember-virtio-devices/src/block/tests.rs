use std::io::Write;
use std::os::unix::fs::FileExt;

use ember_virtio::InterruptKind;
use tempfile::NamedTempFile;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::*;
use crate::testutil::*;

const SECTORS: u64 = 64;
const HDR: u64 = 0x20_0000;
const BUF: u64 = 0x30_0000;
const STATUS: u64 = 0x40_0000;
const ALL: u64 = VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;

/// A temp image of `SECTORS` sectors where byte i is (i / 512) as u8 ^ (i as u8).
fn image() -> NamedTempFile {
    let mut f = NamedTempFile::new().unwrap();
    let data: Vec<u8> = (0..SECTORS * 512)
        .map(|i| ((i / 512) as u8) ^ (i as u8))
        .collect();
    f.write_all(&data).unwrap();
    f.flush().unwrap();
    f
}

fn open(f: &NamedTempFile, read_only: bool) -> Disk {
    Disk::open(f.path(), BlockOptions { read_only }).unwrap()
}

fn expected(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|i| ((i / 512) as u8) ^ (i as u8))
        .collect()
}

fn header(m: &GuestMemoryMmap, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    fill(m, HDR, &h);
}

fn r(addr: u64, len: u32) -> Descriptor {
    Descriptor::new(addr, len, 0, 0)
}

fn w(addr: u64, len: u32) -> Descriptor {
    Descriptor::new(addr, len, WRITE, 0)
}

fn run(disk: &Disk, m: &GuestMemoryMmap, descs: Vec<Descriptor>, features: u64) -> Completion {
    // Two guest buffers per system call, so multi-buffer requests take several.
    let mut buffers = RequestBuffers::with_iovec_batch(2);
    fill(m, STATUS, &[0xee]);
    process_request(disk, m, descs, features, &mut buffers)
}

fn status(m: &GuestMemoryMmap) -> u8 {
    read(m, STATUS, 1)[0]
}

fn ok(used_len: u32) -> Completion {
    Completion {
        used_len,
        status: Some(VIRTIO_BLK_S_OK),
    }
}

const IOERR: Completion = Completion {
    used_len: 1,
    status: Some(VIRTIO_BLK_S_IOERR),
};
const UNSUPP: Completion = Completion {
    used_len: 1,
    status: Some(VIRTIO_BLK_S_UNSUPP),
};

#[test]
fn open_errors_say_which() {
    let err = Disk::open("/nonexistent/ember.img", BlockOptions::default()).unwrap_err();
    assert!(
        matches!(err, VirtioDeviceError::DiskImage { op: "open", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("/nonexistent/ember.img"));
    let mut f = NamedTempFile::new().unwrap();
    f.write_all(&[0u8; 1000]).unwrap();
    let err = Block::new(f.path(), BlockOptions::default()).unwrap_err();
    assert!(
        matches!(err, VirtioDeviceError::DiskSize { size: 1000, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("not a multiple of 512"));
}

#[test]
fn features_and_config() {
    let f = image();
    let dev = Block::from_disk(open(&f, false));
    let feats = dev.device_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
    ] {
        assert_ne!(feats & bit, 0, "{bit:#x}");
    }
    assert_eq!(feats & VIRTIO_BLK_F_RO, 0);
    assert_eq!(
        feats & VIRTIO_BLK_F_DISCARD != 0,
        dev.disk().supports_discard()
    );
    assert_eq!(dev.device_type(), device_type::BLOCK);
    assert_eq!(dev.queue_max_sizes(), &[256]);

    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    let mut v = [0u8; 4];
    dev.read_config(12, &mut v);
    assert_eq!(u32::from_le_bytes(v), SEG_MAX);
    dev.read_config(20, &mut v);
    assert_eq!(u32::from_le_bytes(v), 512);
    if dev.disk().supports_discard() {
        dev.read_config(40, &mut v);
        assert_eq!(u32::from_le_bytes(v), MAX_DWZ_SEGMENTS);
    }
    // Odd offsets and widths, and reads off the end.
    let mut b = [0u8; 1];
    dev.read_config(0, &mut b);
    assert_eq!(b[0], SECTORS as u8);
    let mut tail = [0xaau8; 8];
    dev.read_config(CONFIG_SIZE as u64 - 2, &mut tail);
    assert_eq!(tail[2..], [0xaa; 6]);
    let mut out = [0xaau8; 4];
    dev.read_config(0x1000, &mut out);
    dev.read_config(u64::MAX, &mut out);
    assert_eq!(out, [0xaa; 4]);

    let mut dev = dev;
    dev.write_config(0, &[0xff; 8]);
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);

    // The read-write open's lock must go before the image can be opened read-only.
    drop(dev);
    let ro = Block::new(f.path(), BlockOptions { read_only: true }).unwrap();
    let feats = ro.device_features();
    assert_ne!(feats & VIRTIO_BLK_F_RO, 0);
    assert_eq!(
        feats & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES),
        0
    );
}

#[test]
fn in_out_round_trip() {
    let f = image();
    let disk = open(&f, false);
    let m = mem();

    // Read sectors 3..5 into two buffers split at an odd place.
    header(&m, VIRTIO_BLK_T_IN, 3);
    let c = run(
        &disk,
        &m,
        vec![r(HDR, 16), w(BUF, 700), w(BUF + 0x1000, 324), w(STATUS, 1)],
        ALL,
    );
    assert_eq!(c, ok(1025));
    assert_eq!(status(&m), VIRTIO_BLK_S_OK);
    let mut got = read(&m, BUF, 700);
    got.extend(read(&m, BUF + 0x1000, 324));
    assert_eq!(got, expected(3 * 512, 1024));

    // Header and status may share descriptors with data: one readable and one writable
    // descriptor carrying data + status.
    header(&m, VIRTIO_BLK_T_IN, 0);
    let c = run(&disk, &m, vec![r(HDR, 16), w(BUF, 513)], ALL);
    assert_eq!(c, ok(513));
    assert_eq!(read(&m, BUF, 512), expected(0, 512));
    assert_eq!(read(&m, BUF + 512, 1)[0], VIRTIO_BLK_S_OK);

    // Write sector 10..12 from a buffer that follows the header in the same descriptor.
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    header(&m, VIRTIO_BLK_T_OUT, 10);
    fill(&m, HDR + 16, &data);
    let c = run(&disk, &m, vec![r(HDR, 16 + 1024), w(STATUS, 1)], ALL);
    assert_eq!(c, ok(1));
    let mut on_disk = vec![0u8; 1024];
    f.as_file().read_exact_at(&mut on_disk, 10 * 512).unwrap();
    assert_eq!(on_disk, data);

    // ...and read it back through the device.
    header(&m, VIRTIO_BLK_T_IN, 10);
    let c = run(&disk, &m, vec![r(HDR, 16), w(BUF, 1024), w(STATUS, 1)], 0);
    assert_eq!(c, ok(1025));
    assert_eq!(read(&m, BUF, 1024), data);

    // The last sector exactly, and zero-length reads at the end, are fine.
    header(&m, VIRTIO_BLK_T_IN, SECTORS - 1);
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), w(BUF, 512), w(STATUS, 1)], 0),
        ok(513)
    );
    header(&m, VIRTIO_BLK_T_IN, SECTORS);
    assert_eq!(run(&disk, &m, vec![r(HDR, 16), w(STATUS, 1)], 0), ok(1));
}

#[test]
fn flush_get_id_and_unsupported() {
    let f = image();
    let disk = open(&f, false);
    let m = mem();

    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&disk, &m, vec![r(HDR, 16), w(STATUS, 1)], ALL), ok(1));
    assert_eq!(status(&m), VIRTIO_BLK_S_OK);

    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    fill(&m, BUF, &[0xff; 32]);
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), w(BUF, 20), w(STATUS, 1)], ALL),
        ok(21)
    );
    let id = read(&m, BUF, 20);
    // Derived from the path: `ember-` and 14 hex digits, no inode number.
    assert_eq!(&id[..6], b"ember-");
    assert!(id[6..].iter().all(u8::is_ascii_hexdigit), "{id:?}");
    let ino = std::os::unix::fs::MetadataExt::ino(&f.as_file().metadata().unwrap());
    assert!(
        !String::from_utf8_lossy(&id).contains(&ino.to_string()),
        "GET_ID shows the inode number {ino}"
    );
    assert_eq!(read(&m, BUF + 20, 1)[0], 0xff, "GET_ID wrote past 20 bytes");
    assert_eq!(disk.id(), id[..]);

    // A shorter id buffer gets a prefix.
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), w(BUF, 4), w(STATUS, 1)], ALL),
        ok(5)
    );

    for t in [2, 3, 5, 7, 9, 12, 14, u32::MAX] {
        header(&m, t, 0);
        assert_eq!(
            run(&disk, &m, vec![r(HDR, 16), w(BUF, 512), w(STATUS, 1)], ALL),
            UNSUPP,
            "type {t}"
        );
        assert_eq!(status(&m), VIRTIO_BLK_S_UNSUPP);
    }
}

#[test]
fn read_only_disk_refuses_writes() {
    let f = image();
    let disk = open(&f, true);
    let m = mem();
    header(&m, VIRTIO_BLK_T_OUT, 0);
    fill(&m, BUF, &[0x11; 512]);
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), r(BUF, 512), w(STATUS, 1)], ALL),
        IOERR
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR);
    let mut on_disk = vec![0u8; 512];
    f.as_file().read_exact_at(&mut on_disk, 0).unwrap();
    assert_eq!(on_disk, expected(0, 512));

    // Discard / write zeroes are writes too (and not offered).
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&m, t, 0);
        fill(&m, BUF, &[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            run(&disk, &m, vec![r(HDR, 16), r(BUF, 16), w(STATUS, 1)], ALL),
            IOERR
        );
    }

    // Reads and flushes still work.
    header(&m, VIRTIO_BLK_T_IN, 1);
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), w(BUF, 512), w(STATUS, 1)], ALL),
        ok(513)
    );
    assert_eq!(read(&m, BUF, 512), expected(512, 512));
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&disk, &m, vec![r(HDR, 16), w(STATUS, 1)], ALL), ok(1));
}

#[test]
fn malformed_requests_get_ioerr() {
    let f = image();
    let disk = open(&f, false);
    let m = mem();

    // Header too short, header write-only, header split over a writable descriptor.
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert_eq!(run(&disk, &m, vec![r(HDR, 8), w(STATUS, 1)], ALL), IOERR);
    assert_eq!(
        run(&disk, &m, vec![w(HDR, 16), w(BUF, 512), w(STATUS, 1)], ALL),
        IOERR
    );
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 8), w(HDR + 8, 8), w(STATUS, 1)], ALL),
        IOERR
    );

    // Data not a multiple of 512, both directions.
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), w(BUF, 511), w(STATUS, 1)], ALL),
        IOERR
    );
    header(&m, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), r(BUF, 100), w(STATUS, 1)], ALL),
        IOERR
    );

    // Past the end, and arithmetic that would overflow.
    for (t, sector, len) in [
        (VIRTIO_BLK_T_IN, SECTORS, 512),
        (VIRTIO_BLK_T_IN, SECTORS - 1, 1024),
        (VIRTIO_BLK_T_OUT, SECTORS, 512),
        (VIRTIO_BLK_T_IN, u64::MAX, 512),
        (VIRTIO_BLK_T_IN, u64::MAX / 512, 512),
        (VIRTIO_BLK_T_IN, u64::MAX / 512 + 1, 0),
        (VIRTIO_BLK_T_OUT, (u64::MAX - 511) / 512, 512),
    ] {
        header(&m, t, sector);
        let data = if t == VIRTIO_BLK_T_IN {
            w(BUF, len)
        } else {
            r(BUF, len)
        };
        let mut descs = vec![r(HDR, 16)];
        if len > 0 {
            descs.push(data);
        }
        descs.push(w(STATUS, 1));
        assert_eq!(
            run(&disk, &m, descs, ALL),
            IOERR,
            "type {t} sector {sector:#x} len {len}"
        );
    }

    // Lengths near u32::MAX: out of guest memory, and their sum would overflow a u32.
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        run(
            &disk,
            &m,
            vec![
                r(HDR, 16),
                w(BUF, u32::MAX - 511),
                w(BUF, u32::MAX),
                w(STATUS, 1)
            ],
            ALL
        ),
        IOERR
    );
    header(&m, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        run(
            &disk,
            &m,
            vec![r(HDR, 16), r(BUF, 0xffff_fe00), w(STATUS, 1)],
            ALL
        ),
        IOERR
    );

    // Out-of-bounds header, data, and data wrapping the address space.
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        run(&disk, &m, vec![r(MEM_SIZE, 16), w(STATUS, 1)], ALL),
        IOERR
    );
    assert_eq!(
        run(
            &disk,
            &m,
            vec![r(HDR, 16), w(MEM_SIZE - 256, 512), w(STATUS, 1)],
            ALL
        ),
        IOERR
    );
    assert_eq!(
        run(
            &disk,
            &m,
            vec![r(HDR, 16), w(u64::MAX - 100, 512), w(STATUS, 1)],
            ALL
        ),
        IOERR
    );
    header(&m, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        run(
            &disk,
            &m,
            vec![r(HDR, 16), r(u64::MAX - 100, 512), w(STATUS, 1)],
            ALL
        ),
        IOERR
    );
    // The image is untouched by all of the above.
    let mut on_disk = vec![0u8; (SECTORS * 512) as usize];
    f.as_file().read_exact_at(&mut on_disk, 0).unwrap();
    assert_eq!(on_disk, expected(0, on_disk.len()));

    // The device still works afterwards.
    header(&m, VIRTIO_BLK_T_IN, 2);
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), w(BUF, 512), w(STATUS, 1)], ALL),
        ok(513)
    );
}

#[test]
fn chains_without_a_status_byte_get_used_len_0() {
    let f = image();
    let disk = open(&f, false);
    let m = mem();
    let none = Completion {
        used_len: 0,
        status: None,
    };
    header(&m, VIRTIO_BLK_T_IN, 0);
    // Empty chain, zero-length descriptors only, header only.
    assert_eq!(run(&disk, &m, vec![], ALL), none);
    assert_eq!(run(&disk, &m, vec![r(HDR, 0), w(STATUS, 0)], ALL), none);
    assert_eq!(run(&disk, &m, vec![r(HDR, 16)], ALL), none);
    // Read-only status descriptor (with and without writable data before it).
    assert_eq!(run(&disk, &m, vec![r(HDR, 16), r(STATUS, 1)], ALL), none);
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), w(BUF, 512), r(STATUS, 1)], ALL),
        none
    );
    assert_eq!(status(&m), 0xee);
    assert!(
        read(&m, BUF, 512).iter().all(|&b| b == 0),
        "data written without a status"
    );
    // Status byte outside guest memory, or at an address that would wrap.
    assert_eq!(run(&disk, &m, vec![r(HDR, 16), w(MEM_SIZE, 1)], ALL), none);
    assert_eq!(run(&disk, &m, vec![r(HDR, 16), w(u64::MAX, 2)], ALL), none);
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), w(BUF, u32::MAX)], ALL),
        none
    );
}

#[test]
fn discard_and_write_zeroes() {
    let f = image();
    let disk = open(&f, false);
    let m = mem();
    if !disk.supports_write_zeroes() {
        eprintln!("!!! the temp file system supports no fallocate modes; discard test skipped");
        return;
    }
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    };
    let zeroes_at = |sector: u64, n: usize| {
        let mut v = vec![0xffu8; n * 512];
        f.as_file().read_exact_at(&mut v, sector * 512).unwrap();
        v.iter().all(|&b| b == 0)
    };

    // Two write-zeroes segments, one with unmap.
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    fill(&m, BUF, &seg(4, 2, 0));
    fill(
        &m,
        BUF + 16,
        &seg(16, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
    );
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), r(BUF, 32), w(STATUS, 1)], ALL),
        ok(1)
    );
    assert!(zeroes_at(4, 2) && zeroes_at(16, 8));
    let mut around = vec![0u8; 512];
    f.as_file().read_exact_at(&mut around, 6 * 512).unwrap();
    assert_eq!(around, expected(6 * 512, 512));

    // Not negotiated -> UNSUPP; unknown flags -> UNSUPP; bad ranges and counts -> IOERR.
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), r(BUF, 16), w(STATUS, 1)], 0),
        UNSUPP
    );
    fill(&m, BUF, &seg(0, 1, 2));
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), r(BUF, 16), w(STATUS, 1)], ALL),
        UNSUPP
    );
    for bad in [
        seg(SECTORS, 1, 0),
        seg(u64::MAX, 1, 0),
        seg(0, MAX_DWZ_SECTORS + 1, 0),
    ] {
        fill(&m, BUF, &bad);
        assert_eq!(
            run(&disk, &m, vec![r(HDR, 16), r(BUF, 16), w(STATUS, 1)], ALL),
            IOERR
        );
    }
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), r(BUF, 15), w(STATUS, 1)], ALL),
        IOERR
    );
    assert_eq!(run(&disk, &m, vec![r(HDR, 16), w(STATUS, 1)], ALL), IOERR);
    let many = 16 * (MAX_DWZ_SEGMENTS + 1);
    fill(&m, BUF, &vec![0u8; many as usize]);
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), r(BUF, many), w(STATUS, 1)], ALL),
        IOERR
    );
    // A bad segment after a good one: nothing is done.
    fill(&m, BUF, &seg(30, 1, 0));
    fill(&m, BUF + 16, &seg(SECTORS, 1, 0));
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), r(BUF, 32), w(STATUS, 1)], ALL),
        IOERR
    );
    assert!(!zeroes_at(30, 1));

    if disk.supports_discard() {
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        fill(&m, BUF, &seg(32, 8, 0));
        assert_eq!(
            run(&disk, &m, vec![r(HDR, 16), r(BUF, 16), w(STATUS, 1)], ALL),
            ok(1)
        );
        // Discard takes no flags at all, not even unmap.
        fill(&m, BUF, &seg(32, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP));
        assert_eq!(
            run(&disk, &m, vec![r(HDR, 16), r(BUF, 16), w(STATUS, 1)], ALL),
            UNSUPP
        );
        assert_eq!(
            run(
                &disk,
                &m,
                vec![r(HDR, 16), r(BUF, 16), w(STATUS, 1)],
                VIRTIO_BLK_F_WRITE_ZEROES
            ),
            UNSUPP
        );
    }
    // The file keeps its size.
    assert_eq!(f.as_file().metadata().unwrap().len(), SECTORS * 512);
}

/// Chains through a real queue: indirect tables, loops, bad `next` indices, tables too
/// long to keep.
#[test]
fn queue_chains_indirect_and_loops() {
    let f = image();
    let disk = open(&f, false);
    let m = mem();
    let d = Driver::new(&m, 0, 16);
    let mut q = d.queue();
    let mut buffers = RequestBuffers::new();
    let mut next = |q: &mut virtio_queue::Queue| {
        let chain = q.pop_descriptor_chain(&m).unwrap();
        process_request(&disk, &m, chain, ALL, &mut buffers)
    };

    // 1. An IN request through an indirect table at 0x50_0000.
    header(&m, VIRTIO_BLK_T_IN, 5);
    let table = 0x50_0000u64;
    let ind = [
        Descriptor::new(HDR, 16, NEXT, 1),
        Descriptor::new(BUF, 512, WRITE | NEXT, 2),
        Descriptor::new(STATUS, 1, WRITE, 0),
    ];
    for (i, desc) in ind.iter().enumerate() {
        m.write_obj(*desc, vm_memory::GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    d.store(0, &[Descriptor::new(table, 48, INDIRECT, 0)]);
    d.publish(0);
    assert_eq!(next(&mut q), ok(513));
    assert_eq!(read(&m, BUF, 512), expected(5 * 512, 512));

    // 2. A loop: header -> status -> header -> ... (virtio-queue stops after 16).
    d.store(
        1,
        &[
            Descriptor::new(HDR, 16, NEXT, 2),
            Descriptor::new(STATUS, 1, WRITE | NEXT, 1),
        ],
    );
    d.publish(1);
    let c = next(&mut q);
    assert!(c.used_len <= 1, "{c:?}");

    // 3. A loop of writable descriptors only: no header, IOERR in the status.
    d.store(3, &[Descriptor::new(STATUS, 1, WRITE | NEXT, 3)]);
    d.publish(3);
    assert_eq!(next(&mut q), IOERR);

    // 4. `next` out of the table: the chain ends at the header, no status.
    d.store(4, &[Descriptor::new(HDR, 16, NEXT, 999)]);
    d.publish(4);
    assert_eq!(next(&mut q).status, None);

    // 5. An indirect table of 2000 writable descriptors: too long to keep, IOERR.
    let big = 0x60_0000u64;
    for i in 0..2000u64 {
        let flags = if i == 1999 { WRITE } else { WRITE | NEXT };
        let addr = if i == 1999 { STATUS } else { BUF };
        m.write_obj(
            Descriptor::new(addr, 512, flags, i as u16 + 1),
            vm_memory::GuestAddress(big + 16 * i),
        )
        .unwrap();
    }
    m.write_obj(
        Descriptor::new(HDR, 16, NEXT, 1),
        vm_memory::GuestAddress(big),
    )
    .unwrap();
    d.store(5, &[Descriptor::new(big, 2000 * 16, INDIRECT, 0)]);
    d.publish(5);
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert_eq!(next(&mut q), IOERR);

    // 6. An indirect table with an indirect descriptor inside, and a misaligned table.
    m.write_obj(
        Descriptor::new(table, 48, INDIRECT, 0),
        vm_memory::GuestAddress(0x70_0000),
    )
    .unwrap();
    d.store(6, &[Descriptor::new(0x70_0000, 16, INDIRECT, 0)]);
    d.publish(6);
    assert_eq!(next(&mut q).status, None);
    d.store(7, &[Descriptor::new(table, 47, INDIRECT, 0)]);
    d.publish(7);
    assert_eq!(next(&mut q).status, None);

    // 7. Still working.
    d.store(8, &[Descriptor::new(table, 48, INDIRECT, 0)]);
    d.publish(8);
    assert_eq!(next(&mut q), ok(513));
}

/// A pseudo-random storm of chains: whatever they hold, nothing panics and every chain
/// completes with a length no larger than what it offers.
#[test]
fn random_chains_never_panic() {
    let f = image();
    let disk = open(&f, false);
    let m = mem();
    let mut rng = crate::testutil::XorShift::new(0x5eed_b10c);
    let mut buffers = RequestBuffers::with_iovec_batch(1);
    for _ in 0..3000 {
        let n = (rng.next() % 6) as usize;
        let mut descs = Vec::new();
        let mut writable = 0u64;
        for _ in 0..n {
            let addr = match rng.next() % 4 {
                0 => rng.next(),
                1 => MEM_SIZE - (rng.next() % 1024),
                _ => HDR + (rng.next() % 0x20_0000),
            };
            let len = match rng.next() % 4 {
                0 => rng.next() as u32,
                1 => 16,
                _ => (rng.next() % 2048) as u32,
            };
            let flags = (rng.next() % 2) as u16 * WRITE;
            if flags != 0 {
                writable += u64::from(len);
            }
            descs.push(Descriptor::new(addr, len, flags, 0));
        }
        let t = [0u32, 1, 4, 8, 11, 13, 99][(rng.next() % 7) as usize];
        header(&m, t, rng.next() % (SECTORS + 2));
        let c = process_request(&disk, &m, descs, ALL, &mut buffers);
        assert!(u64::from(c.used_len) <= writable);
    }
}

#[test]
fn worker_serves_requests_with_event_idx() {
    let f = image();
    let mut dev = Block::new(f.path(), BlockOptions::default()).unwrap();
    let m = mem();
    let mut d = Driver::new(&m, 0, 256);
    let (aq, kick) = active_queue(0, &d);
    let irq = RecordingInterrupt::new();

    // Bad activations are refused.
    let err = dev
        .activate(Activation {
            mem: std::sync::Arc::new(m.clone()),
            queues: vec![],
            interrupt: irq.clone(),
            features: 0,
            thread_hook: None,
            spawner: None,
        })
        .unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 1,
            got: 0
        }
    ));

    dev.activate(Activation {
        mem: std::sync::Arc::new(m.clone()),
        queues: vec![aq],
        interrupt: irq.clone(),
        features: dev.device_features(),
        thread_hook: None,
        spawner: None,
    })
    .unwrap();
    // The OS name is set by the new thread itself, so give it a moment.
    let named = |comm: &str| {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .any(|c| c.trim() == comm)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !named("ember-virtio-bl") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(
        named("ember-virtio-bl"),
        "no worker thread named ember-virtio-blk (comm is truncated to 15 bytes)"
    );

    header(&m, VIRTIO_BLK_T_IN, 7);
    d.add(&[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)]);
    kick.write(1).unwrap();
    assert!(d.wait_used(1), "the worker did not complete the request");
    assert_eq!(d.used(0).1, 513);
    assert_eq!(read(&m, BUF, 512), expected(7 * 512, 512));
    assert_eq!(status(&m), VIRTIO_BLK_S_OK);
    assert!(irq.wait_for(InterruptKind::Queue(0)));

    // EVENT_IDX: used_event stays 0, so the second completion raises no interrupt.
    d.add(&[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)]);
    kick.write(1).unwrap();
    assert!(d.wait_used(2));
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(irq.kinds(), vec![InterruptKind::Queue(0)]);

    // A malformed request completes with IOERR and the device keeps going.
    d.add(&[(HDR, 8, false), (STATUS, 1, true)]);
    kick.write(1).unwrap();
    assert!(d.wait_used(3));
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR);

    let err = dev
        .activate(Activation {
            mem: std::sync::Arc::new(m.clone()),
            queues: vec![],
            interrupt: irq.clone(),
            features: 0,
            thread_hook: None,
            spawner: None,
        })
        .unwrap_err();
    assert!(matches!(err, ActivateError::Other(_)));
    dev.reset();
    // After reset the worker is gone: a kick does nothing.
    d.add(&[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)]);
    kick.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(d.used_idx(), 3);
}

/// Data buffers that straddle two adjacent guest memory regions (one host mapping
/// each), and requests with more buffers than one system call takes: the data still
/// lands byte for byte, in both directions.
#[test]
fn data_across_regions_and_syscall_batches() {
    use vm_memory::GuestAddress;
    let f = image();
    let disk = open(&f, false);
    // Two regions, adjacent in guest physical memory: 0..4 MiB and 4..8 MiB.
    let m = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x40_0000),
        (GuestAddress(0x40_0000), 0x40_0000),
    ])
    .unwrap();
    let hdr = 0x10_0000u64;
    let status = 0x10_1000u64;
    // 1 KiB read into a buffer crossing the boundary at 4 MiB (600 bytes below it).
    let straddle = 0x40_0000 - 600;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..16].copy_from_slice(&3u64.to_le_bytes());
    m.write_slice(&h, GuestAddress(hdr)).unwrap();
    for batch in [1, 2, MAX_IOVECS] {
        let mut buffers = RequestBuffers::with_iovec_batch(batch);
        m.write_slice(&[0u8; 1024], GuestAddress(straddle)).unwrap();
        let c = process_request(
            &disk,
            &m,
            vec![r(hdr, 16), w(straddle, 1024), w(status, 1)],
            ALL,
            &mut buffers,
        );
        assert_eq!(c, ok(1025), "batch {batch}");
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, GuestAddress(straddle)).unwrap();
        assert_eq!(got, expected(3 * 512, 1024), "batch {batch}");
    }

    // A 4 KiB write gathered from 64 buffers of 64 bytes, every other one in the upper
    // region, with the header sharing the first buffer (ANY_LAYOUT).
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 1) as u8).collect();
    let mut descs = Vec::new();
    let first = 0x20_0000u64;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    h[8..16].copy_from_slice(&8u64.to_le_bytes());
    let mut stream = h.to_vec();
    stream.extend_from_slice(&data);
    for (i, piece) in stream.chunks(80).enumerate() {
        let base = if i % 2 == 0 { first } else { 0x50_0000 };
        let addr = base + 0x100 * i as u64;
        m.write_slice(piece, GuestAddress(addr)).unwrap();
        descs.push(r(addr, piece.len() as u32));
    }
    descs.push(w(status, 1));
    assert!(descs.len() > 50);
    for batch in [3, MAX_IOVECS] {
        f.as_file().write_all_at(&[0u8; 4096], 8 * 512).unwrap();
        let mut buffers = RequestBuffers::with_iovec_batch(batch);
        let c = process_request(&disk, &m, descs.clone(), ALL, &mut buffers);
        assert_eq!(c, ok(1), "batch {batch}");
        let mut on_disk = vec![0u8; 4096];
        f.as_file().read_exact_at(&mut on_disk, 8 * 512).unwrap();
        assert!(on_disk == data, "batch {batch}: the disk holds other data");
    }
}

/// Reads go into guest memory through host pointers, so vm-memory does not see those
/// writes: the device marks the pages dirty itself (what live migration reads).
#[test]
fn reads_mark_guest_pages_dirty() {
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
    let f = image();
    let disk = open(&f, false);
    let m: vm_memory::GuestMemoryMmap<AtomicBitmap> =
        vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap();
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    m.write_slice(&h, GuestAddress(HDR)).unwrap();
    let region = m.iter().next().unwrap();
    let page = |addr: u64| region.bitmap().dirty_at(addr as usize);
    assert!(!page(BUF) && !page(BUF + 0x1000));
    let c = process_request(
        &disk,
        &m,
        vec![r(HDR, 16), w(BUF + 0x800, 4096), w(STATUS, 1)],
        ALL,
        &mut RequestBuffers::new(),
    );
    assert_eq!(c, ok(4097));
    // The 4 KiB at BUF + 2 KiB cover two pages, and no more.
    assert!(
        page(BUF) && page(BUF + 0x1000),
        "data pages not marked dirty"
    );
    assert!(page(STATUS), "status page not marked dirty");
    assert!(
        !page(BUF + 0x2000),
        "a page the device did not write is dirty"
    );
}

#[test]
fn get_id_is_the_serial_or_a_hash_of_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    for p in [&a, &b] {
        std::fs::write(p, vec![0u8; 4096]).unwrap();
    }
    let id_a = Disk::open(&a, BlockOptions::default()).unwrap().id();
    // Stable: the same image (by another path to it) gets the same id.
    let dotted = dir.path().join(".").join("a.img");
    let id_a2 = Disk::open(&dotted, BlockOptions::default()).unwrap().id();
    assert_eq!(id_a, id_a2);
    let id_b = Disk::open(&b, BlockOptions::default()).unwrap().id();
    assert_ne!(id_a, id_b);
    // Neither the inode nor the device number appears, in decimal or in hex.
    let meta = std::fs::metadata(&a).unwrap();
    let text = String::from_utf8_lossy(&id_a).into_owned();
    for n in [meta.ino(), meta.dev()] {
        for shown in [n.to_string(), format!("{n:x}"), format!("{n:X}")] {
            assert!(!text.contains(&shown), "{text} shows {n} as {shown}");
        }
    }
    // The id depends on the path alone: a new file (a new inode) at the same path
    // gets the same id, so nothing about the host's file system reaches the guest.
    let moved = dir.path().join("a.old");
    std::fs::rename(&a, &moved).unwrap();
    std::fs::write(&a, vec![1u8; 8192]).unwrap();
    assert_ne!(std::fs::metadata(&a).unwrap().ino(), meta.ino());
    assert_eq!(Disk::open(&a, BlockOptions::default()).unwrap().id(), id_a);
    std::fs::rename(&moved, &a).unwrap();

    // A serial set by the VMM is what GET_ID returns, NUL-padded.
    let disk = Disk::open(&a, BlockOptions::default())
        .unwrap()
        .with_serial("vol-7")
        .unwrap();
    let m = mem();
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    fill(&m, BUF, &[0xff; 32]);
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), w(BUF, 20), w(STATUS, 1)], ALL),
        ok(21)
    );
    let mut want = [0u8; 20];
    want[..5].copy_from_slice(b"vol-7");
    assert_eq!(read(&m, BUF, 20), want);
    drop(disk);
    // Exactly 20 bytes: no NUL; 21 are refused, naming the serial.
    let full = Disk::open(&a, BlockOptions { read_only: true })
        .unwrap()
        .with_serial("ABCDEFGHIJKLMNOPQRST")
        .unwrap();
    assert_eq!(&full.id(), b"ABCDEFGHIJKLMNOPQRST");
    let err = Disk::open(&a, BlockOptions { read_only: true })
        .unwrap()
        .with_serial("ABCDEFGHIJKLMNOPQRSTU")
        .unwrap_err();
    assert!(
        matches!(err, VirtioDeviceError::DiskSerial { len: 21, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("ABCDEFGHIJKLMNOPQRSTU"), "{err}");
}

#[test]
fn images_are_locked_like_qemu() {
    let f = image();
    let rw = |f: &NamedTempFile| Disk::open(f.path(), BlockOptions { read_only: false });
    let ro = |f: &NamedTempFile| Disk::open(f.path(), BlockOptions { read_only: true });

    // Two writers: the second fails, naming this process as the holder.
    let first = rw(&f).unwrap();
    let err = rw(&f).unwrap_err();
    assert!(
        matches!(
            err,
            VirtioDeviceError::DiskLocked {
                wanted: "read-write",
                held: "write",
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&f.path().display().to_string()), "{msg}");
    assert!(msg.contains("this process"), "{msg}");
    // A reader cannot join a writer either.
    let err = ro(&f).unwrap_err();
    assert!(
        matches!(
            err,
            VirtioDeviceError::DiskLocked {
                wanted: "read-only",
                held: "write",
                ..
            }
        ),
        "{err}"
    );
    // The lock goes with the disk.
    drop(first);

    // Readers share; a writer cannot join them.
    let r1 = ro(&f).unwrap();
    let r2 = Block::new(f.path(), BlockOptions { read_only: true }).unwrap();
    let err = rw(&f).unwrap_err();
    assert!(
        matches!(
            err,
            VirtioDeviceError::DiskLocked {
                wanted: "read-write",
                held: "read",
                ..
            }
        ),
        "{err}"
    );
    drop((r1, r2));
    rw(&f).unwrap();
}

/// Not a test on its own: with `EMBER_TEST_LOCK_HOLDER` set, the process that
/// [`lock_held_by_another_process_is_named`] starts, which opens that image read-write,
/// says so and waits to be killed.
#[test]
fn lock_holder_child() {
    let Ok(path) = std::env::var("EMBER_TEST_LOCK_HOLDER") else {
        return;
    };
    let _disk = Disk::open(&path, BlockOptions::default()).unwrap();
    println!("EMBER-LOCKED");
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

#[test]
fn lock_held_by_another_process_is_named() {
    use std::io::BufRead;
    let f = image();
    // This test binary again, running only `lock_holder_child` (a fork would share
    // this process's open files, and with them other tests' locks).
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "block::tests::lock_holder_child", "--nocapture"])
        .env("EMBER_TEST_LOCK_HOLDER", f.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let locked = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains("EMBER-LOCKED"));
    let read_only = Disk::open(f.path(), BlockOptions { read_only: true });
    let read_write = Disk::open(f.path(), BlockOptions::default());
    let _ = child.kill();
    let _ = child.wait();
    assert!(locked, "the child did not lock the image");
    let holder = format!("process {} (", child.id());
    for result in [read_only, read_write] {
        let err = result.unwrap_err();
        assert!(
            matches!(err, VirtioDeviceError::DiskLocked { held: "write", .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&holder), "{err}");
    }
    // Once the holder is gone the image opens.
    Disk::open(f.path(), BlockOptions::default()).unwrap();
}

#[test]
fn only_regular_files_and_block_devices() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let cpath = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);
    for (path, kind) in [
        (dir.path().to_path_buf(), "directory"),
        (fifo, "FIFO"),
        (PathBuf::from("/dev/zero"), "character device"),
        (PathBuf::from("/dev/null"), "character device"),
    ] {
        for read_only in [false, true] {
            // A FIFO opened for reading would block here without the check.
            let err = Disk::open(&path, BlockOptions { read_only }).unwrap_err();
            assert!(
                matches!(err, VirtioDeviceError::DiskType { kind: k, .. } if k == kind),
                "{}: {err}",
                path.display()
            );
            let msg = err.to_string();
            assert!(
                msg.contains(&path.display().to_string()) && msg.contains(kind),
                "{msg}"
            );
        }
    }
}

#[test]
fn a_failed_sync_is_latched() {
    let f = image();
    let disk = open(&f, false);
    let m = mem();
    let flush = |disk: &Disk| {
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        run(disk, &m, vec![r(HDR, 16), w(STATUS, 1)], ALL)
    };
    assert_eq!(flush(&disk), ok(1));
    assert!(!disk.sync_failed());

    // One fdatasync fails...
    disk.inject_sync_failures.store(1, Ordering::SeqCst);
    assert_eq!(flush(&disk), IOERR);
    assert_eq!(disk.inject_sync_failures.load(Ordering::SeqCst), 0);
    assert!(disk.sync_failed());
    // ...and every later flush fails too, although fdatasync itself would now succeed.
    for _ in 0..3 {
        assert_eq!(flush(&disk), IOERR);
    }
    // So do write-through writes (no FLUSH negotiated), though the data is written.
    header(&m, VIRTIO_BLK_T_OUT, 3);
    fill(&m, BUF, &[0x5a; 512]);
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), r(BUF, 512), w(STATUS, 1)], 0),
        IOERR
    );
    // Reads still work.
    header(&m, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), w(BUF, 512), w(STATUS, 1)], ALL),
        ok(513)
    );

    // A write-through write whose sync fails latches the same way.
    drop(disk);
    let disk = open(&f, false);
    disk.inject_sync_failures.store(1, Ordering::SeqCst);
    header(&m, VIRTIO_BLK_T_OUT, 3);
    assert_eq!(
        run(&disk, &m, vec![r(HDR, 16), r(BUF, 512), w(STATUS, 1)], 0),
        IOERR
    );
    assert_eq!(flush(&disk), IOERR);
}

fn limited(f: &NamedTempFile, config: RateLimiterConfig) -> Block {
    Block::new(f.path(), BlockOptions::default())
        .unwrap()
        .with_rate_limiter(config)
        .unwrap()
}

fn bucket(size: u64, refill_time_ms: u64) -> Option<ember_rate_limiter::TokenBucketConfig> {
    Some(ember_rate_limiter::TokenBucketConfig {
        size,
        one_time_burst: 0,
        refill_time_ms,
    })
}

/// Activates `dev` on a fresh queue of `d`; returns the queue's notify eventfd.
fn activate(
    dev: &mut Block,
    m: &GuestMemoryMmap,
    d: &Driver<'_>,
) -> vmm_sys_util::eventfd::EventFd {
    let (aq, kick) = active_queue(0, d);
    dev.activate(Activation {
        mem: std::sync::Arc::new(m.clone()),
        queues: vec![aq],
        interrupt: RecordingInterrupt::new(),
        features: dev.device_features(),
        thread_hook: None,
        spawner: None,
    })
    .unwrap();
    kick
}

/// Two operations and no refill within the test: the two requests the bucket holds and
/// one more (charged once done, it leaves a debt of one op) complete; the rest stay in
/// the ring whatever the guest does, and a reset does not repay the debt.
#[test]
fn rate_limiter_holds_requests_in_the_ring() {
    let f = image();
    let mut dev = limited(
        &f,
        RateLimiterConfig {
            bandwidth: None,
            ops: bucket(2, 600_000),
        },
    );
    let m = mem();
    let mut d = Driver::new(&m, 0, 256);
    let kick = activate(&mut dev, &m, &d);
    header(&m, VIRTIO_BLK_T_IN, 1);
    for _ in 0..5 {
        d.add(&[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)]);
    }
    kick.write(1).unwrap();
    assert!(d.wait_used(3), "the first three requests were not served");
    // More notifications get nothing more through.
    for _ in 0..3 {
        kick.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(d.used_idx(), 3, "the limiter let a fourth request through");
    for i in 0..3 {
        assert_eq!(d.used(i).1, 513);
    }

    // A reset gives the limiter back with its buckets (and debt) as they were: a guest
    // cannot refill them by resetting the device.
    dev.reset();
    let mut d2 = Driver::new(&m, 0x8000, 256);
    let kick = activate(&mut dev, &m, &d2);
    d2.add(&[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)]);
    kick.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(d2.used_idx(), 0, "a reset refilled the bucket");
    dev.reset();
}

#[test]
fn rate_limited_requests_complete_at_the_rate() {
    let f = image();
    // 1024 bytes per 40 ms, one 512-byte read per request, charged once done: 3 at
    // once (the third leaves a debt of 512 bytes), then one per 20 ms.
    let refill_ms = 40;
    let mut dev = limited(
        &f,
        RateLimiterConfig {
            bandwidth: bucket(1024, refill_ms),
            ops: None,
        },
    );
    let m = mem();
    let mut d = Driver::new(&m, 0, 256);
    let kick = activate(&mut dev, &m, &d);
    header(&m, VIRTIO_BLK_T_IN, 2);
    let n = 10u16;
    let start = std::time::Instant::now();
    for _ in 0..n {
        d.add(&[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)]);
    }
    kick.write(1).unwrap();
    assert!(d.wait_used(n), "only {} of {n} completed", d.used_idx());
    let elapsed = start.elapsed();
    // The tenth request starts once the first nine are paid for: (9 * 512 - 1024)
    // bytes at 1024 bytes per 40 ms, at least 140 ms. A lower bound only: a slow host
    // makes it longer, never shorter.
    let min = std::time::Duration::from_millis(refill_ms * 7 / 2);
    assert!(elapsed >= min.mul_f64(0.95), "{elapsed:?} < {min:?}");
    assert_eq!(read(&m, BUF, 512), expected(2 * 512, 512));
    for i in 0..n {
        assert_eq!(d.used(i).1, 513);
    }
    dev.reset();
}

/// A read larger than the whole bandwidth bucket is not stuck: charged once done, it
/// completes and leaves a debt, and the limiter holds the next request until the debt
/// is repaid (not within the test).
#[test]
fn a_request_larger_than_the_bucket_completes_then_blocks() {
    let f = image();
    let mut dev = limited(
        &f,
        RateLimiterConfig {
            bandwidth: bucket(1024, 600_000),
            ops: None,
        },
    );
    let m = mem();
    let mut d = Driver::new(&m, 0, 256);
    let kick = activate(&mut dev, &m, &d);
    header(&m, VIRTIO_BLK_T_IN, 4);
    d.add(&[(HDR, 16, false), (BUF, 4096, true), (STATUS, 1, true)]);
    d.add(&[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)]);
    kick.write(1).unwrap();
    assert!(d.wait_used(1), "a request larger than the bucket is stuck");
    assert_eq!(d.used(0).1, 4097);
    assert_eq!(read(&m, BUF, 4096), expected(4 * 512, 4096));
    kick.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(d.used_idx(), 1, "the limiter let a request through in debt");
    dev.reset();
}

#[test]
fn bad_rate_limits_are_refused() {
    let f = image();
    let err = Block::new(f.path(), BlockOptions::default())
        .unwrap()
        .with_rate_limiter(RateLimiterConfig {
            bandwidth: bucket(0, 100),
            ops: None,
        })
        .unwrap_err();
    assert!(
        matches!(err, VirtioDeviceError::RateLimiter { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains(&f.path().display().to_string()),
        "{err}"
    );
    // No bucket: no limiter.
    let dev = Block::new(f.path(), BlockOptions::default())
        .unwrap()
        .with_rate_limiter(RateLimiterConfig::default())
        .unwrap();
    assert!(dev.rate_limit().is_none());
}

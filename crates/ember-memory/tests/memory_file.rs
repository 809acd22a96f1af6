//! Memory files for snapshots: full and diff writes, mapping a file back as guest RAM, and
//! the dirty bitmap they use. No KVM.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use ember_guests::testing::XorShift;
use ember_memory::vm_memory::bitmap::{AtomicBitmap, Bitmap};
use ember_memory::vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use ember_memory::{
    create_guest_memory, create_guest_memory_with_bitmap, map_guest_memory_file, write_dirty_pages,
    write_memory_file, DirtyBitmap, HugePages, MemoryError, MemoryLayout, GIB, MIB, PAGE_SIZE,
};

/// A file in the temp directory, removed on drop.
struct TempFile {
    path: PathBuf,
    file: File,
}

impl TempFile {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ember-memory-test-{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        TempFile { path, file }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// All of guest RAM, regions concatenated (the memory file layout).
fn ram_bytes<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> Vec<u8> {
    let mut out = Vec::new();
    for region in mem.iter() {
        let mut buf = vec![0u8; region.len() as usize];
        mem.read_slice(&mut buf, region.start_addr()).unwrap();
        out.extend_from_slice(&buf);
    }
    out
}

/// Fills `pages` pages starting at `addr` with pseudo-random bytes.
fn scribble<B: Bitmap>(mem: &GuestMemoryMmap<B>, rng: &mut XorShift, addr: u64, pages: u64) {
    let mut buf = vec![0u8; (pages * PAGE_SIZE) as usize];
    for chunk in buf.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes()[..chunk.len()]);
    }
    mem.write_slice(&buf, GuestAddress(addr)).unwrap();
}

/// The file's data segments (`SEEK_DATA`/`SEEK_HOLE`) as `(offset, len)`.
fn data_segments(file: &File) -> Vec<(u64, u64)> {
    let len = file.metadata().unwrap().len() as i64;
    let mut out = Vec::new();
    let mut pos = 0i64;
    while pos < len {
        // SAFETY: lseek on a file descriptor we own; it only moves the file position.
        let data = unsafe { libc::lseek(file.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after `pos`.
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::ENXIO)
            );
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        assert!(hole > data, "SEEK_HOLE from {data} gave {hole}");
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    out
}

#[test]
fn full_write_then_map_back_gives_identical_bytes() {
    let layout = MemoryLayout::new(64 * MIB).unwrap();
    let mem = create_guest_memory(&layout, HugePages::None).unwrap();
    let mut rng = XorShift::new(13);
    scribble(&mem, &mut rng, 0, 16);
    scribble(&mem, &mut rng, 20 * MIB, 300);
    scribble(&mem, &mut rng, 64 * MIB - PAGE_SIZE, 1);

    let out = TempFile::new("full");
    // A longer file is cut to the RAM size.
    out.file.set_len(100 * MIB).unwrap();
    assert_eq!(write_memory_file(&mem, &out.file).unwrap(), 64 * MIB);
    assert_eq!(out.file.metadata().unwrap().len(), 64 * MIB);

    let expected = ram_bytes(&mem);
    let mut on_disk = vec![0u8; expected.len()];
    out.file.read_exact_at(&mut on_disk, 0).unwrap();
    assert!(on_disk == expected, "the file differs from guest RAM");

    let plain = map_guest_memory_file::<()>(&layout, &out.file).unwrap();
    assert!(ram_bytes(&plain) == expected, "mapped RAM differs");
    let tracked = map_guest_memory_file::<AtomicBitmap>(&layout, &out.file).unwrap();
    assert!(ram_bytes(&tracked) == expected, "mapped RAM differs");
    let region = tracked.iter().next().unwrap();
    assert!(!region.bitmap().dirty_at(0), "a fresh mapping starts clean");
    tracked.write_obj(1u8, GuestAddress(0x7000)).unwrap();
    assert!(region.bitmap().dirty_at(0x7000));
}

/// RAM split around the MMIO hole: region 1 (at 4 GiB) sits right after region 0 in the
/// file, at offset 3 GiB. Written as a diff so the 4 GiB file stays sparse.
#[test]
fn two_regions_map_back_at_their_file_offsets() {
    let layout = MemoryLayout::new(3 * GIB + 16 * MIB).unwrap();
    let mem = create_guest_memory(&layout, HugePages::None).unwrap();
    assert_eq!(mem.num_regions(), 2);
    let mut dirty = DirtyBitmap::new(&mem);
    let low_last = 3 * GIB - PAGE_SIZE;
    let high = 4 * GIB;
    for (addr, value) in [(0x1000, 1u64), (low_last, 2), (high, 3), (high + 0x5000, 4)] {
        mem.write_obj(value, GuestAddress(addr)).unwrap();
    }
    dirty.set(0, 1).unwrap();
    dirty.set(0, low_last / PAGE_SIZE).unwrap();
    dirty.set(1, 0).unwrap();
    dirty.set(1, 5).unwrap();

    let out = TempFile::new("two-regions");
    assert_eq!(write_dirty_pages(&mem, &out.file, &dirty).unwrap(), 4);
    assert_eq!(out.file.metadata().unwrap().len(), 3 * GIB + 16 * MIB);
    let mut word = [0u8; 8];
    out.file.read_exact_at(&mut word, 3 * GIB).unwrap();
    assert_eq!(
        u64::from_le_bytes(word),
        3,
        "region 1 starts at file offset 3 GiB"
    );

    let restored = map_guest_memory_file::<()>(&layout, &out.file).unwrap();
    assert_eq!(restored.num_regions(), 2);
    for (addr, value) in [(0x1000, 1u64), (low_last, 2), (high, 3), (high + 0x5000, 4)] {
        assert_eq!(restored.read_obj::<u64>(GuestAddress(addr)).unwrap(), value);
    }
    assert_eq!(
        restored
            .read_obj::<u64>(GuestAddress(high + 0x6000))
            .unwrap(),
        0
    );
}

#[test]
fn writes_to_mapped_memory_never_reach_the_file() {
    let layout = MemoryLayout::new(16 * MIB).unwrap();
    let mem = create_guest_memory(&layout, HugePages::None).unwrap();
    mem.write_obj(0x1111_u32, GuestAddress(0x4000)).unwrap();
    let out = TempFile::new("private");
    write_memory_file(&mem, &out.file).unwrap();

    let first = map_guest_memory_file::<()>(&layout, &out.file).unwrap();
    first.write_obj(0x2222_u32, GuestAddress(0x4000)).unwrap();
    first.write_obj(0x3333_u32, GuestAddress(0x9000)).unwrap();
    assert_eq!(first.read_obj::<u32>(GuestAddress(0x4000)).unwrap(), 0x2222);

    let mut word = [0u8; 4];
    out.file.read_exact_at(&mut word, 0x4000).unwrap();
    assert_eq!(u32::from_le_bytes(word), 0x1111, "a write reached the file");
    out.file.read_exact_at(&mut word, 0x9000).unwrap();
    assert_eq!(u32::from_le_bytes(word), 0);
    // Another VM restored from the same file sees the snapshot, not the first's writes.
    let second = map_guest_memory_file::<()>(&layout, &out.file).unwrap();
    assert_eq!(
        second.read_obj::<u32>(GuestAddress(0x4000)).unwrap(),
        0x1111
    );
    assert_eq!(second.read_obj::<u32>(GuestAddress(0x9000)).unwrap(), 0);
}

/// The `VmFlags` and `Rss` (KiB) of the smaps entry holding `ptr`.
fn smaps_entry(ptr: *const u8) -> (String, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let addr = ptr as usize;
    let mut lines = smaps.lines().skip_while(|line| {
        let range = line.split(' ').next().unwrap_or("");
        let Some((lo, hi)) = range.split_once('-') else {
            return true;
        };
        match (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) {
            (Ok(lo), Ok(hi)) => !(lo <= addr && addr < hi),
            _ => true,
        }
    });
    lines.next().expect("no smaps entry for the mapping");
    let (mut flags, mut rss) = (None, None);
    for line in lines {
        if let Some(value) = line.strip_prefix("Rss:") {
            rss = value.trim().trim_end_matches(" kB").parse().ok();
        }
        if line.starts_with("VmFlags:") {
            flags = Some(line.to_owned());
            break;
        }
    }
    (flags.unwrap(), rss.unwrap())
}

/// Mapping reads nothing up front (the mapping's RSS stays near zero after touching a
/// page of 64 MiB), and the memory is left out of core dumps.
#[test]
fn mapping_is_lazy_and_not_dumped() {
    let layout = MemoryLayout::new(64 * MIB).unwrap();
    let mem = create_guest_memory(&layout, HugePages::None).unwrap();
    let mut rng = XorShift::new(5);
    scribble(&mem, &mut rng, 0, 64 * MIB / PAGE_SIZE);
    let out = TempFile::new("lazy");
    write_memory_file(&mem, &out.file).unwrap();
    drop(mem);

    let restored = map_guest_memory_file::<()>(&layout, &out.file).unwrap();
    let region = restored.iter().next().unwrap();
    let _: u8 = restored.read_obj(GuestAddress(32 * MIB)).unwrap();
    let (flags, rss_kib) = smaps_entry(region.as_ptr());
    assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    assert!(
        rss_kib < 4096,
        "{rss_kib} KiB resident right after mapping 64 MiB: the file was read eagerly"
    );
}

#[test]
fn a_file_shorter_than_ram_is_a_clear_error() {
    let layout = MemoryLayout::new(32 * MIB).unwrap();
    let out = TempFile::new("short");
    out.file.set_len(32 * MIB - PAGE_SIZE).unwrap();
    let err = map_guest_memory_file::<()>(&layout, &out.file).unwrap_err();
    assert!(
        matches!(err, MemoryError::MemoryFileTooShort { len, needed }
            if len == 32 * MIB - PAGE_SIZE && needed == 32 * MIB),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "memory file is 0x1fff000 bytes long but the guest has 0x2000000 bytes of RAM \
         (wrong memory size, or a truncated file)"
    );
    // Exactly the RAM size, or longer, is fine.
    out.file.set_len(32 * MIB).unwrap();
    assert!(map_guest_memory_file::<()>(&layout, &out.file).is_ok());
}

/// A diff allocates only its dirty pages; base + diff gives the memory back, whether the
/// diff is merged afterwards or written straight onto a copy of the base.
#[test]
fn diff_leaves_holes_and_base_plus_diff_reproduces_memory() {
    let layout = MemoryLayout::new(64 * MIB).unwrap();
    let mem = create_guest_memory_with_bitmap::<AtomicBitmap>(&layout, HugePages::None).unwrap();
    let mut rng = XorShift::new(99);
    scribble(&mem, &mut rng, 0, 64);
    scribble(&mem, &mut rng, 10 * MIB, 256);
    let base = TempFile::new("base");
    write_memory_file(&mem, &base.file).unwrap();
    let base_bytes = ram_bytes(&mem);

    // What the VMM wrote before the base snapshot is not part of the diff.
    let mut dirty = DirtyBitmap::new(&mem);
    dirty.merge_from_vm_memory_bitmap(&mem).unwrap();
    dirty.clear();
    // Runs: pages 3..6, 70 (alone), 2560..2600 (inside the second scribble), the last page.
    scribble(&mem, &mut rng, 3 * PAGE_SIZE, 3);
    scribble(&mem, &mut rng, 70 * PAGE_SIZE, 1);
    scribble(&mem, &mut rng, 10 * MIB, 40);
    scribble(&mem, &mut rng, 64 * MIB - PAGE_SIZE, 1);
    dirty.merge_from_vm_memory_bitmap(&mem).unwrap();
    assert_eq!(dirty.count(), 3 + 1 + 40 + 1);

    let diff = TempFile::new("diff");
    assert_eq!(write_dirty_pages(&mem, &diff.file, &dirty).unwrap(), 45);
    let meta = diff.file.metadata().unwrap();
    assert_eq!(meta.len(), 64 * MIB);
    let expected_runs = [
        (3 * PAGE_SIZE, 3 * PAGE_SIZE),
        (70 * PAGE_SIZE, PAGE_SIZE),
        (10 * MIB, 40 * PAGE_SIZE),
        (64 * MIB - PAGE_SIZE, PAGE_SIZE),
    ];
    if meta.blksize() == PAGE_SIZE {
        assert_eq!(data_segments(&diff.file), expected_runs);
    }
    assert_eq!(
        meta.blocks() * 512,
        45 * PAGE_SIZE,
        "only the dirty pages are allocated"
    );

    // Merge: base, then every data segment of the diff over it.
    let merged = TempFile::new("merged");
    merged.file.write_all_at(&base_bytes, 0).unwrap();
    for (offset, len) in data_segments(&diff.file) {
        let mut buf = vec![0u8; len as usize];
        diff.file.read_exact_at(&mut buf, offset).unwrap();
        merged.file.write_all_at(&buf, offset).unwrap();
    }
    let expected = ram_bytes(&mem);
    assert!(expected != base_bytes);
    let restored = map_guest_memory_file::<()>(&layout, &merged.file).unwrap();
    assert!(ram_bytes(&restored) == expected, "base + diff differs");

    // The diff written onto a copy of the base gives the same.
    let in_place = TempFile::new("in-place");
    in_place.file.write_all_at(&base_bytes, 0).unwrap();
    write_dirty_pages(&mem, &in_place.file, &dirty).unwrap();
    let restored = map_guest_memory_file::<()>(&layout, &in_place.file).unwrap();
    assert!(ram_bytes(&restored) == expected, "diff onto base differs");
}

#[test]
fn dirty_write_rejects_a_bitmap_for_other_memory() {
    let mem = create_guest_memory(&MemoryLayout::new(16 * MIB).unwrap(), HugePages::None).unwrap();
    let other = DirtyBitmap::from_region_sizes(&[32 * MIB]);
    let out = TempFile::new("mismatch");
    let err = write_dirty_pages(&mem, &out.file, &other).unwrap_err();
    assert_eq!(
        err.to_string(),
        "dirty bitmap does not match guest memory: region 0 has 4096 page(s), the bitmap \
         8192 page(s)"
    );
    assert_eq!(out.file.metadata().unwrap().len(), 0, "nothing was written");
}

/// Pages the VMM wrote through vm-memory, in both regions, are merged exactly and
/// cleared in the `AtomicBitmap`; a mismatched bitmap merges and clears nothing.
#[test]
fn bitmap_merge_from_atomic_bitmap() {
    let layout = MemoryLayout::new(3 * GIB + 16 * MIB).unwrap();
    let mem = create_guest_memory_with_bitmap::<AtomicBitmap>(&layout, HugePages::None).unwrap();
    mem.write_obj(1u8, GuestAddress(0x5000)).unwrap();
    // 8 bytes across the boundary of pages 0x40 and 0x41.
    mem.write_obj(2u64, GuestAddress(0x41000 - 4)).unwrap();
    mem.write_obj(3u8, GuestAddress(4 * GIB + 0x3000)).unwrap();

    let mut wrong = DirtyBitmap::from_region_sizes(&[3 * GIB]);
    assert!(matches!(
        wrong.merge_from_vm_memory_bitmap(&mem),
        Err(MemoryError::DirtyBitmapLayout {
            region: 1,
            bitmap_pages: None,
            memory_pages: 4096
        })
    ));
    assert!(wrong.is_empty());
    let low = mem.iter().next().unwrap();
    assert!(low.bitmap().dirty_at(0x5000), "a failed merge cleared bits");

    let mut dirty = DirtyBitmap::new(&mem);
    dirty.set(1, 9).unwrap(); // already set (say from KVM's log): kept
    dirty.merge_from_vm_memory_bitmap(&mem).unwrap();
    assert_eq!(dirty.count(), 5);
    for (region, page) in [(0, 5), (0, 0x40), (0, 0x41), (1, 3), (1, 9)] {
        assert!(dirty.is_set(region, page), "region {region} page {page:#x}");
    }
    assert!(!low.bitmap().dirty_at(0x5000), "merged bits are reset");
    let high = mem.iter().nth(1).unwrap();
    assert!(!high.bitmap().dirty_at(0x3000));

    let mut again = DirtyBitmap::new(&mem);
    again.merge_from_vm_memory_bitmap(&mem).unwrap();
    assert!(again.is_empty(), "a second merge finds nothing new");
    mem.write_obj(4u8, GuestAddress(0x9000)).unwrap();
    again.merge_from_vm_memory_bitmap(&mem).unwrap();
    assert_eq!(again.count(), 1);
    assert!(again.is_set(0, 9));
}

//! Guest memory files for snapshots: writing RAM out (whole, or only its dirty pages) and
//! mapping it back in, lazily, for a restored guest.
//!
//! The file holds the guest RAM regions in guest-address order, back to back: region `i`
//! starts at the sum of the sizes of the regions before it (Firecracker's layout). For a
//! [`MemoryLayout`] that is `[0, low RAM)` at offset 0 and, with more than 3 GiB, the RAM
//! above 4 GiB right after it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::bitmap::NewBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use crate::guest::advise;
use crate::{DirtyBitmap, MemoryError, MemoryLayout, PAGE_SIZE};

/// The most one `pwrite` is asked to write. Linux writes at most 0x7fff_f000 bytes per
/// call anyway; 1 GiB keeps every call well inside that and still large.
const MAX_WRITE: usize = 1 << 30;

/// Writes all of guest RAM to `file` (from offset 0, regions back to back in `mem`'s
/// order), and sets the file's length to the total RAM size. Returns the bytes written.
///
/// Each region goes straight from its host mapping to the file in large `pwrite`s (no
/// intermediate buffer); short writes and `EINTR` are retried. Reading RAM does not mark
/// anything dirty in a vm-memory bitmap. The guest should be paused: pages it writes
/// meanwhile may be saved before or after the write. The data is not `fsync`ed; call
/// `file.sync_all()` if it must survive a host crash.
///
/// ```
/// use ember_memory::vm_memory::{Bytes, GuestAddress};
/// use ember_memory::{create_guest_memory, write_memory_file, HugePages, MemoryLayout, MIB};
///
/// let mem = create_guest_memory(&MemoryLayout::new(16 * MIB)?, HugePages::None)?;
/// mem.write_obj(0xabcd_u16, GuestAddress(0x2000))?;
/// let path = std::env::temp_dir().join(format!("ember-doc-full-{}", std::process::id()));
/// let file = std::fs::File::options().read(true).write(true).create(true).open(&path)?;
/// assert_eq!(write_memory_file(&mem, &file)?, 16 * MIB);
/// assert_eq!(file.metadata()?.len(), 16 * MIB);
/// std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn write_memory_file<M: GuestMemoryBackend>(mem: &M, file: &File) -> Result<u64, MemoryError> {
    let total = total_size(mem);
    set_len(file, total)?;
    let mut offset = 0u64;
    for (index, region) in mem.iter().enumerate() {
        write_range(region, index, 0, region.len(), file, offset)?;
        offset += region.len();
    }
    Ok(total)
}

/// Writes only the pages marked in `dirty` to `file`, each at its offset in the memory
/// file layout, and sets the file's length to the total RAM size. Returns how many
/// pages were written.
///
/// Consecutive dirty pages go out as one `pwrite`. Nothing else is written: on a fresh
/// file the rest stays holes (no disk space, reads as zeros); on an existing full memory
/// file the other pages keep what they had, so writing a diff onto a copy of the base
/// gives the new full file. `dirty` must have been made for `mem`'s regions
/// ([`DirtyBitmap::new`]), else [`MemoryError::DirtyBitmapLayout`] or
/// [`MemoryError::DirtyBitmapRegions`] and nothing is written. As for
/// [`write_memory_file`], the guest should be paused and nothing is `fsync`ed.
///
/// ```
/// use ember_memory::vm_memory::{Bytes, GuestAddress};
/// use ember_memory::{create_guest_memory, write_dirty_pages, DirtyBitmap, HugePages};
/// use ember_memory::{MemoryLayout, MIB};
///
/// let mem = create_guest_memory(&MemoryLayout::new(16 * MIB)?, HugePages::None)?;
/// mem.write_obj(7u8, GuestAddress(0x3000))?;
/// let mut dirty = DirtyBitmap::new(&mem);
/// dirty.set(0, 3)?;
/// let path = std::env::temp_dir().join(format!("ember-doc-diff-{}", std::process::id()));
/// let file = std::fs::File::options().read(true).write(true).create(true).open(&path)?;
/// assert_eq!(write_dirty_pages(&mem, &file, &dirty)?, 1);
/// assert_eq!(file.metadata()?.len(), 16 * MIB); // but only one page allocated
/// std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn write_dirty_pages<M: GuestMemoryBackend>(
    mem: &M,
    file: &File,
    dirty: &DirtyBitmap,
) -> Result<u64, MemoryError> {
    dirty.check_layout(mem)?;
    set_len(file, total_size(mem))?;
    let mut pages = 0u64;
    let mut offset = 0u64;
    for (index, region) in mem.iter().enumerate() {
        let len = region.len();
        for (first, count) in dirty.runs(index) {
            // `check_layout` matched the page counts, so the run lies inside the region;
            // only a partial last page is cut at the region's end.
            let start = first * PAGE_SIZE;
            let run_len = (count * PAGE_SIZE).min(len.saturating_sub(start));
            write_range(region, index, start, run_len, file, offset + start)?;
            pages += count;
        }
        offset += len;
    }
    Ok(pages)
}

/// Maps a memory file (as [`write_memory_file`] or [`write_dirty_pages`] made it) as the
/// guest RAM of `layout`, with a dirty bitmap `B` per region (`()` for none,
/// `vm_memory::bitmap::AtomicBitmap` to track the VMM's writes again).
///
/// Each region is `mmap`ed from the file at its offset with `MAP_PRIVATE |
/// MAP_NORESERVE`: nothing is read up front (pages come in from the file, or the page
/// cache, on first touch), and writes, the guest's and the VMM's, go to private copies:
/// they never reach the file, which can back any number of VMs at once. Every region
/// is `madvise(MADV_DONTDUMP)`, as [`create_guest_memory`](crate::create_guest_memory)'s.
///
/// Fails with [`MemoryError::MemoryFileTooShort`] if the file is shorter than the RAM of
/// `layout`. Do not shrink the file while the memory is mapped: a guest touching a page
/// past its end would kill the process with `SIGBUS`.
///
/// ```
/// use ember_memory::vm_memory::{Bytes, GuestAddress};
/// use ember_memory::{create_guest_memory, map_guest_memory_file, write_memory_file};
/// use ember_memory::{HugePages, MemoryLayout, MIB};
///
/// let layout = MemoryLayout::new(16 * MIB)?;
/// let mem = create_guest_memory(&layout, HugePages::None)?;
/// mem.write_obj(0x1234_u32, GuestAddress(0x8000))?;
/// let path = std::env::temp_dir().join(format!("ember-doc-map-{}", std::process::id()));
/// let file = std::fs::File::options().read(true).write(true).create(true).open(&path)?;
/// write_memory_file(&mem, &file)?;
///
/// let restored = map_guest_memory_file::<()>(&layout, &file)?;
/// assert_eq!(restored.read_obj::<u32>(GuestAddress(0x8000))?, 0x1234);
/// std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn map_guest_memory_file<B: NewBitmap>(
    layout: &MemoryLayout,
    file: &File,
) -> Result<GuestMemoryMmap<B>, MemoryError> {
    let needed = layout.ram_size();
    let len = file
        .metadata()
        .map_err(|source| MemoryError::MemoryFile {
            op: "reading the length of",
            offset: 0,
            len: 0,
            source,
        })?
        .len();
    if len < needed {
        return Err(MemoryError::MemoryFileTooShort { len, needed });
    }
    // One descriptor shared by every region's mapping; the caller keeps `file`.
    let shared = Arc::new(file.try_clone().map_err(|source| MemoryError::MemoryFile {
        op: "duplicating the descriptor of",
        offset: 0,
        len,
        source,
    })?);

    let mut regions = Vec::with_capacity(layout.ram_regions().len());
    let mut offset = 0u64;
    for &(addr, size) in layout.ram_regions() {
        // vm-memory only builds for 64-bit targets, so u64 -> usize is lossless.
        let size_bytes = size as usize;
        let mapping = MmapRegionBuilder::new_with_bitmap(size_bytes, B::with_len(size_bytes))
            .with_file_offset(FileOffset::from_arc(Arc::clone(&shared), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::Mmap {
                addr: addr.raw_value(),
                size,
                source,
            })?;
        advise(&mapping, addr, size, libc::MADV_DONTDUMP, "MADV_DONTDUMP")?;
        let region = GuestRegionMmap::new(mapping, addr).ok_or(MemoryError::RangeOverflow {
            addr: addr.raw_value(),
            size,
        })?;
        regions.push(region);
        offset += size;
    }
    log::debug!(
        "mapped {needed:#x} bytes of guest memory from a {len:#x}-byte memory file in {} \
         region(s)",
        regions.len()
    );
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

/// Total size of `mem`'s regions: the memory file's length.
fn total_size<M: GuestMemoryBackend>(mem: &M) -> u64 {
    mem.iter().map(|region| region.len()).sum()
}

/// Sets `file`'s length to `len`.
fn set_len(file: &File, len: u64) -> Result<(), MemoryError> {
    file.set_len(len).map_err(|source| MemoryError::MemoryFile {
        op: "setting the length of",
        offset: 0,
        len,
        source,
    })
}

/// Writes `len` bytes of `region` (number `index`), from `start` in the region, to
/// `file` at `file_offset`.
fn write_range<R: GuestMemoryRegion>(
    region: &R,
    index: usize,
    start: u64,
    len: u64,
    file: &File,
    file_offset: u64,
) -> Result<(), MemoryError> {
    // vm-memory only builds for 64-bit targets, so u64 -> usize is lossless.
    let slice = region
        .get_slice(MemoryRegionAddress(start), len as usize)
        .map_err(|source| MemoryError::GuestSlice {
            region: index,
            offset: start,
            len,
            source,
        })?;
    let guard = slice.ptr_guard();
    pwrite_all(file, guard.as_ptr(), slice.len(), file_offset)
}

/// `pwrite`s all `len` bytes at `ptr` to `file` at `offset`, in calls of at most
/// [`MAX_WRITE`] bytes, retrying short writes and `EINTR`.
fn pwrite_all(file: &File, ptr: *const u8, len: usize, offset: u64) -> Result<(), MemoryError> {
    let mut done = 0usize;
    while done < len {
        let chunk = (len - done).min(MAX_WRITE);
        let at = offset + done as u64;
        let error = |source| MemoryError::MemoryFile {
            op: "writing",
            offset: at,
            len: chunk as u64,
            source,
        };
        let file_offset = libc::off_t::try_from(at)
            .map_err(|_| error(io::Error::from_raw_os_error(libc::EFBIG)))?;
        // SAFETY: `ptr..ptr + len` is guest RAM mapped for as long as the caller's
        // `VolatileSlice` guard lives, and `done + chunk <= len`; the kernel only reads
        // it (into the file), so no Rust reference to the memory is created or written.
        // A vCPU writing the page meanwhile changes what is saved, not memory safety.
        let written = unsafe {
            libc::pwrite(
                file.as_raw_fd(),
                ptr.add(done).cast::<libc::c_void>(),
                chunk,
                file_offset,
            )
        };
        match written {
            n if n > 0 => done += n as usize,
            0 => return Err(error(io::Error::from(io::ErrorKind::WriteZero))),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(error(err));
                }
            }
        }
    }
    Ok(())
}

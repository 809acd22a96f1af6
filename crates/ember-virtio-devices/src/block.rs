//! virtio-blk (virtio 1.2, section 5.2) on a raw disk image.
//!
//! A request is a 16-byte header (`type` u32, `reserved` u32, `sector` u64) in
//! device-readable buffers, then data, then a one-byte status in the last device-writable
//! byte of the chain. Framing is not assumed (virtio 1.x implies `ANY_LAYOUT`): the header
//! is the first 16 readable bytes, written data is the rest of the readable bytes, read
//! data goes to the writable bytes before the status byte.
//!
//! Supported: `IN`, `OUT`, `FLUSH` (`fdatasync(2)` before the status is written),
//! `GET_ID`, and `DISCARD` / `WRITE_ZEROES` when the host file system supports them.
//! Anything else completes with `VIRTIO_BLK_S_UNSUPP`; malformed or failing requests with
//! `VIRTIO_BLK_S_IOERR`. When the driver did not negotiate `VIRTIO_BLK_F_FLUSH` the device
//! is write-through: every write is followed by `fdatasync(2)` before it completes.
//!
//! Host-side protections, as QEMU and Cloud Hypervisor have them:
//! * **Locking**: [`Disk::open`] takes an open file description (OFD) lock on the whole
//!   image, a write lock for a read-write disk and a read lock for a read-only one, so two
//!   writers, or a writer and readers, cannot share an image (whether in two VMMs or in
//!   one); the error names the process holding the other lock when `/proc` shows it.
//!   Only regular files and block devices are accepted.
//! * **Failed syncs are remembered**: once an `fdatasync(2)` fails, the kernel may have
//!   dropped the dirty pages, so a later one that succeeds proves nothing (PostgreSQL's
//!   "fsyncgate"). Every later `FLUSH`, and every write-through write, then fails.
//! * **Rate limiting** ([`Block::with_rate_limiter`]): each request costs one token of
//!   the operations bucket and its data bytes from the bandwidth bucket, charged when
//!   the request is done (what a bucket lacks becomes a debt), as virtio-rng and
//!   virtio-net do. While the limiter is blocked the worker takes no request, leaves the
//!   rest in the ring, and waits for the limiter's timer among its backend fds; so a
//!   guest gets at most one request beyond the limit, and then waits for it to be repaid.
//!   The queue is drained by `ember_virtio`'s own drain loop, stop checks included.
//! * **`GET_ID`** returns a serial the VMM sets ([`Disk::with_serial`]) or one derived
//!   from a hash of the image's canonical path; nothing about the host file (such as its
//!   inode number) reaches the guest.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ember_rate_limiter::{
    error_limited, warn_limited, RateLimiter, RateLimiterConfig, RateLimiterError, RateLimiterState,
};
use ember_virtio::{
    device_type, ActivateDevice, ActivateError, Activation, ActiveQueue, PauseError, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::Bitmap as _;
use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use crate::limited::{handle_timer, serve_limited};
use crate::VirtioDeviceError;
use crate::{read_config_bytes, QUEUE_MAX_SIZE};
use ember_virtio::chain::{region_slice, walk_into, ChainLayout, CopyError, Cursor};
use ember_virtio::worker::{QueueHandler, Worker, WorkerContext, QUEUE_BUDGET};

/// Sector size: virtio-blk addresses the disk in 512-byte sectors.
pub const SECTOR_SIZE: u64 = 512;

/// Feature bit: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// Feature bit: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature bit: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// Feature bit: the device supports `VIRTIO_BLK_T_FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Feature bit: the device supports `VIRTIO_BLK_T_DISCARD`.
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
/// Feature bit: the device supports `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

/// Request type: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: flush the write cache.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: read the device ID string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Request type: discard sectors.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Request type: write zeroes to sectors.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: the request failed or was malformed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: the request type (or a flag) is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// `WRITE_ZEROES` segment flag: the range may be deallocated.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Length of the device ID returned by `GET_ID`.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// Bytes of the request header.
const HEADER_LEN: u64 = 16;
/// Bytes of one discard / write-zeroes segment.
const DWZ_SEGMENT_LEN: u64 = 16;
/// `max_discard_seg` and `max_write_zeroes_seg`.
pub const MAX_DWZ_SEGMENTS: u32 = 16;
/// `max_discard_sectors` and `max_write_zeroes_sectors`: 2 GiB per segment.
pub const MAX_DWZ_SECTORS: u32 = 1 << 22;
/// `discard_sector_alignment`, in sectors (4 KiB).
const DISCARD_ALIGNMENT: u32 = 8;
/// `seg_max`: data descriptors per request (a 256-entry queue minus header and status).
pub const SEG_MAX: u32 = QUEUE_MAX_SIZE as u32 - 2;
/// Size of the configuration space exposed (through `write_zeroes_may_unmap` and its
/// padding).
pub const CONFIG_SIZE: usize = 60;
/// Bytes of zeroes written at a time when `WRITE_ZEROES` falls back to writing.
const ZEROES_CHUNK: u64 = 128 * 1024;

/// How [`Block::new`] opens the image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockOptions {
    /// Open the image read-only and offer `VIRTIO_BLK_F_RO`; writes fail with
    /// `VIRTIO_BLK_S_IOERR`.
    pub read_only: bool,
}

/// An open disk image: the backing file and what it supports.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    capacity: u64,
    read_only: bool,
    punch_hole: bool,
    zero_range: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    /// Set by the first failed `fdatasync(2)`; never cleared.
    sync_failed: AtomicBool,
    /// Tests only: how many of the next syncs fail (with `EIO`) without calling the
    /// kernel.
    #[cfg(test)]
    inject_sync_failures: std::sync::atomic::AtomicU32,
}

/// What kind of file `file_type` is, for an error message.
fn file_kind(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "directory"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// The `GET_ID` serial derived from `path`: `ember-` and 14 hex digits of the 64-bit
/// FNV-1a hash of the canonical path (the path as given if it cannot be resolved).
/// Stable across runs and Ember versions, and the same for every path naming one image;
/// it shows nothing about the host file system but that.
fn serial_from_path(path: &Path) -> [u8; VIRTIO_BLK_ID_BYTES] {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in canonical.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let name = format!("ember-{:014x}", hash >> 8);
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
    for (to, from) in id.iter_mut().zip(name.bytes()) {
        *to = from;
    }
    id
}

impl Disk {
    /// Opens `path` (`O_RDWR`, or `O_RDONLY` if `options.read_only`) and locks it: an
    /// exclusive OFD lock (`F_OFD_SETLK`, `F_WRLCK`) for a writable disk, a shared one
    /// (`F_RDLCK`) for a read-only disk, held until the `Disk` is dropped. The path must be
    /// a regular file or a block device, and its size a multiple of 512. For a writable
    /// image, probes whether the file system supports `fallocate(2)` hole punching and
    /// zero ranges (see [`Disk::supports_discard`]).
    ///
    /// Errors: [`VirtioDeviceError::DiskType`] for anything but a regular file or block
    /// device (a directory, a FIFO, `/dev/zero`...), [`VirtioDeviceError::DiskLocked`]
    /// when another open of the image holds a conflicting lock (in this process or
    /// another), [`VirtioDeviceError::DiskSize`], and [`VirtioDeviceError::DiskImage`]
    /// for a failed system call.
    pub fn open(path: impl AsRef<Path>, options: BlockOptions) -> Result<Disk, VirtioDeviceError> {
        let path = path.as_ref().to_path_buf();
        let err = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| VirtioDeviceError::DiskImage { op, path, source }
        };
        // Look before opening: opening a FIFO would wait for a writer, and a directory
        // opened read-write fails with a less helpful EISDIR.
        let kind_ok = |t: std::fs::FileType| t.is_file() || t.is_block_device();
        let meta = std::fs::metadata(&path).map_err(err("open", &path))?;
        if !kind_ok(meta.file_type()) {
            return Err(VirtioDeviceError::DiskType {
                path,
                kind: file_kind(meta.file_type()),
            });
        }
        // O_NONBLOCK and O_NOCTTY until the type is checked again on the open file (the
        // path may have been replaced in between).
        let file = OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)
            .map_err(err("open", &path))?;
        let meta = file.metadata().map_err(err("stat", &path))?;
        if !kind_ok(meta.file_type()) {
            return Err(VirtioDeviceError::DiskType {
                path,
                kind: file_kind(meta.file_type()),
            });
        }
        clear_nonblock(&file).map_err(err("clear O_NONBLOCK on", &path))?;
        lock_image(&file, &path, options.read_only, &meta)?;
        // Seek rather than stat: this also sizes block devices.
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(err("read the size of", &path))?;
        if size % SECTOR_SIZE != 0 {
            return Err(VirtioDeviceError::DiskSize { path, size });
        }
        let id = serial_from_path(&path);
        let (punch_hole, zero_range) = if options.read_only {
            (false, false)
        } else {
            probe_fallocate(&file, size)
        };
        Ok(Disk {
            file,
            path,
            capacity: size / SECTOR_SIZE,
            read_only: options.read_only,
            punch_hole,
            zero_range,
            id,
            sync_failed: AtomicBool::new(false),
            #[cfg(test)]
            inject_sync_failures: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// Sets the `GET_ID` serial: at most [`VIRTIO_BLK_ID_BYTES`] bytes, NUL-padded (a
    /// serial of exactly 20 bytes has no NUL, as the virtio spec allows).
    ///
    /// ```no_run
    /// use ember_virtio_devices::{BlockOptions, Disk};
    ///
    /// let disk = Disk::open("disk.img", BlockOptions::default())?.with_serial("vol-0001")?;
    /// assert_eq!(&disk.id()[..9], b"vol-0001\0");
    /// # Ok::<(), ember_virtio_devices::VirtioDeviceError>(())
    /// ```
    pub fn with_serial(mut self, serial: &str) -> Result<Disk, VirtioDeviceError> {
        let bytes = serial.as_bytes();
        if bytes.len() > VIRTIO_BLK_ID_BYTES {
            return Err(VirtioDeviceError::DiskSerial {
                serial: serial.to_string(),
                len: bytes.len(),
            });
        }
        self.id = [0; VIRTIO_BLK_ID_BYTES];
        for (to, &from) in self.id.iter_mut().zip(bytes) {
            *to = from;
        }
        Ok(self)
    }

    /// `fdatasync(2)`, latched: after one failure every later call fails too, without
    /// asking the kernel (whose next answer could be a success although the data that
    /// failed to reach the disk is gone from the page cache).
    fn sync(&self) -> io::Result<()> {
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(io::Error::other(
                "an earlier fdatasync failed; data may have been lost",
            ));
        }
        #[cfg(test)]
        let injected = self
            .inject_sync_failures
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        #[cfg(not(test))]
        let injected = false;
        let result = if injected {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            self.file.sync_data()
        };
        if let Err(e) = &result {
            self.sync_failed.store(true, Ordering::Release);
            error_limited!(
                "virtio-blk {}: fdatasync failed ({e}); every later flush will fail",
                self.path.display()
            );
        }
        result
    }

    /// Whether an `fdatasync(2)` has failed; from then on every `FLUSH` (and every
    /// write-through write) completes with `VIRTIO_BLK_S_IOERR`.
    pub fn sync_failed(&self) -> bool {
        self.sync_failed.load(Ordering::Acquire)
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the image was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The 20-byte `GET_ID` string, NUL-padded: the serial given to
    /// [`Disk::with_serial`], else `ember-` and 14 hex digits of a hash of the image's
    /// canonical path.
    pub fn id(&self) -> [u8; VIRTIO_BLK_ID_BYTES] {
        self.id
    }

    /// Whether `DISCARD` is offered: the image is writable and the file system punches
    /// holes (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`).
    pub fn supports_discard(&self) -> bool {
        self.punch_hole
    }

    /// Whether `WRITE_ZEROES` is offered: the image is writable and the file system
    /// supports `FALLOC_FL_ZERO_RANGE` or hole punching (a punched hole reads as zeroes).
    pub fn supports_write_zeroes(&self) -> bool {
        self.punch_hole || self.zero_range
    }

    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        (end <= self.capacity * SECTOR_SIZE).then_some(offset)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap && self.punch_hole && self.punch(offset, len).is_ok() {
            return Ok(());
        }
        if self.zero_range
            && fallocate(
                &self.file,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
            .is_ok()
        {
            return Ok(());
        }
        if self.punch_hole && self.punch(offset, len).is_ok() {
            return Ok(());
        }
        // The probe was wrong (or the file moved): write the zeroes. Rare, so the
        // buffer is allocated here rather than kept per device.
        let zeroes = vec![0u8; len.min(ZEROES_CHUNK) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Clears `O_NONBLOCK`, which [`Disk::open`] sets only while it checks the file type.
fn clear_nonblock(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL takes no argument and only reads the fd's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL takes an integer argument and only changes the fd's status flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An OFD lock request or query on the whole file.
fn whole_file_lock(lock_type: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers, for which all zeroes is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    // Both fit a c_short (F_RDLCK is 0, F_WRLCK 1, F_UNLCK 2).
    fl.l_type = lock_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end of the file, however it grows
    fl.l_pid = 0; // must be 0 for OFD locks
    fl
}

/// Takes the OFD lock [`Disk::open`] documents: `F_RDLCK` if `read_only`, else `F_WRLCK`.
fn lock_image(
    file: &File,
    path: &Path,
    read_only: bool,
    meta: &std::fs::Metadata,
) -> Result<(), VirtioDeviceError> {
    let wanted = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    };
    let mut fl = whole_file_lock(wanted);
    // SAFETY: F_OFD_SETLK reads the `flock` that `fl` points to, which lives for the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) } == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    if !matches!(source.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
        return Err(VirtioDeviceError::DiskImage {
            op: "lock (F_OFD_SETLK)",
            path: path.to_path_buf(),
            source,
        });
    }
    // Which lock is in the way: F_OFD_GETLK describes one conflicting lock.
    let mut query = whole_file_lock(wanted);
    // SAFETY: F_OFD_GETLK reads and rewrites the `flock` that `query` points to, which
    // lives for the call.
    let queried = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut query) } == 0;
    if queried && i32::from(query.l_type) == libc::F_UNLCK {
        // The other lock went away in between: try once more.
        let mut fl = whole_file_lock(wanted);
        // SAFETY: as for the first F_OFD_SETLK.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) } == 0 {
            return Ok(());
        }
    }
    let held_write = !queried || i32::from(query.l_type) == libc::F_WRLCK;
    // A classic POSIX lock names its process; an OFD lock (QEMU's, Cloud Hypervisor's,
    // Ember's) says -1, so look for the holder in /proc.
    let holder = if queried && query.l_pid > 0 {
        describe_process(query.l_pid)
    } else {
        lock_holders(meta)
    };
    Err(VirtioDeviceError::DiskLocked {
        path: path.to_path_buf(),
        wanted: if read_only { "read-only" } else { "read-write" },
        held: if held_write { "write" } else { "read" },
        holder,
    })
}

/// `process PID (COMM)`, or `this process` for our own.
fn describe_process(pid: libc::pid_t) -> String {
    if u32::try_from(pid).ok() == Some(std::process::id()) {
        return "this process (another open of the same image)".to_string();
    }
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => format!("process {pid} ({})", comm.trim_end()),
        Err(_) => format!("process {pid}"),
    }
}

/// Processes whose open files hold a lock on the file `meta` describes, found through
/// the `lock:` lines of `/proc/PID/fdinfo/FD` (which show OFD locks on that open file,
/// in `/proc/locks` format: `... MAJOR:MINOR:INODE START END`). Only processes this one
/// may inspect are seen; "another process" when none is.
fn lock_holders(meta: &std::fs::Metadata) -> String {
    /// Processes named in the message at most.
    const MAX_NAMED: usize = 4;
    let dev = meta.dev();
    let key = format!(
        " {:02x}:{:02x}:{} ",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let mut holders: Vec<String> = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return "another process".to_string();
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_to_string(fd.path()).is_ok_and(|info| {
                info.lines()
                    .any(|line| line.starts_with("lock:") && line.contains(&key))
            })
        });
        if holds {
            let who = describe_process(pid);
            if !holders.contains(&who) {
                holders.push(who);
            }
            if holders.len() >= MAX_NAMED {
                break;
            }
        }
    }
    if holders.is_empty() {
        "another process".to_string()
    } else {
        holders.join(", ")
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let offset =
        libc::off64_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len =
        libc::off64_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fallocate only reads its integer arguments; the fd is valid for the call.
    let ret = unsafe { libc::fallocate64(file.as_raw_fd(), mode, offset, len) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Probes hole punching and zero ranges on a 4 KiB range past the end of the file, with
/// `FALLOC_FL_KEEP_SIZE`, so the file's size and data are untouched. (A zero-length
/// probe cannot work: `fallocate(2)` rejects `len == 0` with `EINVAL` before asking the
/// file system.) A zero range past the end may allocate blocks there; they are punched
/// out again right away when hole punching works. Block devices reject ranges past
/// their end, so they get neither feature.
fn probe_fallocate(file: &File, size: u64) -> (bool, bool) {
    const PROBE: u64 = 4096;
    let Some(offset) = size.checked_next_multiple_of(PROBE) else {
        return (false, false);
    };
    let punch = fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        PROBE,
    )
    .is_ok();
    let zero = fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        PROBE,
    )
    .is_ok();
    if zero && punch {
        let _ = fallocate(
            file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            PROBE,
        );
    }
    (punch, zero)
}

/// What [`process_request`] did with a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The used length to report: bytes written to the chain, status byte included.
    pub used_len: u32,
    /// The status byte written, or `None` when the chain has no usable status byte (then
    /// `used_len` is 0).
    pub status: Option<u8>,
}

impl Completion {
    const NO_STATUS: Completion = Completion {
        used_len: 0,
        status: None,
    };
}

/// At most this many buffers go to one `preadv(2)`/`pwritev(2)` (Linux's `UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// Working memory for [`process_request`], kept by the caller (one per queue) so that
/// handling a request does not allocate: the chain's layout and the `iovec`s of its
/// data.
///
/// ```
/// use ember_virtio_devices::block::RequestBuffers;
///
/// let mut buffers = RequestBuffers::new();
/// # let _ = &mut buffers;
/// ```
#[derive(Debug)]
pub struct RequestBuffers {
    layout: ChainLayout,
    io: IoVecs,
    batch: usize,
}

impl Default for RequestBuffers {
    fn default() -> Self {
        RequestBuffers::new()
    }
}

impl RequestBuffers {
    /// Buffers handing up to [`MAX_IOVECS`] guest buffers to each system call.
    pub fn new() -> Self {
        RequestBuffers::with_iovec_batch(MAX_IOVECS)
    }

    /// Buffers handing at most `batch` (clamped to `1..=MAX_IOVECS`) guest buffers to
    /// each `preadv(2)`/`pwritev(2)`, so a request's data takes more system calls. Only
    /// tests and fuzzing want fewer than [`MAX_IOVECS`].
    pub fn with_iovec_batch(batch: usize) -> Self {
        RequestBuffers {
            layout: ChainLayout::default(),
            io: IoVecs::default(),
            batch: batch.clamp(1, MAX_IOVECS),
        }
    }
}

/// `iovec`s pointing into guest memory, with the guards that keep those pointers valid.
/// Empty except inside one [`transfer`] call.
#[derive(Default)]
struct IoVecs {
    iov: Vec<libc::iovec>,
    guards: Vec<PtrGuardMut>,
}

impl std::fmt::Debug for IoVecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoVecs")
            .field("capacity", &self.iov.capacity())
            .finish()
    }
}

// SAFETY: the raw pointers (in `iovec` and `PtrGuardMut`) are only stored while one
// `transfer` call on one thread uses them; `transfer` empties both vectors before it
// returns, so a value moved to another thread holds no pointers, only capacity.
unsafe impl Send for IoVecs {}

impl IoVecs {
    fn clear(&mut self) {
        self.iov.clear();
        self.guards.clear();
    }
}

/// Which way [`transfer`] moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// `IN`: disk to guest memory (`preadv`).
    FileToGuest,
    /// `OUT`: guest memory to disk (`pwritev`).
    GuestToFile,
}

/// Moves `len` bytes between the file at `offset` and the stream at `cursor`, straight
/// between guest memory and the file (no bounce buffer): the guest buffers are resolved
/// to host memory once each and handed to the kernel `batch` at a time. On failure
/// returns the number of bytes known to have been moved.
#[allow(clippy::too_many_arguments)]
fn transfer<M: GuestMemoryBackend + ?Sized>(
    file: &File,
    offset: u64,
    mem: &M,
    cursor: &mut Cursor<'_>,
    len: u64,
    direction: Direction,
    io: &mut IoVecs,
    batch: usize,
) -> Result<(), u64> {
    let Ok(len_usize) = usize::try_from(len) else {
        return Err(0);
    };
    let dirty_from = cursor.clone();
    let mut done = 0u64;
    io.clear();
    let walked = cursor.slices(mem, len_usize, |slice| {
        let guard = slice.ptr_guard_mut();
        io.iov.push(libc::iovec {
            iov_base: guard.as_ptr().cast(),
            iov_len: slice.len(),
        });
        io.guards.push(guard);
        if io.iov.len() >= batch {
            done += vectored_io(file, direction, &mut io.iov, offset + done)
                .map_err(|_| CopyError::Memory)?;
            io.clear();
        }
        Ok(())
    });
    let result = walked.map_err(|_| ()).and_then(|()| {
        if io.iov.is_empty() {
            return Ok(());
        }
        done += vectored_io(file, direction, &mut io.iov, offset + done).map_err(|_| ())?;
        Ok(())
    });
    io.clear();
    if direction == Direction::FileToGuest && done > 0 {
        // Writes through host pointers bypass vm-memory's dirty tracking: mark what the
        // kernel wrote, now that it is written.
        let mut marker = dirty_from;
        let _ = marker.slices(mem, done as usize, |slice| {
            slice.bitmap().mark_dirty(0, slice.len());
            Ok(())
        });
    }
    result.map_err(|()| done)
}

/// One `preadv`/`pwritev` of all of `iov` at `offset`, repeated over short transfers.
/// Consumes `iov` (its entries are advanced past what was moved). Returns the bytes moved.
fn vectored_io(
    file: &File,
    direction: Direction,
    iov: &mut [libc::iovec],
    offset: u64,
) -> io::Result<u64> {
    let mut moved = 0u64;
    // The first iovec not yet fully moved.
    let mut first = 0usize;
    while let Some(rest) = iov.get(first..).filter(|r| !r.is_empty()) {
        let pos = offset
            .checked_add(moved)
            .and_then(|p| libc::off64_t::try_from(p).ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        // `rest.len()` is at most MAX_IOVECS (1024), which fits a c_int.
        let count = rest.len() as libc::c_int;
        let fd = file.as_raw_fd();
        // One buffer (the usual 4 KiB request) takes plain pread/pwrite: the kernel's
        // vectored entry copies and checks the iovec array first, ~100 ns more here.
        let n = match (direction, rest) {
            // SAFETY: the iovec points into guest memory that `transfer`'s guards keep
            // mapped for the call, with its length inside that mapping; the kernel
            // writes at most `iov_len` bytes there.
            (Direction::FileToGuest, [one]) => unsafe {
                libc::pread64(fd, one.iov_base, one.iov_len, pos)
            },
            // SAFETY: as above; pwrite only reads the buffer.
            (Direction::GuestToFile, [one]) => unsafe {
                libc::pwrite64(fd, one.iov_base, one.iov_len, pos)
            },
            // SAFETY: every iovec points into guest memory that `transfer`'s guards keep
            // mapped for the call, with its length inside that mapping; the kernel
            // writes at most the iovecs' total length.
            (Direction::FileToGuest, _) => unsafe { libc::preadv64(fd, rest.as_ptr(), count, pos) },
            // SAFETY: as above; pwritev only reads the buffers.
            (Direction::GuestToFile, _) => unsafe {
                libc::pwritev64(fd, rest.as_ptr(), count, pos)
            },
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            // End of file on a read (the image shrank under us) or a device that takes
            // no more: a short transfer is an error for a block request.
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        // 0 < n <= the iovecs' total length, so it fits both u64 and usize.
        moved += n as u64;
        let mut left = n as usize;
        while let Some(v) = iov.get_mut(first) {
            if left < v.iov_len {
                // SAFETY: `left < iov_len`, so the advanced pointer stays inside the
                // same guest buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(left) }.cast();
                v.iov_len -= left;
                break;
            }
            left -= v.iov_len;
            first += 1;
        }
    }
    Ok(moved)
}

/// Handles one request chain against `disk`: parses and validates it, moves the data
/// straight between the file and guest memory (`preadv(2)`/`pwritev(2)`), and writes the
/// status byte. `features` are the negotiated features (`DISCARD`, `WRITE_ZEROES` and
/// `FLUSH` matter); `buffers` is reused working memory. Never panics, whatever the chain
/// holds.
pub fn process_request<M, I>(
    disk: &Disk,
    mem: &M,
    chain: I,
    features: u64,
    buffers: &mut RequestBuffers,
) -> Completion
where
    M: GuestMemoryBackend + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let RequestBuffers { layout, io, batch } = buffers;
    walk_into(layout, mem, chain);
    let Some(status_seg) = layout.last_writable else {
        return Completion::NO_STATUS;
    };
    // The status byte's host slice, resolved once (and so known writable) up front.
    let Some(status_slice) = status_seg
        .addr
        .0
        .checked_add(u64::from(status_seg.len) - 1)
        .and_then(|a| region_slice(mem, GuestAddress(a), 1))
    else {
        return Completion::NO_STATUS;
    };
    let (status, written) = execute(disk, mem, layout, features, io, *batch);
    if status_slice.write_obj(status, 0).is_err() {
        return Completion::NO_STATUS;
    }
    Completion {
        used_len: u32::try_from(written).unwrap_or(u32::MAX - 1) + 1,
        status: Some(status),
    }
}

/// The data bytes of the request last walked into `buffers` (by [`process_request`]),
/// what it is charged in the bandwidth bucket: its readable bytes past the 16-byte
/// header and its writable bytes before the status byte (for `IN` and `OUT`, the sectors
/// read or written), as the guest sized them, whatever the request's outcome.
fn data_bytes(buffers: &RequestBuffers) -> u64 {
    let layout = &buffers.layout;
    layout
        .readable_len
        .saturating_sub(HEADER_LEN)
        .saturating_add(layout.writable_len.saturating_sub(1))
}

/// Runs a request whose status byte is known to be writable; returns the status and the
/// data bytes written to the chain.
fn execute<M: GuestMemoryBackend + ?Sized>(
    disk: &Disk,
    mem: &M,
    layout: &ChainLayout,
    features: u64,
    io: &mut IoVecs,
    batch: usize,
) -> (u8, u64) {
    if !layout.is_sound() || layout.readable_len < HEADER_LEN {
        return (VIRTIO_BLK_S_IOERR, 0);
    }
    let mut reader = Cursor::new(&layout.readable);
    let mut header = [0u8; HEADER_LEN as usize];
    let mut filled = 0;
    let read = reader.slices(mem, header.len(), |slice| {
        let to = header
            .get_mut(filled..filled + slice.len())
            .ok_or(CopyError::Short)?;
        slice.copy_to(to);
        filled += slice.len();
        Ok(())
    });
    if read.is_err() {
        return (VIRTIO_BLK_S_IOERR, 0);
    }
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    // Sound chain: the status segment is the last writable one, so this is >= 1. The
    // data the device writes is the writable stream's first `in_len` bytes, which stops
    // short of the status byte.
    let in_len = layout.writable_len.saturating_sub(1);
    let out_len = layout.readable_len - HEADER_LEN;
    let writethrough = features & VIRTIO_BLK_F_FLUSH == 0;

    match req_type {
        VIRTIO_BLK_T_IN => {
            if in_len % SECTOR_SIZE != 0 {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let Some(offset) = disk.range(sector, in_len) else {
                return (VIRTIO_BLK_S_IOERR, 0);
            };
            let mut writer = Cursor::new(&layout.writable);
            match transfer(
                &disk.file,
                offset,
                mem,
                &mut writer,
                in_len,
                Direction::FileToGuest,
                io,
                batch,
            ) {
                Ok(()) => (VIRTIO_BLK_S_OK, in_len),
                Err(done) => (VIRTIO_BLK_S_IOERR, done),
            }
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only || out_len % SECTOR_SIZE != 0 {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let Some(offset) = disk.range(sector, out_len) else {
                return (VIRTIO_BLK_S_IOERR, 0);
            };
            if transfer(
                &disk.file,
                offset,
                mem,
                &mut reader,
                out_len,
                Direction::GuestToFile,
                io,
                batch,
            )
            .is_err()
            {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            if writethrough && disk.sync().is_err() {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            (VIRTIO_BLK_S_OK, 0)
        }
        // `Disk::sync` logs the first failure and latches it.
        VIRTIO_BLK_T_FLUSH => match disk.sync() {
            Ok(()) => (VIRTIO_BLK_S_OK, 0),
            Err(_) => (VIRTIO_BLK_S_IOERR, 0),
        },
        VIRTIO_BLK_T_GET_ID => {
            let n = in_len.min(VIRTIO_BLK_ID_BYTES as u64) as usize;
            match Cursor::new(&layout.writable).write(mem, &disk.id[..n]) {
                Ok(()) => (VIRTIO_BLK_S_OK, n as u64),
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            let needed = if discard {
                VIRTIO_BLK_F_DISCARD
            } else {
                VIRTIO_BLK_F_WRITE_ZEROES
            };
            let supported = if discard {
                disk.supports_discard()
            } else {
                disk.supports_write_zeroes()
            };
            // Like any write, refused on a read-only disk (where neither is offered).
            if disk.read_only {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            if features & needed == 0 || !supported {
                return (VIRTIO_BLK_S_UNSUPP, 0);
            }
            let status = discard_or_write_zeroes(disk, mem, &mut reader, out_len, discard);
            if status == VIRTIO_BLK_S_OK && writethrough && disk.sync().is_err() {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            (status, 0)
        }
        _ => (VIRTIO_BLK_S_UNSUPP, 0),
    }
}

fn discard_or_write_zeroes<M: GuestMemoryBackend + ?Sized>(
    disk: &Disk,
    mem: &M,
    reader: &mut Cursor<'_>,
    payload_len: u64,
    discard: bool,
) -> u8 {
    const BUF_LEN: usize = (MAX_DWZ_SEGMENTS as u64 * DWZ_SEGMENT_LEN) as usize;
    if payload_len == 0
        || payload_len % DWZ_SEGMENT_LEN != 0
        || payload_len / DWZ_SEGMENT_LEN > u64::from(MAX_DWZ_SEGMENTS)
    {
        return VIRTIO_BLK_S_IOERR;
    }
    let mut buf = [0u8; BUF_LEN];
    let buf = &mut buf[..payload_len as usize];
    if reader.read(mem, buf).is_err() {
        return VIRTIO_BLK_S_IOERR;
    }
    // Validate every segment before touching the disk.
    let mut ranges = [(0u64, 0u64, false); MAX_DWZ_SEGMENTS as usize];
    let mut count = 0;
    for seg in buf.chunks_exact(DWZ_SEGMENT_LEN as usize) {
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let num_sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        let allowed_flags = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed_flags != 0 {
            return VIRTIO_BLK_S_UNSUPP;
        }
        if num_sectors > MAX_DWZ_SECTORS {
            return VIRTIO_BLK_S_IOERR;
        }
        let len = u64::from(num_sectors) * SECTOR_SIZE;
        let Some(offset) = disk.range(sector, len) else {
            return VIRTIO_BLK_S_IOERR;
        };
        ranges[count] = (offset, len, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0);
        count += 1;
    }
    for &(offset, len, unmap) in &ranges[..count] {
        if len == 0 {
            continue;
        }
        let result = if discard {
            disk.punch(offset, len)
        } else {
            disk.write_zeroes(offset, len, unmap)
        };
        if let Err(e) = result {
            // A discard is only a hint; a file system that stopped punching holes does not
            // make it fail.
            if discard && e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                continue;
            }
            warn_limited!(
                "virtio-blk {}: discard/write-zeroes failed: {e}",
                disk.path.display()
            );
            return VIRTIO_BLK_S_IOERR;
        }
    }
    VIRTIO_BLK_S_OK
}

/// A virtio-blk device backed by a raw image file.
///
/// One request queue of up to [`QUEUE_MAX_SIZE`] entries. Features offered:
/// `VERSION_1`, `RING_EVENT_IDX`, `RING_INDIRECT_DESC`, `SEG_MAX`, `BLK_SIZE`, `FLUSH`,
/// `RO` for read-only images, `DISCARD` / `WRITE_ZEROES` when the host file system
/// supports them ([`Disk::supports_discard`], [`Disk::supports_write_zeroes`]).
///
/// ```no_run
/// use ember_virtio_devices::{Block, BlockOptions};
/// use ember_virtio::VirtioDevice;
///
/// let disk = Block::new("disk.img", BlockOptions { read_only: false })?;
/// let mut capacity = [0u8; 8];
/// disk.read_config(0, &mut capacity);
/// # Ok::<(), ember_virtio_devices::VirtioDeviceError>(())
/// ```
#[derive(Debug)]
pub struct Block {
    disk: Arc<Disk>,
    features: u64,
    config: [u8; CONFIG_SIZE],
    worker: Option<Worker<BlockHandler>>,
    /// The limiter's settings, to build a new one should a worker thread panic.
    rate_limit: Option<RateLimiterConfig>,
    /// The limiter while no worker runs; the worker has it while it runs and gives it
    /// back on reset, so a guest cannot refill the buckets by resetting the device.
    rate_limiter: Option<RateLimiter>,
}

impl Block {
    /// Opens the image at `path` (see [`Disk::open`]) and builds the device.
    pub fn new(path: impl AsRef<Path>, options: BlockOptions) -> Result<Block, VirtioDeviceError> {
        Ok(Block::from_disk(Disk::open(path, options)?))
    }

    /// Builds the device on an already opened disk.
    pub fn from_disk(disk: Disk) -> Block {
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        if disk.read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        let mut config = [0u8; CONFIG_SIZE];
        config[0..8].copy_from_slice(&disk.capacity.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        if disk.supports_discard() {
            features |= VIRTIO_BLK_F_DISCARD;
            config[36..40].copy_from_slice(&MAX_DWZ_SECTORS.to_le_bytes());
            config[40..44].copy_from_slice(&MAX_DWZ_SEGMENTS.to_le_bytes());
            config[44..48].copy_from_slice(&DISCARD_ALIGNMENT.to_le_bytes());
        }
        if disk.supports_write_zeroes() {
            features |= VIRTIO_BLK_F_WRITE_ZEROES;
            config[48..52].copy_from_slice(&MAX_DWZ_SECTORS.to_le_bytes());
            config[52..56].copy_from_slice(&MAX_DWZ_SEGMENTS.to_le_bytes());
            config[56] = u8::from(disk.punch_hole);
        }
        Block {
            disk: Arc::new(disk),
            features,
            config,
            worker: None,
            rate_limit: None,
            rate_limiter: None,
        }
    }

    /// Limits the guest's requests: each costs one token of `config.ops` and its data
    /// bytes from `config.bandwidth` (either bucket may be absent; with neither, nothing
    /// is limited), charged when it is done. A request a bucket cannot pay for is still
    /// done and leaves a debt; the limiter then blocks, requests wait in the ring and the
    /// worker sleeps on the limiter's timer until the debt is repaid. So a request
    /// larger than the bandwidth bucket cannot be stuck, and over time the guest gets the
    /// configured rate. The limiter, with its buckets and debts, survives device resets.
    ///
    /// ```no_run
    /// use ember_virtio_devices::{Block, BlockOptions};
    /// use ember_rate_limiter::{RateLimiterConfig, TokenBucketConfig};
    ///
    /// // 10 MiB/s, bursts of 1 MiB; 1000 requests/s.
    /// let disk = Block::new("disk.img", BlockOptions::default())?.with_rate_limiter(
    ///     RateLimiterConfig {
    ///         bandwidth: Some(TokenBucketConfig { size: 1 << 20, one_time_burst: 0, refill_time_ms: 100 }),
    ///         ops: Some(TokenBucketConfig { size: 100, one_time_burst: 0, refill_time_ms: 100 }),
    ///     },
    /// )?;
    /// # Ok::<(), ember_virtio_devices::VirtioDeviceError>(())
    /// ```
    pub fn with_rate_limiter(
        mut self,
        config: RateLimiterConfig,
    ) -> Result<Block, VirtioDeviceError> {
        if config.is_unlimited() {
            self.rate_limit = None;
            self.rate_limiter = None;
            return Ok(self);
        }
        self.rate_limiter = Some(self.new_limiter(&config)?);
        self.rate_limit = Some(config);
        Ok(self)
    }

    fn new_limiter(&self, config: &RateLimiterConfig) -> Result<RateLimiter, VirtioDeviceError> {
        RateLimiter::new(config).map_err(|source: RateLimiterError| {
            VirtioDeviceError::RateLimiter {
                device: format!("virtio-blk {}", self.disk.path.display()),
                source,
            }
        })
    }

    /// The rate limiter's settings, if it has one.
    pub fn rate_limit(&self) -> Option<&RateLimiterConfig> {
        self.rate_limit.as_ref()
    }

    /// The backing disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // `writeback` is only writable with VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            self.take_back(worker.stop());
        }
    }

    fn save_rate_limiters(&mut self) -> Vec<RateLimiterState> {
        crate::limited::save_limiters([self.rate_limiter.as_mut()])
    }

    fn restore_rate_limiters(
        &mut self,
        states: &[RateLimiterState],
    ) -> Result<(), RateLimiterError> {
        crate::limited::restore_limiters([self.rate_limiter.as_mut()], states)
    }

    /// Stops the worker after the request in flight (its data is on the disk, or read,
    /// and its status written) and gives back the queue. The disk stays open and the
    /// rate limiter, buckets and debts included, stays with the device for the next
    /// activation.
    fn pause(&mut self) -> Result<Vec<ActiveQueue>, PauseError> {
        let Some(worker) = self.worker.take() else {
            return Err(PauseError::NotRunning {
                device_type: device_type::BLOCK,
            });
        };
        match worker.stop_keeping_queues() {
            Some((handler, queues)) => {
                self.take_back(Some(handler));
                Ok(queues)
            }
            None => {
                self.take_back(None);
                Err(PauseError::WorkerLost {
                    device_type: device_type::BLOCK,
                })
            }
        }
    }
}

impl Block {
    /// Keeps what a stopped worker's handler had (`None`: the worker panicked).
    fn take_back(&mut self, handler: Option<BlockHandler>) {
        let limiter = handler.and_then(|handler| handler.limiter);
        self.rate_limiter = match (limiter, &self.rate_limit) {
            (Some(limiter), _) => Some(limiter),
            // The worker panicked and took the limiter with it: a new one.
            (None, Some(config)) => match self.new_limiter(config) {
                Ok(limiter) => Some(limiter),
                Err(e) => {
                    error_limited!("{e}; the disk will fail to activate");
                    None
                }
            },
            (None, None) => None,
        };
    }
}

/// Any guest memory whose regions can be reached by host pointers (data moves with
/// `preadv(2)`/`pwritev(2)`): `Arc<GuestMemoryMmap<B>>`,
/// `GuestMemoryAtomic<GuestMemoryMmap<B>>`. With a dirty bitmap `B`, the pages that
/// reads fill are marked dirty.
impl<M> ActivateDevice<M> for Block
where
    M: GuestAddressSpace + Send + 'static,
    M::M: GuestMemoryBackend,
{
    fn activate(&mut self, activation: Activation<M>) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::Other("virtio-blk is already active".into()));
        }
        if activation.queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: activation.queues.len(),
            });
        }
        let limiter = self.rate_limiter.take();
        if limiter.is_none() && self.rate_limit.is_some() {
            return Err(ActivateError::Other(
                "virtio-blk: the rate limiter could not be rebuilt after a worker panic".into(),
            ));
        }
        let handler = BlockHandler {
            disk: Arc::clone(&self.disk),
            features: activation.features,
            buffers: RequestBuffers::new(),
            limiter,
        };
        match Worker::spawn("blk", handler, activation) {
            Ok(worker) => {
                self.worker = Some(worker);
                Ok(())
            }
            Err(e) => {
                let source = e.source;
                self.rate_limiter = e.handler.limiter;
                Err(ActivateError::Start(source))
            }
        }
    }
}

struct BlockHandler {
    disk: Arc<Disk>,
    features: u64,
    buffers: RequestBuffers,
    limiter: Option<RateLimiter>,
}

impl BlockHandler {
    /// Serves queue `queue` with the worker's drain. With a limiter
    /// ([`serve_limited`]), each request is charged once done (one op and its
    /// [`data_bytes`]); the drain stops as soon as the limiter blocks, leaving the rest
    /// in the ring until its timer fires ([`QueueHandler::backend_ready`]), or as soon
    /// as the worker is asked to stop.
    fn serve<M>(&mut self, ctx: &mut WorkerContext<M>, queue: usize)
    where
        M: GuestAddressSpace,
        M::M: GuestMemoryBackend,
    {
        let BlockHandler {
            disk,
            features,
            buffers,
            limiter,
        } = self;
        let features = *features;
        let Some(limiter) = limiter else {
            ctx.process_queue(queue, QUEUE_BUDGET, |mem, chain| {
                process_request(disk, mem, chain, features, buffers).used_len
            });
            return;
        };
        serve_limited(ctx, queue, limiter, |mem, chain| {
            let used_len = process_request(disk, mem, chain, features, buffers).used_len;
            (used_len, data_bytes(buffers))
        });
    }
}

impl<M> QueueHandler<M> for BlockHandler
where
    M: GuestAddressSpace,
    M::M: GuestMemoryBackend,
{
    fn backend_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.limiter.iter().map(AsRawFd::as_raw_fd).collect()
    }

    fn queue_notified(&mut self, ctx: &mut WorkerContext<M>, queue: usize) {
        self.serve(ctx, queue);
    }

    /// The limiter's timer fired: unblock it and serve the queue again.
    fn backend_ready(&mut self, ctx: &mut WorkerContext<M>, _index: usize) {
        let Some(limiter) = &mut self.limiter else {
            return;
        };
        handle_timer(limiter, "virtio-blk");
        self.serve(ctx, 0);
    }
}

#[cfg(test)]
mod tests;

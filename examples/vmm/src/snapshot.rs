//! Snapshots of a paused VM: what the state file holds ([`MicrovmState`]), writing it
//! with the guest memory file ([`create_snapshot`]), and reading it back for a restore
//! ([`load_state`]).
//!
//! The state file is `ember_snapshot`'s container (magic, format version, postcard
//! payload, CRC-64): a corrupt, truncated or other-version file is refused with one
//! error before anything is built. The memory file is guest RAM, region after region
//! (Firecracker's layout): whole for a full snapshot; for a diff snapshot the same
//! length with only the pages written since the previous snapshot (the guest's writes
//! from KVM's dirty log, the VMM's own from vm-memory's bitmap), holes elsewhere, to be
//! merged onto the previous snapshot's memory file before a restore
//! ([`merge_diff`]).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ember_devices::{I8042State, SerialState};
use ember_memory::DirtyBitmap;
use ember_vcpu::state::VcpuState;
use ember_virtio::MmioTransportState;
use ember_vm::VmState;
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// The state file's name in a snapshot directory (`ember --restore DIR`).
pub const STATE_FILE: &str = "vmstate";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// The state file's format version; a file of another version is refused.
pub const SNAPSHOT_VERSION: u32 = 2;

/// A full snapshot, or only what changed since the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    /// The memory file holds all of guest RAM.
    Full,
    /// The memory file holds the pages written since the previous snapshot.
    Diff,
}

/// Everything a restore needs besides guest RAM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MicrovmState {
    /// The `ember` version that wrote it, for messages.
    pub ember_version: String,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// The VM's configuration: sizes, kernel, devices (their paths are opened again).
    pub config: VmConfig,
    /// The CPU template in force (its name).
    pub cpu_template: String,
    /// Whether the syscall trap was on.
    pub syscall_trap: bool,
    /// Irqchip, PIT and kvmclock.
    pub vm: VmState,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialState,
    /// The keyboard controller.
    pub i8042: I8042State,
    /// Every virtio device's transport, queues included, in attach order.
    pub virtio: Vec<MmioTransportState>,
}

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM must be paused first (Firecracker's rule).
    #[error(
        "the VM must be paused before a snapshot is created (PATCH /vm {{\"state\": \"Paused\"}})"
    )]
    NotPaused,
    /// A diff snapshot without dirty-page tracking.
    #[error("diff snapshots need dirty-page tracking from boot (machine-config track_dirty_pages, or --track-dirty-pages)")]
    NoDirtyTracking,
    /// A state could not be read from KVM or a device.
    #[error("cannot save the {what} state: {message}")]
    Save {
        /// Which state.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// The memory file could not be written.
    #[error("cannot write the memory file {path}: {message}")]
    MemoryFile {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The state file could not be written or read.
    #[error("state file {path}: {source}")]
    StateFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: ember_snapshot::SnapshotError,
    },
    /// The memory file is unusable for this state file.
    #[error("memory file {path}: {message}")]
    BadMemoryFile {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// What a snapshot took, for the log.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotReport {
    /// Pages written to the memory file.
    pub pages: u64,
    /// Milliseconds spent.
    pub millis: f64,
}

/// Everything [`create_snapshot`] reads, from a paused VM.
pub struct PausedVm<'a> {
    /// The VM.
    pub vm: &'a crate::builder::Vm,
    /// Its vCPUs' states, saved on their threads while paused.
    pub vcpus: Vec<VcpuState>,
}

/// Writes the state file `state_path` and the memory file `mem_path` of a paused VM.
///
/// The memory file comes first and the state file is written last, through a
/// temporary file renamed into place: a state file that exists always belongs to a
/// complete memory file.
pub fn create_snapshot(
    paused: PausedVm<'_>,
    kind: SnapshotKind,
    state_path: &Path,
    mem_path: &Path,
) -> Result<SnapshotReport, SnapshotError> {
    let started = Instant::now();
    let vm = paused.vm;
    if kind == SnapshotKind::Diff && !vm.config.track_dirty_pages {
        return Err(SnapshotError::NoDirtyTracking);
    }
    let save = |what: &'static str| {
        move |e: &dyn std::fmt::Display| SnapshotError::Save {
            what,
            message: e.to_string(),
        }
    };
    let vm_state = vm
        .vm
        .save_state()
        .map_err(|e| save("VM (irqchip, PIT, clock)")(&e))?;
    let mut virtio = Vec::with_capacity(vm.transports.len());
    for transport in &vm.transports {
        virtio.push(transport.save_state().map_err(|e| save("virtio")(&e))?);
    }
    let state = MicrovmState {
        ember_version: env!("CARGO_PKG_VERSION").to_string(),
        kind,
        config: vm.config.clone(),
        cpu_template: vm.template.name().to_string(),
        syscall_trap: vm.syscall_trap,
        vm: vm_state,
        vcpus: paused.vcpus,
        serial: vm.serial.save_state(),
        i8042: vm.i8042.save_state(),
        virtio,
    };

    let memory_error = |message: String| SnapshotError::MemoryFile {
        path: mem_path.to_path_buf(),
        message,
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(mem_path)
        .map_err(|e| memory_error(e.to_string()))?;
    let memory = vm.vm.memory();
    // Every snapshot resets what "changed since the previous one" means: the logs are
    // read (and so cleared) for a full snapshot too.
    let dirty = if vm.config.track_dirty_pages {
        let mut dirty = DirtyBitmap::new(memory);
        let log = vm.vm.dirty_log().map_err(|e| save("dirty page log")(&e))?;
        for (region, words) in log.iter().enumerate() {
            dirty
                .or_region_words(region, words)
                .map_err(|e| save("dirty page log")(&e))?;
        }
        dirty
            .merge_from_vm_memory_bitmap(memory)
            .map_err(|e| save("dirty page bitmap")(&e))?;
        Some(dirty)
    } else {
        None
    };
    let pages = match (kind, dirty) {
        (SnapshotKind::Diff, Some(dirty)) => ember_memory::write_dirty_pages(memory, &file, &dirty)
            .map_err(|e| memory_error(e.to_string()))?,
        _ => {
            let bytes = ember_memory::write_memory_file(memory, &file)
                .map_err(|e| memory_error(e.to_string()))?;
            bytes / ember_arch::layout::PAGE_SIZE
        }
    };
    drop(file);
    ember_snapshot::save(state_path, SNAPSHOT_VERSION, &state).map_err(|source| {
        SnapshotError::StateFile {
            path: state_path.to_path_buf(),
            source,
        }
    })?;
    Ok(SnapshotReport {
        pages,
        millis: started.elapsed().as_secs_f64() * 1e3,
    })
}

/// Reads and checks the state file at `state_path` and opens the memory file at
/// `mem_path` for a restore: the memory file must be a regular file at least as large
/// as guest RAM, and for a diff snapshot it must already be merged (a raw diff file has
/// holes where nothing changed).
pub fn load_state(
    state_path: &Path,
    mem_path: &Path,
) -> Result<(MicrovmState, File), SnapshotError> {
    let state: MicrovmState =
        ember_snapshot::load(state_path, SNAPSHOT_VERSION).map_err(|source| {
            SnapshotError::StateFile {
                path: state_path.to_path_buf(),
                source,
            }
        })?;
    let bad = |message: String| SnapshotError::BadMemoryFile {
        path: mem_path.to_path_buf(),
        message,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(mem_path)
        .map_err(|e| bad(e.to_string()))?;
    let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".to_string()));
    }
    if meta.len() < state.config.memory_bytes {
        return Err(bad(format!(
            "{} bytes, but the snapshot's guest RAM is {} bytes",
            meta.len(),
            state.config.memory_bytes
        )));
    }
    if state.kind == SnapshotKind::Diff && has_holes(&file, meta.len()) {
        return Err(bad(
            "it has holes: this is a diff snapshot's memory file; merge it onto the \
             previous snapshot's memory file first (ember --merge-diff DIFF --into BASE)"
                .to_string(),
        ));
    }
    Ok((state, file))
}

/// Whether `file` (of `len` bytes) has a hole anywhere.
fn has_holes(file: &File, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a descriptor this function borrows; it moves only the offset.
    let hole = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_HOLE) };
    hole >= 0 && (hole as u64) < len
}

/// Copies every data extent of the diff memory file `diff` into `base` at the same
/// offsets: afterwards `base` is the memory of the diff snapshot. Returns the bytes
/// copied.
pub fn merge_diff(diff: &Path, base: &Path) -> Result<u64, String> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let from = File::open(diff).map_err(|e| format!("cannot open {}: {e}", diff.display()))?;
    let to = OpenOptions::new()
        .write(true)
        .open(base)
        .map_err(|e| format!("cannot open {}: {e}", base.display()))?;
    let len = from
        .metadata()
        .map_err(|e| format!("{}: {e}", diff.display()))?
        .len();
    let base_len = to
        .metadata()
        .map_err(|e| format!("{}: {e}", base.display()))?
        .len();
    if base_len != len {
        return Err(format!(
            "{} is {len} bytes but {} is {base_len}: not the same VM's memory",
            diff.display(),
            base.display()
        ));
    }
    let fd = from.as_raw_fd();
    let mut copied = 0u64;
    let mut at: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while (at as u64) < len {
        // SAFETY: lseek on a descriptor owned by `from`; it moves only the offset.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after `at`.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        let mut offset = data as u64;
        while offset < end as u64 {
            let n = ((end as u64 - offset) as usize).min(buf.len());
            from.read_exact_at(&mut buf[..n], offset)
                .map_err(|e| format!("reading {}: {e}", diff.display()))?;
            to.write_all_at(&buf[..n], offset)
                .map_err(|e| format!("writing {}: {e}", base.display()))?;
            offset += n as u64;
            copied += n as u64;
        }
        at = end;
    }
    to.sync_all()
        .map_err(|e| format!("syncing {}: {e}", base.display()))?;
    Ok(copied)
}

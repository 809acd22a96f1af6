//! State files on disk: [`save`] replaces a file atomically, [`load`] reads one with a
//! size cap.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{decode, encode, SnapshotError, MAX_STATE_FILE_SIZE};

/// Writes `state` to `path` as a state file of format `version`, replacing any file
/// there atomically: a reader (or a crash) sees the old file or the complete new one,
/// never a half-written one.
///
/// The container is written to a new temporary file in the same directory (opened
/// `O_CLOEXEC`, mode `0600`), synced, renamed over `path`, and the directory is synced
/// so that the rename itself is durable. On any error the temporary file is removed and
/// `path` is left as it was.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("ember-snapshot-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("vm.state");
/// ember_snapshot::save(&path, 1, &(7u32, String::from("serial")))?;
/// let back: (u32, String) = ember_snapshot::load(&path, 1)?;
/// assert_eq!(back, (7, "serial".to_string()));
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), ember_snapshot::SnapshotError>(())
/// ```
pub fn save<T: Serialize>(path: &Path, version: u32, state: &T) -> Result<(), SnapshotError> {
    let bytes = encode(version, state)?;
    let dir = parent_dir(path);
    let temp = temp_path(path)?;
    let written = write_synced(&temp, &bytes).and_then(|()| {
        fs::rename(&temp, path).map_err(|source| SnapshotError::Io {
            op: "rename the temporary state file over",
            path: path.to_path_buf(),
            source,
        })
    });
    if let Err(err) = written {
        // Best effort: the temporary file may not exist (creation failed) or may
        // already be gone.
        let _ = fs::remove_file(&temp);
        return Err(err);
    }
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| SnapshotError::Io {
            op: "sync the directory of",
            path: path.to_path_buf(),
            source,
        })
}

/// Reads the state file at `path`, of format `version`, and decodes it.
///
/// `path` is checked before it is opened: it must be a regular file
/// ([`SnapshotError::NotRegularFile`] otherwise) of at most [`MAX_STATE_FILE_SIZE`]
/// bytes ([`SnapshotError::TooLarge`]); at most that many bytes are ever read, even if
/// the file grows meanwhile. Then [`decode`]'s checks run in their order. The file is
/// opened non-blocking, so a FIFO swapped in after the check cannot hang the caller.
///
/// ```
/// use ember_snapshot::{load, SnapshotError};
/// let err = load::<u32>(std::path::Path::new("/"), 1).unwrap_err();
/// assert!(matches!(err, SnapshotError::NotRegularFile { .. }));
/// ```
pub fn load<T: DeserializeOwned>(path: &Path, version: u32) -> Result<T, SnapshotError> {
    let io_error = |op, source| SnapshotError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(|e| io_error("stat the state file", e))?;
    check_file(path, &meta)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| io_error("open the state file", e))?;
    // The file itself, as opened (the path may have been replaced since the stat).
    let meta = file
        .metadata()
        .map_err(|e| io_error("stat the state file", e))?;
    check_file(path, &meta)?;
    // Never more than the cap: the size is already known to be within it.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(MAX_STATE_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error("read the state file", e))?;
    decode(&bytes, version)
}

/// A state file must be a regular file within the size cap.
fn check_file(path: &Path, meta: &fs::Metadata) -> Result<(), SnapshotError> {
    let kind = meta.file_type();
    if !kind.is_file() || kind.is_fifo() {
        return Err(SnapshotError::NotRegularFile {
            path: path.to_path_buf(),
        });
    }
    if meta.len() > MAX_STATE_FILE_SIZE {
        return Err(SnapshotError::TooLarge {
            size: meta.len(),
            max: MAX_STATE_FILE_SIZE,
        });
    }
    Ok(())
}

/// The directory `path` is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
pub(crate) fn tests_parent_dir(path: &Path) -> PathBuf {
    parent_dir(path)
}

/// A fresh temporary name next to `path`: `.<name>.tmp-<pid>-<n>`.
fn temp_path(path: &Path) -> Result<PathBuf, SnapshotError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let Some(name) = path.file_name() else {
        return Err(SnapshotError::Io {
            op: "name a temporary file for",
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
        });
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut temp = std::ffi::OsString::from(".");
    temp.push(name);
    temp.push(format!(".tmp-{}-{n}", std::process::id()));
    Ok(path.with_file_name(temp))
}

/// Creates `temp` (it must not exist), writes `bytes` and syncs it.
fn write_synced(temp: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let io_error = |op, source| SnapshotError::Io {
        op,
        path: temp.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(temp)
        .map_err(|e| io_error("create the temporary state file", e))?;
    file.write_all(bytes)
        .map_err(|e| io_error("write the temporary state file", e))?;
    file.sync_all()
        .map_err(|e| io_error("sync the temporary state file", e))
}

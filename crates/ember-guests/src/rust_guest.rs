//! Building the test guests written in Rust, in the workspace's `guests/` directory.
//!
//! These guests are `no_std`, `no_main` crates outside the workspace. They are built
//! with the machine's stable toolchain and no extra target: for the host target, with a
//! linker script (`guests/<name>/link.ld`) that links them at 1 MiB, no start files and
//! the static relocation model. Their `_start` drops to user mode (CPL3) at once,
//! because nested KVM emulates guest kernel code one instruction at a time and cannot
//! emulate SSE, which Rust code uses freely; in user mode the code runs natively.
//!
//! ```no_run
//! let elf = ember_guests::rust_guest::build_guest("virtio-guest").unwrap();
//! assert!(elf.ends_with("virtio-guest"));
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::GuestError;

/// The target the guests are built for: the host's, named so that `RUSTFLAGS` reach
/// only the guest, not build scripts or proc macros.
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// How many lines of the build's stderr a [`GuestError::Build`] keeps.
const STDERR_TAIL_LINES: usize = 20;

/// Serialises builds within one process (tests run in parallel). Cargo's own lock on
/// the target directory serialises builds across processes.
static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// The workspace root: two levels above this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(manifest_dir)
        .to_path_buf()
}

/// The directory of guest `name`'s crate: `<workspace root>/guests/<name>`.
pub fn guest_dir(name: &str) -> PathBuf {
    workspace_root().join("guests").join(name)
}

/// The target directory the guests build into: `guests` inside the workspace's target
/// directory, which is `CARGO_TARGET_DIR` if set (a relative one is taken relative to
/// the workspace root), else `<workspace root>/target`.
pub fn guest_target_dir() -> PathBuf {
    let root = workspace_root();
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    };
    target.join("guests")
}

/// The `rustc` flags a guest is built with, for its linker script at `linker_script`.
pub fn guest_rustflags(linker_script: &Path) -> Vec<OsString> {
    let mut script_arg = OsString::from("link-arg=-Wl,-T,");
    script_arg.push(linker_script);
    [
        "-C".into(),
        "link-arg=-nostartfiles".into(),
        "-C".into(),
        "link-arg=-static".into(),
        "-C".into(),
        script_arg,
        "-C".into(),
        "relocation-model=static".into(),
        "-C".into(),
        "target-cpu=x86-64".into(),
    ]
    .into()
}

/// Builds the Rust guest in `guests/<name>` (release profile, [`GUEST_TARGET`], into
/// [`guest_target_dir`]) and returns the path of its ELF image, ready for `ember
/// --kernel`.
///
/// Runs `$CARGO` (or `cargo`), with `--locked` when the guest has a `Cargo.lock`. The
/// build is incremental, so calls after the first are cheap; concurrent calls in one
/// process wait for each other. The rustc flags go in `CARGO_ENCODED_RUSTFLAGS`, which
/// takes precedence over any `RUSTFLAGS` in the environment.
///
/// # Errors
/// [`GuestError::Build`] when cargo cannot be run, fails, or does not produce the ELF.
pub fn build_guest(name: &str) -> Result<PathBuf, GuestError> {
    let dir = guest_dir(name);
    let target_dir = guest_target_dir();
    let build_error = |status: String, stderr: &[u8]| GuestError::Build {
        guest: name.to_string(),
        status,
        stderr_tail: stderr_tail(stderr, STDERR_TAIL_LINES),
    };

    if !dir.join("Cargo.toml").is_file() {
        return Err(build_error(
            format!("no guest crate at {}", dir.display()),
            b"",
        ));
    }

    let mut rustflags = OsString::new();
    for (i, flag) in guest_rustflags(&dir.join("link.ld")).iter().enumerate() {
        if i > 0 {
            rustflags.push("\x1f");
        }
        rustflags.push(flag);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .arg("build")
        .arg("--release")
        .arg("--target")
        .arg(GUEST_TARGET)
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    if dir.join("Cargo.lock").is_file() {
        command.arg("--locked");
    }
    command
        .current_dir(&dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS");

    let output = {
        let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        command.output().map_err(|e| {
            build_error(
                format!("cannot run {}: {e}", Path::new(&cargo).display()),
                b"",
            )
        })?
    };
    if !output.status.success() {
        return Err(build_error(output.status.to_string(), &output.stderr));
    }
    let elf = target_dir.join(GUEST_TARGET).join("release").join(name);
    if !elf.is_file() {
        return Err(build_error(
            format!("cargo succeeded but {} is missing", elf.display()),
            &output.stderr,
        ));
    }
    Ok(elf)
}

/// The last `lines` lines of `stderr`, as text.
fn stderr_tail(stderr: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(stderr);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let root = workspace_root();
        assert!(
            root.join("crates").join("ember-guests").is_dir(),
            "{root:?}"
        );
        assert_eq!(
            guest_dir("virtio-guest"),
            root.join("guests").join("virtio-guest")
        );
        assert!(guest_target_dir().ends_with("guests"));
    }

    #[test]
    fn rustflags_name_the_linker_script() {
        let flags = guest_rustflags(Path::new("/a b/link.ld"));
        assert_eq!(flags.len(), 10);
        assert!(flags.contains(&OsString::from("link-arg=-Wl,-T,/a b/link.ld")));
        assert!(flags.contains(&OsString::from("relocation-model=static")));
    }

    #[test]
    fn stderr_tail_keeps_the_last_lines() {
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let tail = stderr_tail(text.as_bytes(), 20);
        assert!(tail.starts_with("line 11\n"), "{tail}");
        assert!(tail.ends_with("line 30"), "{tail}");
        assert_eq!(stderr_tail(b"one", 20), "one");
        assert_eq!(stderr_tail(b"", 20), "");
    }

    #[test]
    fn a_missing_guest_is_a_build_error() {
        let err = build_guest("no-such-guest").unwrap_err();
        match &err {
            GuestError::Build { guest, .. } => assert_eq!(guest, "no-such-guest"),
            other => panic!("unexpected error: {other}"),
        }
        assert!(err.to_string().contains("no-such-guest"), "{err}");
    }
}

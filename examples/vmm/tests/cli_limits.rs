//! `ember` refuses kernel and initrd files it should not read: anything but a regular
//! file (a device such as `/dev/zero` would be read forever, a FIFO would block), and
//! files too large to be a kernel or to fit in guest RAM, checked before a byte is read.
//! These checks run before KVM is opened, so these tests need no KVM.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ember_guests::testing::{run_with_timeout, CapturedRun};

/// Runs `ember` with `args`; fails the test if it has not exited within `limit` (a
/// process reading `/dev/zero` or a FIFO would never exit; it is killed first).
fn ember_within(args: &[&str], limit: Duration) -> CapturedRun {
    let out = run_with_timeout(Command::new(env!("CARGO_BIN_EXE_ember")).args(args), limit);
    assert!(
        out.status.is_some(),
        "ember {args:?} still running after {limit:?} (reading the file?); stderr: {}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("panicked"),
        "ember panicked: {}",
        out.stderr
    );
    out
}

/// Asserts exit status 1 with exactly one `ember: error:` line containing every needle.
fn assert_one_error_line(out: &CapturedRun, needles: &[&str]) {
    let err = &out.stderr;
    assert_eq!(out.code(), Some(1), "stderr: {err}");
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].starts_with("ember: error: "), "{err}");
    for needle in needles {
        assert!(lines[0].contains(needle), "expected {needle:?} in: {err}");
    }
}

/// A sparse file of `size` bytes (no data blocks, so any size is cheap to create).
fn sparse(path: &Path, size: u64) {
    let file = std::fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn kernel_that_is_not_a_regular_file_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("kernel.fifo");
    mkfifo(&fifo);
    let dir_path = dir.path().display().to_string();
    let fifo_path = fifo.display().to_string();
    for (path, kind) in [
        ("/dev/zero", "character device"),
        ("/dev/null", "character device"),
        (dir_path.as_str(), "directory"),
        (fifo_path.as_str(), "FIFO"),
    ] {
        let out = ember_within(&["--kernel", path], LIMIT);
        assert_one_error_line(
            &out,
            &[&format!("kernel {path} is a {kind}, not a regular file")],
        );
    }
}

#[test]
fn initrd_that_is_not_a_regular_file_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"not read far: the initrd is checked first").unwrap();
    let fifo = dir.path().join("initrd.fifo");
    mkfifo(&fifo);
    let kernel = kernel.display().to_string();
    let fifo_path = fifo.display().to_string();
    for (path, kind) in [
        ("/dev/zero", "character device"),
        (fifo_path.as_str(), "FIFO"),
    ] {
        let out = ember_within(&["--kernel", &kernel, "--initrd", path], LIMIT);
        assert_one_error_line(
            &out,
            &[&format!("initrd {path} is a {kind}, not a regular file")],
        );
    }
}

#[test]
fn huge_kernel_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("huge-vmlinux");
    // 64 GiB, sparse: reading it would take minutes and 64 GiB of memory.
    let size: u64 = 64 << 30;
    sparse(&kernel, size);
    let start = Instant::now();
    let out = ember_within(&["--kernel", &kernel.display().to_string()], LIMIT);
    assert_one_error_line(
        &out,
        &[
            &format!("kernel {}", kernel.display()),
            &format!("is {size} bytes (65536.0 MiB)"),
            "536870912 bytes (512.0 MiB)",
        ],
    );
    println!("refused a 64 GiB kernel in {:?}", start.elapsed());

    // Just over the limit is refused too; the limit itself is a size, not a guess.
    sparse(&kernel, (512 << 20) + 1);
    let out = ember_within(&["--kernel", &kernel.display().to_string()], LIMIT);
    assert_one_error_line(&out, &["is 536870913 bytes", "536870912 bytes"]);
}

#[test]
fn initrd_larger_than_guest_ram_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"never parsed").unwrap();
    let initrd = dir.path().join("initrd");
    let size: u64 = 40 << 20;
    sparse(&initrd, size);
    // 32 MiB of RAM: 31 MiB from 1 MiB up.
    let out = ember_within(
        &[
            "--kernel",
            &kernel.display().to_string(),
            "--initrd",
            &initrd.display().to_string(),
            "--memory",
            "32M",
        ],
        LIMIT,
    );
    assert_one_error_line(
        &out,
        &[
            &format!("initrd {}", initrd.display()),
            &format!("is {size} bytes (40.0 MiB)"),
            &format!("{} bytes (31.0 MiB)", 31u64 << 20),
        ],
    );
    // A huge one is refused as fast.
    sparse(&initrd, 64 << 30);
    let out = ember_within(
        &[
            "--kernel",
            &kernel.display().to_string(),
            "--initrd",
            &initrd.display().to_string(),
        ],
        LIMIT,
    );
    assert_one_error_line(&out, &["initrd", "68719476736 bytes"]);
}

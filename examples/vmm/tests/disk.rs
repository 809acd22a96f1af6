//! `ember --disk` from outside: image locking between two `ember` processes, data that
//! a guest flushed surviving a SIGKILL of the VMM, refused backing files, and the
//! virtio-blk rate limiter measured against its configured rate with a guest that
//! saturates the disk (the Rust test guest's `blk-bench`).
//!
//! `cargo test -p ember-vmm --test disk -- --nocapture` prints the measured rates.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ember_guests::rust_guest::build_guest;
use ember_guests::testing::{kvm_available, run_with_timeout, CapturedRun};

fn guest() -> PathBuf {
    build_guest("virtio-guest").unwrap_or_else(|e| panic!("{e}"))
}

/// `ember --kernel <virtio-guest> <args> --cmdline "console=ttyS0 <cmdline>"`.
fn ember(guest: &Path, args: &[&str], cmdline: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ember"));
    command
        .arg("--kernel")
        .arg(guest)
        .args(args)
        .args(["--cmdline", &format!("console=ttyS0 {cmdline}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A running `ember` whose stdout lines arrive, timestamped, on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
    stderr: std::thread::JoinHandle<String>,
}

impl Running {
    fn start(mut command: Command) -> Running {
        let mut child = command.spawn().expect("cannot start ember");
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if send.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Waits up to `timeout` for the line `want`; returns its arrival time, or `None`
    /// if the output ended or the time ran out.
    fn wait_line(&mut self, want: &str, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let (at, line) = self.lines.recv_timeout(left).ok()?;
            self.seen.push((at, line.clone()));
            if line == want {
                return Some(at);
            }
        }
    }

    fn stdout(&self) -> String {
        self.seen.iter().map(|(_, l)| format!("{l}\n")).collect()
    }

    /// SIGKILL, and the process's stderr.
    fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr.join().unwrap_or_default()
    }

    /// Waits up to `timeout` for the process to exit; kills it if it does not.
    fn finish(mut self, timeout: Duration) -> (Option<std::process::ExitStatus>, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line);
            }
            match self.child.try_wait().expect("wait for ember") {
                Some(status) => break Some(status),
                None if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break None;
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        // The reader thread ends with the pipe.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        let stderr = self.stderr.join().unwrap_or_default();
        (status, stderr)
    }
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

/// What the guest's `blk-flush` scenario writes at byte `offset` of the disk.
fn flush_pattern(offset: u64) -> u8 {
    offset.wrapping_mul(7).wrapping_add(0x3d) as u8
}
/// The bytes `blk-flush` writes: sectors 8..16.
const FLUSHED: std::ops::Range<u64> = 8 * 512..16 * 512;
const FLUSHED_LINE: &str = "virtio-guest: blk-flush flushed";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn disk_image(dir: &tempfile::TempDir, name: &str, bytes: usize) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, vec![0u8; bytes]).unwrap();
    path
}

#[test]
fn data_flushed_by_the_guest_survives_sigkill() {
    if !kvm_available("data_flushed_by_the_guest_survives_sigkill") {
        return;
    }
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    let image = disk_image(&dir, "flush.img", 1 << 20);
    let mut vm = Running::start(ember(
        &guest,
        &["--disk", &format!("path={}", image.display())],
        "ember.test=blk-flush",
    ));
    let flushed = vm.wait_line(FLUSHED_LINE, BOOT_TIMEOUT);
    // SIGKILL at once: nothing after the FLUSH completed can help the data along.
    let stdout = vm.stdout();
    let stderr = vm.kill();
    assert!(
        flushed.is_some(),
        "no {FLUSHED_LINE:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let data = std::fs::read(&image).unwrap();
    for offset in FLUSHED {
        assert_eq!(
            data[offset as usize],
            flush_pattern(offset),
            "byte {offset} of the image after the SIGKILL"
        );
    }
    // Nothing else was written.
    assert!(data[..FLUSHED.start as usize].iter().all(|&b| b == 0));
    assert!(data[FLUSHED.end as usize..].iter().all(|&b| b == 0));
}

#[test]
fn a_second_ember_cannot_open_a_disk_in_use() {
    if !kvm_available("a_second_ember_cannot_open_a_disk_in_use") {
        return;
    }
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    let image = disk_image(&dir, "shared.img", 1 << 20);
    let rw = format!("path={}", image.display());
    let ro = format!("path={},readonly=on", image.display());
    let mut first = Running::start(ember(&guest, &["--disk", &rw], "ember.test=blk-flush"));
    let running = first.wait_line(FLUSHED_LINE, BOOT_TIMEOUT).is_some();
    let first_pid = first.child.id();
    // While the first runs, a second ember fails at once, whether it wants the disk
    // read-write or read-only, with one line naming the image and the holder.
    let second_rw = run_with_timeout(
        &mut ember(&guest, &["--disk", &rw], "ember.test=blk"),
        BOOT_TIMEOUT,
    );
    let second_ro = run_with_timeout(
        &mut ember(&guest, &["--disk", &ro], "ember.test=blk-ro"),
        BOOT_TIMEOUT,
    );
    let stdout = first.stdout();
    let stderr = first.kill();
    assert!(
        running,
        "the first ember did not get going\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let path = image.display().to_string();
    let holder = format!("process {first_pid} (ember)");
    assert_one_error_line(
        &second_rw,
        &[&path, "is in use", &holder, "cannot be opened read-write"],
    );
    assert_one_error_line(
        &second_ro,
        &[&path, "is in use", &holder, "cannot be opened read-only"],
    );
    // The guest never started: nothing on stdout.
    assert!(second_rw.stdout.is_empty() && second_ro.stdout.is_empty());

    // Once the first is gone, the lock is too.
    let out = run_with_timeout(
        &mut ember(&guest, &["--disk", &rw], "ember.test=blk"),
        BOOT_TIMEOUT,
    );
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
}

#[test]
fn two_read_only_embers_share_a_disk() {
    if !kvm_available("two_read_only_embers_share_a_disk") {
        return;
    }
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    let image = disk_image(&dir, "ro.img", 1 << 20);
    let ro = format!("path={},readonly=on", image.display());
    // blk-flush fails on a read-only disk and exits; use blk-ro twice at once instead.
    let a = Running::start(ember(&guest, &["--disk", &ro], "ember.test=blk-ro"));
    let b = Running::start(ember(&guest, &["--disk", &ro], "ember.test=blk-ro"));
    for (name, vm) in [("first", a), ("second", b)] {
        let (status, stderr) = vm.finish(BOOT_TIMEOUT);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "{name} read-only ember: {stderr}"
        );
    }
}

#[test]
fn disks_that_are_not_files_or_block_devices_are_refused() {
    if !kvm_available("disks_that_are_not_files_or_block_devices_are_refused") {
        return;
    }
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("disk.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let dir_path = dir.path().display().to_string();
    let fifo_path = fifo.display().to_string();
    for (path, kind) in [
        (dir_path.as_str(), "directory"),
        (fifo_path.as_str(), "FIFO"),
        ("/dev/zero", "character device"),
    ] {
        for readonly in ["off", "on"] {
            let out = run_with_timeout(
                &mut ember(
                    &guest,
                    &["--disk", &format!("path={path},readonly={readonly}")],
                    "ember.test=blk",
                ),
                BOOT_TIMEOUT,
            );
            assert_one_error_line(
                &out,
                &[&format!("disk image {path} is a {kind}"), "regular files"],
            );
        }
    }
}

/// One `blk-bench` run over `mib` MiB (read, then written): the time from the guest's
/// `bench start` line to its `bench write done` line.
fn bench(guest: &Path, image: &Path, mib: u64, extra: &str) -> Duration {
    let bytes = mib << 20;
    let disk = format!("path={}{extra}", image.display());
    let mut vm = Running::start(ember(
        guest,
        &["--disk", &disk],
        &format!("ember.test=blk-bench ember.mib={mib}"),
    ));
    let start = vm.wait_line("virtio-guest: bench start", BOOT_TIMEOUT);
    let done = vm.wait_line(
        &format!("virtio-guest: bench write done {bytes}"),
        Duration::from_secs(600),
    );
    let (status, stderr) = vm.finish(BOOT_TIMEOUT);
    let (Some(start), Some(done)) = (start, done) else {
        panic!("bench lines missing (status {status:?})\nstderr:\n{stderr}");
    };
    assert_eq!(status.and_then(|s| s.code()), Some(0), "stderr: {stderr}");
    done - start
}

/// What the limited runs are held to: `total` tokens at `size` per `refill_ms`, less
/// what the bucket (and the one-time burst) hold at the start and less the last
/// `request` (requests are charged when done, so the last one's debt is never waited
/// for), take at least this long.
fn minimum(total: u64, size: u64, burst: u64, refill_ms: u64, request: u64) -> Duration {
    let rate = size as f64 * 1000.0 / refill_ms as f64;
    Duration::from_secs_f64(total.saturating_sub(size + burst + request) as f64 / rate)
}

#[test]
fn rate_limited_disk_holds_a_saturating_guest_to_the_rate() {
    if !kvm_available("rate_limited_disk_holds_a_saturating_guest_to_the_rate") {
        return;
    }
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    // 8 MiB read and 8 MiB written, in 64 KiB requests: 16 MiB and 256 requests.
    let mib = 8u64;
    let image = disk_image(&dir, "bench.img", (mib << 20) as usize);
    let total_bytes = 2 * (mib << 20);
    let total_ops = total_bytes / (64 << 10);

    let free = bench(&guest, &image, mib, "");

    // Bandwidth: 4 MiB/s (1 MiB per 250 ms) after a one-time burst of 1 MiB.
    let (size, burst, refill) = (1u64 << 20, 1u64 << 20, 250u64);
    let limited = bench(
        &guest,
        &image,
        mib,
        &format!(",bw_size={size},bw_one_time_burst={burst},bw_refill_time={refill}"),
    );
    let min = minimum(total_bytes, size, burst, refill, 64 << 10);
    let configured = size as f64 * 1000.0 / refill as f64;
    let measured = total_bytes.saturating_sub(size + burst) as f64 / limited.as_secs_f64();
    println!(
        "virtio-blk bandwidth limit {:.1} MiB/s (bw_size={size},bw_one_time_burst={burst},\
         bw_refill_time={refill}): {total_bytes} bytes in {limited:.2?} (at least {min:.2?}); \
         {:.2} MiB/s past the bucket and burst = {:.3} of the configured rate; \
         unlimited: {free:.2?} ({:.1} MiB/s)",
        configured / f64::from(1u32 << 20),
        measured / f64::from(1u32 << 20),
        measured / configured,
        total_bytes as f64 / free.as_secs_f64() / f64::from(1u32 << 20),
    );
    assert!(
        limited >= min.mul_f64(0.95),
        "{total_bytes} bytes in {limited:?}, faster than the limit allows ({min:?})"
    );

    // Operations: 64 requests/s (16 per 250 ms), no burst.
    let (ops, ops_refill) = (16u64, 250u64);
    let limited_ops = bench(
        &guest,
        &image,
        mib,
        &format!(",ops_size={ops},ops_refill_time={ops_refill}"),
    );
    let min_ops = minimum(total_ops, ops, 0, ops_refill, 1);
    let configured_ops = ops as f64 * 1000.0 / ops_refill as f64;
    let measured_ops = total_ops.saturating_sub(ops) as f64 / limited_ops.as_secs_f64();
    println!(
        "virtio-blk ops limit {configured_ops:.0}/s (ops_size={ops},ops_refill_time={ops_refill}): \
         {total_ops} requests in {limited_ops:.2?} (at least {min_ops:.2?}); {measured_ops:.1}/s \
         past the bucket = {:.3} of the configured rate",
        measured_ops / configured_ops,
    );
    assert!(
        limited_ops >= min_ops.mul_f64(0.95),
        "{total_ops} requests in {limited_ops:?}, faster than the limit allows ({min_ops:?})"
    );

    // Without a limit the same guest is much faster: the limits are what held it.
    assert!(
        free * 2 < min,
        "unlimited {free:?} is not much faster than the bandwidth limit's {min:?}"
    );
    assert!(
        free * 2 < min_ops,
        "unlimited {free:?} is not much faster than the ops limit's {min_ops:?}"
    );
}

#[test]
fn disk_serial_reaches_the_guest() {
    if !kvm_available("disk_serial_reaches_the_guest") {
        return;
    }
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    let image = disk_image(&dir, "serial.img", 1 << 20);
    let out = run_with_timeout(
        &mut ember(
            &guest,
            &[
                "--disk",
                &format!("path={},serial=EMBER-SN-0042", image.display()),
            ],
            "ember.test=blk",
        ),
        BOOT_TIMEOUT,
    );
    let stdout = &out.stdout;
    assert_eq!(out.code(), Some(0), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l == "virtio-guest: blk id EMBER-SN-0042"),
        "{stdout}"
    );
    // Without one, a hash of the path: the same on every run, no inode number.
    let id = |out: &CapturedRun| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix("virtio-guest: blk id ").map(str::to_string))
            .unwrap_or_default()
    };
    let run = || {
        run_with_timeout(
            &mut ember(
                &guest,
                &["--disk", &format!("path={}", image.display())],
                "ember.test=blk",
            ),
            BOOT_TIMEOUT,
        )
    };
    let (a, b) = (id(&run()), id(&run()));
    assert!(a.starts_with("ember-") && a.len() == 20, "{a:?}");
    assert_eq!(a, b);
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&image).unwrap());
    assert!(!a.contains(&ino.to_string()), "{a} shows inode {ino}");
}
